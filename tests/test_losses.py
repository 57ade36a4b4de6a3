"""Tests for engine/losses.py, the reference formulas every kernel and the trainer are checked against.

Checks: hand-computed values (numbers worked out with the math module, written out below),
TRL 1.16's own DPO sigmoid loss and ORPO odds-ratio loss as oracles, float64 gradcheck,
equal weights c => c x the unweighted DDPO loss, extreme log-probs in fp32 and bf16, log1mexp
accuracy, the preference_loss dispatch and its error messages.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.config import POLICY_OBJECTIVES as OBJECTIVES
from engine.losses import (
    LOG1MEXP_MAX_ARG,
    LossOutput,
    ddpo_loss,
    dorpo_loss,
    dpo_loss,
    log1mexp,
    orpo_loss,
    preference_loss,
    sft_loss,
)

TRL_DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
TRL_ORPO_METRICS = TRL_DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
WEIGHT_METRICS = ("weights/mean", "weights/min", "weights/max")


def t(values, dtype=torch.float32, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def random_batch(num_pairs, dtype=torch.float32, seed=0):
    """Per-sequence sums, counts, ref sums and weights shaped like a real batch."""
    g = torch.Generator().manual_seed(seed)
    chosen_counts = torch.randint(1, 40, (num_pairs,), generator=g)
    rejected_counts = torch.randint(1, 40, (num_pairs,), generator=g)
    # Average token log-probs in [-3, -0.05]: realistic and away from the -1e-7 clamp.
    chosen = -(0.05 + 2.95 * torch.rand(num_pairs, generator=g, dtype=torch.float64)) * chosen_counts
    rejected = -(0.05 + 2.95 * torch.rand(num_pairs, generator=g, dtype=torch.float64)) * rejected_counts
    ref_chosen = chosen + torch.randn(num_pairs, generator=g, dtype=torch.float64)
    ref_rejected = rejected + torch.randn(num_pairs, generator=g, dtype=torch.float64)
    weights = 0.2 + 1.6 * torch.rand(num_pairs, generator=g, dtype=torch.float64)
    return SimpleNamespace(
        chosen=chosen.to(dtype),
        rejected=rejected.to(dtype),
        chosen_counts=chosen_counts,
        rejected_counts=rejected_counts,
        ref_chosen=ref_chosen.to(dtype),
        ref_rejected=ref_rejected.to(dtype),
        weights=weights.to(dtype),
    )


# ----------------------------------------------------------------------------------------------
# (a) hand-computed values
# ----------------------------------------------------------------------------------------------

# pc, pr, rc, rr = policy/ref chosen/rejected sums; beta = 0.1; weights (1, 2).
# z1 = 0.1 * ((-1 + 1.5) - (-2 + 1.5)) = 0.1      -> -logsigmoid(z1) = log(1 + e^-0.1)  = 0.6443966600735709
# z2 = 0.1 * ((-2 + 1.0) - (-1.5 + 2)) = -0.15    -> -logsigmoid(z2) = log(1 + e^0.15)  = 0.770957047789532
# DPO  = (0.6443966600735709 + 0.770957047789532) / 2     = 0.7076768539315514
# DDPO = (1 * 0.6443966600735709 + 2 * 0.770957047789532) / 2 = 1.0931553778263174
DPO_CASE = dict(pc=[-1.0, -2.0], pr=[-2.0, -1.5], rc=[-1.5, -1.0], rr=[-1.5, -2.0], w=[1.0, 2.0], beta=0.1)


def test_dpo_hand_computed():
    c = DPO_CASE
    out = dpo_loss(t(c["pc"]), t(c["pr"]), t(c["rc"]), t(c["rr"]), beta=c["beta"])
    assert isinstance(out, LossOutput)
    assert out.loss.dim() == 0
    torch.testing.assert_close(out.loss, t(0.7076768539315514))
    torch.testing.assert_close(out.per_pair_loss, t([0.6443966600735709, 0.770957047789532]))
    m = out.metrics
    # chosen rewards 0.1 * (0.5, -1.0) = (0.05, -0.1); rejected 0.1 * (-0.5, 0.5) = (-0.05, 0.05)
    torch.testing.assert_close(m["rewards/chosen"], t(-0.025))
    torch.testing.assert_close(m["rewards/rejected"], t(0.0))
    torch.testing.assert_close(m["rewards/accuracies"], t(0.5))
    torch.testing.assert_close(m["rewards/margins"], t(-0.025))
    torch.testing.assert_close(m["logps/chosen"], t(-1.5))
    torch.testing.assert_close(m["logps/rejected"], t(-1.75))
    for name in WEIGHT_METRICS:
        torch.testing.assert_close(m[name], t(1.0))


def test_ddpo_hand_computed():
    c = DPO_CASE
    out = ddpo_loss(t(c["pc"]), t(c["pr"]), t(c["rc"]), t(c["rr"]), chosen_weights=t(c["w"]), beta=c["beta"])
    torch.testing.assert_close(out.loss, t(1.0931553778263174))
    torch.testing.assert_close(out.metrics["weights/mean"], t(1.5))
    torch.testing.assert_close(out.metrics["weights/min"], t(1.0))
    torch.testing.assert_close(out.metrics["weights/max"], t(2.0))
    # Rewards are TRL's unweighted implicit rewards, whatever the weights.
    torch.testing.assert_close(out.metrics["rewards/chosen"], t(-0.025))


# pc, pr = average log-probs; chosen_nll = 0.8; beta = 0.25; weights (0.5, 2.0), mean 1.25.
# log_odds = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr)):
#   pair 1: (-0.5 + 0.9) - (log(1 - e^-0.5) - log(1 - e^-0.9)) =  0.8109166866584663
#   pair 2: (-1.2 + 0.3) - (log(1 - e^-1.2) - log(1 - e^-0.3)) = -1.8918431949544126
# ORPO  = 0.8 - 0.25 * mean(logsigmoid(log_odds))                  = 1.100002992312601
# DORPO = 1.25 * 0.8 - 0.25 * mean(logsigmoid(w * log_odds))       = 1.5396248451744996
# log_odds_ratio = mean(logsigmoid(log_odds)) = -1.2000119692504034; log_odds_chosen = -0.5404632541479731
ORPO_CASE = dict(pc=[-0.5, -1.2], pr=[-0.9, -0.3], nll=0.8, w=[0.5, 2.0], beta=0.25)


def test_orpo_hand_computed():
    c = ORPO_CASE
    out = orpo_loss(t(c["pc"]), t(c["pr"]), t(c["nll"]), beta=c["beta"])
    torch.testing.assert_close(out.loss, t(1.100002992312601))
    torch.testing.assert_close(out.extras["log_odds"], t([0.8109166866584663, -1.8918431949544126]))
    m = out.metrics
    torch.testing.assert_close(m["log_odds_ratio"], t(-1.2000119692504034))
    torch.testing.assert_close(m["log_odds_chosen"], t(-0.5404632541479731))
    torch.testing.assert_close(m["nll_loss"], t(0.8))
    # rewards = beta * avg logps: chosen 0.25 * (-0.5, -1.2), rejected 0.25 * (-0.9, -0.3)
    torch.testing.assert_close(m["rewards/chosen"], t(-0.2125))
    torch.testing.assert_close(m["rewards/rejected"], t(-0.15))
    torch.testing.assert_close(m["rewards/accuracies"], t(0.5))
    torch.testing.assert_close(m["rewards/margins"], t(-0.0625))
    torch.testing.assert_close(m["logps/chosen"], t(-0.85))
    torch.testing.assert_close(m["logps/rejected"], t(-0.6))


def test_dorpo_hand_computed():
    c = ORPO_CASE
    out = dorpo_loss(t(c["pc"]), t(c["pr"]), t(c["nll"]), chosen_weights=t(c["w"]), beta=c["beta"])
    torch.testing.assert_close(out.loss, t(1.5396248451744996))
    torch.testing.assert_close(out.metrics["weights/mean"], t(1.25))
    torch.testing.assert_close(out.metrics["weights/min"], t(0.5))
    torch.testing.assert_close(out.metrics["weights/max"], t(2.0))
    # Logged log-odds metrics are TRL's unweighted ones.
    torch.testing.assert_close(out.metrics["log_odds_ratio"], t(-1.2000119692504034))


def test_sft_hand_computed():
    # -(-3 - 5 - 0) / (2 + 3 + 0) = 1.6; the empty third response adds no tokens.
    out = sft_loss(t([-3.0, -5.0, 0.0]), torch.tensor([2, 3, 0]))
    torch.testing.assert_close(out.loss, t(1.6))
    torch.testing.assert_close(out.metrics["nll_loss"], t(1.6))
    torch.testing.assert_close(out.metrics["logps/chosen"], t(-8.0 / 3.0))


def test_sft_no_tokens_is_zero_not_nan():
    out = sft_loss(t([0.0, 0.0]), torch.tensor([0, 0]))
    assert out.loss.item() == 0.0


def test_preference_loss_orpo_hand_computed():
    # Sums / counts give the ORPO_CASE averages: (-1.0 / 2, -3.6 / 3) and (-2.7 / 3, -0.6 / 2);
    # chosen_nll = (1.0 + 3.6) / (2 + 3) = 0.92, so ORPO = 0.92 - 0.25 * (-1.2000119692504034) = 1.220002992312601.
    out = preference_loss(
        "orpo", t([-1.0, -3.6]), t([-2.7, -0.6]), torch.tensor([2, 3]), torch.tensor([3, 2]), beta=0.25
    )
    torch.testing.assert_close(out.loss, t(1.220002992312601))
    torch.testing.assert_close(out.metrics["nll_loss"], t(0.92))


def test_log1mexp_hand_computed():
    # log(1 - e^-1) = -0.45867514538708193; log(1 - e^-1e-7) = -16.11809570095832;
    # log(1 - e^-80) = log1p(-e^-80) = -1.8048513878454153e-35.
    got = log1mexp(t([-1.0, -1e-7, -80.0]))
    torch.testing.assert_close(got, t([-0.45867514538708193, -16.11809570095832, -1.8048513878454153e-35]))


# ----------------------------------------------------------------------------------------------
# (b) TRL 1.16 as the oracle
# ----------------------------------------------------------------------------------------------


class _FixedLogpsPolicy(nn.Module):
    """Stands in for the model in DPOTrainer._compute_loss.

    TRL 1.16 has no free-standing DPO loss function: the sigmoid loss is computed inline in
    DPOTrainer._compute_loss from `model(..., fused_lm_head=True).log_probs` (per-token log-probs,
    already zero on masked tokens), summed over the sequence. With sequences of 2 tokens the
    shifted completion has 1 position, so returning the per-sequence sums as [2P, 1] "per-token"
    log-probs makes TRL's own code see exactly our sums, with the autograd graph intact.
    """

    def __init__(self, sequence_logps):
        super().__init__()
        self.sequence_logps = sequence_logps

    def forward(self, input_ids, **kwargs):
        rows = input_ids.shape[0]
        return SimpleNamespace(
            log_probs=self.sequence_logps.unsqueeze(1),
            entropy=torch.zeros(rows, 1),
            mean_logits=torch.zeros(rows, 1),
            is_top1=torch.zeros(rows, 1, dtype=torch.bool),
        )


def trl_dpo_sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Run TRL 1.16's DPOTrainer._compute_loss (loss_type="sigmoid") on given sequence log-probs."""
    from trl import DPOTrainer

    num_pairs = policy_chosen.shape[0]
    trainer = object.__new__(DPOTrainer)
    trainer.model = _FixedLogpsPolicy(torch.cat([policy_chosen, policy_rejected]))
    trainer.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer.beta = beta
    trainer.loss_types = ["sigmoid"]
    trainer.loss_weights = [1.0]
    trainer.f_divergence_type = "reverse_kl"
    trainer.precompute_ref_logps = True
    trainer.ld_alpha = None
    trainer.use_weighting = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    ones = torch.ones(2 * num_pairs, 2, dtype=torch.long)
    inputs = {
        "input_ids": ones,
        "attention_mask": ones,
        "completion_mask": ones,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def trl_orpo(policy_chosen_avg, policy_rejected_avg, chosen_nll, beta):
    """TRL 1.16's ORPOTrainer.odds_ratio_loss, combined as in ORPOTrainer.get_batch_loss_metrics."""
    from trl.experimental.orpo import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    trainer.beta = beta
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"))
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(
        policy_chosen_avg, policy_rejected_avg
    )
    # get_batch_loss_metrics: "loss = policy_nll_loss - losses.mean()"
    loss = chosen_nll - losses.mean()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_avg.detach().mean(),
        "logps/rejected": policy_rejected_avg.detach().mean(),
        "nll_loss": chosen_nll.detach(),
        "log_odds_ratio": log_odds_ratio.detach(),
        "log_odds_chosen": log_odds_chosen.detach(),
    }
    return loss, metrics


