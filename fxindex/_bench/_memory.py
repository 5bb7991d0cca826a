"""Peak memory of one forward: a TorchDispatchMode that tracks tensor storages on CPU, the CUDA allocator on GPU."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CPU_MEMORY_MEASURE", "CUDA_MEMORY_MEASURE", "peak_memory"]

CPU_MEMORY_MEASURE = (
    "cpu: peak of the summed storage bytes of the tensors that aten operators created during one "
    "forward and that were still alive (tracked with a TorchDispatchMode); excludes the parameters, "
    "buffers and inputs that existed before the forward and any scratch memory a kernel allocates "
    "and frees internally"
)
CUDA_MEMORY_MEASURE = (
    "cuda: torch.cuda.max_memory_allocated() during one forward (after reset_peak_memory_stats) "
    "minus torch.cuda.memory_allocated() just before it: the extra memory the forward needs at its peak"
)



class _TensorMemoryMode(TorchDispatchMode):
    """Tracks the storage bytes of the tensors created by aten operators while active.

    An output whose storage is also the storage of one of the operator's
    inputs (a view, an in-place result) adds nothing; a new storage adds its
    size until the last Python tensor using it is freed. Storages that existed
    before the mode (parameters, inputs) are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensor objects]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key is None:
                continue
            entry = self._live.get(key)
            if entry is not None:
                entry[1] += 1
            elif key in inputs:
                continue  # a view or in-place result of a tensor from before the forward
            else:
                size = tensor.untyped_storage().nbytes()
                self._live[key] = [size, 1]
                self.current += size
                self.peak = max(self.peak, self.current)
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None


def peak_memory(model: nn.Module, inputs: tuple[Any, ...], device: torch.device) -> int:
    """Peak memory of one call: see ``CPU_MEMORY_MEASURE`` and ``CUDA_MEMORY_MEASURE``.

    Args:
        model: what to call.
        inputs: its positional inputs, on ``device``.
        device: where it runs.

    Returns:
        The peak, in bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = model(*inputs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del output
        return int(peak)
    mode = _TensorMemoryMode()
    with mode:
        output = model(*inputs)
    del output
    return mode.peak


