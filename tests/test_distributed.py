"""bnkit.distributed with real processes: gloo on CPU, world sizes 2 and 3.

Starting processes is the slow part (seconds each), so one ``spawn`` per world size runs
every distributed computation at once (``_worker``) and the tests below check its results
against single-process bnkit on the union of the ranks' data.
"""
from __future__ import annotations

import copy
import socket

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnkit import distributed as D
from bnkit.course import parallel as P
import bnkit
from bnkit import running

SPLITS = {2: [(23, 7), (5,)], 3: [(17,), (4, 31, 9), (12, 12)]}  # batch sizes per rank (uneven)
COUNTS = {2: [40, 13], 3: [40, 0, 26]}  # values per rank for all_reduce_stats (one rank empty)
DDP_STEPS, DDP_BATCH, DDP_LR = 6, 8, 0.05


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Linear(6, 4), bnkit.BatchNorm1d(4, momentum=0.3), nn.ReLU(), nn.Linear(4, 3),
    ).double()


def _data(world_size: int) -> dict:
    rng = np.random.default_rng(world_size)
    z = [rng.normal(size=(m, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 1e4] + r for r, m in enumerate(COUNTS[world_size])]
    batches = [[rng.normal(size=(m, 5)) * 2 + 1 + r for m in sizes] for r, sizes in enumerate(SPLITS[world_size])]
    X = rng.normal(size=(30 * world_size, 5)).astype(np.float32)
    y = rng.integers(0, 3, len(X))
    shards = [(X[r::world_size] + r, y[r::world_size]) for r in range(world_size)]  # different per rank
    return {"z": z, "batches": batches, "model": _model(), "shards": shards}


def _ddp(rank: int, model: nn.Module, X: np.ndarray, y: np.ndarray, broadcast_buffers: bool) -> dict:
    """Real DDP on this rank, drawing its batches as train_data_parallel's worker `rank` does."""
    ddp = DistributedDataParallel(copy.deepcopy(model).float().train(), broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    rng = np.random.default_rng(rank)
    for _ in range(DDP_STEPS):
        idx = rng.choice(len(X), size=DDP_BATCH, replace=False)
        loss = nn.functional.cross_entropy(ddp(torch.as_tensor(X[idx])), torch.as_tensor(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in ddp.module.state_dict().items()}


def _worker(rank: int, world_size: int, data: dict) -> dict:
    """Everything the tests need from one rank."""
    out: dict = {}
    z = torch.as_tensor(data["z"][rank])
    stats = running.batch_stats(z) if len(z) else running.BatchStats(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    out["stats"] = D.all_reduce_stats(stats)
    out["stats_numpy"] = D.all_reduce_stats(running.BatchStats(stats.count, stats.mean.numpy(), stats.m2.numpy()))
    out["naive"] = D.naive_all_reduce_moments(z[:, :2])  # every rank takes part, even an empty one
    for estimator, upstream in [("exact", "train"), ("exact", "eval"), ("algorithm2", "train")]:
        model = copy.deepcopy(data["model"]).train()
        batches = [torch.as_tensor(b) for b in data["batches"][rank]]
        returned = D.recompute_stats_distributed(model, batches, estimator, upstream)
        out[estimator, upstream] = (returned, model.state_dict(), model.training)
    try:
        D.recompute_stats_distributed(copy.deepcopy(data["model"]), [] if rank == 1 else data["batches"][rank])
    except ValueError as e:
        out["no_batches"] = str(e)
    try:
        D.all_reduce_stats(running.BatchStats(1, torch.zeros(3 + rank), torch.zeros(3 + rank)))
    except ValueError as e:
        out["sizes"] = str(e)
    X, y = data["shards"][rank]
    for bb in (False, True):
        out["ddp", bb] = _ddp(rank, data["model"], X, y, bb)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world_size={w}")
def run(request):
    world_size = request.param
    data = _data(world_size)
    return world_size, data, D.spawn(_worker, world_size, data, timeout=120)


def test_all_reduce_stats_is_the_exact_merge(run):
    world_size, data, results = run
    union = np.concatenate(data["z"])
    per_rank = [running.batch_stats(z) for z in data["z"] if len(z)]
    expected = running.merge_all(per_rank)
    for r in results:
        for got in (r["stats"], r["stats_numpy"]):
            assert got.count == len(union)
            np.testing.assert_allclose(np.asarray(got.mean), expected.mean, rtol=1e-14)
            np.testing.assert_allclose(np.asarray(got.m2), expected.m2, rtol=1e-10)  # NumPy vs torch sums
            mean, var = running.finalize(got)
            np.testing.assert_allclose(np.asarray(mean), union.mean(0), rtol=1e-13)
            np.testing.assert_allclose(np.asarray(var), union.var(0, ddof=1), rtol=1e-10)
        assert isinstance(r["stats"].mean, torch.Tensor) and isinstance(r["stats_numpy"].mean, np.ndarray)
        assert torch.equal(r["stats"].m2, results[0]["stats"].m2)  # bit-for-bit the same on every rank


def test_naive_moments_agree_in_float64_on_benign_data(run):
    _, data, results = run
    union = np.concatenate(data["z"])[:, :2]
    count, mean, var = results[-1]["naive"]
    assert count == len(union)
    np.testing.assert_allclose(mean.numpy(), union.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), union.var(0, ddof=1), rtol=1e-9)


@pytest.mark.parametrize("estimator, upstream", [("exact", "train"), ("exact", "eval"), ("algorithm2", "train")])
def test_recompute_stats_distributed_equals_single_process_on_the_union(run, estimator, upstream):
    _, data, results = run
    model = copy.deepcopy(data["model"]).train()
    union = [torch.as_tensor(b) for rank in data["batches"] for b in rank]
    expected = bnkit.recompute_stats(model, union, estimator, upstream)
    for r in results:
        returned, state, training = r[estimator, upstream]
        assert training and returned.keys() == expected.keys()
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(returned[name][0], mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(returned[name][1], var, rtol=1e-12, atol=1e-12)
            assert torch.equal(state[f"{name}.running_var"], results[0][estimator, upstream][1][f"{name}.running_var"])
        for key, value in model.state_dict().items():  # parameters, num_batches_tracked untouched
            if "running" not in key:
                assert torch.equal(state[key], value), key


def test_errors_are_raised_on_every_rank(run):
    _, _, results = run
    assert all("at least one batch" in r["no_batches"] for r in results)
    assert all("same number of features" in r["sizes"] for r in results)


@pytest.mark.parametrize("broadcast_buffers", [False, True])
def test_simulated_data_parallel_matches_real_ddp(run, broadcast_buffers):
    world_size, data, results = run
    replicas, history = P.train_data_parallel(
        copy.deepcopy(data["model"]).float(), data["shards"], DDP_STEPS, DDP_BATCH, DDP_LR, broadcast_buffers, seed=0
    )
    for rank, (r, replica) in enumerate(zip(results, replicas)):
        for key, value in replica.state_dict().items():
            torch.testing.assert_close(r["ddp", broadcast_buffers][key], value, rtol=1e-4, atol=1e-5, msg=key)
    means = [h[-1]["1.running_mean"] for h in history]
    assert not torch.allclose(means[0], means[1])  # the workers' buffers differ, even when
    # broadcast: each worker's last update (after the broadcast) used its own batch


def test_spawn_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="rank 0 failed: ValueError: estimator must be"):
        D.spawn(P.population_worker, 1, nn.Linear(2, 2), [[np.zeros((4, 2))]], "wrong estimator", timeout=60)


def test_train_data_parallel_keeps_weights_identical():
    data = _data(2)
    replicas, _ = P.train_data_parallel(data["model"].float(), data["shards"], 3, 8, 0.05)  # (a fresh model)
    for p, q in zip(replicas[0].parameters(), replicas[1].parameters()):
        assert torch.equal(p, q)


def test_spawn_tries_again_when_the_port_is_taken(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = iter([busy.getsockname()[1]])  # the first "free" port is taken
        free = D._free_port
        monkeypatch.setattr(D, "_free_port", lambda: next(ports, None) or free())
        z = np.arange(6.0).reshape(3, 2).astype(np.float32)
        (result,) = D.spawn(P.moments_worker, 1, [z], timeout=60)
    assert result["exact"][0] == 3


def test_spawn_gives_each_process_its_own_copy_of_its_arguments():
    """torch.multiprocessing hands tensors to the children through shared memory; spawn copies
    them, or every rank (and the caller) would write the same Batch Norm buffers."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = D.spawn(P.population_worker, 2, model, _data(2)["batches"], timeout=60)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"a rank changed the caller's {k}"
    for name in results[0]:  # and the ranks agree with each other
        assert all(np.array_equal(r[name][1], results[0][name][1]) for r in results)
