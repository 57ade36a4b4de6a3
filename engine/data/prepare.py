"""`prepare_data`: the one call that turns a config's data source into packed rows.

The trainer, the reference-cache builder and `python -m engine.data prepare` all call it, so they
see the same pairs, split, weights, token ids and rows:

    load + validate + clean (loading.py) -> drop over-long responses (tokenize.py)
    -> [deviation, for divpo] -> pairs (pairs.py) -> [deviation groups + weights] -> split by prompt
    -> attach weights -> tokenise, cached (tokenize.py) -> pack (packing.py)

Deviation groups (`deviation.groups`): "all" scores each response against every cleaned response of
its prompt; "paired" (the authors') against the responses of the prompt's pairs, after
`pairs.paired_groups` has applied `deviation.max_per_prompt` by dropping the later pairs.

Everything skipped on the way is counted by reason in `PreparedData.counts` and, with `out_dir`,
written to `data_report.json` next to the run's other outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.loading import DataError, LoadReport, load_any
from engine.data.packing import (
    PackedRow,
    microbatch_padding_fraction,
    pack_pairs,
    packing_padding_fraction,
    padded_pairs_padding_fraction,
)
from engine.data.pairs import (
    attach_weights,
    build_pairs,
    pair_skip_counts,
    paired_groups,
    response_pair_counts,
    responses_of_pairs,
    split_by_prompt,
)
from engine.data.records import Pair, Response, content_id
from engine.data.sampler import RowSampler
from engine.data.tokenize import (
    TokenizedPair,
    filter_long_responses,
    tokenization_fingerprint,
    tokenize_pairs,
)
from engine.deviation import compute_deviation
from engine.fileio import atomic_write


@dataclass
class PreparedData:
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    train_tokenized: list[TokenizedPair]
    val_tokenized: list[TokenizedPair]
    train_rows: list[PackedRow]
    val_rows: list[PackedRow]
    load_report: LoadReport
    counts: dict[str, int]  # responses / prompts / pairs dropped after loading, by reason
    padding_fraction: float  # train micro-batches as collated (each padded to its longest row)
    padding_fraction_to_capacity: float  # train rows padded to max_tokens_per_row (static shapes)
    fingerprint: str  # train pair ids + tokenization fingerprint: what per-sequence caches key on
    tokenization_fingerprint: str
    responses: list[Response] = field(default_factory=list)
    deviation: Any = None  # the DeviationResult when one was computed
    weights_attached: bool = False
    report: dict = field(default_factory=dict)


def _deviation(responses, cfg, pair_counts=None, keep_embeddings=False):
    return compute_deviation(
        responses,
        cfg.deviation,
        cache_dir=cfg.deviation.cache_dir,
        pair_counts=pair_counts,
        keep_embeddings=keep_embeddings,
    )


def train_fingerprint(pairs: list[Pair], tok_fp: str) -> str:
    return content_id("train-set", tok_fp, *(p.pair_id for p in pairs))


def prepare_data(
    cfg, tokenizer, *, compute_weights: bool = True, out_dir: str | Path | None = None, verbose: bool = True
) -> PreparedData:
    """Load, clean, pair, weight, split, tokenise and pack the data of `cfg` (an engine.config.Config)."""
    d = cfg.data
    t0 = time.perf_counter()
    loaded = load_source(d, verbose=verbose)
    counts: dict[str, int] = {}
    needs_weights = compute_weights and cfg.loss.needs_weights and cfg.deviation.enabled
    deviation = None

    if loaded.kind == "responses":
        responses = drop_long_responses(loaded.responses, tokenizer, d, counts)
        if d.pairs == "divpo":
            # The authors' sampler scores subsets of a prompt's responses: it needs the embeddings.
            deviation = _deviation(responses, cfg, keep_embeddings=d.divpo_sampler == "authors")
        pairs = build_pairs(
            responses,
            d.pairs,
            min_gap=d.min_gap,
            max_pairs_per_prompt=d.max_pairs_per_prompt,
            rho=d.divpo_rho,
            seed=d.seed,
            deviation=deviation,
            gap_sampler=d.gap_sampler,
            divpo_sampler=d.divpo_sampler,
        )
        counts.update(pair_skip_counts(responses, pairs))
    else:
        if d.pairs == "divpo":
            raise DataError(
                f"{d.source} holds ready-made pairs; divpo builds its own pairs from scored responses: use a "
                f"WritingPrompts-schema source or another data.pairs mode"
            )
        pairs = loaded.pairs
        responses = responses_of_pairs(pairs)

    if needs_weights:
        if cfg.deviation.groups == "paired":
            n_before = len(pairs)
            pairs, group, usage = paired_groups(pairs, cfg.deviation.max_per_prompt)
            if len(pairs) < n_before:
                counts["pair_beyond_max_per_prompt"] = n_before - len(pairs)
        else:
            group, usage = responses, response_pair_counts(pairs)
        # count_duplicates counts a response once per pair that uses it, so the groups need the pairs.
        usage = usage if cfg.deviation.count_duplicates else None
        if deviation is None or cfg.deviation.groups != "all" or usage is not None:  # else divpo's is the same
            deviation = _deviation(group, cfg, pair_counts=usage)
        pairs = attach_weights(pairs, deviation)
    train_pairs, val_pairs = split_by_prompt(pairs, d.val_fraction, d.seed)

    tok_kw = dict(
        max_prompt_length=d.max_prompt_length,
        max_length=d.max_length,
        nll_on_prompt=cfg.loss.nll_on_prompt,
        max_response_tokens=d.max_response_tokens,
        truncation=d.truncation,
        cache_dir=d.cache_dir,
        num_workers=d.num_workers,
    )
    train_tok, dropped_t = tokenize_pairs(train_pairs, tokenizer, **tok_kw)
    val_tok, dropped_v = tokenize_pairs(val_pairs, tokenizer, **tok_kw)
    for k, v in list(dropped_t.items()) + list(dropped_v.items()):
        counts[f"pair_{k}"] = counts.get(f"pair_{k}", 0) + v
    if not train_tok:
        raise DataError(
            f"{d.source}: no training pair survived (load report: {loaded.report.counts}, drops: {counts}); "
            f"check the source, data.pairs, data.max_length and data.val_fraction"
        )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pack_kw = dict(pad_id=pad_id, nll_on_prompt=cfg.loss.nll_on_prompt)
    train_rows = pack_pairs(train_tok, d.max_tokens_per_row, **pack_kw)
    val_rows = pack_pairs(val_tok, d.max_tokens_per_row, **pack_kw) if val_tok else []
    tok_fp = tokenization_fingerprint(
        tokenizer,
        max_prompt_length=d.max_prompt_length,
        max_length=d.max_length,
        max_response_tokens=d.max_response_tokens,
        nll_on_prompt=cfg.loss.nll_on_prompt,
        truncation=d.truncation,
    )
    cap_frac = packing_padding_fraction(train_rows, d.max_tokens_per_row)
    pad_frac = sampled_padding_fraction(train_rows, d)
    report = {
        "load": loaded.report.to_dict(),
        "kind": loaded.kind,
        "pair_mode": d.pairs if loaded.kind == "responses" else "given",
        "responses": len(responses),
        "pairs": {"train": len(train_pairs), "val": len(val_pairs)},
        "tokenized_pairs": {"train": len(train_tok), "val": len(val_tok)},
        "dropped": dict(sorted(counts.items())),
        **rows_report(train_rows, val_rows, d),
        "rows_per_batch": d.rows_per_batch,
        "padding_fraction_packed": pad_frac,
        "padding_fraction_packed_to_capacity": cap_frac,
        "padding_fraction_padded_pairs": padded_pairs_padding_fraction(train_tok, 8),
        "weights_attached": bool(needs_weights),
        "fingerprint": train_fingerprint(train_pairs, tok_fp),
        "tokenization_fingerprint": tok_fp,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    summary = (
        f"data: {len(train_pairs)} train / {len(val_pairs)} val pairs -> {len(train_rows)} rows of <= "
        f"{d.max_tokens_per_row} tokens, padding {100 * pad_frac:.2f}% in micro-batches of {d.rows_per_batch} "
        f"row(s), {100 * cap_frac:.2f}% if padded to the row size (padded pair batches of 8: "
        f"{100 * report['padding_fraction_padded_pairs']:.1f}%); dropped {report['dropped'] or 'nothing'}"
    )
    finish_report(report, out_dir, summary, verbose=verbose)
    return PreparedData(
        train_pairs=train_pairs,
        val_pairs=val_pairs,
        train_tokenized=train_tok,
        val_tokenized=val_tok,
        train_rows=train_rows,
        val_rows=val_rows,
        load_report=loaded.report,
        counts=counts,
        padding_fraction=pad_frac,
        padding_fraction_to_capacity=cap_frac,
        fingerprint=report["fingerprint"],
        tokenization_fingerprint=tok_fp,
        responses=responses,
        deviation=deviation,
        weights_attached=bool(needs_weights),
        report=report,
    )


def load_source(d, *, verbose: bool = True):
    """data.source (either schema) loaded with the data section's generator settings, strictness and cleaning."""
    loaded = load_any(
        d.source,
        strict=d.strict,
        synthetic_prompts=d.synthetic_prompts,
        synthetic_seed=d.synthetic_seed,
        synthetic_lengths=d.synthetic_lengths,
        cleaning=d.cleaning,
    )
    if verbose:
        print(loaded.report.summary(), flush=True)
    return loaded


