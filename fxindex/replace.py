"""Replace, remove or insert the layer at an execution-order index, propagating shape changes.

Every public function here follows the same three steps: select the call
sites through the :class:`~fxindex.index.LayerIndex`, compute a
:class:`~fxindex.plan.Plan` with the read-only propagation pass, then install
it (:func:`apply_plan`: swap modules, rewrite arguments, ``lint``,
``recompile``). Planning raises before anything is touched, so a failed call
leaves the model exactly as it was, ``inplace=True`` included.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import fx, nn

from fxindex.errors import FxIndexError
from fxindex.index import LayerIndex, as_graph_module
from fxindex.plan import Plan
from fxindex.propagate import Target, build_plan
from fxindex.recipe import describe_layer, record_edit, restore_meta
from fxindex.rules import Widths, find_widths
from fxindex.speed import speed_up

__all__ = ["replace", "plan", "remove", "insert", "apply_plan"]

Selector = int | str


def _label(layers: LayerIndex, position: int) -> str:
    return f"layer {position} ('{layers.node(position).target}')"


def _check_layer(new_layer: Any, label: str) -> nn.Module:
    if not isinstance(new_layer, nn.Module):
        raise TypeError(f"{label}: the new layer must be an nn.Module, got {type(new_layer).__name__}")
    return new_layer


def _select(
    graph_module: fx.GraphModule,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None,
    all_sites: bool,
    caller: str,
) -> tuple[list[Target], dict[str, Any]]:
    """Turn the caller's index/new_layer/keep into targets, all numbered on the original graph.

    Returns:
        The targets, and the edit as recipe data.
    """
    layers = LayerIndex(graph_module)
    if isinstance(index, Mapping):
        if new_layer is not None:
            raise TypeError(f"{caller}: with a dict of replacements, leave new_layer out (got {_short_type(new_layer)})")
        choices = dict(index)
        if not choices:
            raise TypeError(f"{caller}: the dict of replacements is empty")
    else:
        if new_layer is None:
            raise TypeError(f"{caller}: new_layer is missing: pass an nn.Module (or a dict {{index: layer}} as index)")
        choices = {index: new_layer}
    if keep is not None and not isinstance(keep, Mapping):
        if len(choices) != 1:
            raise TypeError(f"{caller}: with several replacements, give keep as a dict {{index: keep}}")
        keep = {next(iter(choices)): keep}
    keeps = {layers.resolve(key): value for key, value in (keep or {}).items()}
    targets: dict[fx.Node, Target] = {}
    recorded: list[dict[str, Any]] = []
    for key, layer in choices.items():
        position = layers.resolve(key)
        label = _label(layers, position)
        layer = _check_layer(layer, label)
        name = str(layers.node(position).target)
        recorded.append({"index": position, "target": name, "layer": describe_layer(layer)})
        sites = layers.positions(name) if all_sites else [position]
        for site in sites:
            node = layers.node(site)
            if node in targets:
                raise TypeError(f"{caller}: {_label(layers, site)} is selected twice")
            targets[node] = Target(node, layer, keeps.get(position), _label(layers, site))
    unknown_keeps = set(keeps) - {layers.resolve(key) for key in choices}
    if unknown_keeps:
        raise TypeError(f"{caller}: keep= names layers {sorted(unknown_keeps)} that are not being replaced")
    edit = {
        "op": "replace",
        "layers": recorded,
        "keep": {str(position): [int(slot) for slot in value] for position, value in keeps.items()},
        "all_sites": all_sites,
    }
    return list(targets.values()), edit


def _short_type(value: Any) -> str:
    return type(value).__name__


def _source(model: nn.Module, example_inputs: tuple[Any, ...] | None, caller: str) -> fx.GraphModule:
    """The GraphModule to plan on: ``model`` itself, or its fresh trace (which shares its layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    return as_graph_module(model, example_inputs, caller=caller)


def _edited(graph_module: fx.GraphModule, inplace: bool) -> fx.GraphModule:
    """The module to install a plan into: the caller's own when ``inplace``, else a deep copy.

    Copying after planning means a refused edit costs no copy at all.
    """
    if inplace:
        return graph_module
    # An unpickled GraphModule keeps its recipe as attributes only, which deepcopy drops.
    restore_meta(graph_module)
    return copy.deepcopy(graph_module)


def _working_copy(model: nn.Module, example_inputs: tuple[Any, ...] | None, inplace: bool, caller: str) -> fx.GraphModule:
    """The GraphModule to edit before planning (insert adds its node first)."""
    if isinstance(model, fx.GraphModule) or not inplace:
        return _edited(_source(model, example_inputs, caller), inplace)
    return _source(model, example_inputs, caller)


def _unique_name(graph_module: fx.GraphModule, target: str, *, plain_first: bool = False) -> str:
    """A free qualified name beside ``target``: ``target`` itself (if asked and free), else ``target_1``..."""
    parent_name, _, atom = target.rpartition(".")
    parent = graph_module.get_submodule(parent_name)
    if plain_first and not hasattr(parent, atom):
        return target
    suffix = 1
    while hasattr(parent, f"{atom}_{suffix}"):
        suffix += 1
    return f"{parent_name}.{atom}_{suffix}" if parent_name else f"{atom}_{suffix}"


def apply_plan(graph_module: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Install ``plan`` into ``graph_module`` (in place): modules, arguments, shapes; lint; recompile.

    The result is recompiled through :func:`~fxindex.speed.speed_up`, so it
    runs at eager speed.

    A module used by several call sites is replaced under its own name only
    when every site gets the same new module; otherwise each changed site gets
    its module under a new unique name (``relu_1``) and the others keep theirs.

    Args:
        graph_module: the module the plan was computed on (or a deep copy).
        plan: from :func:`plan`.

    Returns:
        ``graph_module``.
    """
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    sites: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        if node.op == "call_module":
            sites[node.target] += 1
    by_target: dict[str, list] = defaultdict(list)
    for edit in plan.edits:
        if edit.module is not None and edit.action != "remove":
            by_target[str(nodes[edit.node].target)].append(edit)
    for target, edits in by_target.items():
        every_site = len(edits) == sites[target]
        installed: dict[int, str] = {}
        for edit in edits:
            node = nodes[edit.node]
            if id(edit.module) not in installed:
                if every_site and not installed:
                    name = target  # same key in the state dict
                else:
                    name = _unique_name(graph_module, target)
                graph_module.add_submodule(name, edit.module)
                installed[id(edit.module)] = name
            node.target = installed[id(edit.module)]
    for edit in plan.edits:
        node = nodes[edit.node]
        # The plan was computed on the source graph; a copy has its own nodes, found by name.
        if edit.args is not None:
            node.args = fx.node.map_arg(edit.args, lambda arg: nodes[arg.name])
        if edit.kwargs is not None:
            node.kwargs = fx.node.map_arg(edit.kwargs, lambda arg: nodes[arg.name])
        if edit.action == "remove":
            target = node.target
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            if not any(other.op == "call_module" and other.target == target for other in graph.nodes):
                graph_module.delete_submodule(target)
    for name, meta in plan.new_metas.items():
        if name in nodes and nodes[name].graph is graph:
            if meta is None:
                nodes[name].meta.pop("tensor_meta", None)
            else:
                nodes[name].meta["tensor_meta"] = meta
    graph.lint()
    # speed_up recompiles; it also gives a GraphModule traced elsewhere eager-speed code.
    return speed_up(graph_module)


def _with_context(error: FxIndexError, caller: str) -> FxIndexError:
    if error.args and isinstance(error.args[0], str) and not error.args[0].startswith(caller):
        error.args = (f"{caller}: {error.args[0]}",) + error.args[1:]
    return error


def _plan_edit(
    caller: str,
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None,
    example_inputs: tuple[Any, ...] | None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None,
    propagate: bool,
    all_sites: bool,
) -> tuple[fx.GraphModule, Plan, dict[str, Any]]:
    """Trace if needed, select the sites and plan: what plan() returns and replace() applies."""
    source = _source(model, example_inputs, caller=caller)
    try:
        targets, edit = _select(source, index, new_layer, keep, all_sites, caller)
        return source, build_plan(source, targets, propagate=propagate), edit
    except FxIndexError as error:
        raise _with_context(error, caller) from error.__cause__


def plan(
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None = None,
    propagate: bool = True,
    all_sites: bool = False,
) -> Plan:
    """Compute what :func:`replace` would do, without doing it.

    Takes the same arguments as :func:`replace` (but never ``inplace``).

    Returns:
        A :class:`~fxindex.plan.Plan`: the touched nodes with old and new
        modules or arguments, which weights are kept, sliced or new, whether
        the edit preserves the model's function, and output shape changes.

    Example:
        >>> import torch, fxindex
        >>> model = fxindex.examples.SeedModel()
        >>> steps = fxindex.plan(model, 0, torch.nn.Conv2d(3, 21, 3), example_inputs=fxindex.examples.seed_inputs())
        >>> [edit.action for edit in steps.edits]
        ['replace', 'rewrite', 'rebuild']
    """
    _, planned, _ = _plan_edit("fxindex.plan", model, index, new_layer, example_inputs, keep, propagate, all_sites)
    return planned


def replace(
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None = None,
    propagate: bool = True,
    inplace: bool = False,
    all_sites: bool = False,
) -> fx.GraphModule:
    """Replace the layer at an execution-order index and adapt the graph downstream.

    When the new layer changes the size of one dimension (channels, features),
    the change is carried to the layers that read it: normalisations are
    rebuilt, the next Linear/Conv gets new input slots (zero weights),
    hard-coded ``view``/``reshape`` sizes are rewritten, and every weight that
    still means something is kept.

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        index: an int in execution order (negatives allowed), a qualified name
            (its first call site), or a dict ``{index: new_layer}`` for several
            replacements in one pass (all indices from the original numbering).
        new_layer: the module to call at that site (omit with a dict).
        example_inputs: a tuple of inputs; records shapes so reshapes can be
            rewritten and the rebuilt graph shape-checked with fake tensors.
        keep: old output channels kept, in their new order (new position ``j``
            takes old channel ``keep[j]``; positions past ``len(keep)`` are
            new). Default: the first channels, by position. A dict per index
            with a dict ``index``.
        propagate: adapt downstream layers (default). With ``False`` only the
            call site changes, and downstream layers must accept its output.
        inplace: edit ``model`` itself (a GraphModule) instead of a copy. Even
            then a failed call leaves it untouched.
        all_sites: replace every call site of a module called several times
            (default: only the selected one, under a new unique name).

    Returns:
        The rebuilt ``GraphModule``, linted and recompiled. Unless ``inplace``,
        it shares no parameter tensor with ``model``.

    Raises:
        TypeError: ``model`` or ``new_layer`` is not a module.
        LayerIndexError / LayerNameError: no such layer.
        ShapeMismatchError: the new layer cannot read the old one's input.
        PropagationError: the change cannot be carried (a residual join whose
            other branch keeps its width, an op with no rule...).
        ShapesRequiredError: a rule needs shapes: pass ``example_inputs``.

    Example:
        >>> import torch, fxindex
        >>> model = fxindex.examples.SeedModel()
        >>> inputs = fxindex.examples.seed_inputs()
        >>> rebuilt = fxindex.replace(model, 0, torch.nn.Conv2d(3, 21, 3), example_inputs=inputs)
        >>> rebuilt.linear1
        Linear(in_features=14196, out_features=128, bias=True)
        >>> rebuilt(*inputs).shape
        torch.Size([2, 8])
    """
    source, planned, edit = _plan_edit(
        "fxindex.replace", model, index, new_layer, example_inputs, keep, propagate, all_sites
    )
    graph_module = apply_plan(_edited(source, inplace), planned)
    record_edit(graph_module, {**edit, "propagate": propagate})
    return graph_module


def remove(
    model: nn.Module,
    index: Selector,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Remove the layer at ``index``: its input flows straight to its users.

    If the layer changed the shape (a Linear 128 -> 64), downstream layers are
    adapted as for :func:`replace`.

    Returns:
        The rebuilt ``GraphModule``; the call site is gone from its index.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> [e.target for e in fxindex.index(fxindex.remove(net, 1))]
        ['0', '2']
    """
    source = _source(model, example_inputs, caller="fxindex.remove")
    try:
        layers = LayerIndex(source)
        position = layers.resolve(index)
        node = layers.node(position)
        widths = find_widths(source.get_submodule(str(node.target)))
        # Without the layer, its users read its input: the same dimension at the input's width.
        passed = Widths(widths.in_dim, widths.in_size, widths.in_dim, widths.in_size) if widths else None
        target = Target(node, nn.Identity(), None, _label(layers, position), "remove", widths, passed)
        planned = build_plan(source, [target])
    except FxIndexError as error:
        raise _with_context(error, "fxindex.remove") from error.__cause__
    graph_module = apply_plan(_edited(source, inplace), planned)
    record_edit(graph_module, {"op": "remove", "index": position, "target": str(node.target)})
    return graph_module


def insert(
    model: nn.Module,
    index: Selector,
    new_layer: nn.Module,
    *,
    after: bool = True,
    example_inputs: tuple[Any, ...] | None = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Insert ``new_layer`` after (or before) the layer at ``index``.

    The new layer reads what that layer wrote (or read); if it changes the
    shape, downstream layers are adapted as for :func:`replace`. It is
    registered beside the anchor under a new name (``conv1_inserted``).

    Returns:
        The rebuilt ``GraphModule``.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> rebuilt = fxindex.insert(net, 0, torch.nn.ReLU())
        >>> [type(e.module).__name__ for e in fxindex.index(rebuilt)]
        ['Linear', 'ReLU', 'Linear']
    """
    graph_module = _working_copy(model, example_inputs, inplace, caller="fxindex.insert")
    layers = LayerIndex(graph_module)
    try:
        position = layers.resolve(index)
        label = _label(layers, position)
        _check_layer(new_layer, label)
    except FxIndexError as error:
        raise _with_context(error, "fxindex.insert") from error.__cause__
    anchor = layers.node(position)
    graph = graph_module.graph
    name = _unique_name(graph_module, f"{anchor.target}_inserted", plain_first=True)
    graph_module.add_submodule(name, nn.Identity())
    if after:
        with graph.inserting_after(anchor):
            new_node = graph.call_module(name, (anchor,))
        anchor.replace_all_uses_with(new_node, delete_user_cb=lambda user: user is not new_node)
        source_meta = anchor.meta.get("tensor_meta")
    else:
        source = anchor.args[0]
        with graph.inserting_before(anchor):
            new_node = graph.call_module(name, (source,))
        anchor.replace_input_with(source, new_node)
        source_meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    if source_meta is not None:
        new_node.meta["tensor_meta"] = source_meta
    try:
        label = f"new layer {name!r} {'after' if after else 'before'} {label}"
        anchor_widths = find_widths(graph_module.get_submodule(str(anchor.target)))
        if anchor_widths is not None:
            # The placeholder identity passes on what the anchor writes (after) or reads (before).
            dim, size = (
                (anchor_widths.out_dim, anchor_widths.out_size) if after else (anchor_widths.in_dim, anchor_widths.in_size)
            )
            anchor_widths = Widths(dim, size, dim, size)
        planned = build_plan(graph_module, [Target(new_node, new_layer, None, label, old_widths=anchor_widths)])
    except BaseException as error:
        # Undo the placeholder identity so an inplace call leaves no trace.
        new_node.replace_all_uses_with(new_node.args[0])
        graph.erase_node(new_node)
        graph_module.delete_submodule(name)
        if isinstance(error, FxIndexError):
            raise _with_context(error, "fxindex.insert") from error.__cause__
        raise
    apply_plan(graph_module, planned)
    record_edit(
        graph_module,
        {"op": "insert", "index": position, "target": str(anchor.target), "after": after, "layer": describe_layer(new_layer)},
    )
    return graph_module
