"""bnkit against PyTorch's native kernels and the memory-bandwidth limit: `make bench`.

Every figure is a ratio of two timings taken in the same run (medians over repeats, after
warm-up), so it holds on a noisy machine. Prints a Markdown table and writes
benchmarks/results.json, a flat mapping from figure name to value (CUDA figures prefixed
"cuda_", present only where a GPU is). Run: python benchmarks/bench.py [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnkit import reference, torch_bn
from bnkit.data import load_digits_split
from bnkit.nets import mlp, train

SHAPES = {"large": (8192, 512), "conv": (64, 64, 32, 32), "small": (256, 512)}
TARGETS = {  # figure -> (target, "<=" or ">=")
    "forward_train_vs_torch": 2.5,
    "backward_vs_torch": 2.5,
    "forward_infer_vs_copy": 1.5,
    "module_vs_torch": 1.1,
    "folded_vs_eval_latency": 0.7,
    "recompute_vs_forward": 1.5,
    "forward_train_peak_memory_vs_input": 3.0,
}


def median_time(fn, repeats: int, warmup: int = 3, sync=lambda: None) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratio(fn, baseline, repeats: int, sync=lambda: None) -> tuple[float, float, float]:
    """(t_fn / t_baseline, t_fn, t_baseline), the two timed alternately in the same run."""
    t_fn, t_base = [], []
    for _ in range(3):  # interleave so a noisy spell hits both
        t_fn.append(median_time(fn, repeats, sync=sync))
        t_base.append(median_time(baseline, repeats, sync=sync))
    a, b = min(t_fn), min(t_base)
    return a / b, a, b


def numpy_figures(shape, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
    c = shape[1]
    gamma, beta = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
    zt, wt, bt = torch.from_numpy(z), torch.from_numpy(gamma), torch.from_numpy(beta)
    out = {}
    out["forward_train_vs_torch"] = ratio(
        lambda: reference.forward_train(z, gamma, beta),
        lambda: F.batch_norm(zt, None, None, wt, bt, training=True),
        repeats,
    )[0]

    dz_tilde = rng.standard_normal(shape, dtype=np.float32)
    _, cache = reference.forward_train(z, gamma, beta)
    zg, wg, bg = (t.clone().requires_grad_() for t in (zt, wt, bt))
    y = F.batch_norm(zg, None, None, wg, bg, training=True)
    dy = torch.from_numpy(dz_tilde)
    out["backward_vs_torch"] = ratio(
        lambda: reference.backward(dz_tilde, cache),
        lambda: torch.autograd.grad(y, (zg, wg, bg), dy, retain_graph=True),
        repeats,
    )[0]

    mean, var = z.mean(axis=reference.stat_axes(z.ndim)), z.var(axis=reference.stat_axes(z.ndim))
    scale, shift = reference.inference_affine(gamma, beta, mean, var)
    out["forward_infer_vs_copy"] = ratio(
        lambda: reference.forward_infer_affine(z, scale, shift), lambda: z.copy(), repeats
    )[0]

    tracemalloc.start()
    reference.forward_train(z, gamma, beta)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["forward_train_peak_memory_vs_input"] = peak / z.nbytes
    return out


def module_figure(device: str, repeats: int) -> float:
    """bnkit BatchNorm2d forward+backward vs torch.nn.BatchNorm2d, (64, 64, 32, 32) float32."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    z = torch.randn(SHAPES["conv"], device=device, requires_grad=True)
    dy = torch.randn_like(z)
    ours, theirs = torch_bn.BatchNorm2d(64).to(device), nn.BatchNorm2d(64).to(device)

    def step(module):
        return lambda: torch.autograd.grad(module(z), (z, module.weight, module.bias), dy)

    return ratio(step(ours), step(theirs), repeats, sync=sync)[0]


def model_figures(repeats: int) -> dict[str, float]:
    X_train, X_test, y_train, _ = load_digits_split()
    model = mlp(hidden=(256, 256))
    train(model, X_train, y_train, epochs=2)
    model.eval()
    folded = torch_bn.fold_bn(model)
    x1 = torch.as_tensor(X_test[:1])
    with torch.no_grad():
        latency = ratio(lambda: folded(x1), lambda: model(x1), repeats * 20)[0]
    X = torch.as_tensor(X_train)
    batches = list(torch.split(X, 64))
    work = copy.deepcopy(model)

    def one_pass():
        with torch.no_grad():
            for b in batches:
                model(b)

    recompute = ratio(lambda: torch_bn.recompute_stats(work, batches), one_pass, repeats)[0]
    return {"folded_vs_eval_latency": latency, "recompute_vs_forward": recompute}


def run(quick: bool = False) -> dict[str, float]:
    torch.set_num_threads(2)
    repeats = 5 if quick else 15
    results: dict[str, float] = {}
    for name, shape in SHAPES.items():
        for key, value in numpy_figures(shape, repeats).items():
            results[key if name == "large" else f"{key}_{name}"] = value
    results["module_vs_torch"] = module_figure("cpu", repeats)
    results.update(model_figures(repeats))
    if torch.cuda.is_available():
        results["cuda_module_vs_torch"] = module_figure("cuda", repeats)
    return results


def markdown(results: dict[str, float]) -> str:
    lines = ["| figure | value | target |", "|---|---|---|"]
    for key, value in results.items():
        target = TARGETS.get(key.removeprefix("cuda_"))
        lines.append(f"| {key} | {value:.2f} | {'≤ %.1f' % target if target and key in TARGETS else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    results = run(args.quick)
    results["machine_cpu_count"] = float(torch.get_num_threads())
    print(markdown(results))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}: wrote {args.out}")


if __name__ == "__main__":
    main()
