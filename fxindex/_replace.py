"""Replace, remove or insert the layer at an execution-order index, propagating shape changes.

Every public function here follows the same three steps: select the call
sites through the :class:`~fxindex.LayerIndex`, compute a
:class:`~fxindex.Plan` with the read-only propagation pass, then install
it (:func:`apply_plan`: swap modules, rewrite arguments, ``lint``,
``recompile``). Planning raises before anything is touched, so a failed call
leaves the model exactly as it was, ``inplace=True`` included.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import operator
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxindex.rules.registry import using
from fxindex._couple import plan_coupled
from fxindex._errors import EditError, EditWarning, FxIndexError, PropagationError, StaleForwardError
from fxindex._index import LayerIndex, as_graph_module
from fxindex._plan import Plan
from fxindex._propagate import Target, build_plan
from fxindex._recipe import describe_layer, record_edit, restore_meta
from fxindex.rules import Widths, find_widths
from fxindex._shapes import NOT_GIVEN_KEY, record_shapes_on
from fxindex._speed import CACHE_ATTRIBUTE, is_sped_up, speed_up
from fxindex._writeback import write_back

__all__ = ["replace", "plan", "remove", "insert", "apply_plan", "deferred_codegen"]

Selector = int | str

#: The most ``keep=`` entries read from one iterable: enough for any real layer, and an
#: endless generator (``itertools.count()``) stops here instead of filling memory.
MAX_KEEP = 1 << 20


def _label(layers: LayerIndex, position: int) -> str:
    return f"layer {position} ('{layers.node(position).target}')"


def _check_layer(new_layer: Any, label: str, model: nn.Module) -> nn.Module:
    if not isinstance(new_layer, nn.Module):
        raise TypeError(f"{label}: the new layer must be an nn.Module, got {type(new_layer).__name__}")
    if any(module is model for module in new_layer.modules()):
        # Installing it would make the model its own submodule: forward would recurse forever.
        raise EditError(f"{label}: the new layer contains the model itself ({type(model).__name__}); pass a layer")
    return new_layer


def _as_slots(value: Any, where: str) -> tuple[int, ...]:
    """``keep=`` read once into a tuple of ints (a generator would be used up by the first reader).

    Accepts any iterable of integers: lists, tuples, ranges, generators, numpy
    arrays and 1-d integer tensors (``torch.topk(...).indices``).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise EditError(
                f"{where}: keep= must be a 1-d tensor of integer channel indices, got a {value.dim()}-d {value.dtype} tensor"
            )
        return tuple(int(slot) for slot in value.tolist())
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise EditError(f"{where}: keep= must be a sequence of int channel indices, got {type(value).__name__}")
    slots = []
    for slot in itertools.islice(value, MAX_KEEP + 1):
        if isinstance(slot, (bool, float)) or type(slot).__name__ in ("bool_", "bool"):
            raise EditError(f"{where}: keep= must hold int channel indices, got {slot!r} ({type(slot).__name__})")
        try:
            slots.append(operator.index(slot))  # numpy integers and 0-d integer tensors too
        except TypeError:
            raise EditError(f"{where}: keep= must hold int channel indices, got {slot!r} ({type(slot).__name__})") from None
    if len(slots) > MAX_KEEP:
        raise EditError(f"{where}: keep= has more than {MAX_KEEP} entries; no layer has that many channels")
    return tuple(slots)


def _select(
    layers: LayerIndex,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None,
    all_sites: bool,
    caller: str,
) -> tuple[list[Target], dict[str, Any]]:
    """Turn the caller's index/new_layer/keep into targets, all numbered on the original graph.

    Returns:
        The targets, and the edit as recipe data.
    """
    if isinstance(index, Mapping):
        if new_layer is not None:
            raise EditError(f"{caller}: with a dict of replacements, leave new_layer out (got {_short_type(new_layer)})")
        choices = dict(index)
        if not choices:
            raise EditError(f"{caller}: the dict of replacements is empty")
    else:
        if new_layer is None:
            raise EditError(f"{caller}: new_layer is missing: pass an nn.Module (or a dict {{index: layer}} as index)")
        choices = {index: new_layer}
    if keep is not None and not isinstance(keep, Mapping):
        if len(choices) != 1:
            raise EditError(f"{caller}: with several replacements, give keep as a dict {{index: keep}}")
        keep = {next(iter(choices)): keep}
    keeps: dict[int, tuple[int, ...]] = {}
    for key, value in (keep or {}).items():
        position = layers.resolve(key)
        keeps[position] = _as_slots(value, _label(layers, position))
    targets: dict[fx.Node, Target] = {}
    recorded: list[dict[str, Any]] = []
    for key, layer in choices.items():
        position = layers.resolve(key)
        label = _label(layers, position)
        layer = _check_layer(layer, label, layers.graph_module)
        name = str(layers.node(position).target)
        recorded.append({"index": int(position), "target": name, "layer": describe_layer(layer)})
        sites = layers.positions(name) if all_sites else [position]
        for site in sites:
            node = layers.node(site)
            if node in targets:
                raise EditError(f"{caller}: {_label(layers, site)} is selected twice")
            targets[node] = Target(node, layer, keeps.get(position), _label(layers, site))
    unknown_keeps = set(keeps) - {layers.resolve(key) for key in choices}
    if unknown_keeps:
        raise EditError(f"{caller}: keep= names layers {sorted(unknown_keeps)} that are not being replaced")
    edit = {
        "op": "replace",
        "layers": recorded,
        "keep": {str(position): list(value) for position, value in keeps.items()},
        "all_sites": all_sites,
    }
    return list(targets.values()), edit


