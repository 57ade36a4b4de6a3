"""Every setting of a run: nested dataclasses, loaded from YAML, overridden by `--section.field value`.

This is the first thing a run touches and the only place settings are defined, documented and
validated, so that a bad value fails before any model, data or process group is created. Each field's
help text is the docstring-style string in its `metadata["help"]`; `--help` prints them all.

    cfg = load_config(["--config", "configs/tiny-cpu.yaml", "--loss.beta", "0.2"])
    cfg.save(run_dir / "config.yaml")   # the resolved config, next to the run's outputs

Closed sets of values are `Literal` types declared once below (objectives, pair modes, backends,
precisions, schedules, ...): validation, the command line, `--help` and the memory planner all read
them, so a new choice is added in one place. Numeric ranges are declared next to each field
(`ge`/`gt`/`le`/`lt` in its metadata) and checked by one validator.

The recipe. `recipe: authors | engine` (a top-level key; `--recipe` on the command line) selects, at
every point where this engine departs from the published code of Chung et al. 2025
(github.com/mj-storytelling/DiversityTuning), either the authors' choice or ours. Each field it drives
declares both values and the authors' file and line (`--help` lists them). Precedence, lowest first:
the recipe, then the YAML file, then the command line. A field set explicitly always wins over the
recipe (the resolved config saved with a run records every value, so nothing is implicit there);
the README's "Fidelity" table says what each difference means.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ddpo_kernels import Backend as LossBackend  # declared by the kernels, which know their backends

# ------------------------------------------------------------------------------------- choices

PolicyObjective = Literal["dpo", "ddpo", "orpo", "dorpo", "sft"]  # trained through the fused LM-head loss
Objective = Literal[PolicyObjective, "reward"]  # reward: a sequence classifier (engine.reward)
RewardLoss = Literal["l1", "mse", "bradley_terry"]
RewardTemplate = Literal["chat", "authors"]
ScoreTransform = Literal["authors", "none"]
PairMode = Literal["best_vs_worst", "gap", "all", "divpo"]
Precision = Literal["fp32", "bf16", "fp16"]
ModelDtype = Literal["float32", "bfloat16", "float16"]
AttnImplementation = Literal["auto", "sdpa_varlen", "sdpa", "flash_attention_2", "eager"]
SyntheticLengths = Literal["short", "stories"]
EmbedPrecision = Literal["auto", "float32", "bfloat16", "float16"]
Schedule = Literal["cosine", "linear", "constant"]
RefCacheMode = Literal["auto", "require", "off"]
RefDtype = Literal["float32", "bfloat16"]
ProcessGroupBackend = Literal["auto", "nccl", "gloo"]
ZeroStage = Literal[0, 1, 2, 3]
DistanceMetric = Literal["cosine", "euclidean"]
DeviationMode = Literal["mean", "knn"]
KnnScope = Literal["group", "global"]
Recipe = Literal["authors", "engine"]
Cleaning = Literal["authors", "engine"]
LengthFilter = Literal["prompt_and_response", "response"]
Truncation = Literal["engine", "trl"]
GapSampler = Literal["authors", "engine"]
DivpoSampler = Literal["authors", "engine"]
DeviationGroups = Literal["paired", "all"]
MetricsCompat = Literal["engine", "authors"]

OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
POLICY_OBJECTIVES: tuple[str, ...] = typing.get_args(PolicyObjective)
REWARD_LOSSES: tuple[str, ...] = typing.get_args(RewardLoss)
PAIR_MODES: tuple[str, ...] = typing.get_args(PairMode)
LOSS_BACKENDS: tuple[str, ...] = typing.get_args(LossBackend)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
RECIPES: tuple[str, ...] = typing.get_args(Recipe)
CLEANINGS: tuple[str, ...] = typing.get_args(Cleaning)
MODEL_DTYPES: tuple[str, ...] = typing.get_args(ModelDtype)
ZERO_STAGES: tuple[int, ...] = typing.get_args(ZeroStage)
DISTANCE_METRICS: tuple[str, ...] = typing.get_args(DistanceMetric)
DEVIATION_MODES: tuple[str, ...] = typing.get_args(DeviationMode)
KNN_SCOPES: tuple[str, ...] = typing.get_args(KnnScope)
METRICS_COMPATS: tuple[str, ...] = typing.get_args(MetricsCompat)
NAMED_ARCHITECTURES = ("llama-tiny", "gpt2-small", "llama-8b", "llama-8b-4layers")

# The authors' repository, as cited in the recipe of each field (paths relative to its root).
AUTHORS_REPO = "github.com/mj-storytelling/DiversityTuning"


class ConfigError(ValueError):
    """A setting is wrong; the message names it, its value and how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# -------------------------------------------------------------------------------------- recipe


