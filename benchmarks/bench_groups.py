"""Building the stem's channel group of a deep residual network: fxindex against Torch-Pruning.

The network: a Linear stem (16 -> 32 features), ``N`` residual blocks that
each add ``Linear(32, 32)`` of the stream back into it (``x = x + fc(x)``),
and a Linear head: every block writes into the stem's stream, so the stem's
group holds all ``N + 1`` producers, the ``N`` consumers and the head.

Timed, for N = 1,000 / 2,000 / 5,000 layers (trace with shapes done once,
outside the timed region):

* fxindex: ``fxindex._spaces.analyze`` (the channel-space pass, its cache
  dropped before each repeat) + ``fxindex.group(gm, "stem")``;
* Torch-Pruning: ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``
  + ``get_pruning_group(model.stem, tp.prune_linear_out_channels, idxs=[0])``.

Medians of ``--repeats`` (fxindex) and ``--tp-repeats`` (Torch-Pruning, slower)
runs; both tools' groups are checked to hold every block. Prints the times,
the ratio, and fxindex's time per layer (flat when it grows linearly).

Usage:
    python benchmarks/bench_groups.py            # ~5-8 min on 2 cores (Torch-Pruning at 5k: minutes)
    python benchmarks/bench_groups.py --quick    # 1k and 2k layers, fewer repeats (< 1 min)

Writes ``benchmarks/results/bench_groups.json`` (see ``--output``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import fxindex
from fxindex._group import group
from fxindex._spaces import _CACHE_ATTRIBUTE, analyze

try:  # imported as benchmarks.bench_groups
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common

try:
    import torch_pruning as tp
except ImportError:  # an optional comparison: fxindex does not depend on it
    tp = None

WIDTH = 32


class ResidualStack(nn.Module):
    """stem -> ``depth`` blocks ``x = x + fc_i(x)`` -> head."""

    def __init__(self, depth: int):
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def time_fxindex(gm: torch.fx.GraphModule) -> tuple[float, int]:
    """Seconds of analyze + group on a fresh cache, and the group's producer count."""
    if hasattr(gm.graph, _CACHE_ATTRIBUTE):
        delattr(gm.graph, _CACHE_ATTRIBUTE)
    gc.collect()
    start = time.perf_counter()
    analyze(gm)
    found = group(gm, "stem")
    return time.perf_counter() - start, len(found.producers)


def time_tp(model: nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """Seconds of build_dependency + get_pruning_group, and the group's size (dependency items)."""
    gc.collect()
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    pruning = graph.get_pruning_group(model.stem, tp.prune_linear_out_channels, idxs=[0])
    elapsed = time.perf_counter() - start
    return elapsed, len(pruning.items)


def measure(depth: int, repeats: int, tp_repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = ResidualStack(depth).eval()
    x = torch.randn(1, 16)
    gm = fxindex.trace(model, example_inputs=(x,))
    fx_times, producers = [], 0
    for _ in range(repeats):
        elapsed, producers = time_fxindex(gm)
        fx_times.append(elapsed)
    assert producers == depth + 1, f"fxindex's group holds {producers} producers, expected {depth + 1}"
    row: dict[str, Any] = {"layers": depth + 2, "fxindex_s": statistics.median(fx_times), "fxindex_producers": producers}
    if tp is not None:
        tp_times, items = [], 0
        # Torch-Pruning takes minutes at 5k layers (about 216 s a build on 2 loaded cores): one run there.
        for _ in range(tp_repeats if depth < 5000 else 1):
            elapsed, items = time_tp(model, x)
            tp_times.append(elapsed)
        assert items >= depth, f"Torch-Pruning's group holds {items} items for {depth} blocks"
        row.update(tp_s=statistics.median(tp_times), tp_items=items)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 2k layers, fewer repeats")
    parser.add_argument("--repeats", type=int, default=5, help="fxindex repeats per size (median)")
    parser.add_argument("--tp-repeats", type=int, default=2, help="Torch-Pruning repeats per size (median)")
    common.add_output_argument(parser, "bench_groups")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    depths = (1000, 2000) if args.quick else (1000, 2000, 5000)
    repeats, tp_repeats = (2, 1) if args.quick else (args.repeats, args.tp_repeats)
    if tp is None:
        print("torch-pruning is not installed (pip install torch-pruning): timing fxindex only", file=sys.stderr)
    rows = []
    for depth in depths:
        rows.append(measure(depth, repeats, tp_repeats))
        common.progress(f"{depth} blocks", started)
    base = rows[0]["fxindex_s"] / rows[0]["layers"]
    table = []
    for row in rows:
        per_layer = row["fxindex_s"] / row["layers"]
        tp_cell = f"{row['tp_s'] * 1e3:.0f}" if "tp_s" in row else "-"
        ratio = f"{row['tp_s'] / row['fxindex_s']:.1f}x" if "tp_s" in row else "-"
        table.append(
            (f"{row['layers']:,}", f"{row['fxindex_s'] * 1e3:.0f}", tp_cell, ratio, f"{per_layer * 1e6:.1f} ({per_layer / base:.2f}x)")
        )
    print(f"\n{common.machine_line()}, one intra-op thread; medians of {repeats} (fxindex) / {tp_repeats} (Torch-Pruning) runs")
    print(
        common.table(
            table,
            ("layers", "fxindex analyze + group (ms)", "Torch-Pruning build + group (ms)", "TP / fxindex", "fxindex us per layer (vs 1k)"),
        )
    )
    elapsed = common.print_elapsed(started)
    common.write_results(
        args.output, "bench_groups", {"rows": rows}, quick=args.quick, elapsed=elapsed,
        repeats=repeats, tp_repeats=tp_repeats, torch_pruning=getattr(tp, "__version__", None),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
