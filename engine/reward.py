"""Reward models (`loss.objective reward`): the classifier with its loss, held-out metrics, early stopping.

Where this sits: `engine.train` runs one loop for every objective; for "reward" it takes its rows from
`engine.data.pointwise`, its module from here and calls `RewardValidation` after each optimizer step.
One batch: packed rows (many responses each, positions restarting per sequence) -> the classifier's
trunk with attention_mask=None, so attention stays inside each sequence -> final hidden states at each
sequence's last token -> the score head -> one reward per sequence -> `engine.losses.reward_loss`
(l1 / mse on the transformed scores, or Bradley-Terry on pairs) -> DeepSpeed backward/step.

The HF sequence-classification forward cannot be used on packed rows: it pools one token per row (the
rightmost non-pad one). Reading the trunk and applying the head at the last token of every sequence
gives, per sequence, exactly the reward the exported `AutoModelForSequenceClassification` computes on
that sequence alone (tests/test_reward.py checks both).

Held-out evaluation (every `reward.eval_every_steps`, default once per epoch, and at the end): rewards
of every held-out response -> loss, pairwise accuracy on the held-out preference pairs, Spearman with
the labels and, where the data carries it (synthetic), with the ground-truth quality. Early stopping
watches the held-out loss; each improvement is exported to `<run>/best/` (and `best.json`), which
becomes `<run>/final/` at the end, as the authors keep the best validation checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from engine import parallelize
from engine.fileio import atomic_write, publish_dir
from engine.losses import reward_loss


def trunk_and_score(model):
    """(trunk returning final hidden states, score head) of a sequence classifier, through a peft wrapper.

    Under peft task SEQ_CLS the head is a ModulesToSaveWrapper whose trainable copy is what it calls.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise TypeError(
            f"{type(base).__name__} has no `score` head; a reward model is an AutoModelForSequenceClassification "
            "of a decoder (Llama, Gemma, Mistral, Qwen, GPT-2, ...)"
        )
    return getattr(base, base.base_model_prefix), head


class RewardWithLoss(torch.nn.Module):
    """A sequence classifier and its reward loss as one module, so DeepSpeed sees every parameter."""

    def __init__(self, model: torch.nn.Module, loss_cfg):
        super().__init__()
        self.model = model
        self.trunk, self.score = trunk_and_score(model)
        self.loss_cfg = loss_cfg

    @property
    def batch_options(self) -> dict:
        """collate_reward's arguments beyond the rows (none: reward batches carry no loss schedule)."""
        return {}

    def rewards(self, batch) -> torch.Tensor:
        """[S] reward of every sequence of a `RewardBatch`, read at its last token."""
        hidden = self.trunk(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        ).last_hidden_state
        last = hidden.reshape(-1, hidden.shape[-1])[batch.last_index]
        # The head runs as a module call on S rows only: under ZeRO-3 its hooks gather the weight.
        return self.score(last)[:, 0]

    def forward(self, batch, *, with_loss: bool = True):
        """LossOutput of the configured reward loss (rewards in extras["rewards"]); the [S] rewards alone
        when with_loss is False (held-out rows carry no pairs)."""
        rewards = self.rewards(batch)
        if not with_loss:
            return rewards
        c = self.loss_cfg
        out = reward_loss(
            c.reward_loss,
            rewards,
            labels=batch.labels,
            chosen_index=batch.chosen_segments,
            rejected_index=batch.rejected_segments,
            margins=batch.margins,
            margin_scale=c.reward_margin,
            center_rewards_coefficient=c.center_rewards_coefficient,
        )
        out.extras["rewards"] = rewards.detach()
        return out


def load_reward_model(model_cfg, prepared, *, device):
    """The classifier to train: one label, LoRA task SEQ_CLS when model.lora_r > 0 (score head trained in
    full). Its config gets the reward tokenizer's pad id (HF classifiers need it to find the last token)
    and `reward_labels`, how labels were made from scores (with standardisation: score-scale label =
    mean + std * reward), so both travel with the export."""
    from engine.model import load_model

    model = load_model(model_cfg, device=device, num_labels=1)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.pad_token_id = prepared.tokenizer.pad_token_id
    base.config.reward_labels = dict(prepared.label_stats)
    return model