class _FromRecipe:
    """Default of a field whose value the run's recipe decides (see RecipeValues)."""

    def __repr__(self) -> str:
        return "<set by recipe>"


FROM_RECIPE: Any = _FromRecipe()


@dataclass(frozen=True)
class ByField:
    """A recipe value that depends on another field of the same section: `values[that field]`, else `default`."""

    field: str
    values: dict
    default: Any

    def resolve(self, section) -> Any:
        return self.values.get(getattr(section, self.field), self.default)

    def __str__(self) -> str:
        cases = ", ".join(f"{k}: {v!r}" for k, v in self.values.items())
        return f"by {self.field} ({cases}; otherwise {self.default!r})"


@dataclass(frozen=True)
class RecipeValues:
    """What each recipe sets a field to, and where the authors' choice is in their code."""

    authors: Any
    engine: Any
    cite: str

    def value(self, recipe: str, section) -> Any:
        v = self.authors if recipe == "authors" else self.engine
        return v.resolve(section) if isinstance(v, ByField) else v

    def describe(self) -> str:
        def show(v):
            return str(v) if isinstance(v, ByField) else repr(v)

        return f"set by recipe: authors -> {show(self.authors)} [{self.cite}]; engine -> {show(self.engine)}"


def _f(default: Any, help: str, **kw) -> Any:
    """A field with its help text; `ge`/`gt`/`le`/`lt` bound a number, `note` explains a bound."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _r(help: str, *, authors: Any, engine: Any, cite: str, **kw) -> Any:
    """A field the recipe sets unless the file or the command line does."""
    return field(default=FROM_RECIPE, metadata={"help": help, "recipe": RecipeValues(authors, engine, cite), **kw})


# ---------------------------------------------------------------------------------- validation


def _literal_choices(hint: Any) -> tuple | None:
    """The allowed values of a Literal hint (also inside `X | None`), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for a in typing.get_args(hint):
            if typing.get_origin(a) is Literal:
                return typing.get_args(a)
    return None


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _bound_message(meta: dict, nullable: bool) -> str | None:
    lo = ("[", meta["ge"]) if "ge" in meta else (("(", meta["gt"]) if "gt" in meta else None)
    hi = ("]", meta["le"]) if "le" in meta else ((")", meta["lt"]) if "lt" in meta else None)
    if lo is None and hi is None:
        return None
    if lo and hi:
        text = f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    elif lo:
        text = f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    else:
        text = f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"
    if meta.get("note"):
        text += f" ({meta['note']})"
    return text + (" or null" if nullable else "")


def _in_bounds(value: Any, meta: dict) -> bool:
    return not (
        ("ge" in meta and not value >= meta["ge"])
        or ("gt" in meta and not value > meta["gt"])
        or ("le" in meta and not value <= meta["le"])
        or ("lt" in meta and not value < meta["lt"])
    )


