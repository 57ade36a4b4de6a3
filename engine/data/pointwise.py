"""Reward-model data: every cleaned response with its label, tokenised once and packed many to a row.

Where this sits: the data side of `loss.objective reward` (engine.reward), beside the preference flow
of `prepare.py` and built from the same steps, so both see the same responses, split and pairs:

    load + validate + clean (loading.py) -> drop over-long responses (tokenize.py)
    -> labels: the authors' transform of the upvotes, min/max over the whole dataset, then (by
       default) standardised with the training split's mean and std
    -> split by prompt (pairs.split_by_prompt: the prompt-level split of the preference data)
    -> preference pairs of each split (pairs.build_pairs with data.pairs)
    -> tokenise each response once with the reward template, cut at the end, cached
    -> pack: whole units (one response for l1/mse, both responses of a pair for bradley_terry) per row

Inside a row every sequence restarts its position ids at 0, as in the policy rows, which is what keeps
attention inside each sequence (transformers builds a per-sequence causal mask from position ids when
called with attention_mask=None; FlashAttention varlen derives cu_seqlens from them); the reward of a
sequence is read at its last token. Held-out rows are always pointwise: pair metrics on them come from
the per-response rewards.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from engine.data.loading import DataError, LoadReport
from engine.data.packing import pack_bins
from engine.data.pairs import build_pairs, pair_skip_counts, responses_of_pairs, split_by_prompt
from engine.data.prepare import (
    drop_long_responses,
    finish_report,
    load_source,
    rows_report,
    sampled_padding_fraction,
)
from engine.data.records import Pair, Response, content_id
from engine.data.tokenize import tokenizer_fingerprint
from engine.fileio import load_npz_verified, save_npz_verified

# Bump when the reward tokenisation changes: invalidates every cached reward tokenisation.
REWARD_TOKENIZATION_VERSION = "1"
# The authors' input text (models/reward_model.py:88, flatten_data):
#   f"<prompt>{post_title}\n{post_text}</prompt><response>{comment}</response>"
# as a chat template (user = prompt, assistant = response), so that the exported tokenizer renders it
# for engine.evaluate exactly as training did. PREFIX/SUFFIX stand for the special tokens the tokenizer
# adds around a text by itself (the authors tokenise with add_special_tokens on: gemma's <bos>).
_AUTHORS_TEMPLATE = (
    "PREFIX{% for message in messages %}{% if message['role'] == 'user' %}{{ '<prompt>' + message['content'] + "
    "'</prompt>' }}{% elif message['role'] == 'assistant' %}{{ '<response>' + message['content'] + '</response>' }}"
    "{% endif %}{% endfor %}SUFFIX"
)


# ----------------------------------------------------------------------------------------- labels


def authors_score_transform(
    scores: Sequence[float],
    min_score: float | None = None,
    max_score: float | None = None,
    compression_factor: int = 100,
) -> np.ndarray:
    """The published upvote transform, exactly (DiversityTuning models/utils.py:14-51 `transform_scores`,
    applied in scripts_dataset_cleaner/0_data_prep_scoring.py:35-47 with the min and max over every
    comment score of the dataset):

        x_0 = s - min + 1,  a_0 = min,  b_0 = max
        x_k+1 = log(x_k + 1),  a_k+1 = log(a_k + 1),  b_k+1 = log(b_k + 1)   for k < compression_factor
        label = 2 (x_K - a_K) / (b_K - a_K) - 1

    Kept as published, including that the anchors a, b start from the unshifted min and max while the
    scores are shifted by 1 - min: labels span exactly [-1, 1] only when min = 1 (Reddit's starting
    score); with min = 0 (the synthetic data) they land in about [0.94, 1.0001]. Monotone in s, so
    rank metrics are those of the upvotes. Needs min > -1 (log of a non-positive number otherwise).
    """
    s = np.asarray(scores, dtype=np.float64)
    lo = float(s.min()) if min_score is None else float(min_score)
    hi = float(s.max()) if max_score is None else float(max_score)
    if lo <= -1:
        raise DataError(
            f"the authors' score transform takes log(min score + 1) and the minimum score is {lo:g}; "
            "use reward.score_transform none, or shift the scores to be > -1"
        )
    if hi <= lo:
        raise DataError(f"every score is {lo:g}: the authors' score transform needs max > min; check the data")
    x, a, b = s - lo + 1.0, lo, hi
    for _ in range(int(compression_factor)):
        x, a, b = np.log(x + 1.0), np.log(a + 1.0), np.log(b + 1.0)
    return 2.0 * (x - a) / (b - a) - 1.0


def response_labels(responses: Sequence[Response], transform: str, compression_factor: int = 100) -> np.ndarray:
    """Label per response: the authors' transform over the whole dataset's score range, or the raw score."""
    scores = np.array([r.score for r in responses], dtype=np.float64)
    if transform == "none" or not len(scores):
        return scores
    if transform != "authors":
        raise ValueError(f"reward.score_transform must be authors or none, got {transform!r}")
    return authors_score_transform(scores, compression_factor=compression_factor)


def standardize(
    labels: np.ndarray, responses: Sequence[Response], val_fraction: float, seed: int
) -> tuple[np.ndarray, dict]:
    """(labels - mean) / std with the moments of the training split's labels (the prompt-level split of
    `split_by_prompt`, so held-out labels do not enter them), and {"mean", "std"}."""
    train, _ = split_by_prompt(responses, val_fraction, seed)
    train_prompts = {r.prompt_id for r in train}
    ref = labels[[r.prompt_id in train_prompts for r in responses]] if train else labels
    mean, std = float(ref.mean()), float(ref.std())
    if not std > 0:
        raise DataError(
            f"every training label is {mean:g}: nothing to learn; check the scores, or use "
            "reward.standardize_labels false"
        )
    return (labels - mean) / std, {"mean": mean, "std": std}


# ----------------------------------------------------------------------------------- tokenisation


def _special_affixes(tokenizer) -> tuple[str, str]:
    """The special tokens a tokenizer puts before and after a text on its own (as token strings)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    if not bare or len(full) < len(bare):
        return "", ""
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
    if start is None:
        return "", ""
    tokens = tokenizer.convert_ids_to_tokens(full)
    return "".join(tokens[:start]), "".join(tokens[start + len(bare) :])


