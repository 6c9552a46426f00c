"""Log-space primitives shared by every solver and objective.

These are the categorical (softmax) family's kernels: log-sum-exp, softmax with an
optional offset, and Gumbel-max sampling.  They differ from the plain torch ops in
one way: a reduction over entries that are all ``-inf`` (no feasible outcome) gives
``-inf`` for the log-sum-exp and zeros for the softmax, and never a NaN in a value
or a gradient.

Math:
    logsumexp(x) = m + log Σ_i exp(x_i − m),  m = max_i x_i (0 if m is not finite)
    ∂ logsumexp(x) / ∂x_i = softmax(x)_i = exp(x_i − logsumexp(x))
    softmax_with_offset(x, o)_i = exp(x_i) / (exp(o) + Σ_j exp(x_j))
    Gumbel-max: argmax_i (x_i + G_i), G_i ~ Gumbel(0, 1) i.i.d., is distributed as softmax(x).

Examples:
    >>> import torch
    >>> from structgrad.logspace import logsumexp, softmax
    >>> x = torch.full((3,), float("-inf"), requires_grad=True)
    >>> logsumexp(x, -1).backward(); x.grad
    tensor([0., 0., 0.])
    >>> softmax(torch.tensor([0.0, float("-inf")]), -1)
    tensor([1., 0.])
"""

from __future__ import annotations

import math

import torch

from . import checks as V
from .checks import finite_or_zero as _finite_or_zero
from .errors import DeviceError, DomainError, ShapeError

__all__ = [
    "logsumexp",
    "logaddexp",
    "softmax",
    "log_softmax",
    "softmax_with_offset",
    "sample_gumbel",
    "gumbel_argmax",
    "multinomial_counts",
    "safe_dot",
]

_NEG_INF = V.NEG_INF


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
        m = _finite_or_zero(x.amax(dim=dim, keepdim=True))
        out = (x - m).exp_().sum(dim=dim, keepdim=True).log_().add_(m)
        res = out if keepdim else out.squeeze(dim)
        # Save the returned tensor itself: in a double backward its graph leads back to
        # x through this Function, so the second derivative keeps the −μμᵀ term.
        ctx.save_for_backward(x, res)
        ctx.dim = dim
        ctx.keepdim = keepdim
        return res

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if not ctx.keepdim:
            grad = grad.unsqueeze(ctx.dim)
            out = out.unsqueeze(ctx.dim)
        # exp(x - out) with out = -inf (all -inf) -> weight 0, never NaN.
        w = torch.exp(x - _finite_or_zero(out))
        w = torch.where(torch.isneginf(out), torch.zeros_like(w), w)
        return grad * w, None, None


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """NaN-free log Σ exp along ``dim``.

    Args:
        x: tensor of scores, may contain ``-inf``.
        dim: reduction dimension.
        keepdim: keep the reduced dimension (size 1).

    Returns:
        ``x`` reduced along ``dim``; ``-inf`` where every entry is ``-inf`` (or ``dim``
            is empty), in which case the gradient is 0 (not NaN).  Gradient:
            ``softmax(x, dim)``; its own derivative (double backward) is the covariance
            ``diag(μ) − μμᵀ``, μ = softmax(x, dim), with or without ``keepdim``.
    """
    dim = dim % x.dim() if x.dim() else 0
    if x.dim() == 0:
        return x.clone()
    if not _needs_grad(x) or x.shape[dim] == 0:
        # torch's forward is NaN-free (an empty reduction gives -inf, with an empty,
        # hence NaN-free, gradient); only its backward on all -inf rows is not
        return torch.logsumexp(x, dim, keepdim)
    return _LogSumExp.apply(x, dim, keepdim)


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NaN-free ``log(exp(a) + exp(b))`` (broadcasting like ``torch.logaddexp``)."""
    if not _needs_grad(a, b):
        return torch.logaddexp(a, b)
    a, b = torch.broadcast_tensors(a, b)
    return logsumexp(torch.stack((a, b), dim=-1), dim=-1)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x − logsumexp(x)`` along ``dim``; all ``-inf`` rows stay ``-inf`` (no NaN)."""
    lse = logsumexp(x, dim, keepdim=True)
    return x - _finite_or_zero(lse)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x − logsumexp(x))``; rows of all ``-inf`` give zeros (no NaN)."""
    if not _needs_grad(x):  # one fused pass; torch gives NaN exactly on the all -inf rows
        return torch.softmax(x, dim).nan_to_num_(nan=0.0)
    return log_softmax(x, dim).exp()


def softmax_with_offset(x: torch.Tensor, log_offset: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """Softmax with an extra, invisible outcome of log-weight ``log_offset``.

    ``w_i = exp(x_i) / (exp(log_offset) + Σ_j exp(x_j))``.  ``log_offset`` broadcasts
    against ``x`` reduced along ``dim`` (keepdim); ``-inf`` means no offset.
    Differentiable in ``x`` and ``log_offset``.
    """
    lse = logsumexp(x, dim, keepdim=True)
    if not isinstance(log_offset, torch.Tensor):
        log_offset = torch.tensor(float(log_offset), dtype=x.dtype, device=x.device)
    log_norm = logaddexp(lse, log_offset.to(x.dtype))
    w = torch.exp(x - _finite_or_zero(log_norm))
    return torch.where(torch.isneginf(log_norm), torch.zeros_like(w), w)


def sample_gumbel(
    shape: torch.Size | tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise ``−log(−log U)``, ``U ~ Uniform(0, 1)`` drawn with ``generator``."""
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp_(min=tiny, max=1.0 - torch.finfo(dtype).eps)))


