"""The step loop: `torchrun [--nproc_per_node N] -m engine.train [--config F] [--section.field v ...]`.

With no arguments it trains the tiny-cpu default (llama-tiny, synthetic WritingPrompts, DDPO) end to
end: deviation weights -> reference cache -> training -> final export -> a short evaluation, all
under `runs/<run_name>/`.

One batch, top to bottom: packed rows from `engine.data` -> reference log-probs looked up in the cache
(or a reference forward) -> `PolicyWithLoss` (model trunk -> final hidden states -> the fused
LM-head/log-prob/loss kernel, so [N, V] logits never exist) -> DeepSpeed backward/step (owned by
`engine.parallelize`) -> metrics, checkpoints.

A run, top to bottom (`train`): signal handlers for its lifetime (engine.signals) -> the process group
-> the run directory's lock and ownership rules (engine.rundir) -> `setup` (pre-flight checks first,
then data, reference cache, model, DeepSpeed, the verified checkpoint to resume) -> `train_loop`
(`train_step` per optimizer step) -> `finish` (last checkpoint, export, evaluation, summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint, flops, parallelize, rundir
from engine.checkpoint import CheckpointError
from engine.config import Config, ConfigError, load_config
from engine.fileio import atomic_write, publish_dir
from engine.losses import loss_epilogue
from engine.memory import limit_allocator_retention
from engine.rundir import RunDirError
from engine.signals import RunSignals, StopRequested


class PolicyWithLoss(torch.nn.Module):
    """The policy and its loss as one module, so DeepSpeed sees every parameter and its hooks run.

    The fused loss multiplies hidden states by the LM head's weight itself. Under ZeRO-3 that weight is
    partitioned and only gathered inside the owning module's forward, so the loss runs inside
    `_FusedHead.forward`: DeepSpeed gathers the weight on entry and reduce-scatters its gradient.
    """

    def __init__(self, model: torch.nn.Module, loss_cfg, *, ignore_index: int = -100):
        super().__init__()
        from engine.model import trunk_and_head

        self.model = model
        self.trunk, head = trunk_and_head(model)
        self.head = _FusedHead.wrap(head)
        self.loss_cfg = loss_cfg
        self.ignore_index = ignore_index

    @property
    def batch_options(self) -> dict:
        """collate's arguments for this module's loss schedule: the head's V (targets are checked
        against it on the CPU) and whether the objective reads the rejected side at all."""
        return dict(vocab_size=self.head.out_features, with_rejected=self.loss_cfg.objective != "sft")

    def forward(self, batch):
        hidden = self.trunk(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        ).last_hidden_state
        # All R * L rows: the batch's schedule indexes them (padding is never multiplied), and a boolean
        # mask here would be a host sync.
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets, prompt_targets = batch.targets.reshape(-1), None
        if batch.response_targets is not None:  # nll_on_prompt: targets cover prompt + response
            response = batch.response_targets.reshape(-1)
            prompt_targets = torch.where(response == self.ignore_index, targets, self.ignore_index)
            targets = response
        loss, out = self.head(
            hidden,
            schedule=batch.schedule,
            targets=targets,
            prompt_targets=prompt_targets,
            segment_ids=batch.segment_ids.reshape(-1),
            chosen_segments=batch.chosen_segments,
            rejected_segments=batch.rejected_segments,
            epilogue=loss_epilogue(
                self.loss_cfg.objective,
                beta=self.loss_cfg.beta,
                chosen_weights=batch.chosen_weights if self.loss_cfg.needs_weights else None,
                ref_chosen_logps=batch.ref_chosen_logps,
                ref_rejected_logps=batch.ref_rejected_logps,
            ),
            ignore_index=self.ignore_index,
            backend=self.loss_cfg.backend,
        )
        # The loss the head returned (ZeRO-3 hooks it for the backward) with the full output's metrics
        # and per-pair values.
        return dataclasses.replace(out, loss=loss)


class _FusedHead(torch.nn.Linear):
    """An LM head whose forward, given loss arguments, returns the fused preference loss instead of logits."""

    @classmethod
    def wrap(cls, head: torch.nn.Module) -> _FusedHead:
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"the fused loss needs a Linear LM head, got {type(head).__name__}")
        head.__class__ = cls  # same parameters, same state_dict keys: checkpoints and save_pretrained are unchanged
        return head

    def forward(self, hidden, targets=None, **loss_kwargs):
        if targets is None:
            return super().forward(hidden)
        from ddpo_kernels import fused_preference_loss

        out = fused_preference_loss(hidden, self.weight, targets, return_output=True, **loss_kwargs)
        # The loss apart, in a plain tuple: ZeRO-3 attaches its pre-backward hook (which re-gathers this
        # module's weight for backward) only to tensors inside tuples, lists and dicts.
        return out.loss, out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainingError(RuntimeError):
    """Training cannot go on as configured (e.g. the loss stays non-finite); the message says what to change."""


class MetricsLog:
    """Rank 0's outputs of the loop: metrics.jsonl, TensorBoard, Weights & Biases and the progress bar.

    A resumed run first cuts the log back to the checkpoint's step (TensorBoard purges later events),
    so every step has one record whatever the number of segments; a fresh run starts a new log.
    """

    def __init__(self, cfg: Config, env, *, total_steps: int, start_step: int):
        self.cfg, self.active = cfg, env.is_main
        self.path = cfg.logging.run_dir / "metrics.jsonl"
        self.writer = self.wandb = self.bar = None
        if not self.active:
            return
        if start_step:
            rundir.truncate_metrics(self.path, start_step)
        else:
            self.path.unlink(missing_ok=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = start_step + 1 if start_step else None  # drop events a killed segment logged after its checkpoint
            self.writer = SummaryWriter(str(cfg.logging.run_dir / "tensorboard"), purge_step=purge)
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb
            wandb.init(name=cfg.logging.run_name, dir=str(cfg.logging.run_dir), config=cfg.to_dict(), resume="allow")
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=cfg.loss.objective, dynamic_ncols=True, file=sys.stdout
            )

    def step(self, record: dict, *, force: bool = False) -> None:
        """Log a step's record every logging.log_every steps, and always when `force` (held-out metrics)."""
        if not self.active:
            return
        step = record["step"]
        if force or step % self.cfg.logging.log_every == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.writer.add_scalar(f"train/{k}", v, step)
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in record.items() if v is not None}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            loss = record.get("loss")
            shown = "skipped" if loss is None else f"{loss:.4f}"
            self.bar.set_postfix(loss=shown, tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.bar = self.writer = self.wandb = None


@dataclass
class Run:
    """What set-up hands the loop: the run's data, model engine, sampler position, signals and outputs."""

    cfg: Config
    env: parallelize.DistEnv
    signals: RunSignals
    tokenizer: Any
    prepared: Any
    module: torch.nn.Module
    engine: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    total_steps: int
    state: dict
    collate: Any = None
    ref_cache: Any = None
    reference: Any = None
    validation: Any = None
    log: MetricsLog | None = None
    saved_step: int | None = None
    t_start: float = field(default_factory=time.time)

    @property
    def run_dir(self) -> Path:
        return self.cfg.logging.run_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def micro_batches(self) -> Iterator[list[int]]:
        """Row indices of each micro-batch from the saved sampler position onwards, epoch after epoch."""
        while True:
            yield from self.sampler
            self.state["epoch"] += 1
            self.sampler.set_epoch(self.state["epoch"])

    def save_checkpoint(self) -> None:
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            self.state["step"],
            self.state,
            self.cfg,
            rank=self.env.rank,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.saved_step = self.state["step"]


def train(cfg: Config) -> dict:
    """Run training as configured; returns the final summary (rank 0; other ranks get {}).

    Raises StopRequested when SIGTERM/SIGINT stopped the run (state resumable with checkpoint.resume
    auto). Callable repeatedly in one process (the experiment does): the signal handlers and the run
    directory's lock are released on the way out, and so is a world of one it created; a torchrun
    world belongs to the launcher and stays.
    """
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(RunSignals())
        stack.callback(parallelize.release_own_world)
        env = parallelize.init_distributed(cfg.parallel)
        stack.enter_context(_own_run_dir(cfg, env))
        run = setup(cfg, env, signals)
        try:
            with signals.deferred("training"):
                train_loop(run)
        finally:
            run.log.close()
        return finish(run)


@contextlib.contextmanager
def _own_run_dir(cfg: Config, env):
    """Rank 0 holds the run directory's lock for the run's lifetime and applies the ownership rules (engine.rundir)."""
    lock, error, note = None, None, None
    if env.is_main:
        try:
            lock = rundir.RunLock(cfg.logging.run_dir).__enter__()
            note = rundir.claim(cfg)
        except BaseException as e:
            if lock is not None:
                lock.__exit__(None, None, None)
                lock = None
            if not isinstance(e, (RunDirError, OSError)):
                raise
            error = e
    parallelize.raise_if_any_failed(error, what="claiming the run directory")
    if note:
        print(note, flush=True)
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _preflight(cfg: Config, env) -> Path | None:
    """What can fail cheaply fails before data, cache or model work: writable outputs, loadable models and
    LoRA targets, and the checkpoint to resume (verified, config compared). Returns that checkpoint."""
    from engine.model import check_model
    from engine.refcache import cache_dir_for

    error, resume_from = None, None
    if env.is_main:
        try:
            dirs = {
                "logging.output_dir": cfg.logging.run_dir / "checkpoints",
                "data.cache_dir": Path(cfg.data.cache_dir),
            }
            if cfg.deviation.enabled:
                dirs["deviation.cache_dir"] = Path(cfg.deviation.cache_dir)
            if cfg.loss.needs_reference and cfg.ref_cache.mode != "off":
                dirs["ref_cache.dir"] = cache_dir_for(cfg)
            rundir.check_writable(dirs)
            check_model(cfg.model)
            if cfg.loss.needs_reference and cfg.ref_cache.model not in (None, cfg.model.name):
                check_model(cfg.model, name=cfg.ref_cache.model, field="ref_cache.model", lora=False)
            resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.logging.run_dir / "checkpoints")
            if resume_from is not None:
                checkpoint.check_compatible(resume_from, cfg, world_size=env.world_size)
        except (ConfigError, RunDirError, CheckpointError) as e:
            error = e
    parallelize.raise_if_any_failed(error, what="pre-flight checks")
    found = parallelize.broadcast_from_zero(None if resume_from is None else str(resume_from))
    return None if found is None else Path(found)