@pytest.mark.parametrize("num_pairs", [1, 3, 17])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(num_pairs, beta):
    b = random_batch(num_pairs, seed=num_pairs)
    ours_pc, ours_pr = b.chosen.clone().requires_grad_(), b.rejected.clone().requires_grad_()
    trl_logps = torch.cat([b.chosen, b.rejected]).requires_grad_()

    ours = dpo_loss(ours_pc, ours_pr, b.ref_chosen, b.ref_rejected, beta=beta)
    ours.loss.backward()
    trl_chosen, trl_rejected = trl_logps[:num_pairs], trl_logps[num_pairs:]
    trl_loss, trl_metrics = trl_dpo_sigmoid(trl_chosen, trl_rejected, b.ref_chosen, b.ref_rejected, beta)
    trl_loss.backward()

    torch.testing.assert_close(ours.loss, trl_loss.float())
    torch.testing.assert_close(torch.cat([ours_pc.grad, ours_pr.grad]), trl_logps.grad)
    for name in TRL_DPO_METRICS:
        torch.testing.assert_close(ours.metrics[name].item(), trl_metrics[name], msg=name)


@pytest.mark.parametrize("num_pairs", [1, 3, 17])
@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_matches_trl(num_pairs, beta):
    b = random_batch(num_pairs, seed=100 + num_pairs)
    chosen_avg = b.chosen / b.chosen_counts
    rejected_avg = b.rejected / b.rejected_counts
    nll = -b.chosen.sum() / b.chosen_counts.sum()
    ours_in = [x.clone().requires_grad_() for x in (chosen_avg, rejected_avg, nll)]
    trl_in = [x.clone().requires_grad_() for x in (chosen_avg, rejected_avg, nll)]

    ours = orpo_loss(*ours_in, beta=beta)
    ours.loss.backward()
    trl_loss, trl_metrics = trl_orpo(*trl_in, beta=beta)
    trl_loss.backward()

    torch.testing.assert_close(ours.loss, trl_loss)
    for mine, theirs in zip(ours_in, trl_in):
        torch.testing.assert_close(mine.grad, theirs.grad)
    for name in TRL_ORPO_METRICS:
        torch.testing.assert_close(ours.metrics[name], trl_metrics[name].float(), msg=name)


