"""bnkit.SyncBatchNorm with real processes (gloo on CPU, world sizes 2 and 3), against Batch
Norm in one process on the concatenated global batch, in float64.

Starting processes is the slow part, so one ``spawn`` per world size runs every check
(``_worker``) and the tests compare its results. Each rank counts the collectives it makes.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnkit
from bnkit import distributed as D
from bnkit.sync import SyncBatchNorm, convert_sync_batchnorm

# per case: the parts of the global batch, per step (3 steps), one size per rank
PARTS = {
    2: {"equal": [4, 4], "uneven": [7, 2], "empty": [0, 6]},
    3: {"equal": [3, 3, 3], "uneven": [1, 8, 4], "empty": [5, 0, 2]},
}
SHAPES = {"equal": (5,), "uneven": (3, 4), "empty": (2, 3, 2)}  # input (m, *shape): 1d, (C, L), 2d
STEPS, MOMENTUM = 3, 0.3
ESTIMATORS = {"equal": ("ema", MOMENTUM), "uneven": ("cumulative", None), "empty": ("ema_debiased", 0.2)}
DDP_PARTS = {2: [6, 3], 3: [4, 0, 5]}
DDP_STEPS, DDP_LR = 4, 0.1
RECOMPUTE_BATCHES = {2: [3, 1], 3: [2, 1, 3]}  # batches per rank: uneven, so the ranks' passes
# are not in step (a SyncBatchNorm that synchronised there would hang or mix batches)


def _case(world_size: int, case: str) -> dict:
    """The global batches and upstream gradients of every step, and the layer's parameters."""
    rng = np.random.default_rng([world_size, len(case)])
    n = sum(PARTS[world_size][case])
    shape = SHAPES[case]
    return {
        "z": [rng.normal(size=(n, *shape)) * 3 + rng.normal(size=(1, shape[0]) + (1,) * (len(shape) - 1)) * 5
              for _ in range(STEPS)],
        "dy": [rng.normal(size=(n, *shape)) for _ in range(STEPS)],
        "gamma": rng.normal(size=shape[0]) + 1,
        "beta": rng.normal(size=shape[0]),
    }


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5, bias=False), nn.ReLU(), nn.Linear(5, 4),
        bnkit.BatchNorm1d(4, momentum=0.3, estimator="cumulative"), nn.ReLU(), nn.Linear(4, 3),
    ).double()


def _ddp_data(world_size: int) -> dict:
    rng = np.random.default_rng(world_size)
    n = sum(DDP_PARTS[world_size])
    return {"X": [rng.normal(size=(n, 6)) * 2 + 1 for _ in range(DDP_STEPS)],
            "y": [rng.integers(0, 3, n) for _ in range(DDP_STEPS)],
            "batches": [[rng.normal(size=(5 + k, 6)) + r for k in range(b)]
                        for r, b in enumerate(RECOMPUTE_BATCHES[world_size])]}


def _mine(global_batch: np.ndarray, parts: list[int], rank: int) -> torch.Tensor:
    start = sum(parts[:rank])
    return torch.as_tensor(global_batch[start : start + parts[rank]])


class _Counter:
    """Counts the collectives this process makes (all_gather, all_reduce, broadcast, ...)."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter", "broadcast")

    def __init__(self):
        self.calls = 0
        for name in self.NAMES:
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _run_case(
    rank: int, world_size: int, case: str, data: dict, counter: _Counter, device: str = "cpu"
) -> dict:
    """SyncBatchNorm on this rank's parts, STEPS training steps, then eval; results on CPU."""
    parts = PARTS[world_size][case]
    estimator, momentum = ESTIMATORS[case]
    bn = SyncBatchNorm(SHAPES[case][0], momentum=momentum, estimator=estimator).double().to(device)
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(data["gamma"]))
        bn.bias.copy_(torch.as_tensor(data["beta"]))
    out: dict = {"y": [], "dz": [], "dgamma": [], "dbeta": [], "collectives": []}
    for z, dy in zip(data["z"], data["dy"]):
        z = _mine(z, parts, rank).to(device).requires_grad_()
        counter.take()
        y = bn(z)
        forward = counter.take()
        y.backward(_mine(dy, parts, rank).to(device))
        out["collectives"].append((forward, counter.take()))
        out["y"].append(y.detach().cpu())
        out["dz"].append(z.grad.cpu())
        out["dgamma"].append(bn.weight.grad.cpu())
        out["dbeta"].append(bn.bias.grad.cpu())
        bn.weight.grad = bn.bias.grad = None
    out["state"] = {k: v.cpu() for k, v in bn.state_dict().items()}
    bn.eval()  # test time: the running statistics, no communication
    z = _mine(data["z"][0], parts, rank).to(device)
    out["eval"] = (bn(z).cpu(), counter.take())
    return out


