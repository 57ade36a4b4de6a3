"""engine.plan: parameter counts, the memory formula against hand arithmetic, monotonicity, fitting, CLI."""

import dataclasses
import json

import pytest

from engine.plan import (
    GIB,
    MemoryPlan,
    PlanError,
    PlanSettings,
    activation_bytes_per_token_layer,
    largest_fitting,
    main,
    model_shape,
    plan_from_config,
    plan_memory,
    settings_from_config,
)

# llama-tiny with a 1024-token vocabulary: hidden D=128, intermediate I=384, 2 layers, 4 heads of 32,
# 2 KV heads (Dkv = 64), untied head.
V, D, I, L, H, DKV = 1024, 128, 384, 2, 4, 64
EMBED = V * D  # 131,072
LAYER = (
    D * D  # q_proj 16,384
    + 2 * D * DKV  # k_proj, v_proj 8,192 each
    + D * D  # o_proj 16,384
    + 3 * D * I  # gate, up, down 49,152 each
    + 2 * D  # two RMSNorm weights
)  # 196,864
TINY_PARAMS = EMBED + L * LAYER + D + EMBED  # embed + layers + final norm + lm_head
assert TINY_PARAMS == 656_000

# Small DeepSpeed constants so the buffer term is visible next to a tiny model.
SMALL_DS = dict(reduce_bucket_size=1000, prefetch_bucket_size=500, param_persistence_threshold=200)

TINY = dict(
    model="llama-tiny", vocab_size=V, nodes=1, gpus_per_node=8, zero=3, precision="bf16", max_tokens_per_row=256,
    rows_per_batch=2, loss="fused", ref="on_the_fly", objective="dpo", runtime_overhead_gib=0.0, **SMALL_DS,
)  # fmt: skip


def test_parameter_count_by_hand():
    assert model_shape("llama-tiny", V).num_parameters == TINY_PARAMS


@pytest.mark.parametrize(
    "name, expected",
    [("llama-8b", 8_030_261_248), ("gpt2-small", 124_439_808), ("llama-tiny", None)],
)
def test_parameter_count_matches_meta_model(name, expected):
    from engine.model import build_model, count_parameters

    counted = count_parameters(build_model(name, device="meta"))
    assert model_shape(name).num_parameters == counted
    if expected is not None:
        assert counted == expected


def test_config_json_path_and_other_llama_family(tmp_path):
    """A config.json on disk plans like the named architecture; Qwen2 biases and Qwen3 q/k norms count exactly."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    from engine.model import _named_config

    p = tmp_path / "config.json"
    _named_config("llama-tiny", V).to_json_file(p)
    assert model_shape(str(p)).num_parameters == TINY_PARAMS
    assert plan_memory(**{**TINY, "model": str(p)}).total == plan_memory(**TINY).total
    for cls in (Qwen2Config, Qwen3Config):
        cfg = cls(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=cls is Qwen2Config)  # fmt: skip
        q = tmp_path / f"{cfg.model_type}.json"
        cfg.to_json_file(q)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        assert model_shape(str(q)).num_parameters == sum(t.numel() for t in meta.parameters())


def test_lora_parameter_count_by_hand_and_against_peft():
    from engine.config import ModelConfig
    from engine.model import apply_lora, build_model

    r = 8
    per_layer = r * (
        (D + D) + (D + DKV) + (D + DKV) + (D + D)  # q, k, v, o
        + 3 * (D + I)  # gate, up, down
    )  # fmt: skip
    assert per_layer == 19_456
    plan = plan_memory(**{**TINY, "lora_r": r})
    assert plan.lora_parameters == L * per_layer == plan.trainable_parameters
    model = apply_lora(build_model("llama-tiny", vocab_size=V), ModelConfig(lora_r=r))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * per_layer


def test_gpt2_lora_targets_cover_both_c_proj():
    """peft matches leaf names, so c_proj adapts the attention and the MLP projection."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.config import ModelConfig
    from engine.model import apply_lora
    from engine.plan import shape_from_hf_config

    cfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    shape = shape_from_hf_config(cfg, "gpt2-mini")
    model = apply_lora(GPT2LMHeadModel(cfg), ModelConfig(lora_r=4, lora_target_modules=["c_attn", "c_proj", "c_fc"]))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.lora_parameters(4, shape.default_lora_targets()) == trained == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert shape.num_parameters == sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())


