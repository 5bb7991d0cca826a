"""Checking bench's arguments and preparing models and inputs without touching the caller's."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["batch_size", "clone_inputs", "inference", "prepare_inputs", "prepare_model", "reason", "validate"]


def validate(
    models: Any,
    example_inputs: Any,
    device: Any,
    dtype: Any,
    compile: Any,
    min_run_time: Any,
    baseline: Any,
    rounds: Any,
) -> tuple[dict[str, nn.Module], torch.device, str]:
    """Check :func:`fxindex.bench`'s arguments (see its Raises section for what is refused).

    Args:
        models: the ``models`` argument.
        example_inputs: the ``example_inputs`` argument.
        device: the ``device`` argument.
        dtype: the ``dtype`` argument.
        compile: the ``compile`` argument.
        min_run_time: the ``min_run_time`` argument.
        baseline: the ``baseline`` argument.
        rounds: the ``rounds`` argument.

    Returns:
        ``(models as a dict, the resolved device, the baseline's name)``.
    """
    if not isinstance(models, Mapping):
        raise TypeError(
            "models must be a mapping of name -> nn.Module, e.g. {'original': model, 'rebuilt': gm}; "
            f"got {type(models).__name__}"
        )
    if not models:
        raise ValueError("models is empty: expected at least one name -> nn.Module entry")
    for name, model in models.items():
        if not isinstance(name, str):
            raise TypeError(f"model names must be strings, got {name!r} ({type(name).__name__})")
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; "
            "write (x,) for a single input"
        )
    if baseline is None:
        baseline = next(iter(models))
    elif baseline not in models:
        names = ", ".join(repr(name) for name in models)
        raise ValueError(f"baseline {baseline!r} is not one of the model names: {names}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float16) or None, got {dtype!r}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a device torch knows: {error}") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        torch_device = _resolve_device(torch_device)
    if not isinstance(compile, (bool, Mapping)):
        raise TypeError(
            f"compile must be True/False or a dict of torch.compile options, got {type(compile).__name__}"
        )
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)) or not min_run_time > 0:
        raise ValueError(f"min_run_time must be a positive number of seconds, got {min_run_time!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return dict(models), torch_device, baseline


def _tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _needs_move(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> bool:
    for tensor in _tensors_of(module):
        if tensor.device != device:
            return True
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return True
    return False


def _resolve_device(device: torch.device) -> torch.device:
    """``cuda`` means the current CUDA device: give it its index so devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself when it is already on ``device`` in ``dtype``, else a moved deep copy."""
    if not _needs_move(model, device, dtype):
        return model
    # A copy: the caller's model must come back exactly as given.
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def prepare_inputs(inputs: tuple[Any, ...], device: torch.device, dtype: torch.dtype | None) -> tuple[Any, ...]:
    """``inputs`` with every tensor moved to ``device`` and floating ones converted to ``dtype``.

    Args:
        inputs: the example inputs (nested containers allowed).
        device: the target device.
        dtype: the floating dtype, or ``None`` to keep it.

    Returns:
        New inputs; the caller's tensors are not changed.
    """
    def convert(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value

    return pytree.tree_map(convert, inputs)


def batch_size(inputs: tuple[Any, ...]) -> int:
    """Dimension 0 of the first tensor with a dimension in ``inputs`` (1 without one).

    Args:
        inputs: the example inputs.

    Returns:
        The batch size.
    """
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


@contextlib.contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; every module's training flag restored after."""
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for submodule, training in flags:
            submodule.training = training


def clone_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    # A model that writes into its input must not change what the next model sees.
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, inputs)


def reason(error: BaseException) -> str:
    """``"ErrorType: first line of the message"``, for one-line notes.

    Args:
        error: the exception.

    Returns:
        The text.
    """
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


