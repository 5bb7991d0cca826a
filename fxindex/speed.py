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
that each call site reads its module out of the ``_modules`` dict of the
module's *parent*, fetched from a tuple cached in the instance ``__dict__``::

    _fxindex_lookup = getattr(self, '_fxindex_fast_lookup', None)
    if _fxindex_lookup is None or _fxindex_lookup[0] != 7 or _fxindex_lookup[1] is not self._modules:
        _fxindex_lookup = self._fxindex_fast_lookup = (7, self._modules, self.get_submodule('layer1.0')._modules)
    layer1_0_conv1 = _fxindex_lookup[2]['conv1'](x)  # layer1.0.conv1

The design choices, and why:

* **A plain instance attribute, not a submodule or buffer**: it does not show
  up in ``state_dict``, ``named_modules``, ``parameters`` or ``.to()``; the
  state-dict keys stay those of the original model.
* **Parent ``_modules`` dicts rather than the modules themselves**: replacing a
  layer in place (``gm.add_submodule("layer1.0.conv1", new)``,
  ``setattr(parent, name, new)``, ``seq[3] = new``) writes into that very dict,
  so the swap is seen at once, even before ``recompile()``, as in plain fx.
  Replacing a *container* that holds called layers (``gm.layer1 = ...``)
  needs ``gm.recompile()`` (which rebuilds the cache), as any fx edit does.
* **A token checked on every call** (one comparison): each code generation
  gets a new token, and the cache is rebuilt by the generated code itself
  when its token differs or its root ``_modules`` dict is not this module's.
  That covers a recompile of a GraphModule that shares its graph with another
  one (``copy.copy``), a stale cache copied along with ``__dict__``
  (``DataParallel`` replicas, pickles) and caches deleted by hand. The code
  generator also builds the cache eagerly for ``graph.owning_module``, so the
  first call and ``torch.compile`` find it ready.