def _short_type(value: Any) -> str:
    return type(value).__name__


class _Source:
    """What an edit plans on: the caller's GraphModule and the graph to read.

    When the caller passes a GraphModule with ``example_inputs``, or an insert
    needs a node the caller's graph lacks, planning must not touch the
    caller's graph: ``graph`` is then a copy (same node names), and
    ``module`` the caller's own GraphModule, whose layers are only read.
    """

    def __init__(self, module: fx.GraphModule, graph: fx.Graph | None = None):
        self.module = module
        self.graph = graph if graph is not None else module.graph
        self.extra_modules: dict[str, nn.Module] = {}

    def staged(self) -> "_Source":
        """This source with its own copy of the graph (a no-op if it has one)."""
        if self.graph is not self.module.graph:
            return self
        return _Source(self.module, copy.deepcopy(self.module.graph))

    def index(self) -> LayerIndex:
        return LayerIndex(self.module, graph=self.graph)


def _source(model: nn.Module, example_inputs: tuple[Any, ...] | None, caller: str) -> _Source:
    """What to plan on: ``model`` itself, a copy of its graph with new shapes, or its fresh trace (which shares its layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        source = _Source(model)
        if example_inputs is not None:
            # plan() and a failed replace() promise to touch nothing: record on a copy of the graph.
            source = source.staged()
            record_shapes_on(model, source.graph, example_inputs)
        return source
    return _Source(as_graph_module(model, example_inputs, caller=caller))


def _edited(source: _Source, inplace: bool, planned: Plan, share_untouched: bool = False) -> tuple[fx.GraphModule, Plan]:
    """The module to install a plan into: the caller's own when ``inplace``, else a copy.

    Copying after planning means a refused edit costs no copy at all. A new
    layer that is (or shares tensors with) a layer of the model is copied
    together with the model, so the result shares nothing with the caller's
    model, and aliasing inside the result (a layer used twice) is kept.

    The copy is deep, except for tensors it would throw away: those of
    modules the plan replaces at every site (not tied to a module that stays).
    With ``share_untouched``, every tensor the plan does not rebuild is
    shared with the caller's model (see :func:`replace`).
    """
    graph_module = source.module
    if inplace:
        return graph_module, planned
    # An unpickled GraphModule keeps its recipe as attributes only, which deepcopy drops.
    restore_meta(graph_module)
    owned = {id(value) for value in (*graph_module.modules(), *graph_module.parameters(), *graph_module.buffers())}
    shared = [
        edit.module
        for edit in planned.edits
        if edit.module is not None
        and any(id(value) in owned for value in (edit.module, *edit.module.parameters(), *edit.module.buffers()))
    ]
    memo = _shareable(graph_module, source.graph, planned, share_untouched)
    copied = copy.deepcopy(graph_module, memo)
    if not shared:
        return copied, planned
    modules = {id(module): copy.deepcopy(module, memo) for module in shared}
    edits = [
        dataclasses.replace(edit, module=modules[id(edit.module)]) if edit.module is not None and id(edit.module) in modules else edit
        for edit in planned.edits
    ]
    return copied, dataclasses.replace(planned, edits=edits)


def _shareable(graph_module: fx.GraphModule, graph: fx.Graph, planned: Plan, share_untouched: bool) -> dict[int, Any]:
    """A deepcopy memo mapping the tensors the copy need not copy to themselves."""
    def tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(recurse=False), *module.buffers(recurse=False)]

    if share_untouched:
        return {id(t): t for module in graph_module.modules() for t in tensors(module)}
    sites: dict[str, int] = defaultdict(int)
    nodes = {node.name: node for node in graph.nodes}
    for node in graph.nodes:
        if node.op == "call_module":
            sites[str(node.target)] += 1
    edited: dict[str, int] = defaultdict(int)
    for edit in planned.edits:
        if (edit.module is not None or edit.action == "remove") and edit.node in nodes:
            edited[str(nodes[edit.node].target)] += 1
    dropped = {target for target, count in edited.items() if count == sites.get(target) and target in sites}
    dropped_modules: set[int] = set()
    for target in dropped:
        try:
            dropped_modules.update(id(m) for m in graph_module.get_submodule(target).modules())
        except AttributeError:
            continue  # a name only the planned graph has (an inserted layer)
    kept = {id(t) for module in graph_module.modules() if id(module) not in dropped_modules for t in tensors(module)}
    return {
        id(t): t
        for module in graph_module.modules()
        if id(module) in dropped_modules
        for t in tensors(module)
        if id(t) not in kept
    }


def _unique_name(graph_module: fx.GraphModule, target: str, *, plain_first: bool = False, taken: set[str] | None = None) -> str:
    """A free qualified name beside ``target``: ``target`` itself (if asked and free), else ``target_1``..."""
    parent_name, _, atom = target.rpartition(".")
    parent = graph_module.get_submodule(parent_name)
    taken = taken or set()

    def free(candidate: str) -> bool:
        full = f"{parent_name}.{candidate}" if parent_name else candidate
        return not hasattr(parent, candidate) and full not in taken

    if plain_first and free(atom):
        return target
    suffix = 1
    while not free(f"{atom}_{suffix}"):
        suffix += 1
    return f"{parent_name}.{atom}_{suffix}" if parent_name else f"{atom}_{suffix}"


_MISSING = object()


class _CompiledState:
    """A GraphModule's generated code as it is now, to put back without recompiling.

    Recompiling the old graph would give equivalent code, but not the same
    text: the fast-lookup code carries a fresh token per generation, and a
    failed in-place edit promises ``gm.code`` unchanged.
    """

    _INSTANCE = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec", CACHE_ATTRIBUTE)
    _CLASS = ("forward", "__call__", "_wrapped_call")

    def __init__(self, graph_module: fx.GraphModule):
        self.graph_module = graph_module
        self.instance = {key: graph_module.__dict__.get(key, _MISSING) for key in self._INSTANCE}
        self.cls = {key: vars(type(graph_module)).get(key, _MISSING) for key in self._CLASS}

    def restore(self) -> None:
        for key, value in self.instance.items():
            if value is _MISSING:
                self.graph_module.__dict__.pop(key, None)
            else:
                self.graph_module.__dict__[key] = value
        cls = type(self.graph_module)
        for key, value in self.cls.items():
            if value is _MISSING:
                if key in vars(cls):
                    delattr(cls, key)
            else:
                setattr(cls, key, value)


class _ModuleTreeLog:
    """Sets and deletes submodules of a root, remembering what was there so a failure can undo it."""

    def __init__(self, root: nn.Module):
        self.root = root
        # Each touched parent's ``_modules`` as it was, in order (state-dict order follows it).
        self.saved: dict[int, tuple[nn.Module, list[tuple[str, Any]]]] = {}
        # (owner, table, name, previous value) of every tensor attribute set.
        self.tensors: list[tuple[nn.Module, str, str, Any]] = []

    def _parent(self, target: str) -> tuple[nn.Module, str]:
        parent_name, _, atom = target.rpartition(".")
        parent = self.root.get_submodule(parent_name)
        self.saved.setdefault(id(parent), (parent, list(parent._modules.items())))
        return parent, atom

    def set(self, target: str, module: nn.Module) -> None:
        parent, atom = self._parent(target)
        parent.add_module(atom, module)

    def delete(self, target: str) -> None:
        parent, atom = self._parent(target)
        parent._modules.pop(atom, None)

    def set_tensor(self, target: str, value: torch.Tensor) -> None:
        """Set a parameter, buffer or plain tensor attribute (read by ``get_attr``) to a new value."""
        owner_name, _, atom = target.rpartition(".")
        owner = self.root.get_submodule(owner_name)
        for store in ("_parameters", "_buffers"):
            table = getattr(owner, store)
            self.tensors.append((owner, store, atom, table.get(atom, _MISSING)))
        self.tensors.append((owner, "__dict__", atom, owner.__dict__.get(atom, _MISSING)))
        old = getattr(owner, atom, None)
        with torch.no_grad():
            fresh = value.detach().clone()
            if isinstance(old, nn.Parameter):
                owner._parameters[atom] = nn.Parameter(fresh, requires_grad=old.requires_grad)
            elif atom in owner._buffers:
                owner._buffers[atom] = fresh
            else:
                owner.__dict__[atom] = fresh

    def rollback(self) -> None:
        # The same dict objects, refilled: the fast-lookup cache keys on their identity.
        for parent, items in self.saved.values():
            parent._modules.clear()
            parent._modules.update(items)
        self.saved.clear()
        for owner, store, atom, previous in reversed(self.tensors):
            table = owner.__dict__ if store == "__dict__" else getattr(owner, store)
            if previous is _MISSING:
                table.pop(atom, None)
            else:
                table[atom] = previous
        self.tensors.clear()


def apply_plan(graph_module: fx.GraphModule, plan: Plan, graph: fx.Graph | None = None) -> fx.GraphModule:
    """Install ``plan`` into ``graph_module`` (in place): modules, arguments, shapes; lint; recompile.

    All or nothing: the edits are made on a copy of the graph, which is
    linted before anything of ``graph_module`` changes; then the new modules
    are set and the new graph is swapped in. If that fails, every submodule
    and the old graph are put back, so ``graph_module`` is as before.

    The result is recompiled through :func:`~fxindex.speed_up`, so it
    runs at eager speed.

    A module used by several call sites is replaced under its own name only
    when every site gets the same new module; otherwise each changed site gets
    its module under a new unique name (``relu_1``) and the others keep theirs.

    Args:
        graph_module: the module the plan was computed on (or a deep copy).
        plan: from :func:`plan`.
        graph: the graph the plan was computed on, when it is not
            ``graph_module.graph`` (a copy with other shapes or an inserted
            node); its nodes are matched by name.

    Returns:
        ``graph_module``.
    """
    if _install_modules_only(graph_module, plan, graph):
        return graph_module
    old_graph = graph_module.graph
    new_graph = copy.deepcopy(graph if graph is not None else old_graph)
    nodes = {node.name: node for node in new_graph.nodes}
    sites: dict[str, int] = defaultdict(int)
    for node in new_graph.nodes:
        if node.op == "call_module":
            sites[node.target] += 1
    by_target: dict[str, list] = defaultdict(list)
    for edit in plan.edits:
        if edit.module is not None and edit.action != "remove":
            by_target[str(nodes[edit.node].target)].append(edit)
    installs: list[tuple[str, nn.Module]] = []
    taken: set[str] = set()
    for target, edits in by_target.items():
        every_site = len(edits) == sites[target]
        installed: dict[int, str] = {}
        for edit in edits:
            node = nodes[edit.node]
            if id(edit.module) not in installed:
                if every_site and not installed:
                    name = target  # same key in the state dict
                else:
                    name = _unique_name(graph_module, target, taken=taken)
                taken.add(name)
                installs.append((name, edit.module))
                installed[id(edit.module)] = name
            node.target = installed[id(edit.module)]
    removed: list[str] = []
    for edit in plan.edits:
        node = nodes[edit.node]
        # The plan was computed on the source graph; the copy has its own nodes, found by name.
        if edit.args is not None:
            node.args = fx.node.map_arg(edit.args, lambda arg: nodes[arg.name])
        if edit.kwargs is not None:
            node.kwargs = fx.node.map_arg(edit.kwargs, lambda arg: nodes[arg.name])
        if edit.action == "remove":
            removed.append(str(node.target))
            node.replace_all_uses_with(node.args[0])
            new_graph.erase_node(node)
    for name, meta in plan.new_metas.items():
        if name in nodes and nodes[name].graph is new_graph:
            if meta is None:
                nodes[name].meta.pop("tensor_meta", None)
            else:
                nodes[name].meta["tensor_meta"] = meta
    _refresh_output_meta(new_graph)
    new_graph.lint()
    still_called = {node.target for node in new_graph.nodes if node.op == "call_module"}
    log = _ModuleTreeLog(graph_module)
    compiled = _CompiledState(graph_module)
    try:
        for name, module in installs:
            log.set(name, module)
        for target in dict.fromkeys(removed):
            if target not in still_called:
                log.delete(target)
        for target, value in plan.tensors.items():
            log.set_tensor(target, value)
        # Not the ``graph`` setter, which recompiles: speed_up recompiles once (and gives a
        # GraphModule traced elsewhere eager-speed code).
        graph_module._graph = new_graph
        new_graph.owning_module = graph_module
        if _DEFER_KEY in graph_module.__dict__:
            graph_module.__dict__[_STALE_KEY] = True  # generated when the deferring block ends
            return graph_module
        return speed_up(graph_module)
    except BaseException:
        log.rollback()
        graph_module._graph = old_graph
        old_graph.owning_module = graph_module
        compiled.restore()
        raise


def _structure(graph: fx.Graph) -> list[tuple[str, str, Any]]:
    return [(node.name, node.op, node.target) for node in graph.nodes]


def _install_modules_only(graph_module: fx.GraphModule, plan: Plan, graph: fx.Graph | None) -> bool:
    """Install a plan that only swaps modules under their own names, without generating code again.

    The generated forward names each call site's module by its qualified name
    and the fast-lookup cache notices a swapped module by itself, so when no
    argument, node or name changes, the code stays valid: only the modules,
    ``get_attr`` tensors and recorded shapes change.

    Returns:
        Whether the plan was of that kind (and is installed); ``False`` leaves
        everything to the full install.
    """
    if not is_sped_up(graph_module) or _DEFER_KEY in graph_module.__dict__:
        return False
    if any(edit.action == "remove" or edit.args is not None or edit.kwargs is not None for edit in plan.edits):
        return False
    live = graph_module.graph
    if graph is not None and graph is not live and _structure(graph) != _structure(live):
        return False  # an inserted node
    # Indexed lookups (Graph.find_nodes), not a walk over the graph: this path should cost
    # about what add_submodule does.
    by_target: dict[str, set[str]] = defaultdict(set)
    for edit in plan.edits:
        if edit.module is not None:
            by_target[edit.target].add(edit.node)
    chosen: dict[str, nn.Module] = {}
    found: dict[str, fx.Node] = {}
    for target, edited in by_target.items():
        sites = live.find_nodes(op="call_module", target=target)
        if {node.name for node in sites} != edited:
            return False  # some sites keep the old module (or a name is new): new code
        found.update((node.name, node) for node in sites)
    for edit in plan.edits:
        if edit.module is not None:
            if chosen.get(edit.target, edit.module) is not edit.module:
                return False  # two new modules for one name
            chosen[edit.target] = edit.module
    log = _ModuleTreeLog(graph_module)
    try:
        for target, module in chosen.items():
            log.set(target, module)
        for target, value in plan.tensors.items():
            log.set_tensor(target, value)
    except BaseException:
        log.rollback()
        raise
    # Shapes last: nothing after this can fail.
    missing = [name for name in plan.new_metas if name not in found]
    if (graph is not None and graph is not live) or missing:
        nodes = {node.name: node for node in live.nodes}
    else:
        nodes = found
    if graph is not None and graph is not live:
        staged = {node.name: node for node in graph.nodes}
        for name, node in nodes.items():
            for key in ("tensor_meta", NOT_GIVEN_KEY):
                if key in staged[name].meta:
                    node.meta[key] = staged[name].meta[key]
                else:
                    node.meta.pop(key, None)
    for name, meta in plan.new_metas.items():
        if name in nodes:
            if meta is None:
                nodes[name].meta.pop("tensor_meta", None)
            else:
                nodes[name].meta["tensor_meta"] = meta
    _refresh_output_meta(live)
    return True


def _refresh_output_meta(graph: fx.Graph) -> None:
    """The output node's recorded shape, from what it returns (the plan updates the nodes it touched)."""
    output = next(iter(graph.find_nodes(op="output")), None)
    if output is None or "tensor_meta" not in output.meta or not output.args:
        return
    returned = [arg for arg in output.all_input_nodes]
    if not all("tensor_meta" in node.meta for node in returned):
        return
    output.meta["tensor_meta"] = fx.node.map_aggregate(
        output.args[0], lambda value: value.meta["tensor_meta"] if isinstance(value, fx.Node) else value
    )


