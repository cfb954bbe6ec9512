"""Timing that a busy machine cannot move much: alternating rounds, kept only when quiet.

``measure(candidates, rounds)`` times every candidate once per round, in an order that
rotates from round to round, keeping the fastest of a few calls of each. During each round it
reads how much CPU time the *other* processes used (``/proc/stat``'s busy time minus this
process's own, from ``getrusage``): a round counts only when that stayed below
``QUIET_CORES`` cores. It measures until ``rounds`` quiet rounds are kept or ``max_seconds``
have passed; if fewer than ``rounds`` were quiet, the figures come from the quietest rounds
measured and the comparison says the machine was busy. Ratios are taken per round (both
sides measured under the same conditions) and summarised by their median and interquartile
range (IQR).
"""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

QUIET_CORES = 0.5  # the most CPU the rest of the machine may use during a kept round (cores)
PAUSE = 0.05  # seconds to wait after a busy round before the next


def other_cpu_seconds() -> float | None:
    """CPU seconds used so far by all processes but this one; None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # "cpu user nice system idle iowait irq softirq steal"
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return busy - own.ru_utime - own.ru_stime


@dataclass
class Round:
    times: dict[str, float]  # candidate -> seconds (the fastest of its calls in this round)
    other_cores: float | None  # CPU used by other processes during the round, in cores


@dataclass
class Comparison:
    """The rounds of one measurement; ``kept`` are the rounds every figure comes from."""

    kept: list[Round]
    measured: int  # rounds measured in all
    quiet: int  # of those, rounds during which the rest of the machine was quiet
    busy: bool = field(init=False)

    def __post_init__(self) -> None:
        self.busy = self.quiet < len(self.kept)  # some kept rounds were not quiet

    def values(self, fn: Callable[[dict[str, float]], float]) -> np.ndarray:
        return np.array([fn(r.times) for r in self.kept])

    def summary(self, fn: Callable[[dict[str, float]], float]) -> tuple[float, float]:
        """(median, interquartile range) over the kept rounds of fn(times of a round)."""
        v = self.values(fn)
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        return float(med), float(q3 - q1)

    def time(self, name: str) -> tuple[float, float]:
        return self.summary(lambda t: t[name])

    def ratio(self, a: str, b: str) -> tuple[float, float]:
        return self.summary(lambda t: t[a] / t[b])


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _best_of(fn: Callable, calls: int, sync: Callable) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(
    candidates: dict[str, Callable | tuple[Callable, int]],
    rounds: int,
    max_seconds: float = 20.0,
    round_seconds: float = 0.1,
    sync: Callable = lambda: None,
    quiet_cores: float = QUIET_CORES,
) -> Comparison:
    """Time each candidate (a function, or (function, torch threads)) in alternating rounds.

    Each round lasts about ``round_seconds`` (calls per candidate chosen from a warm-up).
    """
    fns = {k: v if isinstance(v, tuple) else (v, None) for k, v in candidates.items()}
    calls = {}
    for name, (fn, threads) in fns.items():  # warm-up: caches, allocator, lazy initialisation
        _set_threads(threads)
        once = min(_best_of(fn, 2, sync), 1.0)
        calls[name] = int(np.clip(round_seconds / len(fns) / max(once, 1e-7), 1, 10**5))
    names = list(fns)
    done: list[Round] = []
    start = time.perf_counter()
    while True:
        n_quiet = sum(r.other_cores is None or r.other_cores < quiet_cores for r in done)
        over = time.perf_counter() - start > max_seconds
        if n_quiet >= rounds or (over and len(done) >= rounds):
            break
        k = len(done)
        order = names[k % len(names):] + names[: k % len(names)]
        order = order[::-1] if k % 2 else order
        other, wall = other_cpu_seconds(), time.perf_counter()
        times = {}
        for name in order:
            fn, threads = fns[name]
            _set_threads(threads)
            times[name] = _best_of(fn, calls[name], sync)
        wall = time.perf_counter() - wall
        cores = None if other is None else (other_cpu_seconds() - other) / wall
        done.append(Round(times, cores))
        if cores is not None and cores >= quiet_cores:
            time.sleep(PAUSE)
    quiet = [r for r in done if r.other_cores is None or r.other_cores < quiet_cores]
    if len(quiet) >= rounds:
        kept = quiet[:rounds]
    else:  # a busy machine: the quietest rounds measured, and say so
        kept = sorted(done, key=lambda r: r.other_cores)[:rounds]
    return Comparison(kept, measured=len(done), quiet=len(quiet))