def _loss_module(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """The trained module: the model and its loss as one module (the one place a model+loss kind is chosen)."""
    if cfg.loss.objective == "reward":
        from engine.reward import RewardWithLoss

        return RewardWithLoss(model, cfg.loss)
    return PolicyWithLoss(model, cfg.loss)


def _fresh_state(world_size: int) -> dict:
    """The trainer state a checkpoint carries; counters span every segment of a resumed run."""
    return {
        "step": 0,
        "epoch": 0,
        "sampler": None,
        "nonfinite_skipped": 0,
        "tokens": 0,
        "world_size": world_size,
        "first_loss": None,
        "last_loss": None,
        "loop_time_s": 0.0,
        "segments": 0,
    }


def setup(cfg: Config, env, signals: RunSignals) -> Run:
    """Pre-flight checks, data, reference log-probs, model, DeepSpeed engine, resumed state and loggers."""
    from engine.data import RowSampler, collate, prepare_data
    from engine.model import load_model, load_tokenizer
    from engine.refcache import ensure_cache, on_the_fly_reference

    signals.enter("start-up")
    if cfg.logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "logging.wandb is true but the wandb package is not installed: pip install wandb, or set "
                "logging.wandb false"
            ) from None
    if env.device.type == "cpu":
        limit_allocator_retention()  # freed activations leave the process instead of staying as heap fragments
    t_start = time.time()
    resume_from = _preflight(cfg, env)
    torch.manual_seed(cfg.data.seed + env.rank)
    run_dir = cfg.logging.run_dir
    if env.is_main:
        cfg.save(run_dir / "config.yaml")
        from engine.plan import PlanError, plan_from_config

        try:
            print(plan_from_config(cfg, env.world_size).summary())
        except (PlanError, OSError, ValueError) as e:  # advisory only: never stops a run
            print(f"memory plan unavailable for {cfg.model.name}: {e}")

    signals.enter("data preparation")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name, revision=cfg.model.revision)
    # The objective picks the data, the model and the held-out evaluation: a reward model trains a
    # sequence classifier on packed responses (engine.reward); the policy objectives the fused-loss LM.
    is_reward = cfg.loss.objective == "reward"
    if is_reward:
        from engine.data.pointwise import collate_reward as collate
        from engine.data.pointwise import prepare_reward_data

        prepared = prepare_reward_data(cfg, tokenizer, out_dir=run_dir if env.is_main else None)
        tokenizer = prepared.tokenizer  # the reward template and length: what the export must carry
    else:
        prepared = prepare_data(cfg, tokenizer, out_dir=run_dir if env.is_main else None)
    rows = prepared.train_rows
    if not rows:
        raise TrainingError(f"no training pairs after preparation; see {run_dir / 'data_report.json'}")

    signals.enter("reference cache")
    ref_cache = None
    if cfg.loss.needs_reference:
        ref_cache = ensure_cache(cfg, tokenizer, prepared, device=env.device, rank=env.rank, world_size=env.world_size)

    signals.enter("model set-up")
    if is_reward:
        from engine.reward import load_reward_model

        model = load_reward_model(cfg.model, prepared, device=env.device)
    else:
        model = load_model(cfg.model, device=env.device)
    reference = None
    if cfg.loss.needs_reference and ref_cache is None:
        reference = on_the_fly_reference(model, cfg)
    module = _loss_module(cfg, model)
    sampler = RowSampler(
        [r.num_tokens for r in rows],
        num_replicas=env.world_size,
        rank=env.rank,
        rows_per_batch=cfg.data.rows_per_batch,
        seed=cfg.data.seed,
    )
    steps_per_epoch = max(1, len(sampler) // cfg.optim.grad_accum)
    total_steps = cfg.optim.max_steps or max(1, math.ceil(steps_per_epoch * cfg.optim.epochs))
    engine, optimizer, scheduler = parallelize.setup_deepspeed(module, cfg, total_steps=total_steps)
    validation = None
    if is_reward:
        from engine.reward import RewardValidation

        validation = RewardValidation(
            cfg,
            prepared,
            run_dir=run_dir,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            device=env.device,
            is_main=env.is_main,
        )

    state = _fresh_state(env.world_size)
    if resume_from is not None:
        checkpoint.load(engine, resume_from, rank=env.rank)
        state.update(json.loads((resume_from / "trainer_state.json").read_text()))
        if env.is_main:
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
    state["segments"] += 1
    if validation is not None:
        validation.load_state_dict(state.get("validation"))
        state["validation"] = validation.state  # the same dict: every checkpoint saves the current one
    if state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    else:
        sampler.set_epoch(state["epoch"])

    run = Run(
        cfg=cfg,
        env=env,
        signals=signals,
        tokenizer=tokenizer,
        prepared=prepared,
        module=module,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        total_steps=total_steps,
        state=state,
        collate=collate,
        ref_cache=ref_cache,
        reference=reference,
        validation=validation,
        t_start=t_start,
        saved_step=state["step"] if resume_from is not None else None,
    )
    run.log = MetricsLog(cfg, env, total_steps=total_steps, start_step=state["step"])
    return run


def train_loop(run: Run) -> None:
    """Optimizer steps until the last one; on a stop signal, a checkpoint and StopRequested."""
    cfg, env, state = run.cfg, run.env, run.state
    gpu_name = flops.device_name(env.device)
    # MFU's attention term uses the training rows' mean per-token context (engine/flops.py).
    seq_lens = (s for r in run.prepared.train_rows for s in r.seq_lens)
    flops_per_token = flops.ModelFlops.of(run.module.model).per_token(flops.attention_context(seq_lens))
    consecutive_nonfinite = 0
    stream = run.micro_batches()
    run.engine.train()
    while state["step"] < run.total_steps:
        t0 = time.time()
        # grad_accum micro-batches forward and backward; DeepSpeed applies the update at the boundary.
        sums, nonfinite, grad_norm, tokens, pad = train_step(run, stream)
        state["step"] += 1
        dt = time.time() - t0
        # Throughput counts every rank's tokens.
        tokens, pad = parallelize.all_reduce_sum([tokens, pad])
        state["tokens"] += int(tokens)
        state["loop_time_s"] += dt
        state["sampler"] = run.sampler.state_dict()
        # Sync point: the step's accumulated metric tensors become numbers here, once per step.
        metrics = {k: v.item() for k, v in sums.items()} if not nonfinite else {"loss": None}
        if metrics["loss"] is not None:
            state["first_loss"] = metrics["loss"] if state["first_loss"] is None else state["first_loss"]
            state["last_loss"] = metrics["loss"]
        # A non-finite micro-batch withheld the whole step's update on every rank; too many in a row stop the run.
        consecutive_nonfinite = consecutive_nonfinite + 1 if nonfinite else 0
        state["nonfinite_skipped"] += bool(nonfinite)
        record = {
            "step": state["step"],
            "epoch": state["epoch"],
            **metrics,
            "lr": run.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
            "mfu": flops.mfu(flops_per_token, tokens / dt, gpu_name, n_devices=env.world_size),
            "peak_memory_mb": _peak_memory_mb(env.device),
            "padding_fraction": pad / max(1.0, tokens + pad),
            "step_time_s": dt,
            "nonfinite_micro_batches": nonfinite,
        }
        # Held-out evaluation (reward models): a collective; it can end the run early.
        evaluated = run.validation is not None and run.validation.due(state["step"])
        if evaluated:
            record.update(run.validation.run(run.engine, run.module, run.scheduler, run.tokenizer, state["step"]))
        run.log.step(record, force=evaluated)
        if consecutive_nonfinite >= cfg.logging.max_nonfinite_steps:
            raise TrainingError(
                f"{consecutive_nonfinite} consecutive steps had a non-finite loss (up to step {state['step']}); "
                "lower optim.lr, check the data, or use parallel.precision fp32/bf16 instead of fp16"
            )
        # Stop together: ranks may receive the signal a step apart, and the collectives would deadlock.
        stopping = parallelize.all_ranks_agree(run.signals.stop)
        every = cfg.checkpoint.every_steps
        if (every and state["step"] % every == 0) or stopping:
            run.save_checkpoint()
        if stopping:
            signum = run.signals.signum or signal.SIGTERM  # another rank may have received it
            raise StopRequested(signum, f"training (checkpoint saved at step {state['step']})")
        if evaluated and run.validation.should_stop:
            break


def train_step(run: Run, stream: Iterator[list[int]]):
    """One optimizer step of grad_accum micro-batches.

    Returns (metric sums as float64 tensors, averaged over the micro-batches; non-finite micro-batch
    count; grad norm at the boundary; real tokens; padding tokens). Every micro-batch goes through
    engine.backward and engine.step, so DeepSpeed's accumulation boundaries stay where the loop's are;
    a non-finite one contributes the backward of a graph-less zero and withholds the step's update.
    """
    cfg, rows = run.cfg, run.prepared.train_rows
    accum = cfg.optim.grad_accum
    sums: dict[str, torch.Tensor] = {}
    tokens = pad = nonfinite = 0
    grad_norm = None
    for _ in range(accum):
        batch = run.collate([rows[i] for i in next(stream)], device=run.env.device, **run.module.batch_options)
        if run.ref_cache is not None:
            run.ref_cache.fill(batch)
        elif run.reference is not None:
            batch.ref_chosen_logps, batch.ref_rejected_logps = run.reference(batch)
        out = run.engine(batch)
        # Sync point (one flag per micro-batch): every rank must take the same branch, or the
        # collectives inside backward would deadlock.
        if parallelize.all_ranks_agree(not bool(torch.isfinite(out.loss.detach()))):
            nonfinite += 1
            run.optimizer.withhold = True
            loss = parallelize.zero_loss(run.engine, like=out.loss)
        else:
            loss = out.loss
            for k, v in (("loss", out.loss), *out.metrics.items()):
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64).detach() / accum
        run.engine.backward(loss)
        grad_norm = parallelize.step_with_grad_norm(run.engine)
        tokens += batch.num_real_tokens
        pad += batch.num_pad_tokens
    run.optimizer.withhold = False
    return sums, nonfinite, None if nonfinite else grad_norm, tokens, pad


