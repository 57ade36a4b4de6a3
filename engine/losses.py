"""The training objectives in plain PyTorch: the single source of truth for their formulas.

Where this sits in the flow: the trunk produces hidden states, `ddpo_kernels.fused_preference_loss`
turns them into per-sequence sums of response-token log-probs, and `preference_loss` (the
epilogue, handed to the kernel as `loss_epilogue(objective, ...)`) turns those sums, the token
counts, the reference log-probs and the deviation weights into one scalar loss plus TRL-named
metrics. The fused kernels, the trainer and the benchmarks all call (or are tested against) the
functions here; nothing else re-derives a formula. The kernels know no formula: they rely on the
separability every objective here has (see `loss_epilogue`).

Objectives (`POLICY_OBJECTIVES`):
- "dpo"   Rafailov et al. 2023, sigmoid loss; = "ddpo" with every weight 1.
- "ddpo"  deviation-weighted DPO, Chung et al. 2025.
- "orpo"  Hong et al. 2024, NLL + odds-ratio term; = "dorpo" with every weight 1.
- "dorpo" deviation-weighted ORPO, Chung et al. 2025.
- "sft"   token-mean negative log-likelihood of the chosen responses.

Reward-model losses (`REWARD_LOSSES`, objective "reward"), on one scalar reward per sequence read
from a sequence-classification head (engine.reward):
- "l1"            mean absolute error to each response's transformed score (the authors' criterion);
- "mse"           mean squared error to the same labels;
- "bradley_terry" -logsigmoid(chosen - rejected - margin) over preference pairs, with TRL's optional
                  margin and center_rewards_coefficient (TRL's RewardTrainer).

Conventions shared by every function:
- Inputs are 1-D tensors over the P pairs of a batch, any float dtype. The math runs in fp32
  (fp64 stays fp64 so that `torch.autograd.gradcheck` can check these functions); low precision
  inputs are upcast here, so callers never have to.
- The returned `LossOutput.loss` is a differentiable 0-dim tensor; `metrics` holds detached
  0-dim fp32 tensors (batch means) under the names TRL users know; the per-pair fields are
  detached and are there for logging and for kernel tests.
- No function here synchronises with the device (no `.item()`), so they are safe in a step loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.config import POLICY_OBJECTIVES, REWARD_LOSSES  # declared once, as Literals in engine.config

# Largest argument log1mexp accepts before clamping. An average log-prob of exactly 0 (a
# response with no tokens, or a model that is certain of every token) gives log(1 - exp(0)) =
# -inf, which turns the ORPO log-odds into inf and its gradient into NaN. Clamping to -1e-7
# costs nothing measurable (the odds of p = exp(-1e-7) are already 1e7) and keeps the loss and
# its gradient finite; the gradient with respect to arguments above the clamp is 0. -1e-7 is
# representable in fp32 and bf16 with full relative precision, so the clamp acts the same way
# for every input dtype.
LOG1MEXP_MAX_ARG = -1e-7

# Below -ln 2, 1 - exp(x) is > 1/2 and log1p(-exp(x)) is accurate; above it, exp(x) is close to
# 1 and the subtraction cancels, so log(-expm1(x)) is used instead (Maechler 2012, "Accurately
# computing log(1 - exp(-|a|))").
_LOG1MEXP_SWITCH = -math.log(2.0)


@dataclass
class LossOutput:
    """What every objective returns.

    loss: 0-dim, differentiable, in the compute dtype (fp32, or fp64 for fp64 inputs).
    metrics: TRL-style names -> detached 0-dim fp32 tensors (batch means; accuracies as a fraction).
    per_pair_loss: detached [P] per-pair term whose mean is the pairwise part of the loss
        (for DPO/DDPO the whole loss; for ORPO/DORPO the odds-ratio term beta * logsigmoid(.)).
    chosen_rewards, rejected_rewards: detached [P] implicit rewards, TRL's definition per objective.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    per_pair_loss: torch.Tensor | None = None
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 for every input dtype except fp64, which is kept so gradcheck sees exact math."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_pairs(**named: torch.Tensor | None) -> int:
    """Check that every given tensor is 1-D over the same P >= 1 pairs; return P."""
    num_pairs = None
    first_name = None
    for name, value in named.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [P], got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D over the P pairs of the batch, got shape {tuple(value.shape)}; "
                "pass per-sequence values (one per pair), e.g. flatten with .reshape(-1)"
            )
        if num_pairs is None:
            num_pairs, first_name = value.shape[0], name
        elif value.shape[0] != num_pairs:
            raise ValueError(
                f"{name} has {value.shape[0]} entries but {first_name} has {num_pairs}; "
                "every per-pair input must cover the same P pairs"
            )
    if num_pairs == 0:
        raise ValueError(f"{first_name} is empty (P = 0); a loss needs at least one pair")
    return num_pairs


