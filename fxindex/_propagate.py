"""The propagation pass: from replaced layers, carry a shape change through the graph.

The pass reads the graph and never writes it. It walks the nodes in graph
(topological) order from the first replaced layer; every node that reads a
changed tensor asks its rule (see :mod:`fxindex.rules`) how to adapt. When
shapes are known, each touched node is also re-run on fake tensors with its
new module or arguments, which both checks the rebuilt graph and yields the
new shapes; nodes that read nothing changed are never run. The result is a
:class:`~fxindex.Plan` that ``apply_plan`` installs.

``_MetaRun`` (a ``torch.fx.Interpreter``) runs those single nodes; ``_Planner``
walks the graph and works out the replaced layers' change, from shapes or,
without them, from registered widths. The plan holds the edits as data;
``fxindex._plan`` renders them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxindex._errors import EditError, PropagationError, ShapeMismatchError, ShapesRequiredError
from fxindex._plan import Plan, PlannedEdit
from fxindex._plan import short_repr as _short
from fxindex._preserve import compare_layers, own_forward
from fxindex.rules import ChannelChange, Outcome, Step, Widths, find_rule, find_widths
from fxindex.rules.registry import describe_target
from fxindex._shapes import (
    NOT_GIVEN_KEY,
    MetaConverter,
    MetaUnsupportedError,
    TensorMetadata,
    cpu_layouts,
    make_fake_mode,
    meta_kernel_cache,
    meta_of,
    meta_tensor_like,
    meta_to_fake,
    preserving_buffers,
    quiet_fake_errors,
    shapes_recorded,
    to_meta,
)

__all__ = ["build_plan", "planner_for", "Target"]


class Target:
    """One call site to replace, with what replaces it.

    Attributes:
        node: the ``call_module`` node.
        module: the new layer (``nn.Identity()`` for a removal).
        keep: old output slots kept, in their new order (``None``: the first ones).
        label: how errors name the layer (``"layer 4 ('nested.0')"``).
        action: ``"replace"`` or ``"remove"``.
        old_widths: widths of what is replaced, when known from context.
        new_widths: widths of the new layer, when known from context.
    """

    def __init__(
        self,
        node: fx.Node,
        module: nn.Module,
        keep: Sequence[int] | None,
        label: str,
        action: str = "replace",
        old_widths: Widths | None = None,
        new_widths: Widths | None = None,
    ):
        self.node = node
        self.module = module
        self.keep = keep
        self.label = label
        self.action = action
        # Widths known from context when the modules alone cannot tell (an inserted or removed identity).
        self.old_widths = old_widths
        self.new_widths = new_widths


def _shape_text(meta: Any) -> str:
    if isinstance(meta, TensorMetadata):
        return "x".join(map(str, meta.shape)) or "scalar"
    if isinstance(meta, (tuple, list)):
        return "(" + ", ".join(_shape_text(item) for item in meta) + ")"
    return "?"


def _shapes_of(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_shapes_of(item) for item in meta)
    return None


def check_kept_slots(keep: Sequence[int], old_size: int, label: str, has: str) -> None:
    """``keep=`` names old slots once each, all in range: an :class:`EditError` otherwise.

    Shared by ``replace``'s and ``resize``'s ``keep=``; ``has`` says what the
    old width is of (``"the old layer has 8 outputs"``).
    """
    bad = [slot for slot in keep if not 0 <= slot < old_size]
    if bad:
        raise EditError(f"{label}: keep= indices {bad} are out of range: {has} (0..{old_size - 1})")
    if len(set(keep)) != len(keep):
        duplicates = sorted(slot for slot, count in Counter(keep).items() if count > 1)
        raise EditError(f"{label}: keep= repeats indices {duplicates}: each old channel can be kept once")


def _slots(keep: Sequence[int] | None, old_size: int, new_size: int, label: str) -> tuple[int | None, ...]:
    """The mapping of new output slots to old ones, from ``keep`` or by position."""
    if keep is None:
        return tuple(j if j < old_size else None for j in range(new_size))
    keep = list(keep)
    if not all(isinstance(slot, int) and not isinstance(slot, bool) for slot in keep):
        raise EditError(f"{label}: keep= must hold int channel indices, got {keep!r}")
    check_kept_slots(keep, old_size, label, f"the old layer has {old_size} outputs")
    if len(keep) > new_size:
        raise EditError(f"{label}: keep= names {len(keep)} channels but the new layer has only {new_size} outputs")
    return tuple(keep) + (None,) * (new_size - len(keep))


class _MetaRun(fx.Interpreter):
    """Runs single nodes of the graph on meta values, computing the values they read on demand.

    Not a whole-graph run: the planner runs only the nodes an edit touches,
    each with its new module or arguments standing in for the old ones
    (:meth:`run_as`). An input's value is its recorded shape as a meta tensor,
    or, for a Python value without one (``x.size(0)``), the node re-run from
    its own inputs; values are kept in ``env`` for the nodes after it.

    Meta first: each parameter is copied to meta once per plan, and layers run
    as copies holding those (so the caller's layers and buffers are only
    read). A node meta cannot run is re-run on fake tensors with the real
    layer, whose error is the one reported if that fails too; the result goes
    back to meta for the nodes after it.
    """

    def __init__(self, graph_module: fx.GraphModule, graph: fx.Graph, mode: Any, device: torch.device):
        super().__init__(graph_module, garbage_collect_values=False, graph=graph)
        self.mode = mode
        self.device = device
        self.copies = MetaConverter()
        # The layer (or get_attr value) of the node being run, where fetch_attr would read the model's.
        self.stand_in: Any = None

    def map_nodes_to_values(self, args: Any, n: fx.Node) -> Any:
        return fx.node.map_arg(args, self.value_of)

    def value_of(self, node: fx.Node) -> Any:
        """The (meta) value of ``node`` after the edit."""
        if node in self.env:
            return self.env[node]
        meta = node.meta.get("tensor_meta")
        if meta is not None:
            value = _meta_values(meta)
        elif node.op == "get_attr":
            value = super().fetch_attr(str(node.target))
            try:
                value = self.copies.value(value)
            except MetaUnsupportedError:
                pass  # the real tensor, read only: the node reading it re-runs on fake tensors
        elif node.op == "placeholder" and node.meta.get(NOT_GIVEN_KEY):
            # An optional argument the example inputs left out: the recorded run saw its default.
            value = node.args[0] if node.args else []
        elif node.op == "placeholder":
            raise ShapesRequiredError(f"placeholder '{node.name}' has no recorded shape; pass example_inputs=(...)")
        else:
            # A non-tensor value (x.size(0)) of an unchanged node: compute it from its inputs.
            value = self.run_as(node, None, node.args, node.kwargs)
        self.env[node] = value
        return value

    def run_as(self, node: fx.Node, module: nn.Module | None, args: Any, kwargs: Any) -> Any:
        """Run ``node`` with ``module`` standing in for its layer and ``args``/``kwargs`` for its arguments.

        Args:
            node: a ``call_module``, ``call_function``, ``call_method`` or ``get_attr`` node.
            module: the layer to call (``call_module``; ``None``: the model's own).
            args: the arguments, holding nodes.
            kwargs: the keyword arguments, holding nodes.

        Returns:
            The result, its tensors on meta.
        """
        args, kwargs = self.map_nodes_to_values(args, node), self.map_nodes_to_values(kwargs, node)
        if node.op == "call_module":
            real = module if module is not None else super().fetch_attr(str(node.target))
        else:
            real = super().fetch_attr(str(node.target)) if node.op == "get_attr" else None
        op = getattr(self, node.op)
        try:
            # The copy is made outside the meta device block: only the layer's computation runs there.
            layer = self.copies.value(real) if real is not None else None
            with self._standing_in(layer), torch.device("meta"), meta_kernel_cache(self.device):
                return op(node.target, args, kwargs)
        except Exception:
            pass  # no meta kernel (data-dependent ops) or a real tensor meta cannot meet: fake tensors
        fake_args = meta_to_fake(args, self.mode, self.device)
        fake_kwargs = meta_to_fake(kwargs, self.mode, self.device)
        # New and rebuilt modules are not inside the graph module's buffer guard: a
        # BatchNorm in train mode would count the fake run as a batch. The guard's
        # copies must be real tensors, so it is entered outside the fake mode.
        # Any other op that falls back here may meet the model's real buffers: the whole model is guarded.
        guard = preserving_buffers(real if node.op == "call_module" else self.module)
        with guard, self._standing_in(real), self.mode, cpu_layouts(self.device), quiet_fake_errors():
            result = op(node.target, fake_args, fake_kwargs)
        # Outside the fake mode, or the copies would be fake tensors on the meta device.
        return to_meta(result)

    @contextlib.contextmanager
    def _standing_in(self, value: Any) -> Iterator[None]:
        self.stand_in = value
        try:
            yield
        finally:
            self.stand_in = None

    def fetch_attr(self, target: str) -> Any:
        return self.stand_in if self.stand_in is not None else super().fetch_attr(target)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        # forward, not __call__: planning is not a use of the model, so user hooks do not run.
        return self.fetch_attr(target).forward(*args, **kwargs)


def _meta_values(meta: Any) -> Any:
    """A meta tensor for each TensorMetadata in ``meta`` (one, or a tuple or list of them)."""
    # Not map_aggregate: TensorMetadata is itself a NamedTuple and would be taken apart.
    if isinstance(meta, TensorMetadata):
        return meta_tensor_like(meta)
    if isinstance(meta, (tuple, list)):
        return type(meta)(_meta_values(item) for item in meta)
    return meta


def _changed(meta: TensorMetadata, change: ChannelChange) -> tuple[int, ...]:
    """``meta``'s shape with ``change`` applied."""
    shape = list(meta.shape)
    shape[change.dim % len(shape)] = change.new_size
    return tuple(shape)


class _Planner:
    def __init__(
        self,
        graph_module: fx.GraphModule,
        targets: list[Target],
        propagate: bool,
        graph: fx.Graph | None = None,
        extra_modules: dict[str, nn.Module] | None = None,
    ):
        self.graph_module = graph_module
        self.graph = graph if graph is not None else graph_module.graph
        self.targets = {target.node: target for target in targets}
        self.propagate = propagate
        placeholders = [node for node in self.graph.nodes if node.op == "placeholder"]
        # An optional argument left out of the example inputs has no tensor_meta, yet shapes are known.
        self.has_shapes = bool(placeholders) and shapes_recorded(self.graph)
        self.mode = make_fake_mode() if self.has_shapes else None
        # TensorMetadata has no device: activations live where the weights do.
        first = next(iter(graph_module.parameters()), None)
        if first is None:
            first = next(iter(graph_module.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        # Only a planner with shapes re-runs nodes.
        self.runner = _MetaRun(graph_module, self.graph, self.mode, self.device) if self.mode is not None else None
        self.modules = dict(self.runner.submodules) if self.runner is not None else dict(graph_module.named_modules())
        self.modules.update(extra_modules or {})
        self.changes: dict[fx.Node, ChannelChange] = {}
        self.dirty: set[fx.Node] = set()
        self.new_metas: dict[fx.Node, Any] = {}
        self.plan = Plan(edits=[])

    def run(self, node: fx.Node, module: nn.Module | None, args: Any, kwargs: Any) -> Any:
        """Re-run ``node`` on meta values with its new module or arguments, and keep the result for its users."""
        assert self.runner is not None
        result = self.runner.run_as(node, module, args, kwargs)
        self.runner.env[node] = result
        return result

    # -- the walk ---------------------------------------------------------------------------
    def build(self) -> Plan:
        nodes = list(self.graph.nodes)
        positions = {node: position for position, node in enumerate(nodes)}
        start = min(positions[node] for node in self.targets)
        # No buffer guard around the walk: the meta runs write only to copies, and each
        # fall-back to fake tensors guards what it runs (run_as).
        for node in nodes[start:]:
            self.visit(node)
        self.plan.new_metas = {node.name: meta for node, meta in self.new_metas.items()}
        return self.plan

    def visit(self, node: fx.Node) -> None:
        target = self.targets.get(node)
        dirty_inputs = [arg for arg in node.all_input_nodes if arg in self.dirty]
        if target is None and not dirty_inputs:
            return
        if node.op == "output":
            for arg in dirty_inputs:
                if arg in self.changes:
                    self.plan.output_changes.append(f"'{arg.name}' {self.changes[arg].describe()}")
            return
        old_module = self.modules.get(node.target) if node.op == "call_module" else None
        if target is not None:
            self.visit_target(node, target, old_module)
            return
        tensor_changes = {arg: self.changes[arg] for arg in dirty_inputs if arg in self.changes}
        outcome = Outcome(output=None)
        if tensor_changes:
            rule = find_rule(node, old_module)
            if rule is None:
                changed = ", ".join(f"'{arg.name}' ({change.describe()})" for arg, change in tensor_changes.items())
                raise PropagationError(
                    f"no rule for node '{node.name}' ({describe_target(node)}), which reads changed input {changed}; "
                    "teach fxindex this op with @fxindex.register_rule(<module type, function or method name>)",
                    node.name,
                )
            new_metas = {arg: self.new_metas[arg] for arg in tensor_changes if arg in self.new_metas}
            step = Step(node, old_module, tensor_changes, new_metas, has_shapes=self.has_shapes)
            outcome = rule(step)
            if not self.propagate and (outcome.module, outcome.args, outcome.kwargs) != (None, None, None):
                raise PropagationError(
                    f"node '{node.name}' ({describe_target(node)}) cannot read the new shape as it is, and "
                    "propagate=False leaves downstream layers unchanged: pass propagate=True to rebuild it",
                    node.name,
                )
        module = outcome.module if outcome.module is not None else old_module
        args = outcome.args if outcome.args is not None else node.args
        kwargs = outcome.kwargs if outcome.kwargs is not None else node.kwargs
        new_meta = None
        if self.mode is not None:
            try:
                result = self.run(node, module, args, kwargs)
            except Exception as error:
                raise PropagationError(
                    f"node '{node.name}' ({describe_target(node)}) fails on its new input: "
                    f"{type(error).__name__}: {error}",
                    node.name,
                ) from error
            new_meta = meta_of(result)
            self.check_shape(node, new_meta, outcome.output)
        if outcome.output is not None:
            self.changes[node] = outcome.output
            self.new_metas[node] = new_meta
            self.dirty.add(node)
        elif new_meta is None and self.mode is not None:
            # A Python value (x.size(1)) may differ now: its users are re-run and checked.
            self.dirty.add(node)
        if not outcome.preserves_function:
            self.plan.breaks_function.append((node.name, outcome.reason))
        elif outcome.module is not None and old_module is not None and self.mode is not None and own_forward(old_module):
            # A rule of a torch.nn base class rebuilt a subclass with a forward of its own
            # (timm's ScaledStdConv2d standardises its weight): the base's claim may not hold.
            new_metas = {arg: self.new_metas.get(arg) for arg in tensor_changes}
            reason = compare_layers(
                node, old_module, outcome.module, tensor_changes, new_metas, outcome.output, self.device
            )
            if reason is not None:
                self.plan.breaks_function.append((node.name, f"{type(old_module).__name__} rebuilt: {reason}"))
        if tensor_changes:
            self.record(node, old_module, outcome)

    def check_shape(self, node: fx.Node, new_meta: Any, change: ChannelChange | None) -> None:
        """The re-run's shape must be the old one with the rule's change applied."""
        old_meta = node.meta.get("tensor_meta")
        if old_meta is None:
            return
        expected = _shapes_of(old_meta)
        if change is not None and isinstance(old_meta, TensorMetadata):
            expected = _changed(old_meta, change)
        elif change is not None and isinstance(old_meta, (tuple, list)) and all(
            isinstance(part, TensorMetadata) for part in old_meta
        ):
            # split/chunk: one change, the same in every part (the rule refuses unequal ones).
            expected = tuple(_changed(part, change) for part in old_meta)
        actual = _shapes_of(new_meta)
        if actual != expected:
            what = "the rule predicted" if change is not None else "it had before (no rule describes a change here)"
            raise PropagationError(
                f"node '{node.name}' ({describe_target(node)}) now produces {_shape_text(new_meta)}, not the "
                f"{_shape_text_from(expected)} {what}",
                node.name,
            )

    def visit_target(self, node: fx.Node, target: Target, old_module: nn.Module | None) -> None:
        new_module = target.module
        input_changes = {arg: self.changes[arg] for arg in node.all_input_nodes if arg in self.changes}
        self.check_placement(node, target, old_module)
        if self.mode is not None:
            inputs = ", ".join(
                _shape_text(self.new_metas.get(arg, arg.meta.get("tensor_meta"))) for arg in node.all_input_nodes
            )
            try:
                result = self.run(node, new_module, node.args, node.kwargs)
            except Exception as error:
                raise ShapeMismatchError(
                    f"{target.label}, node '{node.name}': the new layer {_short(new_module)} cannot read the input "
                    f"that {_short(old_module)} read ({inputs}): {type(error).__name__}: {error}"
                ) from error
            new_meta = meta_of(result)
            self.check_output_dtype(node, target, old_module, new_meta)
            change = self.target_change_from_shapes(node, target, new_meta)
        else:
            new_meta = None
            change = self.target_change_from_widths(node, target, old_module, input_changes)
        if change is not None:
            self.changes[node] = change
            self.new_metas[node] = new_meta
            self.dirty.add(node)
            dropped = change.old_size - change.kept
            if dropped:
                # Narrowing or pruning: the output stays the same only if those channels carried nothing.
                self.plan.breaks_function.append(
                    (
                        node.name,
                        f"drops {dropped} of {change.old_size} old channels; the output is unchanged only if "
                        "they carried nothing",
                    )
                )
        elif new_meta is None and self.mode is not None:
            self.dirty.add(node)
        reason = self.compare(node, target, old_module, input_changes, change)
        if reason is not None:
            self.plan.breaks_function.append((node.name, reason))
        self.plan.edits.append(
            PlannedEdit(
                node=node.name,
                target=str(node.target),
                action=target.action,
                module=new_module,
                old_module=old_module,
                change=change,
            )
        )

    def compare(
        self,
        node: fx.Node,
        target: Target,
        old_module: nn.Module | None,
        input_changes: dict[fx.Node, ChannelChange],
        change: ChannelChange | None,
    ) -> str | None:
        """Why the edit at a target is not function-preserving there, or ``None`` when it is."""
        if old_module is None:
            return "not verified: the replaced call site has no module to compare with"
        if self.mode is None:
            return (
                "not verified: without recorded shapes fxindex cannot run the old and new layer to compare them; "
                "pass example_inputs=(...)"
            )
        new_metas = {arg: self.new_metas.get(arg) for arg in input_changes}
        reason = compare_layers(node, old_module, target.module, input_changes, new_metas, change, self.device)
        if reason is not None and target.action == "remove" and reason.startswith("not function-preserving"):
            return "not function-preserving: removing the layer changes what its users read"
        return reason

    def check_placement(self, node: fx.Node, target: Target, old_module: nn.Module | None) -> None:
        """The new layer's floating-point tensors must have the dtype and device of the layer it replaces."""
        new_tensors = [t for t in (*target.module.parameters(), *target.module.buffers()) if t.is_floating_point()]
        if not new_tensors:
            return
        old_tensors = [
            t for t in (*old_module.parameters(), *old_module.buffers()) if t.is_floating_point()
        ] if old_module is not None else []
        if old_tensors:
            expected_dtype, expected_device, what = old_tensors[0].dtype, old_tensors[0].device, f"{_short(old_module)}'s"
        else:
            meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
            expected_dtype = meta.dtype if isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point else None
            expected_device, what = self.device, "its input's"
        for name, tensor in (*target.module.named_parameters(), *target.module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if expected_dtype is not None and tensor.dtype != expected_dtype:
                raise ShapeMismatchError(
                    f"{target.label}, node '{node.name}': the new layer {_short(target.module)} holds {name!r} as "
                    f"{tensor.dtype}, but {what} dtype is {expected_dtype}; convert it first "
                    f"(new_layer.to({expected_dtype}))"
                )
            if tensor.device != expected_device:
                raise ShapeMismatchError(
                    f"{target.label}, node '{node.name}': the new layer {_short(target.module)} holds {name!r} on "
                    f"{tensor.device}, but {what} device is {expected_device}; move it first "
                    f"(new_layer.to('{expected_device}'))"
                )

    def check_output_dtype(self, node: fx.Node, target: Target, old_module: nn.Module | None, new_meta: Any) -> None:
        old_meta = node.meta.get("tensor_meta")
        if isinstance(old_meta, TensorMetadata) and isinstance(new_meta, TensorMetadata) and old_meta.dtype != new_meta.dtype:
            raise ShapeMismatchError(
                f"{target.label}, node '{node.name}': the new layer {_short(target.module)} returns {new_meta.dtype} "
                f"where {_short(old_module)} returned {old_meta.dtype}; the layers after it expect {old_meta.dtype}"
            )

    def target_change_from_shapes(self, node: fx.Node, target: Target, new_meta: Any) -> ChannelChange | None:
        old_meta = node.meta.get("tensor_meta")
        if not isinstance(old_meta, TensorMetadata) or not isinstance(new_meta, TensorMetadata):
            if _shapes_of(old_meta) != _shapes_of(new_meta):
                raise PropagationError(
                    f"{target.label}: the new layer returns {_shape_text(new_meta)} where the old one returned "
                    f"{_shape_text(old_meta)}; fxindex propagates a change of one tensor's size",
                    node.name,
                )
            if target.keep is not None:
                raise EditError(f"{target.label}: keep= needs a layer that returns one tensor")
            return None
        old_shape, new_shape = tuple(old_meta.shape), tuple(new_meta.shape)
        if len(old_shape) != len(new_shape):
            raise PropagationError(
                f"{target.label}: the new layer returns rank {len(new_shape)} ({_shape_text(new_meta)}) where the old "
                f"one returned rank {len(old_shape)} ({_shape_text(old_meta)})",
                node.name,
            )
        differing = [d for d, (a, b) in enumerate(zip(old_shape, new_shape)) if a != b]
        if len(differing) > 1:
            raise PropagationError(
                f"{target.label}: the new layer changes dimensions {differing} ({_shape_text(old_meta)} -> "
                f"{_shape_text(new_meta)}); fxindex propagates a change of one dimension (channels or features)",
                node.name,
            )
        if not differing:
            if target.keep is None:
                return None
            # Same width, reordered by keep=: the layer's own output dimension says which one.
            widths = find_widths(target.module)
            dim = widths.out_dim % len(old_shape) if widths else min(1, len(old_shape) - 1)
        else:
            dim = differing[0]
        mapping = _slots(target.keep, old_shape[dim], new_shape[dim], target.label)
        return ChannelChange(dim, len(old_shape), old_shape[dim], mapping)

    def target_change_from_widths(
        self,
        node: fx.Node,
        target: Target,
        old_module: nn.Module | None,
        input_changes: dict[fx.Node, ChannelChange],
    ) -> ChannelChange | None:
        """Without shapes: compare the registered widths of the old and new layer."""
        old = target.old_widths or (find_widths(old_module) if old_module is not None else None)
        new = target.new_widths or find_widths(target.module)
        preserving = find_rule(node, target.module) is not None and new is None
        if preserving and old is not None and old.in_size is not None:
            # A shape-preserving layer (ReLU) writes what the old layer read.
            new = Widths(old.in_dim, old.in_size, old.in_dim, old.in_size)
        if old is not None and new is not None and new.in_size is not None:
            expected = next(iter(input_changes.values())).new_size if input_changes else old.in_size
            if expected is not None and new.in_size != expected:
                raise ShapeMismatchError(
                    f"{target.label}, node '{node.name}': the new layer {_short(target.module)} reads {new.in_size} "
                    f"features on dim {new.in_dim}, but its input has {expected} (the old layer "
                    f"{_short(old_module)} read {old.in_size})"
                )
        if input_changes and (new is None or new.out_size is None):
            change = next(iter(input_changes.values()))
            return change if preserving else self._shapes_needed(target)
        if old is not None and new is not None and old.out_size is not None and new.out_size is not None:
            if old.out_size == new.out_size and target.keep is None:
                return None
            mapping = _slots(target.keep, old.out_size, new.out_size, target.label)
            return ChannelChange(new.out_dim, None, old.out_size, mapping)
        if preserving and (old is None or old.out_size is None) and target.keep is None:
            return None
        return self._shapes_needed(target)

    def _shapes_needed(self, target: Target) -> ChannelChange:
        raise ShapesRequiredError(
            f"{target.label}: fxindex cannot tell from module attributes whether {_short(target.module)} changes "
            "the output shape; pass example_inputs=(...) so shapes can be computed"
        )

    def record(self, node: fx.Node, old_module: nn.Module | None, outcome: Outcome) -> None:
        if outcome.module is not None:
            action = "rebuild"
        elif outcome.args is not None or outcome.kwargs is not None:
            action = "rewrite"
        else:
            action = "pass"
        self.plan.edits.append(
            PlannedEdit(
                node=node.name,
                target=str(node.target) if node.op == "call_module" else describe_target(node),
                action=action,
                module=outcome.module,
                args=outcome.args,
                kwargs=outcome.kwargs,
                old_module=old_module,
                old_args=tuple(node.args) if action == "rewrite" else None,
                old_kwargs=dict(node.kwargs) if action == "rewrite" else None,
                weights=outcome.weights,  # the rule's account, split into its clauses
                change=outcome.output,
            )
        )


def _shape_text_from(shape: Any) -> str:
    if shape is None:
        return "?"
    if shape and all(isinstance(part, tuple) for part in shape):
        return "(" + ", ".join(_shape_text_from(part) for part in shape) + ")"
    return "x".join(map(str, shape))


def build_plan(
    graph_module: fx.GraphModule,
    targets: list[Target],
    *,
    propagate: bool = True,
    graph: fx.Graph | None = None,
    extra_modules: dict[str, nn.Module] | None = None,
) -> Plan:
    """Compute the plan of a replacement without modifying ``graph_module``.

    Args:
        graph_module: the traced model (read only; buffers restored if a
            fake run touched them).
        targets: the call sites to replace (nodes of ``graph``).
        propagate: when False, downstream layers are kept as they are and
            must still accept the new shapes.
        graph: the graph to plan on, when it is a copy of
            ``graph_module.graph`` (with shapes for other inputs, or an
            inserted node); default ``graph_module.graph``.
        extra_modules: modules that ``graph`` calls by names that
            ``graph_module`` does not have yet (an inserted layer).

    Returns:
        The :class:`Plan`.
    """
    return _Planner(graph_module, targets, propagate, graph, extra_modules).build()


def planner_for(graph_module: fx.GraphModule, targets: list[Target], graph: fx.Graph | None = None) -> "_Planner":
    """A planner whose steps are run one by one (the coupled replace visits only its target)."""
    return _Planner(graph_module, targets, True, graph)