def finish(run: Run) -> dict:
    """After the loop: the last checkpoint, the export, the evaluation and the run's summary (rank 0)."""
    cfg, env, state, signals = run.cfg, run.env, run.state, run.signals
    if run.saved_step != state["step"]:
        # Saved before export and evaluation, so a stop during either resumes right here.
        with signals.deferred("final checkpoint"):
            run.save_checkpoint()
    signals.enter("export")
    if cfg.checkpoint.export_final:
        if run.validation is not None and run.validation.state["best_step"] is not None:
            run.validation.finish(run.run_dir / "final")  # the best held-out model, not the last one
        else:
            export(run.module.model, run.tokenizer, run.run_dir / "final", cfg, is_main=env.is_main)
    parallelize.barrier()

    signals.enter("evaluation")
    summary = {}
    if env.is_main:
        loop_s = state["loop_time_s"]
        summary = {
            "run_dir": str(run.run_dir),
            "objective": cfg.loss.objective,
            "steps": state["step"],
            "segments": state["segments"],
            "pairs": len(run.prepared.train_pairs),
            "first_loss": state["first_loss"],
            "final_loss": state["last_loss"],
            "tokens": state["tokens"],
            "tokens_per_s": state["tokens"] / loop_s if loop_s > 0 else None,
            "padding_fraction": run.prepared.padding_fraction,
            "nonfinite_skipped": state["nonfinite_skipped"],
            "peak_memory_mb": _peak_memory_mb(env.device),
            "reference": "none"
            if run.ref_cache is None and run.reference is None
            else "cache"
            if run.ref_cache is not None
            else "on the fly",
            "train_time_s": loop_s,
            "wall_time_s": time.time() - run.t_start,
        }
        if run.validation is not None:
            v = run.validation.state
            summary.update(
                responses=len(run.prepared.train_responses),
                best_step=v["best_step"],
                stopped_early_at=v["stopped_early_at"],
            )
            summary["eval"] = v["best_metrics"] or {}
        elif cfg.eval.enabled and run.prepared.val_pairs:
            summary["eval"] = evaluate_after_training(
                run.module.model, run.tokenizer, run.prepared, cfg, run.run_dir / "eval"
            )
        atomic_write(run.run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        print_summary(summary)
    parallelize.barrier()
    return summary


def export(model, tokenizer, out_dir: Path, cfg: Config, *, is_main: bool) -> None:
    """save_pretrained of the trained weights (LoRA merged on request) that transformers loads directly.

    The head's class is our Linear subclass, with the same parameters and state-dict keys, so the
    exported files are a plain HF checkpoint. Written to a temp dir and renamed: never half a model.
    """
    import shutil

    with parallelize.gathered_parameters(model, cfg.parallel.zero_stage):
        if not is_main:
            return
        to_save = model
        if hasattr(model, "merge_and_unload") and cfg.checkpoint.merge_lora:
            import copy

            to_save = copy.deepcopy(model).merge_and_unload()
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, out_dir)


