"""Issue 11: models only torch.export captures, traced and widened at every Conv2d/Linear call site.

timm's ``mobilevit_xxs`` and ``efficientvit_b0`` and torchvision's
``raft_small`` stop symbolic tracing on data-dependent ``if``s; the issue
asks that they "trace through the export path and widen at least half of
their Conv/Linear sites with exact outputs". For each model (random weights,
eval mode, one torch thread; 1x3x256x256 for mobilevit_xxs, 1x3x224x224 for
efficientvit_b0, two 1x3x128x128 frames for raft_small) the script:

1. traces it with ``fxindex.trace(model, example_inputs=...)`` (``capture="auto"``)
   and checks that ``gm.meta["fxindex_capture"]`` is ``"export"`` and that the
   lifted graph's outputs equal the model's (every output: RAFT returns a list
   of 12 flow fields);
2. for every Conv2d and Linear call site of ``fxindex.index(gm)``, widens the
   layer by 8 outputs, function-preservingly (the old weights in the first
   rows, zeros after), with ``couple=True`` (the default: a change that stops
   at a join resizes the layer's whole channel group). Each site is planned
   once with ``fxindex.plan`` and the plan installed into a deep copy with
   ``fxindex.replace``'s own second half (``apply_plan``): exactly what
   ``fxindex.replace(gm, site, wider)`` does, without planning twice. Where
   the plan is refused (a fused ``qkv`` Linear whose outputs split into q, k,
   v x heads x head_dim cannot take 8 more), the site is resized instead:
   ``fxindex.plan_resize(gm, site, width + 8)`` (the whole group, the layer's
   own input included), else the smallest larger width its refusal lists as
   working ("widths that work here: ...", each one solved over the group, not
   estimated), the plan installed as above: the new outputs are zero there
   too, and the outcome is sorted the same way;
3. sorts each site into one of: **same output** (the rebuilt graph lints and
   its outputs equal the original's on the original's slots, with a tolerance
   relative to the output's magnitude), **crosses a normalisation** (the plan
   itself says the function changes: new channels enter a LayerNorm's
   statistics, say; the rebuilt model runs with the right shapes), **refused**
   (an ``FxIndexError``, tallied by type and the first line of its message
   with layer and node names blanked), **wrong output** (a plan that claims to
   preserve the function but does not, or a rebuilt graph that fails: must be
   zero), and **not attempted** (grouped and depthwise convolutions: 8 more
   outputs is not a width such a layer can take alone).

The share is "same output" over every Conv2d/Linear call site (grouped ones
included), and over the groups=1 sites beside it.

Run: ``python benchmarks/bench_export_models.py`` (~1.5 min on 2 cores);
``--quick`` (mobilevit_xxs, 8 sites spread over the model, < 1 min);
``--models raft_small`` one model; ``--sites N`` N sites per model, first and
last included. Needs timm and torchvision (the test extra).
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxindex
from fxindex._replace import apply_plan

try:
    import common
except ImportError:  # imported as benchmarks.bench_export_models
    from benchmarks import common

NAME = "bench_export_models"
MODELS = ("mobilevit_xxs", "efficientvit_b0", "raft_small")
QUICK_SITES = 8
EXTRA = 8  # outputs added at each site


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model with random weights in eval mode, and its example inputs (seeded).

    Args:
        name: one of :data:`MODELS`.

    Returns:
        ``(model, inputs)``.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name == "raft_small":
        from torchvision.models.optical_flow import raft_small

        # RAFT needs both sides divisible by 8; 128x128 keeps its correlation volume small.
        frames = tuple(torch.randn(1, 3, 128, 128, generator=generator) for _ in range(2))
        return raft_small(weights=None).eval(), frames
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, (torch.randn(1, *size, generator=generator),)


def widened(module: nn.Module, extra: int = EXTRA) -> nn.Module:
    """A copy of a Linear or a groups=1 Conv2d with ``extra`` more outputs: the old weights first, zeros after.

    Args:
        module: the layer to widen.
        extra: how many outputs to add.

    Returns:
        The new layer (same dtype; the new rows of weight and bias are zero).
    """
    if isinstance(module, nn.Linear):
        wider: nn.Module = nn.Linear(module.in_features, module.out_features + extra, bias=module.bias is not None)
    else:
        assert isinstance(module, nn.Conv2d) and module.groups == 1
        wider = nn.Conv2d(
            module.in_channels, module.out_channels + extra, module.kernel_size, module.stride, module.padding,
            module.dilation, 1, module.bias is not None, module.padding_mode,
        )
    wider = wider.to(module.weight.dtype)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[: module.weight.shape[0]] = module.weight
        if module.bias is not None:
            wider.bias.zero_()
            wider.bias[: module.bias.shape[0]] = module.bias
    return wider


def outputs_of(value: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or a list/tuple of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in outputs_of(item)]
    raise TypeError(f"unexpected output type {type(value).__name__}")


def difference(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> str | None:
    """``None`` when ``outputs`` equal ``reference`` on the reference's slots, else what differs.

    A widened head gives more slots than the original: only the first ones are
    compared. The tolerance is relative to each output's magnitude (random
    weights let activations grow large in deep models).
    """
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, expected {len(reference)}"
    for number, (output, expected) in enumerate(zip(outputs, reference)):
        if output.dim() != expected.dim() or any(o < e for o, e in zip(output.shape, expected.shape)):
            return f"output {number}: shape {tuple(output.shape)}, expected {tuple(expected.shape)}"
        output = output[tuple(slice(0, size) for size in expected.shape)]
        scale = max(1.0, expected.abs().max().item())
        if not torch.allclose(output, expected, atol=1e-5 * scale, rtol=1e-4):
            return f"output {number}: max |difference| {(output - expected).abs().max().item():.3g}"
    return None


# Names in quotes never hold a space ("the layer's own input" is not a name).
_QUOTED = re.compile(r"'[^'\s]+'")
_GROUP_TRIED = "; resizing the whole channel group was tried: "
_NUMBER = re.compile(r"\d+")


def cause_of(error: BaseException) -> str:
    """The type and first line of an error, with quoted names and numbers blanked, so equal causes tally together."""
    line = str(error).splitlines()[0] if str(error) else ""
    line = _NUMBER.sub("N", _QUOTED.sub("'…'", line))
    return f"{type(error).__name__}: {line}"


def short_cause(cause: str, width: int = 180) -> str:
    """A tallied cause for a table: the forward refusal's first clause, and why resizing the group did not help."""
    forward, _, group = cause.partition(_GROUP_TRIED)
    kind, _, message = forward.partition(": ")
    message = message.removeprefix("fxindex.plan: ")
    text = f"{kind}: {message.split('): ')[0]})" if "): " in message else f"{kind}: {message}"
    text = re.sub(r"cannot propagate through node '…' \((.*)\)$", r"stops at \1", text)
    if group:
        group = group.removeprefix("its channel group cannot be resized either: ")
        text += "; group: " + re.sub(r"^node '…' \(([^)]*)\)", r"\1", group)
    return text if len(text) <= width else text[: width - 1] + "…"


