"""The step loop: `torchrun [--nproc_per_node N] -m engine.train [--config F] [--section.field v ...]`.

With no arguments it trains the tiny-cpu default (llama-tiny, synthetic WritingPrompts, DDPO) end to
end: deviation weights -> reference cache -> training -> final export -> a short evaluation, all
under `runs/<run_name>/`.

One batch, top to bottom: packed rows from `engine.data` -> reference log-probs looked up in the cache
(or a reference forward) -> `PolicyWithLoss` (model trunk -> final hidden states -> the fused
LM-head/log-prob/loss kernel, so [N, V] logits never exist) -> DeepSpeed backward/step (owned by
`engine.parallelize`) -> metrics, checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch

from engine import checkpoint, parallelize
from engine.config import Config, ConfigError, load_config
from engine.losses import loss_epilogue


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
    def wrap(cls, head: torch.nn.Module) -> "_FusedHead":
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


def _gpu_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the detected GPU (for MFU); None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
    return next((v for k, v in table.items() if k in name), None)


def _flops_per_token(model) -> float:
    """6 x parameters per token (forward + backward), the usual MFU convention (Kaplan et al. 2020)."""
    n = sum(p.numel() for p in model.parameters())
    return 6.0 * n


class _StopFlag:
    """SIGTERM sets it; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.stop = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.stop = True


def _log_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: Config) -> dict:
    """Run training as configured; returns the final summary (rank 0; other ranks get {}).

    Callable repeatedly in one process (the experiment does): a world of one it created is released
    on the way out; a torchrun world belongs to the launcher and stays.
    """
    try:
        return _train(cfg)
    finally:
        parallelize.release_own_world()