_DEFER_KEY = "_fxindex_defer_codegen"
_STALE_KEY = "_fxindex_code_stale"


@contextlib.contextmanager
def deferred_codegen(graph_module: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Several in-place edits of ``graph_module``, with its forward generated once, at the end.

    Each edit that changes the graph regenerates the forward code (a full
    ``recompile``); inside this block in-place edits (``inplace=True``) only
    swap the graph, and the code is generated once when the block ends. The
    model cannot be called inside the block (its code is stale): calling it
    raises :class:`~fxindex.StaleForwardError` (a ``RuntimeError``). Blocks nest.

    Args:
        graph_module: the GraphModule the edits change in place.

    Yields:
        ``graph_module``.

    Example:
        >>> import torch, fxindex
        >>> gm = fxindex.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
        >>> with fxindex.deferred_codegen(gm):
        ...     _ = fxindex.replace(gm, 0, torch.nn.Linear(4, 16), inplace=True)
        ...     _ = fxindex.remove(gm, 1, inplace=True)
        >>> gm(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """
    if not isinstance(graph_module, fx.GraphModule):
        raise TypeError(f"deferred_codegen expects a torch.fx.GraphModule, got {type(graph_module).__name__}")
    state = graph_module.__dict__
    outer = _DEFER_KEY in state
    if not outer:
        state[_DEFER_KEY] = True

        def stale(*args: Any, **kwargs: Any) -> Any:
            raise StaleForwardError(
                "this GraphModule is being edited inside fxindex.deferred_codegen(...): its forward is generated "
                "when the block ends; call it after the block"
            )

        state["forward"] = stale  # an instance attribute shadows the class's generated forward
    try:
        yield graph_module
    finally:
        if not outer:
            del state[_DEFER_KEY]
            state.pop("forward", None)
            if state.pop(_STALE_KEY, False):
                speed_up(graph_module)


def _with_context(error: FxIndexError, caller: str) -> FxIndexError:
    if error.args and isinstance(error.args[0], str) and not error.args[0].startswith(caller):
        error.args = (f"{caller}: {error.args[0]}",) + error.args[1:]
    return error


def _plan_edit(
    caller: str,
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None,
    example_inputs: tuple[Any, ...] | None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None,
    propagate: bool,
    all_sites: bool,
    couple: bool = True,
) -> tuple[_Source, Plan, dict[str, Any]]:
    """Trace if needed, select the sites and plan: what plan() returns and replace() applies."""
    with _editing():
        source = _source(model, example_inputs, caller=caller)
        try:
            targets, edit = _select(source.index(), index, new_layer, keep, all_sites, caller)
            try:
                planned = build_plan(source.module, targets, propagate=propagate, graph=source.graph)
            except PropagationError as refusal:
                # A change that stops at a join: resize the layer's whole channel group instead.
                if not (couple and propagate and len(targets) == 1 and targets[0].action == "replace"):
                    raise
                planned = plan_coupled(source.module, source.graph, targets[0], refusal)
                edit = {**edit, "couple": True}
        except FxIndexError as error:
            raise _with_context(error, caller) from error.__cause__
        return source, planned, edit


@contextlib.contextmanager
def _editing() -> Iterator[None]:
    """The context every edit runs in.

    Outside inference mode, even when the caller is inside one: tensors made
    there (copies, rebuilt weights) would be inference tensors, and the edited
    model could never be trained.
    """
    with torch.inference_mode(False):
        yield


def _install(
    source: _Source,
    planned: Plan,
    inplace: bool,
    edits: list[dict[str, Any]],
    share_untouched: bool = False,
    model: nn.Module | None = None,
    example_inputs: tuple[Any, ...] | None = None,
) -> nn.Module:
    """Copy (unless ``inplace``), install the plan and record the edits: the one place that writes.

    ``inplace=True`` on a plain module (not a GraphModule) edits that module
    tree itself: the plan goes into a light copy of its trace, which is then
    written back and verified (:func:`fxindex._writeback.write_back`).
    """
    if share_untouched and inplace:
        raise EditError("share_untouched=True is for copies: with inplace=True nothing is copied")
    write_back_to = model if inplace and model is not None and not isinstance(model, fx.GraphModule) else None
    with _editing():
        if write_back_to is not None:
            # Never into the trace itself: it shares the user's layers, and a get_attr tensor set
            # there would change the user's module outside write_back's undo log.
            graph_module, planned = _edited(source, False, planned, share_untouched=True)
        else:
            graph_module, planned = _edited(source, inplace, planned, share_untouched)
        graph = source.graph if source.graph is not source.module.graph else None
        apply_plan(graph_module, planned, graph)
        for edit in edits:
            record_edit(graph_module, edit)
        if write_back_to is not None:
            return write_back(write_back_to, graph_module, planned.edits, example_inputs, caller=f"fxindex.{edits[0]['op']}")
        return graph_module


def plan(
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None = None,
    propagate: bool = True,
    all_sites: bool = False,
    couple: bool = True,
    rules: Mapping[Any, Any] | None = None,
) -> Plan:
    """Compute what :func:`replace` would do, without doing it.

    Takes the same arguments as :func:`replace` (but never ``inplace`` or
    ``share_untouched``), and raises the same errors.

    Args:
        model, index, new_layer, example_inputs, keep, propagate, all_sites,
            couple: as for :func:`replace`.
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        A :class:`~fxindex.Plan`: the touched nodes with old and new
        modules or arguments, which weights are kept, sliced or new, whether
        the edit preserves the model's function, and output shape changes.

    Example:
        >>> import torch, fxindex
        >>> model = fxindex.examples.SeedModel()
        >>> steps = fxindex.plan(model, 0, torch.nn.Conv2d(3, 21, 3), example_inputs=fxindex.examples.seed_inputs())
        >>> [edit.action for edit in steps.edits]
        ['replace', 'rewrite', 'rebuild']
    """
    with using(rules):
        _, planned, _ = _plan_edit(
            "fxindex.plan", model, index, new_layer, example_inputs, keep, propagate, all_sites, couple
        )
        return planned


def replace(
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    keep: Sequence[int] | Mapping[Selector, Sequence[int]] | None = None,
    propagate: bool = True,
    inplace: bool = False,
    all_sites: bool = False,
    couple: bool = True,
    share_untouched: bool = False,
    rules: Mapping[Any, Any] | None = None,
) -> fx.GraphModule:
    """Replace the layer at an execution-order index and adapt the graph downstream.

    When the new layer changes the size of one dimension (channels, features),
    the change is carried to the layers that read it: normalisations are
    rebuilt, the next Linear/Conv gets new input slots (zero weights),
    hard-coded ``view``/``reshape`` sizes are rewritten, and every weight that
    still means something is kept.

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        index: an int in execution order (negatives allowed), a qualified name
            (its first call site), or a dict ``{index: new_layer}`` for several
            replacements in one pass (all indices from the original numbering).
        new_layer: the module to call at that site (omit with a dict).
        example_inputs: a tuple of inputs; records shapes so reshapes can be
            rewritten and the rebuilt graph shape-checked with fake tensors.
        keep: old output channels kept, in their new order (new position ``j``
            takes old channel ``keep[j]``; positions past ``len(keep)`` are
            new). Default: the first channels, by position. A dict per index
            with a dict ``index``.
        propagate: adapt downstream layers (default). With ``False`` only the
            call site changes, and downstream layers must accept its output.
        inplace: edit ``model`` itself instead of a copy. Even then a failed
            call leaves it untouched. On a plain module (not a GraphModule)
            the edit is written back into its own module tree, so it keeps
            its class, methods and hooks, and verified by running it against
            the edited graph; an edit its eager code cannot express (a
            rewritten hard-coded ``view``) is an ``EditError`` that restores
            it exactly (use ``inplace=False`` for the GraphModule then).
        all_sites: replace every call site of a module called several times
            (default: only the selected one, under a new unique name).
        couple: when the change meets a join (a residual ``add``, a gating
            ``mul``) whose other side keeps its width, resize the layer's
            whole channel group (every producer writing into the stream, its
            carriers and consumers; see :func:`fxindex.group`) instead of
            refusing (default). ``False`` keeps the refusal, for callers who
            want only the one layer changed. Needs recorded shapes.
        share_untouched: a light copy: every parameter and buffer the edit
            does not rebuild is the *same tensor* as in ``model`` (extra
            memory: the rebuilt layers only), so training the result or
            updating its BatchNorm statistics changes ``model`` too, and
            the other way round. Default ``False``: a deep copy that shares
            nothing (the tensors of layers the edit replaces are not copied,
            as the copy drops them).
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        The rebuilt ``GraphModule``, linted and recompiled; with ``inplace=True``
        on a plain module, that module itself. Unless ``inplace`` or
        ``share_untouched``, it shares no parameter tensor with ``model``.

    Raises:
        TypeError: ``model`` or ``new_layer`` is not a module, or a layer is
            selected by something other than an int or a name.
        EditError: the arguments do not fit together or the layer: an empty
            dict, ``new_layer`` missing or given beside a dict, a layer
            selected twice, ``keep=`` that is not a list of distinct channel
            indices of the layer, or names a layer not replaced,
            ``share_untouched`` with ``inplace``.
        LayerIndexError / LayerNameError: no such layer.
        ShapeMismatchError: the new layer cannot read the old one's input.
        PropagationError: the change cannot be carried (a residual join whose
            other branch keeps its width, an op with no rule...).
        ShapesRequiredError: a rule needs shapes: pass ``example_inputs``.

    Example:
        >>> import torch, fxindex
        >>> model = fxindex.examples.SeedModel()
        >>> inputs = fxindex.examples.seed_inputs()
        >>> rebuilt = fxindex.replace(model, 0, torch.nn.Conv2d(3, 21, 3), example_inputs=inputs)
        >>> rebuilt.linear1
        Linear(in_features=14196, out_features=128, bias=True)
        >>> rebuilt(*inputs).shape
        torch.Size([2, 8])
    """
    with using(rules):
        source, planned, edit = _plan_edit(
            "fxindex.replace", model, index, new_layer, example_inputs, keep, propagate, all_sites, couple
        )
        return _install(source, planned, inplace, [{**edit, "propagate": propagate}], share_untouched, model, example_inputs)


def _several(index: Any, caller: str) -> list[Any]:
    """One selector or a list/tuple of them, as a list (a str is one qualified name)."""
    if isinstance(index, (list, tuple)):
        if not index:
            raise EditError(f"{caller}: the list of layers is empty")
        return list(index)
    return [index]


def _warn_if_output_changes(planned: Plan, caller: str, what: str) -> None:
    """Removing or inserting a layer rarely means to change the model's output shape: say so when it does."""
    if planned.output_changes:
        warnings.warn(
            f"{caller}: {what} changes the model's output: {'; '.join(planned.output_changes)}. If that was not "
            "meant, check the indices (indices from before an earlier edit may name other layers now)",
            EditWarning,
            stacklevel=3,
        )


def remove(
    model: nn.Module,
    index: Selector | Sequence[Selector],
    *,
    example_inputs: tuple[Any, ...] | None = None,
    inplace: bool = False,
    share_untouched: bool = False,
    rules: Mapping[Any, Any] | None = None,
) -> fx.GraphModule:
    """Remove the layer at ``index`` (or every layer of a list): its input flows straight to its users.

    If the layer changed the shape (a Linear 128 -> 64), downstream layers are
    adapted as for :func:`replace`. Several layers are removed in one pass,
    all numbered on the original graph: ``remove(gm, layers.find(nn.Dropout))``.
    A removal that changes the model's output shape warns
    (:class:`~fxindex.EditWarning`).

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        index: an int in execution order, a qualified name, or a list of them.
        example_inputs: a tuple of inputs; records shapes first.
        inplace: edit ``model`` itself instead of a copy (a plain module gets
            the edit written back, as for :func:`replace`). Even then a failed
            call leaves it untouched.
        share_untouched: a light copy sharing every tensor it does not
            rebuild with ``model`` (see :func:`replace`).
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        The rebuilt ``GraphModule`` (with ``inplace=True`` on a plain module,
        that module); the call sites are gone from its index.

    Raises:
        TypeError: ``model`` is not a module, or a layer is selected by
            something other than an int or a name.
        EditError: an empty list, a layer selected twice, or
            ``share_untouched`` with ``inplace``.
        LayerIndexError / LayerNameError: no such layer.
        PropagationError / ShapesRequiredError: as for :func:`replace`, when
            the removed layer changed the shape.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> [e.target for e in fxindex.index(fxindex.remove(net, 1))]
        ['0', '2']
    """
    with using(rules):
        caller = "fxindex.remove"
        with _editing():
            source = _source(model, example_inputs, caller=caller)
            try:
                layers = source.index()
                positions: dict[int, None] = {}
                for key in _several(index, caller):
                    position = layers.resolve(key)
                    if position in positions:
                        raise EditError(f"{caller}: {_label(layers, position)} is selected twice")
                    positions[position] = None
                targets = []
                for position in positions:
                    node = layers.node(position)
                    widths = find_widths(source.module.get_submodule(str(node.target)))
                    # Without the layer, its users read its input: the same dimension at the input's width.
                    passed = Widths(widths.in_dim, widths.in_size, widths.in_dim, widths.in_size) if widths else None
                    targets.append(Target(node, nn.Identity(), None, _label(layers, position), "remove", widths, passed))
                planned = build_plan(source.module, targets, graph=source.graph)
            except FxIndexError as error:
                raise _with_context(error, caller) from error.__cause__
            what = "removing " + ", ".join(_label(layers, position) for position in positions)
            _warn_if_output_changes(planned, caller, what)
            # Recorded one removal per layer, the last first: replayed one by one, each index still names its layer.
            edits = [
                {"op": "remove", "index": position, "target": str(layers.node(position).target)}
                for position in sorted(positions, reverse=True)
            ]
            return _install(source, planned, inplace, edits, share_untouched, model, example_inputs)


def insert(
    model: nn.Module,
    index: Selector | Mapping[Selector, nn.Module],
    new_layer: nn.Module | None = None,
    *,
    after: bool = True,
    example_inputs: tuple[Any, ...] | None = None,
    inplace: bool = False,
    share_untouched: bool = False,
    rules: Mapping[Any, Any] | None = None,
) -> fx.GraphModule:
    """Insert ``new_layer`` after (or before) the layer at ``index``.

    The new layer reads what that layer wrote (or read); if it changes the
    shape, downstream layers are adapted as for :func:`replace`. It is
    registered beside the anchor under a new name (``conv1_inserted``).
    Several layers are inserted in one pass with a dict ``{index: new_layer}``,
    all indices numbered on the original graph. An insertion that changes the
    model's output shape warns (:class:`~fxindex.EditWarning`).

    Args:
        model: an ``nn.Module`` (traced first) or a ``torch.fx.GraphModule``.
        index: the anchor layer (int or qualified name), or a dict
            ``{anchor: new_layer}``.
        new_layer: the module to insert (omit with a dict).
        after: insert after the anchor (default) or before it.
        example_inputs: a tuple of inputs; records shapes first.
        inplace: edit ``model`` itself instead of a copy (a plain module gets
            the edit written back, as for :func:`replace`). Even then a failed
            call leaves it untouched.
        share_untouched: a light copy sharing every tensor it does not
            rebuild with ``model`` (see :func:`replace`).
        rules: rules in effect for this call only, before the registered ones
            (``{MyLayer: my_rule}``; see :func:`fxindex.rules.using`).

    Returns:
        The rebuilt ``GraphModule`` (with ``inplace=True`` on a plain module,
        that module).

    Raises:
        TypeError: ``model`` or ``new_layer`` is not a module, or an anchor is
            selected by something other than an int or a name.
        EditError: an empty dict, ``new_layer`` missing or given beside a
            dict, an anchor selected twice, or ``share_untouched`` with
            ``inplace``.
        LayerIndexError / LayerNameError: no such anchor.
        ShapeMismatchError / PropagationError / ShapesRequiredError: as for
            :func:`replace`, when the new layer changes the shape.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> rebuilt = fxindex.insert(net, 0, torch.nn.ReLU())
        >>> [type(e.module).__name__ for e in fxindex.index(rebuilt)]
        ['Linear', 'ReLU', 'Linear']
    """
    with using(rules):
        caller = "fxindex.insert"
        with _editing():
            source = _source(model, example_inputs, caller=caller)
            try:
                layers = source.index()
                if isinstance(index, Mapping):
                    if new_layer is not None:
                        raise EditError(f"{caller}: with a dict of insertions, leave new_layer out (got {_short_type(new_layer)})")
                    if not index:
                        raise EditError(f"{caller}: the dict of insertions is empty")
                    choices = list(index.items())
                else:
                    if new_layer is None:
                        raise EditError(f"{caller}: new_layer is missing: pass an nn.Module (or a dict {{index: layer}} as index)")
                    choices = [(index, new_layer)]
                chosen: dict[int, nn.Module] = {}
                for key, layer in choices:
                    position = layers.resolve(key)
                    if position in chosen:
                        raise EditError(f"{caller}: {_label(layers, position)} is selected twice")
                    chosen[position] = _check_layer(layer, _label(layers, position), source.module)
                # The caller's graph is never touched while planning: the new nodes go into a copy.
                staged = source.staged()
                staged_layers = staged.index()
                targets = []
                names: dict[int, str] = {}
                for position, layer in chosen.items():
                    anchor = staged_layers.node(position)
                    name = _unique_name(source.module, f"{anchor.target}_inserted", plain_first=True, taken=set(names.values()))
                    names[position] = name
                    new_node = _insert_node(staged.graph, anchor, name, after)
                    staged.extra_modules[name] = nn.Identity()
                    anchor_widths = find_widths(source.module.get_submodule(str(anchor.target)))
                    if anchor_widths is not None:
                        # The placeholder identity passes on what the anchor writes (after) or reads (before).
                        dim, size = (
                            (anchor_widths.out_dim, anchor_widths.out_size) if after
                            else (anchor_widths.in_dim, anchor_widths.in_size)
                        )
                        anchor_widths = Widths(dim, size, dim, size)
                    label = f"new layer {name!r} {'after' if after else 'before'} {_label(layers, position)}"
                    targets.append(Target(new_node, layer, None, label, old_widths=anchor_widths))
                planned = build_plan(
                    source.module, targets, graph=staged.graph, extra_modules=staged.extra_modules
                )
            except FxIndexError as error:
                raise _with_context(error, caller) from error.__cause__
            what = "inserting " + ", ".join(f"{names[p]!r}" for p in chosen)
            _warn_if_output_changes(planned, caller, what)
            # One insertion per anchor, the last first: replayed one by one, each index still names its anchor.
            edits = [
                {
                    "op": "insert",
                    "index": position,
                    "target": str(layers.node(position).target),
                    "after": after,
                    "layer": describe_layer(chosen[position]),
                }
                for position in sorted(chosen, reverse=True)
            ]
            return _install(staged, planned, inplace, edits, share_untouched, model, example_inputs)


def _insert_node(graph: fx.Graph, anchor: fx.Node, name: str, after: bool) -> fx.Node:
    """Add a ``call_module`` node of ``name`` after (or before) ``anchor``, reading what it wrote (or read)."""
    if after:
        with graph.inserting_after(anchor):
            new_node = graph.call_module(name, (anchor,))
        anchor.replace_all_uses_with(new_node, delete_user_cb=lambda user: user is not new_node)
        source_meta = anchor.meta.get("tensor_meta")
    else:
        source = anchor.args[0]
        with graph.inserting_before(anchor):
            new_node = graph.call_module(name, (source,))
        anchor.replace_input_with(source, new_node)
        source_meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    if source_meta is not None:
        new_node.meta["tensor_meta"] = source_meta
    return new_node
