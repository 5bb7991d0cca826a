"""Channel spaces: which tensor dimensions must change width together.

Every dimension of every tensor in a traced graph (with recorded shapes)
belongs to a *space*. One topological pass over the graph asks each node's
*relation rule* (see :mod:`fxindex.rules.spaces`) how the spaces of its output
relate to those of its inputs, and records the answers in a union-find:

* **same** (union): an elementwise join or broadcast (``a + b``, ``x * gate``),
  a shape-preserving op (ReLU, pooling over other dims), a per-channel layer
  that *carries* the space (BatchNorm, LayerNorm, PReLU, depthwise conv);
* **concat**: ``cat`` along the dim builds a whole from its parts;
  ``split``/``chunk``/a ``getitem`` slice cut a whole into parts (the parts of
  ``chunk`` and of a grouped convolution must stay equal);
* **product**: ``flatten``/``view``/``reshape`` merge dims into one (the
  feature space of ``flatten(C, H, W)`` is C-major blocks of ``H*W``) or split
  one into several; a whole that is both a concat and a product has parts
  that are pieces of the outer factor times the rest (so a channel shuffle,
  ``view(b, 2, c)`` + ``transpose`` + ``view(b, 2c)`` between a ``cat`` and a
  ``chunk``, permutes slots; see :meth:`SpaceAnalysis._reconcile`);
* **fresh**: a Linear or Conv *reads* one space and *writes* a new one.

Each rule also states the node's *members*: the roles it plays for a space
(producer, consumer, carrier, parameter, join, a shape constant to rewrite)
and, for resizing, how to rebuild the node for a slot mapping. An op that has
no rule *blocks* the spaces of its inputs: they cannot be resized, and the
group says which node blocks them and why (fxindex never guesses).

The pass is linear in the number of nodes. Its result is cached per graph and
recomputed when the graph, a called module or the recorded shapes change
(the check compares one tuple per node, which is also linear but far cheaper
than the pass).
"""

from __future__ import annotations

from operator import attrgetter

import contextlib
import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import fx, nn

from fxindex._errors import EditError, PropagationError, RegistrationError, ShapesRequiredError
from fxindex._shapes import TensorMetadata, shapes_recorded

__all__ = [
    "SlotMapping",
    "Dims",
    "Member",
    "Concat",
    "Product",
    "Block",
    "NodeEdit",
    "RebuildRequest",
    "SpaceContext",
    "SpaceAnalysis",
    "register_space_rule",
    "find_space_rule",
    "space_rule_overrides",
    "space_rules_token",
    "analyze",
    "has_shapes",
    "describe_node",
    "default_mappings",
    "required_blocks",
    "whole_part_owners",
    "whole_part_widths",
]

SlotMapping = tuple[Union[int, None], ...]
"""For each new position along a dimension, the old position it carries (``None``: a new slot)."""

Dims = tuple[int, ...]
"""The space id of each dimension of one tensor."""

Value = Union[Dims, list, tuple, None]
"""What a node holds: ``Dims`` for a tensor, a list/tuple of values, ``None`` for a non-tensor."""


@dataclass(frozen=True)
class Member:
    """One role a node plays for one space.

    Attributes:
        node: the fx node.
        role: ``"producer"`` (writes the space fresh: Linear/Conv outputs),
            ``"consumer"`` (reads it and writes another: Linear/Conv inputs),
            ``"carrier"`` (per-channel weights along it: BatchNorm, PReLU,
            depthwise conv), ``"parameter"`` (a ``get_attr`` tensor along it),
            ``"join"`` (an elementwise op or ``cat`` that ties spaces),
            ``"shape"`` (a shape constant or slice bound that follows its width),
            ``"normalizer"`` (mixes values across it: LayerNorm, GroupNorm,
            softmax, a mean; new slots change old values) or ``"output"``
            (the graph returns it).
        slot: which slot of the node (``"in"``, ``"out"``, ``"channels"``,
            ``"dim1"``...), the key of the mapping its rebuild receives.
        space: the space id.
        detail: a short description for tables.
    """

    node: fx.Node
    role: str
    slot: str
    space: int
    detail: str = ""


@dataclass(frozen=True)
class Concat:
    """``whole`` is its ``parts`` side by side (``cat``, ``split``, a slice, a grouped conv's blocks).

    Attributes:
        node: the node that states the relation.
        whole: space id of the whole.
        parts: space ids of the parts, in order.
        equal: the parts must keep equal widths (``chunk``, grouped conv).
        whole_parts: with ``equal``, the number of parts may change too: a
            mapping of the whole that keeps, drops, reorders or adds whole
            parts (each new run of a part's width is one old part in order, or
            all new) goes through, as well as one that changes every part
            alike (``MultiheadAttention``'s heads: ``num_heads`` or
            ``head_dim`` changes). See :func:`whole_part_owners`.
        detail: what the parts are, for error messages (``" (the heads of
            MultiheadAttention 'attn')"``).
    """

    node: fx.Node
    whole: int
    parts: tuple[int, ...]
    equal: bool = False
    whole_parts: bool = False
    detail: str = ""


@dataclass(frozen=True)
class Product:
    """``whole`` is the row-major product of ``factors`` (``flatten``, ``view``).

    A change of the factors changes the whole (each slot of the whole is one
    combination of factor slots). A change of the whole alone (a Linear whose
    output a ``view`` splits into ``(heads, head_dim)``) goes through when it
    keeps, drops or adds whole blocks of the inner factors, or changes every
    block alike; anything else cuts through a block and is an ``EditError``.

    Attributes:
        node: the node that states the relation.
        whole: space id of the merged dimension.
        factors: space ids of the merged dimensions, outermost first.
        detail: what the split means, for error messages (grouped-query attention).
    """

    node: fx.Node
    whole: int
    factors: tuple[int, ...]
    detail: str = ""


Relation = Union[Concat, Product]


@dataclass(frozen=True)
class Block:
    """Why a space cannot be resized.

    Attributes:
        node: name of the fx node that blocks it.
        op: what the node does (``call_module attn``, ``torch.roll``...).
        reason: why.
    """

    node: str
    op: str
    reason: str


@dataclass
class NodeEdit:
    """What a rebuild decided for one node.

    Attributes:
        module: a rebuilt module to call instead of the old one.
        args: rewritten positional arguments (``None`` keeps them).
        kwargs: rewritten keyword arguments (``None`` keeps them).
        tensor: the new value of a ``get_attr`` parameter or buffer.
        weights: a short account of which weights were kept, sliced or new.
        reason: why new slots alter old values here (the edit is then not
            function-preserving), or ``None`` when they do not.
    """

    module: nn.Module | None = None
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    tensor: torch.Tensor | None = None
    weights: str = ""
    reason: str | None = None

    @property
    def preserves_function(self) -> bool:
        """Whether old slots keep their values here: derived from ``reason``."""
        return self.reason is None


