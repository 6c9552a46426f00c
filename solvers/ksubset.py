"""``ksubset``: binary z ∈ {0, 1}^n with exactly k ones.

θ ``(*b, n)``; 𝒵 = {z ∈ {0, 1}^n : Σ_i z_i = k}; p(z; θ) ∝ exp⟨z, θ⟩.

Math:
    With x_i = exp θ_i, the partition function is the elementary symmetric
    polynomial of degree k,

        Z(θ) = Σ_{|S| = k} Π_{i∈S} x_i = e_k(x_1, ..., x_n),   A(θ) = log e_k(x).

    It is computed in log-space by the prefix recursion (a dynamic programme over
    the elements i and the subset size j)

        α[i, j] = log e_j(x_1..x_i) = logaddexp(α[i−1, j], α[i−1, j−1] + θ_i),
        α[0, 0] = 0,  α[0, j>0] = −inf,   A(θ) = α[n, k],

    and the suffix recursion β[i, j] = log e_j(x_{i+1}..x_n) alike.  The marginals
    are, with no autograd through the tables (an analytic forward-backward),

        μ_i = ∂A/∂θ_i = P(z_i = 1) = Σ_{j=0}^{k−1} exp(α[i−1, j] + θ_i + β[i, k−1−j] − A).

    (The numba backend gets the same μ from the prefix table alone, by running the
    recursion's backward pass in probability space: w[i, j] = P(j of the first i
    chosen) with w[n, k] = 1, w[i−1, j] = w[i, j] p[i, j] + w[i, j+1] q[i, j+1] and
    μ_i = Σ_j w[i, j] q[i, j], p and q the shares of the two logaddexp terms.)

    MAP = top-k (ties: lowest index first).  Sampling is exact, by either
      * conditional-Poisson rejection: independent bits z_i ~ Bernoulli(σ(θ_i + c))
        conditioned on Σ z_i = k have exactly the law p(z; θ) for any shift c; c is
        chosen so that E[Σ z_i] = k (which maximises the acceptance probability,
        about 1/sqrt(2π Σ p_i(1−p_i))), and candidates are redrawn until they have
        exactly k ones; or
      * backward sequential sampling from the prefix table: for i = n..1 with r
        ones still to place, z_i = 1 with probability exp(θ_i + α[i−1, r−1] − α[i, r]).
    ``sampler="auto"`` uses rejection where it is cheap and the sequential sampler
    elsewhere; rejection gives up after a few rounds and the sequential sampler
    draws the samples still missing, so a call is exact and bounded in time.

    ``log_partition`` is differentiable with gradient ``marginals``, and
    ``marginals`` is differentiable too: its backward is the Hessian-vector
    product H v = Cov_p(z) v, computed exactly in O(nk) by the same two
    recursions carrying the running mean of ⟨z, v⟩ (an expectation semiring), so
    double backward through ``log_partition`` works (third derivatives do not).

Conventions:
    * ``-inf`` in θ marks an element that cannot be chosen.  If fewer than k
      elements can be chosen the instance is infeasible: A = −inf, and μ, the MAP
      and the samples are all zeros (as for every structgrad solver).  Its
      gradient is 0, never NaN.
    * k = 0 gives A = 0 (the empty set) and zeros; k = n gives A = Σ θ and ones.
    * θ may not contain NaN or +inf (DomainError); k < 0 or k > n is a DomainError.
    * Tables are float64 whatever θ's dtype (float32 loses accuracy: A is a sum of
      up to k scores), and results are cast back to θ's dtype and device.

Schedules (``schedule=``), both exact:
    ``"rows"`` loops over the n elements (n steps of ``(B, k)`` tensor ops);
    ``"columns"`` loops over the k sizes, each a ``logcumsumexp`` over the n
    elements (k steps of ``(B, n)`` scans: far fewer kernel launches, the choice
    on CUDA).  ``"auto"`` picks by a cost model of the device.

Complexity:
    O(n k) time per instance and O(B n k) memory (float64 tables; ``log_partition``
    keeps its prefix table for the backward pass) for ``log_partition`` and
    ``marginals``; O(n log n) for ``map``; O(n k + S n) time and O(B S n) memory for
    the sequential sampler; O(S n / acceptance) expected time for rejection (no
    table at all; acceptance ≈ 1/sqrt(2π Σ p_i(1−p_i)) >= about 1/sqrt(2π k)).

References:
    K. Ahmed, Z. Zeng, M. Niepert, G. Van den Broeck, "SIMPLE: A Gradient
    Estimator for k-Subset Sampling", ICLR 2023 (exact k-subset marginals and
    sampling through this recursion).
    S. X. Chen, A. P. Dempster, J. S. Liu, "Weighted finite population sampling to
    maximize entropy", Biometrika 81 (1994) (conditional Poisson sampling).
    M. Niepert, P. Minervini, L. Franceschi, "Implicit MLE", NeurIPS 2021 (k-subset
    MAP as a solver for perturb-and-MAP).

Example:
    >>> import torch, structgrad as sg
    >>> s = sg.get_solver("ksubset", k=2)
    >>> theta = torch.tensor([1.0, 0.0, 2.0, -float("inf")])
    >>> s.map(theta)
    tensor([1., 0., 1., 0.])
    >>> s.marginals(theta).sum()   # exactly k in expectation
    tensor(2.)
    >>> s.log_partition(torch.zeros(5))   # log C(5, 2)
    tensor(2.3026)
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch
from torch.autograd.function import once_differentiable

from structgrad.errors import DomainError, DTypeError
from structgrad.solver import Capabilities, Solver

__all__ = ["KSubsetSolver"]

_NEG_INF = float("-inf")
_BACKENDS = ("torch", "numba")
_SCHEDULES = ("auto", "rows", "columns")
_SAMPLERS = ("auto", "rejection", "sequential")

# Rejection: instances whose (estimated) acceptance probability is below this go
# straight to the sequential sampler; rounds of candidates before the sequential
# sampler draws whatever is still missing; candidate elements per round (memory cap).
_MIN_ACCEPTANCE = 1e-3
_MAX_ROUNDS = 4
_ROUND_ELEMENTS = 1 << 22
_NEWTON_STEPS = 64

# Cost model of the CPU (seconds; measured on a 2-core AMD EPYC, torch 2.13, 1 thread):
# one kernel launch, one logaddexp cell of a (B, k) row step, one element of a
# logcumsumexp scan, one candidate element of the rejection sampler, one
# (sample, element) step of the sequential sampler.  Only the choice of schedule
# and sampler depends on them, never a result.
_CPU_LAUNCH = 4e-6
_CPU_ROW_CELL = 7e-9
_CPU_SCAN_CELL = 3e-8
_CPU_REJECT_CELL = 8e-9
_CPU_SEQ_CELL = 8e-9
_NUMBA_CELL = 9e-9  # one cell of the numba prefix table
_NUMBA_SEQ_CELL = 3e-9  # one (sample, element) step of the numba sequential sampler
_PLAN_LAUNCHES = 150  # the Newton solve for the shift c and the bookkeeping of rejection
# CUDA: launches dominate; a cell costs next to nothing.
_CUDA_LAUNCH = 1e-5
_CUDA_CELL = 1e-11


# =============================================================================== tables (torch)
def _alpha_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """Prefix table α ``(n+1, B, k+1)`` of ``t`` ``(B, n)`` by a loop over the n elements."""
    B, n = t.shape
    a = torch.empty((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    a[0] = _NEG_INF
    a[:, :, 0] = 0.0
    if k == 0:
        return a
    tt = t.t().unsqueeze(-1).contiguous()  # (n, B, 1)
    buf = torch.empty((B, k), dtype=t.dtype, device=t.device)
    for i in range(n):
        torch.add(a[i, :, :-1], tt[i], out=buf)
        torch.logaddexp(a[i, :, 1:], buf, out=a[i + 1, :, 1:])
    return a


def _beta_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """Suffix table, sizes reversed: ``b[i, :, k − j] = β[i, j] = log e_j(x_{i+1}..x_n)``, ``(n+1, B, k+1)``.

    Reversing the size axis lets the marginals pair α[i−1, j] with β[i, k−1−j] as
    ``α[i−1, :, j] + b[i, :, j+1]`` without a flipped copy.
    """
    B, n = t.shape
    b = torch.empty((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    b[n] = _NEG_INF
    b[:, :, k] = 0.0
    if k == 0:
        return b
    tt = t.t().unsqueeze(-1).contiguous()
    buf = torch.empty((B, k), dtype=t.dtype, device=t.device)
    for i in range(n, 0, -1):
        torch.add(b[i, :, 1:], tt[i - 1], out=buf)
        torch.logaddexp(b[i, :, :-1], buf, out=b[i - 1, :, :-1])
    return b


def _alpha_columns(t: torch.Tensor, k: int) -> torch.Tensor:
    """α by a loop over the sizes: α[i, j] = log Σ_{l<=i} exp(θ_l + α[l−1, j−1]) (a logcumsumexp).

    Returns ``(n+1, B, k+1)`` like :func:`_alpha_rows` (a contiguous copy).
    """
    B, n = t.shape
    a = torch.empty((k + 1, B, n + 1), dtype=t.dtype, device=t.device)
    a[0] = 0.0
    a[1:, :, 0] = _NEG_INF
    for j in range(1, k + 1):
        a[j, :, 1:] = torch.logcumsumexp(a[j - 1, :, :-1] + t, dim=-1)
    return a.permute(2, 1, 0).contiguous()


def _beta_columns(t: torch.Tensor, k: int) -> torch.Tensor:
    """The suffix table of :func:`_beta_rows` (sizes reversed) by a loop over the sizes:
    β[i, j] = log Σ_{l>i} exp(θ_l + β[l, j−1]) (a reversed logcumsumexp)."""
    B, n = t.shape
    b = torch.empty((k + 1, B, n + 1), dtype=t.dtype, device=t.device)  # b[k − j] = β[:, j]
    b[k] = 0.0
    b[:k, :, n] = _NEG_INF
    for j in range(1, k + 1):
        v = (b[k - j + 1, :, 1:] + t).flip(-1)
        b[k - j, :, :-1] = torch.logcumsumexp(v, dim=-1).flip(-1)
    return b.permute(2, 1, 0).contiguous()


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _marginals_from_tables(t: torch.Tensor, k: int, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """μ ``(B, n)`` from α and the size-reversed β (k >= 1); zeros for infeasible instances.

    Each term exp(α[i−1, j] + θ_i + β[i, k−1−j] − A) is the probability that i is
    chosen with j elements before it, so it is <= 1: a plain exp-and-sum cannot
    overflow and needs no max-shift.
    """
    logz = _finite_or_zero(alpha[-1, :, k])  # A = -inf: every term is -inf as well, and exp gives 0
    # pair α[i−1, j] with β[i, k−1−j] = beta[i, :, j+1], j = 0..k−1: (n, B, k)
    s = alpha[:-1, :, :k] + beta[1:, :, 1:]
    s += (t.t() - logz).unsqueeze(-1)
    return s.exp_().sum(-1).t()


def _hvp(t: torch.Tensor, k: int, alpha: torch.Tensor, beta: torch.Tensor, mu: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v = Cov_p(z) v ``(B, n)``: the derivative of the marginals in direction ``v`` (k >= 1).

    Since Σ_i z_i = k is constant, Cov(z) 1 = 0 and v may be centred to
    v' = v − ⟨μ, v⟩/k, after which (H v)_i = E[z_i ⟨z, v'⟩].  Splitting a subset
    containing i into its part before i (size j) and after i (size k−1−j),

        E[z_i ⟨z, v'⟩] = Σ_j P_ij (v'_i + γ[i−1, j] + δ[i, k−1−j]),
        P_ij = exp(α[i−1, j] + θ_i + β[i, k−1−j] − A),

    where γ[i, j] is the mean of Σ_{l∈S} v'_l over subsets S ⊆ {1..i} of size j
    weighted by Π_{l∈S} x_l, and δ the same over suffixes.  They follow the table
    recursions as convex combinations (stable):
        γ[i, j] = p γ[i−1, j] + q (γ[i−1, j−1] + v'_i),
        p = exp(α[i−1, j] − α[i, j]),  q = exp(α[i−1, j−1] + θ_i − α[i, j]),  p + q = 1.
    """
    B, n = t.shape
    beta = beta.flip(-1)  # sizes in natural order: beta[i, :, j] = β[i, j]
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    one = torch.ones((), dtype=t.dtype, device=t.device)
    vp = v - (mu * v).sum(-1, keepdim=True) / k
    vp = torch.where(torch.isneginf(t), zero, vp)  # impossible elements carry no weight
    tt = t.t().unsqueeze(-1)  # (n, B, 1)
    vt = vp.t().unsqueeze(-1).contiguous()  # (n, B, 1)

    def weights(prev: torch.Tensor, cur: torch.Tensor, th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # prev, cur: (n, B, k+1) tables one step apart; returns p, q (n, B, k) for j = 1..k
        fin = torch.isfinite(cur[:, :, 1:])
        den = torch.where(fin, cur[:, :, 1:], zero)
        p = torch.where(fin, torch.exp(prev[:, :, 1:] - den), one)
        q = torch.where(fin, torch.exp(prev[:, :, :-1] + th - den), zero)
        return p.contiguous(), q.contiguous()

    pf, qf = weights(alpha[:-1], alpha[1:], tt)
    gam = torch.zeros((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    tmp = torch.empty((B, k), dtype=t.dtype, device=t.device)
    for i in range(1, n + 1):
        torch.add(gam[i - 1, :, :-1], vt[i - 1], out=tmp)
        torch.mul(pf[i - 1], gam[i - 1, :, 1:], out=gam[i, :, 1:])
        gam[i, :, 1:].addcmul_(qf[i - 1], tmp)
    pb, qb = weights(beta[1:], beta[:-1], tt)
    dlt = torch.zeros((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    for i in range(n, 0, -1):
        torch.add(dlt[i, :, :-1], vt[i - 1], out=tmp)
        torch.mul(pb[i - 1], dlt[i, :, 1:], out=dlt[i - 1, :, 1:])
        dlt[i - 1, :, 1:].addcmul_(qb[i - 1], tmp)
    logz = _finite_or_zero(alpha[-1, :, k])
    w = torch.exp(alpha[:-1, :, :k] + beta[1:, :, :k].flip(-1) + tt - logz.unsqueeze(-1))  # P_ij (n, B, k)
    g = gam[:-1, :, :k] + dlt[1:, :, :k].flip(-1) + vt
    return (w * g).sum(-1).t()


# =============================================================================== samplers (torch)
def _shift_for_mean(t: torch.Tensor, k: int) -> torch.Tensor:
    """c ``(B,)`` with Σ_i σ(θ_i + c) = k (for rows with 0 < k < #possible elements).

    Safeguarded Newton: f(c) = Σ σ(θ_i + c) − k is increasing with f' = Σ σ(1 − σ);
    a Newton step that leaves the bracket [lo, hi] (initially σ(θ + lo) <= σ(−40)
    and σ(θ + hi) >= σ(40) for every possible element) is replaced by bisection.
    Stops when |f| <= 1e-6 on every row (checked every 4 steps) or after
    ``_NEWTON_STEPS`` steps; c only sets the acceptance rate, never exactness.
    """
    fin = torch.isfinite(t)
    tmax = torch.where(fin, t, torch.full_like(t, _NEG_INF)).amax(-1)
    tmin = torch.where(fin, t, torch.full_like(t, math.inf)).amin(-1)
    ok = torch.isfinite(tmax)
    lo = torch.where(ok, -tmax - 40.0, torch.zeros_like(tmax))
    hi = torch.where(ok, -tmin + 40.0, torch.zeros_like(tmax))
    # start where the mean score's logistic gives k among the possible elements
    npos = fin.sum(-1).to(t.dtype)
    mean = torch.where(fin, t, torch.zeros_like(t)).sum(-1) / npos.clamp(min=1)
    c = (math.log(k) - torch.log((npos - k).clamp(min=0.5)) - mean).clamp(lo, hi)
    solvable = npos > k
    for step in range(_NEWTON_STEPS):
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
        c = torch.where(inside, newton, 0.5 * (lo + hi))
    return c


def _rejection_plan(t: torch.Tensor, k: int, num_possible: torch.Tensor, eligible: torch.Tensor):
    """Bernoulli probabilities p ``(B, n)`` and estimated acceptance ``(B,)`` of conditional Poisson.

    The acceptance P(Σ z = k) at E[Σ z] = k is estimated by the local limit
    1/sqrt(2π Var + 1), Var = Σ p(1−p) (it only sizes the rounds; exactness does
    not depend on it).  Rows with k = #possible are deterministic (acceptance 1).
    """
    c = _shift_for_mean(t, k)
    p = torch.sigmoid(t + c.unsqueeze(-1))
    full = num_possible == k
    p = torch.where(full.unsqueeze(-1), torch.isfinite(t).to(t.dtype), p)
    var = (p * (1 - p)).sum(-1)
    acc = torch.rsqrt(2 * math.pi * var + 1.0)
    acc = torch.where(full, torch.ones_like(acc), acc)
    return p, torch.where(eligible, acc, torch.zeros_like(acc))


def _sample_rejection(
    t: torch.Tensor, k: int, p: torch.Tensor, acc: torch.Tensor, active: torch.Tensor, num_samples: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional-Poisson rejection for the ``active`` rows.

    Returns ``out`` ``(B, S, n)`` bool and ``filled`` ``(B,)``: slots ``[0, filled)``
    of each row hold accepted candidates (in the order drawn); the rest are left
    for the sequential sampler.  At most ``_MAX_ROUNDS`` rounds of at most
    ``_ROUND_ELEMENTS`` candidate elements each.
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
    acc_r = acc[rows].clamp(min=_MIN_ACCEPTANCE)
    p_r = p[rows]
    for _ in range(_MAX_ROUNDS):
        if rows.numel() == 0:
            break
        want = int(torch.ceil((need.to(acc_r.dtype) / acc_r) * 1.25).max()) + 4
        per = max(1, _ROUND_ELEMENTS // max(1, rows.numel() * n))
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


def _step_logits(t: torch.Tensor, k: int, alpha: torch.Tensor) -> torch.Tensor:
    """D ``(n, B, k+1)``: D[i−1, b, r] = log P(z_i = 1 | r ones left among 1..i) for the backward sampler.

    r = 0 gives −inf (nothing left to choose), r >= i gives +inf (all remaining
    elements are forced), unreachable states (α[i, r] = −inf) give −inf.
    """
    n = t.shape[1]
    tt = t.t().unsqueeze(-1)
    num = alpha[:-1, :, :-1] + tt  # θ_i + α[i−1, r−1], r = 1..k
    den = alpha[1:, :, 1:]  # α[i, r]
    d = torch.where(torch.isfinite(den), num - _finite_or_zero(den), torch.full_like(num, _NEG_INF))
    r = torch.arange(1, k + 1, device=t.device)
    i = torch.arange(1, n + 1, device=t.device)
    forced = (r.unsqueeze(0) >= i.unsqueeze(1)).unsqueeze(1)  # (n, 1, k)
    d = torch.where(forced, torch.full_like(d, math.inf), d)
    return torch.cat([torch.full_like(d[:, :, :1], _NEG_INF), d], dim=-1)


def _sample_sequential_torch(
    t: torch.Tensor, k: int, alpha: torch.Tensor, log_u: torch.Tensor
) -> torch.Tensor:
    """Backward sequential sampling; ``log_u`` ``(n, B, S)``; returns ``(n, B, S)`` bool."""
    n, B, S = log_u.shape
    d = _step_logits(t, k, alpha)
    r = torch.full((B, S), k, dtype=torch.long, device=t.device)
    z = torch.empty((n, B, S), dtype=torch.bool, device=t.device)
    for i in range(n - 1, -1, -1):
        torch.lt(log_u[i], torch.gather(d[i], 1, r), out=z[i])
        r -= z[i].long()
    return z


# =============================================================================== autograd
class _LogPartition(torch.autograd.Function):
    """A(θ) with backward μ(θ)·grad; double backward through :class:`_Marginals`."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, solver: "KSubsetSolver") -> torch.Tensor:
        t, batch = solver._flat(theta)
        alpha, logz, numba_layout = solver._alpha(t)
        ctx.solver = solver
        ctx.numba_layout = numba_layout
        ctx.save_for_backward(theta, alpha)
        return logz.reshape(batch).to(theta.dtype, copy=True)  # a fresh tensor, not a view of the saved table

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        theta, alpha = ctx.saved_tensors
        solver: KSubsetSolver = ctx.solver
        if not ctx.needs_input_grad[0]:
            return None, None
        if torch.is_grad_enabled():  # create_graph: the marginals must be differentiable
            mu = _Marginals.apply(theta, solver)
        else:
            t, _ = solver._flat(theta, check=False)
            mu = solver._mu_from_alpha(t, alpha, ctx.numba_layout).to(theta.dtype).reshape(theta.shape)
        return mu * grad.unsqueeze(-1), None


class _Marginals(torch.autograd.Function):
    """μ(θ) with backward H·grad (H = Cov_p(z), the Hessian of A)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, solver: "KSubsetSolver") -> torch.Tensor:
        t, _ = solver._flat(theta)
        _, mu = solver._logz_and_mu(t)
        ctx.solver = solver
        ctx.save_for_backward(theta, mu)
        return mu.reshape(theta.shape).to(theta.dtype, copy=True)  # a fresh tensor: the saved μ stays private

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        theta, mu = ctx.saved_tensors
        solver: KSubsetSolver = ctx.solver
        k = solver.k
        if k == 0 or theta.numel() == 0:
            return torch.zeros_like(theta), None
        t, _ = solver._flat(theta, check=False)
        # double backward is rare: always use the torch tables here
        alpha = _alpha_columns(t, k) if solver._use_columns(t) else _alpha_rows(t, k)
        beta = _beta_columns(t, k) if solver._use_columns(t) else _beta_rows(t, k)
        v = grad.detach().reshape(t.shape).to(t.dtype)
        hv = _hvp(t, k, alpha, beta, mu, v)
        return hv.to(theta.dtype).reshape(theta.shape), None


# =============================================================================== the solver
class KSubsetSolver(Solver):
    """Exact solver for the k-subset family; see the module docstring for the math.

    Args:
        k: the subset size, an integer >= 0 (checked against n = ``theta.shape[-1]``
            at each call: k > n is a DomainError).
        backend: ``"torch"`` (CPU and CUDA) or ``"numba"`` (CPU only; compiled
            loops for the prefix table, the marginals and the sequential sampler;
            the rejection sampler and double backward use torch code; needs the
            ``numba`` package, imported on first use).
        schedule: ``"auto"``, ``"rows"`` or ``"columns"``: how the torch backend
            runs the table recursions (see the module docstring).
        sampler: ``"auto"``, ``"rejection"`` or ``"sequential"`` (all exact).
    Shapes:
        theta ``(*b, n)``; map/marginals ``(*b, n)``; log_partition ``(*b,)``;
        sample ``(S, *b, n)``.
    Example:
        >>> import torch, structgrad as sg
        >>> s = sg.get_solver("ksubset", k=3)
        >>> theta = torch.randn(4, 10, requires_grad=True)
        >>> s.log_partition(theta).sum().backward()   # theta.grad == s.marginals(theta)
        >>> s.sample(theta, 5, generator=torch.Generator().manual_seed(0)).sum(-1)
        tensor([[3., 3., 3., 3.],
                [3., 3., 3., 3.],
                [3., 3., 3., 3.],
                [3., 3., 3., 3.],
                [3., 3., 3., 3.]])
    """

    capabilities = Capabilities(
        map="exact", marginals="exact", log_partition="exact", sample="exact", differentiable_marginals=True
    )
    event_ndim = 1

    def __init__(self, k: int | None = None, *, backend: str = "torch", schedule: str = "auto", sampler: str = "auto"):
        if k is None:
            raise DTypeError("k: expected the subset size, an integer >= 0 (get_solver('ksubset', k=3)), got None")
        if isinstance(k, bool) or not hasattr(k, "__index__"):
            raise DTypeError(f"k: expected an integer subset size >= 0, got {type(k).__name__} {k!r}")
        k = int(k)
        if k < 0:
            raise DomainError(f"k: expected an integer subset size >= 0, got k = {k}")
        if backend not in _BACKENDS:
            raise DomainError(f"backend: expected one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
        if schedule not in _SCHEDULES:
            raise DomainError(f"schedule: expected one of {', '.join(map(repr, _SCHEDULES))}, got {schedule!r}")
        if sampler not in _SAMPLERS:
            raise DomainError(f"sampler: expected one of {', '.join(map(repr, _SAMPLERS))}, got {sampler!r}")
        if backend == "numba":
            if importlib.util.find_spec("numba") is None:
                raise DomainError("backend: 'numba' needs the numba package, which is not installed; use backend='torch'")
            self.capabilities = type(self).capabilities.replace(devices=("cpu",))
        self.k = k
        self.backend = backend
        self.schedule = schedule
        self.sampler = sampler

    def __repr__(self) -> str:
        return (
            f"KSubsetSolver(k={self.k}, backend={self.backend!r}, schedule={self.schedule!r}, "
            f"sampler={self.sampler!r})"
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _numba():
        """The numba kernels (imported on first use; numba is never imported by ``import structgrad``)."""
        return importlib.import_module(f"{__package__}._numba_ksubset")

    def _flat(self, theta: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Size]:
        """Check k against n and the score values; θ as float64 ``(B, n)`` (never mutated).

        ``check=False`` skips the value check (a device sync) for θ already checked.
        """
        n = theta.shape[-1]
        if self.k > n:
            raise DomainError(
                f"k: expected 0 <= k <= n, where n = {n} is the last dimension of theta "
                f"{tuple(theta.shape)}; got k = {self.k}"
            )
        batch = theta.shape[:-1]
        t = theta.detach().to(torch.float64).reshape(math.prod(batch), n)
        if check and bool((torch.isnan(t) | torch.isposinf(t)).any()):
            nan, pinf = int(torch.isnan(t).sum()), int(torch.isposinf(t).sum())
            raise DomainError(
                f"theta: expected scores in [-inf, inf) (-inf marks an element that cannot be chosen), "
                f"got {nan} NaN and {pinf} +inf entries"
            )
        return t, batch

    def _use_columns(self, t: torch.Tensor) -> bool:
        if self.schedule != "auto":
            return self.schedule == "columns"
        B, n = t.shape
        k = self.k
        if t.device.type == "cuda":
            return True
        rows = n * (2 * _CPU_LAUNCH + B * k * _CPU_ROW_CELL)
        cols = k * (3 * _CPU_LAUNCH + B * n * _CPU_SCAN_CELL)
        return cols < rows

    def _alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(prefix table, A (B,), numba_layout)``: the table is ``(n+1, B, k+1)`` from the
        torch kernels, or ``(B, n+1, k+1)`` from the numba kernel (``numba_layout``)."""
        k = self.k
        if self.backend == "numba" and k > 0:
            a = self._numba_alpha(t)
            return a, a[:, -1, k], True
        a = _alpha_columns(t, k) if self._use_columns(t) else _alpha_rows(t, k)
        return a, a[-1, :, k], False

    def _numba_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, n+1, k+1)`` float64 prefix table by the numba kernel."""
        B, n = t.shape
        a = torch.empty((B, n + 1, self.k + 1), dtype=torch.float64)
        self._numba().forward(t.contiguous().numpy(), self.k, a.numpy())
        return a

    def _mu_from_alpha(self, t: torch.Tensor, alpha: torch.Tensor, numba_layout: bool) -> torch.Tensor:
        k = self.k
        if k == 0:
            return torch.zeros_like(t)
        if numba_layout:
            mu = torch.empty_like(t)
            self._numba().marginals(t.contiguous().numpy(), k, alpha.numpy(), mu.numpy())
            return mu
        beta = _beta_columns(t, k) if self._use_columns(t) else _beta_rows(t, k)
        return _marginals_from_tables(t, k, alpha, beta)

    def _logz_and_mu(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (B,), μ (B, n))`` in float64, one forward-backward pass."""
        k = self.k
        if k == 0:
            return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device), torch.zeros_like(t)
        alpha, logz, numba_layout = self._alpha(t)
        return logz, self._mu_from_alpha(t, alpha, numba_layout)

    # ------------------------------------------------------------------ hooks
    def _log_partition(self, theta: torch.Tensor) -> torch.Tensor:
        return _LogPartition.apply(theta, self)

    def _marginals(self, theta: torch.Tensor) -> torch.Tensor:
        return _Marginals.apply(theta, self)

    def _log_partition_and_marginals(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, batch = self._flat(theta)
        logz, mu = self._logz_and_mu(t)
        # logz is a view of the table: copy it so the table is freed
        return logz.reshape(batch).to(theta.dtype, copy=True), mu.to(theta.dtype).reshape(theta.shape)

    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        self._flat(theta)  # checks k <= n and the values
        th = theta.detach()
        out = torch.zeros_like(th)
        if self.k == 0:
            return out
        top = torch.sort(th, dim=-1, descending=True, stable=True).indices[..., : self.k]
        out.scatter_(-1, top, 1.0)
        feasible = (torch.isfinite(th).sum(-1) >= self.k).unsqueeze(-1)
        return out * feasible.to(th.dtype)

    def _sample(self, theta: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        t, batch = self._flat(theta)
        B, n = t.shape
        S, k = num_samples, self.k
        shape = (S,) + tuple(theta.shape)
        if k == 0 or B == 0:
            return torch.zeros(shape, dtype=theta.dtype, device=theta.device)
        num_possible = torch.isfinite(t).sum(-1)
        feasible = num_possible >= k
        out = torch.zeros((B, S, n), dtype=torch.bool, device=t.device)
        filled = torch.zeros(B, dtype=torch.long, device=t.device)
        if self.sampler != "sequential":
            p, acc = _rejection_plan(t, k, num_possible, feasible)
            if self.sampler == "rejection":
                use = feasible
            else:
                use = feasible & (acc >= _MIN_ACCEPTANCE)
                use = use & self._rejection_is_cheaper(t, acc, use, S)
            if bool(use.any()):
                out, filled = _sample_rejection(t, k, p, acc, use, S, generator)
        missing = feasible & (filled < S)
        if bool(missing.any()):
            rows = missing.nonzero().flatten()
            seq = self._sample_sequential(t[rows], S, generator)  # (R, S, n) bool
            slots = torch.arange(S, device=t.device).unsqueeze(0) >= filled[rows].unsqueeze(1)  # (R, S)
            out[rows] = torch.where(slots.unsqueeze(-1), seq, out[rows])
        return out.to(theta.dtype).permute(1, 0, 2).reshape(shape)

    def _rejection_is_cheaper(self, t: torch.Tensor, acc: torch.Tensor, use: torch.Tensor, S: int) -> torch.Tensor:
        """Per call (a bool tensor, the same for every row): expected rejection cost of the
        rows in ``use`` against the sequential sampler's cost for the whole batch."""
        B, n = t.shape
        k = self.k
        expected = float(torch.where(use, S * n / acc.clamp(min=_MIN_ACCEPTANCE), torch.zeros_like(acc)).sum())
        if t.device.type == "cuda":
            rej = _PLAN_LAUNCHES * _CUDA_LAUNCH + expected * _CUDA_CELL
            seq = (2 * k + 4 * n) * _CUDA_LAUNCH + B * S * n * _CUDA_CELL
        else:
            rej = _PLAN_LAUNCHES * _CPU_LAUNCH + expected * _CPU_REJECT_CELL
            if self.backend == "numba":
                seq = B * n * k * _NUMBA_CELL + B * S * n * _NUMBA_SEQ_CELL
            else:
                table = min(n * (2 * _CPU_LAUNCH + B * k * _CPU_ROW_CELL), k * (3 * _CPU_LAUNCH + B * n * _CPU_SCAN_CELL))
                seq = table + n * 4 * _CPU_LAUNCH + B * S * n * _CPU_SEQ_CELL
        return torch.as_tensor(bool(rej <= seq), device=t.device)

    def _sample_sequential(self, t: torch.Tensor, S: int, generator: torch.Generator | None) -> torch.Tensor:
        """``(R, S, n)`` bool exact samples of the (feasible) rows of ``t`` by the backward sampler."""
        R, n = t.shape
        k = self.k
        if self.backend == "numba":
            u = torch.rand((R, S, n), dtype=torch.float64, generator=generator)
            alpha = self._numba_alpha(t)
            z = torch.empty((R, S, n), dtype=torch.uint8)
            self._numba().sample_sequential(t.contiguous().numpy(), k, alpha.numpy(), torch.log(u).numpy(), z.numpy())
            return z.to(torch.bool)
        u = torch.rand((n, R, S), dtype=torch.float64, device=t.device, generator=generator)
        alpha = _alpha_columns(t, k) if self._use_columns(t) else _alpha_rows(t, k)
        z = _sample_sequential_torch(t, k, alpha, torch.log(u))  # (n, R, S)
        return z.permute(1, 2, 0)