def evaluate_after_training(model, tokenizer, prepared, cfg: Config, out_dir: Path) -> dict:
    """Sample the held-out prompts and score quality and diversity (engine.evaluate)."""
    from engine.evaluate import evaluate_model

    prompts = list(dict.fromkeys(p.prompt for p in prepared.val_pairs))[: cfg.eval.num_prompts]
    model.eval()
    try:
        result = evaluate_model(
            model,
            tokenizer,
            prompts,
            cfg.eval,
            out_dir=out_dir,
            synthetic=cfg.data.source == "synthetic",
            model_name=cfg.logging.run_name,
        )
    finally:
        model.train()
    return result.summary


def print_summary(summary: dict) -> None:
    rows = [(k, v) for k, v in summary.items() if k != "eval"]
    if "eval" in summary and isinstance(summary["eval"], dict):
        rows += [(f"eval/{k}", v) for k, v in summary["eval"].items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 24))
    for k, v in rows:
        val = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {val}")
    print("-" * (width + 24))


OOM_FIX = (
    "reduce memory with: data.max_tokens_per_row, data.rows_per_batch (raise optim.grad_accum to keep the batch), "
    "model.gradient_checkpointing true, parallel.zero_stage 3, parallel.offload_optimizer true, model.lora_r > 0, "
    "ref_cache.mode auto (no reference model in memory); `python -m engine.plan` estimates each setting's effect"
)