def test_reward_ties_are_not_accurate_like_trl():
    """TRL counts a pair as accurate only when chosen_reward > rejected_reward strictly."""
    tie = t([-2.0, -3.0])
    loss, trl_metrics = trl_dpo_sigmoid(tie, tie, tie, tie, beta=0.1)
    assert trl_metrics["rewards/accuracies"] == 0.0
    assert dpo_loss(tie, tie, tie, tie, beta=0.1).metrics["rewards/accuracies"].item() == 0.0
    _, trl_orpo_metrics = trl_orpo(t([-0.4, -0.2]), t([-0.4, -0.2]), t(1.0), beta=0.25)
    assert trl_orpo_metrics["rewards/accuracies"].item() == 0.0
    assert orpo_loss(t([-0.4, -0.2]), t([-0.4, -0.2]), t(1.0)).metrics["rewards/accuracies"].item() == 0.0


def test_orpo_epilogue_matches_trl():
    """preference_loss('orpo') from sums/counts equals TRL fed the averages and the token-mean NLL."""
    b = random_batch(9, seed=7)
    ours = preference_loss("orpo", b.chosen, b.rejected, b.chosen_counts, b.rejected_counts, beta=0.25)
    nll = -b.chosen.sum() / b.chosen_counts.sum()
    trl_loss, _ = trl_orpo(b.chosen / b.chosen_counts, b.rejected / b.rejected_counts, nll, beta=0.25)
    torch.testing.assert_close(ours.loss, trl_loss)


