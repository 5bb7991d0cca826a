"""fxindex.replace against the hand-written swap a user would write instead.

The usual answer to "how do I replace layer k of my model?" is a recursive
``named_children()`` walk that counts leaf modules in definition order and
``setattr``s the new layer on the k-th leaf's parent. This script measures,
on ``fxindex.examples.SeedModel`` (inputs ``seed_inputs()``) and torchvision's
resnet18 and vgg11 (random weights, eval, 1x3x64x64):

* the time to find and swap the layer, hand-written (the walk + ``setattr``,
  in place) against ``fxindex.replace(model, k, layer, example_inputs=...)``
  copying (the default) and with ``inplace=True`` (which edits a fresh trace,
  never the model itself); both include tracing and shape recording, since a
  user starts from the ``nn.Module``;
* whether the result runs (else the exception's type and first line) and how
  far its output is from the original's: the widening tasks copy the old
  filters into the new conv, so a correct edit keeps the output (the extra
  filters are random; fxindex gives the next layer zero weights for them);
* the index mismatch: the k-th leaf in definition order is not the k-th call
  site when a model defines layers in another order than it calls them, or
  calls one module twice (resnet's ``relu``), so "layer k" names different
  layers in the two schemes.

Tasks: "widen" (seed ``conv1`` -> ``Conv2d(3, 21, 3)``, resnet18
``layer1.0.conv1`` -> ``Conv2d(64, 72, 3, padding=1, bias=False)``, vgg11
``features.0`` -> ``Conv2d(3, 80, 3, padding=1)``) and "head" (the last
Linear -> ``Linear(in, 10)``). Each approach gets the index of the intended
layer in its own numbering (the best case for the hand-written walk); the
column "walk at fxindex's k" shows what the walk would hit with fxindex's
number.

Timing: the approaches run in rounds, in an order that rotates from round to
round; the hand-written swap takes microseconds, so each round times several
single swaps (each undone, untimed, before the next). Medians are reported.

Usage:
    python benchmarks/bench_handwritten.py            # ~1 min
    python benchmarks/bench_handwritten.py --quick    # 2 rounds (< 1 min)

Writes ``benchmarks/results/bench_handwritten.json`` (see ``--output``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fxindex

try:  # imported as benchmarks.bench_handwritten
    from . import common
except ImportError:  # run as a script: its folder is sys.path[0]
    import common


# --------------------------------------------------------------------------- the hand-written way


def leaf_walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Leaves in definition order, as ``(qualified name, parent, attribute, leaf)``: the recursive walk users write."""
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if next(child.children(), None) is None:
            yield qualified, module, name, child
        else:
            yield from leaf_walk(child, qualified)


def handwritten_replace(model: nn.Module, k: int, new_layer: nn.Module) -> tuple[str, nn.Module, str, nn.Module]:
    """Swap the k-th leaf (definition order) for ``new_layer`` in place, as the usual answer does.

    Returns:
        ``(qualified name, parent, attribute, old leaf)``, so the caller can undo the swap.

    Raises:
        IndexError: the model has fewer than ``k + 1`` leaves.
    """
    for position, (name, parent, attribute, leaf) in enumerate(leaf_walk(model)):
        if position == k:
            setattr(parent, attribute, new_layer)
            return name, parent, attribute, leaf
    raise IndexError(f"layer index {k} out of range")


# --------------------------------------------------------------------------- models and tasks


@dataclass
class Task:
    """One edit: replace ``target`` of ``model_name`` by ``make(old module)``."""

    model_name: str
    kind: str  # "widen" or "head"
    target: str
    make: Callable[[nn.Module], nn.Module]
    description: str


def build_models(names: list[str]) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """name -> (model in eval mode, example inputs)."""
    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]] = {}
    for name in names:
        if name == "seed":
            models[name] = (fxindex.examples.SeedModel().eval(), fxindex.examples.seed_inputs())
        else:
            import torchvision  # only needed for the zoo models

            models[name] = (getattr(torchvision.models, name)(weights=None).eval(), (torch.randn(1, 3, 64, 64),))
    return models