def gumbel_argmax(
    logits: torch.Tensor,
    num_samples: int,
    *,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact categorical samples by the Gumbel-max trick.

    Args:
        logits: ``(*b, n)`` unnormalised log-probabilities along ``dim`` (``-inf`` allowed).
        num_samples: S.

    Returns:
        ``(S, *b)`` int64 indices distributed as ``softmax(logits, dim)``.  Rows that
            are all ``-inf`` give index ``-1`` (nothing can be drawn).
    """
    dim = dim % logits.dim()
    logits = logits.movedim(dim, -1).detach()
    if logits.shape[-1] == 0:  # no outcome at all: nothing can be drawn
        return torch.full((num_samples,) + tuple(logits.shape[:-1]), -1, dtype=torch.long, device=logits.device)
    g = sample_gumbel((num_samples,) + tuple(logits.shape), dtype=logits.dtype, device=logits.device, generator=generator)
    idx = (logits.unsqueeze(0) + g).argmax(dim=-1)
    dead = torch.isneginf(logits).all(dim=-1)
    return torch.where(dead.unsqueeze(0), torch.full_like(idx, -1), idx)


def multinomial_counts(
    logits: torch.Tensor,
    totals: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multinomial draws with a different number of trials per row.

    Row r draws ``totals[r]`` outcomes i.i.d. from ``softmax(logits[r])`` and returns
    the count of each outcome.  ``torch.distributions.Multinomial`` needs one total
    for the whole batch; here ``max(totals)`` draws are made per row and the extra
    ones masked out, so the result is exact.

    Args:
        logits: ``(*b, n)`` floating log-weights (``-inf`` allowed: an impossible
            outcome; NaN and ``+inf`` are refused).
        totals: ``(*b,)`` an integer tensor (any integer dtype) of trial counts >= 0;
            a row whose logits are all ``-inf`` (or with n = 0) can only have total 0.
        generator: a ``torch.Generator`` on logits' device.

    Returns:
        ``(*b, n)`` counts in logits' dtype, each row summing to its total.

    Raises:
        DTypeError: logits not floating, totals not an integer tensor (e.g. 2.5).
        ShapeError: totals' shape is not logits' batch shape.
        DomainError: a negative total, NaN or ``+inf`` in logits, or a positive total
            for a row with no possible outcome.
    Complexity: O(B·max(totals)) time and memory beyond the output; one host
    synchronisation (two when something is wrong, to write the message).

    Examples:
        >>> import torch
        >>> from structgrad.logspace import multinomial_counts
        >>> c = multinomial_counts(torch.zeros(2, 3), torch.tensor([4, 0]), generator=torch.Generator().manual_seed(0))
        >>> c.sum(-1)
        tensor([4., 0.])
    """
    V.check_float_tensor(logits, "logits")
    if logits.dim() == 0:
        raise ShapeError("logits: expected shape (*batch, n), got a 0-dim tensor")
    V.check_index_tensor(totals, "totals")
    V.check_shape(totals, logits.shape[:-1], "totals", "(the batch shape of logits)")
    if totals.device != logits.device:
        raise DeviceError(f"totals is on device {totals.device} but logits is on {logits.device}")
    V.check_generator(generator, logits.device)
    *batch, n = logits.shape
    flat = logits.detach().reshape(math.prod(batch), n)
    tot = totals.reshape(-1).to(torch.long)
    out = torch.zeros(flat.shape, dtype=logits.dtype, device=logits.device)
    if tot.numel() == 0:
        return out.reshape(logits.shape)
    probs = softmax(flat, -1) if n else flat.new_zeros(flat.shape)
    dead = ~(probs.sum(-1) > 0)  # all -inf (or NaN) rows
    bad = (torch.isnan(flat) | torch.isposinf(flat)).any()
    lo, m, n_bad, stuck = torch.stack((tot.min(), tot.max(), bad.long(), (dead & (tot > 0)).any().long())).tolist()
    if n_bad:
        V.check_scores(logits, "logits")
    if lo < 0:
        raise DomainError(f"totals: expected trial counts >= 0, got a minimum of {lo}")
    if stuck:
        r = int((dead & (tot > 0)).nonzero()[0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(r), tuple(batch))) if batch else ()
        raise DomainError(
            f"totals: row {where} asks for {int(tot[r])} draws but its logits are all -inf "
            f"(no possible outcome); expected total 0 there"
        )
    if m == 0:
        return out.reshape(logits.shape)
    probs = torch.where(dead.unsqueeze(-1), torch.ones_like(probs), probs)  # total 0 there: masked out below
    idx = torch.multinomial(probs, m, replacement=True, generator=generator)  # (R, m)
    keep = torch.arange(m, device=logits.device).unsqueeze(0) < tot.unsqueeze(1)
    out.scatter_add_(1, idx, keep.to(logits.dtype))
    return out.reshape(logits.shape)


def safe_dot(z: torch.Tensor, theta: torch.Tensor, ndim: int) -> torch.Tensor:
    """``Σ z·θ`` over the last ``ndim`` dims, with ``0·(−inf) = 0``.

    Entries where ``z == 0`` contribute nothing even when ``θ = −inf``; ``z ≠ 0`` on a
    ``−inf`` score gives ``−inf`` (an impossible structure).  Shapes broadcast.
    """
    zero = torch.zeros((), dtype=theta.dtype, device=theta.device)
    prod = z * torch.where(z != 0, theta, zero)  # mask θ, not the product: no 0·inf in backward
    if ndim == 0:
        return prod
    return prod.sum(dim=tuple(range(-ndim, 0)))
