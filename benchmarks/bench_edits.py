"""Issue 10, points 2 and 3: code generated once per trace, cheap in-place edits, light copies.

Measured side by side, ratios of medians (see common.interleaved):

* ``trace`` without shapes against ``torch.fx.symbolic_trace`` (resnet50,
  vit_b_16): fxindex used to generate the forward twice.
* In place, on resnet50: a module-only replace (``layer4.2.conv3`` by a
  same-shaped copy: no argument changes, so no code generation) against
  ``add_submodule`` + the fast-lookup cache refresh, and a replace that
  rewrites the graph (a widening of ``layer4.2.conv2``, which rebuilds
  ``bn2`` and ``conv3``... and here the whole residual group) against one
  ``recompile()``. The install step (``apply_plan`` of a computed plan) is
  also timed alone: planning runs the new layer on fake tensors and checks
  the function-preserving claim by running old and new layer once, which
  is not code generation.
* Ten in-place single edits against the same ten inside
  ``fxindex.deferred_codegen``.
* A copying replace of one vit_b_16 MLP layer: extra memory kept (bytes of
  tensors the result does not share with the original) and extra peak RSS
  (measured in a fresh subprocess per mode), for the default deep copy and
  ``share_untouched=True``, against the touched layers' parameter bytes.

Run: ``python benchmarks/bench_edits.py`` (``--quick`` for fewer rounds).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch
import torchvision
from torch import fx, nn

import fxindex
from fxindex._replace import _plan_edit, apply_plan

try:
    import common
except ImportError:  # imported as benchmarks.bench_edits
    from benchmarks import common

NAME = "bench_edits"


def _same_conv(old: nn.Conv2d) -> nn.Conv2d:
    """A same-shaped copy: replacing with it swaps a module and changes no argument."""
    return copy.deepcopy(old)


def trace_ratios(rounds: int) -> list[list[str]]:
    rows = []
    for name, build in (("resnet50", torchvision.models.resnet50), ("vit_b_16", torchvision.models.vit_b_16)):
        model = build().eval()
        samples = common.interleaved(
            {"symbolic_trace": lambda: fx.symbolic_trace(model), "fxindex.trace": lambda: fxindex.trace(model)}, rounds
        )
        m = common.medians(samples)
        rows.append([name, f"{m['symbolic_trace'] * 1e3:.1f} ms", f"{m['fxindex.trace'] * 1e3:.1f} ms",
                     f"{m['fxindex.trace'] / m['symbolic_trace']:.2f}x"])
    return rows


def inplace_ratios(rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = (torch.randn(1, 3, 64, 64),)
    base = fxindex.trace(model, example_inputs=x)
    target = "layer4.2.conv3"
    swap = _same_conv(base.get_submodule(target))
    widened = common.widened_conv(base.get_submodule("layer4.2.conv2"), 520)

    def fresh() -> tuple[fx.GraphModule]:
        return (copy.deepcopy(base),)

    def add_submodule_and_call(gm: fx.GraphModule) -> None:
        gm.add_submodule(target, swap)

    def recompile(gm: fx.GraphModule) -> None:
        gm.recompile()

    def module_only(gm: fx.GraphModule) -> None:
        fxindex.replace(gm, target, swap, inplace=True)

    def rewriting(gm: fx.GraphModule) -> None:
        fxindex.insert(gm, "layer4.2.bn3", nn.Identity(), inplace=True)  # a new node: new code

    samples = common.interleaved(
        {"add_submodule": add_submodule_and_call, "recompile": recompile, "replace (module only)": module_only,
         "replace (rewrites graph)": rewriting},
        rounds,
        setup=fresh,
    )
    # The install alone: a plan computed once, applied to fresh copies.
    _, module_plan, _ = _plan_edit("bench", base, target, swap, None, None, True, False)
    _, widen_plan, _ = _plan_edit("bench", base, "layer4.2.conv2", widened, None, None, True, False)
    removal = copy.deepcopy(base)
    _, remove_plan = _removal_plan(removal, "layer4.2.bn3")
    from fxindex._speed import CACHE_ATTRIBUTE, _build_lookup, _containers_of

    targets = list(dict.fromkeys(str(node.target) for node in base.graph.nodes if node.op == "call_module"))
    containers = _containers_of(targets)

    def refresh_cache(gm: fx.GraphModule) -> None:
        # What the next forward does after a swap: rebuild the fast-lookup cache.
        gm.__dict__[CACHE_ATTRIBUTE] = _build_lookup(gm, gm.__dict__[CACHE_ATTRIBUTE][0], containers, targets)

    def add_and_refresh(gm: fx.GraphModule) -> None:
        gm.add_submodule(target, swap)
        refresh_cache(gm)

    def install_and_refresh(gm: fx.GraphModule) -> None:
        apply_plan(gm, module_plan)
        refresh_cache(gm)

    installs = common.interleaved(
        {"install (module only)": lambda gm: apply_plan(gm, module_plan),
         "install + cache refresh": install_and_refresh, "add_submodule + cache refresh": add_and_refresh,
         "install (widening, modules only)": lambda gm: apply_plan(gm, widen_plan),
         "install (rewrites graph)": lambda gm: apply_plan(gm, remove_plan),
         "recompile": recompile, "add_submodule": add_submodule_and_call},
        rounds,
        setup=fresh,
    )
    m, i = common.medians(samples), common.medians(installs)
    return [
        ["replace, module only (whole call)", f"{m['replace (module only)'] * 1e3:.2f} ms",
         f"{m['replace (module only)'] / m['add_submodule']:.1f}x add_submodule", "planning included"],
        ["install, module only", f"{i['install (module only)'] * 1e3:.3f} ms",
         f"{i['install (module only)'] / i['add_submodule']:.2f}x add_submodule", ""],
        ["install + cache refresh, module only", f"{i['install + cache refresh'] * 1e3:.3f} ms",
         f"{i['install + cache refresh'] / i['add_submodule + cache refresh']:.2f}x add_submodule + cache refresh",
         "≤ 1.1x asked"],
        ["install, widening conv2 (bn2, conv3 rebuilt: modules only)", f"{i['install (widening, modules only)'] * 1e3:.3f} ms",
         f"{i['install (widening, modules only)'] / i['add_submodule']:.2f}x add_submodule", ""],
        ["insert, new node (whole call)", f"{m['replace (rewrites graph)'] * 1e3:.1f} ms",
         f"{m['replace (rewrites graph)'] / m['recompile']:.1f}x recompile", "planning included"],
        ["install, removal (new graph)", f"{i['install (rewrites graph)'] * 1e3:.1f} ms",
         f"{i['install (rewrites graph)'] / i['recompile']:.2f}x recompile", "≤ 1.5x asked"],
    ]


def _removal_plan(gm: fx.GraphModule, name: str):
    """The plan of removing ``name`` (a graph rewrite: a node goes), computed like fxindex.remove does."""
    from fxindex._propagate import Target, build_plan
    from fxindex.rules import Widths, find_widths

    layers = fxindex.index(gm)
    node = layers.node(name)
    widths = find_widths(gm.get_submodule(name))
    passed = Widths(widths.in_dim, widths.in_size, widths.in_dim, widths.in_size) if widths else None
    target = Target(node, nn.Identity(), None, name, "remove", widths, passed)
    return gm, build_plan(gm, [target])


def batch_ratio(rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(40) for layer in (nn.Linear(16, 16), nn.ReLU())]).eval()
    base = fxindex.trace(model, example_inputs=(torch.randn(2, 16),))

    def fresh() -> tuple[fx.GraphModule]:
        return (copy.deepcopy(base),)

    def ten_edits(gm: fx.GraphModule) -> None:
        for _ in range(10):
            fxindex.insert(gm, 0, nn.Tanh(), inplace=True)

    def ten_deferred(gm: fx.GraphModule) -> None:
        with fxindex.deferred_codegen(gm):
            ten_edits(gm)

    def one_call(gm: fx.GraphModule) -> None:
        fxindex.insert(gm, {i: nn.Tanh() for i in range(0, 20, 2)}, inplace=True)

    m = common.medians(common.interleaved(
        {"ten single edits": ten_edits, "ten inside deferred_codegen": ten_deferred, "one call of ten": one_call},
        rounds, setup=fresh,
    ))
    return [[name, f"{value * 1e3:.0f} ms", f"{value / m['one call of ten']:.2f}x"] for name, value in m.items()]


_MEMORY_CHILD = r"""
import json, resource, sys, torch, torchvision, fxindex
share = sys.argv[1] == "light"
torch.manual_seed(0)
model = torchvision.models.vit_b_16().eval()
x = (torch.randn(1, 3, 224, 224),)
gm = fxindex.trace(model, example_inputs=x)
target = "encoder.layers.encoder_layer_5.mlp.0"
old = gm.get_submodule(target)
new = torch.nn.Linear(old.in_features, old.out_features + 64)
with torch.no_grad():
    new.weight[: old.out_features] = old.weight
    new.bias[: old.out_features] = old.bias
