"""engine.plan: parameter counts, the memory formula against hand arithmetic, the peak, monotonicity, fitting, CLI."""

import dataclasses
import json

import pytest

from engine.plan import (
    GIB,
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

# llama-tiny with a 1024-token vocabulary: hidden D=128, intermediate FFN=384, 2 layers, 4 heads of 32,
# 2 KV heads (Dkv = 64), untied head.
V, D, FFN, L, H, DKV = 1024, 128, 384, 2, 4, 64
EMBED = V * D  # 131,072
LAYER = (
    D * D  # q_proj 16,384
    + 2 * D * DKV  # k_proj, v_proj 8,192 each
    + D * D  # o_proj 16,384
    + 3 * D * FFN  # gate, up, down 49,152 each
    + 2 * D  # two RMSNorm weights
)  # 196,864
TINY_PARAMS = EMBED + L * LAYER + D + EMBED  # embed + layers + final norm + lm_head
assert TINY_PARAMS == 656_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Overrides planning llama-tiny (vocabulary V, from a config.json) on 8 GPUs, ZeRO-3, bf16, with small
    DeepSpeed buckets (from a DeepSpeed JSON, as a run would pass it) so the buffer term is visible."""
    from engine.model import _named_config

    d = tmp_path_factory.mktemp("plan")
    _named_config("llama-tiny", V).to_json_file(d / "config.json")
    (d / "ds.json").write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "reduce_bucket_size": 1000,
                    "prefetch_bucket_size": 500,
                    "param_persistence_threshold": 200,
                }
            }
        )
    )
    return {
        "model.name": str(d / "config.json"),
        "parallel.zero_stage": 3,
        "parallel.precision": "bf16",
        "data.max_prompt_length": 64,
        "data.max_length": 128,
        "data.max_tokens_per_row": 256,
        "data.rows_per_batch": 2,
        "ref_cache.mode": "off",
        "ref_cache.dtype": "bfloat16",
        "loss.objective": "dpo",
        "parallel.deepspeed_config": str(d / "ds.json"),
    }


def plan(overrides, **where):
    where = {"gpus_per_node": 8, "runtime_overhead_gib": 0.0, **where}
    return plan_memory(PlanSettings.of(overrides, **where))


def test_parameter_count_by_hand(tiny):
    assert model_shape("llama-tiny", V).num_parameters == TINY_PARAMS
    assert model_shape(tiny["model.name"]).num_parameters == TINY_PARAMS


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


def test_other_llama_family(tmp_path):
    """Qwen2 biases and Qwen3 q/k norms count exactly."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    for cls in (Qwen2Config, Qwen3Config):
        cfg = cls(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=cls is Qwen2Config,
        )
        q = tmp_path / f"{cfg.model_type}.json"
        cfg.to_json_file(q)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        assert model_shape(str(q)).num_parameters == sum(t.numel() for t in meta.parameters())


def test_lora_parameter_count_by_hand_and_against_peft(tiny):
    from engine.config import ModelConfig
    from engine.model import apply_lora, build_model

    r = 8
    per_layer = r * (
        (D + D)
        + (D + DKV)
        + (D + DKV)
        + (D + D)  # q, k, v, o
        + 3 * (D + FFN)  # gate, up, down
    )
    assert per_layer == 19_456
    p = plan({**tiny, "model.lora_r": r})
    assert p.lora_parameters == L * per_layer == p.trainable_parameters
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
    by_hand = 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert shape.lora_parameters(4, shape.default_lora_targets()) == trained == by_hand
    assert shape.num_parameters == sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())


