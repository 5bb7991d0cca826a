"""Shape recording on meta tensors (issue 10, point 1).

``fxindex.record_shapes`` runs the graph on meta tensors: every parameter
and buffer is copied to meta once per pass, layers run as shallow copies
holding those copies, a node meta cannot run is re-run on fake tensors with
its real layer, and a real forward is the last resort. The planner's re-run
of touched nodes works the same way. These tests hold the meta path to what
a real forward records (``torch.fx.passes.shape_prop.ShapeProp``), node by
node and field by field (shape, dtype, ``requires_grad``, strides, memory
format), on the torchvision zoo and on models built to hit each fallback.

The zoo comparison runs on a sample in CI; ``FXINDEX_FULL_ZOO=1`` runs it on
every torchvision classification model (about 3 minutes on two cores).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fxindex
import zoo
from models import real_metas, recorded_metas
from fxindex import _shapes as shapes

FULL_ZOO = os.environ.get("FXINDEX_FULL_ZOO") == "1"

# A sample that covers the zoo's layouts and layer kinds: convnext (channels-last
# activations, where CPU and CUDA kernels disagree on the output layout), shufflenet
# (channel-shuffle views), transformers (attention, layer norm), squeeze-excite,
# concatenating branches, dense connections.
SAMPLE_MODELS = [
    "convnext_tiny",
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "vit_b_32",
    "swin_t",
    "googlenet",
    "densenet121",
    "efficientnet_b0",
]


def _zoo_params() -> list[Any]:
    names = zoo.ZOO_MODELS if FULL_ZOO else SAMPLE_MODELS
    return [pytest.param(name, marks=pytest.mark.slow) if name in zoo.SLOW_MODELS else name for name in names]


# --------------------------------------------------------------------------- helpers


def _differences(ours: dict[str, Any], real: dict[str, Any]) -> list[str]:
    return [f"{name}: meta path {ours.get(name)} != real {real[name]}" for name in real if ours.get(name) != real[name]]


class _Spy:
    """Counts and keeps what a wrapped function was called with / the recorders the meta path made."""

    def __init__(self) -> None:
        self.recorders: list[Any] = []
        self.calls = 0
        self.first_arguments: list[int] = []  # id() of each call's first argument
        # The arguments themselves, kept alive: a freed temporary's id() is reused by the
        # next one, and two different tensors would count as one given twice.
        self.kept: list[Any] = []

    def times_given(self, value: object) -> int:
        return self.first_arguments.count(id(value))


@pytest.fixture
def meta_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Spy]:
    """Keeps every meta-path recorder the pass builds (to read which nodes fell back to fake tensors)."""
    spy = _Spy()
    original = shapes._MetaShapeRecorder

    class Recorder(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            spy.recorders.append(self)

    monkeypatch.setattr(shapes, "_MetaShapeRecorder", Recorder)
    yield spy


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> _Spy:
    """Replace ``module.name`` by a wrapper that counts its calls."""
    spy = _Spy()
    original = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        spy.calls += 1
        if args:
            spy.first_arguments.append(id(args[0]))
            spy.kept.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return spy


def _assert_meta_path_only(spy: _Spy) -> None:
    """One meta-path recorder ran, and it re-ran no node on fake tensors."""
    assert len(spy.recorders) == 1, "the meta path was not taken"
    assert [node.name for node in spy.recorders[0].fake_nodes] == []


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_shapes_on_meta_equal_a_real_forward(name: str, meta_spy: _Spy) -> None:
    """Every node's metadata (shape, dtype, requires_grad, strides, memory format) equals ShapeProp's real run."""
    model, inputs = zoo.build_zoo_model(name)
    try:
        gm = fxindex.trace(model)
        fxindex.record_shapes(gm, inputs)
        _assert_meta_path_only(meta_spy)
        ours = recorded_metas(gm)
        real = real_metas(gm, inputs)
        assert sum(value is not None for value in real.values()) > 10
        assert _differences(ours, real) == []
    finally:
        del model
        zoo.release_memory()  # once per model: zoo weights are large


# --------------------------------------------------------------------------- small models


class Frozen(nn.Module):
    """A frozen conv stem, then a trainable head: requires_grad turns on at the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).mean((2, 3))
        return self.head(y) + y.sum(1, keepdim=True)


