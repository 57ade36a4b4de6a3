"""Training FLOPs per token and model FLOPs utilisation (MFU): the one definition the project uses.

Where this sits: `engine.train` logs MFU every step; the benchmarks (`bench/bench_train.py`'s end-to-end
rows, `bench/bench_kernels.py`'s TFLOP/s, `make gpu-check`) report it with the same functions, so a
trainer log and a benchmark row of the same step agree.

Conventions (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):
- Matmul FLOPs per token: 2 per weight in the forward pass, 4 in the backward pass (2 for the input
  gradient, 2 for the weight gradient), so 6 per trained weight. A frozen weight (LoRA's base model)
  still passes gradients to its input but needs no weight gradient: 4.
- The input embedding is a lookup, not a matmul: its weights are left out, unless it is tied to the LM
  head (then the head's matmul counts them once).
- Attention scores and values: 12 L d T per token, with T the token's attended context. PaLM counts the
  full (non-causal) T; so do we. For packed rows T is the length of the token's own sequence, averaged
  over tokens (`attention_context`), since sequences do not attend across each other.
- Activation recomputation (gradient checkpointing) is not counted: this is model FLOPs utilisation,
  not hardware FLOPs utilisation.
- Peak: the dense bf16 tensor-core rate of the GPU from its vendor's data sheet (no sparsity). A GPU
  missing from the table, or a CPU, gives no MFU (None), never a guess.

Nothing here imports torch at module level: the `make gpu-check` orchestrator reads these names
without touching the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Dense bf16 tensor-core peak (no sparsity) per GPU family, FLOP/s; matched as a substring of the
# device name, most specific first. Sources: the vendors' data sheets (SXM parts unless named).
GPU_PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def gpu_peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name; None for no name or a name not in the table."""
    if not device_name:
        return None
    for key, peak in GPU_PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_name(device) -> str | None:
    """The CUDA device's name (what `gpu_peak_flops` matches), None for any other device."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def flops_per_token(
    n_params: int, n_layers: int, d_model: int, context: float, *, n_trainable: int | None = None, n_embedding: int = 0
) -> float:
    """Training FLOPs per token: 6 per trained matmul weight, 4 per frozen one, plus 12 L d T attention.

    n_params: all parameters; n_embedding: those of an untied input embedding (no matmul); n_trainable:
    the trained ones (None = all). See the module docstring for the conventions.
    """
    n = n_params - n_embedding
    trained = n if n_trainable is None else min(n_trainable, n)
    return 4.0 * (n - trained) + 6.0 * trained + 12.0 * n_layers * d_model * context


def attention_context(seq_lens: Iterable[float]) -> float:
    """Mean over tokens of the length of the token's sequence: sum(s^2) / sum(s); 0 for no tokens."""
    total = squares = 0.0
    for s in seq_lens:
        total += s
        squares += float(s) * s
    return squares / total if total else 0.0


@dataclass(frozen=True)
class ModelFlops:
    """The counts FLOPs per token need, read once from a model (HF causal LM, optionally PEFT-wrapped)."""

    n_params: int
    n_trainable: int
    n_embedding: int  # untied input-embedding weights (a lookup); 0 when tied to the LM head
    n_layers: int
    d_model: int

    @classmethod
    def of(cls, model) -> ModelFlops:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        # ZeRO-3 leaves partitioned parameters empty and records their full size in ds_numel.
        numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
        params = list(model.parameters())  # shared (tied) tensors appear once
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is emb
        return cls(
            n_params=sum(numel(p) for p in params),
            n_trainable=sum(numel(p) for p in params if p.requires_grad),
            n_embedding=0 if tied else numel(emb),
            n_layers=int(cfg.num_hidden_layers),
            d_model=int(cfg.hidden_size),
        )

    def per_token(self, context: float) -> float:
        return flops_per_token(
            self.n_params,
            self.n_layers,
            self.d_model,
            context,
            n_trainable=self.n_trainable,
            n_embedding=self.n_embedding,
        )


def lm_head_flops(n_tokens: int, vocab: int, hidden: int) -> float:
    """Forward + backward FLOPs of an LM head over n_tokens rows: 6 N V D (logits, input and weight
    gradients). The figure fused-loss TFLOP/s are quoted against; recomputing logits costs extra."""
    return 6.0 * n_tokens * vocab * hidden


def mfu(flops_per_token: float, tokens_per_s: float, device_name: str | None, *, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation of `n_devices` GPUs named `device_name` processing `tokens_per_s` in total;
    None on CPU or an unknown GPU (no peak to divide by)."""
    peak = gpu_peak_flops(device_name)
    return flops_per_token * tokens_per_s / (peak * n_devices) if peak else None