# ----------------------------------------------------------------------------------------------
# (c) gradcheck in float64
# ----------------------------------------------------------------------------------------------


def _f64(x, requires_grad=True):
    return x.to(torch.float64).detach().requires_grad_(requires_grad)


@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_ddpo(weighted):
    b = random_batch(5, dtype=torch.float64, seed=11)
    # Scale the sums down so beta * margin spans the curved part of the sigmoid.
    inputs = tuple(_f64(x / 10) for x in (b.chosen, b.rejected, b.ref_chosen, b.ref_rejected))
    weights = _f64(b.weights, requires_grad=False) if weighted else None
    assert torch.autograd.gradcheck(lambda *a: ddpo_loss(*a, chosen_weights=weights, beta=0.3).loss, inputs)


def test_gradcheck_dpo():
    b = random_batch(4, dtype=torch.float64, seed=12)
    inputs = tuple(_f64(x / 10) for x in (b.chosen, b.rejected, b.ref_chosen, b.ref_rejected))
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta=0.3).loss, inputs)


@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_dorpo(weighted):
    b = random_batch(5, dtype=torch.float64, seed=13)
    inputs = (
        _f64(b.chosen / b.chosen_counts),
        _f64(b.rejected / b.rejected_counts),
        _f64(-b.chosen.sum() / b.chosen_counts.sum()),
    )
    weights = _f64(b.weights, requires_grad=False) if weighted else None
    assert torch.autograd.gradcheck(lambda *a: dorpo_loss(*a, chosen_weights=weights, beta=0.25).loss, inputs)


