"""The catalogue of solvers, without importing any of them (private).

The built-in solvers are listed by import path together with the operations they
declare, so that a message such as "solvers that can: ..." (raised by
:class:`structgrad.Solver` for a missing operation) needs no import of a solver
module and no entry-point loading.  ``tests/test_core.py`` checks that
``BUILTIN_OPERATIONS`` matches each built-in class's declared capabilities.

``registered`` holds the solvers added at run time with
:func:`structgrad.register_solver`; the registry owns it (writes it), everything else
reads it.  This module imports nothing of structgrad, so it sits below both
``solver.py`` and ``registry.py``.
"""

from __future__ import annotations

from typing import Any, Callable

_ALL = ("map", "marginals", "log_partition", "sample")

#: name -> "module:attribute" of the built-in solvers (imported on first use).
BUILTIN_SOLVERS: dict[str, str] = {
    "bernoulli": "structgrad.solvers.bernoulli:BernoulliSolver",
    "categorical": "structgrad.solvers.categorical:CategoricalSolver",
    "chain": "structgrad.solvers.chain:ChainSolver",
    "ilp": "structgrad.solvers.ilp:ILPSolver",
    "ksubset": "structgrad.solvers.ksubset:KSubsetSolver",
    "tree": "structgrad.solvers.tree:TreeSolver",
}

#: name -> the operations the built-in's class declares (its default capabilities).
BUILTIN_OPERATIONS: dict[str, tuple[str, ...]] = {
    "bernoulli": _ALL,
    "categorical": _ALL,
    "chain": _ALL,
    "ilp": ("map",),
    "ksubset": _ALL,
    "tree": _ALL,
}

#: name -> factory, for solvers registered at run time (written by the registry only).
registered: dict[str, Callable[..., Any]] = {}


def supporting(op: str) -> list[str]:
    """Names of the built-in and registered solvers that declare ``op`` (no imports)."""
    names = {n for n, ops in BUILTIN_OPERATIONS.items() if op in ops}
    for n, f in registered.items():
        caps = getattr(f, "capabilities", None)
        supports = getattr(caps, "supports", None)
        if supports is not None and supports(op):
            names.add(n)
        else:
            names.discard(n)
    return sorted(names)