def reward_tokenizer(tokenizer, template: str, max_length: int):
    """A copy of `tokenizer` that renders the reward model's input as its chat template.

    template "chat" keeps the tokenizer's own chat template; "authors" installs the authors' text
    format. The copy also records `model_max_length = max_length` and right padding: engine.evaluate's
    RewardScorer reads both from the exported tokenizer, so it truncates and positions every sequence
    as training did.
    """
    tok = copy.deepcopy(tokenizer)
    if template == "authors":
        prefix, suffix = _special_affixes(tok)
        tok.chat_template = _AUTHORS_TEMPLATE.replace("PREFIX", prefix).replace("SUFFIX", suffix)
    elif template != "chat":
        raise ValueError(f"reward.template must be chat or authors, got {template!r}")
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; engine.model.load_tokenizer sets a default one")
    tok.model_max_length = int(max_length)
    tok.padding_side = "right"
    tok.truncation_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def render(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """Reward-model input texts: the (reward) tokenizer's chat template, user = prompt, assistant = response."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(prompts, responses)
    ]


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids exactly as `engine.evaluate.RewardScorer` encodes them (rendered template, no extra special
    tokens, cut at the end to max_length), minus trailing pad ids.

    Sequence classifiers pool the rightmost token that is not the pad id; a sequence ending in it (pad =
    eos tokenizers whose template ends turns with eos) is scored one token earlier, so those tokens are
    dropped here and the reward is read where the exported model reads it.
    """
    ids = tokenizer(
        render(tokenizer, prompts, responses), add_special_tokens=False, truncation=True, max_length=max_length
    )["input_ids"]
    pad = tokenizer.pad_token_id
    out = []
    for seq in ids:
        n = len(seq)
        while n and seq[n - 1] == pad:
            n -= 1
        out.append(list(seq[:n]))
    return out


@dataclass
class TokenizedResponse:
    """One response ready for the reward model: token ids, label, and ground truth when the data has it."""

    response_id: str
    prompt_id: str
    input_ids: np.ndarray  # int32 [n]
    label: float
    score: float  # the raw upvotes
    quality: float | None = None  # synthetic ground truth (engine.data.synthetic), None elsewhere

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


def reward_tokenization_fingerprint(tokenizer, max_length: int) -> str:
    """Everything the reward token ids depend on: tokenizer (with the reward template), length, version."""
    return content_id(
        "reward-tokenization", REWARD_TOKENIZATION_VERSION, tokenizer_fingerprint(tokenizer), str(int(max_length))
    )


def _cache_path(cache_dir, fingerprint: str, ids: list[str]) -> Path:
    return Path(cache_dir) / f"reward-tokens-{content_id('reward-tokcache', fingerprint, *ids)}.npz"


def _load_token_cache(path: Path, ids: list[str]) -> list[np.ndarray] | None:
    z = load_npz_verified(path)
    if z is None or list(z["response_ids"]) != ids:
        return None  # corrupted, a hash collision or a foreign file: recompute rather than trust it
    lens, flat = z["lens"], z["ids"]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(ids))]