@pytest.mark.parametrize("case", ["frozen-stem", "input-requires-grad", "no-grad", "inference-mode", "train-mode"])
def test_requires_grad_matches_a_real_run(case: str, meta_spy: _Spy) -> None:
    """requires_grad follows the parameters, the input and the grad mode exactly as in a real run."""
    torch.manual_seed(0)
    model = Frozen().eval()
    x = torch.randn(2, 3, 8, 8)
    if case == "input-requires-grad":
        model.requires_grad_(False)
        x.requires_grad_(True)
    if case == "train-mode":
        model.train()
    gm = fxindex.trace(model)
    grad_mode = {"no-grad": torch.no_grad, "inference-mode": torch.inference_mode}.get(case, torch.enable_grad)
    with grad_mode():
        fxindex.record_shapes(gm, (x,))
        ours = recorded_metas(gm)
        real = real_metas(gm, (x,))
    _assert_meta_path_only(meta_spy)
    assert _differences(ours, real) == []
    flags = {name: meta[2] for name, meta in ours.items() if meta is not None}
    if case in ("no-grad", "inference-mode"):
        assert not any(flags.values())
    elif case == "input-requires-grad":
        assert all(flags[name] for name in ("x", "stem_0", "head", "output"))
    else:
        assert not flags["stem_0"] and flags["head"] and flags["add"]


def test_each_parameter_is_converted_once(monkeypatch: pytest.MonkeyPatch, meta_spy: _Spy) -> None:
    """A layer called twice and a weight tied to another layer are copied to meta once each."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.mix = nn.Linear(6, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.embed.weight  # tied

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.mix(self.mix(self.embed(ids))))

    model = Tied()
    gm = fxindex.trace(model)
    copies = _count_calls(monkeypatch, shapes, "_meta_copy")
    ids = torch.tensor([[1, 2, 3]])
    fxindex.record_shapes(gm, (ids,))
    _assert_meta_path_only(meta_spy)
    tensors = [*gm.parameters(), *gm.buffers()]
    assert len(tensors) == 3  # embed/out weight, mix weight, mix bias
    assert [copies.times_given(tensor) for tensor in [*tensors, ids]] == [1, 1, 1, 1]
    out = next(node for node in gm.graph.nodes if node.op == "output")
    assert tuple(out.meta["tensor_meta"].shape) == (1, 3, 10)


def test_a_model_on_the_meta_device_gets_shapes_without_real_weights() -> None:
    """A model built on meta (20 GB if it were real) records shapes from a real or a meta input."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(50_000, 50_000), nn.ReLU(), nn.Linear(50_000, 10), nn.LayerNorm(10))
    for x in (torch.randn(2, 50_000), torch.empty(2, 50_000, device="meta")):
        gm = fxindex.trace(model, example_inputs=(x,))
        assert [tuple(node.meta["tensor_meta"].shape) for node in gm.graph.nodes] == [
            (2, 50_000),
            (2, 50_000),
            (2, 50_000),
            (2, 10),
            (2, 10),
            (2, 10),
        ]
        assert all(p.device.type == "meta" for p in gm.parameters())
        assert all(node.meta["tensor_meta"].requires_grad for node in gm.graph.nodes if node.op == "call_module")


class Watcher(nn.Module):
    """A leaf that, while the shape pass runs it, checks the caller's model is still the caller's."""

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.check = [check]  # in a list: not a submodule, not traced into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check[0]()
        self.calls = getattr(self, "calls", 0) + 1  # an assignment in forward
        return x * self.scale


