"""bnkit against PyTorch, two peers and the memory floor, measured so a busy machine cannot
move the figures much: `make bench`.

Method (benchmarks/harness.py): the functions compared are timed in alternating rounds; a round
counts only when the rest of the machine used less than half a core during it (read from
/proc/stat); every figure is the median over the kept rounds, with its interquartile range
(key + "_iqr") and the number of rounds it comes from (key + "_kept"). Ratios are taken per round.
Thread-matched: NumPy runs on one thread, so it is compared with PyTorch on one thread
("torch1_" keys, "_vs_torch_1t" ratios); PyTorch's two-thread figure has its own keys
("torch_" keys and "_vs_torch", as before). Peers (benchmarks/peers.py): CS231n's NumPy batch
norm and d2l's tensor function. The floor, in the same rounds: a copy and a read-only pass (a
sum) of the same array; "_vs_floor" is a time over the minimal passes its job needs (test time:
one copy; training forward: two reads and a copy; backward: three reads and a copy).

Writes
- benchmarks/results.json: figure name -> number. Shape keys for (8192, 512) float32 carry no
  suffix; "_conv" is (64, 64, 32, 32), "_small" (256, 512); "cuda_" figures only where a GPU is.
  Suite times (--suite-times) are kept from the last run that measured them.
- benchmarks/machine.json: CPU, threads, SIMD levels, load, rounds kept and measured per
  comparison, busy comparisons, and the figures that disagree with the stored results by more
  than their spread ("unstable").

    python benchmarks/bench.py                 # the figures (a few minutes; longer when busy)
    python benchmarks/bench.py --quick         # few rounds, short waits: a smoke run
    python benchmarks/bench.py --suite-times   # also nbval per chapter and a book build
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

import bnkit
from bnkit import reference
from bnkit.course.data import load_digits_split
from bnkit.course.nets import mlp, train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and peers, also when imported
import peers  # noqa: E402
from harness import QUIET_CORES, Comparison, measure  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHAPES = {"": (8192, 512), "_conv": (64, 64, 32, 32), "_small": (256, 512)}  # key suffix -> shape
TARGETS = json.loads((HERE / "targets.json").read_text())  # figure -> the most it may be
SUITE_PREFIX = "nbval_seconds_"
SUITE_KEYS = ("notebooks_seconds", "book_build_seconds", "max_chapter_seconds")
# the minimal passes each job needs, as (read-only passes, copies) of an array the size of z
FLOORS = {"forward_train": (2, 1), "backward": (3, 1)}  # test time: one copy (the _vs_copy keys)


@dataclass
class Settings:
    rounds: int = 11  # rounds kept per comparison
    max_seconds: float = 15.0  # the longest one comparison waits for quiet rounds
    round_seconds: float = 0.25  # about how long one round of a comparison lasts
    conv_batches: int = 4  # batches of (64, 16, 32, 32) for recompute_stats on the conv net


ROUNDS: dict[str, dict] = {}  # comparison -> rounds kept, quiet, measured (for machine.json)


def compare(group: str, candidates: dict, s: Settings, sync=lambda: None) -> Comparison:
    comp = measure(candidates, s.rounds, s.max_seconds, s.round_seconds, sync=sync)
    ROUNDS[group] = {"kept": len(comp.kept), "quiet": comp.quiet, "measured": comp.measured,
                     "busy": comp.busy}
    return comp


def put(out: dict, key: str, summary: tuple[float, float], n: int, unit: float = 1.0) -> None:
    """out[key] = median, out[key + "_iqr"] = its interquartile range, key + "_kept" = rounds."""
    out[key], out[key + "_iqr"], out[key + "_kept"] = unit * summary[0], unit * summary[1], n


def report(comp: Comparison, times: dict[str, str], ratios: dict[str, tuple[str, str]],
           unit: tuple[str, float] = ("_ms", 1e3)) -> dict[str, float]:
    """Times (candidate -> key, stored as key + unit suffix) and ratios (key -> (a, b))."""
    out: dict[str, float] = {}
    n = len(comp.kept)
    for name, key in times.items():
        put(out, key + unit[0], comp.time(name), n, unit[1])
    for key, (a, b) in ratios.items():
        put(out, key, comp.ratio(a, b), n)
    return out


def floor_ratios(comp: Comparison, job: str, times: dict[str, str]) -> dict[str, float]:
    """key + "_vs_floor": each candidate's time over the minimal passes of ``job``, per round."""
    reads, copies = FLOORS[job]
    out: dict[str, float] = {}
    for name, key in times.items():
        floor = comp.summary(lambda t: t[name] / (reads * t["read"] + copies * t["copy"]))
        put(out, key + "_vs_floor", floor, len(comp.kept))
    return out


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# ---------------------------------------------------------------- the NumPy reference and peers


