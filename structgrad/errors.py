"""Exceptions raised by structgrad.

Every error subclasses a builtin (``ValueError``, ``TypeError`` or
``NotImplementedError``) as well as :class:`StructgradError`, so callers can catch
either.  Messages name the argument, what was expected and what came.
"""

from __future__ import annotations

__all__ = [
    "StructgradError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "DomainError",
    "CapabilityError",
    "UnknownSolverError",
    "SolverOutputError",
    "InfeasibleError",
    "SolverTimeoutError",
    "GraphError",
    "UnknownArgumentError",
]


class StructgradError(Exception):
    """Base class of every structgrad error."""


class ShapeError(StructgradError, ValueError):
    """An argument has the wrong shape, or two arguments' shapes disagree."""


class DTypeError(StructgradError, TypeError):
    """An argument has the wrong dtype (e.g. integer scores)."""


class DeviceError(StructgradError, ValueError):
    """Arguments live on different devices, or on a device the solver cannot use."""


class DomainError(StructgradError, ValueError):
    """A value is outside its allowed range (lengths, k, counts, options...)."""


class CapabilityError(StructgradError, NotImplementedError):
    """A solver was asked for an operation it does not declare."""


class UnknownSolverError(StructgradError, ValueError):
    """A solver name is not registered, built in, or advertised by an entry point."""


class SolverOutputError(StructgradError, ValueError):
    """A (custom) solver returned something of the wrong shape or with non-binary values."""


class InfeasibleError(StructgradError, ValueError):
    """A constrained problem has no feasible solution."""


class SolverTimeoutError(StructgradError, RuntimeError):
    """A solver hit its time limit without finding a feasible solution."""


class GraphError(StructgradError, ValueError):
    """A graph argument is not of the required kind (e.g. not a forest)."""


class UnknownArgumentError(StructgradError, TypeError):
    """A keyword argument (a solver option or a per-call argument) that the solver does not accept."""