def test_gradcheck_orpo():
    b = random_batch(4, dtype=torch.float64, seed=14)
    inputs = (_f64(b.chosen / b.chosen_counts), _f64(b.rejected / b.rejected_counts), _f64(torch.tensor(1.3)))
    assert torch.autograd.gradcheck(lambda *a: orpo_loss(*a, beta=0.25).loss, inputs)


def test_gradcheck_sft():
    b = random_batch(6, dtype=torch.float64, seed=15)
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, b.chosen_counts).loss, (_f64(b.chosen),))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradcheck_preference_loss(objective):
    b = random_batch(5, dtype=torch.float64, seed=16)
    chosen, rejected = _f64(b.chosen / 10), _f64(b.rejected / 10)
    weights = _f64(b.weights, requires_grad=False)

    def fn(c, r):
        return preference_loss(
            objective,
            c,
            r,
            b.chosen_counts,
            b.rejected_counts,
            beta=0.2,
            chosen_weights=weights,
            ref_chosen_logps=b.ref_chosen / 10,
            ref_rejected_logps=b.ref_rejected / 10,
        ).loss

    assert torch.autograd.gradcheck(fn, (chosen, rejected))


def test_log1mexp_gradient_matches_closed_form():
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / (e^-x - 1) = -1 / expm1(-x).
    x = torch.tensor([-80.0, -5.0, -0.7, -0.69, -0.1, -1e-4, -1e-7], dtype=torch.float64, requires_grad=True)
    log1mexp(x).sum().backward()
    torch.testing.assert_close(x.grad, -1.0 / torch.expm1(-x.detach()))
    x = torch.tensor([-30.0, -2.0, -0.7, -0.6, -1e-3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log1mexp, (x,))


# ----------------------------------------------------------------------------------------------
# (d) equal weights c => c x unweighted DDPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.5, 2.0, 4.0])
def test_equal_power_of_two_weights_scale_exactly(dtype, c):
    """Scaling by a power of two is exact in binary floating point, so equality must be bitwise."""
    b = random_batch(13, dtype=dtype, seed=21)
    args = (b.chosen, b.rejected, b.ref_chosen, b.ref_rejected)
    unweighted = ddpo_loss(*args, beta=0.1).loss
    weighted = ddpo_loss(*args, chosen_weights=torch.full((13,), c, dtype=dtype), beta=0.1).loss
    assert torch.equal(weighted, c * unweighted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.0, 0.37, 1.0, 3.3])
