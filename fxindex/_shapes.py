"""Recording tensor shapes on fx nodes, on meta tensors when possible.

Shapes follow torch.fx's ShapeProp convention: ``node.meta["tensor_meta"]`` is
a ``torch.fx.passes.shape_prop.TensorMetadata`` (or a tuple/list of them for a
node that returns several tensors). fxindex computes them on meta tensors
(shape, dtype and strides, no data and no arithmetic): every parameter and
buffer is copied to meta once per pass, layers run as shallow copies holding
those meta tensors, so the caller's model is never touched. Kernels run with
the layouts of the model's device and their output metadata is remembered
per op and input metadata (see ``_MetaCache``), so a repeated layer costs
microseconds. A node meta cannot run is re-run on fake tensors with the real
layer; a model that fails on both (data-dependent ops) gets one real forward.
Where torch's meta and fake kernels lay a result out otherwise than the CPU
kernel does (``group_norm`` of a channels-last input), the CPU's strides are
put back (see ``_CpuLayouts``): a later ``.view`` must fail here when it fails
for real.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fxindex._errors import FxIndexError, ShapeMismatchError
from fxindex._layer_cache import layer_cache
from fxindex._progress import Progress, progress_bar

__all__ = [
    "TensorMetadata",
    "tensor_meta",
    "record_shapes",
    "record_shapes_on",
    "make_fake_mode",
    "fake_tensor_like",
    "meta_tensor_like",
    "MetaConverter",
    "to_meta",
    "meta_to_fake",
    "meta_kernel_cache",
    "cpu_layouts",
    "suggested_memory_format",
    "MetaUnsupportedError",
    "meta_of",
    "preserving_buffers",
    "quiet_fake_errors",
    "NOT_GIVEN_KEY",
    "shapes_recorded",
    "PROGRESS_MIN_NODES",
    "PROGRESS_DELAY",
]

#: On a terminal, a shape pass over a graph of more than this many nodes shows a progress bar at once.
PROGRESS_MIN_NODES = 2000
#: Seconds after which a smaller graph's shape pass shows its bar (one that ends sooner prints nothing).
PROGRESS_DELAY = 2.0

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


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a container with one inside."""
    return any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def shapes_recorded(graph: fx.Graph) -> bool:
    """Whether every placeholder of ``graph`` has its shape recorded or was not given.

    A placeholder has its shape when it carries ``tensor_meta``; one marked
    with :data:`NOT_GIVEN_KEY` is an optional argument of ``forward`` that the
    example inputs left out, or gave a value without tensors (``None``, a
    number), known not to be a tensor, so it needs none. A
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


@functools.lru_cache(maxsize=4096)
def _plain_meta_of(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, requires_grad: bool) -> TensorMetadata:
    """The metadata of a plain strided meta tensor, which its shape, strides, dtype and grad flag decide.

    ``_extract_tensor_metadata`` tests each memory format in Python (tens of us
    a tensor, on every node of every pass); a model repeats few layouts.
    """
    return _extract_tensor_metadata(torch.empty_strided(shape, stride, dtype=dtype, device="meta").requires_grad_(requires_grad))


def meta_of(result: Any) -> Any:
    """The ``tensor_meta`` of a node's result (nested like it), or ``None`` when it holds no tensor."""
    found = False

    def extract(value: Any) -> Any:
        nonlocal found
        if isinstance(value, torch.Tensor):
            found = True
            if type(value) is torch.Tensor and value.device.type == "meta" and value.layout == torch.strided:
                return _plain_meta_of(tuple(value.shape), value.stride(), value.dtype, value.requires_grad)
            return _extract_tensor_metadata(value)
        return value

    meta = map_aggregate(result, extract)
    return meta if found else None


# --------------------------------------------------------------------------- meta tensors

# Tensor types copied to meta: plain tensors and parameters, and the fake inputs the
# command line passes (only their shapes, dtypes and strides are read). A tensor
# subclass may change what an op returns, so it makes the pass fall back to fake tensors.
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter, FakeTensor)


class MetaUnsupportedError(FxIndexError, RuntimeError):
    """A tensor or layer that has no faithful meta copy (quantized, sparse, a subclass, TorchScript).

    Raised by :class:`MetaConverter`; the shape pass catches it and runs that
    node (or, for an input, the whole pass) on fake tensors instead.
    """


