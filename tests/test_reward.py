"""Reward models: loss formulas (hand-computed, torch's criteria, TRL's RewardTrainer), the authors' score
transform, packed = unpacked rewards and gradients, the export (AutoModelForSequenceClassification and
engine.evaluate give the training-time rewards), data (bad rows, prompt-level split), early stopping,
the authors' recipe, exact resume after kill -9, and a two-process ZeRO-3 LoRA run."""

import copy
import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.data import prepare_data
from engine.data.loading import DataError, load_any
from engine.data.pointwise import (
    authors_score_transform,
    collate_reward,
    encode,
    pack_units,
    prepare_reward_data,
)
from engine.losses import bradley_terry_loss, pointwise_reward_loss, reward_loss
from engine.model import load_tokenizer
from engine.reward import RewardWithLoss, held_out_metrics, load_reward_model, spearman

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--config",
    str(ROOT / "configs/reward-tiny-cpu.yaml"),
    "--data.synthetic_prompts",
    "24",
    "--data.max_length",
    "128",
    "--data.max_tokens_per_row",
    "512",
    "--data.val_fraction",
    "0.25",
    "--optim.warmup_ratio",
    "0",
    "--optim.schedule",
    "constant",
    "--logging.progress",
    "false",
]


def t(values, dtype=torch.float32, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def _cfg(tmp_path, *extra):
    where = ["--logging.output_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache")]
    return load_config(TINY + where + list(extra))


# ----------------------------------------------------------------------------------------------- losses


