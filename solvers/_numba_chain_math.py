"""Small numba kernels shared by the ``chain`` solver's numba backend (private).

Exponentials :func:`_fexp` / :func:`_fexp32` (vectorisable: relative error ≤ 4e-16 /
≤ 2e-7, no branch and no call, unlike libm's scalar exp), :func:`_lse`, the dense C×C
products :func:`_vecmat` / :func:`_matvec` of the probability-space recursions and
:func:`_maxplus` of Viterbi, and scratch-array helpers.  Also the decorators every kernel module uses (``_jit``:
``cache=True, nogil=True``; ``_jit_fm``: the same with the fast-math flags of the
probability-space loops) and ``_NEG_INF``.  Notation and the torch-facing entry points:
:mod:`structgrad.solvers._numba_chain`.

Examples:
    >>> import numpy as np
    >>> from structgrad.solvers import _numba_chain_math as m
    >>> x, out = np.array([0.0, 1.0, -np.inf]), np.empty(3)
    >>> m._fexp_array(x, out)
    >>> out
    array([1.        , 2.71828183, 0.        ])
"""

from __future__ import annotations

import math

import numba
import numpy as np

_NEG_INF = -np.inf
_FM = {"contract", "reassoc", "nsz", "arcp"}  # probability-space loops only (finite values)
_jit = numba.njit(cache=True, nogil=True)
_jit_fm = numba.njit(cache=True, nogil=True, fastmath=_FM)


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


# ----------------------------------------------------------------------------- dense C×C products
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


@_jit
def _maxplus(x, k, out):
    """out[j] = max_i (x[i] + k[i, j]) (−inf if every term is; the first i wins a tie: the
    value is the same).  Eight columns at a time, each column's running maximum in a
    register over all rows: one store per column instead of one load and store per row
    and column (2.5–3.5× the plain loop at C = 16…64)."""
    C = out.shape[0]
    ninf = out.dtype.type(_NEG_INF)
    jb = 0
    while jb + 8 <= C:
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = ninf
        for i in range(C):
            xi = x[i]
            ki = k[i]
            a0 = _max(a0, xi + ki[jb])
            a1 = _max(a1, xi + ki[jb + 1])
            a2 = _max(a2, xi + ki[jb + 2])
            a3 = _max(a3, xi + ki[jb + 3])
            a4 = _max(a4, xi + ki[jb + 4])
            a5 = _max(a5, xi + ki[jb + 5])
            a6 = _max(a6, xi + ki[jb + 6])
            a7 = _max(a7, xi + ki[jb + 7])
        out[jb], out[jb + 1], out[jb + 2], out[jb + 3] = a0, a1, a2, a3
        out[jb + 4], out[jb + 5], out[jb + 6], out[jb + 7] = a4, a5, a6, a7
        jb += 8
    for j in range(jb, C):
        a = ninf
        for i in range(C):
            a = _max(a, x[i] + k[i, j])
        out[j] = a


@numba.njit(cache=True, nogil=True, inline="always")
def _max(a, b):
    """max(a, b) keeping ``a`` unless b is strictly greater (a compare and a select)."""
    return b if b > a else a


# ----------------------------------------------------------------------------- scratch arrays
@_jit
def _zero_rows(a, r0, r1):
    for r in range(r0, r1):
        a[r] = 0.0


@_jit
def _work(T, C, dtype):
    """P, α̂, s, β, U of one thread's exp path, in ``dtype``."""
    return (np.empty((T, C), dtype), np.empty((T, C), dtype), np.empty(T, dtype), np.empty(C, dtype), np.empty((T, C), dtype))
