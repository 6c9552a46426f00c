"""``categorical``: one-hot z over n outcomes.

θ ``(*b, n)``; 𝒵 = {e_1, ..., e_n}; A(θ) = logsumexp θ; μ = softmax θ;
MAP = one-hot argmax (ties: lowest index); samples by Gumbel-max.
Rows of all ``-inf`` have no feasible outcome: A = -inf, and μ, MAP and samples are 0.

Example:
    >>> import torch, structgrad as sg
    >>> s = sg.get_solver("categorical")
    >>> s.marginals(torch.zeros(2))
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from structgrad.logspace import gumbel_argmax, logsumexp, softmax
from structgrad.solver import Capabilities, Solver

__all__ = ["CategoricalSolver"]


def _one_hot(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot of ``idx`` (``-1`` gives an all-zero row)."""
    oh = F.one_hot(idx.clamp(min=0), n).to(dtype)
    return oh * (idx >= 0).unsqueeze(-1).to(dtype)


class CategoricalSolver(Solver):
    """Exact solver for the categorical (softmax) family; see the module docstring.

    Complexity O(n) per instance for every operation; batched; CPU and CUDA.
    """

    capabilities = Capabilities(
        map="exact", marginals="exact", log_partition="exact", sample="exact", differentiable_marginals=True
    )
    event_ndim = 1

    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        idx = theta.detach().argmax(dim=-1)
        dead = torch.isneginf(theta.detach()).all(dim=-1)
        idx = torch.where(dead, torch.full_like(idx, -1), idx)
        return _one_hot(idx, theta.shape[-1], theta.dtype)

    def _marginals(self, theta: torch.Tensor) -> torch.Tensor:
        return softmax(theta, dim=-1)

    def _log_partition(self, theta: torch.Tensor) -> torch.Tensor:
        return logsumexp(theta, dim=-1)

    def _sample(self, theta: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        idx = gumbel_argmax(theta, num_samples, generator=generator)
        return _one_hot(idx, theta.shape[-1], theta.dtype)