def _refusals(rank: int, world_size: int, counter: _Counter) -> dict:
    """Batches refused on one rank: every rank must raise, with its buffers unchanged."""
    bn = SyncBatchNorm(3).double()
    bn(torch.randn(4, 3, dtype=torch.float64))  # one good step first
    before = copy.deepcopy(bn.state_dict())
    bad = {
        "nan": [torch.full((4, 3), float("nan")) if r == 1 else torch.ones(4, 3) for r in range(world_size)],
        "channels": [torch.ones(4, 2) if r == 1 else torch.ones(4, 3) for r in range(world_size)],
        "dims": [torch.ones(3) if r == 1 else torch.ones(4, 3) for r in range(world_size)],
        "one value": [torch.ones(1, 3) if r == 0 else torch.ones(0, 3) for r in range(world_size)],
    }
    out: dict = {}
    for name, inputs in bad.items():
        counter.take()
        try:
            bn(inputs[rank].double())
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
        out[name, "collectives"] = counter.take()
        out[name, "unchanged"] = all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    # the group is still in step: a good batch afterwards is synchronised
    y = bn(torch.full((2, 3), float(rank), dtype=torch.float64))
    out["after"] = y.detach()
    return out


def _ddp(rank: int, world_size: int, data: dict) -> dict:
    """Real DDP over SyncBatchNorm (converted from torch's and bnkit's BN), loss = mean over the
    global batch: each rank's part of the sum times world_size / N, as DDP averages."""
    parts = DDP_PARTS[world_size]
    model = convert_sync_batchnorm(_ddp_model())
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    n = sum(parts)
    for X, y in zip(data["X"], data["y"]):
        logits = ddp(_mine(X, parts, rank))
        loss = nn.functional.cross_entropy(logits, _mine(y, parts, rank), reduction="sum") * world_size / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {"state": copy.deepcopy(model.state_dict()), "types": [type(m).__name__ for m in model]}
    for upstream in ("train", "eval"):  # population statistics of a SyncBatchNorm model
        batches = [torch.as_tensor(b) for b in data["batches"][rank]]
        model = convert_sync_batchnorm(_ddp_model())
        out["recompute", upstream] = D.recompute_stats_distributed(model, batches, upstream=upstream)
    return out


def _subgroup(rank: int, world_size: int, counter: _Counter) -> dict:
    """process_group: ranks 0 and 1 share their batches, the others do not; a one-rank group is
    plain Batch Norm, with no communication."""
    pair = dist.new_group([0, 1])
    alone = [dist.new_group([r]) for r in range(world_size)]  # every rank must create every group
    z = torch.arange(12, dtype=torch.float64).reshape(4, 3) * (rank + 1) ** 2
    out = {}
    if rank < 2:
        out["pair"] = SyncBatchNorm(3, process_group=pair).double()(z).detach()
    counter.take()
    out["alone"] = (SyncBatchNorm(3, process_group=alone[rank]).double()(z).detach(), counter.take())
    return out


def _worker(rank: int, world_size: int, cases: dict, ddp_data: dict) -> dict:
    counter = _Counter()
    out = {case: _run_case(rank, world_size, case, data, counter) for case, data in cases.items()}
    out["refusals"] = _refusals(rank, world_size, counter)
    out["ddp"] = _ddp(rank, world_size, ddp_data)
    out["subgroup"] = _subgroup(rank, world_size, counter)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world_size={w}")
def run(request):
    world_size = request.param
    cases = {case: _case(world_size, case) for case in PARTS[world_size]}
    ddp_data = _ddp_data(world_size)
    return world_size, cases, ddp_data, D.spawn(_worker, world_size, cases, ddp_data, timeout=120)


