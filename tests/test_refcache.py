"""Reference log-prob cache: values, resumability, integrity, fingerprints, multi-process builds.

One small setup for the whole file (llama-tiny, 20 synthetic prompts, max_length 64, parts of 2 rows),
built once in-process; the SIGKILL and 2-process tests build again in subprocesses and compare bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import refcache
from engine.config import load_config
from engine.data import collate, prepare_data, unpack
from engine.model import load_model, load_tokenizer
from engine.refcache import RefCache, RefCacheError, RefCacheKeyError

REPO = Path(__file__).resolve().parent.parent
ROWS_PER_PART = 2


def _overrides(tmp: Path, **extra) -> list[str]:
    args = {
        "data.synthetic_prompts": 20,
        "data.max_length": 64,
        "data.max_prompt_length": 24,
        "data.max_tokens_per_row": 256,
        "data.cache_dir": str(tmp / "data-cache"),
        "loss.objective": "dpo",
        "logging.progress": "false",
        "logging.output_dir": str(tmp / "runs"),
        "ref_cache.dir": str(tmp / "cache"),
    }
    args.update({k.replace("__", "."): v for k, v in extra.items()})
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _setup(tmp: Path, **extra):
    cfg = load_config(_overrides(tmp, **extra))
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    return cfg, tok, prepare_data(cfg, tok, compute_weights=False, verbose=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refcache")
    cfg, tok, prep = _setup(tmp)
    assert len(prep.train_rows) > 2 * ROWS_PER_PART, "the resume test needs several parts"
    refcache.build_cache(cfg, tok, prep, rows_per_part=ROWS_PER_PART)
    return dataclasses.make_dataclass("World", ["tmp", "cfg", "tok", "prep", "dir"])(
        tmp, cfg, tok, prep, Path(cfg.ref_cache.dir)
    )


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _subprocess_env() -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # Same intra-op thread count as this process, so float reductions are split the same way.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


@pytest.fixture
def reference_use(monkeypatch):
    """Reference-model loads and forwards in this process, counted by wrapping the functions every path calls."""
    from engine.refcache import reference

    counts = {"loads": 0, "forwards": 0}
    real_load, real_forward = reference.load_reference_model, reference.sequence_logps

    def load(*a, **k):
        counts["loads"] += 1
        return real_load(*a, **k)

    def forward(*a, **k):
        counts["forwards"] += 1
        return real_forward(*a, **k)

    monkeypatch.setattr(reference, "load_reference_model", load)
    monkeypatch.setattr(reference, "sequence_logps", forward)
    return counts


def _cache(world) -> RefCache:
    return RefCache.open(world.dir, refcache.cache_fingerprint(world.cfg, world.tok, world.prep))


# ----------------------------------------------------------------------------------------- values


def test_cached_values_equal_on_the_fly_reference(world, reference_use):
    cache = _cache(world)
    assert len(cache) == 2 * sum(len(r.pair_ids) for r in world.prep.train_rows)
    policy = load_model(world.cfg.model).train()  # full fine-tuning: a separate frozen reference is loaded
    ref = refcache.on_the_fly_reference(policy, world.cfg)
    assert ref.model is not None and ref.model is not policy and reference_use["loads"] == 1
    assert not any(p.requires_grad for p in ref.model.parameters())
    for row in world.prep.train_rows:
        batch = cache.fill(collate([row]))
        chosen, rejected = ref(batch)
        assert chosen.dtype == torch.float32 and chosen.shape == (len(row.pair_ids),)
        torch.testing.assert_close(batch.ref_chosen_logps, chosen, rtol=0, atol=1e-6)
        torch.testing.assert_close(batch.ref_rejected_logps, rejected, rtol=0, atol=1e-6)


def test_lora_reference_is_the_base_with_adapters_disabled(world, reference_use):
    cfg = dataclasses.replace(world.cfg, model=dataclasses.replace(world.cfg.model, lora_r=4, lora_alpha=8))
    policy = load_model(cfg.model).train()
    with torch.no_grad():  # non-zero adapters, so "disabled" and "enabled" give different numbers
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref = refcache.on_the_fly_reference(policy, cfg)
    assert ref.model is None and reference_use["loads"] == 0  # no second copy
    cache = _cache(world)
    batch = cache.fill(collate(world.prep.train_rows[:1]))
    chosen, rejected = ref(batch)
    torch.testing.assert_close(batch.ref_chosen_logps, chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch.ref_rejected_logps, rejected, rtol=0, atol=1e-6)
    assert policy.training  # modes restored after the reference forward
    with torch.no_grad():
        adapted, _ = refcache.reference_logps(policy.eval(), batch)
    assert (adapted - chosen).abs().max() > 1e-3


def test_packed_values_match_an_unpacked_full_forward(world):
    """Each sequence alone through the plain HF forward (full logits, log_softmax) gives the cached sum."""
    cache = _cache(world)
    model = refcache.load_reference_model(world.cfg)
    batch = collate(world.prep.train_rows[:2])  # two rows: padding and several sequences per row
    values, counts = cache.lookup(batch.sequence_keys, with_counts=True)
    for i, (key, seq) in enumerate(unpack(batch).items()):
        with torch.no_grad():
            logits = model(input_ids=seq["input_ids"][None]).logits[0].float()
        mask = seq["targets"] != -100
        logp = torch.log_softmax(logits, -1)[mask].gather(1, seq["targets"][mask][:, None]).sum()
        assert int(counts[i]) == int(mask.sum()) > 0
        torch.testing.assert_close(values[i], logp, rtol=1e-5, atol=1e-3, msg=f"sequence {key}")


def test_missing_sequence_gives_a_clear_error(world):
    cache = _cache(world)
    pair = world.prep.train_rows[0].pair_ids[0]
    assert (pair, "chosen") in cache and ("0" * 16, "chosen") not in cache
    with pytest.raises(
        RefCacheKeyError, match=r"sequence \('0000000000000000', 'rejected'\) not in cache .*rebuild with"
    ):
        cache.lookup([(pair, "chosen"), ("0" * 16, "rejected")])
    with pytest.raises(KeyError):
        cache.lookup([("x" * 40, "chosen")])  # longer than any stored key: a miss, never a prefix match
    batch = collate(world.prep.train_rows[:1])
    batch.pair_ids = ["f" * 16] + batch.pair_ids[1:]
    with pytest.raises(RefCacheKeyError, match="ffffffffffffffff"):
        cache.fill(batch)


def test_fill_detects_a_different_tokenisation(world):
    cache = _cache(world)
    batch = collate(world.prep.train_rows[:1])
    seg = int(batch.chosen_segments[0])
    first = int(torch.nonzero((batch.segment_ids[0] == seg) & (batch.targets[0] != -100))[0])
    batch.targets[0, first] = -100  # one target token fewer than when the cache was built
    with pytest.raises(RefCacheError, match="target tokens in this batch but"):
        cache.fill(batch)


# -------------------------------------------------------------------------------------- integrity


def test_flipped_byte_missing_and_truncated_shards_are_errors(world, tmp_path, capsys):
    fp = refcache.cache_fingerprint(world.cfg, world.tok, world.prep)
    d = tmp_path / "c"
    shutil.copytree(world.dir, d)
    part = d / "part-00001.npy"
    data = bytearray(part.read_bytes())
    data[-3] ^= 0x01  # inside the last record's values
    part.write_bytes(bytes(data))
    with pytest.raises(RefCacheError, match=r"part-00001\.npy is corrupted"):
        RefCache.open(d, fp)
    assert refcache.main(["verify", str(d)]) == 1
    assert "part-00001.npy is corrupted" in capsys.readouterr().err

    (d / "part-00002.npy").unlink()
    with pytest.raises(RefCacheError, match=r"part-00002\.npy is missing"):
        RefCache.open(d, fp)
    (d / "part-00000.npy").write_bytes((d / "part-00000.npy").read_bytes()[:-10])
    with pytest.raises(RefCacheError, match=r"part-00000\.npy has \d+ bytes, manifest says \d+"):
        RefCache.open(d, fp)

    # The build repairs exactly the bad parts and ends with the original bytes.
    cfg = dataclasses.replace(world.cfg, ref_cache=dataclasses.replace(world.cfg.ref_cache, dir=str(d)))
    refcache.build_cache(cfg, world.tok, world.prep, rows_per_part=ROWS_PER_PART)
    assert _files(d) == _files(world.dir)
    assert refcache.main(["verify", str(d)]) == 0


@pytest.mark.parametrize(
    "change, field",
    [({"data__max_length": 60}, "max_length"), ({"data__synthetic_seed": 1}, "data"), ("tokenizer", "tokenizer")],
)
def test_changed_inputs_are_refused_naming_the_field(world, change, field):
    if change == "tokenizer":
        cfg, prep = world.cfg, world.prep
        tok = copy.deepcopy(world.tok)
        tok.add_tokens(["<|extra|>"])
    else:
        cfg, tok, prep = _setup(world.tmp, **change)
    fp = refcache.cache_fingerprint(cfg, tok, prep)
    with pytest.raises(RefCacheError, match=rf"differing field\(s\): .*\b{field} \(cache: ") as err:
        RefCache.open(world.dir, fp)
    assert field in refcache.fingerprint_diff(_cache(world).fingerprint, fp)
    assert "engine.refcache build" in str(err.value)


def test_objective_and_beta_share_the_cache(world, tmp_path):
    cfg = load_config(_overrides(world.tmp, loss__objective="ddpo", loss__beta=0.5))
    assert refcache.cache_fingerprint(cfg, world.tok, world.prep) == _cache(world).fingerprint


# ------------------------------------------------------------------------------ resume, processes


# Runs the build CLI in a subprocess that SIGKILLs itself right after its third part file is published,
# before that part's checksum record: the fault comes from outside the engine (a wrapper around the one
# atomic writer), at an exact point.
KILL_AT_THIRD_PART = """
import os, signal, sys
import engine.refcache.format as fmt
real, parts = fmt.atomic_write, []
def write(path, *a, **k):
    out = real(path, *a, **k)
    if str(path).endswith(".npy"):
        parts.append(path)
        if len(parts) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return out
