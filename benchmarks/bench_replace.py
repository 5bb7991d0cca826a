"""Cost of fxindex.replace against model size, beside recompile and deepcopy.

For models of 100, 1,000 and 10,000 leaf layers (Linear(8, 8) + ReLU pairs
nested three levels deep) this measures, side by side in one run:

- ``GraphModule.recompile()`` and ``copy.deepcopy`` of the traced model (the yardsticks);
- ``replace(..., inplace=True)`` of a middle Linear by a wider one (the change
  propagates to the next Linear) and the same replace copying the model;
- a batch of k=10 replacements in one call against 10 single inplace calls;
- the rebuilt model's forward against the eager original's (batch 1).

Every figure is the median of several repeats; ratios are taken within this
run. Usage: ``python benchmarks/bench_replace.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fxindex

try:  # imported as benchmarks.bench_replace
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(leaves: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = common.nested_model(leaves).eval()
    inputs = (torch.randn(1, 8),)
    gm = fxindex.trace(model, example_inputs=inputs)
    linear_sites = fxindex.index(gm).find(nn.Linear)
    middle = linear_sites[len(linear_sites) // 2]
    batch = {site: nn.Linear(8, 8) for site in linear_sites[:: max(1, len(linear_sites) // 10)][:10]}

    def wider() -> nn.Linear:
        return nn.Linear(8, 8)  # same width: the replaced site itself, no propagation

    def widening_inplace() -> None:
        # Widen then narrow back so the model's size stays the same across repeats.
        fxindex.replace(gm, middle, nn.Linear(8, 12), inplace=True)
        fxindex.replace(gm, middle, nn.Linear(8, 8), inplace=True)

    results = {
        "recompile": median_seconds(gm.recompile, repeats),
        "deepcopy": median_seconds(lambda: copy.deepcopy(gm), repeats),
        "replace inplace": median_seconds(lambda: fxindex.replace(gm, middle, wider(), inplace=True), repeats),
        "widen+narrow inplace (2 calls)": median_seconds(widening_inplace, repeats),
        "replace copying": median_seconds(lambda: fxindex.replace(gm, middle, wider()), repeats),
        "batch of 10, one call": median_seconds(lambda: fxindex.replace(gm, dict(batch), inplace=True), repeats),
        "10 single calls": median_seconds(
            lambda: [fxindex.replace(gm, site, layer, inplace=True) for site, layer in batch.items()], repeats
        ),
    }
    rebuilt = fxindex.replace(gm, middle, nn.Linear(8, 8))
    with torch.no_grad():
        results["forward eager"] = median_seconds(lambda: model(*inputs), repeats * 5)
        results["forward rebuilt"] = median_seconds(lambda: rebuilt(*inputs), repeats * 5)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 layers, fewer repeats")
    common.add_output_argument(parser, "bench_replace", flag="--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (100, 1000) if args.quick else (100, 1000, 10000)
    started = time.perf_counter()
    rows = []
    results: dict[str, Any] = {}
    for leaves in sizes:
        repeats = 5 if args.quick or leaves >= 10000 else 9
        result = measure(leaves, repeats)
        results[str(leaves)] = result
        recompile = result["recompile"]
        rows.append(
            (
                leaves,
                f"{recompile * 1e3:.1f}",
                f"{result['deepcopy'] * 1e3:.1f}",
                f"{result['replace inplace'] * 1e3:.1f} ({result['replace inplace'] / recompile:.2f}x)",
                f"{result['widen+narrow inplace (2 calls)'] / 2 * 1e3:.1f} ({result['widen+narrow inplace (2 calls)'] / 2 / recompile:.2f}x)",
                f"{result['replace copying'] * 1e3:.1f} ({result['replace copying'] / result['deepcopy']:.2f}x deepcopy)",
                f"{result['batch of 10, one call'] / result['10 single calls']:.2f}",
                f"{result['forward rebuilt'] / result['forward eager']:.2f}",
            )
        )
    headers = (
        "layers",
        "recompile ms",
        "deepcopy ms",
        "replace inplace ms (x recompile)",
        "widening replace inplace ms (x recompile)",
        "replace copying ms",
        "batch(10) / 10 singles",
        "forward rebuilt / eager",
    )
    machine = common.machine_info()
    print(f"medians on {machine['processor']}, torch {machine['torch']}, 1 thread")
    print(tabulate(rows, headers=headers))
    common.write_results(
        args.json,
        "bench_replace",
        {"machine": machine["platform"], "results": results},
        quick=args.quick,
        elapsed=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
