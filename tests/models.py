"""Small hand-built models and assertion helpers for the replace/rules tests (not a test file).

Import it from a test as ``import models`` (tests/conftest.py puts tests/ on sys.path).

Helpers:
    assert_rebuilt_ok(gm, inputs, expected=None, shape=None, atol=1e-5)
        the rebuilt GraphModule lints, runs on ``inputs`` and (optionally)
        matches ``expected`` / has output shape ``shape``. Returns nothing.
    resized(layer, out, keep=None)
        a copy of a Linear / ConvNd / ConvTransposeNd with ``out`` outputs:
        output j copies old output keep[j] (default: j) while there is one,
        later outputs are freshly initialised (non-zero).
    snapshot(gm) / assert_unchanged(gm, snap)
        the generated code, the graph (graph_fingerprint), a copy of the
        state_dict and the module names, and the check that they did not change.
    parameter_pointers(module) -> set of data_ptr of every parameter and buffer.
    call_module_targets(gm) -> the call_module targets in graph order.
    listed_widths(error) -> the widths a resize's refusal lists as working ("widths that work here: 36, 60").
    randomise_bn(model) -> model, with non-trivial BatchNorm statistics and affine parameters.
    single_thread()  context manager: one intra-op thread while tiny models run (a
        module-scoped autouse fixture in each test file uses it; the old setting is restored).
    Fn(fn)      a module whose forward is ``fn`` (traced through by torch.fx).
    Chain(*parts)  an nn.Sequential-like module that is traced through.

Models: MLP, SmallCNN, MobileBlock, InceptionBlock, Residual, ViewNet,
FlattenNet, SharedNet, HeadNet (see each docstring).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = [
    "assert_rebuilt_ok",
    "resized",
    "snapshot",
    "assert_unchanged",
    "parameter_pointers",
    "call_module_targets",
    "listed_widths",
    "Fn",
    "Chain",
    "MLP",
    "SmallCNN",
    "MobileBlock",
    "InceptionBlock",
    "Residual",
    "ViewNet",
    "FlattenNet",
    "SharedNet",
    "HeadNet",
    "randomise_bn",
    "single_thread",
]


# --------------------------------------------------------------------------- assertions


def metadata_key(meta: Any) -> Any:
    """Every field of recorded ``tensor_meta``, nested like it (TensorMetadata compares field by field)."""
    if isinstance(meta, TensorMetadata):
        return tuple(meta)
    if isinstance(meta, (tuple, list)):
        return tuple(metadata_key(item) for item in meta)
    return meta


def real_metas(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """node name -> metadata of one real forward through torch.fx's ShapeProp (on a copy of the graph)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    ShapeProp(copy).propagate(*inputs)
    return {node.name: metadata_key(node.meta.get("tensor_meta")) for node in copy.graph.nodes}


def listed_widths(error: BaseException) -> list[int]:
    """The widths a refusal lists as working (``"widths that work here: 36, 60"``), each checked by fxindex; else none."""
    found = re.search(r"widths that work here: ([\d, ]+)", str(error))
    return [int(w) for w in found.group(1).replace(" ", "").split(",") if w] if found else []


def recorded_metas(gm: fx.GraphModule) -> dict[str, Any]:
    """node name -> the metadata fxindex recorded."""
    return {node.name: metadata_key(node.meta.get("tensor_meta")) for node in gm.graph.nodes}


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    raise AssertionError(f"unexpected model output {type(value).__name__}")


def assert_rebuilt_ok(
    gm: Any,
    inputs: tuple[Any, ...],
    expected: Any = None,
    *,
    shape: tuple[int, ...] | None = None,
    atol: float = 1e-5,
) -> None:
    """The rebuilt model is a linted GraphModule that runs on ``inputs``.

    With ``expected`` (a tensor or a tuple of tensors, e.g. the original
    model's output) the outputs must be equal within ``atol``; with ``shape``
    the (first) output must have that shape.
    """
    assert isinstance(gm, fx.GraphModule), f"expected a GraphModule, got {type(gm).__name__}"
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            gm.get_submodule(node.target)  # every call site names an installed module
    with torch.no_grad():
        out = gm(*inputs)
    got = _outputs(out)
    if shape is not None:
        assert tuple(got[0].shape) == tuple(shape), f"output shape {tuple(got[0].shape)}, expected {tuple(shape)}"
    if expected is not None:
        want = _outputs(expected)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape, f"output shape {tuple(a.shape)} != {tuple(b.shape)}"
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def graph_fingerprint(gm: fx.GraphModule) -> list[tuple[Any, ...]]:
    """Every node as (op, name, target, args, kwargs), input nodes by name: equal iff the graph is unchanged."""

    def plain(value: Any) -> Any:
        return fx.node.map_arg(value, lambda node: f"%{node.name}")

    return [
        (node.op, node.name, str(node.target), repr(plain(node.args)), repr(plain(node.kwargs)))
        for node in gm.graph.nodes
    ]


