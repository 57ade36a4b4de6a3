"""Every setting of a run: nested dataclasses, loaded from YAML, overridden by `--section.field value`.

This is the first thing a run touches and the only place settings are defined, documented and
validated, so that a bad value fails before any model, data or process group is created. Each field's
help text is the docstring-style string in its `metadata["help"]`; `--help` prints them all.

    cfg = load_config(["--config", "configs/tiny-cpu.yaml", "--loss.beta", "0.2"])
    cfg.save(run_dir / "config.yaml")   # the resolved config, next to the run's outputs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ddpo_kernels import BACKENDS as KERNEL_BACKENDS

OBJECTIVES = ("dpo", "ddpo", "orpo", "dorpo", "sft")
PAIR_MODES = ("best_vs_worst", "gap", "all", "divpo")
NAMED_ARCHITECTURES = ("llama-tiny", "gpt2-small", "llama-8b")


class ConfigError(ValueError):
    """A setting is wrong; the message names it, its value and how to fix it."""


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(section: str, name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{section}.{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class ModelConfig:
    name: str = _f("llama-tiny", "HF hub name, local directory, or a named random-init architecture: " + ", ".join(NAMED_ARCHITECTURES))
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when `name` is a hub model.")
    tokenizer: str | None = _f(None, "Tokenizer name/path; default: the model's own, or the bundled tokenizer for named architectures.")
    dtype: str = _f("float32", "Parameter dtype when loading: float32, bfloat16 or float16.")
    attn_implementation: str = _f("auto", "auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, flash_attention_2 or eager.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (about 30% more compute).")
    lora_r: int = _f(0, "LoRA rank; 0 trains all weights.")
    lora_alpha: int = _f(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names LoRA adapts (for GPT-2 use c_attn, c_proj, c_fc).",
    )
    trust_remote_code: bool = _f(False, "Allow custom model code from the hub.")
    seed: int = _f(0, "Seed for random initialisation of named architectures.")

    def __post_init__(self):
        _choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model", "attn_implementation", self.attn_implementation, ("auto", "sdpa", "flash_attention_2", "eager"))
        _check(self.lora_r >= 0, f"model.lora_r must be >= 0 (0 disables LoRA), got {self.lora_r}")
        _check(self.lora_r == 0 or self.lora_alpha > 0, f"model.lora_alpha must be > 0 with LoRA, got {self.lora_alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataConfig:
    source: str = _f("synthetic", "jsonl/json/parquet file, a datasets.save_to_disk directory, a hub dataset name, or 'synthetic' (bundled generator).")
    synthetic_prompts: int = _f(240, "Number of prompts the synthetic generator makes (source: synthetic).")
    synthetic_seed: int = _f(0, "Seed of the synthetic generator.")
    pairs: str = _f("best_vs_worst", "Pair construction: " + ", ".join(PAIR_MODES) + ".")
    min_gap: float = _f(5.0, "gap mode: minimum upvote difference between chosen and rejected.")
    max_pairs_per_prompt: int = _f(100, "At most this many pairs per prompt.")
    divpo_rho: float = _f(0.25, "divpo mode: top/bottom fraction of responses by upvotes forming the high/low sets.")
    val_fraction: float = _f(0.1, "Fraction of prompts held out for validation/evaluation (split by prompt).")
    max_prompt_length: int = _f(256, "Prompt tokens kept (the start of the prompt is kept).")
    max_length: int = _f(512, "Prompt + response tokens per sequence (the end of the response is truncated).")
    max_response_tokens: int = _f(2048, "Responses longer than this many tokens after templating are dropped (published: 2048).")
    max_tokens_per_row: int = _f(2048, "Packed row length; both sequences of a pair go in the same row.")
    rows_per_batch: int = _f(1, "Packed rows per micro-batch per rank.")
    strict: bool = _f(False, "Raise on the first bad input row instead of skipping and counting it.")
    seed: int = _f(0, "Seed for pair sampling, splits and shuffling.")
    num_workers: int = _f(1, "Processes for tokenisation.")
    cache_dir: str = _f(".cache/data", "Where tokenised data is cached (keyed by data, tokenizer, template and lengths).")

    def __post_init__(self):
        _choice("data", "pairs", self.pairs, PAIR_MODES)
        _check(self.min_gap >= 0, f"data.min_gap must be >= 0, got {self.min_gap}")
        _check(self.max_pairs_per_prompt >= 1, f"data.max_pairs_per_prompt must be >= 1, got {self.max_pairs_per_prompt}")
        _check(0 < self.divpo_rho <= 0.5, f"data.divpo_rho must be in (0, 0.5], got {self.divpo_rho}")
        _check(0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _check(self.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        _check(
            self.max_length > self.max_prompt_length,
            f"data.max_length ({self.max_length}) must exceed data.max_prompt_length ({self.max_prompt_length}) to leave room for the response",
        )
        _check(
            self.max_tokens_per_row >= 2 * self.max_length,
            f"data.max_tokens_per_row ({self.max_tokens_per_row}) must be >= 2 * data.max_length ({2 * self.max_length}) so a pair fits in one row",
        )
        _check(self.rows_per_batch >= 1, f"data.rows_per_batch must be >= 1, got {self.rows_per_batch}")
        _check(self.synthetic_prompts >= 1, f"data.synthetic_prompts must be >= 1, got {self.synthetic_prompts}")
        _check(self.num_workers >= 1, f"data.num_workers must be >= 1, got {self.num_workers}")


@dataclass
class DeviationConfig:
    enabled: bool = _f(True, "Compute deviation weights (needed by ddpo/dorpo and divpo pairs).")
    semantic_model: str = _f("builtin:minilm", "Semantic embedder: 'builtin:minilm' (offline all-MiniLM-L6-v2), a sentence-transformers name/path, or '' to drop it.")
    style_model: str = _f("builtin:stylometric", "Style embedder: 'builtin:stylometric', a sentence-transformers name/path, or '' to drop it.")
    metric: str = _f("cosine", "Distance: cosine or euclidean.")
    mode: str = _f("mean", "mean (published: mean distance to the prompt's other responses) or knn.")
    k: int = _f(10, "knn mode: number of neighbours.")
    scope: str = _f("group", "knn mode: group (same prompt) or global (all responses).")
    max_per_prompt: int | None = _f(None, "At most this many responses per prompt enter the scores (None: all).")
    rejected_weight_floor: float = _f(0.2, "Lower bound on the weight of rejected responses (published: 0.2).")
    count_duplicates: bool = _f(False, "Count a response once per pair that uses it (published scripts' behaviour when pairs reuse responses).")
    batch_size: int = _f(64, "Embedding batch size.")
    device: str = _f("auto", "Embedding device: auto, cpu or cuda.")
    cache_dir: str = _f(".cache/embeddings", "On-disk embedding cache keyed by (model id, text hash).")

    def __post_init__(self):
        _choice("deviation", "metric", self.metric, ("cosine", "euclidean"))
        _choice("deviation", "mode", self.mode, ("mean", "knn"))
        _choice("deviation", "scope", self.scope, ("group", "global"))
        _check(self.k >= 1, f"deviation.k must be >= 1, got {self.k}")
        _check(self.max_per_prompt is None or self.max_per_prompt >= 2, f"deviation.max_per_prompt must be >= 2 or null, got {self.max_per_prompt}")
        _check(0 <= self.rejected_weight_floor <= 1, f"deviation.rejected_weight_floor must be in [0, 1], got {self.rejected_weight_floor}")
        _check(self.batch_size >= 1, f"deviation.batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.semantic_model != "" or self.style_model != "",
            "deviation needs at least one embedder: set deviation.semantic_model or deviation.style_model",
        )


@dataclass
class LossConfig:
    objective: str = _f("ddpo", "Training objective: " + ", ".join(OBJECTIVES) + ".")
    beta: float = _f(0.1, "DPO/DDPO: KL strength beta. ORPO/DORPO: the odds-ratio weight lambda (published DORPO: 0.25).")
    backend: str = _f("auto", "Fused loss backend: auto (triton on CUDA, torch chunks on CPU), triton, torch, or eager (full logits, for debugging).")
    nll_on_prompt: bool = _f(
        False,
        "ORPO/DORPO/SFT: the NLL term also covers the chosen sequence's prompt tokens, as the authors' DORPO "
        "and TRL's ORPO do; the odds ratio stays on response tokens. Not for dpo/ddpo (no NLL term).",
    )

    def __post_init__(self):
        _choice("loss", "objective", self.objective, OBJECTIVES)
        _check(self.beta > 0, f"loss.beta must be > 0, got {self.beta}")
        _choice("loss", "backend", self.backend, KERNEL_BACKENDS)

    @property
    def needs_reference(self) -> bool:
        return self.objective in ("dpo", "ddpo")

    @property
    def needs_weights(self) -> bool:
        return self.objective in ("ddpo", "dorpo")


@dataclass
class OptimConfig:
    lr: float = _f(5e-6, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    schedule: str = _f("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    warmup_ratio: float = _f(0.1, "Fraction of the total steps spent in linear warmup.")
    epochs: float = _f(1.0, "Passes over the training pairs.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables.")

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _choice("optim", "schedule", self.schedule, ("cosine", "linear", "constant"))
        _check(0 <= self.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.epochs > 0, f"optim.epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"optim.max_steps must be >= 1 or null, got {self.max_steps}")
        _check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")


@dataclass
class RefCacheConfig:
    mode: str = _f("auto", "auto: build the reference log-prob cache when missing and use it; require: fail without a valid cache; off: reference forward on the fly.")
    dir: str | None = _f(None, "Cache directory; default: <output_dir>/ref_cache. Share it between runs over the same data and reference.")
    model: str | None = _f(None, "Reference model; default: the initial policy (model.name).")
    dtype: str = _f("float32", "Dtype of the reference forward: float32 or bfloat16.")

    def __post_init__(self):
        _choice("ref_cache", "mode", self.mode, ("auto", "require", "off"))
        _choice("ref_cache", "dtype", self.dtype, ("float32", "bfloat16"))


@dataclass
class ParallelConfig:
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3.")
    offload_optimizer: bool = _f(False, "Offload optimizer states to CPU (ZeRO >= 1).")
    offload_params: bool = _f(False, "Offload parameters to CPU (ZeRO-3).")
    precision: str = _f("fp32", "Training precision: fp32, bf16 or fp16.")
    backend: str = _f("auto", "Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo.")
    deepspeed_config: str | None = _f(None, "A DeepSpeed JSON to pass through; its keys override the ones derived from this config.")

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(not self.offload_optimizer or self.zero_stage >= 1, "parallel.offload_optimizer needs parallel.zero_stage >= 1")
        _check(not self.offload_params or self.zero_stage == 3, "parallel.offload_params needs parallel.zero_stage 3")
        _choice("parallel", "precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("parallel", "backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "Save a checkpoint every this many optimizer steps (0: only at the end and on SIGTERM).")
    keep_last: int = _f(2, "Checkpoints kept; older ones are deleted.")
    resume: str = _f("none", "none, auto (the latest checkpoint of this run), or a checkpoint directory.")
    export_final: bool = _f(True, "Write final/ with save_pretrained (loadable by transformers).")
    merge_lora: bool = _f(True, "Merge LoRA adapters into the exported weights.")

    def __post_init__(self):
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    output_dir: str = _f("runs", "Parent directory of run directories.")
    run_name: str = _f("tiny-cpu", "Run directory name under output_dir.")
    log_every: int = _f(1, "Log metrics every this many optimizer steps.")
    tensorboard: bool = _f(True, "Write TensorBoard event files.")
    wandb: bool = _f(False, "Log to Weights & Biases (needs wandb installed and configured).")
    progress: bool = _f(True, "Show a progress bar on rank 0.")
    max_nonfinite_steps: int = _f(5, "Stop after this many consecutive steps with a non-finite loss.")

    def __post_init__(self):
        _check(self.log_every >= 1, f"logging.log_every must be >= 1, got {self.log_every}")
        _check(self.max_nonfinite_steps >= 1, f"logging.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "Sample and evaluate after training.")
    n_samples: int = _f(4, "Samples per prompt (published: 4).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(0.95, "Nucleus sampling p.")
    top_k: int = _f(50, "Top-k sampling.")
    repetition_penalty: float = _f(1.1, "Repetition penalty.")
    max_new_tokens: int = _f(256, "Tokens generated per sample.")
    num_prompts: int = _f(32, "Held-out prompts evaluated.")
    batch_size: int = _f(16, "Prompts per generate call.")
    seed: int = _f(0, "Sampling seed.")
    semantic_model: str = _f("builtin:minilm", "Embedder for semantic diversity.")
    style_model: str = _f("builtin:stylometric", "Embedder for style diversity.")
    reward_model: str | None = _f(None, "HF sequence-classification model scoring quality; on synthetic data the ground truth is used too.")

    def __post_init__(self):
        _check(self.n_samples >= 1, f"eval.n_samples must be >= 1, got {self.n_samples}")
        _check(self.temperature > 0, f"eval.temperature must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"eval.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"eval.top_k must be >= 0, got {self.top_k}")
        _check(self.repetition_penalty > 0, f"eval.repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.num_prompts >= 1, f"eval.num_prompts must be >= 1, got {self.num_prompts}")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deviation: DeviationConfig = field(default_factory=DeviationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ref_cache: RefCacheConfig = field(default_factory=RefCacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # Cross-section rules.
        _check(
            not (self.loss.needs_weights and not self.deviation.enabled),
            f"loss.objective {self.loss.objective} needs deviation weights: set deviation.enabled true (or use {self.loss.objective[1:]})",
        )
        _check(
            not (self.data.pairs == "divpo" and not self.deviation.enabled),
            "data.pairs divpo ranks responses by deviation: set deviation.enabled true",
        )
        _check(
            not (self.loss.nll_on_prompt and self.loss.objective in ("dpo", "ddpo")),
            f"loss.nll_on_prompt adds the chosen prompt tokens to the NLL term, and {self.loss.objective} has "
            "none (it applies to orpo, dorpo and sft); set loss.nll_on_prompt false",
        )
        _check(
            not (self.parallel.precision == "bf16" and self.model.dtype == "float16"),
            "parallel.precision bf16 with model.dtype float16 mixes half formats: use model.dtype bfloat16 or float32",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config atomically (tmp + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


# ------------------------------------------------------------------------------------ construction

def _section_types() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(text: str, hint: Any, where: str) -> Any:
    """Turn a command-line string into the field's type (YAML syntax: 1e-5, true, null, [a, b])."""
    if text == "":
        return _coerce("", hint, where)  # YAML reads "" as null; on the command line it means the empty string
    if hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)):
        # Strings are taken verbatim: YAML 1.1 would turn "off"/"no"/"on" into booleans.
        return None if text in ("null", "None", "~") and type(None) in typing.get_args(hint) else text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse {text!r}: {e}") from None
    return _coerce(value, hint, where)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        # PyYAML follows YAML 1.1, where "5e-6" (no dot) is a string: accept what users write.
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):
            # In YAML files `mode: off` arrives as False (YAML 1.1); our string settings mean the word.
            return "on" if value else "off"
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(data: dict | None) -> Config:
    """Build a validated Config from nested dicts; unknown sections or keys are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = _section_types()
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {', '.join(sections)}")
    built = {}
    for name, cls in sections.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
        hints = _field_hints(cls)
        bad = sorted(set(values) - set(hints))
        if bad:
            raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{b}' for b in bad)}; valid keys of {name}: {', '.join(hints)}")
        built[name] = cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})
    return Config(**built)


def _merge(base: dict, override: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (presets live in configs/)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data


def help_text() -> str:
    """Every field with its type, default and help, grouped by section."""
    lines = ["Config fields (set in a YAML file or override with --section.field value):", ""]
    for name, cls in _section_types().items():
        lines.append(f"{name}:")
        hints = _field_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            lines.append(f"  --{name}.{f.name} ({tname}, default {default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def parse_overrides(args: list[str]) -> tuple[str | None, dict, list[str]]:
    """Split argv into (config path, nested overrides, leftover args)."""
    config_path, overrides, rest = None, {}, []
    sections = _section_types()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    raise ConfigError("--config needs a path, e.g. --config configs/tiny-cpu.yaml")
                config_path = args[i + 1]
                i += 1
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, _, value = arg[2:].partition("=")
            if not _:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{key} needs a value")
                value = args[i + 1]
                i += 1
            section, _, name = key.partition(".")
            if section not in sections:
                raise ConfigError(f"unknown config section in --{key}; valid sections: {', '.join(sections)}")
            hints = _field_hints(sections[section])
            if name not in hints:
                raise ConfigError(f"unknown key --{key}; valid keys of {section}: {', '.join(hints)}")
            overrides.setdefault(section, {})[name] = _parse_scalar(value, hints[name], f"--{key}")
        else:
            rest.append(arg)
        i += 1
    return config_path, overrides, rest


DEFAULT_PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"


def load_config(argv: list[str] | None = None, *, default_preset: Path | None = DEFAULT_PRESET, prog: str = "engine") -> Config:
    """Config from `--config file` (or the default preset) plus `--section.field value` overrides.

    `--help` prints every field and exits. Anything else unknown is an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"usage: {prog} [--config FILE] [--section.field VALUE ...]\n")
        print(help_text())
        raise SystemExit(0)
    path, overrides, rest = parse_overrides(argv)
    if rest:
        raise ConfigError(f"unrecognised argument(s) {rest}; settings are given as --section.field value (see --help)")
    base = load_yaml(path) if path else (load_yaml(default_preset) if default_preset and default_preset.is_file() else {})
    return from_dict(_merge(base, overrides))


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.config [--config F] [overrides]` prints the resolved config as YAML."""
    try:
        cfg = load_config(argv, prog="python -m engine.config")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


if __name__ == "__main__":
    main()