plan = fxindex.plan(gm, target, new)
import gc; gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import sys as _s
result = fxindex.replace(gm, target, new, share_untouched=share)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
original = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
kept = sum(t.numel() * t.element_size() for t in (*result.parameters(), *result.buffers())
           if t.untyped_storage().data_ptr() not in original)
nodes = {n.name: n for n in gm.graph.nodes}
touched = sum(
    p.numel() * p.element_size()
    for e in plan.edits if e.module is not None and nodes[e.node].op == "call_module"
    for p in gm.get_submodule(nodes[e.node].target).parameters()
)
new_bytes = sum(p.numel() * p.element_size() for e in plan.edits if e.module is not None for p in e.module.parameters())
print(json.dumps({"peak_extra": (peak - before) * 1024, "kept_extra": kept, "touched_old": touched,
                  "touched_new": new_bytes, "params": sum(p.numel() * p.element_size() for p in gm.parameters())}))
"""


def memory_rows() -> list[list[str]]:
    rows = []
    for mode in ("deep", "light"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = 1 << 20
        budget = 1.5 * r["touched_new"] + 16 * mib
        rows.append([
            "default deep copy" if mode == "deep" else "share_untouched=True",
            f"{r['kept_extra'] / mib:.1f} MiB", f"{r['peak_extra'] / mib:.1f} MiB",
            f"{r['touched_new'] / mib:.1f} MiB", f"{budget / mib:.1f} MiB", f"{r['params'] / mib:.0f} MiB",
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    common.add_output_argument(parser, NAME)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 3 if args.quick else 7
    started = time.perf_counter()
    print(common.machine_line())
    results = {}
    rows = trace_ratios(rounds)
    results["trace"] = rows
    print("\ntrace without shapes\n" + common.table(rows, ["model", "symbolic_trace", "fxindex.trace", "ratio"]))
    rows = inplace_ratios(rounds)
    results["inplace"] = rows
    print("\nin-place edits of resnet50\n" + common.table(rows, ["what", "median", "ratio", "note"]))
    rows = batch_ratio(rounds)
    results["batch"] = rows
    print("\nten inserts into a 80-layer MLP\n" + common.table(rows, ["how", "median", "vs one call"]))
    rows = memory_rows()
    results["memory"] = rows
    print("\ncopying replace of one vit_b_16 MLP Linear (+64 outputs)\n" + common.table(
        rows, ["mode", "kept extra", "peak extra (RSS)", "rebuilt layers' bytes", "asked: 1.5x + 16 MiB", "model"]))
    elapsed = common.print_elapsed(started)
    common.write_results(args.output, NAME, results, quick=args.quick, elapsed=elapsed)


if __name__ == "__main__":
    main()
