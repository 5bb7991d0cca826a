"""Write an edit back to the user's own module tree, verified against the planned graph.

An fxindex edit produces a ``GraphModule``: the model's class, its methods
(``generate``, ``save_pretrained``, ``forward_features``) and its own Python
``forward`` are gone. :func:`write_back` applies the edit to the user's plain
``nn.Module`` instead:

* every call site's module of the edited graph that is not the model's module
  at the same qualified name is set there (on its parent, so ``Sequential``,
  ``ModuleList`` and ``ModuleDict`` entries too); a layer the edit removed
  becomes an ``nn.Identity``; a layer it inserted wraps its anchor in an
  ``nn.Sequential`` (anchor first when inserted after it);
* parameters and buffers read by ops in the graph (``get_attr``: a
  layer-scale ``gamma``, an RMSNorm ``weight``) that the edit changed are set
  on their owners;
* the size attributes an attention module's ``forward`` reads follow a head
  edit of its projections (see :data:`HEAD_LAYOUTS`): Llama/Qwen2/Mistral/ViT
  ``head_dim``, ``num_key_value_groups``; GPT-2 ``num_heads``, ``head_dim``,
  ``split_size``, ``embed_dim``; BERT ``num_attention_heads``,
  ``attention_head_size``, ``all_head_size``; T5 ``n_heads``,
  ``key_value_proj_dim``, ``inner_dim``; timm ``num_heads``, ``head_dim``,
  ``attn_dim`` (``head_dim`` is read from the edited
  graph's split into heads, so a change of every head's width is told from a
  removal of whole heads);
* the model then runs its own ``forward`` (eval mode, no autograd, its hooks
  firing, the RNG forked) on the example inputs and its output is compared
  with the edited graph's. They differ when the edit needed a graph rewrite
  that the model's Python cannot reflect (a hard-coded ``x.view(-1, 256)``):
  then every module, parameter and buffer is put back (the same objects) and
  :class:`~fxindex.EditError` names the rewritten nodes and suggests
  ``inplace=False``;
* a transformers model's config (``intermediate_size`` and GPT-2's
  ``n_inner``, T5's ``d_ff``, ``hidden_size``, ``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim``) follows a uniform edit,
  checked by building the model class from the new config on the meta device
  and comparing every state-dict shape, so ``save_pretrained`` /
  ``from_pretrained`` round-trip; an edit the config cannot describe (layers
  of different widths) leaves the config alone and warns
  (:class:`~fxindex.EditWarning`), pointing to ``fxindex.save``.

Nothing is changed when the write-back cannot be verified: without example
inputs and without recorded input shapes, or when a call site of a module
called several times got its own module (the model's ``forward`` calls one
module by one name everywhere).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxindex._errors import EditError, EditWarning
from fxindex._plan import PlannedEdit

__all__ = ["HEAD_LAYOUTS", "HeadLayout", "write_back"]

_MISSING = object()

#: Tolerances of the eager-vs-graph comparison: the same modules run on both sides, but an
#: export-captured graph runs ATen ops where eager code may call fused kernels.
RTOL = 1e-4
ATOL = 1e-5

#: Size attributes of a transformers config that a write-back may update.
CONFIG_SIZES = (
    "hidden_size", "intermediate_size", "n_inner", "d_ff", "num_attention_heads", "num_key_value_heads", "head_dim",
)  # fmt: skip

#: Words in the qualified names of MLP layers in transformers models (Llama/Qwen2/Mistral ``mlp``,
#: BERT ``intermediate``, T5 ``DenseReluDense``, others ``feed_forward``/``ffn``).
_MLP_WORDS = ("mlp", "intermediate", "feed_forward", "ffn", "densereludense")

#: Config attributes that state the MLP's intermediate width: most models' ``intermediate_size``,
#: GPT-2's ``n_inner`` (``None``: four times ``hidden_size``), T5's ``d_ff``.
_INTERMEDIATE_SIZES = ("intermediate_size", "n_inner", "d_ff")


@dataclass(frozen=True)
class HeadLayout:
    """Where an attention module of one family keeps its head sizes, and which children split into heads.

    Attributes:
        query: the child projection whose output is the query heads (``q_proj``), or
            the fused one that holds ``parts`` equal parts (GPT-2's ``c_attn``: q, k, v).
        key: the child whose output is the key/value heads (fewer under
            grouped-query attention), or ``None`` when they are the query's.
        parts: how many equal parts the query child's output holds.
        heads: attributes holding the number of query heads.
        kv_heads: attributes holding the number of key/value heads.
        head_dim: attributes holding one head's width.
        width: attributes holding all heads' width (heads times head_dim).
        groups: attributes holding query heads per key/value head.
    """

    query: str
    key: str | None = None
    parts: int = 1
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    head_dim: tuple[str, ...] = ()
    width: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


#: The attention layouts of transformers models, tried in order on every module whose children
#: the write-back replaced. A module has a layout when it has the ``query`` child and at least one
#: of the attributes as an int. Scales (``scaling``) are left: the edited graph keeps the old scale.
HEAD_LAYOUTS = (
    # Llama, Qwen2, Mistral, Gemma, ViT (transformers 5): q_proj/k_proj/v_proj/o_proj.
    HeadLayout(
        "q_proj", "k_proj", heads=("num_heads", "num_attention_heads"), kv_heads=("num_key_value_heads",),
        head_dim=("head_dim",), width=("all_head_size",), groups=("num_key_value_groups",),
    ),
    # BERT and its kin: query/key/value.
    HeadLayout(
        "query", "key", heads=("num_attention_heads",), head_dim=("attention_head_size",), width=("all_head_size",)
    ),
    # GPT-2: c_attn holds q, k and v side by side; split_size is one part's width.
    HeadLayout("c_attn", parts=3, heads=("num_heads",), head_dim=("head_dim",), width=("split_size", "embed_dim")),
    # T5: q/k/v/o.
    HeadLayout("q", "k", heads=("n_heads",), head_dim=("key_value_proj_dim",), width=("inner_dim",)),
    # timm's Attention (ViT, DeiT, EVA...): qkv holds q, k and v side by side.
    HeadLayout("qkv", parts=3, heads=("num_heads",), head_dim=("head_dim",), width=("attn_dim",)),
)  # fmt: skip


class _Undo:
    """Every dict entry a write-back sets, with what was there, to put back in reverse order.

    The entries live in the model's own ``_modules``, ``_parameters`` and
    ``_buffers`` dicts; replacing a value under an existing key keeps the
    dict's order (the state dict's key order follows it) and the dict object.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[dict[str, Any], str, Any]] = []

    def set(self, table: dict[str, Any], key: str, value: Any) -> None:
        self.entries.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def rollback(self) -> None:
        for table, key, previous in reversed(self.entries):
            if previous is _MISSING:
                table.pop(key, None)
            else:
                table[key] = previous
        self.entries.clear()


