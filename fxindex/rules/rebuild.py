"""Rebuilding a module at a new size while keeping everything else about it.

Rules do not call a layer's constructor: a subclass may take other arguments,
and the user's module carries state a constructor would lose (training flag,
hooks, dtype, device, extra attributes). Instead a rebuilt module is a copy of
the old one's object with some attributes, parameters and buffers swapped,
and every tensor fresh, so the result shares no storage with the original.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["rebuild"]


def rebuild(
    module: nn.Module,
    *,
    attributes: dict[str, Any] | None = None,
    parameters: dict[str, torch.Tensor] | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A new module like ``module``, with the given attributes and tensors replaced.

    Args:
        module: the module to copy. It is not modified.
        attributes: plain attributes to set (``in_features``...).
        parameters: new values of parameters, by name; each becomes a new
            ``nn.Parameter`` with the old one's ``requires_grad``.
        buffers: new values of buffers, by name.

    Returns:
        The rebuilt module. Parameters and buffers not named are cloned.
    """
    new = copy.copy(module)
    # copy.copy shares the dicts that hold parameters, buffers, submodules and
    # hooks: give the new module its own so the old one stays untouched.
    for name, value in vars(module).items():
        if isinstance(value, dict):
            object.__setattr__(new, name, copy.copy(value))
    for name, value in (attributes or {}).items():
        object.__setattr__(new, name, value)
    with torch.no_grad():
        for name, old in module._parameters.items():
            if old is None:
                continue
            value = parameters[name] if parameters and name in parameters else old
            new._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
        for name, old in module._buffers.items():
            if old is None:
                continue
            value = buffers[name] if buffers and name in buffers else old
            new._buffers[name] = value.detach().clone()
        for name, child in module._modules.items():
            new._modules[name] = copy.deepcopy(child) if child is not None else None
    # RNNs keep a flat list of their weights for cuDNN; refresh it to the new tensors.
    refresh = getattr(new, "_init_flat_weights", None)
    if callable(refresh):
        refresh()
    return new