# ------------------------------------------------------------------------------------------ metrics


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 2 values or a constant side."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def held_out_metrics(rewards: dict[str, float], prepared, loss_cfg) -> dict[str, float]:
    """Held-out metrics from one reward per held-out response (`rewards` keyed by response id).

    loss: the training loss on the held-out split (l1/mse over responses; bradley_terry over the held-out
    pairs, with the same margin and centring); pairwise_accuracy: share of held-out pairs whose chosen
    response gets the higher reward (ties count as wrong, as in TRL); spearman_label: rank correlation
    with the labels (= with the upvotes: the transform is monotone); spearman_quality: with the
    ground-truth quality, where the data has one.
    """
    resp = prepared.val_responses
    r = torch.tensor([rewards[x.response_id] for x in resp], dtype=torch.float64)
    y = torch.tensor([x.label for x in resp], dtype=torch.float64)
    pairs = prepared.val_pairs
    pc = torch.tensor([rewards[p.chosen_id] for p in pairs], dtype=torch.float64)
    pr = torch.tensor([rewards[p.rejected_id] for p in pairs], dtype=torch.float64)
    out: dict[str, float] = {"responses": float(len(resp)), "pairs": float(len(pairs))}
    if loss_cfg.reward_loss == "bradley_terry":
        if pairs:
            label = {x.response_id: x.label for x in resp}
            margins = torch.tensor([label[p.chosen_id] - label[p.rejected_id] for p in pairs], dtype=torch.float64)
            both = torch.cat([pc, pr])
            idx = torch.arange(len(pairs))
            out["loss"] = float(
                reward_loss(
                    "bradley_terry",
                    both,
                    chosen_index=idx,
                    rejected_index=idx + len(pairs),
                    margins=margins,
                    margin_scale=loss_cfg.reward_margin,
                    center_rewards_coefficient=loss_cfg.center_rewards_coefficient,
                ).loss
            )
        else:
            out["loss"] = float("nan")
    else:
        out["loss"] = float(reward_loss(loss_cfg.reward_loss, r, labels=y).loss)
    out["pairwise_accuracy"] = float((pc > pr).double().mean()) if pairs else float("nan")
    out["spearman_label"] = spearman(r.numpy(), y.numpy())
    quality = [x.quality for x in resp]
    if resp and all(q is not None for q in quality):
        out["spearman_quality"] = spearman(r.numpy(), quality)
    out["mean_reward"] = float(r.mean())
    out["std_reward"] = float(r.std()) if len(r) > 1 else 0.0
    return out