def test_plan_by_hand_zero3_bf16(tiny):
    p = plan(tiny)
    n = 2 * 256
    # bf16 mixed precision over 8 ranks with ZeRO-3: 2 bytes weights, 2 grads, 4 master, 4 + 4 moments, all / 8.
    assert p.weights == TINY_PARAMS * 2 // 8 == 164_000
    assert p.gradients == TINY_PARAMS * 2 // 8
    assert p.master_weights == TINY_PARAMS * 4 // 8
    assert p.optimizer_moments == TINY_PARAMS * 8 // 8
    assert p.optimizer == 984_000
    # Activations per token per layer (bf16): per RMSNorm its fp32 input + rstd (4D+4), the bf16 cast
    # and output (2*2D); q/k/v 2*(D + 2*Dkv), attention output 2*D, logsumexp 4*H, SwiGLU 4*2*FFN.
    per_layer = 2 * (4 * D + 4 + 2 * 2 * D) + 2 * (D + 2 * DKV) + 2 * D + 4 * H + 4 * 2 * FFN
    assert per_layer == 5912 == p.activation_bytes_per_token_layer
    assert p.attn_implementation == "flash_attention_2"  # a CUDA plan assumes flash-attn
    # Once per model: final norm (4D+4 + 2D), the hidden states given to the loss (2D), RoPE cos/sin (2*2*32).
    final = (4 * D + 4 + 2 * D) + 2 * D + 2 * 2 * 32
    assert p.activations_without_checkpointing == n * (L * per_layer + final) == 6_645_760
    # Checkpointing keeps each layer's bf16 input (2D) plus one layer recomputed in full.
    assert p.activations_with_checkpointing == n * (L * 2 * D + per_layer + final) == 3_880_960
    assert p.activations == p.activations_without_checkpointing
    # Fused: one bf16 [block, V] logits block (the GPU budget's block for V=1024 is 8192 rows, capped at
    # the 512 tokens) plus the fp32 [V, D] dW accumulator of the trained head. Eager: N x V x (2 + 4 + 4).
    assert p.block_rows == 8192
    assert p.logits_fused == n * V * 2 + V * D * 4 == 1_572_864
    assert p.logits_eager == n * V * 10 == 5_242_880
    assert p.logits == p.logits_fused
    assert p.reference_on_the_fly == p.reference == TINY_PARAMS * 2 // 8
    # ZeRO-3 buffers from the DeepSpeed JSON: reduce bucket (1000 bf16), the largest tensor (embed/head
    # V x D) + a 500-element prefetch bucket, and the five 128-element norm weights kept whole (< 200).
    assert p.buffers == 1000 * 2 + (V * D + 500 + 5 * D) * 2 == 266_424
    assert p.runtime == 0
    # The peak is in the backward pass: static parts + activations + logits (one micro-batch: no
    # gradients accumulated yet); the optimizer step's gradients are smaller.
    assert p.peak_phase == "backward"
    assert p.at_peak == {
        "weights": 164_000,
        "optimizer": 984_000,
        "reference": 164_000,
        "buffers": 266_424,
        "activations": 6_645_760,
        "logits": 1_572_864,
    }
    assert p.total == 164_000 * 2 + 984_000 + 6_645_760 + 1_572_864 + 266_424 == 9_797_048
    assert p.total == sum(p.at_peak.values())
    # Accumulating micro-batches keeps the gradients resident through every later backward.
    acc = plan({**tiny, "optim.grad_accum": 4})
    assert acc.total == p.total + p.gradients and acc.at_peak["gradients"] == p.gradients


def test_plan_by_hand_zero0_fp32_and_lora(tiny):
    p = plan(
        {**tiny, "parallel.zero_stage": 0, "parallel.precision": "fp32", "ref_cache.mode": "auto"},
        runtime_overhead_gib=1.0,
    )
    assert (p.weights, p.gradients, p.master_weights, p.optimizer_moments) == (
        TINY_PARAMS * 4,
        TINY_PARAMS * 4,
        0,
        TINY_PARAMS * 8,
    )
    assert p.reference == 0 and p.runtime == GIB
    # ZeRO-0 on 8 ranks: DeepSpeed's flat all-reduce bucket holds every gradient (fewer than 5e8 elements).
    assert p.buffers == TINY_PARAMS * 4
    assert plan({**tiny, "parallel.zero_stage": 0, "parallel.precision": "fp32"}, gpus_per_node=1).buffers == 0
    assert p.logits_eager == 512 * V * (4 + 4 + 4)

    lora = plan({**tiny, "parallel.zero_stage": 0, "model.lora_r": 8})
    adapters = L * 19_456
    assert lora.weights == (TINY_PARAMS + adapters) * 2  # frozen bf16 base + bf16 adapters
    assert lora.gradients == adapters * 2 and lora.optimizer == adapters * 12
    assert lora.reference_on_the_fly == 0  # the reference is the base model with adapters disabled
    assert lora.logits_fused == 512 * V * 2  # bf16 logits block; frozen head: no dW accumulator
    # Frozen base: norm casts and outputs (4 x 2D) and down's input (2I) are no longer saved; each of the 7
    # adapted linears saves its fp32 input copy (4 x in) and lora_A's fp32 output (4r).
    assert lora.activation_bytes_per_token_layer == 5912 - 4 * 2 * D - 2 * FFN + 4 * (6 * D + FFN) + 7 * 4 * 8 == 8952


