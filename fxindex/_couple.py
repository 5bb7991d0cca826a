"""Coupled replace: when a width change meets a join, resize the layer's whole channel group.

Forward propagation (:mod:`fxindex.propagate`) carries a change from one
layer until it is absorbed; at a residual ``add`` or a gating ``mul`` whose
other operand keeps its width it must stop. ``replace`` then falls back to
the layer's channel group (:mod:`fxindex.group`): every other producer of the
group is rebuilt with the same slot mapping (widened producers get zero
filters, so a widening whose first outputs copy the old ones stays
function-preserving across the whole residual stream; ``keep=`` drops the same
channels everywhere), carriers and ``get_attr`` parameters follow, consumers
read the new slots, and the caller's layer is installed at its site.

The resulting plan is verified before it is returned: it is installed into a
*view* (a GraphModule over a copy of the graph that shares the model's layers
but has its own containers) and the shapes of the whole graph are recorded
again on fake tensors. Nothing of the caller's model is touched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx

from fxindex._errors import FxIndexError, PropagationError, ShapeMismatchError
from fxindex._plan import Plan
from fxindex._propagate import Target, planner_for
from fxindex._shapes import TensorMetadata, record_shapes_on

__all__ = ["plan_coupled", "trial_view", "zeros_like_recorded"]


def zeros_like_recorded(graph_module: fx.GraphModule) -> tuple[Any, ...] | None:
    """Inputs shaped like ``graph_module``'s recorded placeholders, or ``None`` when one is unknown.

    Zeros, not empty memory: an index input (Embedding) must stay in range if
    a real run is needed. An optional argument left out gets its default.
    """
    first = next(iter(graph_module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    inputs: list[Any] = []
    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            inputs.append(torch.zeros(meta.shape, dtype=meta.dtype, device=device))
        elif node.args:
            inputs.append(node.args[0])  # an optional argument left at its default
        else:
            return None
    return tuple(inputs)


def plan_coupled(graph_module: fx.GraphModule, graph: fx.Graph, target: Target, refusal: PropagationError) -> Plan:
    """The plan of ``target``'s replacement with its whole channel group resized.

    Args:
        graph_module: the caller's GraphModule (read only).
        graph: the graph to plan on (``graph_module.graph`` or a copy of it
            with other shapes); ``target.node`` is one of its nodes.
        target: the call site and its new layer.
        refusal: why forward propagation alone could not carry the change;
            raised again (with the group's reason) when the group cannot help.

    Returns:
        The verified :class:`~fxindex.Plan`, with ``group`` naming the
        producers that change together and ``new_metas`` every node's shape.

    Raises:
        PropagationError: the group is blocked, or the change is not one of
            the group's width (``refusal``, with the group's reason added).
    """
    from fxindex._group import group_of_node
    from fxindex._resize import _plan as plan_group
    from fxindex._spaces import analyze, equal_blocks_of, solve, widths_that_work

    node = target.node
    planner = planner_for(graph_module, [target], graph)
    if planner.mode is None:
        raise _refused(refusal, "the channel group needs recorded shapes: pass example_inputs=(...)")
    planner.visit_target(node, target, planner.modules.get(node.target))
    change = planner.changes.get(node)
    if change is None:
        raise refusal
    view = _view(graph_module, graph)
    try:
        analysis = analyze(view)
        view_node = next(n for n in view.graph.nodes if n.name == node.name)
        root, found = group_of_node(analysis, view_node, target.label)
    except FxIndexError as error:
        raise _refused(refusal, str(error)) from error
    if not found.resizable:
        raise _refused(
            refusal,
            f"its channel group cannot be resized either: node '{found.blocked_by}' ({found.blocked_op}) {found.reason}",
        )
    if found.width != change.old_size:
        raise refusal
    blocks = equal_blocks_of(analysis, root)
    if blocks > 1:
        raise _refused(
            refusal,
            f"the group is split into {blocks} equal blocks (a grouped convolution, GroupNorm or chunk), which the "
            f"new layer's channel order would not keep equal; use fxindex.resize(model, {str(node.target)!r}, width, "
            f"keep=...) to resize it block by block (widths that work: {widths_that_work(found.width, blocks)})",
        )
    try:
        changes = solve(analysis, root, change.mapping)
    except FxIndexError as error:  # a reshape the new width cannot follow (a head cut in two...)
        raise _refused(refusal, str(error)) from error
    changed_roots = {analysis.find(space) for space in changes}
    for member in analysis.node_members(view_node):
        if member.role == "consumer" and analysis.find(member.space) in changed_roots:
            # A residual around the layer itself: the group changes what it reads, too.
            raise _refused(
                refusal,
                f"the group also runs through the layer's own input (a residual around it), so the new layer "
                f"would have to read the new width as well; use fxindex.resize(model, {str(node.target)!r}, width) "
                "to resize the group with this layer included",
            )
    try:
        group_plan = plan_group(analysis, changes, target.label)
    except FxIndexError as error:
        raise _refused(refusal, str(error)) from error
    caller_edit = next(edit for edit in planner.plan.edits if edit.node == node.name)
    edits = [caller_edit] + [edit for edit in group_plan.edits if edit.node != node.name]
    breaks = list(planner.plan.breaks_function) + [
        (name, reason) for name, reason in group_plan.breaks_function if name != node.name
    ]
    planned = Plan(
        edits=edits,
        breaks_function=breaks,
        output_changes=list(group_plan.output_changes),
        tensors=group_plan.tensors,
        group=tuple(found.producers),
    )
    planned.new_metas = _verified_shapes(view, planned, target)
    return planned


def _view(graph_module: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule over a copy of ``graph`` sharing ``graph_module``'s layers, with containers of its own."""
    return fx.GraphModule(graph_module, copy.deepcopy(graph), class_name=type(graph_module).__name__)


