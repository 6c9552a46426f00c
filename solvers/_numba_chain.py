"""Numba kernels of the ``chain`` solver (private; CPU only; imported on first use).

Pure array functions over NumPy arrays (the ``t_*`` helpers at the end wrap torch
tensors as zero-copy views), so ``NUMBA_DISABLE_JIT=1`` runs them as Python.

Inputs: ``node (B, T, C)`` float32 or float64; ``edge`` in one of three layouts of
the same dtype, ``(B, T−1, C, C)`` per instance, ``(T−1, C, C)`` shared by the batch,
or ``(C, C)`` shared by every position (``edge[t, i, j]`` scores label i at t, j at
t+1); ``lengths (B,)`` int64 in ``[0, T]`` (None: all T).  Internally ``edge`` is a
``(N, C, C)`` array and instance b, position t reads row ``b·eb + t·et``
(:func:`_layout`), so every layout runs the same kernel.

Per instance, the numerical path follows the torch backend's rule with a float64
recursion: *probability space* with per-step scaling (Rabiner's scaled
forward-backward) when every transition score is finite, every position has a
possible label and R = (edge range) + (finite node range) ≤ 300, the float64 bound
(messages then stay within e^(±2R)·poly(C) of each other: no underflow);
otherwise *re-centred log space* (float64 logsumexp recursions; −inf, wide ranges
and ±1e30 scores give no inf/NaN).  Float32 inputs with R ≤ 32 (the torch backend's
float32 bound) run the probability-space recursion in float32 arithmetic
(PATH_EXP32), as the torch backend does; wider float32 instances take the float64
paths.  Exponentials use :func:`_fexp` / :func:`_fexp32` (vectorisable; relative
error ≤ 4e-16 / ≤ 2e-7), not libm's scalar exp.

Algorithms, per instance of length L (A = log Z):

* forward (probability space): α̃_t = (α̂_{t−1} K_{t−1}) ⊙ P_t, s_t = Σ_j α̃_t[j],
  α̂_t = α̃_t / s_t, with K_t = exp(edge_t − max edge_t), P_t = exp(node_t − max node_t);
  A = Σ_{t<L} (log s_t + max node_t) + Σ_{t<L−1} max edge_t.
* backward: β̂_{L−1} = 1, u = P_{t+1} ⊙ β̂_{t+1} / s_{t+1}, β̂_t = K_t u;
  μ_t = α̂_t ⊙ β̂_t, μ_t[i, j] = α̂_t[i] K_t[i, j] u[j] (one pass over K_t gives both).
* log space: ᾱ_t[j] = logsumexp_i(ᾱ_{t−1}[i] + edge[i, j]) + node_t[j] − c_t, and the
  chain backend's β̄, N_t (re-centred at every step).
* Viterbi: v_t[j] = max_i (v_{t−1}[i] + edge[i, j]) + node_t[j] with back-pointers
  (lowest i on ties), last label the lowest argmax of v_{L−1}.
* FFBS: y_{L−1} ~ α̂_{L−1}, y_t ~ α̂_t[i] K_t[i, y_{t+1}] (log space: ᾱ + edge), each by
  inverse CDF of a caller-given uniform (randomness stays with the caller's
  torch.Generator).

Infeasible instances (every labelling −inf): A = −inf, zero marginals, labels −1.
Positions at or past the length get zero marginals and label −1; L = 0 gives A = 0.

Time O(B·T·C²), memory O(T·C²) per thread beyond inputs and outputs.
Multi-core: :func:`run_chunks` splits the batch into ``threads`` contiguous ranges
run by Python threads on the nogil range kernels (see /work/notes/kernels.md for
the measurements behind that choice; ``_lpm_prange`` is the prange alternative).

Example:
    >>> import numpy as np
    >>> from structgrad.solvers import _numba_chain as nc
    >>> node, edge = np.zeros((2, 3, 2)), np.zeros((2, 2))
    >>> nc.log_partition(node, edge, np.array([3, 1]))   # log 2^3, log 2
    array([2.07944154, 0.69314718])
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = [
    "log_partition",
    "log_partition_and_marginals",
    "viterbi",
    "sample",
    "paths",
    "run_chunks",
    "t_log_partition",
    "t_log_partition_and_marginals",
    "t_viterbi",
    "t_sample",
]

_NEG_INF = -np.inf
_EXP_RANGE = 300.0  # R bound of the probability-space path (float64 recursion)
_F32_RANGE = 32.0  # float32 inputs: float32 arithmetic below this R (the torch backend's float32 bound)
_FM = {"contract", "reassoc", "nsz", "arcp"}  # probability-space loops only (finite values)
_jit = numba.njit(cache=True, nogil=True)
_jit_fm = numba.njit(cache=True, nogil=True, fastmath=_FM)

PATH_LOG, PATH_EXP64, PATH_EXP32 = 0, 1, 2  # codes of :func:`paths`


# ----------------------------------------------------------------------------- exp
# exp(x) = 2^k · p(r), k = round(x / ln 2), r = x − k ln 2 (|r| ≤ ln2 / 2), p the degree-13
# Taylor polynomial (truncation < 2e-16); 2^k built from the exponent bits.  No branch,
# no call: LLVM vectorises loops over it.  exp(x) = 0 for x ≤ −708 (e^−708 ≈ 3e-308).
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10
_SHIFT = 6755399441055744.0  # 1.5 · 2^52: adding it rounds to an integer
_SHIFT_BITS = int(np.float64(_SHIFT).view(np.int64))

if numba.config.DISABLE_JIT:

    def _f2i(x):
        return int(np.float64(x).view(np.int64))

    def _i2f(i):
        return float(np.int64(i).view(np.float64))

    def _f2i32(x):
        return np.float32(x).view(np.int32)

    def _i2f32(i):
        return np.int32(i).view(np.float32)

else:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _f2i(typingctx, x):
        """The bits of a float64 as an int64 (a bit cast, no conversion)."""
        return _types.int64(_types.float64), lambda ctx, b, sig, args: b.bitcast(args[0], _ir.IntType(64))

    @_intrinsic
    def _i2f(typingctx, i):
        """The float64 whose bits are the int64 ``i``."""
        return _types.float64(_types.int64), lambda ctx, b, sig, args: b.bitcast(args[0], _ir.DoubleType())

    @_intrinsic
    def _f2i32(typingctx, x):
        return _types.int32(_types.float32), lambda ctx, b, sig, args: b.bitcast(args[0], _ir.IntType(32))

    @_intrinsic
    def _i2f32(typingctx, i):
        return _types.float32(_types.int32), lambda ctx, b, sig, args: b.bitcast(args[0], _ir.FloatType())


@numba.njit(cache=True, nogil=True, fastmath={"contract"})  # no reassoc: the rounding trick needs it
def _fexp(x):
    """exp(x) in float64 (relative error ≤ 4e-16; 0 for x ≤ −708, including −inf)."""
    v = x if x > -708.0 else -708.0
    v = v if v < 709.0 else 709.0
    t = v * _LOG2E + _SHIFT
    k = t - _SHIFT
    r = v - k * _LN2_HI - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    scale = _i2f((_f2i(t) - _SHIFT_BITS + 1023) << 52)
    return p * scale if x > -708.0 else 0.0


_SHIFT32_BITS = int(np.float32(12582912.0).view(np.int32))  # 1.5 · 2^23


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _fexp32(x):
    """exp(x) in float32 arithmetic for a float32 x ≥ −87 (relative error ≤ 1e-7; 0 below,
    including −inf): the same scheme with a degree-7 polynomial, twice the SIMD width."""
    lo = np.float32(-87.0)
    v = x if x > lo else lo
    v = v if v < np.float32(88.0) else np.float32(88.0)
    t = v * np.float32(_LOG2E) + np.float32(12582912.0)
    k = t - np.float32(12582912.0)
    r = v - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scale = _i2f32((_f2i32(t) - np.int32(_SHIFT32_BITS) + np.int32(127)) << np.int32(23))
    return p * scale if x > lo else np.float32(0.0)


@_jit
def _fexp_array(x, out):
    """out[...] = exp(x) elementwise (contiguous arrays of the same size)."""
    xf, of = x.ravel(), out.ravel()
    for i in range(xf.size):
        of[i] = _fexp(xf[i])


@_jit
def _lse(x, n):
    """logsumexp of x[:n] (−inf if all −inf)."""
    m = _NEG_INF
    for i in range(n):
        if x[i] > m:
            m = x[i]
    if m == _NEG_INF:
        return m
    s = 0.0
    for i in range(n):
        s += _fexp(x[i] - m)
    return m + math.log(s)


# ----------------------------------------------------------------------------- statistics and path
@_jit
def _node_stats(node, L, nmax):
    """nmax[t] = max_j node[t, j] (0 if all −inf) for t < L; returns (finite node range, any dead position)."""
    C = node.shape[1]
    nr = 0.0
    dead = False
    for t in range(L):
        mx = _NEG_INF
        mn = np.inf
        for j in range(C):
            v = node[t, j]
            if v > mx:
                mx = v
            if v > _NEG_INF and v < mn:
                mn = v
        if mx == _NEG_INF:
            dead = True
            nmax[t] = 0.0
        else:
            nmax[t] = mx
            if mx - mn > nr:
                nr = mx - mn
    return nr, dead


@_jit
def _edge_stats(edge, e0, et, n, emax, K32, K64, fill, f32):
    """emax[t] = max of edge row e0 + t·et (0 if all −inf) for t < n; returns (edge range,
    every entry finite).  With ``fill``, also (speculatively) K[t] = exp(row − emax[t]),
    into K32 (float32 arithmetic) if ``f32`` else K64, while the row is in cache."""
    C = edge.shape[1]
    er = 0.0
    finite = True
    for t in range(n):
        m = edge[e0 + t * et]
        mx = _NEG_INF
        mn = np.inf
        for i in range(C):
            for j in range(C):
                v = m[i, j]
                mx = max(mx, v)
                mn = min(mn, v)
        if not (mn > _NEG_INF):
            finite = False
        mx = mx if mx > _NEG_INF else 0.0
        emax[t] = mx
        if mx - mn > er:
            er = mx - mn
        if fill:
            if f32:
                k32 = K32[t]
                sh = np.float32(mx)
                for i in range(C):
                    for j in range(C):
                        k32[i, j] = _fexp32(np.float32(m[i, j]) - sh)
            else:
                k64 = K64[t]
                for i in range(C):
                    for j in range(C):
                        k64[i, j] = _fexp(m[i, j] - mx)
    return er, finite


@_jit
def _fill_kernel(edge, e0, et, n, emax, K):
    """K[t] = exp(edge row e0 + t·et − emax[t]) for t < n (float64)."""
    C = edge.shape[1]
    for t in range(n):
        m = edge[e0 + t * et]
        k = K[t]
        sh = emax[t]
        for i in range(C):
            for j in range(C):
                k[i, j] = _fexp(m[i, j] - sh)


@_jit
def _fill_kernel32(edge, e0, et, n, emax, K):
    """K[t] = exp(edge row e0 + t·et − emax[t]) for t < n in float32 arithmetic (float32 edges)."""
    C = edge.shape[1]
    for t in range(n):
        m = edge[e0 + t * et]
        k = K[t]
        sh = np.float32(emax[t])
        for i in range(C):
            for j in range(C):
                k[i, j] = _fexp32(np.float32(m[i, j]) - sh)


# ----------------------------------------------------------------------------- probability space
@_jit_fm
def _vecmat(x, k, out):
    """out[j] = Σ_i x[i] k[i, j] (rows taken four at a time: one load/store of out per 4 FMAs)."""
    C = out.shape[0]
    for j in range(C):
        out[j] = 0
    i = 0
    while i + 4 <= C:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        k0, k1, k2, k3 = k[i], k[i + 1], k[i + 2], k[i + 3]
        for j in range(C):
            out[j] += x0 * k0[j] + x1 * k1[j] + x2 * k2[j] + x3 * k3[j]
        i += 4
    while i < C:
        xi = x[i]
        ki = k[i]
        for j in range(C):
            out[j] += xi * ki[j]
        i += 1


@_jit_fm
def _matvec(k, u, out):
    """out[i] = Σ_j k[i, j] u[j] (four rows at a time, vectorised reductions)."""
    C = out.shape[0]
    z = out.dtype.type(0)  # accumulate in out's dtype (float32 arithmetic on the float32 path)
    i = 0
    while i + 4 <= C:
        k0, k1, k2, k3 = k[i], k[i + 1], k[i + 2], k[i + 3]
        s0 = s1 = s2 = s3 = z
        for j in range(C):
            uj = u[j]
            s0 += k0[j] * uj
            s1 += k1[j] * uj
            s2 += k2[j] * uj
            s3 += k3[j] * uj
        out[i], out[i + 1], out[i + 2], out[i + 3] = s0, s1, s2, s3
        i += 4
    while i < C:
        ki = k[i]
        s0 = z
        for j in range(C):
            s0 += ki[j] * u[j]
        out[i] = s0
        i += 1


@_jit_fm
def _exp_forward(node, L, nmax, P, K, kb, kt, alpha, s):
    """Scaled forward pass; fills P, α̂ (rows summing to 1) and s; returns Σ_t (log s_t + max node_t).
    Arithmetic in the dtype of the work arrays P, alpha, s (float32 on the PATH_EXP32 path)."""
    C = node.shape[1]
    one = alpha.dtype.type(1)
    for t in range(L):
        sh = nmax[t]
        for j in range(C):
            P[t, j] = _fexp(node[t, j] - sh)
    logz = 0.0
    for t in range(L):
        a = alpha[t]
        if t == 0:
            for j in range(C):
                a[j] = P[0, j]
        else:
            _vecmat(alpha[t - 1], K[kb + (t - 1) * kt], a)
            for j in range(C):
                a[j] *= P[t, j]
        sm = one - one
        for j in range(C):
            sm += a[j]
        s[t] = sm
        inv = one / sm
        for j in range(C):
            a[j] *= inv
        logz += math.log(sm) + nmax[t]
    return logz


@_jit_fm
def _exp_backward(L, P, K, kb, kt, alpha, s, w, mu, emu, e0, ot, acc, beta, U):
    """Scaled backward pass: μ_t = α̂_t β̂_t into mu (t < L), μ_t[i, j] = α̂_t[i] K_t[i, j] u_t[j]
    into emu rows e0 + t·ot (added when ``acc``), all times the weight w; u_t = U[t + 1]
    = P_{t+1} ⊙ β̂_{t+1} / s_{t+1}.  A single shared K (kt = 0, counts): the counts are
    w · K ⊙ Σ_t α̂_t ⊗ u_t, one blocked pass at the end."""
    C = P.shape[1]
    counts = kt == 0 and acc
    one = alpha.dtype.type(1)
    wt = alpha.dtype.type(w)
    for j in range(C):
        beta[j] = one
        mu[L - 1, j] = w * alpha[L - 1, j]
    for t in range(L - 2, -1, -1):
        inv = one / s[t + 1]
        u = U[t + 1]
        for j in range(C):
            u[j] = P[t + 1, j] * inv * beta[j]
        k = K[kb + t * kt]
        _matvec(k, u, beta)
        for i in range(C):
            mu[t, i] = w * alpha[t, i] * beta[i]
        if counts:
            continue
        row = emu[e0 + t * ot]
        for i in range(C):
            ai = alpha[t, i] * wt
            ki = k[i]
            ri = row[i]
            if acc:
                for j in range(C):
                    ri[j] += ai * (ki[j] * u[j])
            else:
                for j in range(C):
                    ri[j] = ai * (ki[j] * u[j])
    if counts and L > 1:
        row = emu[e0]
        k = K[kb]
        for i in range(C):  # G[i, :] = Σ_t α̂_t[i] u_t, four positions at a time
            t = 0
            g = U[0]  # scratch row: U[0] is not used by the recursion
            for j in range(C):
                g[j] = 0
            while t + 4 <= L - 1:
                a0, a1, a2, a3 = alpha[t, i], alpha[t + 1, i], alpha[t + 2, i], alpha[t + 3, i]
                u0, u1, u2, u3 = U[t + 1], U[t + 2], U[t + 3], U[t + 4]
                for j in range(C):
                    g[j] += a0 * u0[j] + a1 * u1[j] + a2 * u2[j] + a3 * u3[j]
                t += 4
            while t < L - 1:
                at = alpha[t, i]
                ut = U[t + 1]
                for j in range(C):
                    g[j] += at * ut[j]
                t += 1
            ki = k[i]
            ri = row[i]
            for j in range(C):
                ri[j] += w * ki[j] * g[j]


# ----------------------------------------------------------------------------- log space
@_jit
def _log_forward(node, L, nmax, edge, e0, et, alpha, c, m, acc):
    """Re-centred log-space forward: ᾱ (logsumexp 0, or all −inf) and c_t, with node scores
    taken relative to their maxima nmax (so ±1e30 scores keep the O(1) parts); returns
    A = Σ_t (c_t + nmax_t), or −inf."""
    C = node.shape[1]
    logz = 0.0
    for t in range(L):
        a = alpha[t]
        sh = nmax[t]
        if t == 0:
            for j in range(C):
                a[j] = node[0, j] - sh
        else:
            E = edge[e0 + (t - 1) * et]
            for j in range(C):
                m[j] = _NEG_INF
                acc[j] = 0.0
            for i in range(C):
                ai = alpha[t - 1, i]
                if ai > _NEG_INF:
                    for j in range(C):
                        m[j] = max(m[j], ai + E[i, j])
            for i in range(C):
                ai = alpha[t - 1, i]
                if ai > _NEG_INF:
                    for j in range(C):
                        if m[j] > _NEG_INF:
                            acc[j] += _fexp(ai + E[i, j] - m[j])
            for j in range(C):
                a[j] = (node[t, j] - sh) + (m[j] + math.log(acc[j])) if m[j] > _NEG_INF else _NEG_INF
        ct = _lse(a, C)
        c[t] = ct
        logz += ct + sh
        if ct > _NEG_INF:
            for j in range(C):
                a[j] -= ct
    return logz


@_jit
def _log_backward(node, L, nmax, edge, e0, et, alpha, c, w, mu, emu, e0o, ot, acc, beta, wv, nb, tmp):
    """Re-centred log-space backward with the marginals (instance feasible):
    β̄_{t−1}[i] = logsumexp_j(edge[i, j] + ν_t[j] + β̄_t[j]) − max, ν_t = node_t − nmax_t − c_t,
    μ_t = exp(ᾱ_t + β̄_t − N_t), μ_{t−1}[i, j] = exp(ᾱ_{t−1}[i] + edge[i, j] + ν_t[j] + β̄_t[j] − N_t)."""
    C = node.shape[1]
    for j in range(C):
        beta[j] = 0.0
    for t in range(L - 1, -1, -1):
        for j in range(C):
            tmp[j] = alpha[t, j] + beta[j]
        N = _lse(tmp, C)
        for j in range(C):
            mu[t, j] = w * _fexp(tmp[j] - N)
        if t == 0:
            break
        # transition t−1 -> t: β̄_{t−1} and the edge marginals, from β̄_t (in beta)
        E = edge[e0 + (t - 1) * et]
        row = emu[e0o + (t - 1) * ot]
        for j in range(C):
            wv[j] = ((node[t, j] - nmax[t]) - c[t]) + beta[j]
        d = _NEG_INF
        for i in range(C):
            mi = _NEG_INF
            for j in range(C):
                mi = max(mi, E[i, j] + wv[j])
            ai = alpha[t - 1, i]
            scale = w * _fexp(ai + (mi - N)) if (mi > _NEG_INF and ai > _NEG_INF) else 0.0
            sm = 0.0
            for j in range(C):
                e = _fexp(E[i, j] + wv[j] - mi) if mi > _NEG_INF else 0.0
                sm += e
                if acc:
                    row[i, j] += scale * e
                else:
                    row[i, j] = scale * e
            nb[i] = mi + math.log(sm) if mi > _NEG_INF else _NEG_INF
            d = max(d, nb[i])
        if not (d > _NEG_INF):
            d = 0.0
        for i in range(C):
            beta[i] = nb[i] - d


# ----------------------------------------------------------------------------- one instance
@_jit
def _choose_path(node_b, L, edge, e0, et, nmax, emax, K32, K64, shared, g_er, g_fin, f32):
    """Statistics of one instance and its path (PATH_*).  Per-instance edges: K32 (float32
    inputs) or K64 is filled on the way (K64 refilled if float32 is not sound)."""
    nr, dead = _node_stats(node_b, L, nmax)
    if shared:
        er, fin = g_er, g_fin
    else:
        er, fin = _edge_stats(edge, e0, et, L - 1, emax, K32, K64, not dead, f32)
    if dead or not fin or er + nr > _EXP_RANGE:
        return PATH_LOG
    if f32 and er + nr <= _F32_RANGE:
        return PATH_EXP32
    if f32 and not shared:
        _fill_kernel(edge, e0, et, L - 1, emax, K64)
    return PATH_EXP64


@_jit
def _zero_rows(a, r0, r1):
    for r in range(r0, r1):
        a[r] = 0.0


@_jit
def _exp_instance(node_b, L, nmax, P, K, kt, alpha, s, esum, want, w, mu_b, emu, eo, ot, acc, beta, U):
    """Probability-space log Z (+ marginals if ``want``) of one instance, in the work arrays' dtype."""
    lz = _exp_forward(node_b, L, nmax, P, K, 0, kt, alpha, s) + esum
    if want:
        _exp_backward(L, P, K, 0, kt, alpha, s, w, mu_b, emu, eo, ot, acc, beta, U)
    return lz