def _known_error(e: BaseException) -> tuple[str, int, bool] | None:
    """(label, exit status, whether it can happen on one rank only) of an error the user can fix, else None.

    Errors of the inputs (config, data, cache, checkpoint, run directory) hit every rank alike, so only
    rank 0 reports them; memory and file-system errors can be local to a rank, which then reports its own.
    """
    from engine.data.loading import DataError
    from engine.refcache import RefCacheError, RefCacheKeyError

    for kinds, label in (
        (ConfigError, "config error"),
        (DataError, "data error"),
        ((RefCacheError, RefCacheKeyError), "reference cache error"),
        (CheckpointError, "checkpoint error"),
        (RunDirError, "run directory error"),
        (TrainingError, "training error"),
    ):
        if isinstance(e, kinds):
            return label, 2, False
    if isinstance(e, parallelize.RemoteRankError):
        return "", 2, False  # the failing rank reports the cause itself
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory", 1, True
    if isinstance(e, PermissionError):
        return "permission error", 2, True
    if isinstance(e, OSError):
        return "I/O error", 2, True
    return None


def main(argv: list[str] | None = None) -> None:
    """`torchrun -m engine.train`: every known error is one line on stderr (rank 0) with the fix; a stop
    by SIGTERM/SIGINT exits 128 + the signal's number after saying how to resume."""
    try:
        cfg = load_config(argv, prog="torchrun -m engine.train")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rank = int(os.environ.get("RANK", "0"))
    try:
        train(cfg)
    except StopRequested as e:
        if rank == 0:
            print(f"{e}; the run is resumable: rerun the same command with --checkpoint.resume auto", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        known = _known_error(e)
        if known is None:
            raise
        label, status, rank_local = known
        if label and (rank == 0 or rank_local):
            where = f"[rank {rank}] " if rank_local and rank != 0 else ""
            message = str(e) if not isinstance(e, torch.OutOfMemoryError) else f"{str(e).splitlines()[0]}; {OOM_FIX}"
            if isinstance(e, OSError) and not isinstance(e, PermissionError | FileNotFoundError):
                message += "; free disk space or point logging.output_dir and the cache directories elsewhere"
            elif isinstance(e, PermissionError):
                message += "; make it writable or point logging.output_dir and the cache directories elsewhere"
            print(f"{where}{label}: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(status) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
