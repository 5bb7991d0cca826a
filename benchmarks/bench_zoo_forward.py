"""Forward latency of models rebuilt by fxindex.replace against the originals, on torchvision models.

For resnet18, mobilenet_v2, vgg11, densenet121 and efficientnet_b0 (random
weights, eval mode, inputs 1x3x64x64 and 8x3x64x64, CPU, one thread) this
compares, with ``fxindex.bench`` (interleaved rounds, medians):

* ``original``: the torchvision model, eager;
* ``head swapped``: ``fxindex.replace`` of the classifier's last Linear by a
  Linear of the same size holding the same weights: the rebuilt GraphModule
  computes exactly what the original does, so max|Δ| must be 0 and any
  latency difference is the cost of running the model as a GraphModule;
* ``conv widened``: ``fxindex.replace`` of an inner conv (not on a residual
  path) by one with 1/8 more output channels (at least 8), the old filters
  copied in: the next layers are rebuilt (BatchNorm extended, the next conv
  given zero weights for the new channels), so the output stays the same up to
  rounding while the FLOPs grow a little.

With ``--compile`` every model also gets a ``torch.compile`` row (default
backend inductor, which needs a C++ compiler and takes minutes on a small
machine; ``--compile-backend`` picks another). A model that fails to compile
gets a row that says why (``fxindex.bench`` keeps going).

Why: fxindex's rebuilt models are meant to run at eager speed
(``fxindex.speed_up``); this checks that on real architectures, at the
two batch sizes where Python overhead matters most and less.

Usage:
    python benchmarks/bench_zoo_forward.py                 # 5 models x batch 1, 8 (~2-3 min)
    python benchmarks/bench_zoo_forward.py --quick         # resnet18, mobilenet_v2 (< 1 min)
    python benchmarks/bench_zoo_forward.py --compile       # adds torch.compile rows (slow)

Writes ``benchmarks/results/bench_zoo_forward.json`` (see ``--output``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

import fxindex

try:  # imported as benchmarks.bench_zoo_forward
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common

# fxindex.bench visits the rows in a fixed order each round; many short rounds spread drift evenly.
ROUNDS = 10


@dataclass(frozen=True)
class ZooCase:
    """A torchvision model, its last Linear and an inner conv that is not on a residual path."""

    name: str
    head: str
    inner_conv: str


CASES = [
    ZooCase("resnet18", "fc", "layer1.0.conv1"),  # fxindex index 4
    # The first block's projection: no residual there (32 -> 16 channels).
    ZooCase("mobilenet_v2", "classifier.1", "features.1.conv.1"),
    ZooCase("vgg11", "classifier.6", "features.3"),
    # The first dense layer's bottleneck conv, before the concat.
    ZooCase("densenet121", "classifier", "features.denseblock1.denselayer1.conv1"),
    # The first MBConv's projection (no residual). Widening an expand conv fails: see the README.
    ZooCase("efficientnet_b0", "classifier.1", "features.1.0.block.2.0"),
]


def same_linear(old: nn.Linear) -> nn.Linear:
    """A new Linear of the same size holding ``old``'s weights: the rebuilt model must compute the same output."""
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    return new