class _Section:
    """Base of every config section: resolves recipe-driven fields and validates declared choices and bounds.

    A section built on its own takes the `engine` recipe; `Config` re-resolves, with its own recipe, the
    fields that were not given (`_from_recipe`) and validates again.
    """

    section: ClassVar[str]

    def __post_init__(self):
        self._from_recipe = tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is FROM_RECIPE)
        self.apply_recipe("engine")

    def apply_recipe(self, recipe: str) -> None:
        for name in self._from_recipe:
            rv = next(f for f in dataclasses.fields(self) if f.name == name).metadata["recipe"]
            setattr(self, name, rv.value(recipe, self))
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, where, hint = getattr(self, f.name), f"{self.section}.{f.name}", hints[f.name]
            nullable = _is_optional(hint)
            if value is None and nullable:
                continue
            choices = _literal_choices(hint)
            if choices is not None:
                _check(value in choices, f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
            msg = _bound_message(f.metadata, nullable)
            if msg is not None:
                _check(_in_bounds(value, f.metadata), f"{where} must be {msg}, got {value}")
        self.check()

    def check(self) -> None:
        """Rules that involve several fields of the section."""


# ------------------------------------------------------------------------------------ sections

_CLEAN = "scripts_dataset_cleaner"


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    name: str = _f(
        "llama-tiny",
        "HF hub name, local directory, or a named random-init architecture: " + ", ".join(NAMED_ARCHITECTURES),
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when `name` is a hub model.")
    tokenizer: str | None = _f(
        None, "Tokenizer name/path; default: the model's own, or the bundled tokenizer for named architectures."
    )
    dtype: ModelDtype = _f("float32", "Parameter dtype when loading.")
    attn_implementation: AttnImplementation = _f(
        "auto",
        "auto: flash_attention_2 on CUDA when installed, else sdpa_varlen. sdpa_varlen: per-sequence SDPA "
        "over packed rows (engine.attention); sdpa: transformers' SDPA with a row-sized mask.",
    )
    disable_dropout: bool = _f(
        True,
        "Set the model's dropout probabilities to 0 (as TRL does): policy and reference log-probs stay "
        "comparable; LoRA dropout is separate.",
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in backward to save memory (about 30% more compute)."
    )
    lora_r: int = _f(0, "LoRA rank; 0 trains all weights.", ge=0, note="0 disables LoRA")
    lora_alpha: int = _f(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", ge=0.0, lt=1.0)
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names LoRA adapts (for GPT-2 use c_attn, c_proj, c_fc).",
    )
    trust_remote_code: bool = _f(False, "Allow custom model code from the hub.")
    seed: int = _f(0, "Seed for random initialisation of named architectures.")

    def check(self):
        _check(
            self.lora_r == 0 or self.lora_alpha > 0, f"model.lora_alpha must be > 0 with LoRA, got {self.lora_alpha}"
        )


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    source: str = _f(
        "synthetic",
        "jsonl/json/parquet file, a datasets.save_to_disk directory, a hub dataset name, "
        "or 'synthetic' (bundled generator).",
    )
    synthetic_prompts: int = _f(240, "Number of prompts the synthetic generator makes (source: synthetic).", ge=1)
    synthetic_seed: int = _f(0, "Seed of the synthetic generator.")
    synthetic_lengths: SyntheticLengths = _f(
        "short",
        "Response lengths of the synthetic generator: short (4-7 sentences, ~100 tokens: the default "
        "data) or stories (WritingPrompts-like: hundreds of tokens with a long tail; for benchmarks).",
    )
    cleaning: Cleaning = _r(
        "How rows become prompts and responses. authors: strip the title's first `^\\[.*?\\]` only, prompt = "
        "title + '\\n' + post text (even when empty), drop only moderator boilerplate. engine: strip every leading "
        "bracket tag ([WP], [Writing Prompt], stacked [WP][EU]), no trailing newline for an empty post, also drop "
        "[deleted]/[removed]/empty responses. Both keep a response repeated verbatim under a prompt once.",
        authors="authors",
        engine="engine",
        cite=f"{_CLEAN}/0_data_prep_scoring.py:21-30, 1_data_prep_filtering.py:57-79, 2_data_prep_to_preference.py:51",
    )
    length_filter: LengthFilter = _r(
        "What data.max_response_tokens counts. prompt_and_response: the chat-templated prompt and response as "
        "the tokenizer encodes the whole conversation (special tokens it adds included); response: the templated "
        "response alone (its end-of-turn tokens included), so a long prompt never costs a response.",
        authors="prompt_and_response",
        engine="response",
        cite=f"{_CLEAN}/1_data_prep_filtering.py:26-49",
    )
    max_response_tokens: int = _f(
        2048, "Responses longer than this (see data.length_filter) are dropped before pairing (published: 2048).", ge=1
    )
    pairs: PairMode = _f("best_vs_worst", "Pair construction: " + ", ".join(PAIR_MODES) + ".")
    gap_sampler: GapSampler = _r(
        "gap mode's sampler. authors: repeatedly draw uniformly among the disjoint pairs whose upvotes differ by "
        ">= min_gap, falling back to any pair with different upvotes when none is left. engine: greedy over a "
        "seeded shuffle, then a maximum matching of the leftovers (more pairs when equal upvotes are common).",
        authors="authors",
        engine="engine",
        cite="models/utils.py:294-347",
    )
    min_gap: float = _f(5.0, "gap mode: minimum upvote difference between chosen and rejected.", ge=0)
    divpo_sampler: DivpoSampler = _r(
        "divpo mode's sampler. authors: among the responses the gap sampler pairs, high/low sets of "
        "int(min(max(max_pairs_per_prompt, rho n), n / 2)) by upvotes, each re-ranked by deviation within the set, "
        "the top/bottom max_pairs_per_prompt paired at random. engine: sets of round(rho n) from all responses, "
        "ranked by their deviation within the whole prompt, paired in rank order, pairs with equal upvotes skipped.",
        authors="authors",
        engine="engine",
        cite=f"{_CLEAN}/4_data_prep_for_divpo.py:106-171",
    )
    divpo_rho: float = _f(
        0.25, "divpo mode: top/bottom fraction of responses by upvotes forming the high/low sets.", gt=0, le=0.5
    )
    max_pairs_per_prompt: int | None = _r(
        "At most this many pairs per prompt (null: no cap); divpo authors: also the least set size.",
        authors=ByField("pairs", {"gap": None, "all": 100, "divpo": 2}, None),
        engine=100,
        cite=f"{_CLEAN}/2_data_prep_to_preference.py:61-66, 4_data_prep_for_divpo.py:18",
        ge=1,
    )
    val_fraction: float = _f(
        0.1, "Fraction of prompts held out for validation/evaluation (split by prompt).", ge=0, lt=1
    )
    truncation: Truncation = _r(
        "Sequence truncation. engine: a prompt longer than max_prompt_length keeps its start (the template's "
        "assistant header re-appended); the response is cut to what max_length leaves. trl: TRL 0.12's rule as "
        "the authors' trainers ran it: only when prompt + the pair's longer response exceed max_length, the prompt "
        "keeps its last max_prompt_length tokens, then responses are cut to max_length - max_prompt_length.",
        authors="trl",
        engine="engine",
        cite="models/dorpo_trainer.py:235-252,514-532",
    )
    max_prompt_length: int = _f(256, "Prompt tokens kept (see data.truncation).", ge=1)
    max_length: int = _f(512, "Prompt + response tokens per sequence (see data.truncation).")
    max_tokens_per_row: int = _f(2048, "Packed row length; both sequences of a pair go in the same row.")
    rows_per_batch: int = _f(1, "Packed rows per micro-batch per rank.", ge=1)
    strict: bool = _f(False, "Raise on the first bad input row instead of skipping and counting it.")
    seed: int = _f(0, "Seed for pair sampling, splits and shuffling.")
    num_workers: int = _f(1, "Processes for tokenisation.", ge=1)
    cache_dir: str = _f(
        ".cache/data", "Where tokenised data is cached (keyed by data, tokenizer, template, lengths and truncation)."
    )

    def check(self):
        _check(
            self.max_length > self.max_prompt_length,
            f"data.max_length ({self.max_length}) must exceed data.max_prompt_length ({self.max_prompt_length}) to "
            "leave room for the response",
        )
        _check(
            self.max_tokens_per_row >= 2 * self.max_length,
            f"data.max_tokens_per_row ({self.max_tokens_per_row}) must be >= 2 * data.max_length "
            f"({2 * self.max_length}) so a pair fits in one row",
        )
        _check(
            not (self.pairs == "divpo" and self.divpo_sampler == "authors" and self.max_pairs_per_prompt is None),
            "data.divpo_sampler authors needs data.max_pairs_per_prompt (the authors' max_pair_num, 2): set it",
        )


@dataclass
class DeviationConfig(_Section):
    section: ClassVar[str] = "deviation"
    enabled: bool = _f(True, "Compute deviation weights (needed by ddpo/dorpo and divpo pairs).")
    semantic_model: str = _f(
        "builtin:minilm",
        "Semantic embedder: 'builtin:minilm' (all-MiniLM-L6-v2, shipped for offline use; NOT the "
        "published jinaai/jina-embeddings-v3), a sentence-transformers name or local directory, or '' to drop it.",
    )
    style_model: str = _f(
        "builtin:stylometric",
        "Style embedder: 'builtin:stylometric' (a fixed hand-made stylometric vector; NOT the "
        "published AnnaWegmann/Style-Embedding), a sentence-transformers name or local directory, or '' to drop it.",
    )
    trust_remote_code: bool = _f(
        False,
        "Let sentence-transformers run a model's own code (jina-embeddings-v3 needs "
        "it; the authors load both embedders with it).",
    )
    metric: DistanceMetric = _f("cosine", "Distance between embeddings.")
    mode: DeviationMode = _f("mean", "mean (published: mean distance to the prompt's other responses) or knn.")
    k: int = _f(10, "knn mode: number of neighbours.", ge=1)
    scope: KnnScope = _f("group", "knn mode: group (same prompt) or global (all responses).")
    groups: DeviationGroups = _r(
        "Which responses form a prompt's deviation group. paired: those in the prompt's pairs, taken pair by pair "
        "in sampling order; max_per_prompt stops after the pair that reaches it and drops the later pairs. all: "
        "every cleaned response of the prompt; max_per_prompt scores the first ones in input order and leaves the "
        "rest at weight 1.",
        authors="paired",
        engine="all",
        cite=f"{_CLEAN}/3_data_prep_for_diversified_training.py:52-87",
    )
    max_per_prompt: int | None = _f(
        None, "At most this many responses per prompt enter the scores (null: all); see deviation.groups.", ge=2
    )
    count_duplicates: bool = _r(
        "A response used by several pairs counts once per pair in the mean distance (its copies at distance 0); "
        "the min-max scaling and the weight normalisation still count each distinct response once.",
        authors=True,
        engine=False,
        cite=f"{_CLEAN}/3_data_prep_for_diversified_training.py:62-67,84-111,140-145",
    )
    batch_size: int = _f(64, "Embedding batch size.", ge=1)
    device: str = _f("auto", "Embedding device: auto, cpu or cuda.")
    precision: EmbedPrecision = _r(
        "Transformer embedders' compute precision. auto: float16 on CUDA, bfloat16 on CPUs with native bf16, else "
        "float32 (half-precision vectors get cache entries of their own).",
        authors="float32",
        engine="auto",
        cite="models/diversity_model.py:9-13 (SentenceTransformer loaded and encoding without a dtype)",
    )
    cache_dir: str = _f(".cache/embeddings", "On-disk embedding cache keyed by (model id, text hash).")

    def check(self):
        _check(
            self.semantic_model != "" or self.style_model != "",
            "deviation needs at least one embedder: set deviation.semantic_model or deviation.style_model",
        )


@dataclass
class LossConfig(_Section):
    section: ClassVar[str] = "loss"
    objective: Objective = _f("ddpo", "Training objective: " + ", ".join(OBJECTIVES) + ".")
    beta: float = _f(
        0.1, "DPO/DDPO: KL strength beta. ORPO/DORPO: the odds-ratio weight lambda (published DORPO: 0.25).", gt=0
    )
    backend: LossBackend = _f(
        "auto",
        "Fused loss backend: auto (triton on CUDA, torch chunks on CPU), triton, torch, "
        "or eager (full logits, for debugging).",
    )
    nll_on_prompt: bool = _r(
        "Also put loss targets on prompt tokens (the authors' ORPO/DORPO NLL and SFT do).",
        authors=ByField("objective", {"orpo": True, "dorpo": True, "sft": True}, False),
        engine=False,
        cite="models/dorpo_trainer.py:815-819",
    )
    reward_loss: RewardLoss = _f(
        "l1",
        "objective reward: l1 or mse (regression on each response's transformed score; l1 = the authors') or "
        "bradley_terry (preference pairs, TRL's RewardTrainer).",
    )
    reward_margin: float = _f(
        0.0, "bradley_terry: margin = this x (chosen label - rejected label), TRL's margin; 0 = none.", ge=0
    )
    center_rewards_coefficient: float | None = _f(
        None, "bradley_terry: TRL's center_rewards_coefficient (e.g. 0.01); null = off.", ge=0
    )

    @property
    def needs_reference(self) -> bool:
        return self.objective in ("dpo", "ddpo")

    @property
    def needs_weights(self) -> bool:
        return self.objective in ("ddpo", "dorpo")


@dataclass
class OptimConfig(_Section):
    section: ClassVar[str] = "optim"
    lr: float = _f(5e-6, "Peak learning rate.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    schedule: Schedule = _f("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = _f(0.1, "Fraction of the total steps spent in linear warmup.", ge=0, lt=1)
    epochs: float = _f(1.0, "Passes over the training pairs.", gt=0)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).", ge=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables.", ge=0, note="0 disables clipping")

    def check(self):
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )


@dataclass
class RefCacheConfig(_Section):
    section: ClassVar[str] = "ref_cache"
    mode: RefCacheMode = _f(
        "auto",
        "auto: build the reference log-prob cache when missing and use it; require: fail "
        "without a valid cache; off: reference forward on the fly.",
    )
    dir: str | None = _f(
        None,
        "Cache directory; default: <output_dir>/ref_cache. Share it between runs over the same data and reference.",
    )
    model: str | None = _f(None, "Reference model; default: the initial policy (model.name).")
    dtype: RefDtype = _f("float32", "Dtype of the reference forward.")


@dataclass
class ParallelConfig(_Section):
    section: ClassVar[str] = "parallel"
    zero_stage: ZeroStage = _f(0, "DeepSpeed ZeRO stage.")
    offload_optimizer: bool = _f(False, "Offload optimizer states to CPU (ZeRO >= 1).")
    offload_params: bool = _f(False, "Offload parameters to CPU (ZeRO-3).")
    precision: Precision = _f("fp32", "Training precision (bf16/fp16: mixed, fp32 master weights).")
    backend: ProcessGroupBackend = _f("auto", "Process-group backend: auto (nccl on CUDA, gloo on CPU).")
    deepspeed_config: str | None = _f(
        None, "A DeepSpeed JSON to pass through; its keys override the ones derived from this config."
    )

    def check(self):
        _check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "parallel.offload_optimizer needs parallel.zero_stage >= 1",
        )
        _check(not self.offload_params or self.zero_stage == 3, "parallel.offload_params needs parallel.zero_stage 3")


