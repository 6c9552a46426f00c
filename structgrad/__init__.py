"""structgrad: structured-prediction inference with pluggable solvers, and gradients
through discrete structures.

For p(z; θ) ∝ exp⟨z, θ⟩ over a discrete structured set, ∇A(θ) = μ(θ): the
gradient of the log-partition is the vector of marginals.  Solvers compute
``map``, ``marginals``, ``log_partition`` and ``sample``; estimators and objectives
turn them into gradients.  See README.md.
"""

from . import nn
from . import checks
from .adapters import PerInstanceSolver, per_instance_solver
from .dpm import DPMLoss, DPMOutput, all_gather_with_grad, dpm_surrogate
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
    UnknownArgumentError,
    UnknownSolverError,
)
from .labels import chain_indicators, chain_labels
from .nll import nll
from .rbm import BernoulliRBM, ReplicatedSoftmax
from .registry import get_solver, list_solvers, register_solver, unregister_solver
from .solver import Capabilities, MapSolver, Solver

__version__ = "0.1.0"

__all__ = [
    "BernoulliRBM",
    "Capabilities",
    "CapabilityError",
    "DPMLoss",
    "DPMOutput",
    "DTypeError",
    "DeviceError",
    "DomainError",
    "GraphError",
    "InfeasibleError",
    "MapSolver",
    "PerInstanceSolver",
    "ReplicatedSoftmax",
    "ShapeError",
    "Solver",
    "SolverOutputError",
    "SolverTimeoutError",
    "StructgradError",
    "UnknownArgumentError",
    "UnknownSolverError",
    "all_gather_with_grad",
    "checks",
    "chain_indicators",
    "chain_labels",
    "dpm_surrogate",
    "get_solver",
    "list_solvers",
    "nll",
    "nn",
    "per_instance_solver",
    "register_solver",
    "unregister_solver",
]
