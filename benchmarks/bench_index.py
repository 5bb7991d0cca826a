"""Benchmark fxindex's layer index: build, lookup and shape recording.

    python benchmarks/bench_index.py            # full run, about 1-3 minutes
    python benchmarks/bench_index.py --quick    # smaller models, fewer repeats, < 30 s

Models: nn.Sequential nested several levels deep (groups of ``--fanout``
children) over 100, 1,000 and 10,000 leaf layers alternating
``nn.Linear(8, 8)`` and ``nn.ReLU``.  Compared, side by side in one run:

  * index build (``fxindex.index(model)``: trace + LayerIndex) against
    ``torch.fx.symbolic_trace(model)`` alone;
  * ``layers[k]`` / ``layers[name]`` against a hand-written recursive
    ``named_children`` walk that finds the k-th leaf (k = last leaf, the walk's
    worst case; note the walk gives definition order, which equals execution
    order only for models like these);
  * shape recording with fake tensors (``fxindex.record_shapes``) against one
    real forward at batch 32 (and torch's ``ShapeProp``, a real forward that
    also records shapes).  With ``torchvision`` installed, the full run adds
    resnet18 at 32x3x224x224, where real arithmetic is expensive.

Heavy operations are timed with ``time.perf_counter``, interleaved round by
round in an order that rotates from round to round (``common.interleaved``), so
that every contender sees the same machine load; lookups with
``torch.utils.benchmark.Timer.blocked_autorange``. Medians are reported.
Results: a table on stdout and ``benchmarks/results/bench_index.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tabulate import tabulate
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.benchmark import Timer

import fxindex

try:  # imported as benchmarks.bench_index
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common


# --------------------------------------------------------------------------- models


def nested_model(leaves: int, fanout: int = 10) -> tuple[nn.Module, int]:
    """Leaves alternating Linear(8, 8) / ReLU, grouped into Sequentials of ``fanout`` until one root.

    Returns:
        ``(model, depth)``, depth being the number of Sequential levels above the leaves.
    """
    modules: list[nn.Module] = [nn.Linear(8, 8) if i % 2 == 0 else nn.ReLU() for i in range(leaves)]
    depth = 0
    while len(modules) > 1 or depth == 0:
        modules = [nn.Sequential(*modules[i : i + fanout]) for i in range(0, len(modules), fanout)]
        depth += 1
    return modules[0], depth


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if next(child.children(), None) is None:
            yield qualified, child
        else:
            yield from _leaves(child, qualified)


def walk_to_kth_leaf(root: nn.Module, k: int) -> tuple[str, nn.Module]:
    """The k-th leaf in definition order, by a recursive named_children walk (the hand-written way)."""
    for position, item in enumerate(_leaves(root)):
        if position == k:
            return item
    raise IndexError(k)


# --------------------------------------------------------------------------- timing


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rotating rounds (after one warm-up each if ``warmup``)."""
    return common.medians(common.interleaved(contenders, repeats, warmup=warmup))


def micro(statement: Callable[[], Any], min_run_time: float) -> float:
    """Median seconds per call, by torch.utils.benchmark's blocked_autorange."""
    timer = Timer(stmt="f()", globals={"f": statement})
    return timer.blocked_autorange(min_run_time=min_run_time).median


# --------------------------------------------------------------------------- benchmarks


def bench_nested(
    leaves: int, fanout: int, repeats: int, shape_repeats: int, batch: int, micro_time: float, warmup: bool
) -> dict[str, Any]:
    torch.manual_seed(0)
    model, depth = nested_model(leaves, fanout)
    model.eval()
    layers = fxindex.index(model)
    assert len(layers) == leaves
    k = leaves - 1
    name = layers[k].target
    assert walk_to_kth_leaf(model, k) == (name, layers[k].module)  # the contenders agree

    build = interleaved(
        {"trace": lambda: fx.symbolic_trace(model), "index": lambda: fxindex.index(model)},
        repeats,
        warmup,
    )
    gm = layers.graph_module
    layer_index_only = interleaved({"layer_index": lambda: fxindex.LayerIndex(gm)}, repeats, warmup)["layer_index"]

    lookup_int = micro(lambda: layers[k], micro_time)
    lookup_name = micro(lambda: layers[name], micro_time)
    walk = micro(lambda: walk_to_kth_leaf(model, k), micro_time)

    x = torch.randn(batch, 8)
    shape_gm = fxindex.trace(model)
    reference = fxindex.trace(model)

    def real_forward() -> None:
        with torch.no_grad():
            model(x)

    def shape_prop() -> None:
        with torch.no_grad():
            ShapeProp(reference).propagate(x)

    shapes = interleaved(
        {"fake": lambda: fxindex.record_shapes(shape_gm, (x,)), "real": real_forward, "shape_prop": shape_prop},
        shape_repeats,
        warmup,
    )
    return {
        "model": f"nested {leaves} leaves",
        "leaves": leaves,
        "depth": depth,
        "trace_s": build["trace"],
        "index_s": build["index"],
        "layer_index_only_s": layer_index_only,
        "index_over_trace": build["index"] / build["trace"],
        "lookup_int_s": lookup_int,
        "lookup_name_s": lookup_name,
        "walk_kth_leaf_s": walk,
        "lookup_over_walk": lookup_int / walk,
        "batch": batch,
        "fake_shapes_s": shapes["fake"],
        "real_forward_s": shapes["real"],
        "shape_prop_s": shapes["shape_prop"],
        "repeats": repeats,
        "shape_repeats": shape_repeats,
        "fake_over_real": shapes["fake"] / shapes["real"],
    }