fmt.atomic_write = write
from engine.refcache.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_build_resumes_to_identical_bytes(world, tmp_path):
    d = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILL_AT_THIRD_PART, "build", *_overrides(world.tmp, ref_cache__dir=d)]
    cmd += ["--rows_per_part", str(ROWS_PER_PART)]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (d / refcache.MANIFEST_NAME).exists()
    assert sorted(p.name for p in d.glob("part-*.npy")) == ["part-00000.npy", "part-00001.npy", "part-00002.npy"]
    # The third part was published without its checksum record: it does not count as done.
    assert sorted(p.name for p in d.glob("part-*.json")) == ["part-00000.json", "part-00001.json"]
    assert "unfinished build: 2/" in refcache.describe(d)
    with pytest.raises(RefCacheError, match=r"unfinished build \(2/\d+ parts\)"):
        RefCache.open(d)

    done_before = {p: (d / p).stat().st_mtime_ns for p in ("part-00000.npy", "part-00001.npy")}
    unverified = (d / "part-00002.npy").stat().st_mtime_ns
    cfg = dataclasses.replace(world.cfg, ref_cache=dataclasses.replace(world.cfg.ref_cache, dir=str(d)))
    refcache.build_cache(cfg, world.tok, world.prep)  # the layout of the unfinished build is kept
    assert {p: (d / p).stat().st_mtime_ns for p in done_before} == done_before  # verified parts were kept
    assert (d / "part-00002.npy").stat().st_mtime_ns != unverified  # the part without a record was recomputed
    assert _files(d) == _files(world.dir)