TASKS = [
    Task("seed", "widen", "conv1", lambda old: common.widened_conv(old, 21), "conv1 -> Conv2d(3, 21, 3)"),
    Task("seed", "head", "nested.1", lambda old: nn.Linear(old.in_features, 10), "nested.1 -> Linear(16, 10)"),
    Task(
        "resnet18",
        "widen",
        "layer1.0.conv1",
        lambda old: common.widened_conv(old, 72),
        "layer1.0.conv1 -> Conv2d(64, 72, 3, padding=1, bias=False)",
    ),
    Task("resnet18", "head", "fc", lambda old: nn.Linear(old.in_features, 10), "fc -> Linear(512, 10)"),
    Task(
        "vgg11",
        "widen",
        "features.0",
        lambda old: common.widened_conv(old, 80),
        "features.0 -> Conv2d(3, 80, 3, padding=1)",
    ),
    Task(
        "vgg11", "head", "classifier.6", lambda old: nn.Linear(old.in_features, 10), "classifier.6 -> Linear(4096, 10)"
    ),
]


# --------------------------------------------------------------------------- checks


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:110]


def run_outcome(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: torch.Tensor) -> dict[str, Any]:
    """Whether ``model`` runs on ``inputs``, its output shape and its distance to ``reference``."""
    try:
        with torch.no_grad():
            output = model(*inputs)
    except Exception as error:  # the point is to report how a broken edit fails
        return {"runs": False, "error": first_line(error), "output": None}
    same_shape = output.shape == reference.shape
    return {
        "runs": True,
        "error": None,
        "shape": "x".join(map(str, output.shape)),
        "max_abs_diff_vs_original": (output - reference).abs().max().item() if same_shape else None,
        "output": output,
    }


def describe(outcome: dict[str, Any]) -> str:
    if not outcome["runs"]:
        return f"fails: {outcome['error']}"
    diff = outcome["max_abs_diff_vs_original"]
    return f"runs, {outcome['shape']}" + ("" if diff is None else f", max|Δ| vs original {diff:.2g}")


# --------------------------------------------------------------------------- timing


def measure_task(
    task: Task, model: nn.Module, inputs: tuple[torch.Tensor, ...], rounds: int, inner: int
) -> dict[str, Any]:
    """Times and outcomes of both approaches on one task."""
    leaves = [name for name, *_ in leaf_walk(model)]
    layers = fxindex.index(model)
    k_def = leaves.index(task.target)
    k_fx = layers.position(task.target)
    walk_at_fx_k = leaves[k_fx] if k_fx < len(leaves) else f"IndexError ({len(leaves)} leaves)"
    prototype = task.make(model.get_submodule(task.target))
    with torch.no_grad():
        reference = model(*inputs)

    # Outcomes, once, untimed. The hand-written swap is undone right after, so the model stays the original.
    name, parent, attribute, old = handwritten_replace(model, k_def, copy.deepcopy(prototype))
    assert name == task.target
    hand = run_outcome(model, inputs, reference)
    setattr(parent, attribute, old)
    try:
        rebuilt = fxindex.replace(model, k_fx, copy.deepcopy(prototype), example_inputs=inputs)
        fx_outcome = run_outcome(rebuilt, inputs, reference)
    except fxindex.FxIndexError as error:
        fx_outcome = {"runs": False, "error": first_line(error), "output": None}
    agreement = None
    if hand["runs"] and fx_outcome["runs"] and hand["output"].shape == fx_outcome["output"].shape:
        agreement = (hand["output"] - fx_outcome["output"]).abs().max().item()

    def handwritten_block() -> list[float]:
        times = []
        for _ in range(inner):
            layer = copy.deepcopy(prototype)  # a fresh layer each swap, made outside the timed region
            start = time.perf_counter()
            _, parent, attribute, old = handwritten_replace(model, k_def, layer)
            times.append(time.perf_counter() - start)
            setattr(parent, attribute, old)  # undo, untimed
        return times

    def fxindex_call(inplace: bool) -> Callable[[], list[float]]:
        def call() -> list[float]:
            layer = copy.deepcopy(prototype)
            return [common.timed(fxindex.replace, model, k_fx, layer, example_inputs=inputs, inplace=inplace)]

        return call

    contenders = {
        "hand-written": handwritten_block,
        "fxindex copying": fxindex_call(False),
        "fxindex inplace": fxindex_call(True),
    }
    for function in contenders.values():  # warm-up
        function()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _, name in common.rotation(list(contenders), rounds):
        samples[name].extend(contenders[name]())  # each contender times its own calls
    with torch.no_grad():  # the timed swaps were all undone: the model is the original again
        assert torch.equal(model(*inputs), reference)
    return {
        "model": task.model_name,
        "task": task.kind,
        "edit": task.description,
        "target": task.target,
        "k_definition_order": k_def,
        "k_fxindex": k_fx,
        "walk_at_fxindex_k": walk_at_fx_k,
        "median_s": common.medians(samples),
        "samples": {name: len(times) for name, times in samples.items()},
        "handwritten": {key: value for key, value in hand.items() if key != "output"},
        "fxindex": {key: value for key, value in fx_outcome.items() if key != "output"},
        "max_abs_diff_handwritten_vs_fxindex": agreement,
    }


