"""Torch kernels of the ``ksubset`` solver: the log-space tables, the marginals, the
Hessian-vector product and the sequential sampler's step probabilities (private).

All functions take θ as float64 ``t (B, n)`` (never mutated) and the subset size k.

Tables (see :mod:`structgrad.solvers.ksubset` for the recursion):
    α ``(n+1, B, k+1)``, ``alpha[i, :, j] = α[i, j] = log e_j(x_1..x_i)``;
    b ``(n+1, B, k+1)``, the suffix table with sizes reversed,
    ``b[i, :, k − j] = β[i, j] = log e_j(x_{i+1}..x_n)``.
Each is built by a loop over the n elements (``*_rows``: n steps of ``(B, k)``
logaddexps) or over the k sizes (``*_columns``: k ``logcumsumexp`` scans of ``(B, n)``).

Two representations of a table (a :data:`Table`, the pair ``(M, L)``):

* plain, ``(α, None)``: the log-values themselves (the fast path);
* split, ``(M, L)`` with α = M + L (:func:`split_alpha`, :func:`split_beta`): M is the
  best score of a subset in the cell (a max-plus recursion: sums of θ's, rounded
  like enumeration's structure scores) and L = log Σ_S exp(score(S) − M) ∈ [0, log C(i, j)]
  the log of the cell's weight relative to its best subset.  When |θ| is so large
  that log C(n, k) is below the rounding of the scores (at 1e30 in float64 the
  rounding is ~1e14), the plain values M + L round to M and lose how many subsets
  tie; the split form keeps it, so tied subsets share their probability as in
  enumeration (k = 2 of five scores 1e30: 2/5 each, not 1/2).  The solver uses it
  for rows whose scores are that large.

With the split tables every probability is formed from *local* quantities, never
as exp(· − A): a cell's two terms against each other (the marginals by the
probability-space backward pass :func:`marginals_from_prefix`, the H v weights, the
sampler's steps).  The global form exp(α[i−1, j] + θ_i + β[i, k−1−j] − A) of
:func:`marginals_from_tables` cancels catastrophically once |θ| is large (at 1e30
each term came out 0 or inf; summed, k = 2 marginals of 0 or 4), so it serves only
plain tables of moderate scores.  H v and the sampler's steps are local for both
representations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from structgrad.checks import NEG_INF, finite_or_zero

__all__ = [
    "Table",
    "alpha_rows",
    "beta_rows",
    "alpha_columns",
    "beta_columns",
    "split_alpha",
    "split_beta",
    "marginals_from_tables",
    "marginals_from_prefix",
    "hvp",
    "step_logits",
]

#: ``(M, L)``: a table as log-values ``(α, None)`` or split, α = M + L (module docstring).
Table = tuple[torch.Tensor, "torch.Tensor | None"]


def alpha_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """Prefix table α ``(n+1, B, k+1)`` of ``t`` ``(B, n)`` by a loop over the n elements."""
    B, n = t.shape
    a = torch.empty((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    a[0] = NEG_INF
    a[:, :, 0] = 0.0
    if k == 0:
        return a
    tt = t.t().unsqueeze(-1).contiguous()  # (n, B, 1)
    buf = torch.empty((B, k), dtype=t.dtype, device=t.device)
    for i in range(n):
        torch.add(a[i, :, :-1], tt[i], out=buf)
        torch.logaddexp(a[i, :, 1:], buf, out=a[i + 1, :, 1:])
    return a


def beta_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """Suffix table, sizes reversed: ``b[i, :, k − j] = β[i, j] = log e_j(x_{i+1}..x_n)``, ``(n+1, B, k+1)``.

    Reversing the size axis lets the marginals pair α[i−1, j] with β[i, k−1−j] as
    ``α[i−1, :, j] + b[i, :, j+1]`` without a flipped copy.
    """
    B, n = t.shape
    b = torch.empty((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    b[n] = NEG_INF
    b[:, :, k] = 0.0
    if k == 0:
        return b
    tt = t.t().unsqueeze(-1).contiguous()
    buf = torch.empty((B, k), dtype=t.dtype, device=t.device)
    for i in range(n, 0, -1):
        torch.add(b[i, :, 1:], tt[i - 1], out=buf)
        torch.logaddexp(b[i, :, :-1], buf, out=b[i - 1, :, :-1])
    return b


def alpha_columns(t: torch.Tensor, k: int) -> torch.Tensor:
    """α by a loop over the sizes: α[i, j] = log Σ_{l<=i} exp(θ_l + α[l−1, j−1]) (a logcumsumexp).

    Returns ``(n+1, B, k+1)`` like :func:`alpha_rows` (a contiguous copy).
    """
    B, n = t.shape
    a = torch.empty((k + 1, B, n + 1), dtype=t.dtype, device=t.device)
    a[0] = 0.0
    a[1:, :, 0] = NEG_INF
    for j in range(1, k + 1):
        a[j, :, 1:] = torch.logcumsumexp(a[j - 1, :, :-1] + t, dim=-1)
    return a.permute(2, 1, 0).contiguous()


def beta_columns(t: torch.Tensor, k: int) -> torch.Tensor:
    """The suffix table of :func:`beta_rows` (sizes reversed) by a loop over the sizes:
    β[i, j] = log Σ_{l>i} exp(θ_l + β[l, j−1]) (a reversed logcumsumexp)."""
    B, n = t.shape
    b = torch.empty((k + 1, B, n + 1), dtype=t.dtype, device=t.device)  # b[k − j] = β[:, j]
    b[k] = 0.0
    b[:k, :, n] = NEG_INF
    for j in range(1, k + 1):
        v = (b[k - j + 1, :, 1:] + t).flip(-1)
        b[k - j, :, :-1] = torch.logcumsumexp(v, dim=-1).flip(-1)
    return b.permute(2, 1, 0).contiguous()


def _split_tables(t: torch.Tensor, k: int, reverse: bool) -> Table:
    B, n = t.shape
    M = torch.empty((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    end = n if reverse else 0
    M[end] = NEG_INF
    M[:, :, k if reverse else 0] = 0.0
    L = M.clone()
    if k == 0:
        return M, L
    tt = t.t().unsqueeze(-1).contiguous()
    # prefix: cell j of row i+1 from cell j (i not chosen) and cell j−1 (chosen) of row i;
    # suffix (sizes reversed): cell m of row i−1 from cell m and cell m+1 of row i
    steps = range(n, 0, -1) if reverse else range(n)
    for i in steps:
        src, dst, th = (i, i - 1, tt[i - 1]) if reverse else (i, i + 1, tt[i])
        if reverse:
            xM, xL, yM, yL = M[src, :, :-1], L[src, :, :-1], M[src, :, 1:] + th, L[src, :, 1:]
            out = slice(0, k)
        else:
            xM, xL, yM, yL = M[src, :, 1:], L[src, :, 1:], M[src, :, :-1] + th, L[src, :, :-1]
            out = slice(1, k + 1)
        m = torch.maximum(xM, yM)
        ms = finite_or_zero(m)
        M[dst, :, out] = m
        L[dst, :, out] = torch.logaddexp(xL + (xM - ms), yL + (yM - ms))
    return M, L


def split_alpha(t: torch.Tensor, k: int) -> Table:
    """The prefix table split as (M, L) ``(n+1, B, k+1)`` each (module docstring), rows schedule.

    M[i, j] = max(M[i−1, j], M[i−1, j−1] + θ_i) and
    L[i, j] = logaddexp(L[i−1, j] + M[i−1, j] − M[i, j], L[i−1, j−1] + M[i−1, j−1] + θ_i − M[i, j]);
    at a tie the differences are exactly 0 and L counts both.  Unreachable cells
    have M = L = −inf.
    """
    return _split_tables(t, k, reverse=False)


def split_beta(t: torch.Tensor, k: int) -> Table:
    """The suffix table (sizes reversed, like :func:`beta_rows`) split as (M, L)."""
    return _split_tables(t, k, reverse=True)


def _pair(a: Table, b: Table, ia, ib) -> Table:
    """The cells ``a[ia] + b[ib]`` of two tables, as a pair."""
    M = a[0][ia] + b[0][ib]
    L = None if a[1] is None else a[1][ia] + b[1][ib]
    return M, L


def _diff(x: Table, y: Table) -> torch.Tensor:
    """x − y of two pairs (either may be −inf; −inf − (−inf) gives NaN, left to the caller)."""
    d = x[0] - y[0]
    return d if x[1] is None else d + (x[1] - y[1])


def marginals_from_tables(t: torch.Tensor, k: int, alpha: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """μ ``(B, n)`` from the plain prefix table α and size-reversed suffix table b (k >= 1).

        μ_i = Σ_{j=0}^{k−1} exp(α[i−1, j] + θ_i + β[i, k−1−j] − A),

    each term the probability that i is chosen with j elements before it (<= 1:
    no max-shift needed).  Zeros for infeasible instances.  For plain tables only:
    the solver sends scores with k·max|θ| > 2^20 to the split tables
    (:func:`marginals_from_prefix`), since the exponent is a difference of terms of
    size ~|A| and its rounding grows with them (at 1e30 it is ~1e14: terms of 0 or inf).
    """
    logz = finite_or_zero(alpha[-1, :, k])  # A = -inf: every term is -inf as well, and exp gives 0
    s = alpha[:-1, :, :k] + b[1:, :, 1:]  # α[i−1, j] + β[i, k−1−j], j = 0..k−1: (n, B, k)
    s += (t.t() - logz).unsqueeze(-1)
    return s.exp_().sum(-1).t()


def marginals_from_prefix(t: torch.Tensor, k: int, alpha: Table) -> torch.Tensor:
    """μ ``(B, n)`` from the prefix table alone, by the backward pass of its recursion in
    probability space (k >= 1; used with the split tables).

    w[i, j] = P(j of the first i elements are chosen) satisfies w[n, k] = 1 and

        w[i−1, j] = w[i, j] p[i, j] + w[i, j+1] q[i, j+1],   μ_i = Σ_j w[i, j] q[i, j],

    with (p, q) the shares of the two terms of α[i, j] (:func:`_shares`).  Every unit of
    probability takes exactly k "chosen" steps on its way from (n, k) to (0, 0), so
    Σ_i μ_i = k however the cells are rounded: when rounding at |θ| ~ 1e30 separates
    subsets that tie (their scores summed in another order), a tie is broken, never
    counted twice.  Infeasible instances (A = −inf) get zeros.
    """
    B, n = t.shape
    p, q = _shares(tuple(None if x is None else x[:-1] for x in alpha), t.t().unsqueeze(-1))  # (n, B, k)
    w = torch.zeros((B, k + 1), dtype=t.dtype, device=t.device)
    w[:, k] = torch.isfinite(alpha[0][-1, :, k]).to(t.dtype)
    mu = torch.empty((n, B), dtype=t.dtype, device=t.device)
    for i in range(n, 0, -1):
        down = w[:, 1:] * q[i - 1]  # (B, k): from size j to j − 1, element i chosen
        torch.sum(down, -1, out=mu[i - 1])
        w = torch.cat([w[:, :1], w[:, 1:] * p[i - 1]], -1)
        w[:, :-1] += down
    return mu.t()


def _shares(prev: Table, th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares (p, q) ``(n, B, k)`` of the two terms of cur[j] = logaddexp(prev[j], prev[j−1] + θ), j = 1..k.

    p = σ(−d), q = σ(d) with d = prev[j−1] + θ − prev[j]: p + q = 1 whatever the
    rounding of the cells.  An unreachable cell (both terms −inf) gets p = 1, q = 0.
    """
    M, L = prev
    d = _diff((M[:, :, :-1] + th, None if L is None else L[:, :, :-1]), (M[:, :, 1:], None if L is None else L[:, :, 1:]))
    d = d.masked_fill(torch.isnan(d), NEG_INF)
    return torch.sigmoid(-d).contiguous(), torch.sigmoid(d).contiguous()


