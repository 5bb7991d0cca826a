"""Remembered output metadata of whole torch.nn layers during the meta shape pass.

The meta shape pass (:mod:`fxindex._shapes`) runs every layer's own
``forward`` on meta copies of its tensors. Its cost is per node, not per
FLOP: copying the layer to meta, entering the device and kernel modes, the
layer's Python code (``F.batch_norm``'s checks), one dispatch per ATen op.
A real model repeats the same layer on the same shapes (a ResNet stage's
blocks, a transformer's layers), and for torch.nn's own layers the output's
metadata is a function of what this module's key holds: the class, its
plain configuration attributes (``stride``, ``eps``, ``inplace``...), the
metadata of its parameters, buffers and inputs, and the global modes that
change a result's ``requires_grad`` or dtype. So the second call of such a
layer with the same key builds its outputs from the first call's metadata,
as :class:`fxindex._shapes._MetaCache` does one level down for single
kernels.

Only exact ``torch.nn`` classes from the families below take part (a
subclass may override ``forward`` or read other state), only leaves (no
child layers), and only when every configuration attribute is a plain
value. A result that is one of the inputs (``ReLU(inplace=True)``) is
remembered as "returns input i"; one that is a new tensor as its shape,
strides, dtype and ``requires_grad``, rebuilt as a non-leaf when it
requires grad (a real layer's output has a ``grad_fn``, and an in-place op
downstream treats a leaf differently). Anything else is not remembered.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

__all__ = ["LayerCache", "layer_cache"]

# torch.nn families whose layers' forward reads only their configuration, tensors and inputs.
_FAMILIES = frozenset(
    f"torch.nn.modules.{name}"
    for name in (
        "activation",
        "batchnorm",
        "conv",
        "dropout",
        "flatten",
        "instancenorm",
        "linear",
        "normalization",
        "padding",
        "pixelshuffle",
        "pooling",
        "sparse",
        "upsampling",
    )
)
# nn.Module's own bookkeeping (hooks, registries): not configuration; ``training`` is keyed apart.
_MODULE_STATE = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}
_SCALARS = frozenset({int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.memory_format})
_ARG = "A"  # recipe: the result is input number i
_NEW = "T"  # recipe: a new tensor


class _NoKey(Exception):
    """A value the cache cannot key on."""


def _value_key(value: Any) -> Any:
    cls = type(value)
    if cls in _SCALARS:
        return (cls, value)  # 1, 1.0 and True are equal keys, not equal arguments
    if cls is tuple or cls is list or cls is torch.Size:
        return (cls, tuple(_value_key(item) for item in value))
    raise _NoKey


def _tensor_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided:
        raise _NoKey
    return (
        tuple(tensor.shape),
        tensor.stride(),
        tensor.storage_offset(),
        tensor.dtype,
        tensor.device.type,
        tensor.requires_grad,
        tensor.is_leaf,
    )


def _argument_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if type(value) is tuple or type(value) is list:
        return (type(value), tuple(_argument_key(item) for item in value))
    return _value_key(value)


def _eligible(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ in _FAMILIES and not module._modules


class LayerCache:
    """One thread's table of remembered layer results (see the module docstring).

    Args:
        entries: the table, shared by every pass of the thread.
    """

    # Bounded, so a long-lived process planning ever new shapes does not grow it without end.
    MAX_ENTRIES = 20_000

    def __init__(self, entries: dict[Any, Any]) -> None:
        self.entries = entries

    def key(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device) -> Any:
        """The key of calling ``module`` (the caller's layer) on ``args``; ``None`` when it takes no part."""
        if not _eligible(module):
            return None
        try:
            config = tuple(
                (name, _value_key(value)) for name, value in module.__dict__.items() if name not in _MODULE_STATE
            )
            tensors = tuple(
                (name, None if tensor is None else _tensor_key(tensor))
                for table in (module._parameters, module._buffers)
                for name, tensor in table.items()
            )
            inputs = (_argument_key(args), tuple((name, _argument_key(v)) for name, v in kwargs.items()))
        except _NoKey:
            return None
        return (
            type(module),
            module.training,
            config,
            tensors,
            inputs,
            device,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.get_default_dtype(),
        )

    def lookup(self, key: Any, args: tuple[Any, ...]) -> Any:
        """The remembered result rebuilt for ``args``, or ``None`` when ``key`` is not known."""
        recipe = self.entries.get(key)
        if recipe is None:
            return None
        return _build(recipe, args)

    def remember(self, key: Any, module: nn.Module, args: tuple[Any, ...], result: Any) -> None:
        """Remember ``result`` of the call keyed ``key``, if it can be rebuilt exactly."""
        recipe = _recipe(result, args, has_tensors=bool(module._parameters or module._buffers))
        if recipe is None:
            return
        if len(self.entries) >= self.MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = recipe


def _recipe(result: Any, args: tuple[Any, ...], has_tensors: bool) -> Any:
    if isinstance(result, torch.Tensor):
        for position, item in enumerate(args):
            if result is item:
                # An in-place layer: its result is its input, with the input's metadata unchanged
                # (only when it has no tensors of its own that could change ``requires_grad``).
                return None if has_tensors else (_ARG, position)
        if type(result) is not torch.Tensor or result.device.type != "meta" or result.layout != torch.strided:
            return None
        if result.storage_offset() != 0 or result.is_conj() or result.is_neg():
            return None
        if result.requires_grad and (
            result.is_leaf or torch.empty_strided(result.shape, result.stride(), device="meta").clone().stride()
            != result.stride()
        ):
            return None  # rebuilt as a clone, which must keep the strides
        return (_NEW, tuple(result.shape), result.stride(), result.dtype, result.requires_grad)
    if type(result) is tuple:
        items = tuple(_recipe(item, args, has_tensors) for item in result)
        return None if any(item is None for item in items) else (tuple, items)
    return None


def _build(recipe: Any, args: tuple[Any, ...]) -> Any:
    kind = recipe[0]
    if kind == _ARG:
        return args[recipe[1]]
    if kind is tuple:
        return tuple(_build(item, args) for item in recipe[1])
    _, shape, stride, dtype, requires_grad = recipe
    tensor = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if requires_grad:
        # A non-leaf, like a real layer's output: an in-place op on it is allowed and recorded.
        tensor = tensor.requires_grad_().clone()
    return tensor


_shared = threading.local()


def layer_cache() -> LayerCache:
    """This thread's layer cache (one table per thread, shared by its passes)."""
    entries = getattr(_shared, "entries", None)
    if entries is None:
        entries = _shared.entries = {}
    return LayerCache(entries)
