"""Torch samplers of the ``ksubset`` solver (private): conditional-Poisson rejection
and backward sequential sampling from the prefix table.  Both are exact; see
:mod:`structgrad.solvers.ksubset` for the math and for how ``sampler="auto"``
combines them.  θ comes as float64 ``t (B, n)``.
"""

from __future__ import annotations

import math

import torch

from structgrad.checks import NEG_INF

from ._ksubset_torch import Table, step_logits

__all__ = [
    "MIN_ACCEPTANCE",
    "MAX_ROUNDS",
    "ROUND_ELEMENTS",
    "shift_for_mean",
    "rejection_plan",
    "sample_rejection",
    "sample_sequential",
]

# Rejection: instances whose (estimated) acceptance probability is below this go
# straight to the sequential sampler; rounds of candidates before the sequential
# sampler draws whatever is still missing; candidate elements per round (memory cap);
# Newton steps for the shift c.
MIN_ACCEPTANCE = 1e-3
MAX_ROUNDS = 4
ROUND_ELEMENTS = 1 << 22
NEWTON_STEPS = 64


def shift_for_mean(t: torch.Tensor, k: int) -> torch.Tensor:
    """c ``(B,)`` with Σ_i σ(θ_i + c) = k (for rows with 0 < k < #possible elements).

    Safeguarded Newton: f(c) = Σ σ(θ_i + c) − k is increasing with f' = Σ σ(1 − σ);
    a Newton step that leaves the bracket [lo, hi] (initially σ(θ + lo) <= σ(−40)
    and σ(θ + hi) >= σ(40) for every possible element) is replaced by bisection.
    Stops when |f| <= 1e-6 on every row (checked every 4 steps) or after
    ``NEWTON_STEPS`` steps; c only sets the acceptance rate, never exactness.
    """
    fin = torch.isfinite(t)
    tmax = torch.where(fin, t, torch.full_like(t, NEG_INF)).amax(-1)
    tmin = torch.where(fin, t, torch.full_like(t, math.inf)).amin(-1)
    ok = torch.isfinite(tmax)
    lo = torch.where(ok, -tmax - 40.0, torch.zeros_like(tmax))
    hi = torch.where(ok, -tmin + 40.0, torch.zeros_like(tmax))
    # start where the mean score's logistic gives k among the possible elements
    npos = fin.sum(-1).to(t.dtype)
    # Σ (θ_i / npos), not (Σ θ_i) / npos: no overflow for any finite θ
    mean = (torch.where(fin, t, torch.zeros_like(t)) / npos.clamp(min=1).unsqueeze(-1)).sum(-1)
    c = (math.log(k) - torch.log((npos - k).clamp(min=0.5)) - mean).clamp(lo, hi)
    solvable = npos > k
    for step in range(NEWTON_STEPS):
        sig = torch.sigmoid(t + c.unsqueeze(-1))
        f = sig.sum(-1) - k
        if step % 4 == 3 and bool(((f.abs() <= 1e-6) | ~solvable).all()):
            break
        fp = (sig * (1 - sig)).sum(-1)
        above = f > 0
        hi = torch.where(above, c, hi)
        lo = torch.where(above, lo, c)
        newton = c - f / fp
        inside = (newton >= lo) & (newton <= hi)  # False for NaN/inf steps (fp = 0)
        c = torch.where(inside, newton, 0.5 * lo + 0.5 * hi)  # (lo + hi) / 2 could overflow
    return c


def rejection_plan(t: torch.Tensor, k: int, num_possible: torch.Tensor, eligible: torch.Tensor):
    """Bernoulli probabilities p ``(B, n)`` and estimated acceptance ``(B,)`` of conditional Poisson.

    The acceptance P(Σ z = k) at E[Σ z] = k is estimated by the local limit
    1/sqrt(2π Var + 1), Var = Σ p(1−p) (it only sizes the rounds; exactness does
    not depend on it).  Rows with k = #possible are deterministic (acceptance 1).
    """
    c = shift_for_mean(t, k)
    p = torch.sigmoid(t + c.unsqueeze(-1))
    full = num_possible == k
    p = torch.where(full.unsqueeze(-1), torch.isfinite(t).to(t.dtype), p)
    var = (p * (1 - p)).sum(-1)
    acc = torch.rsqrt(2 * math.pi * var + 1.0)
    acc = torch.where(full, torch.ones_like(acc), acc)
    return p, torch.where(eligible, acc, torch.zeros_like(acc))


def sample_rejection(
    t: torch.Tensor, k: int, p: torch.Tensor, acc: torch.Tensor, active: torch.Tensor, num_samples: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional-Poisson rejection for the ``active`` rows.

    Returns ``out`` ``(B, S, n)`` bool and ``filled`` ``(B,)``: slots ``[0, filled)``
    of each row hold accepted candidates (in the order drawn); the rest are left
    for the sequential sampler.  At most ``MAX_ROUNDS`` rounds of at most
    ``ROUND_ELEMENTS`` candidate elements each.
    """
    B, n = t.shape
    S = num_samples
    dev = t.device
    out = torch.zeros((B, S, n), dtype=torch.bool, device=dev)
    filled = torch.zeros(B, dtype=torch.long, device=dev)
    rows = active.nonzero().flatten()
    if rows.numel() == 0:
        return out, filled
    need = torch.full((rows.numel(),), S, dtype=torch.long, device=dev)
    acc_r = acc[rows].clamp(min=MIN_ACCEPTANCE)
    p_r = p[rows]
    for _ in range(MAX_ROUNDS):
        if rows.numel() == 0:
            break
        want = int(torch.ceil((need.to(acc_r.dtype) / acc_r) * 1.25).max()) + 4
        per = max(1, ROUND_ELEMENTS // max(1, rows.numel() * n))
        m = min(want, per)
        u = torch.rand((m, rows.numel(), n), dtype=t.dtype, device=dev, generator=generator)
        z = u < p_r  # (m, R, n)
        ok = z.sum(-1) == k  # (m, R)
        rank = ok.cumsum(0)
        take = ok & (rank <= need)
        mi, ri = take.nonzero(as_tuple=True)
        slot = filled[rows[ri]] + rank[mi, ri] - 1
        out[rows[ri], slot] = z[mi, ri]
        got = take.sum(0)
        filled[rows] += got
        need = need - got
        keep = need > 0
        rows, need, acc_r, p_r = rows[keep], need[keep], acc_r[keep], p_r[keep]
    return out, filled


def sample_sequential(t: torch.Tensor, k: int, alpha: Table, log_u: torch.Tensor) -> torch.Tensor:
    """Backward sequential sampling from the prefix table ``alpha`` (plain or split, see
    :mod:`._ksubset_torch`); ``log_u`` ``(n, B, S)``; returns ``(n, B, S)`` bool.

    Going i = n..1 with r ones still to place, z_i = 1 with probability
    exp(:func:`~._ksubset_torch.step_logits`), i.e. when log u is below it.
    """
    n, B, S = log_u.shape
    d = step_logits(t, k, alpha)
    r = torch.full((B, S), k, dtype=torch.long, device=t.device)
    z = torch.empty((n, B, S), dtype=torch.bool, device=t.device)
    for i in range(n - 1, -1, -1):
        torch.lt(log_u[i], torch.gather(d[i], 1, r), out=z[i])
        r -= z[i].long()
    return z
