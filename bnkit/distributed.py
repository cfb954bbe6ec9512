"""Batch Norm statistics across processes: exact merging with ``torch.distributed``.

Each process (rank) sees part of the data. Per feature, its (count, mean, M2) merge exactly
into the statistics of the union with Chan et al.'s formula (``bnkit.running.merge``):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,   M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

- ``all_reduce_stats``: that merge across all ranks, in float64; every rank gets the same result.
- ``naive_all_reduce_moments``: the textbook all-reduce of (n, sum x, sum x^2) in the input's
  dtype, Var = E[x^2] - E[x]^2: it cancels in float32 (kept to show why not to use it).
- ``recompute_stats_distributed``: ``bnkit.recompute_stats`` for data split across ranks.
- ``spawn``: run a function in ``world_size`` local processes joined by the gloo backend (CPU).
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
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bnkit import population, running
from bnkit._validate import all_finite, feature_axes
from bnkit.running import BatchStats

# ---------------------------------------------------------------- merging across ranks


def comm_device(group=None, device: torch.device | None = None) -> torch.device:
    """Where the group's collectives run: the CPU for gloo and MPI; otherwise ``device`` (the
    tensors' own, for NCCL and other accelerator backends), by default the current CUDA
    device for NCCL and the CPU for any other backend."""
    backend = dist.get_backend(group)
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if device is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


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
    comm = comm_device(group)  # NCCL needs CUDA tensors, gloo takes CPU ones
    mean = torch.as_tensor(stats.mean).detach().to(comm, torch.float64).reshape(-1)  # (n,)
    m2 = torch.as_tensor(stats.m2).detach().to(comm, torch.float64).reshape(-1)  # (n,)
    if mean.shape != m2.shape:
        raise ValueError(f"mean and m2 must have the same shape, got {tuple(mean.shape)} and {tuple(m2.shape)}")
    size = torch.tensor([mean.numel()], dtype=torch.int64, device=comm)
    sizes = _gather(size, group)  # one number per rank
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must have the same number of features, got {[int(s) for s in sizes]}")
    count = torch.tensor([float(stats.count)], dtype=torch.float64, device=comm)
    packed = torch.cat([count, mean, m2])  # (2n + 1,)
    n = mean.numel()
    per_rank = [BatchStats(int(p[0]), p[1 : n + 1], p[n + 1 :]) for p in _gather(packed, group)]
    if all(s.count == 0 for s in per_rank):  # no values anywhere (a layer never reached)
        total = BatchStats(0, torch.zeros_like(mean), torch.zeros_like(m2))
    else:
        total = running.merge_all(per_rank)
    if is_tensor:
        return BatchStats(total.count, total.mean.to(device), total.m2.to(device))
    return BatchStats(total.count, total.mean.cpu().numpy(), total.m2.cpu().numpy())


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
    packed = packed.to(comm_device(group))
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    count, sum_z, sum_z2 = packed.to(z.device)
    mean = sum_z / count
    var = (sum_z2 - count * mean * mean) / (count - 1)
    return int(count[0].item()), mean, var


# ---------------------------------------------------------------- population statistics


def _estimate_across(group) -> Callable:
    """The estimate step of recompute_stats, with every rank's batches merged in."""

    def estimate(per_batch: list[BatchStats], estimator: str, bn: nn.Module):
        device = bn.running_mean.device
        none = torch.zeros(bn.num_features, dtype=torch.float64, device=device)  # no batch here
        if estimator == "exact":  # merge locally, then across ranks: O(n) numbers per rank
            local = running.merge_all(per_batch) if per_batch else BatchStats(0, none, none)
            total = all_reduce_stats(local, group)
            if total.count == 0:  # no rank reached this layer
                return None
            mean, var = running.finalize(total)
        else:  # "algorithm2": the average over all batches of all ranks of mu_B and unbiased var_B
            sums = [
                torch.full_like(none, float(len(per_batch))),
                sum((s.mean for s in per_batch), none),
                sum((running.unbiased(s.m2 / s.count, s.count) for s in per_batch), none),
            ]
            local = torch.stack(sums).to(comm_device(group))  # (3, n) float64
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
            if local[0, 0] == 0:
                return None
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
    *,
    forward: Callable | None = None,
    max_batches: int | None = None,
    progress=False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``bnkit.recompute_stats`` for data split across the ranks of a process group.

    Every rank calls it with the same model (same weights) and its own ``batches`` (at least
    one; the split may be uneven). Each rank collects its per-batch (count, mean, M2) per BN
    layer; the statistics are merged across ranks (``all_reduce_stats`` for "exact"; sums of
    batch means and variances for "algorithm2"), and every rank writes the same statistics:
    those ``recompute_stats`` gives on the union of all ranks' batches, up to round-off.
    upstream "eval" merges layer by layer, upstream first, so each layer sees upstream layers
    that already use the merged statistics. forward, max_batches (per rank) and progress are
    ``recompute_stats``'s. Returns {layer name: (mean, var)} as written.

    Any process group works: gloo (CPU tensors) or NCCL (the collectives run on the current
    CUDA device, ``torch.cuda.set_device`` first). Launched with
    ``torchrun --nproc-per-node=4 precise_bn.py``, where precise_bn.py holds::

        import os, torch, torch.distributed as dist
        from bnkit.distributed import recompute_stats_distributed

        dist.init_process_group("nccl")  # "gloo" on CPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        model = build_model().cuda()  # the same weights on every rank
        sampler = torch.utils.data.DistributedSampler(train_set, shuffle=False)
        loader = torch.utils.data.DataLoader(train_set, batch_size=256, sampler=sampler)
        recompute_stats_distributed(model, loader)  # every rank writes the same statistics
        dist.destroy_process_group()
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("recompute_stats_distributed needs torch.distributed initialised (see spawn)")
    if iter(batches) is batches:  # a one-shot iterator: keep the batches for more than one pass
        batches = list(batches)
    has_batches = torch.tensor([1 if any(True for _ in batches) else 0], device=comm_device(group))
    dist.all_reduce(has_batches, op=dist.ReduceOp.MIN, group=group)  # every rank decides alike
    if int(has_batches) == 0:
        raise ValueError("every rank needs at least one batch for recompute_stats_distributed")
    return population._recompute(model, batches, estimator, upstream, _estimate_across(group),
                                 forward=forward, max_batches=max_batches, progress=progress)


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
