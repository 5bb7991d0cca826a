"""fxindex: model surgery for PyTorch through torch.fx.

Trace a model, number its layers in execution order, replace the layer at an
index and let the shape change propagate downstream, then benchmark the result.

Example:
    >>> import torch, fxindex
    >>> model = fxindex.examples.SeedModel()
    >>> inputs = fxindex.examples.seed_inputs()
    >>> layers = fxindex.index(model, inputs)
    >>> layers[4].target
    'nested.0'
"""

from __future__ import annotations

from fxindex import examples
from fxindex._bench import BenchReport, BenchRow, SpeedRatio, bench, paired_speed_ratio
from fxindex._errors import (
    FxIndexError,
    LayerIndexError,
    LayerNameError,
    PropagationError,
    RecipeError,
    RegistrationError,
    ShapeMismatchError,
    ShapesRequiredError,
    StaleForwardError,
    TraceError,
    EditError,
    EditWarning,
)
from fxindex._group import ChannelGroup, GroupMember, group, groups
from fxindex._index import LayerEntry, LayerIndex, LayerRef, index
from fxindex._io import load, save
from fxindex._layer_classes import register_layer
from fxindex._plan import Plan, PlannedEdit
from fxindex._replace import deferred_codegen, insert, plan, remove, replace
from fxindex.rules import register_rule
from fxindex._recipe import recipe
from fxindex._resize import plan_resize, resize
from fxindex._shapes import record_shapes
from fxindex._spaces import register_space_rule
from fxindex._speed import is_sped_up, speed_up
from fxindex._table import table
from fxindex._trace import trace

__version__ = "0.1.0"

__all__ = [
    "BenchReport",
    "BenchRow",
    "ChannelGroup",
    "EditError",
    "EditWarning",
    "FxIndexError",
    "GroupMember",
    "LayerEntry",
    "LayerIndex",
    "LayerIndexError",
    "LayerRef",
    "LayerNameError",
    "Plan",
    "PlannedEdit",
    "PropagationError",
    "RecipeError",
    "RegistrationError",
    "ShapeMismatchError",
    "ShapesRequiredError",
    "SpeedRatio",
    "StaleForwardError",
    "TraceError",
    "bench",
    "deferred_codegen",
    "examples",
    "group",
    "groups",
    "index",
    "insert",
    "is_sped_up",
    "load",
    "paired_speed_ratio",
    "plan",
    "plan_resize",
    "recipe",
    "record_shapes",
    "register_layer",
    "register_rule",
    "register_space_rule",
    "remove",
    "replace",
    "resize",
    "save",
    "speed_up",
    "table",
    "trace",
]
