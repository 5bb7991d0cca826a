"""The execution-order layer index: one entry per ``call_module`` call site."""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from torch import fx, nn

from fxindex._errors import LayerIndexError, LayerNameError
from fxindex._shapes import TensorMetadata, record_shapes
from fxindex._trace import trace

__all__ = ["LayerEntry", "LayerIndex", "LayerRef", "index", "as_graph_module", "count_parameters"]

Shape = tuple[int, ...]


class LayerRef(int):
    """An execution-order index that remembers which call site it names.

    :meth:`LayerIndex.find` and :attr:`LayerEntry.index` return these. A
    ``LayerRef`` is an ``int`` everywhere, but when it selects a layer of a
    model that was edited since (``for i in layers.find(nn.Dropout):
    gm = fxindex.remove(gm, i)``), it selects the call site it was taken from,
    found by its node name, not whatever layer has moved to its old position;
    a call site that no longer exists is an error instead of a silent hit on
    its neighbour. Arithmetic on it gives a plain ``int`` (a plain position).

    Attributes:
        node_name: the name of the ``call_module`` node it was taken from.
        target: that node's qualified module name.
    """

    node_name: str
    target: str

    def __new__(cls, position: int, node_name: str, target: str) -> "LayerRef":
        ref = super().__new__(cls, position)
        ref.node_name = node_name
        ref.target = target
        return ref

    def __reduce__(self) -> tuple[Any, ...]:
        return (LayerRef, (int(self), self.node_name, self.target))


@dataclass(frozen=True)
class LayerEntry:
    """One call site of a module, in execution order.

    Attributes:
        index: position in execution order (graph order of ``call_module`` nodes).
        target: qualified name of the called module (``"layer1.0.conv1"``).
        module: the called module itself.
        node: the ``call_module`` fx node.
        input_shape: shape of the first input when known, else ``None``.
        output_shape: shape of the output when known (a tuple of shapes for a
            module that returns several tensors), else ``None``.
        num_parameters: number of parameter elements of the module.
        call_sites: how many call sites call this same module.
    """

    index: int
    target: str
    module: nn.Module
    node: fx.Node
    input_shape: Shape | None
    output_shape: Any
    num_parameters: int
    call_sites: int

    @property
    def module_type(self) -> type[nn.Module]:
        """The class of the called module."""
        return type(self.module)


def _shape_of(meta: Any) -> Any:
    """Turn recorded metadata into plain tuples of ints (nested for tuple outputs)."""
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        shapes = tuple(_shape_of(item) for item in meta)
        return shapes if any(shape is not None for shape in shapes) else None
    return None


def _first_input_shape(node: fx.Node) -> Shape | None:
    if node.args and isinstance(node.args[0], fx.Node):
        meta = node.args[0].meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return tuple(meta.shape)
    return None