def snapshot(module: nn.Module) -> dict[str, Any]:
    """What must not change when a call fails: generated code, graph, state_dict values, module names."""
    graph_module = isinstance(module, fx.GraphModule)
    return {
        "code": module.code if graph_module else None,
        "graph": graph_fingerprint(module) if graph_module else None,
        "state": {name: value.detach().clone() for name, value in module.state_dict().items()},
        "names": [name for name, _ in module.named_modules()],
    }


def assert_unchanged(module: nn.Module, snap: dict[str, Any]) -> None:
    if snap["code"] is not None:
        assert isinstance(module, fx.GraphModule)
        assert module.code == snap["code"]
        module.graph.lint()
        # the graph itself, not only the generated code, is as before
        assert graph_fingerprint(module) == snap["graph"]
    now = module.state_dict()
    assert list(now) == list(snap["state"])
    for name, value in snap["state"].items():
        assert now[name].shape == value.shape, name
        assert torch.equal(now[name], value), name
    assert [name for name, _ in module.named_modules()] == snap["names"]


def parameter_pointers(module: nn.Module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.data_ptr() for t in tensors if t.numel()}


def call_module_targets(gm: fx.GraphModule) -> list[str]:
    return [node.target for node in gm.graph.nodes if node.op == "call_module"]


# --------------------------------------------------------------------------- resized copies


def resized(layer: nn.Module, out: int, keep: list[int] | None = None) -> nn.Module:
    """A copy of ``layer`` with ``out`` outputs; new output j copies old output keep[j].

    ``keep`` defaults to ``range(min(out, old))`` (the first outputs). Outputs
    past ``len(keep)`` keep their fresh (random, non-zero) initialisation.
    Works for Linear, ConvNd (groups=1) and ConvTransposeNd (groups=1).
    """
    factory = {"dtype": next(layer.parameters()).dtype, "device": next(layer.parameters()).device}
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, out, bias=layer.bias is not None, **factory)
        old_out, weight_dim = layer.out_features, 0
    elif isinstance(layer, _ConvTransposeNd):
        assert layer.groups == 1
        new = type(layer)(
            layer.in_channels, out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            output_padding=layer.output_padding, groups=1, bias=layer.bias is not None,
            dilation=layer.dilation, **factory,
        )  # fmt: skip
        old_out, weight_dim = layer.out_channels, 1
    elif isinstance(layer, _ConvNd):
        assert layer.groups == 1
        new = type(layer)(
            layer.in_channels, out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=1, bias=layer.bias is not None, padding_mode=layer.padding_mode,
            **factory,
        )  # fmt: skip
        old_out, weight_dim = layer.out_channels, 0
    else:
        raise TypeError(f"resized does not know {type(layer).__name__}")
    slots = list(range(min(out, old_out))) if keep is None else list(keep)
    new.train(layer.training)
    with torch.no_grad():
        for j, old_j in enumerate(slots):
            new.weight.select(weight_dim, j).copy_(layer.weight.select(weight_dim, old_j))
            if layer.bias is not None:
                new.bias[j] = layer.bias[old_j]
    return new


# --------------------------------------------------------------------------- building blocks


class Fn(nn.Module):
    """A module whose forward calls ``fn``; torch.fx traces through it into plain nodes."""

    def __init__(self, fn: Callable[..., Any], name: str = "") -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)

    def extra_repr(self) -> str:
        return self.name


class Chain(nn.Module):
    """Calls its parts in order, like nn.Sequential (and traced through like it)."""

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Any) -> Any:
        for part in self.parts:
            x = part(x)
        return x


# --------------------------------------------------------------------------- models


