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
paths.  Every path takes node and transition scores relative to their per-position
maxima (an exact subtraction), as the torch backend; still, the log path's backward
adds exponents as large as the scores, so beyond ~1e15 their cancellation loses the
O(1) parts, as do Viterbi's float64 sums: the solver sends such inputs to the torch
kernels.  Exponentials use :func:`_fexp` / :func:`_fexp32` (vectorisable; relative
error ≤ 4e-16 / ≤ 2e-7), not libm's scalar exp.

Algorithms, per instance of length L (A = log Z):

* forward (probability space): α̃_t = (α̂_{t−1} K_{t−1}) ⊙ P_t, s_t = Σ_j α̃_t[j],
  α̂_t = α̃_t / s_t, with K_t = exp(edge_t − max edge_t), P_t = exp(node_t − max node_t);
  A = Σ_{t<L} (log s_t + max node_t) + Σ_{t<L−1} max edge_t.
* backward: β̂_{L−1} = 1, u = P_{t+1} ⊙ β̂_{t+1} / s_{t+1}, β̂_t = K_t u;
  μ_t = α̂_t ⊙ β̂_t, μ_t[i, j] = α̂_t[i] K_t[i, j] u[j] (one pass over K_t gives both).
* log space: ᾱ_t[j] = logsumexp_i(ᾱ_{t−1}[i] + ē_{t−1}[i, j]) + n̄_t[j] − c_t (ē, n̄: the
  centred scores), and the chain backend's β̄, N_t (re-centred at every step).
* Viterbi: v_t[j] = max_i (v_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] in float64,
  re-centred; back-tracking from the lowest argmax of v_{L−1} recomputes each argmax from
  the same sums (lowest i on ties).
* FFBS: y_{L−1} ~ α̂_{L−1}, y_t ~ α̂_t[i] K_t[i, y_{t+1}] (log space: ᾱ + edge), each by
  inverse CDF of a caller-given uniform (randomness stays with the caller's
  torch.Generator).

Infeasible instances (every labelling −inf): A = −inf, zero marginals, labels −1.
Positions at or past the length get zero marginals and label −1; L = 0 gives A = 0.

Time O(B·T·C²), memory O(T·C²) per thread beyond inputs and outputs.
Multi-core: :func:`run_chunks` splits the batch into ``threads`` contiguous ranges
run by Python threads on the nogil range kernels (see /work/notes/kernels.md for
the measurements behind that choice; ``_lpm_prange`` is the prange alternative).

Modules: this one is the NumPy and torch entry points; the kernels are in
``_numba_chain_math`` (exp, logsumexp, dense products), ``_numba_chain_path``
(statistics, path choice), ``_numba_chain_fb`` (log Z and marginals) and
``_numba_chain_decode`` (Viterbi, sampling).  numba invalidates a cached kernel only
when its own file changes, so after editing a kernel that others call from another file,
delete ``solvers/__pycache__/_numba_chain*.nb*`` (the callers would keep the old code).

Examples:
    >>> import numpy as np
    >>> from structgrad.solvers import _numba_chain as nc
    >>> node, edge = np.zeros((2, 3, 2)), np.zeros((2, 2))
    >>> nc.log_partition(node, edge, np.array([3, 1]))   # log 2^3, log 2
    array([2.07944154, 0.69314718])
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _numba_chain_math as _math
from ._numba_chain_decode import _sample_range, _viterbi_range
from ._numba_chain_fb import _lpm_prange, _lpm_range
from ._numba_chain_path import PATH_EXP32, PATH_EXP64, PATH_LOG, _global_kernel, _paths_kernel

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
    "PATH_LOG",
    "PATH_EXP64",
    "PATH_EXP32",
]

_fexp, _fexp32, _fexp_array = _math._fexp, _math._fexp32, _math._fexp_array  # the exp kernels, for tests


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
