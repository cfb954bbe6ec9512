"""Batch Norm statistics across processes: exact merging with ``torch.distributed``.

Each process (rank) sees part of the data. Per feature, its (count, mean, M2) merge exactly
into the statistics of the union with Chan et al.'s formula (``bnkit.running.merge``):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,   M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

- ``all_reduce_stats``: that merge across all ranks, in float64; every rank gets the same result.
- ``naive_all_reduce_moments``: the textbook all-reduce of (n, sum x, sum x^2) in the input's
  dtype, Var = E[x^2] - E[x]^2: it cancels in float32 (kept to show why not to use it).
- ``recompute_stats_distributed``: ``torch_bn.recompute_stats`` for data split across ranks.
- ``train_data_parallel``: data-parallel training simulated in one process, each worker
  keeping its own BN buffers (DDP without SyncBatchNorm).
- ``spawn``: run a function in ``world_size`` local processes joined by the gloo backend (CPU).

The ``*_worker`` functions are what the chapter runs in those processes (``spawn`` needs
functions that a fresh interpreter can import).
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bnkit import running, torch_bn
from bnkit._validate import all_finite, feature_axes
from bnkit.running import BatchStats

# ---------------------------------------------------------------- merging across ranks


def _gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape on every rank), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def all_reduce_stats(stats: BatchStats, group=None) -> BatchStats:
    """Merge every rank's (count, mean, M2) exactly, in float64; all ranks get the same result.

    stats: this rank's BatchStats, mean and m2 of shape (n,) (NumPy arrays or tensors on any
    device; the same n on every rank; count may be 0). Each rank's (count, mean, M2) is
    all-gathered as 2n + 1 float64 numbers and merged in rank order with ``running.merge``,
    so every rank computes bit-for-bit the same result. Returns the merged BatchStats with
    mean and m2 of the input's kind (tensor on the input's device, or NumPy), float64.
    """
    is_tensor = isinstance(stats.mean, torch.Tensor)
    device = stats.mean.device if is_tensor else None
    mean = torch.as_tensor(stats.mean, dtype=torch.float64).detach().cpu().reshape(-1)  # (n,)
    m2 = torch.as_tensor(stats.m2, dtype=torch.float64).detach().cpu().reshape(-1)  # (n,)
    if mean.shape != m2.shape:
        raise ValueError(f"mean and m2 must have the same shape, got {tuple(mean.shape)} and {tuple(m2.shape)}")
    sizes = _gather(torch.tensor([mean.numel()], dtype=torch.int64), group)  # one number per rank
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must have the same number of features, got {[int(s) for s in sizes]}")
    packed = torch.cat([torch.tensor([float(stats.count)], dtype=torch.float64), mean, m2])  # (2n + 1,)
    n = mean.numel()
    per_rank = [BatchStats(int(p[0]), p[1 : n + 1], p[n + 1 :]) for p in _gather(packed, group)]
    total = running.merge_all(per_rank)
    if is_tensor:
        return BatchStats(total.count, total.mean.to(device), total.m2.to(device))
    return BatchStats(total.count, total.mean.numpy(), total.m2.numpy())


def naive_all_reduce_moments(z: torch.Tensor, group=None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The textbook way, for comparison only: all-reduce (n, sum z, sum z^2) in z's dtype.

    z: this rank's values, (m, n) or (m, C, H, W). Returns (count, mean, var), mean and var
    of shape (n,) in z's dtype, var = (sum z^2 - n mean^2) / (n - 1), the unbiased variance.
    Algebraically right, numerically not: for values far from 0 the two terms are huge and
    nearly equal, and in float32 their difference can be garbage, even negative.
    """
    axes = feature_axes(z.ndim)
    local_count = z.numel() // z.shape[1]
    packed = torch.stack([torch.full_like(z.sum(axes), local_count), z.sum(axes), (z * z).sum(axes)])  # (3, n)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    count, sum_z, sum_z2 = packed
    mean = sum_z / count
    var = (sum_z2 - count * mean * mean) / (count - 1)
    return int(count[0].item()), mean, var


# ---------------------------------------------------------------- population statistics