def widened_conv(old: nn.Conv2d) -> nn.Conv2d:
    """``old`` with 1/8 more output channels (at least 8): old filters first, random extra ones after."""
    return common.widened_conv(old, old.out_channels + max(8, old.out_channels // 8))


def build_variants(case: ZooCase) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The original model and its two rebuilt variants, with what was changed."""
    import torchvision  # only needed here

    torch.manual_seed(0)
    model = getattr(torchvision.models, case.name)(weights=None).eval()
    inputs = (torch.randn(1, 3, 64, 64),)
    gm: fx.GraphModule = fxindex.trace(model, example_inputs=inputs)  # traced once, shared by both edits
    layers = fxindex.index(gm)
    head_index = layers.position(case.head)
    conv_index = layers.position(case.inner_conv)
    old_conv = layers[conv_index].module
    new_conv = widened_conv(old_conv)
    variants = {
        "original": model,
        "head swapped": fxindex.replace(gm, head_index, same_linear(layers[head_index].module)),
        "conv widened": fxindex.replace(gm, conv_index, new_conv),
    }
    info = {
        "head": case.head,
        "head_index": head_index,
        "inner_conv": case.inner_conv,
        "conv_index": conv_index,
        "widened": f"{old_conv.out_channels}->{new_conv.out_channels}",
    }
    return variants, info


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 and mobilenet_v2 only, shorter timing")
    parser.add_argument("--models", nargs="+", default=None, help="models to run (default: all five)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per row (default 3, quick 0.3)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (slow)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
    common.add_output_argument(parser, "bench_zoo_forward")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steadiest on a busy machine; bench's Timer uses it too
    names = args.models or (["resnet18", "mobilenet_v2"] if args.quick else [case.name for case in CASES])
    cases = [case for case in CASES if case.name in names]
    min_run_time = args.min_run_time or (0.3 if args.quick else 3.0)
    compile_option: bool | dict[str, Any] = False
    if args.compile:
        compile_option = {"backend": args.compile_backend} if args.compile_backend else True
    started = time.perf_counter()

    rows: list[list[str]] = []
    compiled_rows: list[list[str]] = []
    reports: list[dict[str, Any]] = []
    for case in cases:
        variants, info = build_variants(case)
        for batch in args.batches:
            torch.manual_seed(1)
            inputs = (torch.randn(batch, 3, 64, 64),)
            report = fxindex.bench(
                variants,
                inputs,
                compile=compile_option,
                min_run_time=min_run_time,
                rounds=ROUNDS,
                num_threads=1,
                progress=False,
            )
            reports.append({"model": case.name, "batch": batch, **info, "report": report.to_dict()})
            original = report["original"]
            head, wide = report["head swapped"], report["conv widened"]

            def speed(row: fxindex.BenchRow) -> str:
                if row.error:
                    return f"failed: {row.error[:60]}"
                return f"{row.latency_median * 1e3:.2f} ms ({row.speed_ratio:.3f}x)"

            def diff(row: fxindex.BenchRow) -> str:
                return "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.2g}"

            flops = "-"
            if wide.flops and original.flops:
                flops = f"{wide.flops / original.flops:.3f}"
            rows.append(
                [
                    case.name,
                    batch,
                    f"{original.latency_median * 1e3:.2f}",
                    speed(head),
                    diff(head),
                    f"idx {info['conv_index']} {info['widened']}",
                    speed(wide),
                    diff(wide),
                    flops,
                ]
            )
            if args.compile:
                base = report["original (compiled)"]

                def compiled_cell(row: fxindex.BenchRow) -> str:
                    if row.error:
                        return f"failed: {row.error[:60]}"
                    cell = f"{row.latency_median * 1e3:.2f} ms ({row.speed_ratio:.3f}x eager"
                    if not base.error:
                        cell += f", {base.latency_median / row.latency_median:.3f}x compiled"
                    return cell + ")"

                names = ("original", "head swapped", "conv widened")
                compiled_rows.append(
                    [case.name, batch]
                    + [compiled_cell(report[f"{name} (compiled)"]) for name in names]
                    + [diff(report[f"{name} (compiled)"]) for name in names]
                )
            common.progress(f"{case.name} batch {batch}", started)

    print(
        f"{common.machine_line()}, 1 thread, eval + no_grad, "
        f"1x3x64x64 / 8x3x64x64; fxindex.bench: {min_run_time:g} s per row over {ROUNDS} interleaved rounds\n"
    )
    print("Rebuilt vs original (ms: median latency; x: original median / row median, >1 faster)")
    print(
        common.table(
            rows,
            headers=[
                "model",
                "batch",
                "original ms",
                "head swapped",
                "max|Δ|",
                "widened conv",
                "conv widened",
                "max|Δ|",
                "FLOPs widened/original",
            ],
        )
    )
    if args.compile:
        backend = args.compile_backend or "inductor"
        print(
            f"\ntorch.compile (backend {backend}); x eager: eager original median / row median; "
            "x compiled: compiled original median / row median; max|Δ| vs eager original"
        )
        print(
            common.table(
                compiled_rows,
                headers=[
                    "model",
                    "batch",
                    "original",
                    "head swapped",
                    "conv widened",
                    "max|Δ| orig",
                    "max|Δ| head",
                    "max|Δ| widened",
                ],
            )
        )
    elapsed = common.print_elapsed(started)
    common.write_results(
        args.output,
        "bench_zoo_forward",
        {"reports": reports},
        quick=args.quick,
        elapsed=elapsed,
        compile=args.compile,
        compile_backend=args.compile_backend,
        min_run_time=min_run_time,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
