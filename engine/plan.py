"""Memory planner: the per-device memory budget of a training configuration, and the largest micro-batch that fits.

Where this sits: beside the flow, not in it. Before a run, `python -m engine.plan ...` answers "does
this fit, and how long can the packed rows be?"; at start-up the trainer logs
`plan_from_config(cfg, world_size)` next to the measured peak so a gap between model and reality is
visible in the first log lines, and bench/bench_train.py prints the plan beside every measured
engine row (CPU rows within 15% of the measured peak). Nothing here allocates memory: shapes come
from the model's config (named architectures of engine.model, a config.json, or a hub config
already in the local cache).

What is planned is a run config (`engine.config.Config`, the trainer's own settings: one schema)
plus where it runs (`PlanSettings`: ranks and device). The CLI takes the trainer's `--config` and
`--section.field` overrides, or short flags that set the same fields:

    python -m engine.plan --model llama-8b --nodes 4 --gpus-per-node 8 --zero 3 \
        --max-tokens-per-row 8192 --gradient-checkpointing --lora-r 128 --gpu-memory-gb 80
    python -m engine.plan --config configs/llama8b-ddpo.yaml --gpus-per-node 8

The budget (all sizes in bytes, per rank; N = rows_per_batch * max_tokens_per_row tokens of one
micro-batch; P parameters, T trainable parameters (P, or the LoRA adapters' count), W = nodes x
gpus_per_node data-parallel ranks; w = 2 bytes in bf16/fp16, 4 in fp32):

- weights: (P + adapters) * w, divided by W under ZeRO-3, 0 on the GPU with offload_params.
  LoRA base weights are frozen and stored in w bytes too.
- gradients: T * w (ZeRO 0/1), T * w / W (ZeRO 2/3); 0 with offload_optimizer (ZeRO-Offload moves
  each reduced gradient partition to CPU; the reduce bucket that stays is under buffers).
- optimizer states (master + moments): mixed precision keeps an fp32 master copy (4 bytes) and Adam's
  fp32 m and v (4 + 4): 12 bytes per trainable parameter; plain training keeps m and v in the
  weights' dtype (8 bytes in fp32). Divided by W under ZeRO >= 1; 0 with offload_optimizer. The
  engine's AdamW is torch's fused kernel, which allocates no per-tensor temporaries.
- activations: see `activation_bytes_per_token_layer` for the per-layer formula (no seq^2 term:
  FlashAttention on CUDA, per-sequence SDPA on CPU). Without checkpointing every layer's saved
  tensors live until its backward; with checkpointing (HF, one checkpoint per decoder layer) only
  each layer's input (w * hidden per token) is kept, plus one layer's full activations while it is
  recomputed.
- logits: eager (HF-style full logits) N * V * (w + 4 + 4): the logits in the compute dtype, the fp32
  log-softmax kept for backward and its fp32 gradient. Fused (ddpo_kernels.fused_preference_loss): one
  buffer of logits in the compute dtype: a block of ddpo_kernels.default_block_rows(V, dtype, device)
  rows of the device planned for (on a CPU a 128 MiB block, on a GPU 1 GiB) plus the GEMM chunk it
  shares with the next block, at most the micro-batch's tokens in whole chunks, plus the fp32 [V, D] dW
  accumulator the kernel fills when the LM head is trained (full fine-tuning; LoRA leaves the head frozen).
- reference model: 0 with the reference log-prob cache (engine.refcache) or for objectives without a
  reference (orpo, dorpo, sft); on the fly (ref_cache.mode off), a frozen copy of P parameters in
  ref_cache.dtype (divided by W under ZeRO-3; 0 with offload_params), or 0 with LoRA (the reference is
  the base model with the adapters disabled). Its forward runs under no_grad before the policy's.
- DeepSpeed buffers, from the run's own DeepSpeed JSON (engine.parallelize.deepspeed_config, with the
  user's parallel.deepspeed_config applied; DeepSpeed 0.19 defaults for keys it leaves out, see
  DEEPSPEED_DEFAULTS): ZeRO-0 on one rank none (the engine skips the all-reduce), on several
  DeepSpeed's flat all-reduce bucket (up to 5e8 gradient elements); ZeRO-1 one fp32
  gradient-reduction bucket of reduce_bucket_size elements, ZeRO-2 one in the gradient dtype (two
  with overlap_comm); ZeRO-3 one reduce bucket in the gradient dtype, the gathered parameters in
  flight (the largest single tensor plus one prefetch bucket, capped by max_live_parameters) and the
  small "persistent" parameters (numel below param_persistence_threshold) every rank keeps whole.
- runtime: a constant for the CUDA context and NCCL communicators (default 1.0 GiB on CUDA; measure
  yours with torch.cuda.mem_get_info before the model is built); on CPU the process state a step
  adds beyond its tensors (CPU_RUNTIME_BYTES, measured). Allocator fragmentation is not modelled:
  leave headroom in --gpu-memory-gb.

The peak: weights, optimizer states, reference, buffers and runtime are resident throughout; on top
of them either the backward pass (activations + the loss's logits block + the gradients already
accumulated from earlier micro-batches) or the end of the backward and the optimizer step (every
gradient, and with a tied input embedding its [V, D] gradient before it is added to the head's),
whichever is larger. Activations and gradients do not coexist in full: the gradients of a layer appear as its
activations are freed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import OBJECTIVES, Config

GIB = 1024**3

# DeepSpeed 0.19 ZeroConfig defaults (deepspeed/runtime/zero/config.py). The planner assumes the run
# keeps them; a run with its own DeepSpeed JSON passes its values as the PlanSettings of the same name.
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "prefetch_bucket_size": 50_000_000,
    "max_live_parameters": 1_000_000_000,
    "param_persistence_threshold": 100_000,
}

# What a CPU training process holds beyond its tensors once it steps (autograd and oneDNN state, allocator
# arenas): bench/results/memory.csv's "memory held by no tensor", 19-24 MB on llama-tiny and 44 MB on
# gpt2-small with the engine's allocator policy; the fixed part is planned.
CPU_RUNTIME_BYTES = 24 * 2**20
# DeepSpeed's ZeRO-0 all-reduce bucket (deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE, elements).
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000

# Hub names whose shapes equal a named architecture, so a preset naming them can be planned offline
# (the hub is not reachable from every machine that plans a run).
HUB_ALIASES = {
    "meta-llama/Llama-3.1-8B": "llama-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-8b",
    "meta-llama/Meta-Llama-3-8B": "llama-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-8b",
    "gpt2": "gpt2-small",
    "openai-community/gpt2": "gpt2-small",
}

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


class PlanError(ValueError):
    """A planner input is wrong; the message names it, its value and how to fix it."""


# ------------------------------------------------------------------------------------ model shapes


@dataclass(frozen=True)
class ParamSpec:
    """`count` parameter tensors of `shape` (one per layer for per-layer tensors)."""

    name: str
    shape: tuple[int, ...]
    count: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LinearSpec:
    """`count` linear layers (LoRA candidates) named `name` (the module's leaf name, as peft matches it).

    `source` names the tensor the layer reads ("norm1", "attn_out", "norm2", "mlp_act"; "" when
    unknown): linears sharing a source share one saved input when no cast or dropout copies it.
    """

    name: str
    in_features: int
    out_features: int
    count: int
    source: str = ""


@dataclass
class ModelShape:
    """What the planner needs from a model config: every parameter tensor plus the block's dimensions."""

    name: str
    # "llama" (RMSNorm, SwiGLU, GQA), "gpt2" (LayerNorm, GELU MLP), or "generic": parameters counted
    # exactly on the meta device, activations estimated with the Llama block formula.
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    params: list[ParamSpec]
    linears: list[LinearSpec]
    qk_norm: bool = False

    @property
    def num_parameters(self) -> int:
        return sum(p.numel * p.count for p in self.params)

    def default_lora_targets(self) -> tuple[str, ...]:
        return GPT2_LORA_TARGETS if self.family == "gpt2" else LLAMA_LORA_TARGETS

    def lora_linears(self, targets) -> list[LinearSpec]:
        """The linears LoRA adapts for `targets` (leaf names); error naming the candidates if none match."""
        chosen = [lin for lin in self.linears if lin.name in set(targets)]
        if not chosen:
            names = sorted({lin.name for lin in self.linears})
            raise PlanError(
                f"LoRA target modules {list(targets)} match no linear layer of {self.name}; candidates: {names}"
            )
        return chosen

    def lora_parameters(self, r: int, targets) -> int:
        """r * (in + out) per adapted linear (lora_A [r, in] + lora_B [out, r])."""
        return sum(r * (lin.in_features + lin.out_features) * lin.count for lin in self.lora_linears(targets))


def _llama_shape(name: str, cfg) -> ModelShape:
    mt = getattr(cfg, "model_type", "llama")
    d, L, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    hd = getattr(cfg, "head_dim", None) or d // h
    inter = cfg.intermediate_size
    dq, dkv = h * hd, kv * hd
    # Bias conventions differ inside the family: Qwen2 biases q/k/v only; Llama/Qwen3 follow attention_bias.
    qkv_bias = True if mt == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    o_bias = False if mt == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    qk_norm = mt == "qwen3"
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    layer = [
        ParamSpec("q_proj.weight", (dq, d), L),
        ParamSpec("k_proj.weight", (dkv, d), L),
        ParamSpec("v_proj.weight", (dkv, d), L),
        ParamSpec("o_proj.weight", (d, dq), L),
        ParamSpec("gate_proj.weight", (inter, d), L),
        ParamSpec("up_proj.weight", (inter, d), L),
        ParamSpec("down_proj.weight", (d, inter), L),
        ParamSpec("input_layernorm.weight", (d,), L),
        ParamSpec("post_attention_layernorm.weight", (d,), L),
    ]
    if qkv_bias:
        layer += [
            ParamSpec("q_proj.bias", (dq,), L),
            ParamSpec("k_proj.bias", (dkv,), L),
            ParamSpec("v_proj.bias", (dkv,), L),
        ]
    if o_bias:
        layer.append(ParamSpec("o_proj.bias", (d,), L))
    if mlp_bias:
        layer += [
            ParamSpec("gate_proj.bias", (inter,), L),
            ParamSpec("up_proj.bias", (inter,), L),
            ParamSpec("down_proj.bias", (d,), L),
        ]
    if qk_norm:
        layer += [ParamSpec("q_norm.weight", (hd,), L), ParamSpec("k_norm.weight", (hd,), L)]
    params = [ParamSpec("embed_tokens.weight", (v, d)), *layer, ParamSpec("norm.weight", (d,))]
    if not tied:
        params.append(ParamSpec("lm_head.weight", (v, d)))
    linears = [
        LinearSpec("q_proj", d, dq, L, "norm1"),
        LinearSpec("k_proj", d, dkv, L, "norm1"),
        LinearSpec("v_proj", d, dkv, L, "norm1"),
        LinearSpec("o_proj", dq, d, L, "attn_out"),
        LinearSpec("gate_proj", d, inter, L, "norm2"),
        LinearSpec("up_proj", d, inter, L, "norm2"),
        LinearSpec("down_proj", inter, d, L, "mlp_act"),
    ]
    return ModelShape(name, "llama", v, d, L, h, kv, hd, inter, tied, params, linears, qk_norm=qk_norm)


def _gpt2_shape(name: str, cfg) -> ModelShape:
    d, L, v, h = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_head
    inter = cfg.n_inner or 4 * d
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    layer = [
        ParamSpec("ln_1.weight", (d,), L),
        ParamSpec("ln_1.bias", (d,), L),
        ParamSpec("attn.c_attn.weight", (d, 3 * d), L),
        ParamSpec("attn.c_attn.bias", (3 * d,), L),
        ParamSpec("attn.c_proj.weight", (d, d), L),
        ParamSpec("attn.c_proj.bias", (d,), L),
        ParamSpec("ln_2.weight", (d,), L),
        ParamSpec("ln_2.bias", (d,), L),
        ParamSpec("mlp.c_fc.weight", (d, inter), L),
        ParamSpec("mlp.c_fc.bias", (inter,), L),
        ParamSpec("mlp.c_proj.weight", (inter, d), L),
        ParamSpec("mlp.c_proj.bias", (d,), L),
    ]
    params = [
        ParamSpec("wte.weight", (v, d)),
        ParamSpec("wpe.weight", (cfg.n_positions, d)),
        *layer,
        ParamSpec("ln_f.weight", (d,)),
        ParamSpec("ln_f.bias", (d,)),
    ]
    if not tied:
        params.append(ParamSpec("lm_head.weight", (v, d)))
    # peft matches leaf names, so "c_proj" adapts both the attention and the MLP projection.
    linears = [
        LinearSpec("c_attn", d, 3 * d, L, "norm1"),
        LinearSpec("c_proj", d, d, L, "attn_out"),
        LinearSpec("c_fc", d, inter, L, "norm2"),
        LinearSpec("c_proj", inter, d, L, "mlp_act"),
    ]
    return ModelShape(name, "gpt2", v, d, L, h, h, d // h, inter, tied, params, linears)


def _generic_shape(name: str, cfg) -> ModelShape:
    """Any other causal LM: count its parameters on the meta device (no memory) and read the block's sizes."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = [ParamSpec(n, tuple(p.shape)) for n, p in model.named_parameters()]
    linears: dict[tuple[str, int, int], int] = {}
    for mod_name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        leaf = mod_name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear):
            key = (leaf, mod.in_features, mod.out_features)
        elif type(mod).__name__ == "Conv1D" and w is not None:  # GPT-2 style [in, out] weights
            key = (leaf, w.shape[0], w.shape[1])
        else:
            continue
        if leaf != "lm_head":
            linears[key] = linears.get(key, 0) + 1
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    h = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or h
    return ModelShape(
        name,
        "generic",
        cfg.vocab_size,
        d,
        getattr(cfg, "num_hidden_layers", None) or cfg.n_layer,
        h,
        kv,
        getattr(cfg, "head_dim", None) or d // h,
        getattr(cfg, "intermediate_size", None) or 4 * d,
        bool(getattr(cfg, "tie_word_embeddings", False)),
        params,
        [LinearSpec(n, i, o, c) for (n, i, o), c in linears.items()],
    )


def shape_from_hf_config(cfg, name: str | None = None) -> ModelShape:
    """ModelShape of a transformers config: exact formulas for Llama-family and GPT-2, meta counting otherwise."""
    name = name or getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", "model")
    mt = getattr(cfg, "model_type", "")
    if mt in _LLAMA_FAMILY:
        return _llama_shape(name, cfg)
    if mt == "gpt2":
        return _gpt2_shape(name, cfg)
    return _generic_shape(name, cfg)


def model_shape(model: str, vocab_size: int | None = None) -> ModelShape:
    """Shapes of a named architecture, a config.json (or a directory holding one), or a cached hub config."""
    from engine.config import NAMED_ARCHITECTURES
    from engine.model import _named_config, default_vocab_size

    if model in NAMED_ARCHITECTURES:
        return shape_from_hf_config(_named_config(model, vocab_size or default_vocab_size()), model)
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--model {model}: cannot read it as a config.json: {e}") from None
        if "model_type" not in data:
            raise PlanError(f"--model {model}: the config has no 'model_type' key; pass a Hugging Face config.json")
        cfg = AutoConfig.for_model(**data)
        return shape_from_hf_config(cfg, model)
    # The local cache first, then the known shapes, and only then the network: planning a preset
    # offline must not wait on hub timeouts.
    try:
        cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # not cached (or not a local directory): transformers raises OSError/ValueError variants
        cfg = None
    if cfg is not None:
        return shape_from_hf_config(cfg, model)
    if model in HUB_ALIASES:
        return dataclasses.replace(model_shape(HUB_ALIASES[model]), name=model)
    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # offline, missing, or gated
        raise PlanError(
            f"--model {model!r} is not a named architecture ({', '.join(NAMED_ARCHITECTURES)}), a config.json, "
            f"or a hub config available offline ({type(e).__name__}: {e}); pass the path of the model's config.json"
        ) from None
    return shape_from_hf_config(cfg, model)


# ------------------------------------------------------------------------------------ settings

DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PlanSettings:
    """What a plan depends on: a run's `Config` and where the run happens.

    Every training setting (model, ZeRO stage, precision, LoRA, offloading, batch geometry,
    checkpointing, loss backend, reference mode, objective, the user's DeepSpeed JSON) is read from
    `config`, the trainer's own schema; only what a config cannot know is added here: the number of
    ranks, the device the plan is for (its fused-loss chunk budget, its attention kernel and its
    runtime constant) and that constant.
    """

    config: Config = field(default_factory=Config)
    nodes: int = 1
    gpus_per_node: int = 1
    device: str = "cuda"
    runtime_overhead_gib: float | None = None  # None: 1.0 GiB on CUDA (context + NCCL), CPU_RUNTIME_BYTES on CPU

    def __post_init__(self):
        for k in ("nodes", "gpus_per_node"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"{k} must be an integer >= 1, got {v!r}")
        if self.device not in DEVICES:
            raise PlanError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.runtime_overhead_gib is not None and self.runtime_overhead_gib < 0:
            raise PlanError(f"runtime_overhead_gib must be >= 0, got {self.runtime_overhead_gib}")
        if not isinstance(self.config, Config):
            raise PlanError(f"config must be an engine.config.Config, got {type(self.config).__name__}")

    @classmethod
    def of(cls, overrides: dict[str, Any] | None = None, *, base: Config | None = None, **where) -> PlanSettings:
        """Settings from `{"section.field": value}` overrides of `base` (default: Config()), validated as
        the trainer validates them; `where` sets nodes, gpus_per_node, device, runtime_overhead_gib."""
        return cls(config=config_with(base or Config(), overrides or {}), **where)

    def with_config(self, overrides: dict[str, Any]) -> PlanSettings:
        return dataclasses.replace(self, config=config_with(self.config, overrides))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens(self) -> int:
        return self.config.data.rows_per_batch * self.config.data.max_tokens_per_row

    @property
    def runtime_bytes(self) -> int:
        if self.runtime_overhead_gib is not None:
            return int(self.runtime_overhead_gib * GIB)
        return GIB if self.device == "cuda" else CPU_RUNTIME_BYTES


def config_with(base: Config, overrides: dict[str, Any]) -> Config:
    """`base` with `{"section.field": value}` overrides, through the config's own parsing and validation."""
    from engine.config import ConfigError, from_dict

    nested = base.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in nested or name not in nested[section]:
            raise PlanError(
                f"unknown config setting {key!r}; settings are named section.field (see python -m engine.config --help)"
            )
        nested[section][name] = value
    try:
        return from_dict(nested)
    except ConfigError as e:
        raise PlanError(str(e)) from None


# ------------------------------------------------------------------------------------ the plan


@dataclass
class MemoryPlan:
    """Per-GPU bytes of each component and the peak.

    The components are the full size of each kind of memory; they are not all resident at once.
    `at_peak` holds what is live at the peak: the static parts (weights, optimizer states, reference,
    buffers, runtime) and either the backward pass's (activations + the loss's logits block, plus the
    gradients when they accumulate over micro-batches) or the optimizer step's (every gradient),
    whichever is larger (`peak_phase`). `total` is their sum.
    """

    weights: int
    gradients: int
    optimizer: int  # master weights + Adam moments
    activations: int
    logits: int
    reference: int
    buffers: int
    runtime: int
    total: int
    peak_phase: str
    at_peak: dict
    master_weights: int
    optimizer_moments: int
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    logits_fused: int
    logits_eager: int
    logits_block: int  # the fused loss's logits buffer, block + one chunk rows (logits_fused adds the head's dW)
    reference_cached: int
    reference_on_the_fly: int
    parameters: int
    trainable_parameters: int
    lora_parameters: int
    tokens_per_micro_batch: int
    world_size: int
    block_rows: int
    activation_bytes_per_token_layer: int
    attn_implementation: str
    settings: dict = field(default_factory=dict)

    COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "reference", "buffers", "runtime")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gib"] = {k: d[k] / GIB for k in (*self.COMPONENTS, "total")}
        return d

    def summary(self) -> str:
        """One log line: the peak and what is live at it, in GiB."""
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.at_peak.items())
        return f"memory plan per GPU: peak {self.total / GIB:.2f} GiB in the {self.peak_phase} ({parts})"

    def table(self, gpu_bytes: int | None = None) -> str:
        s = self.settings
        m, p, d = s["config"]["model"], s["config"]["parallel"], s["config"]["data"]
        alt = {
            "activations": f"checkpointing {'on' if m['gradient_checkpointing'] else 'off'}; "
            f"with: {_gib(self.activations_with_checkpointing)}, "
            f"without: {_gib(self.activations_without_checkpointing)}",
            "logits": f"loss backend {s['config']['loss']['backend']}; fused: {_gib(self.logits_fused)} "
            f"(block {self.block_rows} rows), eager: {_gib(self.logits_eager)}",
            "reference": f"ref_cache.mode {s['config']['ref_cache']['mode']}; cache: {_gib(self.reference_cached)}, "
            f"on the fly: {_gib(self.reference_on_the_fly)}",
            "optimizer": f"master {_gib(self.master_weights)} + moments {_gib(self.optimizer_moments)}",
            "buffers": f"DeepSpeed ZeRO-{p['zero_stage']} buckets / gathered params",
            "runtime": "CUDA context + NCCL (constant)" if s["device"] == "cuda" else "autograd/oneDNN/allocator state",
        }
        head = (
            f"{m['name']}: {self.parameters:,} parameters ({self.trainable_parameters:,} trained"
            + (f", LoRA r={m['lora_r']}" if m["lora_r"] else "")
            + f"); {s['nodes']} node(s) x {s['gpus_per_node']} {s['device'].upper()} rank(s) = {self.world_size}, "
            + f"ZeRO-{p['zero_stage']}, {p['precision']}"
            + (", offload optimizer" if p["offload_optimizer"] else "")
            + (", offload params" if p["offload_params"] else "")
            + f"\nmicro-batch: {d['rows_per_batch']} row(s) x {d['max_tokens_per_row']} tokens = "
            + f"{self.tokens_per_micro_batch:,} tokens; objective {s['config']['loss']['objective']}; "
            + f"attention {self.attn_implementation}"
        )
        lines = [head, "", f"{'component (per GPU)':<22}{'GiB':>10}{'at peak':>10}  notes", "-" * 88]
        for k in self.COMPONENTS:
            full, live = getattr(self, k) / GIB, self.at_peak.get(k, 0) / GIB
            lines.append(f"{k:<22}{full:>10.3f}{live:>10.3f}  {alt.get(k, '')}")
        lines.append("-" * 88)
        lines.append(f"{'peak (' + self.peak_phase + ')':<22}{'':>10}{self.total / GIB:>10.3f}")
        if gpu_bytes is not None:
            verdict = "fits" if self.total <= gpu_bytes else "does NOT fit"
            lines.append(f"{'device memory':<22}{'':>10}{gpu_bytes / GIB:>10.3f}  {verdict}")
        return "\n".join(lines)


def _gib(x: int) -> str:
    return f"{x / GIB:.3f} GiB"


def activation_bytes_per_token_layer(shape: ModelShape, act_bytes: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing), FlashAttention, no dropout.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    34 * h bytes + 5 * a * s per token per layer for a GPT block in 16-bit; adapted here to what the
    HF blocks actually save, with a = act_bytes (2 in bf16/fp16, 4 in fp32), D hidden, Dq = heads x
    head_dim, Dkv = kv_heads x head_dim, H heads, I intermediate:
      Llama (RMSNorm, GQA, SwiGLU):
        2 norms x (4*D + 4)      HF RMSNorm saves its fp32 upcast input and fp32 rstd,
        2 norms x 2*a*D          the normalised x cast back (saved by the weight multiply) and the
                                 output (saved by q/k/v, resp. gate/up: one tensor each)
        a*(Dq + 2*Dkv)           q, k, v after RoPE, kept by FlashAttention
        a*Dq + 4*H               attention output (also o_proj's input) and fp32 logsumexp per head;
                                 no [s, s] score matrix: FlashAttention recomputes it in backward
        4*a*I                    gate output (SiLU input), SiLU output, up output, their product (down's input)
        (Qwen3 q/k norms add (4 + a) * (Dq + Dkv))
      GPT-2 (LayerNorm, MHA, tanh-GELU): 2 x (a*D + 8) LayerNorm inputs and mean/rstd, 2 x a*D
        normalised outputs, the same attention terms with Dkv = D, and 2*a*I for the MLP (c_fc's
        output, the GELU's input, and the GELU's output, c_proj's input: engine.model gives every
        model torch's fused tanh-GELU, whose backward needs its input only).
    For Llama-3.1-8B in bf16: 20*D + 4*Dkv + 8*I + 4*H + 8 = 200,840 bytes (about 49 * D).
    LoRA changes these terms: see `lora_activation_delta`. tests/test_plan.py checks both byte for
    byte against the tensors autograd saves (saved_tensors_hooks) on llama-tiny, with PyTorch's CPU
    flash-attention kernel, which saves what FlashAttention does.
    """
    a, d, hq = act_bytes, shape.hidden_size, shape.num_heads
    dq, dkv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attn = a * (dq + 2 * dkv) + a * dq + 4 * hq
    if shape.family == "gpt2":
        norms = 2 * (a * d + 8) + 2 * a * d
        mlp = 2 * a * shape.intermediate_size
    else:
        norms = 2 * (4 * d + 4 + 2 * a * d)
        mlp = 4 * a * shape.intermediate_size
    if shape.qk_norm:
        attn += (4 + a) * (dq + dkv)
    return norms + attn + mlp


def lora_activation_delta(
    shape: ModelShape, act_bytes: int, r: int, adapted: list[LinearSpec], dropout: float
) -> tuple[int, int]:
    """(bytes per token per layer, bytes per token once per model) that LoRA adds to the full-training formula.

    With the base frozen, no weight gradient needs a linear's input, so the base linears stop saving
    theirs: the norms' outputs and the down/c_proj input (-a*D per norm, -a*I), and the norms'
    weight multiplies stop saving the cast normalised x (-a*D per RMSNorm; LayerNorm saves its input
    either way). peft keeps the adapters in fp32 (autocast_adapter_dtype) and casts each adapted
    linear's input to fp32 for lora_A: + 4*in per adapted linear in half precision (each casts its
    own copy; in fp32 the cast is a no-op, so one shared 4*in per distinct input, none for o_proj,
    whose input FlashAttention keeps anyway), + 4*r for lora_A's output. With dropout each adapted
    linear keeps its own dropped fp32 copy and a bool mask: 5*in + 4*r (CUDA's fused dropout; this
    term is not checked byte for byte, since CPU dropout keeps a float mask). Once per model: the
    first layer's input norm saves nothing (the frozen embedding's output needs no gradient) and
    the final RMSNorm skips its cast copy.
    """
    a, d, i = act_bytes, shape.hidden_size, shape.intermediate_size
    gpt2 = shape.family == "gpt2"
    per_layer = -(2 * a * d) - a * i - (0 if gpt2 else 2 * a * d)
    per_model = -(a * d + 8) if gpt2 else -(4 * d + 4) - a * d
    layers = shape.num_layers
    if dropout > 0:
        total = sum((5 * lin.in_features + 4 * r) * lin.count for lin in adapted)
    elif a == 2:
        total = sum((4 * lin.in_features + 4 * r) * lin.count for lin in adapted)
    else:
        sources = {(lin.source or lin.name, lin.in_features): lin.count for lin in adapted if lin.source != "attn_out"}
        total = sum(4 * r * lin.count for lin in adapted) + sum(4 * f * c for (_, f), c in sources.items())
    # Linears are listed with count = layers, so the sum over them divides into a per-layer figure.
    return per_layer + total // layers, per_model


def _final_bytes_per_token(shape: ModelShape, act_bytes: int) -> int:
    """Once per model: the final norm's saved tensors, its output (the hidden states handed to the
    loss, whose gradient [N, D] the fused loss keeps) and, for RoPE models, the cos/sin tables all
    layers share."""
    a, d = act_bytes, shape.hidden_size
    if shape.family == "gpt2":
        return (a * d + 8) + a * d
    return (4 * d + 4 + a * d) + a * d + 2 * a * shape.head_dim


def _fused_block_rows(vocab_size: int, itemsize: int, device: str) -> tuple[int, int]:
    """(block rows, GEMM chunk rows) of the fused loss's logits walk on `device` (the kernels' own sizes)."""
    import torch

    from ddpo_kernels import default_block_rows, default_chunk_rows

    dtype = {2: torch.bfloat16, 4: torch.float32}.get(itemsize, torch.float32)
    return default_block_rows(vocab_size, dtype, device), default_chunk_rows(device)


def planned_attn_implementation(requested: str, device: str, model_type: str | None) -> str:
    """The attention kernel a run on `device` gets (engine.model's choice; on CUDA flash-attn is assumed
    installed, as it should be for a GPU run)."""
    from engine.attention import NAME, VARLEN_MODEL_TYPES

    if requested != "auto":
        return requested
    if device == "cuda":
        return "flash_attention_2"
    return NAME if model_type is None or model_type in VARLEN_MODEL_TYPES else "sdpa"


def _attention_extra_bytes_per_token_layer(shape: ModelShape, act_bytes: int, attn: str, row_len: int) -> int:
    """What the chosen attention keeps beyond FlashAttention's q, k, v, output and logsumexp.

    sdpa_varlen: the per-sequence outputs SDPA keeps and their concatenation (o_proj's input) are two
    tensors, + a * Dq. eager: the softmax output [heads, L, L] of each row, + a * H * L per token.
    sdpa over a packed row: its [L, L] bool mask is once per forward, not per layer (not counted).
    """
    if attn == "sdpa_varlen":
        return act_bytes * shape.num_heads * shape.head_dim
    if attn == "eager":
        return act_bytes * shape.num_heads * row_len
    return 0


def plan_memory(settings: PlanSettings, shape: ModelShape | None = None) -> MemoryPlan:
    """Per-GPU memory plan of `settings`. `shape` skips resolving the config's model again."""
    s = settings
    cfg = s.config
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if shape is None:
        shape = model_shape(m.name)
    W = s.world_size
    mixed = p.precision in ("bf16", "fp16")
    w = 2 if mixed or m.dtype in ("bfloat16", "float16") else 4  # weights, gradients and activations
    n = s.tokens
    v, dh = shape.vocab_size, shape.hidden_size

    P = shape.num_parameters
    lora_linears = shape.lora_linears(m.lora_target_modules) if m.lora_r else []
    A = sum(m.lora_r * (lin.in_features + lin.out_features) * lin.count for lin in lora_linears)
    T = A if m.lora_r else P
    zero = p.zero_stage

    def zero3_split(x: int) -> int:
        return -(-x // W) if zero == 3 else x  # ceil: DeepSpeed pads partitions up

    weights = 0 if p.offload_params else zero3_split((P + A) * w)
    if p.offload_optimizer:
        gradients = 0
    else:
        gradients = T * w if zero in (0, 1) else -(-(T * w) // W)
    # Mixed precision: fp32 master + fp32 m and v. Plain training keeps m and v in the weights' dtype.
    master_per, moments_per = (4, 8) if mixed else (0, 2 * w)
    opt_div = 1 if zero == 0 else W
    master = 0 if p.offload_optimizer else -(-(T * master_per) // opt_div)
    moments = 0 if p.offload_optimizer else -(-(T * moments_per) // opt_div)

    attn = planned_attn_implementation(m.attn_implementation, s.device, _model_type(shape))
    per_layer = activation_bytes_per_token_layer(shape, w)
    per_layer += _attention_extra_bytes_per_token_layer(shape, w, attn, d.max_tokens_per_row)
    final = _final_bytes_per_token(shape, w)
    if m.lora_r:
        layer_delta, model_delta = lora_activation_delta(shape, w, m.lora_r, lora_linears, m.lora_dropout)
        per_layer, final = per_layer + layer_delta, final + model_delta
    act_without = n * (shape.num_layers * per_layer + final)
    act_with = n * (shape.num_layers * w * dh + per_layer + final)
    activations = act_with if m.gradient_checkpointing else act_without

    block, chunk = _fused_block_rows(v, w, s.device)
    head_trained = m.lora_r == 0
    # The walk's one logits buffer holds a block plus the GEMM chunk it shares with the next block, never
    # more than the micro-batch's tokens rounded up to whole chunks (ddpo_kernels._common.Walk).
    logits_block = min(block + chunk, -(-n // chunk) * chunk) * v * w
    logits_fused = logits_block + (v * dh * 4 if head_trained else 0)
    logits_eager = n * v * (w + 4 + 4)
    logits = logits_eager if cfg.loss.backend == "eager" else logits_fused

    ref_bytes = 2 if cfg.ref_cache.dtype == "bfloat16" else 4
    needs_ref = cfg.loss.needs_reference  # orpo/dorpo/sft have no reference term
    ref_fly = 0 if (not needs_ref or m.lora_r or p.offload_params) else zero3_split(P * ref_bytes)
    reference = ref_fly if cfg.ref_cache.mode == "off" else 0

    buffers = _deepspeed_buffers(s, shape, w, T)
    runtime = s.runtime_bytes
    optimizer = master + moments
    static = {
        "weights": weights,
        "optimizer": optimizer,
        "reference": reference,
        "buffers": buffers,
        "runtime": runtime,
    }
    # Gradients of earlier micro-batches stay resident through a later backward.
    accumulated = gradients if cfg.optim.grad_accum > 1 else 0
    backward = {"activations": activations, "logits": logits, "gradients": accumulated}
    # A tied input embedding gets its dense [V, D] gradient last and adds it to the head's: one more [V, D]
    # beside every gradient at the end of the backward (untied, autograd keeps the first gradient as is).
    tied_grad = v * dh * w if shape.tied_embeddings and head_trained and not p.offload_optimizer and zero < 2 else 0
    step = {"gradients": gradients + tied_grad}
    phase, live = ("backward", backward) if sum(backward.values()) >= sum(step.values()) else ("optimizer step", step)
    at_peak = {k: v_ for k, v_ in {**static, **live}.items() if v_}
    return MemoryPlan(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        reference=reference,
        buffers=buffers,
        runtime=runtime,
        total=sum(at_peak.values()),
        peak_phase=phase,
        at_peak=at_peak,
        master_weights=master,
        optimizer_moments=moments,
        activations_with_checkpointing=act_with,
        activations_without_checkpointing=act_without,
        logits_fused=logits_fused,
        logits_eager=logits_eager,
        logits_block=logits_block,
        reference_cached=0,
        reference_on_the_fly=ref_fly,
        parameters=P,
        trainable_parameters=T,
        lora_parameters=A,
        tokens_per_micro_batch=n,
        world_size=W,
        block_rows=block,
        activation_bytes_per_token_layer=per_layer,
        attn_implementation=attn,
        settings=_settings_record(s),
    )


def _settings_record(s: PlanSettings) -> dict:
    return {
        "config": s.config.to_dict(),
        "nodes": s.nodes,
        "gpus_per_node": s.gpus_per_node,
        "device": s.device,
        "runtime_overhead_gib": s.runtime_bytes / GIB,
    }


def _model_type(shape: ModelShape) -> str | None:
    return {"llama": "llama", "gpt2": "gpt2"}.get(shape.family)


def deepspeed_zero_settings(s: PlanSettings) -> dict:
    """The ZeRO bucket settings the run's DeepSpeed JSON resolves to (engine.parallelize builds it; the
    user's parallel.deepspeed_config overrides it), with DeepSpeed's defaults for the keys it leaves out."""
    from engine.parallelize import deepspeed_config

    zero = deepspeed_config(s.config, total_steps=1, device_type=s.device)["zero_optimization"]
    out = {k: int(zero.get(k, dflt)) for k, dflt in DEEPSPEED_DEFAULTS.items()}
    out["overlap_comm"] = bool(zero.get("overlap_comm", s.config.parallel.zero_stage == 3))
    return out


def _deepspeed_buffers(s: PlanSettings, shape: ModelShape, w: int, trainable: int) -> int:
    zero = s.config.parallel.zero_stage
    ds = deepspeed_zero_settings(s)
    overlap, bucket = ds["overlap_comm"], ds["reduce_bucket_size"]
    if zero == 0:
        # One rank: the engine skips DeepSpeed's all-reduce (engine.parallelize). Several: DeepSpeed flattens
        # up to 5e8 gradient elements into one bucket per all-reduce (freed after; counted as resident).
        return 0 if s.world_size == 1 else min(trainable, ZERO0_ALLREDUCE_ELEMENTS) * w
    if zero == 1:
        # ZeRO-1 stages the reduction in an fp32 accumulator bucket (stage_1_and_2.setup_buckets).
        return bucket * 4 * (2 if overlap else 1)
    if zero == 2:
        return bucket * w * (2 if overlap else 1)
    # ZeRO-3: one reduce bucket per gradient dtype (stage3.py allocates it once), the parameters
    # gathered for the module running now plus the prefetch bucket, and the persistent small tensors.
    largest = max(p_.numel for p_ in shape.params)
    gathered = min(ds["max_live_parameters"], largest + ds["prefetch_bucket_size"])
    persistent = sum(p_.numel * p_.count for p_ in shape.params if p_.numel < ds["param_persistence_threshold"])
    return bucket * w + (gathered + persistent) * w


# ------------------------------------------------------------------------------------ fitting


def largest_fitting(
    settings: PlanSettings, gpu_bytes: int, *, field: str = "max_tokens_per_row", step: int | None = None
) -> int:
    """Largest value of data.`field` (max_tokens_per_row or rows_per_batch), a multiple of `step`, whose plan fits.

    step defaults to 128 tokens (a tile-friendly row length) or 1 row. A row must hold a pair
    (max_tokens_per_row >= 2 x data.max_length, as the config requires), so the search starts there.
    Returns 0 when not even the smallest valid value fits. Memory grows with the micro-batch, so an
    exponential search for an upper bound followed by bisection finds the boundary exactly.
    """
    if field not in ("max_tokens_per_row", "rows_per_batch"):
        raise PlanError(f"largest_fitting field must be max_tokens_per_row or rows_per_batch, got {field!r}")
    step = step or (128 if field == "max_tokens_per_row" else 1)
    if step < 1:
        raise PlanError(f"step must be >= 1, got {step}")
    shape = model_shape(settings.config.model.name)
    low = -(-2 * settings.config.data.max_length // step) if field == "max_tokens_per_row" else 1

    def fits(k: int) -> bool:
        return plan_memory(settings.with_config({f"data.{field}": k * step}), shape).total <= gpu_bytes

    if not fits(low):
        return 0
    lo, hi = low, 2 * low
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * step > 2**40:  # a trillion tokens per row: the formula has no memory term left
            raise PlanError(f"{field} never stops fitting in {gpu_bytes} bytes; check the settings")
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ------------------------------------------------------------------------------------ run configs


def settings_from_config(cfg: Config, world_size: int, device: str | None = None) -> PlanSettings:
    """PlanSettings of a run config on `world_size` ranks of `device` (default: CUDA when available, else CPU)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return PlanSettings(config=cfg, nodes=1, gpus_per_node=world_size, device=device)


def plan_from_config(cfg: Config, world_size: int, device: str | None = None) -> MemoryPlan:
    """The memory plan of a run config on `world_size` ranks; the trainer logs it at start-up."""
    return plan_memory(settings_from_config(cfg, world_size, device))


# ------------------------------------------------------------------------------------ CLI

# Short flags of the CLI and the config setting each one sets (values mapped where the words differ).
_ALIASES = {
    "model": "model.name",
    "zero": "parallel.zero_stage",
    "precision": "parallel.precision",
    "lora_r": "model.lora_r",
    "lora_targets": "model.lora_target_modules",
    "lora_dropout": "model.lora_dropout",
    "offload_optimizer": "parallel.offload_optimizer",
    "offload_params": "parallel.offload_params",
    "max_tokens_per_row": "data.max_tokens_per_row",
    "rows_per_batch": "data.rows_per_batch",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "loss": "loss.backend",
    "ref": "ref_cache.mode",
    "ref_dtype": "ref_cache.dtype",
    "objective": "loss.objective",
}
_VALUE_MAP = {
    "loss": {"fused": "auto", "eager": "eager"},
    "ref": {"cache": "auto", "on_the_fly": "off"},
    "ref_dtype": {"bf16": "bfloat16", "fp32": "float32"},
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m engine.plan",
        description="Per-GPU memory budget of a preference-training run and the largest micro-batch that fits. "
        "The run is an engine config: --config FILE and/or --section.field VALUE overrides (as for engine.train), "
        "or the short flags below, which set the config fields of the same meaning.",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="a run config (YAML); without it the plan starts from the config "
        "defaults with --model llama-8b --precision bf16",
    )
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    ap.add_argument(
        "--device",
        choices=DEVICES,
        default="cuda",
        help="what the ranks are: sets the fused loss's chunk budget, the attention kernel and the runtime constant",
    )
    ap.add_argument(
        "--model", default=None, help="model.name: named architecture, config.json path, or cached hub name"
    )
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="parallel.zero_stage")
    ap.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="parallel.precision (bf16/fp16: mixed precision with fp32 master weights and Adam states)",
    )
    ap.add_argument("--lora-r", type=int, default=None, help="model.lora_r (0: train all weights)")
    ap.add_argument("--lora-targets", default=None, help="model.lora_target_modules, comma-separated")
    ap.add_argument("--lora-dropout", type=float, default=None, help="model.lora_dropout")
    ap.add_argument(
        "--offload-optimizer", action="store_const", const=True, default=None, help="parallel.offload_optimizer"
    )
    ap.add_argument("--offload-params", action="store_const", const=True, default=None, help="parallel.offload_params")
    ap.add_argument("--max-tokens-per-row", type=int, default=None, help="data.max_tokens_per_row")
    ap.add_argument("--rows-per-batch", type=int, default=None, help="data.rows_per_batch")
    ap.add_argument(
        "--gradient-checkpointing", action="store_const", const=True, default=None, help="model.gradient_checkpointing"
    )
    ap.add_argument("--loss", choices=("fused", "eager"), default=None, help="loss.backend (fused: auto)")
    ap.add_argument(
        "--ref", choices=("cache", "on_the_fly"), default=None, help="ref_cache.mode (cache: auto, on_the_fly: off)"
    )
    ap.add_argument("--ref-dtype", choices=("bf16", "fp32"), default=None, help="ref_cache.dtype")
    ap.add_argument("--objective", choices=OBJECTIVES, default=None, help="loss.objective")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="device memory in GiB to fit into")
    ap.add_argument(
        "--runtime-overhead-gb",
        type=float,
        default=None,
        help="runtime constant, GiB (default: 1.0 for the CUDA context + NCCL; CPU_RUNTIME_BYTES on CPU)",
    )
    ap.add_argument(
        "--fit",
        choices=("max_tokens_per_row", "rows_per_batch"),
        default="max_tokens_per_row",
        help="what the fit search varies",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def _settings_from_args(args: argparse.Namespace, overrides: list[str]) -> PlanSettings:
    from engine.config import ConfigError, load_config

    flags = {k: getattr(args, k) for k in _ALIASES if getattr(args, k) is not None}
    if args.config is None:
        flags = {"model": "llama-8b", "precision": "bf16", **flags}
    argv = (["--config", args.config] if args.config else []) + list(overrides)
    for k, v in flags.items():
        v = _VALUE_MAP.get(k, {}).get(v, v)
        argv += [f"--{_ALIASES[k]}", str(v).lower() if isinstance(v, bool) else str(v)]
    try:
        cfg = load_config(argv, default_preset=None, prog="python -m engine.plan")
    except ConfigError as e:
        raise PlanError(str(e)) from None
    return PlanSettings(
        config=cfg,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        device=args.device,
        runtime_overhead_gib=args.runtime_overhead_gb,
    )


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        settings = _settings_from_args(args, rest)
        gpu_bytes = int(args.gpu_memory_gb * GIB)
        shape = model_shape(settings.config.model.name)
        plan = plan_memory(settings, shape)
        best = largest_fitting(settings, gpu_bytes, field=args.fit)
    except PlanError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out: dict[str, Any] = plan.to_dict()
        out["gpu_memory_bytes"] = gpu_bytes
        out["fits"] = plan.total <= gpu_bytes
        out["largest_fitting"] = {args.fit: best}
        print(json.dumps(out, indent=2))
        return 0
    print(plan.table(gpu_bytes))
    unit = "tokens per row" if args.fit == "max_tokens_per_row" else "rows per micro-batch"
    if best:
        print(f"largest {args.fit} that fits {args.gpu_memory_gb:g} GiB: {best:,} {unit}")
    else:
        static = sum(plan.at_peak.get(k, 0) for k in ("weights", "optimizer", "reference", "buffers", "runtime"))
        print(
            f"nothing fits {args.gpu_memory_gb:g} GiB: the static parts alone need {static / GIB:.3f} GiB; "
            "try a higher ZeRO stage, offloading or LoRA"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
