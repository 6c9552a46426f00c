"""structgrad: structured-prediction inference with pluggable solvers, and gradients
through discrete structures.

For p(z; θ) ∝ exp⟨z, θ⟩ over a discrete structured set, ∇A(θ) = μ(θ): the
gradient of the log-partition is the vector of marginals.  Solvers compute
``map``, ``marginals``, ``log_partition`` and ``sample``; estimators and objectives
turn them into gradients.  See README.md.
"""

from . import nn
from . import checks
from . import lab
from .adapters import PerInstanceSolver, per_instance_solver
from .aimle import AdaptiveLambda
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
from .estimators import blackbox, marginal_straight_through, score_function, straight_through
from .imle import imle, with_imle
from .labels import chain_indicators, chain_labels
from .nll import nll
from .noise import GumbelNoise, NormalNoise, SumOfGammaNoise
from .perturbed import perturbed_fenchel_young_loss, perturbed_optimizer
from .rbm import BernoulliRBM, ReplicatedSoftmax
from .registry import get_solver, list_solvers, register_solver, unregister_solver
from .solver import Capabilities, MapSolver, Solver

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLambda",
    "BernoulliRBM",
    "Capabilities",
    "CapabilityError",
    "DPMLoss",
    "DPMOutput",
    "DTypeError",
    "DeviceError",
    "DomainError",
    "GraphError",
    "GumbelNoise",
    "InfeasibleError",
    "MapSolver",
    "NormalNoise",
    "PerInstanceSolver",
    "ReplicatedSoftmax",
    "ShapeError",
    "Solver",
    "SolverOutputError",
    "SolverTimeoutError",
    "StructgradError",
    "SumOfGammaNoise",
    "UnknownArgumentError",
    "UnknownSolverError",
    "all_gather_with_grad",
    "blackbox",
    "checks",
    "chain_indicators",
    "chain_labels",
    "dpm_surrogate",
    "get_solver",
    "imle",
    "lab",
    "list_solvers",
    "marginal_straight_through",
    "nll",
    "nn",
    "per_instance_solver",
    "perturbed_fenchel_young_loss",
    "perturbed_optimizer",
    "register_solver",
    "score_function",
    "straight_through",
    "unregister_solver",
    "with_imle",
]