@_jit
def _work(T, C, dtype):
    """P, α̂, s, β, U of one thread's exp path, in ``dtype``."""
    return (np.empty((T, C), dtype), np.empty((T, C), dtype), np.empty(T, dtype), np.empty(C, dtype), np.empty((T, C), dtype))


@_jit
def _lpm_range(b0, b1, node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, want, weight, logz, mu, emu, ebase, ob, ot, acc):
    """log Z (and, if ``want``, marginals) of instances b0 ≤ b < b1.

    ``gK32``/``gK64``: exp(edge − emax) for batch-less layouts (eb = 0; filled by
    :func:`_global_kernel`), ``gemax`` its per-row maxima.  Edge marginals go to emu
    rows ``ebase + b·ob + t·ot``, added when ``acc`` else assigned (rows past the
    length zeroed)."""
    B, T, C = node.shape
    shared = eb == 0
    nmax = np.zeros(T)
    emax = np.zeros(max(T - 1, 1))
    nK = 0 if shared else max(T - 1, 0)
    K32 = np.empty((nK, C, C), np.float32)
    K64 = np.empty((nK, C, C), np.float64)
    P4, alpha4, s4, beta4, U4 = _work(T if f32 else 0, C, np.float32)
    P8, alpha8, s8, beta8, U8 = _work(T, C, np.float64)
    v1 = np.empty(C)
    v2 = np.empty(C)
    v3 = np.empty(C)
    for b in range(b0, b1):
        L = lengths[b]
        w = weight[b]
        e0 = b * eb
        eo = ebase + b * ob
        if want:
            _zero_rows(mu[b], L, T)
            if not acc:
                _zero_rows(emu, eo + max(L - 1, 0) * ot, eo + (T - 1) * ot)
        if L == 0:
            logz[b] = 0.0
            continue
        path = _choose_path(node[b], L, edge, e0, et, nmax, emax, K32, K64, shared, g_er, g_fin, f32)
        if path != PATH_LOG:
            esum = 0.0
            for t in range(L - 1):
                esum += gemax[t * et] if shared else emax[t]
            kt = et if shared else 1
            if path == PATH_EXP32:
                logz[b] = _exp_instance(node[b], L, nmax, P4, gK32 if shared else K32, kt, alpha4, s4, esum, want, w, mu[b], emu, eo, ot, acc, beta4, U4)
            else:
                logz[b] = _exp_instance(node[b], L, nmax, P8, gK64 if shared else K64, kt, alpha8, s8, esum, want, w, mu[b], emu, eo, ot, acc, beta8, U8)
            continue
        lz = _log_forward(node[b], L, nmax, edge, e0, et, alpha8, s8, v1, v2)
        logz[b] = lz
        if not want:
            continue
        if lz == _NEG_INF:
            _zero_rows(mu[b], 0, L)
            if not acc:
                _zero_rows(emu, eo, eo + (L - 1) * ot)
            continue
        _log_backward(node[b], L, nmax, edge, e0, et, alpha8, s8, w, mu[b], emu, eo, ot, acc, beta8, v3, v1, v2)