@dataclass
class CheckpointConfig(_Section):
    section: ClassVar[str] = "checkpoint"
    every_steps: int = _f(
        0, "Save a checkpoint every this many optimizer steps (0: only at the end and on SIGTERM).", ge=0
    )
    keep_last: int = _f(2, "Checkpoints kept; older ones are deleted.", ge=1)
    resume: str = _f("none", "none, auto (the latest checkpoint of this run), or a checkpoint directory.")
    export_final: bool = _f(True, "Write final/ with save_pretrained (loadable by transformers).")
    merge_lora: bool = _f(True, "Merge LoRA adapters into the exported weights.")


@dataclass
class LoggingConfig(_Section):
    section: ClassVar[str] = "logging"
    output_dir: str = _f("runs", "Parent directory of run directories.")
    run_name: str = _f("tiny-cpu", "Run directory name under output_dir.")
    log_every: int = _f(1, "Log metrics every this many optimizer steps.", ge=1)
    tensorboard: bool = _f(True, "Write TensorBoard event files.")
    wandb: bool = _f(False, "Log to Weights & Biases (needs wandb installed and configured).")
    progress: bool = _f(True, "Show a progress bar on rank 0.")
    overwrite: bool = _f(
        False,
        "Start afresh in a run directory that holds another run: its contents are moved aside to "
        "<run_dir>.old-<time>/ (never deleted). Without it such a directory is refused.",
    )
    max_nonfinite_steps: int = _f(5, "Stop after this many consecutive steps with a non-finite loss.", ge=1)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


