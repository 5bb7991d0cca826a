"""Coupled channel groups: the layers whose channels must change width together.

``fxindex.group(model, "layer1.0.conv2")`` answers "if I change how many
channels this layer writes, what else has to change?": every layer that
writes into the same channel space (the convs of one residual stream, both
branches of a gate), the per-channel layers and parameters that carry it, the
layers that read it and absorb the change, the joins that tie it together and,
when it cannot be resized, the node that blocks it and why. The answer comes
from the channel-space analysis (:mod:`fxindex.spaces`), computed once per
graph in linear time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate
from torch import fx, nn

from fxindex.rules.registry import using
from fxindex._errors import EditError, FxIndexError
from fxindex._index import LayerIndex, as_graph_module
from fxindex._shapes import record_shapes
from fxindex._spaces import Block, Member, SpaceAnalysis, analyze, describe_node, equal_blocks_of, widths_that_work

__all__ = ["GroupMember", "ChannelGroup", "group", "groups", "group_of_node"]

# Roles in the order the table lists them.
_ROLE_ORDER = ("producer", "carrier", "parameter", "join", "shape", "consumer", "normalizer", "output")


@dataclass(frozen=True)
class GroupMember:
    """One node's role in a group.

    Attributes:
        role: ``"producer"`` (writes the group's channels fresh: Linear/Conv
            outputs), ``"consumer"`` (reads them and writes others),
            ``"carrier"`` (per-channel weights: BatchNorm, PReLU, depthwise
            conv), ``"parameter"`` (a ``get_attr`` tensor along them),
            ``"join"`` (an elementwise op or ``cat`` that ties them),
            ``"shape"`` (a shape constant that follows the width),
            ``"normalizer"`` (mixes values across them: LayerNorm, GroupNorm,
            softmax) or ``"output"`` (the graph returns them).
        name: the qualified module or parameter name (``layer1.0.conv2``,
            ``gamma``), or the node name for functions and methods.
        node: the fx node name.
        op: what the node does (``call_module layer1.0.conv2``, ``operator.add``).
        detail: what of it is resized (``out_channels``, ``BatchNorm2d``...).
        width: the width of the space it touches.
    """

    role: str
    name: str
    node: str
    op: str
    detail: str
    width: int


@dataclass(frozen=True)
class ChannelGroup:
    """The coupled group of one layer's output channels.

    Attributes:
        layer: the qualified name of the layer the group was asked for.
        width: the current width of its output channels.
        producers: layers (qualified names) whose output channels change together.
        carriers: per-channel layers carried along (BatchNorm, LayerNorm,
            PReLU, depthwise conv...).
        consumers: layers that read the channels and absorb the change.
        joins: nodes (names) that tie the channels of several branches (``add``, ``mul``, ``cat``).
        parameters: ``get_attr`` parameters and buffers resized with it
            (layer-scale ``gamma``, ``cls_token``, ``pos_embed``).
        members: every role of every node, in graph order (the table's rows).
        blocks: the number of equal blocks the width is split into (grouped
            convolutions, GroupNorm, chunk): a new width must be a multiple of it,
            unless the blocks are whole parts whose count may change
            (``nn.MultiheadAttention``'s heads: a multiple of ``head_dim`` works too).
        blocked_by: the node that makes the group not resizable, or ``None``.
        blocked_op: what that node does.
        reason: why it blocks.
        preserves_function: ``False`` when something in the group mixes values
            across the channels (LayerNorm, GroupNorm, softmax, mean), so a
            widening changes old outputs.
    """

    layer: str
    width: int
    producers: tuple[str, ...]
    carriers: tuple[str, ...]
    consumers: tuple[str, ...]
    joins: tuple[str, ...]
    parameters: tuple[str, ...]
    members: tuple[GroupMember, ...]
    blocks: int = 1
    blocked_by: str | None = None
    blocked_op: str | None = None
    reason: str | None = None
    preserves_function: bool = True

    @property
    def resizable(self) -> bool:
        """Whether fxindex can resize the group."""
        return self.blocked_by is None

    def table(self, **tabulate_kwargs: Any) -> str:
        """The group as a table (role, name, node, op, what, width), then a summary."""
        rows = [(m.role, m.name, m.node, m.op, m.detail, m.width) for m in self.members]
        options: dict[str, Any] = {"headers": ("role", "name", "node", "op", "what", "width")}
        options.update(tabulate_kwargs)
        lines = [f"channel group of '{self.layer}': width {self.width}", tabulate(rows, **options)]
        if self.blocks > 1:
            lines.append(f"the width is split into {self.blocks} equal blocks: a new width must be "
                         f"{widths_that_work(self.width, self.blocks)}")
        if self.resizable:
            lines.append("resizable: yes")
        else:
            lines.append(f"resizable: no, blocked by node '{self.blocked_by}' ({self.blocked_op}): {self.reason}")
        if not self.preserves_function:
            breaking = sorted({m.name for m in self.members if m.role == "normalizer"})
            lines.append("function-preserving widening: no, values mix across the channels at " + ", ".join(breaking))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        """The group as HTML, for notebooks."""
        from fxindex._notebook import text_to_html

        return text_to_html(self.table(tablefmt="html"))


def _name(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    return node.name


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def build_group(analysis: SpaceAnalysis, root: int, layer: str) -> ChannelGroup:
    """The :class:`ChannelGroup` of the class of space ``root`` (named after ``layer``)."""
    order, block = analysis.closure(root)
    positions = {node: position for position, node in enumerate(analysis.graph_module.graph.nodes)}
    members: list[Member] = []
    for current in order:
        members.extend(analysis.members_of(current))
    members.sort(key=lambda m: (positions[m.node], _ROLE_ORDER.index(m.role) if m.role in _ROLE_ORDER else 99))
    # A parameter's size-1 or unrelated dims are members of other classes; only list what is in the group.
    rows: list[GroupMember] = []
    seen: set[tuple[fx.Node, str]] = set()
    for member in members:
        key = (member.node, member.role)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            GroupMember(
                role=member.role,
                name=_name(member.node),
                node=member.node.name,
                op=describe_node(member.node),
                detail=member.detail,
                width=analysis.width(member.space),
            )
        )

    def of(role: str) -> tuple[str, ...]:
        return _unique([row.name for row in rows if row.role == role])

    return ChannelGroup(
        layer=layer,
        width=analysis.width(root),
        producers=of("producer"),
        carriers=of("carrier"),
        consumers=of("consumer"),
        joins=_unique([row.node for row in rows if row.role == "join"]),
        parameters=of("parameter"),
        members=tuple(rows),
        blocks=equal_blocks_of(analysis, analysis.find(root)),
        blocked_by=block.node if block else None,
        blocked_op=block.op if block else None,
        reason=block.reason if block else None,
        preserves_function=not any(row.role == "normalizer" for row in rows),
    )


def prepare(model: nn.Module, example_inputs: tuple[Any, ...] | None, caller: str) -> fx.GraphModule:
    """The GraphModule to analyse, never the caller's graph when new shapes must be recorded.

    A plain module is traced (the trace shares its layers). A GraphModule is
    used as it is, unless ``example_inputs`` are given: then the shapes are
    recorded on a view of it (a new GraphModule over a copy of its graph,
    sharing its layers and with the same node names), so the caller's
    recorded shapes stay as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        if example_inputs is None:
            return model
        view = fx.GraphModule(model, copy.deepcopy(model.graph), class_name=type(model).__name__)
        record_shapes(view, example_inputs)
        return view
    return as_graph_module(model, example_inputs, caller=caller)


def group_of_node(analysis: SpaceAnalysis, node: fx.Node, label: str) -> tuple[int, ChannelGroup]:
    """The root space and group of the channels ``node``'s layer writes.

    Raises:
        EditError: the layer writes no channel space (an activation, a pooling).
    """
    space = analysis.output_space(node)
    if space is None:
        raise EditError(
            f"{label} ({describe_node(node)}) writes no channels of its own: ask for the group of a Linear, "
            "a convolution or a per-channel layer (BatchNorm...)"
        )
    root = analysis.find(space)
    return root, build_group(analysis, root, str(node.target))


def group(
    model: nn.Module,
    index: int | str,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    rules: Mapping[Any, Any] | None = None,
) -> ChannelGroup:
    """The coupled group of the output channels of the layer at ``index``.

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        index: an execution-order index (negatives allowed) or a qualified name.
        example_inputs: a tuple of inputs, to record shapes (needed unless
            ``model`` was traced with ``example_inputs``).
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        A :class:`ChannelGroup`; ``print(group)`` shows it as a table.

    Raises:
        ShapesRequiredError: no shapes recorded and no ``example_inputs``.
        LayerIndexError / LayerNameError: no such layer.
        EditError: the layer writes no channels of its own.

    Example:
        >>> import torch, torchvision, fxindex
        >>> net = torchvision.models.resnet18()
        >>> g = fxindex.group(net, "layer1.0.conv2", (torch.randn(1, 3, 64, 64),))
        >>> g.producers
        ('conv1', 'layer1.0.conv2', 'layer1.1.conv2')
    """
    with using(rules):
        graph_module = prepare(model, example_inputs, "fxindex.group")
        try:
            layers = LayerIndex(graph_module)
            position = layers.resolve(index)
            node = layers.node(position)
            analysis = analyze(graph_module)
            return group_of_node(analysis, node, f"layer {position} ('{node.target}')")[1]
        except FxIndexError as error:
            if error.args and isinstance(error.args[0], str) and not error.args[0].startswith("fxindex.group"):
                error.args = (f"fxindex.group: {error.args[0]}",) + error.args[1:]
            raise


def groups(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    include_blocked: bool = False,
    rules: Mapping[Any, Any] | None = None,
) -> list[ChannelGroup]:
    """Every group that has a producer, once each, in the order of its first producer.

    Each is named after its first producer. Groups can overlap: the branches
    of a ``cat`` inside a residual block are groups of their own, and the
    residual stream's group reaches into them.

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        example_inputs: a tuple of inputs, to record shapes.
        include_blocked: also list the groups that cannot be resized.
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        The :class:`ChannelGroup` list.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> [(g.producers, g.width) for g in fxindex.groups(net, (torch.randn(1, 4),))]
        [(('0',), 8), (('2',), 2)]
    """
    with using(rules):
        graph_module = prepare(model, example_inputs, "fxindex.groups")
        analysis = analyze(graph_module)
        found: list[ChannelGroup] = []
        seen: set[int] = set()
        for member in analysis.members:
            if member.role != "producer" or member.node.op != "call_module":
                continue
            root = analysis.find(member.space)
            if root in seen:
                continue
            seen.add(root)
            built = build_group(analysis, root, str(member.node.target))
            if built.resizable or include_blocked:
                found.append(built)
        return found


def blocked_error_text(block: Block) -> str:
    return f"node '{block.node}' ({block.op}) {block.reason}"
