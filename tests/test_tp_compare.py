"""Issue 9's comparison with Torch-Pruning 1.6: fxindex narrows at least wherever Torch-Pruning does.

On timm and torchvision segmentation/video models of different families, a
few Conv/Linear sites per model (spread evenly) are narrowed to the first 3/4
of each equal block of their output channels (the whole width when the
group has no grouped convolution or heads), by both tools:

* Torch-Pruning: ``tp.DependencyGraph().build_dependency(copy, example_inputs=x)``,
  ``get_pruning_group(layer, tp.prune_conv_out_channels / tp.prune_linear_out_channels,
  idxs=removed).prune()`` on a deep copy; it succeeds when that and a forward run.
  Torch-Pruning may widen the set it removes to keep its group consistent
  (GhostNet's ``cat([x, cheap(x)])`` removes the matching channels of both
  halves): fxindex is then given the channels Torch-Pruning really kept
  at the site (its group's first item).
* fxindex: ``fxindex.resize(gm, site, keep=kept)``.

Where both succeed the outputs must agree (rtol/atol 1e-4 of the output's
magnitude). Where Torch-Pruning succeeds and fxindex refuses, or where the
outputs differ, the site must be listed in ``EXPECTED`` with the exception,
a message pattern and the reason; anything else fails. The counts are printed
per model and in total.

CI: ``CI_SITES`` sites per model (``SITES`` overrides); ``FXINDEX_FULL_ZOO=1``
samples ``FULL_SITES`` per model. Needs timm and torch-pruning (the test extra).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxindex
from fxindex._errors import FxIndexError
from fxindex._group import group
from fxindex._resize import resize

tp = pytest.importorskip("torch_pruning")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
zoo = pytest.importorskip("zoo")

FULL_ZOO = os.environ.get("FXINDEX_FULL_ZOO") == "1"
CI_SITES = 3
FULL_SITES = 12
TOLERANCE = 1e-4

# (source, name, build kwargs, input shape): one model per family.
MODELS: list[tuple[str, str, dict, tuple[int, ...]]] = [
    ("timm", "resnet18d", {}, (1, 3, 64, 64)),
    ("timm", "efficientnet_b0", {}, (1, 3, 64, 64)),
    ("timm", "mobilenetv3_small_100", {}, (1, 3, 64, 64)),
    ("timm", "mobilenetv4_conv_small", {}, (1, 3, 64, 64)),
    ("timm", "convnext_atto", {}, (1, 3, 64, 64)),
    ("timm", "regnetx_002", {}, (1, 3, 64, 64)),
    ("timm", "ghostnet_100", {}, (1, 3, 64, 64)),
    ("timm", "dla46_c", {}, (1, 3, 64, 64)),
    ("timm", "cs3darknet_s", {}, (1, 3, 64, 64)),
    ("timm", "densenet121", {}, (1, 3, 64, 64)),
    ("timm", "vit_tiny_patch16_224", {"img_size": 32}, (1, 3, 32, 32)),
    ("timm", "deit_tiny_patch16_224", {"img_size": 32}, (1, 3, 32, 32)),
    ("timm", "swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, (1, 3, 64, 64)),
    ("timm", "mixer_s16_224", {"img_size": 64}, (1, 3, 64, 64)),
    ("timm", "levit_128s", {"img_size": 64}, (1, 3, 64, 64)),
    ("timm", "poolformer_s12", {}, (1, 3, 64, 64)),
    ("segmentation", "fcn_resnet50", {}, (1, 3, 64, 64)),
    ("segmentation", "deeplabv3_mobilenet_v3_large", {}, (1, 3, 64, 64)),
    ("video", "r3d_18", {}, (1, 3, 4, 32, 32)),
]

# Sites where Torch-Pruning narrows and fxindex refuses, or where the two disagree:
# (model, site regex, exception name or "mismatch", message regex, reason).
EXPECTED: list[tuple[str, str, str, str, str]] = [
    (
        "swin_tiny_patch4_window7_224",
        r"attn\.qkv$",
        "PropagationError|EditError",
        r"reshapes the dimension of width \d+ into 3x\d+x\d+",
        "qkv's outputs are reshaped into (3, heads, head_dim) with head_dim=-1: Torch-Pruning keeps the first 3/4 of "
        "the 3*heads*head_dim features and the -1 lets the reshape re-cut them, so its q takes k's features (a model "
        "that runs but is not a pruning of those channels); fxindex refuses the reshape it cannot split",
    ),
    (
        "swin_tiny_patch4_window7_224",
        r"attn\.qkv$",
        "mismatch",
        "",
        "Torch-Pruning removes the same indices from each of q, k and v; where what is left is whole heads (the "
        "first 3 of 12), fxindex keeps those heads (num_heads 12 -> 3, head_dim 32) and Torch-Pruning's -1 re-cuts "
        "the 96 features into 12 heads of 8: fxindex's result is the hand-pruned model's "
        "(test_whole_heads_of_timm_window_attention_match_a_hand_pruning)",
    ),
]

SITES = CI_SITES if not FULL_ZOO else FULL_SITES


@dataclass
class Row:
    model: str
    site: str
    tp: str  # "ok" or the exception
    fx: str
    verdict: str  # both / tp_only (expected) / fx_only / neither / mismatch (expected)


ROWS: list[Row] = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with zoo.frozen_heap():
        yield
    torch.set_num_threads(threads)


def build(source: str, name: str, kwargs: dict, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode with random weights and BatchNorm statistics (so every channel matters), and an input."""
    torch.manual_seed(0)
    if source == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    elif source == "segmentation":
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=5, aux_loss=False)
    else:
        model = getattr(torchvision.models.video, name)(weights=None, num_classes=5)
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def first(value: object) -> torch.Tensor:
    if isinstance(value, dict):
        value = value["out"]
    return value[0] if isinstance(value, (tuple, list)) else value  # type: ignore[index,return-value]


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return first(model(x))