@dataclass
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    enabled: bool = _f(True, "Sample and evaluate after training.")
    n_samples: int = _f(4, "Samples per prompt (published: 4).", ge=1)
    temperature: float = _f(1.0, "Sampling temperature.", gt=0)
    top_p: float = _f(0.95, "Nucleus sampling p.", gt=0, le=1)
    top_k: int = _f(50, "Top-k sampling.", ge=0)
    repetition_penalty: float = _f(1.1, "Repetition penalty.", gt=0)
    max_new_tokens: int = _f(256, "Tokens generated per sample.", ge=1)
    num_prompts: int = _f(32, "Held-out prompts evaluated.", ge=1)
    batch_size: int = _f(16, "Prompts per generate call.", ge=1)
    seed: int = _f(0, "Sampling seed.")
    semantic_model: str = _f(
        "builtin:minilm",
        "Embedder for semantic diversity (builtin:minilm is all-MiniLM-L6-v2, "
        "not the published jinaai/jina-embeddings-v3).",
    )
    style_model: str = _f(
        "builtin:stylometric",
        "Embedder for style diversity (builtin:stylometric is a hand-made "
        "stylometric vector, not the published AnnaWegmann/Style-Embedding).",
    )
    trust_remote_code: bool = _f(False, "Let the embedders run their own code (jinaai/jina-embeddings-v3 needs it).")
    reward_model: str | None = _f(
        None, "HF sequence-classification model scoring quality; on synthetic data the ground truth is used too."
    )
    metrics_compat: MetricsCompat = _f(
        "engine",
        "Definitions of the text diversity metrics (engine.metrics). engine: what each name says. authors: "
        "the values of the authors' evaluation, to set beside the paper's figures: compression of the text gzipped "
        "twice, their homogenization walk (last sample left out, n identical samples score n - 1), n-grams split on "
        "single spaces, values rounded to 3 decimals, empty samples scored as 'nan' as their CSV reads them "
        "(diversity/compression.py, homogenization.py, ngram_diversity.py, scripts_eval/generation_eval1_2.py). Not "
        "set by `recipe`: it changes the report, not the training, and runs compared side by side must share it.",
    )