def _meta_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A new meta tensor with ``tensor``'s shape, strides, dtype, ``requires_grad`` and class."""
    if type(tensor) not in _PLAIN_TENSORS or tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise MetaUnsupportedError(
            f"a {type(tensor).__name__} with layout {tensor.layout} has no meta copy that behaves like it"
        )
    # empty_strided, not .to("meta"): the copy is a leaf (no autograd link to the caller's
    # tensor) and keeps expanded (stride 0) and channels-last strides exactly.
    copy = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(copy, requires_grad=tensor.requires_grad)
    return copy.requires_grad_(tensor.requires_grad)


def meta_tensor_like(meta: TensorMetadata) -> torch.Tensor:
    """A meta tensor with ``meta``'s shape, strides, dtype and ``requires_grad``.

    Args:
        meta: recorded metadata of one tensor.

    Returns:
        A leaf tensor on the meta device (no memory).
    """
    tensor = torch.empty_strided(tuple(meta.shape), tuple(meta.stride), dtype=meta.dtype, device="meta")
    if meta.requires_grad and (meta.dtype.is_floating_point or meta.dtype.is_complex):
        tensor.requires_grad_(True)
    return tensor


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``function`` applied to every tensor inside tuples, lists and dicts, types kept.

    Unlike ``torch.fx.node.map_aggregate`` a list stays a list and a dict keeps its class
    (an ``OrderedDict``, a model-output dict), since the result is passed on to user code.
    A container that cannot be rebuilt is returned as it was.
    """
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        items = [_map_tensors(item, function) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
            return type(value)(*items)
        try:
            return type(value)(items)
        except Exception:  # a container class with a constructor of its own
            return value
    if isinstance(value, dict):
        mapped = {key: _map_tensors(item, function) for key, item in value.items()}
        if all(mapped[key] is item for key, item in value.items()):
            return value
        try:
            return type(value)(mapped)
        except Exception:
            return value
    return value


def to_meta(value: Any) -> Any:
    """``value`` with every tensor in it (fake or real, nested in tuples, lists, dicts) as a new meta tensor.

    Meta tensors are returned as they are. Used to bring a fake re-run's result back
    among the meta values of a shape pass.

    Args:
        value: a node's result.

    Returns:
        The same structure holding meta tensors.
    """
    return _map_tensors(value, lambda tensor: tensor if _is_plain_meta(tensor) else _meta_copy(tensor))


def _is_plain_meta(tensor: torch.Tensor) -> bool:
    """On meta and not a fake tensor (a fake tensor made for the meta device reports ``meta`` too)."""
    return tensor.device.type == "meta" and not isinstance(tensor, FakeTensor)


def meta_to_fake(value: Any, mode: FakeTensorMode, device: torch.device | str) -> Any:
    """``value`` with every meta tensor in it as a fake tensor of ``mode`` on ``device``; other values kept.

    Args:
        value: node arguments holding meta tensors.
        mode: the fake mode of the re-run.
        device: the device the real run would use (TensorMetadata has none).

    Returns:
        The same structure holding fake tensors (same shapes, strides, dtypes, ``requires_grad``).
    """

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta" or isinstance(tensor, FakeTensor):
            return tensor
        with mode:
            fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device=device)
        return fake.requires_grad_(tensor.requires_grad) if tensor.requires_grad else fake

    return _map_tensors(value, convert)


class MetaConverter:
    """Meta copies of a model's tensors and layers, each made once per converter.

    A layer's copy is shallow: a new instance of the same class sharing the
    original's attributes, except that its parameters, buffers and tensor
    attributes are meta copies and its child layers are copies too. Calling
    the copy's ``forward`` therefore runs the layer's own code on meta tensors
    without swapping anything inside the caller's model (which another thread
    may be using at the same time), and an assignment in ``forward``
    (``self.num_batches_tracked += 1``) lands on the copy.

    ``torch.func.functional_call`` is not used because it calls ``module(...)``
    (the user's hooks would run) and swaps the tensors of the caller's model in
    place for the duration of the call.
    """

    def __init__(self) -> None:
        # id -> (original, copy); the original is held so that its id cannot be reused.
        self._tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._modules: dict[int, tuple[nn.Module, nn.Module]] = {}

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The meta copy of ``tensor`` (made on first use; a meta tensor is its own copy).

        Raises:
            MetaUnsupportedError: ``tensor`` is quantized, sparse, nested or a subclass.
        """
        if tensor.device.type == "meta" and type(tensor) in (torch.Tensor, nn.Parameter):
            return tensor
        known = self._tensors.get(id(tensor))
        if known is not None:
            return known[1]
        copy = _meta_copy(tensor)
        self._tensors[id(tensor)] = (tensor, copy)
        return copy

    def value(self, value: Any) -> Any:
        """``value`` with its tensors as meta copies and a layer as its meta copy; other values kept."""
        if isinstance(value, nn.Module):
            return self.module(value)
        return _map_tensors(value, self.tensor)

    def module(self, module: nn.Module) -> nn.Module:
        """The shallow meta copy of ``module`` and of its children (made on first use).

        Raises:
            MetaUnsupportedError: a TorchScript module, or a tensor without a meta copy.
        """
        known = self._modules.get(id(module))
        if known is not None:
            return known[1]
        if isinstance(module, torch.jit.ScriptModule):
            raise MetaUnsupportedError(f"TorchScript module {type(module).__name__} runs its own compiled code")
        cls = type(module)
        copy = cls.__new__(cls)
        state = dict(module.__dict__)
        object.__setattr__(copy, "__dict__", state)
        # Registered before the children: a layer shared by two parents (or a cycle) gets one copy.
        self._modules[id(module)] = (module, copy)
        for key, item in module.__dict__.items():
            if isinstance(item, torch.Tensor):  # a plain tensor attribute (weight_norm's weight, a mask)
                state[key] = self.tensor(item)
        state["_parameters"] = {
            name: None if item is None else self.tensor(item) for name, item in module._parameters.items()
        }
        state["_buffers"] = {name: None if item is None else self.tensor(item) for name, item in module._buffers.items()}
        state["_modules"] = {name: None if item is None else self.module(item) for name, item in module._modules.items()}
        return copy


# --------------------------------------------------------------------------- CPU layouts


def suggested_memory_format(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.memory_format:
    """ATen's ``Tensor.suggest_memory_format()`` for a strided tensor of ``shape`` and ``stride``.

    A port of c10's ``is_channels_last_strides_2d`` / ``_3d`` (Python has no
    binding): a 4-d (5-d) tensor whose strides order the dims like NHWC
    (NDHWC) suggests channels-last. Strides of size-1 dims count, so a
    one-channel NCHW tensor made by ``.permute(0, 3, 1, 2).contiguous()``
    (strides ``(HW, 1, W, 1)``) suggests channels-last, one with strides
    ``(HW, HW, W, 1)`` does not, although both are contiguous.

    Args:
        shape: the tensor's sizes.
        stride: its strides.

    Returns:
        ``torch.channels_last``, ``torch.channels_last_3d`` or ``torch.contiguous_format``.

    Example:
        >>> suggested_memory_format((2, 1, 3, 3), (9, 1, 3, 1)), suggested_memory_format((2, 1, 3, 3), (9, 9, 3, 1))
        (torch.channels_last, torch.contiguous_format)
    """
    if len(shape) == 4:
        order, channels_last = (1, 3, 2, 0), torch.channels_last
    elif len(shape) == 5:
        order, channels_last = (1, 4, 3, 2, 0), torch.channels_last_3d
    else:
        return torch.contiguous_format
    if stride[1] == 0:  # a broadcast channel dim: NCHW by default
        return torch.contiguous_format
    smallest = 0
    for dim in order:
        if shape[dim] == 0 or stride[dim] < smallest:
            return torch.contiguous_format
        # N111 with equal strides is ambiguous: NCHW by default, as in c10.
        if dim == 0 and smallest == stride[1]:
            return torch.contiguous_format
        smallest = stride[dim] * max(shape[dim], 1)
    return channels_last


def _group_norm_on_cpu(device: torch.device, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> Any:
    """``F.group_norm``'s result laid out as the CPU kernel lays it out.

    CPU's ``group_norm`` makes its input contiguous in the input's suggested
    memory format and writes its output in that format (channels-last in,
    channels-last out); on any other device, and in torch's meta and fake
    kernels, the output is always contiguous. The two differ for every
    channels-last input, and for a one-channel input whose size-1 channel dim
    has stride 1 (contiguous, yet suggesting channels-last): a 1x1 conv after
    it then writes channels-last on CPU, and a ``.view`` there fails on CPU
    although it works on meta.

    Args:
        device: the device a plain meta tensor stands for.
        args: the call's positional arguments (the input first).
        kwargs: its keyword arguments.
        result: what the meta or fake kernel returned.

    Returns:
        ``result``, or a tensor of its shape, dtype and device with the CPU kernel's strides
        (linked to ``result`` by autograd when that requires grad).
    """
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or type(result) not in (torch.Tensor, FakeTensor) or x.layout != torch.strided:
        return result
    # A plain meta tensor stands for one on the pass's device; a fake one knows its own.
    on = device if _is_plain_meta(x) else x.device
    if on.type != "cpu":
        return result
    memory_format = suggested_memory_format(tuple(x.shape), x.stride())
    laid_out = torch.empty(result.shape, dtype=result.dtype, device=result.device, memory_format=memory_format)
    if laid_out.stride() == result.stride():
        return result
    # copy_ links the new tensor to the old one's autograd history (requires_grad as in a real run).
    return laid_out.copy_(result) if result.requires_grad else laid_out


# torch functions whose meta and fake kernels choose another output layout than the CPU kernel.
# Keyed by the Python function (F.group_norm reaches the mode as itself, torch.group_norm when
# called directly): the layout follows from the input as the caller passed it, which the ATen
# op below sees only after meta's ``input.contiguous()`` (CUDA's choice) has reshaped it.
_CPU_LAYOUTS: dict[Any, Callable[[torch.device, tuple[Any, ...], dict[str, Any], Any], Any]] = {
    torch.nn.functional.group_norm: _group_norm_on_cpu,
    torch.group_norm: _group_norm_on_cpu,
}


class _CpuLayouts(TorchFunctionMode):
    """Gives the results of the functions in ``_CPU_LAYOUTS`` the strides a real run on the CPU gives them.

    The shape pass claims the strides of a real run (ShapeProp's); for these
    functions torch's meta and fake kernels follow other devices' layouts, and
    a wrong stride there makes a later ``.view`` pass on meta and fail for real
    (or the reverse). A function mode, not a dispatch mode: by the time an
    ATen op runs, the input's original layout may be gone (see
    :func:`_group_norm_on_cpu`).

    Args:
        device: the device a plain meta tensor stands for; fake tensors carry their own.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        try:
            fix = _CPU_LAYOUTS.get(func)
        except TypeError:  # an unhashable callable: none of ours
            return result
        return result if fix is None else fix(self.device, args, kwargs, result)


def cpu_layouts(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """A context in which meta and fake results of a few torch functions get the CPU kernel's strides.

    Entered by :func:`meta_kernel_cache` (meta passes) and around fake runs:
    see :class:`_CpuLayouts`. Tensors that stand for another device than the
    CPU are left alone (there torch's meta kernels give the real layouts).

    Args:
        device: the device a plain meta tensor stands for (fake tensors carry their own).

    Returns:
        A context manager.
    """
    return _CpuLayouts(torch.device(device))


class _MetaCache(TorchDispatchMode):
    """Computes meta kernels with the semantics of ``device``, and remembers their output metadata.

    Device: torch's meta kernels ask the tensor for its device
    (``device_hint``) and take a plain meta tensor for a CUDA one, so on a CPU
    model they would pick CUDA's output layouts (a convolution of a
    channels-last input comes out contiguous on meta, channels-last on CPU).
    A kernel is therefore computed on fake tensors that carry ``device``.

    Remembering: that costs a fake dispatch (and many kernels are Python
    decompositions: a BatchNorm costs milliseconds), but a model repeats the
    same layer on the same shapes, so the second call of an op with inputs of
    the same shapes, strides, dtypes and other arguments builds its outputs
    straight from the first call's metadata. Only ops whose schema neither
    mutates nor aliases (no ``Tensor(a)`` anywhere) are remembered or sent to
    fake tensors: a view or an in-place op must return the very tensor it was
    given, and its layout follows from its input's on any device. This sits
    below autograd, so ``requires_grad`` and ``grad_fn`` of the results are set
    as without it.
    """

    # Bounded, so a long-lived process planning ever new shapes does not grow it without end.
    MAX_ENTRIES = 20_000

    def __init__(self, entries: dict[Any, Any], device: torch.device) -> None:
        super().__init__()
        self.entries = entries
        self.device = device
        # The CPU's layouts for the functions whose ATen ops cannot tell them (see _CpuLayouts).
        self._layouts: _CpuLayouts | None = None

    def __enter__(self) -> _MetaCache:
        if self.device.type == "cpu":
            self._layouts = _CpuLayouts(self.device)
            self._layouts.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._exit_layouts(None, None, None)
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._exit_layouts(*exc_info)

    def _exit_layouts(self, *exc_info: Any) -> None:
        layouts, self._layouts = self._layouts, None
        if layouts is not None:
            layouts.__exit__(*exc_info)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not _cacheable_op(func):
            return func(*args, **kwargs)
        try:
            key = (self.device, func, torch.get_default_dtype(), _key_of(args), _key_of(kwargs))
        except _NoKey:
            return self.compute(func, args, kwargs)
        recipe = self.entries.get(key)
        if recipe is not None:
            return _build_from(recipe)
        result = self.compute(func, args, kwargs)
        recipe = _recipe_of(result, args, kwargs)
        if recipe is not None:
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = recipe
        return result

    def compute(self, func: Any, args: Any, kwargs: Any) -> Any:
        """``func`` on fake copies of the meta arguments placed on ``self.device``; the outputs as meta."""
        if self.device.type == "meta":  # a model built on meta: no device to imitate
            return func(*args, **kwargs)
        mode = make_fake_mode()
        # The converter wraps the meta tensor itself (no dispatch): ~13 us a tensor against
        # ~75 us for an empty_strided under the mode. It is not public API, hence the fallback.
        converter = getattr(getattr(mode, "fake_tensor_converter", None), "from_meta_and_device", None)

        def fake(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.device.type != "meta":
                return tensor  # a CPU scalar tensor: the fake mode takes it as it is
            if converter is not None and not isinstance(tensor, FakeTensor):
                # Safe to wrap the meta tensor itself: only ops that neither mutate nor alias get here.
                return converter(mode, tensor, self.device)
            with mode:
                return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=self.device)

        fake_args, fake_kwargs = _map_tensors((args, kwargs), fake)
        device = fake_kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "meta":
            # A factory call (torch.zeros(n) under the meta device): made on the model's device.
            fake_kwargs = {**fake_kwargs, "device": self.device}
        with mode, quiet_fake_errors():
            result = func(*fake_args, **fake_kwargs)
        return to_meta(result)


class _NoKey(Exception):
    """An argument the cache cannot key on (a Python object, a tensor not on meta)."""


_CACHEABLE: dict[Any, bool] = {}


def _cacheable_op(func: Any) -> bool:
    known = _CACHEABLE.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = (
            schema is not None
            and not schema.is_mutable
            and all(argument.alias_info is None for argument in schema.arguments)
            and all(result.alias_info is None for result in schema.returns)
        )
        _CACHEABLE[func] = known
    return known


_KEY_SCALARS = frozenset(
    {int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format}
)
_TENSOR_KEY = object()  # marks a tensor's entry, so no tuple of numbers can look like one


def _key_of(value: Any) -> Any:
    """A hashable key of ``value``'s metadata; raises :class:`_NoKey` for anything else."""
    cls = type(value)
    if cls is torch.Tensor or cls is nn.Parameter:
        if value.is_conj() or value.is_neg() or value.layout != torch.strided:
            raise _NoKey
        return (_TENSOR_KEY, value.shape, value.stride(), value.storage_offset(), value.dtype, value.device)
    if cls in _KEY_SCALARS:
        # The type is part of the key: 1, 1.0 and True are equal dict keys, not equal arguments.
        return (cls, value)
    if cls is tuple or cls is list or cls is torch.Size:
        return (cls, tuple(_key_of(item) for item in value))
    if cls is dict:
        return (cls, tuple((key, _key_of(item)) for key, item in value.items())) if value else (cls,)
    raise _NoKey


def _recipe_of(result: Any, args: Any, kwargs: Any) -> Any:
    """How to rebuild ``result`` (meta tensors, tuples and lists of them), or ``None`` if it cannot be."""
    if isinstance(result, torch.Tensor):
        if (
            type(result) is not torch.Tensor
            or result.device.type != "meta"
            or result.layout != torch.strided
            or result.storage_offset() != 0
            or result.is_conj()
            or result.is_neg()
            or any(result is item for item in args)
            or any(result is item for item in kwargs.values())
        ):
            return None
        return ("T", tuple(result.shape), result.stride(), result.dtype)
    if isinstance(result, (tuple, list)):
        items = [None if item is None else _recipe_of(item, args, kwargs) for item in result]
        if any(recipe is None and item is not None for recipe, item in zip(items, result)):
            return None
        return (type(result), tuple(items))
    return None


def _build_from(recipe: Any) -> Any:
    kind, *rest = recipe
    if kind == "T":
        shape, stride, dtype = rest
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    (items,) = rest
    return kind(None if item is None else _build_from(item) for item in items)


def meta_kernel_cache(device: torch.device | str) -> TorchDispatchMode:
    """A dispatch mode for meta computations that imitate ``device`` (see :class:`_MetaCache`).

    Enter it with ``with``, only around computations on meta tensors, never
    inside a fake mode. One table of remembered outputs per thread, shared by
    all passes: the second trace of a model, or the re-run of its touched
    nodes while planning, finds its ops there.

    Args:
        device: the device whose kernels' output layouts the results must
            have (the model's); ``"meta"`` for a model built on meta.

    Returns:
        A fresh mode object over this thread's table.
    """
    entries = getattr(_shared, "meta_entries", None)
    if entries is None:
        entries = _shared.meta_entries = {}
    return _MetaCache(entries, torch.device(device))


def _meta_device_plan(graph_module: nn.Module, example_inputs: tuple[Any, ...]) -> torch.device | None:
    """The device fake re-runs use on the meta path, or ``None`` when the meta path must not be taken.

    Meta tensors forget their device, so a model whose tensors and inputs are
    on different devices (a CPU input to a CUDA model, a model split over two
    GPUs) goes to fake tensors, which keep devices and report the mismatch.
    Tensors already on meta (a model built on the meta device) fit any device.
    """
    devices: set[torch.device] = set()

    def note(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            devices.add(tensor.device)
        return tensor

    for tensor in graph_module.parameters():
        note(tensor)
    for tensor in graph_module.buffers():
        note(tensor)
    _map_tensors(example_inputs, note)
    if len(devices) > 1:
        return None
    return next(iter(devices)) if devices else torch.device("cpu")


_MISSING = object()


class _ShapeRecorder(fx.Interpreter):
    """An Interpreter that writes each node's ``tensor_meta`` as it runs.

    Layers are called through ``forward``, not ``__call__``: a shape pass is
    not a use of the model, so the user's forward hooks (a logger, a hook that
    calls ``.numpy()``, which fails on fake tensors) do not run.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        metas: dict[fx.Node, Any],
        graph: fx.Graph | None = None,
        progress: Progress | None = None,
    ):
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.metas = metas
        self.failed_node: fx.Node | None = None
        # Placeholders that got no example input and ran on their default.
        self.not_given: set[fx.Node] = set()
        self._running: fx.Node | None = None
        # One step per node run; None without a bar, so the usual pass pays one test per node.
        self._progress = progress if progress is not None and progress.active else None

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
            if node is not None and not _holds_tensor(value):
                # Given, but no tensor (T5's ``(ids, None, ids)``): it needs no shape either.
                self.not_given.add(node)
            return value
        if not args:
            raise RuntimeError(f"no example input for the required argument {target!r} of forward")
        if node is not None:
            self.not_given.add(node)
        return args[0]

    def run_node(self, n: fx.Node) -> Any:
        self._running = n
        try:
            result = self.compute(n)
        except Exception:
            if self.failed_node is None:
                self.failed_node = n
            raise
        meta = meta_of(result)
        if meta is not None:
            self.metas[n] = meta
        if self._progress is not None:
            self._progress.update()
        return result

    def compute(self, n: fx.Node) -> Any:
        """The value of ``n``: here the plain Interpreter's."""
        return super().run_node(n)


# Node kinds that run code; a placeholder or output that fails would fail on fake tensors too.
_CALLS = frozenset({"call_module", "call_function", "call_method", "get_attr"})


class _MetaShapeRecorder(_ShapeRecorder):
    """A :class:`_ShapeRecorder` on meta tensors, re-running on fake tensors only the nodes meta cannot run.

    Layers run as :class:`MetaConverter` copies (each parameter converted once
    per pass), and factory calls without a device (``torch.zeros(n)``) create
    meta tensors too. A node that fails on meta (a data-dependent op, a real
    tensor that meta cannot meet) is run again with the real layer on fake
    tensors, its result copied back to meta for the nodes after it.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        metas: dict[fx.Node, Any],
        graph: fx.Graph | None,
        device: torch.device,
        progress: Progress | None = None,
    ):
        super().__init__(module, metas, graph, progress)
        self.converter = MetaConverter()
        # Where the fake re-runs put activations (TensorMetadata has no device).
        self.device = device
        # Nodes that had to be re-run on fake tensors, in order (read by tests and for debugging).
        self.fake_nodes: list[fx.Node] = []
        # Whole torch.nn layers remembered by this thread's passes (see fxindex/_layer_cache.py).
        self.layers = layer_cache()

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.converter.module(self.fetch_attr(target)).forward(*args, **kwargs)

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.converter.value(self.fetch_attr(target))

    def compute(self, n: fx.Node) -> Any:
        key = None
        try:
            if n.op == "call_module":
                module = self.fetch_attr(n.target)
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                # A torch.nn layer seen before with the same key: its outputs without running it.
                key = self.layers.key(module, args, kwargs, self.device)
                if key is not None:
                    known = self.layers.lookup(key, args)
                    if known is not None:
                        return known
                # Copied before the modes below are entered: making a copy is no op to remember.
                self.converter.module(module)
                with self._set_current_node(n), torch.device("meta"), meta_kernel_cache(self.device):
                    result = self.call_module(n.target, args, kwargs)
                if key is not None:
                    self.layers.remember(key, module, args, result)
                return result
            with torch.device("meta"), meta_kernel_cache(self.device):
                return super().compute(n)
        except Exception:
            if n.op not in _CALLS:
                raise
            # Raised inside this handler, the fake run's error chains to the meta one.
            result = self.compute_on_fake(n)
        self.fake_nodes.append(n)
        return result

    def compute_on_fake(self, n: fx.Node) -> Any:
        """Run ``n`` with its real layer on fake copies of its meta inputs; the result back on meta."""
        if n.op == "get_attr":
            return self.fetch_attr(n.target)  # a tensor meta cannot copy: the real one, read only
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        mode = make_fake_mode()
        args = meta_to_fake(args, mode, self.device)
        kwargs = meta_to_fake(kwargs, mode, self.device)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        # The real layer runs here: its buffers must come out as they went in (BatchNorm in train mode).
        guard = preserving_buffers(module) if module is not None else contextlib.nullcontext()
        with guard, mode, quiet_fake_errors(), cpu_layouts(self.device):
            if module is not None:
                result = module.forward(*args, **kwargs)
            elif n.op == "call_function":
                result = n.target(*args, **kwargs)
            else:
                receiver, *rest = args
                result = getattr(receiver, n.target)(*rest, **kwargs)
        return to_meta(result)


def _describe_inputs(example_inputs: tuple[Any, ...]) -> str:
    parts = [
        f"Tensor{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        for value in example_inputs
    ]
    return "(" + ", ".join(parts) + ")"


def record_shapes(graph_module: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Run ``graph_module`` on ``example_inputs`` and record every node's shape.

    Meta tensors are tried first (parameters and buffers copied to meta once,
    the inputs too; the caller's model is only read); a node meta cannot run
    is re-run on fake tensors with its real layer; a real forward (without
    autograd, with buffers restored afterwards) is the last resort. A model
    whose tensors and inputs sit on different devices, or that holds tensor
    subclasses, skips meta and starts on fake tensors. User hooks never run
    (layers are called through ``forward``) and the random stream is left as
    it was. ``requires_grad`` in the metadata is what a real run under the
    current grad mode gives (except after the real fallback, which runs
    without autograd).

    When stderr is a terminal and tqdm is installed, a progress bar there
    counts the nodes: at once for a graph of more than
    ``PROGRESS_MIN_NODES`` (2,000) nodes, for a smaller one only once the pass
    has taken ``PROGRESS_DELAY`` (2) seconds. It leaves no line behind; off a
    terminal nothing is printed.

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


def _record_fast(
    graph_module: fx.GraphModule,
    graph: fx.Graph,
    example_inputs: tuple[Any, ...],
    metas: dict[fx.Node, Any],
    progress: Progress | None = None,
) -> set[fx.Node]:
    """Record ``metas`` without real arithmetic: on meta tensors, else (mixed devices, subclasses) on fake ones.

    Args:
        graph_module: the traced module (its tensors are read, never written).
        graph: the graph to run (``graph_module.graph`` or a copy of it).
        example_inputs: one value per placeholder.
        metas: filled with node -> metadata.
        progress: advanced by one per node run.

    Returns:
        The placeholders that got no example input.

    Raises:
        Exception: whatever the failing node raised (the caller falls back to a real run).
    """
    device = _meta_device_plan(graph_module, example_inputs)
    if device is not None:
        try:
            meta_inputs = tuple(_map_tensors(value, _meta_copy) for value in example_inputs)
        except MetaUnsupportedError:
            device = None
    if device is not None:
        meta_recorder = _MetaShapeRecorder(graph_module, metas, graph, device, progress)
        # No buffer guard: the meta run writes only to copies, and the fake re-runs of
        # single layers guard their own. fork_rng: cheap insurance for a custom op that draws.
        with torch.random.fork_rng(devices=[]):
            meta_recorder.run(*meta_inputs)
        return meta_recorder.not_given
    with preserving_buffers(graph_module):
        mode = make_fake_mode()
        fake_inputs = tuple(
            mode.from_tensor(value) if isinstance(value, torch.Tensor) else value for value in example_inputs
        )
        recorder = _ShapeRecorder(graph_module, metas, graph, progress)
        # Fake tensors carry their device: the layouts' own device is never read here.
        with mode, quiet_fake_errors(), cpu_layouts("cpu"):
            recorder.run(*fake_inputs)
        return recorder.not_given


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
    with _shape_progress(graph) as progress:
        _record_with_fallback(graph_module, graph, example_inputs, progress)


def _shape_progress(graph: fx.Graph) -> Progress:
    """The bar of one shape pass: on a terminal, at once for a big graph, after :data:`PROGRESS_DELAY` otherwise.

    A pass over a graph of thousands of nodes takes seconds with nothing else
    to say it is still running. Small graphs take milliseconds: their bar
    waits, so it appears only if the pass turns out slow (a real-forward
    fallback, a large model) and never flickers.
    """
    total = len(graph.nodes)
    delay = 0.0 if total > PROGRESS_MIN_NODES else PROGRESS_DELAY
    return progress_bar(True, total, description="recording shapes", unit="node", delay=delay)


def _record_with_fallback(
    graph_module: fx.GraphModule, graph: fx.Graph, example_inputs: tuple[Any, ...], progress: Progress
) -> None:
    """The body of :func:`record_shapes_on`: fake or meta tensors first, one real forward as the fallback."""
    metas: dict[fx.Node, Any] = {}
    not_given: set[fx.Node] = set()
    try:
        not_given = _record_fast(graph_module, graph, example_inputs, metas, progress)
    except Exception:
        # Data-dependent ops (.item(), nonzero) have neither a meta nor a fake kernel: one real run.
        metas.clear()
        progress.restart("recording shapes (real forward)")
        recorder = _ShapeRecorder(graph_module, metas, graph, progress)
        try:
            # fork_rng: dropout in train mode must not advance the caller's random stream.
            with preserving_buffers(graph_module), torch.no_grad(), torch.random.fork_rng(devices=[]):
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
