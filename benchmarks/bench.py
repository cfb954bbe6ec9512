"""bnkit against PyTorch's native kernels and the memory-bandwidth limit: `make bench`.

Every figure is a ratio of two timings taken in the same run, so it holds on a noisy,
shared machine: the two functions are timed in alternating rounds, each round keeps the
fastest of a few calls (after warm-up), and the figure is the median over rounds of the
per-round ratio. Prints a Markdown table and writes

- benchmarks/results.json: a flat mapping figure name -> number. Main keys are for the
  (8192, 512) float32 batch; "_conv" and "_small" suffixes for (64, 64, 32, 32) and
  (256, 512). "cuda_" figures appear only where a GPU is. Keys from an earlier
  ``--suite-times`` run (notebooks_seconds, book_build_seconds) are kept.
- benchmarks/machine.json: where it was measured (CPU model, threads, versions, date).

    python benchmarks/bench.py                 # the figures (about a minute)
    python benchmarks/bench.py --quick         # fewer rounds: a smoke run
    python benchmarks/bench.py --suite-times   # also time nbval on the book and a book build
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit import reference
from bnkit.course.data import load_digits_split
from bnkit.course.nets import mlp, train

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THREADS = 2
SHAPES = {"": (8192, 512), "_conv": (64, 64, 32, 32), "_small": (256, 512)}  # key suffix -> shape
TARGETS = {  # figure -> the most it may be (CPU; the same targets for the _conv/_small/cuda_ variants)
    "forward_train_vs_torch": 2.5,
    "backward_vs_torch": 2.5,
    "forward_infer_vs_copy": 1.5,
    "module_vs_torch": 1.1,
    "folded_vs_eval_latency": 0.7,
    "recompute_vs_forward": 1.5,
    "forward_train_peak_memory_vs_input": 3.0,
}
SUITE_KEYS = ("notebooks_seconds", "book_build_seconds")


# ---------------------------------------------------------------- timing


def best_of(fn, calls: int, sync) -> float:
    """The fastest of ``calls`` calls of fn(), in seconds."""
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def ratio(fn, baseline, rounds: int, calls: int = 5, sync=lambda: None) -> tuple[float, float, float]:
    """(t_fn / t_baseline, t_fn, t_baseline): medians over alternating rounds after warm-up.

    Each round times both (the order swapped every round) and keeps the fastest of ``calls``
    calls of each, so a noisy spell hits both sides of a ratio alike.
    """
    for _ in range(3):  # warm-up: caches, allocator, lazy initialisation
        fn(), baseline()
    sync()
    ratios, t_fn, t_base = [], [], []
    for r in range(rounds):
        if r % 2:
            b, a = best_of(baseline, calls, sync), best_of(fn, calls, sync)
        else:
            a, b = best_of(fn, calls, sync), best_of(baseline, calls, sync)
        ratios.append(a / b)
        t_fn.append(a)
        t_base.append(b)
    return statistics.median(ratios), statistics.median(t_fn), statistics.median(t_base)


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# ---------------------------------------------------------------- the NumPy reference


def numpy_figures(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """forward_train and backward vs PyTorch's kernels, the affine test-time path vs a copy,
    peak memory; and the effective bandwidth of each (bytes that must be read and written / time)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
    c = shape[1]
    gamma, beta = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
    zt, wt, bt = torch.from_numpy(z), torch.from_numpy(gamma), torch.from_numpy(beta)
    size = z.nbytes
    out: dict[str, float] = {}

    r, ours, theirs = ratio(
        lambda: reference.forward_train(z, gamma, beta),
        lambda: F.batch_norm(zt, None, None, wt, bt, training=True),
        rounds,
    )
    out["forward_train_vs_torch"] = r
    out["forward_train_ms"], out["torch_forward_train_ms"] = 1e3 * ours, 1e3 * theirs
    out["forward_train_gbps"] = gb_per_s(3 * size, ours)  # reads z, writes z_tilde and z_norm
    out["torch_forward_train_gbps"] = gb_per_s(2 * size, theirs)  # reads z, writes the output

    dz_tilde = rng.standard_normal(shape, dtype=np.float32)
    _, cache = reference.forward_train(z, gamma, beta)
    zg, wg, bg = (t.clone().requires_grad_() for t in (zt, wt, bt))
    y = F.batch_norm(zg, None, None, wg, bg, training=True)
    dy = torch.from_numpy(dz_tilde)
    r, ours, theirs = ratio(
        lambda: reference.backward(dz_tilde, cache),
        lambda: torch.autograd.grad(y, (zg, wg, bg), dy, retain_graph=True),
        rounds,
    )
    out["backward_vs_torch"] = r
    out["backward_ms"], out["torch_backward_ms"] = 1e3 * ours, 1e3 * theirs
    out["backward_gbps"] = gb_per_s(3 * size, ours)  # reads dz_tilde and z_norm, writes dz
    out["torch_backward_gbps"] = gb_per_s(3 * size, theirs)  # reads dz_tilde and z, writes dz

    axes = reference.stat_axes(z.ndim)
    scale, shift = reference.inference_affine(gamma, beta, z.mean(axis=axes), z.var(axis=axes))
    r, ours, copy_s = ratio(lambda: reference.forward_infer_affine(z, scale, shift), z.copy, rounds)
    out["forward_infer_vs_copy"] = r
    out["forward_infer_ms"], out["copy_ms"] = 1e3 * ours, 1e3 * copy_s
    out["forward_infer_gbps"] = gb_per_s(2 * size, ours)  # reads z, writes z_tilde
    out["copy_gbps"] = gb_per_s(2 * size, copy_s)  # reads z, writes the copy: the practical limit

    tracemalloc.start()  # NumPy reports its array buffers to tracemalloc
    reference.forward_train(z, gamma, beta)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["forward_train_peak_memory_vs_input"] = peak / size
    return out


