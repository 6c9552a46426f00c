"""structgrad: structured-prediction inference with pluggable solvers, and gradients
through discrete structures.

For p(z; θ) ∝ exp⟨z, θ⟩ over a discrete structured set, ∇A(θ) = μ(θ): the
gradient of the log-partition is the vector of marginals.  Solvers compute
``map``, ``marginals``, ``log_partition`` and ``sample``; estimators and objectives
turn them into gradients.  See README.md.
"""

from .errors import (
    CapabilityError,
    DeviceError,
    DomainError,
    DTypeError,
    GraphError,
    InfeasibleError,
    ShapeError,
    SolverOutputError,
    SolverTimeoutError,
    StructgradError,
    UnknownSolverError,
)
from .labels import chain_indicators, chain_labels
from .nll import nll
from .registry import get_solver, list_solvers, register_solver, unregister_solver
from .solver import Capabilities, MapSolver, Solver

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "CapabilityError",
    "DTypeError",
    "DeviceError",
    "DomainError",
    "GraphError",
    "InfeasibleError",
    "MapSolver",
    "ShapeError",
    "Solver",
    "SolverOutputError",
    "SolverTimeoutError",
    "StructgradError",
    "UnknownSolverError",
    "chain_indicators",
    "chain_labels",
    "get_solver",
    "list_solvers",
    "nll",
    "register_solver",
    "unregister_solver",
]
