"""Per-instance statistics and numerical path of the ``chain`` solver's numba kernels (private).

The rule (:mod:`structgrad.solvers._numba_chain`): *probability space* when every
transition score is finite, every position has a possible label and R = (edge range) +
(finite node range) ≤ 300 (PATH_EXP64); float32 inputs with R ≤ 32 run it in float32
arithmetic (PATH_EXP32); otherwise *re-centred log space* (PATH_LOG).  While the
statistics are taken, exp(edge − max) is filled into the K arrays that the
probability-space kernels read (per instance, or once for batch-less edges by
:func:`_global_kernel`).
"""

from __future__ import annotations

import numpy as np

from ._numba_chain_math import _NEG_INF, _fexp, _fexp32, _jit

_EXP_RANGE = 300.0  # R bound of the probability-space path (float64 recursion)
_F32_RANGE = 32.0  # float32 inputs: float32 arithmetic below this R (the torch backend's float32 bound)

PATH_LOG, PATH_EXP64, PATH_EXP32 = 0, 1, 2  # codes of ``_numba_chain.paths``


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


@_jit
def _stats_work(T, C, shared):
    """One thread's arrays for :func:`_choose_path`: nmax (T,), emax (T−1,), and the per-instance
    kernels K32, K64 (T−1, C, C) (empty for batch-less edges, whose kernels are global)."""
    nK = 0 if shared else max(T - 1, 0)
    return np.zeros(T), np.zeros(max(T - 1, 1)), np.empty((nK, C, C), np.float32), np.empty((nK, C, C), np.float64)


@_jit
def _paths_kernel(node, edge, eb, et, lengths, g_er, g_fin, f32, out):
    """out[b] = the path of instance b (PATH_*; −1 for L = 0), for ``_numba_chain.paths``."""
    B, T, C = node.shape
    nmax, emax, K32, K64 = _stats_work(T, C, eb == 0)
    for b in range(B):
        L = lengths[b]
        out[b] = -1 if L == 0 else _choose_path(node[b], L, edge, b * eb, et, nmax, emax, K32, K64, eb == 0, g_er, g_fin, f32)