@numba.njit(cache=True, nogil=True, parallel=True)
def _lpm_prange(chunks, node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, want, weight, logz, mu, emu, ebases, ob, ot, acc):
    """:func:`_lpm_range` over the instance ranges ``chunks (n, 2)`` in parallel (prange)."""
    for c in numba.prange(chunks.shape[0]):
        _lpm_range(chunks[c, 0], chunks[c, 1], node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, want, weight, logz, mu, emu, ebases[c], ob, ot, acc)


@_jit
def _global_kernel(edge, f32, gK32, gK64, gemax):
    """Batch-less edges: statistics of all rows, exp(edge − max) into gK64 and, for float32
    edges within the float32 bound, into gK32 too (instances choose by their node range)."""
    n = edge.shape[0]
    er, fin = _edge_stats(edge, 0, 1, n, gemax, gK32, gK64, False, f32)
    if fin and er <= _EXP_RANGE:
        _fill_kernel(edge, 0, 1, n, gemax, gK64)
        if f32 and er <= _F32_RANGE:
            _fill_kernel32(edge, 0, 1, n, gemax, gK32)
    return er, fin


# ----------------------------------------------------------------------------- Viterbi and sampling
@_jit
def _viterbi_range(b0, b1, node, edge, eb, et, lengths, labels):
    """Best labels of instances b0 ≤ b < b1 (−1 past the length and for infeasible instances).

    Forward v_t[j] = max_i (v_{t−1}[i] + edge[i, j]) + node_t[j] without back-pointers (a
    vectorised max); back-tracking recomputes y_t = argmax_i (v_t[i] + edge_t[i, y_{t+1}])
    from the very same sums (lowest i on ties), as the torch backend does on the CPU."""
    B, T, C = node.shape
    v = np.empty((T, C))
    for b in range(b0, b1):
        L = lengths[b]
        for t in range(T):
            labels[b, t] = -1
        if L == 0:
            continue
        for j in range(C):
            v[0, j] = node[b, 0, j]
        for t in range(1, L):
            E = edge[b * eb + (t - 1) * et]
            m = v[t]
            for j in range(C):
                m[j] = _NEG_INF
            for i in range(C):
                vi = v[t - 1, i]
                Ei = E[i]
                for j in range(C):
                    x = vi + Ei[j]
                    m[j] = x if x > m[j] else m[j]
            for j in range(C):
                m[j] += node[b, t, j]
        y = 0
        best = v[L - 1, 0]
        for j in range(1, C):
            if v[L - 1, j] > best:
                best = v[L - 1, j]
                y = j
        if best == _NEG_INF:
            continue
        labels[b, L - 1] = y
        for t in range(L - 2, -1, -1):
            E = edge[b * eb + t * et]
            k = 0
            bk = v[t, 0] + E[0, y]
            for i in range(1, C):
                x = v[t, i] + E[i, y]
                if x > bk:
                    bk = x
                    k = i
            y = k
            labels[b, t] = y


