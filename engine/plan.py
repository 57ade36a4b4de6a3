"""Memory planner: the per-GPU memory budget of a training configuration, and the largest micro-batch that fits.

Where this sits: beside the flow, not in it. Before a run, `python -m engine.plan ...` answers "does
this fit, and how long can the packed rows be?"; at start-up the trainer logs
`plan_from_config(cfg, world_size)` next to the measured peak so a gap between model and reality is
visible in the first log lines. Nothing here allocates memory: shapes come from the model's config
(named architectures of engine.model, a config.json, or a hub config already in the local cache).

    python -m engine.plan --model llama-8b --nodes 4 --gpus-per-node 8 --zero 3 \
        --max-tokens-per-row 8192 --gradient-checkpointing --lora-r 128 --gpu-memory-gb 80

The budget (all sizes in bytes, per GPU; N = rows_per_batch * max_tokens_per_row tokens of one
micro-batch; P parameters, T trainable parameters (P, or the LoRA adapters' count), W = nodes x
gpus_per_node data-parallel ranks; w = 2 bytes in bf16/fp16, 4 in fp32):

- weights: (P + adapters) * w, divided by W under ZeRO-3, 0 on the GPU with --offload-params.
  LoRA base weights are frozen and stored in w bytes too.
- gradients: T * w (ZeRO 0/1), T * w / W (ZeRO 2/3); 0 with --offload-optimizer (ZeRO-Offload moves
  each reduced gradient partition to CPU; the reduce bucket that stays is under buffers).
- optimizer states (master + moments): mixed precision keeps an fp32 master copy (4 bytes) and Adam's
  fp32 m and v (4 + 4): 12 bytes per trainable parameter; fp32 training has no master copy (8 bytes).
  Divided by W under ZeRO >= 1; 0 on the GPU with --offload-optimizer. (So bf16 mixed precision is
  the usual 2 + 4 + 4 + 4 bytes per trained parameter for weights/master/m/v, and 2 for gradients.)
- activations: see `activation_bytes_per_token_layer` for the per-layer formula (a Llama block with
  FlashAttention: no seq^2 term). Without checkpointing every layer's saved tensors live until its
  backward; with checkpointing (HF, one checkpoint per decoder layer) only each layer's input
  (w * hidden per token) is kept, plus one layer's full activations while it is recomputed.
- logits: eager (HF-style full logits) N * V * (w + 4 + 4): the logits in the compute dtype, the fp32
  log-softmax kept for backward and its fp32 gradient. Fused (ddpo_kernels.fused_preference_loss): one
  block of logits, chunk = ddpo_kernels.default_block_rows(V) rows (the CPU default, a 128 MiB fp32
  block; on a GPU default_block_rows(V, dtype, "cuda") rows of the input dtype, 1 GiB), plus the
  fp32 [V, D] dW accumulator the kernel fills when the LM head is trained (full
  fine-tuning; LoRA leaves the head frozen). The [N, D] hidden gradient and the head's own gradient
  are the same for both paths and are counted elsewhere (activations, gradients).
- reference model: 0 with the reference log-prob cache (engine.refcache) or for objectives without a
  reference (orpo, dorpo, sft); on the fly, a frozen copy of P parameters in --ref-dtype (divided by
  W under ZeRO-3, as TRL prepares it with the policy's ZeRO-3 config; 0 on the GPU with
  --offload-params), or 0 with LoRA (the reference is the base model with the adapters disabled).
  The reference forward runs under no_grad before the policy forward, so its transient activations
  do not add to the policy's peak.
- DeepSpeed buffers (DeepSpeed 0.19 defaults, see DEEPSPEED_DEFAULTS): ZeRO-1 allocates one fp32
  gradient-reduction bucket of reduce_bucket_size elements, ZeRO-2 one in the gradient dtype (two
  with overlap_comm); ZeRO-3 one reduce bucket in the gradient dtype, the gathered parameters in
  flight (the largest single tensor, the LM head or embedding, plus one prefetch bucket, capped by
  max_live_parameters) and the small "persistent" parameters (numel below
  param_persistence_threshold: norms, biases) that every rank keeps whole. ZeRO-0 reduces in place.
- runtime: a constant for the CUDA context and NCCL communicators (--runtime-overhead-gb, default 1.0
  GiB; measure yours with torch.cuda.mem_get_info before the model is built). Allocator
  fragmentation is not modelled: leave headroom in --gpu-memory-gb.

total = the sum of the above: a conservative peak (the activation and logits peaks happen in the
same backward pass; the static parts are resident throughout).
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

from engine.config import OBJECTIVES, PRECISIONS, ZERO_STAGES, LossConfig

GIB = 1024**3

# DeepSpeed 0.19 ZeroConfig defaults (deepspeed/runtime/zero/config.py). The planner assumes the run
# keeps them; a run with its own DeepSpeed JSON passes its values as the PlanSettings of the same name.
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "prefetch_bucket_size": 50_000_000,
    "max_live_parameters": 1_000_000_000,
    "param_persistence_threshold": 100_000,
}

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
            raise PlanError(f"LoRA target modules {list(targets)} match no linear layer of {self.name}; candidates: {names}")
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
        ParamSpec("q_proj.weight", (dq, d), L), ParamSpec("k_proj.weight", (dkv, d), L),
        ParamSpec("v_proj.weight", (dkv, d), L), ParamSpec("o_proj.weight", (d, dq), L),
        ParamSpec("gate_proj.weight", (inter, d), L), ParamSpec("up_proj.weight", (inter, d), L),
        ParamSpec("down_proj.weight", (d, inter), L),
        ParamSpec("input_layernorm.weight", (d,), L), ParamSpec("post_attention_layernorm.weight", (d,), L),
    ]  # fmt: skip
    if qkv_bias:
        layer += [ParamSpec("q_proj.bias", (dq,), L), ParamSpec("k_proj.bias", (dkv,), L), ParamSpec("v_proj.bias", (dkv,), L)]
    if o_bias:
        layer.append(ParamSpec("o_proj.bias", (d,), L))
    if mlp_bias:
        layer += [ParamSpec("gate_proj.bias", (inter,), L), ParamSpec("up_proj.bias", (inter,), L), ParamSpec("down_proj.bias", (d,), L)]
    if qk_norm:
        layer += [ParamSpec("q_norm.weight", (hd,), L), ParamSpec("k_norm.weight", (hd,), L)]
    params = [ParamSpec("embed_tokens.weight", (v, d)), *layer, ParamSpec("norm.weight", (d,))]
    if not tied:
        params.append(ParamSpec("lm_head.weight", (v, d)))
    linears = [
        LinearSpec("q_proj", d, dq, L, "norm1"), LinearSpec("k_proj", d, dkv, L, "norm1"),
        LinearSpec("v_proj", d, dkv, L, "norm1"), LinearSpec("o_proj", dq, d, L, "attn_out"),
        LinearSpec("gate_proj", d, inter, L, "norm2"), LinearSpec("up_proj", d, inter, L, "norm2"),
        LinearSpec("down_proj", inter, d, L, "mlp_act"),
    ]  # fmt: skip
    return ModelShape(name, "llama", v, d, L, h, kv, hd, inter, tied, params, linears, qk_norm=qk_norm)


def _gpt2_shape(name: str, cfg) -> ModelShape:
    d, L, v, h = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_head
    inter = cfg.n_inner or 4 * d
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    layer = [
        ParamSpec("ln_1.weight", (d,), L), ParamSpec("ln_1.bias", (d,), L),
        ParamSpec("attn.c_attn.weight", (d, 3 * d), L), ParamSpec("attn.c_attn.bias", (3 * d,), L),
        ParamSpec("attn.c_proj.weight", (d, d), L), ParamSpec("attn.c_proj.bias", (d,), L),
        ParamSpec("ln_2.weight", (d,), L), ParamSpec("ln_2.bias", (d,), L),
        ParamSpec("mlp.c_fc.weight", (d, inter), L), ParamSpec("mlp.c_fc.bias", (inter,), L),
        ParamSpec("mlp.c_proj.weight", (inter, d), L), ParamSpec("mlp.c_proj.bias", (d,), L),
    ]  # fmt: skip
    params = [ParamSpec("wte.weight", (v, d)), ParamSpec("wpe.weight", (cfg.n_positions, d)), *layer,
              ParamSpec("ln_f.weight", (d,)), ParamSpec("ln_f.bias", (d,))]  # fmt: skip
    if not tied:
        params.append(ParamSpec("lm_head.weight", (v, d)))
    # peft matches leaf names, so "c_proj" adapts both the attention and the MLP projection.
    linears = [LinearSpec("c_attn", d, 3 * d, L, "norm1"), LinearSpec("c_proj", d, d, L, "attn_out"),
               LinearSpec("c_fc", d, inter, L, "norm2"), LinearSpec("c_proj", inter, d, L, "mlp_act")]  # fmt: skip
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
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    h = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv = getattr(cfg, "num_key_value_heads", None) or h
    return ModelShape(
        name, "generic", cfg.vocab_size, d, getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"),
        h, kv, getattr(cfg, "head_dim", None) or d // h, getattr(cfg, "intermediate_size", None) or 4 * d,
        bool(getattr(cfg, "tie_word_embeddings", False)), params,
        [LinearSpec(n, i, o, c) for (n, i, o), c in linears.items()],
    )  # fmt: skip


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

@dataclass
class PlanSettings:
    """Everything the budget depends on; the CLI flags and plan_memory(**settings) map onto these fields."""

    model: str = "llama-8b"
    nodes: int = 1
    gpus_per_node: int = 8
    zero: int = 0
    precision: str = "bf16"
    lora_r: int = 0
    lora_targets: tuple[str, ...] | None = None  # None: the family's usual projections
    lora_dropout: float = 0.0
    offload_optimizer: bool = False
    offload_params: bool = False
    max_tokens_per_row: int = 2048
    rows_per_batch: int = 1
    gradient_checkpointing: bool = False
    loss: str = "fused"
    ref: str = "cache"
    ref_dtype: str = "bf16"
    objective: str = "dpo"
    vocab_size: int | None = None  # only for llama-tiny, whose vocabulary follows the tokenizer
    runtime_overhead_gib: float = 1.0
    reduce_bucket_size: int = DEEPSPEED_DEFAULTS["reduce_bucket_size"]
    prefetch_bucket_size: int = DEEPSPEED_DEFAULTS["prefetch_bucket_size"]
    max_live_parameters: int = DEEPSPEED_DEFAULTS["max_live_parameters"]
    param_persistence_threshold: int = DEEPSPEED_DEFAULTS["param_persistence_threshold"]
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only)

    def __post_init__(self):
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise PlanError(msg)

        for k in ("nodes", "gpus_per_node", "max_tokens_per_row", "rows_per_batch"):
            v = getattr(self, k)
            need(isinstance(v, int) and v >= 1, f"{k} must be an integer >= 1, got {v!r}")
        need(self.zero in ZERO_STAGES, f"zero must be one of {', '.join(map(str, ZERO_STAGES))}, got {self.zero!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.lora_r >= 0, f"lora_r must be >= 0 (0 trains all weights), got {self.lora_r}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(not self.offload_optimizer or self.zero >= 1, "offload_optimizer needs zero >= 1 (DeepSpeed offloads the partitioned optimizer)")
        need(not self.offload_params or self.zero == 3, "offload_params needs zero 3 (only ZeRO-3 partitions parameters)")
        need(self.loss in ("fused", "eager"), f"loss must be fused or eager, got {self.loss!r}")
        need(self.ref in ("cache", "on_the_fly"), f"ref must be cache or on_the_fly, got {self.ref!r}")
        need(self.ref_dtype in ("bf16", "fp32"), f"ref_dtype must be bf16 or fp32, got {self.ref_dtype!r}")
        need(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        need(self.runtime_overhead_gib >= 0, f"runtime_overhead_gib must be >= 0, got {self.runtime_overhead_gib}")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens(self) -> int:
        return self.rows_per_batch * self.max_tokens_per_row


# ------------------------------------------------------------------------------------ the plan

@dataclass
class MemoryPlan:
    """Per-GPU bytes of each component; `total` is their sum. Alternatives show the other choice of each switch."""

    weights: int
    gradients: int
    optimizer: int  # master weights + Adam moments
    activations: int
    logits: int
    reference: int
    buffers: int
    runtime: int
    total: int
    master_weights: int
    optimizer_moments: int
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    logits_fused: int
    logits_eager: int
    reference_cached: int
    reference_on_the_fly: int
    parameters: int
    trainable_parameters: int
    lora_parameters: int
    tokens_per_micro_batch: int
    world_size: int
    chunk_tokens: int
    activation_bytes_per_token_layer: int
    settings: dict = field(default_factory=dict)

    COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "reference", "buffers", "runtime")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gib"] = {k: d[k] / GIB for k in (*self.COMPONENTS, "total")}
        return d

    def summary(self) -> str:
        """One log line: the total and each component in GiB."""
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in self.COMPONENTS)
        return f"memory plan per GPU: total {self.total / GIB:.2f} GiB ({parts})"

    def table(self, gpu_bytes: int | None = None) -> str:
        s = self.settings
        alt = {
            "activations": f"checkpointing {'on' if s.get('gradient_checkpointing') else 'off'}; "
            f"with: {_gib(self.activations_with_checkpointing)}, without: {_gib(self.activations_without_checkpointing)}",
            "logits": f"{s.get('loss')} loss; fused: {_gib(self.logits_fused)} (chunk {self.chunk_tokens}), eager: {_gib(self.logits_eager)}",
            "reference": f"ref {s.get('ref')}; cache: {_gib(self.reference_cached)}, on the fly: {_gib(self.reference_on_the_fly)}",
            "optimizer": f"master {_gib(self.master_weights)} + moments {_gib(self.optimizer_moments)}",
            "buffers": f"DeepSpeed ZeRO-{s.get('zero')} buckets / gathered params",
            "runtime": "CUDA context + NCCL (constant)",
        }
        head = (
            f"{s.get('model')}: {self.parameters:,} parameters ({self.trainable_parameters:,} trained"
            + (f", LoRA r={s.get('lora_r')}" if s.get("lora_r") else "")
            + f"); {s.get('nodes')} node(s) x {s.get('gpus_per_node')} GPU(s) = {self.world_size}, ZeRO-{s.get('zero')}, {s.get('precision')}"
            + (", offload optimizer" if s.get("offload_optimizer") else "")
            + (", offload params" if s.get("offload_params") else "")
            + f"\nmicro-batch: {s.get('rows_per_batch')} row(s) x {s.get('max_tokens_per_row')} tokens = {self.tokens_per_micro_batch:,} tokens"
            + f"; objective {s.get('objective')}"
        )
        lines = [head, "", f"{'component (per GPU)':<22}{'GiB':>10}  notes", "-" * 78]
        for k in self.COMPONENTS:
            lines.append(f"{k:<22}{getattr(self, k) / GIB:>10.3f}  {alt.get(k, '')}")
        lines.append("-" * 78)
        lines.append(f"{'total':<22}{self.total / GIB:>10.3f}")
        if gpu_bytes is not None:
            verdict = "fits" if self.total <= gpu_bytes else "does NOT fit"
            lines.append(f"{'GPU memory':<22}{gpu_bytes / GIB:>10.3f}  {verdict}")
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
        normalised outputs, the same attention terms with Dkv = D, and 5*a*I for the MLP (c_fc's
        output, the eager tanh-GELU's three saved intermediates, and its output, c_proj's input).
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
        mlp = 5 * a * shape.intermediate_size
    else:
        norms = 2 * (4 * d + 4 + 2 * a * d)
        mlp = 4 * a * shape.intermediate_size
    if shape.qk_norm:
        attn += (4 + a) * (dq + dkv)
    return norms + attn + mlp


def lora_activation_delta(shape: ModelShape, act_bytes: int, r: int, adapted: list[LinearSpec], dropout: float) -> tuple[int, int]:
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


def _fused_chunk_tokens(vocab_size: int) -> int:
    from ddpo_kernels import default_block_rows

    return default_block_rows(vocab_size)


def plan_memory(shape: ModelShape | None = None, **settings) -> MemoryPlan:
    """Per-GPU memory plan for `settings` (PlanSettings fields). `shape` skips resolving settings['model'] again."""
    s = PlanSettings(**settings)
    if shape is None:
        shape = model_shape(s.model, s.vocab_size)
    W = s.world_size
    half = s.precision in ("bf16", "fp16")
    w = 2 if half else 4  # weights, gradients and activations in the training dtype
    n = s.tokens
    v, d = shape.vocab_size, shape.hidden_size

    P = shape.num_parameters
    lora_linears = shape.lora_linears(s.lora_targets or shape.default_lora_targets()) if s.lora_r else []
    A = sum(s.lora_r * (lin.in_features + lin.out_features) * lin.count for lin in lora_linears)
    T = A if s.lora_r else P

    def zero3_split(x: int) -> int:
        return -(-x // W) if s.zero == 3 else x  # ceil: DeepSpeed pads partitions up

    weights = 0 if s.offload_params else zero3_split((P + A) * w)
    if s.offload_optimizer:
        gradients = 0
    else:
        gradients = T * w if s.zero in (0, 1) else -(-(T * w) // W)
    master_per, moments_per = (4 if half else 0), 8
    opt_div = 1 if s.zero == 0 else W
    master = 0 if s.offload_optimizer else -(-(T * master_per) // opt_div)
    moments = 0 if s.offload_optimizer else -(-(T * moments_per) // opt_div)

    per_layer = activation_bytes_per_token_layer(shape, w)
    final = _final_bytes_per_token(shape, w)
    if s.lora_r:
        layer_delta, model_delta = lora_activation_delta(shape, w, s.lora_r, lora_linears, s.lora_dropout)
        per_layer, final = per_layer + layer_delta, final + model_delta
    act_without = n * (shape.num_layers * per_layer + final)
    act_with = n * (shape.num_layers * w * d + per_layer + final)
    activations = act_with if s.gradient_checkpointing else act_without

    chunk = _fused_chunk_tokens(v)
    head_trained = s.lora_r == 0
    logits_fused = min(chunk, n) * v * 4 + (v * d * 4 if head_trained else 0)
    logits_eager = n * v * (w + 4 + 4)
    logits = logits_fused if s.loss == "fused" else logits_eager

    ref_bytes = 2 if s.ref_dtype == "bf16" else 4
    needs_ref = LossConfig(objective=s.objective).needs_reference  # orpo/dorpo/sft have no reference term
    ref_fly = 0 if (not needs_ref or s.lora_r or s.offload_params) else zero3_split(P * ref_bytes)
    reference = ref_fly if s.ref == "on_the_fly" else 0

    buffers = _deepspeed_buffers(s, shape, w)
    runtime = int(s.runtime_overhead_gib * GIB)
    optimizer = master + moments
    total = weights + gradients + optimizer + activations + logits + reference + buffers + runtime
    return MemoryPlan(
        weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, logits=logits,
        reference=reference, buffers=buffers, runtime=runtime, total=total, master_weights=master,
        optimizer_moments=moments, activations_with_checkpointing=act_with, activations_without_checkpointing=act_without,
        logits_fused=logits_fused, logits_eager=logits_eager, reference_cached=0, reference_on_the_fly=ref_fly,
        parameters=P, trainable_parameters=T, lora_parameters=A, tokens_per_micro_batch=n, world_size=W,
        chunk_tokens=chunk, activation_bytes_per_token_layer=per_layer, settings=dataclasses.asdict(s),
    )  # fmt: skip


def _deepspeed_buffers(s: PlanSettings, shape: ModelShape, w: int) -> int:
    overlap = s.overlap_comm if s.overlap_comm is not None else s.zero == 3
    if s.zero == 0:
        return 0
    if s.zero == 1:
        # ZeRO-1 stages the reduction in an fp32 accumulator bucket (stage_1_and_2.setup_buckets).
        return s.reduce_bucket_size * 4 * (2 if overlap else 1)
    if s.zero == 2:
        return s.reduce_bucket_size * w * (2 if overlap else 1)
    # ZeRO-3: one reduce bucket per gradient dtype (stage3.py allocates it once), the parameters
    # gathered for the module running now plus the prefetch bucket, and the persistent small tensors.
    largest = max(p.numel for p in shape.params)
    gathered = min(s.max_live_parameters, largest + s.prefetch_bucket_size)
    persistent = sum(p.numel * p.count for p in shape.params if p.numel < s.param_persistence_threshold)
    return s.reduce_bucket_size * w + (gathered + persistent) * w


# ------------------------------------------------------------------------------------ fitting

def largest_fitting(settings: PlanSettings | dict, gpu_bytes: int, *, field: str = "max_tokens_per_row", step: int | None = None) -> int:
    """Largest value of `field` (max_tokens_per_row or rows_per_batch), a multiple of `step`, whose plan fits.

    step defaults to 128 tokens (a tile-friendly row length) or 1 row. Returns 0 when not even one
    step fits (the static parts alone exceed the GPU). Memory grows with the micro-batch, so an
    exponential search for an upper bound followed by bisection finds the boundary exactly.
    """
    if field not in ("max_tokens_per_row", "rows_per_batch"):
        raise PlanError(f"largest_fitting field must be max_tokens_per_row or rows_per_batch, got {field!r}")
    step = step or (128 if field == "max_tokens_per_row" else 1)
    if step < 1:
        raise PlanError(f"step must be >= 1, got {step}")
    base = dataclasses.asdict(settings) if isinstance(settings, PlanSettings) else dict(settings)
    PlanSettings(**base)  # validate once, up front
    shape = model_shape(base.get("model", PlanSettings.model), base.get("vocab_size"))

    def fits(k: int) -> bool:
        return plan_memory(shape, **{**base, field: k * step}).total <= gpu_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * step > 2**40:  # a trillion tokens per row: the formula has no memory term left
            raise PlanError(f"{field} never stops fitting in {gpu_bytes} bytes; check the settings")
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ------------------------------------------------------------------------------------ run configs

def settings_from_config(cfg, world_size: int) -> PlanSettings:
    """PlanSettings of an engine.config.Config on `world_size` GPUs (the trainer's view of its run)."""
    m, p = cfg.model, cfg.parallel
    return PlanSettings(
        model=m.name, nodes=1, gpus_per_node=world_size, zero=p.zero_stage, precision=p.precision,
        lora_r=m.lora_r, lora_targets=tuple(m.lora_target_modules), lora_dropout=m.lora_dropout,
        offload_optimizer=p.offload_optimizer, offload_params=p.offload_params,
        max_tokens_per_row=cfg.data.max_tokens_per_row, rows_per_batch=cfg.data.rows_per_batch,
        gradient_checkpointing=m.gradient_checkpointing, loss="eager" if cfg.loss.backend == "eager" else "fused",
        ref="on_the_fly" if cfg.ref_cache.mode == "off" else "cache",
        ref_dtype="bf16" if cfg.ref_cache.dtype == "bfloat16" else "fp32", objective=cfg.loss.objective,
    )  # fmt: skip


def plan_from_config(cfg, world_size: int) -> MemoryPlan:
    """The memory plan of a run config on `world_size` GPUs; the trainer logs it at start-up."""
    return plan_memory(**dataclasses.asdict(settings_from_config(cfg, world_size)))


# ------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m engine.plan",
        description="Per-GPU memory budget of a preference-training run and the largest micro-batch that fits.",
    )
    ap.add_argument("--model", default="llama-8b", help="named architecture (llama-tiny, gpt2-small, llama-8b), config.json path, or cached hub name")
    ap.add_argument("--config", default=None, help="plan a run config (YAML) instead; the flags below then only set the world size and GPU")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--zero", type=int, choices=ZERO_STAGES, default=0)
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16/fp16: mixed precision with fp32 master weights and Adam states")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: train all weights)")
    ap.add_argument("--lora-targets", default=None, help="comma-separated module names LoRA adapts (default: all projections)")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--offload-params", action="store_true")
    ap.add_argument("--max-tokens-per-row", type=int, default=2048)
    ap.add_argument("--rows-per-batch", type=int, default=1, help="packed rows per micro-batch per GPU")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--loss", choices=("fused", "eager"), default="fused")
    ap.add_argument("--ref", choices=("cache", "on_the_fly"), default="cache")
    ap.add_argument("--ref-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--objective", choices=OBJECTIVES, default="dpo")
    ap.add_argument("--vocab-size", type=int, default=None, help="llama-tiny only: vocabulary size (default: bundled tokenizer)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory in GiB to fit into")
    ap.add_argument("--runtime-overhead-gb", type=float, default=1.0, help="CUDA context + NCCL, GiB")
    ap.add_argument("--fit", choices=("max_tokens_per_row", "rows_per_batch"), default="max_tokens_per_row", help="what the fit search varies")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.config:
            from engine.config import ConfigError, load_config

            try:
                cfg = load_config(["--config", args.config], prog="python -m engine.plan")
            except ConfigError as e:
                raise PlanError(str(e)) from None
            settings = settings_from_config(cfg, args.nodes * args.gpus_per_node)
            settings = dataclasses.replace(settings, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                           runtime_overhead_gib=args.runtime_overhead_gb)  # fmt: skip
        else:
            settings = PlanSettings(
                model=args.model, nodes=args.nodes, gpus_per_node=args.gpus_per_node, zero=args.zero,
                precision=args.precision, lora_r=args.lora_r,
                lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None,
                lora_dropout=args.lora_dropout, offload_optimizer=args.offload_optimizer,
                offload_params=args.offload_params, max_tokens_per_row=args.max_tokens_per_row,
                rows_per_batch=args.rows_per_batch, gradient_checkpointing=args.gradient_checkpointing,
                loss=args.loss, ref=args.ref, ref_dtype=args.ref_dtype, objective=args.objective,
                vocab_size=args.vocab_size, runtime_overhead_gib=args.runtime_overhead_gb,
            )  # fmt: skip
        gpu_bytes = int(args.gpu_memory_gb * GIB)
        shape = model_shape(settings.model, settings.vocab_size)
        plan = plan_memory(shape, **dataclasses.asdict(settings))
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
        print(f"nothing fits {args.gpu_memory_gb:g} GiB: the static parts alone need "
              f"{(plan.total - plan.activations - plan.logits) / GIB:.3f} GiB; try a higher ZeRO stage, offloading or LoRA")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