def test_device_sets_chunk_attention_and_runtime(tiny):
    """The plan uses the chunk budget of the device it plans for (ddpo_kernels' own function), the
    attention kernel a run there gets, and the device's runtime constant."""
    import torch

    from ddpo_kernels import default_block_rows
    from engine.plan import CPU_RUNTIME_BYTES

    big_v = {**tiny, "model.name": "llama-8b"}
    gpu = plan_memory(PlanSettings.of(big_v, device="cuda"))
    cpu = plan_memory(PlanSettings.of(big_v, device="cpu"))
    assert gpu.block_rows == default_block_rows(128_256, torch.bfloat16, "cuda")
    assert cpu.block_rows == default_block_rows(128_256, torch.bfloat16, "cpu") < gpu.block_rows
    assert (gpu.runtime, cpu.runtime) == (GIB, CPU_RUNTIME_BYTES)
    assert (gpu.attn_implementation, cpu.attn_implementation) == ("flash_attention_2", "sdpa_varlen")
    # Per-sequence SDPA keeps its outputs and their concatenation (o_proj's input): + 2 bytes x Dq per token-layer.
    assert cpu.activation_bytes_per_token_layer == gpu.activation_bytes_per_token_layer + 2 * 4096


def test_settings_are_the_run_config():
    """PlanSettings adds only where the run happens to the trainer's Config: no second schema."""
    from engine.config import Config, load_config

    fields = [f.name for f in dataclasses.fields(PlanSettings)]
    assert fields == ["config", "nodes", "gpus_per_node", "device", "runtime_overhead_gib"]
    cfg = load_config(["--config", "configs/llama8b-dorpo-engine.yaml"])  # llama8b-ddpo.yaml starts from an SFT dir
    s = settings_from_config(cfg, 8, "cuda")
    assert s.config is cfg and s.world_size == 8 and s.tokens == 8192
    p = plan_from_config(cfg, 8, "cuda")  # hub name planned offline through its known shapes
    assert p.parameters == 8_030_261_248
    assert p.lora_parameters == 32 * 128 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert p.settings["config"] == cfg.to_dict()
    with pytest.raises(PlanError, match="unknown config setting"):
        PlanSettings.of({"parallel.zero": 3})
    with pytest.raises(PlanError, match="parallel.offload_params needs parallel.zero_stage 3"):
        PlanSettings.of({"parallel.zero_stage": 2, "parallel.offload_params": True})
    assert isinstance(PlanSettings().config, Config)


def test_offload_and_objectives(tiny):
    off = plan({**tiny, "parallel.offload_optimizer": True, "parallel.offload_params": True})
    assert off.gradients == off.optimizer == off.weights == 0
    assert off.reference_on_the_fly == 0
    for objective in ("orpo", "dorpo", "sft"):
        assert plan({**tiny, "loss.objective": objective}).reference == 0
    assert plan({**tiny, "loss.objective": "ddpo"}).reference > 0


def test_monotonic(tiny):
    big = {
        "model.name": "llama-8b",
        "parallel.zero_stage": 3,
        "data.max_tokens_per_row": 4096,
        "parallel.precision": "bf16",
        "loss.objective": "dpo",
    }

    def total(over=None, **where):
        return plan_memory(PlanSettings.of({**big, **(over or {})}, **where)).total

    per_gpu = [total(nodes=1, gpus_per_node=g) for g in (1, 2, 4, 8)]
    per_gpu.append(total(nodes=4, gpus_per_node=8))
    assert all(a > b for a, b in zip(per_gpu, per_gpu[1:]))
    for z in (1, 2):  # ZeRO-1/2 shrink optimizer (and gradients) per GPU as ranks are added
        assert total({"parallel.zero_stage": z}, gpus_per_node=8) < total({"parallel.zero_stage": z}, gpus_per_node=2)
    ck = plan_memory(PlanSettings.of({**big, "model.gradient_checkpointing": True}))
    no = plan_memory(PlanSettings.of(big))
    assert ck.activations < no.activations and ck.total < no.total
    assert total({"ref_cache.mode": "auto"}) < total({"ref_cache.mode": "off"})
    eager = plan_memory(PlanSettings.of({**big, "loss.backend": "eager"}))
    assert plan_memory(PlanSettings.of(big)).logits < eager.logits
    # Small DeepSpeed buckets, so that the partitioned states, not the buckets, decide.
    small_ds = {"parallel.deepspeed_config": tiny["parallel.deepspeed_config"]}
    stages = [total({**small_ds, "parallel.zero_stage": z}, gpus_per_node=8) for z in (0, 1, 2, 3)]
    # ZeRO-2's partitioned gradients only matter while gradients are resident at the peak: with one
    # micro-batch per step the backward's activations peak above them; accumulating, they are there too.
    assert stages[0] > stages[1] >= stages[2] > stages[3]
    acc = {**small_ds, "optim.grad_accum": 4}
    zero1, zero2 = (total({**acc, "parallel.zero_stage": z}, gpus_per_node=8) for z in (1, 2))
    assert zero1 > zero2
    tokens = [total({"data.max_tokens_per_row": t}) for t in (1024, 2048, 8192)]
    assert tokens == sorted(tokens)