@_jit
def _draw(p, u):
    """Index i with probability p[i] / Σ p by inverse CDF at u ∈ [0, 1); −1 if Σ p = 0."""
    tot = 0.0
    for i in range(p.size):
        tot += p[i]
    if not (tot > 0.0):
        return -1
    target = u * tot
    c = 0.0
    last = -1
    for i in range(p.size):
        if p[i] > 0.0:
            last = i
            c += p[i]
            if c > target:
                return i
    return last


@_jit
def _backward_draws(alpha, K, kt, L, Ub, labels_b, p):
    """Backward sampling on the probability-space path: y_{L−1} ~ α̂_{L−1}, y_t ~ α̂_t ⊙ K_t[:, y_{t+1}]."""
    C = alpha.shape[1]
    for k in range(Ub.shape[0]):
        y = -1
        for t in range(L - 1, -1, -1):
            for i in range(C):
                p[i] = alpha[t, i] if t == L - 1 else alpha[t, i] * K[t * kt, i, y]
            y = _draw(p, Ub[k, t])
            labels_b[k, t] = y
            if y < 0:
                labels_b[k, :] = -1
                break


@_jit
def _sample_range(b0, b1, node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, U, labels):
    """FFBS samples labels[s, b] for b0 ≤ b < b1 from uniforms U (S, B, T)."""
    B, T, C = node.shape
    shared = eb == 0
    nmax = np.zeros(T)
    emax = np.zeros(max(T - 1, 1))
    nK = 0 if shared else max(T - 1, 0)
    K32 = np.empty((nK, C, C), np.float32)
    K64 = np.empty((nK, C, C), np.float64)
    P4, alpha4, s4, _, _ = _work(T if f32 else 0, C, np.float32)
    P8, alpha8, s8, _, _ = _work(T, C, np.float64)
    p = np.empty(C)
    v1 = np.empty(C)
    v2 = np.empty(C)
    for b in range(b0, b1):
        L = lengths[b]
        labels[:, b, :] = -1
        if L == 0:
            continue
        e0 = b * eb
        Ub = U[:, b, :]
        lab = labels[:, b, :]
        path = _choose_path(node[b], L, edge, e0, et, nmax, emax, K32, K64, shared, g_er, g_fin, f32)
        kt = et if shared else 1
        if path == PATH_EXP32:
            Kx = gK32 if shared else K32
            _exp_forward(node[b], L, nmax, P4, Kx, 0, kt, alpha4, s4)
            _backward_draws(alpha4, Kx, kt, L, Ub, lab, p)
            continue
        if path == PATH_EXP64:
            Kx = gK64 if shared else K64
            _exp_forward(node[b], L, nmax, P8, Kx, 0, kt, alpha8, s8)
            _backward_draws(alpha8, Kx, kt, L, Ub, lab, p)
            continue
        if _log_forward(node[b], L, nmax, edge, e0, et, alpha8, s8, v1, v2) == _NEG_INF:
            continue
        for k in range(U.shape[0]):  # log space: y_t ~ exp(ᾱ_t + edge_t[:, y_{t+1}] − max)
            y = -1
            for t in range(L - 1, -1, -1):
                mx = _NEG_INF
                for i in range(C):
                    p[i] = alpha8[t, i] if t == L - 1 else alpha8[t, i] + edge[e0 + t * et, i, y]
                    mx = max(mx, p[i])
                for i in range(C):
                    p[i] = _fexp(p[i] - mx) if mx > _NEG_INF else 0.0
                y = _draw(p, Ub[k, t])
                lab[k, t] = y
                if y < 0:
                    lab[k, :] = -1
                    break