def eligible(layers: fxindex.LayerIndex) -> tuple[list[int], list[int]]:
    """``(every Conv2d/Linear call site, those that are Linear or groups=1 Conv2d)``."""
    all_sites = [entry.index for entry in layers if isinstance(entry.module, (nn.Conv2d, nn.Linear))]
    plain = [
        site for site in all_sites
        if isinstance(layers[site].module, nn.Linear) or layers[site].module.groups == 1
    ]
    return all_sites, plain


def spread(sites: list[int], count: int | None) -> list[int]:
    """``count`` sites evenly spread over ``sites``, first and last included (all of them when ``None``)."""
    if count is None or len(sites) <= count:
        return sites
    if count == 1:
        return sites[:1]
    step = (len(sites) - 1) / (count - 1)
    return sorted({sites[round(k * step)] for k in range(count)})


_WORKING = re.compile(r"widths that work here: ([\d, ]+)")


def structured_widening(gm: torch.fx.GraphModule, site: int, old: int) -> tuple[torch.fx.GraphModule, Any] | None:
    """Widen ``site``'s group by +8 with ``fxindex.plan_resize``, else to the smallest working width above ``old``.

    Returns:
        ``(rebuilt copy, its plan)``, or ``None`` when no larger width works.
    """
    try:
        plan = fxindex.plan_resize(gm, site, old + EXTRA)
    except fxindex.FxIndexError as error:
        found = _WORKING.search(str(error))
        larger = [int(w) for w in found.group(1).replace(" ", "").split(",") if w and int(w) > old] if found else []
        if not larger:
            return None
        try:
            plan = fxindex.plan_resize(gm, site, min(larger))
        except fxindex.FxIndexError:
            return None
    # Planned (and checked to run) once; installed as resize installs it.
    return apply_plan(copy.deepcopy(gm), plan), plan


