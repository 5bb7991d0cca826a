"""Zoo sweep of issue 9: widen and narrow the channel group of Conv2d/Linear sites of torchvision's models.

At every sampled Conv2d (groups=1 and grouped) and Linear call site, exactly
one of these must happen, else the test fails:

- **ok**: ``fxindex.resize(gm, site, width + extra)`` widens the site's whole
  channel group and the rebuilt model gives the original's outputs (rtol and
  atol 1e-4 of the output's magnitude), or the plan says it does not
  preserve the function (the group holds a LayerNorm, GroupNorm, attention
  or a mean across the channels) and the output is finite and of the right
  shape; and ``resize(gm, site, keep=...)`` (the top 3/4 of each equal block
  by filter L1 norm, in ascending order) gives a finite output of the right
  shape. ``extra`` is 8, or the smallest multiple of the group's equal
  blocks above 8 (a grouped convolution, attention heads); then ``+8``
  itself must be refused with an EditError that says which widths work.
  Where the group's structure takes neither (a fused q, k, v of heads x
  head_dim), the refusal must list the widths that work (each one solved by
  fxindex) and the sweep widens to the smallest larger one; where the L1
  ``keep=`` cuts through blocks that must change alike (heads), it keeps
  the first 3/4 of every block, as the refusal says. Both are noted.
- **refused**: a PropagationError / EditError whose message names the node
  (``node '...'``) that blocks the group.

Anything else (another exception, a wrong output, a widening that changes the
output although its plan says "preserving") fails the model's test at once.

"Possible at all": a group is always resizable in principle (by rewriting
every op that touches it), so every sampled site counts and every refusal is
printed with its reason. Two rates are asserted: over all sampled sites
(``MIN_OVERALL_RATE``), and over the sites outside ``KNOWN_GAPS``
(``MIN_SUCCESS_RATE``, the issue's 95%). ``KNOWN_GAPS`` lists what fxindex does
not do yet, by message pattern: today only part of ShuffleNetV2's channel
shuffles. fxindex maps a shuffle (``view(b, 2, c/2, h, w)`` + ``transpose`` +
``view``) as a permutation: the halves of each ``cat`` change alike and each
later ``chunk`` takes half of them times 2, so channels go in runs (2, 4...
deep into a stage) and halves nest (2, 4, 8 blocks...). Refused, naming the
``view`` of the shuffle: the sample's L1 ``keep=`` where it splits such a run
(stage 2), and any resize of stage 3, whose 7 chained chunks would need 2**7
nested blocks of its 48 channels. On the CI sample the overall rate is 75/78
(96.2%; it was 74/78 before shuffles were mapped): the 3 refusals are that gap.

CI samples ``SAMPLED_SITES`` sites per model, spread evenly over its
Conv/Linear sites (first and last included), of the models in ``CI_MODELS``;
``FXINDEX_FULL_ZOO=1`` sweeps every site of every torchvision classification
model (6,734 sites: about 1 h 50 min on one core, 55 min split over two
processes; 98.0% succeed, see benchmarks/README.md); ``FXINDEX_ZOO_SITES=N``
samples N sites of every one of those models. Random weights, eval mode, batch 1, the
zoo's small inputs (64x64; the ViTs at 32x32), one intra-op thread.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import zoo
from models import listed_widths
from torch import fx, nn

import fxindex
from fxindex._errors import EditError, PropagationError
from fxindex._group import group
from fxindex._couple import trial_view
from fxindex._resize import plan_resize, resize

FULL_ZOO = os.environ.get("FXINDEX_FULL_ZOO") == "1"

# One model per family (the brief's list); each is built at full size with the zoo's inputs.
CI_MODELS = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "regnet_x_400mf",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "densenet121",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "vit_b_16",
    "googlenet",
)
# Too large for one deep copy per site even in the full sweep (the architecture is covered by a sibling).
EXCLUDED = {
    "regnet_y_128gf": "644M parameters; regnet_y_400mf covers the architecture",
    "vit_h_14": "632M parameters; vit_b_16 covers the architecture",
}
# FXINDEX_ZOO_SITES=N: every model of the full sweep, N sites of each (a wide sample in tens of minutes).
WIDE_SITES = int(os.environ.get("FXINDEX_ZOO_SITES", "0") or 0)
ALL_MODELS = [name for name in zoo.TRACEABLE_MODELS if name not in EXCLUDED]
MODELS = ALL_MODELS if FULL_ZOO or WIDE_SITES else list(CI_MODELS)

SAMPLED_SITES = WIDE_SITES or 6
EXTRA = 8
MIN_SUCCESS_RATE = 0.95  # over the sites outside KNOWN_GAPS
MIN_OVERALL_RATE = 0.95  # over every sampled site, gaps included (75/78 on the CI sample)
TOLERANCE = 1e-4  # relative to the output's magnitude (random weights let activations grow large)

# What fxindex cannot do yet, by refusal message: (pattern, reason counted in the summary).
KNOWN_GAPS: tuple[tuple[str, str], ...] = (
    (
        r"reshapes the dimension of width \d+ into \d+x2 ",
        "channel shuffle: keep= splits a run of interleaved channels, or the nested halves do not divide the width",
    ),
)


@dataclass
class Outcome:
    """What happened at one site: ``ok`` or ``refused`` (with the reason), and notes."""

    site: str
    result: str
    reason: str = ""
    notes: list[str] = field(default_factory=list)


RESULTS: dict[str, list[Outcome]] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_frozen_heap():
    """One intra-op thread (steadiest on 2 shared cores); freeze what is alive so each collection is cheap."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with zoo.frozen_heap():
        yield
    torch.set_num_threads(threads)