# ---------------------------------------------------------------- the PyTorch path


def module_figures(device: str, rounds: int) -> dict[str, float]:
    """bnkit's BatchNorm2d forward+backward vs torch.nn.BatchNorm2d, (64, 64, 32, 32) float32."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(SHAPES["_conv"], generator=gen).to(device).requires_grad_()
    dy = torch.randn(SHAPES["_conv"], generator=gen).to(device)
    ours, theirs = bnkit.BatchNorm2d(64).to(device), nn.BatchNorm2d(64).to(device)

    def step(module):
        return lambda: torch.autograd.grad(module(z), (z, module.weight, module.bias), dy)

    r, t_ours, t_theirs = ratio(step(ours), step(theirs), rounds, sync=sync)
    return {"module_vs_torch": r, "module_ms": 1e3 * t_ours, "torch_module_ms": 1e3 * t_theirs}


def cuda_reference_figures(rounds: int) -> dict[str, float]:
    """The reference functions on CUDA tensors vs PyTorch's kernels (8192, 512)."""
    sync = torch.cuda.synchronize
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(SHAPES[""], generator=gen) * 3 + 1).cuda()
    gamma, beta = torch.randn(512, generator=gen).cuda(), torch.randn(512, generator=gen).cuda()
    out = {}
    out["forward_train_vs_torch"] = ratio(
        lambda: reference.forward_train(z, gamma, beta),
        lambda: F.batch_norm(z, None, None, gamma, beta, training=True),
        rounds, sync=sync,
    )[0]
    scale, shift = reference.inference_affine(gamma, beta, z.mean(0), z.var(0, correction=0))
    out["forward_infer_vs_copy"] = ratio(
        lambda: reference.forward_infer_affine(z, scale, shift), z.clone, rounds, sync=sync
    )[0]
    return out


