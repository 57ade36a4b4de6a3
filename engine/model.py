"""Building and loading models and tokenizers: named random-init architectures, HF models, LoRA, attention.

Sits at the start of the model side of the flow: the trainer, the reference-cache builder and the
evaluator get their (model, tokenizer) here. Named architectures (`llama-tiny`, `gpt2-small`,
`llama-8b`, `llama-8b-4layers`) are built from a config with no download, seeded and deterministic; anything else is a
Hugging Face causal LM by local path or hub name (with `num_labels`, the sequence classifier on the
same trunk that `engine.reward` trains). The trainer feeds the model's trunk (no LM head) and
hands the head's weight to the fused loss, so `trunk_and_head` is here too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from engine import attention

attention.register()

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
# The bundled tokenizer's chat template (engine/data/build_tokenizer.py writes it into the assets).
# user = prompt, assistant = response; the generation prompt ends right where the response starts,
# so the prompt part's tokens are a prefix of the full conversation's tokens (the data pipeline relies on it).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _named_config(name: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    if name == "llama-tiny":
        # Small enough to train on 2 CPU cores in minutes; real Llama block structure (GQA, RoPE, SwiGLU).
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        )
    if name == "gpt2-small":
        return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    if name in ("llama-8b", "llama-8b-4layers"):
        # Llama-3.1-8B shapes: 8.03e9 parameters. The 4-layer variant keeps every shape (vocabulary, width,
        # GQA, MLP) with 4 of the 32 decoder layers (1.92e9 parameters): a one-GPU benchmark of the 8B
        # step's per-layer and LM-head costs in minutes (make gpu-check).
        return LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32 if name == "llama-8b" else 4,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )
    from engine.config import NAMED_ARCHITECTURES

    raise ValueError(f"unknown named architecture {name!r}; named architectures: {', '.join(NAMED_ARCHITECTURES)}")


def is_named_architecture(name: str) -> bool:
    from engine.config import NAMED_ARCHITECTURES

    return name in NAMED_ARCHITECTURES


def load_tokenizer(name_or_path: str | None = None, *, revision: str | None = None):
    """The bundled tokenizer (None or a named architecture), else a HF tokenizer by path or hub name."""
    from transformers import AutoTokenizer

    if name_or_path is None or is_named_architecture(name_or_path):
        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tok.pad_token is None:
        # Packed training never pads inside a sequence; the pad id only fills row tails and batched generation.
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = (
            CHAT_TEMPLATE.replace("<|user|>", "User:")
            .replace("<|assistant|>", "Assistant:")
            .replace("<|end|>", tok.eos_token or "")
            .replace("{{ bos_token }}", "{{ bos_token or '' }}")
        )
    return tok


def resolve_attn_implementation(requested: str, device: torch.device | str, model_type: str | None = None) -> str:
    """auto: flash_attention_2 on CUDA when flash-attn is importable, else sdpa_varlen (per-sequence SDPA over
    packed rows, engine.attention) for the architectures it supports, else transformers' sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise RuntimeError(
                "model.attn_implementation flash_attention_2 needs the flash-attn package: pip install flash-attn, "
                "or use sdpa_varlen"
            )
        if requested == attention.NAME and model_type is not None and model_type not in attention.VARLEN_MODEL_TYPES:
            raise ValueError(
                f"model.attn_implementation {attention.NAME} supports model types "
                f"{', '.join(attention.VARLEN_MODEL_TYPES)}; this model is {model_type!r}: "
                "use sdpa or flash_attention_2"
            )
        return requested
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if model_type is None or model_type in attention.VARLEN_MODEL_TYPES:
        return attention.NAME
    return "sdpa"


