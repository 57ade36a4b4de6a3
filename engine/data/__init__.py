"""engine.data: raw rows -> cleaned responses -> preference pairs -> token ids -> packed rows -> PackedBatch.

Modules, in flow order: `loading` (sources, validation, cleaning, bad-row report), `pairs` (pair modes,
split, deviation weights), `tokenize` (chat template, truncation, cache, fingerprints), `packing`
(first-fit-decreasing rows, `PackedBatch`), `sampler` (distributed token-balanced resumable sampling),
`prepare` (`prepare_data`, the single entry point used by training, the reference cache and the CLI).
`records` holds the records and ids; `synthetic` the bundled data generator.
"""

from engine.data.loading import DataError, LoadedData, LoadReport, load_any, load_pairs, load_responses
from engine.data.packing import (
    IGNORE_INDEX,
    PackedBatch,
    PackedRow,
    collate,
    first_fit_decreasing,
    pack_pairs,
    packing_padding_fraction,
    padded_pairs_padding_fraction,
    segment_sum,
    unpack,
)
from engine.data.pairs import PAIR_MODES, attach_weights, build_pairs, group_by_prompt, split_by_prompt
from engine.data.prepare import PreparedData, prepare_data, write_pairs_jsonl
from engine.data.records import Pair, Response, content_id, make_pair_id, make_prompt_id, make_response_id
from engine.data.sampler import RowSampler
from engine.data.tokenize import (
    TokenizedPair,
    filter_long_responses,
    tokenization_fingerprint,
    tokenize_pairs,
    tokenizer_fingerprint,
)

__all__ = [
    "DataError",
    "LoadReport",
    "LoadedData",
    "load_any",
    "load_pairs",
    "load_responses",
    "IGNORE_INDEX",
    "PackedBatch",
    "PackedRow",
    "collate",
    "first_fit_decreasing",
    "pack_pairs",
    "packing_padding_fraction",
    "padded_pairs_padding_fraction",
    "segment_sum",
    "unpack",
    "PAIR_MODES",
    "attach_weights",
    "build_pairs",
    "group_by_prompt",
    "split_by_prompt",
    "PreparedData",
    "prepare_data",
    "write_pairs_jsonl",
    "Pair",
    "Response",
    "content_id",
    "make_pair_id",
    "make_prompt_id",
    "make_response_id",
    "RowSampler",
    "TokenizedPair",
    "filter_long_responses",
    "tokenization_fingerprint",
    "tokenize_pairs",
    "tokenizer_fingerprint",
]
