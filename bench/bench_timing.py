"""Timing helpers shared by the benchmarks: device sync and interleaved (ABBA) rounds."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


def device_label(device: torch.device) -> str:
    """The ``device`` field of a benchmark's JSON: the CUDA card's name, or ``cpu (N threads)``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: the clock must wait for them


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one synchronized call."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def time_abba(fns: Mapping[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device,
              check: Callable[[str, object], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function over ``repeats`` rounds after ``warmup``.

    Rounds alternate the order (A B, B A, ...) so that drift and background load hit every function
    alike. ``check(name, result)`` sees every result, warm-up included (e.g. to refuse a NaN loss).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for round_index in range(warmup + repeats):
        for name in order if round_index % 2 == 0 else order[::-1]:
            elapsed, result = timed(fns[name], device)
            if check is not None:
                check(name, result)
            if round_index >= warmup:
                times[name].append(elapsed)
    return times
