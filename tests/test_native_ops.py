"""Native row operators (csrc/, torch.ops.ddpo_ops) against their PyTorch references.

Every op is compared with an fp64 eager computation and with the same-precision PyTorch
reference of ddpo_kernels/chunk_logprob.py: the native error must be at most 2x the reference's
(plus a floor of a few ulps of the output dtype, for outputs where both are exact to the
last bit). The CUDA sources are compiled with nvcc wherever nvcc exists, even against a CPU torch
build, so a compile error fails here and not on a GPU box.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpo_kernels import chunk_logprob

REPO = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=_NO_CUDA)]


@pytest.fixture(scope="module", autouse=True)
def native():
    """Load (JIT-building once if needed) the native library; with a C++ compiler it must load."""
    chunk_logprob.set_native_enabled(None)
    loaded = chunk_logprob.load_native()
    if not loaded:
        if os.environ.get("ENGINE_NATIVE_JIT") == "0":
            pytest.skip("ddpo_kernels._C is not built and ENGINE_NATIVE_JIT=0 forbids the JIT build")
        has_cxx = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
        assert not has_cxx, f"a C++ compiler exists but the native ops failed to load: {chunk_logprob.native_error()}"
        pytest.skip("no C++ compiler: native ops cannot be built here")
    yield
    chunk_logprob.set_native_enabled(None)


def _need_device(device: str) -> None:
    if not chunk_logprob.native_has_device(device):
        pytest.skip(f"the native library was built without {device} kernels (build with nvcc: pip install -e .)")


def _make_block(C, V, dtype, device, seed=0, scale=3.0):
    """Logits and one target per row (the walk only hands over rows that have one)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(C, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (C,), generator=g)
    return logits.to(device), targets.to(device)


def _truth_forward(logits, targets):
    """fp64 eager: lse and the targets' log-probs."""
    x = logits.double().cpu()
    lse = torch.logsumexp(x, dim=-1)
    return lse, x.gather(1, targets.cpu()[:, None]).squeeze(1) - lse


def _assert_close_2x(native, ref, truth, floor, what):
    err_n = (native.double().cpu() - truth).abs().max().item()
    err_r = (ref.double().cpu() - truth).abs().max().item()
    assert err_n <= 2 * err_r + floor, (
        f"{what}: native error {err_n:.3g} > 2 x reference error {err_r:.3g} + {floor:.3g}"
    )


SHAPES = [(1, 1000), (37, 1000), (130, 32003)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,V", SHAPES)
def test_forward_matches_reference(device, dtype, C, V):
    _need_device(device)
    logits, targets = _make_block(C, V, dtype, device)
    lse_n, logp_n = chunk_logprob.chunk_logprob_forward(logits, targets)
    lse_r, logp_r = chunk_logprob.chunk_logprob_forward_ref(logits, targets)
    lse_t, logp_t = _truth_forward(logits, targets)
    assert lse_n.dtype == logp_n.dtype == torch.float32 and lse_n.shape == logp_n.shape == (C,)
    _assert_close_2x(lse_n, lse_r, lse_t, 1e-6 * (1 + lse_t.abs().max().item()), "lse")
    _assert_close_2x(logp_n, logp_r, logp_t, 1e-6 * (1 + logp_t.abs().max().item()), "token log-probs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,V", SHAPES)
def test_backward_matches_reference(device, dtype, C, V):
    _need_device(device)
    logits, targets = _make_block(C, V, dtype, device, seed=1)
    lse = torch.logsumexp(logits.float(), dim=-1)
    grad = torch.randn(C, generator=torch.Generator().manual_seed(2)).to(device)
    out_n, out_r = logits.clone(), logits.clone()
    chunk_logprob.chunk_logprob_backward_(out_n, targets, lse, grad)
    chunk_logprob.chunk_logprob_backward_ref_(out_r, targets, lse, grad)
    assert out_n.dtype == dtype

    # fp64 truth: d(sum_i g_i * logp_i) / d logits through autograd.
    x = logits.double().cpu().requires_grad_(True)
    lp = torch.log_softmax(x, dim=-1).gather(1, targets.cpu()[:, None]).squeeze(1)
    (lp * grad.double().cpu()).sum().backward()
    floor = 2 * EPS[dtype] * grad.abs().max().item()
    _assert_close_2x(out_n, out_r, x.grad, floor, "d logits")


def test_strided_rows_and_int32_targets():
    """Rows that are a column slice of a wider buffer (stride(0) > V), int32 targets."""
    C, V = 23, 1000
    logits, targets = _make_block(C, V, torch.float32, "cpu", seed=3)
    wide = torch.full((C, V + 9), 123.0)
    wide[:, :V] = logits
    view = wide[:, :V]
    lse, logp = chunk_logprob.chunk_logprob_forward(view, targets.int())
    lse_t, logp_t = _truth_forward(logits, targets)
    torch.testing.assert_close(lse.double(), lse_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp.double(), logp_t, rtol=0, atol=1e-5)
    g = torch.ones(C)
    chunk_logprob.chunk_logprob_backward_(view, targets.int(), lse, g)
    expect = logits.clone()
    chunk_logprob.chunk_logprob_backward_ref_(expect, targets, lse, g)
    torch.testing.assert_close(view, expect, rtol=0, atol=1e-6)
    assert torch.all(wide[:, V:] == 123.0), "the backward wrote outside the [C, V] view"


def test_masked_vocab_entries():
    """-inf logits (masked vocabulary) give lse of the rest and zero probability."""
    C, V = 5, 300
    logits, _ = _make_block(C, V, torch.float32, "cpu", seed=4)
    targets = torch.arange(C)
    logits[:, 200:] = float("-inf")
    lse, _ = chunk_logprob.chunk_logprob_forward(logits, targets)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=0, atol=1e-5)
    out = logits.clone()
    chunk_logprob.chunk_logprob_backward_(out, targets, lse, torch.ones(C))
    assert torch.isfinite(out).all() and out[:, 200:].abs().max().item() < 1e-30