def prepare_for_preference_training(model, *, disable_dropout: bool = True) -> None:
    """In-place changes every model of a run gets (policy, reference, cache builder), none of which changes
    the function the model computes:

    - transformers' Python tanh-GELU (NewGELUActivation, GPT-2's `gelu_new`) becomes torch's fused
      kernel of the same formula: autograd then keeps the GELU input only, not the four intermediates
      of the Python expression (measured on gpt2-small: 4 x 4 x 3,072 bytes per token and layer,
      423 MB of a 743-token step).
    - with `disable_dropout`, every dropout probability is set to 0 (TRL's DPOTrainer does the same
      by default): the preference losses compare policy and reference log-probs of the same tokens,
      so dropout only adds noise to the margins; it also keeps SDPA off its [L, L] math path (dropout
      made gpt2-small materialise three [heads, L, L] tensors per layer, 910 MB at 743 tokens).
      LoRA's own dropout is added later (apply_lora) and keeps model.lora_dropout.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    if disable_dropout:
        # Modules only, not the config: an exported model keeps its own dropout settings.
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):  # Llama-style attention reads a float
                m.attention_dropout = 0.0


def default_vocab_size() -> int:
    """Vocabulary of the named architectures built with the bundled tokenizer: its size rounded up to 64
    (matmul-friendly; rows past the tokenizer are never targeted)."""
    return (len(load_tokenizer()) + 63) // 64 * 64


def build_model(
    name: str,
    *,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    device: str | torch.device = "cpu",
    attn_implementation: str = attention.NAME,
    vocab_size: int | None = None,
    num_labels: int | None = None,
):
    """Random-init named architecture, deterministic for (name, seed). device='meta' allocates nothing.

    num_labels: None builds the causal LM; a number builds the sequence classifier with that many
    outputs on the same trunk (a reward model with 1).
    """
    if vocab_size is None:
        vocab_size = default_vocab_size()
    cfg = _named_config(name, vocab_size)
    cfg._attn_implementation = attn_implementation
    auto = _auto_class(num_labels)
    if num_labels is not None:
        cfg.num_labels = num_labels
    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return auto.from_config(cfg, dtype=torch_dtype)
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = auto.from_config(cfg, dtype=torch_dtype)
    return model.to(device)


def _auto_class(num_labels: int | None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification


def load_model(
    cfg,
    *,
    device: str | torch.device = "cpu",
    name: str | None = None,
    for_training: bool = True,
    num_labels: int | None = None,
):
    """Model for a run from a ModelConfig (`name` overrides cfg.name, e.g. a separate reference model).

    Applies the attention choice, gradient checkpointing and LoRA (when cfg.lora_r > 0 and for_training).
    num_labels None: the causal LM; a number: AutoModelForSequenceClassification with that many
    labels (its new score head randomly initialised when the checkpoint has none), LoRA task SEQ_CLS.
    """
    name = name or cfg.name
    if is_named_architecture(name):
        attn = resolve_attn_implementation(cfg.attn_implementation, device, _named_config(name, 64).model_type)
        model = build_model(
            name, dtype=cfg.dtype, seed=cfg.seed, device=device, attn_implementation=attn, num_labels=num_labels
        )
    else:
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        attn = resolve_attn_implementation(cfg.attn_implementation, device, hf_cfg.model_type)
        extra = {} if num_labels is None else {"num_labels": num_labels}
        model = (
            _auto_class(num_labels)
            .from_pretrained(
                name,
                revision=cfg.revision,
                dtype=_DTYPES[cfg.dtype],
                attn_implementation=attn,
                trust_remote_code=cfg.trust_remote_code,
                **extra,
            )
            .to(device)
        )
    model.config.use_cache = False  # packed rows rely on attention_mask=None and no KV cache
    prepare_for_preference_training(model, disable_dropout=cfg.disable_dropout)
    if not for_training:
        return model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg, task_type="CAUSAL_LM" if num_labels is None else "SEQ_CLS")
    return model


def lora_target_names(model) -> list[str]:
    """Leaf names of the modules LoRA can adapt (Linear, Embedding, Conv1d and GPT-2's Conv1D), sorted."""
    kinds = ("Linear", "Embedding", "Conv1d", "Conv1D")
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and type(m).__name__ in kinds})


def check_lora_targets(model, targets: list[str]) -> None:
    """Every name in `targets` must match a module (its leaf name, or a dotted suffix as peft accepts)."""
    names = [n for n, _ in model.named_modules() if n]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        from engine.config import ConfigError

        raise ConfigError(
            f"model.lora_target_modules: {unknown} match no module of {type(model).__name__}; "
            f"its adaptable module names are {lora_target_names(model)}"
        )


def apply_lora(model, cfg, task_type: str = "CAUSAL_LM"):
    """LoRA on cfg.lora_target_modules. task_type SEQ_CLS makes peft train the classifier head
    (`score`) in full through modules_to_save, as a freshly initialised head must be."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, cfg.lora_target_modules)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, lcfg)


def check_model(cfg, *, name: str | None = None, field: str = "model.name", lora: bool = True) -> None:
    """Cheap pre-flight check that a model loads and its LoRA targets exist, before any data or cache work.

    Builds the architecture on the meta device (no memory, no weights read): a named architecture from
    its config, anything else from its config.json (local directory or the hub cache). Raises
    ConfigError naming `field` and the fix.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.config import ConfigError

    name = name or cfg.name
    if is_named_architecture(name):
        model = build_model(name, dtype=cfg.dtype, device="meta")
    else:
        path = Path(name)
        looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
        if looks_local and not path.is_dir():
            raise ConfigError(
                f"{field} {name!r}: no such directory; give a save_pretrained directory, a hub name "
                "or one of the named architectures"
            )
        if path.is_dir() and not any(path.glob(p) for p in ("*.safetensors", "*.bin", "*.pt")):
            raise ConfigError(
                f"{field} {name!r} holds no weight files (*.safetensors, *.bin); point it at a "
                "save_pretrained directory"
            )
        try:
            config = AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"{field} {name!r} cannot be loaded ({first}); check the name, the local path, or hub "
                "access (HF_HUB_OFFLINE needs the model in the local cache)"
            ) from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if lora and cfg.lora_r > 0:
        check_lora_targets(model, cfg.lora_target_modules)


def trunk_and_head(model):
    """(trunk module returning final hidden states, LM-head module) of a causal LM, through a peft wrapper.

    The fused loss multiplies the trunk's hidden states by the head's weight itself, so the [N, V]
    logits the HF forward would build are never created.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else None
    if trunk is None or trunk is base:
        trunk = getattr(base, base.base_model_prefix)
    return trunk, head


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_pretrained(name_or_path: str, *, dtype: str = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) for inference: a save_pretrained directory, a hub name, or a named architecture."""
    from transformers import AutoModelForCausalLM

    if is_named_architecture(name_or_path):
        model, tok = build_model(name_or_path, dtype=dtype, device=device), load_tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype]).to(device)
        path = Path(name_or_path)
        has_tok = path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = load_tokenizer(name_or_path) if has_tok or not path.exists() else load_tokenizer()
    return model.eval(), tok