* **The rebuild is inline Python using only ``getattr`` and
  ``Module.get_submodule``**: ``GraphModule.__reduce__`` pickles the generated
  source plus an import block for its globals, and unpickling *re-traces* that
  source. With no fxindex global in it, a pickle loads where fxindex is not
  installed and re-traces to the same ``call_module`` nodes. The loaded module
  is a plain GraphModule (its graph gets torch's default code generator); call
  :func:`speed_up` on it again for speed.
* **Dynamo can trace it**: attribute reads, tuple/dict indexing and a constant
  comparison are all things ``torch.compile`` (``fullgraph=True`` included) and
  ``torch.export.export`` (strict or not) handle; the submodules are still
  called through ``nn.Module.__call__``, so hooks, ``module.compile()`` and
  fx re-tracing (which patches ``Module.__call__``) behave as before.

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

import itertools
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen, PythonCode

__all__ = ["speed_up", "is_sped_up", "FastLookupCodeGen"]

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


def _parent_dicts(root: nn.Module, parents: list[str]) -> tuple[dict[str, nn.Module], ...]:
    """The ``_modules`` dicts of the modules named in ``parents``, looked up in ``root``."""
    return tuple(root.get_submodule(parent)._modules for parent in parents)


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
        graph = getattr(nodes, "graph", None)
        owner = getattr(graph, "owning_module", None)
        node_list = list(nodes)
        # Without the module we cannot check that a target is a registered
        # child of its parent, so only rewrite graphs owned by a GraphModule.
        sites = _rewritable_sites(node_list, owner) if isinstance(owner, nn.Module) else {}
        if not sites:
            return super()._gen_python_code(nodes, root_module, namespace, **kwargs)

        local = namespace.create_name("_fxindex_lookup", None)
        token = next(_tokens)
        rewrite = _CallSiteRewriter(sites, root_module, local, token)

        previous = self._body_transformer
        self._body_transformer = rewrite if previous is None else (lambda body: previous(rewrite(body)))
        try:
            code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        finally:
            self._body_transformer = previous

        if rewrite.rewritten and owner is not None:
            # Build the cache now for the module being recompiled, so the first
            # call (and torch.compile's trace) takes the fast branch. If a target
            # does not exist yet (a layer added after recompile), leave it to the
            # generated code, which raises at call time as plain fx would.
            try:
                owner.__dict__[CACHE_ATTRIBUTE] = (token, *_parent_dicts(owner, rewrite.parents))
            except AttributeError:
                owner.__dict__.pop(CACHE_ATTRIBUTE, None)
        return code


def _rewritable_sites(node_list: list[fx.Node], owner: nn.Module) -> dict[int, fx.Node]:
    """Positions of the ``call_module`` nodes whose module is a registered child of its parent.

    Modules reachable only through a custom ``__getattr__`` or stored with
    ``object.__setattr__`` are not in their parent's ``_modules``: they keep
    torch's lookup. A target missing from the module is kept too (it may be
    added after recompiling); it fails at call time either way.
    """
    sites: dict[int, fx.Node] = {}
    for position, node in enumerate(node_list):
        if node.op != "call_module" or not isinstance(node.target, str):
            continue
        parent_name, _, leaf = node.target.rpartition(".")
        try:
            parent = owner.get_submodule(parent_name)
        except AttributeError:
            sites[position] = node
            continue
        if leaf in parent._modules or not hasattr(parent, leaf):
            sites[position] = node
    return sites


class _CallSiteRewriter:
    """The body transformer that rewrites the ``call_module`` statements.

    Attributes:
        parents: parent names the rewritten code uses, in slot order; ``""``
            (the root, also the cache's validity anchor) is always first.
        rewritten: how many statements were rewritten. The cache-building
            prologue is added in front only when it is not zero.
    """

    def __init__(self, sites: dict[int, fx.Node], root_module: str, local: str, token: int) -> None:
        self.sites = sites
        self.root_module = root_module
        self.local = local
        self.token = token
        self.parents: list[str] = [""]
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
                    element, comment = self._rewrite(element, pending)
                    pending = None
            elif comment is not None and element.endswith("\n") and (element == "\n" or element.startswith(";")):
                # The statement's line ends here (after torch frees dead values): name the layer.
                element = f"{element[:-1]}  # {comment}\n"
                comment = None
            out.append(element)
        if not self.rewritten:
            return body
        return [self._prologue(), *out]

    def _rewrite(self, statement: str, node: fx.Node) -> tuple[str, str | None]:
        target = str(node.target)
        call = f" = {_format_target(self.root_module, target)}("
        if call not in statement:
            return statement, None  # an unexpected form: keep torch's lookup
        parent, _, leaf = target.rpartition(".")
        if parent not in self.parents:
            self.parents.append(parent)
        slot = self.parents.index(parent) + 1  # + 1: the token is item 0
        self.rewritten += 1
        return statement.replace(call, f" = {self.local}[{slot}][{leaf!r}](", 1), target

    def _prologue(self) -> str:
        root, local = self.root_module, self.local
        items = ", ".join(
            f"{root}._modules" if parent == "" else f"{root}.get_submodule({parent!r})._modules"
            for parent in self.parents
        )
        # The write-back is skipped when ``_modules`` is not the instance's own
        # dict: torch.export's non-strict tracer calls forward on proxies that
        # share the module's __dict__ but hand out fresh ``_modules`` dicts of
        # proxies; caching those would leave tracer objects on the real module.
        return (
            f"{local} = getattr({root}, {CACHE_ATTRIBUTE!r}, None)\n"
            f"if {local} is None or {local}[0] != {self.token} or {local}[1] is not {root}._modules:\n"
            f"    {local} = ({self.token}, {items})\n"
            f"    if {root}.__dict__.get('_modules') is {local}[1]:\n"
            f"        {root}.{CACHE_ATTRIBUTE} = {local}\n"
        )


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
    module tree are unchanged; ``deepcopy``, pickling, ``.to()``, ``.half()``,
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
        >>> from fxindex.speed import speed_up
        >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> gm = speed_up(fxindex.trace(model))
        >>> x = torch.randn(2, 4)
        >>> torch.equal(gm(x), model(x))
        True
        >>> "getattr" in gm.code.split("def forward")[1].split("\\n", 2)[2]
        False
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
        >>> from fxindex.speed import is_sped_up, speed_up
        >>> gm = fxindex.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> is_sped_up(gm), is_sped_up(speed_up(gm))
        (False, True)
    """
    return isinstance(gm, fx.GraphModule) and isinstance(gm.graph._codegen, FastLookupCodeGen)