@dataclass
class RewardConfig(_Section):
    """Objective reward only (engine.reward): input format, labels, held-out evaluation, early stopping."""

    section: ClassVar[str] = "reward"
    template: RewardTemplate = _f(
        "chat",
        "Reward model input: chat (the tokenizer's chat template, user = prompt, assistant = response) or "
        "authors (<prompt>{prompt}</prompt><response>{response}</response>, models/reward_model.py). The export's "
        "tokenizer carries it as its chat template, so engine.evaluate renders the same text.",
    )
    score_transform: ScoreTransform = _f(
        "authors",
        "Labels: authors (the published iterated-log transform of upvotes to about [-1, 1], with the "
        "dataset's min/max) or none (raw upvotes).",
    )
    compression_factor: int = _f(100, "authors transform: how many times log(x + 1) is applied (published: 100).", ge=1)
    standardize_labels: bool = _f(
        True,
        "Z-score the labels with the training split's mean and std (ranks kept; the L1/MSE optimum maps back "
        "affinely, and the export's config records both). The authors' transform leaves labels within ~0.01 of "
        "each other when the minimum score is 0; Adam's steps then swamp that spread (false: the published labels).",
    )
    eval_every_steps: int = _f(
        0,
        "Held-out metrics every this many optimizer steps (0: once per epoch); always at the end.",
        ge=0,
        note="0 means once per epoch",
    )
    early_stopping_patience: int = _f(
        3, "Stop after this many evaluations without a lower held-out loss (0: never).", ge=0
    )
    early_stopping_min_delta: float = _f(0.0, "A held-out loss counts as lower when below best - min_delta.", ge=0)
    lr_plateau_patience: int | None = _f(
        None,
        "Multiply the learning rate by lr_plateau_factor after more than this "
        "many evaluations without improvement (ReduceLROnPlateau); null: off.",
        ge=0,
    )
    lr_plateau_factor: float = _f(0.1, "Learning-rate factor of the plateau schedule.", gt=0, lt=1)


