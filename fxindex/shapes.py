"""Recording tensor shapes on fx nodes, with fake tensors when possible.

Shapes follow torch.fx's ShapeProp convention: ``node.meta["tensor_meta"]`` is
a ``torch.fx.passes.shape_prop.TensorMetadata`` (or a tuple/list of them for a
node that returns several tensors).  fxindex computes them under a
``FakeTensorMode``, so a large model costs no real arithmetic, and falls back
to one real forward only where fake propagation fails (data-dependent ops).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from fxindex.errors import ShapeMismatchError

__all__ = [
    "TensorMetadata",
    "tensor_meta",
    "record_shapes",
    "record_shapes_on",
    "make_fake_mode",
    "fake_tensor_like",
    "meta_of",
    "preserving_buffers",
    "quiet_fake_errors",
    "NOT_GIVEN_KEY",
    "shapes_recorded",
]

# ``node.meta[NOT_GIVEN_KEY] = True`` on a placeholder whose argument the example inputs
# left out: the recorded run saw its default (``None``, ``False``...), not a tensor, so
# its missing ``tensor_meta`` does not mean "shapes unknown".
NOT_GIVEN_KEY = "fxindex_not_given"


def tensor_meta(node: fx.Node) -> TensorMetadata | None:
    """Return the single-tensor metadata recorded on ``node``, or ``None``.

    Nodes that return several tensors (an LSTM's tuple) have no single meta.
    """
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def shapes_recorded(graph: fx.Graph) -> bool:
    """Whether every placeholder of ``graph`` has its shape recorded or was not given.

    A placeholder has its shape when it carries ``tensor_meta``; one marked
    with :data:`NOT_GIVEN_KEY` is an optional argument of ``forward`` that the
    example inputs left out, known not to be a tensor, so it needs none. A
    graph without placeholders passes (callers decide what that means).

    Args:
        graph: a traced graph.

    Returns:
        True when no placeholder lacks a recorded shape it would need.
    """
    return all(
        "tensor_meta" in node.meta or bool(node.meta.get(NOT_GIVEN_KEY))
        for node in graph.find_nodes(op="placeholder")
    )


def make_fake_mode() -> FakeTensorMode:
    """A fake mode in which real parameters may meet fake activations.

    ``allow_non_fake_inputs`` lets modules keep their real weights: nothing is
    copied, and only metadata is computed. One mode is shared by all calls in
    a thread: its caches make the second replace on a model several times
    cheaper than the first.
    """
    mode = getattr(_shared, "mode", None)
    if mode is None:
        mode = _shared.mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


_shared = threading.local()


def fake_tensor_like(meta: TensorMetadata, mode: FakeTensorMode, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fake tensor with ``meta``'s shape, dtype and memory format, on ``device``."""
    with mode:
        tensor = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if meta.memory_format is not None and meta.memory_format != torch.contiguous_format:
            tensor = tensor.contiguous(memory_format=meta.memory_format)
        return tensor


class _QuietInThisThread(logging.Filter):
    """Drops records logged by a thread while it is inside :func:`quiet_fake_errors`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_shared, "quiet", 0)


_FAKE_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")
_FAKE_LOGGER.addFilter(_QuietInThisThread())


@contextlib.contextmanager
def quiet_fake_errors() -> Iterator[None]:
    """Silence torch's log of failed fake kernels inside the block, in this thread only.

    FakeTensorMode logs a full traceback when an op fails on fake tensors,
    before raising; fxindex catches that error and reports it in one line, so
    the log would only repeat it as noise on stderr. A filter on the logger,
    keyed by a thread-local depth, does the silencing: the logger's level is
    never touched, so concurrent calls cannot leave it changed and other
    threads' records still get through.
    """
    _shared.quiet = getattr(_shared, "quiet", 0) + 1
    try:
        yield
    finally:
        _shared.quiet -= 1


# One lock for every block that may bump real buffers: two threads planning on one model
# must not save each other's bumped values and restore them as the "original".
_BUFFER_LOCK = threading.RLock()


@contextlib.contextmanager
def preserving_buffers(module: nn.Module) -> Iterator[None]:
    """Undo any in-place update of ``module``'s buffers made inside the block.

    A shape pass must not count as a training step: BatchNorm in training mode
    bumps ``num_batches_tracked`` even under fake tensors. Buffers are small, so
    a copy is cheap. Blocks are serialised across threads (a re-entrant lock),
    so concurrent edits of one model each restore the true original values.
    """
    with _BUFFER_LOCK:
        saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
        try:
            yield
        finally:
            # Written back unconditionally: BatchNorm's native kernel updates running
            # statistics without bumping the tensor's version counter.
            with torch.no_grad():
                for buffer, copy in saved:
                    buffer.copy_(copy)


def meta_of(result: Any) -> Any:
    """The ``tensor_meta`` of a node's result (nested like it), or ``None`` when it holds no tensor."""
    found = False

    def extract(value: Any) -> Any:
        nonlocal found
        if isinstance(value, torch.Tensor):
            found = True
            return _extract_tensor_metadata(value)
        return value

    meta = map_aggregate(result, extract)
    return meta if found else None


_MISSING = object()


class _ShapeRecorder(fx.Interpreter):
    """An Interpreter that writes each node's ``tensor_meta`` as it runs.

    Layers are called through ``forward``, not ``__call__``: a shape pass is
    not a use of the model, so the user's forward hooks (a logger, a hook that
    calls ``.numpy()``, which fails on fake tensors) do not run.
    """

    def __init__(self, module: fx.GraphModule, metas: dict[fx.Node, Any], graph: fx.Graph | None = None):
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.metas = metas
        self.failed_node: fx.Node | None = None
        # Placeholders that got no example input and ran on their default.
        self.not_given: set[fx.Node] = set()
        self._running: fx.Node | None = None

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.fetch_attr(target).forward(*args, **kwargs)

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The next example input, or the default of an optional argument that was left out."""
        node = self._running
        if str(target).startswith("*"):
            rest = list(self.args_iter)
            if not rest and node is not None:
                self.not_given.add(node)  # *args given nothing
            return rest
        value = next(self.args_iter, _MISSING)
        if value is not _MISSING:
            return value
        if not args:
            raise RuntimeError(f"no example input for the required argument {target!r} of forward")
        if node is not None:
            self.not_given.add(node)
        return args[0]

    def run_node(self, n: fx.Node) -> Any:
        self._running = n
        try:
            result = super().run_node(n)
        except Exception:
            if self.failed_node is None:
                self.failed_node = n
            raise
        meta = meta_of(result)
        if meta is not None:
            self.metas[n] = meta
        return result


def _describe_inputs(example_inputs: tuple[Any, ...]) -> str:
    parts = [
        f"Tensor{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        for value in example_inputs
    ]
    return "(" + ", ".join(parts) + ")"


def record_shapes(graph_module: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Run ``graph_module`` on ``example_inputs`` and record every node's shape.

    Fake tensors are tried first; a real forward (without autograd, with
    buffers restored afterwards) is the fallback.

    Args:
        graph_module: the traced module; only its nodes' ``meta`` change.
        example_inputs: a tuple of example inputs, one per placeholder.

    Raises:
        TypeError: ``example_inputs`` is not a tuple.
        ShapeMismatchError: the inputs do not fit the model; names the node
            that failed and the inputs given.

    Example:
        >>> import torch, fxindex
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 5))
        >>> fxindex.record_shapes(gm, (torch.randn(7, 3),))
        >>> [(n.name, tuple(n.meta["tensor_meta"].shape)) for n in gm.graph.nodes]  # get_attr nodes too
        [('input_1', (7, 3)), ('weight', (5, 3)), ('bias', (5,)), ('linear', (7, 5)), ('output', (7, 5))]
    """
    record_shapes_on(graph_module, graph_module.graph, example_inputs)


def record_shapes_on(graph_module: fx.GraphModule, graph: fx.Graph, example_inputs: tuple[Any, ...]) -> None:
    """:func:`record_shapes` for ``graph``, a copy of ``graph_module``'s graph.

    Planning on a copy is how ``plan`` and ``replace`` record shapes for new
    example inputs without touching the caller's GraphModule: only the
    nodes of ``graph`` get new ``meta``.
    """
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; "
            "write (x,) for a single input"
        )
    metas: dict[fx.Node, Any] = {}
    not_given: set[fx.Node] = set()
    with preserving_buffers(graph_module):
        try:
            mode = make_fake_mode()
            fake_inputs = tuple(
                mode.from_tensor(value) if isinstance(value, torch.Tensor) else value for value in example_inputs
            )
            recorder = _ShapeRecorder(graph_module, metas, graph)
            with mode, quiet_fake_errors():
                recorder.run(*fake_inputs)
            not_given = recorder.not_given
        except Exception:
            # Data-dependent ops (.item(), nonzero) have no fake kernel: fall back to one real run.
            metas.clear()
            recorder = _ShapeRecorder(graph_module, metas, graph)
            try:
                # fork_rng: dropout in train mode must not advance the caller's random stream.
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    recorder.run(*example_inputs)
                not_given = recorder.not_given
            except Exception as error:
                node = recorder.failed_node
                where = f"node '{node.name}' ({node.format_node()})" if node is not None else "the model"
                # torch's first line says what is wrong; the rest is interpreter context.
                reason = (str(error).strip().splitlines() or [""])[0]
                raise ShapeMismatchError(
                    f"example_inputs {_describe_inputs(example_inputs)} do not fit the model: "
                    f"{where} failed with {type(error).__name__}: {reason}"
                ) from error
    for node in graph.nodes:
        if node in metas:
            node.meta["tensor_meta"] = metas[node]
        else:
            node.meta.pop("tensor_meta", None)
        if node in not_given:
            node.meta[NOT_GIVEN_KEY] = True
        else:
            # Recorded again with that argument given: it is an input like the others now.
            node.meta.pop(NOT_GIVEN_KEY, None)
