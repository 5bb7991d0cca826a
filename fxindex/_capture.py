"""Capture through ``torch.export`` and lift the exported graph back to fxindex's form.

Symbolic tracing cannot read a model whose ``forward`` branches on a tensor's
value or size, iterates over a tensor, or hides behind a library decorator
(every Hugging Face transformers model). ``torch.export.export(strict=False)``
runs the model's Python on fake tensors and records the ATen ops it executes,
so it captures those models. Its graph, though, is all ATen: a ``Linear`` is an
``aten.linear`` reading lifted parameter placeholders, and fxindex indexes
``call_module`` nodes.

The lifting builds a new ``fx.Graph`` in fxindex's form:

* every call of a leaf layer (torch.nn layers, their subclasses, the user's
  ``leaf_modules``) is one ``call_module`` node on the user's own module
  object, with the call's own arguments (positional and keyword, tensors and
  constants, exactly as the caller passed them) and its outputs;
* the ops between leaves stay as captured (ATen ``call_function`` nodes);
  parameters and buffers they read are ``get_attr`` nodes on their state-dict
  names; tensors created in ``forward`` (``torch.tensor(...)``) are buffers of
  the GraphModule;
* the graph's placeholders are ``forward``'s positional arguments, and it
  returns the model's output structure (a tuple, list or dict as the model
  returns it; another container, such as a transformers ``ModelOutput``, as a
  dict of its fields, or a tuple when its fields have no names).

How the leaf calls are found: during the export every leaf gets a forward
pre-hook and a forward hook (removed afterwards) that pass the call's tensors
through an identity custom op, :func:`mark`, tagged with the call's number. The
marks bracket each call in the exported graph, so its inputs, outputs and
internal ops are known exactly (the ``nn_module_stack`` metadata names modules
but cannot tell two calls of one module with the same inputs apart, nor a
module's argument order). The marks never reach the lifted graph.
"""

from __future__ import annotations

from operator import attrgetter

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxindex._errors import TraceError

__all__ = ["CAPTURE_KEY", "capture_export", "export_with_marks", "lift", "mark"]

CAPTURE_KEY = "fxindex_capture"
"""``gm.meta[CAPTURE_KEY]`` says which capture made a GraphModule: ``"symbolic"`` or ``"export"``."""

CONSTANTS = "_fxindex_constants"
"""The submodule of a lifted GraphModule that holds tensors created in ``forward`` (non-persistent buffers)."""

EXPORT_INFO_KEY = "fxindex_export"
"""``gm.meta[EXPORT_INFO_KEY]``: what the export capture changed (the output form, caching off)."""


# The identity op that brackets leaf calls. A custom op is one node in the exported graph whatever
# it wraps, and its call number and kind (0: inputs, 1: outputs) stay plain constants in its args.
@torch.library.custom_op("fxindex::mark", mutates_args=())
def mark(tensors: list[torch.Tensor], call: int, kind: int) -> list[torch.Tensor]:
    """Return copies of ``tensors`` (a custom op cannot return its inputs); tags leaf call ``call``.

    Args:
        tensors: the tensors that enter (``kind`` 0) or leave (``kind`` 1) the call.
        call: the call's number, in the order the calls start.
        kind: 0 for the call's inputs, 1 for its outputs.

    Returns:
        One copy per tensor.
    """
    return [tensor.clone() for tensor in tensors]


@mark.register_fake
def _mark_fake(tensors: list[torch.Tensor], call: int, kind: int) -> list[torch.Tensor]:
    return [torch.empty_like(tensor) for tensor in tensors]


# The basic Python values a lifted call_module node may hold as constant arguments: fx writes
# them into the generated code with repr, which other objects do not survive.
_CONSTANT_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


@dataclass
class LeafCall:
    """One call of a leaf layer, as the hooks saw it during the export.

    Attributes:
        number: the call's number (the ``call`` tag of its marks).
        target: the leaf's qualified name in the root module.
        module: the leaf module.
        in_spec: the pytree spec of the call's ``(args, kwargs)``.
        in_leaves: the flat leaves of ``(args, kwargs)``: ``None`` where a
            tensor was (it comes from the graph), the constant otherwise.
        out_paths: the pytree key path of each tensor of the call's result.
        out_single: whether the result was one tensor.
        done: whether the call returned (its output mark exists).
    """

    number: int
    target: str
    module: nn.Module
    in_spec: pytree.TreeSpec
    in_leaves: list[Any]
    out_paths: list[tuple[Any, ...]] = field(default_factory=list)
    out_single: bool = False
    done: bool = False


