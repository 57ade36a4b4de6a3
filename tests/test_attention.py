"""sdpa_varlen (engine.attention): per-sequence attention over packed rows equals separate sequences.

Packed = unpacked for the hidden states, the preference loss and every gradient, on llama-tiny (GQA,
RoPE) and a small GPT-2 (learned positions), with awkward lengths (single-token sequences, a padded
row tail, several rows); the stock masked SDPA agrees; generation with left padding and a KV cache is
unchanged; and the model preparation (fused GELU, dropout off) keeps the function.
"""

import numpy as np
import pytest
import torch

from engine import attention
from engine.config import LossConfig
from engine.data import collate, pack_pairs
from engine.data.tokenize import TokenizedPair
from engine.model import build_model, prepare_for_preference_training, resolve_attn_implementation
from engine.train import PolicyWithLoss


def _gpt2(attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg)


def _model(name: str, attn: str):
    model = build_model("llama-tiny", attn_implementation=attn) if name == "llama-tiny" else _gpt2(attn)
    prepare_for_preference_training(model)
    return model.train()


def _pairs(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        plen = int(rng.integers(1, 6))
        c = rng.integers(1, vocab, plen + int(rng.integers(1, 30))).astype(np.int32)
        r = rng.integers(1, vocab, plen + (1 if i == 0 else int(rng.integers(1, 30)))).astype(np.int32)
        r[:plen] = c[:plen]
        out.append(TokenizedPair(f"p{i}", c, plen, r, plen, chosen_weight=1.0 + i / 10, rejected_weight=1.0))
    return out


def _loss_and_grads(model, batch, objective):
    model.zero_grad(set_to_none=True)
    module = PolicyWithLoss(model, LossConfig(objective=objective, backend="torch"))
    if objective in ("dpo", "ddpo"):  # reference values by pair id: the two layouts order pairs differently
        k = torch.tensor([int(pid[1:]) for pid in batch.pair_ids], dtype=torch.float32)
        batch.ref_chosen_logps, batch.ref_rejected_logps = -40.0 + 3.0 * k, -35.0 + 2.0 * k
    out = module(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2"])
@pytest.mark.parametrize("objective", ["ddpo", "orpo"])
def test_packed_equals_unpacked_loss_and_every_gradient(name, objective):
    model = _model(name, attention.NAME)
    pairs = _pairs(5, 299)
    # Packed: all pairs in rows of up to 90 tokens (several rows, one padded tail). Unpacked: one pair per row.
    packed = collate(pack_pairs(pairs, 90, pad_id=0))
    assert packed.input_ids.shape[0] > 1 and packed.num_pad_tokens > 0
    unpacked = collate([pack_pairs([p], p.num_tokens, pad_id=0)[0] for p in pairs])
    loss_p, grads_p = _loss_and_grads(model, packed, objective)
    # Pairs come out of the packer in another order; the loss is a mean over pairs, so order does not matter.
    loss_u, grads_u = _loss_and_grads(model, unpacked, objective)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) == sum(1 for _ in model.parameters())
    for n in grads_p:
        torch.testing.assert_close(grads_p[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2"])
def test_varlen_matches_masked_sdpa(name):
    pairs = _pairs(4, 299, seed=3)
    batch = collate(pack_pairs(pairs, 70, pad_id=0))
    outs = []
    for attn in ("sdpa", attention.NAME):
        model = _model(name, attn)
        trunk = model.get_decoder() if name == "llama-tiny" else model.transformer
        hidden = trunk(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        ).last_hidden_state
        hidden.pow(2).mean().backward()
        outs.append((hidden.detach(), [p.grad for p in model.parameters()]))
    real = batch.segment_ids >= 0  # padding tails may differ: sdpa's mask and varlen's span treat them alike anyway
    torch.testing.assert_close(outs[0][0][real], outs[1][0][real], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_segment_lengths_from_cu_seqlens_and_positions_agree():
    batch = collate(pack_pairs(_pairs(6, 50, seed=1), 64, pad_id=0))
    R, L = batch.input_ids.shape
    from_cu = attention.segment_lengths(R, L, cu_seqlens=batch.cu_seqlens)
    from_pos = attention.segment_lengths(R, L, position_ids=batch.position_ids.clone())
    assert from_cu == from_pos and all(sum(r) == L for r in from_cu)
    assert attention.segment_lengths(2, 5) == [[5], [5]]
    with pytest.raises(ValueError, match="row end"):
        attention.segment_lengths(2, 4, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))


def test_cu_seqlens_kwargs_are_used():
    """FlashAttention-style callers pass cu_seq_lens_q; the per-sequence split follows them."""
    model = _model("llama-tiny", attention.NAME).eval()
    batch = collate(pack_pairs(_pairs(3, 299, seed=2), 80, pad_id=0))
    trunk = model.get_decoder()
    with torch.inference_mode():  # inference tensors carry no version counter: the lengths cache copes
        a = trunk(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        varlen = dict(
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
        )
        b = trunk(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **varlen)
        b = b.last_hidden_state
    torch.testing.assert_close(a, b)


def test_generation_with_padding_and_cache_is_unchanged():
    from engine.model import load_tokenizer

    tok = load_tokenizer()
    tok.padding_side = "left"
    enc = tok(["a short prompt", "a much longer prompt with more words in it"], return_tensors="pt", padding=True)
    outs = []
    for attn in ("sdpa", attention.NAME):
        model = build_model("llama-tiny", attn_implementation=attn, seed=1).eval()
        with torch.no_grad():
            outs.append(model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id))
    assert torch.equal(outs[0], outs[1])


def test_resolve_and_model_preparation():
    assert resolve_attn_implementation("auto", "cpu") == attention.NAME
    assert resolve_attn_implementation("auto", "cpu", "gpt2") == attention.NAME
    assert resolve_attn_implementation("auto", "cpu", "gemma3") == "sdpa"
    with pytest.raises(ValueError, match="supports model types"):
        resolve_attn_implementation(attention.NAME, "cpu", "gemma3")
    from transformers.activations import GELUTanh, NewGELUActivation

    stock = _gpt2("sdpa").eval()
    prepared = _gpt2("sdpa").eval()
    prepare_for_preference_training(prepared)
    assert any(isinstance(m, NewGELUActivation) for m in stock.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in prepared.modules())
    assert any(isinstance(m, GELUTanh) for m in prepared.modules())
    assert all(m.p == 0.0 for m in prepared.modules() if isinstance(m, torch.nn.Dropout))
    assert prepared.config.attn_pdrop == 0.1  # the config (and so an export) keeps its own setting
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, prepared(ids).logits, rtol=1e-5, atol=1e-5)
