"""CLI: compute and store deviation weights for a dataset.

    python -m engine.deviation --data data.jsonl --out weights.parquet [--style-model ''] [...]

--data is any source engine.data.loading.load_responses reads (WritingPrompts-schema jsonl/parquet,
a datasets directory, "synthetic"), or a prepared pairs.jsonl (lines with prompt, chosen, rejected,
chosen_id, rejected_id, prompt_id, chosen_score, rejected_score), whose pair usage then feeds
--count-duplicates. Writes:
- <out>: one row per distinct response: response_id, prompt_id, score, weight, considered,
  score[<embedder id>] per model (parquet when <out> ends in .parquet, else jsonl);
- <out stem>.pairs.<ext> (pairs input only): pair_id, chosen_id, rejected_id, chosen/rejected
  score and weight;
- <out stem>.summary.json: weight histogram per prompt size, also printed.
Embeddings go through the same cache training uses (--cache-dir), so a later run reuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from engine.config import (
    DEVIATION_MODES,
    DISTANCE_METRICS,
    KNN_SCOPES,
    ConfigError,
    DeviationConfig,
)
from engine.data.loading import DataError, load_responses
from engine.data.records import Response, make_pair_id, make_prompt_id, make_response_id
from engine.fileio import atomic_write


def _is_pairs_file(path: Path) -> bool:
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                return isinstance(row, dict) and "chosen" in row and "rejected" in row
    return False


def load_pairs(path: Path):
    """Responses (each distinct response once), pair rows, and pair usage count per response id."""
    responses: dict[str, Response] = {}
    pairs, usage = [], Counter()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
                pid = row.get("prompt_id") or make_prompt_id(prompt)
                sides = {}
                for side in ("chosen", "rejected"):
                    text = row[side]
                    rid = row.get(f"{side}_id") or make_response_id(pid, text)
                    sides[side] = rid
                    usage[rid] += 1
                    if rid not in responses:
                        responses[rid] = Response(
                            prompt_id=pid,
                            response_id=rid,
                            prompt=prompt,
                            text=text,
                            score=float(row.get(f"{side}_score", 0.0) or 0.0),
                        )
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{lineno}: not a pair row ({type(exc).__name__}: {exc}); each line needs "
                    "prompt, chosen, rejected (ids and scores optional)"
                ) from exc
            pairs.append(
                {
                    "pair_id": row.get("pair_id") or make_pair_id(sides["chosen"], sides["rejected"]),
                    "prompt_id": pid,
                    "chosen_id": sides["chosen"],
                    "rejected_id": sides["rejected"],
                }
            )
    return list(responses.values()), pairs, dict(usage)


def _write_rows(rows: list[dict], path: Path) -> None:
    if path.suffix == ".parquet":
        import pandas as pd

        atomic_write(path, lambda f: pd.DataFrame(rows).to_parquet(f, index=False))
    else:
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    cfg = DeviationConfig()
    p = argparse.ArgumentParser(prog="python -m engine.deviation", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset source (see engine.data.loading) or a pairs.jsonl")
    p.add_argument("--out", required=True, help="output file: .parquet or .jsonl")
    p.add_argument("--semantic-model", default=cfg.semantic_model, help="'' drops it")
    p.add_argument("--style-model", default=cfg.style_model, help="'' drops it")
    p.add_argument("--metric", default=cfg.metric, choices=DISTANCE_METRICS)
    p.add_argument("--mode", default=cfg.mode, choices=DEVIATION_MODES)
    p.add_argument("--k", type=int, default=cfg.k)
    p.add_argument("--scope", default=cfg.scope, choices=KNN_SCOPES)
    p.add_argument(
        "--max-per-prompt",
        type=int,
        default=cfg.max_per_prompt,
        help="responses per prompt scored, the first ones in input order (deviation.groups all)",
    )
    p.add_argument("--count-duplicates", action="store_true", default=cfg.count_duplicates)
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=cfg.trust_remote_code,
        help="let sentence-transformers run the model's own code (jinaai/jina-embeddings-v3)",
    )
    p.add_argument("--batch-size", type=int, default=cfg.batch_size)
    p.add_argument("--device", default=cfg.device)
    p.add_argument("--cache-dir", default=cfg.cache_dir)
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    a = p.parse_args(argv)

    fields = dict(
        semantic_model=a.semantic_model,
        style_model=a.style_model,
        metric=a.metric,
        mode=a.mode,
        k=a.k,
        scope=a.scope,
        max_per_prompt=a.max_per_prompt,
        count_duplicates=a.count_duplicates,
        trust_remote_code=a.trust_remote_code,
        batch_size=a.batch_size,
        device=a.device,
        cache_dir=a.cache_dir,
    )
    try:
        cfg = dataclasses.replace(cfg, **fields)
    except ConfigError as exc:  # the config's own validation: say which flag to change
        p.error(str(exc))

    from .pipeline import compute_deviation, weight_summary

    t0 = time.perf_counter()
    data = Path(a.data)
    pairs, usage, report = None, None, {}
    if _is_pairs_file(data):
        responses, pairs, usage = load_pairs(data)
    else:
        try:
            responses, report = load_responses(a.data, strict=a.strict, strict_off="run without --strict")
        except DataError as exc:
            p.error(str(exc))
    if not responses:
        p.error(f"--data {a.data!r} gave no responses")

    result = compute_deviation(responses, cfg, cache_dir=a.cache_dir, pair_counts=usage, show_progress=True)
    out = Path(a.out)
    _write_rows(result.to_rows(), out)
    written = [str(out)]
    if pairs is not None:
        for row in pairs:
            row["chosen_score"] = result.score_of(row["chosen_id"])
            row["rejected_score"] = result.score_of(row["rejected_id"])
            row["chosen_weight"] = result.weight_of(row["chosen_id"])
            row["rejected_weight"] = result.weight_of(row["rejected_id"])
        ppath = out.with_name(f"{out.stem}.pairs{out.suffix}")
        _write_rows(pairs, ppath)
        written.append(str(ppath))
    summary = weight_summary(result)
    summary.update(
        seconds=round(time.perf_counter() - t0, 3),
        embedders=list(result.per_model),
        pairs=len(pairs) if pairs is not None else None,
        data_report=dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report,
    )
    spath = out.with_name(f"{out.stem}.summary.json")
    atomic_write(spath, json.dumps(summary, indent=2, default=str))
    written.append(str(spath))
    print(json.dumps(summary, indent=2, default=str))
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