def _check_beta(beta: float, name: str, allow_zero: bool) -> None:
    ok = math.isfinite(beta) and (beta >= 0 if allow_zero else beta > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {beta!r}")


def _weights_metrics(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weights.detach().float()
    return {"weights/mean": w.mean(), "weights/min": w.min(), "weights/max": w.max()}


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics: batch means of the rewards, their margin and how often chosen wins."""
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Stable log(1 - exp(x)) for x < 0, computed in fp32 (fp64 for fp64 input).

    Arguments above `LOG1MEXP_MAX_ARG` (-1e-7) are clamped to it, so log1mexp(0) is
    log(1 - exp(-1e-7)) ~ -16.1 instead of -inf (see `LOG1MEXP_MAX_ARG` for why).
    Each branch of the `where` also gets its input clamped into its own domain: `where` passes
    a zero gradient to the branch it did not pick, but 0 * inf is NaN, so the unpicked branch
    must have a finite derivative too. (The -1e-7 clamp already guarantees that today; the
    per-branch clamps keep it true if that bound is ever loosened to 0.)
    """
    x = x.to(_compute_dtype(x)).clamp(max=LOG1MEXP_MAX_ARG)
    far = torch.log1p(-torch.exp(x.clamp(max=_LOG1MEXP_SWITCH)))
    near = torch.log(-torch.expm1(x.clamp(min=_LOG1MEXP_SWITCH)))
    return torch.where(x < _LOG1MEXP_SWITCH, far, near)


def _preference_output(
    loss: torch.Tensor,
    per_pair: torch.Tensor,
    pc: torch.Tensor,
    pr: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    weights: torch.Tensor,
    objective_metrics: dict[str, torch.Tensor] | None = None,
) -> LossOutput:
    """A preference loss's LossOutput with TRL's metric names: rewards/*, logps/chosen and logps/rejected
    (mean sums), the objective's own metrics, weights/*."""
    with torch.no_grad():
        metrics = _reward_metrics(chosen_rewards, rejected_rewards)
        metrics["logps/chosen"] = pc.detach().float().mean()
        metrics["logps/rejected"] = pr.detach().float().mean()
        metrics.update(objective_metrics or {})
        metrics.update(_weights_metrics(weights))
    return LossOutput(
        loss=loss,
        metrics=metrics,
        per_pair_loss=per_pair.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )


def ddpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_weights: torch.Tensor | None = None,
    beta: float = 0.1,
) -> LossOutput:
    """Deviation-weighted DPO (DDPO).

        z_i  = beta * ((pc_i - rc_i) - (pr_i - rr_i))
        loss = mean_i( w_i * -logsigmoid(z_i) )

    pc/pr are the policy's and rc/rr the reference's per-sequence SUMS of response-token
    log-probs for the chosen/rejected response of pair i; w_i is the deviation weight of the
    chosen response of pair i. `chosen_weights=None` means w_i = 1, which is exactly the DPO
    sigmoid loss of Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", Eq. 7. The weighting is from Chung et al. 2025, "Modifying Large
    Language Model Post-Training for Diverse Creative Writing".

    Metrics (TRL's DPOTrainer names): rewards/* with chosen reward beta * (pc - rc) and rejected
    reward beta * (pr - rr), logps/chosen and logps/rejected (mean sums), weights/*.
    """
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if value is None:
            raise ValueError(
                f"{name} is None; DPO/DDPO need reference log-probs for both responses. "
                "Build the reference cache (engine.refcache) or use objective 'orpo'/'dorpo'/'sft', which need none"
            )
    num_pairs = _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_weights=chosen_weights,
    )
    _check_beta(beta, "beta", allow_zero=False)
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)

    # Same association as TRL, (pc - rc) - (pr - rr), so the unweighted loss matches it bit for bit.
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    per_pair = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    if chosen_weights is None:
        # Skip the multiply entirely: the unweighted loss is then DPO exactly, not DPO * 1.0.
        weights = torch.ones(num_pairs, dtype=dtype, device=pc.device)
    else:
        weights = chosen_weights.to(dtype)
        per_pair = weights * per_pair
    loss = per_pair.mean()

    return _preference_output(
        loss, per_pair, pc, pr, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), weights
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """DPO sigmoid loss (Rafailov et al. 2023, Eq. 7): `ddpo_loss` with every weight 1.

    loss = mean_i( -logsigmoid(beta * ((pc_i - rc_i) - (pr_i - rr_i))) )
    """
    return ddpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_weights=None, beta=beta
    )


def dorpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor | float,
    chosen_weights: torch.Tensor | None = None,
    beta: float = 0.25,
) -> LossOutput:
    """Deviation-weighted ORPO (DORPO).

        log_odds_i = (pc_i - pr_i) - (log(1 - exp(pc_i)) - log(1 - exp(pr_i)))
        loss       = mean_i(w_i) * chosen_nll - mean_i( beta * logsigmoid(w_i * log_odds_i) )

    pc/pr are per-sequence MEANS of response-token log-probs (so exp(pc) is the geometric-mean
    token probability and log_odds is the log of odds(chosen) / odds(rejected));
    chosen_nll is the scalar token-mean NLL over the chosen responses of the batch; w_i is the
    deviation weight of the chosen response of pair i. `chosen_weights=None` gives ORPO of Hong
    et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 6-7,
    with beta as its lambda. The weighting is from Chung et al. 2025, "Modifying Large Language
    Model Post-Training for Diverse Creative Writing". log(1 - exp(.)) is `log1mexp`, which clamps
    its argument to at most -1e-7 so an average log-prob of 0 stays finite.

    Metrics (TRL's ORPOTrainer names): rewards/* with reward beta * avg logp, logps/chosen and
    logps/rejected (mean avg logps), nll_loss, log_odds_ratio = mean(logsigmoid(log_odds)),
    log_odds_chosen = mean(log_odds) (both unweighted, as TRL logs them), weights/*.
    """
    num_pairs = _check_pairs(
        policy_chosen_avg_logps=policy_chosen_avg_logps,
        policy_rejected_avg_logps=policy_rejected_avg_logps,
        chosen_weights=chosen_weights,
    )
    _check_beta(beta, "beta (ORPO's lambda)", allow_zero=True)
    if not isinstance(chosen_nll, torch.Tensor):
        chosen_nll = torch.as_tensor(chosen_nll, device=policy_chosen_avg_logps.device)
    if chosen_nll.numel() != 1:
        raise ValueError(
            "chosen_nll must be the scalar token-mean NLL of the chosen responses, "
            f"got shape {tuple(chosen_nll.shape)}; reduce it with -sum(chosen token log-probs) / number of chosen "
            "tokens"
        )
    dtype = _compute_dtype(policy_chosen_avg_logps, policy_rejected_avg_logps, chosen_nll)
    pc, pr = policy_chosen_avg_logps.to(dtype), policy_rejected_avg_logps.to(dtype)
    nll = chosen_nll.to(dtype).reshape(())

    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    if chosen_weights is None:
        weights = torch.ones(num_pairs, dtype=dtype, device=pc.device)
        per_pair = beta * F.logsigmoid(log_odds)
        loss = nll - per_pair.mean()
    else:
        weights = chosen_weights.to(dtype)
        per_pair = beta * F.logsigmoid(weights * log_odds)
        loss = weights.mean() * nll - per_pair.mean()

    with torch.no_grad():
        odds = {
            "nll_loss": nll.detach().float(),
            "log_odds_ratio": F.logsigmoid(log_odds.detach()).float().mean(),
            "log_odds_chosen": log_odds.detach().float().mean(),
        }
    out = _preference_output(loss, per_pair, pc, pr, beta * pc.detach(), beta * pr.detach(), weights, odds)
    out.extras["log_odds"] = log_odds.detach()
    return out


def orpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor | float,
    beta: float = 0.25,
) -> LossOutput:
    """ORPO (Hong et al. 2024, Eqs. 6-7): `dorpo_loss` with every weight 1.

    loss = chosen_nll - mean_i( beta * logsigmoid(log_odds_i) )
    """
    return dorpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, chosen_nll, chosen_weights=None, beta=beta)


def sft_loss(chosen_logps: torch.Tensor, chosen_token_counts: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning on the chosen responses: the token-mean negative log-likelihood.

        loss = -sum_i(chosen_logps_i) / max(sum_i(chosen_token_counts_i), 1)

    chosen_logps are per-sequence SUMS of response-token log-probs, so this is the mean over
    every response token of the batch (long responses weigh more, as in standard causal-LM
    training), not a mean of per-sequence means. The max(., 1) keeps a batch with no response
    tokens at a loss of 0 instead of 0/0.

    Metrics: nll_loss (= the loss), logps/chosen (mean per-sequence sum).
    """
    _check_pairs(chosen_logps=chosen_logps, chosen_token_counts=chosen_token_counts)
    dtype = _compute_dtype(chosen_logps)
    logps = chosen_logps.to(dtype)
    num_tokens = chosen_token_counts.to(dtype).sum().clamp(min=1)
    loss = -logps.sum() / num_tokens
    with torch.no_grad():
        metrics = {
            "nll_loss": loss.detach().float(),
            "logps/chosen": logps.detach().float().mean(),
        }
    return LossOutput(loss=loss, metrics=metrics)


def preference_loss(
    objective: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor | None,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor | None,
    *,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_prompt_logps: torch.Tensor | None = None,
    chosen_prompt_counts: torch.Tensor | None = None,
) -> LossOutput:
    """The loss epilogue: per-sequence sums and token counts -> the chosen objective.

    chosen_logps / rejected_logps: [P] per-sequence SUMS of response-token log-probs.
    chosen_counts / rejected_counts: [P] numbers of response tokens (any numeric dtype).
    chosen_prompt_logps / chosen_prompt_counts: [P] sums and counts of the chosen sequences' prompt
    tokens (config loss.nll_on_prompt); they enter the NLL only, never the odds ratio or a reward.
    Dispatch:
    - "dpo":   ddpo_loss with weights ignored (every w_i = 1); needs ref_*_logps.
    - "ddpo":  ddpo_loss with chosen_weights (None -> 1); needs ref_*_logps.
    - "orpo":  dorpo_loss on averages sums / max(counts, 1) of the response tokens, and
               chosen_nll = -(sum(chosen sums) + sum(prompt sums)) / max(sum(chosen counts) + sum(prompt counts), 1)
               (prompt terms 0 without prompt inputs), weights ignored.
    - "dorpo": the same with chosen_weights (None -> 1).
    - "sft":   sft_loss on the chosen side (prompt tokens included when given); the rejected inputs
               may be None and are ignored.
    With prompt inputs, ORPO/DORPO are the authors' recipe: their DORPOTrainer takes the NLL over
    prompt + response tokens of the chosen sequence (labels are the input ids masked only by the
    attention mask, mj-storytelling/DiversityTuning models/dorpo_trainer.py lines 815-819 and 826,
    weighted by (score_chosen + 1) and averaged over pairs at lines 834-835, i.e. mean(w) * NLL here),
    while the log-odds use response tokens only (get_batch_logps on the prompt-masked labels, lines
    839-845); TRL's ORPOTrainer does the same (trl/experimental/orpo/orpo_trainer.py, "orpo chosen
    nll loss is computed over the full prompt and response").
    All math runs in fp32 whatever the input dtype (fp64 stays fp64).
    """
    if objective not in POLICY_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid objectives are {', '.join(POLICY_OBJECTIVES)}")
    if (chosen_prompt_logps is None) != (chosen_prompt_counts is None):
        raise ValueError("chosen_prompt_logps and chosen_prompt_counts go together: pass both or neither")
    if chosen_prompt_logps is not None:
        if objective in ("dpo", "ddpo"):
            raise ValueError(
                f"objective {objective!r} has no NLL term, so prompt-token log-probs have nowhere to go; "
                "use them with orpo, dorpo or sft (set loss.nll_on_prompt false for dpo/ddpo)"
            )
        _check_pairs(
            chosen_logps=chosen_logps,
            chosen_prompt_logps=chosen_prompt_logps,
            chosen_prompt_counts=chosen_prompt_counts,
        )
    if objective == "sft":
        if chosen_prompt_logps is None:
            return sft_loss(chosen_logps, chosen_counts)
        dtype = _compute_dtype(chosen_logps, chosen_prompt_logps)
        sequence_logps = chosen_logps.to(dtype) + chosen_prompt_logps.to(dtype)
        return sft_loss(sequence_logps, chosen_counts.to(dtype) + chosen_prompt_counts.to(dtype))

    for name, value in (("rejected_logps", rejected_logps), ("rejected_counts", rejected_counts)):
        if value is None:
            raise ValueError(f"{name} is None; objective {objective!r} compares chosen with rejected and needs it")
    _check_pairs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_counts=chosen_counts,
        rejected_counts=rejected_counts,
        chosen_weights=chosen_weights,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    weights = chosen_weights if objective in ("ddpo", "dorpo") else None

    if objective in ("dpo", "ddpo"):
        return ddpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_weights=weights, beta=beta
        )

    dtype = _compute_dtype(chosen_logps, rejected_logps)
    chosen_sums, rejected_sums = chosen_logps.to(dtype), rejected_logps.to(dtype)
    chosen_n, rejected_n = chosen_counts.to(dtype), rejected_counts.to(dtype)
    # A response with no tokens has sum 0; clamping its count to 1 gives average 0, which
    # log1mexp then clamps to -1e-7, so such a pair cannot produce inf/NaN.
    chosen_avg = chosen_sums / chosen_n.clamp(min=1)
    rejected_avg = rejected_sums / rejected_n.clamp(min=1)
    nll_sum, nll_n = chosen_sums.sum(), chosen_n.sum()
    if chosen_prompt_logps is not None:
        nll_sum = nll_sum + chosen_prompt_logps.to(dtype).sum()
        nll_n = nll_n + chosen_prompt_counts.to(dtype).sum()
    chosen_nll = -nll_sum / nll_n.clamp(min=1)
    return dorpo_loss(chosen_avg, rejected_avg, chosen_nll, chosen_weights=weights, beta=beta)


def loss_epilogue(
    objective: str,
    *,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> Callable[..., LossOutput]:
    """`preference_loss` bound to an objective and a batch's weights and reference log-probs: the
    epilogue `ddpo_kernels.fused_preference_loss` calls as epilogue(chosen_logps, rejected_logps,
    chosen_counts, rejected_counts[, chosen_prompt_logps=, chosen_prompt_counts=]) on [P] sums and
    counts (the prompt keywords when the batch was packed with loss.nll_on_prompt).

    The fused kernel forms gradients group by group of pairs, calling the epilogue with placeholder
    sums for pairs it has not reduced yet; that is exact because every objective here is separable:
    a mean over pairs of a function of that pair's own sums, plus terms linear in the sums whose
    coefficients depend only on counts, weights and P (DPO/DDPO: w_i * -logsigmoid(beta * margin_i) / P;
    ORPO/DORPO: mean(w) / sum(chosen counts) times the chosen sums, plus the per-pair odds-ratio term;
    SFT: the chosen sums over the total chosen count). A new objective must keep that property.
    """
    if objective not in POLICY_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid objectives are {', '.join(POLICY_OBJECTIVES)}")
    return functools.partial(
        preference_loss,
        objective,
        beta=beta,
        chosen_weights=chosen_weights,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )


# ------------------------------------------------------------------------------- reward models


def _reward_stats(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL RewardTrainer's reward statistics over every scored sequence of the batch."""
    r = rewards.detach().float()
    return {"min_reward": r.min(), "mean_reward": r.mean(), "max_reward": r.max()}


def pointwise_reward_loss(rewards: torch.Tensor, labels: torch.Tensor, kind: str = "l1") -> LossOutput:
    """Regression of each sequence's reward onto its label (the response's transformed score).

        l1:  loss = mean_i |r_i - y_i|
        mse: loss = mean_i (r_i - y_i)^2

    "l1" is the authors' reward model (models/reward_model.py: torch.nn.L1Loss on the transformed
    upvotes of every cleaned response); both are torch's L1Loss / MSELoss with reduction "mean".

    Metrics: min_reward, mean_reward, max_reward (TRL's names), mean_label, mean_abs_error,
    mean_squared_error.
    """
    if kind not in ("l1", "mse"):
        raise ValueError(f"pointwise reward loss must be l1 or mse, got {kind!r}; bradley_terry needs pairs")
    _check_pairs(rewards=rewards, labels=labels)
    dtype = _compute_dtype(rewards, labels)
    diff = rewards.to(dtype) - labels.to(dtype)
    loss = diff.abs().mean() if kind == "l1" else diff.square().mean()
    with torch.no_grad():
        d = diff.detach().float()
        metrics = _reward_stats(rewards)
        metrics["mean_label"] = labels.detach().float().mean()
        metrics["mean_abs_error"] = d.abs().mean()
        metrics["mean_squared_error"] = d.square().mean()
    return LossOutput(loss=loss, metrics=metrics)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> LossOutput:
    """Bradley-Terry reward-model loss on preference pairs, as TRL's RewardTrainer computes it.

        loss = mean_i( -logsigmoid(rc_i - rr_i - m_i) ) + c * mean_i( (rc_i + rr_i)^2 )

    rc/rr are the rewards of the chosen/rejected response of pair i; m_i the optional per-pair
    margin (Touvron et al. 2023, Llama 2, Eq. 2; None -> 0); c the optional
    center_rewards_coefficient (Eisenstein et al. 2023; None -> no term), which keeps rewards
    centred on 0.

    Metrics (TRL's names): min_reward, mean_reward, max_reward over both sides, accuracy =
    mean(rc > rr) (ties count as wrong), margin = mean(rc - rr).
    """
    _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, margin=margin)
    if center_rewards_coefficient is not None:
        _check_beta(center_rewards_coefficient, "center_rewards_coefficient", allow_zero=True)
    dtype = _compute_dtype(chosen_rewards, rejected_rewards, margin)
    rc, rr = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    logits = rc - rr if margin is None else rc - rr - margin.to(dtype)
    per_pair = -F.logsigmoid(logits)
    loss = per_pair.mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (rc + rr).square().mean()
    with torch.no_grad():
        metrics = _reward_stats(torch.cat([rc.detach(), rr.detach()]))
        metrics["accuracy"] = (rc > rr).float().mean()
        metrics["margin"] = (rc - rr).detach().float().mean()
    return LossOutput(
        loss=loss,
        metrics=metrics,
        per_pair_loss=per_pair.detach(),
        chosen_rewards=rc.detach(),
        rejected_rewards=rr.detach(),
    )


