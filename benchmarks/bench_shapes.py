"""Shape recording: ``fxindex.trace(model, example_inputs=...)`` on meta tensors, beside the fake-tensor path it replaced.

Models: torchvision's resnet50 and vit_b_16 at 224x224, batch 1 (random
weights, eval mode), and nested ``nn.Sequential`` MLPs of 1,000 / 5,000 /
10,000 leaf layers (``common.nested_model``: ``Linear(8, 8)`` / ``ReLU``
alternating, input ``1x8``). Measured, interleaved round by round in one run:

* ``symbolic_trace``: ``torch.fx.symbolic_trace(model)``, the yardstick;
* ``fxindex.trace``: without shapes;
* ``trace + shapes (meta)``: with ``example_inputs``, the meta path as a
  process runs it from its second trace on (its table of remembered kernel
  outputs filled by earlier traces);
* ``trace + shapes (meta, cold)``: the same with that table and the shared
  fake mode emptied before the call: a first trace in a fresh process;
* ``trace + shapes (old fake)``: the fake-tensor pass fxindex used before
  (whole graph under ``FakeTensorMode``, real parameters converted on every
  op), still the path for models whose tensors sit on several devices;
  forced here by making the meta path decline;
* ``ShapeProp (real)``: ``torch.fx.passes.shape_prop.ShapeProp`` of the
  traced graph with a real input (a real forward that records shapes).

Every contender records the same metadata (checked before timing: the meta
path's shapes, dtypes, ``requires_grad`` and strides equal ShapeProp's on
every node). The old fake path costs ~50 s at 10,000 layers, so it runs in
the first round only from 5,000 layers on (and the others get no warm-up call
there: the 1,000-layer model before them has filled the same tables).

Usage:
    python benchmarks/bench_shapes.py            # all models (~4-6 min on 2 busy cores)
    python benchmarks/bench_shapes.py --quick    # resnet50 and the 1,000-layer MLP, 2 rounds (< 1 min)

Writes ``benchmarks/results/bench_shapes.json`` (see ``--output``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

import fxindex
from fxindex import _shapes as shapes
from fxindex import _layer_cache as layer_cache

try:  # imported as benchmarks.bench_shapes
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common

CONTENDERS = (
    "symbolic_trace",
    "fxindex.trace",
    "trace + shapes (meta)",
    "trace + shapes (meta, cold)",
    "trace + shapes (old fake)",
    "ShapeProp (real)",
)


def _build(name: str) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(model, (x,))`` for a torchvision name or ``mlp-<layers>``."""
    torch.manual_seed(0)
    if name.startswith("mlp-"):
        return common.nested_model(int(name[4:])).eval(), (torch.randn(1, 8),)
    model = torchvision.models.get_model(name, weights=None).eval()
    return model, (torch.randn(1, 3, 224, 224),)


def _old_fake_path(model: nn.Module, inputs: tuple[torch.Tensor]) -> fx.GraphModule:
    """``fxindex.trace`` with shapes on the whole-graph fake-tensor pass (the meta path told to decline)."""
    original = shapes._meta_device_plan
    shapes._meta_device_plan = lambda graph_module, example_inputs: None
    try:
        return fxindex.trace(model, example_inputs=inputs)
    finally:
        shapes._meta_device_plan = original


def _cold(model: nn.Module, inputs: tuple[torch.Tensor]) -> fx.GraphModule:
    """``fxindex.trace`` with shapes, the remembered kernel and layer outputs and the shared fake mode emptied first."""
    saved_entries = getattr(shapes._shared, "meta_entries", None)
    saved_mode = getattr(shapes._shared, "mode", None)
    saved_layers = getattr(layer_cache._shared, "entries", None)
    shapes._shared.meta_entries = {}
    shapes._shared.mode = None
    layer_cache._shared.entries = {}
    try:
        return fxindex.trace(model, example_inputs=inputs)
    finally:
        # Put back: the other contenders' warm state must not depend on the rotation order.
        shapes._shared.meta_entries = saved_entries
        shapes._shared.mode = saved_mode
        layer_cache._shared.entries = saved_layers


