"""Resize a layer's output channels and its whole coupled group in one edit.

``fxindex.resize(gm, "layer1.0.conv1", keep=top_k)`` is what pruning code
calls: the group of the layer's output channels (see :mod:`fxindex.group`) is
resized with one slot mapping. Every producer of the group is rebuilt with
it, every carrier and parameter is sliced or padded the same way, every
consumer reads the new slots, and shape constants downstream (a hard-coded
``view``, a slice bound, ``split`` sizes) are rewritten.

The steps are those of :func:`fxindex.replace`: compute the channel spaces
(cached per graph), plan every node's rebuild without touching the model,
then install the plan into a deep copy (or the model itself with
``inplace=True``) with :func:`fxindex._replace.apply_plan`. The rebuilt copy is
shape-checked on fake tensors before it is returned; with ``inplace=True``
the check runs on a copy first, so a failed call never modifies the model.
"""

from __future__ import annotations

from operator import attrgetter

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import copy

import torch
from torch import fx, nn

from fxindex.rules.registry import using
from fxindex._couple import trial_view
from fxindex._errors import EditError, FxIndexError, PropagationError, ShapeMismatchError
from fxindex._group import group_of_node, prepare
from fxindex._index import LayerIndex
from fxindex._plan import Plan, PlannedEdit
from fxindex._preserve import own_forward, verify_rebuilt
from fxindex._recipe import record_edit, restore_meta
from fxindex._propagate import check_kept_slots
from fxindex._replace import _as_slots, apply_plan
from fxindex._shapes import record_shapes
from fxindex._spaces import (
    Concat,
    NodeEdit,
    Product,
    RebuildRequest,
    SlotMapping,
    SpaceAnalysis,
    analyze,
    default_mapping,
    default_mappings,
    describe_node,
    equal_blocks_of,
    solve,
    whole_part_widths,
    widths_that_work,
)

__all__ = ["resize", "plan_resize"]

_CALLER = "fxindex.resize"


def _check_width(width: Any, label: str) -> None:
    if width is None:
        return
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise EditError(f"{label}: width must be a positive int, got {width!r}")


def _start_mapping(old: int, width: int | None, keep: Sequence[int] | None, blocks: int, label: str) -> SlotMapping:
    """The new slot -> old slot mapping of the group's channels, from ``width`` and ``keep``."""
    if keep is None:
        if width is None:
            raise EditError(f"{label}: give the new width, keep= (the old channels to keep, in order), or both")
        if blocks > 1 and (old % blocks or width % blocks):
            raise EditError(
                f"{label}: the channels are split into {blocks} equal blocks (a grouped convolution, GroupNorm, "
                f"chunk, or the nested halves of channel shuffles): the width {width} would not divide into them; "
                f"use {widths_that_work(old, blocks)}"
            )
        return default_mapping(old, width, blocks)
    # The same reading as replace's keep=: any iterable of ints, read once (tensors and numpy too).
    keep = list(keep)  # already read once by the caller (a generator is used up)
    if not keep:
        raise EditError(f"{label}: keep= is empty: a layer needs at least one channel")
    check_kept_slots(keep, old, label, f"the layer has {old} channels")
    width = len(keep) if width is None else width
    if width < len(keep):
        raise EditError(f"{label}: keep= names {len(keep)} channels but width is {width}")
    if blocks > 1 and width % blocks:
        raise EditError(
            f"{label}: the channels are split into {blocks} equal blocks: the width {width} would not divide into "
            f"them; use {widths_that_work(old, blocks)}, with the same number of kept channels in each block"
        )
    if blocks > 1 and width > len(keep):
        # Spread the new slots over the blocks: each block ends with its share.
        per_block = len(keep) // blocks
        if len(keep) % blocks:
            raise EditError(
                f"{label}: keep= names {len(keep)} channels, which does not split into {blocks} equal blocks"
            )
        extra = (width - len(keep)) // blocks
        return tuple(
            slot for b in range(blocks) for slot in (*keep[b * per_block : (b + 1) * per_block], *([None] * extra))
        )
    return tuple(keep) + (None,) * (width - len(keep))


def _check_reach(analysis: SpaceAnalysis, changes: Mapping[int, SlotMapping]) -> None:
    """Refuse ``changes`` that reach a blocked class (what :func:`_plan` checks first, without its label)."""
    for root in changes:
        block = analysis.blocked(root)
        if block is not None:
            raise PropagationError(
                f"the resize reaches node '{block.node}' ({block.op}), which blocks it: {block.reason}", block.node
            )


