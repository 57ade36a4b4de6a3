"""engine.data.tokenize: chat template split, truncation policy, drops, on-disk cache, workers, fingerprints."""

import copy

import numpy as np
import pytest

import engine.data.tokenize as T
from engine.data.records import Pair, make_pair_id, make_prompt_id, make_response_id
from engine.model import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def mk(prompt, chosen, rejected, cw=1.0, rw=1.0):
    pid = make_prompt_id(prompt)
    cid, rid = make_response_id(pid, chosen), make_response_id(pid, rejected)
    return Pair(make_pair_id(cid, rid), pid, prompt, chosen, rejected, cid, rid, 2.0, 1.0, cw, rw)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chat(tok, prompt, response=None):
    msgs = [{"role": "user", "content": prompt}] + (
        [{"role": "assistant", "content": response}] if response is not None else []
    )
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=response is None)


def test_template_split_is_exact(tok):
    pairs = [
        mk("Write about the sea.", "The ship sailed on.", "Water."),
        mk("A ghost story\nBonus points", "Boo.", "The house was cold."),
    ]
    out, dropped = T.tokenize_pairs(pairs, tok, max_prompt_length=64, max_length=256)
    assert dropped == {} and [t.pair_id for t in out] == [p.pair_id for p in pairs]
    for p, t in zip(pairs, out):
        assert t.chosen_input_ids.tolist() == enc(tok, chat(tok, p.prompt, p.chosen))
        assert t.rejected_input_ids.tolist() == enc(tok, chat(tok, p.prompt, p.rejected))
        assert t.chosen_input_ids[: t.chosen_prompt_len].tolist() == enc(tok, chat(tok, p.prompt))
        assert t.chosen_prompt_len == t.rejected_prompt_len
        assert tok.decode(t.chosen_input_ids[t.chosen_prompt_len :]) == p.chosen + "<|end|>\n"
        assert (t.chosen_weight, t.rejected_weight, t.prompt_id) == (p.chosen_weight, p.rejected_weight, p.prompt_id)