def test_llama8b_numbers():
    p = plan_memory(
        PlanSettings.of(
            {
                "model.name": "llama-8b",
                "parallel.zero_stage": 3,
                "parallel.precision": "bf16",
                "data.max_tokens_per_row": 8192,
                "model.gradient_checkpointing": True,
            },
            nodes=4,
            gpus_per_node=8,
            runtime_overhead_gib=0,
        )
    )
    d, dkv, i, h = 4096, 1024, 14336, 32
    assert p.activation_bytes_per_token_layer == 20 * d + 4 * dkv + 8 * i + 4 * h + 8 == 200_840
    assert p.weights == -(-8_030_261_248 * 2 // 32)
    # 1 GiB / (2 bytes x 128,256) -> 4186 rows, whole 1024-row GEMM chunks (ddpo_kernels.default_block_rows)
    assert p.block_rows == 4096
    assert p.logits_eager == 8192 * 128_256 * 10


@pytest.mark.parametrize("field, step", [("max_tokens_per_row", 128), ("rows_per_batch", 1), ("max_tokens_per_row", 1)])
def test_largest_fitting_consistent(field, step):
    settings = PlanSettings.of(
        {
            "model.name": "llama-8b",
            "parallel.zero_stage": 3,
            "parallel.precision": "bf16",
            "data.max_tokens_per_row": 1024,
            "model.gradient_checkpointing": True,
        },
        gpus_per_node=8,
    )
    gpu = 40 * GIB
    best = largest_fitting(settings, gpu, field=field, step=step)
    assert best > 0 and best % step == 0
    assert plan_memory(settings.with_config({f"data.{field}": best})).total <= gpu
    assert plan_memory(settings.with_config({f"data.{field}": best + step})).total > gpu


def test_largest_fitting_none_fits():
    settings = PlanSettings.of({"model.name": "llama-8b", "parallel.precision": "bf16"})  # 8B x 16 bytes > 80 GiB
    assert largest_fitting(settings, 80 * GIB) == 0
    with pytest.raises(PlanError, match="field"):
        largest_fitting(settings, 80 * GIB, field="hidden_size")


def test_validation_errors_name_the_setting(tiny):
    with pytest.raises(PlanError, match="offload_params needs"):
        plan({**tiny, "parallel.zero_stage": 2, "parallel.offload_params": True})
    with pytest.raises(PlanError, match="precision"):
        plan({**tiny, "parallel.precision": "fp8"})
    with pytest.raises(PlanError, match="match no linear"):
        plan({**tiny, "model.lora_r": 4, "model.lora_target_modules": ["c_attn"]})
    with pytest.raises(PlanError, match="config.json"):
        model_shape("no-such-org/no-such-model")
    with pytest.raises(PlanError, match="device"):
        PlanSettings(device="tpu")


def _saved_bytes(model, trunk, input_ids, position_ids, act_bytes, hidden):
    """Bytes autograd saves in a trunk's forward (one count per storage, weights excluded), plus the loss's
    [N, D] hidden-state gradient that the plan adds and the trunk alone does not hold."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in params:  # token ids/positions are ignored
            saved[st.data_ptr()] = st.nbytes()  # views share memory
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    del out
    return sum(saved.values()) + input_ids.numel() * act_bytes * hidden


def test_activation_formula_matches_saved_tensors(tiny):
    """Count the bytes autograd saves in llama-tiny's trunk and compare with the plan byte for byte. One
    sequence per row: CPU SDPA runs the flash kernel, which saves q, k, v, output and logsumexp like
    FlashAttention (the CUDA plan); bf16 and fp32 full training, and LoRA on all projections or on q/v only
    (frozen base, fp32 adapters). Two sequences per row on CPU: per-sequence SDPA (the CPU plan)."""
    import torch

    from engine.config import ModelConfig
    from engine.model import apply_lora, build_model

    n = 256
    ids, one_seq = torch.randint(0, V, (1, n)), torch.arange(n)[None]

    def measure(m, act_bytes, positions=one_seq):
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        return _saved_bytes(m, base.get_decoder(), ids, positions, act_bytes, D)

    settings = {
        **tiny,
        "parallel.zero_stage": 0,
        "data.rows_per_batch": 1,
        "data.max_length": 128,
        "data.max_tokens_per_row": n,
    }
    bf16 = build_model("llama-tiny", dtype="bfloat16", vocab_size=V).train()
    assert measure(bf16, 2) == plan(settings).activations_without_checkpointing
    fp32 = build_model("llama-tiny", vocab_size=V).train()
    fp32_settings = {**settings, "parallel.precision": "fp32"}
    assert measure(fp32, 4) == plan(fp32_settings).activations_without_checkpointing
    two_seqs = torch.cat([torch.arange(n // 2), torch.arange(n // 2)])[None]
    assert measure(fp32, 4, two_seqs) == plan(fp32_settings, device="cpu").activations_without_checkpointing
    for targets in (None, ["q_proj", "v_proj"]):
        mcfg = ModelConfig(lora_r=8) if targets is None else ModelConfig(lora_r=8, lora_target_modules=targets)
        lora_model = apply_lora(build_model("llama-tiny", dtype="bfloat16", vocab_size=V).train(), mcfg)
        lora_plan = plan({**settings, "model.lora_r": 8, "model.lora_target_modules": mcfg.lora_target_modules})
        assert measure(lora_model, 2) == lora_plan.activations_without_checkpointing, targets


def test_activation_formula_gpt2(tmp_path):
    """GPT-2 as engine.model prepares it (torch's fused tanh-GELU, no dropout), packed rows on CPU, fp32."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.model import prepare_for_preference_training

    d, i = 768, 3072
    by_hand = 2 * (2 * d + 8) + 2 * 2 * d + 2 * 3 * d + 2 * d + 4 * 12 + 2 * 2 * i
    assert activation_bytes_per_token_layer(model_shape("gpt2-small"), 2) == by_hand
    cfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    cfg.to_json_file(tmp_path / "config.json")
    cfg._attn_implementation = "sdpa_varlen"
    model = GPT2LMHeadModel(cfg).train()
    prepare_for_preference_training(model)
    n = 192
    positions = torch.cat([torch.arange(100), torch.arange(92)])[None]
    measured = _saved_bytes(model, model.transformer, torch.randint(0, 512, (1, n)), positions, 4, 64)
    p = plan(
        {
            "model.name": str(tmp_path / "config.json"),
            "parallel.precision": "fp32",
            "data.max_prompt_length": 64,
            "data.max_length": 96,
            "data.max_tokens_per_row": n,
        },
        device="cpu",
    )
    assert measured == p.activations_without_checkpointing


def test_cli_table_and_json(capsys):
    args = [
        "--model",
        "llama-8b",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--zero",
        "3",
        "--max-tokens-per-row",
        "8192",
        "--gradient-checkpointing",
        "--lora-r",
        "128",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    words = (
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "reference",
        "buffers",
        "peak",
        "largest max_tokens_per_row",
    )
    for word in words:
        assert word in out
    assert "8,030,261,248" in out
    assert main([*args, "--json", "--fit", "rows_per_batch"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == sum(data["at_peak"].values())
    assert data["fits"] is True and data["largest_fitting"]["rows_per_batch"] >= 1
    assert main(["--model", "llama-8b", "--zero", "1", "--offload-params"]) == 2
    assert "offload_params needs" in capsys.readouterr().err
    # Any config setting as an override, like engine.train's.
    assert main([*args, "--data.max_length", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["config"]["data"]["max_length"] == 4096


def test_cli_run_config(capsys):
    assert main(["--config", "configs/llama8b-dorpo-engine.yaml", "--gpus-per-node", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["config"]["model"]["lora_r"] == 128 and data["world_size"] == 8


def test_optimizer_step_peak_with_tied_embeddings():
    """Few tokens: the peak is the end of the backward, every gradient plus GPT-2's tied embedding's own [V, D]
    gradient before it joins the head's; Llama (untied) has no such transient."""
    settings = {
        "parallel.precision": "fp32",
        "data.max_prompt_length": 64,
        "data.max_length": 128,
        "data.max_tokens_per_row": 256,
    }
    gpt2 = plan_memory(PlanSettings.of({**settings, "model.name": "gpt2-small"}, device="cpu"))
    v, d, p = 50257, 768, 124_439_808
    assert gpt2.peak_phase == "optimizer step" and gpt2.at_peak["gradients"] == 4 * p + 4 * v * d
    tiny = plan_memory(PlanSettings.of(settings, device="cpu"))
    assert tiny.peak_phase == "backward" or tiny.at_peak["gradients"] == tiny.gradients
