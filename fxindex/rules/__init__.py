"""Propagation rules, one file per family; importing this package registers them all.

``registry`` holds the mechanism (:func:`register_rule`, :class:`Step`,
:class:`Outcome`, :class:`ChannelChange`); the other modules hold the rules of
one family each: ``linear``, ``conv``, ``norm``, ``recurrent``,
``elementwise`` (shape-preserving ops, pooling, softmax), ``join``
(binary ops and concatenation), ``reshape`` (flatten, view, permute) and
``reduce`` (mean, sum).
"""

from fxindex.rules import conv, elementwise, join, linear, norm, recurrent, reduce, reshape  # noqa: F401  (registers)
from fxindex.rules.registry import (
    ChannelChange,
    Outcome,
    Step,
    Widths,
    find_rule,
    find_widths,
    register_rule,
    register_widths,
)

__all__ = [
    "ChannelChange",
    "Outcome",
    "Step",
    "Widths",
    "find_rule",
    "find_widths",
    "register_rule",
    "register_widths",
]
