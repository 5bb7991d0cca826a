"""Issue 8, sections 1 and 2: edits that were silently wrong, and promises replace/plan broke.

Each test here failed on the code before the fix. Every result is compared with
the original model's outputs or with a hand-built reference, and every failure
must leave the caller's model bit-identical: state dict, graph code, module
objects and recorded shapes (:func:`frozen`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

import fxindex
from fxindex._shapes import TensorMetadata, quiet_fake_errors

# --------------------------------------------------------------------------- models and helpers


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def vgg_head() -> nn.Sequential:
    """VGG's classifier, small: Linear, ReLU, Dropout twice, then the final Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 5)
    ).eval()


def chain() -> Chain:
    torch.manual_seed(0)
    return Chain().eval()


X = (torch.randn(3, 4),)
VGG_X = (torch.randn(2, 16),)


@dataclass
class Frozen:
    state: dict[str, torch.Tensor]
    code: str
    modules: list[tuple[str, int]]
    metas: list[tuple[str, Any]]


def _meta_key(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return (tuple(meta.shape), meta.dtype, meta.requires_grad, meta.stride)
    if isinstance(meta, (tuple, list)):
        return tuple(_meta_key(item) for item in meta)
    return meta


def frozen(gm: fx.GraphModule) -> Frozen:
    """Everything of a GraphModule a failed or read-only call must leave as it was."""
    return Frozen(
        state={key: value.detach().clone() for key, value in gm.state_dict().items()},
        code=gm._code,  # the code that runs (gm.code shows torch.fx's plain form of it)
        modules=[(name, id(module)) for name, module in gm.named_modules()],
        metas=[(node.name, _meta_key(node.meta.get("tensor_meta"))) for node in gm.graph.nodes],
    )


def assert_frozen(gm: fx.GraphModule, before: Frozen) -> None:
    after = frozen(gm)
    assert list(after.state) == list(before.state)
    for key, value in before.state.items():
        assert torch.equal(after.state[key], value), f"{key} changed"
    assert after.code == before.code
    assert after.modules == before.modules
    assert after.metas == before.metas


def outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# =========================================================================== 1. silent wrong results


@pytest.mark.parametrize(
    "make_keep",
    [
        lambda: (i for i in range(7, -1, -1)),  # a generator: used up by the first reader before the fix
        lambda: iter([7, 6, 5, 4, 3, 2, 1, 0]),
        lambda: torch.arange(7, -1, -1),  # torch.topk(...).indices has this form
        lambda: np.arange(7, -1, -1),
        lambda: range(7, -1, -1),
    ],
    ids=["generator", "iterator", "tensor", "numpy", "range"],
)
def test_keep_given_once_as_any_iterable_of_ints(make_keep) -> None:
    model = chain()
    new = nn.Linear(4, 8)
    with torch.no_grad():
        new.weight.copy_(model.fc1.weight.flip(0))
        new.bias.copy_(model.fc1.bias.flip(0))
    gm = fxindex.replace(model, "fc1", new, keep=make_keep(), example_inputs=X)
    # keep reverses the channels and the new layer reverses them too: the model computes the same function
    torch.testing.assert_close(outputs(gm, X), outputs(model, X))
    assert torch.equal(gm.fc2.weight, model.fc2.weight.flip(1))
    assert fxindex.recipe(gm)[0]["keep"] == {"0": [7, 6, 5, 4, 3, 2, 1, 0]}
    steps = fxindex.plan(model, "fc1", new, keep=make_keep(), example_inputs=X)
    assert steps.preserves_function, steps.table()


@pytest.mark.parametrize(
    ("keep", "pattern"),
    [
        ([True, 1], r"keep= must hold int channel indices, got True \(bool\)"),
        (torch.tensor([0.0, 1.0]), r"keep= must be a 1-d tensor of integer channel indices"),
        (torch.tensor([[0, 1]]), r"keep= must be a 1-d tensor"),
        ("01", r"keep= must be a sequence of int channel indices, got str"),
        (5, r"keep= must be a sequence of int channel indices, got int"),
        ([np.float32(1.0)], r"keep= must hold int channel indices"),
    ],
    ids=["bool", "float-tensor", "2d-tensor", "str", "int", "numpy-float"],
)
def test_keep_that_is_not_ints_is_refused(keep: Any, pattern: str) -> None:
    gm = fxindex.trace(chain(), example_inputs=X)
    before = frozen(gm)
    with pytest.raises(fxindex.EditError, match=r"layer 0 \('fc1'\): " + pattern):
        fxindex.replace(gm, "fc1", nn.Linear(4, 8), keep=keep, inplace=True)
    assert_frozen(gm, before)


def test_endless_keep_is_refused_without_filling_memory() -> None:
    import itertools

    gm = fxindex.trace(chain(), example_inputs=X)
    with pytest.raises(fxindex.EditError, match="keep= has more than"):
        fxindex.replace(gm, "fc1", nn.Linear(4, 8), keep=itertools.count())


def test_removing_in_a_loop_with_found_indices_removes_the_found_layers() -> None:
    model = vgg_head()
    expected = outputs(model, VGG_X)
    gm = fxindex.trace(model, example_inputs=VGG_X)
    layers = fxindex.index(gm)
    found = layers.find(nn.Dropout)
    assert found == [2, 5] and all(isinstance(i, fxindex.LayerRef) for i in found)
    for i in found:  # indices shift after the first removal: each LayerRef still names its Dropout
        gm = fxindex.remove(gm, i)
    assert [type(entry.module).__name__ for entry in fxindex.index(gm)] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert torch.equal(outputs(gm, VGG_X), expected)  # Dropout is the identity in eval
    gm.graph.lint()


def test_removing_several_layers_in_one_call_numbers_them_on_the_original() -> None:
    model = vgg_head()
    expected = outputs(model, VGG_X)
    layers = fxindex.index(model)
    for selection in ([2, 5], (5, 2), layers.find(nn.Dropout), ["2", "5"]):
        gm = fxindex.remove(model, selection, example_inputs=VGG_X)
        assert [entry.target for entry in fxindex.index(gm)] == ["0", "1", "3", "4", "6"]
        assert torch.equal(outputs(gm, VGG_X), expected)
        steps = fxindex.recipe(gm)
        assert [(edit["op"], edit["index"]) for edit in steps] == [("remove", 5), ("remove", 2)]
    # the recipe replays to the same model
    path = fxindex.save(fxindex.remove(model, [2, 5], example_inputs=VGG_X), _tmp_dir() / "vgg")
    loaded = fxindex.load(vgg_head(), path)
    assert [entry.target for entry in fxindex.index(loaded)] == ["0", "1", "3", "4", "6"]
    assert torch.equal(outputs(loaded, VGG_X), expected)


def _tmp_dir():
    import pathlib
    import tempfile

    return pathlib.Path(tempfile.mkdtemp(prefix="fxindex-reliability-"))


def test_a_stale_plain_index_that_changes_the_output_warns() -> None:
    gm = fxindex.trace(vgg_head(), example_inputs=VGG_X)
    gm = fxindex.remove(gm, 2)
    # 5 was the second Dropout before the first removal; it is the final Linear now
    with pytest.warns(fxindex.EditWarning, match=r"removing layer 5 \('6'\) changes the model's output: .*5 -> 12"):
        wrong = fxindex.remove(gm, 5)
    assert outputs(wrong, VGG_X).shape == (2, 12)


def test_a_layer_ref_whose_call_site_is_gone_is_an_error() -> None:
    gm = fxindex.trace(vgg_head(), example_inputs=VGG_X)
    ref = fxindex.index(gm).find(nn.Dropout)[0]
    edited = fxindex.remove(gm, ref)
    before = frozen(edited)
    with pytest.raises(fxindex.LayerIndexError, match=r"layer 2 \('2', node '_2'\) is no longer in this model"):
        fxindex.remove(edited, ref, inplace=True)
    assert_frozen(edited, before)
    # arithmetic on a LayerRef is a plain position again
    assert type(ref + 1) is int and fxindex.index(edited)[ref + 1].target == "4"


def test_inserting_several_layers_in_one_call_numbers_them_on_the_original() -> None:
    model = vgg_head()
    gm = fxindex.insert(model, {0: nn.Tanh(), 3: nn.Sigmoid()}, example_inputs=VGG_X)
    assert [type(entry.module).__name__ for entry in fxindex.index(gm)] == [
        "Linear", "Tanh", "ReLU", "Dropout", "Linear", "Sigmoid", "ReLU", "Dropout", "Linear",
    ]  # fmt: skip
    reference = nn.Sequential(model[0], nn.Tanh(), *model[1:4], nn.Sigmoid(), *model[4:]).eval()
    assert torch.equal(outputs(gm, VGG_X), outputs(reference, VGG_X))
    assert [(edit["op"], edit["index"]) for edit in fxindex.recipe(gm)] == [("insert", 3), ("insert", 0)]
    gm.graph.lint()


def test_insert_with_a_dict_and_a_new_layer_is_an_error() -> None:
    with pytest.raises(fxindex.EditError, match="with a dict of insertions, leave new_layer out"):
        fxindex.insert(vgg_head(), {0: nn.Tanh()}, nn.ReLU())
    with pytest.raises(fxindex.EditError, match=r"layer 0 \('0'\) is selected twice"):
        fxindex.remove(vgg_head(), [0, "0"])


@pytest.mark.parametrize(
    ("make_new", "preserving"),
    [
        (lambda old: nn.Linear(4, 8), False),  # random weights
        (lambda old: _copy_linear(old, 8), True),
        (lambda old: _copy_linear(old, 11), True),  # widened, old filters copied
        (lambda old: _copy_linear(old, 11, perturb=True), False),  # widened, but a kept filter changed
    ],
    ids=["random", "copy", "widened-copy", "widened-perturbed"],
)
def test_function_preserving_only_when_the_kept_outputs_equal_the_old_ones(make_new, preserving: bool) -> None:
    model = chain()
    new = make_new(model.fc1)
    steps = fxindex.plan(model, "fc1", new, example_inputs=X)
    assert steps.preserves_function is preserving, steps.table()
    table = steps.table()
    if preserving:
        assert "function-preserving: yes" in table
        torch.testing.assert_close(outputs(fxindex.replace(model, "fc1", new, example_inputs=X), X), outputs(model, X))
    else:
        assert "not function-preserving: the new layer's outputs differ from the old layer's on the kept channels" in table
        assert not torch.allclose(outputs(fxindex.replace(model, "fc1", new, example_inputs=X), X), outputs(model, X))


def _copy_linear(old: nn.Linear, width: int, perturb: bool = False) -> nn.Linear:
    new = nn.Linear(old.in_features, width)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        if perturb:
            new.bias[: old.out_features] += 1.0  # shifts every kept channel past ReLU's zero
    return new


def test_swaps_and_removals_are_checked_too() -> None:
    model = chain()
    assert not fxindex.plan(model, "act", nn.GELU(), example_inputs=X).preserves_function
    assert fxindex.plan(model, "act", nn.ReLU(), example_inputs=X).preserves_function
    steps = fxindex.plan(vgg_head(), 1, nn.ReLU(), example_inputs=VGG_X)
    assert steps.preserves_function
    # a copied layer without shapes cannot be verified: no claim, and the reason says how to get one
    steps = fxindex.plan(chain(), "fc1", _copy_linear(chain().fc1, 8))
    assert not steps.preserves_function
    assert "not verified" in steps.table() and "example_inputs" in steps.table()


# =========================================================================== 2. promises


def test_a_new_layer_that_is_a_layer_of_the_model_is_copied_with_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    gm = fxindex.trace(model, example_inputs=X)
    before = frozen(gm)
    result = fxindex.replace(gm, 0, gm.get_submodule("2"))
    original = {id(p) for p in gm.parameters()} | {p.data_ptr() for p in gm.parameters()}
    assert not any(id(p) in original or p.data_ptr() in original for p in result.parameters())
    # the edit asked for one module at two sites: the result ties them, as the caller's objects were tied
    assert result.get_submodule("0") is result.get_submodule("2")
    expected = model[2](model[1](model[2](X[0])))
    torch.testing.assert_close(outputs(result, X), expected)
    # training the result leaves the original alone
    optimizer = torch.optim.SGD(result.parameters(), lr=0.5)
    result.train()
    result(*X).sum().backward()
    optimizer.step()
    assert_frozen(gm, before)


def test_inplace_install_is_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    gm = fxindex.trace(chain(), example_inputs=X)
    before = frozen(gm)

    def broken_lint(self: fx.Graph) -> None:
        raise RuntimeError("injected at Graph.lint")

    monkeypatch.setattr(fx.Graph, "lint", broken_lint)
    with pytest.raises(RuntimeError, match="injected at Graph.lint"):
        fxindex.remove(gm, "act", inplace=True)  # a removal changes the graph: it is linted
    assert_frozen(gm, before)
    monkeypatch.undo()
    # a replace that only swaps modules does not touch the graph; a failure on its second swap undoes the first
    real_add_module = nn.Module.add_module
    calls: list[str] = []

    def failing_second_add(self: nn.Module, name: str, module: Any) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected at add_module")
        real_add_module(self, name, module)

    monkeypatch.setattr(nn.Module, "add_module", failing_second_add)
    with pytest.raises(RuntimeError, match="injected at add_module"):
        fxindex.replace(gm, "fc1", nn.Linear(4, 11), inplace=True)
    assert calls == ["fc1", "fc2"]
    assert_frozen(gm, before)
    monkeypatch.undo()
    # and a failure after the modules are set (while recompiling) puts them back too
    import sys

    replace_module = sys.modules["fxindex._replace"]  # the module: fxindex.replace is the function

    def broken_speed_up(module: fx.GraphModule) -> fx.GraphModule:
        raise RuntimeError("injected at recompile")

    monkeypatch.setattr(replace_module, "speed_up", broken_speed_up)
    for edit in (
        lambda: fxindex.insert(gm, "fc1", nn.Linear(8, 8), inplace=True),
        lambda: fxindex.remove(gm, "act", inplace=True),
        lambda: fxindex.insert(gm, "act", nn.Tanh(), inplace=True),
    ):
        with pytest.raises(RuntimeError, match="injected at recompile"):
            edit()
        assert_frozen(gm, before)
        torch.testing.assert_close(outputs(gm, X), outputs(chain(), X))
    monkeypatch.undo()
    fxindex.replace(gm, "fc1", nn.Linear(4, 11), inplace=True)  # and it still works afterwards
    assert gm.fc2.in_features == 11


def test_plan_and_a_failing_replace_do_not_re_record_the_callers_shapes() -> None:
    gm = fxindex.trace(chain(), example_inputs=X)
    before = frozen(gm)
    other_batch = (torch.randn(9, 4),)
    steps = fxindex.plan(gm, "fc1", nn.Linear(4, 8), example_inputs=other_batch)
    assert steps.edits[0].node == "fc1"
    assert_frozen(gm, before)
    with pytest.raises(fxindex.ShapeMismatchError):
        fxindex.replace(gm, "fc1", nn.Linear(5, 8), example_inputs=other_batch, inplace=True)
    assert_frozen(gm, before)
    with pytest.raises(fxindex.ShapeMismatchError):
        fxindex.insert(gm, "fc1", nn.Linear(5, 8), example_inputs=other_batch, inplace=True)
    assert_frozen(gm, before)
    # a successful in-place edit with new inputs records their shapes
    fxindex.replace(gm, "fc1", nn.Linear(4, 8), example_inputs=other_batch, inplace=True)
    assert tuple(gm.graph.find_nodes(op="placeholder")[0].meta["tensor_meta"].shape) == (9, 4)


@pytest.mark.parametrize("shapes", [True, False], ids=["shapes", "no-shapes"])
def test_a_new_layer_of_another_dtype_is_refused(shapes: bool) -> None:
    gm = fxindex.trace(chain(), example_inputs=X if shapes else None)
    before = frozen(gm)
    with pytest.raises(
        fxindex.ShapeMismatchError,
        match=r"layer 0 \('fc1'\), node 'fc1': the new layer Linear.* holds 'weight' as torch.float64, but .* dtype is "
        r"torch.float32; convert it first",
    ):
        fxindex.replace(gm, "fc1", nn.Linear(4, 8).double(), inplace=True)
    assert_frozen(gm, before)


def test_a_new_layer_on_another_device_is_refused() -> None:
    gm = fxindex.trace(chain(), example_inputs=X)
    before = frozen(gm)
    with pytest.raises(fxindex.ShapeMismatchError, match=r"holds 'weight' on meta, but .* device is cpu; move it first"):
        fxindex.replace(gm, "fc1", nn.Linear(4, 8, device="meta"), inplace=True)
    assert_frozen(gm, before)


def test_planning_runs_no_user_hooks() -> None:
    model = chain()
    calls: list[str] = []

    def needs_real_tensors(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        calls.append(type(module).__name__)
        output.detach().numpy()  # fails on a fake tensor

    for module in model.modules():
        module.register_forward_hook(needs_real_tensors)
    model.fc2.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    gm = fxindex.trace(model, example_inputs=X)
    assert calls == []
    result = fxindex.replace(gm, "fc1", _copy_linear(model.fc1, 8), example_inputs=X)
    assert calls == []
    torch.testing.assert_close(outputs(result, X), outputs(chain(), X))
    assert calls.count("pre") == 1  # the untouched layer kept its hooks, and they run in a real forward


def test_an_edit_inside_inference_mode_gives_a_trainable_model() -> None:
    model = chain()
    with torch.inference_mode():
        results = [
            fxindex.replace(model, "fc1", nn.Linear(4, 11).requires_grad_(True), example_inputs=X),
            fxindex.remove(model, "act", example_inputs=X),
            fxindex.insert(model, "act", nn.Tanh(), example_inputs=X),
        ]
    for result in results:
        inferred = [name for name, p in result.named_parameters() if p.is_inference()]
        assert inferred in ([], ["fc1.weight", "fc1.bias"]), inferred  # the caller's own new layer is theirs
        trainable = [p for p in result.parameters() if not p.is_inference()]
        result.train()
        result(*X).sum().backward()
        assert all(p.grad is not None for p in trainable)


def test_quiet_fake_errors_is_per_thread_and_leaves_the_logger_level_alone() -> None:
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    old_propagate, logger.propagate = logger.propagate, False
    logger.setLevel(logging.INFO)
    try:
        inside, done = threading.Event(), threading.Event()

        def quiet_thread() -> None:
            with quiet_fake_errors():
                logger.error("silenced")
                inside.set()
                done.wait(5)

        thread = threading.Thread(target=quiet_thread)
        thread.start()
        inside.wait(5)
        logger.error("other thread")  # not silenced: only the quiet thread is
        assert logger.level == logging.INFO
        done.set()
        thread.join(5)
        assert seen == ["other thread"]
        # concurrent replaces leave the level as it was
        threads = [threading.Thread(target=lambda: fxindex.plan(chain(), 0, nn.Linear(4, 9), example_inputs=X)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert logger.level == logging.INFO
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        logger.setLevel(level)


def test_a_new_layer_that_contains_the_model_is_refused() -> None:
    gm = fxindex.trace(chain(), example_inputs=X)
    before = frozen(gm)
    wrapper = nn.Sequential(gm)
    for new in (gm, wrapper):
        with pytest.raises(fxindex.EditError, match=r"layer 0 \('fc1'\): the new layer contains the model itself"):
            fxindex.replace(gm, 0, new, inplace=True)
        assert_frozen(gm, before)


def test_concurrent_plans_on_one_train_mode_model_leave_its_statistics_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3)).train()
    inputs = (torch.randn(2, 3, 8, 8),)
    gm = fxindex.trace(model, example_inputs=inputs)
    before = frozen(gm)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for width in (7, 9, 11):
                fxindex.plan(gm, 0, nn.Conv2d(3, width, 3), example_inputs=inputs)
        except BaseException as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert_frozen(gm, before)
    assert int(gm.get_submodule("1").num_batches_tracked) == 0


def test_a_module_only_swap_keeps_the_generated_code_and_a_deferred_block_generates_it_once() -> None:
    model = chain()
    gm = fxindex.trace(model, example_inputs=X)
    code = gm._code  # the running code: each generation is new text (gm.code shows the plain form)
    new = _copy_linear(model.fc1, 11)
    result = fxindex.replace(gm, "fc1", new, inplace=True)
    assert result._code == code  # no new generation: the fast-lookup cache sees the swapped modules
    assert result.fc1 is new and result.fc2.in_features == 11
    torch.testing.assert_close(outputs(result, X), outputs(model, X))
    assert tuple(result.graph.find_nodes(op="call_module", target="fc1")[0].meta["tensor_meta"].shape) == (3, 11)
    import sys

    replace_module = sys.modules["fxindex._replace"]
    generated: list[fx.GraphModule] = []
    real = replace_module.speed_up

    def counting(module: fx.GraphModule) -> fx.GraphModule:
        generated.append(module)
        return real(module)

    gm = fxindex.trace(vgg_head(), example_inputs=VGG_X)
    expected = outputs(fxindex.remove(fxindex.insert(gm, 0, nn.Tanh()), [3, 6]), VGG_X)
    replace_module.speed_up = counting
    try:
        with fxindex.deferred_codegen(gm):
            fxindex.insert(gm, 0, nn.Tanh(), inplace=True)
            with pytest.raises(fxindex.StaleForwardError, match="inside fxindex.deferred_codegen"):
                gm(*VGG_X)
            fxindex.remove(gm, fxindex.index(gm).find(nn.Dropout), inplace=True)
            assert generated == []
    finally:
        replace_module.speed_up = real
    assert generated == [gm]
    assert torch.equal(outputs(gm, VGG_X), expected)
    gm.graph.lint()


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


def test_the_default_copy_shares_nothing_and_skips_the_replaced_layers_tensors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    tied[1].weight = tied[0].weight  # a tied weight: replacing one layer must still copy it for the other
    gm = fxindex.trace(model, example_inputs=X)
    result = fxindex.replace(gm, 0, _copy_linear(gm.get_submodule("0"), 64))
    assert not (_storages(result) & _storages(gm))
    torch.testing.assert_close(outputs(result, X), outputs(model, X))
    tied_gm = fxindex.trace(tied, example_inputs=X)
    tied_result = fxindex.replace(tied_gm, 0, nn.Linear(4, 4))
    assert not (_storages(tied_result) & _storages(tied_gm))
    assert torch.equal(tied_result.get_submodule("1").weight, tied[0].weight)


def test_share_untouched_shares_exactly_the_tensors_the_edit_does_not_rebuild() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    gm = fxindex.trace(model, example_inputs=X)
    new = _copy_linear(gm.get_submodule("3"), 9)
    light = fxindex.replace(gm, 3, new, share_untouched=True)
    for name in ("0", "1"):  # untouched: the very same tensors
        for (key, a), (_, b) in zip(light.get_submodule(name).state_dict(keep_vars=True).items(),
                                    gm.get_submodule(name).state_dict(keep_vars=True).items()):
            assert a is b, f"{name}.{key} was copied"
    assert light.get_submodule("3") is new
    assert light.get_submodule("5").in_features == 9 and not (_storages(light.get_submodule("5")) & _storages(gm))
    torch.testing.assert_close(outputs(light, X), outputs(model, X))
    # documented consequence: a training step on the light copy moves the shared weights of the original
    before = gm.get_submodule("0").weight.detach().clone()
    light.train()
    light(*X).sum().backward()
    torch.optim.SGD(light.parameters(), lr=0.1).step()
    assert not torch.equal(gm.get_submodule("0").weight, before)
    with pytest.raises(fxindex.EditError, match="share_untouched=True is for copies"):
        fxindex.replace(gm, 3, new, share_untouched=True, inplace=True)


def test_traces_in_threads_at_once_leave_torch_as_it_was() -> None:
    """torch.fx patches ``nn.Module.__call__`` for the process while it traces; overlapping
    traces used to leave one tracer's wrapper installed, and every later module call failed."""
    torchvision = pytest.importorskip("torchvision")
    original_call, original_getattr = nn.Module.__call__, nn.Module.__getattr__
    model = torchvision.models.resnet18()
    expected = [node.target for node in fxindex.trace(model).graph.nodes]
    seen: list[list[Any]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(2):
                seen.append([node.target for node in fxindex.trace(model).graph.nodes])
        except BaseException as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert (nn.Module.__call__, nn.Module.__getattr__) == (original_call, original_getattr)
    assert seen == [expected] * 8
    torch.testing.assert_close(fxindex.trace(chain())(*X), chain()(*X))


def test_a_real_forward_in_another_thread_while_a_trace_runs_is_not_traced() -> None:
    inside, done = threading.Event(), threading.Event()

    class Waits(nn.Module):  # not a leaf: traced through, and holds the trace open
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inside.set()
            done.wait(30)
            return self.fc(x)

    model = nn.Sequential(Waits(), nn.ReLU())
    traced: list[fx.GraphModule] = []
    thread = threading.Thread(target=lambda: traced.append(fxindex.trace(model)))
    thread.start()
    try:
        assert inside.wait(30)
        other = chain()
        got = other(*X)  # while the trace's patch is installed: runs for real, in this thread
        assert type(got) is torch.Tensor  # not a Proxy of the other thread's trace
        (x,) = X
        reference = torch.relu(x @ other.fc1.weight.T + other.fc1.bias) @ other.fc2.weight.T + other.fc2.bias
        torch.testing.assert_close(got, reference)
    finally:
        done.set()
        thread.join(60)
    assert [n.target for n in traced[0].graph.nodes if n.op == "call_module"] == ["0.fc", "1"]