def numpy_figures(shape: tuple[int, ...], s: Settings, tag: str) -> dict[str, float]:
    """forward_train, backward and the test-time path against PyTorch (one and two threads),
    CS231n, d2l, a copy and a read-only pass of the same array; peak memory."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
    c, nd = shape[1], len(shape)
    gamma, beta = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
    zt, wt, bt = torch.from_numpy(z), torch.from_numpy(gamma), torch.from_numpy(beta)
    vec = (1, -1) + (1,) * (nd - 2)  # d2l's parameter shape: (1, n) or (1, C, 1, 1)
    wd, bd = wt.reshape(vec), bt.reshape(vec)
    mm, mv = torch.zeros_like(wd), torch.ones_like(wd)
    floor = {"copy": z.copy, "read": z.sum}
    size = z.nbytes
    out: dict[str, float] = {}

    names = {"ours": "forward_train", "torch1": "torch1_forward_train",
             "torch2": "torch_forward_train", "cs231n": "cs231n_forward_train",
             "d2l": "d2l_forward_train"}
    torch_fwd = lambda: F.batch_norm(zt, None, None, wt, bt, training=True)  # noqa: E731
    comp = compare("forward_train" + tag, {
        "ours": lambda: reference.forward_train(z, gamma, beta),
        "torch1": (torch_fwd, 1), "torch2": (torch_fwd, 2),
        "cs231n": lambda: peers.cs231n_forward(z, gamma, beta),
        "d2l": (lambda: peers.d2l_batch_norm(zt, wd, bd, mm, mv), 1), **floor}, s)
    out.update(report(comp, names, {
        "forward_train_vs_torch": ("ours", "torch2"),
        "forward_train_vs_torch_1t": ("ours", "torch1"),
        "forward_train_vs_cs231n": ("ours", "cs231n"), "forward_train_vs_d2l": ("ours", "d2l")}))
    out.update(floor_ratios(comp, "forward_train", names))
    # reads z, writes z_tilde and z_norm
    out["forward_train_gbps"] = gb_per_s(3 * size, out["forward_train_ms"] / 1e3)
    out["torch_forward_train_gbps"] = gb_per_s(2 * size, out["torch_forward_train_ms"] / 1e3)

    dz_tilde = rng.standard_normal(shape, dtype=np.float32)
    dy = torch.from_numpy(dz_tilde)
    _, cache = reference.forward_train(z, gamma, beta)
    _, cs_cache = peers.cs231n_forward(z, gamma, beta)
    zg, wg, bg = (t.clone().requires_grad_() for t in (zt, wt, bt))
    y = F.batch_norm(zg, None, None, wg, bg, training=True)
    wdg, bdg = wd.clone().requires_grad_(), bd.clone().requires_grad_()
    yd = peers.d2l_batch_norm(zg, wdg, bdg, mm, mv)[0]
    torch_bwd = lambda: torch.autograd.grad(y, (zg, wg, bg), dy, retain_graph=True)  # noqa: E731
    names = {k: v.replace("forward_train", "backward") for k, v in names.items()}
    comp = compare("backward" + tag, {
        "ours": lambda: reference.backward(dz_tilde, cache),
        "torch1": (torch_bwd, 1), "torch2": (torch_bwd, 2),
        "cs231n": lambda: peers.cs231n_backward_alt(dz_tilde, cs_cache),
        "d2l": (lambda: torch.autograd.grad(yd, (zg, wdg, bdg), dy, retain_graph=True), 1),
        **floor}, s)
    out.update(report(comp, names, {
        "backward_vs_torch": ("ours", "torch2"), "backward_vs_torch_1t": ("ours", "torch1"),
        "backward_vs_cs231n": ("ours", "cs231n"), "backward_vs_d2l": ("ours", "d2l")}))
    out.update(floor_ratios(comp, "backward", names))
    out["backward_gbps"] = gb_per_s(3 * size, out["backward_ms"] / 1e3)  # dz_tilde, z_norm; dz
    out["torch_backward_gbps"] = gb_per_s(3 * size, out["torch_backward_ms"] / 1e3)

    axes = reference.stat_axes(nd)
    mean, var = z.mean(axis=axes), z.var(axis=axes)
    scale, shift = reference.inference_affine(gamma, beta, mean, var)
    st, tt = torch.from_numpy(scale).reshape(vec), torch.from_numpy(shift).reshape(vec)
    rm, rv = torch.from_numpy(mean), torch.from_numpy(var)
    torch_inf = lambda: F.batch_norm(zt, rm, rv, wt, bt, training=False)  # noqa: E731

    def d2l_infer():
        with torch.no_grad():
            return peers.d2l_batch_norm(zt, wd, bd, rm.reshape(vec), rv.reshape(vec))

    names = {"ours": "forward_infer", "plain": "forward_infer_plain",
             "torch1": "torch1_forward_infer", "torch2": "torch_forward_infer",
             "affine": "torch1_affine", "cs231n": "cs231n_forward_infer",
             "d2l": "d2l_forward_infer"}
    comp = compare("forward_infer" + tag, {
        "ours": lambda: reference.forward_infer_affine(z, scale, shift),
        "plain": lambda: reference._affine_plain(z, scale, shift),
        "torch1": (torch_inf, 1), "torch2": (torch_inf, 2),
        "affine": (lambda: zt * st + tt, 1),  # eager PyTorch: a multiply kernel, then an add
        "cs231n": lambda: peers.cs231n_infer(z, gamma, beta, mean, var),
        "d2l": (d2l_infer, 1), **floor}, s)
    out.update(report(comp, {**names, "copy": "copy", "read": "read"},
                      {v + "_vs_copy": (k, "copy") for k, v in names.items()}))
    put(out, "forward_infer_vs_torch_1t", comp.ratio("ours", "torch1"), len(comp.kept))
    out["forward_infer_gbps"] = gb_per_s(2 * size, out["forward_infer_ms"] / 1e3)  # z; z_tilde
    out["copy_gbps"] = gb_per_s(2 * size, out["copy_ms"] / 1e3)  # z; its copy
    out["read_gbps"] = gb_per_s(size, out["read_ms"] / 1e3)

    tracemalloc.start()  # NumPy reports its array buffers to tracemalloc
    reference.forward_train(z, gamma, beta)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["forward_train_peak_memory_vs_input"] = peak / size
    return out


# ---------------------------------------------------------------- the PyTorch path


def module_figures(device: str, s: Settings) -> dict[str, float]:
    """bnkit's BatchNorm2d/1d forward+backward vs torch.nn's, one thread on CPU."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    threads = 1 if device == "cpu" else None
    out: dict[str, float] = {}
    for prefix, shape, ours, theirs in (
        ("module", SHAPES["_conv"], bnkit.BatchNorm2d(64), nn.BatchNorm2d(64)),
        ("module1d", SHAPES[""], bnkit.BatchNorm1d(512), nn.BatchNorm1d(512)),
    ):
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(shape, generator=gen).to(device).requires_grad_()
        dy = torch.randn(shape, generator=gen).to(device)

        def step(module):
            m = module.to(device)
            return lambda: torch.autograd.grad(m(z), (z, m.weight, m.bias), dy), threads

        comp = compare(prefix + "_" + device, {"ours": step(ours), "torch": step(theirs)}, s, sync)
        out.update(report(comp, {"ours": prefix, "torch": "torch_" + prefix},
                          {prefix + "_vs_torch": ("ours", "torch")}))
    return out