@dataclass
class Config:
    recipe: Recipe = _f(
        "engine",
        "Whose choice to take at every point where this engine departs from the authors' "
        "code: authors or engine. Fields marked 'set by recipe' follow it unless set explicitly.",
    )
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
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self):
        _check(self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}; got {self.recipe!r}")
        for name in _section_types():
            getattr(self, name).apply_recipe(self.recipe)
        # Cross-section rules.
        _check(
            not (self.loss.needs_weights and not self.deviation.enabled),
            f"loss.objective {self.loss.objective} needs deviation weights: set deviation.enabled true (or use "
            f"{self.loss.objective[1:]})",
        )
        _check(
            not (self.data.pairs == "divpo" and not self.deviation.enabled),
            "data.pairs divpo ranks responses by deviation: set deviation.enabled true",
        )
        by_recipe = " (set by recipe authors)" if "nll_on_prompt" in self.loss._from_recipe else ""
        _check(
            not (self.loss.nll_on_prompt and self.loss.objective in ("dpo", "ddpo")),
            f"loss.nll_on_prompt{by_recipe} adds the chosen prompt tokens to the NLL term, and "
            f"{self.loss.objective} has "
            "none (it applies to orpo, dorpo and sft); set loss.nll_on_prompt false",
        )
        if self.loss.objective == "reward":
            _check(
                self.data.pairs != "divpo",
                "data.pairs divpo picks pairs by diversity, not quality, so a reward model would learn diversity: "
                "use best_vs_worst, gap or all with loss.objective reward",
            )
            _check(
                self.checkpoint.merge_lora,
                "loss.objective reward exports an AutoModelForSequenceClassification directory, which needs the LoRA "
                "adapters merged: set checkpoint.merge_lora true",
            )
        _check(
            not (self.logging.overwrite and self.checkpoint.resume != "none"),
            f"logging.overwrite true starts the run afresh, checkpoint.resume {self.checkpoint.resume} continues it: "
            "choose one (set logging.overwrite false or checkpoint.resume none)",
        )
        _check(
            not (self.parallel.precision == "bf16" and self.model.dtype == "float16"),
            "parallel.precision bf16 with model.dtype float16 mixes half formats: use model.dtype bfloat16 or float32",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config atomically."""
        from engine.fileio import atomic_write

        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------ construction


def _section_types() -> dict[str, type]:
    return {k: v for k, v in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(v)}


def _top_level_types() -> dict[str, Any]:
    """Top-level keys that are values, not sections (the recipe)."""
    return {k: v for k, v in typing.get_type_hints(Config).items() if not dataclasses.is_dataclass(v)}


def _field_hints(cls: type) -> dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(cls).items() if k != "section"}


def _is_text(hint: Any) -> bool:
    """str, str | None, or a Literal of strings: command-line text is taken verbatim."""
    if hint is str:
        return True
    choices = _literal_choices(hint)
    if choices is not None:
        return all(isinstance(c, str) for c in choices)
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)


def _parse_scalar(text: str, hint: Any, where: str) -> Any:
    """Turn a command-line string into the field's type (YAML syntax: 1e-5, true, null, [a, b])."""
    if text == "":
        return _coerce("", hint, where)  # YAML reads "" as null; on the command line it means the empty string
    if _is_text(hint):
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
    if origin is Literal:
        # Membership is checked by the section's validation (one message for every choice field); here
        # only the value's type: words stay words even when YAML 1.1 reads them as booleans.
        return _coerce(value, type(args[0]), where)
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
    """Build a validated Config from nested dicts; unknown sections or keys are errors.

    Fields absent from `data` take their default, or, for fields the recipe drives, the recipe's value.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections, top = _section_types(), _top_level_types()
    unknown = sorted(set(data) - set(sections) - set(top))
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {unknown}; valid sections: {', '.join(sections)} "
            f"(and the top-level key(s) {', '.join(top)})"
        )
    built = {k: _coerce(data[k], hint, k) for k, hint in top.items() if k in data}
    for name, cls in sections.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
        hints = _field_hints(cls)
        bad = sorted(set(values) - set(hints))
        if bad:
            raise ConfigError(
                f"unknown key(s) {', '.join(f'{name}.{b}' for b in bad)}; valid keys of {name}: {', '.join(hints)}"
            )
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(
            f"{where}: YAML syntax error: {what}; fix the file (YAML: `section:` then indented `field: value`)"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data


def _type_name(hint: Any) -> str:
    choices = _literal_choices(hint)
    if choices is not None:
        return "|".join(map(str, choices)) + ("|null" if _is_optional(hint) else "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_HELP_WIDTH = 118


def _wrap(text: str, first: int, rest: int) -> str:
    # Names such as jinaai/jina-embeddings-v3 or file:line citations must stay whole to be searchable.
    return textwrap.fill(
        text,
        _HELP_WIDTH,
        initial_indent=" " * first,
        subsequent_indent=" " * rest,
        break_on_hyphens=False,
        break_long_words=False,
    )


def help_text() -> str:
    """Every field with its type, default (or what each recipe sets it to) and help, grouped by section."""
    lines = ["Config fields (set in a YAML file or override with --section.field value):", ""]
    for f in dataclasses.fields(Config):
        if f.name in _top_level_types():
            lines.append(f"--{f.name} ({_type_name(_top_level_types()[f.name])}, default {f.default!r})")
            text = f"{f.metadata.get('help', '')} Precedence, lowest first: recipe, YAML file, command line."
            lines.append(_wrap(text, 4, 4))
            lines.append("")
    for name, cls in _section_types().items():
        lines.append(f"{name}:")
        hints = _field_hints(cls)
        for f in dataclasses.fields(cls):
            if "recipe" in f.metadata:
                default = f.metadata["recipe"].describe()
            else:
                default = f"default {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
            head = f"  --{name}.{f.name} ({_type_name(hints[f.name])}, {default})"
            lines.append(_wrap(head, 0, 8))
            lines.append(_wrap(f.metadata.get("help", ""), 6, 6))
        lines.append("")
    return "\n".join(lines)


def parse_overrides(args: list[str]) -> tuple[str | None, dict, list[str]]:
    """Split argv into (config path, nested overrides, leftover args)."""
    config_path, overrides, rest = None, {}, []
    sections, top = _section_types(), _top_level_types()
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    raise ConfigError("--config needs a path, e.g. --config configs/tiny-cpu.yaml")
                config_path = args[i + 1]
                i += 1
        elif key is not None and ("." in key or key in top):
            key, _, value = arg[2:].partition("=")
            if not _:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{key} needs a value")
                value = args[i + 1]
                i += 1
            if key in top:
                overrides[key] = _parse_scalar(value, top[key], f"--{key}")
                i += 1
                continue
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


def load_config(
    argv: list[str] | None = None, *, default_preset: Path | None = DEFAULT_PRESET, prog: str = "engine"
) -> Config:
    """Config from `--config file` (or the default preset) plus `--section.field value` overrides.

    `--help` prints every field and exits. Anything else unknown is an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"usage: {prog} [--config FILE] [--recipe authors|engine] [--section.field VALUE ...]\n")
        print(help_text())
        raise SystemExit(0)
    path, overrides, rest = parse_overrides(argv)
    if rest:
        raise ConfigError(f"unrecognised argument(s) {rest}; settings are given as --section.field value (see --help)")
    base = (
        load_yaml(path) if path else (load_yaml(default_preset) if default_preset and default_preset.is_file() else {})
    )
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