def test_the_callers_model_is_only_read_during_the_pass(meta_spy: _Spy) -> None:
    """No parameter is swapped inside the caller's model (another thread may be running it), nothing is set on it."""
    torch.manual_seed(0)
    seen: list[str] = []
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)).train()

    def check() -> None:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.device.type != "cpu" or tensor is not originals[name]:
                seen.append(name)

    model.append(Watcher(check))
    originals = dict([*model.named_parameters(), *model.named_buffers()])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    gm = fxindex.trace(model, leaf_modules=(Watcher,), example_inputs=(torch.randn(5, 4),))
    _assert_meta_path_only(meta_spy)
    assert seen == []
    assert not hasattr(model[3], "calls")  # the assignment landed on the layer's meta copy
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert tuple(next(n for n in gm.graph.nodes if n.op == "output").meta["tensor_meta"].shape) == (5, 4)


class DeviceChecked(nn.Module):
    """A leaf holding a real tensor that is neither parameter, buffer nor attribute, and checking devices.

    On meta the check fails (meta tensors have no device of their own); on
    fake tensors, which carry the model's device, it passes.
    """

    def __init__(self, rows: int, columns: int) -> None:
        super().__init__()
        self.tables = [torch.randn(rows, columns)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.tables[0].device:
            raise RuntimeError(f"expected the input on {self.tables[0].device}, got {x.device}")
        return x @ self.tables[0]


def test_only_the_node_meta_cannot_run_goes_to_fake_tensors(meta_spy: _Spy) -> None:
    """The leaf that mixes a real tensor in runs on fake tensors; the nodes before and after it stay on meta."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), DeviceChecked(6, 3), nn.ReLU(), nn.Linear(3, 2))
    gm = fxindex.trace(model, leaf_modules=(DeviceChecked,))
    x = torch.randn(5, 4)
    fxindex.record_shapes(gm, (x,))
    assert len(meta_spy.recorders) == 1
    assert [node.name for node in meta_spy.recorders[0].fake_nodes] == ["_1"]
    assert _differences(recorded_metas(gm), real_metas(gm, (x,))) == []


def test_a_data_dependent_leaf_falls_back_to_one_real_forward(meta_spy: _Spy) -> None:
    """``.item()`` fails on meta and on fake tensors: the shapes come from a real run, the RNG untouched."""

    class RepeatByItem(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.repeat(1, int(x.abs().sum().item() > -1) + 1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), RepeatByItem()).train()
    gm = fxindex.trace(model, leaf_modules=(RepeatByItem,))
    x = torch.randn(2, 3)
    state = torch.get_rng_state()
    fxindex.record_shapes(gm, (x,))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(meta_spy.recorders) == 1  # tried first
    out = next(node for node in gm.graph.nodes if node.op == "output")
    assert tuple(out.meta["tensor_meta"].shape) == (2, 8)


def test_bad_inputs_still_name_the_node() -> None:
    """Inputs that do not fit fail on meta, on fake and for real: ShapeMismatchError names the node and inputs."""
    gm = fxindex.trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)))
    before = recorded_metas(gm)
    with pytest.raises(fxindex.ShapeMismatchError, match=r"Tensor\[2, 3\].*node '_2'"):
        fxindex.record_shapes(gm, (torch.randn(2, 3),))
    assert recorded_metas(gm) == before


def test_channels_last_layouts_are_those_of_the_models_device(meta_spy: _Spy) -> None:
    """torch's meta kernels imitate CUDA: a CPU conv of a channels-last input must still come out channels-last."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.BatchNorm2d(8))
    x = torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    gm = fxindex.trace(model.eval())
    fxindex.record_shapes(gm, (x,))
    _assert_meta_path_only(meta_spy)
    ours = recorded_metas(gm)
    assert ours == real_metas(gm, (x,))
    assert ours["_0"][4] == torch.channels_last  # the control: plain meta says contiguous here
    plain = F.conv2d(x.to("meta"), model[0].weight.to("meta"), padding=1)
    assert not plain.is_contiguous(memory_format=torch.channels_last)


class Parametrized(nn.Module):
    """Layers whose weight is computed: a torch.nn.utils.parametrize'd Linear and an old-style weight_norm conv."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.utils.parametrizations.orthogonal(nn.Linear(6, 6))
        self.conv = torch.nn.utils.weight_norm(nn.Conv1d(6, 4, 3))  # the weight is a plain tensor attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.fc(x).transpose(1, 2))


def test_computed_weights_run_on_meta(meta_spy: _Spy) -> None:
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):  # weight_norm is deprecated in favour of the parametrization
        model = Parametrized()
    gm = fxindex.trace(model, leaf_modules=(type(model.fc),))
    x = torch.randn(2, 5, 6)
    fxindex.record_shapes(gm, (x,))
    _assert_meta_path_only(meta_spy)
    assert _differences(recorded_metas(gm), real_metas(gm, (x,))) == []


def test_fake_inputs_record_what_real_inputs_do(meta_spy: _Spy) -> None:
    """The command line passes fake tensors: their shapes, strides and dtypes are all the meta path reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = fxindex.trace(model)
    x = torch.randn(3, 3, 8, 8)
    fxindex.record_shapes(gm, (x,))
    real_inputs = recorded_metas(gm)
    with FakeTensorMode() as mode:
        fake = torch.empty(3, 3, 8, 8)
    assert mode is not None
    fxindex.record_shapes(gm, (fake,))
    assert recorded_metas(gm) == real_inputs == real_metas(gm, (x,))
    assert len(meta_spy.recorders) == 2


class Tagged(torch.Tensor):
    """A tensor subclass: it may change what ops return, so the pass leaves meta for fake tensors."""


def test_a_tensor_subclass_input_skips_meta(meta_spy: _Spy) -> None:
    gm = fxindex.trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    x = torch.randn(2, 3).as_subclass(Tagged)
    fxindex.record_shapes(gm, (x,))
    assert meta_spy.recorders == []
    assert tuple(next(n for n in gm.graph.nodes if n.op == "output").meta["tensor_meta"].shape) == (2, 4)


def test_threads_record_shapes_of_one_model_at_once() -> None:
    """Threads recording shapes of one model's traces get the same shapes (thread-local caches, model only read).

    Tracing itself is done first, in this thread: torch.fx's tracer patches
    ``nn.Module.__call__`` for the whole process while it runs.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    model.train()
    x = torch.randn(2, 3, 8, 8)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected = recorded_metas(fxindex.trace(model, example_inputs=(x,)))
    traces = [fxindex.trace(model) for _ in range(3)]  # share the model's layers and tensors
    results: list[Any] = []

    def work(gm: fx.GraphModule) -> None:
        for _ in range(5):
            fxindex.record_shapes(gm, (x,))
            results.append(recorded_metas(gm))

    threads = [threading.Thread(target=work, args=(gm,)) for gm in traces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 15 and all(result == expected for result in results)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


# --------------------------------------------------------------------------- the remembered kernels


def test_the_kernel_cache_keeps_views_and_in_place_ops_aliased() -> None:
    x = torch.empty(4, 6, device="meta")
    with shapes.meta_kernel_cache("cpu"):
        for _ in range(2):  # the second round would hit the cache, were views cached
            view = x.view(24)
            assert view._base is x
            transposed = x.t()
            assert transposed._base is x and transposed.stride() == (1, 6)
            assert x.add_(1) is x
            added = x + 1
            assert added._base is None and added.shape == (4, 6)


def test_the_kernel_cache_tells_apart_arguments_equal_in_python() -> None:
    """1, 1.0 and True are equal dict keys; as arguments they give different dtypes."""
    ints = torch.empty(3, dtype=torch.int64, device="meta")
    with shapes.meta_kernel_cache("cpu"):
        assert (ints + 1).dtype == torch.int64
        assert (ints + 1.0).dtype == torch.float32
        assert (ints + True).dtype == torch.int64
        assert (ints.bool() & True).dtype == torch.bool


def test_the_kernel_cache_follows_the_default_dtype() -> None:
    default = torch.get_default_dtype()
    try:
        with torch.device("meta"), shapes.meta_kernel_cache("cpu"):
            assert torch.empty(2).dtype == default
            torch.set_default_dtype(torch.float64)
            assert torch.empty(2).dtype == torch.float64
    finally:
        torch.set_default_dtype(default)


def test_factory_calls_make_plain_meta_tensors() -> None:
    """``torch.zeros(n)`` on the meta device, computed on fake tensors for the CPU's layout, comes back plain meta."""
    for _ in range(2):  # computed, then remembered
        with torch.device("meta"), shapes.meta_kernel_cache("cpu"):
            zeros = torch.zeros(2, 3)
            total = zeros + torch.ones(3)
        assert type(zeros) is torch.Tensor and type(total) is torch.Tensor
        assert zeros.device.type == total.device.type == "meta" and total.shape == (2, 3)


class Offsets(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[1]) + torch.zeros(x.shape, dtype=torch.float64)


def test_a_traced_factory_call_records_what_a_real_run_does(meta_spy: _Spy) -> None:
    gm = fxindex.trace(Offsets())
    x = torch.randn(2, 5)
    fxindex.record_shapes(gm, (x,))
    _assert_meta_path_only(meta_spy)
    assert _differences(recorded_metas(gm), real_metas(gm, (x,))) == []
    assert recorded_metas(gm)["add_1"][1] == torch.float64


def test_the_kernel_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shapes._MetaCache, "MAX_ENTRIES", 3)
    mode = shapes._MetaCache({}, torch.device("cpu"))
    with mode:
        for size in range(1, 10):
            assert (torch.empty(size, device="meta") + 1).shape == (size,)
    assert 0 < len(mode.entries) <= 3