def _estimate_across(group) -> Callable:
    """The estimate step of recompute_stats, with every rank's batches merged in."""

    def estimate(per_batch: list[BatchStats], estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
        device = per_batch[0].mean.device
        if estimator == "exact":  # merge locally, then across ranks: O(n) numbers per rank
            mean, var = running.finalize(all_reduce_stats(running.merge_all(per_batch), group))
        else:  # "algorithm2": the average over all batches of all ranks of mu_B and unbiased var_B
            local = torch.stack(
                [
                    torch.full_like(per_batch[0].mean, float(len(per_batch))),
                    torch.stack([s.mean for s in per_batch]).sum(0),
                    torch.stack([running.unbiased(s.m2 / s.count, s.count) for s in per_batch]).sum(0),
                ]
            ).cpu()  # (3, n) float64
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
            mean, var = (local[1] / local[0]).to(device), (local[2] / local[0]).to(device)
        if not (all_finite(mean) and all_finite(var)):  # after the merge: every rank raises
            raise ValueError("the batches contain NaN or infinite values (non-finite layer statistics)")
        return mean, var

    return estimate


def recompute_stats_distributed(
    model: nn.Module,
    batches: Iterable,
    estimator: str = "exact",
    upstream: str = "train",
    group=None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``torch_bn.recompute_stats`` for data split across the ranks of a process group.

    Every rank calls it with the same model (same weights) and its own ``batches`` (at least
    one; the split may be uneven). Each rank collects its per-batch (count, mean, M2) per BN
    layer; the statistics are merged across ranks (``all_reduce_stats`` for "exact"; sums of
    batch means and variances for "algorithm2"), and every rank writes the same statistics:
    those ``recompute_stats`` gives on the union of all ranks' batches, up to round-off.
    upstream "eval" merges layer by layer, upstream first, so each layer sees upstream layers
    that already use the merged statistics. Returns {layer name: (mean, var)} as written.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("recompute_stats_distributed needs torch.distributed initialised (see spawn)")
    if iter(batches) is batches:  # a one-shot iterator: keep the batches for more than one pass
        batches = list(batches)
    has_batches = torch.tensor([1 if any(True for _ in batches) else 0])
    dist.all_reduce(has_batches, op=dist.ReduceOp.MIN, group=group)  # every rank decides alike
    if int(has_batches) == 0:
        raise ValueError("every rank needs at least one batch for recompute_stats_distributed")
    return torch_bn._recompute(model, batches, estimator, upstream, _estimate_across(group))


# ---------------------------------------------------------------- data parallelism, simulated


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


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, tmp: str, args: tuple, timeout: float) -> None:
    """One process: quiet output, 1 thread, join the gloo group, run fn, write its result."""
    log = os.open(os.path.join(tmp, f"{rank}.log"), os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1), os.dup2(log, 2)  # children's output must not reach the notebook
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
    except Exception as e:  # e.g. the port was taken in the meantime: the parent tries again
        _write(tmp, rank, ("init", f"{type(e).__name__}: {e}"))
        os._exit(1)
    # torch.multiprocessing passes tensors (a model's parameters and buffers too) through shared
    # memory, not as copies: without this, every rank and the parent would write the same BN buffers
    args = copy.deepcopy(args)
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except Exception as e:  # reported by the parent, with the traceback
        _write(tmp, rank, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        os._exit(1)  # the parent sees the exit and stops the ranks still waiting for this one
    dist.destroy_process_group()
    _write(tmp, rank, result)


def _write(tmp: str, rank: int, result: tuple) -> None:
    path = os.path.join(tmp, f"{rank}.pkl")
    with open(path + ".part", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".part", path)  # complete or absent


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, attempts: int = 3) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes; return the results.

    The processes join one gloo process group on 127.0.0.1 (a free port), use one thread each,
    and leave the group when ``fn`` returns. ``fn`` must be importable (defined in a module,
    not in a notebook); args and results must be picklable. Each process gets its own copy of
    args (tensors included), so nothing a rank changes reaches another rank or the caller. Returns [result of rank 0, ...].
    If the group cannot be formed (say, another program took the port), it tries again with a
    new port, up to ``attempts`` times. Raises RuntimeError if a rank fails (with its
    traceback) or if ``timeout`` seconds pass, after stopping every process.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    for attempt in range(1, attempts + 1):
        try:
            return _spawn_once(fn, world_size, args, timeout)
        except _InitError as e:
            if attempt == attempts:
                raise RuntimeError(f"spawn: no process group after {attempts} attempts: {e}") from None
    raise AssertionError("unreachable")


class _InitError(Exception):
    """A rank could not join the process group."""


def _spawn_once(fn: Callable, world_size: int, args: tuple, timeout: float) -> list:
    logger = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process ..." warnings:
    level, logger.level = logger.level, logging.ERROR  # the error raised here says what happened
    try:
        return _run(fn, world_size, args, timeout)
    finally:
        logger.setLevel(level)


def _run(fn: Callable, world_size: int, args: tuple, timeout: float) -> list:
    with tempfile.TemporaryDirectory(prefix="bnkit-dist-") as tmp:
        context = torch.multiprocessing.start_processes(
            _entry,
            args=(fn, world_size, _free_port(), tmp, args, timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.05):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"spawn: the {world_size} processes did not finish within {timeout} s")
        except Exception as e:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            for p in context.processes:
                p.join(5)
            results = _results(tmp, world_size)
            failed = [(r, v) for r, (status, v) in results if status == "error"]
            if failed:
                raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}") from None
            init = [(r, v) for r, (status, v) in results if status == "init"]
            if init:
                raise _InitError(f"rank {init[0][0]}: {init[0][1]}") from None
            logs = "".join(_read(os.path.join(tmp, f"{r}.log"), r) for r in range(world_size))
            raise RuntimeError(f"{e}\n{logs}") from None
        return [value for _, (_, value) in _results(tmp, world_size)]


def _results(tmp: str, world_size: int) -> list[tuple[int, tuple]]:
    """(rank, (status, value)) for every rank that wrote a result."""
    out = []
    for rank in range(world_size):
        path = os.path.join(tmp, f"{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                out.append((rank, pickle.load(f)))
    return out


def _read(path: str, rank: int) -> str:
    try:
        with open(path) as f:
            text = f.read()[-2000:]
    except OSError:
        return ""
    return f"--- rank {rank} output ---\n{text}" if text else ""


# ---------------------------------------------------------------- what the chapter runs in each process


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