def bench_resnet18(repeats: int, batch: int) -> dict[str, Any] | None:
    try:
        import torchvision
    except ImportError:
        return None
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    gm = fxindex.trace(model)

    def real_forward() -> None:
        with torch.no_grad():
            model(x)

    shapes = interleaved({"fake": lambda: fxindex.record_shapes(gm, (x,)), "real": real_forward}, repeats)
    return {
        "model": "resnet18 224x224",
        "batch": batch,
        "shape_repeats": repeats,
        "fake_shapes_s": shapes["fake"],
        "real_forward_s": shapes["real"],
        "fake_over_real": shapes["fake"] / shapes["real"],
    }


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 leaves, fewer repeats (< 30 s)")
    parser.add_argument("--fanout", type=int, default=10, help="children per nesting level (default 10)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the shape runs (default 32)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the layers are tiny, and on a busy machine OpenMP "
        "spin-waiting makes multi-threaded timings of small ops meaningless)",
    )
    common.add_output_argument(parser, "bench_index")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]
    repeats = 3 if args.quick else 5
    micro_time = 0.05 if args.quick else 0.2
    started = time.perf_counter()
    rows = []
    for position, leaves in enumerate(sizes):
        # Fake shape recording costs milliseconds per node: fewer runs for the largest model.
        shape_repeats = repeats if leaves <= (100 if args.quick else 1_000) else 2
        # The first size warms up torch (fake-mode tables, fx codegen); later ones are already warm.
        rows.append(
            bench_nested(leaves, args.fanout, repeats, shape_repeats, args.batch, micro_time, warmup=position == 0)
        )
        common.progress(f"{leaves} leaves", started)
    resnet = None if args.quick else bench_resnet18(3, args.batch)

    build_table = [
        [
            row["leaves"],
            row["depth"],
            _ms(row["trace_s"]),
            _ms(row["index_s"]),
            f"{row['index_over_trace']:.2f}",
            _ms(row["layer_index_only_s"]),
            _us(row["lookup_int_s"]),
            _us(row["lookup_name_s"]),
            _us(row["walk_kth_leaf_s"]),
            f"{row['lookup_over_walk']:.1e}",
        ]
        for row in rows
    ]
    print(
        tabulate(
            build_table,
            headers=["leaves", "depth", "fx trace ms", "index ms", "index/trace", "LayerIndex ms",
                     "index[k] us", "index[name] us", "walk to k-th us", "index[k]/walk"],
            disable_numparse=True,
            colalign=("right",) * 10,
        )
    )
    print()
    shape_rows = rows + ([resnet] if resnet else [])
    shape_table = [
        [
            row["model"],
            row["batch"],
            _ms(row["fake_shapes_s"]),
            _ms(row["real_forward_s"]),
            f"{row['fake_over_real']:.2f}",
            _ms(row["shape_prop_s"]) if "shape_prop_s" in row else "-",
        ]
        for row in shape_rows
    ]
    print(
        tabulate(
            shape_table,
            headers=["model", "batch", "fake shapes ms", "real forward ms", "fake/real", "ShapeProp (real) ms"],
            disable_numparse=True,
            colalign=("left",) + ("right",) * 5,
        )
    )
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, medians of {repeats} interleaved runs "
          f"({rows[-1]['shape_repeats']} for the shapes of the largest model)")

    common.write_results(
        args.output,
        "bench_index",
        {"nested": rows, "resnet18": resnet},
        quick=args.quick,
        elapsed=elapsed,
        threads=torch.get_num_threads(),
        repeats=repeats,
        fanout=args.fanout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