@pytest.mark.parametrize("targets", [[0, 5000], [0, -100]], ids=["beyond-V", "ignore-index"])
def test_bad_targets_raise(targets):
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.ops.ddpo_ops.logprob_rows_forward(torch.randn(2, 1000), torch.tensor(targets))


def test_backward_rejects_overlapping_rows():
    logits = torch.randn(1, 1000).expand(3, 1000)
    with pytest.raises(RuntimeError, match="overlap"):
        targets = torch.zeros(3, dtype=torch.long)
        torch.ops.ddpo_ops.logprob_rows_backward_(logits, targets, torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------------------------------
# Dispatch switches, nvcc, setup.py
# ---------------------------------------------------------------------------------------


def test_switches_force_reference(monkeypatch):
    calls = []
    real_ref = chunk_logprob.chunk_logprob_forward_ref
    counted = lambda *a, **k: calls.append(1) or real_ref(*a, **k)  # noqa: E731
    monkeypatch.setattr(chunk_logprob, "chunk_logprob_forward_ref", counted)
    logits, targets = _make_block(9, 1000, torch.float32, "cpu")

    chunk_logprob.chunk_logprob_forward(logits, targets)
    assert calls == [], "native ops are loaded but the reference ran"
    chunk_logprob.set_native_enabled(False)
    try:
        assert not chunk_logprob.native_has_device("cpu")
        chunk_logprob.chunk_logprob_forward(logits, targets)
        assert calls == [1]
    finally:
        chunk_logprob.set_native_enabled(None)
    monkeypatch.setenv("ENGINE_NATIVE_OPS", "0")
    chunk_logprob.chunk_logprob_forward(logits, targets)
    assert calls == [1, 1]
    monkeypatch.setenv("ENGINE_NATIVE_OPS", "1")
    assert chunk_logprob.native_has_device("cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """nvcc -c on csrc/*.cu with torch's headers: a compile error fails here, GPU or not."""
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    for cu in sorted((REPO / "csrc").glob("*.cu")):
        cmd = ["nvcc", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), "-std=c++20", "-O3"]
        cmd += ["-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr"]
        cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__"]
        cmd += ["-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
        cmd += [f"-I{p}" for p in include_paths()] + [f"-I{REPO / 'csrc'}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"nvcc failed on {cu.name}:\n{proc.stderr[-4000:]}"
        assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0


@pytest.mark.parametrize(
    "env,notice",
    [({"SKIP_NATIVE_BUILD": "1"}, "SKIP_NATIVE_BUILD=1"), ({"CXX": "/bin/false", "CC": "/bin/false"}, "not built")],
    ids=["skip", "broken-compiler"],
)
def test_setup_build_never_fails(tmp_path, env, notice):
    """setup.py build_ext exits 0 without an extension when skipped or when the compiler fails."""
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert notice in proc.stdout and "native extension ddpo_kernels._C not built" in proc.stdout
    assert not list(tmp_path.rglob("*.so"))
