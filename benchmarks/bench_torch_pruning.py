"""The same channel pruning done by Torch-Pruning and by fxindex: time, shapes, outputs.

Torch-Pruning (``pip install torch-pruning``, not a dependency of fxindex)
finds the layers coupled to a conv's output channels with a
``DependencyGraph`` and prunes the whole group in place. fxindex does the
same edit as a replacement: a narrower conv holding the kept filters, with
``keep=`` naming the kept old channels, and the change propagated downstream.

Edits (inputs 1x3x64x64, random weights, eval mode; the 48 of 64 output
channels with the largest filter L1 norm are kept, in ascending order, by both
tools):

* vgg11 ``features.0`` (the first conv of the first VGG block), 64 -> 48: the
  next conv ``features.3`` loses the matching input channels;
* resnet50 ``layer1.0.conv2`` (a bottleneck's inner 3x3 conv, not on the
  residual path), 64 -> 48: ``bn2`` and ``conv3``'s inputs follow.

Timed, interleaved round by round (median; every repeat starts from a fresh
deep copy of the model, made outside the timed region, since Torch-Pruning
mutates it in place):

* Torch-Pruning: ``DependencyGraph().build_dependency(model, example_inputs=x)``
  + ``get_pruning_group(conv, tp.prune_conv_out_channels, idxs=pruned)`` +
  ``group.prune()`` (the build alone is also reported);
* fxindex: ``fxindex.plan`` (the dry run), ``fxindex.trace(model,
  example_inputs=...)`` then ``fxindex.replace(trace, k, narrower, keep=kept,
  inplace=True)`` (the trace workflow: the result is the edited GraphModule), ``fxindex.replace(model, k,
  narrower, keep=kept, example_inputs=(x,))`` with ``inplace=True`` (trace,
  shapes, plan, then the edit written back into the model itself and verified
  by running it: like Torch-Pruning's in-place edit) and copying (the
  default), ``inplace=True`` on a trace without ``example_inputs`` (no shape
  recording: this edit needs none), and ``fxindex.resize(model, conv,
  keep=kept, example_inputs=(x,), inplace=True)`` (the whole channel group,
  written back).

Checked: both pruned models give the same output shape, the same parameter
shapes (state-dict keys match), and the same outputs (max |Δ| between them,
expected 0 since they keep the same channels); the distance to the unpruned
model is shown for scale.

Usage:
    python benchmarks/bench_torch_pruning.py            # ~1-2 min
    python benchmarks/bench_torch_pruning.py --quick    # 2 rounds (< 1 min)

Writes ``benchmarks/results/bench_torch_pruning.json`` (see ``--output``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fxindex

try:  # imported as benchmarks.bench_torch_pruning
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common

try:
    import torch_pruning as tp
except ImportError:  # an optional comparison: fxindex does not depend on it
    tp = None


@dataclass(frozen=True)
class Case:
    model: str
    conv: str
    keep: int  # output channels kept


CASES = [Case("vgg11", "features.0", 48), Case("resnet50", "layer1.0.conv2", 48)]


def kept_channels(conv: nn.Conv2d, count: int) -> list[int]:
    """The ``count`` output channels with the largest filter L1 norm, in ascending order (Torch-Pruning keeps
    the survivors in their old order, so fxindex is given the same order)."""
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    return sorted(torch.topk(norms, count).indices.tolist())


def narrower_conv(conv: nn.Conv2d, keep: list[int]) -> nn.Conv2d:
    """A conv with the kept filters of ``conv`` only."""
    new = common.conv_like(conv, len(keep))
    with torch.no_grad():
        new.weight.copy_(conv.weight[keep])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[keep])
    return new


def prune_with_torch_pruning(model: nn.Module, conv_name: str, pruned: list[int], x: torch.Tensor) -> float:
    """Torch-Pruning's edit, in place; returns the seconds the DependencyGraph build took."""
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    built = time.perf_counter() - start
    group = graph.get_pruning_group(model.get_submodule(conv_name), tp.prune_conv_out_channels, idxs=pruned)
    group.prune()
    return built