@dataclass
class RebuildRequest:
    """What a rebuild sees: one node and the new slot mapping of each of its changed slots.

    Attributes:
        node: the node to rebuild.
        module: its module (``call_module``), else ``None``.
        value: the tensor a ``get_attr`` node reads, else ``None``.
        mappings: slot name -> mapping, for the slots whose space changes.
        old_widths: slot name -> old width, for every slot of the node.
        analysis: the analysis the request comes from (rules keep hints there).
    """

    node: fx.Node
    module: nn.Module | None
    value: Any
    mappings: dict[str, SlotMapping]
    old_widths: dict[str, int]
    analysis: Any = None

    def changed(self, slot: str) -> bool:
        """Whether ``slot``'s space changes."""
        return slot in self.mappings

    def mapping(self, slot: str) -> SlotMapping:
        """The mapping of ``slot``: its change, or the identity of its old width."""
        if slot in self.mappings:
            return self.mappings[slot]
        return tuple(range(self.old_widths[slot]))

    def width(self, slot: str) -> int:
        """The new width of ``slot``."""
        return len(self.mapping(slot))


Rebuilder = Callable[[RebuildRequest], NodeEdit]


def describe_node(node: fx.Node) -> str:
    """A short human name of what a node does: ``call_module layer1.0.conv1``, ``operator.add``."""
    from fxindex.rules.registry import describe_target

    return describe_target(node)


# ------------------------------------------------------------------------------- the registry

RelationRule = Callable[["SpaceContext"], None]
_SPACE_RULES: dict[Any, RelationRule] = {}
# Bumped by every registration: an analysis cached before a new rule existed is not reused.
_REGISTRATIONS = [0]
# Rules in effect through fxindex.rules.using (innermost block last), per thread.
_SPACE_OVERRIDES = threading.local()


def _space_frames() -> list[dict[Any, RelationRule]]:
    frames = getattr(_SPACE_OVERRIDES, "frames", None)
    if frames is None:
        frames = _SPACE_OVERRIDES.frames = []
    return frames


@contextlib.contextmanager
def space_rule_overrides(rules: Mapping[Any, RelationRule]) -> Iterator[None]:
    """Put relation rules in effect for the ``with`` block, before the registered ones (this thread only).

    Use :func:`fxindex.rules.using`, which takes both kinds of rule; this is its channel-space half.

    Args:
        rules: ``{key: rule}``, keys as for :func:`register_space_rule`.
    """
    frames = _space_frames()
    frames.append(dict(rules))
    try:
        yield
    finally:
        frames.pop()


def space_rules_token() -> tuple[Any, ...]:
    """What the relation rules in effect are, as a value to compare: cached analyses depend on it.

    Returns:
        The number of registrations so far and the rules put in effect by
        :func:`fxindex.rules.using` blocks (keys and rule objects), innermost last.
    """
    return (_REGISTRATIONS[0], tuple(tuple(frame.items()) for frame in _space_frames() if frame))


def has_space_rule_for_class(cls: type) -> bool:
    """Whether ``cls`` itself (not a base) has a relation rule, registered or in effect."""
    return cls in _SPACE_RULES or any(cls in frame for frame in _space_frames())


def is_registered_space_rule(rule: Any) -> bool:
    """Whether ``rule`` is registered as a relation rule (for any key)."""
    return any(value is rule for value in _SPACE_RULES.values())


def register_space_rule(*keys: type | Callable[..., Any] | str, replace: bool = False) -> Callable[[RelationRule], RelationRule]:
    """Register the relation rule of module types, functions or method names.

    Looked up like the propagation rules: a module type along the MRO (so
    subclasses of torch.nn layers inherit their rule), a function by identity
    (``torch.cat``, ``operator.add``), a method by name (``"view"``). A
    module class with a rule is traced as one layer (a leaf) by default, so
    ``@register_space_rule(MyLayer)`` alone lets ``group``, ``resize`` and a
    coupled ``replace`` resize ``MyLayer``'s weights.

    Args:
        *keys: module classes, callables or method names.
        replace: allow overriding an existing rule (refused by default).

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        TypeError: no keys, or a key that is none of these.
        RegistrationError: a key already has a rule and ``replace`` is false.
    """
    if not keys:
        raise TypeError("register_space_rule needs at least one module type, function or method name")

    def decorate(rule: RelationRule) -> RelationRule:
        for key in keys:
            if not (isinstance(key, str) or callable(key)):
                raise TypeError(f"a space rule key is a module type, a function or a method name, got {key!r}")
            if key in _SPACE_RULES and not replace:
                name = key if isinstance(key, str) else getattr(key, "__qualname__", repr(key))
                raise RegistrationError(
                    f"a space rule for {name} is already registered ({_SPACE_RULES[key].__name__}); "
                    "pass replace=True to override it"
                )
            _SPACE_RULES[key] = rule
        _REGISTRATIONS[0] += 1
        return rule

    return decorate


def find_space_rule(node: fx.Node, module: nn.Module | None) -> RelationRule | None:
    """The relation rule of ``node``: by its module's MRO, its function or its method name.

    Rules in effect through :func:`fxindex.rules.using` come first (the
    innermost block's first), then the registered ones.

    Args:
        node: the node of the pass.
        module: its module for a ``call_module`` node, else ``None``.

    Returns:
        The rule, or ``None`` when there is none (the node then blocks what it reads).
    """
    from fxindex.rules.registry import lookup_rule

    return lookup_rule((*reversed(_space_frames()), _SPACE_RULES), node, module)


# ------------------------------------------------------------------------------- the context