def _train(cfg: Config) -> dict:
    from engine.data import RowSampler, collate, prepare_data
    from engine.model import load_model, load_tokenizer
    from engine.refcache import ensure_cache, on_the_fly_reference

    wandb = None
    if cfg.logging.wandb:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb is true but the wandb package is not installed: pip install wandb, or set logging.wandb false") from None
    env = parallelize.init_distributed(cfg.parallel)
    torch.manual_seed(cfg.data.seed + env.rank)
    run_dir = cfg.logging.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    t_start = time.time()
    if env.is_main:
        from engine.plan import PlanError, plan_from_config

        try:
            print(plan_from_config(cfg, env.world_size).summary())
        except (PlanError, OSError, ValueError) as e:  # advisory only: never stops a run
            print(f"memory plan unavailable for {cfg.model.name}: {e}")

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name, revision=cfg.model.revision)
    prepared = prepare_data(cfg, tokenizer, out_dir=run_dir if env.is_main else None)
    rows = prepared.train_rows
    if not rows:
        raise RuntimeError(f"no training pairs after preparation; see {run_dir / 'data_report.json'}")

    ref_cache = None
    if cfg.loss.needs_reference:
        ref_cache = ensure_cache(cfg, tokenizer, prepared, device=env.device, rank=env.rank, world_size=env.world_size)

    model = load_model(cfg.model, device=env.device)
    reference = None
    if cfg.loss.needs_reference and ref_cache is None:
        reference = on_the_fly_reference(model, cfg)
    module = PolicyWithLoss(model, cfg.loss)

    sampler = RowSampler(
        [r.num_tokens for r in rows], num_replicas=env.world_size, rank=env.rank,
        rows_per_batch=cfg.data.rows_per_batch, seed=cfg.data.seed,
    )
    micro_per_epoch = len(sampler)
    steps_per_epoch = max(1, micro_per_epoch // cfg.optim.grad_accum)
    total_steps = cfg.optim.max_steps or max(1, math.ceil(steps_per_epoch * cfg.optim.epochs))
    engine, optimizer, scheduler = parallelize.setup_deepspeed(module, cfg, total_steps=total_steps)

    ckpt_dir = run_dir / "checkpoints"
    state = {"step": 0, "epoch": 0, "sampler": None, "nonfinite_skipped": 0, "tokens": 0}
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, ckpt_dir)
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, rank=env.rank)
        if env.is_main:
            print(f"resumed from {resume_from} at step {state['step']}")
    if state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    else:
        sampler.set_epoch(state["epoch"])

    writer = None
    metrics_path = run_dir / "metrics.jsonl"
    if env.is_main and resume_from is None:
        metrics_path.unlink(missing_ok=True)  # a fresh run starts its log anew; a resumed one appends
    if env.is_main and cfg.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    if env.is_main and wandb is not None:
        wandb.init(name=cfg.logging.run_name, dir=str(run_dir), config=cfg.to_dict(), resume="allow")
    bar = None
    if env.is_main and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc=f"{cfg.loss.objective}", dynamic_ncols=True, file=sys.stdout)

    stop = _StopFlag()
    peak_flops = _gpu_peak_flops(env.device)
    flops_per_token = _flops_per_token(model)
    consecutive_nonfinite = 0
    history: list[dict] = []
    engine.train()

    def batches():
        """Micro-batches from the saved sampler position onwards, epoch after epoch."""
        while True:
            for indices in sampler:
                yield indices
            state["epoch"] += 1
            sampler.set_epoch(state["epoch"])

    stream = batches()
    stopped = False
    while state["step"] < total_steps and not stopped:
        t0 = time.time()
        acc: dict[str, float] = {}
        tokens = pad = 0
        skipped = False
        grad_norm = None
        for _ in range(cfg.optim.grad_accum):
            batch = collate([rows[i] for i in next(stream)], device=env.device, **module.batch_options)
            if ref_cache is not None:
                ref_cache.fill(batch)
            elif reference is not None:
                batch.ref_chosen_logps, batch.ref_rejected_logps = reference(batch)
            out = engine(batch)
            nonfinite = parallelize.all_ranks_agree(not bool(torch.isfinite(out.loss.detach())))
            if nonfinite:
                skipped = True
                continue
            engine.backward(out.loss)
            grad_norm = parallelize.step_with_grad_norm(engine)
            for k, v in out.metrics.items():
                acc[k] = acc.get(k, 0.0) + float(v) / cfg.optim.grad_accum
            acc["loss"] = acc.get("loss", 0.0) + float(out.loss.detach()) / cfg.optim.grad_accum
            tokens += batch.num_real_tokens
            pad += batch.num_pad_tokens
        if skipped:
            # A non-finite micro-batch drops the whole step on every rank (grads are zeroed, nothing applied).
            optimizer.zero_grad(set_to_none=True)
            consecutive_nonfinite += 1
            state["nonfinite_skipped"] += 1
            if consecutive_nonfinite >= cfg.logging.max_nonfinite_steps:
                raise RuntimeError(
                    f"{consecutive_nonfinite} consecutive steps had a non-finite loss (step {state['step']}); "
                    "lower optim.lr, check the data, or use parallel.precision fp32/bf16 instead of fp16"
                )
            continue
        consecutive_nonfinite = 0
        state["step"] += 1
        dt = time.time() - t0
        tokens, pad = parallelize.all_reduce_sum([tokens, pad])
        state["tokens"] += int(tokens)
        state["sampler"] = sampler.state_dict()
        record = {
            "step": state["step"],
            "epoch": state["epoch"],
            **acc,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
            "mfu": (flops_per_token * tokens / dt / (peak_flops * env.world_size)) if peak_flops else None,
            "peak_memory_mb": _peak_memory_mb(env.device),
            "padding_fraction": pad / max(1.0, tokens + pad),
            "step_time_s": dt,
        }
        history.append(record)
        if env.is_main and state["step"] % cfg.logging.log_every == 0:
            _log_line(metrics_path, record)
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(f"train/{k}", v, state["step"])
            if wandb is not None:
                wandb.log({f"train/{k}": v for k, v in record.items() if v is not None}, step=state["step"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        # Ranks may receive SIGTERM a step apart: decide together, or the collectives would deadlock.
        stopped = parallelize.all_ranks_agree(stop.stop)
        every = cfg.checkpoint.every_steps
        if (every and state["step"] % every == 0) or stopped:
            checkpoint.save(engine, ckpt_dir, state["step"], state, cfg, rank=env.rank, keep_last=cfg.checkpoint.keep_last)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if env.is_main and wandb is not None:
        wandb.finish()
    if ref_cache is not None:
        ref_cache.assert_no_reference_used()  # with a cache, no reference model may have been loaded or run

    if stopped:
        if env.is_main:
            print(f"SIGTERM: checkpoint saved at step {state['step']} in {ckpt_dir}; resume with --checkpoint.resume auto")
        return {}
    if cfg.checkpoint.every_steps:
        checkpoint.save(engine, ckpt_dir, state["step"], state, cfg, rank=env.rank, keep_last=cfg.checkpoint.keep_last)

    final_dir = run_dir / "final"
    if cfg.checkpoint.export_final:
        export(module.model, tokenizer, final_dir, cfg, is_main=env.is_main)
    parallelize.barrier()

    summary = {}
    if env.is_main:
        summary = {
            "run_dir": str(run_dir),
            "objective": cfg.loss.objective,
            "steps": state["step"],
            "pairs": len(prepared.train_pairs),
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens": state["tokens"],
            "tokens_per_s": sum(h["tokens_per_s"] for h in history) / max(1, len(history)),
            "padding_fraction": prepared.padding_fraction,
            "nonfinite_skipped": state["nonfinite_skipped"],
            "peak_memory_mb": _peak_memory_mb(env.device),
            "reference": "cache" if ref_cache is not None else ("on the fly" if reference is not None else "none"),
            "train_time_s": time.time() - t_start,
        }
        if cfg.eval.enabled and prepared.val_pairs:
            summary["eval"] = evaluate_after_training(module.model, tokenizer, prepared, cfg, run_dir / "eval")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
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
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)


def evaluate_after_training(model, tokenizer, prepared, cfg: Config, out_dir: Path) -> dict:
    """Sample the held-out prompts and score quality and diversity (engine.evaluate)."""
    from engine.evaluate import evaluate_model

    prompts = list(dict.fromkeys(p.prompt for p in prepared.val_pairs))[: cfg.eval.num_prompts]
    model.eval()
    try:
        result = evaluate_model(
            model, tokenizer, prompts, cfg.eval, out_dir=out_dir, synthetic=cfg.data.source == "synthetic",
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


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(argv, prog="torchrun -m engine.train")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        train(cfg)
    except torch.OutOfMemoryError as e:
        raise SystemExit(
            f"out of memory: {e}\nReduce memory with: data.max_tokens_per_row, data.rows_per_batch (raise optim.grad_accum to keep the "
            "batch), model.gradient_checkpointing true, parallel.zero_stage 3, parallel.offload_optimizer true, model.lora_r > 0, "
            "ref_cache.mode auto (no reference model in memory); `python -m engine.plan` estimates each setting's effect"
        ) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
