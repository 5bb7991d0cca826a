"""Helpers shared by the benchmark scripts: result files, machine facts, interleaved timing, model builders.

Not a benchmark itself. The scripts import it as ``common`` when started as
``python benchmarks/<script>.py`` (from any folder: Python puts the script's
folder first on ``sys.path``) and as ``benchmarks.common`` when imported as
``benchmarks.<script>`` (``python -m benchmarks.<script>`` from the repository
root).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fxindex

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- result files


def add_output_argument(parser: argparse.ArgumentParser, benchmark_name: str, flag: str = "--output") -> None:
    """Add the option naming the JSON file to write, by default ``benchmarks/results/<benchmark_name>.json``."""
    default = os.path.join(RESULTS_DIR, f"{benchmark_name}.json")
    parser.add_argument(flag, default=default, help=f"JSON file to write (default {default})")


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: platform, processor, CPU count and the Python, torch and fxindex versions."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fxindex": fxindex.__version__,
    }


def machine_line() -> str:
    """``platform, N CPUs, torch X``: the start of the line the scripts print above their tables."""
    return f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def write_results(
    path: str, benchmark_name: str, results: dict[str, Any], *, quick: bool, elapsed: float, **extra: Any
) -> None:
    """Write one run's JSON file (creating its folder) and print ``wrote <path relative to the current folder>``.

    The file holds, at the top level: ``benchmark``, ``date`` (UTC), ``quick``,
    the fields of :func:`machine_info`, ``extra`` (the run's settings),
    ``elapsed_s``, then the items of ``results`` (the measurements, under the
    keys the script chooses).
    """
    document = {
        "benchmark": benchmark_name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        **machine_info(),
        **extra,
        "elapsed_s": elapsed,
        **results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
    print(f"wrote {os.path.relpath(path)}")


def table(rows: Any, headers: Any) -> str:
    """``rows`` under ``headers`` as a GitHub-style Markdown table, cells printed as given (no number parsing)."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def print_elapsed(started: float) -> float:
    """Print a blank line and the whole seconds since ``started`` (a ``time.perf_counter()``); return the seconds."""
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s")
    return elapsed


def progress(what: str, started: float) -> None:
    """``  measured <what> (<seconds since started> s)`` on stderr."""
    print(f"  measured {what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing


def rotation(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """``(round, name)`` over ``rounds`` rounds of ``names``, the order rotating by one each round.

    So no contender always goes first, and machine noise hits all alike.
    """
    names = list(names)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            yield round_index, name


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Seconds of one call ``function(*args, **kwargs)``; earlier garbage is collected before the clock starts."""
    gc.collect()
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, Callable[..., Any]],
    rounds: int,
    limits: dict[str, int] | None = None,
    warmup: bool = True,
    setup: Callable[[], tuple[Any, ...]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call, every contender once per round, in an order that rotates from round to round.

    Args:
        contenders: name -> callable.
        rounds: number of rounds.
        limits: name -> the number of first rounds that contender takes part in
            (for a contender too slow to repeat); default every round.
        warmup: call every contender once before timing (caches, fx codegen, fake-mode tables).
        setup: called before every call, outside the timed region; its result is
            passed to the contender as arguments (e.g. a fresh copy of a model an
            in-place tool will edit). Default: contenders take no arguments.

    Returns:
        name -> the list of times in seconds.
    """
    limits = limits or {}

    def call(name: str) -> float:
        arguments = setup() if setup is not None else ()
        return timed(contenders[name], *arguments)

    if warmup:
        for name in contenders:
            if limits.get(name, rounds) > 0:
                call(name)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index, name in rotation(list(contenders), rounds):
        if round_index < limits.get(name, rounds):
            samples[name].append(call(name))
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """name -> median of its samples."""
    return {name: statistics.median(times) for name, times in samples.items()}


# --------------------------------------------------------------------------- models


def nested_model(leaves: int, depth: int = 3) -> nn.Module:
    """``leaves`` layers (Linear(8, 8)/ReLU alternating) split into ``depth`` levels of Sequentials."""
    layers: list[nn.Module] = [nn.Linear(8, 8) if i % 2 == 0 else nn.ReLU() for i in range(leaves)]
    for _ in range(depth - 1):
        group = max(2, round(len(layers) ** 0.5))
        layers = [nn.Sequential(*layers[i : i + group]) for i in range(0, len(layers), group)]
    return nn.Sequential(*layers)


def conv_like(old: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A freshly initialised Conv2d like ``old`` (inputs, kernel, stride, padding, dilation, groups, bias) with
    ``out_channels`` outputs."""
    return nn.Conv2d(
        old.in_channels,
        out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
    )


def widened_conv(old: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A wider copy of ``old``: its filters first, then random extra filters (function-preserving when the
    next layer ignores the extra channels, which is what fxindex arranges)."""
    new = conv_like(old, out_channels)
    with torch.no_grad():
        new.weight[: old.out_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias[: old.out_channels].copy_(old.bias)
    return new
