"""fxindex.index over every torchvision classification model (random weights, small inputs).

The model table lives in tests/zoo.py. For each model:
  * the index lists exactly the call_module nodes of the graph, in order, and
    the same targets as torch.fx's own tracer with fxindex's documented leaf
    rule written out here (subclasses of torch.nn layers, such as
    torchvision's LayerNorm2d, are leaves);
  * ``index[i].module is gm.get_submodule(index[i].target)``;
  * per call site, the recorded input/output shapes equal those seen by
    forward hooks during a real eager forward, and ``call_sites`` equals the
    number of times the module really ran.
Models in zoo.TRACE_FAILURES must fail exactly as recorded there.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxindex
import zoo


# torch.nn's holders: classes under torch.nn.modules that are not layers.
_HOLDERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict, nn.Container)


class _TorchLayerLeaves(torch.fx.Tracer):
    """torch.fx's tracer, where a subclass of a torch.nn layer is a leaf too (fxindex's default).

    Written out independently of fxindex.trace: a module is a leaf when a class
    of its MRO is defined under ``torch.nn.modules`` and is not a holder.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        layer_base = any(
            base.__module__.startswith("torch.nn.modules.") and base not in _HOLDERS and issubclass(base, nn.Module)
            for base in type(m).__mro__
        )
        return layer_base or super().is_leaf_module(m, module_qualified_name)


def _shapes(value: Any) -> Any:
    """Shapes in LayerEntry's convention: a tuple of ints, nested for tuple outputs, None if no tensor."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        shapes = tuple(_shapes(item) for item in value)
        return shapes if any(shape is not None for shape in shapes) else None
    return None


def _eager_call_shapes(model: nn.Module, modules: dict[str, nn.Module], inputs: tuple) -> dict[str, list]:
    """(input shape, output shape) of every call of each module, in call order, from a real forward."""
    seen: dict[str, list] = defaultdict(list)
    handles = []
    for name, module in modules.items():
        def hook(_module, args, output, name=name):
            first = args[0] if args else None
            seen[name].append((_shapes(first) if isinstance(first, torch.Tensor) else None, _shapes(output)))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    """Freeze what is alive before the zoo, so the release after each model costs milliseconds."""
    with zoo.frozen_heap():
        yield


@pytest.fixture(autouse=True)
def _release_memory_after_each_model():
    """Each test builds one model (up to 645M parameters): free it and trim the heap before the next."""
    yield
    zoo.release_memory()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Inputs are tiny: one intra-op thread is as fast and avoids OpenMP spin-waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(names: list[str]) -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in zoo.SLOW_MODELS else name for name in names]


def test_zoo_tables_are_consistent():
    assert zoo.ZOO_MODELS == sorted(torchvision.models.list_models(module=torchvision.models))
    assert len(zoo.ZOO_MODELS) > 50
    for table in (zoo.TRACE_FAILURES, zoo.SLOW_MODELS, zoo.INPUT_SIZES, zoo.BUILD_KWARGS):
        assert set(table) <= set(zoo.ZOO_MODELS), "stale model name in a zoo table"
    for name, (error_type, pattern, reason) in zoo.TRACE_FAILURES.items():
        assert isinstance(error_type, type) and issubclass(error_type, BaseException), name
        assert isinstance(pattern, str) and pattern and isinstance(reason, str) and reason, name
    assert sorted(zoo.TRACEABLE_MODELS + list(zoo.TRACE_FAILURES)) == zoo.ZOO_MODELS
    with pytest.raises(KeyError):
        zoo.build_zoo_model("not_a_model")


@pytest.mark.parametrize("name", _params(zoo.TRACEABLE_MODELS))
def test_zoo_index_matches_graph_and_real_forward(name):
    model, inputs = zoo.build_zoo_model(name)
    assert not model.training

    layers = fxindex.index(model, inputs)
    gm = layers.graph_module

    # Exactly the graph's call_module nodes, in graph order.
    call_nodes = [node for node in gm.graph.nodes if node.op == "call_module"]
    assert len(layers) == len(call_nodes) > 0
    assert [entry.node for entry in layers] == call_nodes
    assert [entry.index for entry in layers] == list(range(len(layers)))
    # ... and the same targets torch.fx's own tracer finds, with the same leaves.
    reference = _TorchLayerLeaves().trace(model)
    assert [entry.target for entry in layers] == [n.target for n in reference.nodes if n.op == "call_module"]

    targets = {entry.target for entry in layers}
    for entry in layers:
        assert entry.module is gm.get_submodule(entry.target)
        assert entry.module is model.get_submodule(entry.target)
        assert entry.call_sites == len(layers.positions(entry.target))

    # Shapes per call site versus a real eager forward.
    seen = _eager_call_shapes(model, {target: model.get_submodule(target) for target in targets}, inputs)
    for target in targets:
        recorded = [(layers[p].input_shape, layers[p].output_shape) for p in layers.positions(target)]
        assert recorded == seen[target], f"{name}: shapes of {target} differ from a real forward"
        assert all(output is not None for _, output in recorded), f"{name}: no shape recorded for {target}"

    # The graph module computes what the model computes.
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


@pytest.mark.parametrize(
    "name",
    sorted(zoo.TRACE_FAILURES)
    or [pytest.param(None, marks=pytest.mark.skip(reason="zoo.TRACE_FAILURES is empty: every zoo model traces"))],
)
def test_zoo_expected_trace_failures(name):
    error_type, pattern, _reason = zoo.TRACE_FAILURES[name]
    model, inputs = zoo.build_zoo_model(name)
    with pytest.raises(error_type, match=pattern):
        fxindex.index(model, inputs)
