"""Run under torchrun: every objective trains a few DeepSpeed steps on one repeated packed batch.

Prints one JSON line from rank 0: {objective: [losses...]}. Used by tests/test_train.py for ZeRO-2/3.
"""

import json
import sys

import torch

from engine import parallelize
from engine.config import load_config
from engine.data import collate, prepare_data
from engine.model import load_model, load_tokenizer
from engine.refcache import reference_logps
from engine.train import PolicyWithLoss


def main():
    zero, steps = int(sys.argv[1]), int(sys.argv[2])
    results = {}
    env = None
    for objective in ("dpo", "ddpo", "orpo", "dorpo", "sft"):
        cfg = load_config(sys.argv[3:] + ["--loss.objective", objective, "--parallel.zero_stage", str(zero)])
        env = env or parallelize.init_distributed(cfg.parallel)
        tok = load_tokenizer()
        prepared = prepare_data(cfg, tok)
        batch = collate([prepared.train_rows[env.rank % len(prepared.train_rows)]], device=env.device)
        model = load_model(cfg.model, device=env.device)
        if cfg.loss.needs_reference:
            batch.ref_chosen_logps, batch.ref_rejected_logps = reference_logps(model, batch)
        engine, _, _ = parallelize.setup_deepspeed(PolicyWithLoss(model, cfg.loss), cfg, total_steps=steps)
        losses = []
        for _ in range(steps):
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            loss = out.loss.detach().clone()
            torch.distributed.all_reduce(loss)
            losses.append(loss.item() / env.world_size)
        results[objective] = losses
        engine.destroy()
    if env.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