def prune_with_tp(model: nn.Module, target: str, removed: list[int], x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Torch-Pruning's pruning of ``target``'s outputs ``removed`` on a copy: its output and what it removed at the site."""
    pruned = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=x)
        layer = pruned.get_submodule(target)
        handler = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        pruning = graph.get_pruning_group(layer, handler, idxs=removed)
        actual = sorted(int(i) for i in pruning.items[0].idxs)  # the root item: the site itself
        pruning.prune()
    return forward(pruned, x), actual


def expected_for(model: str, site: str, kind: str, message: str) -> tuple | None:
    for entry in EXPECTED:
        if entry[0] == model and re.search(entry[1], site) and re.fullmatch(entry[2], kind) and re.search(entry[3], message):
            return entry
    return None


@pytest.mark.parametrize("source,name,kwargs,shape", MODELS, ids=[m[1] for m in MODELS])
def test_fxindex_narrows_wherever_torch_pruning_does(source: str, name: str, kwargs: dict, shape: tuple) -> None:
    model, x = build(source, name, kwargs, shape)
    try:
        gm = fxindex.trace(model, example_inputs=(x,))
        entries = [
            e for e in fxindex.index(gm) if isinstance(e.module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and e.call_sites == 1
        ]
        if len(entries) > SITES:
            step = (len(entries) - 1) / (SITES - 1)
            entries = [entries[round(k * step)] for k in range(SITES)]
        failures = []
        for entry in entries:
            module = entry.module
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            try:
                blocks = group(gm, entry.index).blocks
            except FxIndexError:
                blocks = 1
            size = width // blocks
            keep = [b * size + j for b in range(blocks) for j in range(max(1, 3 * size // 4))]
            removed = sorted(set(range(width)) - set(keep))
            site = f"{entry.index}:{entry.target}"
            try:
                tp_out, actual = prune_with_tp(model, entry.target, removed, x)
                tp_result = "ok"
                if actual != removed:
                    keep = sorted(set(range(width)) - set(actual))
            except Exception as error:  # Torch-Pruning's own failures, whatever they are
                tp_out, tp_result = None, f"{type(error).__name__}: {str(error)[:100]}"
            try:
                fx_out = forward(resize(gm, entry.index, keep=keep), x)
                fx_result = "ok"
            except FxIndexError as error:
                fx_out, fx_result = None, f"{type(error).__name__}: {error}"
                if tp_out is not None and expected_for(name, entry.target, type(error).__name__, str(error)) is None:
                    failures.append(f"{site}: Torch-Pruning narrows, fxindex refuses: {error}")
            verdict = {(True, True): "both", (True, False): "tp_only", (False, True): "fx_only", (False, False): "neither"}[
                (tp_out is not None, fx_out is not None)
            ]
            if tp_out is not None and fx_out is not None:
                scale = tp_out.abs().max().item() + 1.0
                if tp_out.shape != fx_out.shape or not torch.allclose(fx_out, tp_out, rtol=TOLERANCE, atol=TOLERANCE * scale):
                    verdict = "mismatch"
                    if expected_for(name, entry.target, "mismatch", "") is None:
                        failures.append(f"{site}: outputs differ (shapes {tuple(tp_out.shape)} / {tuple(fx_out.shape)})")
            assert fx_out is None or torch.isfinite(fx_out).all(), f"{site}: fxindex's output is not finite"
            ROWS.append(Row(name, site, tp_result, fx_result[:160], verdict))
            print(f"\n  {name} {site}: {verdict}  tp={tp_result[:60]}  fx={fx_result[:100]}", end="")
        assert not failures, "\n".join(failures)
    finally:
        model = gm = None  # noqa: F841
        zoo.release_memory()


def test_torch_pruning_comparison_summary() -> None:
    """Print the counts of this process's rows (under pytest-xdist, a worker's share); fxindex never trails."""
    if not ROWS:
        pytest.skip("the per-model comparisons ran in another process")
    counts = Counter(row.verdict for row in ROWS)
    tp_ok = counts["both"] + counts["tp_only"] + counts["mismatch"]
    fx_ok = counts["both"] + counts["fx_only"] + counts["mismatch"]
    print(
        f"\nTorch-Pruning comparison over {len({r.model for r in ROWS})} models, {len(ROWS)} sites: "
        f"Torch-Pruning narrows {tp_ok}, fxindex {fx_ok}; {dict(counts)}"
    )
    unexpected = [r for r in ROWS if r.verdict == "tp_only" and expected_for(r.model, r.site.split(":", 1)[1], r.fx.split(":")[0], r.fx) is None]
    assert not unexpected, unexpected


class WindowAttentionStage(nn.Module):
    """Linear -> timm's Swin ``WindowAttention`` (4 heads of 6, 2x2 windows) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.swin_transformer import WindowAttention

        self.inp = nn.Linear(5, 24)
        self.attn = WindowAttention(24, 4, window_size=(2, 2))
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.inp(x)))