class MLP(nn.Sequential):
    """Linear(6, 16) ReLU Linear(16, 12) Tanh Linear(12, 4). Layers 0..4."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(
            nn.Linear(6, 16, dtype=dtype), nn.ReLU(), nn.Linear(16, 12, dtype=dtype), nn.Tanh(), nn.Linear(12, 4, dtype=dtype)
        )


class SmallCNN(nn.Module):
    """conv1(3->8) bn1 relu pool conv2(8->8) bn2 relu adaptive pool flatten fc(8->5).

    Layer indices: 0 conv1, 1 bn1, 2 relu, 3 pool, 4 conv2, 5 bn2, 6 relu, 7 gap, 8 fc.
    Input (N, 3, 12, 12).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def randomise_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


class MobileBlock(nn.Module):
    """MobileNet-like: expand 1x1 (3->8), BN, ReLU6, depthwise 3x3 (groups=8), BN, ReLU6, project 1x1 (8->6).

    Layers: 0 expand, 1 bn1, 2 act1, 3 dw, 4 bn2, 5 act2, 6 project. Input (N, 3, 8, 8).
    """

    def __init__(self, multiplier: int = 1) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8 * multiplier)
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(8 * multiplier, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.expand(x)))
        x = self.act2(self.bn2(self.dw(x)))
        return self.project(x)


class InceptionBlock(nn.Module):
    """stem conv (3->4); branches b1 1x1 (4->5), b2 3x3 (4->6), b3 pool+1x1 (4->3); cat; head 1x1 (14->7).

    Layers: 0 stem, 1 b1, 2 b2, 3 pool, 4 b3, 5 head. Input (N, 3, 8, 8).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 5, 1)
        self.b2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.b3 = nn.Conv2d(4, 3, 1)
        self.head = nn.Conv2d(14, 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b2(x), self.b3(self.pool(x))], 1)
        return self.head(torch.relu(y))


class Residual(nn.Module):
    """x = stem(x); y = a(x) + b(x) (or x + a(x) with ``identity=True``); head(y).

    Layers: 0 stem (3->4), 1 a (4->4), 2 b (4->4, absent with identity), then head (4->2).
    Input (N, 3, 6, 6).
    """

    def __init__(self, identity: bool = False) -> None:
        super().__init__()
        self.identity = identity
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        if not identity:
            self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = x + self.a(x) if self.identity else self.a(x) + self.b(x)
        return self.head(y)


class ViewNet(nn.Module):
    """conv (3->4, 3x3, no padding) then a hard-coded ``x.view(-1, 4 * 4 * 4)`` then fc (64->5).

    Layers: 0 conv, 1 fc. Input (N, 3, 6, 6).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(-1, 4 * 4 * 4))


class FlattenNet(nn.Module):
    """conv (3->4, 3x3, no padding), nn.Flatten, fc (64->5). Layers: 0 conv, 1 flatten, 2 fc. Input (N, 3, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.conv(x)))


class SharedNet(nn.Module):
    """``act`` (ReLU) at two sites and ``fc`` (Linear 8->8) at two sites.

    Layers: 0 inp (4->8), 1 act, 2 fc, 3 act, 4 fc, 5 out (8->3). Input (N, 4).
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.inp(x))
        x = self.act(self.fc(x))
        return self.out(self.fc(x))


class HeadNet(nn.Module):
    """A backbone ending in a 512-feature vector, then ``head`` Linear(512, 1000). Layers: 0 conv, 1 gap, 2 head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 512, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.gap(self.conv(x)), 1))


class single_thread:
    """Run tiny models on one intra-op thread: on a busy 2-core machine, torch's thread pool
    makes a 6x6 convolution cost ~30 ms instead of ~0.1 ms. Restores the old setting on exit.
    Use from a module-scoped autouse fixture (``with models.single_thread(): yield``)."""

    def __enter__(self) -> single_thread:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def hypothesis_profile(**ci: Any) -> settings:
    """The settings chosen by the HYPOTHESIS_PROFILE environment variable.

    "ci" (the default) uses ``ci`` (a handful of derandomized examples, fast
    enough for every CI run); "thorough" runs 300 examples. Both have no
    deadline: an example traces and edits a model. Tests apply the result as
    a decorator, so other files keep their own hypothesis settings.
    """
    common: dict[str, Any] = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    profiles = {"ci": settings(derandomize=True, **common, **ci), "thorough": settings(max_examples=300, **common)}
    selected = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if selected not in profiles:
        raise ValueError(f"HYPOTHESIS_PROFILE={selected!r}: choose one of {sorted(profiles)}")
    return profiles[selected]