def _softmax_pairs(M: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of the log-values M + L; rows of all −inf give zeros."""
    if L is None:
        return torch.softmax(M, -1).nan_to_num_(nan=0.0)
    top = finite_or_zero(M.amax(-1, keepdim=True))
    w = torch.exp(L + (M - top))
    return (w / w.sum(-1, keepdim=True)).nan_to_num_(nan=0.0)


def hvp(t: torch.Tensor, k: int, alpha: Table, b: Table, mu: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v = Cov_p(z) v ``(B, n)``: the derivative of the marginals in direction ``v`` (k >= 1).

    Since Σ_i z_i = k is constant, Cov(z) 1 = 0 and v may be centred to
    v' = v − ⟨μ, v⟩/k, after which (H v)_i = E[z_i ⟨z, v'⟩].  Splitting a subset
    containing i into its part before i (size j) and after i (size k−1−j),

        E[z_i ⟨z, v'⟩] = Σ_j P_ij (v'_i + γ[i−1, j] + δ[i, k−1−j]),
        P_ij = μ_i · softmax_j(α[i−1, j] + β[i, k−1−j])  (= exp(α[i−1, j] + θ_i + β[i, k−1−j] − A)),

    where γ[i, j] is the mean of Σ_{l∈S} v'_l over subsets S ⊆ {1..i} of size j
    weighted by Π_{l∈S} x_l, and δ the same over suffixes.  They follow the table
    recursions as convex combinations (stable):
        γ[i, j] = p γ[i−1, j] + q (γ[i−1, j−1] + v'_i),  (p, q) the shares of α[i, j]'s two terms,
    and δ alike with β.  Every weight is a probability formed locally (see
    :func:`_shares`), so nothing overflows for any finite θ.
    """
    B, n = t.shape
    beta = (b[0].flip(-1), None if b[1] is None else b[1].flip(-1))  # natural order: beta[i, :, j] = β[i, j]
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    vp = v - (mu * v).sum(-1, keepdim=True) / k
    vp = torch.where(torch.isneginf(t), zero, vp)  # impossible elements carry no weight
    tt = t.t().unsqueeze(-1)  # (n, B, 1)
    vt = vp.t().unsqueeze(-1).contiguous()  # (n, B, 1)

    pf, qf = _shares(tuple(None if x is None else x[:-1] for x in alpha), tt)
    gam = torch.zeros((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    tmp = torch.empty((B, k), dtype=t.dtype, device=t.device)
    for i in range(1, n + 1):
        torch.add(gam[i - 1, :, :-1], vt[i - 1], out=tmp)
        torch.mul(pf[i - 1], gam[i - 1, :, 1:], out=gam[i, :, 1:])
        gam[i, :, 1:].addcmul_(qf[i - 1], tmp)
    pb, qb = _shares(tuple(None if x is None else x[1:] for x in beta), tt)
    dlt = torch.zeros((n + 1, B, k + 1), dtype=t.dtype, device=t.device)
    for i in range(n, 0, -1):
        torch.add(dlt[i, :, :-1], vt[i - 1], out=tmp)
        torch.mul(pb[i - 1], dlt[i, :, 1:], out=dlt[i - 1, :, 1:])
        dlt[i - 1, :, 1:].addcmul_(qb[i - 1], tmp)
    PM, PL = _pair(alpha, b, (slice(None, -1), slice(None), slice(None, k)), (slice(1, None), slice(None), slice(1, None)))
    w = _softmax_pairs(PM, PL) * mu.t().unsqueeze(-1)  # P_ij (n, B, k)
    g = gam[:-1, :, :k] + dlt[1:, :, :k].flip(-1) + vt
    return (w * g).sum(-1).t()


def step_logits(t: torch.Tensor, k: int, alpha: Table) -> torch.Tensor:
    """D ``(n, B, k+1)``: D[i−1, b, r] = log P(z_i = 1 | r ones left among 1..i) for the backward sampler.

    P(z_i = 1 | r left) = e^{θ_i + α[i−1, r−1]} / (e^{α[i−1, r]} + e^{θ_i + α[i−1, r−1]})
    = σ(θ_i + α[i−1, r−1] − α[i−1, r]): the log-sigmoid of a local difference, so
    the two choices' probabilities sum to 1 whatever the rounding of the cells (the
    global form θ_i + α[i−1, r−1] − α[i, r] is not, at |θ| ~ 1e30).  r = 0 gives −inf
    (nothing left to choose), r >= i gives +inf (all remaining elements are forced),
    unreachable states (both terms −inf) give −inf.
    """
    n = t.shape[1]
    tt = t.t().unsqueeze(-1)
    M, L = alpha
    d = _diff((M[:-1, :, :-1] + tt, None if L is None else L[:-1, :, :-1]), (M[:-1, :, 1:], None if L is None else L[:-1, :, 1:]))
    d = F.logsigmoid(d.masked_fill(torch.isnan(d), NEG_INF))
    r = torch.arange(1, k + 1, device=t.device)
    i = torch.arange(1, n + 1, device=t.device)
    forced = (r.unsqueeze(0) >= i.unsqueeze(1)).unsqueeze(1)  # (n, 1, k)
    d = torch.where(forced, torch.full_like(d, float("inf")), d)
    return torch.cat([torch.full_like(d[:, :, :1], NEG_INF), d], dim=-1)