def test_whole_heads_of_timm_window_attention_match_a_hand_pruning() -> None:
    """The ``mismatch`` row of EXPECTED: fxindex keeps whole heads exactly; Torch-Pruning re-cuts them."""
    torch.manual_seed(0)
    model = WindowAttentionStage().eval()
    x = torch.randn(3, 4, 5)  # (windows, tokens of a 2x2 window, features)
    gm = fxindex.trace(model, example_inputs=(x,))
    keep = [part * 24 + c for part in range(3) for c in range(12)]  # heads 0 and 1 of q, k and v
    pruned = resize(gm, "attn.qkv", keep=keep)
    pruned.graph.lint()
    hand = copy.deepcopy(model)
    with torch.no_grad():
        attn = hand.attn
        qkv, proj = nn.Linear(24, 36), nn.Linear(12, 24)
        qkv.weight.copy_(attn.qkv.weight[keep]), qkv.bias.copy_(attn.qkv.bias[keep])
        proj.weight.copy_(attn.proj.weight[:, :12]), proj.bias.copy_(attn.proj.bias)
        attn.qkv, attn.proj, attn.num_heads = qkv, proj, 2
        attn.relative_position_bias_table = nn.Parameter(attn.relative_position_bias_table[:, :2].clone())
    torch.testing.assert_close(forward(pruned, x), forward(hand, x))
    # Torch-Pruning, asked to remove the same indices of each third, keeps the same weights but 4 heads of 3.
    tp_out, removed = prune_with_tp(model, "attn.qkv", list(range(12, 24)), x)
    assert removed == sorted(set(range(72)) - set(keep))
    assert not torch.allclose(tp_out, forward(hand, x), atol=1e-4)
