"""Tests of fxindex.speed_up: same results as plain fx, everywhere a GraphModule goes.

No timing assertions here: benchmarks/bench_forward.py measures the speed.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torchvision
from torch import fx, nn

import fxindex
from fxindex._speed import CACHE_ATTRIBUTE, FastLookupCodeGen, is_sped_up, speed_up

# --------------------------------------------------------------------------- models


def nested_linears(depth: int, layers: int = 12, width: int = 8) -> nn.Module:
    """``layers`` Linear layers in a Sequential wrapped ``depth - 1`` more times."""
    model: nn.Module = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for _ in range(depth - 1):
        model = nn.Sequential(model)
    return model.eval()


class Block(nn.Module):
    """conv -> bn -> relu plus a residual: nested names, a module called twice."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stages = nn.Sequential(nn.Sequential(Block(), Block()), Block())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.ModuleDict({"fc": nn.Linear(4, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head["fc"](torch.flatten(self.pool(x), 1))


def _inputs_for(model: nn.Module) -> tuple[torch.Tensor]:
    torch.manual_seed(1)
    if isinstance(model, TinyResNet):
        return (torch.randn(2, 3, 8, 8),)
    return (torch.randn(2, 8),)


@pytest.fixture
def tiny() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet().eval()


def _fast(model: nn.Module) -> fx.GraphModule:
    return speed_up(fxindex.trace(model))


def _call_lines(gm: fx.GraphModule) -> list[str]:
    """Lines of the forward that runs (``_code``) that call a submodule, found by the target comment."""
    targets = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    return [line for line in gm._code.splitlines() if line.rsplit("# ", 1)[-1].strip() in targets]


