"""Autograd Functions of the ``ksubset`` solver (private).

``LogPartition``: A(θ) with backward μ(θ)·grad (μ from the prefix table by the
analytic backward pass: no autograd through the recursion); with ``create_graph``
the marginals come from ``Marginals``, so second derivatives are exact.

``Marginals``: μ(θ) with backward H·grad, H = Cov_p(z) the Hessian of A, computed
exactly in O(nk) (:func:`._ksubset_torch.hvp`); that backward is itself not
differentiable (third derivatives raise).

Both receive the solver instance, whose private helpers (``_flat``, ``_alpha``,
``_mu_from_alpha``, ``_logz_and_mu``, ``_tables``) pick the backend, the schedule
and, for very large scores, the split tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._ksubset_torch import hvp

__all__ = ["LogPartition", "Marginals"]


class LogPartition(torch.autograd.Function):
    """A(θ) with backward μ(θ)·grad; double backward through :class:`Marginals`."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, solver: Any) -> torch.Tensor:
        t, batch = solver._flat(theta)
        (alpha_m, alpha_l), logz, kind = solver._alpha(t)
        ctx.solver = solver
        ctx.kind = kind
        ctx.save_for_backward(theta, alpha_m, alpha_l)
        return logz.reshape(batch).to(theta.dtype, copy=True)  # a fresh tensor, not a view of the saved table

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        theta, alpha_m, alpha_l = ctx.saved_tensors
        solver = ctx.solver
        if not ctx.needs_input_grad[0]:
            return None, None
        if torch.is_grad_enabled():  # create_graph: the marginals must be differentiable
            mu = Marginals.apply(theta, solver)
        else:
            t, _ = solver._flat(theta)
            mu = solver._mu_from_alpha(t, (alpha_m, alpha_l), ctx.kind).to(theta.dtype).reshape(theta.shape)
        return mu * grad.unsqueeze(-1), None


class Marginals(torch.autograd.Function):
    """μ(θ) with backward H·grad (H = Cov_p(z), the Hessian of A)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, solver: Any) -> torch.Tensor:
        t, _ = solver._flat(theta)
        _, mu = solver._logz_and_mu(t)
        ctx.solver = solver
        ctx.save_for_backward(theta, mu)
        return mu.reshape(theta.shape).to(theta.dtype, copy=True)  # a fresh tensor: the saved μ stays private

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        theta, mu = ctx.saved_tensors
        solver = ctx.solver
        k = solver.k
        if k == 0 or theta.numel() == 0:
            return torch.zeros_like(theta), None
        t, _ = solver._flat(theta)
        alpha, b = solver._tables(t)  # double backward is rare: always torch tables
        v = grad.detach().reshape(t.shape).to(t.dtype)
        return hvp(t, k, alpha, b, mu, v).to(theta.dtype).reshape(theta.shape), None