def test_the_kernel_cache_imitates_the_device_it_is_given() -> None:
    """The same meta inputs give CPU's layout with device cpu and the meta kernels' own with device meta."""
    x = torch.empty(1, 8, 5, 5, device="meta").contiguous(memory_format=torch.channels_last)
    w = torch.empty(8, 8, 3, 3, device="meta")
    with shapes.meta_kernel_cache("cpu"):
        on_cpu = F.conv2d(x, w)
    with shapes.meta_kernel_cache("meta"):
        on_meta = F.conv2d(x, w)
    real = F.conv2d(torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last), torch.randn(8, 8, 3, 3))
    assert on_cpu.device.type == on_meta.device.type == "meta"
    assert on_cpu.stride() == real.stride() != on_meta.stride()


# --------------------------------------------------------------------------- planning


class Widenable(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> fc, with a residual add: a widening re-runs several layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv1(x)))
        y = self.conv2(y) + x.mean(1, keepdim=True)
        return self.fc(y.mean((2, 3)))


def test_planning_reruns_touched_nodes_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """A widening replace re-runs its nodes on meta (no fake tensor made), converting each new tensor once."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    gm = fxindex.trace(Widenable().eval(), example_inputs=(x,))
    to_fake = _count_calls(monkeypatch, shapes, "meta_to_fake")
    monkeypatch.setattr("fxindex._propagate.meta_to_fake", shapes.meta_to_fake)
    copies = _count_calls(monkeypatch, shapes, "_meta_copy")
    new = fxindex.replace(gm, "conv1", nn.Conv2d(3, 12, 3, padding=1), example_inputs=(x,))
    assert to_fake.calls == 0
    assert new.get_submodule("bn").num_features == 12
    # Once to record the shapes for the given inputs, once in the plan: never once per op.
    assert max(copies.first_arguments.count(given) for given in copies.first_arguments) <= 2
    # The rebuilt conv2 (12 -> 8 channels) was converted in the plan, once.
    assert copies.times_given(new.get_submodule("conv2").weight) == 1
    real = real_metas(new, (x,))
    assert _differences(recorded_metas(new), real) == []


def test_planning_falls_back_to_fake_for_a_layer_meta_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new layer that checks devices re-runs on fake tensors; when that fails too, its error is reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    gm = fxindex.trace(model, example_inputs=(x,))
    to_fake = _count_calls(monkeypatch, shapes, "meta_to_fake")
    monkeypatch.setattr("fxindex._propagate.meta_to_fake", shapes.meta_to_fake)
    new = fxindex.replace(gm, "0", DeviceChecked(4, 6), example_inputs=(x,))
    assert to_fake.calls == 2  # args and kwargs of that one node
    assert tuple(next(n for n in new.graph.nodes if n.op == "output").meta["tensor_meta"].shape) == (3, 2)
    # The fake kernel's words (a real run would say "mat1 and mat2 shapes cannot be multiplied").
    with pytest.raises(fxindex.ShapeMismatchError, match=r"DeviceChecked.*same reduction dim.*\[3, 4\] X \[5, 6\]"):
        fxindex.replace(gm, "0", DeviceChecked(5, 6), example_inputs=(x,))


# --------------------------------------------------------------------------- CPU layouts (issue 9)
# torch's meta and fake kernels of group_norm write a contiguous output (CUDA's choice); the CPU
# kernel writes its input's suggested memory format. A one-channel tensor made contiguous after
# a permute keeps stride 1 on its channel dim and suggests channels-last, so a conv after the norm
# writes channels-last on the CPU and a hard-coded view fails there although it ran on meta.


def _one_channel_channels_last(batch: int = 2, side: int = 3) -> torch.Tensor:
    """(N, 1, H, W) as ``.permute(0, 3, 1, 2).contiguous()`` leaves it: contiguous, strides (HW, 1, W, 1)."""
    x = torch.randn(batch, side, side, 1).permute(0, 3, 1, 2).contiguous()
    assert x.is_contiguous() and x.stride() == (side * side, 1, side, 1)
    return x


def _every_permutation(shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """A tensor of ``shape`` laid out in each order of its dims (channels-last, transposed, ...).

    Up to 4 dims every order; for 5 only NCDHW, NDHWC (channels-last-3d), the reverse and
    two others, since 120 orders would cost seconds.
    """
    import itertools

    orders: list[tuple[int, ...]] = list(itertools.permutations(range(len(shape))))
    if len(shape) > 4:
        orders = [(0, 1, 2, 3, 4), (0, 2, 3, 4, 1), (4, 3, 2, 1, 0), (0, 2, 1, 3, 4), (1, 0, 4, 2, 3)]
    for order in orders:
        stored = torch.randn([shape[dim] for dim in order])
        yield stored.permute([order.index(dim) for dim in range(len(shape))])


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (2, 4, 3, 3), (2, 4, 1, 1), (2, 1, 1, 3), (2, 2, 1, 2, 2), (2, 4, 5)])
def test_suggested_memory_format_is_what_the_cpu_group_norm_writes(shape: tuple[int, ...]) -> None:
    """The port of ATen's suggest_memory_format gives the layout of the real CPU kernel, for every dim order."""
    for x in _every_permutation(shape):
        real = F.group_norm(x, 1)
        layout = shapes.suggested_memory_format(tuple(x.shape), x.stride())
        assert torch.empty(shape, memory_format=layout).stride() == real.stride(), x.stride()


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (2, 4, 3, 3), (2, 4, 1, 1), (2, 2, 1, 2, 2)])
def test_group_norm_strides_on_meta_and_fake_are_the_cpu_kernels(shape: tuple[int, ...]) -> None:
    """Through the kernel cache (meta) and under cpu_layouts (fake), group_norm's strides equal a real run's."""
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    mode = shapes.make_fake_mode()
    for x in _every_permutation(shape):
        real = F.group_norm(x, 1, weight, bias)
        meta_x = torch.empty_strided(x.shape, x.stride(), device="meta")
        with torch.device("meta"), shapes.meta_kernel_cache("cpu"):
            on_meta = F.group_norm(meta_x, 1, weight.to("meta"), bias.to("meta"))
        with mode, shapes.cpu_layouts("cpu"):
            on_fake = torch.group_norm(mode.from_tensor(x), 1, weight, bias)
        assert on_meta.stride() == on_fake.stride() == real.stride(), x.stride()
    # A model on meta imitates no device: the meta kernel's own (contiguous) layout stays.
    x = _one_channel_channels_last() if len(shape) == 4 else None
    if x is not None:
        with torch.device("meta"), shapes.meta_kernel_cache("meta"):
            alone = F.group_norm(torch.empty_strided(x.shape, x.stride(), device="meta"), 1)
        assert alone.is_contiguous()


