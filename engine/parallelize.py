"""Process groups and DeepSpeed: the one place that knows about parallelism.

The trainer asks for a `DistEnv` (rank, world, device) and a DeepSpeed engine around its loss module;
everything ZeRO-specific (config dict, gathering partitioned parameters for export) lives here, so the
model and the step loop stay unaware of how parameters are sharded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Environment variables init_distributed set itself for a world of one (see release_own_world).
_OWNED_ENV: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg) -> DistEnv:
    """Join (or create, for a plain `python -m engine.train`) the process group.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; without them we start a world of one on
    loopback so that DeepSpeed, which always needs a process group, works the same way.
    """
    import deepspeed

    if "RANK" not in os.environ:
        # DeepSpeed reads LOCAL_RANK from the environment on every initialize; the rendezvous address
        # is only needed while the group does not exist yet.
        owned = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        if "MASTER_ADDR" not in os.environ and not dist.is_initialized():
            owned["MASTER_ADDR"] = "127.0.0.1"
        if "MASTER_PORT" not in os.environ and not dist.is_initialized():
            owned["MASTER_PORT"] = str(_free_port())
        os.environ.update(owned)
        _OWNED_ENV.update(owned)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise RuntimeError("parallel.backend nccl needs CUDA GPUs; use parallel.backend gloo (or auto) on CPU")
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def release_own_world() -> None:
    """Remove the variables `init_distributed` set for a world of one it created; keep the group.

    Child processes started afterwards must not inherit RANK/MASTER_PORT (they would join, or collide
    with, this process's store). The group itself stays for the next in-process run to reuse:
    DeepSpeed caches process-group handles in module globals, so destroying and re-creating the group
    in one process leaves it holding stale ones. A launcher-made world (torchrun) is left alone.
    """
    for key in _OWNED_ENV:
        os.environ.pop(key, None)
    _OWNED_ENV.clear()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (used to skip a non-finite step everywhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RemoteRankError(RuntimeError):
    """Another rank failed; this one stops too (the failing rank reports the cause)."""


def raise_if_any_failed(
    error: BaseException | None, *, what: str, error_type: type[Exception] = RemoteRankError
) -> None:
    """Collective: if any rank failed, every rank raises, so none waits forever at the next collective.

    The failing rank re-raises its own error; the others raise `error_type` naming the rank and its message.
    """
    if not _multi_rank():
        if error is not None:
            raise error
        return
    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, msg in enumerate(msgs):
        if msg is not None:
            raise error_type(f"{what} failed on rank {rank}: {msg}")


def broadcast_from_zero(obj):
    """Rank 0's `obj` on every rank (any picklable value)."""
    if not _multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def deepspeed_config(cfg, *, total_steps: int, device_type: str | None = None) -> dict:
    """DeepSpeed JSON derived from our config; a user's parallel.deepspeed_config overrides its keys.

    device_type ("cuda" or "cpu"; default: this machine's) lets engine.plan resolve a GPU run's JSON anywhere.
    """
    p, o = cfg.parallel, cfg.optim
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage >= 2:
        zero.update(overlap_comm=cuda, contiguous_gradients=True, reduce_scatter=True)
    if p.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ds = {
        # One micro-batch is `data.rows_per_batch` packed rows; DeepSpeed only uses this for bookkeeping.
        "train_micro_batch_size_per_gpu": cfg.data.rows_per_batch,
        "gradient_accumulation_steps": o.grad_accum,
        "gradient_clipping": o.max_grad_norm,
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW (fused/CPU Adam need compiled ops that CPUs here don't have).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "initial_scale_power": 16},
    }
    if p.deepspeed_config:
        with open(p.deepspeed_config) as f:
            user = json.load(f)
        for k, v in user.items():
            ds[k] = {**ds[k], **v} if isinstance(v, dict) and isinstance(ds.get(k), dict) else v
    return ds


def lr_lambda(cfg, total_steps: int):
    """Linear warmup then cosine / linear decay to 0 / constant, as a multiplier of optim.lr."""
    warmup = int(round(cfg.optim.warmup_ratio * total_steps))
    schedule = cfg.optim.schedule

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class WithheldAdamW(torch.optim.AdamW):
    """torch AdamW whose update can be withheld for a step: no weight and no moment changes.

    A step with a non-finite micro-batch must change nothing, yet DeepSpeed has to run its step at the
    accumulation boundary so that its micro-step counter stays aligned with the loop's. Under ZeRO the
    DeepSpeed optimizer calls this one (once per parameter group), so the flag is set for the whole
    boundary by the loop, not cleared here.
    """

    withhold = False

    def step(self, closure=None):
        if self.withhold:
            return None
        return super().step(closure)


def setup_deepspeed(module: torch.nn.Module, cfg, *, total_steps: int):
    """(engine, optimizer, scheduler): torch AdamW over the trainable parameters (a WithheldAdamW, which
    DeepSpeed wraps under ZeRO and mixed precision; the one returned is ours, not the wrapper)."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: check model.lora_r / lora_target_modules")
    o = cfg.optim
    # The fused kernel (CPU and CUDA) updates each tensor in one pass: the default per-tensor loop
    # allocates temporaries as large as the largest parameter (a 147 MB sqrt(v) for gpt2-small's
    # embedding) and runs ~2x slower on CPU.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = WithheldAdamW(
        params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, total_steps=total_steps)
    )
    if cfg.parallel.zero_stage == 0 and engine.dp_world_size == 1:
        # ZeRO-0's all-reduce flattens every gradient into one bucket of up to 5e8 elements, all-reduces it
        # and copies it back: in a world of one that is a full gradient copy (497 MB for gpt2-small in fp32)
        # for an identity. DeepSpeed skips it the same way when it has no communication backend.
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def step_with_grad_norm(engine) -> float | None:
    """engine.step(), returning the pre-clipping global gradient norm at an accumulation boundary.

    DeepSpeed records the norm for ZeRO and mixed precision, but its plain fp32 stage-0 path clips and
    discards it; there the gradients are already all-reduced at the boundary, so we measure them first.
    """
    measured = None
    if (
        engine.is_gradient_accumulation_boundary()
        and not engine.zero_optimization()
        and not (engine.fp16_enabled() or engine.bfloat16_enabled())
    ):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        measured = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        )
    engine.step()
    reported = engine.get_global_grad_norm()
    return float(reported) if reported is not None else measured


def zero_loss(engine, *, like: torch.Tensor) -> torch.Tensor:
    """A loss of 0 whose backward adds nothing to any gradient, in the form this ZeRO stage's backward accepts.

    Used in place of a non-finite micro-batch's loss, so that engine.backward/step still run and the
    accumulation boundaries stay aligned. DeepSpeed's backward needs a grad_fn. ZeRO-1/2 reduce
    gradients through per-parameter hooks and fail on a backward that reaches no parameter, so there
    the zero touches every trainable parameter (d(0 * p)/dp = 0 even where p is not finite); under
    ZeRO-3 parameters are partitioned outside forward, and a graph of its own is what works.
    """
    if engine.zero_optimization_stage() in (1, 2):
        params = [p for p in engine.module.parameters() if p.requires_grad]
        return sum((p * 0).sum() for p in params).to(like.dtype)
    return torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True).clone()


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module, zero_stage: int):
    """Full parameters of a ZeRO-3 partitioned module for the duration of the block (a no-op below stage 3)."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