def model_figures(rounds: int) -> dict[str, float]:
    """Folded vs eval() latency on one example; recompute_stats vs one forward pass, the digits."""
    X_train, X_test, y_train, _ = load_digits_split()
    model = mlp(hidden=(256, 256), seed=0)
    train(model, X_train, y_train, epochs=2, seed=0)
    model.eval()
    folded = bnkit.fold_bn(model)
    x1 = torch.as_tensor(X_test[:1])  # (1, 64): one example
    with torch.no_grad():
        r, t_folded, t_eval = ratio(lambda: folded(x1), lambda: model(x1), rounds, calls=50)
    out = {"folded_vs_eval_latency": r, "folded_latency_us": 1e6 * t_folded, "eval_latency_us": 1e6 * t_eval}

    batches = list(torch.split(torch.as_tensor(X_train), 64))  # the training set, batches of 64
    work = copy.deepcopy(model)

    def one_pass():
        with torch.no_grad():
            for b in batches:
                model(b)

    r, t_re, t_fwd = ratio(lambda: bnkit.recompute_stats(work, batches), one_pass, rounds, calls=3)
    out.update(recompute_vs_forward=r, recompute_ms=1e3 * t_re, forward_pass_ms=1e3 * t_fwd)
    return out


# ---------------------------------------------------------------- the whole suite


def suite_times() -> dict[str, float]:
    """Seconds for nbval on every notebook in _toc.yml, and for a book build into a temp dir.

    nbval runs in lax mode here: this times the run; whether the stored outputs are current
    is `make test`'s job (this page's own outputs change with every new results.json).
    """
    py = sys.executable
    notebooks = subprocess.run([py, "tools/notebooks.py"], cwd=REPO, check=True, capture_output=True, text=True)
    start = time.perf_counter()
    subprocess.run(
        [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval-lax", "--nbval-current-env",
         *notebooks.stdout.split()],
        cwd=REPO, check=True,
    )
    nb_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [py, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
             "build", "-W", "-n", "--keep-going", "--builder", "html", "--path-output", tmp, "."],
            cwd=REPO, check=True, stdout=subprocess.DEVNULL,
        )
        build_seconds = time.perf_counter() - start
    return {"notebooks_seconds": nb_seconds, "book_build_seconds": build_seconds}


# ---------------------------------------------------------------- report


def run(quick: bool = False) -> dict[str, float]:
    torch.set_num_threads(THREADS)
    rounds = 5 if quick else 11
    results: dict[str, float] = {}
    for suffix, shape in SHAPES.items():
        for key, value in numpy_figures(shape, rounds).items():
            results[key + suffix] = value
    results.update(module_figures("cpu", rounds))
    results.update(model_figures(rounds))
    if torch.cuda.is_available():
        cuda = {**module_figures("cuda", rounds), **cuda_reference_figures(rounds)}
        results.update({"cuda_" + key: value for key, value in cuda.items()})
    return results


def machine() -> dict[str, str]:
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
    info = {
        "cpu": cpu,
        "last_level_cache": llc,
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(THREADS),
        "numpy_threads": "1 (NumPy's element-wise operations and reductions are single-threaded)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        # the SIMD level of PyTorch's CPU kernels (AVX2 or AVX512): it moves every torch figure
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": datetime.date.today().isoformat(),
        # how busy the machine was (other jobs slow both sides of a ratio alike)
        "load_average_1min": f"{os.getloadavg()[0]:.2f} at the end of the run",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(results: dict[str, float]) -> str:
    lines = ["| figure | value | target |", "|---|---|---|"]
    for key, value in results.items():
        base = key.removeprefix("cuda_").removesuffix("_conv").removesuffix("_small")
        target = f"≤ {TARGETS[base]}" if base in TARGETS else ""
        lines.append(f"| {key} | {value:.3g} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--suite-times", action="store_true", help="also time nbval on the book and a book build")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = run(args.quick)
    if args.suite_times:
        results.update(suite_times())
    else:  # keep the suite times of the last --suite-times run
        results.update({k: previous[k] for k in SUITE_KEYS if k in previous})
    results = {key: round(float(value), 4) for key, value in results.items()}
    print(markdown(results))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_name("machine.json").write_text(json.dumps(machine(), indent=1) + "\n")
    print(f"\nwrote {args.out} and {args.out.with_name('machine.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