def _plain_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule of a copy of ``gm``'s graph with torch's own code generator (pytree info kept)."""
    graph = copy.deepcopy(gm.graph)
    fast = graph._codegen
    base = next(cls for cls in type(fast).__mro__ if not issubclass(cls, FastLookupCodeGen))
    plain = base.__new__(base)
    plain.__dict__.update(fast.__dict__)
    graph.set_codegen(plain)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


# --------------------------------------------------------------------------- same results


@pytest.mark.parametrize("depth", [1, 2, 4, 6])
def test_nested_outputs_equal_plain_and_eager(depth: int) -> None:
    model = nested_linears(depth)
    plain = fx.symbolic_trace(model)
    fast = _fast(model)
    (x,) = _inputs_for(model)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
        assert torch.equal(fast(x), model(x))


@pytest.mark.parametrize("depth", [1, 4])
def test_generated_code_skips_module_getattr(depth: int) -> None:
    fast = _fast(nested_linears(depth))
    lines = _call_lines(fast)
    assert len(lines) == 12
    for line in lines:
        assert "= _fxindex_m" in line and "getattr(" not in line and "self." not in line.split("=", 1)[1]


def test_resnet18_outputs_equal_plain_and_eager() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    plain = fx.symbolic_trace(model)
    fast = _fast(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(plain(x), expected)
        assert torch.equal(fast(x), expected)
    assert len(_call_lines(fast)) == sum(node.op == "call_module" for node in fast.graph.nodes)


def test_state_dict_keys_and_module_tree_unchanged(tiny: TinyResNet) -> None:
    plain = fx.symbolic_trace(tiny)
    fast = _fast(tiny)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert set(fast.state_dict()) == set(tiny.state_dict())
    assert [name for name, _ in fast.named_modules()] == [name for name, _ in plain.named_modules()]
    # The cache is a plain attribute: not a parameter, buffer or submodule.
    assert CACHE_ATTRIBUTE in fast.__dict__
    assert CACHE_ATTRIBUTE not in fast._modules and CACHE_ATTRIBUTE not in fast._buffers


def test_speed_up_is_in_place_and_idempotent(tiny: TinyResNet) -> None:
    gm = fx.symbolic_trace(tiny)
    assert not is_sped_up(gm)
    assert speed_up(gm) is gm
    call_lines = _call_lines(gm)
    assert len(call_lines) == 12
    assert speed_up(gm) is gm
    assert is_sped_up(gm)
    # A second call generates the same call statements (only the token differs).
    assert _call_lines(gm) == call_lines
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        assert torch.equal(gm(x), tiny(x))


def test_rejects_non_graph_module(tiny: TinyResNet) -> None:
    with pytest.raises(TypeError, match="GraphModule"):
        speed_up(tiny)  # type: ignore[arg-type]


def test_forward_hooks_still_run(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    seen: list[str] = []
    fast.get_submodule("stages.0.1.conv").register_forward_hook(lambda *_: seen.append("conv"))
    (x,) = _inputs_for(tiny)
    fast(x)
    assert seen == ["conv"]


# --------------------------------------------------------------------------- copies and conversions


def test_deepcopy_uses_its_own_modules(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    clone = copy.deepcopy(fast)
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        expected = tiny(x)
        assert torch.equal(clone(x), expected)
        assert is_sped_up(clone)
        clone.get_submodule("head.fc").weight.zero_()
        clone.get_submodule("head.fc").bias.fill_(1.0)
        assert torch.equal(clone(x), torch.ones_like(expected))
        assert torch.equal(fast(x), expected)  # the original is untouched


def test_pickle_round_trip(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    loaded = pickle.loads(pickle.dumps(fast))
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny(x))
    assert list(loaded.state_dict()) == list(fast.state_dict())
    # The loaded graph was re-traced from the generated code: same call sites.
    targets = [n.target for n in fast.graph.nodes if n.op == "call_module"]
    assert [n.target for n in loaded.graph.nodes if n.op == "call_module"] == targets
    # It loads as a plain GraphModule; speed_up applies again.
    assert torch.equal(speed_up(loaded)(x), tiny(x))


def test_pickle_round_trip_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    loaded = pickle.loads(pickle.dumps(_fast(model)))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_to_float64_and_half(tiny: TinyResNet) -> None:
    (x,) = _inputs_for(tiny)
    fast64 = _fast(copy.deepcopy(tiny)).to(torch.float64)
    with torch.no_grad():
        out = fast64(x.double())
        assert out.dtype == torch.float64
        assert torch.equal(out, copy.deepcopy(tiny).to(torch.float64)(x.double()))
    half = _fast(nested_linears(2)).half()
    (y,) = _inputs_for(half)
    with torch.no_grad():
        assert half(y.half()).dtype == torch.float16


def test_train_and_eval_reach_the_submodules(tiny: TinyResNet) -> None:
    fast = _fast(copy.deepcopy(tiny))
    eager = copy.deepcopy(tiny)
    (x,) = _inputs_for(tiny)
    fast.train()
    eager.train()
    assert all(module.training for module in fast.modules())
    with torch.no_grad():
        # Batch norm in training mode uses batch statistics and updates its running stats.
        assert torch.equal(fast(x), eager(x))
        assert torch.equal(fast.get_submodule("stages.1.bn").running_mean, eager.stages[1].bn.running_mean)
        fast.eval()
        eager.eval()
        assert not any(module.training for module in fast.modules())
        assert torch.equal(fast(x), eager(x))


def test_torch_compile(tiny: TinyResNet) -> None:
    dynamo = pytest.importorskip("torch._dynamo", reason="torch.compile unavailable")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform / Python")
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    dynamo.reset()
    # fullgraph: dynamo must trace the generated forward, lookup included, in one graph.
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), tiny(x), atol=1e-6)


def test_torch_export(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    exported = torch.export.export(fast, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), tiny(x), atol=1e-6)
    # The submodule paths survive into the exported graph's module stacks.
    paths = {
        path
        for node in exported.graph.nodes
        for path, _ in (node.meta.get("nn_module_stack") or {}).values()
    }
    assert "stages.0.1.conv" in paths
    # Export leaves the module working (its lookup is refreshed if export swapped dicts).
    with torch.no_grad():
        assert torch.equal(fast(x), tiny(x))
    pickle.dumps(fast)  # no tracer objects left behind in the cache


def test_torch_export_strict(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(fast, (x,), strict=True)
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), tiny(x), atol=1e-6)


def test_retrace_of_sped_up_module(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    again = fxindex.trace(fast)
    assert [n.target for n in again.graph.nodes if n.op == "call_module"] == [
        n.target for n in fast.graph.nodes if n.op == "call_module"
    ]


def test_print_readable_is_torch_fx_s(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    text = fast.print_readable(print_output=False)
    assert text == _plain_twin(fast).print_readable(print_output=False)
    assert 'getattr(getattr(self.stages, "0"), "1").conv(' in text and "_fxindex" not in text
    assert "_fxindex_m" in fast._code  # printing did not change what runs


# --------------------------------------------------------------------------- the code people read


class NameClash(nn.Module):
    """Layers named like the generated code's own locals: the names torch gives nodes must survive."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("_fxindex_m", nn.Linear(8, 8))
        self.add_module("_fxindex_lookup", nn.Sequential(nn.ReLU(), nn.Linear(8, 8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "_fxindex_lookup")(getattr(self, "_fxindex_m")(x))


def _unregistered() -> fx.GraphModule:
    gm = fxindex.trace(nested_linears(1, layers=3))
    del gm._modules["1"]
    object.__setattr__(gm, "1", nn.Linear(8, 8))  # not a registered child: keeps torch's lookup
    return speed_up(gm)


def _pytree() -> fx.GraphModule:
    return speed_up(fx.symbolic_trace(DictInput(), concrete_args={"inputs": {"x": fx.PH, "y": fx.PH}}))


CODE_CASES = {
    "tiny resnet": lambda: _fast(TinyResNet()),
    "nested 4 deep": lambda: _fast(nested_linears(4, layers=3)),
    "name clash": lambda: _fast(NameClash()),
    "partly rewritten": _unregistered,
    "pytree": _pytree,
    "resnet18": lambda: _fast(torchvision.models.resnet18()),
}


@pytest.mark.parametrize("case", list(CODE_CASES))
def test_code_is_what_torch_fx_generates(case: str) -> None:
    gm = CODE_CASES[case]()
    assert is_sped_up(gm) and "= _fxindex_m" in gm._code  # the fast forward is the one that runs
    assert gm.code == _plain_twin(gm).code
    assert "_fxindex_fast_lookup" not in gm.code and " = _fxindex_m" not in gm.code


def test_nested_graph_module_code_is_torch_fx_s() -> None:
    outer = speed_up(fxindex.trace(nn.Sequential(fxindex.trace(nested_linears(2, layers=2)), nn.ReLU()),
                                   leaf_modules=[fx.GraphModule]))
    inner = outer.get_submodule("0")
    assert is_sped_up(inner) and "= _fxindex_m" in inner._code
    assert inner.code == _plain_twin(inner).code and outer.code == _plain_twin(outer).code


def test_print_shows_the_plain_code(tiny: TinyResNet, capsys: pytest.CaptureFixture[str]) -> None:
    fast = _fast(tiny)
    print(fast)
    out = capsys.readouterr().out
    assert fast.code in out and "_fxindex" not in out
    assert out.startswith("TinyResNet(") and "print_readable()" in out.splitlines()[-1]


def test_the_fast_forward_still_skips_module_getattr(tiny: TinyResNet, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _fast(tiny)
    assert "self.stem(" in fast.code  # what is shown ...
    twin = _plain_twin(fast)
    looked_up: list[str] = []
    module_getattr = nn.Module.__getattr__

    def spy(self: nn.Module, name: str) -> object:
        looked_up.append(name)
        return module_getattr(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", spy)
    children = {name.rsplit(".", 1)[-1] for name, _ in fast.named_modules() if name}
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        expected = twin(x)
        assert children <= set(looked_up)  # plain fx looks every layer up on every call ...
        looked_up.clear()
        assert torch.equal(fast(x), expected)
    assert looked_up and not children & set(looked_up)  # ... the forward that runs looks up none


def test_code_survives_copies_pickles_and_edits(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    code = fast.code
    assert copy.deepcopy(fast).code == code and copy.copy(fast).code == code
    loaded = pickle.loads(pickle.dumps(fast))  # re-traced from the fast code: the same graph
    assert not is_sped_up(loaded) and loaded.code == code
    assert speed_up(loaded).code == code
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).code == code
    # An edit regenerates both codes; recompiling with nothing changed shows the same text.
    rebuilt = fxindex.replace(fast, "head.fc", nn.Linear(4, 5))
    assert is_sped_up(rebuilt) and rebuilt.code == _plain_twin(rebuilt).code and "_fxindex" not in rebuilt.code
    fast.recompile()
    assert fast.code == code and fast.code != fast._code
    # Back on torch's code generator, the code shown is the code that runs.
    fast.graph.set_codegen(torch.fx.graph.CodeGen())
    fast.recompile()
    assert fast.code == fast._code == code


# --------------------------------------------------------------------------- edits


def test_graph_edit_then_recompile(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    stem = next(node for node in fast.graph.nodes if node.op == "call_module" and node.target == "stem")
    with fast.graph.inserting_after(stem):
        relu = fast.graph.call_function(torch.relu, (stem,))
    stem.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
    fast.recompile()
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        expected = tiny.head["fc"](torch.flatten(tiny.pool(tiny.stages(torch.relu(tiny.stem(x)))), 1))
        assert not torch.equal(expected, tiny(x))
        assert torch.equal(fast(x), expected)
    assert is_sped_up(fast)
    assert "torch.relu(stem)" in fast.code and fast.code == _plain_twin(fast).code


def test_add_submodule_then_recompile(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    new = nn.Linear(4, 3)
    fast.add_submodule("head.fc", new)
    fast.recompile()
    with torch.no_grad():
        features = torch.flatten(tiny.pool(tiny.stages(tiny.stem(x))), 1)
        assert torch.equal(fast(x), new(features))
        assert not torch.equal(fast(x), tiny(x))


def test_leaf_swap_is_seen_before_recompile(tiny: TinyResNet) -> None:
    # Plain fx looks the layer up on every call; so does the cached parent dict.
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    new = nn.Linear(4, 3)
    fast.add_submodule("head.fc", new)
    with torch.no_grad():
        features = torch.flatten(tiny.pool(tiny.stages(tiny.stem(x))), 1)
        assert torch.equal(fast(x), new(features))


def test_container_swap_is_seen_before_recompile(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    new_head = nn.ModuleDict({"fc": nn.Linear(4, 3)})
    fast.head = new_head  # replaces the container of a called layer
    with torch.no_grad():
        features = torch.flatten(tiny.pool(tiny.stages(tiny.stem(x))), 1)
        assert torch.equal(fast(x), new_head["fc"](features))


def test_raw_modules_write_and_delete_are_seen(tiny: TinyResNet) -> None:
    # Some tools (torch.ao.quantization) write parent._modules directly, bypassing setattr.
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    block = fast.get_submodule("stages.1")
    block._modules["relu"] = nn.Identity()
    with torch.no_grad():
        inner = tiny.stages[0](tiny.stem(x))
        last = tiny.stages[1]
        expected = tiny.head["fc"](torch.flatten(tiny.pool(last.bn(last.conv(inner)) + inner), 1))
        assert torch.equal(fast(x), expected)
    del block._modules["relu"]
    with pytest.raises(AttributeError, match="relu"):  # as plain fx: the layer is gone
        fast(x)


def test_container_swap_then_recompile(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    (x,) = _inputs_for(tiny)
    new_stages = copy.deepcopy(tiny.stages)
    for parameter in new_stages.parameters():
        parameter.data.mul_(0.5)
    fast.stages = new_stages
    fast.recompile()
    with torch.no_grad():
        expected = tiny.head["fc"](torch.flatten(tiny.pool(new_stages(tiny.stem(x))), 1))
        assert torch.equal(fast(x), expected)


def test_shallow_copy_and_recompile_of_the_original(tiny: TinyResNet) -> None:
    # copy.copy shares the graph; the graph's owner becomes the copy.
    fast = _fast(tiny)
    shallow = copy.copy(fast)
    new = nn.Linear(4, 3)
    fast.add_submodule("head", nn.ModuleDict({"fc": new}))  # a container: needs recompile
    fast.recompile()  # regenerates code for the graph's owner, which is now `shallow`
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        features = torch.flatten(tiny.pool(tiny.stages(tiny.stem(x))), 1)
        assert torch.equal(fast(x), new(features))
        assert torch.equal(shallow(x), tiny(x))


def test_stale_cache_from_copied_dict_is_not_used(tiny: TinyResNet) -> None:
    # What DataParallel's replicas do: copy __dict__, then give the replica new _modules.
    fast = _fast(tiny)
    replica = object.__new__(type(fast))
    replica.__dict__ = fast.__dict__.copy()
    replica.__dict__["_modules"] = dict(fast._modules)
    new_head = nn.ModuleDict({"fc": nn.Linear(4, 3)})
    replica.__dict__["_modules"]["head"] = new_head
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        features = torch.flatten(tiny.pool(tiny.stages(tiny.stem(x))), 1)
        assert torch.equal(replica(x), new_head["fc"](features))
        assert torch.equal(fast(x), tiny(x))


def test_missing_cache_is_rebuilt(tiny: TinyResNet) -> None:
    fast = _fast(tiny)
    eager_built = fast.__dict__.pop(CACHE_ATTRIBUTE)  # built by the code generator
    (x,) = _inputs_for(tiny)
    with torch.no_grad():
        assert torch.equal(fast(x), tiny(x))
    rebuilt = fast.__dict__[CACHE_ATTRIBUTE]  # built by the generated code
    assert rebuilt[2][0] is fast._modules
    # Both builders make the same cache: token, snapshot, the same dicts and modules.
    assert rebuilt[:2] == eager_built[:2]
    assert all(a is b for a, b in zip(rebuilt[2], eager_built[2])) and len(rebuilt[2]) == len(eager_built[2])
    assert all(a is b for a, b in zip(rebuilt[3], eager_built[3])) and len(rebuilt[3]) == 12


# --------------------------------------------------------------------------- other graphs


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(2, 2))
        self.b = nn.Linear(2, 2)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.a(inputs["x"]) + self.b(inputs["y"])


def test_pytree_codegen_from_concrete_args() -> None:
    model = DictInput()
    gm = fx.symbolic_trace(model, concrete_args={"inputs": {"x": fx.PH, "y": fx.PH}})
    speed_up(gm)
    assert isinstance(gm.graph._codegen, FastLookupCodeGen)
    inputs = {"x": torch.randn(1, 2), "y": torch.randn(1, 2)}
    with torch.no_grad():
        assert torch.equal(gm(inputs), model(inputs))
        assert torch.equal(pickle.loads(pickle.dumps(gm))(inputs), model(inputs))
        assert torch.equal(copy.deepcopy(gm)(inputs), model(inputs))


def test_nested_graph_modules_are_sped_up() -> None:
    inner = fxindex.trace(nested_linears(2, layers=3))
    outer = fxindex.trace(nn.Sequential(inner, nn.ReLU()), leaf_modules=[fx.GraphModule])
    speed_up(outer)
    assert is_sped_up(outer) and is_sped_up(outer.get_submodule("0"))
    (x,) = _inputs_for(inner)
    with torch.no_grad():
        assert torch.equal(outer(x), torch.relu(inner(x)))


def test_unknown_codegen_is_left_alone_with_a_warning() -> None:
    class OtherCodeGen(torch.fx.graph.CodeGen):
        pass

    gm = fxindex.trace(nested_linears(1, layers=2))
    gm.graph.set_codegen(OtherCodeGen())
    gm.recompile()
    with pytest.warns(UserWarning, match="OtherCodeGen"):
        speed_up(gm)
    assert not is_sped_up(gm)
    assert "_fxindex_lookup" not in gm._code


def test_graph_without_call_modules() -> None:
    gm = fx.symbolic_trace(lambda x: x * 2)
    speed_up(gm)
    assert "_fxindex_lookup" not in gm._code
    assert torch.equal(gm(torch.ones(2)), torch.full((2,), 2.0))


def test_unregistered_module_keeps_torch_lookup() -> None:
    model = nested_linears(1, layers=2)
    gm = fxindex.trace(model)
    hidden = nn.Linear(8, 8)
    # Swap the registered layer for an attribute nn.Module does not know about.
    del gm._modules["1"]
    object.__setattr__(gm, "1", hidden)
    speed_up(gm)
    lines = gm._code.splitlines()
    assert any('getattr(self, "1")(' in line for line in lines)  # torch's lookup, still correct
    assert any("= _fxindex_m(" in line for line in lines)  # the registered one is rewritten
    (x,) = _inputs_for(model)
    with torch.no_grad():
        assert torch.equal(gm(x), hidden(model[0](x)))


def test_trace_and_replace_return_sped_up_modules(tiny: TinyResNet) -> None:
    gm = fxindex.trace(tiny)
    assert is_sped_up(gm)
    rebuilt = fxindex.insert(gm, 0, nn.ReLU())
    assert is_sped_up(rebuilt)
    x = torch.randn(2, 3, 8, 8)
    assert rebuilt(x).shape == gm(x).shape