def test_two_process_build_equals_one_process_build(world, tmp_path):
    d = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "engine.refcache",
        "build",
        *_overrides(world.tmp, ref_cache__dir=d),
        "--parallel.backend",
        "gloo",
        "--rows_per_part",
        str(ROWS_PER_PART),
    ]
    env = _subprocess_env()
    env["OMP_NUM_THREADS"] = "1"  # two workers on a small machine
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stderr
    # Parts are fixed slices of the rows whatever the world size, so the files are the same bytes.
    one, two = _files(world.dir), _files(d)
    assert sorted(one) == sorted(two) and [n for n in one if one[n] != two[n]] == []


# ------------------------------------------------------------------------------------ trainer API


def test_ensure_cache_modes_and_no_reference_with_a_cache(world, tmp_path, monkeypatch, reference_use):
    def with_cache(mode, d):
        return dataclasses.replace(world.cfg, ref_cache=dataclasses.replace(world.cfg.ref_cache, mode=mode, dir=str(d)))

    assert refcache.ensure_cache(with_cache("off", world.dir), world.tok, world.prep, device="cpu") is None
    with pytest.raises(RefCacheError, match=r"no reference cache at .*engine\.refcache build"):
        refcache.ensure_cache(with_cache("require", tmp_path / "none"), world.tok, world.prep, device="cpu")

    # A valid cache: the reference model is never loaded and never run, in auto and require modes.
    import engine.model

    def no_model(*a, **k):
        raise AssertionError("a reference model was loaded although a valid cache exists")

    monkeypatch.setattr(engine.model, "load_model", no_model)
    for mode in ("auto", "require"):
        cache = refcache.ensure_cache(with_cache(mode, world.dir), world.tok, world.prep, device="cpu")
        batch = cache.fill(collate(world.prep.train_rows[:1]))
        assert batch.ref_chosen_logps.shape == (len(batch.pair_ids),)
    assert reference_use == {"loads": 0, "forwards": 0}
    monkeypatch.setattr(engine.model, "load_model", load_model)

    # auto with no cache builds one; a cache of other inputs is refused, never overwritten.
    d = tmp_path / "auto"
    cache = refcache.ensure_cache(
        with_cache("auto", d), world.tok, world.prep, device="cpu", rows_per_part=ROWS_PER_PART
    )
    assert _files(d) == _files(world.dir) and len(cache) == len(_cache(world))
    cfg2, tok2, prep2 = _setup(world.tmp, data__max_length=60, ref_cache__dir=d)
    with pytest.raises(RefCacheError, match="max_length"):
        refcache.ensure_cache(cfg2, tok2, prep2, device="cpu")
    assert _files(d) == _files(world.dir)


def test_info_cli(world, capsys):
    assert refcache.main(["info", str(world.dir)]) == 0
    out = capsys.readouterr().out
    assert "status: finished" in out and f"sequences: {len(_cache(world))}" in out
    assert "ref_model: named:llama-tiny:seed=0:init=float32" in out


def test_rebuilding_a_valid_cache_changes_nothing(world, reference_use):
    before = {p.name: p.stat().st_mtime_ns for p in world.dir.iterdir()}
    files = _files(world.dir)
    # Another part layout, same inputs: the finished cache is valid as it is and is left alone.
    refcache.build_cache(world.cfg, world.tok, world.prep, rows_per_part=ROWS_PER_PART + 1)
    assert _files(world.dir) == files and {p.name: p.stat().st_mtime_ns for p in world.dir.iterdir()} == before
    assert reference_use == {"loads": 0, "forwards": 0}


def test_training_with_the_cache_never_loads_a_reference(world, tmp_path, monkeypatch, reference_use):
    """End to end through engine.train: the cache fills every batch; no reference model is built or run.

    Last in the file: train() joins a (world of one) process group that stays up for the process.
    """
    from engine.train import train

    def no_reference(*a, **k):
        raise AssertionError("engine.train loaded a reference model although the cache is valid")

    from engine.refcache import reference

    monkeypatch.setattr(reference, "load_reference_model", no_reference)
    cfg = load_config(
        _overrides(
            world.tmp,
            ref_cache__mode="require",
            ref_cache__dir=world.dir,
            optim__max_steps=2,
            eval__enabled="false",
            checkpoint__export_final="false",
            logging__tensorboard="false",
            logging__output_dir=tmp_path,
        )
    )
    summary = train(cfg)
    assert summary["reference"] == "cache" and summary["steps"] == 2
    assert reference_use["forwards"] == 0
    assert abs(summary["first_loss"] - 0.6931472) < 1e-4  # step 0: policy == reference, DPO loss = log 2