def _save_token_cache(path: Path, ids: list[str], seqs: list[np.ndarray]) -> None:
    save_npz_verified(
        path,
        dict(
            response_ids=np.array(ids, dtype="U"),
            lens=np.array([len(s) for s in seqs], dtype=np.int64),
            ids=np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int32),
        ),
    )


def tokenize_responses(
    responses: Sequence[Response],
    labels: Sequence[float],
    tokenizer,
    *,
    max_length: int,
    cache_dir: str | Path | None = None,
    batch_size: int = 1024,
) -> tuple[list[TokenizedResponse], dict[str, int]]:
    """(tokenized responses in input order, drops per reason). `tokenizer` is a `reward_tokenizer`."""
    ids = [r.response_id for r in responses]
    path = _cache_path(cache_dir, reward_tokenization_fingerprint(tokenizer, max_length), ids) if cache_dir else None
    seqs = _load_token_cache(path, ids) if path is not None and path.exists() else None
    if seqs is None:
        seqs = []
        for i in range(0, len(responses), batch_size):
            chunk = responses[i : i + batch_size]
            encoded = encode(tokenizer, [r.prompt for r in chunk], [r.text for r in chunk], max_length)
            seqs += [np.asarray(s, dtype=np.int32) for s in encoded]
        if path is not None:
            _save_token_cache(path, ids, seqs)
    out, dropped = [], Counter()
    for r, label, seq in zip(responses, labels, seqs):
        if len(seq) == 0:
            dropped["empty_after_truncation"] += 1
            continue
        q = r.meta.get("quality") if isinstance(r.meta, dict) else None
        out.append(
            TokenizedResponse(
                r.response_id,
                r.prompt_id,
                seq,
                float(label),
                float(r.score),
                float(q) if isinstance(q, (int, float)) else None,
            )
        )
    return out, dict(dropped)


# ---------------------------------------------------------------------------------------- packing


@dataclass
class RewardRow:
    """One packed row of whole units: responses (pointwise) or both responses of pairs (bradley_terry)."""

    input_ids: np.ndarray  # int64 [n]
    position_ids: np.ndarray  # int64 [n]
    seq_lens: list[int]  # per sequence, in row order
    response_ids: list[str]  # per sequence
    labels: list[float]  # per sequence
    chosen_segments: list[int] = field(default_factory=list)  # local sequence index of each pair's chosen side
    rejected_segments: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # per pair: chosen label - rejected label
    pad_id: int = 0

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


@dataclass
class RewardBatch:
    """One micro-batch of reward rows. R rows, L columns, S sequences, P pairs (0 for pointwise rows)."""

    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long, restarting at 0 per sequence
    last_index: torch.Tensor  # [S] long: flat index into [R * L] of each sequence's last token
    labels: torch.Tensor  # [S] float32
    chosen_segments: torch.Tensor  # [P] long, indices into the S sequences
    rejected_segments: torch.Tensor  # [P] long
    margins: torch.Tensor  # [P] float32
    response_ids: list[str]  # [S]
    num_real_tokens: int
    num_pad_tokens: int

    def to(self, device, non_blocking: bool = False) -> RewardBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return RewardBatch(**moved)

    @property
    def num_sequences(self) -> int:
        return int(self.last_index.numel())

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_segments.numel())


def _build_row(units: Sequence[Sequence[TokenizedResponse]], pad_id: int) -> RewardRow:
    ids, lens, rids, labels, ch, rj, margins = [], [], [], [], [], [], []
    for unit in units:
        if len(unit) == 2:
            ch.append(len(lens))
            rj.append(len(lens) + 1)
            margins.append(unit[0].label - unit[1].label)
        for r in unit:
            ids.append(np.asarray(r.input_ids, dtype=np.int64))
            lens.append(r.num_tokens)
            rids.append(r.response_id)
            labels.append(r.label)
    return RewardRow(
        input_ids=np.concatenate(ids),
        position_ids=np.concatenate([np.arange(n, dtype=np.int64) for n in lens]),
        seq_lens=lens,
        response_ids=rids,
        labels=labels,
        chosen_segments=ch,
        rejected_segments=rj,
        margins=margins,
        pad_id=pad_id,
    )


