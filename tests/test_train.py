"""The training engine: fused vs eager path, packing invariance, no [N, V] logits, multi-process
DeepSpeed runs (ZeRO-2, ZeRO-3, two simulated nodes), kill -9 + resume, the cache path, LoRA reference."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import load_config
from engine.data import collate, pack_pairs, prepare_data
from engine.model import load_model, load_tokenizer
from engine.train import PolicyWithLoss
from tests.tiny_run import TINY_RUN, argv

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: style-only deviation (no MiniLM load), short sequences, no evaluation.
TINY = argv({**TINY_RUN, "eval.enabled": False})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cfg(tmp_path, *extra):
    return load_config(
        TINY
        + [
            "--logging.output_dir",
            str(tmp_path),
            "--data.cache_dir",
            str(tmp_path / "cache"),
            "--deviation.cache_dir",
            str(tmp_path / "emb"),
        ]
        + list(extra)
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(tmp, "--loss.objective", "ddpo")
    tok = load_tokenizer()
    prepared = prepare_data(cfg, tok)
    return cfg, tok, prepared


def _loss_and_grads(cfg, batch, backend, objective="ddpo"):
    model = load_model(cfg.model)
    module = PolicyWithLoss(model, dataclasses.replace(cfg.loss, backend=backend, objective=objective))
    out = module(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["ddpo", "dorpo"])
def test_fused_and_eager_paths_agree(setup, objective):
    cfg, _, prepared = setup
    batch = collate(prepared.train_rows[:2])
    batch.ref_chosen_logps = torch.full((batch.num_pairs,), -300.0)
    batch.ref_rejected_logps = torch.full((batch.num_pairs,), -310.0)
    loss_f, grads_f = _loss_and_grads(cfg, batch, "torch", objective)
    loss_e, grads_e = _loss_and_grads(cfg, batch, "eager", objective)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_e.keys() and len(grads_f) > 10
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_and_unpacked_batches_agree(setup):
    cfg, _, prepared = setup
    tokenized = prepared.train_tokenized[:6]
    packed = collate(pack_pairs(tokenized, 4096, pad_id=0))  # everything in one row
    one_per_row = collate(pack_pairs(tokenized, 2 * cfg.data.max_length, pad_id=0))  # a pair per row, padded
    assert packed.input_ids.shape[0] == 1 and one_per_row.input_ids.shape[0] == 6
    losses = []
    for batch in (packed, one_per_row):
        batch.ref_chosen_logps = torch.full((6,), -300.0)
        batch.ref_rejected_logps = torch.full((6,), -300.0)
        losses.append(_loss_and_grads(cfg, batch, "torch")[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_fused_path_never_allocates_full_logits(setup):
    cfg, _, prepared = setup
    batch = collate(prepared.train_rows[:2])
    batch.ref_chosen_logps = torch.full((batch.num_pairs,), -300.0)
    batch.ref_rejected_logps = torch.full((batch.num_pairs,), -300.0)
    model = load_model(cfg.model)
    module = PolicyWithLoss(model, cfg.loss)
    n_tokens = int((batch.segment_ids >= 0).sum())
    vocab = model.config.vocab_size
    head_forward = module.head.forward
    module.head.forward = lambda hidden, **kw: head_forward(hidden, **kw, chunk_rows=16, block_rows=64)
    with _MaxNumel() as rec:
        out = module(batch)
        out.loss.backward()
    biggest = max(s[0] * s[1] for s in rec.shapes if len(s) == 2 and s[-1] == vocab)
    # The walk holds at most a window of block_rows tokens' logits, never all N tokens'.
    assert 2 * biggest <= n_tokens * vocab, (biggest, n_tokens, vocab)
    # The eager path, by contrast, does build them: the recorder sees it.
    module.loss_cfg = dataclasses.replace(cfg.loss, backend="eager")
    with _MaxNumel() as rec:
        module(batch)
    assert max(s[0] * s[1] for s in rec.shapes if len(s) == 2 and s[-1] == vocab) >= n_tokens * vocab


def test_lora_with_adapters_disabled_is_the_base_model(setup):
    from engine.refcache import reference_logps

    cfg, _, prepared = setup
    batch = collate(prepared.train_rows[:1])
    base = load_model(cfg.model, for_training=False)
    want = reference_logps(base, batch)
    lora = load_model(dataclasses.replace(cfg.model, lora_r=8))
    with torch.no_grad():  # make the adapters matter (peft initialises B to zero)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    changed = reference_logps(lora, batch)
    assert not torch.allclose(changed[0], want[0])
    with lora.disable_adapter():
        got = reference_logps(lora, batch)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)


def _torchrun(tmp_path, args, *, nproc=2, extra=(), timeout=600):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *extra,
        *args,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_deepspeed_every_objective_learns(tmp_path, zero):
    overrides = TINY + ["--data.cache_dir", str(tmp_path / "cache"), "--deviation.cache_dir", str(tmp_path / "emb")]
    r = _torchrun(tmp_path, [str(ROOT / "tests/scripts/dist_objectives.py"), str(zero), "6", *overrides])
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    assert set(results) == {"dpo", "ddpo", "orpo", "dorpo", "sft"}
    for objective, losses in results.items():
        assert all(map(lambda x: x == x, losses)), (objective, losses)
        assert losses[-1] < losses[0], (objective, losses)


def _train_cmd(tmp_path, name, *extra):
    return [
        "-m",
        "engine.train",
        *TINY,
        "--logging.output_dir",
        str(tmp_path),
        "--logging.run_name",
        name,
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--deviation.cache_dir",
        str(tmp_path / "emb"),
        *extra,
    ]


@pytest.mark.slow
def test_two_nodes_simulated_on_loopback(tmp_path):
    port = _free_port()
    args = _train_cmd(tmp_path, "twonode", "--optim.max_steps", "3", "--loss.objective", "dpo")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *args,
            ],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    lines = (tmp_path / "twonode" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]
    # The export is a plain transformers checkpoint.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "twonode" / "final")
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert AutoTokenizer.from_pretrained(tmp_path / "twonode" / "final").chat_template


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps  # a resumed run cuts the log back to its checkpoint first
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_losses(tmp_path):
    steps = [
        "--optim.max_steps",
        "8",
        "--checkpoint.every_steps",
        "1",
        "--checkpoint.keep_last",
        "2",
        "--loss.objective",
        "ddpo",
        "--checkpoint.export_final",
        "false",
    ]
    env = _env(tmp_path)
    ref = subprocess.run(
        [sys.executable, *_train_cmd(tmp_path, "straight", *steps)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-4000:]

    cmd = [sys.executable, *_train_cmd(tmp_path, "killed", *steps)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-3").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = subprocess.run(
        cmd + ["--checkpoint.resume", "auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    norms = [json.loads(ln)["grad_norm"] for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(n is not None and n > 0 for n in norms), norms  # ZeRO-0 fp32: DeepSpeed itself reports none
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-6, (step, want[step], got[step])
    # The summary describes the whole run, not only the resumed segment.
    s_want, s_got = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("straight", "killed"))
    assert abs(s_got["first_loss"] - s_want["first_loss"]) <= 1e-6 and s_got["tokens"] == s_want["tokens"]


@pytest.mark.slow
def test_cache_path_loads_no_reference_model(tmp_path):
    script = """