class SpaceContext:
    """What a relation rule sees and how it states relations: one node of the pass.

    A rule reads its inputs' dims with :meth:`dims`, creates spaces with
    :meth:`fresh`, relates them with :meth:`same`, :meth:`concat` and
    :meth:`product`, names its roles with :meth:`member` and finally sets the
    node's own dims with :meth:`output`. Anything it cannot relate, it
    :meth:`block`\\ s.
    """

    def __init__(self, analysis: SpaceAnalysis, node: fx.Node, module: nn.Module | None):
        self.analysis = analysis
        self.node = node
        self.module = module
        self._output: Value = None
        self._output_set = False

    # -- reading -----------------------------------------------------------------------
    def value(self, argument: Any) -> Value:
        """What an argument holds: dims for a tensor node, nested for tuples, ``None`` otherwise."""
        if isinstance(argument, fx.Node):
            return self.analysis.values.get(argument)
        return None

    def dims(self, argument: Any) -> Dims | None:
        """The dims of a tensor argument, or ``None`` when it is not one tensor."""
        value = self.value(argument)
        if isinstance(value, tuple) and all(isinstance(item, int) for item in value):
            return value
        return None

    def shape(self, argument: Any) -> tuple[int, ...] | None:
        """The recorded shape of a tensor node (``self.node`` for the node itself)."""
        if isinstance(argument, fx.Node):
            meta = argument.meta.get("tensor_meta")
            if isinstance(meta, TensorMetadata):
                return tuple(int(size) for size in meta.shape)
        return None

    def width(self, space: int) -> int:
        return self.analysis.width(space)

    @property
    def op(self) -> str:
        return describe_node(self.node)

    # -- relating ----------------------------------------------------------------------
    def fresh(self, size: int) -> int:
        """A new space of width ``size``."""
        return self.analysis.new_space(size)

    def fresh_dims(self, shape: Sequence[int]) -> Dims:
        return tuple(self.fresh(int(size)) for size in shape)

    def same(self, first: int, second: int) -> None:
        """``first`` and ``second`` are one space (they must have the same width)."""
        self.analysis.unify(first, second, self.node)

    def concat(
        self, whole: int, parts: Sequence[int], *, equal: bool = False, whole_parts: bool = False, detail: str = ""
    ) -> None:
        """``whole`` is ``parts`` side by side (widths must add up).

        Args:
            whole: the whole space.
            parts: its parts, in order.
            equal: the parts must keep equal widths.
            whole_parts: with ``equal``, whole parts may also be kept, dropped or
                added (see :class:`Concat`).
            detail: what the parts are, said when a resize cuts through one.
        """
        parts = tuple(parts)
        if sum(self.width(part) for part in parts) != self.width(whole):
            self.block([whole, *parts], "the parts' widths do not add up to the whole's")
            return
        self.analysis.relate_concat(self.node, whole, parts, equal=equal, whole_parts=whole_parts, detail=detail)

    def product(self, whole: int, factors: Sequence[int], *, detail: str = "") -> None:
        """``whole`` is the row-major product of ``factors`` (widths must multiply up).

        Args:
            whole: the merged space.
            factors: the merged spaces, outermost first.
            detail: what the split means, said when a resize cuts through its blocks.
        """
        factors = tuple(factors)
        if math.prod(self.width(f) for f in factors) != self.width(whole):
            self.block([whole, *factors], "the merged widths do not multiply up to the result's")
            return
        self.analysis.relate_product(self.node, whole, factors, detail=detail)

    def member(self, role: str, slot: str, space: int, detail: str = "", rebuild: Rebuilder | None = None) -> None:
        """Record that this node plays ``role`` for ``space`` through ``slot``.

        Args:
            role: see :class:`Member`.
            slot: the key under which the rebuild receives this space's mapping.
            space: the space id.
            detail: a short description for the group's table.
            rebuild: how to rebuild this node for new mappings (one per node:
                every slot of a node shares it).
        """
        self.analysis.add_member(Member(self.node, role, slot, space, detail), rebuild)

    def block(self, spaces: Iterable[int] | int, reason: str) -> None:
        """Mark spaces as not resizable because of this node."""
        if isinstance(spaces, int):
            spaces = [spaces]
        for space in spaces:
            self.analysis.block(space, Block(self.node.name, self.op, reason))

    def block_inputs(self, reason: str) -> None:
        """Block every dim of every tensor input (an op fxindex cannot relate)."""
        for argument in self.node.all_input_nodes:
            for space in _flat_spaces(self.value(argument)):
                self.analysis.block(space, Block(self.node.name, self.op, reason))

    def output(self, value: Value) -> None:
        """Set what this node holds."""
        self._output = value
        self._output_set = True

    def output_fresh(self) -> Value:
        """Fresh spaces for every tensor the node returns (from its recorded shapes)."""
        return self.analysis.fresh_value(self.node.meta.get("tensor_meta"))


def _flat_spaces(value: Value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, tuple) and all(isinstance(item, int) for item in value):
        return list(value)
    spaces: list[int] = []
    for item in value:
        spaces.extend(_flat_spaces(item))
    return spaces


# ------------------------------------------------------------------------------- the analysis


def has_shapes(graph_module: fx.GraphModule) -> bool:
    """Whether shapes are recorded: every placeholder carries ``tensor_meta`` or was not given.

    A placeholder marked ``fxindex_not_given`` (see
    :func:`fxindex._shapes.shapes_recorded`) is an optional argument that the
    example inputs left out (not a tensor); a graph with no placeholder at all
    counts as recorded.

    Args:
        graph_module: a traced module.

    Returns:
        True when the analysis has every input shape it needs.
    """
    return shapes_recorded(graph_module.graph)