def test_equal_weights_scale_unweighted_loss(dtype, c):
    """Any constant c: equal up to the rounding of one extra multiply per pair (<= 1 ulp each)."""
    b = random_batch(13, dtype=dtype, seed=22)
    args = (b.chosen, b.rejected, b.ref_chosen, b.ref_rejected)
    unweighted = ddpo_loss(*args, beta=0.1).loss
    weighted = ddpo_loss(*args, chosen_weights=torch.full((13,), c, dtype=dtype), beta=0.1).loss
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(weighted, c * unweighted, rtol=4 * eps, atol=0.0)


def test_unit_weights_are_dpo_and_orpo():
    b = random_batch(8, seed=23)
    ones = torch.ones(8)
    dpo = dpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.1).loss
    assert torch.equal(ddpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, ones, beta=0.1).loss, dpo)
    pc, pr, nll = b.chosen / b.chosen_counts, b.rejected / b.rejected_counts, torch.tensor(1.1)
    assert torch.equal(dorpo_loss(pc, pr, nll, ones, beta=0.25).loss, orpo_loss(pc, pr, nll, beta=0.25).loss)


# ----------------------------------------------------------------------------------------------
# (e) extreme log-probs: finite loss and gradients in fp32 and bf16
# ----------------------------------------------------------------------------------------------