@dataclass
class ExportCapture:
    """What :func:`export_with_marks` captured.

    Attributes:
        program: the ``ExportedProgram`` (its graph holds the marks).
        calls: every marked leaf call, by number.
        notes: what the capture changed to make the export possible.
    """

    program: Any
    calls: dict[int, LeafCall]
    notes: dict[str, Any]


class ExportFailure(Exception):
    """``torch.export`` failed; carries the module whose forward was running and the cause."""

    def __init__(self, error: BaseException, module_path: str | None):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.module_path = module_path


def _leaf_targets(model: nn.Module, is_leaf: Callable[[nn.Module, str], bool]) -> dict[str, nn.Module]:
    """Qualified name -> module of every leaf below the root.

    Leaves inside leaves are listed too: a container that torch.fx counts as a leaf
    (``nn.ModuleList``) is never called, and its children are; a call inside a running
    leaf call is told apart at run time (it belongs to the outer call).
    """
    return {name: module for name, module in model.named_modules() if module is not model and is_leaf(module, name)}


@contextlib.contextmanager
def _caching_off(model: nn.Module, notes: dict[str, Any]) -> Iterator[None]:
    """Turn off a transformers config's ``use_cache`` during capture (a cache object is no tensor output)."""
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", False) is True and all(c is not config for c in configs):
            configs.append(config)
    try:
        for config in configs:
            config.use_cache = False
        if configs:
            notes["use_cache"] = False
        yield
    finally:
        for config in configs:
            config.use_cache = True


def export_with_marks(
    model: nn.Module, example_inputs: tuple[Any, ...], is_leaf: Callable[[nn.Module, str], bool]
) -> ExportCapture:
    """Export ``model`` non-strictly with every leaf call bracketed by :func:`mark`.

    Args:
        model: the model (not modified: hooks and the ``use_cache`` switch are undone).
        example_inputs: positional inputs.
        is_leaf: ``is_leaf(module, qualified_name)``, the tracer's leaf test.

    Returns:
        The program and the recorded calls.

    Raises:
        ExportFailure: ``torch.export`` failed; says in which module's forward.
    """
    leaves = _leaf_targets(model, is_leaf)
    names = {id(module): name for name, module in model.named_modules()}
    calls: dict[int, LeafCall] = {}
    # Calls of leaves inside a leaf (a shared module) belong to the outer call: no marks there.
    open_calls: list[LeafCall] = []
    # Which module's forward is running, for the error: pre-hooks push, forward hooks pop, and
    # an exception leaves the stack as it was where it happened.
    running: list[str] = []
    handles = []

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        running.append(names.get(id(module), type(module).__name__))
        target = leaf_names.get(id(module))
        if target is None or open_calls:
            return None
        flat, spec = pytree.tree_flatten((args, kwargs))
        positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]
        constants = [None if isinstance(value, torch.Tensor) else value for value in flat]
        call = LeafCall(len(calls), target, module, spec, constants)
        calls[call.number] = call
        open_calls.append(call)
        marked = mark([flat[i] for i in positions], call.number, 0)
        for i, tensor in zip(positions, marked):
            flat[i] = tensor
        return pytree.tree_unflatten(flat, spec)

    def leave(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> Any:
        if running:
            running.pop()
        if id(module) not in leaf_names or not open_calls or open_calls[-1].module is not module:
            return None
        call = open_calls.pop()
        pairs, spec = pytree.tree_flatten_with_path(result)
        flat = [value for _, value in pairs]
        positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]
        call.out_paths = [pairs[i][0] for i in positions]
        call.out_single = isinstance(result, torch.Tensor)
        call.done = True
        marked = mark([flat[i] for i in positions], call.number, 1)
        for i, tensor in zip(positions, marked):
            flat[i] = tensor
        return pytree.tree_unflatten(flat, spec)

    leaf_names = {id(module): name for name, module in leaves.items()}
    notes: dict[str, Any] = {}
    try:
        for module in model.modules():
            if module is model:
                continue
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(leave, with_kwargs=True))
        with _caching_off(model, notes):
            program = torch.export.export(model, example_inputs, strict=False)
    except Exception as error:
        raise ExportFailure(error, running[-1] if running else None) from error
    finally:
        for handle in handles:
            handle.remove()
    return ExportCapture(program, calls, notes)