class SpaceAnalysis:
    """The channel spaces of one graph: a union-find, relations and members.

    Build it with :func:`analyze`. Space ids are ints; :meth:`find` gives a
    space's class (its root). Read-only once built.

    Attributes:
        graph_module: the analysed module.
        values: node -> what it holds (:data:`Value`).
        members: every :class:`Member`, in graph order.
        relations: every :class:`Concat` and :class:`Product`.
        rebuilders: node -> its rebuild function.
    """

    def __init__(self, graph_module: fx.GraphModule):
        self.graph_module = graph_module
        self._parent: list[int] = []
        self._width: list[int] = []
        self._rank: list[int] = []
        self._blocks: dict[int, Block] = {}
        self.values: dict[fx.Node, Value] = {}
        self.members: list[Member] = []
        self.relations: list[Relation] = []
        self.rebuilders: dict[fx.Node, Rebuilder] = {}
        # Values for new slots of get_attr tensors, set by the functional layer reading them.
        self.fills: dict[fx.Node, float] = {}
        self._members_by_root: dict[int, list[Member]] | None = None
        self._members_by_node: dict[fx.Node, list[Member]] | None = None
        self._relations_by_root: dict[int, list[int]] | None = None

    # -- union-find --------------------------------------------------------------------
    def new_space(self, width: int) -> int:
        self._parent.append(len(self._parent))
        self._width.append(int(width))
        self._rank.append(0)
        return len(self._parent) - 1

    def find(self, space: int) -> int:
        """The root of ``space``'s class (path halving: near-constant amortised)."""
        parent = self._parent
        while parent[space] != space:
            parent[space] = parent[parent[space]]
            space = parent[space]
        return space

    def width(self, space: int) -> int:
        return self._width[self.find(space)]

    def unify(self, first: int, second: int, node: fx.Node) -> None:
        a, b = self.find(first), self.find(second)
        if a == b:
            return
        if self._width[a] != self._width[b]:
            # A rule asked to tie spaces of different widths: never guess, block both.
            block = Block(node.name, describe_node(node), f"ties widths {self._width[a]} and {self._width[b]}")
            self.block(a, block)
            self.block(b, block)
            return
        if self._rank[a] < self._rank[b]:
            a, b = b, a
        self._parent[b] = a
        if self._rank[a] == self._rank[b]:
            self._rank[a] += 1
        if b in self._blocks:
            self._blocks.setdefault(a, self._blocks.pop(b))

    def block(self, space: int, block: Block) -> None:
        self._blocks.setdefault(self.find(space), block)

    def blocked(self, space: int) -> Block | None:
        """Why ``space``'s class cannot be resized, or ``None``."""
        return self._blocks.get(self.find(space))

    # -- recording ---------------------------------------------------------------------
    def add_relation(self, relation: Relation) -> None:
        self.relations.append(relation)

    def relate_concat(
        self,
        node: fx.Node,
        whole: int,
        parts: Sequence[int],
        *,
        equal: bool = False,
        whole_parts: bool = False,
        detail: str = "",
    ) -> None:
        """Record that ``whole`` is ``parts`` side by side (the widths are known to add up)."""
        parts = tuple(parts)
        if len(parts) == 1 and not equal:
            self.unify(whole, parts[0], node)
            return
        self.add_relation(Concat(node, whole, parts, equal, whole_parts and equal, detail))

    def relate_product(self, node: fx.Node, whole: int, factors: Sequence[int], *, detail: str = "") -> None:
        """Record that ``whole`` is the row-major product of ``factors`` (the widths are known to multiply up)."""
        factors = tuple(factors)
        wide = [f for f in factors if self.width(f) != 1]
        if len(wide) <= 1:
            # Only one factor wider than 1: the merge is the identity on it.
            if wide:
                self.unify(whole, wide[0], node)
            return
        self.add_relation(Product(node, whole, factors, detail))

    def add_member(self, member: Member, rebuild: Rebuilder | None) -> None:
        self.members.append(member)
        if rebuild is not None:
            self.rebuilders.setdefault(member.node, rebuild)

    def fresh_value(self, meta: Any) -> Value:
        if isinstance(meta, TensorMetadata):
            return tuple(self.new_space(int(size)) for size in meta.shape)
        if isinstance(meta, (tuple, list)):
            return [self.fresh_value(item) for item in meta]
        return None

    # -- the pass ----------------------------------------------------------------------
    def run(self) -> SpaceAnalysis:
        modules = dict(self.graph_module.named_modules())
        for node in self.graph_module.graph.nodes:
            module = modules.get(node.target) if node.op == "call_module" else None
            context = SpaceContext(self, node, module)
            rule = find_space_rule(node, module)
            if node.op in ("placeholder", "get_attr", "output"):
                rule = _STRUCTURAL[node.op]
            if rule is None:
                _no_rule(context)
            else:
                rule(context)
            if not context._output_set:
                context.output(context.output_fresh())
            self.values[node] = context._output
        self._reconcile()
        self._index()
        return self

    def _reconcile(self) -> None:
        """Relate the concats and products of one whole: parts that are whole blocks of the outer factor.

        A whole that is both its parts side by side and a product ``outer x
        rest`` whose parts each span whole rows of ``rest`` is cut along
        ``outer``: part ``j`` is (piece ``j`` of ``outer``) x ``rest``. This is
        what a channel shuffle needs, stated once for every such pair:
        ``cat([a, b]).view(n, 2, c, h, w)`` makes ``a`` and ``b`` the two rows of
        the product, so each *is* the inner factor (the two halves must change
        alike); ``view(n, c, 2, ...) -> view(n, 2c, ...)`` followed by
        ``chunk(2)`` cuts ``c`` in two equal halves and each chunk is (its half
        of ``c``) x 2. Then a slot mapping travels through the shuffle like
        through any other product: the channels are permuted, not mixed.

        The new relations can pair up again (the next block's shuffle reads
        the chunk), so pairs are looked for until none is new; each round is
        linear in the number of relations and each pair is used once.
        """
        done: set[tuple[int, int]] = set()
        for _ in range(64):  # each round cuts an outer factor into smaller pieces: few rounds are ever needed
            by_whole: dict[int, tuple[list[int], list[int]]] = {}
            for position, relation in enumerate(self.relations):
                entry = by_whole.setdefault(self.find(relation.whole), ([], []))
                (entry[0] if isinstance(relation, Concat) else entry[1]).append(position)
            progress = False
            for concats, products in by_whole.values():
                for concat_at in concats:
                    for product_at in products:
                        if (concat_at, product_at) in done:
                            continue
                        done.add((concat_at, product_at))
                        concat, product = self.relations[concat_at], self.relations[product_at]
                        assert isinstance(concat, Concat) and isinstance(product, Product)
                        progress |= self._cut_product(concat, product)
            if not progress:
                return

    def _cut_product(self, concat: Concat, product: Product) -> bool:
        """State each part of ``concat`` as a piece of ``product``'s outer factor times the rest; whether it did."""
        factors = list(product.factors)
        while factors and self.width(factors[0]) == 1:
            factors.pop(0)
        if len(factors) < 2:
            return False
        outer, rest = factors[0], factors[1:]
        row = math.prod(self.width(factor) for factor in rest)
        widths = [self.width(part) for part in concat.parts]
        if any(width % row for width in widths) or sum(widths) // row != self.width(outer):
            return False
        pieces = [self.new_space(width // row) for width in widths]
        self.relate_concat(concat.node, outer, pieces, equal=concat.equal)
        for part, piece in zip(concat.parts, pieces):
            self.relate_product(product.node, part, (piece, *rest), detail=product.detail)
        return True

    def _index(self) -> None:
        members: dict[int, list[Member]] = defaultdict(list)
        for member in self.members:
            members[self.find(member.space)].append(member)
        relations: dict[int, list[int]] = defaultdict(list)
        for position, relation in enumerate(self.relations):
            spaces = (relation.whole, *(relation.parts if isinstance(relation, Concat) else relation.factors))
            for root in dict.fromkeys(self.find(space) for space in spaces):
                relations[root].append(position)
        self._members_by_root = dict(members)
        self._relations_by_root = dict(relations)

    # -- queries -----------------------------------------------------------------------
    def members_of(self, root: int) -> list[Member]:
        assert self._members_by_root is not None
        return self._members_by_root.get(root, [])

    def relations_of(self, root: int) -> list[Relation]:
        assert self._relations_by_root is not None
        return [self.relations[i] for i in self._relations_by_root.get(root, [])]

    def output_space(self, node: fx.Node) -> int | None:
        """The space a layer writes its channels into: its producer or carrier slot."""
        for role in ("producer", "carrier"):
            for member in self._node_members(node):
                if member.role == role:
                    return member.space
        return None

    def _node_members(self, node: fx.Node) -> list[Member]:
        if self._members_by_node is None:
            index: dict[fx.Node, list[Member]] = defaultdict(list)
            for member in self.members:
                index[member.node].append(member)
            self._members_by_node = dict(index)
        return self._members_by_node.get(node, [])

    def node_members(self, node: fx.Node) -> list[Member]:
        """Every member record of ``node``."""
        return list(self._node_members(node))

    def closure(self, root: int) -> tuple[list[int], Block | None]:
        """The classes that may change when ``root``'s class changes, and what blocks them.

        A part's change changes its whole (but not the whole's other parts);
        a whole changed otherwise may change every part. A merged (product)
        dimension follows its factors; a whole changed otherwise may change
        its factors (a resize of a Linear whose output a ``view`` splits into
        ``(heads, head_dim)`` changes the heads, or every head's width).

        Which factor changes depends on the resize itself, so the classes
        reached through such a split are *conditional*: they are listed, but a
        block among them does not block the group (removing heads must not be
        refused because the rotary embedding along ``head_dim`` has no rule);
        :func:`solve` and the resize plan refuse a change that really reaches
        a blocked class.

        Returns:
            The roots in visiting order (``root`` first) and the first block
            found among the classes that change whatever the resize.
        """
        root = self.find(root)
        order: list[int] = []
        excluded: dict[int, frozenset[int]] = {}
        definite: set[int] = set()
        queue: deque[tuple[int, int | None, bool]] = deque([(root, None, True)])
        while queue:
            current, via, certain = queue.popleft()
            exclude = frozenset() if via is None else frozenset({via})
            if current in excluded:
                previous = excluded[current]
                narrowed = previous & exclude
                # Visit again when fewer relations are excluded, or when a class reached only
                # through a split is now reached for certain (its own reach becomes certain too).
                if narrowed == previous and (current in definite or not certain):
                    continue
                excluded[current] = narrowed
            else:
                excluded[current] = exclude
                order.append(current)
            if certain:
                definite.add(current)
            certain = current in definite
            assert self._relations_by_root is not None
            for position in self._relations_by_root.get(current, []):
                if position in exclude:
                    continue
                relation = self.relations[position]
                whole = self.find(relation.whole)
                if isinstance(relation, Concat):
                    parts = [self.find(part) for part in relation.parts]
                    if current in parts and current != whole:
                        queue.append((whole, position, certain))
                    else:
                        queue.extend((part, position, certain) for part in parts)
                elif current != whole:
                    queue.append((whole, position, certain))
                else:
                    # The whole of a split: its factors change only as the resize decides.
                    queue.extend((self.find(factor), position, False) for factor in relation.factors)
        block = None
        for current in order:
            if current in definite:
                block = self.blocked(current)
                if block is not None:
                    break
        return order, block


def _no_rule(context: SpaceContext) -> None:
    """An op without a relation rule: block what it reads, write fresh spaces."""
    fresh = context.output_fresh()
    if any(_flat_spaces(context.value(argument)) for argument in context.node.all_input_nodes):
        what = "module type " + type(context.module).__name__ if context.module is not None else context.op
        reason = f"no channel-space rule for {what}; teach fxindex with fxindex.register_space_rule"
        context.block_inputs(reason)
        # Its outputs too: they may carry the inputs' channels (T5's position bias through an
        # unknown where), and a space joined to them downstream must not be resized without them.
        context.block(_flat_spaces(fresh), reason)
    context.output(fresh)


_STRUCTURAL: dict[str, RelationRule] = {}


def _structural(op: str) -> Callable[[RelationRule], RelationRule]:
    def decorate(rule: RelationRule) -> RelationRule:
        _STRUCTURAL[op] = rule
        return rule

    return decorate


@_structural("placeholder")
def _placeholder(context: SpaceContext) -> None:
    context.output(context.output_fresh())


@_structural("output")
def _output(context: SpaceContext) -> None:
    for argument in context.node.all_input_nodes:
        for space in _flat_spaces(context.value(argument)):
            context.member("output", f"{argument.name}", space, "the model returns it")
    context.output(None)


@_structural("get_attr")
def _get_attr(context: SpaceContext) -> None:
    # The parameter's own rule lives with the other rules (it rebuilds the tensor).
    from fxindex.rules.spaces import relate_get_attr

    relate_get_attr(context)


# ------------------------------------------------------------------------------- caching

# The cache lives on the Graph object itself: a WeakKeyDictionary keyed by the graph would never
# free it, since the cached fingerprint holds the graph's nodes and they hold the graph.
# Deep copies and unpickled modules get new Graph objects, so they start without it.
_CACHE_ATTRIBUTE = "_fxindex_spaces"


def _fingerprint(graph_module: fx.GraphModule) -> list[tuple[Any, ...]]:
    """What the analysis depends on, per node: the node, its target and arguments, shapes, the called module or tensor."""
    fingerprint: list[tuple[Any, ...]] = [(id(graph_module), space_rules_token())]
    for node in graph_module.graph.nodes:
        held: Any = None
        if node.op in ("call_module", "get_attr"):
            try:
                held = id(attrgetter(str(node.target))(graph_module))
            except AttributeError:
                held = None
        fingerprint.append((node, node.op, node.target, node.args, node.kwargs, id(node.meta.get("tensor_meta")), held))
    return fingerprint


def analyze(graph_module: fx.GraphModule) -> SpaceAnalysis:
    """The channel spaces of ``graph_module``'s graph (cached until the graph changes).

    The cache is kept on the graph and checked against one tuple per node
    (the node, its target and arguments, its recorded shapes, the module or
    tensor it reads), so an edit, a swapped layer or new shapes recompute
    it. Changing a layer's attributes in place (``conv.groups = 2``) is not
    seen: call :func:`SpaceAnalysis` ``(gm).run()`` directly after that.

    Args:
        graph_module: a traced module with recorded shapes.

    Returns:
        The :class:`SpaceAnalysis`.

    Raises:
        ShapesRequiredError: no shapes are recorded.
    """
    if not has_shapes(graph_module):
        raise ShapesRequiredError(
            "channel groups need tensor shapes: pass example_inputs=(...), or trace with "
            "fxindex.trace(model, example_inputs=...)"
        )
    import fxindex.rules.spaces  # noqa: F401  (registers the relation rules)

    fingerprint = _fingerprint(graph_module)
    graph = graph_module.graph
    cached = getattr(graph, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    analysis = SpaceAnalysis(graph_module).run()
    setattr(graph, _CACHE_ATTRIBUTE, (fingerprint, analysis))
    return analysis


# ------------------------------------------------------------------------------- slot mappings


def identity(width: int) -> SlotMapping:
    return tuple(range(width))


def is_identity(mapping: SlotMapping, width: int) -> bool:
    return len(mapping) == width and all(slot == position for position, slot in enumerate(mapping))


def equal_blocks_of(analysis: SpaceAnalysis, root: int) -> int:
    """The number of equal blocks ``root``'s class must keep (1 when none).

    Its own equal splits (a grouped convolution, GroupNorm, chunk) and those
    that reach it through other relations: the parts of an equal split that
    must themselves keep ``j`` blocks make ``k * j`` blocks of the whole, and
    a product ``outer x rest`` keeps the blocks of ``outer`` (and passes its
    own blocks to ``outer`` when they divide it). A channel shuffle chains
    these: a stream that a later block chunks after one shuffle must keep 2
    blocks, after two shuffles 4, and so on. See :func:`required_blocks`.
    """
    return required_blocks(analysis).get(analysis.find(root), 1)


def required_blocks(analysis: SpaceAnalysis) -> dict[int, int]:
    """Root -> the number of equal blocks its class must keep, for every class that must keep more than 1.

    A fixpoint over the relations, computed once per analysis (a worklist:
    each class's count only grows, by a factor of at least 2, and never past
    its width, so the work is the number of relations times a logarithm).
    A count that would not divide the class's width is not imposed: the
    solver then refuses the resize that breaks it, naming the node.
    """
    cached = getattr(analysis, "_required_blocks", None)
    if cached is not None:
        return cached
    find, width = analysis.find, analysis.width
    blocks: dict[int, int] = {}
    queue: deque[int] = deque()

    def raise_to(space: int, count: int) -> None:
        root = find(space)
        new = math.lcm(blocks.get(root, 1), count)
        if new == blocks.get(root, 1) or width(root) % new:
            return
        blocks[root] = new
        queue.append(root)

    def relate(relation: Relation) -> None:
        if isinstance(relation, Concat):
            if not relation.equal:
                return
            count = len(relation.parts)
            raise_to(relation.whole, count)
            for part in relation.parts:
                raise_to(relation.whole, count * blocks.get(find(part), 1))
            whole = blocks.get(find(relation.whole), 1)
            if whole % count == 0:
                for part in relation.parts:
                    raise_to(part, whole // count)
            return
        wide = [factor for factor in relation.factors if width(factor) != 1]
        if not wide:
            return
        outer = wide[0]
        raise_to(relation.whole, blocks.get(find(outer), 1))
        if width(outer) % blocks.get(find(relation.whole), 1) == 0:
            raise_to(outer, blocks.get(find(relation.whole), 1))

    for relation in analysis.relations:
        relate(relation)
    while queue:
        for relation in analysis.relations_of(queue.popleft()):
            relate(relation)
    analysis._required_blocks = blocks  # type: ignore[attr-defined]
    return blocks


def default_mapping(old: int, new: int, blocks: int = 1) -> SlotMapping:
    """Widening appends new slots, narrowing keeps the first ones; per block when ``blocks > 1``."""
    if blocks == 1:
        return tuple(j if j < old else None for j in range(new))
    old_block, new_block = old // blocks, new // blocks
    return tuple(
        b * old_block + j if j < old_block else None for b in range(blocks) for j in range(new_block)
    )


def whole_part_widths(analysis: SpaceAnalysis, root: int) -> list[int]:
    """The part widths of the concats of ``root``'s class whose part count may change (``whole_parts``).

    ``nn.MultiheadAttention``'s heads: a width that is a whole number of such
    parts may be reached by keeping, dropping or adding parts, whatever the
    class's equal-blocks count.
    """
    root = analysis.find(root)
    return [
        analysis.width(relation.parts[0])
        for relation in analysis.relations_of(root)
        if isinstance(relation, Concat) and relation.whole_parts and analysis.find(relation.whole) == root
    ]


def default_mappings(analysis: SpaceAnalysis, root: int, new: int) -> list[SlotMapping]:
    """The mappings a resize of ``root``'s class to width ``new`` may use when no ``keep=`` is given, best first.

    New slots go where the class's structure has room for them:

    * split into whole parts that may come and go (``MultiheadAttention``'s
      heads), by a multiple of a part's width: whole parts appended at the
      end (or the last ones dropped), before the per-block mapping below;
    * split into equal blocks (a grouped convolution, GroupNorm, chunk, a
      channel shuffle's halves): at the end of every block;
    * a product (a Linear whose output a ``view`` splits into ``(3, heads,
      head_dim)`` or ``(heads, head_dim)``): one factor changes and the
      others keep their width, outermost first: a new head in each of q, k
      and v before a wider head_dim in every head, never a fourth of q/k/v
      when the ``3`` cannot change (the solver and the blocks decide that);
    * otherwise, or when none of those fits: at the end (the error then says
      why the structure refuses it).

    Args:
        analysis: the analysis of the graph.
        root: the class to resize.
        new: its new width.

    Returns:
        Candidate mappings, each of width ``new``, in the order to try them;
        the plain default (new slots at the end, or the first channels kept)
        is always one of them (in its place when it is also a structured
        one: a whole head appended at the end), else the last.
    """
    root = analysis.find(root)
    old = analysis.width(root)
    blocks = equal_blocks_of(analysis, root)
    candidates: list[SlotMapping] = []
    # Whole parts first (MultiheadAttention's heads): a new head keeps the function, a wider one does not.
    if any(new % size == 0 for size in whole_part_widths(analysis, root)):
        candidates.append(default_mapping(old, new))
    if blocks > 1 and old % blocks == 0 and new % blocks == 0:
        candidates.append(default_mapping(old, new, blocks))
    for relation in analysis.relations_of(root):
        if not isinstance(relation, Product) or analysis.find(relation.whole) != root:
            continue
        widths = [analysis.width(factor) for factor in relation.factors]
        for position, size in enumerate(widths):
            if size == 1:
                continue
            outer, inner = math.prod(widths[:position]), math.prod(widths[position + 1 :])
            if new % (outer * inner):
                continue
            changed = default_mapping(size, new // (outer * inner))
            mapping = tuple(
                None if slot is None else (o * size + slot) * inner + i
                for o in range(outer)
                for slot in changed
                for i in range(inner)
            )
            if mapping not in candidates:
                candidates.append(mapping)
    plain = default_mapping(old, new, blocks if blocks > 1 and old % blocks == 0 and new % blocks == 0 else 1)
    if plain not in candidates:
        candidates.append(plain)
    return candidates


def whole_part_owners(mapping: SlotMapping, size: int, count: int) -> tuple[int | None, ...] | None:
    """The old part each run of ``size`` new slots is, when ``mapping`` keeps, drops or adds whole parts only.

    Each run of ``size`` consecutive new slots must be one old part's slots in
    order (``p * size`` to ``p * size + size - 1``) or all new; each old part
    is used at most once. This is how a :class:`Concat` with ``whole_parts``
    changes its number of parts (``MultiheadAttention``: heads kept, dropped
    or added; ``num_heads`` changes, ``head_dim`` stays).

    Args:
        mapping: the whole's new mapping.
        size: the width of one part.
        count: the old number of parts.

    Returns:
        For each new part, the old part it is (``None``: a new part), or
        ``None`` when ``mapping`` is not made of whole parts.

    >>> whole_part_owners((0, 1, 4, 5, None, None), 2, 3)
    (0, 2, None)
    >>> whole_part_owners((1, 2, 3, 4), 2, 3) is None
    True
    """
    if not mapping or size <= 0 or len(mapping) % size:
        return None
    owners: list[int | None] = []
    for start in range(0, len(mapping), size):
        run = mapping[start : start + size]
        if all(slot is None for slot in run):
            owners.append(None)
            continue
        first = run[0]
        if first is None or first % size or first // size >= count or first // size in owners:
            return None
        if any(slot != first + j for j, slot in enumerate(run)):
            return None
        owners.append(first // size)
    return tuple(owners)


def widths_that_work(old: int, blocks: int) -> str:
    examples = [old + k * blocks for k in (-2, -1, 1, 2) if old + k * blocks > 0]
    return f"a multiple of {blocks} (e.g. {', '.join(map(str, examples))})"


class _Solver:
    """Propagates one class's new mapping through concat and product relations."""

    def __init__(self, analysis: SpaceAnalysis):
        self.analysis = analysis
        self.maps: dict[int, SlotMapping] = {}

    def known(self, space: int) -> SlotMapping | None:
        return self.maps.get(self.analysis.find(space))

    def current(self, space: int) -> SlotMapping:
        mapping = self.known(space)
        return mapping if mapping is not None else identity(self.analysis.width(space))

    def solve(self, root: int, mapping: SlotMapping) -> dict[int, SlotMapping]:
        root = self.analysis.find(root)
        self.maps[root] = mapping
        queue = deque([root])
        # Relations that could only be derived by assuming their unknown spaces unchanged. They wait
        # until nothing else is left: another path may still decide those spaces (the other half of
        # a chunk reached through a channel shuffle), and a guess made first would then conflict.
        deferred: deque[Relation] = deque()
        while queue or deferred:
            if queue:
                current = queue.popleft()
                work = [(relation, False) for relation in self.analysis.relations_of(current)]
            else:
                work = [(deferred.popleft(), True)]
            for relation, guess in work:
                derived = self.derive(relation, guess)
                if derived is None:
                    deferred.append(relation)
                    continue
                for space, new in derived.items():
                    target = self.analysis.find(space)
                    if target in self.maps:
                        if self.maps[target] != new:
                            raise PropagationError(
                                f"node '{relation.node.name}' ({describe_node(relation.node)}) would need two different "
                                f"slot mappings for one space of width {self.analysis.width(target)}: the resize is "
                                "not consistent across it (a chunk whose halves are joined, or keep= that differs "
                                "between blocks)",
                                relation.node.name,
                            )
                        continue
                    self.maps[target] = new
                    # An unchanged class is remembered (to catch a later conflict) but not followed.
                    if not is_identity(new, self.analysis.width(target)):
                        queue.append(target)
        return {
            root: mapping
            for root, mapping in self.maps.items()
            if not is_identity(mapping, self.analysis.width(root))
        }

    def derive(self, relation: Relation, guess: bool = True) -> dict[int, SlotMapping] | None:
        """The mappings ``relation`` implies; ``None`` when that needs a guess and ``guess`` is false."""
        if isinstance(relation, Concat):
            return self.derive_concat(relation, guess)
        return self.derive_product(relation, guess)

    def derive_concat(self, relation: Concat, guess: bool = True) -> dict[int, SlotMapping] | None:
        whole = self.known(relation.whole)
        if whole is not None:
            return self.decompose(relation, whole)
        known = [self.known(part) for part in relation.parts]
        if all(mapping is None for mapping in known):
            return {}
        if any(mapping is None for mapping in known):
            if not guess:
                return None
            if relation.equal:
                # Equal parts stay equal: a part with no change of its own takes the changed part's
                # (a chunk's other half, when one half is tied to a resized stream).
                changed = [mapping for mapping in known if mapping is not None]
                if len({len(mapping) for mapping in changed}) > 1:
                    raise EditError(
                        f"node '{relation.node.name}' ({describe_node(relation.node)}) splits a width of "
                        f"{self.analysis.width(relation.whole)} into {len(relation.parts)} equal blocks: the resize "
                        f"would make them {sorted({len(mapping) for mapping in changed})} wide; every block must "
                        "keep the same width"
                    )
                known = [changed[0] if mapping is None else mapping for mapping in known]
        composed: list[int | None] = []
        offset = 0
        for part, mapping in zip(relation.parts, known):
            composed.extend(None if slot is None else offset + slot for slot in (mapping or self.current(part)))
            offset += self.analysis.width(part)
        derived = {relation.whole: tuple(composed)}
        for part, mapping in zip(relation.parts, known):
            if mapping is not None and self.known(part) is None:
                derived[part] = mapping
        return derived

    def decompose(self, relation: Concat, whole: SlotMapping) -> dict[int, SlotMapping]:
        """Cut the whole's mapping into its parts' mappings (each part's slots must stay together)."""
        widths = [self.analysis.width(part) for part in relation.parts]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        owners: list[int] = []
        for slot in whole:
            if slot is None:
                owners.append(owners[-1] if owners else 0)
            else:
                owners.append(next(i for i in range(len(widths)) if starts[i] <= slot < starts[i] + widths[i]))
        if relation.whole_parts:
            count = len(relation.parts)
            kept = whole_part_owners(whole, widths[0], count)
            if kept is not None:
                # Whole parts kept, dropped or added: the kept ones are unchanged, the others have no
                # space of their own (the parts are the rule's own fresh spaces, related only here).
                return {relation.parts[owner]: identity(widths[0]) for owner in kept if owner is not None}
            if not _equal_parts(whole, owners, count):
                raise EditError(_whole_parts_message(self.analysis, relation, whole))
        if relation.equal:
            # New slots are spread evenly over the blocks: slot j belongs to block j // (new width / blocks).
            count = len(relation.parts)
            if len(whole) % count:
                raise EditError(
                    f"node '{relation.node.name}' ({describe_node(relation.node)}) splits a width of "
                    f"{self.analysis.width(relation.whole)} into {count} equal blocks: the new width {len(whole)} "
                    f"is not {widths_that_work(self.analysis.width(relation.whole), count)}"
                )
            size = len(whole) // count
            expected = [j // size for j in range(len(whole))]
            bad = [j for j, (owner, slot) in enumerate(zip(owners, whole)) if slot is not None and owner != expected[j]]
            if bad:
                raise EditError(
                    f"node '{relation.node.name}' ({describe_node(relation.node)}) splits a width of "
                    f"{self.analysis.width(relation.whole)} into {count} equal blocks of {widths[0]}: new slots "
                    f"{bad[:8]} would take channels from another block; keep= must keep the same number of channels "
                    f"in each block ({size} per block here), in block order"
                )
            owners = expected
        if any(later < earlier for earlier, later in zip(owners, owners[1:])):
            raise PropagationError(
                f"node '{relation.node.name}' ({describe_node(relation.node)}) joins parts along the resized "
                "dimension: the new order would interleave channels of different parts",
                relation.node.name,
            )
        derived: dict[int, SlotMapping] = {}
        for i, part in enumerate(relation.parts):
            mapping = tuple(None if slot is None else slot - starts[i] for slot, owner in zip(whole, owners) if owner == i)
            if not mapping:
                raise EditError(
                    f"node '{relation.node.name}' ({describe_node(relation.node)}): part {i} (width {widths[i]}) of "
                    "the resized dimension would keep no channel; keep at least one channel of each part"
                )
            if part in derived and derived[part] != mapping:
                raise PropagationError(
                    f"node '{relation.node.name}' ({describe_node(relation.node)}): two parts of one space would "
                    "change differently",
                    relation.node.name,
                )
            derived[part] = mapping
        return derived

    def derive_product(self, relation: Product, guess: bool = True) -> dict[int, SlotMapping] | None:
        whole = self.known(relation.whole)
        if whole is not None:
            # The whole decides its factors (the solve loop checks them against known ones).
            return split_product(self.analysis, relation, whole)
        factors = [self.known(factor) for factor in relation.factors]
        if all(mapping is None for mapping in factors):
            return {}
        if any(mapping is None for mapping in factors) and not guess:
            return None
        mappings = [self.current(factor) for factor in relation.factors]
        old_widths = [self.analysis.width(factor) for factor in relation.factors]
        result: list[int | None] = [0]
        for mapping, old_width in zip(mappings, old_widths):
            result = [
                None if outer is None or slot is None else outer * old_width + slot
                for outer in result
                for slot in mapping
            ]
        return {relation.whole: tuple(result)}


def _equal_parts(whole: SlotMapping, owners: Sequence[int], count: int) -> bool:
    """Whether ``whole`` keeps the same number of slots in each of ``count`` equal parts, in part order."""
    if len(whole) % count:
        return False
    size = len(whole) // count
    return all(slot is None or owner == j // size for j, (owner, slot) in enumerate(zip(owners, whole)))


def _whole_parts_message(analysis: SpaceAnalysis, relation: Concat, whole: SlotMapping) -> str:
    """Why ``whole`` fits neither whole parts nor equal parts of ``relation``, and which widths do."""
    old = analysis.width(relation.whole)
    count = len(relation.parts)
    size = old // count
    kept = [slot for slot in whole if slot is not None]
    shown = f"old slots {kept[:12]}{'...' if len(kept) > 12 else ''} kept, {len(whole) - len(kept)} new"
    return (
        f"node '{relation.node.name}' ({describe_node(relation.node)}) splits a width of {old} into {count} blocks "
        f"of {size}{relation.detail}: the new width {len(whole)} ({shown}) cuts through a block; possible: whole "
        f"blocks kept, dropped or added, each in its own order (multiples of {size}: {_examples(old, size)}), or "
        f"the same number of channels kept or added in every block, in block order (multiples of {count}: "
        f"{_examples(old, count)})"
    )


def _factor_pair(mapping: SlotMapping, outer: int, inner: int) -> tuple[SlotMapping, SlotMapping] | None:
    """Write ``mapping`` (over ``outer * inner`` old slots) as a row-major product of two mappings, if it is one.

    Tried in order: the inner width unchanged (whole blocks of ``inner`` kept,
    dropped, reordered or added: whole heads), the outer width unchanged
    (every block changed alike: each head's width), then any other split of
    the new width. A product is unique once the new widths are chosen, so the
    first that rebuilds ``mapping`` exactly is the answer.

    Args:
        mapping: the whole's new mapping.
        outer: the old width of the outer factor.
        inner: the old width of the inner factor (the product of the rest).

    Returns:
        ``(outer mapping, inner mapping)``, or ``None`` when no split rebuilds it.
    """
    width = len(mapping)
    candidates = [inner]
    if width % outer == 0:
        candidates.append(width // outer)
    candidates += [b for b in range(1, width + 1) if width % b == 0 and b not in candidates]
    for block in candidates:
        if width % block:
            continue
        count = width // block
        outer_map: list[int | None] = []
        inner_map: list[int | None] = [None] * block
        fits = True
        for i in range(count):
            owners = {slot // inner for slot in mapping[i * block : (i + 1) * block] if slot is not None}
            if len(owners) > 1:
                fits = False
                break
            outer_map.append(owners.pop() if owners else None)
        if not fits:
            continue
        for j in range(block):
            column = {mapping[i * block + j] % inner for i in range(count) if mapping[i * block + j] is not None}
            if len(column) > 1:
                fits = False
                break
            inner_map[j] = column.pop() if column else None
        if not fits:
            continue
        rebuilt = tuple(
            None if o is None or s is None else o * inner + s for o in outer_map for s in inner_map
        )
        if rebuilt == tuple(mapping):
            return tuple(outer_map), tuple(inner_map)
    return None


def _examples(old: int, step: int) -> str:
    values = [old + k * step for k in (-2, -1, 1, 2) if old + k * step > 0]
    return ", ".join(map(str, values))


def split_product(analysis: SpaceAnalysis, relation: Product, whole: SlotMapping) -> dict[int, SlotMapping]:
    """The factors' mappings when only the whole of ``relation`` changes (a Linear output split into heads).

    Args:
        analysis: the analysis the relation belongs to.
        relation: a :class:`Product` (``view(b, n, heads, head_dim)`` of a Linear's output).
        whole: the whole's new mapping.

    Returns:
        Factor space -> its mapping (unchanged factors included, as identities).

    Raises:
        EditError: the new mapping cuts through a block of the inner factors
            (a head); the message says which widths are possible.
    """
    widths = [analysis.width(factor) for factor in relation.factors]
    derived: dict[int, SlotMapping] = {}
    rest = tuple(whole)
    for position, factor in enumerate(relation.factors[:-1]):
        inner = math.prod(widths[position + 1 :])
        pair = _factor_pair(rest, widths[position], inner)
        if pair is None:
            raise EditError(_split_message(analysis, relation, whole, position))
        derived[factor], rest = pair
    derived[relation.factors[-1]] = rest
    # One space may be two factors (a square split): both must change alike.
    merged: dict[int, SlotMapping] = {}
    for factor, mapping in derived.items():
        root = analysis.find(factor)
        if root in merged and merged[root] != mapping:
            raise EditError(_split_message(analysis, relation, whole, 0))
        merged[root] = mapping
    return derived


def _split_message(analysis: SpaceAnalysis, relation: Product, whole: SlotMapping, position: int) -> str:
    """Why ``whole`` cannot be split over ``relation``'s factors, and which widths can."""
    widths = [analysis.width(factor) for factor in relation.factors]
    old = analysis.width(relation.whole)
    outer, inner = math.prod(widths[: position + 1]), math.prod(widths[position + 1 :])
    kept = [slot for slot in whole if slot is not None]
    shown = f"old slots {kept[:12]}{'...' if len(kept) > 12 else ''} kept, {len(whole) - len(kept)} new"
    head = f"node '{relation.node.name}' ({describe_node(relation.node)})"
    # A broadcast inner factor (expand) repeats the outer blocks: grouped-query attention's key/value heads.
    repeated = [
        member.node.name
        for factor in relation.factors[1:]
        for member in analysis.members_of(analysis.find(factor))
        if "expand" in describe_node(member.node)
    ]
    if relation.detail or (repeated and len(widths) == 2):
        groups, repeat = widths
        how = relation.detail or (
            f" (node '{repeated[0]}' repeats each key/value head {repeat} times: grouped-query attention, "
            f"{old} query heads over {groups} key/value heads)"
        )
        return (
            f"{head} makes {old} query heads of {groups} key/value heads x {repeat}{how}: the query heads kept, "
            f"{kept[:12]}{'...' if len(kept) > 12 else ''} of {old}, would break the grouping; remove query heads "
            f"in whole groups of {repeat} (with their key/value head: query-head counts that are multiples of "
            f"{repeat}: {_examples(old, repeat)}), or the same number from every group (multiples of {groups}: "
            f"{_examples(old, groups)}), which keeps every key/value head shared by as many query heads"
        )
    # The innermost split of a view into (..., heads, head_dim) is what attention code writes; a
    # channel shuffle (view into groups x channels, transpose) reads the same, so say it as a maybe.
    meaning = f": heads of head_dim {inner} if this is attention" if position == len(widths) - 2 else ""
    return (
        # "reshapes the dimension of width W into AxB" is also what the zoo sweep's known-gap pattern reads.
        f"{head} reshapes the dimension of width {old} into {'x'.join(map(str, widths))} ({outer} blocks of {inner}"
        f"{meaning}): the new width {len(whole)} ({shown}) cuts through a block; "
        f"possible: whole blocks kept, dropped or added (multiples of {inner}: {_examples(old, inner)}), or every "
        f"block changed alike (multiples of {outer}: {_examples(old, outer)})"
    )


def solve(analysis: SpaceAnalysis, root: int, mapping: SlotMapping) -> dict[int, SlotMapping]:
    """Every class that changes when ``root``'s class takes ``mapping``, with its mapping.

    Raises:
        PropagationError: the change is inconsistent or meets a reshape it
            cannot be carried through.
        EditError: equal blocks (chunk, grouped conv) would become unequal, or
            a split into blocks (a ``view`` into heads) would be cut through.
    """
    return _Solver(analysis).solve(root, mapping)