def widen_site(
    gm: torch.fx.GraphModule, site: int, reference: list[torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> tuple[str, str | None]:
    """Widen one call site on a copy of ``gm`` and say how it went.

    Args:
        gm: the traced model (never modified).
        site: the call site's index.
        reference: the traced model's outputs on ``inputs``.
        inputs: the example inputs.

    Returns:
        ``(outcome, detail)``: outcome is ``"same output"``, ``"crosses a
        normalisation"``, ``"refused"`` (detail: the cause) or ``"wrong
        output"`` (detail: what differs).
    """
    layers = fxindex.index(gm)
    wider = widened(layers[site].module)
    structured = None
    try:
        steps = fxindex.plan(gm, site, wider)
    except fxindex.FxIndexError as error:
        structured = structured_widening(gm, site, layers[site].module.weight.shape[0])
        if structured is None:
            return "refused", cause_of(error)
        steps = structured[1]
    try:
        rebuilt = structured[0] if structured is not None else apply_plan(copy.deepcopy(gm), steps)
        rebuilt.graph.lint()
        with torch.no_grad():
            outputs = outputs_of(rebuilt(*inputs))
    except Exception as error:  # a plan that does not install or run is a bug, not a refusal
        return "wrong output", f"the rebuilt graph fails: {cause_of(error)}"
    found = difference(outputs, reference)
    if steps.preserves_function:
        return ("same output", None) if found is None else ("wrong output", found)
    if len(outputs) != len(reference) or any(
        o.dim() != e.dim() or any(a < b for a, b in zip(o.shape, e.shape)) for o, e in zip(outputs, reference)
    ):
        return "wrong output", f"a non-preserving plan with wrong output shapes: {found}"
    return "crosses a normalisation", steps.breaks_function[0][1] if steps.breaks_function else None


def sweep(name: str, count: int | None, report: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Trace ``name`` through the export path and widen ``count`` of its sites (all when ``None``).

    Args:
        name: one of :data:`MODELS`.
        count: how many sites to widen, spread over the model; ``None`` for every one.
        report: called with a line of progress now and then.

    Returns:
        The model's figures: capture, whether the lifted graph's outputs equal
        the model's, site counts, outcomes, refusal causes, wrong outputs and
        times.
    """
    started = time.perf_counter()
    model, inputs = build(name)
    with torch.no_grad():
        eager = outputs_of(model(*inputs))
    tracing = time.perf_counter()
    try:
        gm = fxindex.trace(model, example_inputs=inputs)
    except fxindex.FxIndexError as error:
        modules = sum(isinstance(module, (nn.Conv2d, nn.Linear)) for module in model.modules())
        return {
            "model": name, "capture": None, "trace_error": cause_of(error), "conv_linear_modules": modules,
            "time_s": time.perf_counter() - started,
        }
    traced = time.perf_counter()
    with torch.no_grad():
        reference = outputs_of(gm(*inputs))
    lifted_equal = len(reference) == len(eager) and all(torch.equal(a, b) for a, b in zip(reference, eager))
    layers = fxindex.index(gm)
    all_sites, plain = eligible(layers)
    chosen = spread(plain, count)
    outcomes: collections.Counter[str] = collections.Counter()
    causes: collections.Counter[str] = collections.Counter()
    normalisations: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    per_site: list[dict[str, Any]] = []
    # Freeze what is alive now (torch, the model, its trace): each per-site collection below then walks
    # only that site's garbage, milliseconds instead of a walk over every object of the process.
    gc.collect()
    gc.freeze()
    try:
        for number, site in enumerate(chosen, 1):
            outcome, detail = widen_site(gm, site, reference, inputs)
            outcomes[outcome] += 1
            per_site.append({
                "site": site, "target": layers[site].target, "layer": type(layers[site].module).__name__,
                "outcome": outcome, "detail": detail,
            })
            if outcome == "refused":
                causes[detail or ""] += 1
            elif outcome == "crosses a normalisation":
                normalisations[_NUMBER.sub("N", _QUOTED.sub("'…'", detail or ""))] += 1
            elif outcome == "wrong output":
                wrong.append(f"site {site} {layers[site].target}: {detail}")
            # A GraphModule copy is a reference cycle: only the collector frees it.
            gc.collect()
            if number % 10 == 0:
                report(f"{name}: {number}/{len(chosen)} sites ({time.perf_counter() - started:.0f} s)")
    finally:
        gc.unfreeze()
    same = outcomes["same output"]
    return {
        "model": name,
        "capture": gm.meta.get("fxindex_capture"),
        "lifted_equals_model": lifted_equal,
        "conv_linear_sites": len(all_sites),
        "grouped_not_attempted": len(all_sites) - len(plain),
        "groups1_sites": len(plain),
        "swept": len(chosen),
        "outcomes": {key: outcomes[key] for key in ("same output", "crosses a normalisation", "refused", "wrong output")},
        "share_of_all_sites": same / len(all_sites) if count is None and all_sites else None,
        "share_of_swept": same / len(chosen) if chosen else None,
        "refusal_causes": causes.most_common(),
        "normalisation_reasons": normalisations.most_common(),
        "wrong_outputs": wrong,
        "sites": per_site,
        "trace_s": traced - tracing,
        "time_s": time.perf_counter() - started,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"mobilevit_xxs, {QUICK_SITES} sites")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: all three")
    parser.add_argument("--sites", type=int, default=None, help="sites per model, spread (default: every site)")
    common.add_output_argument(parser, NAME)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny inputs: one thread is as fast and steadier on a shared machine
    models = args.models or (["mobilevit_xxs"] if args.quick else list(MODELS))
    count = args.sites if args.sites is not None else (QUICK_SITES if args.quick else None)
    started = time.perf_counter()
    results = []
    for name in models:
        result = sweep(name, count, report=lambda text: common.progress(text, started))
        results.append(result)
        common.progress(name, started)
    rows = []
    for result in results:
        if result["capture"] is None:
            modules = f"({result['conv_linear_modules']} modules)"
            rows.append([result["model"], "refused", "-", modules, "-", "-", "-", "-", "-", "-", f"{result['time_s']:.0f}"])
            continue
        outcomes = result["outcomes"]
        same = outcomes["same output"]
        share = result["share_of_all_sites"]
        share_text = (
            f"{_percent(share)} ({_percent(same / result['groups1_sites'])} of groups=1)"
            if share is not None
            else f"{_percent(result['share_of_swept'])} of {result['swept']} swept"
        )
        rows.append([
            result["model"],
            result["capture"],
            "yes" if result["lifted_equals_model"] else "NO",
            f"{result['conv_linear_sites']} ({result['grouped_not_attempted']} grouped)",
            str(same),
            str(outcomes["crosses a normalisation"]),
            str(outcomes["refused"]),
            str(outcomes["wrong output"]),
            share_text,
            f"{result['trace_s']:.1f}",
            f"{result['time_s']:.0f}",
        ])
    print(common.machine_line())
    print(common.table(rows, [
        "model", "capture", "lifted = model", "Conv/Linear sites", "same output", "crosses a norm",
        "refused", "wrong output", "share same output", "trace s", "total s",
    ]))
    for result in results:
        if result["capture"] is None:
            print(f"\n{result['model']}: trace refused: {result['trace_error']}")
            continue
        if result["refusal_causes"]:
            print(f"\n{result['model']}: refusal causes")
            print(common.table(
                [[str(n), short_cause(cause)] for cause, n in result["refusal_causes"]], ["sites", "cause"]
            ))
        refused = collections.Counter(
            _NUMBER.sub("N", site["target"]) for site in result["sites"] if site["outcome"] == "refused"
        )
        if refused:
            print(f"{result['model']}: refused layers: " + ", ".join(f"{n} {name}" for name, n in refused.most_common()))
        if result["normalisation_reasons"]:
            print(f"\n{result['model']}: where the function changes by design")
            print(common.table([[str(n), why] for why, n in result["normalisation_reasons"]], ["sites", "reason"]))
        for line in result["wrong_outputs"]:
            print(f"WRONG OUTPUT {result['model']}: {line}")
    elapsed = common.print_elapsed(started)
    common.write_results(
        args.output, NAME, {"models": results, "rows": rows}, quick=args.quick, elapsed=elapsed,
        extra={"sites_per_model": count, "extra_outputs": EXTRA, "threads": 1},
    )


if __name__ == "__main__":
    main()
