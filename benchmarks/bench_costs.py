"""fxindex's own costs against model size, beside the torch.fx / copy operations they build on.

Models: nested ``nn.Sequential`` of 100, 1,000 and 10,000 leaf layers
alternating ``nn.Linear(8, 8)`` and ``nn.ReLU`` (three levels,
``common.nested_model``, shared with ``bench_replace.py``), so that cost grows
with the number of layers and not with arithmetic. Measured, interleaved round
by round in one run:

* tracing and indexing: ``torch.fx.symbolic_trace`` (the yardstick),
  ``fxindex.trace`` without and with ``example_inputs`` (the latter records
  every node's shape with fake tensors), ``fxindex.index`` of an already traced
  ``GraphModule`` and ``fxindex.table`` of it (index + text rendering);
* editing the traced model (shapes recorded, as after
  ``fxindex.trace(model, example_inputs=...)``): ``GraphModule.recompile()``
  and ``copy.deepcopy`` (of the ``GraphModule`` and of the plain model) are
  the yardsticks; ``fxindex.replace`` of a middle Linear by a same-size one,
  ``inplace=True`` and copying (the default); a widening replace
  (``Linear(8, 12)``, which rebuilds the next Linear; timed as a widen + narrow
  pair so the model keeps its size, reported per call); and a batch replace of
  10 Linears in one call (compared with 10 single inplace calls).

Why: fxindex re-traces, plans on the graph and recompiles on every edit; this
shows what that costs next to the operations a user would otherwise run
(``symbolic_trace``, ``recompile``, ``deepcopy``) and how it scales.

Method: every contender runs once per round, in an order that rotates from
round to round, so machine noise hits all alike; the table reports medians in
ms and ratios of medians. The shape-recording trace costs seconds per
thousand layers, so it runs in the first rounds only at the largest size.

Usage:
    python benchmarks/bench_costs.py            # 100, 1,000, 10,000 layers (~2-4 min)
    python benchmarks/bench_costs.py --quick    # 100 and 1,000 layers, 3 rounds (< 1 min)

Writes ``benchmarks/results/bench_costs.json`` (see ``--output``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

import fxindex

try:  # imported as benchmarks.bench_costs
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common


def measure(leaves: int, rounds: int, shape_rounds: int, warmup: bool) -> dict[str, Any]:
    """Median seconds of every operation on the nested model of ``leaves`` layers."""
    torch.manual_seed(0)
    model = common.nested_model(leaves).eval()
    inputs = (torch.randn(1, 8),)
    plain = fxindex.trace(model)  # shapes not recorded: what index/table see without example_inputs
    shaped = fxindex.trace(model, example_inputs=inputs)  # what the edits run on
    linears = fxindex.index(shaped).find(nn.Linear)
    middle = linears[len(linears) // 2]
    # Ten Linears spread over the model; same size, so the model is unchanged from round to round.
    batch_sites = linears[:: max(1, len(linears) // 10)][:10]

    def widen_then_narrow() -> None:
        # A widening replace rebuilds the next Linear; narrowing back keeps the model's size for the next round.
        fxindex.replace(shaped, middle, nn.Linear(8, 12), inplace=True)
        fxindex.replace(shaped, middle, nn.Linear(8, 8), inplace=True)

    contenders: dict[str, Callable[[], Any]] = {
        "symbolic_trace": lambda: fx.symbolic_trace(model),
        "fxindex.trace": lambda: fxindex.trace(model),
        "fxindex.trace + shapes": lambda: fxindex.trace(model, example_inputs=inputs),
        "index(gm)": lambda: fxindex.index(plain),
        "table(gm + shapes)": lambda: fxindex.table(shaped),
        "recompile": shaped.recompile,
        "deepcopy(gm)": lambda: copy.deepcopy(shaped),
        "deepcopy(model)": lambda: copy.deepcopy(model),
        "replace inplace": lambda: fxindex.replace(shaped, middle, nn.Linear(8, 8), inplace=True),
        "replace copying": lambda: fxindex.replace(shaped, middle, nn.Linear(8, 8)),
        "widen + narrow inplace": widen_then_narrow,
        "batch of 10 inplace": lambda: fxindex.replace(
            shaped, {site: nn.Linear(8, 8) for site in batch_sites}, inplace=True
        ),
    }
    samples = common.interleaved(contenders, rounds, {"fxindex.trace + shapes": shape_rounds}, warmup)
    medians = common.medians(samples)
    medians["widening replace inplace (per call)"] = medians.pop("widen + narrow inplace") / 2
    # The edited model must still run and fit: a cost table of a broken edit would mean nothing.
    # (Its values differ from the model's: the replacements are freshly initialised Linears.)
    with torch.no_grad():
        assert shaped(*inputs).shape == model(*inputs).shape
    return {
        "leaves": leaves,
        "call_sites": len(fxindex.index(plain)),
        "rounds": rounds,
        "shape_rounds": min(shape_rounds, rounds),
        "median_s": medians,
        "samples_s": samples,
    }


def _cell(seconds: float, reference: float | None = None, suffix: str = "") -> str:
    text = f"{seconds * 1e3:.1f}" if seconds >= 1e-3 else f"{seconds * 1e3:.3f}"
    return text if reference is None else f"{text} ({seconds / reference:.2f}x{suffix})"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 layers, 3 rounds (< 1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per size (default 7, quick 3)")
    common.add_output_argument(parser, "bench_costs")
    args = parser.parse_args(argv)
    # One thread: the work is Python-side graph handling, and on a busy machine
    # OpenMP spin-waiting would only add noise to the few tensor ops.
    torch.set_num_threads(1)
    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]
    rounds = args.rounds or (3 if args.quick else 7)
    started = time.perf_counter()
    results = []
    for position, leaves in enumerate(sizes):
        # At 10,000 layers the shape-recording trace takes ~20 s: two samples are enough to see it.
        shape_rounds = rounds if leaves < 10_000 else 2
        # Later sizes are warm already (fx codegen, fake-mode tables); warming 10,000 layers would cost a minute.
        results.append(measure(leaves, rounds if leaves < 10_000 else max(3, rounds - 2), shape_rounds, position == 0))
        common.progress(f"{leaves} layers", started)

    trace_rows, edit_rows = [], []
    for result in results:
        m = result["median_s"]
        sym, recompile, deepcopy = m["symbolic_trace"], m["recompile"], m["deepcopy(gm)"]
        trace_rows.append(
            [
                result["leaves"],
                _cell(sym),
                _cell(m["fxindex.trace"], sym),
                _cell(m["fxindex.trace + shapes"], sym),
                _cell(m["index(gm)"], sym),
                _cell(m["table(gm + shapes)"], sym),
            ]
        )
        edit_rows.append(
            [
                result["leaves"],
                _cell(recompile),
                _cell(deepcopy),
                _cell(m["deepcopy(model)"]),
                _cell(m["replace inplace"], recompile),
                _cell(m["widening replace inplace (per call)"], recompile),
                _cell(m["replace copying"], deepcopy, " dc"),
                _cell(m["batch of 10 inplace"], recompile),
                f"{m['batch of 10 inplace'] / (10 * m['replace inplace']):.2f}",
            ]
        )
    print(
        f"{common.machine_line()}, 1 thread; "
        f"medians in ms of {rounds} interleaved rounds (fewer at 10,000 layers, see JSON)\n"
    )
    print("Tracing and indexing (ratio: x torch.fx.symbolic_trace)")
    print(
        common.table(
            trace_rows,
            headers=["layers", "symbolic_trace ms", "fxindex.trace", "trace + shapes", "index(gm)", "table(gm)"],
        )
    )
    print("\nEditing a traced model with shapes (ratio: x recompile, or x deepcopy(gm) = dc)")
    print(
        common.table(
            edit_rows,
            headers=[
                "layers",
                "recompile ms",
                "deepcopy(gm) ms",
                "deepcopy(model) ms",
                "replace inplace",
                "widening replace inplace",
                "replace copying",
                "batch of 10 inplace",
                "batch / 10 singles",
            ],
        )
    )
    elapsed = common.print_elapsed(started)
    common.write_results(args.output, "bench_costs", {"results": results}, quick=args.quick, elapsed=elapsed, threads=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
