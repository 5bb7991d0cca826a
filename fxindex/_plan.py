"""What a replacement will do, as data: the list of node edits and their effect.

A :class:`PlannedEdit` holds what the edit is made of (the old and new
module, the old and new arguments, the rule's account of the weights, the
output's :class:`~fxindex.rules.ChannelChange`); text is made from it only
when it is read (``edit.old``, ``edit.new``...) or printed
(:meth:`Plan.table`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tabulate import multiline_formats, tabulate
from torch import fx, nn

if TYPE_CHECKING:
    from fxindex.rules.registry import ChannelChange

__all__ = ["PlannedEdit", "Plan"]

#: The width :meth:`Plan.table` fits by default: a plain terminal's.
TABLE_WIDTH = 80

_HEADERS = ("node", "action", "new", "weights", "output")
_WIDE_HEADERS = ("node", "target", "action", "old", "new", "weights", "output")
# Below this a wrapped column shows too little of a module or an account to be read.
_MIN_COLUMN = 8
# A column at most this wide (an action, an output change) is never wrapped.
_SHORT_COLUMN = 22
# Formats that draw each line of a wrapped cell as a row of its own (Markdown, Org, Jira):
# their tables are read rendered, where cells wrap anyway, so they are never wrapped.
_LINE_PER_ROW_FORMATS = frozenset({"github", "pipe", "orgtbl", "jira"})


def short_repr(module: nn.Module | None) -> str:
    """``repr(module)`` on one line: a container's many-line repr becomes ``Type(...)``."""
    text = repr(module)
    return text if "\n" not in text else f"{type(module).__name__}(...)"