def drop_long_responses(responses: list[Response], tokenizer, d, counts: dict[str, int]) -> list[Response]:
    """The responses data.length_filter keeps under data.max_response_tokens; the rest counted in `counts`."""
    kept, n_long = filter_long_responses(responses, tokenizer, d.max_response_tokens, count=d.length_filter)
    if n_long:
        counts["response_too_long"] = n_long
    return kept


def sampled_padding_fraction(rows, d) -> float:
    """The padding the trainer actually computes on: epoch-0 micro-batches of one rank, as sampled."""
    plan = RowSampler(
        [r.num_tokens for r in rows], num_replicas=1, rank=0, rows_per_batch=d.rows_per_batch, seed=d.seed
    )
    return microbatch_padding_fraction(rows, list(plan))


def rows_report(train_rows, val_rows, d) -> dict:
    """The packed rows' part of a data report: rows and real tokens per split, the row length."""
    return {
        "rows": {"train": len(train_rows), "val": len(val_rows)},
        "tokens": {"train": sum(r.num_tokens for r in train_rows), "val": sum(r.num_tokens for r in val_rows)},
        "max_tokens_per_row": d.max_tokens_per_row,
    }


def finish_report(report: dict, out_dir: str | Path | None, summary: str, *, verbose: bool) -> None:
    """Print the one-line summary of a preparation and write its data_report.json into `out_dir`."""
    if verbose:
        print(summary, flush=True)
    if out_dir is not None:
        write_data_report(out_dir, report)


def write_data_report(out_dir: str | Path, report: dict) -> None:
    """<out_dir>/data_report.json, written atomically."""
    atomic_write(Path(out_dir) / "data_report.json", json.dumps(report, indent=2))


def write_pairs_jsonl(path: str | Path, prepared: PreparedData) -> int:
    """pairs.jsonl: one pair a line (prompt, chosen, rejected, upvotes, ids, split; weights when computed)."""
    lines = []
    for split, pairs in (("train", prepared.train_pairs), ("val", prepared.val_pairs)):
        for p in pairs:
            row = p.to_dict()
            if not prepared.weights_attached:
                row.pop("chosen_weight")
                row.pop("rejected_weight")
            row["split"] = split
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write(path, "".join(lines))
    return len(lines)
