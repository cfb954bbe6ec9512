"""What synchronising Batch Norm costs: bnkit.SyncBatchNorm vs local BN, gloo, 2 processes.

Both runs train the digits MLP (bnkit.course.nets.mlp: two BN layers of 64) inside
DistributedDataParallel, so the gradient all-reduce is in both; the difference is the
synchronisation of Batch Norm. They are timed in alternating rounds in the same processes
(each round: ``steps`` training steps of each, the median step kept) and the figure is the
median over rounds of the per-round ratio. The collectives are counted by wrapping
``torch.distributed``'s functions during one training step of each.

    python benchmarks/bench_sync.py            # prints the figures as JSON
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

WORLD_SIZE = 2
PER_PROCESS = 32  # examples per process and step
COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter")


def _count_collectives(step) -> int:
    """How many torch.distributed collectives Python code calls during ``step()``."""
    calls, originals = [0], {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(original):
        def call(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        return call

    try:
        for name, original in originals.items():
            setattr(dist, name, counted(original))
        step()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return calls[0]


def _worker(rank: int, world_size: int, rounds: int, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    import bnkit
    from bnkit.course.data import load_digits_split
    from bnkit.course.nets import mlp

    X, _, y, _ = load_digits_split(seed=0)
    model = mlp(seed=0)
    runs = {"local": model, "sync": bnkit.convert_sync_batchnorm(copy.deepcopy(model))}
    ddps = {name: DistributedDataParallel(m) for name, m in runs.items()}
    opts = {name: torch.optim.SGD(d.parameters(), lr=0.01) for name, d in ddps.items()}
    rng = np.random.default_rng(rank)

    def step(name: str) -> None:
        idx = rng.choice(len(X), PER_PROCESS, replace=False)
        logits = ddps[name](torch.as_tensor(X[idx]))  # (PER_PROCESS, 10)
        loss = nn.functional.cross_entropy(logits, torch.as_tensor(y[idx]))
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()

    def median_step(name: str) -> float:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(name)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    counts = {name: _count_collectives(lambda: step(name)) for name in runs}
    for name in runs:  # warm-up
        median_step(name)
    per_round = [(median_step("local"), median_step("sync")) for _ in range(rounds)]
    return {"per_round": per_round, "collectives": counts, "bn_layers": len(bnkit.bn_layers(model))}


def measure(rounds: int = 7, steps: int = 20) -> dict[str, float]:
    """The per-step cost of bnkit.SyncBatchNorm against local BN, gloo, 2 processes on CPU.

    Returns {"sync_vs_local": median per-round ratio of the step times, "step_ms_local",
    "step_ms_sync": median step times, "sync_overhead_ms_per_step": their difference,
    "sync_collectives_per_bn_layer_per_step": collectives SyncBatchNorm adds per BN layer and
    step (2: one forward, one backward), "world_size", "per_process_batch"} (rank 0's timings).
    """
    from bnkit.distributed import spawn

    result = spawn(_worker, WORLD_SIZE, rounds, steps, timeout=600)[0]
    local = statistics.median(t for t, _ in result["per_round"])
    sync = statistics.median(t for _, t in result["per_round"])
    added = result["collectives"]["sync"] - result["collectives"]["local"]
    return {
        "sync_vs_local": statistics.median(s / t for t, s in result["per_round"]),
        "step_ms_local": 1e3 * local,
        "step_ms_sync": 1e3 * sync,
        "sync_overhead_ms_per_step": 1e3 * (sync - local),
        "sync_collectives_per_bn_layer_per_step": added / result["bn_layers"],
        "world_size": WORLD_SIZE,
        "per_process_batch": PER_PROCESS,
    }


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    print(json.dumps(measure(rounds), indent=1))