def _key(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return (tuple(meta.shape), meta.dtype, meta.requires_grad, meta.stride, meta.memory_format)
    if isinstance(meta, (tuple, list)):
        return tuple(_key(item) for item in meta)
    return meta


def _check_same_shapes(model: nn.Module, inputs: tuple[torch.Tensor], check_old: bool) -> None:
    """The meta path (and, if asked, the old fake path) records what a real ShapeProp run records, node by node."""
    plain = fxindex.trace(model)
    ShapeProp(plain).propagate(*inputs)
    real = [_key(node.meta.get("tensor_meta")) for node in plain.graph.nodes]
    meta = [_key(node.meta.get("tensor_meta")) for node in fxindex.trace(model, example_inputs=inputs).graph.nodes]
    assert meta == real, "the meta path recorded other shapes than a real forward"
    if check_old:
        old = [_key(node.meta.get("tensor_meta")) for node in _old_fake_path(model, inputs).graph.nodes]
        assert [item[:3] for item in old if item] == [item[:3] for item in real if item], "old path differs"


def measure(name: str, rounds: int, old_rounds: int, warmup: bool) -> dict[str, Any]:
    """Median seconds of every contender on model ``name``."""
    model, inputs = _build(name)
    _check_same_shapes(model, inputs, check_old=old_rounds >= rounds)
    traced = fxindex.trace(model)
    contenders: dict[str, Callable[[], Any]] = {
        "symbolic_trace": lambda: fx.symbolic_trace(model),
        "fxindex.trace": lambda: fxindex.trace(model),
        "trace + shapes (meta)": lambda: fxindex.trace(model, example_inputs=inputs),
        "trace + shapes (meta, cold)": lambda: _cold(model, inputs),
        "trace + shapes (old fake)": lambda: _old_fake_path(model, inputs),
        "ShapeProp (real)": lambda: ShapeProp(traced).propagate(*inputs),
    }
    limits = {"trace + shapes (old fake)": old_rounds}
    if not warmup:
        fxindex.trace(model, example_inputs=inputs)  # the meta path warm (cheap); the old one stays unwarmed
    samples = common.interleaved(contenders, rounds, limits, warmup=warmup)
    return {
        "model": name,
        "nodes": len(traced.graph.nodes),
        "rounds": rounds,
        "old_rounds": min(old_rounds, rounds),
        "median_s": common.medians(samples),
        "samples_s": samples,
    }


def _cell(seconds: float, reference: float | None = None) -> str:
    text = f"{seconds * 1e3:.1f}" if seconds >= 1e-2 else f"{seconds * 1e3:.2f}"
    return text if reference is None else f"{text} ({seconds / reference:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet50 and the 1,000-layer MLP, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default 5, quick 2)")
    parser.add_argument(
        "--models", nargs="+", default=None, help="resnet50, vit_b_16 and/or mlp-<layers> (default: all five)"
    )
    common.add_output_argument(parser, "bench_shapes")
    args = parser.parse_args(argv)
    # One thread: ShapeProp's real forward is the only arithmetic, and spin-waiting
    # OpenMP threads on a busy machine would only add noise.
    torch.set_num_threads(1)
    names = args.models or (
        ["resnet50", "mlp-1000"] if args.quick else ["resnet50", "vit_b_16", "mlp-1000", "mlp-5000", "mlp-10000"]
    )
    rounds = args.rounds or (2 if args.quick else 5)
    started = time.perf_counter()
    results = []
    for name in names:
        big = name.startswith("mlp-") and int(name[4:]) >= 5_000
        # The old path takes ~5-25 s at 5,000 layers and ~15-50 s at 10,000: one sample, no warm-up call.
        results.append(measure(name, rounds, 1 if big else rounds, warmup=not big))
        common.progress(name, started)

    rows = []
    for result in results:
        m = result["median_s"]
        sym = m["symbolic_trace"]
        rows.append(
            [result["model"], result["nodes"], _cell(sym)]
            + [_cell(m[name], sym) for name in CONTENDERS[1:]]
            + [f"{m['trace + shapes (meta)'] / result['nodes'] * 1e6:.0f}"]
        )
    print(f"\nbench_shapes ({common.machine_line()}, 1 thread); medians in ms, ratio = x symbolic_trace\n")
    headers = ["model", "nodes", "symbolic_trace ms", *CONTENDERS[1:], "meta us/node"]
    print(common.table(rows, headers))
    elapsed = common.print_elapsed(started)
    common.write_results(args.output, "bench_shapes", {"results": results}, quick=args.quick, elapsed=elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