def trial_view(graph_module: fx.GraphModule, planned: Plan, graph: fx.Graph | None = None) -> fx.GraphModule:
    """``planned`` installed into a view of ``graph_module``: a dry run that leaves the model untouched.

    The view shares every layer and tensor of ``graph_module`` and has its own
    containers and graph, so installing there sets new layers on the view only
    (an owner of a ``get_attr`` tensor the plan replaces gets a shallow copy
    first). Costs no copy of a layer: what a check that the plan runs needs
    (``plan_resize``, the coupled ``replace``), where a deep copy of a large
    model took most of the time.

    Args:
        graph_module: the model the plan was computed on (read only).
        planned: the plan to install.
        graph: the graph the plan was computed on, when not ``graph_module.graph``.

    Returns:
        The view, linted and recompiled, with the plan installed.
    """
    from fxindex._replace import apply_plan

    view = _view(graph_module, graph if graph is not None else graph_module.graph)
    for target_name in planned.tensors:
        _own_owner(view, target_name)
    return apply_plan(view, planned)


def _own_owner(view: fx.GraphModule, target: str) -> None:
    """Give ``view`` its own shallow copy of the module holding ``target``, so setting it there is local.

    The view shares the model's layers; a tensor read by ``get_attr`` from a
    layer that is also called (so shared, not a fresh container) would
    otherwise be set on the caller's own module.
    """
    owner_name, _, _ = target.rpartition(".")
    if not owner_name:
        return
    parent_name, _, atom = owner_name.rpartition(".")
    parent = view.get_submodule(parent_name)
    owner = parent._modules[atom]
    own = copy.copy(owner)
    for name in ("_parameters", "_buffers", "_modules"):
        object.__setattr__(own, name, dict(getattr(owner, name)))
    parent._modules[atom] = own


def _refused(refusal: PropagationError, reason: str) -> PropagationError:
    message = refusal.args[0] if refusal.args else ""
    return PropagationError(f"{message}; resizing the whole channel group was tried: {reason}", refusal.node_name)


def _verified_shapes(view: fx.GraphModule, planned: Plan, target: Target) -> dict[str, Any]:
    """Install ``planned`` into ``view`` and record every node's shape on fake tensors: the new shapes."""
    inputs = zeros_like_recorded(view)
    view = trial_view(view, planned)
    if inputs is None:
        return {}
    try:
        record_shapes_on(view, view.graph, inputs)
    except ShapeMismatchError as error:
        raise PropagationError(f"{target.label}: the graph with the whole group resized does not run: {error}") from error
    return {node.name: node.meta.get("tensor_meta") for node in view.graph.nodes}