# --------------------------------------------------------------------------- index mismatch


class DefinedOutOfOrder(nn.Module):
    """Layers defined head first but called stem first, with one activation called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.act = nn.ReLU()
        self.body = nn.Linear(32, 16)
        self.stem = nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(self.act(self.stem(x)))))


def order_rows(model: nn.Module) -> list[tuple[int, str, str]]:
    """(k, k-th leaf in definition order, k-th fxindex call site) for every k of either numbering."""
    leaves = [name for name, *_ in leaf_walk(model)]
    sites = [entry.target for entry in fxindex.index(model)]
    return [
        (k, leaves[k] if k < len(leaves) else "(IndexError)", sites[k] if k < len(sites) else "(LayerIndexError)")
        for k in range(max(len(leaves), len(sites)))
    ]


def mismatch_summary(name: str, model: nn.Module) -> dict[str, Any]:
    rows = order_rows(model)
    differing = [k for k, leaf, site in rows if leaf != site]
    first = differing[0] if differing else None
    return {
        "model": name,
        "leaves": sum(1 for _ in leaf_walk(model)),
        "call_sites": len(fxindex.index(model)),
        "same_module_at_k": len(rows) - len(differing),
        "first_differing_k": first,
        "at_first_differing_k": None if first is None else f"walk: {rows[first][1]} / fxindex: {rows[first][2]}",
    }


def relu_demo(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """Replace "layer 9" of resnet18 (fxindex: the block's second relu call) by Identity, three ways."""
    k = 9
    site = fxindex.index(model)[k].target
    with torch.no_grad():
        reference = model(*inputs)
    results = []

    def identity_sites(edited: nn.Module) -> list[int]:
        return [entry.index for entry in fxindex.index(edited) if isinstance(entry.module, nn.Identity)]

    rebuilt = fxindex.replace(model, k, nn.Identity(), example_inputs=inputs)
    with torch.no_grad():
        intended = rebuilt(*inputs)
    results.append(
        {
            "approach": f"fxindex.replace(model, {k}, Identity())",
            "swapped": f"call site {k} of {site} only",
            "identity_at_call_sites": identity_sites(rebuilt),
            "max_abs_diff_vs_fxindex": 0.0,
            "max_abs_diff_vs_original": (intended - reference).abs().max().item(),
        }
    )
    def by_name(edited: nn.Module) -> str:
        # The other hand-written fix: address the module by name instead of counting.
        parent_name, _, attribute = site.rpartition(".")
        setattr(edited.get_submodule(parent_name), attribute, nn.Identity())
        return site

    for label, edit in (
        (f"walk to leaf {k} + setattr", lambda edited: handwritten_replace(edited, k, nn.Identity())[0]),
        (f"setattr by name '{site}'", by_name),
    ):
        edited = copy.deepcopy(model)
        swapped = edit(edited)
        with torch.no_grad():
            output = edited(*inputs)
        results.append(
            {
                "approach": label,
                "swapped": f"module {swapped}",
                "identity_at_call_sites": identity_sites(edited),
                "max_abs_diff_vs_fxindex": (output - intended).abs().max().item(),
                "max_abs_diff_vs_original": (output - reference).abs().max().item(),
            }
        )
    return results


# --------------------------------------------------------------------------- report


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds (< 1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per task (default 15, quick 2)")
    parser.add_argument("--models", nargs="+", default=["seed", "resnet18", "vgg11"], help="models to run")
    common.add_output_argument(parser, "bench_handwritten")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steadier on a busy machine; the forwards here are only checks
    rounds = args.rounds or (2 if args.quick else 15)
    inner = 10  # hand-written swaps per round: each takes microseconds
    started = time.perf_counter()
    models = build_models(args.models)

    results = []
    for task in TASKS:
        if task.model_name not in models:
            continue
        model, inputs = models[task.model_name]
        results.append(measure_task(task, model, inputs, rounds, inner))
        common.progress(f"{task.model_name} {task.kind}", started)

    print(
        f"{common.machine_line()}, 1 thread; "
        f"medians of {rounds} interleaved rounds ({inner} swaps per round for the hand-written walk)\n"
    )
    timing_rows = []
    outcome_rows = []
    for r in results:
        m = r["median_s"]
        timing_rows.append(
            [
                r["model"],
                r["edit"],
                f"{r['k_definition_order']} / {r['k_fxindex']}",
                r["walk_at_fxindex_k"],
                _time(m["hand-written"]),
                _time(m["fxindex copying"]),
                _time(m["fxindex inplace"]),
                f"{m['fxindex inplace'] / m['hand-written']:.0f}x",
            ]
        )
        agreement = r["max_abs_diff_handwritten_vs_fxindex"]
        outcome_rows.append(
            [
                r["model"],
                r["task"],
                describe(r["handwritten"]),
                describe(r["fxindex"]),
                "-" if agreement is None else f"{agreement:.2g}",
            ]
        )
    print("Find + swap time (hand-written: walk + setattr in place; fxindex: trace + shapes + plan + rebuild)")
    print(
        common.table(
            timing_rows,
            headers=[
                "model",
                "edit",
                "k (walk / fxindex)",
                "walk at fxindex's k",
                "hand-written",
                "fxindex copying",
                "fxindex inplace",
                "inplace / hand-written",
            ],
        )
    )
    print("\nDoes the result run, and does it keep the output (widening copies the old filters)?")
    print(
        common.table(
            outcome_rows, headers=["model", "task", "hand-written", "fxindex", "max|Δ| hand-written vs fxindex"]
        )
    )

    print("\nIndex mismatch: k-th leaf in definition order (the walk) vs k-th call site (fxindex)")
    print(common.table(order_rows(DefinedOutOfOrder()), headers=["k", "walk: k-th leaf", "fxindex: k-th call site"]))
    print("(DefinedOutOfOrder: defines head, act, body, stem; calls stem, act, body, act, head)\n")
    summaries = [mismatch_summary("DefinedOutOfOrder", DefinedOutOfOrder())] + [
        mismatch_summary(name, model) for name, (model, _) in models.items()
    ]
    print(
        common.table(
            [
                [
                    s["model"],
                    s["leaves"],
                    s["call_sites"],
                    s["same_module_at_k"],
                    "-" if s["first_differing_k"] is None else s["first_differing_k"],
                    s["at_first_differing_k"] or "-",
                ]
                for s in summaries
            ],
            headers=[
                "model",
                "leaves (walk)",
                "call sites (fxindex)",
                "k naming the same module",
                "first k that differs",
                "there",
            ],
        )
    )
    demo = []
    if "resnet18" in models:
        model, inputs = models["resnet18"]
        demo = relu_demo(model, inputs)
        print("\nresnet18, 'replace layer 9 by Identity' (fxindex's 9: the second call of layer1.0.relu)")
        print(
            common.table(
                [
                    [d["approach"], d["swapped"], d["identity_at_call_sites"], f"{d['max_abs_diff_vs_fxindex']:.2g}"]
                    for d in demo
                ],
                headers=["approach", "what it swapped", "call sites now Identity", "max|Δ| vs fxindex result"],
            )
        )
    elapsed = common.print_elapsed(started)
    common.write_results(
        args.output,
        "bench_handwritten",
        {
            "tasks": results,
            "order_mismatch": {"DefinedOutOfOrder": order_rows(DefinedOutOfOrder()), "summaries": summaries},
            "resnet18_relu_demo": demo,
        },
        quick=args.quick,
        elapsed=elapsed,
        rounds=rounds,
        handwritten_swaps_per_round=inner,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