class NormThenConv(nn.Module):
    """GroupNorm, a 1x1 conv, a GELU: the conv's output layout follows the norm's."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.conv(self.norm(x)))


@pytest.mark.parametrize("layout", ["one-channel-permuted", "channels-last", "contiguous"])
def test_group_norm_layouts_are_recorded_as_a_real_run_has_them(layout: str, meta_spy: _Spy) -> None:
    torch.manual_seed(0)
    if layout == "one-channel-permuted":
        model, x = NormThenConv(1, 1), _one_channel_channels_last()
    else:
        model, x = NormThenConv(4, 2), torch.randn(2, 4, 5, 5)
        if layout == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
    gm = fxindex.trace(model.eval())
    fxindex.record_shapes(gm, (x,))
    _assert_meta_path_only(meta_spy)
    assert _differences(recorded_metas(gm), real_metas(gm, (x,))) == []
    conv = next(node for node in gm.graph.nodes if node.name == "conv").meta["tensor_meta"]
    assert (conv.memory_format == torch.channels_last) == (layout != "contiguous"), conv


class OneChannelView(nn.Module):
    """A one-channel channels-last tensor through GroupNorm and a 1x1 conv, then a view that needs NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, 1)
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x.permute(0, 3, 1, 2).contiguous())).view(-1, 18)