def sites_of(layers: fxindex.LayerIndex) -> list[int]:
    """Every Conv2d (any groups) and Linear call site, sampled evenly in CI."""
    sites = [entry.index for entry in layers if isinstance(entry.module, (nn.Conv2d, nn.Linear))]
    if FULL_ZOO or len(sites) <= SAMPLED_SITES:
        return sites
    step = (len(sites) - 1) / (SAMPLED_SITES - 1)
    return sorted({sites[round(k * step)] for k in range(SAMPLED_SITES)})


def out_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().flatten(1).abs().sum(1)


def pruned_keep(module: nn.Module, width: int, blocks: int) -> list[int]:
    """The top 3/4 of each of ``blocks`` equal blocks by filter L1 norm, ascending (what a pruning pass keeps)."""
    norms = out_weight(module)
    if norms.numel() != width:  # the site's group is wider than its own outputs: keep by index
        norms = torch.arange(width, 0, -1, dtype=torch.float)
    size = width // blocks
    kept = max(1, (3 * size) // 4)
    keep: list[int] = []
    for b in range(blocks):
        block = norms[b * size : (b + 1) * size]
        keep.extend(sorted(b * size + int(i) for i in torch.topk(block, kept).indices))
    return keep


def first(value: object) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value  # type: ignore[index,return-value]


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return first(model(*inputs))


def names_a_node(error: Exception, graph_module: fx.GraphModule) -> bool:
    """Whether the message names a node of the graph as ``node 'name'`` or the layer it was asked about."""
    names = {node.name for node in graph_module.graph.nodes}
    quoted = set(re.findall(r"'([^']+)'", str(error)))
    return bool(quoted & names) or bool(quoted & {str(n.target) for n in graph_module.graph.nodes})


def reason_of(error: Exception) -> str:
    text = str(error)
    for pattern, reason in KNOWN_GAPS:
        if re.search(pattern, text):
            return reason
    # Otherwise the reason is the message with the model-specific names taken out.
    return re.sub(r"'[^']*'|\d+", "_", text.split(": ", 2)[-1])[:120]


def check_site(gm: fx.GraphModule, inputs: tuple, reference: torch.Tensor, index: int) -> Outcome:
    """Widen then narrow the group of site ``index``; raise AssertionError on any wrong result."""
    entry = fxindex.index(gm)[index]
    label = f"{index}:{entry.target}"
    try:
        found = group(gm, index)
        width, blocks = found.width, found.blocks
        outcome = Outcome(label, "ok")
        extra = EXTRA
        if EXTRA % blocks:
            extra = math.ceil(EXTRA / blocks) * blocks
            with pytest.raises(EditError, match="multiple of"):
                resize(gm, index, width + EXTRA)
            outcome.notes.append(f"+{EXTRA} refused ({blocks} equal blocks); widened by +{extra}")
        try:
            plan = plan_resize(gm, index, width + extra)
        except EditError as error:
            # A width no structure of the group takes (q, k and v of heads x head_dim): the refusal
            # must list widths that work (each checked by fxindex); widen to the smallest larger one.
            larger = [w for w in listed_widths(error) if w > width]
            if not larger:
                raise
            extra = min(larger) - width
            outcome.notes.append(f"+{EXTRA} refused with the widths that work; widened by +{extra}, the first listed")
            plan = plan_resize(gm, index, width + extra)
        preserving = plan.preserves_function and found.preserves_function
        norms = [m for m in found.members if m.role == "carrier" and re.search(r"LayerNorm|GroupNorm|group_norm|layer_norm", m.detail)]
        assert not (norms and preserving), f"{label}: the group holds {norms[0].name} but the plan says preserving"
        # The plan computed above, installed as plan_resize's dry run installs it (on a view sharing
        # gm's layers, not a deep copy: the copy took most of a site's time); resize itself is the narrowing below.
        wide = trial_view(gm, plan)
        out = run(wide, inputs)
        changes_output = any(m.role == "output" for m in found.members)
        scale = reference.abs().max().item() + 1.0
        if changes_output:
            assert out.shape[:-1] == reference.shape[:-1] and out.shape[-1] == width + extra, label
            old = out[..., : reference.shape[-1]]
        else:
            assert out.shape == reference.shape, f"{label}: widened output {tuple(out.shape)}"
            old = out
        assert torch.isfinite(out).all(), f"{label}: widened output not finite"
        if preserving:
            torch.testing.assert_close(old, reference, rtol=TOLERANCE, atol=TOLERANCE * scale, msg=lambda m: f"{label}: {m}")
        else:
            outcome.notes.append("not preserving (plan says so)")
        keep = pruned_keep(entry.module, width, blocks)
        try:
            narrow = resize(gm, index, keep=keep)
        except EditError as error:
            # keep= by L1 norm cut through heads that must change alike (a reshape into heads x head_dim):
            # as the refusal says, keep the same 3/4 of every block instead.
            cut = re.search(r"\((\d+) blocks of (\d+)", str(error))
            if not cut or width % int(cut.group(2)):
                raise
            size = int(cut.group(2))
            keep = [b * size + j for b in range(width // size) for j in range(max(1, 3 * size // 4))]
            outcome.notes.append(f"L1 keep= refused (cuts through blocks of {size}); kept the first 3/4 of every block alike")
            narrow = resize(gm, index, keep=keep)
        out = run(narrow, inputs)
        expected = reference.shape[:-1] + (len(keep),) if changes_output else reference.shape
        assert out.shape == expected, f"{label}: narrowed output {tuple(out.shape)}, expected {tuple(expected)}"
        assert torch.isfinite(out).all(), f"{label}: narrowed output not finite"
        return outcome
    except (PropagationError, EditError) as error:
        assert names_a_node(error, gm), f"{label}: refusal names no node: {error}"
        return Outcome(label, "refused", reason_of(error))


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_groups_widen_and_narrow(name: str) -> None:
    """Every sampled site widens and narrows correctly or is refused naming the node; the rate is printed."""
    try:
        model, inputs = zoo.build_zoo_model(name)
        gm = fxindex.trace(model, example_inputs=inputs)
        reference = run(model, inputs)
        outcomes = [check_site(gm, inputs, reference, index) for index in sites_of(fxindex.index(gm))]
        RESULTS[name] = outcomes
        ok = sum(o.result == "ok" for o in outcomes)
        print(f"\n{name}: {ok}/{len(outcomes)} sites widen (+{EXTRA}) and narrow")
        for o in outcomes:
            if o.result != "ok" or o.notes:
                print(f"   {o.site}: {o.result} {o.reason} {'; '.join(o.notes)}")
        assert ok, f"{name}: no site could be resized"
    finally:
        model = gm = None  # noqa: F841
        zoo.release_memory()


def test_zoo_success_rate_on_the_sample() -> None:
    """At least MIN_SUCCESS_RATE of the swept sites succeed; the refusal reasons are counted and printed.

    Uses the results of the per-model tests run in this process (the models
    another pytest-xdist worker swept are swept again here).
    """
    for name in MODELS:
        if name not in RESULTS:
            test_zoo_model_groups_widen_and_narrow(name)
    outcomes = [o for name in MODELS for o in RESULTS[name]]
    ok = sum(o.result == "ok" for o in outcomes)
    reasons = Counter(o.reason for o in outcomes if o.result == "refused")
    print(f"\nzoo groups: {ok}/{len(outcomes)} sites ({ok / len(outcomes):.1%}) widen and narrow, over {len(MODELS)} models")
    for name in MODELS:
        got = sum(o.result == "ok" for o in RESULTS[name])
        print(f"   {name}: {got}/{len(RESULTS[name])}")
    for reason, count in reasons.most_common():
        print(f"   refused {count}x: {reason}")
    gaps = {reason for _, reason in KNOWN_GAPS}
    possible = [o for o in outcomes if not (o.result == "refused" and o.reason in gaps)]
    print(f"   outside the known gaps: {ok}/{len(possible)} ({ok / len(possible):.1%})")
    assert ok / len(outcomes) >= MIN_OVERALL_RATE, f"only {ok}/{len(outcomes)} sites succeed; refusals: {dict(reasons)}"
    assert ok / len(possible) >= MIN_SUCCESS_RATE, f"only {ok}/{len(possible)} sites succeed; refusals: {dict(reasons)}"
