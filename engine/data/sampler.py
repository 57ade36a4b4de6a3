"""Distributed, resumable, token-balanced sampling of packed rows into micro-batches.

Sits between packing and the step loop: the trainer asks `RowSampler` for the row indices of its next
micro-batch and collates them. Every step of every rank runs collectives (gradient all-reduce,
ZeRO gathers), so:
- all ranks get the SAME number of micro-batches per epoch;
- within a step the rows are spread so that ranks carry similar token counts (the slowest rank sets
  the step time): the step's rows are assigned largest first to the rank with the fewest tokens
  (LPT scheduling), each rank taking `rows_per_batch` rows;
- each row is used exactly once per epoch across ranks; only when the last step has fewer rows than
  ranks are rows repeated (counted in `epoch_stats`), or, with `drop_last`, the incomplete last step
  is dropped (counted too).
The plan depends only on (row token counts, seed, epoch, replicas, rows_per_batch), so every rank
computes the same plan without communication, and `state_dict()` (epoch + position) resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class RowSampler:
    def __init__(
        self,
        row_token_counts: Sequence[int],
        *,
        num_replicas: int,
        rank: int,
        rows_per_batch: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        if len(row_token_counts) == 0:
            raise ValueError("RowSampler got no rows: the training data produced no packed rows (see data_report.json)")
        self.tokens = np.asarray(row_token_counts, dtype=np.int64)
        self.num_replicas, self.rank, self.rows_per_batch = num_replicas, rank, rows_per_batch
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already handed out on this rank
        self._plans: dict[int, tuple[list[list[list[int]]], dict]] = {}

    # ------------------------------------------------------------------------------ the plan

    def _assign(self, rows: np.ndarray) -> list[list[int]]:
        """Spread one step's rows over the ranks: largest first onto the least-loaded rank with room."""
        W = self.num_replicas
        cap = -(-len(rows) // W)  # ceil: a short last step gives every rank the same number of rows +- 1
        load = [0] * W
        bins: list[list[int]] = [[] for _ in range(W)]
        for r in sorted(rows.tolist(), key=lambda i: (-self.tokens[i], i)):
            w = min((w for w in range(W) if len(bins[w]) < cap), key=lambda w: (load[w], len(bins[w]), w))
            bins[w].append(r)
            load[w] += int(self.tokens[r])
        return bins

    def _plan(self, epoch: int) -> tuple[list[list[list[int]]], dict]:
        if epoch in self._plans:
            return self._plans[epoch]
        n, W, B = len(self.tokens), self.num_replicas, self.rows_per_batch
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        per_step = W * B
        steps = [order[i : i + per_step] for i in range(0, n - n % per_step, per_step)]
        stats = {"repeated_rows": 0, "dropped_rows": 0}
        rest = order[n - n % per_step :]
        if len(rest):
            if self.drop_last:
                stats["dropped_rows"] = int(len(rest))
            else:
                if len(rest) < W:
                    # Fewer rows than ranks: repeat rows from the start of the order so no rank idles.
                    extra = np.resize(order, W - len(rest))
                    stats["repeated_rows"] = int(len(extra))
                    rest = np.concatenate([rest, extra])
                steps.append(rest)
        plan = [self._assign(s) for s in steps]
        self._plans = {epoch: (plan, stats)}  # keep one epoch: plans of big datasets are not tiny
        return plan, stats

    def epoch_stats(self, epoch: int | None = None) -> dict:
        """Rows repeated or dropped to give every rank the same number of micro-batches, and the token
        imbalance (max rank tokens / mean rank tokens, summed over steps) of an epoch."""
        plan, stats = self._plan(self.epoch if epoch is None else epoch)
        per_rank = np.zeros(self.num_replicas)
        for step in plan:
            for w, rows in enumerate(step):
                per_rank[w] += self.tokens[rows].sum()
        imbalance = float(per_rank.max() / per_rank.mean()) if per_rank.mean() > 0 else 1.0
        return {
            **stats,
            "micro_batches": len(plan),
            "tokens_per_rank": per_rank.astype(int).tolist(),
            "imbalance": imbalance,
        }

    # ------------------------------------------------------------------------------ iteration

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; calling it again with the current epoch (e.g. after a resume) keeps the position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return len(self._plan(self.epoch)[0])

    def __iter__(self) -> Iterator[list[int]]:
        plan, _ = self._plan(self.epoch)
        while self.position < len(plan):
            batch = plan[self.position][self.rank]
            # Advance before yielding: a checkpoint taken after this batch was consumed resumes after it.
            self.position += 1
            yield list(batch)

    # ------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": int(len(self.tokens)),
            "num_replicas": self.num_replicas,
            "rows_per_batch": self.rows_per_batch,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_rows", "num_replicas", "rows_per_batch", "shuffle", "drop_last"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the sampler: saved {key}={state[key]!r} but this run has {key}={mine[key]!r}; "
                    f"resume with the same data, world size and data settings, or start a fresh run"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
