"""Tokenisation of pairs with the tokenizer's chat template, cached on disk; fingerprints for every cache.

Third step of the data flow: `Pair` -> `TokenizedPair` (token ids of prompt+chosen and prompt+rejected,
and where each prompt ends). Packing (`packing.py`) turns these into rows.

Template: user = prompt, assistant = response. The prompt part is the template rendered with
`add_generation_prompt=True`; the response part is what the full conversation adds after it (the
response text and the template's end-of-turn tokens). When the prompt part's tokens are a prefix of
the full conversation's tokens (true for the bundled tokenizer and templates whose turns end in
special tokens) the split is exact; otherwise the response part is tokenised separately from the
text that follows the rendered prompt and concatenated, so the prompt tokens are identical for the
chosen and the rejected side and identical to what generation sees.

Truncation policy, `truncation="engine"` (documented in the config help too):
- prompt part longer than `max_prompt_length`: keep its START (bos, user header, beginning of the
  prompt) and re-append the template's closing tokens (end of the user turn + assistant header), so
  the model always sees the generation cue;
- prompt + response longer than `max_length`: cut the END of the response (a cut response loses its
  end-of-turn token).
`truncation="trl"`: TRL 0.12's `tokenize_row` as the authors' DORPO trainer runs it
(models/dorpo_trainer.py:514-532): when prompt + the pair's LONGER response exceeds `max_length`, both
sides' prompts keep their last `max_prompt_length` tokens; if a side is still too long, both
responses are cut to `max_length - max_prompt_length` tokens.
Both policies:
- a response whose templated length exceeds `max_response_tokens` is dropped (published: 2048);
- a pair where either side has zero response tokens is dropped (an empty response has log-prob 0,
  which leaves ORPO's odds undefined).
Drops are counted per reason.

Cache: one `.npz` per (pair ids, tokenization fingerprint) under `cache_dir`; weights are not
cached (they change with the deviation settings) and are attached on load.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.records import Pair, Response, content_id
from engine.fileio import load_npz_verified, save_npz_verified

# Bump when the tokenisation or truncation logic changes: invalidates every cached tokenisation and
# every reference-logprob cache keyed by `tokenization_fingerprint`.
TOKENIZATION_VERSION = "1"
_SENTINEL_PROMPT = "\u2063PROMPT\u2063"
_SENTINEL_RESPONSE = "\u2063RESPONSE\u2063"
_DROP_CODES = {0: None, 1: "response_too_long", 2: "empty_response_after_truncation"}
_DROP_IDS = {v: k for k, v in _DROP_CODES.items()}


@dataclass
class TokenizedPair:
    """Token ids of both sequences of a pair (prompt part + response part) and each prompt part's length."""

    pair_id: str
    chosen_input_ids: np.ndarray  # int32 [n_c]
    chosen_prompt_len: int
    rejected_input_ids: np.ndarray  # int32 [n_r]
    rejected_prompt_len: int
    chosen_weight: float = 1.0
    rejected_weight: float = 1.0
    prompt_id: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.chosen_input_ids) + len(self.rejected_input_ids)


# --------------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything a tokenizer contributes to token ids: backend JSON (vocab, merges, normaliser,
    pre-tokeniser, added tokens), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow (Python) tokenizers: the vocabulary is the best stable description
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return content_id("tokenizer", type(tokenizer).__name__, body, specials, template)


def tokenization_fingerprint(
    tokenizer,
    *,
    max_prompt_length: int,
    max_length: int,
    max_response_tokens: int | None = None,
    nll_on_prompt: bool = False,
    truncation: str = "engine",
) -> str:
    """Everything the token ids AND targets of a sequence depend on (tokenizer, template, lengths,
    truncation policy, where targets start, algorithm version); the reference-logprob cache keys on it."""
    parts = [
        tokenizer_fingerprint(tokenizer),
        str(int(max_prompt_length)),
        str(int(max_length)),
        str(max_response_tokens),
        str(bool(nll_on_prompt)),
    ]
    if truncation != "engine":  # appended only when it differs, so the default's caches stay valid
        parts.append(f"truncation={truncation}")
    return content_id("tokenization", TOKENIZATION_VERSION, *parts)