import sys, engine.model, engine.refcache, engine.train
from engine.config import load_config
loads = []
real = engine.model.load_model
def counting(cfg, **kw):
    loads.append(kw.get("for_training", True))
    return real(cfg, **kw)
engine.model.load_model = counting
def forbidden(*a, **k):
    raise AssertionError("a reference model was set up although the cache exists")
engine.refcache.on_the_fly_reference = forbidden
cfg = load_config(sys.argv[1:])
summary = engine.train.train(cfg)
print("LOADS", loads, summary["reference"])
"""
    args = _train_cmd(tmp_path, "cached", "--optim.max_steps", "2", "--loss.objective", "ddpo")[2:]
    env = _env(tmp_path)
    # First build the cache (its build runs the reference model once, by design), then train against it.
    build = subprocess.run(
        [sys.executable, "-m", "engine.refcache", "build", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    r = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "LOADS [True] cache" in r.stdout  # only the policy was loaded


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    cmd = [sys.executable, *_train_cmd(tmp_path, "term", "--optim.max_steps", "500", "--loss.objective", "sft")]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        not (metrics.is_file() and metrics.read_text().count("\n") >= 2)
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]  # stopped, not finished: the shell's convention
    assert "stopped by SIGTERM during training (checkpoint saved at step" in err
    ckpts = list((tmp_path / "term" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "MANIFEST.json").is_file()
    assert not (tmp_path / "term" / "final").exists()


def test_a_world_of_one_leaves_no_variables_behind(monkeypatch):
    from engine import parallelize
    from engine.config import ParallelConfig

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = parallelize.init_distributed(ParallelConfig())
    assert env.world_size == 1 and torch.distributed.is_initialized()
    parallelize.release_own_world()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # children must not inherit them
    again = parallelize.init_distributed(ParallelConfig())  # a second in-process run reuses the group
    assert again.world_size == 1 and os.environ["LOCAL_RANK"] == "0"  # DeepSpeed needs it during a run
    parallelize.release_own_world()
    assert "RANK" not in os.environ
