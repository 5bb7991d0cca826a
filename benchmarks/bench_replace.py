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
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fxindex


def nested_model(leaves: int, depth: int = 3) -> nn.Module:
    """``leaves`` layers (Linear/ReLU alternating) split into ``depth`` levels of Sequentials."""
    layers: list[nn.Module] = [nn.Linear(8, 8) if i % 2 == 0 else nn.ReLU() for i in range(leaves)]
    for _ in range(depth - 1):
        group = max(2, round(len(layers) ** 0.5))
        layers = [nn.Sequential(*layers[i : i + group]) for i in range(0, len(layers), group)]
    return nn.Sequential(*layers)


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
    model = nested_model(leaves).eval()
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
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_replace.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (100, 1000) if args.quick else (100, 1000, 10000)
    rows = []
    raw: dict[str, Any] = {"machine": platform.platform(), "torch": torch.__version__, "results": {}}
    for leaves in sizes:
        repeats = 5 if args.quick or leaves >= 10000 else 9
        result = measure(leaves, repeats)
        raw["results"][str(leaves)] = result
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
    print(f"medians on {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(tabulate(rows, headers=headers))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(raw, handle, indent=2)


if __name__ == "__main__":
    main()
