"""Shared helpers of the chain tests (not a test module): random chains in the three edge
layouts, the torch backend as reference, a tolerance check that also compares infinities,
and enumeration."""

from __future__ import annotations

import itertools
import math

import torch

import structgrad as sg
from structgrad.testing import labeling_structures

F64, F32 = torch.float64, torch.float32
LAYOUTS = ("full", "positional", "shared")
#: the sequential reference; the default backend ("auto") is numba on the CPU and the scan
#: on CUDA, i.e. the kernels under test
REF = sg.get_solver("chain", backend="torch")


def make(B=4, T=5, C=3, layout="full", scale=1.0, seed=0, dtype=F64):
    """node (B, T, C) and an edge of the layout: ``full`` (B, T−1, C, C), ``positional``
    (T−1, C, C) or ``shared`` (C, C); standard normal × ``scale``, drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    node = (torch.randn(B, T, C, generator=g, dtype=F64) * scale).to(dtype)
    shape = {"full": (B, T - 1, C, C), "positional": (T - 1, C, C), "shared": (C, C)}[layout]
    edge = (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)
    return node, edge


def close(a, b, tol):
    """a ≈ b: same shape, no NaN in a, the same infinities, and |a − b| ≤ tol·(1 + max |b|)
    over b's finite entries (any device, dtype or array-like)."""
    a, b = torch.as_tensor(a).detach().double().cpu(), torch.as_tensor(b).detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert not bool(torch.isnan(a).any())
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)])
    fin = torch.isfinite(b)
    if bool(fin.any()):
        err = float((a[fin] - b[fin]).abs().max())
        assert err <= tol * (1 + float(b[fin].abs().max())), err


def ref_labels(node, edge, lengths):
    """The torch backend's Viterbi labels (B, T), −1 past the lengths."""
    return sg.chain_labels(REF.map((node, edge), lengths=lengths)[0])


def brute(node, edge, L):
    """log Z, node and edge marginals and the best labelling of one instance (node (T, C),
    edge (T−1, C, C) or (C, C)) of length L by enumeration (best None if infeasible)."""
    T, C = node.shape
    labs = list(itertools.product(range(C), repeat=L))
    E = edge if edge.dim() == 3 else edge.expand(max(T - 1, 0), C, C)
    s = torch.tensor([float(sum(node[t, y[t]] for t in range(L)) + sum(E[t, y[t], y[t + 1]] for t in range(L - 1))) for y in labs], dtype=F64)
    logz = torch.logsumexp(s, 0)
    p = torch.exp(s - logz) if math.isfinite(logz) else torch.zeros_like(s)
    mu, emu = torch.zeros(T, C, dtype=F64), torch.zeros(max(T - 1, 0), C, C, dtype=F64)
    for w, y in zip(p, labs):
        for t in range(L):
            mu[t, y[t]] += w
        for t in range(L - 1):
            emu[t, y[t], y[t + 1]] += w
    best = labs[int(torch.argmax(s))] if math.isfinite(logz) else None
    return logz, mu, emu, best


def chain_enum(shared: bool):
    """The enumerator ``(θ, lengths=None) -> structures`` of a chain instance, for
    :class:`structgrad.testing.BruteForce` / ``Case``."""

    def enumerate_(theta, lengths=None):
        node, _ = theta
        T, C = node.shape
        L = T if lengths is None else int(lengths)
        return labeling_structures(T, C, [(t, t + 1) for t in range(T - 1)], active=L, shared_edge=shared)

    return enumerate_