# ----------------------------------------------------------------------------- NumPy entry points
def _layout(node: np.ndarray, edge: np.ndarray):
    """``(edge as (N, C, C), eb, et)``: instance b, position t reads row b·eb + t·et."""
    B, T, C = node.shape
    if edge.ndim == 2:
        return edge.reshape(1, C, C), 0, 0
    if edge.ndim == 3:
        return edge.reshape(max(T - 1, 0), C, C), 0, 1
    return edge.reshape(B * max(T - 1, 0), C, C), max(T - 1, 0), 1


def _prepare(node, edge, lengths):
    """Contiguous views, int64 lengths, and the batch-less kernel (see :func:`_global_kernel`)."""
    node = np.ascontiguousarray(node)
    if node.dtype not in (np.float32, np.float64):
        raise TypeError(f"node: expected float32 or float64, got {node.dtype}")
    edge = np.ascontiguousarray(edge, dtype=node.dtype)
    B, T, C = node.shape
    lengths = np.full(B, T, np.int64) if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64)
    e3, eb, et = _layout(node, edge)
    n = e3.shape[0] if eb == 0 else 0
    gK32 = np.empty((n, C, C), np.float32)
    gK64 = np.empty((n, C, C), np.float64)
    gemax = np.zeros(max(n, 1))
    g_er, g_fin = 0.0, True
    if n:
        g_er, g_fin = _global_kernel(e3, node.dtype == np.float32, gK32, gK64, gemax)
    return node, lengths, (e3, eb, et, gK32, gK64, gemax, float(g_er), bool(g_fin), node.dtype == np.float32)


