"""The torchvision classification zoo, as test data (a helper module, not a test file).

Import it from a test as ``import zoo`` (tests/conftest.py puts tests/ on sys.path).

    ZOO_MODELS        every classification model torchvision registers, sorted.
    TRACE_FAILURES    model name -> (exception type, message regex, reason): the
                      models fxindex.trace / fxindex.index is expected to refuse.
    TRACEABLE_MODELS  ZOO_MODELS minus TRACE_FAILURES.
    SLOW_MODELS       model name -> why it is slow (building it takes seconds).
    build_zoo_model(name) -> (model, example_inputs): random weights
                      (weights=None, nothing is downloaded), seeded, eval mode.
    zoo_input_size(name) -> the square input side used for ``name``.
    release_memory()  collect garbage and trim the heap: once after each model.
    frozen_heap()     a context manager that freezes what is alive (gc.freeze), so
                      release_memory() costs milliseconds instead of ~0.4 s.

Models are built at full size (constructor defaults) except where noted in
BUILD_KWARGS; inputs are small (64x64 unless INPUT_SIZES says otherwise), which
keeps a trace + shape pass + real forward of the whole zoo to a few minutes on
two CPU cores.  Figures measured with torch 2.14 / torchvision 0.29 on 2 cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator
from typing import Any

import torch
import torchvision
from torch import nn

__all__ = [
    "ZOO_MODELS",
    "TRACE_FAILURES",
    "TRACEABLE_MODELS",
    "SLOW_MODELS",
    "DEFAULT_INPUT_SIZE",
    "INPUT_SIZES",
    "BUILD_KWARGS",
    "build_zoo_model",
    "zoo_input_size",
    "release_memory",
    "frozen_heap",
]

ZOO_MODELS: list[str] = sorted(torchvision.models.list_models(module=torchvision.models))

DEFAULT_INPUT_SIZE = 64

# Constructor arguments beyond weights=None.
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    # Without aux_logits the output is one tensor in both modes; init_weights is
    # given explicitly so torchvision does not warn about a changing default.
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
    # ViTs size their position embedding from image_size (default 224): shrink
    # the image, not the model, so the shape pass stays fast.
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
}

# Square input side where 64 does not work.
INPUT_SIZES: dict[str, int] = {
    "inception_v3": 80,  # needs at least 75x75
    # Window partitioning with a fixed partition_size of 7 after a /32 stem:
    # the side must be a multiple of 224 (the constructor cannot change 7).
    "maxvit_t": 224,
    "vit_b_16": 32,
    "vit_b_32": 32,
    "vit_l_16": 32,
    "vit_l_32": 32,
    "vit_h_14": 28,
}

# Every torchvision classification model traces with torch.fx in torchvision
# 0.29 (torch 2.14), so nothing is expected to fail.  When an upgrade breaks
# one, record it here as
#     "name": (fxindex.TraceError, r"regex of the message", "why it fails"),
# and the zoo test asserts exactly that failure instead of the index checks.
TRACE_FAILURES: dict[str, tuple[type[BaseException], str, str]] = {}

TRACEABLE_MODELS: list[str] = [name for name in ZOO_MODELS if name not in TRACE_FAILURES]

# Built at full size they take seconds just to initialise their weights
# (measured build times on 2 cores); they still run in the zoo test.
SLOW_MODELS: dict[str, str] = {
    "regnet_y_128gf": "645M parameters: ~8 s to build, ~1.7 s per forward",
    "vit_h_14": "632M parameters: ~8 s to build",
    "vit_l_16": "304M parameters: ~4.5 s to build",
    "vit_l_32": "306M parameters: ~4.5 s to build",
    "convnext_large": "198M parameters: ~3 s to build",
}


def zoo_input_size(name: str) -> int:
    """The square input side used for ``name``."""
    return INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE)


def build_zoo_model(name: str, *, batch_size: int = 1, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Build zoo model ``name`` with random weights, in eval mode, and its inputs.

    Returns:
        ``(model, (x,))`` with ``x`` of shape ``(batch_size, 3, side, side)``.
    """
    if name not in ZOO_MODELS:
        raise KeyError(f"{name!r} is not a torchvision classification model")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    model.eval()
    side = zoo_input_size(name)
    generator = torch.Generator().manual_seed(seed + 1)
    return model, (torch.randn(batch_size, 3, side, side, generator=generator),)


def _libc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` off glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def release_memory() -> None:
    """Free what the last model left and hand the heap back to the OS.

    Weights of 1-32 MB come from glibc's heap, which keeps freed memory for
    reuse; after a few hundred-million-parameter models the test process would
    hold many GB it no longer uses and the machine (24 GB) would kill it.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, garbage collections skip every object alive at its start.

    A full ``gc.collect()`` walks every tracked object: with torch, torchvision
    and the rest of the test session loaded that is ~350k objects and 0.1-0.5 s,
    whatever the model. ``gc.freeze()`` moves them to the permanent generation,
    so a collection inside the block only walks what the zoo test built since,
    in milliseconds. Garbage is collected first, so nothing unreachable is kept;
    on exit the objects are unfrozen and collected normally again.

    Use from a module-scoped fixture of a zoo test file::

        @pytest.fixture(autouse=True, scope="module")
        def _frozen_heap():
            with zoo.frozen_heap():
                yield

    Yields:
        Nothing.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
