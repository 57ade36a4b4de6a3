"""Test-wide settings: kernels run through the Triton interpreter when no GPU is present; CUDA tests
carry the `cuda` marker, so `pytest -m cuda` (what `make gpu-check` runs on a GPU) selects exactly them."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

requires_cuda = __import__("pytest").mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """Mark as `cuda` every test that skips without CUDA (any skipif whose reason names CUDA, as
    `requires_cuda` does) or that carries @pytest.mark.cuda itself."""
    import pytest

    for item in items:
        skips = item.iter_markers("skipif")
        reasons = [str(m.kwargs.get("reason", "")) + " " + " ".join(map(str, m.args)) for m in skips]
        if any("cuda" in r.lower() for r in reasons) and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)