def _solve_width(analysis: SpaceAnalysis, root: int, width: int) -> tuple[SlotMapping, dict[int, SlotMapping]]:
    """Resize ``root``'s class to ``width`` with the first default mapping its structure takes.

    The candidates (see :func:`fxindex._spaces.default_mappings`) put the new
    slots at the end of every equal block, or change one factor of a product
    (a head more in each of q, k and v); when none goes through, the refusal
    of the plain default (new slots at the end) is raised.

    Returns:
        The mapping used and every class it changes.
    """
    candidates = default_mappings(analysis, root, width)
    plain = default_mapping(analysis.width(root), width, equal_blocks_of(analysis, root))
    refusal: FxIndexError | None = None
    for mapping in candidates:
        try:
            changes = solve(analysis, root, mapping)
            _check_reach(analysis, changes)
            return mapping, changes
        except (EditError, PropagationError) as error:
            if mapping == plain or refusal is None:
                refusal = error
    assert refusal is not None
    raise refusal


def _candidate_widths(analysis: SpaceAnalysis, root: int, around: int) -> list[int]:
    """Widths worth trying near ``around``: steps of the equal blocks, of each product factor's blocks and of whole parts, nearest first."""
    old = analysis.width(root)
    steps = {equal_blocks_of(analysis, root)}

    def product_steps(space: int) -> set[int]:
        # A product (heads): one factor changing moves the width in steps of the others' product.
        found: set[int] = set()
        for relation in analysis.relations_of(space):
            if isinstance(relation, Product) and analysis.find(relation.whole) == space:
                widths = [analysis.width(factor) for factor in relation.factors]
                found.update(analysis.width(space) // size for size in widths if size > 1)
        return found

    steps.update(product_steps(root))
    for relation in analysis.relations_of(root):
        # Equal parts that are products themselves (MaxViT's q, k and v, each heads x head_dim):
        # every part moves alike, so the whole moves in steps of (parts x a part's step).
        if isinstance(relation, Concat) and relation.equal and analysis.find(relation.whole) == root:
            parts = len(relation.parts)
            steps.update(parts * step for step in product_steps(analysis.find(relation.parts[0])))
    # Whole parts whose count may change (MultiheadAttention's heads): steps of one part.
    steps.update(whole_part_widths(analysis, root))
    tried = sorted(
        {old + k * step for step in steps for k in range(-3, 4) if k and old + k * step > 0} - {around},
        key=lambda w: (abs(w - around), w),
    )
    return tried[:12]


def working_widths(analysis: SpaceAnalysis, root: int, around: int, count: int = 4) -> list[int]:
    """Up to ``count`` widths near ``around`` that a resize of ``root``'s class can take without ``keep=``.

    Each candidate (steps of the class's equal blocks and of its product
    factors, both ways, nearest first, a dozen at most) is solved as
    :func:`resize` would: what is listed works, whatever the structure (a
    channel shuffle's nested halves, heads).

    Args:
        analysis: the analysis of the graph.
        root: the class to resize.
        around: the width asked for.
        count: how many widths to find at most.

    Returns:
        The widths, ascending.
    """
    found: list[int] = []
    for candidate in _candidate_widths(analysis, root, around):
        try:
            _check_reach(analysis, _solve_width(analysis, root, candidate)[1])
        except (EditError, PropagationError):
            continue
        found.append(candidate)
        if len(found) == count:
            break
    return sorted(found)


def _add_working_widths(error: FxIndexError, analysis: SpaceAnalysis, root: int, width: int | None) -> None:
    """Say which widths near ``width`` do work (checked, not estimated), at the end of ``error``'s message."""
    if width is None or not error.args or not isinstance(error.args[0], str):
        return
    found = working_widths(analysis, root, width)
    if found:
        text = f"; widths that work here: {', '.join(map(str, found))}"
    else:
        tried = _candidate_widths(analysis, root, width)
        # Checked, so this overrules any multiple suggested above: another relation of the group refuses those.
        text = (
            f"; but no width near {analysis.width(root)} works without keep=, whatever the multiple (tried "
            f"{', '.join(map(str, sorted(tried)))}: each is refused by another relation of the group)"
        )
    error.args = (error.args[0] + text,) + error.args[1:]


def _short(module: nn.Module | None) -> str:
    text = repr(module)
    return text if "\n" not in text else f"{type(module).__name__}(...)"


def _arguments_text(args: Any, kwargs: Any) -> str:
    parts = [arg.name if isinstance(arg, fx.Node) else repr(arg) for arg in args[1:]]
    parts += [f"{key}={value!r}" for key, value in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _plan(
    analysis: SpaceAnalysis, changes: dict[int, SlotMapping], label: str
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Rebuild every member of the changed classes: a plan (its ``tensors``: new get_attr values by target)."""
    graph_module = analysis.graph_module
    for root in changes:
        block = analysis.blocked(root)
        if block is not None:
            raise PropagationError(
                f"{label}: the resize reaches node '{block.node}' ({block.op}), which blocks it: {block.reason}",
                block.node,
            )
    slots: dict[fx.Node, dict[str, SlotMapping]] = defaultdict(dict)
    breaks: list[tuple[str, str]] = []
    outputs: list[str] = []
    for root, mapping in changes.items():
        for member in analysis.members_of(root):
            if member.node in analysis.rebuilders:
                slots[member.node][member.slot] = mapping
            if member.role == "normalizer":
                breaks.append((member.node.name, f"{member.detail}: values mix across the resized channels"))
            if member.role == "output":
                outputs.append(f"'{member.node.name}' width {analysis.width(root)} -> {len(mapping)}")
    modules = dict(graph_module.named_modules())
    order = {node: position for position, node in enumerate(graph_module.graph.nodes)}
    sites: dict[tuple[str, Any], list[fx.Node]] = defaultdict(list)
    for node in graph_module.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            sites[(node.op, node.target)].append(node)
    built: dict[tuple[str, Any], tuple[dict[str, SlotMapping], NodeEdit]] = {}
    edits: list[PlannedEdit] = []
    tensors: dict[str, torch.Tensor] = {}
    for node in sorted(slots, key=order.__getitem__):
        mappings = slots[node]
        module = modules.get(node.target) if node.op == "call_module" else None
        key = (node.op, node.target)
        shared = node.op in ("call_module", "get_attr") and len(sites[key]) > 1
        if shared and key in built:
            if built[key][0] != mappings:
                raise PropagationError(
                    f"{label}: '{node.target}' is used at {len(sites[key])} sites whose channels would change "
                    f"differently (node '{node.name}'); a shared layer keeps one set of weights",
                    node.name,
                )
            edit = built[key][1]
        else:
            if shared:
                changed_sites = [site for site in sites[key] if site in slots]
                if len(changed_sites) != len(sites[key]):
                    unchanged = next(site for site in sites[key] if site not in slots)
                    raise PropagationError(
                        f"{label}: '{node.target}' is used at {len(sites[key])} sites but only some change width "
                        f"(node '{unchanged.name}' does not); a shared layer keeps one set of weights",
                        node.name,
                    )
            old_widths = {member.slot: analysis.width(member.space) for member in analysis.node_members(node)}
            request = RebuildRequest(
                node=node,
                module=module,
                value=attrgetter(node.target)(graph_module) if node.op == "get_attr" else None,
                mappings=dict(mappings),
                old_widths=old_widths,
                analysis=analysis,
            )
            try:
                edit = analysis.rebuilders[node](request)
            except FxIndexError:
                raise
            except Exception as error:
                raise PropagationError(
                    f"{label}: cannot rebuild node '{node.name}' ({describe_node(node)}): {type(error).__name__}: {error}",
                    node.name,
                ) from error
            built[key] = (dict(mappings), edit)
        if not edit.preserves_function:
            breaks.append((node.name, edit.reason))
        elif edit.module is not None and module is not None and own_forward(module):
            # The rule of a torch.nn base rebuilt a subclass with its own forward: check the claim.
            reason = verify_rebuilt(node, module, edit.module, dict(mappings), _device_of(module))
            if reason is not None:
                breaks.append((node.name, f"{type(module).__name__} rebuilt: {reason}"))
        change = ", ".join(
            f"{slot} {analysis.width(next(m.space for m in analysis.node_members(node) if m.slot == slot))} -> {len(m)}"
            for slot, m in sorted(mappings.items())
        )
        if edit.tensor is not None:
            tensors[str(node.target)] = edit.tensor
            action, old, new = "rebuild", f"{tuple(request_shape(graph_module, node))}", f"{tuple(edit.tensor.shape)}"
        elif edit.module is not None:
            action, old, new = "rebuild", _short(module), _short(edit.module)
        elif edit.args is not None or edit.kwargs is not None:
            action = "rewrite"
            old = _arguments_text(node.args, node.kwargs)
            new = _arguments_text(
                edit.args if edit.args is not None else node.args, edit.kwargs if edit.kwargs is not None else node.kwargs
            )
        else:
            action, old, new = "pass", describe_node(node), ""
        edits.append(
            PlannedEdit(
                node=node.name,
                target=str(node.target) if node.op in ("call_module", "get_attr") else describe_node(node),
                action=action,
                old=old,
                new=new,
                weights=edit.weights,
                output_change=change,
                module=edit.module,
                args=edit.args,
                kwargs=edit.kwargs,
            )
        )
    return Plan(edits=edits, breaks_function=breaks, output_changes=outputs, tensors=tensors)


def _device_of(module: nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def request_shape(graph_module: fx.GraphModule, node: fx.Node) -> tuple[int, ...]:
    value = attrgetter(str(node.target))(graph_module)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _copy(graph_module: fx.GraphModule, share_tensors: bool = False) -> fx.GraphModule:
    """A deep copy that keeps fxindex's recipe (an unpickled module keeps it as attributes only).

    With ``share_tensors`` the copy's modules are new objects holding the same
    parameter and buffer tensors: enough to install a plan and check that the
    result runs (shape checks touch no tensor), at no memory cost. An
    in-place resize of a plain module checks on such a copy, which is then
    written back into the module's own tree (a GraphModule is checked on a
    :func:`~fxindex._couple.trial_view`, which copies no layer).
    """
    restore_meta(graph_module)
    memo: dict[int, Any] = {}
    if share_tensors:
        memo = {id(t): t for t in (*graph_module.parameters(), *graph_module.buffers())}
    return copy.deepcopy(graph_module, memo)


def _check_inputs(graph_module: fx.GraphModule, example_inputs: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """Inputs to shape-check the result with: the caller's, or zeros shaped like the recorded ones."""
    if example_inputs is not None:
        return example_inputs
    from fxindex._couple import zeros_like_recorded

    return zeros_like_recorded(graph_module)


def _plan_resize(
    model: nn.Module,
    index: int | str,
    width: int | None,
    keep: Sequence[int] | None,
    example_inputs: tuple[Any, ...] | None,
) -> tuple[fx.GraphModule, Plan, dict[str, Any]]:
    source = prepare(model, example_inputs, _CALLER)
    layers = LayerIndex(source)
    position = layers.resolve(index)
    node = layers.node(position)
    label = f"layer {position} ('{node.target}')"
    _check_width(width, label)
    analysis = analyze(source)
    root, found = group_of_node(analysis, node, label)
    if not found.resizable:
        raise PropagationError(
            f"{label}: its channel group cannot be resized: node '{found.blocked_by}' ({found.blocked_op}) "
            f"{found.reason}",
            found.blocked_by or "",
        )
    blocks = equal_blocks_of(analysis, root)
    if keep is not None:
        keep = list(_as_slots(keep, label))  # read once here: a generator is used up by this
    asked = width if keep is None or width is not None else len(keep)
    if asked is not None and any(asked % size == 0 for size in whole_part_widths(analysis, root)):
        # Whole heads kept, dropped or added (MultiheadAttention): the head count may change, so
        # the equal-blocks count is no constraint here; the solver checks the mapping.
        blocks = 1
    try:
        mapping = _start_mapping(found.width, width, keep, blocks, label)
        if keep is None:
            assert width is not None
            mapping, changes = _solve_width(analysis, root, width)
        else:
            changes = solve(analysis, root, mapping)
    except (EditError, PropagationError) as error:
        if keep is None:
            _add_working_widths(error, analysis, root, width)
        raise
    plan = _plan(analysis, changes, label)
    dropped = found.width - sum(slot is not None for slot in mapping)
    if dropped:
        plan.breaks_function.insert(
            0,
            (
                node.name,
                f"drops {dropped} of {found.width} channels of the group; the output is unchanged only if they "
                "carried nothing",
            ),
        )
    edit = {
        "op": "resize",
        "index": position,
        "target": str(node.target),
        "width": len(mapping),
        # From the mapping, not the argument: a generator given as keep= is used up by now.
        "keep": None if keep is None else [int(slot) for slot in mapping if slot is not None],
    }
    return source, plan, edit


def plan_resize(
    model: nn.Module,
    index: int | str,
    width: int | None = None,
    *,
    keep: Sequence[int] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    rules: Mapping[Any, Any] | None = None,
) -> Plan:
    """What :func:`resize` would do, without doing it: every member it rebuilds or rewrites.

    Like :func:`resize`, it installs the plan where the model cannot see it
    (a view sharing the model's layers, with its own containers and graph)
    and re-records the shapes, so a plan it returns runs (a
    ``PropagationError`` "the resized graph does not run" otherwise); the
    model is only read.

    Args:
        model, index, width, keep, example_inputs: as for :func:`resize`
            (there is no ``inplace``).
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        A :class:`~fxindex.Plan`; ``print(plan)`` shows it as a table.
    """
    with using(rules):
        try:
            source, plan, _ = _plan_resize(model, index, width, keep, example_inputs)
            inputs = _check_inputs(source, example_inputs)
            if inputs is not None:
                # The same check resize makes: a plan that says yes must run (a layout only a real
                # kernel gives can break a later view). On a view sharing the model's layers.
                _check_runs(trial_view(model if isinstance(model, fx.GraphModule) else source, plan), inputs)
            return plan
        except FxIndexError as error:
            raise _with_context(error) from error.__cause__


def _check_runs(result: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Record ``result``'s shapes on ``inputs``; a :class:`PropagationError` if the resized graph fails."""
    try:
        record_shapes(result, inputs)
    except ShapeMismatchError as error:
        raise PropagationError(f"the resized graph does not run: {error}") from error


def _with_context(error: FxIndexError) -> FxIndexError:
    if error.args and isinstance(error.args[0], str) and not error.args[0].startswith(_CALLER):
        error.args = (f"{_CALLER}: {error.args[0]}",) + error.args[1:]
    return error


def resize(
    model: nn.Module,
    index: int | str,
    width: int | None = None,
    *,
    keep: Sequence[int] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    inplace: bool = False,
    rules: Mapping[Any, Any] | None = None,
) -> fx.GraphModule:
    """Change the output width of the layer at ``index`` and of its whole channel group.

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        index: an execution-order index (negatives allowed) or a qualified name.
        width: the new width. Larger than now widens: new filters of every
            producer are zero and consumers read new slots with zero weights,
            so the model computes the same function (unless the group holds
            a LayerNorm, GroupNorm, softmax or mean across the channels).
            Smaller keeps the first channels. Default: ``len(keep)``.
        keep: old channel indices to keep, in their new order (new channel
            ``j`` is old channel ``keep[j]``; channels past ``len(keep)`` are
            new): narrows, reorders, or both with ``width``. With a grouped
            convolution in the group, each block must keep as many channels,
            listed block by block.
        example_inputs: a tuple of inputs; records shapes (needed unless
            ``model`` was traced with them).
        inplace: edit ``model`` itself (a plain module gets the edit written
            back into its own tree and verified, see :func:`fxindex.replace`);
            even then a failed call leaves it untouched.
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        The rebuilt ``GraphModule``, linted, recompiled and shape-checked
        (with ``inplace=True`` on a plain module, that module); unless
        ``inplace``, it shares no parameter with ``model``.

    Raises:
        EditError: ``width`` is not a positive int, ``keep=`` is out of range
            or repeated, or equal blocks (grouped conv) would become unequal;
            the message says which widths work.
        PropagationError: the group cannot be resized; names the node and op
            that block it.
        ShapesRequiredError: no shapes recorded and no ``example_inputs``.
        LayerIndexError / LayerNameError: no such layer.

    Example:
        >>> import torch, torchvision, fxindex
        >>> net = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> wider = fxindex.resize(net, "layer1.0.conv2", 72, example_inputs=(x,))
        >>> wider.conv1.out_channels, wider.layer2.get_submodule("0").conv1.in_channels
        (72, 72)
        >>> torch.testing.assert_close(wider(x), net(x), rtol=1e-5, atol=1e-5)
    """
    with using(rules):
        try:
            source, plan, edit = _plan_resize(model, index, width, keep, example_inputs)
            # Install into the caller's GraphModule (or the trace of a plain module), never into a shape view.
            target = model if isinstance(model, fx.GraphModule) else source
            inputs = _check_inputs(source, example_inputs)
            if inplace and isinstance(model, fx.GraphModule):
                # Checked on a view first (no copy of a layer): the caller's module changes only once it runs.
                result = trial_view(target, plan)
            else:
                result = _copy(target, share_tensors=inplace)
                apply_plan(result, plan)
            if inputs is not None:
                _check_runs(result, inputs)
            if inplace and not isinstance(model, fx.GraphModule):
                # A plain module keeps its class and methods: the checked copy is written back into it.
                from fxindex._writeback import write_back

                record_edit(result, edit)
                return write_back(model, result, plan.edits, example_inputs, caller=_CALLER)
            if inplace:
                # Checked on the copy: now the same edit, on the caller's module, with the copy's shapes.
                apply_plan(target, plan)
                metas = {node.name: node.meta.get("tensor_meta") for node in result.graph.nodes}
                for node in target.graph.nodes:
                    if metas.get(node.name) is not None:
                        node.meta["tensor_meta"] = metas[node.name]
                result = target
        except FxIndexError as error:
            raise _with_context(error) from error.__cause__
        record_edit(result, edit)
        return result