def _reference(world_size: int, case: str, data: dict) -> dict:
    """bnkit's BatchNorm (same estimator) in one process on the whole global batch, float64."""
    estimator, momentum = ESTIMATORS[case]
    cls = bnkit.BatchNorm2d if len(SHAPES[case]) == 3 else bnkit.BatchNorm1d
    bn = cls(SHAPES[case][0], momentum=momentum, estimator=estimator).double()
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(data["gamma"]))
        bn.bias.copy_(torch.as_tensor(data["beta"]))
    out: dict = {"y": [], "dz": [], "dgamma": [], "dbeta": []}
    for z, dy in zip(data["z"], data["dy"]):
        z = torch.as_tensor(z).requires_grad_()
        y = bn(z)
        y.backward(torch.as_tensor(dy))
        out["y"].append(y.detach())
        out["dz"].append(z.grad)
        out["dgamma"].append(bn.weight.grad.clone())
        out["dbeta"].append(bn.bias.grad.clone())
        bn.weight.grad = bn.bias.grad = None
    out["state"] = bn.state_dict()
    return out


@pytest.mark.parametrize("case", ["equal", "uneven", "empty"])
def test_outputs_and_gradients_equal_batch_norm_on_the_global_batch(run, case):
    world_size, cases, _, results = run
    data, parts = cases[case], PARTS[world_size][case]
    ref = _reference(world_size, case, data)
    for step in range(STEPS):
        y = torch.cat([r[case]["y"][step] for r in results])
        dz = torch.cat([r[case]["dz"][step] for r in results])
        assert [len(r[case]["y"][step]) for r in results] == parts
        torch.testing.assert_close(y, ref["y"][step], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dz, ref["dz"][step], rtol=1e-12, atol=1e-12)
        for key in ("dgamma", "dbeta"):  # local on each rank; DDP adds them up
            total = sum(r[case][key][step] for r in results)
            torch.testing.assert_close(total, ref[key][step], rtol=1e-12, atol=1e-12)
        if case != "empty":  # every rank's own share differs from the total
            assert not torch.allclose(results[0][case]["dgamma"][step], ref["dgamma"][step])


@pytest.mark.parametrize("case", ["equal", "uneven", "empty"])
def test_running_buffers_follow_the_global_batch(run, case):
    world_size, cases, _, results = run
    expected = _reference(world_size, case, cases[case])["state"]
    for r in results:
        state = r[case]["state"]
        assert state.keys() == expected.keys()
        assert int(state["num_batches_tracked"]) == STEPS
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(state[key], expected[key], rtol=1e-12, atol=1e-12)
            assert torch.equal(state[key], results[0][case]["state"][key])  # the same bits everywhere


@pytest.mark.parametrize("case", ["equal", "uneven", "empty"])
def test_one_collective_forward_one_backward_none_in_eval(run, case):
    world_size, cases, _, results = run
    parts = PARTS[world_size][case]
    for rank, r in enumerate(results):
        assert r[case]["collectives"] == [(1, 1)] * STEPS
        y, calls = r[case]["eval"]
        assert calls == 0
        state = r[case]["state"]  # test time: the rank's own buffers
        z = _mine(cases[case]["z"][0], parts, rank)
        expected = nn.functional.batch_norm(
            z, state["running_mean"], state["running_var"], state["weight"], state["bias"], False,
            0.0, SyncBatchNorm(1).eps)
        torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)


def test_a_refused_batch_raises_on_every_rank(run):
    world_size, _, _, results = run
    messages = {"nan": "NaN", "channels": "features/channels", "dims": "2D", "one value": "more than one"}
    for rank, r in enumerate(results):
        out = r["refusals"]
        for name, words in messages.items():
            assert out[name] is not None, f"rank {rank} did not raise for {name}"
            refused_here = (name in ("channels", "dims") and rank == 1) or name in ("nan", "one value")
            assert (words if refused_here else "rank 1 refused its batch") in out[name], (name, out[name])
            assert out[name, "unchanged"], f"rank {rank}: buffers changed by a refused batch ({name})"
            assert out[name, "collectives"] == 1  # the check rides on the statistics' gather
    # afterwards the group is in step: rank r's rows (2, 3) hold r, global mean (K-1)/2
    y = torch.cat([r["refusals"]["after"] for r in results])
    values = torch.arange(world_size, dtype=torch.float64).repeat_interleave(2)[:, None]
    expected = (values - values.mean()) / torch.sqrt(values.var(unbiased=False) + 1e-5)
    torch.testing.assert_close(y, expected.expand(-1, 3), rtol=1e-12, atol=1e-12)