def cuda_reference_figures(s: Settings) -> dict[str, float]:
    """The reference functions on CUDA tensors vs PyTorch's kernels and a copy, (8192, 512)."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(SHAPES[""], generator=gen) * 3 + 1).cuda()
    gamma, beta = torch.randn(512, generator=gen).cuda(), torch.randn(512, generator=gen).cuda()
    scale, shift = reference.inference_affine(gamma, beta, z.mean(0), z.var(0, correction=0))
    comp = compare("cuda_reference", {
        "ours": lambda: reference.forward_train(z, gamma, beta),
        "torch": lambda: F.batch_norm(z, None, None, gamma, beta, training=True),
        "infer": lambda: reference.forward_infer_affine(z, scale, shift), "copy": z.clone,
    }, s, torch.cuda.synchronize)
    return report(comp, {}, {"forward_train_vs_torch": ("ours", "torch"),
                             "forward_infer_vs_copy": ("infer", "copy")})


def conv_net(channels: int = 16, layers: int = 4, seed: int = 0) -> nn.Sequential:
    """(Conv3x3 -> BatchNorm2d -> ReLU) x layers on (m, channels, H, W), in eval mode."""
    torch.manual_seed(seed)
    blocks = [(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
               nn.ReLU()) for _ in range(layers)]
    return nn.Sequential(*[m for block in blocks for m in block]).eval()


@functools.cache
def digits_model() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """The digits MLP (two hidden layers of 256 with BatchNorm1d) after 2 epochs, in eval mode,
    with the training and test inputs."""
    X_train, X_test, y_train, _ = load_digits_split()
    model = mlp(hidden=(256, 256), seed=0)
    train(model, X_train, y_train, epochs=2, seed=0)
    return model.eval(), X_train, X_test


def folding_figures(s: Settings) -> dict[str, float]:
    """Folded vs eval() latency: the digits MLP (one example), the conv net (1 and 32)."""
    model, _, X_test = digits_model()
    net = conv_net()
    x32 = torch.randn(32, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    cases = (("folded", "_latency", model, torch.as_tensor(X_test[:1]), ("_us", 1e6)),
             ("folded_conv", "_latency", net, x32[:1], ("_us", 1e6)),
             ("folded_conv", "_b32", net, x32, ("_ms", 1e3)))
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, suffix, m, x, unit in cases:
            folded = bnkit.fold_bn(m)
            comp = compare(name + suffix, {"folded": (lambda: folded(x), 1),
                                           "eval": (lambda: m(x), 1)}, s)
            times = {"folded": name + suffix, "eval": name.replace("folded", "eval") + suffix}
            out.update(report(comp, times, {name + "_vs_eval" + suffix: ("folded", "eval")}, unit))
    return out


def recompute_figures(s: Settings) -> dict[str, float]:
    """recompute_stats ("train", "eval") against torch.optim.swa_utils.update_bn and one
    forward pass over the same batches: the digits MLP (batches of 64) and the conv net."""
    model, X_train, _ = digits_model()
    gen = torch.Generator().manual_seed(2)
    cases = (("", model.eval(), list(torch.split(torch.as_tensor(X_train), 64))),
             ("_conv", conv_net(), [torch.randn(64, 16, 32, 32, generator=gen)
                                    for _ in range(s.conv_batches)]))
    out: dict[str, float] = {}
    for tag, net, batches in cases:
        work = {k: copy.deepcopy(net) for k in ("train", "eval", "update_bn")}

        def one_pass(net=net, batches=batches):
            with torch.no_grad():
                for b in batches:
                    net(b)

        comp = compare("recompute" + tag, {
            "train": (lambda: bnkit.recompute_stats(work["train"], batches), 1),
            "eval": (lambda: bnkit.recompute_stats(work["eval"], batches, upstream="eval"), 1),
            "update_bn": (lambda: update_bn(batches, work["update_bn"]), 1),
            "forward": (one_pass, 1)}, s)
        times = {"train": "recompute", "eval": "recompute_eval", "update_bn": "update_bn",
                 "forward": "forward_pass"}
        ratios = {"recompute_vs_update_bn": ("train", "update_bn"),
                  "recompute_vs_forward": ("train", "forward"),  # in forward passes
                  "recompute_eval_vs_forward": ("eval", "forward"),
                  "update_bn_vs_forward": ("update_bn", "forward")}
        figures = {**report(comp, times, ratios), "recompute_batches": len(batches)}
        out.update({_with_suffix(k, tag): v for k, v in figures.items()})
    return out


def sync_figures(s: Settings) -> dict[str, float]:
    """bnkit.SyncBatchNorm with gloo, from benchmarks/bench_sync.py where that file exists."""
    try:
        import bench_sync
    except ModuleNotFoundError as error:
        if error.name != "bench_sync":
            raise
        return {}
    figures = bench_sync.measure(rounds=s.rounds)
    return {k if k.startswith("sync") else "sync_" + k: v for k, v in figures.items()}


# ---------------------------------------------------------------- the whole suite


def suite_times() -> dict[str, float]:
    """Seconds for nbval on each notebook in _toc.yml (one pytest run each), and a book build.

    nbval runs in lax mode here: this times the run; whether the stored outputs are current
    is `make test`'s job (this page's own outputs change with every new results.json).
    """
    py = sys.executable
    listed = subprocess.run([py, "tools/notebooks.py"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.split()
    out: dict[str, float] = {}
    for notebook in listed:
        start = time.perf_counter()
        subprocess.run([py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval-lax",
                        "--nbval-current-env", notebook], cwd=REPO, stdout=subprocess.DEVNULL)
        out[SUITE_PREFIX + Path(notebook).stem] = time.perf_counter() - start
    out["notebooks_seconds"] = sum(out.values())
    out["max_chapter_seconds"] = max(v for k, v in out.items() if k.startswith(SUITE_PREFIX))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [py, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
             "build", "-W", "-n", "--keep-going", "--builder", "html", "--path-output", tmp, "."],
            cwd=REPO, check=True, stdout=subprocess.DEVNULL,
        )
        out["book_build_seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------- report


def run(s: Settings) -> dict[str, float]:
    results: dict[str, float] = {}
    for suffix, shape in SHAPES.items():
        for key, value in numpy_figures(shape, s, suffix).items():
            results[_with_suffix(key, suffix)] = value
    results.update(module_figures("cpu", s))
    results.update(folding_figures(s))
    results.update(recompute_figures(s))
    results.update(sync_figures(s))
    if torch.cuda.is_available():
        cuda = {**module_figures("cuda", s), **cuda_reference_figures(s)}
        results.update({"cuda_" + key: value for key, value in cuda.items()})
    return results


def _with_suffix(key: str, suffix: str) -> str:
    """forward_train_ms + _conv -> forward_train_ms_conv, and its _iqr/_kept after the shape."""
    for stat in ("_iqr", "_kept"):
        if key.endswith(stat):
            return key.removesuffix(stat) + suffix + stat
    return key + suffix


def machine(load_start: float) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # the last-level cache: a batch that fits runs from cache, not main memory
        llc = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        llc = f"{int(llc[:-1]) // 1024} MiB" if llc.endswith("K") else llc
    except OSError:
        llc = "unknown"
    simd = getattr(np, "__config__").CONFIG.get("SIMD Extensions", {}).get("found", [])
    busy = sorted(group for group, r in ROUNDS.items() if r["busy"])
    info = {
        "cpu": cpu,
        "last_level_cache": llc,
        "cpu_count": str(os.cpu_count()),
        "numpy_threads": "1 (NumPy's element-wise operations and reductions are single-threaded)",
        "torch_threads": "1 for every comparison with NumPy and between PyTorch functions; "
                         "2 in the torch_ columns (PyTorch's default here)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "numpy_simd": " ".join(simd) or "unknown",
        # the SIMD level of PyTorch's CPU kernels (AVX2 or AVX512): it moves every torch figure
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": datetime.date.today().isoformat(),
        "load_average_1min": f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "quiet_round": f"other processes used less than {QUIET_CORES} cores during the round",
        "rounds": ROUNDS,
        "busy": busy,  # comparisons whose figures include rounds that were not quiet
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def unstable(old: dict, new: dict, old_machine: dict, new_machine: dict) -> dict | str:
    """Ratios that moved between two runs by more than the larger of their two IQRs."""
    same = ("cpu", "cpu_count", "torch_cpu_capability", "numpy", "torch")
    if not old or any(old_machine.get(k) != new_machine.get(k) for k in same):
        return "no earlier run on this machine to compare with"
    moved = {}
    for key, value in new.items():
        if "_vs_" in key and not key.endswith(("_iqr", "_kept")) and key + "_iqr" in old:
            spread = max(new[key + "_iqr"], old[key + "_iqr"])
            if abs(value - old[key]) > spread:
                moved[key] = {"before": old[key], "now": value, "spread": round(spread, 4)}
    return moved


def markdown(results: dict[str, float]) -> str:
    lines = ["| figure | median | IQR | rounds | target |", "|---|---|---|---|---|"]
    for key, value in results.items():
        if key.endswith(("_iqr", "_kept")):
            continue
        target = f"≤ {TARGETS[key]}" if key in TARGETS else ""
        iqr, kept = results.get(key + "_iqr", ""), results.get(key + "_kept", "")
        iqr = f"{iqr:.3g}" if iqr != "" else ""
        lines.append(f"| {key} | {value:.3g} | {iqr} | {kept} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, short waits (smoke run)")
    parser.add_argument("--suite-times", action="store_true",
                        help="also time nbval on each chapter and a book build")
    parser.add_argument("--max-wait", type=float, help="seconds one comparison may wait for quiet")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    quick = Settings(rounds=3, max_seconds=1.0, round_seconds=0.05, conv_batches=1)
    s = quick if args.quick else Settings()
    if args.max_wait is not None:
        s.max_seconds = args.max_wait
    machine_path = args.out.with_name("machine.json")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous_machine = json.loads(machine_path.read_text()) if machine_path.exists() else {}
    load_start = os.getloadavg()[0]
    ROUNDS.clear()
    results = run(s)
    if args.suite_times:
        results.update(suite_times())
    else:  # keep the suite times of the last --suite-times run
        results.update({k: v for k, v in previous.items()
                        if k in SUITE_KEYS or k.startswith(SUITE_PREFIX)})
    results = {k: v if isinstance(v, int) else round(float(v), 4) for k, v in results.items()}
    info = machine(load_start)
    info["unstable"] = unstable(previous, results, previous_machine, info)
    print(markdown(results))
    if info["busy"]:
        print(f"\nthe machine was busy: {len(info['busy'])} comparison(s) kept rounds that were "
              f"not quiet: {', '.join(info['busy'])}")
    if isinstance(info["unstable"], dict) and info["unstable"]:
        print(f"\nunstable (moved by more than their spread since the stored run): "
              f"{', '.join(info['unstable'])}")
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    machine_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"\nwrote {args.out} and {machine_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