def pack_units(
    units: Sequence[Sequence[TokenizedResponse]], max_tokens_per_row: int, *, pad_id: int
) -> list[RewardRow]:
    """Rows of whole units (a unit: one response, or the (chosen, rejected) responses of a pair), binned by
    `packing.pack_bins` (first-fit-decreasing, then balanced); units keep their input order within a row."""
    sizes = [sum(r.num_tokens for r in u) for u in units]
    return [_build_row([units[i] for i in sorted(b)], pad_id) for b in pack_bins(sizes, max_tokens_per_row)]


def collate_reward(rows: Sequence[RewardRow], *, device: str | torch.device = "cpu") -> RewardBatch:
    """One micro-batch: rows padded on the right to the longest row (padding continues the last sequence's
    positions, so it joins that sequence behind its real tokens, which causal attention never lets them see)."""
    if not rows:
        raise ValueError("collate_reward needs at least one row")
    R, L = len(rows), max(r.num_tokens for r in rows)
    input_ids = np.full((R, L), rows[0].pad_id, dtype=np.int64)
    position_ids = np.zeros((R, L), dtype=np.int64)
    last, labels, ch, rj, margins, rids = [], [], [], [], [], []
    seg0 = 0
    for r, row in enumerate(rows):
        n = row.num_tokens
        input_ids[r, :n] = row.input_ids
        position_ids[r, :n] = row.position_ids
        position_ids[r, n:] = np.arange(row.seq_lens[-1], row.seq_lens[-1] + L - n)
        ends = np.cumsum(row.seq_lens)
        last.extend(int(r * L + e - 1) for e in ends)
        labels.extend(row.labels)
        ch.extend(seg0 + k for k in row.chosen_segments)
        rj.extend(seg0 + k for k in row.rejected_segments)
        margins.extend(row.margins)
        rids.extend(row.response_ids)
        seg0 += len(row.seq_lens)
    real = sum(r.num_tokens for r in rows)
    batch = RewardBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        last_index=torch.tensor(last, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.float32),
        chosen_segments=torch.tensor(ch, dtype=torch.long),
        rejected_segments=torch.tensor(rj, dtype=torch.long),
        margins=torch.tensor(margins, dtype=torch.float32),
        response_ids=rids,
        num_real_tokens=real,
        num_pad_tokens=R * L - real,
    )
    return batch if torch.device(device).type == "cpu" else batch.to(device)


# ---------------------------------------------------------------------------------------- prepare


@dataclass
class PreparedRewardData:
    """Everything a reward run trains and validates on (see the module docstring for the flow)."""

    train_rows: list[RewardRow]  # pointwise units, or pair units for bradley_terry
    val_rows: list[RewardRow]  # always pointwise: one reward per held-out response
    train_responses: list[TokenizedResponse]
    val_responses: list[TokenizedResponse]
    train_pairs: list[Pair]  # preference pairs of the training prompts (data.pairs), both sides tokenized
    val_pairs: list[Pair]  # the same for the held-out prompts: pairwise accuracy
    tokenizer: object  # the reward tokenizer (template, max length): what the export saves
    label_stats: dict  # how labels were made from scores (transform, range, standardisation moments)
    load_report: LoadReport
    counts: dict[str, int]
    padding_fraction: float
    report: dict = field(default_factory=dict)