# rewards (0.5, -1, 2), labels (1, -0.5, 2.5): every error is 0.5 -> L1 0.5, MSE 0.25.
def test_pointwise_losses_hand_computed_and_match_torch():
    r, y = t([0.5, -1.0, 2.0], requires_grad=True), t([1.0, -0.5, 2.5])
    l1, mse = pointwise_reward_loss(r, y, "l1"), pointwise_reward_loss(r, y, "mse")
    assert l1.loss.item() == pytest.approx(0.5, abs=1e-7) and mse.loss.item() == pytest.approx(0.25, abs=1e-7)
    assert l1.metrics["mean_reward"].item() == pytest.approx(0.5) and l1.metrics["min_reward"].item() == -1.0
    g = torch.randn(11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.randn(11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for kind, crit in (("l1", torch.nn.L1Loss()), ("mse", torch.nn.MSELoss())):  # the authors' criteria
        a, b = g.clone().requires_grad_(), g.clone().requires_grad_()
        ours, theirs = pointwise_reward_loss(a, labels, kind).loss, crit(b, labels)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(a.grad, b.grad)


# rc (1, 0), rr (0, 0.5), margins (0.5, 0): logits (0.5, -0.5)
# -logsigmoid(0.5) = log(1 + e^-0.5) = 0.47407698418010663, -logsigmoid(-0.5) = 0.9740769841801067 -> 0.7240769841801067
# center 0.01 * mean((1 + 0)^2, (0 + 0.5)^2) = 0.01 * 0.625 = 0.00625 -> 0.7303269841801067
def test_bradley_terry_hand_computed():
    rc, rr, m = t([1.0, 0.0]), t([0.0, 0.5]), t([0.5, 0.0])
    assert bradley_terry_loss(rc, rr, m).loss.item() == pytest.approx(0.7240769841801067, rel=1e-6)
    out = bradley_terry_loss(rc, rr, m, center_rewards_coefficient=0.01)
    assert out.loss.item() == pytest.approx(0.7303269841801067, rel=1e-6)
    assert out.metrics["accuracy"].item() == 0.5 and out.metrics["margin"].item() == pytest.approx(0.25)
    assert (out.metrics["min_reward"].item(), out.metrics["max_reward"].item()) == (0.0, 1.0)
    # Ties are not accurate (TRL: chosen > rejected).
    assert bradley_terry_loss(t([1.0]), t([1.0])).metrics["accuracy"].item() == 0.0


def trl_reward_loss(chosen, rejected, margin, center):
    """Run TRL 1.16's RewardTrainer.compute_loss on a stub model whose logits are the given rewards."""
    from trl import RewardTrainer

    class Stub(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache=None, margin=None):
            return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    trainer = object.__new__(RewardTrainer)
    stub = Stub().train()
    trainer.model = stub
    trainer.args = SimpleNamespace(center_rewards_coefficient=center)
    trainer.accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    ones = torch.ones(2 * chosen.shape[0], 3, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones}
    if margin is not None:
        inputs["margin"] = margin
    loss = trainer.compute_loss(stub, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("num_pairs", [1, 5, 16])
@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl(num_pairs, with_margin, center):
    g = torch.Generator().manual_seed(num_pairs)
    rewards = torch.randn(2 * num_pairs, generator=g)
    margin = torch.rand(num_pairs, generator=g) if with_margin else None
    ours_in, trl_in = rewards.clone().requires_grad_(), rewards.clone().requires_grad_()
    ours = bradley_terry_loss(ours_in[:num_pairs], ours_in[num_pairs:], margin, center)
    theirs, metrics = trl_reward_loss(trl_in[:num_pairs], trl_in[num_pairs:], margin, center)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs)
    torch.testing.assert_close(ours_in.grad, trl_in.grad)
    for name in ("min_reward", "mean_reward", "max_reward", "accuracy", "margin"):
        assert ours.metrics[name].item() == pytest.approx(metrics[name], rel=1e-6, abs=1e-7), name


def test_reward_loss_dispatch():
    r = t([0.3, -0.2, 1.0, 0.0])
    pointwise = reward_loss("mse", r, labels=t([0.0, 0.0, 1.0, 0.0]))
    assert pointwise.loss.item() == pytest.approx((0.09 + 0.04) / 4)
    # Pairs (0, 1) and (2, 3) with label gaps 1 and 2 scaled by 0.5: margins 0.5 and 1.
    bt = reward_loss(
        "bradley_terry",
        r,
        chosen_index=torch.tensor([0, 2]),
        rejected_index=torch.tensor([1, 3]),
        margins=t([1.0, 2.0]),
        margin_scale=0.5,
    )
    want = bradley_terry_loss(t([0.3, 1.0]), t([-0.2, 0.0]), t([0.5, 1.0])).loss
    torch.testing.assert_close(bt.loss, want)
    with pytest.raises(ValueError, match="unknown reward loss"):
        reward_loss("hinge", r, labels=r)
    with pytest.raises(ValueError, match="needs pairs"):
        pointwise_reward_loss(r, r, "bradley_terry")


# ----------------------------------------------------------------------------------- score transform


def test_authors_score_transform_hand_computed():
    # compression 1, scores (1, 2, 3): x = log(s + 1), a = log 2, b = log 4 -> (-1, 2 log(3/2) / log 2 - 1, 1)
    got = authors_score_transform([1, 2, 3], compression_factor=1)
    np.testing.assert_allclose(got, [-1.0, 2 * math.log(1.5) / math.log(2) - 1, 1.0], rtol=1e-12)
    # The published anchors start from the unshifted min/max: with min 0 the top label exceeds 1.
    got = authors_score_transform([0, 1], compression_factor=1)
    np.testing.assert_allclose(got, [1.0, 2 * math.log(3) / math.log(2) - 1])
    # compression 100, min 0: every label within [0.94, 1.0001], order kept.
    scores = np.arange(0, 54)
    labels = authors_score_transform(scores)
    assert np.all(np.diff(labels) > 0) and 0.94 < labels.min() and labels.max() < 1.0001
    with pytest.raises(DataError, match="min score"):
        authors_score_transform([-3, 4])
    with pytest.raises(DataError, match="max > min"):
        authors_score_transform([2, 2])


def test_spearman_and_held_out_metrics():
    from scipy.stats import spearmanr

    x, y = np.array([0.1, 0.4, 0.4, 2.0, -1.0]), np.array([1.0, 3.0, 2.0, 5.0, 0.0])
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0])
    assert math.isnan(spearman([1.0, 1.0], [0.0, 1.0]))
    resp = [SimpleNamespace(response_id=f"r{i}", label=float(i), quality=float(i) / 10) for i in range(4)]
    pairs = [SimpleNamespace(chosen_id="r3", rejected_id="r0"), SimpleNamespace(chosen_id="r2", rejected_id="r1")]
    prepared = SimpleNamespace(val_responses=resp, val_pairs=pairs)
    rewards = {"r0": 0.0, "r1": 2.0, "r2": 1.0, "r3": 3.0}  # pair 1 right, pair 2 wrong
    cfg = SimpleNamespace(reward_loss="l1", reward_margin=0.0, center_rewards_coefficient=None)
    m = held_out_metrics(rewards, prepared, cfg)
    assert m["pairwise_accuracy"] == 0.5 and m["loss"] == pytest.approx((0 + 1 + 1 + 0) / 4)
    assert m["spearman_label"] == pytest.approx(0.8) and m["spearman_quality"] == pytest.approx(0.8)
    bt = held_out_metrics(
        rewards,
        prepared,
        SimpleNamespace(reward_loss="bradley_terry", reward_margin=0.0, center_rewards_coefficient=None),
    )
    assert bt["loss"] == pytest.approx(float(bradley_terry_loss(t([3.0, 1.0]), t([0.0, 2.0])).loss))


