"""Issue 11: models only torch.export captures, traced through the export path and widened.

timm's mobilevit_xxs (and efficientvit_b0, torchvision's raft_small) stop
symbolic tracing on data-dependent ``if``s. CI traces mobilevit_xxs (the
cheapest) with ``fxindex.trace(..., example_inputs=...)``, checks that the
export path made the graph and that its outputs equal the model's, and widens
three Conv2d/Linear call sites (first, middle and last) by 8 outputs,
function-preservingly: each either gives the original's outputs or is refused
with a ``PropagationError`` naming the layer or node, the traced graph left
untouched. ``FXINDEX_FULL_ZOO=1`` sweeps every site of all three models
(minutes; ``benchmarks/bench_export_models.py`` prints the same figures) and
asserts the issue's anchor: at least half of each model's Conv/Linear sites
widened with exact outputs, and never a wrong one.

Random weights let activations grow, so outputs are compared with a tolerance
relative to the output's magnitude.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from torch import nn

import fxindex
from fxindex._replace import apply_plan
from models import listed_widths

FULL_ZOO = os.environ.get("FXINDEX_FULL_ZOO") == "1"
EXTRA = 8


def _build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model with random weights in eval mode and seeded example inputs."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name == "raft_small":
        optical_flow = pytest.importorskip("torchvision.models.optical_flow")
        frames = tuple(torch.randn(1, 3, 128, 128, generator=generator) for _ in range(2))
        return optical_flow.raft_small(weights=None).eval(), frames
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    return model, (torch.randn(1, *model.pretrained_cfg["input_size"], generator=generator),)


def _widened(module: nn.Module) -> nn.Module:
    """A Linear or groups=1 Conv2d with ``EXTRA`` more outputs: the old weights first, zeros after."""
    if isinstance(module, nn.Linear):
        wider: nn.Module = nn.Linear(module.in_features, module.out_features + EXTRA, bias=module.bias is not None)
    else:
        wider = nn.Conv2d(
            module.in_channels, module.out_channels + EXTRA, module.kernel_size, module.stride, module.padding,
            module.dilation, 1, module.bias is not None, module.padding_mode,
        )
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[: module.weight.shape[0]] = module.weight
        if module.bias is not None:
            wider.bias.zero_()
            wider.bias[: module.bias.shape[0]] = module.bias
    return wider


def _outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor of an output (RAFT returns a list of flow fields)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [tensor for item in value for tensor in _outputs(item)]


def _assert_same(outputs: list[torch.Tensor], reference: list[torch.Tensor], where: str) -> None:
    """Equal on the reference's slots (a widened head has more), up to the output's magnitude."""
    assert len(outputs) == len(reference), where
    for output, expected in zip(outputs, reference):
        assert output.dim() == expected.dim(), where
        output = output[tuple(slice(0, size) for size in expected.shape)]
        assert output.shape == expected.shape, where
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(output, expected, atol=1e-5 * scale, rtol=1e-4, msg=where)


def _sites(gm: torch.fx.GraphModule) -> tuple[list[int], list[int]]:
    """Every Conv2d/Linear call site, and those a wider copy can replace alone (Linear, groups=1 Conv2d)."""
    layers = fxindex.index(gm)
    every = [entry.index for entry in layers if isinstance(entry.module, (nn.Conv2d, nn.Linear))]
    plain = [i for i in every if isinstance(layers[i].module, nn.Linear) or layers[i].module.groups == 1]
    return every, plain


def _traced(name: str) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """Trace through the export path; check the lifted graph computes what the model does."""
    model, inputs = _build(name)
    with torch.no_grad():
        eager = _outputs(model(*inputs))
    gm = fxindex.trace(model, example_inputs=inputs)
    assert gm.meta["fxindex_capture"] == "export"
    gm.graph.lint()
    with torch.no_grad():
        reference = _outputs(gm(*inputs))
    assert len(reference) == len(eager)
    for lifted, expected in zip(reference, eager):
        assert torch.equal(lifted, expected)
    return gm, inputs, reference


def _structured_widening(gm: torch.fx.GraphModule, site: int, old: int) -> tuple[torch.fx.GraphModule, Any] | None:
    """Where 8 more outputs cannot be had (a fused qkv: q, k, v x heads x head_dim), ``resize`` to the
    smallest larger width its refusal lists as working (checked by fxindex, not estimated); new outputs zero."""
    try:
        plan = fxindex.plan_resize(gm, site, old + 8)
    except fxindex.FxIndexError as error:
        larger = [w for w in listed_widths(error) if w > old]
        if not larger:
            return None
        plan = fxindex.plan_resize(gm, site, min(larger))
    # Planned (and checked to run) once; installed as resize installs it.
    return apply_plan(copy.deepcopy(gm), plan), plan


def _widen(gm: torch.fx.GraphModule, site: int, inputs: tuple[torch.Tensor, ...], reference: list[torch.Tensor]) -> str:
    """Widen one site on a copy; return "same output", "crosses a normalisation" or "refused" (else fail).

    Planned once with ``fxindex.plan`` and installed into a deep copy with
    ``apply_plan``, ``fxindex.replace``'s own second half.
    """
    layers = fxindex.index(gm)
    entry = layers[site]
    where = f"site {site} {entry.target}"
    try:
        steps = fxindex.plan(gm, site, _widened(entry.module))
    except fxindex.PropagationError as error:
        # The refusal names where the change stops, and the layer asked for.
        assert "node '" in str(error) or f"layer {site}" in str(error), str(error)
        structured = _structured_widening(gm, site, entry.module.weight.shape[0])
        if structured is None:
            return "refused"
        rebuilt, steps = structured
    else:
        rebuilt = apply_plan(copy.deepcopy(gm), steps)
    rebuilt.graph.lint()
    with torch.no_grad():
        outputs = _outputs(rebuilt(*inputs))
    if steps.preserves_function:
        _assert_same(outputs, reference, where)
        return "same output"
    # New channels enter a normalisation's statistics: the plan says so; shapes must still be right.
    assert steps.breaks_function, where
    assert [o.shape[:-1] for o in outputs] == [r.shape[:-1] for r in reference], where
    return "crosses a normalisation"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny inputs: one intra-op thread is as fast and avoids OpenMP spin-waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mobilevit_export_trace_and_three_sites() -> None:
    gm, inputs, reference = _traced("mobilevit_xxs")
    every, plain = _sites(gm)
    assert len(every) == 72 and len(plain) == 65  # 37 Linear, 35 Conv2d of which 7 depthwise
    code = gm.code
    state = {key: value.clone() for key, value in gm.state_dict().items()}
    qkv = next(site for site in plain if fxindex.index(gm)[site].target.endswith("attn.qkv"))
    sampled = [plain[0], plain[len(plain) // 2], plain[-1], qkv]
    outcomes = {site: _widen(gm, site, inputs, reference) for site in sampled}
    # A fused qkv Linear cannot take 8 more outputs (3 x 4 heads x 16 does not split 200); resize's refusal
    # lists the widths that work, and the smallest larger one (a channel more in every head) is exact.
    assert outcomes[qkv] == "same output"
    # The stem conv feeds no join; the head Linear's output is the model's: both widen exactly.
    assert outcomes[plain[0]] == "same output"
    assert outcomes[plain[-1]] == "same output"
    # The middle site, an attn.proj, writes the transformer's residual stream: its group reaches the unfold
    # and fold reshapes (channels merged with batch and patch rows) and goes through them, so the plan is
    # made and installed, but the stream's LayerNorms then normalise over the new channels too.
    assert outcomes[plain[len(plain) // 2]] == "crosses a normalisation"
    # Nothing above touched the traced graph or its tensors.
    assert gm.code == code
    current = gm.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(current[key], value), key


# Models measured below the anchor, with why: the test fails when one reaches it (remove it here then).
BELOW_HALF: dict[str, str] = {
    # mobilevit_xxs reaches it: 44 of 72 (the 9 fused qkv sites widen by a channel in every head, where 8 more
    # outputs cut through a head). Still not exact: 21 attn.proj / mlp.fc2 / conv_1x1 sites that write the
    # transformer's residual stream; their group goes through the MobileViT unfold and fold ((B, C, H, W) <->
    # (B*C*nh, ph, nw, pw), related through the sub-factors B, C, nh, ph) but holds the stream's LayerNorms,
    # whose statistics take in the new channels (with the LayerNorms swapped for nn.Identity they widen exactly).
}


@pytest.mark.skipif(not FULL_ZOO, reason="every site of three models takes minutes: FXINDEX_FULL_ZOO=1")
@pytest.mark.parametrize(
    "name",
    [
        "mobilevit_xxs",
        # LiteMLA's autocast(enabled=False) block: torch.export wraps it in a subgraph, which the lift inlines.
        "efficientvit_b0",
        "raft_small",
    ],
)
def test_widen_every_site_of_export_models(name: str) -> None:
    gm, inputs, reference = _traced(name)
    every, plain = _sites(gm)
    # _widen fails the test on any wrong output: a preserving plan that changes the output, or a broken graph.
    outcomes = [_widen(gm, site, inputs, reference) for site in plain]
    same = outcomes.count("same output")
    print(f"\n{name}: {same}/{len(every)} Conv/Linear sites widened with exact outputs ({len(plain)} groups=1)")
    if name in BELOW_HALF:
        assert 2 * same < len(every), f"{name} now reaches half ({same} of {len(every)}): remove it from BELOW_HALF"
    else:
        assert 2 * same >= len(every), f"{name}: {same} of {len(every)} sites, the issue asks for at least half"