def _lookup(root: nn.Module, name: str) -> nn.Module | None:
    """The submodule of ``root`` at ``name``, or ``None`` when there is none."""
    try:
        found = root.get_submodule(name)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Module) else None


def _same_copy(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``b`` is an untouched copy of ``a``: same class, configuration and state, value for value.

    Keeping the model's own object then keeps its parameter objects (an
    optimizer built on them still trains the model). Meta tensors have no
    values to compare, so only the identical tensor counts as unchanged there.
    """
    if a is b:
        return True
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr() or a.training != b.training:
        return False
    state_a, state_b = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    if list(state_a) != list(state_b):
        return False
    for key, tensor in state_a.items():
        other = state_b[key]
        if tensor is other:
            continue  # a light copy (share_untouched) shares its tensors: no arithmetic, meta included
        if not isinstance(tensor, torch.Tensor) or not isinstance(other, torch.Tensor):
            if tensor is not other:
                return False
            continue
        if tensor.is_meta or other.is_meta:
            return False
        if (tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad) != (
            other.shape, other.dtype, other.device, other.requires_grad
        ) or not torch.equal(tensor, other):
            return False
    return True


def _same_tensor(a: Any, b: Any) -> bool:
    """Whether two ``get_attr`` values are the same object or equal tensors (shape, dtype, values)."""
    if a is b:
        return True
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.is_meta or b.is_meta:
        return False
    return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) and torch.equal(a, b)


def _removed_targets(edited: fx.GraphModule, planned_edits: Sequence[PlannedEdit] | None) -> list[str]:
    """Qualified names of the layers the edit removed: from the plan, else from the edited graph's recipe."""
    if planned_edits is not None:
        return [edit.target for edit in planned_edits if edit.action == "remove"]
    from fxindex._recipe import recipe  # edits recorded since the trace, removals among them

    try:
        return [str(step["target"]) for step in recipe(edited) if step.get("op") == "remove"]
    except Exception:  # a GraphModule fxindex did not make has no recipe
        return []


def _inserted_anchor(edited: fx.GraphModule, node: fx.Node, model: nn.Module) -> tuple[str, bool] | None:
    """``(anchor target, after)`` when ``node`` calls a layer ``fxindex.insert`` added, else ``None``.

    An inserted layer is named after its anchor (``conv1_inserted``) and sits
    between the anchor and all of the anchor's users (after), or between the
    anchor's input and the anchor (before).
    """
    target = str(node.target)
    inputs = [arg for arg in node.args if isinstance(arg, fx.Node)]
    if len(inputs) == 1 and inputs[0].op == "call_module" and list(inputs[0].users) == [node]:
        anchor = str(inputs[0].target)
        if target.startswith(f"{anchor}_inserted") and _lookup(model, anchor) is not None:
            return anchor, True
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].args and users[0].args[0] is node:
        anchor = str(users[0].target)
        if target.startswith(f"{anchor}_inserted") and _lookup(model, anchor) is not None:
            return anchor, False
    return None


def _parent_table(model: nn.Module, name: str, caller: str) -> tuple[dict[str, Any], str]:
    """The ``_modules`` dict of the parent of ``name`` in ``model``, and the entry's key."""
    parent_name, _, atom = name.rpartition(".")
    parent = _lookup(model, parent_name) if parent_name else model
    if parent is None or atom not in parent._modules:
        raise EditError(
            f"{caller}: cannot write the edit back: the model has no submodule {name!r} to set "
            "(its module tree differs from the traced graph's); use inplace=False to get the edited GraphModule"
        )
    return parent._modules, atom


def _plan_modules(
    model: nn.Module, edited: fx.GraphModule, removed: Sequence[str], caller: str
) -> list[tuple[str, nn.Module]]:
    """The modules to set on ``model``, by qualified name, shallowest first; refuses what eager code cannot call.

    Raises:
        EditError: a call site calls a module under a name the model has not
            (one site of a module called several times got its own module),
            or an inserted layer's anchor is called at several sites.
    """
    sites: dict[str, int] = {}
    for node in edited.graph.nodes:
        if node.op == "call_module":
            sites[str(node.target)] = sites.get(str(node.target), 0) + 1
    chosen: dict[str, nn.Module] = {}
    inserted: dict[str, list[tuple[nn.Module, bool]]] = {}
    for node in edited.graph.nodes:
        if node.op != "call_module" or str(node.target) in chosen:
            continue
        target = str(node.target)
        new = edited.get_submodule(target)
        old = _lookup(model, target)
        if old is not None:
            if not _same_copy(old, new):
                chosen[target] = new
            continue
        anchor = _inserted_anchor(edited, node, model)
        if anchor is None:
            raise EditError(
                f"{caller}: cannot write the edit back: node {node.name!r} calls module {target!r}, which the model "
                "does not have (the edit gave one call site of a module called several times its own module, and "
                "the model's forward calls one module by one name at every site); use inplace=False to get the "
                "edited GraphModule, or all_sites=True to edit every site"
            )
        anchor_target, after = anchor
        if sites.get(anchor_target, 0) != 1:
            raise EditError(
                f"{caller}: cannot write the edit back: layer {target!r} was inserted at one of the "
                f"{sites.get(anchor_target, 0)} call sites of {anchor_target!r}, and the model's forward calls "
                f"{anchor_target!r} at every site; use inplace=False to get the edited GraphModule"
            )
        inserted.setdefault(anchor_target, []).append((new, after))
    for anchor_target, layers in inserted.items():
        anchor = chosen.get(anchor_target)
        if anchor is None:
            own = _lookup(model, anchor_target)
            assert own is not None  # checked by _inserted_anchor
            anchor = own
        before = [layer for layer, after in layers if not after]
        after_layers = [layer for layer, after in layers if after]
        # Sequential keeps the anchor a module at its own name; its state-dict keys gain an index.
        wrapper = nn.Sequential(*before, anchor, *after_layers)
        wrapper.training = anchor.training  # not .train(): the layers keep their own flags
        chosen[anchor_target] = wrapper
    for target in dict.fromkeys(removed):
        if target in sites:
            raise EditError(
                f"{caller}: cannot write the edit back: {target!r} was removed at one call site and is still "
                "called at another, and the model's forward calls it at every site; use inplace=False to get "
                "the edited GraphModule"
            )
        old = _lookup(model, target)
        if old is not None and not isinstance(old, nn.Identity):
            identity = nn.Identity()  # the graph's users read the layer's input: so does eager code
            identity.training = old.training
            chosen[target] = identity
    for target in chosen:
        _parent_table(model, target, caller)  # refuse before anything changes
    return sorted(chosen.items(), key=lambda item: item[0].count("."))


def _get_attr_targets(edited: fx.GraphModule) -> list[str]:
    return list(dict.fromkeys(str(node.target) for node in edited.graph.nodes if node.op == "get_attr"))


def _set_tensors(model: nn.Module, edited: fx.GraphModule, undo: _Undo) -> None:
    """Set the ``get_attr`` tensors the edit changed (by identity, shape and value) on their owners in ``model``.

    Tensors that exist only in the graph (constants created in ``forward`` by
    an export capture) are left: if the edit changed one, the verification
    finds that the model's forward cannot reflect it.
    """
    for target in _get_attr_targets(edited):
        owner_name, _, atom = target.rpartition(".")
        owner = _lookup(model, owner_name) if owner_name else model
        if owner is None:
            continue
        try:
            new = getattr(edited.get_submodule(owner_name) if owner_name else edited, atom)
        except AttributeError:
            continue
        if atom in owner._parameters:
            old = owner._parameters[atom]
            if _same_tensor(old, new):
                continue
            if not isinstance(new, nn.Parameter):
                new = nn.Parameter(new.detach(), requires_grad=old.requires_grad if old is not None else True)
            undo.set(owner._parameters, atom, new)
        elif atom in owner._buffers:
            if not _same_tensor(owner._buffers[atom], new):
                undo.set(owner._buffers, atom, new)
        elif isinstance(owner.__dict__.get(atom), torch.Tensor):
            if not _same_tensor(owner.__dict__[atom], new):
                undo.set(owner.__dict__, atom, new)


def _out_width(module: nn.Module | None) -> int | None:
    """A projection's output width: ``out_features`` of a Linear, ``nf`` of transformers' ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.out_features
    nf = getattr(module, "nf", None) if module is not None and type(module).__name__ == "Conv1D" else None
    return nf if isinstance(nf, int) else None


def _int_attribute(module: nn.Module, names: Sequence[str]) -> int | None:
    """The first of ``names`` that ``module`` holds as a plain int, or ``None``."""
    for name in names:
        value = module.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def layout_of(module: nn.Module) -> HeadLayout | None:
    """The :data:`HEAD_LAYOUTS` entry of an attention module: its query child is there, and one size attribute.

    Args:
        module: any module.

    Returns:
        The first layout that fits, or ``None``.
    """
    for layout in HEAD_LAYOUTS:
        if _out_width(module._modules.get(layout.query)) is None:
            continue
        names = (*layout.heads, *layout.kv_heads, *layout.head_dim, *layout.width, *layout.groups)
        if _int_attribute(module, names) is not None:
            return layout
    return None


_RESHAPES = frozenset({"view", "reshape", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"})
_SPLITS = frozenset({"split", "chunk", "aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default"})


def _graph_head_dim(edited: fx.GraphModule, target: str) -> int | None:
    """One head's width in the edited graph: the last dim of the reshape that splits ``target``'s output into heads.

    The graph states it whichever way the edit went (whole heads removed, or
    every head narrowed), where the projection's width alone cannot tell
    4 heads of 4 from 2 heads of 8.
    """
    from fxindex._shapes import TensorMetadata

    calls = [node for node in edited.graph.nodes if node.op == "call_module" and str(node.target) == target]
    meta = calls[0].meta.get("tensor_meta") if len(calls) == 1 else None
    if not isinstance(meta, TensorMetadata):
        return None
    rank = len(meta.shape)
    frontier = [calls[0]]
    # Through a split of fused q/k/v (GPT-2's c_attn) and its getitems: a few steps at most.
    for _ in range(3):
        following = []
        for node in frontier:
            for user in node.users:
                name = str(user.target)
                user_meta = user.meta.get("tensor_meta")
                # (..., heads, head_dim), or (..., 3, heads, head_dim) straight from a fused qkv (timm).
                if name in _RESHAPES and isinstance(user_meta, TensorMetadata) and len(user_meta.shape) in (rank + 1, rank + 2):
                    return int(user_meta.shape[-1])
                if name in _SPLITS or user.target is operator.getitem:
                    following.append(user)
        frontier = following
    return None


def _set_head_attributes(model: nn.Module, edited: fx.GraphModule, written: set[str], undo: _Undo) -> None:
    """Make the head sizes of attention modules (:data:`HEAD_LAYOUTS`) follow the projections written back.

    A module is looked at when its query or key projection was set; its head
    width comes from the edited graph (else its own attribute), its head
    counts from the projections' widths. Attributes it does not hold as ints
    are left alone; each change goes into ``undo``.
    """
    for name, module in model.named_modules():
        layout = layout_of(module)
        if layout is None:
            continue
        prefix = f"{name}." if name else ""
        query_target, key_target = prefix + layout.query, prefix + layout.key if layout.key else None
        if query_target not in written and key_target not in written:
            continue
        width = _out_width(module._modules.get(layout.query))
        head_dim = _graph_head_dim(edited, query_target) or _int_attribute(module, layout.head_dim)
        if width is None or width % layout.parts or not head_dim or (width // layout.parts) % head_dim:
            continue
        heads = width // layout.parts // head_dim
        kv_heads = heads
        if layout.key is not None and layout.key in module._modules:
            key_width = _out_width(module._modules[layout.key])
            if key_width is None or key_width % head_dim:
                continue
            kv_heads = key_width // head_dim
        values: dict[str, int] = {}
        for names, value in (
            (layout.heads, heads),
            (layout.kv_heads, kv_heads),
            (layout.head_dim, head_dim),
            (layout.width, heads * head_dim),
        ):
            values.update(dict.fromkeys(names, value))
        if kv_heads and heads % kv_heads == 0:
            values.update(dict.fromkeys(layout.groups, heads // kv_heads))
        for attribute, value in values.items():
            old = module.__dict__.get(attribute)
            if isinstance(old, int) and not isinstance(old, bool) and old != value:
                undo.set(module.__dict__, attribute, value)


def _verification_inputs(edited: fx.GraphModule, example_inputs: tuple[Any, ...] | None, caller: str) -> tuple[Any, ...]:
    """The inputs to compare on: the caller's, else random ones of the recorded shapes (seeded)."""
    if example_inputs is not None:
        if not isinstance(example_inputs, tuple):
            raise TypeError(f"{caller}: example_inputs must be a tuple, got {type(example_inputs).__name__}")
        return example_inputs
    from fxindex._couple import zeros_like_recorded

    inputs = zeros_like_recorded(edited)
    if inputs is None:
        raise EditError(
            f"{caller}: cannot write the edit back: the model has no example inputs and the graph no recorded "
            "input shapes, so the edited model could not be checked against the planned graph; pass "
            "example_inputs=(...) or use inplace=False to get the edited GraphModule"
        )
    # Random floats check more than zeros (a zero input hides every weight but the biases); integer
    # inputs (token ids) stay zero, which is always in range.
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(
        torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta
        else value
        for value in inputs
    )


@contextlib.contextmanager
def _as_a_user_runs_it(*modules: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, the RNG forked, caching of transformers configs off; all undone afterwards."""
    from fxindex._capture import _caching_off

    flags = [(module, module.training) for root in modules for module in root.modules()]
    devices = sorted(
        {t.device.index or 0 for root in modules for t in root.parameters() if t.device.type == "cuda"}
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _caching_off(modules[0], {}):
            for root in modules:
                root.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training


def _fields(value: Any) -> Mapping[str, Any] | None:
    """A dict-like output (a dict, a transformers ``ModelOutput``) as a mapping of its non-``None`` fields."""
    if isinstance(value, Mapping):
        return {key: field for key, field in value.items() if field is not None}
    return None


def _difference(graph: Any, eager: Any, path: str) -> str | None:
    """Where the eager output differs from the graph's, in words, or ``None`` when they agree."""
    if isinstance(graph, torch.Tensor):
        if not isinstance(eager, torch.Tensor):
            return f"{path}: the graph returns a tensor, the model a {type(eager).__name__}"
        if graph.shape != eager.shape or graph.dtype != eager.dtype:
            return (
                f"{path}: the graph returns {tuple(graph.shape)} {graph.dtype}, "
                f"the model {tuple(eager.shape)} {eager.dtype}"
            )
        if graph.is_meta or eager.is_meta:
            return None  # no values to compare: shapes and dtypes are all there is
        if not torch.allclose(graph, eager, rtol=RTOL, atol=ATOL, equal_nan=True):
            largest = (graph.double() - eager.double()).abs().nan_to_num(float("inf")).max().item()
            return f"{path}: values differ (largest difference {largest:.3g})"
        return None
    graph_fields = _fields(graph)
    if graph_fields is not None:
        eager_fields = _fields(eager)
        if eager_fields is None:
            return f"{path}: the graph returns a dict of {sorted(graph_fields)}, the model a {type(eager).__name__}"
        for key, value in graph_fields.items():
            if key not in eager_fields:
                return f"{path}: the model's output has no field {key!r}"
            found = _difference(value, eager_fields[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(graph, (tuple, list)):
        eager_items = list(_fields(eager).values()) if _fields(eager) is not None else eager
        if not isinstance(eager_items, (tuple, list)) or len(eager_items) != len(graph):
            return f"{path}: the graph returns {len(graph)} values, the model {type(eager).__name__}"
        for position, (value, other) in enumerate(zip(graph, eager_items)):
            found = _difference(value, other, f"{path}[{position}]")
            if found:
                return found
        return None
    if graph is None and _fields(eager) == {}:
        return None
    if graph != eager:
        return f"{path}: the graph returns {graph!r}, the model {eager!r}"
    return None


def _rewrites(planned_edits: Sequence[PlannedEdit] | None) -> str:
    """The plan's argument rewrites, in words: what eager code cannot follow."""
    if planned_edits is None:
        return (
            "The edit may have rewritten an op's arguments in the graph (a hard-coded view/reshape size) that the "
            "model's Python code cannot reflect"
        )
    rewritten = [edit for edit in planned_edits if edit.action == "rewrite"]
    if not rewritten:
        return "The plan rewrote no op's arguments; the model's forward computes something the graph does not"
    return "The graph rewrites arguments that the model's Python code hard-codes: " + "; ".join(
        f"node {edit.node!r} ({edit.target}): {edit.old} -> {edit.new}" for edit in rewritten
    )


def _is_transformers_config(config: Any) -> bool:
    # Named, not imported: transformers is no dependency of fxindex.
    return any(cls.__name__ in ("PretrainedConfig", "PreTrainedConfig") for cls in type(config).__mro__)


def _config_sizes(model: nn.Module, config: Any, before: Mapping[str, nn.Module]) -> tuple[dict[str, int], list[str]]:
    """The config sizes the written-back model now has, and why some cannot be stated (non-uniform edits).

    Args:
        model: the model after the write-back.
        config: its (unchanged) config.
        before: the model's modules before the write-back, by qualified name.

    Returns:
        ``{attribute: new value}`` for sizes that changed uniformly, and one
        sentence per size that changed differently in different layers.
    """
    proposed: dict[str, int] = {}
    problems: list[str] = []

    def measure(attribute: str, names: list[str], width: Any, current: Any = None) -> None:
        current = getattr(config, attribute) if current is None else current
        widths = {name: width(model.get_submodule(name)) for name in names if _lookup(model, name) is not None}
        values = set(widths.values())
        if len(values) == 1:
            value = values.pop()
            if value is not None and value != current:
                proposed[attribute] = value
        elif len(values) > 1:
            listed = ", ".join(f"{name} {value}" for name, value in widths.items())
            problems.append(f"{attribute}={current} but the layers differ: {listed}")

    hidden = getattr(config, "hidden_size", None)
    # The first intermediate attribute the config has (GPT-2's n_inner None means 4 * hidden_size).
    attribute = next((name for name in _INTERMEDIATE_SIZES if hasattr(config, name)), None)
    intermediate = getattr(config, attribute) if attribute is not None else None
    if attribute == "n_inner" and intermediate is None and isinstance(hidden, int):
        intermediate = 4 * hidden
    if attribute is not None and isinstance(intermediate, int):
        producers = [
            name for name, module in before.items()
            if _out_width(module) == intermediate
            and any(part.lower().startswith(word) for part in name.split(".") for word in _MLP_WORDS)
        ]  # fmt: skip
        measure(attribute, producers, _out_width, intermediate)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if isinstance(hidden, int) and heads else None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(hidden, int) and isinstance(embeddings, nn.Embedding) and embeddings.embedding_dim != hidden:
        proposed["hidden_size"] = embeddings.embedding_dim
    attentions = {name: layout for name, module in model.named_modules() if (layout := layout_of(module)) is not None}
    if isinstance(getattr(config, "head_dim", None), int) and attentions:
        # Every head narrowed alike: the attention modules' own head_dim (set from the edited graph) says so.
        measure("head_dim", list(attentions), lambda m: _int_attribute(m, layout_of(m).head_dim))  # type: ignore[union-attr]
        head_dim = proposed.get("head_dim", head_dim)
    if isinstance(head_dim, int) and head_dim > 0:
        dim = head_dim

        def heads_of(module: nn.Module, parts: int) -> int | None:
            # Whole heads only: a projection that cut through a head has no head count.
            width = _out_width(module)
            if width is not None and width % (parts * dim) == 0:
                return width // (parts * dim)
            return None

        for attribute, key in (("num_attention_heads", "query"), ("num_key_value_heads", "key")):
            if not isinstance(getattr(config, attribute, None), int):
                continue
            names, parts = [], 1
            for name, layout in attentions.items():
                child = getattr(layout, key)
                target = f"{name}.{child}" if name else str(child)
                if child is not None and _out_width(before.get(target)) is not None:
                    names.append(target)
                    parts = layout.parts if key == "query" else 1
            measure(attribute, names, lambda m, parts=parts: heads_of(m, parts))
        if "num_attention_heads" in proposed and not isinstance(getattr(config, "head_dim", None), int):
            # A config without head_dim derives it from hidden_size // num_attention_heads: state it.
            proposed.setdefault("head_dim", head_dim)
    return proposed, problems


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict(keep_vars=True).items()}


def _config_mismatch(model_class: type[nn.Module], config: Any, actual: Mapping[str, tuple[int, ...]]) -> str | None:
    """Whether ``model_class(config)`` has the state-dict keys and shapes ``actual``; the first difference if not.

    Built on the meta device: no memory, no initialisation arithmetic.
    """
    try:
        with torch.device("meta"):
            fresh = model_class(config)
    except Exception as error:  # a model class that cannot be built from its config alone
        return f"{model_class.__name__}(config) cannot be built: {type(error).__name__}: {error}"
    expected = _state_shapes(fresh)
    for key in dict.fromkeys([*expected, *actual]):
        if expected.get(key) != actual.get(key):
            return f"{key}: the config builds {expected.get(key, 'nothing')}, the model has {actual.get(key, 'nothing')}"
    return None


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line, past every fxindex frame.

    ``write_back`` is reached through ``replace``, ``resize``, ``remove`` or
    ``insert`` at different depths: a fixed level would name a line of fxindex.
    """
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep  # fxindex/ and its subpackages
    frame, level = sys._getframe(1), 1  # the caller of this function is level 1 of warnings.warn there
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _update_config(
    model: nn.Module, before: Mapping[str, nn.Module], shapes_before: Mapping[str, tuple[int, ...]], caller: str
) -> None:
    """Make a transformers model's config describe the written-back model, or warn that it cannot.

    Args:
        model: the written-back model, with a transformers config.
        before: its modules before the write-back, by qualified name.
        shapes_before: its state-dict shapes before the write-back.
        caller: the public function the warning names.
    """
    config = model.config
    # A config that did not describe the model before this edit (an earlier non-uniform edit, which
    # warned then) is not warned about again; but an edit that makes the model uniform again (the
    # last layer of a layer-by-layer narrowing) gets a config that describes it.
    described = _config_mismatch(type(model), config, shapes_before) is None
    proposed, problems = _config_sizes(model, config, before)
    advice = (
        "save_pretrained/from_pretrained would not rebuild this model: save it with fxindex.save(gm, path) "
        "(the GraphModule from inplace=False) instead"
    )
    if problems:
        if described:
            warnings.warn(
                f"{caller}: the model's config no longer describes the model ({'; '.join(problems)}); {advice}",
                EditWarning,
                stacklevel=_caller_stacklevel(),
            )
        return
    candidate = copy.deepcopy(config)
    for attribute, value in proposed.items():
        setattr(candidate, attribute, value)
    mismatch = _config_mismatch(type(model), candidate, _state_shapes(model))
    if mismatch is not None:
        if described:
            warnings.warn(
                f"{caller}: the model's config no longer describes the model ({mismatch}); {advice}",
                EditWarning,
                stacklevel=_caller_stacklevel(),
            )
        return
    # The model's own config object (shared by its submodules), not a copy.
    for attribute, value in proposed.items():
        setattr(config, attribute, value)


def write_back(
    model: nn.Module,
    edited: fx.GraphModule,
    planned_edits: Sequence[PlannedEdit] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    caller: str = "fxindex.write_back",
) -> nn.Module:
    """Apply the edit that made ``edited`` to ``model``'s own module tree, and check it.

    Args:
        model: the user's plain ``nn.Module`` (not a GraphModule) that
            ``edited`` was traced from; it keeps its class, methods and hooks.
        edited: the edited GraphModule (installed and shape-checked by
            fxindex), a copy or the trace that shares the model's layers.
            After a write-back the model holds its rebuilt modules (the same
            objects).
        planned_edits: the plan's edits (``Plan.edits``): they name removed
            layers and the rewritten ops an error reports. ``None``: removals
            are read from ``edited``'s recipe.
        example_inputs: inputs to compare the model's forward with
            ``edited``'s on; ``None``: random inputs of the shapes recorded on
            ``edited``'s placeholders (zeros for integer inputs).
        caller: the public function the message names.

    Returns:
        ``model``, edited.

    Raises:
        TypeError: ``model`` is a GraphModule or not a module.
        EditError: the write-back cannot be verified (no example inputs and
            no recorded shapes), cannot be expressed in the model's module
            tree, or the model's forward then differs from ``edited``'s
            (a hard-coded ``view`` the graph rewrote): the model is unchanged,
            and the message names the difference and the rewritten nodes.
    """
    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        raise TypeError(f"{caller}: write-back needs the user's plain nn.Module, got {type(model).__name__}")
    if not isinstance(edited, fx.GraphModule):
        raise TypeError(f"{caller}: the edited model must be a torch.fx.GraphModule, got {type(edited).__name__}")
    inputs = _verification_inputs(edited, example_inputs, caller)
    removed = _removed_targets(edited, planned_edits)
    modules = _plan_modules(model, edited, removed, caller)
    before = dict(model.named_modules())
    config_shapes = _state_shapes(model) if _is_transformers_config(getattr(model, "config", None)) else None
    undo = _Undo()
    # The new modules too: verification runs them in eval mode, and they must come out in their own mode.
    with _as_a_user_runs_it(model, edited, *(module for _, module in modules)):
        # The graph's output first: nothing of the model has changed yet.
        try:
            expected = edited(*inputs)
        except Exception as error:
            raise EditError(
                f"{caller}: cannot write the edit back: the edited graph itself does not run on the example inputs "
                f"({type(error).__name__}: {error}); the model is unchanged"
            ) from error
        problem: str | None = None
        cause: BaseException | None = None
        try:
            for target, module in modules:
                table, atom = _parent_table(model, target, caller)
                undo.set(table, atom, module)
            _set_tensors(model, edited, undo)
            _set_head_attributes(model, edited, {target for target, _ in modules}, undo)
            actual = model(*inputs)
            found = _difference(expected, actual, "output")
            problem = None if found is None else f"its output differs from the planned graph's ({found})"
        except Exception as error:
            problem = f"its forward raised {type(error).__name__}: {error}"
            cause = error
        except BaseException:
            undo.rollback()  # an interrupt: put everything back before it travels on
            raise
        if problem is not None:
            undo.rollback()
    if problem is not None:
        raise EditError(
            f"{caller}: the edit cannot be written back to the {type(model).__name__} itself: with the rebuilt "
            f"layers set, {problem}. {_rewrites(planned_edits)}. The model is unchanged; use inplace=False to get "
            "the edited GraphModule"
        ) from cause
    if config_shapes is not None:
        _update_config(model, before, config_shapes, caller)
    return model