# ------------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    return prepare_reward_data(_cfg(tmp_path_factory.mktemp("reward")), tok, verbose=False)


def test_pointwise_data_split_by_prompt_like_the_preference_data(tmp_path, tok, prepared):
    train_p = {r.prompt_id for r in prepared.train_responses}
    val_p = {r.prompt_id for r in prepared.val_responses}
    assert train_p and val_p and not train_p & val_p
    assert {p.prompt_id for p in prepared.val_pairs} <= val_p and {p.prompt_id for p in prepared.train_pairs} <= train_p
    policy = prepare_data(_cfg(tmp_path, "--loss.objective", "dpo"), tok, verbose=False)
    assert {p.prompt_id for p in policy.val_pairs} <= val_p and {p.prompt_id for p in policy.train_pairs} <= train_p
    # Every held-out response is scored once; training rows hold several responses each.
    scored = sorted(i for row in prepared.val_rows for i in row.response_ids)
    assert scored == sorted(r.response_id for r in prepared.val_responses)
    assert max(len(r.seq_lens) for r in prepared.train_rows) > 1
    # Standardised with the training split's moments; the synthetic ground truth rides along.
    assert abs(np.mean([r.label for r in prepared.train_responses])) < 1e-9
    assert prepared.label_stats["standardized"] and all(r.quality is not None for r in prepared.val_responses)