def test_a_view_the_cpu_layout_breaks_is_reported_notrecorded_metas() -> None:
    """The pass used to record this model as running (meta's contiguous norm); a real run fails at the view."""
    model, x = OneChannelView().eval(), torch.randn(2, 3, 3, 1)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        model(x)
    gm = fxindex.trace(model)
    with pytest.raises(fxindex.ShapeMismatchError, match=r"node 'view'.*view size is not compatible"):
        fxindex.record_shapes(gm, (x,))


class DeviceCheckedNorm(nn.Module):
    """A device check meta cannot pass (see DeviceChecked), then group_norm: the node runs on fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.table = [torch.ones(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.table[0].device:
            raise RuntimeError(f"expected the input on {self.table[0].device}, got {x.device}")
        return F.group_norm(x, 1)


def test_a_node_rerun_on_fake_tensors_gets_the_cpu_layout_too(meta_spy: _Spy) -> None:
    model = nn.Sequential(DeviceCheckedNorm(), nn.Conv2d(1, 2, 1))
    gm = fxindex.trace(model, leaf_modules=(DeviceCheckedNorm,))
    x = _one_channel_channels_last()
    fxindex.record_shapes(gm, (x,))
    assert [node.name for node in meta_spy.recorders[0].fake_nodes] == ["_0"]
    assert _differences(recorded_metas(gm), real_metas(gm, (x,))) == []