@torch.no_grad()
def score_rows(engine, rows, *, rows_per_batch: int, device) -> dict[str, float]:
    """Reward of every sequence of `rows`, keyed by response id, on every rank.

    Each rank scores rows rank::world in micro-batches of rows_per_batch; ranks run the same number of
    forwards (a short shard repeats its first row), because under ZeRO-3 every forward gathers weights
    collectively. The per-rank results are all-gathered.
    """
    from engine.data.pointwise import collate_reward

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    per_rank = -(-len(rows) // world)
    mine = list(range(rank, len(rows), world))
    mine += mine[:1] * (per_rank - len(mine)) if mine else [0] * per_rank
    scores: dict[str, float] = {}
    for i in range(0, per_rank, rows_per_batch):
        batch = collate_reward([rows[j] for j in mine[i : i + rows_per_batch]], device=device)
        rewards = engine(batch, with_loss=False).float().cpu().tolist()  # sync point: once per held-out batch
        scores.update(zip(batch.response_ids, rewards))
    merged: dict[str, float] = {}
    for part in parallelize.gather_objects(scores):
        merged.update(part)
    return merged


# ---------------------------------------------------------------------------------- validation loop


class RewardValidation:
    """When to evaluate, what the held-out metrics are, early stopping, the plateau schedule, the best export.

    Its `state` is plain JSON and goes into the trainer state of every checkpoint, so a resumed run
    continues with the same best loss, patience counters and learning-rate scale.
    """

    def __init__(self, cfg, prepared, *, run_dir: Path, steps_per_epoch: int, total_steps: int, device, is_main: bool):
        self.cfg, self.prepared, self.device, self.is_main = cfg, prepared, device, is_main
        self.every = cfg.reward.eval_every_steps or steps_per_epoch
        self.total_steps = total_steps
        self.best_dir = Path(run_dir) / "best"
        self.best_file = Path(run_dir) / "best.json"
        self.state = {
            "evals": 0,
            "best_loss": None,
            "best_step": None,
            "best_metrics": None,
            "bad_evals": 0,
            "plateau_bad_evals": 0,
            "lr_scale": 1.0,
            "stopped_early_at": None,
        }

    @property
    def enabled(self) -> bool:
        return bool(self.prepared.val_rows)

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.every == 0 or step >= self.total_steps)

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.state.update(state)

    def run(self, engine, module, scheduler, tokenizer, step: int) -> dict[str, float]:
        """Collective: held-out metrics at `step`, then early stopping / plateau / best export. Returns the
        metrics under "eval/" names, for the step's log record."""
        engine.eval()
        try:
            rewards = score_rows(
                engine, self.prepared.val_rows, rows_per_batch=self.cfg.data.rows_per_batch, device=self.device
            )
        finally:
            engine.train()
        metrics = held_out_metrics(rewards, self.prepared, self.cfg.loss)
        self._update(metrics, step, module, scheduler, tokenizer)
        s = self.state
        return {
            **{f"eval/{k}": v for k, v in metrics.items()},
            "eval/best_loss": s["best_loss"],
            "eval/bad_evals": s["bad_evals"],
            "eval/lr_scale": s["lr_scale"],
        }

    @property
    def should_stop(self) -> bool:
        patience = self.cfg.reward.early_stopping_patience
        return patience > 0 and self.state["bad_evals"] >= patience

    def _update(self, metrics: dict, step: int, module, scheduler, tokenizer) -> None:
        r, s = self.cfg.reward, self.state
        loss = metrics["loss"]
        s["evals"] += 1
        if math.isfinite(loss) and (s["best_loss"] is None or loss < s["best_loss"] - r.early_stopping_min_delta):
            s.update(best_loss=loss, best_step=step, best_metrics=metrics, bad_evals=0, plateau_bad_evals=0)
            self._export_best(module, tokenizer, step, metrics)
            return
        s["bad_evals"] += 1
        s["plateau_bad_evals"] += 1
        if r.lr_plateau_patience is not None and s["plateau_bad_evals"] > r.lr_plateau_patience:
            # ReduceLROnPlateau on a LambdaLR: scale the base rates (saved with the scheduler's state) and
            # the current rates, so the very next step already uses the lower rate.
            scheduler.base_lrs = [lr * r.lr_plateau_factor for lr in scheduler.base_lrs]
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= r.lr_plateau_factor
            s["lr_scale"] *= r.lr_plateau_factor
            s["plateau_bad_evals"] = 0
        if self.should_stop:
            s["stopped_early_at"] = step

    def _export_best(self, module, tokenizer, step: int, metrics: dict) -> None:
        from engine.train import export

        export(module.model, tokenizer, self.best_dir, self.cfg, is_main=self.is_main)
        if self.is_main:
            atomic_write(self.best_file, json.dumps({"step": step, "metrics": metrics}, indent=1))
        parallelize.barrier()

    def finish(self, final_dir: Path) -> None:
        """final/ := best/ (rank 0), after checking that best/ is the export the state says is best."""
        if not self.is_main:
            return
        saved = json.loads(self.best_file.read_text()) if self.best_file.is_file() else None
        if saved is None or saved["step"] != self.state["best_step"] or not self.best_dir.is_dir():
            raise RuntimeError(
                f"{self.best_dir} does not hold the best model of this run (step {self.state['best_step']}, found "
                f"{saved and saved['step']}); it was changed or removed: rerun, or train again with "
                "checkpoint.resume none"
            )
        tmp = final_dir.with_name(f".{final_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.best_dir, tmp)
        publish_dir(tmp, final_dir)