EXTREME_PAIRS = [(-80.0, -1e-7), (-1e-7, -80.0), (-1e-7, -1e-7), (-80.0, -80.0), (0.0, -80.0), (-80.0, 0.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_extremes_finite(objective, dtype):
    chosen = torch.tensor([p[0] for p in EXTREME_PAIRS], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([p[1] for p in EXTREME_PAIRS], dtype=dtype, requires_grad=True)
    ref_chosen = torch.tensor([p[1] for p in EXTREME_PAIRS], dtype=dtype)
    ref_rejected = torch.tensor([p[0] for p in EXTREME_PAIRS], dtype=dtype)
    n = len(EXTREME_PAIRS)
    # Counts of 1 make the averages equal the extremes themselves (the hard case for ORPO).
    out = preference_loss(
        objective,
        chosen,
        rejected,
        torch.ones(n, dtype=torch.long),
        torch.ones(n, dtype=torch.long),
        beta=0.5,
        chosen_weights=torch.linspace(0.1, 3.0, n, dtype=dtype),
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert chosen.grad.dtype == dtype
    assert torch.isfinite(chosen.grad).all()
    # SFT never touches the rejected side.
    assert (rejected.grad is None) if objective == "sft" else torch.isfinite(rejected.grad).all()
    for name, value in out.metrics.items():
        assert torch.isfinite(value), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_dorpo_extremes_finite_direct(dtype, weighted):
    pc = torch.tensor([-80.0, -1e-7, -1e-7, 0.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e-7, -80.0, -1e-7, 0.0], dtype=dtype, requires_grad=True)
    nll = torch.tensor(40.0, dtype=dtype, requires_grad=True)
    weights = torch.tensor([0.3, 1.0, 2.0, 5.0], dtype=dtype) if weighted else None
    out = dorpo_loss(pc, pr, nll, chosen_weights=weights, beta=0.25)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for g in (pc.grad, pr.grad, nll.grad):
        assert torch.isfinite(g).all()


def test_empty_responses_stay_finite():
    # A pair whose responses have no tokens: sums 0, counts 0.
    chosen = torch.tensor([-12.0, 0.0], requires_grad=True)
    rejected = torch.tensor([-20.0, 0.0], requires_grad=True)
    counts = torch.tensor([6, 0])
    for objective in ("orpo", "dorpo", "sft"):
        out = preference_loss(objective, chosen, rejected, counts, counts, beta=0.25, chosen_weights=torch.ones(2))
        (grad_c, grad_r) = torch.autograd.grad(out.loss, (chosen, rejected), allow_unused=True)
        assert torch.isfinite(out.loss)
        assert torch.isfinite(grad_c).all()
        assert grad_r is None or torch.isfinite(grad_r).all()


# ----------------------------------------------------------------------------------------------
# log1mexp accuracy
# ----------------------------------------------------------------------------------------------


def test_log1mexp_accuracy_fp32():
    x = -torch.logspace(-7, math.log10(80.0), 4001, dtype=torch.float64).float()
    x64 = x.double()  # the exact fp32 inputs, so only the function's own error is measured
    got = log1mexp(x)
    assert got.dtype == torch.float32
    ref = torch.log(-torch.expm1(x64))
    # fp64 log(-expm1(x)) loses relative accuracy only where 1 - e^x rounds near 1 (|value| < ~1e-15),
    # so an absolute slack of 1e-15 on top of 2 fp32 ulps covers its error, not ours.
    torch.testing.assert_close(got.double(), ref, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-15)
    # In the tail, log1p(-exp(x)) in fp64 is accurate to fp64 precision: require 2 fp32 ulps, relative.
    tail = x64 < -1.0
    ref_tail = torch.log1p(-torch.exp(x64[tail]))
    torch.testing.assert_close(got.double()[tail], ref_tail, rtol=2 * torch.finfo(torch.float32).eps, atol=0.0)
    # The test range is one where the naive formula fails, so passing it means something.
    naive = torch.log(1 - torch.exp(x))
    assert not torch.allclose(naive.double(), ref, rtol=1e-3, atol=1e-15)


def test_log1mexp_dtypes_and_clamp():
    assert log1mexp(torch.tensor([-0.5], dtype=torch.bfloat16)).dtype == torch.float32
    assert log1mexp(torch.tensor([-0.5], dtype=torch.float64)).dtype == torch.float64
    at_zero = log1mexp(torch.tensor([0.0, 1e-3]))
    torch.testing.assert_close(at_zero, log1mexp(torch.tensor([LOG1MEXP_MAX_ARG] * 2)))
    assert torch.isfinite(at_zero).all()


# ----------------------------------------------------------------------------------------------
# preference_loss dispatch
# ----------------------------------------------------------------------------------------------


def _assert_same_output(a: LossOutput, b: LossOutput):
    assert torch.equal(a.loss, b.loss)
    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        assert torch.equal(a.metrics[name], b.metrics[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_equals_direct_calls(dtype):
    b = random_batch(7, dtype=dtype, seed=31)
    common = (b.chosen, b.rejected, b.chosen_counts, b.rejected_counts)
    refs = dict(ref_chosen_logps=b.ref_chosen, ref_rejected_logps=b.ref_rejected)

    _assert_same_output(
        preference_loss("dpo", *common, beta=0.1, chosen_weights=b.weights, **refs),
        dpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.1),
    )
    _assert_same_output(
        preference_loss("ddpo", *common, beta=0.1, chosen_weights=b.weights, **refs),
        ddpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, chosen_weights=b.weights, beta=0.1),
    )
    _assert_same_output(
        preference_loss("ddpo", *common, beta=0.1, **refs),
        dpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.1),
    )

    chosen_avg = b.chosen.float() / b.chosen_counts.float()
    rejected_avg = b.rejected.float() / b.rejected_counts.float()
    nll = -b.chosen.float().sum() / b.chosen_counts.float().sum()
    _assert_same_output(
        preference_loss("orpo", *common, beta=0.25, chosen_weights=b.weights),
        orpo_loss(chosen_avg, rejected_avg, nll, beta=0.25),
    )
    _assert_same_output(
        preference_loss("dorpo", *common, beta=0.25, chosen_weights=b.weights),
        dorpo_loss(chosen_avg, rejected_avg, nll, chosen_weights=b.weights, beta=0.25),
    )
    _assert_same_output(
        preference_loss("sft", *common, beta=0.0),
        sft_loss(b.chosen, b.chosen_counts),
    )


def test_dispatch_metrics_names():
    b = random_batch(3, seed=32)
    refs = dict(ref_chosen_logps=b.ref_chosen, ref_rejected_logps=b.ref_rejected)
    common = (b.chosen, b.rejected, b.chosen_counts, b.rejected_counts)
    for objective in ("dpo", "ddpo"):
        m = preference_loss(objective, *common, beta=0.1, **refs).metrics
        assert set(TRL_DPO_METRICS + WEIGHT_METRICS) <= m.keys()
    for objective in ("orpo", "dorpo"):
        m = preference_loss(objective, *common, beta=0.1).metrics
        assert set(TRL_ORPO_METRICS + WEIGHT_METRICS) <= m.keys()
    for objective in OBJECTIVES:
        m = preference_loss(objective, *common, beta=0.1, **refs).metrics
        for name, value in m.items():
            assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, name


def test_sft_ignores_rejected_side():
    chosen = t([-4.0, -2.0])
    counts = torch.tensor([2, 2])
    out = preference_loss("sft", chosen, None, counts, None, beta=0.0)
    torch.testing.assert_close(out.loss, t(1.5))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_unknown_objective_lists_valid_ones():
    b = random_batch(2)
    with pytest.raises(ValueError, match="unknown objective 'kto'.*dpo, ddpo, orpo, dorpo, sft"):
        preference_loss("kto", b.chosen, b.rejected, b.chosen_counts, b.rejected_counts, beta=0.1)


@pytest.mark.parametrize("objective", ["dpo", "ddpo"])
@pytest.mark.parametrize("missing", ["ref_chosen_logps", "ref_rejected_logps"])
def test_missing_reference_names_argument(objective, missing):
    b = random_batch(2)
    refs = dict(ref_chosen_logps=b.ref_chosen, ref_rejected_logps=b.ref_rejected)
    refs[missing] = None
    with pytest.raises(ValueError, match=f"{missing} is None"):
        preference_loss(objective, b.chosen, b.rejected, b.chosen_counts, b.rejected_counts, beta=0.1, **refs)


def test_missing_rejected_for_pairwise_objective():
    b = random_batch(2)
    with pytest.raises(ValueError, match="rejected_logps is None"):
        preference_loss("orpo", b.chosen, None, b.chosen_counts, b.rejected_counts, beta=0.1)


def test_shape_errors():
    b = random_batch(3)
    with pytest.raises(ValueError, match=r"rejected_logps has 2 entries but chosen_logps has 3"):
        preference_loss("orpo", b.chosen, b.rejected[:2], b.chosen_counts, b.rejected_counts, beta=0.1)
    with pytest.raises(ValueError, match=r"chosen_weights has 2 entries"):
        ddpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, chosen_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be 1-D.*\(3, 1\)"):
        ddpo_loss(b.chosen[:, None], b.rejected, b.ref_chosen, b.ref_rejected)
    with pytest.raises(ValueError, match=r"P = 0"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match=r"chosen_nll must be the scalar"):
        dorpo_loss(b.chosen, b.rejected, torch.ones(3))


def test_beta_errors():
    b = random_batch(2)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, got 0.0"):
        dpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.0)
    with pytest.raises(ValueError, match=r"lambda.*>= 0, got -1"):
        orpo_loss(b.chosen / 10, b.rejected / 10, 1.0, beta=-1)
    # lambda = 0 is valid for ORPO: the loss is then the NLL alone.
    assert orpo_loss(b.chosen / 10, b.rejected / 10, torch.tensor(1.25), beta=0.0).loss.item() == 1.25
