"""Make a ``torch.fx.GraphModule`` run its forward at eager speed.

Why a plain GraphModule is slow
-------------------------------
The code torch.fx generates calls a submodule through its qualified name::

    layer1_0_conv1 = getattr(self.layer1, "0").conv1(x)

Every step of that chain is a failed normal attribute lookup (an internal
``AttributeError``) followed by ``nn.Module.__getattr__``, a Python function
that searches ``_parameters``, ``_buffers`` and ``_modules``. That costs
about a microsecond per step and per call, so 100 small ``Linear`` layers
nested 6 deep run ~1.8x slower than the eager model at batch 1.

What :func:`speed_up` does
--------------------------
It installs a :class:`FastLookupCodeGen` on the graph (``graph.set_codegen``)
and recompiles. That code generator emits the same code as torch.fx except
that the called modules come from a tuple cached in the instance
``__dict__``, unpacked into local variables once per call::

    _fxindex_lookup = getattr(self, '_fxindex_fast_lookup', None)
    if _fxindex_lookup is None or _fxindex_lookup[0] != 7 or _fxindex_lookup[2][0] is not self._modules \
            or _fxindex_lookup[1] != tuple(map(tuple, map(dict.values, _fxindex_lookup[2]))):
        ...  # rebuild the cache from self.get_submodule(...)
    _fxindex_m, _fxindex_m_1, ... = _fxindex_lookup[3]
    conv1 = _fxindex_m(x);  x = None  # conv1

The cache is ``(token, snapshot, dicts, modules)``: ``dicts`` are the
``_modules`` dicts of the root and of every container on the way to a called
layer, ``snapshot`` the tuple of their values when the cache was built. The
design choices, and why:

* **Locals, not lookups, at the call sites**: a call is then as cheap as the
  eager ``nn.Sequential`` loop's (a dict or attribute lookup per call costs
  ~0.5% on 100 small layers, measured). The submodules are still called
  through ``nn.Module.__call__``, so hooks, ``module.compile()`` and fx
  re-tracing (which patches ``Module.__call__``) behave as before.
* **A plain instance attribute, not a submodule or buffer**: it does not show
  up in ``state_dict``, ``named_modules``, ``parameters`` or ``.to()``; the
  state-dict keys stay those of the original model.
* **Checked on every call, in C**: the cache is rebuilt when its token is not
  this code's (each code generation gets a new one), when its root dict is not
  this module's own ``_modules`` (a cache copied along with ``__dict__``:
  ``DataParallel`` replicas, torch.export's proxies) or when any container's
  children changed since it was built. The last check, one ``tuple`` of the
  dicts' values compared item by item by identity, costs a few nanoseconds
  per child and catches every swap plain fx would see at once: a layer or a
  whole container replaced by ``add_submodule``, ``setattr``,
  ``seq[i] = ...``, even a raw ``parent._modules[name] = ...`` write or a
  deletion, with or without ``recompile()``.
* **Built eagerly too**: the code generator also builds the cache for
  ``graph.owning_module``, so the first call and ``torch.compile``'s trace
  find it ready.
* **Stored only when ``_modules`` is the instance's own dict**: torch.export's
  non-strict tracer runs forward on proxies that share the module's
  ``__dict__`` but return fresh ``_modules`` dicts of proxies (to record module
  paths). Those calls build a local cache, call through the proxies (so the
  exported graph keeps its ``nn_module_stack``) and leave no tracer object
  behind on the real module.
* **The rebuild is inline Python using only builtins and
  ``Module.get_submodule``**: ``GraphModule.__reduce__`` pickles the generated
  source plus an import block for its globals, and unpickling *re-traces* that
  source. With no fxindex global in it, a pickle loads where fxindex is not
  installed and re-traces to the same ``call_module`` nodes. The loaded module
  is a plain GraphModule (its graph gets torch's default code generator); call
  :func:`speed_up` on it again for speed.
* **Dynamo can trace it**: attribute reads, tuple and dict operations and
  constant comparisons are all things ``torch.compile`` (``fullgraph=True``
  included) and ``torch.export.export`` (strict or not) handle.

What people read
----------------
The prologue is machinery, not the model, so ``gm.code``, ``print(gm)`` and
``gm.print_readable()`` show the code plain torch.fx generates for the graph
(``self.layer1.conv1(x)`` at each call site). ``gm._code`` stays the code that
runs (torch.fx compiles ``forward`` from it, pickles it and shows its lines in
tracebacks). ``code`` is a property on the module's own class (torch.fx makes
one class per GraphModule) that turns ``_code`` back into torch.fx's text: it
is a function of ``_code`` alone, so it changes exactly when the generated
forward does (an edit undone by restoring ``_code`` shows the old text again)
and costs no second code generation. ``print_readable`` asks the code
generator for its annotated form (``verbose=True``), which is only printed,
never run: that form is left as torch.fx writes it.

``deepcopy`` re-creates the module through ``GraphModule.__init__`` with a
deep copy of the graph (and of its code generator), so the copy is recompiled
with its own cache. Editing ``gm.graph`` and calling ``gm.recompile()`` keeps
the code generator. Assigning a new graph (``gm.graph = g``) installs that
graph's code generator: call :func:`speed_up` again.

Limitations: ``torch.jit.script`` (deprecated) cannot compile the lookup; reset
with ``gm.graph.set_codegen(torch.fx.graph.CodeGen()); gm.recompile()`` first.
A graph whose code generator is neither torch's default nor its pytree one
(``_PyTreeCodeGen``, used with ``concrete_args``) is left as it is, with a
warning.
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from typing import Any

from torch import fx, nn
from torch.fx.graph import CodeGen, PythonCode

__all__ = ["speed_up", "is_sped_up", "FastLookupCodeGen", "plain_code"]

try:  # torch's own formatter, so that the text we look for is exactly what torch emits
    from torch.fx.graph import _format_target as _torch_format_target
except ImportError:  # pragma: no cover - only on a torch that renamed it
    _torch_format_target = None

try:
    from torch.fx.graph import _PyTreeCodeGen
except ImportError:  # pragma: no cover - very old torch
    _PyTreeCodeGen = None  # type: ignore[assignment,misc]

#: Name of the instance attribute holding the lookup tuple.
CACHE_ATTRIBUTE = "_fxindex_fast_lookup"

# One token per generated forward; a process-wide counter keeps ``gm.code``
# deterministic for a deterministic program while never repeating in a process.
_tokens = itertools.count(1)

# torch.fx marks the start of each node's code with this comment (removed later).
_COUNTER = re.compile(r"^# COUNTER: (\d+)\n?$")


def _format_target(base: str, target: str) -> str:
    """The expression torch.fx emits to reach ``target`` from ``base``."""
    if _torch_format_target is not None:
        return _torch_format_target(base, target)
    expression = base  # pragma: no cover - same logic as torch's
    for part in target.split("."):  # pragma: no cover
        expression = f"{expression}.{part}" if part.isidentifier() else f'getattr({expression}, "{part}")'
    return expression  # pragma: no cover


def _containers_of(targets: list[str]) -> list[str]:
    """Every module path that holds a target, the root ``""`` first, in first-seen order."""
    containers: dict[str, None] = {"": None}
    for target in targets:
        parts = target.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            containers.setdefault(".".join(parts[:depth]), None)
    return list(containers)


def _build_lookup(root: nn.Module, token: int, containers: list[str], targets: list[str]) -> tuple[Any, ...]:
    """The cache the generated code builds: the same tuple, built from Python.

    ``(token, snapshot, dicts, modules)``: ``dicts`` are the ``_modules`` dicts
    of ``containers`` (the root's first), ``snapshot`` the tuple of their
    values, ``modules`` the called modules in slot order.
    """
    dicts = tuple(root.get_submodule(container)._modules for container in containers)
    snapshot = tuple(map(tuple, map(dict.values, dicts)))
    return (token, snapshot, dicts, tuple(root.get_submodule(target) for target in targets))


class FastLookupCodeGen(CodeGen):
    """A ``torch.fx`` code generator whose ``call_module`` sites skip ``nn.Module.__getattr__``.

    It lets torch.fx generate its usual code and rewrites only the
    ``call_module`` statements, through the code generator's body-transformer
    hook, so everything else (argument handling, freeing of dead values,
    ``print_readable``'s annotations, pytree handling in the subclass) stays
    torch's. A call site torch emitted in an unexpected form is left as torch
    wrote it: slower, never wrong. See the module docstring for the design.
    """

    def _gen_python_code(self, nodes: Any, root_module: str, namespace: Any, **kwargs: Any) -> PythonCode:
        if kwargs.get("verbose"):
            # print_readable's annotated code is printed, never run: torch's own text.
            return super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        graph = getattr(nodes, "graph", None)
        owner = getattr(graph, "owning_module", None)
        node_list = list(nodes)
        # Without the module we cannot check that a target is a registered
        # child of its parent, so only rewrite graphs owned by a GraphModule.
        sites = _rewritable_sites(node_list, owner) if isinstance(owner, nn.Module) else {}
        if not sites:
            return super()._gen_python_code(nodes, root_module, namespace, **kwargs)

        token = next(_tokens)
        rewrite = _CallSiteRewriter(sites, root_module, namespace, token)

        previous = self._body_transformer
        self._body_transformer = rewrite if previous is None else (lambda body: previous(rewrite(body)))
        try:
            code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        finally:
            self._body_transformer = previous

        if rewrite.rewritten and isinstance(owner, fx.GraphModule):
            _show_plain_code(type(owner))
        if rewrite.rewritten and owner is not None:
            # Build the cache now for the module being recompiled, so the first
            # call (and torch.compile's trace) takes the fast branch. If a target
            # does not exist yet (a layer added after recompile), leave it to the
            # generated code, which raises at call time as plain fx would.
            try:
                owner.__dict__[CACHE_ATTRIBUTE] = _build_lookup(
                    owner, token, _containers_of(rewrite.targets), rewrite.targets
                )
            except AttributeError:
                owner.__dict__.pop(CACHE_ATTRIBUTE, None)
        return code


def _rewritable_sites(node_list: list[fx.Node], owner: nn.Module) -> dict[int, fx.Node]:
    """Positions of the ``call_module`` nodes whose path is registered submodules all the way.

    The cache's check watches the ``_modules`` dicts on the path to each layer,
    so every step must be a registered child. A module reachable only through
    a custom ``__getattr__`` or stored with ``object.__setattr__`` keeps torch's
    lookup. A target missing from the module is rewritten (it may be added
    after recompiling); it fails at call time either way, with an
    ``AttributeError`` as in plain fx.
    """
    sites: dict[int, fx.Node] = {}
    for position, node in enumerate(node_list):
        if node.op == "call_module" and isinstance(node.target, str) and _registered_path(owner, node.target):
            sites[position] = node
    return sites


def _registered_path(root: nn.Module, target: str) -> bool:
    module = root
    for atom in target.split("."):
        child = module._modules.get(atom)
        if child is None:
            return not hasattr(module, atom)  # missing: fine; present but unregistered: not
        module = child
    return True


class _CallSiteRewriter:
    """The body transformer that rewrites the ``call_module`` statements.

    Each distinct called module gets a local variable (``_fxindex_m``,
    ``_fxindex_m_1``...), unpacked once per call from the cached tuple, and its
    call sites call that local.

    Attributes:
        targets: the rewritten targets, in slot order (first call first).
        rewritten: how many statements were rewritten. The prologue that
            checks and unpacks the cache is added in front only when it is not
            zero.
    """

    def __init__(self, sites: dict[int, fx.Node], root_module: str, namespace: Any, token: int) -> None:
        self.sites = sites
        self.root_module = root_module
        self.namespace = namespace
        self.token = token
        self.targets: list[str] = []
        self.locals: dict[str, str] = {}  # target -> local variable name
        self.rewritten = 0

    def __call__(self, body: list[str]) -> list[str]:
        out: list[str] = []
        pending: fx.Node | None = None  # the call_module node whose statement comes next
        comment: str | None = None  # target to note at the end of the rewritten line
        for element in body:
            counter = _COUNTER.match(element)
            if counter is not None:
                pending = self.sites.get(int(counter.group(1)))
                comment = None
            elif pending is not None:
                name = repr(pending)  # the name torch gave the node in this source
                if element.startswith((f"{name} = ", f"{name} : ")):
                    element, comment = self._rewrite(element, str(pending.target))
                    pending = None
            elif comment is not None and element.endswith("\n") and (element == "\n" or element.startswith(";")):
                # The statement's line ends here (after torch frees dead values): name the layer.
                element = f"{element[:-1]}  # {comment}\n"
                comment = None
            out.append(element)
        if not self.rewritten:
            return body
        return [self._prologue(), *out]

    def _rewrite(self, statement: str, target: str) -> tuple[str, str | None]:
        call = f" = {_format_target(self.root_module, target)}("
        if call not in statement:
            return statement, None  # an unexpected form: keep torch's lookup
        if target not in self.locals:
            self.targets.append(target)
            # Names made after every node's: unique in this source.
            self.locals[target] = self.namespace.create_name("_fxindex_m", None)
        self.rewritten += 1
        return statement.replace(call, f" = {self.locals[target]}(", 1), target

    def _prologue(self) -> str:
        root, token = self.root_module, self.token
        cache = self.namespace.create_name("_fxindex_lookup", None)
        dicts = self.namespace.create_name("_fxindex_dicts", None)
        containers = _containers_of(self.targets)
        dict_items = ", ".join(
            f"{root}._modules" if path == "" else f"{root}.get_submodule({path!r})._modules" for path in containers
        )
        module_items = ", ".join(f"{root}.get_submodule({target!r})" for target in self.targets)
        snapshot = f"tuple(map(tuple, map(dict.values, {cache}[2])))"
        names = ", ".join(self.locals[target] for target in self.targets)
        return (
            # The cache is valid when it was built for this code (token), for this
            # module (its root dict is our _modules) and no container changed since.
            f"{cache} = getattr({root}, {CACHE_ATTRIBUTE!r}, None)\n"
            f"if {cache} is None or {cache}[0] != {token} or {cache}[2][0] is not {root}._modules "
            f"or {cache}[1] != {snapshot}:\n"
            f"    {dicts} = ({dict_items},)\n"
            f"    {cache} = ({token}, tuple(map(tuple, map(dict.values, {dicts}))), {dicts}, ({module_items},))\n"
            # Store it only on a module whose _modules is its own (see the module docstring).
            f"    if {root}.__dict__.get('_modules') is {dicts}[0]:\n"
            f"        {root}.{CACHE_ATTRIBUTE} = {cache}\n"
            f"{names}, = {cache}[3]\n"
        )


# --------------------------------------------------------------------------- the code people read

# The first of the lines _CallSiteRewriter._prologue writes, and how many it writes.
_PROLOGUE_FIRST = re.compile(
    rf"^(?P<indent>[ \t]*)(?P<cache>_fxindex_lookup\w*) = getattr\((?P<root>\w+), {CACHE_ATTRIBUTE!r}, None\)$",
    re.MULTILINE,
)
_PROLOGUE_LINES = 7
_MODULE_ITEM = re.compile(r"\.get_submodule\(('[^'\\]*'|\"[^\"\\]*\")\)")
# A rewritten call site: the assignment's value is a call of one of the locals.
_LOCAL_CALL = re.compile(r" = (_fxindex_m\w*)\(")


@functools.lru_cache(maxsize=64)
def plain_code(source: str) -> str:
    """The code plain torch.fx generates, given the code :class:`FastLookupCodeGen` generated for a graph.

    The fast code is torch.fx's with the lookup prologue in front and each
    rewritten call site calling a local (``_fxindex_m_3(x)``) with the target
    as a trailing comment. The prologue names the target of every local, so
    the inverse needs nothing but the text: the prologue is dropped and each
    call site gets back the expression torch.fx writes (``self.layer1.conv1(x)``).
    Any other text, torch's own code included, is returned as it is.

    Args:
        source: a generated ``forward`` (``gm._code``).

    Returns:
        The same function as torch.fx's default code generator writes it.

    Example:
        >>> import torch, fxindex
        >>> from fxindex import speed_up
        >>> gm = speed_up(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2))))
        >>> "_fxindex_m(input_1)" in gm._code and "self._fxindex" in gm._code
        True
        >>> print(plain_code(gm._code).strip())
        def forward(self, input):
            input_1 = input
            _0 = getattr(self, "0")(input_1);  input_1 = None
            return _0
    """
    first = _PROLOGUE_FIRST.search(source)
    if first is None:
        return source
    indent, cache, root = first.group("indent", "cache", "root")
    head, rest = source[: first.start()], source[first.start() :]
    lines = rest.split("\n")
    prologue = lines[:_PROLOGUE_LINES]
    if len(prologue) < _PROLOGUE_LINES:
        return source
    items, unpack = prologue[3], prologue[-1]
    names_suffix = f", = {cache}[3]"
    if not items.startswith(f"{indent}    {cache} = (") or not (
        unpack.startswith(indent) and unpack.endswith(names_suffix)
    ):
        return source  # not a prologue this version wrote: show the code that runs
    local_names = unpack[len(indent) : -len(names_suffix)].split(", ")
    # The modules tuple is the line's last parenthesised group: get_submodule calls only.
    targets = [_literal_string(item) for item in _MODULE_ITEM.findall(items)]
    if len(targets) != len(local_names) or None in targets:
        return source
    target_of = dict(zip(local_names, targets))
    body = lines[_PROLOGUE_LINES:]
    for position, line in enumerate(body):
        site = _LOCAL_CALL.search(line) if " = _fxindex_m" in line else None
        target = target_of.get(site.group(1)) if site is not None else None
        if site is None or target is None:
            continue
        comment = f"  # {target}"
        end = len(line) - len(comment) if line.endswith(comment) else len(line)
        body[position] = f"{line[: site.start()]} = {_format_target(root, target)}({line[site.end() : end]}"
    return head + "\n".join(body)


def _literal_string(text: str) -> str | None:
    """The value of a quoted module name written by ``repr`` (no escapes), or ``None``."""
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else None


def _show_plain_code(cls: type) -> None:
    """Make ``gm.code`` and ``str(gm)`` of ``cls``'s instances show torch.fx's plain code.

    ``cls`` is the class torch.fx made for one GraphModule (``recompile`` sets
    its ``forward`` the same way). The code that runs stays ``_code``.
    """
    if vars(cls).get("_fxindex_shows_plain_code"):
        return

    def code(self: fx.GraphModule) -> str:
        return plain_code(super(cls, self).code)

    code.__doc__ = (
        "The Python code torch.fx generates for this module's graph (fxindex's fast lookup runs "
        "instead: ``_code`` is the code that runs)."
    )

    def __str__(self: fx.GraphModule) -> str:
        text = super(cls, self).__str__()
        running = self.__dict__.get("_code")
        if not running:
            return text
        before, found, after = text.rpartition(running)
        return before + plain_code(running) + after if found else text

    cls.code = property(code)  # type: ignore[attr-defined]
    cls.__str__ = __str__  # type: ignore[method-assign]
    cls._fxindex_shows_plain_code = True  # type: ignore[attr-defined]


if _PyTreeCodeGen is not None:

    class FastLookupPyTreeCodeGen(FastLookupCodeGen, _PyTreeCodeGen):  # type: ignore[misc,valid-type]
        """:class:`FastLookupCodeGen` for graphs traced with pytree inputs or ``concrete_args``."""


def _fast_codegen_for(codegen: CodeGen) -> CodeGen | None:
    """The fast equivalent of ``codegen`` (its state copied), or ``None`` if unknown."""
    if isinstance(codegen, FastLookupCodeGen):
        return codegen
    if type(codegen) is CodeGen:
        fast: CodeGen = FastLookupCodeGen()
    elif _PyTreeCodeGen is not None and type(codegen) is _PyTreeCodeGen:
        fast = FastLookupPyTreeCodeGen.__new__(FastLookupPyTreeCodeGen)
    else:
        return None
    # Keep the pytree info, function name and any active body transformer.
    fast.__dict__.update(codegen.__dict__)
    return fast


def speed_up(gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``gm``'s forward call its submodules without ``nn.Module.__getattr__``.

    In place and idempotent. The outputs, ``state_dict`` keys, parameters and
    module tree are unchanged, and so is what ``gm.code``, ``print(gm)`` and
    ``gm.print_readable()`` show (torch.fx's code; ``gm._code`` is the code
    that runs); ``deepcopy``, pickling, ``.to()``, ``.half()``,
    ``train()``/``eval()``, ``torch.compile``, ``torch.export.export`` and
    further graph edits followed by ``gm.recompile()`` keep working. Nested
    GraphModules (``gm``'s submodules that are GraphModules) are sped up too.
    See the module docstring for how and why.

    Args:
        gm: the GraphModule to speed up.

    Returns:
        ``gm`` itself.

    Raises:
        TypeError: ``gm`` is not a ``torch.fx.GraphModule``.

    Example:
        >>> import torch, fxindex
        >>> from fxindex import speed_up
        >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> gm = speed_up(fxindex.trace(model))
        >>> x = torch.randn(2, 4)
        >>> torch.equal(gm(x), model(x))
        True
        >>> print(gm._code.strip().splitlines()[-2])  # the code that runs
            _0_1 = _fxindex_m_1(_0_0);  _0_0 = None  # 0.1
        >>> print(gm.code.strip().splitlines()[-2])  # the code people read: torch.fx's
            _0_1 = getattr(getattr(self, "0"), "1")(_0_0);  _0_0 = None
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"speed_up expects a torch.fx.GraphModule, got {type(gm).__name__}")
    # Children first: recompiling gm recompiles its GraphModule children anyway.
    for name, module in gm.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        fast = _fast_codegen_for(module.graph._codegen)
        if fast is None:
            where = f"submodule '{name}'" if name else "the GraphModule"
            warnings.warn(
                f"speed_up left {where} unchanged: its graph uses the code generator "
                f"{type(module.graph._codegen).__name__}, which fxindex does not know how to extend",
                stacklevel=2,
            )
            continue
        module.graph.set_codegen(fast)
    gm.recompile()
    return gm


def is_sped_up(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s graph uses :class:`FastLookupCodeGen` (so :func:`speed_up` was applied).

    Args:
        gm: a GraphModule.

    Returns:
        ``True`` when the graph's code generator is fxindex's fast one.

    Example:
        >>> import torch, fxindex
        >>> from fxindex import is_sped_up, speed_up
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> is_sped_up(gm), is_sped_up(speed_up(gm))
        (False, True)
        >>> is_sped_up(fxindex.trace(torch.nn.Linear(2, 2)))  # trace applies speed_up itself
        True
    """
    return isinstance(gm, fx.GraphModule) and isinstance(gm.graph._codegen, FastLookupCodeGen)
