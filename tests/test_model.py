"""Model builder: named architectures build deterministically; llama-8b on meta has Llama-3.1-8B's size."""

import pytest
import torch

from engine.config import ModelConfig
from engine.model import build_model, count_parameters, load_model, load_pretrained, load_tokenizer, trunk_and_head


def test_llama_tiny_is_deterministic_and_runs():
    a, b = build_model("llama-tiny", seed=3), build_model("llama-tiny", seed=3)
    c = build_model("llama-tiny", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    ids = torch.tensor([[1, 3, 40, 41, 2]])
    logits = a(input_ids=ids).logits
    assert logits.shape == (1, 5, a.config.vocab_size) and torch.isfinite(logits).all()
    assert a.config.vocab_size >= len(load_tokenizer())


def test_llama_8b_on_meta_has_the_real_shape():
    m = build_model("llama-8b", device="meta")
    n = count_parameters(m)
    assert 8.00e9 < n < 8.05e9, n  # Llama-3.1-8B: 8,030,261,248
    assert next(m.parameters()).device.type == "meta"
    assert m.config.vocab_size == 128256 and m.config.hidden_size == 4096 and m.config.num_key_value_heads == 8


def test_llama_8b_4layers_keeps_every_shape_but_the_depth():
    full, short = build_model("llama-8b", device="meta"), build_model("llama-8b-4layers", device="meta")
    assert short.config.num_hidden_layers == 4
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(short.config, k) == getattr(full.config, k), k
    per_layer = count_parameters(full.model.layers[0])
    assert count_parameters(full) - count_parameters(short) == 28 * per_layer


def test_gpt2_small_shape():
    m = build_model("gpt2-small", device="meta")
    assert 124e6 < count_parameters(m) < 125e6  # GPT-2 small: 124,439,808


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown named architecture 'llama-huge'"):
        build_model("llama-huge")


def test_trunk_and_head_match_the_full_forward():
    m = build_model("llama-tiny").eval()
    trunk, head = trunk_and_head(m)
    ids = torch.tensor([[1, 3, 50, 60, 70, 2]])
    hidden = trunk(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden @ head.weight.T, m(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_wraps_and_keeps_head_reachable():
    m = load_model(ModelConfig(lora_r=4, lora_alpha=8))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trunk, head = trunk_and_head(m)
    assert head.weight.shape[1] == 128


def test_lora_bad_targets_message():
    with pytest.raises(ValueError, match="match no module"):
        load_model(ModelConfig(lora_r=4, lora_target_modules=["c_attn"]))


def test_load_pretrained_from_saved_dir(tmp_path):
    m = build_model("llama-tiny")
    m.save_pretrained(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    m2, tok = load_pretrained(str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(m.parameters(), m2.parameters()))
    assert tok.chat_template is not None and len(tok) == len(load_tokenizer())
