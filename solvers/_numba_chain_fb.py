"""Forward-backward kernels of the ``chain`` solver's numba backend (private): log Z and marginals.

Per instance of length L (notation of :mod:`structgrad.solvers._numba_chain`), on the
path chosen by :func:`._numba_chain_path._choose_path`:

* probability space (:func:`_exp_forward`, :func:`_exp_backward`): Rabiner's scaled
  forward-backward, α̂_t = (α̂_{t−1} K_{t−1}) ⊙ P_t / s_t, then β̂ and the node and
  edge marginals in one pass over each K_t;
* log space (:func:`_log_forward`, :func:`_log_backward`): re-centred float64
  logsumexp recursions (−inf, wide ranges and ±1e30 scores give no inf/NaN), on node
  and transition scores taken relative to their per-position maxima (exact subtractions:
  large offsets keep the O(1) parts up to the 1e15 bound beyond which the solver uses
  the torch kernels).

:func:`_lpm_range` runs instances b0 ≤ b < b1 (one thread of the pool, the kernels
release the GIL); :func:`_lpm_prange` is the numba ``prange`` alternative.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._numba_chain_math import _NEG_INF, _fexp, _jit, _jit_fm, _lse, _matvec, _vecmat, _work, _zero_rows
from ._numba_chain_path import PATH_EXP32, PATH_LOG, _choose_path, _stats_work


# ----------------------------------------------------------------------------- probability space
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
def _log_forward(node, L, nmax, edge, e0, et, emx, es, alpha, c, m, acc):
    """Re-centred log-space forward: ᾱ (logsumexp 0, or all −inf) and c_t, with node scores
    taken relative to their maxima nmax and transition t's scores relative to theirs,
    emx[t·es] (so ±1e30 scores keep the O(1) parts); returns
    A = Σ_t (c_t + nmax_t) + Σ_{t<L−1} emx[t·es], or −inf."""
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
            se = emx[(t - 1) * es]
            logz += se
            for j in range(C):
                m[j] = _NEG_INF
                acc[j] = 0.0
            for i in range(C):
                ai = alpha[t - 1, i]
                if ai > _NEG_INF:
                    for j in range(C):
                        m[j] = max(m[j], ai + (E[i, j] - se))
            for i in range(C):
                ai = alpha[t - 1, i]
                if ai > _NEG_INF:
                    for j in range(C):
                        if m[j] > _NEG_INF:
                            acc[j] += _fexp(ai + (E[i, j] - se) - m[j])
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
def _log_backward(node, L, nmax, edge, e0, et, emx, es, alpha, c, w, mu, emu, e0o, ot, acc, beta, wv, nb, tmp):
    """Re-centred log-space backward with the marginals (instance feasible), on the
    centred transition scores ē_{t−1} = edge_{t−1} − emx[(t−1)·es] of :func:`_log_forward`:
    β̄_{t−1}[i] = logsumexp_j(ē[i, j] + ν_t[j] + β̄_t[j]) − max, ν_t = node_t − nmax_t − c_t,
    μ_t = exp(ᾱ_t + β̄_t − N_t), μ_{t−1}[i, j] = exp(ᾱ_{t−1}[i] + ē[i, j] + ν_t[j] + β̄_t[j] − N_t)."""
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
        se = emx[(t - 1) * es]
        row = emu[e0o + (t - 1) * ot]
        for j in range(C):
            wv[j] = ((node[t, j] - nmax[t]) - c[t]) + beta[j]
        d = _NEG_INF
        for i in range(C):
            mi = _NEG_INF
            for j in range(C):
                mi = max(mi, (E[i, j] - se) + wv[j])
            ai = alpha[t - 1, i]
            scale = w * _fexp(ai + (mi - N)) if (mi > _NEG_INF and ai > _NEG_INF) else 0.0
            sm = 0.0
            for j in range(C):
                e = _fexp((E[i, j] - se) + wv[j] - mi) if mi > _NEG_INF else 0.0
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


# ----------------------------------------------------------------------------- instance ranges
@_jit
def _exp_instance(node_b, L, nmax, P, K, kt, alpha, s, esum, want, w, mu_b, emu, eo, ot, acc, beta, U):
    """Probability-space log Z (+ marginals if ``want``) of one instance, in the work arrays' dtype."""
    lz = _exp_forward(node_b, L, nmax, P, K, 0, kt, alpha, s) + esum
    if want:
        _exp_backward(L, P, K, 0, kt, alpha, s, w, mu_b, emu, eo, ot, acc, beta, U)
    return lz


@_jit
def _lpm_range(b0, b1, node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, want, weight, logz, mu, emu, ebase, ob, ot, acc):
    """log Z (and, if ``want``, marginals) of instances b0 ≤ b < b1.

    ``gK32``/``gK64``: exp(edge − emax) for batch-less layouts (eb = 0; filled by
    :func:`_global_kernel`), ``gemax`` its per-row maxima.  Edge marginals go to emu
    rows ``ebase + b·ob + t·ot``, added when ``acc`` else assigned (rows past the
    length zeroed)."""
    B, T, C = node.shape
    shared = eb == 0
    nmax, emax, K32, K64 = _stats_work(T, C, shared)
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
        emx, es = (gemax, et) if shared else (emax, 1)
        lz = _log_forward(node[b], L, nmax, edge, e0, et, emx, es, alpha8, s8, v1, v2)
        logz[b] = lz
        if not want:
            continue
        if lz == _NEG_INF:
            _zero_rows(mu[b], 0, L)
            if not acc:
                _zero_rows(emu, eo, eo + (L - 1) * ot)
            continue
        _log_backward(node[b], L, nmax, edge, e0, et, emx, es, alpha8, s8, w, mu[b], emu, eo, ot, acc, beta8, v3, v1, v2)


@numba.njit(cache=True, nogil=True, parallel=True)
def _lpm_prange(chunks, node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, want, weight, logz, mu, emu, ebases, ob, ot, acc):
    """:func:`_lpm_range` over the instance ranges ``chunks (n, 2)`` in parallel (prange)."""
    for c in numba.prange(chunks.shape[0]):
        _lpm_range(chunks[c, 0], chunks[c, 1], node, edge, eb, et, lengths, gK32, gK64, gemax, g_er, g_fin, f32, want, weight, logz, mu, emu, ebases[c], ob, ot, acc)