class LayerIndex(Sequence[LayerEntry]):
    """A read-only sequence of :class:`LayerEntry`, in execution order.

    Supports ``len``, iteration, negative indices and slices; ``index["name"]``
    returns the entry of the first call site of a qualified name, and
    :meth:`position` its index.
    """

    def __init__(self, graph_module: fx.GraphModule, graph: fx.Graph | None = None):
        self._graph_module = graph_module
        self._modules = dict(graph_module.named_modules())
        # ``graph``: a copy of ``graph_module.graph`` to number instead (edits plan on copies).
        graph = graph if graph is not None else graph_module.graph
        self._nodes = [node for node in graph.nodes if node.op == "call_module"]
        sites: dict[str, list[int]] = {}
        for position, node in enumerate(self._nodes):
            sites.setdefault(node.target, []).append(position)
        self._sites = sites
        # Entries are built on first access: selecting a layer to replace needs only the
        # node list, and counting parameters of 10,000 layers would cost more than the edit.
        self._entries: list[LayerEntry | None] = [None] * len(self._nodes)
        self._position_of_node = {node: position for position, node in enumerate(self._nodes)}
        self._position_of_name = {node.name: position for position, node in enumerate(self._nodes)}

    def _entry(self, position: int) -> LayerEntry:
        entry = self._entries[position]
        if entry is None:
            node = self._nodes[position]
            module = self._modules[node.target]
            entry = LayerEntry(
                index=LayerRef(position, node.name, node.target),
                target=node.target,
                module=module,
                node=node,
                input_shape=_first_input_shape(node),
                output_shape=_shape_of(node.meta.get("tensor_meta")),
                num_parameters=count_parameters(module),
                call_sites=len(self._sites[node.target]),
            )
            self._entries[position] = entry
        return entry

    @property
    def graph_module(self) -> fx.GraphModule:
        """The GraphModule this index describes."""
        return self._graph_module

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[LayerEntry]:
        return (self._entry(position) for position in range(len(self._nodes)))

    @overload
    def __getitem__(self, key: int | str) -> LayerEntry: ...

    @overload
    def __getitem__(self, key: slice) -> tuple[LayerEntry, ...]: ...

    def __getitem__(self, key: int | str | slice) -> LayerEntry | tuple[LayerEntry, ...]:
        if isinstance(key, slice):
            return tuple(self._entry(position) for position in range(len(self._nodes))[key])
        return self._entry(self.resolve(key))

    def resolve(self, key: int | str) -> int:
        """Turn an index (negative allowed) or a qualified name into a position.

        A :class:`LayerRef` (from :meth:`find` or an entry) resolves to the call
        site it was taken from, wherever that site is now.

        Raises:
            LayerIndexError: an int outside ``-len .. len-1``, or a
                :class:`LayerRef` whose call site is gone.
            LayerNameError: a name that is not a call site; lists close matches.
            TypeError: anything else.
        """
        if isinstance(key, LayerRef):
            return self._resolve_ref(key)
        if isinstance(key, str):
            return self.position(key)
        if isinstance(key, bool) or not hasattr(key, "__index__"):
            raise TypeError(f"a layer is selected by an int index or a qualified name, got {type(key).__name__}")
        try:
            key = operator.index(key)  # numpy and 0-d tensor integers too
        except TypeError:
            raise TypeError(f"a layer is selected by an int index or a qualified name, got {type(key).__name__}") from None
        count = len(self._nodes)
        if not -count <= key < count:
            valid = f"0..{count - 1} (or -{count}..-1)" if count else "none: the model has no call_module layers"
            raise LayerIndexError(f"layer index {key} is out of range: valid indices are {valid}")
        return key % count

    def _resolve_ref(self, ref: LayerRef) -> int:
        # By node name: edits keep the names of the nodes they do not remove (a replaced
        # site may get a new module name, ``relu_1``, but stays the same node).
        position = self._position_of_name.get(ref.node_name)
        if position is not None:
            return position
        raise LayerIndexError(
            f"layer {int(ref)} ('{ref.target}', node '{ref.node_name}') is no longer in this model: an earlier edit "
            "removed that call site; select layers by an index taken from this model "
            "(fxindex.index(model)), or edit several layers in one call (a list or dict of indices)"
        )

    def position(self, name: str) -> int:
        """Index of the first call site of the module named ``name``."""
        return self.positions(name)[0]

    def positions(self, name: str) -> list[int]:
        """Indices of every call site of the module named ``name``."""
        try:
            return list(self._sites[name])
        except KeyError:
            close = difflib.get_close_matches(name, list(self._sites), n=5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise LayerNameError(f"'{name}' is not the target of any call site{hint}") from None

    def node(self, key: int | str) -> fx.Node:
        """The ``call_module`` node of a layer (cheaper than ``self[key].node``)."""
        return self._nodes[self.resolve(key)]

    def position_of_node(self, node: fx.Node) -> int:
        """Index of a ``call_module`` node of this graph."""
        return self._position_of_node[node]

    def find(self, kind: type | tuple[type, ...] | Callable[[LayerEntry], bool]) -> list[int]:
        """Indices of the entries whose module is of type ``kind`` or that satisfy it.

        Args:
            kind: a module class or tuple of classes (subclasses match), or a
                predicate taking a :class:`LayerEntry`.

        Returns:
            The matching indices, in execution order, as :class:`LayerRef`:
            each keeps naming its call site after other edits of the model.

        Example:
            >>> import torch, fxindex
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
            >>> fxindex.index(net).find(torch.nn.Linear)
            [0, 2]
        """
        if isinstance(kind, type) or (isinstance(kind, tuple) and all(isinstance(k, type) for k in kind)):
            return [
                LayerRef(position, node.name, node.target)
                for position, node in enumerate(self._nodes)
                if isinstance(self._modules[node.target], kind)
            ]
        if callable(kind):
            return [entry.index for entry in self if kind(entry)]
        raise TypeError(f"find takes a module type, a tuple of types or a predicate, got {kind!r}")

    def __repr__(self) -> str:
        return f"LayerIndex({len(self)} layers of {type(self._graph_module).__name__})"

    def _repr_html_(self) -> str:
        """The index as an HTML table (what :func:`fxindex.table` prints), for notebooks."""
        from fxindex._notebook import text_to_html
        from fxindex._table import table

        return text_to_html(table(self, tablefmt="html"))


def as_graph_module(
    model: nn.Module, example_inputs: tuple[Any, ...] | None = None, *, caller: str = "fxindex"
) -> fx.GraphModule:
    """Return ``model`` itself if it is a GraphModule, else its trace.

    With ``example_inputs``, shapes are (re)recorded on the nodes.
    """
    if isinstance(model, fx.GraphModule):
        if example_inputs is not None:
            record_shapes(model, example_inputs)
        return model
    if isinstance(model, nn.Module):
        return trace(model, example_inputs=example_inputs)
    raise TypeError(f"{caller} expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")


def index(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> LayerIndex:
    """Number the layers of ``model`` in execution order.

    Every ``call_module`` node of the traced graph is one entry, whatever the
    nesting (Sequential, ModuleList, ModuleDict, custom blocks) and however
    often a module is called: a module called at two sites has two entries.

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        example_inputs: optional tuple of inputs; records input/output shapes.

    Returns:
        A :class:`LayerIndex`.

    Raises:
        TypeError: ``model`` is not a module.
        TraceError: ``model`` cannot be traced.

    Example:
        >>> import torch, fxindex
        >>> model = fxindex.examples.SeedModel()
        >>> layers = fxindex.index(model, (torch.randn(1, 3, 28, 28),))
        >>> len(layers), layers[4].target, layers[4].output_shape
        (6, 'nested.0', (1, 16))
    """
    return LayerIndex(as_graph_module(model, example_inputs, caller="fxindex.index"))


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())