def arguments_text(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """A call's arguments after the first (the tensor it reads), as ``(-1, 144)``."""
    parts = [arg.name if isinstance(arg, fx.Node) else repr(arg) for arg in args[1:]]
    parts += [f"{key}={value!r}" for key, value in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _fields(text: str) -> tuple[str, list[str]] | None:
    """``"Conv2d(3, 8, kernel_size=(3, 3))"`` -> ``("Conv2d", ["3", "8", "kernel_size=(3, 3)"])``."""
    name, bracket, inner = text.partition("(")
    if not bracket or not inner.endswith(")") or not name.isidentifier():
        return None
    fields, depth, start = [], 0, 0
    inner = inner[:-1]
    for position, char in enumerate(inner):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            fields.append(inner[start:position].strip())
            start = position + 1
    if inner.strip():
        fields.append(inner[start:].strip())
    return name, fields


def _module_change(old: str, new: str) -> str:
    """The new module's repr shortened to its fields up to the last changed one: ``Conv2d(80, 64, ...)``.

    The old module's other fields are the same, and the wide table shows both
    in full. A module of another class shows its first two fields; text that
    is not a one-line module repr is kept.

    Example:
        >>> _module_change("Linear(in_features=8, out_features=2, bias=True)", "Linear(in_features=12, out_features=2, bias=True)")
        'Linear(in_features=12, ...)'
    """
    new_fields = _fields(new)
    if new_fields is None:
        return new
    name, fields = new_fields
    old_fields = _fields(old)
    if old_fields is not None and old_fields[0] == name and len(old_fields[1]) == len(fields):
        changed = [position for position, (a, b) in enumerate(zip(old_fields[1], fields)) if a != b]
        shown = (changed[-1] if changed else 0) + 1
    else:
        shown = 2
    if shown >= len(fields):
        return new
    return f"{name}({', '.join(fields[:shown])}, ...)"


@dataclass(frozen=True, init=False)
class PlannedEdit:
    """One node the replacement touches.

    The edit is kept as data; the text attributes (:attr:`old`, :attr:`new`,
    :attr:`weights`, :attr:`output_change`) are rendered from it when read.
    Each of them may also be given as words when the edit is one the data
    fields cannot state (a coupled group's slots, a resized tensor): words
    given are kept as they are.

    Attributes:
        node: name of the fx node.
        target: qualified module name for ``call_module`` nodes, else the op.
        action: ``"replace"`` (the caller's layer), ``"rebuild"`` (a rule
            rebuilt the module at a new width), ``"rewrite"`` (new arguments),
            ``"remove"`` or ``"pass"`` (shape-preserving, nothing to change).
        module: the module to install (``replace`` and ``rebuild``).
        args: new positional arguments (``rewrite``), or ``None`` (kept).
        kwargs: new keyword arguments (``rewrite``), or ``None`` (kept).
        old_module: the module the node called before the edit, or ``None``.
        old_args: the node's positional arguments before a ``rewrite``.
        old_kwargs: the node's keyword arguments before a ``rewrite``.
        weights_note: the rule's account of the weights, one clause per
            weight (``("64/80 in-channels kept, 16 new (zero)", "bias kept")``);
            empty for the caller's own or a removed layer.
        change: how the node's output changes: a ``ChannelChange``, words for
            a change that is not one dimension's, or ``None`` (the same shape
            at a replaced layer, absorbed elsewhere).
    """

    node: str
    target: str
    action: str
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    args: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    kwargs: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    old_module: nn.Module | None = field(default=None, repr=False, compare=False)
    old_args: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    old_kwargs: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    weights_note: tuple[str, ...] = ()
    change: ChannelChange | str | None = None
    # Words given for the old and new side, when the data fields cannot state them.
    old_words: str | None = field(default=None, repr=False)
    new_words: str | None = field(default=None, repr=False)

    def __init__(
        self,
        node: str,
        target: str,
        action: str,
        *,
        module: nn.Module | None = None,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        old_module: nn.Module | None = None,
        old_args: tuple[Any, ...] | None = None,
        old_kwargs: dict[str, Any] | None = None,
        weights_note: Sequence[str] = (),
        change: ChannelChange | str | None = None,
        old_words: str | None = None,
        new_words: str | None = None,
        old: str | None = None,
        new: str | None = None,
        weights: str | None = None,
        output_change: str | None = None,
    ):
        """Make an edit from data, or from words for what the data cannot state.

        Args:
            node, target, action, module, args, kwargs, old_module, old_args,
                old_kwargs, weights_note, change: the attributes of the same names.
            old_words, new_words: the old and new side in words, kept as given
                (else rendered from ``old_module`` or ``old_args``/``old_kwargs``,
                and from ``module`` or the new arguments).
            old, new: the same as ``old_words``/``new_words``, named as the
                attributes that read them.
            weights: the account of the weights in words, clauses separated
                by ``"; "`` (stored as ``weights_note``).
            output_change: the output's change in words (stored as ``change``).

        Raises:
            TypeError: one side is given twice (``old`` and ``old_words``...).
        """
        for words, name, data in (
            (old, "old", old_words), (new, "new", new_words), (weights, "weights", weights_note or None),
            (output_change, "output_change", change),
        ):
            if words is not None and data is not None:
                raise TypeError(f"PlannedEdit: {name}= repeats what another argument gives; pass one of them")
        if weights is not None:
            weights_note = tuple(part for part in weights.split("; ") if part)
        values = {
            "node": node,
            "target": target,
            "action": action,
            "module": module,
            "args": args,
            "kwargs": kwargs,
            "old_module": old_module,
            "old_args": old_args,
            "old_kwargs": old_kwargs,
            "weights_note": tuple(weights_note),
            "change": output_change if output_change is not None else change,
            "old_words": old if old is not None else old_words,
            "new_words": new if new is not None else new_words,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: the dataclass's own __init__ does the same

    @property
    def old(self) -> str:
        """What the node was, as text: the old module, the old arguments or the op."""
        if self.old_words is not None:
            return self.old_words
        if self.action == "rewrite" and self.old_args is not None:
            return arguments_text(self.old_args, self.old_kwargs or {})
        if self.action == "pass":
            # The op the change passes through: the target names it, and a layer's class says what it is.
            return f"call_module {self.target} ({type(self.old_module).__name__})" if self.old_module is not None else self.target
        return short_repr(self.old_module)

    @property
    def new(self) -> str:
        """What the node becomes, as text: the new module or the new arguments (empty for a pass)."""
        if self.new_words is not None:
            return self.new_words
        if self.action in ("replace", "rebuild"):
            return short_repr(self.module)
        if self.action == "remove":
            return "(input passed through)"
        if self.action == "rewrite" and self.old_args is not None:
            return arguments_text(
                self.args if self.args is not None else self.old_args,
                self.kwargs if self.kwargs is not None else (self.old_kwargs or {}),
            )
        return ""

    @property
    def weights(self) -> str:
        """Which weights are kept, sliced or new, as text."""
        if self.weights_note:
            return "; ".join(self.weights_note)
        return {"replace": "caller's layer", "remove": "removed"}.get(self.action, "")

    @property
    def output_change(self) -> str:
        """How the node's output changes (``"dim 1: 16 -> 21"``), ``"same shape"`` or ``"absorbed"``."""
        if isinstance(self.change, str):
            return self.change
        if self.change is not None:
            return self.change.describe()
        return "same shape" if self.action in ("replace", "remove") else "absorbed"

    def short_new(self) -> str:
        """:attr:`new` for a narrow table: a module only up to its last changed field."""
        if self.action in ("replace", "rebuild"):
            return _module_change(self.old, self.new)
        return self.new

    def __repr__(self) -> str:
        return (
            f"PlannedEdit(node={self.node!r}, target={self.target!r}, action={self.action!r}, old={self.old!r}, "
            f"new={self.new!r}, weights={self.weights!r}, output_change={self.output_change!r})"
        )


def _pieces(text: str) -> list[str]:
    """``text`` cut where a line may break.

    After spaces and after a call's ``(`` (``Linear(`` | ``in_features=8``);
    in a name without spaces (a node), after ``_`` and ``.``.
    """
    breaks = r"(?<=\s)(?=\S)|(?<=\w\()" if " " in text else r"(?<=[_.])(?=.)"
    return [piece for piece in re.split(breaks, text) if piece]


def _wrap(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` characters (a piece longer than that is cut)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for piece in _pieces(paragraph):
            while len(piece.rstrip()) > width:  # one word wider than the column
                if line:
                    lines.append(line.rstrip())
                    line = ""
                lines.append(piece[:width])
                piece = piece[width:]
            if line and len(line) + len(piece.rstrip()) > width:
                lines.append(line.rstrip())
                line = ""
            line += piece
        lines.append(line.rstrip())
    return "\n".join(lines)


def _column_widths(natural: list[int], budget: int) -> list[int]:
    """Widths summing to at most ``budget`` (when it allows ``_MIN_COLUMN`` each).

    Short columns (an action, an output change) keep their width, so they
    never wrap; the others share what is left, a narrower one keeping its
    width when its share allows it.
    """
    widths = list(natural)
    short = [column for column, width in enumerate(natural) if width <= _SHORT_COLUMN]
    left = budget - sum(natural[column] for column in short)
    order = sorted((column for column in range(len(natural)) if column not in short), key=natural.__getitem__)
    for done, column in enumerate(order):
        share = max(_MIN_COLUMN, left // (len(order) - done))
        widths[column] = min(natural[column], share)
        left -= widths[column]
    return widths


def _widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def _fitted_table(rows: list[list[str]], width: int, options: dict[str, Any]) -> str:
    """``tabulate(rows, **options)``, its cells wrapped so that it is at most ``width`` characters wide.

    The format's own characters (separators, padding, a header's margin) are
    measured on the rendered table, not assumed: the text budget of the cells
    shrinks by what the table is still too wide, a few times at most.
    """
    text = tabulate(rows, **options)
    if _widest(text) <= width:
        return text
    # A weights account's clauses ("...; bias kept") each start a line of their own.
    rows = [[cell.replace("; ", ";\n") for cell in row] for row in rows]
    headers = options["headers"]
    natural = [
        max([len(header)] + [max(map(len, row[column].split("\n"))) for row in rows])
        for column, header in enumerate(headers)
    ]
    budget = width - 2 * (len(headers) - 1)
    for _ in range(4):
        widths = _column_widths(natural, budget)
        text = tabulate([[_wrap(cell, widths[column]) for column, cell in enumerate(row)] for row in rows], **options)
        excess = _widest(text) - width
        if excess <= 0 or budget <= _MIN_COLUMN * len(headers):
            break
        budget -= excess
    return text


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

    def table(self, *, wide: bool = False, **tabulate_kwargs: Any) -> str:
        """The plan as a table, followed by a summary of its effect.

        Args:
            wide: every column in full (node, target, action, old, new,
                weights, output), one line per edit. By default the table fits
                80 columns: the columns node, action, new (a module up to its
                last changed field), weights and output, their cells wrapped
                when the rows are wider. The summary lines below the table
                are sentences, left whole for the terminal to wrap.
            **tabulate_kwargs: passed to ``tabulate`` (``tablefmt="github"``...);
                a format that cannot draw a cell of several lines (Markdown's
                ``github`` and ``pipe``, ``html``...) is not wrapped.

        Returns:
            The table and the summary lines.

        Example:
            >>> import torch, fxindex
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            >>> steps = fxindex.plan(net, 0, torch.nn.Linear(4, 12), example_inputs=(torch.randn(1, 4),))
            >>> print(steps.table())  # doctest: +NORMALIZE_WHITESPACE, +ELLIPSIS
            node    action    new                     weights                 output
            ------  --------  ----------------------  ----------------------  --------------
            _0      replace   Linear(in_features=4,   caller's layer          dim 1: 8 -> 12
                              out_features=12, ...)
            _1      rebuild   Linear(in_features=12,  8/12 in-features kept,  absorbed
                              ...)                    4 new (zero);
                                                      bias kept
            function-preserving: no, at node '_0': not function-preserving: ...
        """
        headers = _WIDE_HEADERS if wide else _HEADERS
        rows = [
            [edit.node, edit.target, edit.action, edit.old, edit.new, edit.weights, edit.output_change]
            if wide
            else [edit.node, edit.action, edit.short_new(), edit.weights, edit.output_change]
            for edit in self.edits
        ]
        options: dict[str, Any] = {"headers": headers, "disable_numparse": True}
        options.update(tabulate_kwargs)
        tablefmt = options.get("tablefmt", "simple")
        wraps = isinstance(tablefmt, str) and tablefmt in multiline_formats and tablefmt not in _LINE_PER_ROW_FORMATS
        if not wide and wraps and rows:
            lines = [_fitted_table(rows, TABLE_WIDTH, options)]
        else:
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
        """The plan as HTML, for notebooks (every column: a browser wraps the cells)."""
        from fxindex._notebook import text_to_html

        return text_to_html(self.table(wide=True, tablefmt="html"))
