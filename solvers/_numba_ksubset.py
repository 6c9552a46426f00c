"""Numba kernels of the ``ksubset`` solver (private; CPU only).

Imported lazily by :mod:`structgrad.solvers.ksubset` when a solver is built with
``backend="numba"``, so ``import structgrad`` never imports numba.  The kernels
work on float64 NumPy arrays, one instance after another (serial, no threads, so
no threading layer is started):

    α[i, j] = log e_j(x_1..x_i),  x_l = exp θ_l       (prefix table, log-space)
    α[i, j] = logaddexp(α[i-1, j], α[i-1, j-1] + θ_i),  A = α[n, k]

then the marginals by the analytic backward pass of that recursion, carried in
probability space (see :func:`marginals`; one exp per cell instead of the two
transcendentals of a log-space suffix table), and the backward sequential sampler.

Only the cells in the band ``max(0, k − (n − i)) <= j <= min(i, k)`` of α can
take part in a subset of size k; the others are left at ``-inf`` and skipped,
which halves the work when k is close to n/2.  ``-inf`` is the log of 0
throughout; ``logaddexp(-inf, -inf)`` is ``-inf`` (no NaN), and an exp whose
result would underflow (argument < -700) is skipped: libm is about 5x slower
there, and the term is below 1e-304 relative to what it is added to.

Complexity: O(n k) time per instance for each kernel; the prefix table takes
O(n k) memory per instance, the backward pass O(k).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["forward", "marginals", "sample_sequential"]

_NEG_INF = -np.inf
_UNDERFLOW = -700.0  # exp below this is skipped (see the module docstring)


@numba.njit(cache=True, nogil=True)
def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    d = b - a
    if d < _UNDERFLOW:
        return a
    return a + math.log1p(math.exp(d))


@numba.njit(cache=True, nogil=True)
def forward(theta: np.ndarray, k: int, alpha: np.ndarray) -> None:
    """Fill ``alpha`` ``(B, n+1, k+1)`` with the log-space prefix table of ``theta`` ``(B, n)``."""
    B, n = theta.shape
    for b in range(B):
        a = alpha[b]
        a[:, :] = _NEG_INF
        a[0, 0] = 0.0
        for i in range(1, n + 1):
            t = theta[b, i - 1]
            lo = max(0, k - (n - i))
            hi = min(i, k)
            for j in range(lo, hi + 1):
                stay = a[i - 1, j]
                if j == 0:
                    a[i, j] = stay
                else:
                    a[i, j] = _logaddexp(stay, a[i - 1, j - 1] + t)


@numba.njit(cache=True, nogil=True)
def marginals(theta: np.ndarray, k: int, alpha: np.ndarray, mu: np.ndarray) -> None:
    """Fill ``mu`` ``(B, n)`` with the marginals, from ``alpha`` made by :func:`forward` (k >= 1).

    The analytic backward pass of the prefix recursion, in probability space:
    ``w[i, j]`` = P(exactly j of the first i elements are chosen) under p(z; θ)
    satisfies w[n, k] = 1 and

        w[i−1, j] = w[i, j] p[i, j] + w[i, j+1] q[i, j+1],   μ_i = Σ_j w[i, j] q[i, j],

    where q[i, j] = σ(d) and p[i, j] = σ(−d), d = α[i−1, j−1] + θ_i − α[i−1, j], are the
    shares of the two terms of α[i, j] = logaddexp(α[i−1, j], α[i−1, j−1] + θ_i), both
    computed from one exp(−|d|) (never as 1 − q, which would cancel).  Every
    quantity is a probability in [0, 1] and only sums of products of them are formed
    (no cancellation, no overflow); tiny marginals keep their relative accuracy.
    """
    B, n = theta.shape
    w = np.empty(k + 1)
    for b in range(B):
        a = alpha[b]
        if a[n, k] == _NEG_INF:
            mu[b, :] = 0.0
            continue
        w[:] = 0.0
        w[k] = 1.0
        for i in range(n, 0, -1):
            t = theta[b, i - 1]
            if t == _NEG_INF:  # never chosen: q = 0, p = 1, w unchanged
                mu[b, i - 1] = 0.0
                continue
            lo = max(0, k - (n - i))
            hi = min(i, k)
            m = 0.0
            carry = 0.0  # w[i, j+1] q[i, j+1], the share of row i−1's cell j coming from j+1
            for j in range(hi, lo - 1, -1):
                wj = w[j]
                if j == 0 or wj == 0.0:
                    w[j] = wj + carry if j == 0 else carry
                    carry = 0.0
                    continue
                x = a[i - 1, j]
                y = a[i - 1, j - 1] + t
                if y == _NEG_INF:
                    p, q = 1.0, 0.0
                elif x == _NEG_INF:
                    p, q = 0.0, 1.0
                else:
                    d = y - x
                    e = math.exp(-abs(d)) if abs(d) < -_UNDERFLOW else 0.0
                    big, small = 1.0 / (1.0 + e), e / (1.0 + e)  # both accurate: no 1 − q
                    p, q = (small, big) if d >= 0.0 else (big, small)
                share = wj * q
                m += share
                w[j] = wj * p + carry
                carry = share
            if lo >= 1:
                w[lo - 1] = carry
            mu[b, i - 1] = m


@numba.njit(cache=True, nogil=True)
def sample_sequential(theta: np.ndarray, k: int, alpha: np.ndarray, log_u: np.ndarray, out: np.ndarray) -> None:
    """Backward sequential sampling from the prefix table.

    Going i = n, ..., 1 with r elements still to choose, element i is chosen with
    probability σ(d), d = θ_i + α[i-1, r-1] − α[i-1, r] (forced when r = i), i.e. when
    ``log_u[b, s, i-1]`` is below log σ(d).  (A local difference: the two choices'
    probabilities sum to 1 whatever the rounding of the cells, which the equal
    exp(θ_i + α[i-1, r-1] − α[i, r]) does not guarantee for |θ| ~ 1e30.)  ``out`` ``(B, S, n)`` uint8
    receives the samples; infeasible instances (α[n, k] = -inf) get zeros.
    """
    B, n = theta.shape
    S = log_u.shape[1]
    for b in range(B):
        a = alpha[b]
        if a[n, k] == _NEG_INF:
            out[b, :, :] = 0
            continue
        for s in range(S):
            r = k
            for i in range(n, 0, -1):
                pick = 0
                if r > 0:
                    if r >= i:
                        pick = 1
                    else:
                        y = theta[b, i - 1] + a[i - 1, r - 1]
                        x = a[i - 1, r]
                        if y != _NEG_INF:
                            if x == _NEG_INF:
                                pick = 1  # the remaining r must include i
                            else:
                                d = y - x
                                if d >= 0.0:
                                    logp = -math.log1p(math.exp(-d))
                                else:
                                    logp = d - math.log1p(math.exp(d))
                                if log_u[b, s, i - 1] < logp:
                                    pick = 1
                out[b, s, i - 1] = pick
                r -= pick