def test_plan_by_hand_zero3_bf16():
    p = plan_memory(**TINY)
    n = 2 * 256
    # bf16 mixed precision over 8 ranks with ZeRO-3: 2 bytes weights, 2 grads, 4 master, 4 + 4 moments, all / 8.
    assert p.weights == TINY_PARAMS * 2 // 8 == 164_000
    assert p.gradients == TINY_PARAMS * 2 // 8
    assert p.master_weights == TINY_PARAMS * 4 // 8
    assert p.optimizer_moments == TINY_PARAMS * 8 // 8
    assert p.optimizer == 984_000
    # Activations per token per layer (bf16): per RMSNorm its fp32 input + rstd (4D+4), the bf16 cast
    # and output (2*2D); q/k/v 2*(D + 2*Dkv), attention output 2*D, logsumexp 4*H, SwiGLU 4*2*I.
    per_layer = 2 * (4 * D + 4 + 2 * 2 * D) + 2 * (D + 2 * DKV) + 2 * D + 4 * H + 4 * 2 * I
    assert per_layer == 5912 == p.activation_bytes_per_token_layer
    # Once per model: final norm (4D+4 + 2D), the hidden states given to the loss (2D), RoPE cos/sin (2*2*32).
    final = (4 * D + 4 + 2 * D) + 2 * D + 2 * 2 * 32
    assert p.activations_without_checkpointing == n * (L * per_layer + final) == 6_645_760
    # Checkpointing keeps each layer's bf16 input (2D) plus one layer recomputed in full.
    assert p.activations_with_checkpointing == n * (L * 2 * D + per_layer + final) == 3_880_960
    assert p.activations == p.activations_without_checkpointing
    # Fused: one fp32 [chunk, V] block (chunk 8192 for V=1024, capped at the 512 tokens) plus the fp32
    # [V, D] dW accumulator of the trained head. Eager: N x V x (2 + 4 + 4).
    assert p.chunk_tokens == 8192
    assert p.logits_fused == n * V * 4 + V * D * 4 == 2_621_440
    assert p.logits_eager == n * V * 10 == 5_242_880
    assert p.logits == p.logits_fused
    assert p.reference_on_the_fly == p.reference == TINY_PARAMS * 2 // 8
    # ZeRO-3 buffers: reduce bucket (1000 bf16), the largest tensor (embed/head V x D) + a 500-element
    # prefetch bucket, and the five 128-element norm weights kept whole (below the 200 threshold).
    assert p.buffers == 1000 * 2 + (V * D + 500 + 5 * D) * 2 == 266_424
    assert p.runtime == 0
    assert p.total == 164_000 * 3 + 984_000 + 6_645_760 + 2_621_440 + 266_424 == 11_009_624
    assert p.total == sum(getattr(p, k) for k in MemoryPlan.COMPONENTS)


def test_plan_by_hand_zero0_fp32_and_lora():
    p = plan_memory(**{**TINY, "zero": 0, "precision": "fp32", "ref": "cache", "runtime_overhead_gib": 1.0})
    assert (p.weights, p.gradients, p.master_weights, p.optimizer_moments) == (
        TINY_PARAMS * 4, TINY_PARAMS * 4, 0, TINY_PARAMS * 8,
    )  # fmt: skip
    assert p.buffers == 0 and p.reference == 0 and p.runtime == GIB
    assert p.logits_eager == 512 * V * (4 + 4 + 4)

    lora = plan_memory(**{**TINY, "zero": 0, "lora_r": 8})
    adapters = L * 19_456
    assert lora.weights == (TINY_PARAMS + adapters) * 2  # frozen bf16 base + bf16 adapters
    assert lora.gradients == adapters * 2 and lora.optimizer == adapters * 12
    assert lora.reference_on_the_fly == 0  # the reference is the base model with adapters disabled
    assert lora.logits_fused == 512 * V * 4  # frozen head: no dW accumulator
    # Frozen base: norm casts and outputs (4 x 2D) and down's input (2I) are no longer saved; each of the 7
    # adapted linears saves its fp32 input copy (4 x in) and lora_A's fp32 output (4r).
    assert lora.activation_bytes_per_token_layer == 5912 - 4 * 2 * D - 2 * I + 4 * (6 * D + I) + 7 * 4 * 8 == 8952


