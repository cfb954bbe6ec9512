"""Chapter 9's data parallelism: DDP simulated in one process, and what the chapter runs in
each of ``bnkit.distributed.spawn``'s processes (functions a fresh interpreter can import).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bnkit import running
from bnkit.distributed import all_reduce_stats, naive_all_reduce_moments, recompute_stats_distributed


def train_data_parallel(
    model: nn.Module,
    shards: Sequence[tuple[np.ndarray, np.ndarray]],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-2,
    broadcast_buffers: bool = False,
    seed: int = 0,
) -> tuple[list[nn.Module], list[list[dict[str, torch.Tensor]]]]:
    """Data-parallel training (DDP without SyncBatchNorm) simulated in one process.

    shards: one (X_k (m_k, 64) float32, y_k (m_k,) int64) per worker. At every step worker k
    draws ``batch_size`` examples from its own shard (random generator seed + k) and runs its
    replica in training mode: BN normalises with, and updates its running statistics from,
    the *local* batch. The gradients are averaged over workers (DDP's all-reduce), so all
    replicas keep the same weights (one SGD step each). BN buffers stay per worker; with
    ``broadcast_buffers`` worker 0's buffers are copied to every worker before each forward,
    as DDP does by default. Returns (replicas, history): history[k][t] = worker k's buffers
    after step t (name -> tensor).
    """
    replicas = [copy.deepcopy(model).train() for _ in shards]
    optimizers = [torch.optim.SGD(r.parameters(), lr=lr) for r in replicas]
    rngs = [np.random.default_rng(seed + k) for k in range(len(shards))]  # worker k's batch order
    history: list[list[dict[str, torch.Tensor]]] = [[] for _ in shards]
    for _ in range(steps):
        if broadcast_buffers:
            with torch.no_grad():
                for r in replicas[1:]:
                    for b, b0 in zip(r.buffers(), replicas[0].buffers()):
                        b.copy_(b0)
        for r, opt, rng, (X, y) in zip(replicas, optimizers, rngs, shards):
            idx = rng.choice(len(X), size=batch_size, replace=False)  # (batch_size,)
            loss = nn.functional.cross_entropy(r(torch.as_tensor(X[idx])), torch.as_tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
        with torch.no_grad():  # the all-reduce: every replica gets the average gradient
            for params in zip(*(r.parameters() for r in replicas)):
                mean_grad = torch.stack([p.grad for p in params]).mean(0)
                for p in params:
                    p.grad.copy_(mean_grad)
        for k, (r, opt) in enumerate(zip(replicas, optimizers)):
            opt.step()
            history[k].append({name: b.detach().clone() for name, b in r.named_buffers()})
    return replicas, history


def moments_worker(rank: int, world_size: int, shards: Sequence[np.ndarray]) -> dict[str, tuple]:
    """Rank ``rank`` holds shards[rank] (m_k, n): the global (count, mean, unbiased var), twice.

    "exact": merged (count, mean, M2) in float64; "naive": (n, sum z, sum z^2) all-reduced in
    the shard's dtype. Returns {"exact": (count, mean, var), "naive": (count, mean, var)}, NumPy.
    """
    z = torch.from_numpy(np.asarray(shards[rank]))
    total = all_reduce_stats(running.batch_stats(z))  # first: it checks the shapes agree
    count, mean, var = naive_all_reduce_moments(z)
    exact_mean, exact_var = running.finalize(total)
    return {
        "exact": (total.count, exact_mean.numpy(), exact_var.numpy()),
        "naive": (count, mean.numpy(), var.numpy()),
    }


def population_worker(
    rank: int,
    world_size: int,
    model: nn.Module,
    shards: Sequence[Sequence[np.ndarray]],
    estimator: str = "exact",
    upstream: str = "train",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rank ``rank`` holds the batches shards[rank]: recompute_stats_distributed on its copy of
    ``model``. Returns {layer name: (mean, var)} as NumPy arrays."""
    batches = [torch.as_tensor(b) for b in shards[rank]]
    out = recompute_stats_distributed(model, batches, estimator, upstream)
    return {name: (mean.numpy(), var.numpy()) for name, (mean, var) in out.items()}


def demo_worker(
    rank: int,
    world_size: int,
    offset_shards: Sequence[np.ndarray],
    model: nn.Module,
    batch_shards: Sequence[Sequence[np.ndarray]],
) -> dict[str, dict]:
    """Chapter 9's processes, started once: ``moments_worker`` then ``population_worker``."""
    return {
        "moments": moments_worker(rank, world_size, offset_shards),
        "population": population_worker(rank, world_size, model, batch_shards),
    }


def sync_training_worker(
    rank: int,
    world_size: int,
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    steps: int,
    per_process: int,
    lr: float,
    parts: Sequence[np.ndarray] = (),
    seed: int = 0,
) -> dict[str, object]:
    """Chapter 9's processes: DistributedDataParallel training, local BN vs bnkit.SyncBatchNorm.

    At step t the global batch is world_size * per_process examples of X (m, 64), y (m,)
    drawn from ``seed + t``; rank r trains on its r-th slice. The same ``model`` is trained
    twice with Adam: as given (every rank's BN normalises its own slice) and converted with
    ``bnkit.convert_sync_batchnorm`` (the global batch). ``parts[rank]`` (n_r, C), if given,
    first goes through a bare bnkit.SyncBatchNorm(C) in float64. Returns {"parts": its output,
    "local"/"sync": {"losses": per step (this rank's slice), "seconds": per step, "state"}}.
    """
    from torch.nn.parallel import DistributedDataParallel

    from bnkit.sync import SyncBatchNorm, convert_sync_batchnorm

    out: dict[str, object] = {}
    if len(parts):
        z = torch.as_tensor(parts[rank])
        out["parts"] = SyncBatchNorm(z.shape[1]).double()(z).detach().numpy()
    for name in ("local", "sync"):
        net = copy.deepcopy(model)
        net = convert_sync_batchnorm(net) if name == "sync" else net
        ddp = DistributedDataParallel(net)
        opt = torch.optim.Adam(ddp.parameters(), lr=lr)
        losses, seconds = [], []
        for t in range(steps):
            rng = np.random.default_rng(seed + t)  # the same global batch on every rank
            order = rng.choice(len(X), world_size * per_process, replace=False)
            mine = order[rank * per_process : (rank + 1) * per_process]  # (per_process,)
            start = time.perf_counter()
            logits = ddp(torch.as_tensor(X[mine]))  # (per_process, 10)
            loss = nn.functional.cross_entropy(logits, torch.as_tensor(y[mine]))
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks
            opt.step()
            seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
        out[name] = {"losses": losses, "seconds": seconds, "state": copy.deepcopy(net.state_dict())}
    return out
