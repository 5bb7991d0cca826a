"""Forward latency: eager model vs plain torch.fx GraphModule vs fxindex.speed_up.

Models, all at batch 1 on CPU with one thread, under ``torch.no_grad()``:

* ``nested-d``: 100 ``Linear(64, 64)`` layers in an ``nn.Sequential`` wrapped in
  ``d - 1`` more ``nn.Sequential`` levels, so each layer's qualified name has
  ``d`` parts (``0.0.0.7`` at depth 4): the plain GraphModule walks ``d``
  ``nn.Module.__getattr__`` calls per layer, the eager model none.
* ``resnet18`` and ``mobilenet_v2`` from torchvision (random weights, eval mode)
  at 1x3x64x64.

Method: the three variants of a model are timed side by side, interleaved: each
round times one block of calls of every variant, in an order that rotates from
round to round, so drift and noise hit all three alike. A block is a fixed
number of calls sized to last about ``--block-ms`` milliseconds. Reported per
variant: the median over rounds of the time per call and the median over
rounds of the ratio to the eager block of the same round (below 1: faster than
eager) with its quartiles. Every block is timed twice over: wall time
(``time.perf_counter``) and the CPU time of the calling thread
(``time.thread_time``); with one intra-op thread the latter is the work itself,
without the time other processes held the CPU, so its ratios stay readable on
a busy machine. The JSON file also has the best-block times.

Usage:
    python benchmarks/bench_forward.py            # full run (one to two minutes)
    python benchmarks/bench_forward.py --quick    # a short run (under a minute)

Writes benchmarks/results/bench_forward.json (see --output).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxindex
from fxindex._speed import speed_up

try:  # imported as benchmarks.bench_forward
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common

VARIANTS = ("eager", "plain fx", "speed_up fx")


def nested_linears(depth: int, layers: int = 100, width: int = 64) -> nn.Module:
    """``layers`` Linear(width, width) in a Sequential nested ``depth`` levels deep.

    Args:
        depth: nesting depth, 1 = a flat Sequential.
        layers: number of Linear layers.
        width: features of each Linear.

    Returns:
        The model, in eval mode.
    """
    model: nn.Module = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for _ in range(depth - 1):
        model = nn.Sequential(model)
    return model.eval()


def build_cases(depths: list[int], vision: bool) -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    """The (name, model, inputs) cases to measure."""
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = [
        (f"nested-{depth} (100 Linear)", nested_linears(depth), (torch.randn(1, 64),)) for depth in depths
    ]
    if vision:
        import torchvision  # only needed for these two models

        image = (torch.randn(1, 3, 64, 64),)
        cases.append(("resnet18 1x3x64x64", torchvision.models.resnet18().eval(), image))
        cases.append(("mobilenet_v2 1x3x64x64", torchvision.models.mobilenet_v2().eval(), image))
    return cases


def variants_of(model: nn.Module) -> dict[str, Callable[..., Any]]:
    """Eager model, its plain trace and its sped-up trace (parameters shared)."""
    plain = fxindex.trace(model)
    fast = speed_up(fxindex.trace(model))
    return {"eager": model, "plain fx": plain, "speed_up fx": fast}


CLOCKS = ("wall", "cpu")


def time_block(function: Callable[..., Any], inputs: tuple[Any, ...], calls: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per call over ``calls`` back-to-back calls (gc off, as timeit does).

    With one intra-op thread all the work runs on this thread, so its CPU time
    is the work itself, without the time other processes held the CPU.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            function(*inputs)
        return (time.perf_counter() - wall) / calls, (time.thread_time() - cpu) / calls
    finally:
        if gc_was_enabled:
            gc.enable()


def measure(
    variants: dict[str, Callable[..., Any]], inputs: tuple[Any, ...], rounds: int, block_ms: float
) -> dict[str, dict[str, list[float]]]:
    """Interleaved per-call times of each variant, per clock: one block per variant per round."""
    names = list(variants)
    for function in variants.values():  # warm-up: caches, allocator, lazy init
        time_block(function, inputs, 5)
    one_call = min(time_block(function, inputs, 3)[0] for function in variants.values())
    calls = max(1, int(block_ms / 1000 / one_call))
    samples: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in names} for clock in CLOCKS}
    for _, name in common.rotation(names, rounds):
        for clock, seconds in zip(CLOCKS, time_block(variants[name], inputs, calls)):
            samples[clock][name].append(seconds)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per variant: median and best time per call, median paired ratio to eager and its quartiles."""
    eager = samples["eager"]
    summary: dict[str, dict[str, float]] = {}
    for name, times in samples.items():
        ratios = [t / e for t, e in zip(times, eager)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        summary[name] = {
            "median_us": statistics.median(times) * 1e6,
            "min_us": min(times) * 1e6,
            "ratio_vs_eager": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "min_ratio_vs_eager": min(times) / min(eager),
        }
    return summary


def _ratio_cell(summary: dict[str, float]) -> str:
    return f"{summary['ratio_vs_eager']:.3f} [{summary['ratio_q1']:.3f}, {summary['ratio_q3']:.3f}]"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON file.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer rounds, shorter blocks")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default 101, quick 9)")
    parser.add_argument("--block-ms", type=float, default=None, help="length of one block (default 25, quick 10)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 6], help="nesting depths")
    parser.add_argument("--no-vision", action="store_true", help="skip resnet18 and mobilenet_v2")
    common.add_output_argument(parser, "bench_forward")
    args = parser.parse_args(argv)
    rounds = args.rounds or (9 if args.quick else 101)
    block_ms = args.block_ms or (10.0 if args.quick else 25.0)

    torch.set_num_threads(1)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    with torch.no_grad():
        for name, model, inputs in build_cases(args.depths, vision=not args.no_vision):
            variants = variants_of(model)
            reference = model(*inputs)
            for variant, function in variants.items():  # never time a wrong answer
                if not torch.equal(function(*inputs), reference):
                    raise AssertionError(f"{variant} of {name} does not reproduce the eager output")
            samples = measure(variants, inputs, rounds, block_ms)
            summary = {clock: summarize(samples[clock]) for clock in CLOCKS}
            results.append({"model": name, "wall": summary["wall"], "thread_cpu": summary["cpu"]})
            wall, cpu = summary["wall"], summary["cpu"]
            rows.append(
                [name]
                + [f"{wall[v]['median_us']:.1f}" for v in VARIANTS]
                + [_ratio_cell(wall[v]) for v in VARIANTS[1:]]
                + [_ratio_cell(cpu[v]) for v in VARIANTS[1:]]
            )
            common.progress(name, started)

    headers = [
        "model",
        "eager µs",
        "plain fx µs",
        "speed_up fx µs",
        "plain / eager",
        "speed_up / eager",
        "plain / eager (CPU)",
        "speed_up / eager (CPU)",
    ]
    print(common.table(rows, headers))
    print(
        f"\nbatch 1, torch.set_num_threads(1), no_grad; {rounds} interleaved rounds of ~{block_ms:g} ms blocks. "
        "µs: median wall time per call. Ratios: median over rounds of (variant / eager in the same round) "
        "[quartiles]; below 1 is faster than eager. (CPU): the same with this thread's CPU time, "
        "which leaves out the time other processes held the CPU."
    )
    common.write_results(
        args.output,
        "bench_forward",
        {
            "settings": {"rounds": rounds, "block_ms": block_ms, "threads": 1, "batch": 1, "grad": False},
            "environment": common.machine_info(),
            "results": results,
        },
        quick=args.quick,
        elapsed=time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