def reward_loss(
    kind: str,
    rewards: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    chosen_index: torch.Tensor | None = None,
    rejected_index: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    margin_scale: float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> LossOutput:
    """The reward-model epilogue: [S] per-sequence rewards -> the configured reward loss.

    - "l1" / "mse":    `pointwise_reward_loss(rewards, labels)`.
    - "bradley_terry": `bradley_terry_loss(rewards[chosen_index], rewards[rejected_index],
                        margin = margin_scale * margins (None when margin_scale is 0), c)`;
                        margins are the pairs' label gaps y_chosen - y_rejected.
    """
    if kind not in REWARD_LOSSES:
        raise ValueError(f"unknown reward loss {kind!r}; valid reward losses are {', '.join(REWARD_LOSSES)}")
    if kind != "bradley_terry":
        if labels is None:
            raise ValueError(f"reward loss {kind} regresses onto labels: pass one label per sequence")
        return pointwise_reward_loss(rewards, labels, kind)
    if chosen_index is None or rejected_index is None:
        raise ValueError("reward loss bradley_terry compares pairs: pass chosen_index and rejected_index")
    margin = None
    if margin_scale:
        if margins is None:
            raise ValueError("a reward margin scale was given without per-pair margins (label gaps)")
        margin = margin_scale * margins
    return bradley_terry_loss(rewards[chosen_index], rewards[rejected_index], margin, center_rewards_coefficient)
