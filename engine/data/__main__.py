"""`python -m engine.data prepare --data <path> --pairs <mode> --out <dir>`: the data half of a run, alone.

Runs `prepare_data` (the same code training runs) and writes to <dir>:
- pairs.jsonl: one pair a line (prompt, chosen, rejected, upvotes, ids, split; weights when computed);
- report.json: bad input rows and dropped responses/pairs, counted per reason;
- data_report.json: the full data report (sizes, rows, padding, fingerprints).
Any `--section.field value` config override and `--config FILE` work as for training, e.g.
`--data.strict true`, `--data.max_length 1024`, `--loss.objective dpo` (no weights needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = (
    "python -m engine.data prepare --data PATH --pairs MODE --out DIR [--no-weights] [--config FILE] "
    "[--section.field VALUE ...]"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0 if argv else 2
    if argv[0] != "prepare":
        print(f"unknown command {argv[0]!r}; usage: {USAGE}", file=sys.stderr)
        return 2
    from engine.config import ConfigError, load_config
    from engine.data.pairs import PAIR_MODES

    parser = argparse.ArgumentParser(prog="python -m engine.data prepare", add_help=False)
    parser.add_argument("--data", help="data source (sets data.source)")
    parser.add_argument("--pairs", choices=PAIR_MODES, help="pair mode (sets data.pairs)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--no-weights", action="store_true", help="skip deviation weights even if the objective uses them"
    )
    args, rest = parser.parse_known_args(argv[1:])
    overrides = list(rest)
    if args.data is not None:
        overrides += ["--data.source", args.data]
    if args.pairs is not None:
        overrides += ["--data.pairs", args.pairs]
    try:
        cfg = load_config(overrides, prog="python -m engine.data prepare")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from engine.data.loading import DataError
    from engine.data.prepare import prepare_data, write_pairs_jsonl
    from engine.fileio import atomic_write
    from engine.model import load_tokenizer

    out = Path(args.out)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name, revision=cfg.model.revision)
    try:
        prepared = prepare_data(cfg, tokenizer, compute_weights=not args.no_weights, out_dir=out)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    n = write_pairs_jsonl(out / "pairs.jsonl", prepared)
    report = {**prepared.load_report.to_dict(), "dropped_after_loading": prepared.counts}
    atomic_write(out / "report.json", json.dumps(report, indent=2))
    print(f"wrote {n} pairs to {out / 'pairs.jsonl'}, reports to {out / 'report.json'} and {out / 'data_report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