def test_truncation_keeps_prompt_start_and_response_start(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    long_resp = " ".join(f"token{i}" for i in range(400))
    p = mk(long_prompt, long_resp, "short")
    (t,), _ = T.tokenize_pairs([p], tok, max_prompt_length=32, max_length=96)
    full_prompt = enc(tok, chat(tok, long_prompt))
    tail = T.ChatEncoder(tok, max_prompt_length=32, max_length=96).prompt_tail_ids
    ids = t.chosen_input_ids.tolist()
    assert t.chosen_prompt_len == 32 and len(ids) == 96
    assert ids[: 32 - len(tail)] == full_prompt[: 32 - len(tail)]  # start of the prompt kept
    assert ids[32 - len(tail) : 32] == tail  # the assistant header is always there
    full_resp = enc(tok, chat(tok, long_prompt, long_resp))[len(full_prompt) :]
    assert ids[32:] == full_resp[:64]  # end of the response cut
    assert t.rejected_input_ids.tolist()[32:] == enc(tok, "short<|end|>\n")


def test_drops_are_counted(tok):
    ok = mk("p", "fine", "also fine")
    too_long = mk("p", " ".join(["word"] * 300), "x")
    out, counts = T.tokenize_pairs([ok, too_long], tok, max_prompt_length=16, max_length=64, max_response_tokens=100)
    assert [t.pair_id for t in out] == [ok.pair_id] and counts == {"response_too_long": 1}
    # A template that adds nothing after the response: an empty response has no tokens and is dropped.
    bare = copy.deepcopy(tok)
    bare.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|assistant|>"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    empty = mk("p", "", "something")
    out, counts = T.tokenize_pairs([empty, ok], bare, max_prompt_length=16, max_length=64)
    assert [t.pair_id for t in out] == [ok.pair_id] and counts == {"empty_response_after_truncation": 1}


def test_boundary_merging_tokenizer_falls_back_to_separate_parts(tok):
    # No special token between prompt and response: BPE merges across the boundary, so the prompt's
    # tokens are not a prefix of the conversation's; the prompt part must still be what generation sees.
    glued = copy.deepcopy(tok)
    glued.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    p = mk("The captain watched the sta", "rs over the station.", "tion of the ship.")
    assert enc(glued, p.prompt) != enc(glued, p.prompt + p.chosen)[: len(enc(glued, p.prompt))]
    (t,), _ = T.tokenize_pairs([p], glued, max_prompt_length=64, max_length=128)
    assert t.chosen_input_ids[: t.chosen_prompt_len].tolist() == enc(glued, p.prompt)
    assert glued.decode(t.chosen_input_ids) == p.prompt + p.chosen
    assert glued.decode(t.rejected_input_ids) == p.prompt + p.rejected


def test_cache_hit_and_keying(tok, tmp_path, monkeypatch):
    pairs = [mk(f"prompt {i}", f"chosen story {i}", f"rejected {i}", cw=1.5) for i in range(5)]
    kw = dict(max_prompt_length=32, max_length=64, cache_dir=tmp_path)
    first, _ = T.tokenize_pairs(pairs, tok, **kw)
    assert len(list(tmp_path.glob("tokenized-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenised again despite a valid cache")

    monkeypatch.setattr(T, "_encode_chunk", boom)
    # Weights are not cached: new weights on the same pairs still load from the cache.
    reweighted = [mk(f"prompt {i}", f"chosen story {i}", f"rejected {i}", cw=0.5) for i in range(5)]
    again, _ = T.tokenize_pairs(reweighted, tok, **kw)
    assert all(np.array_equal(a.chosen_input_ids, b.chosen_input_ids) for a, b in zip(first, again))
    assert [t.chosen_weight for t in again] == [0.5] * 5
    monkeypatch.undo()
    T.tokenize_pairs(pairs, tok, **{**kw, "max_length": 80})  # other lengths: another cache file
    T.tokenize_pairs(pairs[:3], tok, **kw)  # other data: another cache file
    assert len(list(tmp_path.glob("tokenized-*.npz"))) == 3


def test_workers_match_serial(tok):
    pairs = [mk(f"prompt number {i}", f"a story of {i} words", f"meh {i}") for i in range(40)]
    serial, _ = T.tokenize_pairs(pairs, tok, max_prompt_length=32, max_length=64, num_workers=1, chunk_size=8)
    para, _ = T.tokenize_pairs(pairs, tok, max_prompt_length=32, max_length=64, num_workers=2, chunk_size=8)
    assert [t.chosen_input_ids.tolist() for t in serial] == [t.chosen_input_ids.tolist() for t in para]
    assert [t.rejected_prompt_len for t in serial] == [t.rejected_prompt_len for t in para]


def test_fingerprints(tok):
    fp = T.tokenizer_fingerprint(tok)
    assert fp == T.tokenizer_fingerprint(load_tokenizer())
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template.replace("<|user|>", "<|user|> ")
    assert T.tokenizer_fingerprint(other) != fp
    base = dict(max_prompt_length=64, max_length=256, max_response_tokens=2048)
    f0 = T.tokenization_fingerprint(tok, **base)
    assert f0 == T.tokenization_fingerprint(tok, **base)
    for change in (
        {"max_prompt_length": 65},
        {"max_length": 257},
        {"max_response_tokens": None},
        {"nll_on_prompt": True},
    ):
        assert T.tokenization_fingerprint(tok, **{**base, **change}) != f0, change
    assert T.tokenization_fingerprint(other, **base) != f0


def test_filter_long_responses(tok):
    from engine.data.loading import load_responses

    responses, _ = load_responses("synthetic", synthetic_prompts=4)
    lengths = [len(enc(tok, r.text)) + 2 for r in responses]  # + "<|end|>\n"
    limit = sorted(lengths)[len(lengths) // 2]
    kept, dropped = T.filter_long_responses(responses, tok, limit)
    assert [r.response_id for r in kept] == [r.response_id for r, n in zip(responses, lengths) if n <= limit]
    assert dropped == sum(n > limit for n in lengths) > 0
