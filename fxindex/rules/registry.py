"""The rule registry: how a shape change travels through one kind of node.

A rule is a small function registered for module types (looked up along the
class's MRO, so subclasses inherit it), for functions (``torch.flatten``,
``operator.add``) or for method names (``"view"``). When the output of a node
changes size along one dimension, the replace pass calls the rule of each user
of that node with a :class:`Step`; the rule answers with an :class:`Outcome`:
the rebuilt module or rewritten arguments, and the change of the node's own
output (or ``None`` when the change is absorbed there).

Adding support for a layer type is one decorated function in the file of its
family::

    @register_rule(MyGatedLinear)
    def propagate_gated_linear(step: Step) -> Outcome:
        change = step.input_change()
        ...

A separate, smaller registry, :func:`register_widths`, says which dimension a
layer reads and writes and how wide: it lets replace work on Linear and Conv
chains from module attributes alone when no shapes were recorded.

A module class with a rule here or a channel-space rule
(:func:`fxindex.register_space_rule`) is traced as one layer (a leaf)
by default, so registering a rule is all a user's layer needs.
:func:`using` puts rules in effect for one block of code only (a per-call
override, like ``FlopCounterMode(custom_mapping=...)``): they are consulted
before the registered ones, in the current thread.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxindex import _spaces
from fxindex._errors import PropagationError, RegistrationError, ShapesRequiredError
from fxindex._shapes import TensorMetadata, tensor_meta

__all__ = [
    "ChannelChange",
    "Step",
    "Outcome",
    "Widths",
    "register_rule",
    "register_widths",
    "find_rule",
    "find_widths",
    "describe_target",
    "argument",
    "remap",
    "describe_slots",
    "using",
    "has_rule_for_class",
]

# New slot -> old slot (None: a new slot); not collections.abc.Mapping, which the per-call tables use.
Slots = tuple[int | None, ...]


@dataclass(frozen=True)
class ChannelChange:
    """One dimension of a tensor changed size, with a slot correspondence.

    Attributes:
        dim: the changed dimension; non-negative when the rank is known,
            otherwise as the producing layer states it (``-1`` for Linear,
            ``1`` for convolutions).
        rank: the tensor's rank, when known.
        old_size: the size of ``dim`` before the edit.
        mapping: for each new position along ``dim``, the old position whose
            values it carries, or ``None`` for a new slot.
    """

    dim: int
    rank: int | None
    old_size: int
    mapping: Slots

    @property
    def new_size(self) -> int:
        return len(self.mapping)

    @property
    def kept(self) -> int:
        """How many new slots carry an old slot."""
        return sum(slot is not None for slot in self.mapping)

    def reads(self, dim: int, rank: int | None = None) -> bool:
        """Whether ``dim`` (of a tensor of rank ``rank`` or this change's) is the changed one."""
        rank = self.rank if self.rank is not None else rank
        if rank is not None:
            return dim % rank == self.dim % rank
        if dim != self.dim and (dim < 0) != (self.dim < 0):
            # dim 1 and dim -1 are the same dimension of a matrix, different ones of an image.
            raise ShapesRequiredError(
                f"cannot tell whether dim {dim} is the changed dim {self.dim} without the tensor's rank: "
                "pass example_inputs=(...) so shapes are recorded"
            )
        return dim == self.dim

    def moved_to(self, dim: int, rank: int | None) -> ChannelChange:
        """The same slots, now along ``dim`` of a tensor of rank ``rank``."""
        return ChannelChange(dim % rank if rank else dim, rank, self.old_size, self.mapping)

    def describe(self) -> str:
        return f"dim {self.dim}: {self.old_size} -> {self.new_size}"


@dataclass
class Outcome:
    """What a rule decided for one node.

    Attributes:
        output: the change of the node's output, or ``None`` when absorbed.
        module: a rebuilt module to call at this site instead of the old one.
        args: rewritten positional arguments (``None`` keeps them).
        kwargs: rewritten keyword arguments (``None`` keeps them).
        weights: a short account of which weights were kept, sliced or new
            (clauses separated by ``"; "``).
        reason: why new channels alter values of old ones here (LayerNorm,
            GroupNorm, softmax across the changed dim), or ``None`` when the
            function is preserved.
    """

    output: ChannelChange | None
    module: nn.Module | None = None
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    weights: str = ""
    reason: str | None = None

    @property
    def preserves_function(self) -> bool:
        """Whether old channels keep their values through this node: there is no :attr:`reason` they do not."""
        return self.reason is None


@dataclass
class Step:
    """What a rule sees: one node whose tensor inputs changed.

    Attributes:
        node: the node to adapt.
        module: the called module for ``call_module`` nodes, else ``None``.
        changes: the changes of this node's changed input nodes.
        new_metas: metadata of inputs after the edit (changed inputs only),
            when shapes are known.
        has_shapes: whether the graph's shapes are recorded (then a node
            without metadata holds a Python value, not a tensor).
    """

    node: fx.Node
    module: nn.Module | None
    changes: dict[fx.Node, ChannelChange]
    new_metas: dict[fx.Node, TensorMetadata] = field(default_factory=dict)
    has_shapes: bool = False

    def input_change(self, argument: Any | None = None) -> ChannelChange:
        """The change of ``argument`` (default: the node's first argument).

        Raises:
            PropagationError: that argument did not change while another one
                did (the rule only knows how to follow its first input).
        """
        if argument is None:
            argument = self.node.args[0] if self.node.args else None
        if isinstance(argument, fx.Node) and argument in self.changes:
            return self.changes[argument]
        changed = ", ".join(f"'{n.name}'" for n in self.changes)
        raise PropagationError(
            f"node '{self.node.name}' ({describe_target(self.node)}) changed through input {changed}, "
            f"which this rule does not follow; register a rule for it with fxindex.register_rule",
            self.node.name,
        )

    def old_meta(self, node: Any) -> TensorMetadata | None:
        """The recorded metadata of ``node`` before the edit."""
        return tensor_meta(node) if isinstance(node, fx.Node) else None

    def old_shape(self, node: Any, *, needed_for: str) -> tuple[int, ...]:
        """The recorded shape of ``node`` before the edit; asks for shapes when missing."""
        meta = self.old_meta(node)
        if meta is None:
            raise ShapesRequiredError(
                f"node '{self.node.name}' ({describe_target(self.node)}) needs tensor shapes to {needed_for}: "
                "pass example_inputs=(...) to replace/plan, or trace with example_inputs"
            )
        return tuple(meta.shape)

    def rank(self, node: Any) -> int | None:
        meta = self.old_meta(node)
        return len(meta.shape) if meta is not None else None

    def fail(self, message: str) -> PropagationError:
        """A PropagationError about this node (to raise)."""
        return PropagationError(
            f"cannot propagate through node '{self.node.name}' ({describe_target(self.node)}): {message}",
            self.node.name,
        )


@dataclass(frozen=True)
class Widths:
    """Which dimension a layer reads and writes, and how wide (from attributes alone).

    ``None`` for ``in_size`` / ``out_size`` means the layer preserves the
    width of its input (activations, normalisation).
    """

    in_dim: int
    in_size: int | None
    out_dim: int
    out_size: int | None


Rule = Callable[[Step], Outcome]
RuleKey = type | Callable[..., Any] | str

_RULES: dict[Any, Rule] = {}
_WIDTHS: dict[type, Callable[[nn.Module], Widths]] = {}

# Rules put in effect by `using`, innermost block last; per thread, so one thread's override
# never changes what another thread's edit does.
_OVERRIDES = threading.local()


def _override_frames() -> list[dict[Any, Rule]]:
    frames = getattr(_OVERRIDES, "frames", None)
    if frames is None:
        frames = _OVERRIDES.frames = []
    return frames


def _key_name(key: Any) -> str:
    if isinstance(key, str):
        return f"method '.{key}()'"
    return getattr(key, "__qualname__", None) or repr(key)


def register_rule(*keys: RuleKey, replace: bool = False) -> Callable[[Rule], Rule]:
    """Register a propagation rule for module types, functions or method names.

    Args:
        *keys: ``nn.Module`` subclasses (matched along the MRO), callables such
            as ``torch.flatten`` or ``operator.add`` (``call_function`` nodes),
            or strings naming tensor methods (``"view"``; ``call_method`` nodes).
        replace: allow overriding an existing rule (refused by default, so two
            rules never silently compete).

    Returns:
        A decorator that registers the function and returns it unchanged.

    Example:
        >>> import torch, fxindex
        >>> from fxindex.rules import Outcome, Step
        >>> class Scale(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> @fxindex.register_rule(Scale)
        ... def propagate_scale(step: Step) -> Outcome:
        ...     return Outcome(output=step.input_change())
    """
    if not keys:
        raise TypeError("register_rule needs at least one module type, function or method name")

    def decorate(rule: Rule) -> Rule:
        for key in keys:
            if not (isinstance(key, str) or callable(key)):
                raise TypeError(f"a rule key is a module type, a function or a method name, got {key!r}")
            if key in _RULES and not replace:
                raise RegistrationError(
                    f"a rule for {_key_name(key)} is already registered ({_RULES[key].__name__}); "
                    "pass replace=True to override it"
                )
            _RULES[key] = rule
        return rule

    return decorate


def register_widths(*module_types: type[nn.Module]) -> Callable[[Callable[[Any], Widths]], Callable[[Any], Widths]]:
    """Register how to read a layer's input and output widths from its attributes."""

    def decorate(function: Callable[[Any], Widths]) -> Callable[[Any], Widths]:
        for module_type in module_types:
            if module_type in _WIDTHS:
                raise RegistrationError(f"widths for {module_type.__qualname__} are already registered")
            _WIDTHS[module_type] = function
        return function

    return decorate


def find_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The rule for ``node``: by the module's MRO, the function, or the method name.

    Rules in effect through :func:`using` come first (the innermost block's
    first), then the registered ones.

    Args:
        node: the node to adapt.
        module: its module for a ``call_module`` node, else ``None``.

    Returns:
        The rule, or ``None`` when there is none.
    """
    return lookup_rule((*reversed(_override_frames()), _RULES), node, module)


def lookup_rule(tables: Sequence[Mapping[Any, Any]], node: fx.Node, module: nn.Module | None) -> Any:
    """The first rule for ``node`` in ``tables``: by its module's MRO, its function or its method name.

    The one lookup of both registries (propagation rules here, channel-space
    rules in :mod:`fxindex.spaces`), each passing its per-call tables first.

    Args:
        tables: key -> rule tables, searched in order.
        node: the node.
        module: its module for a ``call_module`` node, else ``None``.

    Returns:
        The rule, or ``None`` when no table has one.
    """
    for table in tables:
        if node.op == "call_module":
            for cls in type(module).__mro__:
                if cls in table:
                    return table[cls]
        elif node.op in ("call_function", "call_method"):
            try:
                if node.target in table:
                    return table[node.target]
            except TypeError:  # an unhashable target
                return None
    return None


def has_rule_for_class(cls: type) -> bool:
    """Whether ``cls`` itself (not a base) has a propagation or channel-space rule, registered or in effect.

    The tracer asks this along a module's MRO: a class with a rule is a
    layer fxindex knows how to resize, so it is kept as one layer.

    Args:
        cls: a module class.

    Returns:
        True when either registry, or a :func:`using` block, has a rule for ``cls``.
    """
    try:
        return (
            cls in _RULES
            or any(cls in frame for frame in _override_frames())
            or _spaces.has_space_rule_for_class(cls)
        )
    except TypeError:  # an unhashable class (a metaclass defining __eq__ only)
        return False


def _registered_kind(rule: Any) -> str | None:
    """``"propagation"``/``"space"`` when ``rule`` is registered in exactly one registry, else ``None``."""
    in_rules = any(value is rule for value in _RULES.values())
    in_spaces = _spaces.is_registered_space_rule(rule)
    if in_rules != in_spaces:
        return "propagation" if in_rules else "space"
    return None


def _rule_kind(rule: Any) -> str | None:
    """Which registry ``rule`` is written for: from its first parameter's annotation, else where it is registered."""
    try:
        parameters = list(inspect.signature(rule).parameters.values())
    except (TypeError, ValueError):  # a builtin or a C callable without a signature
        parameters = []
    if parameters:
        annotation = parameters[0].annotation
        # `from __future__ import annotations` leaves a string ("Step", "fxindex.rules.Step").
        name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        name = name.rsplit(".", 1)[-1]
        if name == "Step":
            return "propagation"
        if name == "SpaceContext":
            return "space"
    return _registered_kind(rule)


def _check_key(key: Any, what: str) -> None:
    if not (isinstance(key, str) or callable(key)):
        raise TypeError(f"a {what} key is a module type, a function or a method name, got {key!r}")


def _split_rules(rules: Mapping[Any, Any]) -> tuple[dict[Any, Rule], dict[Any, Any]]:
    """Sort ``rules`` into propagation and channel-space rules (a value may be a tuple of one of each)."""
    propagation: dict[Any, Rule] = {}
    space: dict[Any, Any] = {}
    for key, value in rules.items():
        _check_key(key, "rule")
        for rule in value if isinstance(value, (tuple, list)) else (value,):
            if not callable(rule):
                raise TypeError(f"the rule given for {_key_name(key)} is not callable: {rule!r}")
            kind = _rule_kind(rule)
            if kind is None:
                raise RegistrationError(
                    f"cannot tell which kind of rule {getattr(rule, '__name__', repr(rule))} (for {_key_name(key)}) is: "
                    "annotate its argument as `step: fxindex.rules.Step` (a propagation rule, used by replace) or "
                    "`context: fxindex.rules.SpaceContext` (a channel-space rule, used by group and resize), "
                    "or pass it as using(propagation={...}) / using(space={...})"
                )
            table = propagation if kind == "propagation" else space
            if key in table:
                raise RegistrationError(f"two {kind} rules are given for {_key_name(key)}: give one")
            table[key] = rule
    return propagation, space


@contextlib.contextmanager
def using(
    rules: Mapping[RuleKey, Any] | None = None,
    *,
    propagation: Mapping[RuleKey, Rule] | None = None,
    space: Mapping[RuleKey, Any] | None = None,
) -> Iterator[None]:
    """Put rules in effect for the ``with`` block only, before the registered ones (in this thread).

    The per-call override of ``replace``/``group``/``resize``: a rule here
    is found first, for its key and along a module's MRO, and a module class
    named here is traced as one layer, like a registered one. Blocks nest
    (the inner one wins); leaving the block restores the registries as they
    were, even on an error. Other threads do not see the rules.

    Args:
        rules: ``{key: rule}`` of either kind, told apart by the annotation
            of the rule's argument (``step: Step`` for a propagation rule,
            ``context: SpaceContext`` for a channel-space rule) or by the
            registry it is already registered in; a value may be a tuple of
            one rule of each kind.
        propagation: ``{key: rule}`` of propagation rules, whatever their annotations.
        space: ``{key: rule}`` of channel-space rules, whatever their annotations.

    Raises:
        TypeError: a key is not a module type, a function or a method name,
            or a rule is not callable.
        RegistrationError: the kind of a rule in ``rules`` cannot be told, or
            one key is given two rules of the same kind.

    Example:
        >>> import torch, fxindex
        >>> from fxindex.rules import Outcome, Step, using
        >>> class Scale(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> def pass_on(step: Step) -> Outcome:
        ...     return Outcome(output=step.input_change())
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), Scale(), torch.nn.Linear(8, 2))
        >>> with using({Scale: pass_on}):
        ...     wider = fxindex.replace(net, 0, torch.nn.Linear(4, 16))
        >>> wider.get_submodule("2").in_features
        16
    """
    inferred_propagation, inferred_space = _split_rules(rules or {})
    for what, table in (("propagation rule", propagation or {}), ("space rule", space or {})):
        for key, rule in table.items():
            _check_key(key, what)
            if not callable(rule):
                raise TypeError(f"the {what} given for {_key_name(key)} is not callable: {rule!r}")
    frame = {**inferred_propagation, **(propagation or {})}
    space_frame = {**inferred_space, **(space or {})}
    if not frame and not space_frame:
        # `using(None)` is what a public function enters when no rules were passed: it changes nothing,
        # so it pushes nothing (and a cached channel-space analysis stays valid across it).
        yield
        return
    frames = _override_frames()
    with _spaces.space_rule_overrides(space_frame):
        frames.append(frame)
        try:
            yield
        finally:
            frames.pop()


def find_widths(module: nn.Module) -> Widths | None:
    """The registered widths of ``module`` (along its MRO), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _WIDTHS:
            return _WIDTHS[cls](module)
    return None


def describe_target(node: fx.Node) -> str:
    """A short human name of what a node does: ``Conv2d``, ``torch.flatten``, ``.view()``."""
    if node.op == "call_module":
        # The class says what the layer is; "call_module 1" alone does not.
        owner = node.graph.owning_module
        try:
            kind = type(owner.get_submodule(str(node.target))).__name__ if owner is not None else None
        except AttributeError:
            kind = None
        return f"call_module {node.target} ({kind})" if kind else f"call_module {node.target}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        target = node.target
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", repr(target))
        if module in ("_operator", "operator"):
            return f"operator.{name}"
        if module.startswith("torch"):
            return f"{'torch.nn.functional' if module == 'torch.nn.functional' else 'torch'}.{name}"
        return f"{module}.{name}" if module else name
    return node.op


def argument(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """The value of an argument given by position or keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def remap(tensor: torch.Tensor, dim: int, mapping: Sequence[int | None], fresh: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Rebuild ``tensor`` along ``dim``: new slot j takes old slot ``mapping[j]``.

    Args:
        tensor: the old weights.
        dim: the dimension to remap.
        mapping: old slot index per new slot, ``None`` for a new slot.
        fresh: the value of new slots: a scalar, or a tensor of the new shape
            (for example a freshly initialised weight).

    Returns:
        A new tensor (never a view of ``tensor``), same dtype and device.
    """
    shape = list(tensor.shape)
    shape[dim] = len(mapping)
    with torch.no_grad():
        if isinstance(fresh, torch.Tensor):
            result = fresh.detach().to(dtype=tensor.dtype, device=tensor.device).clone()
        else:
            result = torch.full(shape, fresh, dtype=tensor.dtype, device=tensor.device)
        target = [j for j, slot in enumerate(mapping) if slot is not None]
        if target:
            source = torch.tensor([mapping[j] for j in target], dtype=torch.long, device=tensor.device)
            result.index_copy_(dim, torch.tensor(target, dtype=torch.long, device=tensor.device), tensor.detach().index_select(dim, source))
    return result


def describe_slots(change: ChannelChange, what: str, new_as: str = "zero") -> str:
    """``"16/21 in-features kept, 5 new (zero)"``-style account of a remap.

    Args:
        change: the remap.
        what: what the slots are (``"in-features"``).
        new_as: how new slots start, said only when there are new slots.
    """
    new = change.new_size - change.kept
    dropped = change.old_size - change.kept
    parts = [f"{change.kept}/{change.new_size} {what} kept"]
    if new:
        parts.append(f"{new} new ({new_as})")
    if dropped:
        parts.append(f"{dropped} dropped")
    return ", ".join(parts)