def test_inside_ddp_equals_one_process_on_the_global_batch(run):
    world_size, _, data, results = run
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for X, y in zip(data["X"], data["y"]):
        loss = nn.functional.cross_entropy(model(torch.as_tensor(X)), torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r in results:
        assert r["ddp"]["types"].count("SyncBatchNorm") == 2
        for key, value in model.state_dict().items():
            torch.testing.assert_close(r["ddp"]["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("upstream", ["train", "eval"])
def test_population_statistics_of_a_sync_model_across_processes(run, upstream):
    world_size, _, data, results = run
    union = [torch.as_tensor(b) for rank in data["batches"] for b in rank]
    expected = bnkit.recompute_stats(_ddp_model(), union, upstream=upstream)
    for r in results:
        got = r["ddp"]["recompute", upstream]
        assert got.keys() == expected.keys()
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(got[name][0], mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[name][1], var, rtol=1e-12, atol=1e-12)


def test_process_group_limits_synchronisation(run):
    world_size, _, _, results = run
    zs = [torch.arange(12, dtype=torch.float64).reshape(4, 3) * (r + 1) ** 2 for r in range(world_size)]
    bn = nn.BatchNorm1d(3).double()
    pair = bn(torch.cat(zs[:2])).detach()
    torch.testing.assert_close(torch.cat([r["subgroup"]["pair"] for r in results[:2]]), pair)
    for z, r in zip(zs, results):
        y, calls = r["subgroup"]["alone"]
        assert calls == 0
        torch.testing.assert_close(y, nn.BatchNorm1d(3).double()(z).detach())


# ---------------------------------------------------------------- in one process


def test_without_a_group_it_is_bnkit_batch_norm():
    torch.manual_seed(0)
    z = torch.randn(6, 4, 5, dtype=torch.float64) * 2 + 1
    sync = SyncBatchNorm(4, estimator="cumulative").double()
    plain = bnkit.BatchNorm1d(4, estimator="cumulative").double()
    for module in (sync, plain):
        module.load_state_dict(plain.state_dict())
    for _ in range(2):
        torch.testing.assert_close(sync(z), plain(z), rtol=0, atol=0)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in sync.state_dict().items())
    with pytest.raises(ValueError, match="more than one value"):
        sync(torch.randn(1, 4))


def test_state_dict_loads_both_ways_with_torch_sync_batch_norm():
    ours = SyncBatchNorm(4, momentum=0.2)
    ours(torch.randn(8, 4) * 3 + 2)  # buffers and num_batches_tracked away from their defaults
    with torch.no_grad():
        ours.weight.uniform_(), ours.bias.uniform_()
    theirs = nn.SyncBatchNorm(4, momentum=0.2)
    theirs.load_state_dict(ours.state_dict())
    back = SyncBatchNorm(4, momentum=0.2)
    back.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == list(back.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value) and torch.equal(back.state_dict()[key], value)
    z = torch.randn(5, 4)
    torch.testing.assert_close(ours.eval()(z), theirs.eval()(z))  # the same test-time network


def test_constructor_matches_torch_sync_batch_norm():
    import inspect

    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    positional = [name for name, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert list(ours)[: len(positional)] == positional  # the same order
    assert set(ours) - set(theirs) == {"estimator"}
    assert all(ours[name].default == p.default for name, p in theirs.items())
    group = object()
    assert SyncBatchNorm(3, 1e-3, 0.2, False, False, group).process_group is group
    no_shift = SyncBatchNorm(3, bias=False)
    assert no_shift.bias is None
    assert list(no_shift.state_dict()) == list(nn.SyncBatchNorm(3, bias=False).state_dict())
    with pytest.raises(ValueError, match="estimator"):
        SyncBatchNorm(3, estimator="median")


def test_convert_sync_batchnorm_keeps_parameters_and_buffers():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None),
        nn.Sequential(nn.Conv2d(4, 2, 1), bnkit.BatchNorm2d(2, eps=1e-3, estimator="cumulative")),
        nn.SyncBatchNorm(2, affine=False), nn.BatchNorm3d(5, track_running_stats=False),
    )
    model[1](torch.randn(6, 4) + 1)
    model[2][1](torch.randn(3, 2, 2, 2) - 1)
    model[3].eval()
    old = {name: m for name, m in model.named_modules()}
    params = {name: p for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    group = object()
    converted = convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    new = dict(model.named_modules())
    for name in ("1", "2.1", "3", "4"):
        assert type(new[name]) is SyncBatchNorm and new[name].process_group is group
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new[name], attr) == getattr(old[name], attr), (name, attr)
    assert new["2.1"].estimator == "cumulative" and new["1"].estimator == "ema"
    assert {name: p for name, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameters
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))  # torch's classmethod spelling
    assert type(single) is SyncBatchNorm and single.process_group is None
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_sync_batchnorm("model")


