"""``categorical``: one-hot z over n outcomes.

θ ``(*b, n)``; 𝒵 = {e_1, ..., e_n}; A(θ) = logsumexp θ; μ = softmax θ;
MAP = one-hot argmax (ties: lowest index); samples by Gumbel-max.
Rows of all ``-inf`` have no feasible outcome: A = -inf, and μ, MAP and samples are 0.
So has n = 0 (θ of shape ``(*b, 0)``): A = -inf (gradient: empty), and μ, MAP and
samples are empty, ``(*b, 0)`` and ``(S, *b, 0)``.  θ is one tensor: a tuple of
tensors is a ShapeError.

Examples:
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
    """One-hot of ``idx`` (``-1`` gives an all-zero row; n = 0 gives empty rows)."""
    if n == 0:
        return torch.zeros(tuple(idx.shape) + (0,), dtype=dtype, device=idx.device)
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
    num_leaves = 1

    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        if theta.shape[-1] == 0:
            return torch.zeros_like(theta.detach())
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
