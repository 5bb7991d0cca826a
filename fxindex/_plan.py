"""What a replacement will do, as data: the list of node edits and their effect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate
from torch import nn

__all__ = ["PlannedEdit", "Plan"]


@dataclass(frozen=True)
class PlannedEdit:
    """One node the replacement touches.

    Attributes:
        node: name of the fx node.
        target: qualified module name for ``call_module`` nodes, else the op.
        action: ``"replace"`` (the caller's layer), ``"rebuild"`` (a rule
            rebuilt the module at a new width), ``"rewrite"`` (new arguments),
            ``"remove"`` or ``"pass"`` (shape-preserving, nothing to change).
        old: the old module or arguments, as text.
        new: the new module or arguments, as text.
        weights: which weights are kept, sliced or new.
        output_change: how the node's output changes (``"dim 1: 16 -> 21"``)
            or ``"absorbed"``.
        module: the module to install (``replace`` and ``rebuild``).
        args: new positional arguments (``rewrite``), or ``None``.
        kwargs: new keyword arguments (``rewrite``), or ``None``.
    """

    node: str
    target: str
    action: str
    old: str
    new: str
    weights: str
    output_change: str
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    args: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    kwargs: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class Plan:
    """The changes a replacement makes, computed without modifying anything.

    Attributes:
        edits: the touched nodes, in graph order.
        breaks_function: ``(node, reason)`` for each place where new channels
            change values of old ones (LayerNorm, GroupNorm...); empty when
            the edit is function-preserving.
        output_changes: how each changed graph output changes shape.
        new_metas: the recorded shapes of changed nodes after the edit.
        tensors: new values of parameters and buffers read through
            ``get_attr`` (a layer-scale ``gamma``, a ``cls_token``), by
            qualified name: a coupled group resizes them.
        group: the producers of the channel group the edit resized as a
            whole (empty when the change travelled forward alone).
    """

    edits: list[PlannedEdit]
    breaks_function: list[tuple[str, str]] = field(default_factory=list)
    output_changes: list[str] = field(default_factory=list)
    new_metas: dict[str, Any] = field(default_factory=dict, repr=False)
    tensors: dict[str, Any] = field(default_factory=dict, repr=False)
    group: tuple[str, ...] = ()

    @property
    def preserves_function(self) -> bool:
        """True when old channels keep their values wherever the change travels.

        Widening whose new outputs copy old ones then leaves the model's output
        unchanged (new input slots of consumers start at zero). An edit that
        drops channels (narrowing, pruning with ``keep=``) is not preserving:
        the output stays the same only if the dropped channels carried nothing,
        which the plan cannot know; ``breaks_function`` says so.
        """
        return not self.breaks_function

    @property
    def changes_output(self) -> bool:
        """Whether the model's output shape changes."""
        return bool(self.output_changes)

    def table(self, **tabulate_kwargs: Any) -> str:
        """The plan as a table, followed by a summary of its effect."""
        rows = [
            (edit.node, edit.target, edit.action, edit.old, edit.new, edit.weights, edit.output_change)
            for edit in self.edits
        ]
        options: dict[str, Any] = {"headers": ("node", "target", "action", "old", "new", "weights", "output")}
        options.update(tabulate_kwargs)
        lines = [tabulate(rows, **options)]
        if self.group:
            lines.append(f"coupled group resized as a whole: producers {', '.join(self.group)}")
        if self.preserves_function:
            lines.append("function-preserving: yes (old channels keep their values)")
        else:
            for node, reason in self.breaks_function:
                lines.append(f"function-preserving: no, at node '{node}': {reason}")
        for change in self.output_changes:
            lines.append(f"model output changes: {change}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        """The plan as HTML, for notebooks."""
        from fxindex._notebook import text_to_html

        return text_to_html(self.table(tablefmt="html"))