def _chunks(B: int, threads: int) -> list[tuple[int, int]]:
    """``threads`` (at most B, at least 1) contiguous instance ranges of near-equal size."""
    n = max(1, min(int(threads), B))
    return [(B * c // n, B * (c + 1) // n) for c in range(n)]


_POOL: ThreadPoolExecutor | None = None


def run_chunks(kernel, chunks: list[tuple[int, int]], args_for) -> None:
    """Run ``kernel(b0, b1, *args_for(c))`` over the instance ranges ``chunks``: inline for
    one range, else on a shared thread pool (the kernels release the GIL)."""
    global _POOL
    if len(chunks) == 1:
        kernel(chunks[0][0], chunks[0][1], *args_for(0))
        return
    if _POOL is None or _POOL._max_workers < len(chunks):
        _POOL = ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="structgrad-chain")
    futures = [_POOL.submit(kernel, b0, b1, *args_for(c)) for c, (b0, b1) in enumerate(chunks)]
    for f in futures:
        f.result()


def log_partition(node, edge, lengths=None, threads: int = 1) -> np.ndarray:
    """A = log Z per instance, ``(B,)`` float64 (forward pass only)."""
    node, lengths, (e3, eb, et, gK32, gK64, gemax, g_er, g_fin, f32) = _prepare(node, edge, lengths)
    B, T, C = node.shape
    logz = np.empty(B)
    dummy_mu = np.empty((B, 0, 0), node.dtype)  # indexed per instance, never written
    dummy_e = np.empty((0, 0, 0), node.dtype)
    w = np.ones(B)
    run_chunks(
        _lpm_range, _chunks(B, threads),
        lambda c: (node, e3, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, False, w, logz, dummy_mu, dummy_e, 0, 0, 0, False),
    )
    return logz


def log_partition_and_marginals(node, edge, lengths=None, weight=None, threads: int = 1, parallel: str = "threads"):
    """A (B,) float64 and the marginals in ``node``'s dtype, in one fused pass per instance.

    Returns ``(A, mu, emu)``: ``mu (B, T, C)``; ``emu (B, T−1, C, C)`` for per-position
    edges (both layouts) or the expected transition counts ``(B, C, C)`` for a
    ``(C, C)`` edge.  With ``weight (B,)`` (the backward of A, weight = ∂L/∂A):
    ``mu`` and ``emu`` are multiplied by it, and for batch-less edges ``emu`` is
    summed over the batch, so it has the edge's own shape — i.e. the gradients.
    ``parallel``: ``"threads"`` (thread pool) or ``"prange"`` (numba parallel loop).
    """
    node, lengths, (e3, eb, et, gK32, gK64, gemax, g_er, g_fin, f32) = _prepare(node, edge, lengths)
    B, T, C = node.shape
    edge_nd = np.ndim(edge)
    w = np.ones(B) if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    batchless_sum = weight is not None and edge_nd < 4
    chunks = _chunks(B, threads)
    nch = len(chunks)
    if edge_nd == 2:  # transition counts
        rows, ob, ot = (1, 0, 0) if batchless_sum else (B, 1, 0)
    elif batchless_sum:
        rows, ob, ot = T - 1, 0, 1
    else:
        rows, ob, ot = B * (T - 1), T - 1, 1
    acc = edge_nd == 2 or batchless_sum
    copies = nch if batchless_sum else 1  # per-chunk accumulators, summed below
    emu = (np.zeros if acc else np.empty)((copies * rows, C, C), node.dtype)
    mu = np.empty((B, T, C), node.dtype)
    logz = np.empty(B)
    ebases = [c * rows if batchless_sum else 0 for c in range(nch)]
    args = (node, e3, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, True, w, logz, mu, emu)
    if parallel == "prange" and nch > 1:
        _lpm_prange(np.array(chunks, np.int64), *args, np.array(ebases, np.int64), ob, ot, acc)
    else:
        run_chunks(_lpm_range, chunks, lambda c: args + (ebases[c], ob, ot, acc))
    if copies > 1:
        emu = emu.reshape(copies, rows, C, C).sum(0)
    if edge_nd == 2:
        emu = emu.reshape((C, C) if batchless_sum else (B, C, C))
    else:
        emu = emu.reshape((T - 1, C, C) if batchless_sum else (B, T - 1, C, C))
    return logz, mu, emu


def viterbi(node, edge, lengths=None, threads: int = 1) -> np.ndarray:
    """Best labels ``(B, T)`` int64, −1 past the length and for infeasible instances
    (ties: the lowest label, as the torch backend)."""
    node = np.ascontiguousarray(node)
    B, T, C = node.shape
    lengths = np.full(B, T, np.int64) if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64)
    e3, eb, et = _layout(node, np.ascontiguousarray(edge, dtype=node.dtype))
    labels = np.empty((B, T), np.int64)
    run_chunks(_viterbi_range, _chunks(B, threads), lambda c: (node, e3, eb, et, lengths, labels))
    return labels