def test_offload_and_objectives():
    base = {**TINY, "zero": 3}
    off = plan_memory(**{**base, "offload_optimizer": True, "offload_params": True})
    assert off.gradients == off.optimizer == off.weights == 0
    assert off.reference_on_the_fly == 0
    for objective in ("orpo", "dorpo", "sft"):
        assert plan_memory(**{**base, "objective": objective}).reference == 0
    assert plan_memory(**{**base, "objective": "ddpo"}).reference > 0


def test_monotonic():
    big = dict(model="llama-8b", zero=3, max_tokens_per_row=4096, precision="bf16")
    per_gpu = [plan_memory(**big, nodes=1, gpus_per_node=g).total for g in (1, 2, 4, 8)]
    per_gpu.append(plan_memory(**big, nodes=4, gpus_per_node=8).total)
    assert all(a > b for a, b in zip(per_gpu, per_gpu[1:]))
    for z in (1, 2):  # ZeRO-1/2 shrink optimizer (and gradients) per GPU as ranks are added
        assert plan_memory(**big | {"zero": z}, gpus_per_node=8).total < plan_memory(**big | {"zero": z}, gpus_per_node=2).total
    ck = plan_memory(**big, gradient_checkpointing=True)
    no = plan_memory(**big, gradient_checkpointing=False)
    assert ck.activations < no.activations and ck.total < no.total
    fly = plan_memory(**big, ref="on_the_fly", objective="dpo")
    cache = plan_memory(**big, ref="cache", objective="dpo")
    assert cache.reference == 0 < fly.reference and cache.total < fly.total
    assert plan_memory(**big, loss="fused").logits < plan_memory(**big, loss="eager").logits
    stages = [plan_memory(**big | {"zero": z, "reduce_bucket_size": 0}).total for z in (0, 1, 2, 3)]
    assert all(a > b for a, b in zip(stages, stages[1:]))
    tokens = [plan_memory(**big | {"max_tokens_per_row": t}).total for t in (1024, 2048, 8192)]
    assert tokens == sorted(tokens)


