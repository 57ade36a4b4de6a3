"""engine.flops: the one FLOPs/MFU definition of the trainer and the benchmarks."""

import pytest

from engine import flops


def test_flops_per_token_arithmetic():
    # 8e9 parameters of which 0.5e9 untied embedding, 32 layers x 4096, 1024-token context
    f = flops.flops_per_token(8_000_000_000, 32, 4096, 1024, n_embedding=500_000_000)
    assert f == pytest.approx(6 * 7.5e9 + 12 * 32 * 4096 * 1024)
    lora = flops.flops_per_token(1000, 1, 10, 0, n_trainable=100)
    assert lora == pytest.approx(4 * 900 + 6 * 100)
    # Trainable embedding weights (full fine-tuning) never count as matmul weights.
    assert flops.flops_per_token(1000, 1, 10, 0, n_trainable=1000, n_embedding=200) == pytest.approx(6 * 800)
    assert flops.lm_head_flops(32768, 128256, 4096) == pytest.approx(6 * 32768 * 128256 * 4096)


def test_gpu_peak_and_mfu():
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.gpu_peak_flops("NVIDIA H200") == 989e12
    assert flops.mfu(1e9, 989.0, "NVIDIA H200") == pytest.approx(1e-3)
    assert flops.mfu(1e9, 2 * 989.0, "NVIDIA H200", n_devices=2) == pytest.approx(1e-3)
    assert flops.mfu(1e9, 1e3, None) is None and flops.mfu(1e9, 1e3, "Some Unknown GPU") is None
    assert flops.device_name("cpu") is None


def test_attention_context_is_the_token_weighted_sequence_length():
    # 1 sequence of 100 tokens and 3 of 10: the average token sits in a sequence of (100^2 + 3 * 10^2) / 130.
    assert flops.attention_context([100, 10, 10, 10]) == pytest.approx(10300 / 130)
    assert flops.attention_context([7, 7]) == 7 and flops.attention_context([]) == 0.0


def test_model_flops_counts_from_a_model():
    from engine.config import ModelConfig
    from engine.model import apply_lora, build_model

    m = build_model("llama-tiny")
    c = flops.ModelFlops.of(m)
    n = sum(p.numel() for p in m.parameters())
    emb = m.get_input_embeddings().weight.numel()
    assert (c.n_params, c.n_trainable, c.n_embedding, c.n_layers, c.d_model) == (n, n, emb, 2, 128)
    assert c.per_token(64) == pytest.approx(6 * (n - emb) + 12 * 2 * 128 * 64)

    lora = flops.ModelFlops.of(apply_lora(build_model("llama-tiny"), ModelConfig(lora_r=4)))
    assert 0 < lora.n_trainable < lora.n_params - lora.n_embedding
    frozen = lora.n_params - lora.n_embedding - lora.n_trainable
    assert lora.per_token(0) == pytest.approx(4 * frozen + 6 * lora.n_trainable)

    # GPT-2 ties its input embedding to the LM head: the head's matmul counts those weights once.
    gpt2 = flops.ModelFlops.of(build_model("gpt2-small", device="meta"))
    assert gpt2.n_embedding == 0 and gpt2.n_layers == 12 and gpt2.d_model == 768