def prepare_reward_data(
    cfg, tokenizer, *, out_dir: str | Path | None = None, verbose: bool = True
) -> PreparedRewardData:
    """Load, clean, label, split, pair, tokenise and pack the data of `cfg` for objective reward."""
    d, kind = cfg.data, cfg.loss.reward_loss
    t0 = time.perf_counter()
    loaded = load_source(d, verbose=verbose)
    counts: dict[str, int] = {}  # responses and pairs dropped after loading, by reason
    pair_skips: dict[str, int] = {}  # prompts that give no preference pair (their responses still train l1/mse)
    if loaded.kind == "pairs":
        if kind != "bradley_terry":
            raise DataError(
                f"{d.source} holds ready-made pairs, without a score for every response; loss.reward_loss {kind} "
                "regresses on per-response scores: use a WritingPrompts-schema source or loss.reward_loss bradley_terry"
            )
        pairs = loaded.pairs
        responses = responses_of_pairs(pairs)
    else:
        responses = drop_long_responses(loaded.responses, tokenizer, d, counts)
        pairs = build_pairs(
            responses,
            d.pairs,
            min_gap=d.min_gap,
            max_pairs_per_prompt=d.max_pairs_per_prompt,
            seed=d.seed,
            gap_sampler=d.gap_sampler,
        )
        pair_skips = pair_skip_counts(responses, pairs)
    if not responses:
        raise DataError(f"{d.source}: no response survived loading and cleaning (load report: {loaded.report.counts})")
    labels = response_labels(responses, cfg.reward.score_transform, cfg.reward.compression_factor)
    scores = [r.score for r in responses]
    label_stats = {
        "transform": cfg.reward.score_transform,
        "compression_factor": cfg.reward.compression_factor,
        "score_min": float(min(scores)),
        "score_max": float(max(scores)),
        "label_min": float(labels.min()),
        "label_max": float(labels.max()),
        "standardized": False,
    }
    if cfg.reward.standardize_labels:
        labels, moments = standardize(labels, responses, d.val_fraction, d.seed)
        label_stats.update(standardized=True, **moments)

    tok = reward_tokenizer(tokenizer, cfg.reward.template, d.max_length)
    tokenized, dropped = tokenize_responses(responses, labels, tok, max_length=d.max_length, cache_dir=d.cache_dir)
    for k, v in dropped.items():
        counts[k] = counts.get(k, 0) + v
    by_id = {t.response_id: t for t in tokenized}
    kept_pairs = [p for p in pairs if p.chosen_id in by_id and p.rejected_id in by_id]
    if len(kept_pairs) < len(pairs):
        counts["pair_side_dropped"] = len(pairs) - len(kept_pairs)
    train_resp, val_resp = split_by_prompt(tokenized, d.val_fraction, d.seed)
    train_pairs, val_pairs = split_by_prompt(kept_pairs, d.val_fraction, d.seed)

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if kind == "bradley_terry":
        units = [(by_id[p.chosen_id], by_id[p.rejected_id]) for p in train_pairs]
    else:
        units = [(r,) for r in train_resp]
    if not units:
        what = "pair" if kind == "bradley_terry" else "response"
        raise DataError(
            f"{d.source}: no training {what} survived (load report: {loaded.report.counts}, drops: {counts}); "
            "check the source, data.pairs, data.max_length and data.val_fraction"
        )
    train_rows = pack_units(units, d.max_tokens_per_row, pad_id=pad_id)
    val_rows = pack_units([(r,) for r in val_resp], d.max_tokens_per_row, pad_id=pad_id) if val_resp else []
    pad_frac = sampled_padding_fraction(train_rows, d)
    report = {
        "load": loaded.report.to_dict(),
        "kind": loaded.kind,
        "objective": "reward",
        "reward_loss": kind,
        "template": cfg.reward.template,
        "labels": label_stats,
        "responses": {
            "loaded": len(responses),
            "tokenized": len(tokenized),
            "train": len(train_resp),
            "val": len(val_resp),
        },
        "prompts": {"train": len({r.prompt_id for r in train_resp}), "val": len({r.prompt_id for r in val_resp})},
        "pair_mode": d.pairs if loaded.kind == "responses" else "given",
        "pairs": {"train": len(train_pairs), "val": len(val_pairs)},
        "prompts_without_pairs": dict(sorted(pair_skips.items())),
        "dropped": dict(sorted(counts.items())),
        **rows_report(train_rows, val_rows, d),
        "padding_fraction_packed": pad_frac,
        "tokenization_fingerprint": reward_tokenization_fingerprint(tok, d.max_length),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    summary = (
        f"reward data: {len(train_resp)} train / {len(val_resp)} val responses, {len(train_pairs)} / "
        f"{len(val_pairs)} pairs; labels {cfg.reward.score_transform} in [{label_stats['label_min']:.4g}, "
        f"{label_stats['label_max']:.4g}]{', standardized' if label_stats['standardized'] else ''}; "
        f"{len(train_rows)} rows of <= {d.max_tokens_per_row} tokens, padding {100 * pad_frac:.2f}%; "
        f"dropped {report['dropped'] or 'nothing'}"
    )
    finish_report(report, out_dir, summary, verbose=verbose)
    return PreparedRewardData(
        train_rows=train_rows,
        val_rows=val_rows,
        train_responses=train_resp,
        val_responses=val_resp,
        train_pairs=train_pairs,
        val_pairs=val_pairs,
        tokenizer=tok,
        label_stats=label_stats,
        load_report=loaded.report,
        counts=counts,
        padding_fraction=pad_frac,
        report=report,
    )
