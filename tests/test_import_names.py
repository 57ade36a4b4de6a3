"""Import names: ours never shadow a well-known package, from any working directory.

`kernels` is Hugging Face's hub-kernels package, which transformers probes (and TRL imports
unguarded). Our fused ops live in the folder kernels/ but are imported as `ddpo_kernels`, and the
folder has no `__init__.py`: from a checkout's root it is at most a PEP 420 namespace portion, which
loses to any installed regular package of that name and which transformers does not count as
installed.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STANDIN_VERSION = "0.18.7"  # inside transformers' accepted window for hub kernels

PROBE = textwrap.dedent(
    """
    import importlib.metadata, json, sys
    import ddpo_kernels, engine.train
    from ddpo_kernels import fused_preference_loss
    from transformers.utils.import_utils import is_kernels_available
    out = {"available": is_kernels_available(), "ddpo_kernels": ddpo_kernels.__file__}
    try:
        import kernels
        out["kernels_file"] = getattr(kernels, "__file__", None)
        has_get_kernel = hasattr(kernels, "get_kernel")
        out["get_kernel"] = kernels.get_kernel("kernels-community/activation") if has_get_kernel else None
        out["version"] = importlib.metadata.version("kernels")
    except (ImportError, importlib.metadata.PackageNotFoundError) as e:
        out["error"] = type(e).__name__
    print(json.dumps(out))
    """
)


def _standin(site: Path) -> None:
    """A minimal installed distribution named `kernels`, shaped like Hugging Face's."""
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"__version__ = '{STANDIN_VERSION}'\ndef get_kernel(repo_id):\n    return 'stand-in:' + repo_id\n"
    )
    info = site / f"kernels-{STANDIN_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {STANDIN_VERSION}\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("")


def _probe(cwd: Path, pythonpath: str | None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "ddpo_kernels" / "__init__.py").exists()


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_hf_kernels_standin_and_ours_import_together(tmp_path, where):
    site = tmp_path / "site"
    _standin(site)
    cwd = ROOT if where == "repo_root" else tmp_path
    out = _probe(cwd, str(site))
    assert out["kernels_file"] == str(site / "kernels" / "__init__.py")
    assert out["get_kernel"] == "stand-in:kernels-community/activation"
    assert out["version"] == STANDIN_VERSION
    assert out["available"] is True  # transformers sees the real (stand-in) package, not our folder
    assert Path(out["ddpo_kernels"]).parent == ROOT / "kernels" / "ddpo_kernels"


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_without_hf_kernels_transformers_sees_none(tmp_path, where):
    cwd = ROOT if where == "repo_root" else tmp_path
    out = _probe(cwd, None)
    assert out["available"] is False
    assert out.get("get_kernel") is None and out.get("version") is None


def test_bench_is_not_installed():
    """bench/ (and experiments/) run from a checkout; an installed top-level `bench` would shadow others."""
    import importlib.metadata

    files = importlib.metadata.files("ddpo-engine") or []
    tops = {Path(str(f)).parts[0] for f in files}
    assert "bench" not in tops and "kernels" not in tops