def test_llama8b_numbers():
    p = plan_memory(model="llama-8b", nodes=4, gpus_per_node=8, zero=3, max_tokens_per_row=8192,
                    gradient_checkpointing=True, runtime_overhead_gib=0)  # fmt: skip
    d, dkv, i, h = 4096, 1024, 14336, 32
    assert p.activation_bytes_per_token_layer == 20 * d + 4 * dkv + 8 * i + 4 * h + 8 == 200_840
    assert p.weights == -(-8_030_261_248 * 2 // 32)
    # 128 MiB / (4 bytes x 128,256) -> 261 rows, at least one 512-row GEMM chunk (ddpo_kernels.default_block_rows)
    assert p.chunk_tokens == 512
    assert p.logits_eager == 8192 * 128_256 * 10


@pytest.mark.parametrize("field, step", [("max_tokens_per_row", 128), ("rows_per_batch", 1), ("max_tokens_per_row", 1)])
def test_largest_fitting_consistent(field, step):
    settings = dict(model="llama-8b", nodes=1, gpus_per_node=8, zero=3, max_tokens_per_row=1024, gradient_checkpointing=True)
    gpu = 40 * GIB
    best = largest_fitting(settings, gpu, field=field, step=step)
    assert best > 0 and best % step == 0
    assert plan_memory(**{**settings, field: best}).total <= gpu
    assert plan_memory(**{**settings, field: best + step}).total > gpu
    # A PlanSettings works as well as a dict.
    assert largest_fitting(PlanSettings(**settings), gpu, field=field, step=step) == best


def test_largest_fitting_none_fits():
    settings = dict(model="llama-8b", nodes=1, gpus_per_node=1, zero=0)  # 8B x 16 bytes alone exceeds 80 GiB
    assert largest_fitting(settings, 80 * GIB) == 0
    with pytest.raises(PlanError, match="field"):
        largest_fitting(settings, 80 * GIB, field="hidden_size")


def test_validation_errors_name_the_setting():
    with pytest.raises(PlanError, match="offload_params needs zero 3"):
        plan_memory(**{**TINY, "zero": 2, "offload_params": True})
    with pytest.raises(PlanError, match="precision"):
        plan_memory(**{**TINY, "precision": "fp8"})
    with pytest.raises(PlanError, match="match no linear"):
        plan_memory(**{**TINY, "lora_r": 4, "lora_targets": ("c_attn",)})
    with pytest.raises(PlanError, match="config.json"):
        model_shape("no-such-org/no-such-model")


def test_plan_from_config_maps_fields():
    from engine.config import from_dict, load_config

    # A preset that starts from a hub model (llama8b-ddpo.yaml starts from an SFT directory made first).
    cfg = load_config(["--config", "configs/llama8b-dorpo-engine.yaml"])
    s = settings_from_config(cfg, 8)
    assert (s.model, s.zero, s.precision, s.lora_r, s.gradient_checkpointing, s.max_tokens_per_row) == (
        "meta-llama/Llama-3.1-8B", 3, "bf16", 128, True, 8192,
    )  # fmt: skip
    assert (s.loss, s.ref, s.objective, s.world_size) == ("fused", "cache", "dorpo", 8)
    plan = plan_from_config(cfg, 8)  # hub name planned offline through its known shapes
    assert plan.parameters == 8_030_261_248
    assert plan.lora_parameters == 32 * 128 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    cfg2 = from_dict({"loss": {"backend": "eager"}, "ref_cache": {"mode": "off"}})
    s2 = settings_from_config(cfg2, 2)
    assert (s2.loss, s2.ref) == ("eager", "on_the_fly")
    assert dataclasses.asdict(s2)["model"] == cfg2.model.name


def test_activation_formula_matches_saved_tensors():
    """Count the bytes autograd saves in llama-tiny's trunk (CPU SDPA runs the flash kernel, which saves
    q, k, v, output and logsumexp like FlashAttention) and compare with the plan byte for byte: bf16 and
    fp32 full training, and LoRA on all projections or on q/v only (frozen base, fp32 adapters)."""
    import torch

    from engine.config import ModelConfig
    from engine.model import apply_lora, build_model

    n = 256

    def measure(m, act_bytes):
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}  # weights are not activations
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if t.is_floating_point() and st.data_ptr() not in params:  # token ids/positions are ignored
                saved[st.data_ptr()] = st.nbytes()  # one count per storage: views share memory
            return t

        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = base.get_decoder()(input_ids=torch.randint(0, V, (1, n)), position_ids=torch.arange(n)[None])
        del out
        # The trunk alone does not hold the loss's [N, D] hidden-state gradient that the plan adds.
        return sum(saved.values()) + n * act_bytes * D

    settings = {**TINY, "zero": 0, "rows_per_batch": 1, "max_tokens_per_row": n}
    bf16 = build_model("llama-tiny", dtype="bfloat16", vocab_size=V).train()
    assert measure(bf16, 2) == plan_memory(**settings).activations_without_checkpointing
    fp32 = build_model("llama-tiny", vocab_size=V).train()
    assert measure(fp32, 4) == plan_memory(**{**settings, "precision": "fp32"}).activations_without_checkpointing
    for targets in (None, ("q_proj", "v_proj")):
        mcfg = ModelConfig(lora_r=8) if targets is None else ModelConfig(lora_r=8, lora_target_modules=list(targets))
        lora_model = apply_lora(build_model("llama-tiny", dtype="bfloat16", vocab_size=V).train(), mcfg)
        lora_plan = plan_memory(**{**settings, "lora_r": 8, "lora_targets": targets})
        assert measure(lora_model, 2) == lora_plan.activations_without_checkpointing, targets


def test_activation_formula_gpt2():
    shape = model_shape("gpt2-small")
    d, i = 768, 3072
    assert activation_bytes_per_token_layer(shape, 2) == 2 * (2 * d + 8) + 2 * 2 * d + 2 * 3 * d + 2 * d + 4 * 12 + 5 * 2 * i


def test_cli_table_and_json(capsys):
    args = ["--model", "llama-8b", "--nodes", "4", "--gpus-per-node", "8", "--zero", "3", "--max-tokens-per-row", "8192",
            "--gradient-checkpointing", "--lora-r", "128"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "activations", "logits", "reference", "buffers", "total", "largest max_tokens_per_row"):
        assert word in out
    assert "8,030,261,248" in out
    assert main([*args, "--json", "--fit", "rows_per_batch"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == sum(data[k] for k in MemoryPlan.COMPONENTS)
    assert data["fits"] is True and data["largest_fitting"]["rows_per_batch"] >= 1
    assert main(["--model", "llama-8b", "--zero", "1", "--offload-params"]) == 2
    assert "offload_params needs zero 3" in capsys.readouterr().err


def test_cli_run_config(capsys):
    assert main(["--config", "configs/llama8b-dorpo-engine.yaml", "--gpus-per-node", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["lora_r"] == 128 and data["world_size"] == 8
