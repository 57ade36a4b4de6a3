"""The tiny training run the trainer tests share (test_train, test_golden, test_reliability*): 24 synthetic
prompts, short sequences in 512-token rows, style-only deviation (no MiniLM load), a constant learning
rate, no progress bar. Each test adds what it needs and turns the dict into command-line flags."""

from __future__ import annotations

TINY_RUN: dict[str, object] = {
    "data.synthetic_prompts": 24,
    "data.max_prompt_length": 48,
    "data.max_length": 128,
    "data.max_tokens_per_row": 512,
    "deviation.semantic_model": "",
    "optim.lr": "2e-3",
    "optim.warmup_ratio": 0,
    "optim.schedule": "constant",
    "logging.progress": False,
}


def argv(settings: dict[str, object]) -> list[str]:
    """`--section.field value` flags of {"section.field": value}; booleans as true/false."""
    flags: list[str] = []
    for key, value in settings.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags
