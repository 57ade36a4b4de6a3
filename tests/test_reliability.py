"""Reliability: one test per case of issue #17's table, each asserting that nothing is lost or silently wrong.

Run directories belong to one run, caches and checkpoints are never adopted without verification,
signals stop a run at any stage with a resumable state, and every known error is one line with the
fix. In-process where possible (a tiny Llama, a few steps); processes only where a kill or a second
process is the point (marked slow). The SIGKILL fault-injection and every-stage signal tests are in
tests/test_reliability_faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import refcache
from engine.checkpoint import CheckpointError
from engine.config import ConfigError, load_config
from engine.data import collate, prepare_data
from engine.data.loading import DataError, load_pairs
from engine.model import load_tokenizer
from engine.refcache import RefCache
from engine.rundir import RunDirError, RunLock
from engine.train import train
from tests.tiny_run import TINY_RUN, argv

REPO = Path(__file__).resolve().parent.parent
TINY = argv({**TINY_RUN, "eval.enabled": False, "logging.tensorboard": False, "checkpoint.export_final": False})


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    """Data and embedding caches shared by the module's runs (content-keyed, so sharing changes no result)."""
    return tmp_path_factory.mktemp("caches")


def _cfg(tmp: Path, caches: Path, *extra, name: str = "run"):
    return load_config(
        TINY
        + [
            "--logging.output_dir",
            str(tmp / "runs"),
            "--logging.run_name",
            name,
            "--data.cache_dir",
            str(caches / "data"),
            "--deviation.cache_dir",
            str(caches / "emb"),
            *map(str, extra),
        ]
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x55
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------ reference cache


@pytest.fixture(scope="module")
def cache_world(tmp_path_factory, caches):
    """A DPO setup with a reference cache of several 2-row parts, and the bytes of that cache as built."""
    tmp = tmp_path_factory.mktemp("refcache")
    cfg = _cfg(tmp, caches, "--loss.objective", "dpo", "--ref_cache.dir", tmp / "cache")
    tok = load_tokenizer()
    prep = prepare_data(cfg, tok, compute_weights=False, verbose=False)
    refcache.build_cache(cfg, tok, prep, rows_per_part=2)
    good = {p.name: p.read_bytes() for p in (tmp / "cache").iterdir() if p.is_file() and not p.name.startswith(".")}
    assert sum(n.endswith(".npy") for n in good) >= 3
    return cfg, tok, prep, good


def _copy_cache(world, dest: Path):
    cfg, tok, prep, good = world
    dest.mkdir(parents=True)
    for name, data in good.items():
        (dest / name).write_bytes(data)
    return dataclasses.replace(cfg, ref_cache=dataclasses.replace(cfg.ref_cache, dir=str(dest)))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_a_corrupt_part_without_manifest_is_recomputed_not_adopted(cache_world, tmp_path):
    """Table row 1: manifest deleted and a byte flipped, then the build rerun as the error advises."""
    cfg_, tok, prep, good = cache_world
    for how in ("build", "auto"):
        d = tmp_path / how
        cfg = _copy_cache(cache_world, d)
        (d / refcache.MANIFEST_NAME).unlink()
        _flip_byte(d / "part-00001.npy")
        if how == "build":
            refcache.build_cache(cfg, tok, prep)
        else:
            cfg = dataclasses.replace(cfg, ref_cache=dataclasses.replace(cfg.ref_cache, mode="auto"))
            refcache.ensure_cache(cfg, tok, prep, device="cpu")
        assert _files(d) == good, how  # the flipped part was recomputed; nothing else changed
        keys = collate(prep.train_rows[2:4]).sequence_keys  # the rows of part 1
        got = RefCache.open(d, refcache.cache_fingerprint(cfg, tok, prep)).lookup(keys)
        torch.testing.assert_close(got, RefCache.open(cfg_.ref_cache.dir).lookup(keys), rtol=0, atol=0)


def test_auto_repair_recomputes_exactly_the_bad_part_with_the_manifest_layout(cache_world, tmp_path, capsys):
    """Table row 2: one bad shard of a multi-part cache; ensure_cache (auto) repairs that shard only."""
    cfg, tok, prep, good = cache_world
    d = tmp_path / "repair"
    cfg = _copy_cache(cache_world, d)
    _flip_byte(d / "part-00001.npy")
    before = {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.npy")}
    cache = refcache.ensure_cache(cfg, tok, prep, device="cpu")
    err = capsys.readouterr().err
    assert "part-00001.npy is corrupted" in err and "recomputing those parts" in err
    after = {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.npy")}
    assert sorted(after) == sorted(before)  # the manifest's layout (2 rows per part), not the default one
    assert [n for n in after if after[n] != before[n]] == ["part-00001.npy"]
    assert json.loads((d / refcache.MANIFEST_NAME).read_text())["rows_per_part"] == 2
    assert _files(d) == good and len(cache) == len(RefCache.open(cache_world[0].ref_cache.dir))


# ------------------------------------------------------------------------------------ run directories


def test_a_run_dir_of_another_run_is_refused_and_overwrite_moves_it_aside(tmp_path, caches):
    """Table row 3: a fresh run into another run's directory; a resume of another config's checkpoint."""
    first = _cfg(tmp_path, caches, "--loss.objective", "sft", "--optim.max_steps", 4, "--checkpoint.every_steps", 1)
    train(first)
    run_dir = first.logging.run_dir
    snapshot = _files(run_dir)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    other = ["--loss.objective", "sft", "--optim.max_steps", 2, "--checkpoint.every_steps", 1, "--optim.lr", "1e-3"]
    with pytest.raises(RunDirError, match=r"another config \(optim.lr: 0.002 -> 0.001\).*logging.run_name.*overwrite"):
        train(_cfg(tmp_path, caches, *other))
    with pytest.raises(RunDirError, match=r"optim.lr: 0.002 -> 0.001"):
        train(_cfg(tmp_path, caches, *other, "--checkpoint.resume", "auto"))
    assert _files(run_dir) == snapshot and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ckpts

    train(_cfg(tmp_path, caches, *other, "--logging.overwrite", "true"))
    (aside,) = tmp_path.glob("runs/run.old-*")
    assert _files(aside) == snapshot and sorted(p.name for p in (aside / "checkpoints").iterdir()) == ckpts
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2]
    # keep_last kept this run's own newest checkpoints, none of the other run's higher step numbers.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2"]
    saved = (run_dir / "checkpoints" / "step-2" / "config.yaml").read_text()
    assert "lr: 0.001" in saved


def test_a_second_run_on_a_locked_run_dir_fails_at_once(tmp_path, caches):
    """Table row 4 (in-process half; the two-process half is in test_reliability_faults.py)."""
    cfg = _cfg(tmp_path, caches, "--loss.objective", "sft", "--optim.max_steps", 1)
    with RunLock(cfg.logging.run_dir):
        in_use = rf"{cfg.logging.run_dir} is in use by another run \(.*\"pid\": {os.getpid()}"
        with pytest.raises(RunDirError, match=in_use):
            train(cfg)
    assert not (cfg.logging.run_dir / "config.yaml").exists()
    train(cfg)  # the lock is released with its holder


def test_signal_handlers_are_restored_when_a_run_ends(tmp_path, caches):
    """Table row 5 (in-process half): handlers are the run's only while it runs."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    train(_cfg(tmp_path, caches, "--loss.objective", "sft", "--optim.max_steps", 1))
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(RunDirError):
        with RunLock(tmp_path / "runs" / "run"):
            train(_cfg(tmp_path, caches, "--loss.objective", "sft", "--optim.max_steps", 1))
    assert {s: signal.getsignal(s) for s in before} == before  # also when the run fails


# ------------------------------------------------------------------------------------ the step loop


def test_nonfinite_micro_batches_keep_accumulation_boundaries(tmp_path, caches, monkeypatch):
    """Table row 7: at grad_accum 4, non-finite micro-batches 2 and 3 of step 2 withhold that step's update
    while DeepSpeed's optimizer boundaries stay where the loop's steps end; steps 1 and 3 update as usual."""
    import engine.train as T
    from engine import parallelize

    calls, engines, boundaries = {"n": 0}, [], []
    real_forward, real_setup = T.PolicyWithLoss.forward, parallelize.setup_deepspeed

    def forward(self, batch):
        out = real_forward(self, batch)
        calls["n"] += 1
        if calls["n"] in (6, 7):
            out.loss = out.loss * float("nan")
        return out

    def setup(*a, **k):
        engine, optimizer, scheduler = real_setup(*a, **k)
        engines.append((engine, optimizer))
        real_step = engine.step

        def step(*sa, **sk):  # at each DeepSpeed boundary: the micro-step count and whether weights moved
            at_boundary = engine.is_gradient_accumulation_boundary()
            before = [p.detach().clone() for p in engine.module.parameters() if p.requires_grad]
            out = real_step(*sa, **sk)
            if at_boundary:
                after = [p for p in engine.module.parameters() if p.requires_grad]
                boundaries.append((engine.micro_steps, any(not torch.equal(a, b) for a, b in zip(before, after))))
            return out

        engine.step = step
        return engine, optimizer, scheduler

    monkeypatch.setattr(T.PolicyWithLoss, "forward", forward)
    monkeypatch.setattr(parallelize, "setup_deepspeed", setup)
    cfg = _cfg(tmp_path, caches, "--loss.objective", "sft", "--optim.grad_accum", 4, "--optim.max_steps", 3)
    summary = train(cfg)
    engine, optimizer = engines[0]
    assert boundaries == [(4, True), (8, False), (12, True)]  # the boundary of step 2 changed no weight
    assert engine.micro_steps == 12 and engine.global_steps == 3  # nothing accumulated past the last step
    assert max(int(st["step"]) for st in optimizer.state.values()) == 2  # Adam's moments saw two updates
    records = _metrics(cfg.logging.run_dir)
    assert [(r["step"], r["nonfinite_micro_batches"]) for r in records] == [(1, 0), (2, 2), (3, 0)]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None and records[2]["loss"] > 0
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == 3


# --------------------------------------------------------------------- checks before expensive work


def _nothing_prepared(run_dir: Path) -> bool:
    """No data report and no reference-cache file: neither data preparation nor the cache build ran."""
    return not (run_dir / "data_report.json").exists() and not any(p.is_file() for p in run_dir.rglob("ref_cache/*"))


def test_an_unknown_lora_target_is_an_error_listing_the_module_names(tmp_path, caches):
    """Table row 8: a typo in lora_target_modules is an error, raised before any data or cache work."""
    cfg = _cfg(tmp_path, caches, "--model.lora_r", 8, "--model.lora_target_modules", "q_prj,v_proj")
    with pytest.raises(ConfigError, match=r"lora_target_modules: \['q_prj'\] match no module .*'q_proj'.*'v_proj'"):
        train(cfg)
    assert _nothing_prepared(cfg.logging.run_dir)


def test_lora_defaults_missing_from_gpt2_fail_before_data_and_cache(tmp_path, caches):
    """Table row 9: gpt2-small has no q_proj...: the error comes before data preparation and the cache build."""
    cfg = _cfg(tmp_path, caches, "--model.name", "gpt2-small", "--model.lora_r", 8, "--loss.objective", "dpo")
    names = r"GPT2LMHeadModel; its adaptable module names are \['c_attn', 'c_fc', 'c_proj'"
    with pytest.raises(ConfigError, match=names):
        train(cfg)
    assert _nothing_prepared(cfg.logging.run_dir)


def _unwritable_dir(tmp: Path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: then sysfs)."""
    d = tmp / "read-only"
    d.mkdir()
    d.chmod(0o555)
    for candidate in (d, Path("/sys")):
        try:
            (candidate / ".probe").touch()
            (candidate / ".probe").unlink()
        except OSError:
            return candidate
    pytest.skip("no directory here refuses writes to this user")


def test_an_unwritable_checkpoint_dir_fails_before_training(tmp_path, caches):
    """Table row 10: checkpoints/ not writable is reported at start-up, naming the directory and the setting."""
    cfg = _cfg(tmp_path, caches, "--loss.objective", "sft", "--optim.max_steps", 2)
    cfg.save(cfg.logging.run_dir / "config.yaml")  # an earlier attempt of this run, then its storage became read-only
    (cfg.logging.run_dir / "checkpoints").symlink_to(_unwritable_dir(tmp_path), target_is_directory=True)
    with pytest.raises(RunDirError, match=r"cannot write to .*checkpoints .*point logging.output_dir at a writable"):
        train(cfg)
    assert not (cfg.logging.run_dir / "metrics.jsonl").exists()


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, caches, capsys):
    """Table row 11: resume auto skips a checkpoint that fails verification, says so, and resumes the one before."""
    args = [
        "--loss.objective",
        "sft",
        "--optim.max_steps",
        4,
        "--checkpoint.every_steps",
        1,
        "--checkpoint.keep_last",
        3,
    ]
    straight = _cfg(tmp_path, caches, *args, name="straight")
    train(straight)
    cfg = _cfg(tmp_path, caches, *args)
    train(cfg)
    ckpt = cfg.logging.run_dir / "checkpoints"
    _flip_byte(next((ckpt / "step-4").rglob("*model_states.pt")), 100)
    capsys.readouterr()
    train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto")))
    out = capsys.readouterr().out
    assert "resume: skipping step-4: checkpoint file" in out and "does not match its manifest" in out
    assert f"resumed from {ckpt / 'step-3'} at step 3" in out
    assert [r["step"] for r in _metrics(cfg.logging.run_dir)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _metrics(cfg.logging.run_dir)] == [r["loss"] for r in _metrics(straight.logging.run_dir)]
    with pytest.raises(CheckpointError, match=r"step-2/.*does not match its manifest.*resume from another checkpoint"):
        _flip_byte(next((ckpt / "step-2").rglob("*model_states.pt")), 100)
        train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(ckpt / "step-2"))))


# ------------------------------------------------------------------------------------ error messages


def test_data_errors_name_the_1_based_line_and_the_column(tmp_path):
    """Table row 12: blank lines count, and the column points at the character JSON stumbled on."""
    lines = [
        '{"prompt": "p1", "chosen": "a", "rejected": "b"}',
        "",
        '{"prompt": "p2", "chosen": "a", "rejected": "b"}',
        '{"prompt": "p\u00e9", "chosen": "a" "rejected": "b"}',
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 4 is bad \(invalid_json\)") as err:
        load_pairs(str(path), strict=True)
    column = int(str(err.value).split("at column ")[1].split(";")[0])
    assert lines[3][column - 1] == '"' and lines[3][column - 2] == " "  # the quote where a comma was due
    _, report = load_pairs(str(path))
    assert report.examples["invalid_json"].startswith("line 4:")


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    """Table row 13."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: llama-tiny\n dtype: float32\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:3:2: YAML syntax error: .*block mapping"):
        load_config(["--config", str(bad)])


@pytest.mark.parametrize("case", ["data", "cache", "checkpoint", "run directory", "permission", "oom", "disk"])
def test_engine_train_reports_known_errors_as_one_line(tmp_path, caches, capsys, monkeypatch, case):
    """Table row 14: `python -m engine.train` prints one line naming the file/row/field and the fix, exit 2."""
    from engine import train as T

    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)  # later in-process runs reuse it
    args = [
        *TINY,
        "--logging.output_dir",
        str(tmp_path / "runs"),
        "--data.cache_dir",
        str(caches / "data"),
        "--deviation.cache_dir",
        str(caches / "emb"),
        "--optim.max_steps",
        "1",
        "--loss.objective",
        "dpo",
    ]
    want = {
        "data": "data error: ",
        "cache": "reference cache error: ",
        "checkpoint": "checkpoint error: ",
        "run directory": "run directory error: ",
        "permission": "run directory error: cannot write to ",
        "oom": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB; reduce memory with: ",
        "disk": "I/O error: [Errno 28] No space left on device: 'ckpt'; free disk space",
    }[case]
    if case == "data":
        bad = tmp_path / "bad.jsonl"
        rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": 3, "chosen": "a", "rejected": "b"}]
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args += ["--data.source", str(bad), "--data.strict", "true"]
    elif case == "cache":
        args += ["--ref_cache.mode", "require", "--ref_cache.dir", str(tmp_path / "no-cache")]
    elif case == "checkpoint":
        args += ["--checkpoint.resume", str(tmp_path / "nowhere")]
    elif case == "run directory":
        (tmp_path / "runs" / "tiny-cpu").mkdir(parents=True)
        (tmp_path / "runs" / "tiny-cpu" / "notes.txt").write_text("not a run")
    elif case == "permission":
        args += ["--data.cache_dir", str(_unwritable_dir(tmp_path) / "data")]
    else:  # failures deep inside a step or a save, raised where they would be
        error = (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            if case == "oom"
            else OSError(28, "No space left on device", "ckpt")
        )

        def fail(*a, **k):
            raise error

        monkeypatch.setattr(T, "train", fail)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        T.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "[W" not in line[:3]]
    assert exit_.value.code == (1 if case == "oom" else 2)
    assert len(err) == 1 and err[0].startswith(want), err
    if case == "data":
        assert "line 2 is bad (non_string_text)" in err[0] and "--data.strict false" in err[0]


def test_engine_deviation_strict_suggests_its_own_switch(tmp_path, capsys):
    """Table row 15."""
    from engine.deviation.__main__ import main

    bad = tmp_path / "wp.jsonl"
    bad.write_text('{"post_title": "[WP] x", "post_text": "", "comment_texts": ["a"], "comment_scores": [1, 2]}\n')
    with pytest.raises(SystemExit):
        main(["--data", str(bad), "--out", str(tmp_path / "w.jsonl"), "--strict"])
    err = capsys.readouterr().err
    assert "line 1 is bad (length_mismatch)" in err and "run without --strict" in err and "--data.strict" not in err


def test_engine_evaluate_names_a_missing_model_directory(capsys, tmp_path):
    """Table row 16."""
    from engine.evaluate import main

    for missing in ("/missing/dir", str(tmp_path / "run" / "final")):
        with pytest.raises(SystemExit):
            main(["--model", missing])
        err = capsys.readouterr().err
        assert f"--model '{missing}': no such directory" in err


def test_a_corrupted_tokenisation_cache_is_recomputed(tmp_path, caches):
    """Caches carry checksums: a flipped token id in the tokenisation cache is caught and recomputed."""
    cfg = _cfg(tmp_path, caches, "--data.cache_dir", tmp_path / "tok")
    tok = load_tokenizer()
    first = prepare_data(cfg, tok, compute_weights=False, verbose=False)
    (path,) = [
        p
        for p in (tmp_path / "tok").rglob("*.npz")
        if p.stat().st_size == max(q.stat().st_size for q in (tmp_path / "tok").rglob("*.npz"))
    ]
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["c_ids"] = arrays["c_ids"].copy()
    arrays["c_ids"][3] += 1  # a valid npz whose content no longer matches its digest
    np.savez(path, **arrays)
    again = prepare_data(cfg, tok, compute_weights=False, verbose=False)
    assert [r.input_ids.tolist() for r in again.train_rows + again.val_rows] == [
        r.input_ids.tolist() for r in first.train_rows + first.val_rows
    ]