# ------------------------------------------------------------------------------------- encoder


def _chat(tokenizer, prompt: str, response: str | None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _response_close_ids(tokenizer) -> list[int]:
    """Tokens the template adds after a response (end of turn): part of the templated response length."""
    full = _chat(tokenizer, _SENTINEL_PROMPT, _SENTINEL_RESPONSE)
    if _SENTINEL_RESPONSE not in full:
        raise ValueError(
            "the chat template does not pass message contents through unchanged; cannot locate the response"
        )
    return list(tokenizer([full.split(_SENTINEL_RESPONSE, 1)[1]], add_special_tokens=False)["input_ids"][0])


class ChatEncoder:
    """Turns (prompt, response) into (prompt ids, response ids) with the truncation policy above."""

    def __init__(
        self,
        tokenizer,
        *,
        max_prompt_length: int,
        max_length: int,
        max_response_tokens: int | None = None,
        truncation: str = "engine",
    ):
        if truncation not in ("engine", "trl"):
            raise ValueError(f"truncation must be 'engine' or 'trl', got {truncation!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; engine.model.load_tokenizer sets a default one")
        if max_length <= max_prompt_length:
            raise ValueError(f"max_length ({max_length}) must exceed max_prompt_length ({max_prompt_length})")
        self.tok = tokenizer
        self.max_prompt_length, self.max_length = max_prompt_length, max_length
        self.max_response_tokens = max_response_tokens
        self.truncation = truncation
        gen = _chat(tokenizer, _SENTINEL_PROMPT, None)
        full = _chat(tokenizer, _SENTINEL_PROMPT, _SENTINEL_RESPONSE)
        if _SENTINEL_PROMPT not in gen or _SENTINEL_RESPONSE not in full:
            raise ValueError(
                "the chat template does not pass message contents through unchanged; cannot locate prompt/response"
            )
        # Tokens after the user content in the generation prompt: re-appended after a truncated prompt.
        self.prompt_tail_ids = self._encode([gen.split(_SENTINEL_PROMPT, 1)[1]])[0]
        self.response_close_ids = _response_close_ids(tokenizer)
        if truncation == "engine" and len(self.prompt_tail_ids) >= max_prompt_length:
            raise ValueError(
                f"max_prompt_length {max_prompt_length} leaves no room for the prompt: the template's assistant header "
                f"alone is {len(self.prompt_tail_ids)} tokens"
            )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return list(self.tok(texts, add_special_tokens=False)["input_ids"])

    def split_ids(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """(prompt part ids, full response part ids) per (prompt, response), untruncated."""
        # Both sides of a pair share their prompt: render and encode each distinct prompt once.
        uniq = list(dict.fromkeys(prompts))
        u_text = [_chat(self.tok, p, None) for p in uniq]
        u_ids = dict(zip(uniq, self._encode(u_text)))
        u_text = dict(zip(uniq, u_text))
        p_texts = [u_text[p] for p in prompts]
        p_ids = [u_ids[p] for p in prompts]
        f_texts = [_chat(self.tok, p, r) for p, r in zip(prompts, responses)]
        f_ids = self._encode(f_texts)
        out, redo = [], []
        for i, (pi, fi) in enumerate(zip(p_ids, f_ids)):
            if fi[: len(pi)] == pi:
                out.append((pi, fi[len(pi) :]))
            else:
                out.append((pi, None))
                redo.append(i)
        if redo:
            # The tokenizer merges across the prompt/response boundary: tokenise the response part on
            # its own so the prompt tokens stay exactly those generation will see.
            tails = []
            for i in redo:
                p, f = p_texts[i], f_texts[i]
                tails.append(
                    f[len(p) :] if f.startswith(p) else responses[i] + self.tok.decode(self.response_close_ids)
                )
            for i, ids in zip(redo, self._encode(tails)):
                out[i] = (out[i][0], ids)
        return out

    def truncate(self, prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
        """One sequence under the engine policy."""
        if len(prompt_ids) > self.max_prompt_length:
            keep = self.max_prompt_length - len(self.prompt_tail_ids)
            prompt_ids = prompt_ids[:keep] + list(self.prompt_tail_ids)
        budget = self.max_length - len(prompt_ids)
        return prompt_ids, response_ids[:budget]

    def truncate_pair(self, sides: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """Both sequences of a pair, [(prompt ids, response ids)] * 2, under the configured policy."""
        if self.truncation == "engine":
            return [self.truncate(p, r) for p, r in sides]
        longer = max(len(r) for _, r in sides)
        out = []
        for p, r in sides:
            if len(p) + longer > self.max_length:
                p = p[-self.max_prompt_length :]
            if len(p) + longer > self.max_length:
                r = r[: self.max_length - self.max_prompt_length]
            out.append((p, r))
        return out


# ------------------------------------------------------------------------------------ workers

_WORKER_ENCODER: ChatEncoder | None = None


def _init_worker(tokenizer, kwargs):
    global _WORKER_ENCODER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_ENCODER = ChatEncoder(tokenizer, **kwargs)


def _encode_chunk(enc: ChatEncoder, chunk: list[tuple[str, str, str]]):
    """Per pair: (drop code, chosen ids, chosen prompt len, rejected ids, rejected prompt len)."""
    prompts = [p for p, _, _ in chunk]
    sides = enc.split_ids(prompts + prompts, [c for _, c, _ in chunk] + [r for _, _, r in chunk])
    n = len(chunk)
    out = []
    for i in range(n):
        drop = 0
        seqs = []
        pair = [sides[i], sides[n + i]]
        if enc.max_response_tokens is not None and any(len(r_ids) > enc.max_response_tokens for _, r_ids in pair):
            drop = _DROP_IDS["response_too_long"]
        for p_ids, r_ids in enc.truncate_pair(pair):
            if not r_ids and not drop:
                drop = _DROP_IDS["empty_response_after_truncation"]
            seqs.append((np.asarray(p_ids + r_ids, dtype=np.int32), len(p_ids)))
        out.append((drop, seqs[0][0], seqs[0][1], seqs[1][0], seqs[1][1]))
    return out


def _worker_chunk(chunk):
    return _encode_chunk(_WORKER_ENCODER, chunk)


# --------------------------------------------------------------------------------------- cache


def _save_cache(path: Path, pair_ids: list[str], results) -> None:
    empty = np.zeros(0, dtype=np.int32)
    arrays = dict(
        pair_ids=np.array(pair_ids, dtype="U"),
        drop=np.array([r[0] for r in results], dtype=np.int8),
        c_ids=np.concatenate([r[1] for r in results]) if results else empty,
        c_len=np.array([len(r[1]) for r in results], dtype=np.int64),
        c_plen=np.array([r[2] for r in results], dtype=np.int64),
        r_ids=np.concatenate([r[3] for r in results]) if results else empty,
        r_len=np.array([len(r[3]) for r in results], dtype=np.int64),
        r_plen=np.array([r[4] for r in results], dtype=np.int64),
    )
    # The digest travels inside the file, so a flipped token id is caught on load (then recomputed).
    save_npz_verified(path, arrays)


def _load_cache(path: Path, pair_ids: list[str]):
    z = load_npz_verified(path)
    if z is None or list(z["pair_ids"]) != pair_ids:
        return None  # corrupted, a hash collision or a foreign file: recompute rather than trust it
    c_off = np.concatenate([[0], np.cumsum(z["c_len"])])
    r_off = np.concatenate([[0], np.cumsum(z["r_len"])])
    c_ids, r_ids = z["c_ids"], z["r_ids"]
    return [
        (
            int(z["drop"][i]),
            c_ids[c_off[i] : c_off[i + 1]],
            int(z["c_plen"][i]),
            r_ids[r_off[i] : r_off[i + 1]],
            int(z["r_plen"][i]),
        )
        for i in range(len(pair_ids))
    ]


# ----------------------------------------------------------------------------------------- API


def tokenize_pairs(
    pairs: Sequence[Pair],
    tokenizer,
    *,
    max_prompt_length: int,
    max_length: int,
    nll_on_prompt: bool = False,
    max_response_tokens: int | None = None,
    truncation: str = "engine",
    cache_dir: str | Path | None = None,
    num_workers: int = 1,
    chunk_size: int = 256,
) -> tuple[list[TokenizedPair], dict[str, int]]:
    """(tokenized pairs in input order, dropped pairs counted per reason); see the module docstring for the
    policy.

    `nll_on_prompt` does not change token ids (targets are made at packing); it enters the
    fingerprint only, so caches keyed on it are separate for the two target conventions.
    """
    kwargs = dict(
        max_prompt_length=max_prompt_length,
        max_length=max_length,
        max_response_tokens=max_response_tokens,
        truncation=truncation,
    )
    pair_ids = [p.pair_id for p in pairs]
    cache_path = None
    if cache_dir is not None:
        fp = tokenization_fingerprint(
            tokenizer,
            max_prompt_length=max_prompt_length,
            max_length=max_length,
            max_response_tokens=max_response_tokens,
            nll_on_prompt=nll_on_prompt,
            truncation=truncation,
        )
        cache_path = Path(cache_dir) / f"tokenized-{content_id('tokcache', fp, *pair_ids)}.npz"
    results = _load_cache(cache_path, pair_ids) if cache_path is not None and cache_path.exists() else None
    if results is None:
        items = [(p.prompt, p.chosen, p.rejected) for p in pairs]
        chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
        if num_workers > 1 and len(chunks) > 1:
            pool = ProcessPoolExecutor(max_workers=num_workers, initializer=_init_worker, initargs=(tokenizer, kwargs))
            with pool as ex:
                parts = list(ex.map(_worker_chunk, chunks))
        else:
            enc = ChatEncoder(tokenizer, **kwargs)
            parts = [_encode_chunk(enc, c) for c in chunks]
        results = [r for part in parts for r in part]
        if cache_path is not None:
            _save_cache(cache_path, pair_ids, results)
    out: list[TokenizedPair] = []
    dropped: Counter = Counter()
    for p, (drop, c_ids, c_plen, r_ids, r_plen) in zip(pairs, results):
        if drop:
            dropped[_DROP_CODES[drop]] += 1
            continue
        out.append(
            TokenizedPair(
                pair_id=p.pair_id,
                chosen_input_ids=c_ids,
                chosen_prompt_len=c_plen,
                rejected_input_ids=r_ids,
                rejected_prompt_len=r_plen,
                chosen_weight=p.chosen_weight,
                rejected_weight=p.rejected_weight,
                prompt_id=p.prompt_id,
            )
        )
    return out, dict(dropped)


def filter_long_responses(
    responses: Sequence[Response],
    tokenizer,
    max_response_tokens: int,
    *,
    count: str = "response",
    batch_size: int = 1024,
) -> tuple[list[Response], int]:
    """(responses of at most max_response_tokens tokens, number dropped), applied before pairing so long
    responses never take part in any pair. What is counted (`data.length_filter`):
    - "prompt_and_response": the whole chat-templated conversation (user = prompt, assistant = response)
      encoded by the tokenizer with its default special tokens, as the authors' filter does
      (scripts_dataset_cleaner/1_data_prep_filtering.py:26-49; a tokenizer whose post-processor adds a
      BOS in front of the template's own counts it twice there and here);
    - "response": the response text plus the template's end-of-turn tokens.
    """
    if count not in ("prompt_and_response", "response"):
        raise ValueError(f"count must be 'prompt_and_response' or 'response', got {count!r}")
    n_close = len(_response_close_ids(tokenizer))
    kept: list[Response] = []
    for i in range(0, len(responses), batch_size):
        batch = responses[i : i + batch_size]
        if count == "response":
            ids = tokenizer([r.text for r in batch], add_special_tokens=False)["input_ids"]
            lengths = [len(x) + n_close for x in ids]
        else:
            lengths = [len(x) for x in tokenizer([_chat(tokenizer, r.prompt, r.text) for r in batch])["input_ids"]]
        kept.extend(r for r, n in zip(batch, lengths) if n <= max_response_tokens)
    return kept, len(responses) - len(kept)