def compare(a: nn.Module, b: nn.Module, x: torch.Tensor, original: torch.Tensor) -> dict[str, Any]:
    """Output shapes, parameter shapes and output distance of two pruned models."""
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    state_a, state_b = a.state_dict(), b.state_dict()
    same_keys = set(state_a) == set(state_b)
    shape_mismatch = sorted(k for k in set(state_a) & set(state_b) if state_a[k].shape != state_b[k].shape)
    return {
        "output_shape_tp": list(out_a.shape),
        "output_shape_fxindex": list(out_b.shape),
        "state_dict_keys_equal": same_keys,
        "parameter_shape_mismatches": shape_mismatch,
        "num_parameters_tp": sum(p.numel() for p in a.parameters()),
        "num_parameters_fxindex": sum(p.numel() for p in b.parameters()),
        "max_abs_diff_tp_vs_fxindex": (out_a - out_b).abs().max().item() if out_a.shape == out_b.shape else None,
        "max_abs_diff_vs_unpruned": (out_b - original).abs().max().item(),
    }


def measure(case: Case, rounds: int) -> dict[str, Any]:
    import torchvision  # only needed here

    torch.manual_seed(0)
    model = getattr(torchvision.models, case.model)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    inputs = (x,)
    conv = model.get_submodule(case.conv)
    keep = kept_channels(conv, case.keep)
    pruned = sorted(set(range(conv.out_channels)) - set(keep))
    prototype = narrower_conv(conv, keep)
    k = fxindex.index(model).position(case.conv)  # the execution-order index fxindex is given
    with torch.no_grad():
        original = model(x)

    # Correctness first: never time two tools that do different things.
    tp_model = copy.deepcopy(model)
    prune_with_torch_pruning(tp_model, case.conv, pruned, x)
    planned = fxindex.plan(model, k, copy.deepcopy(prototype), example_inputs=inputs, keep=keep)
    fx_model = fxindex.replace(model, k, copy.deepcopy(prototype), example_inputs=inputs, keep=keep)
    checks = compare(tp_model, fx_model, x, original)
    traced = fxindex.trace(copy.deepcopy(model), example_inputs=inputs)
    fxindex.replace(traced, k, copy.deepcopy(prototype), keep=keep, inplace=True)
    checks["max_abs_diff_tp_vs_fxindex_on_trace"] = compare(tp_model, traced, x, original)["max_abs_diff_tp_vs_fxindex"]
    checks["plan_touches"] = [f"{edit.target}: {edit.action}" for edit in planned.edits if edit.action != "pass"]
    checks["plan_says_function_preserving"] = planned.preserves_function
    del tp_model, fx_model

    build_times: list[float] = []

    def torch_pruning(fresh: nn.Module) -> None:
        build_times.append(prune_with_torch_pruning(fresh, case.conv, pruned, x))

    contenders: dict[str, Callable[[nn.Module, nn.Module], Any]] = {
        "torch-pruning": lambda fresh, layer: torch_pruning(fresh),
        "fxindex.plan": lambda fresh, layer: fxindex.plan(fresh, k, layer, example_inputs=inputs, keep=keep),
        "fxindex.replace inplace": lambda fresh, layer: fxindex.replace(
            fresh, k, layer, example_inputs=inputs, keep=keep, inplace=True
        ),
        "fxindex.replace copying": lambda fresh, layer: fxindex.replace(
            fresh, k, layer, example_inputs=inputs, keep=keep
        ),
        "fxindex.trace + replace inplace on the trace": lambda fresh, layer: fxindex.replace(
            fxindex.trace(fresh, example_inputs=inputs), k, layer, keep=keep, inplace=True
        ),
        "fxindex.replace inplace, no example_inputs": lambda fresh, layer: fxindex.replace(
            fxindex.trace(fresh), k, layer, keep=keep, inplace=True
        ),
        "fxindex.resize inplace": lambda fresh, layer: fxindex.resize(
            fresh, case.conv, keep=keep, example_inputs=inputs, inplace=True
        ),
    }
    # Every call (the warm-up too) gets a fresh deep copy, made untimed: Torch-Pruning edits in place.
    samples = common.interleaved(contenders, rounds, setup=lambda: (copy.deepcopy(model), copy.deepcopy(prototype)))
    medians = common.medians(samples)
    medians["torch-pruning DependencyGraph build"] = statistics.median(build_times[1:])  # [0]: the warm-up
    return {
        "model": case.model,
        "conv": case.conv,
        "fxindex_index": k,
        "channels": f"{conv.out_channels} -> {len(keep)}",
        "kept": keep,
        "rounds": rounds,
        "median_s": medians,
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds (< 1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default 15, quick 2)")
    common.add_output_argument(parser, "bench_torch_pruning")
    args = parser.parse_args(argv)
    if tp is None:
        print(
            "bench_torch_pruning needs Torch-Pruning, which fxindex does not depend on:\n"
            "    pip install torch-pruning    (measured with 1.6.1)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)  # both tools run forwards; one thread keeps them steady on a busy machine
    rounds = args.rounds or (2 if args.quick else 15)
    started = time.perf_counter()
    results = []
    for case in CASES:
        results.append(measure(case, rounds))
        common.progress(case.model, started)

    version = getattr(tp, "__version__", "?")
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("torch-pruning")  # the module's __version__ lags the release
    except Exception:
        pass
    print(
        f"{common.machine_line()}, torch-pruning {version}, "
        f"1 thread; medians of {rounds} interleaved rounds, fresh deep copy per repeat (untimed)\n"
    )
    timing_rows = []
    check_rows = []
    for r in results:
        m = r["median_s"]
        base = m["torch-pruning"]
        timing_rows.append(
            [
                f"{r['model']} {r['conv']} (idx {r['fxindex_index']})",
                r["channels"],
                f"{base * 1e3:.0f} (build {m['torch-pruning DependencyGraph build'] * 1e3:.0f})",
                f"{m['fxindex.plan'] * 1e3:.0f} ({m['fxindex.plan'] / base:.2f}x)",
                f"{m['fxindex.replace inplace'] * 1e3:.0f} ({m['fxindex.replace inplace'] / base:.2f}x)",
                f"{m['fxindex.replace copying'] * 1e3:.0f} ({m['fxindex.replace copying'] / base:.2f}x)",
                f"{m['fxindex.trace + replace inplace on the trace'] * 1e3:.0f} "
                f"({m['fxindex.trace + replace inplace on the trace'] / base:.2f}x)",
                f"{m['fxindex.replace inplace, no example_inputs'] * 1e3:.0f} "
                f"({m['fxindex.replace inplace, no example_inputs'] / base:.2f}x)",
                f"{m['fxindex.resize inplace'] * 1e3:.0f} ({m['fxindex.resize inplace'] / base:.2f}x)",
            ]
        )
        c = r["checks"]
        mismatches = c["parameter_shape_mismatches"]
        check_rows.append(
            [
                r["model"],
                "x".join(map(str, c["output_shape_tp"])) + " / " + "x".join(map(str, c["output_shape_fxindex"])),
                "yes" if c["state_dict_keys_equal"] and not mismatches else f"no: {mismatches}",
                f"{c['num_parameters_tp']:,} / {c['num_parameters_fxindex']:,}",
                "-" if c["max_abs_diff_tp_vs_fxindex"] is None else f"{c['max_abs_diff_tp_vs_fxindex']:.2g}"
                + f" (on the trace: {c['max_abs_diff_tp_vs_fxindex_on_trace']:.2g})",
                f"{c['max_abs_diff_vs_unpruned']:.2g}",
                ", ".join(c["plan_touches"]),
            ]
        )
    print("Time in ms (x: ratio to Torch-Pruning's build + group + prune)")
    print(
        common.table(
            timing_rows,
            headers=[
                "edit",
                "out channels",
                "torch-pruning",
                "fxindex.plan",
                "replace inplace",
                "replace copying",
                "trace(shapes) + replace on it",
                "replace inplace, no shapes",
                "resize inplace",
            ],
        )
    )
    print("\nDo the two pruned models agree? (tp / fxindex)")
    print(
        common.table(
            check_rows,
            headers=[
                "model",
                "output shape",
                "same param shapes",
                "params",
                "max|Δ| tp vs fxindex",
                "max|Δ| vs unpruned",
                "fxindex plan",
            ],
        )
    )
    elapsed = common.print_elapsed(started)
    common.write_results(
        args.output,
        "bench_torch_pruning",
        {"results": results},
        quick=args.quick,
        elapsed=elapsed,
        torch_pruning=version,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
