"""fxindex's extension API, and the built-in rules (importing this package registers them all).

Everything a rule for a user's layer needs is importable from here:

- forward propagation (``replace`` carrying a width change downstream):
  :func:`register_rule`, :class:`Step`, :class:`Outcome`,
  :class:`ChannelChange`, :func:`register_widths`, :class:`Widths`;
- channel spaces (``group``, ``resize``, and ``replace`` at joins):
  :func:`register_space_rule`, :class:`SpaceContext`,
  :class:`RebuildRequest`, :class:`NodeEdit`, ``SlotMapping``;
- helpers for both: :func:`rebuild` (a copy of a module with some
  attributes and tensors swapped), :func:`remap` (a tensor rebuilt along one
  dimension for a slot mapping), :func:`describe_slots`, :func:`argument`,
  :func:`describe_target`;
- :func:`using`: rules in effect for one ``with`` block only (a per-call
  override), consulted before the registered ones;
- :func:`register_layer`: make a user's layer class savable in recipes
  (``fxindex.save``/``fxindex.load``).

A module class with a rule of either kind is traced as one layer by default
(no ``leaf_modules`` needed); ``trace(..., trace_into=[MyLayer])`` still
traces through it.

The built-in rules live one family per module: ``linear``, ``conv``,
``norm``, ``recurrent``, ``elementwise`` (shape-preserving ops, pooling,
softmax), ``join`` (binary ops and concatenation), ``reshape`` (flatten,
view, permute) and ``reduce`` (mean, sum) for propagation; ``spaces`` for
the channel-space relations (imported when a group is first analysed).
"""

from fxindex._layer_classes import register_layer
from fxindex.rules import conv, elementwise, join, linear, norm, recurrent, reduce, reshape  # noqa: F401  (registers)
from fxindex.rules import transformers as _transformers  # noqa: F401  (registers Conv1D's rules when transformers loads)
from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import (
    ChannelChange,
    Outcome,
    Step,
    Widths,
    argument,
    describe_slots,
    describe_target,
    find_rule,
    find_widths,
    register_rule,
    register_widths,
    remap,
    using,
)
from fxindex._spaces import (
    NodeEdit,
    RebuildRequest,
    SlotMapping,
    SpaceContext,
    find_space_rule,
    register_space_rule,
)

__all__ = [
    "ChannelChange",
    "NodeEdit",
    "Outcome",
    "RebuildRequest",
    "SlotMapping",
    "SpaceContext",
    "Step",
    "Widths",
    "argument",
    "describe_slots",
    "describe_target",
    "find_rule",
    "find_space_rule",
    "find_widths",
    "rebuild",
    "register_layer",
    "register_rule",
    "register_space_rule",
    "register_widths",
    "remap",
    "using",
]
