"""Rules for layers of Hugging Face transformers: GPT-2's ``Conv1D``.

``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, DistilGPT-2's ``c_attn``,
``c_fc`` and ``c_proj``) is a Linear with its weight stored transposed: the
weight is ``(nx, nf)`` = ``(in, out)`` and ``y = x @ W + b``. It has a
propagation rule (a change of its input features rebuilds ``nx``, new rows
zero, like ``nn.Linear``'s in-features), a channel-space rule (it reads the
last dim and writes a fresh one, like ``nn.Linear``) and its widths; with
a rule it is traced as one layer.

transformers is optional, and importing it takes about a second, so this
module never imports it: the rules are registered as soon as
``transformers.pytorch_utils`` is imported (at once when it already is, else
by a one-shot import hook that runs after that module has loaded). A model
with a ``Conv1D`` has imported it before fxindex sees the model.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

from torch import nn

from fxindex._errors import RegistrationError
from fxindex._spaces import NodeEdit, RebuildRequest, SlotMapping, SpaceContext, register_space_rule
from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import Outcome, Step, Widths, argument, describe_slots, register_rule, register_widths, remap

__all__ = ["CONV1D_MODULE", "register_transformers_rules"]

CONV1D_MODULE = "transformers.pytorch_utils"
"""The module that defines ``Conv1D``; its import registers the rules."""

_registered: list[type] = []
_lock = threading.Lock()


def _account(mapping: SlotMapping, old: int, what: str) -> str:
    kept = sum(slot is not None for slot in mapping)
    parts = [f"{kept}/{len(mapping)} {what} kept"]
    if len(mapping) - kept:
        parts.append(f"{len(mapping) - kept} new (zero)")
    if old - kept:
        parts.append(f"{old - kept} dropped")
    return ", ".join(parts)


def conv1d_widths(module: nn.Module) -> Widths:
    """``Conv1D`` reads and writes the last dim: ``nx`` features in, ``nf`` out."""
    return Widths(in_dim=-1, in_size=int(module.nx), out_dim=-1, out_size=int(module.nf))


def propagate_conv1d(step: Step) -> Outcome:
    """``Conv1D`` reads the last dimension: rebuild ``nx``; new input features get zero weight rows.

    Args:
        step: the node whose input changed.

    Returns:
        The rebuilt layer; its output (``nf`` features) is unchanged.

    Raises:
        PropagationError: the change is not on the last dimension.
    """
    change = step.input_change()
    if not change.reads(-1, step.rank(step.node.args[0])):
        raise step.fail(f"Conv1D reads the last dimension but the change is on {change.describe()}")
    module = step.module
    assert module is not None
    # The weight is (in, out): the input features are its rows, dim 0.
    weight = remap(module.weight, 0, change.mapping)
    return Outcome(
        output=None,
        module=rebuild(module, attributes={"nx": change.new_size}, parameters={"weight": weight}),
        weights=describe_slots(change, "in-features", new_as="zero") + "; bias kept",
    )


def _rebuild_conv1d(request: RebuildRequest) -> NodeEdit:
    module = request.module
    assert module is not None
    out, inp = request.mapping("out"), request.mapping("in")
    # (in, out): rows are input features, columns output features (nn.Linear's transpose).
    parameters = {"weight": remap(remap(module.weight, 1, out), 0, inp)}
    if getattr(module, "bias", None) is not None:
        parameters["bias"] = remap(module.bias, 0, out)
    accounts = []
    if request.changed("out"):
        accounts.append(_account(out, int(module.nf), "out-features"))
    if request.changed("in"):
        accounts.append(_account(inp, int(module.nx), "in-features"))
    return NodeEdit(
        module=rebuild(module, attributes={"nx": len(inp), "nf": len(out)}, parameters=parameters),
        weights="; ".join(accounts),
    )


def relate_conv1d(context: SpaceContext) -> None:
    """``Conv1D`` reads the last dim and writes a fresh one; other dims pass (as ``nn.Linear``)."""
    dims = context.dims(argument(context.node, 0, "x"))
    shape = context.shape(context.node)
    if dims is None or shape is None:
        context.block_inputs("Conv1D without recorded shapes")
        return
    out = context.fresh(shape[-1])
    context.member("consumer", "in", dims[-1], "Conv1D nx", _rebuild_conv1d)
    context.member("producer", "out", out, "Conv1D nf", _rebuild_conv1d)
    context.output(dims[:-1] + (out,))


def register_transformers_rules(module: ModuleType | None = None) -> bool:
    """Register the rules of ``Conv1D``, once, if ``transformers.pytorch_utils`` is imported.

    Args:
        module: the imported ``transformers.pytorch_utils`` (default: from ``sys.modules``).

    Returns:
        Whether the rules are registered now.
    """
    module = module if module is not None else sys.modules.get(CONV1D_MODULE)
    conv1d = getattr(module, "Conv1D", None)
    if not isinstance(conv1d, type) or not issubclass(conv1d, nn.Module):
        return False
    with _lock:
        if conv1d not in _registered:
            _registered.append(conv1d)
            for register, rule in (
                (register_widths, conv1d_widths),
                (register_rule, propagate_conv1d),
                (register_space_rule, relate_conv1d),
            ):
                try:
                    register(conv1d)(rule)
                except RegistrationError:
                    pass  # the user registered a rule of their own first: it stays
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: makes the loader of ``transformers.pytorch_utils`` register the rules after it ran.

    It asks the finders after it for the module's spec and wraps that
    spec's ``exec_module``; the module, its file and its loader are the ones
    Python would have used anyway. It takes itself off ``sys.meta_path`` once
    the rules are registered.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != CONV1D_MODULE:
            return None
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        execute = getattr(loader, "exec_module", None)
        if spec is None or execute is None:
            return spec

        def exec_module(module: ModuleType) -> None:
            execute(module)
            if register_transformers_rules(module) and self in sys.meta_path:
                sys.meta_path.remove(self)

        # The loader object is this module's own (one per file): the wrapper lives only on it.
        loader.exec_module = exec_module  # type: ignore[union-attr]
        return spec


if not register_transformers_rules() and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport())
