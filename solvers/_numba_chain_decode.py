"""Viterbi and sampling kernels of the ``chain`` solver's numba backend (private).

* Viterbi (:func:`_viterbi_range`): v_t[j] = max_i (v_{t−1}[i] + edge[i, j]) + node_t[j],
  back-tracking from the lowest argmax of v_{L−1} (lowest i on ties), as the torch backend.
* FFBS (:func:`_sample_range`): the forward pass of :mod:`._numba_chain_fb`, then
  y_{L−1} ~ α̂_{L−1}, y_t ~ α̂_t[i] K_t[i, y_{t+1}] (log space: ᾱ + edge), each by inverse
  CDF of a caller-given uniform (randomness stays with the caller's torch.Generator).

Positions past the length get label −1; infeasible instances all −1.  Notation and the
torch-facing entry points: :mod:`structgrad.solvers._numba_chain`.
"""

from __future__ import annotations

import numpy as np

from ._numba_chain_fb import _exp_forward, _log_forward
from ._numba_chain_math import _NEG_INF, _fexp, _jit, _maxplus, _work
from ._numba_chain_path import PATH_EXP32, PATH_EXP64, _choose_path, _stats_work


# ----------------------------------------------------------------------------- Viterbi and sampling
@_jit
def _viterbi_range(b0, b1, node, edge, eb, et, lengths, labels):
    """Best labels of instances b0 ≤ b < b1 (−1 past the length and for infeasible instances).

    Forward v_t[j] = max_i (v_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] without back-pointers
    (:func:`._numba_chain_math._maxplus`), in float64 (float32 scores are exact there, so
    the sums keep O(1) differences next to offsets up to the solver's 1e15 bound), re-centred
    at every step (max_j v_t[j] = 0: the shift is the same for every labelling); back-tracking
    recomputes y_t = argmax_i (v_t[i] + edge_t[i, y_{t+1}]) from the very same sums (lowest
    i on ties), as the torch backend does on the CPU."""
    B, T, C = node.shape
    v = np.empty((T, C))
    shared = eb == 0
    gE = np.empty((edge.shape[0] if shared else 0, C, C))  # batch-less edges, in float64 once
    for r in range(gE.shape[0]):
        for i in range(C):
            for j in range(C):
                gE[r, i, j] = edge[r, i, j]
    for b in range(b0, b1):
        L = lengths[b]
        for t in range(T):
            labels[b, t] = -1
        if L == 0:
            continue
        for j in range(C):
            v[0, j] = node[b, 0, j]
        for t in range(1, L):
            m = v[t]
            r = b * eb + (t - 1) * et
            if shared:
                _maxplus(v[t - 1], gE[r], m)
            else:
                _maxplus(v[t - 1], edge[r], m)
            top = _NEG_INF
            for j in range(C):
                m[j] += node[b, t, j]
                top = max(top, m[j])
            if top > _NEG_INF:  # re-centre: v_t stays O(score range) whatever the length
                for j in range(C):
                    m[j] -= top
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
    nmax, emax, K32, K64 = _stats_work(T, C, shared)
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
        emx, es = (gemax, et) if shared else (emax, 1)
        if _log_forward(node[b], L, nmax, edge, e0, et, emx, es, alpha8, s8, v1, v2) == _NEG_INF:
            continue
        for k in range(U.shape[0]):  # log space: y_t ~ exp(ᾱ_t + edge_t[:, y_{t+1}] − max)
            y = -1
            for t in range(L - 1, -1, -1):
                mx = _NEG_INF
                for i in range(C):
                    p[i] = alpha8[t, i] if t == L - 1 else alpha8[t, i] + (edge[e0 + t * et, i, y] - emx[t * es])
                    mx = max(mx, p[i])
                for i in range(C):
                    p[i] = _fexp(p[i] - mx) if mx > _NEG_INF else 0.0
                y = _draw(p, Ub[k, t])
                lab[k, t] = y
                if y < 0:
                    lab[k, :] = -1
                    break
