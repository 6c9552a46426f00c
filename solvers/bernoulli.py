"""``bernoulli``: z ∈ {0, 1}^n, unconstrained (independent bits).

θ ``(*b, n)``; A(θ) = Σ_i softplus(θ_i) = Σ_i log(1 + e^{θ_i}); μ = σ(θ);
MAP = [θ > 0] (ties θ = 0 go to 0); samples z_i = [U_i < σ(θ_i)].
``-inf`` forces a bit to 0 (``+inf``, which would force it to 1, is refused like
NaN by the shared score check).  n = 0 is the one empty vector: A = 0.  This is
the conditional p(h | v) of an RBM's hidden layer.

Examples:
    >>> import torch, structgrad as sg
    >>> sg.get_solver("bernoulli").log_partition(torch.zeros(3))
    tensor(2.0794)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from structgrad.solver import Capabilities, Solver


__all__ = ["BernoulliSolver"]


class BernoulliSolver(Solver):
    """Exact solver for independent Bernoulli bits; see the module docstring.  O(n)."""

    capabilities = Capabilities(
        map="exact", marginals="exact", log_partition="exact", sample="exact", differentiable_marginals=True
    )
    event_ndim = 1
    num_leaves = 1

    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        return (theta.detach() > 0).to(theta.dtype)

    def _marginals(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(theta)

    def _log_partition(self, theta: torch.Tensor) -> torch.Tensor:
        # softplus(+inf) = inf is right (z_i = 1 forced, A = +inf only if θ = +inf).
        # threshold 40 (not torch's 20): the linear branch's error e^{-θ} is then below
        # float64 rounding in value and gradient (with 20 it is ~2e-9).
        return F.softplus(theta, threshold=40.0).sum(dim=-1)

    def _sample(self, theta: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        p = torch.sigmoid(theta.detach())
        u = torch.rand((num_samples,) + tuple(theta.shape), dtype=theta.dtype, device=theta.device, generator=generator)
        return (u < p).to(theta.dtype)
