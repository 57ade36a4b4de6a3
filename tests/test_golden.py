"""Golden outputs: numerically neutral refactors must leave these bits unchanged.

Two records in tests/golden/:
- `train.json`: the per-step losses and a digest of the final weights of a short fixed-seed run of
  every objective (tiny Llama, synthetic data, the default fused backend).
- `kernels.json`: the loss, per-sequence log-probs and the gradients w.r.t. hidden and weight of every
  kernel backend, on fixed inputs, for every objective.

Bits depend on the CPU's vector ISA, the thread count and the torch version (BLAS kernels differ), so
the comparison is exact when those match the recorded machine and falls back to a relative
tolerance of 1e-4 otherwise (and says so). A change that legitimately moves the last bits (a new
accumulation order in a kernel, say) regenerates the files with

    python -m tests.test_golden --write

and says why in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_run import TINY_RUN, argv

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
OBJECTIVES = ("dpo", "ddpo", "orpo", "dorpo", "sft")
STEPS = 3
TOL = 1e-4
TRAIN_ARGS = argv(
    {
        **TINY_RUN,
        "eval.enabled": False,
        "logging.tensorboard": False,
        "optim.max_steps": STEPS,
        "checkpoint.export_final": True,
    }
)


def machine() -> dict:
    """What the exact bits depend on."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def _digest(t: torch.Tensor) -> dict:
    """Exact hash of the values plus float summaries for the tolerance fallback."""
    t = t.detach().cpu().contiguous()
    f = t.double()
    return {
        "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
        "shape": list(t.shape),
        "sum": f.sum().item(),
        "abs_sum": f.abs().sum().item(),
        "sq_sum": (f * f).sum().item(),
    }


def train_record(tmp: Path) -> dict:
    from engine.config import load_config
    from engine.train import train

    out = {}
    for objective in OBJECTIVES:
        run = tmp / objective
        cfg = load_config(
            TRAIN_ARGS
            + [
                "--loss.objective",
                objective,
                "--logging.output_dir",
                str(run),
                "--data.cache_dir",
                str(run / "cache"),
                "--deviation.cache_dir",
                str(run / "emb"),
                "--ref_cache.dir",
                str(run / "ref"),
            ]
        )
        train(cfg)
        lines = (cfg.logging.run_dir / "metrics.jsonl").read_text().splitlines()
        out[objective] = {
            "losses": [float(json.loads(line)["loss"]).hex() for line in lines],
            "weights": _digest(_final_weights(cfg.logging.run_dir / "final")),
        }
    return out


def _final_weights(final_dir: Path) -> torch.Tensor:
    """Every exported weight (save_pretrained's safetensors), flattened in name order."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(final_dir.glob("*.safetensors")):
        state.update(load_file(f))
    assert state, f"no safetensors weights exported in {final_dir}"
    return torch.cat([state[k].reshape(-1).float() for k in sorted(state)])


def kernel_record() -> dict:
    from ddpo_kernels import fused_preference_loss
    from engine.losses import loss_epilogue

    g = torch.Generator().manual_seed(1234)
    n, d, v, s = 203, 48, 517, 6
    hidden0 = torch.randn(n, d, generator=g) * 0.5
    weight0 = torch.randn(v, d, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    segment_ids = torch.randint(0, s, (n,), generator=g).sort().values
    chosen, rejected = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    ref_c = torch.tensor([-700.0, -650.0, -720.0])
    ref_r = torch.tensor([-710.0, -640.0, -730.0])
    weights = torch.tensor([0.5, 1.0, 0.25])
    out = {}
    for backend in ("eager", "torch", "triton"):
        for objective in OBJECTIVES:
            hidden = hidden0.clone().requires_grad_(True)
            weight = weight0.clone().requires_grad_(True)
            epilogue = loss_epilogue(
                objective, beta=0.1, chosen_weights=weights, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r
            )
            res = fused_preference_loss(
                hidden,
                weight,
                targets,
                segment_ids,
                chosen,
                rejected,
                epilogue,
                backend=backend,
                chunk_rows=16,
                block_rows=64,
                return_output=True,
            )
            res.loss.backward()
            out[f"{backend}/{objective}"] = {
                "loss": float(res.loss).hex(),
                "dhidden": _digest(hidden.grad),
                "dweight": _digest(weight.grad),
            }
    return out


def _compare(name: str, got, want, exact: bool, path: str = "") -> list[str]:
    """Differences between two records; values are compared exactly or to TOL."""
    errs = []
    if isinstance(want, dict):
        for k in want:
            if k not in got:
                errs.append(f"{name}{path}/{k}: missing")
            elif not (k == "sha256" and not exact):
                errs += _compare(name, got[k], want[k], exact, f"{path}/{k}")
        return errs
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{name}{path}: {len(got)} entries, golden has {len(want)}"]
        for i, (a, b) in enumerate(zip(got, want)):
            errs += _compare(name, a, b, exact, f"{path}[{i}]")
        return errs
    if isinstance(want, str) and want.startswith(("0x", "-0x")) or isinstance(want, float):
        a = float.fromhex(got) if isinstance(got, str) else got
        b = float.fromhex(want) if isinstance(want, str) else want
        ok = a == b if exact else math.isclose(a, b, rel_tol=TOL, abs_tol=TOL * 1e-3)
        return [] if ok else [f"{name}{path}: {a!r} != golden {b!r}"]
    return [] if got == want else [f"{name}{path}: {got!r} != golden {want!r}"]


def _check(kind: str, record: dict) -> None:
    stored = json.loads((GOLDEN / f"{kind}.json").read_text())
    exact = stored["machine"] == machine()
    errs = _compare(kind, record, stored["record"], exact)
    mode = "exact" if exact else f"rtol {TOL} (recorded on {stored['machine']}, this is {machine()})"
    assert not errs, f"golden {kind} outputs changed ({mode}):\n" + "\n".join(errs[:30])


def test_kernel_backends_golden():
    _check("kernels", kernel_record())


@pytest.mark.slow
def test_training_golden(tmp_path):
    _check("train", train_record(tmp_path))


def write(tmp: Path) -> None:
    GOLDEN.mkdir(exist_ok=True)
    for kind, record in (("kernels", kernel_record()), ("train", train_record(tmp))):
        (GOLDEN / f"{kind}.json").write_text(json.dumps({"machine": machine(), "record": record}, indent=1) + "\n")
        print(f"wrote {GOLDEN / kind}.json")


if __name__ == "__main__":
    import os
    import tempfile

    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_golden --write")
    # The same environment as tests/conftest.py (Triton through its interpreter on CPU).
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as d:
        write(Path(d))