def sample(node, edge, U, lengths=None, threads: int = 1) -> np.ndarray:
    """Exact samples ``(S, B, T)`` int64 by FFBS from uniforms ``U (S, B, T)`` in [0, 1)
    (−1 past the length; all −1 for infeasible instances)."""
    node, lengths, (e3, eb, et, gK32, gK64, gemax, g_er, g_fin, f32) = _prepare(node, edge, lengths)
    U = np.ascontiguousarray(U, dtype=np.float64)
    B, T, C = node.shape
    labels = np.empty((U.shape[0], B, T), np.int64)
    run_chunks(
        _sample_range, _chunks(B, threads), lambda c: (node, e3, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, U, labels)
    )
    return labels


@_jit
def _paths_kernel(node, edge, eb, et, lengths, g_er, g_fin, f32, out):
    B, T, C = node.shape
    nmax = np.zeros(T)
    emax = np.zeros(max(T - 1, 1))
    K32 = np.empty((0 if eb == 0 else max(T - 1, 0), C, C), np.float32)
    K64 = np.empty((0 if eb == 0 else max(T - 1, 0), C, C), np.float64)
    for b in range(B):
        L = lengths[b]
        out[b] = -1 if L == 0 else _choose_path(node[b], L, edge, b * eb, et, nmax, emax, K32, K64, eb == 0, g_er, g_fin, f32)