def test_bad_rows_are_counted_and_reported(tmp_path, tok):
    from engine.data.synthetic import generate_rows

    rows = generate_rows(12, 0)
    rows[0]["comment_scores"][1] = float("nan")
    del rows[1]["comment_scores"]
    rows[2]["comment_scores"][0] = None
    path = tmp_path / "wp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json writes the NaN as NaN
    cfg = _cfg(tmp_path, "--data.source", str(path))
    p = prepare_reward_data(cfg, tok, out_dir=tmp_path / "run", verbose=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["load"]["counts"] == {"missing_field": 1, "nan_score": 1, "non_numeric_score": 1}
    assert report["load"]["rows_kept"] == 9
    assert len(p.train_responses) + len(p.val_responses) == sum(len(r["comment_texts"]) for r in rows[3:])
    with pytest.raises(DataError, match="line 1 is bad"):  # 1-based jsonl line numbers
        prepare_reward_data(_cfg(tmp_path, "--data.source", str(path), "--data.strict", "true"), tok, verbose=False)


def test_pair_data_needs_bradley_terry(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": f"good story {i}", "rejected": f"bad {i}"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="use a WritingPrompts-schema source or loss.reward_loss bradley_terry"):
        prepare_reward_data(_cfg(tmp_path, "--data.source", str(path)), tok, verbose=False)
    p = prepare_reward_data(
        _cfg(
            tmp_path,
            "--data.source",
            str(path),
            "--loss.reward_loss",
            "bradley_terry",
            "--reward.score_transform",
            "none",
        ),
        tok,
        verbose=False,
    )
    assert all(len(r.chosen_segments) == len(r.rejected_segments) >= 1 for r in p.train_rows)


# --------------------------------------------------------------------------------------- packed rows


def _module(cfg, prepared, lora_r=0):
    torch.manual_seed(0)
    model = load_reward_model(dataclasses.replace(cfg.model, lora_r=lora_r), prepared, device="cpu")
    if lora_r:  # a trained-looking adapter and head, so merging them is not a no-op
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.add_(0.05 * torch.randn_like(p))
    return RewardWithLoss(model, cfg.loss)


@pytest.mark.parametrize("kind", ["l1", "bradley_terry"])
def test_packed_rows_give_the_unpacked_rewards_and_gradients(tmp_path, tok, kind):
    cfg = _cfg(
        tmp_path, "--loss.reward_loss", kind, "--loss.reward_margin", "0.5", "--loss.center_rewards_coefficient", "0.01"
    )
    p = prepare_reward_data(cfg, tok, verbose=False)
    rows = [max(p.train_rows, key=lambda r: len(r.seq_lens)), min(p.train_rows, key=lambda r: r.num_tokens)]
    packed = collate_reward(rows)  # the shortest row is padded to the other's length
    assert packed.num_sequences > 4 and packed.num_pad_tokens > 0
    module = _module(cfg, p)
    out = module(packed)
    out.loss.backward()
    grads_packed = {n: q.grad.clone() for n, q in module.named_parameters() if q.grad is not None}
    module.zero_grad()

    # Every sequence alone in its own row, then the same loss from the per-sequence rewards.
    by_id = {r.response_id: r for r in p.train_responses}
    singles = [
        module.rewards(collate_reward(pack_units([(by_id[i],)], 10_000, pad_id=0)))[0] for i in packed.response_ids
    ]
    alone = torch.stack(singles)
    torch.testing.assert_close(out.extras["rewards"], alone.detach(), rtol=1e-5, atol=1e-5)
    again = reward_loss(
        kind,
        alone,
        labels=packed.labels,
        chosen_index=packed.chosen_segments,
        rejected_index=packed.rejected_segments,
        margins=packed.margins,
        margin_scale=0.5,
        center_rewards_coefficient=0.01,
    )
    torch.testing.assert_close(out.loss, again.loss, rtol=1e-5, atol=1e-6)
    again.loss.backward()
    assert len(grads_packed) > 10
    for n, q in module.named_parameters():
        if n in grads_packed:
            torch.testing.assert_close(grads_packed[n], q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_attention_does_not_cross_sequences(tmp_path, prepared):
    cfg = _cfg(tmp_path)
    module = _module(cfg, prepared)
    row = next(r for r in prepared.train_rows if len(r.seq_lens) >= 3)
    batch = collate_reward([row])
    before = module.rewards(batch).detach()
    changed = copy.deepcopy(batch)
    changed.input_ids[0, : row.seq_lens[0]] = (changed.input_ids[0, : row.seq_lens[0]] + 7) % 800 + 5
    after = module.rewards(changed).detach()
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("template,lora_r", [("chat", 0), ("authors", 4)])
def test_export_loads_and_scores_like_training(tmp_path, tok, template, lora_r):
    from transformers import AutoModelForSequenceClassification

    from engine import evaluate as E
    from engine.train import export

    # max_length 64 cuts the longer texts, so truncation has to agree too.
    cfg = _cfg(
        tmp_path,
        "--reward.template",
        template,
        "--data.max_length",
        "64",
        "--data.max_prompt_length",
        "32",
        "--model.lora_r",
        str(lora_r),
    )
    p = prepare_reward_data(cfg, tok, verbose=False)
    assert max(r.num_tokens for r in p.val_responses) == 64
    module = _module(cfg, p, lora_r=lora_r).eval()
    with torch.no_grad():
        train_time = {}
        for row in p.val_rows:
            b = collate_reward([row])
            train_time.update(zip(b.response_ids, module(b, with_loss=False).tolist()))
    export(module.model, p.tokenizer, tmp_path / "final", cfg, is_main=True)

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert type(model.score) is torch.nn.Linear and model.config.num_labels == 1
    assert model.config.reward_labels["standardized"] is True
    # The engine's evaluator, with no settings: the tokenizer carries template and length.
    scorer = E.RewardScorer(str(tmp_path / "final"), batch_size=5)
    val = p.val_responses
    by_id = {r.response_id: r for r in p.train_responses + val}
    responses = {r.response_id: r for r in load_any("synthetic", synthetic_prompts=24).responses}
    prompts = [responses[r.response_id].prompt for r in val]
    texts = [responses[r.response_id].text for r in val]
    got = scorer.score(prompts, texts)
    np.testing.assert_allclose(got, [train_time[r.response_id] for r in val], rtol=1e-4, atol=1e-5)
    # Token ids are those of training, and HF's own padded batch forward agrees as well.
    assert [list(by_id[r.response_id].input_ids) for r in val] == encode(scorer.tokenizer, prompts, texts, 64)
    samples = [[{"text": texts[0]}], [{"text": texts[1]}]]
    res = E.score_samples(prompts[:2], samples, reward_scorer=scorer, show_progress=False)
    assert res.summary["quality_reward"] == pytest.approx(float(np.mean(got[:2])), rel=1e-5)


# ------------------------------------------------------------------------------------- config, recipe


def test_authors_recipe():
    cfg = load_config(["--config", str(ROOT / "configs/reward-authors.yaml")])
    assert (cfg.model.name, cfg.model.lora_r, cfg.model.lora_alpha) == ("google/gemma-2-2b", 16, 32)
    assert (cfg.loss.objective, cfg.loss.reward_loss, cfg.optim.lr, cfg.optim.epochs) == ("reward", "l1", 3e-5, 3)
    assert (cfg.data.max_length, cfg.parallel.precision, cfg.reward.template) == (2048, "bf16", "authors")
    r = cfg.reward
    assert (r.early_stopping_patience, r.lr_plateau_patience, r.lr_plateau_factor) == (3, 2, 0.1)
    assert (r.score_transform, r.compression_factor, r.standardize_labels) == ("authors", 100, False)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--loss.reward_loss", "hinge"], "loss.reward_loss must be one of l1, mse, bradley_terry"),
        (["--data.pairs", "divpo", "--deviation.enabled", "true"], "data.pairs divpo picks pairs by diversity"),
        (["--checkpoint.merge_lora", "false"], "needs the LoRA adapters merged"),
        (["--reward.template", "plain"], "reward.template must be one of chat, authors"),
    ],
)
def test_config_errors(args, message):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(TINY + args)


# ---------------------------------------------------------------------------------------- training runs


def _run_in_process(tmp_path, name, *extra):
    from engine.train import train

    return train(_cfg(tmp_path, "--logging.run_name", name, *extra))


def test_early_stopping_keeps_and_exports_the_best_model(tmp_path):
    # A learning rate this high diverges after the first evaluations: the best held-out loss is early.
    summary = _run_in_process(
        tmp_path,
        "es",
        "--optim.lr",
        "0.3",
        "--optim.max_steps",
        "30",
        "--reward.eval_every_steps",
        "2",
        "--reward.early_stopping_patience",
        "2",
        "--optim.max_grad_norm",
        "0",
    )
    run = tmp_path / "es"
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval/loss" in ln]
    losses = [e["eval/loss"] for e in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert summary["stopped_early_at"] == evals[-1]["step"] < 30
    assert summary["best_step"] == evals[best]["step"] and len(evals) == best + 3  # two evaluations without improvement
    assert json.loads((run / "best.json").read_text())["step"] == summary["best_step"]
    assert (run / "final" / "model.safetensors").read_bytes() == (run / "best" / "model.safetensors").read_bytes()


def test_plateau_schedule_lowers_the_learning_rate_after_bad_evaluations(tmp_path):
    # min_delta 100: no evaluation after the first counts as an improvement.
    _run_in_process(
        tmp_path,
        "plateau",
        "--optim.lr",
        "3e-3",
        "--optim.max_steps",
        "9",
        "--reward.eval_every_steps",
        "2",
        "--reward.early_stopping_patience",
        "0",
        "--reward.early_stopping_min_delta",
        "100",
        "--reward.lr_plateau_patience",
        "1",
        "--checkpoint.export_final",
        "false",
    )
    recs = {r["step"]: r for r in map(json.loads, (tmp_path / "plateau" / "metrics.jsonl").read_text().splitlines())}
    # Bad evaluations at steps 4, 6, 8: the second of them exceeds patience 1 and lowers the rate 10x.
    assert [recs[s]["eval/bad_evals"] for s in (2, 4, 6, 8)] == [0, 1, 2, 3]
    assert [recs[s]["eval/lr_scale"] for s in (2, 4, 6, 8)] == pytest.approx([1, 1, 0.1, 0.1])
    # The step after an evaluation already runs at the lowered rate (the schedule is constant).
    assert [recs[s]["lr"] for s in (5, 7, 9)] == pytest.approx([3e-3, 3e-4, 3e-4], rel=1e-9)


def test_evaluate_reports_quality_reward_with_an_exported_reward_model(tmp_path, prepared):
    from engine import evaluate as E
    from engine.train import export

    cfg = _cfg(tmp_path)
    export(_module(cfg, prepared).model, prepared.tokenizer, tmp_path / "rm", cfg, is_main=True)
    # Any policy (here the random-init tiny Llama), the reward model named as in the training config.
    result = E.main(
        [
            "--model",
            "llama-tiny",
            "--prompts",
            "synthetic",
            "--num-prompts",
            "2",
            "--n",
            "2",
            "--max-new-tokens",
            "8",
            "--semantic-model",
            "",
            "--style-model",
            "",
            "--no-progress",
            "--eval.reward_model",
            str(tmp_path / "rm"),
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert math.isfinite(result.summary["quality_reward"]) and "quality_true" in result.summary
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["settings"]["reward_model"] == str(tmp_path / "rm")


def _steps(run_dir):
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = {k: v for k, v in rec.items() if k == "loss" or k.startswith("eval/")}
    return by_step


def _env():
    import os

    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_losses_evaluations_and_the_export(tmp_path):
    """A run killed after step 3 and resumed matches the straight run: losses, held-out metrics, early-stopping
    state (it rides in the trainer state) and the exported best model."""
    steps = [
        "--optim.max_steps",
        "8",
        "--checkpoint.every_steps",
        "1",
        "--checkpoint.keep_last",
        "2",
        "--reward.eval_every_steps",
        "2",
        "--optim.lr",
        "3e-3",
    ]

    def cmd(name):
        return [
            sys.executable,
            "-m",
            "engine.train",
            *TINY,
            "--logging.output_dir",
            str(tmp_path),
            "--logging.run_name",
            name,
            "--data.cache_dir",
            str(tmp_path / "cache"),
            *steps,
        ]

    ref = subprocess.run(cmd("straight"), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    proc = subprocess.Popen(
        cmd("killed"), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    step3, deadline = tmp_path / "killed" / "checkpoints" / "step-3", time.time() + 300
    while not step3.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        cmd("killed") + ["--checkpoint.resume", "auto"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    want, got = _steps(tmp_path / "straight"), _steps(tmp_path / "killed")
    assert sorted(got) == list(range(1, 9)) and sum("eval/loss" in v for v in want.values()) == 4
    for step, rec in want.items():
        assert got[step].keys() == rec.keys(), step
        for k, v in rec.items():
            assert abs(v - got[step][k]) <= 1e-6 * max(1.0, abs(v)), (step, k, v, got[step][k])
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("straight", "killed"))
    assert a["best_step"] == b["best_step"] and a["eval"] == pytest.approx(b["eval"], rel=1e-6)
    sa, sb = ((tmp_path / n / "final" / "model.safetensors").read_bytes() for n in ("straight", "killed"))
    assert sa == sb


@pytest.mark.slow
def test_two_process_zero3_lora(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "engine.train",
        *TINY,
        "--logging.output_dir",
        str(tmp_path),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--parallel.zero_stage",
        "3",
        "--model.lora_r",
        "8",
        "--optim.max_steps",
        "4",
        "--reward.eval_every_steps",
        "2",
        "--optim.lr",
        "3e-3",
    ]
    r = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "reward-tiny-cpu"
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "data_report.json").read_text())
    assert summary["eval"]["responses"] == report["responses"]["val"]  # every held-out response, gathered over ranks
    assert all(math.isfinite(v) for v in summary["eval"].values())

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())


def test_benchmarks_md_reward_section_comes_from_the_rows(tmp_path):
    from bench import common, report
    from bench.bench_reward import FIELDS

    base = {k: "" for k in FIELDS}
    base.update(
        bench="reward-tiny-cpu",
        reward_loss="l1",
        steps="288",
        best_step="250",
        threads="1",
        load1_start="1.0",
        load1_end="2.0",
        target_spearman_quality="0.6",
        hardware="cpu",
        torch="2",
        transformers="5",
        commit="abc",
        timestamp="2026-01-01T00:00:00+00:00",
    )
    rows = [
        dict(base, variant="preset", labels="authors standardized", spearman_quality="0.8026", run_id="r1"),
        dict(base, variant="published_labels", labels="authors", spearman_quality="0.5406", run_id="r1"),
        dict(base, variant="preset", spearman_quality="0.1", run_id="r0", timestamp="2025-01-01T00:00:00+00:00"),
    ]
    common.append_csv(tmp_path / "reward.csv", rows, FIELDS)
    text = report.render(tmp_path, tmp_path / "B.md")
    section = text.split("## Reward model")[1].split("\n## ")[0]
    assert section.count("| preset |") == 1 and "| r0 |" not in section  # the latest row of each variant
    assert "| preset | l1 | authors standardized | 0.803 | >= 0.6 |" in section
    assert "| published_labels | l1 | authors | 0.541 | < 0.6 |" in section
    assert "| 288 (250) |" in section
