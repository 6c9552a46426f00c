"""Negative log-likelihood through the model-marginals gradient (seed 001).

For p(z; θ) ∝ exp⟨z, θ⟩ and a gold structure y,

    nll(θ, y) = −log p(y; θ) = A(θ) − ⟨y, θ⟩,
    ∂ nll / ∂θ = μ(θ) − y        (the model-marginals theorem),

so the backward pass needs only the solver's marginals, never autograd through
its recursion.  For a chain with node scores s_n and edge scores s_e this is
s_n.grad[i, c] = P(ŷ_i = c) − [y_i = c] and
s_e.grad[⟨i,j⟩, c, c'] = P(ŷ_i = c, ŷ_j = c') − [y_i = c, y_j = c'].

Reference: D. McAllester, "Exponential Softmax Backpropagation: The Model
Marginals", TTIC 31230 (2019).
"""

from __future__ import annotations

from typing import Any

import torch

from . import checks as V
from .logspace import safe_dot
from .errors import CapabilityError, DeviceError, DTypeError, ShapeError
from .registry import get_solver
from .solver import Solver

__all__ = ["nll"]


class _NLL(torch.autograd.Function):
    """forward(solver, kwargs, is_tuple, n, *theta_parts, *gold_parts) -> (*batch,)"""

    @staticmethod
    def forward(ctx, solver: Solver, kwargs: dict, is_tuple: bool, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        theta_parts, gold_parts = tensors[:n], tensors[n:]
        theta = tuple(theta_parts) if is_tuple else theta_parts[0]
        log_z, mu = solver.log_partition_and_marginals(theta, **kwargs)
        mu_parts = V.leaves(mu)
        score = torch.zeros_like(log_z)
        for g, t, m in zip(gold_parts, theta_parts, mu_parts):
            # gold (*b, *event) against theta broadcast to the marginal's shape
            score = score + safe_dot(g, t.expand_as(m), m.dim() - log_z.dim())
        out = log_z - score
        # an impossible gold (score -inf) has nll +inf, also when A = -inf
        out = torch.where(torch.isneginf(score), torch.full_like(out, float("inf")), out)
        ctx.save_for_backward(*theta_parts, *gold_parts, *mu_parts)
        ctx.n = n
        ctx.batch_ndim = log_z.dim()
        ctx.solver, ctx.kwargs, ctx.is_tuple = solver, kwargs, is_tuple
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n
        saved = ctx.saved_tensors
        theta_parts, gold_parts, mu_parts = saved[:n], saved[n : 2 * n], saved[2 * n :]
        if torch.is_grad_enabled():
            # create_graph: the gradient μ(θ) − y must itself be differentiable in θ,
            # so recompute μ with autograd (its Jacobian is Cov_p(z), the Hessian of A).
            mu_parts = V.leaves(_differentiable_marginals(ctx.solver, ctx.is_tuple, theta_parts, ctx.kwargs))
        grads_theta, grads_gold = [], []
        for i, (t, g, m) in enumerate(zip(theta_parts, gold_parts, mu_parts)):
            gshape = grad.reshape(grad.shape + (1,) * (m.dim() - ctx.batch_ndim))
            if ctx.needs_input_grad[4 + i]:
                grads_theta.append(((m - g) * gshape).sum_to_size(t.shape))
            else:
                grads_theta.append(None)
            if ctx.needs_input_grad[4 + n + i]:
                # d/dy of -<y, theta>; theta = -inf where y may not go gives +inf, as the math says
                grads_gold.append((-t.expand_as(m) * gshape).sum_to_size(g.shape))
            else:
                grads_gold.append(None)
        return (None, None, None, None, *grads_theta, *grads_gold)


def _differentiable_marginals(solver: Solver, is_tuple: bool, theta_parts: tuple, kwargs: dict) -> Any:
    """μ(θ) with autograd, for second derivatives; a named error where the solver has none."""
    if not solver.capabilities.differentiable_marginals:
        raise CapabilityError(
            f"second derivatives of nll (a backward with create_graph=True) need differentiable marginals, but "
            f"solver {solver._label()} declares capabilities.differentiable_marginals=False; its first "
            f"derivatives (marginals - gold) are exact, its second derivatives are not available"
        )
    theta = tuple(theta_parts) if is_tuple else theta_parts[0]
    mu = solver.marginals(theta, **kwargs)
    return V.rebuild(theta, (m.to(t.dtype) for m, t in zip(V.leaves(mu), theta_parts)))


def nll(theta: Any, gold: Any, solver: Any, **kwargs: Any) -> torch.Tensor:
    """Negative log-likelihood ``A(θ) − ⟨gold, θ⟩`` with backward ``(μ(θ) − gold)·grad``.

    Args:
        theta: potentials, a tensor or tuple of tensors ``(*batch, *event)`` (a leaf
            may omit the batch dims to be shared, e.g. a chain's ``(C, C)`` edge).
        gold: indicators of the gold structure, the structure and shapes the
            solver's ``marginals`` returns (``(*batch, *event)`` per leaf); bool or
            integer gold is cast to θ's dtype.  Build chain gold with
            :func:`structgrad.chain_indicators`.
        solver: a solver name, a :class:`~structgrad.Solver`, or anything
            :func:`structgrad.get_solver` accepts; it needs ``log_partition`` and
            ``marginals``.
        **kwargs: forwarded to the solver unchanged (e.g. ``lengths=``); names the
            solver does not declare in ``call_kwargs`` raise
            :class:`~structgrad.errors.UnknownArgumentError`.
    Second derivatives: a backward with ``create_graph=True`` recomputes μ(θ) with
    autograd, so Hessian-vector products are exact (Jacobian of μ = Cov_p(z)) for
    solvers with ``capabilities.differentiable_marginals``; for the others it raises
    :class:`~structgrad.errors.CapabilityError` rather than return a wrong answer.

    Returns:
        ``(*batch,)`` losses; ``+inf`` where the gold structure has score ``-inf``.

    Shapes:
        theta leaf ``(*b, *e)`` or ``(*e)``; gold leaf ``(*b, *e)``; out ``(*b,)``.

    Complexity:
        one ``log_partition_and_marginals`` call in forward; backward is elementwise.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> loss = sg.nll(theta, torch.tensor([[0.0, 0.0, 1.0]]), "categorical")
        >>> loss.sum().backward()   # theta.grad = softmax(theta) - gold
    """
    solver = get_solver(solver)
    if isinstance(theta, list):
        theta = tuple(theta)
    if isinstance(gold, list):
        gold = tuple(gold)
    theta, kwargs = solver._prepare(theta, kwargs)
    t_parts, g_parts = V.leaves(theta), V.leaves(gold)
    if isinstance(theta, tuple) != isinstance(gold, tuple) or len(t_parts) != len(g_parts):
        raise ShapeError(
            f"gold: expected the structure of theta ({len(t_parts)} tensor(s)), got "
            f"{len(g_parts)} {'tensors' if isinstance(gold, tuple) else 'tensor'}"
        )
    batch = solver.batch_shape(theta)
    cast = []
    for i, (t, g) in enumerate(zip(t_parts, g_parts)):
        nm = f"gold[{i}]" if isinstance(gold, tuple) else "gold"
        tn = f"theta[{i}]" if isinstance(theta, tuple) else "theta"
        if not isinstance(g, torch.Tensor):
            raise DTypeError(f"{nm}: expected a torch.Tensor of indicators, got {type(g).__name__}")
        if g.device != t.device:
            raise DeviceError(f"{nm} is on device {g.device} but {tn} is on {t.device}; expected the same device")
        if g.dtype != t.dtype:
            if g.dtype.is_floating_point and g.requires_grad:
                raise DTypeError(f"{nm}: dtype {g.dtype} differs from {tn}'s {t.dtype}")
            g = g.to(t.dtype)
        cast.append(g)
    # shapes: gold must have the marginals' shapes, (*batch, *event) per leaf
    nd = solver.event_ndims(theta)
    if nd is not None:
        for i, (t, g, k) in enumerate(zip(t_parts, cast, nd)):
            expected = tuple(batch) + tuple(t.shape[t.dim() - k :])
            nm = f"gold[{i}]" if isinstance(gold, tuple) else "gold"
            V.check_shape(g, expected, nm, "(the batch shape followed by the event shape of theta)")
    return _NLL.apply(solver, kwargs, isinstance(theta, tuple), len(t_parts), *t_parts, *cast)