def paths(node, edge, lengths=None) -> np.ndarray:
    """The numerical path of each instance (for tests): PATH_LOG, PATH_EXP64, PATH_EXP32, or −1 (L = 0)."""
    node, lengths, (e3, eb, et, _, _, _, g_er, g_fin, f32) = _prepare(node, edge, lengths)
    out = np.empty(node.shape[0], np.int64)
    _paths_kernel(node, e3, eb, et, lengths, g_er, g_fin, f32, out)
    return out


# ----------------------------------------------------------------------------- torch glue
# Zero-copy NumPy views of contiguous CPU tensors; float16/bfloat16 are computed in
# float32 (NumPy has no bfloat16), results returned in θ's dtype.  Batch flattened to B.
def _np(x):
    import torch

    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.contiguous().numpy()


def _t(x, dtype):
    """A NumPy result as a tensor of ``dtype`` (no copy when it already is)."""
    import torch

    t = torch.from_numpy(x)
    return t if t.dtype == dtype else t.to(dtype)


def _np_lengths(lengths, B: int, T: int):
    return None if lengths is None else lengths.detach().to("cpu").reshape(B).numpy().astype(np.int64, copy=False)


def t_log_partition(node, edge, lengths=None, threads: int = 1):
    """torch (B, T, C), edge layout, lengths (B,) or None -> A (B,) in node's dtype."""
    import torch

    B, T, _ = node.shape
    return _t(log_partition(_np(node), _np(edge), _np_lengths(lengths, B, T), threads), node.dtype)


def t_log_partition_and_marginals(node, edge, lengths=None, weight=None, threads: int = 1, parallel: str = "threads"):
    """torch version of :func:`log_partition_and_marginals`: ``(A, mu, emu)`` in node's dtype
    (``weight``: a (B,) tensor, e.g. the incoming gradient of A)."""
    import torch

    B, T, _ = node.shape
    w = None if weight is None else weight.detach().to("cpu", torch.float64).reshape(B).numpy()
    args = (_np(node), _np(edge), _np_lengths(lengths, B, T), w, threads, parallel)
    if parallel == "prange" and threads > 1:
        logz, mu, emu = repin_torch_threads(log_partition_and_marginals, *args)
    else:
        logz, mu, emu = log_partition_and_marginals(*args)
    dt = node.dtype
    return _t(logz, dt), _t(mu, dt), _t(emu, dt)


def t_viterbi(node, edge, lengths=None, threads: int = 1):
    """torch version of :func:`viterbi`: labels (B, T) int64, −1 past the length / infeasible."""
    import torch

    B, T, _ = node.shape
    return torch.from_numpy(viterbi(_np(node), _np(edge), _np_lengths(lengths, B, T), threads))


def t_sample(node, edge, num_samples: int, generator=None, lengths=None, threads: int = 1):
    """torch version of :func:`sample`, uniforms from ``torch.rand(..., generator=generator)``:
    labels (S, B, T) int64."""
    import torch

    B, T, _ = node.shape
    U = torch.rand((num_samples, B, T), generator=generator, dtype=torch.float64)
    return torch.from_numpy(sample(_np(node), _np(edge), U.numpy(), _np_lengths(lengths, B, T), threads))


_REPINNED = False


def repin_torch_threads(fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` (which may launch numba's parallel threading layer for
    the first time) and restore torch's intra-op thread count afterwards: an OpenMP
    threading layer's first launch can change the process-wide OpenMP thread count
    that torch uses.  After the first call this is a plain call."""
    global _REPINNED
    if _REPINNED:
        return fn(*args, **kwargs)
    import torch

    n = torch.get_num_threads()
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(n)
        _REPINNED = True
