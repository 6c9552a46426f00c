"""The solver registry: ``register_solver``, ``get_solver``, ``list_solvers``.

Solvers are found, in this order, among

1. solvers registered at run time with :func:`register_solver`;
2. the built-ins, by import path (the table ``BUILTIN_SOLVERS``, imported lazily);
3. third-party packages advertising the entry-point group ``structgrad.solvers``
   (``[project.entry-points."structgrad.solvers"] mysolver = "pkg.mod:MySolver"``).

A registered object is a :class:`~structgrad.solver.Solver` subclass or a factory
``(**options) -> Solver``; :func:`get_solver` calls it with the options.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any, Callable

from . import _catalog
from ._catalog import BUILTIN_SOLVERS
from .checks import check_choice
from .errors import DTypeError, DomainError, UnknownArgumentError, UnknownSolverError
from .solver import OPERATIONS, Capabilities, MapSolver, Solver

__all__ = [
    "BUILTIN_SOLVERS",
    "ENTRY_POINT_GROUP",
    "register_solver",
    "unregister_solver",
    "get_solver",
    "list_solvers",
    "solvers_supporting",
    "as_solver",
]

ENTRY_POINT_GROUP = "structgrad.solvers"

_registered = _catalog.registered


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def register_solver(name: str, factory: Callable[..., Solver] | None = None, *, overwrite: bool = False):
    """Register a solver class or factory under ``name``.

    Usable as a decorator (``@register_solver("mine")``) or a call
    (``register_solver("mine", MySolver)``).  Registering over a built-in or an
    existing name needs ``overwrite=True``.  Returns the factory unchanged.
    """
    if not isinstance(name, str) or not name:
        raise DTypeError(f"name: expected a non-empty str, got {name!r}")

    def deco(f: Callable[..., Solver]) -> Callable[..., Solver]:
        if not callable(f):
            raise DTypeError(f"factory: expected a Solver subclass or a callable returning a Solver, got {f!r}")
        if not overwrite and (name in _registered or name in BUILTIN_SOLVERS):
            raise DomainError(f"name: solver {name!r} is already registered; pass overwrite=True to replace it")
        _registered[name] = f
        return f

    return deco if factory is None else deco(factory)


def unregister_solver(name: str) -> None:
    """Remove a solver registered with :func:`register_solver` (built-ins stay)."""
    if name not in _registered:
        raise UnknownSolverError(f"name: no solver {name!r} was registered with register_solver")
    del _registered[name]


def _factory(name: str) -> Callable[..., Solver]:
    if name in _registered:
        return _registered[name]
    if name in BUILTIN_SOLVERS:
        return _load(BUILTIN_SOLVERS[name])
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    known = sorted(set(_registered) | set(BUILTIN_SOLVERS) | set(eps))
    raise UnknownSolverError(f"unknown solver {name!r}; known solvers: {', '.join(known)}")


def _accepted_options(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword options ``factory`` accepts (``None``: it takes ``**options``)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return None
    names = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
    return tuple(names)


def _construct(factory: Callable[..., Any], label: str, options: dict[str, Any]) -> Solver:
    """``factory(**options)`` with unknown options refused by name; applies ``validate``."""
    accepted = _accepted_options(factory)
    validate = True
    if "validate" in options and (accepted is None or "validate" not in accepted):
        validate = options.pop("validate")
        if not isinstance(validate, bool):
            raise DTypeError(f"validate: expected True or False, got {validate!r}")
    if accepted is not None:
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise UnknownArgumentError(
                f"solver {label} got unexpected option(s) {', '.join(map(repr, unknown))}; it accepts: "
                f"{', '.join(accepted + ('validate',))}"
            )
    inst = factory(**options)
    if not isinstance(inst, Solver):
        raise DTypeError(f"solver factory for {label} returned {type(inst).__name__}, expected a Solver")
    if not validate:
        inst.validate = False
    return inst


def get_solver(solver: str | Solver | Callable[..., Any], **options: Any) -> Solver:
    """A :class:`Solver` from a name (with options), a Solver, or a plain callable.

    Args:
        solver: a registered/built-in/entry-point name, a Solver instance (returned
            as is; no options allowed), a Solver subclass (constructed with the
            options), or a callable θ -> z (wrapped as a MAP-only
            :class:`~structgrad.solver.MapSolver`; options go to MapSolver).
        **options: constructor options of the named solver (e.g. ``k=3``), plus
            ``validate=False`` for any solver: skip the checks that synchronise with
            the device (NaN/+inf in θ, value ranges of call kwargs) in hot loops.

    Built-in solvers and their options (θ shapes and call kwargs in each class's
    docstring, e.g. ``help(structgrad.solvers.chain.ChainSolver)``):

    - ``categorical``: no options; θ ``(*b, n)``, one-hot z.
    - ``bernoulli``: no options; θ ``(*b, n)``, any binary z.
    - ``chain``: ``backend`` (``"auto"``, ``"torch"``, ``"numba"``, ``"scan"``);
      θ ``(node (*b,T,C), edge)``; call kwarg ``lengths (*b,)``.
    - ``tree``: ``graph`` (a networkx forest on 0..N−1), ``backend``;
      θ ``(node (*b,N,C), edge (*b,E,C,C) or (E,C,C))``.
    - ``ksubset``: ``k``, ``backend``, ``schedule``, ``sampler``; θ ``(*b, n)``.
    - ``ilp``: ``A``, ``b``, ``A_eq``, ``b_eq`` (real-valued), time limits, ``method``;
      θ ``(*b, n)``; MAP only.

    Raises:
        UnknownSolverError: the name is unknown (the message lists the known names).
        UnknownArgumentError: an option the solver does not accept (the message lists
            the accepted ones); a ``TypeError``.
    """
    if isinstance(solver, Solver):
        if options:
            raise DomainError(f"options: a Solver instance takes no options, got {sorted(options)}")
        return solver
    if isinstance(solver, str):
        inst = _construct(_factory(solver), repr(solver), options)
        if inst.name is None:
            inst.name = solver
        return inst
    if isinstance(solver, type) and issubclass(solver, Solver):
        return _construct(solver, solver.__name__, options)
    if callable(solver):
        return _construct(MapSolver, getattr(solver, "__name__", "custom solver"), {"fn": solver, **options})
    raise DTypeError(f"solver: expected a solver name, a Solver or a callable theta -> z, got {type(solver).__name__}")


as_solver = get_solver


def _capabilities_of(factory: Any) -> Capabilities | None:
    caps = getattr(factory, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else None


def list_solvers() -> dict[str, Capabilities | None]:
    """``{name: capabilities}`` of every known solver (registered, built-in, entry points).

    What it shows are the *class defaults*: the capabilities a solver has with its
    default options, read from the class (or the factory's ``capabilities``
    attribute; ``None`` when a factory declares none).  An instance's options can
    change them (``get_solver("ksubset", k=2, backend="numba")`` runs on the CPU only;
    an ``ilp`` with a time limit has an approximate MAP): ask the instance,
    ``solver.capabilities``.  For a solver without options the two always agree.
    """
    out: dict[str, Capabilities | None] = {}
    for name in BUILTIN_SOLVERS:
        out[name] = _capabilities_of(_load(BUILTIN_SOLVERS[name]))
    for name, ep in _entry_points().items():
        if name not in out:
            try:
                out[name] = _capabilities_of(ep.load())
            except Exception:  # a broken third-party plugin must not break the listing
                out[name] = None
    for name, f in _registered.items():
        out[name] = _capabilities_of(f)
    return dict(sorted(out.items()))


def solvers_supporting(op: str) -> list[str]:
    """Names of the known solvers that declare operation ``op``."""
    check_choice(op, OPERATIONS, "op")
    return [n for n, c in list_solvers().items() if c is not None and c.supports(op)]