def _inline_context_subgraphs(program: Any) -> None:
    """Put the bodies of torch.export's autocast / set-grad wrappers back into the main graph.

    torch.export turns a ``with torch.autocast(...)`` block in ``forward`` (timm's
    efficientvit LiteMLA) into one ``wrap_with_autocast`` call on a subgraph, and
    a ``with torch.set_grad_enabled(...)`` block into ``wrap_with_set_grad_enabled``;
    the leaf calls inside would then be out of the lifting's reach. Inlined, the
    block is what export produced before that pass: the enter and exit of the
    context as plain calls around the block's ops, which fx runs as written.
    """
    wrappers = {}
    for name, enter, exit_ in (
        ("wrap_with_autocast", torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast),
        ("wrap_with_set_grad_enabled", torch._C._set_grad_enabled, None),
    ):
        operator_ = getattr(torch.ops.higher_order, name, None)
        if operator_ is not None:
            wrappers[operator_] = (name, enter, exit_)
    graph_module = program.graph_module
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in wrappers:
            continue
        name, enter, exit_ = wrappers[node.target]
        # wrap_with_autocast(device_type, dtype, enabled, cache_enabled, body, *operands);
        # wrap_with_set_grad_enabled(enable_grad, body, *operands).
        count = 4 if name == "wrap_with_autocast" else 1
        context_args, body, operands = node.args[:count], node.args[count], node.args[count + 1 :]
        if not (isinstance(body, fx.Node) and body.op == "get_attr"):
            continue
        subgraph = attrgetter(body.target)(graph_module)
        placeholders = [n for n in subgraph.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue  # not the form this torch writes: left for lift to refuse by name
        with graph.inserting_before(node):
            if name == "wrap_with_autocast":
                state = graph.call_function(enter, tuple(context_args))
            else:
                previous = graph.call_function(torch.is_grad_enabled, ())
                graph.call_function(enter, tuple(context_args))
            result = graph.graph_copy(subgraph.graph, dict(zip(placeholders, operands)))
            if name == "wrap_with_autocast":
                graph.call_function(exit_, (state,))
            else:
                graph.call_function(enter, (previous,))
        results = result if isinstance(result, (tuple, list)) else (result,)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                graph.erase_node(user)
        if node.users:
            raise TraceError(f"torch.export's {name} call '{node.name}' is read other than by index: fxindex cannot lift it")
        graph.erase_node(node)
        if not body.users:
            graph.erase_node(body)


def _state_names(program: Any) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Placeholder name -> state-dict name (params, buffers), -> constant name, and user inputs in order."""
    from torch.export.graph_signature import InputKind

    states: dict[str, str] = {}
    constants: dict[str, str] = {}
    users: list[str] = []
    for spec in program.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            states[name] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[name] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            users.append(name)
        else:
            raise TraceError(f"torch.export captured an input of kind {spec.kind.name} ('{name}'), which fxindex cannot lift")
    return states, constants, users


def _forward_names(model: nn.Module, count: int) -> list[str]:
    """Names for the lifted graph's placeholders: ``forward``'s positional parameters."""
    import inspect

    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [positional[i] if i < len(positional) else f"input_{i}" for i in range(count)]


def _by_path(graph: fx.Graph, node: fx.Node, path: tuple[Any, ...]) -> fx.Node:
    """``node[k0][k1]...`` along a pytree key path, as getitem nodes (getattr for attribute keys)."""
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            node = graph.call_function(operator.getitem, (node, key.idx))
        elif isinstance(key, pytree.MappingKey):
            node = graph.call_function(operator.getitem, (node, key.key))
        elif isinstance(key, pytree.GetAttrKey):
            node = graph.call_function(getattr, (node, key.name))
        else:
            raise TraceError(f"cannot reach a value at pytree key {key!r} of a lifted call's result")
    return node


def _output_structure(spec: pytree.TreeSpec, leaves: list[Any]) -> tuple[Any, str]:
    """The lifted graph's return value for the model's output spec, and how it was formed."""
    if spec.is_leaf():
        return leaves[0], "as returned"
    plain = (tuple, list, dict, type(None))

    def build(node_spec: pytree.TreeSpec, values: Iterator[Any]) -> Any:
        if node_spec.is_leaf():
            return next(values)
        children = [build(child, values) for child in node_spec.children()]
        kind = node_spec.type
        if kind is type(None):
            return None
        if kind in (tuple, list):
            return kind(children)
        if kind is dict or (isinstance(kind, type) and issubclass(kind, dict) and kind.__module__ == "collections"):
            return dict(zip(node_spec.context, children))
        context = node_spec.context
        # A container of named fields (transformers ModelOutput, a dataclass): its fields by name.
        if isinstance(context, (list, tuple)) and len(context) == len(children) and all(isinstance(k, str) for k in context):
            return dict(zip(context, children))
        return tuple(children)

    structure = build(spec, iter(leaves))
    form = "as returned" if spec.type in plain else f"{getattr(spec.type, '__name__', spec.type)} as a dict of its fields"
    if spec.type not in plain and not isinstance(structure, dict):
        form = f"{getattr(spec.type, '__name__', spec.type)} as a tuple"
    return structure, form


def lift(
    capture: ExportCapture, model: nn.Module, example_inputs: tuple[Any, ...]
) -> tuple[fx.Graph, dict[str, torch.Tensor], dict[str, Any]]:
    """Build fxindex's graph from a marked export: leaf calls as ``call_module`` nodes.

    Args:
        capture: the marked export of ``model``.
        model: the captured model (its modules and tensors are shared, not copied).
        example_inputs: the inputs it was captured with (their structure names the placeholders).

    Returns:
        The graph (its ``get_attr`` and ``call_module`` targets are the model's qualified
        names, and ``_fxindex_constants.<name>`` for tensors made in ``forward``), those
        constant tensors by name, and notes on the form of the output.

    Raises:
        TraceError: the export holds something the lifting cannot express (a buffer mutated
            outside a layer, a leaf call with an argument fx cannot write, unbalanced marks).
    """
    from torch.export.graph_signature import OutputKind

    program = capture.program
    _inline_context_subgraphs(program)
    source = program.graph
    states, constant_names, user_inputs = _state_names(program)
    graph = fx.Graph()
    constants: dict[str, torch.Tensor] = {}
    env: dict[fx.Node, Any] = {}

    # Placeholders: one per positional input, named after forward's parameters; nested inputs are
    # reached with getitem, non-tensor inputs were specialised by the export (their values stay).
    flat_inputs = pytree.tree_flatten_with_path((tuple(example_inputs), {}))[0]
    if len(flat_inputs) != len(user_inputs):
        raise TraceError(
            f"torch.export flattened the example inputs into {len(user_inputs)} inputs, fxindex into "
            f"{len(flat_inputs)}: pass tensors (or tuples, lists, dicts of tensors) as example inputs"
        )
    placeholders = [graph.placeholder(name) for name in _forward_names(model, len(example_inputs))]
    user_nodes = {node.name: node for node in source.nodes if node.op == "placeholder"}
    for name, (path, value) in zip(user_inputs, flat_inputs):
        # path[0] is the (args, kwargs) pair's first element, path[1] the argument's position.
        position = path[1].idx
        env[user_nodes[name]] = _by_path(graph, placeholders[position], path[2:]) if isinstance(value, torch.Tensor) else value

    def state(node: fx.Node) -> fx.Node:
        """A get_attr node for a lifted parameter, buffer or constant, made once when first read."""
        if node not in env:
            if node.name in states:
                target = states[node.name]
            else:
                name = constant_names[node.name]
                target = f"{CONSTANTS}.{name.replace('.', '_')}"
                constants[target.split(".", 1)[1]] = program.constants[name]
            env[node] = graph.get_attr(target)
        return env[node]

    # Which source nodes each call covers: from its input mark to its output mark.
    order = list(source.nodes)
    position = {node: i for i, node in enumerate(order)}
    marks: dict[tuple[int, int], fx.Node] = {}
    for node in order:
        if node.op == "call_function" and node.target is torch.ops.fxindex.mark.default:
            marks[(node.args[1], node.args[2])] = node
    inside: dict[fx.Node, int] = {}
    for number, call in capture.calls.items():
        start, end = marks.get((number, 0)), marks.get((number, 1))
        if start is None and end is None:
            continue  # the call's result was unused and export removed it
        if start is None or end is None or not call.done:
            raise TraceError(f"the capture of call {number} of layer '{call.target}' is incomplete (one of its marks is missing)")
        for node in order[position[start] : position[end] + 1]:
            inside.setdefault(node, number)

    def value_of(argument: Any) -> Any:
        def one(node: fx.Node) -> Any:
            if node.op == "placeholder" and (node.name in states or node.name in constant_names):
                return state(node)
            if node not in env and node in inside:
                call = capture.calls[inside[node]]
                raise TraceError(
                    f"a value computed inside the call of layer '{call.target}' ({type(call.module).__name__}) is "
                    f"read outside it ('{node.name}') without being returned: fxindex cannot make that call one node"
                )
            return env[node]

        return fx.node.map_arg(argument, one)

    for node in order:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            break
        number = inside.get(node)
        is_mark = node.op == "call_function" and node.target is torch.ops.fxindex.mark.default
        if number is not None and not (is_mark and node.args[1] == number):
            continue  # an op inside a leaf call: the call_module node runs it
        if is_mark:
            call = capture.calls[node.args[1]]
            if node.args[2] == 0:
                # The call's tensors as they come from outside; its output mark builds the node.
                env[node] = [value_of(tensor) for tensor in node.args[0]]
                continue
            env[node] = _call_node(graph, call, env[marks[(call.number, 0)]])
            continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) and (
            node.args[0].op == "call_function" and node.args[0].target is torch.ops.fxindex.mark.default
        ):
            env[node] = env[node.args[0]][node.args[1]]
            continue
        if node.op == "get_attr":
            value = attrgetter(node.target)(program.graph_module)
            if not isinstance(value, torch.Tensor):
                raise TraceError(
                    f"torch.export captured '{node.target}' ({type(value).__name__}, a subgraph of torch.cond or "
                    "a custom object), which fxindex cannot lift"
                )
            constants[node.target.replace(".", "_")] = value
            env[node] = graph.get_attr(f"{CONSTANTS}.{node.target.replace('.', '_')}")
            continue
        new = graph.create_node(node.op, node.target, value_of(node.args), value_of(node.kwargs), name=node.name)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        env[node] = new

    output = next(node for node in reversed(order) if node.op == "output")
    results = list(output.args[0])
    user_outputs = []
    for spec, value in zip(program.graph_signature.output_specs, results):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value)
        elif spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION):
            if isinstance(value, fx.Node) and value not in inside:
                raise TraceError(
                    f"the model's forward mutates {spec.target!r} outside a layer ({value.name}); "
                    "the captured graph would not repeat that: make the mutating module a leaf (leaf_modules=[...])"
                )
        else:
            raise TraceError(f"torch.export captured an output of kind {spec.kind.name}, which fxindex cannot lift")
    leaves = [value_of(value) if isinstance(value, fx.Node) else value for value in user_outputs]
    structure, form = _output_structure(program.call_spec.out_spec, leaves)
    graph.output(structure)
    for node in reversed(list(graph.nodes)):
        # Getitems into nested inputs that nothing reads (not a general dead-code pass: an unused
        # leaf call stays, as in a symbolic trace).
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)
    return graph, constants, {"output": form}


def _call_node(graph: fx.Graph, call: LeafCall, tensors: list[Any]) -> Any:
    """The ``call_module`` node of one leaf call and the values of its marked output tensors."""
    values = iter(tensors)
    leaves = []
    for constant in call.in_leaves:
        if constant is None:
            leaves.append(next(values))
        elif isinstance(constant, _CONSTANT_TYPES):
            leaves.append(constant)
        else:
            raise TraceError(
                f"layer '{call.target}' ({type(call.module).__name__}) is called with a "
                f"{type(constant).__name__} argument, which a graph cannot hold as a constant: make its caller a "
                "leaf (leaf_modules=[...])"
            )
    # None marks a tensor's place: a None argument is a pytree node without leaves, never a leaf.
    args, kwargs = pytree.tree_unflatten(leaves, call.in_spec)
    node = graph.call_module(call.target, tuple(args), dict(kwargs))
    if call.out_single:
        return [node]
    return [_by_path(graph, node, path) for path in call.out_paths]


class _Source(nn.Module):
    """The root ``fx.GraphModule`` copies from: the model's attributes, and the captured constants.

    ``fx.GraphModule(root, graph)`` copies each target's owner chain from ``root`` (sharing the
    objects, as for a symbolic trace); reading through this view keeps the user's model untouched.
    """

    def __init__(self, model: nn.Module, constants: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_fxindex_model", model)
        # fx copies a root-level buffer as persistent unless its owner says otherwise.
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
        holder = nn.Module()
        for name, tensor in constants.items():
            holder.register_buffer(name, tensor, persistent=False)
        self.add_module(CONSTANTS, holder)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_fxindex_model"), name)


def capture_export(
    model: nn.Module, example_inputs: tuple[Any, ...], is_leaf: Callable[[nn.Module, str], bool]
) -> tuple[fx.Graph, nn.Module, dict[str, Any]]:
    """Export ``model`` and lift the result: see :func:`export_with_marks` and :func:`lift`.

    Args:
        model: the model (not modified).
        example_inputs: positional inputs.
        is_leaf: the tracer's leaf test.

    Returns:
        The lifted graph, the root to build its ``fx.GraphModule`` from (it reads the model's
        own modules and tensors), and notes on what the capture did.

    Raises:
        ExportFailure: ``torch.export`` failed.
        TraceError: the exported graph cannot be lifted.
    """
    captured = export_with_marks(model, example_inputs, is_leaf)
    graph, constants, notes = lift(captured, model, example_inputs)
    return graph, _Source(model, constants), {**captured.notes, **notes}