def test_ddp_accepts_it_on_cpu_where_torch_sync_batch_norm_is_refused():
    """DDP refuses torch.nn.SyncBatchNorm in a CPU module; bnkit's is not a subclass of it."""
    assert not issubclass(SyncBatchNorm, nn.SyncBatchNorm)


# ---------------------------------------------------------------- CUDA: gloo, NCCL


def _cuda_gloo_worker(rank: int, world_size: int, cases: dict) -> dict:
    """Batches on the GPU, gloo between the processes (collectives through the CPU)."""
    counter = _Counter()
    return {case: _run_case(rank, world_size, case, data, counter, "cuda") for case, data in cases.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_batches_with_gloo_equal_batch_norm_on_the_global_batch():
    world_size = 2
    cases = {case: _case(world_size, case) for case in PARTS[world_size]}
    results = D.spawn(_cuda_gloo_worker, world_size, cases, timeout=180)
    for case, data in cases.items():
        ref = _reference(world_size, case, data)
        for step in range(STEPS):
            for key in ("y", "dz"):
                got = torch.cat([r[case][key][step] for r in results])
                torch.testing.assert_close(got, ref[key][step], rtol=1e-10, atol=1e-10)
            for key in ("dgamma", "dbeta"):
                got = sum(r[case][key][step] for r in results)
                torch.testing.assert_close(got, ref[key][step], rtol=1e-10, atol=1e-10)
        for r in results:
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(r[case]["state"][key], ref["state"][key], rtol=1e-10, atol=1e-10)
            assert r[case]["collectives"] == [(1, 1)] * STEPS


def _nccl_worker(rank: int, world_size: int, port: int, z: torch.Tensor, dy: torch.Tensor, queue) -> None:
    import datetime
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    out = {}
    part = torch.chunk(z, world_size)[rank].cuda()
    dpart = torch.chunk(dy, world_size)[rank].cuda()
    for name, cls in (("bnkit", SyncBatchNorm), ("torch", nn.SyncBatchNorm)):
        bn = cls(z.shape[1]).cuda()
        x = part.clone().requires_grad_()
        y = bn(x)
        y.backward(dpart)
        out[name] = [t.cpu().numpy() for t in (y.detach(), x.grad, bn.weight.grad, bn.running_mean, bn.running_var)]
    queue.put((rank, out))
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs (NCCL)")
def test_matches_torch_sync_batch_norm_with_nccl():
    import torch.multiprocessing as mp

    world_size = 2
    torch.manual_seed(0)
    z, dy = torch.randn(16, 8, 4, 4) * 2 + 3, torch.randn(16, 8, 4, 4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    context = mp.start_processes(_nccl_worker, args=(world_size, D._free_port(), z, dy, queue),
                                 nprocs=world_size, join=False, start_method="spawn")
    results = dict(queue.get(timeout=120) for _ in range(world_size))
    context.join(60)
    for rank in range(world_size):
        for ours, theirs in zip(results[rank]["bnkit"], results[rank]["torch"]):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
