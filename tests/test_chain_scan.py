"""The chain's log-depth kernels (solvers/_chain_scan.py) against the sequential torch backend and enumeration."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structgrad.solvers import _chain_scan as cs

from _chain_cases import F32, F64, LAYOUTS, REF, brute, close, make, ref_labels

CHAIN = REF
DEV = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


LENGTHS = torch.tensor([6, 4, 1, 0])


@pytest.mark.parametrize("device", DEV)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("scale", [1.0, 200.0])  # exp path (matmul) / log path (exact logsumexp)
def test_matches_sequential(device, layout, dtype, scale):
    node, edge = make(T=6, layout=layout, scale=scale, dtype=dtype)
    assert cs.choose_path(node, edge)[0] == ("exp" if scale == 1 else "log")
    tol = 1e-10 if dtype == F64 else 2e-5
    for lengths in (None, LENGTHS):
        rA, (rmu, remu) = CHAIN.log_partition_and_marginals((node, edge), lengths=lengths)
        n, e = node.to(device), edge.to(device)
        Ld = None if lengths is None else lengths.to(device)
        A, mu, emu = cs.log_partition_and_marginals(n, e, Ld)
        assert A.dtype == mu.dtype == emu.dtype == dtype and A.device.type == device
        close(A, rA, tol)
        close(mu, rmu, tol)
        close(emu, remu, tol)
        close(cs.log_partition(n, e, Ld), rA, tol)
        assert torch.equal(cs.viterbi(n, e, Ld).cpu(), ref_labels(node, edge, lengths))


def test_brute_force_neg_inf_and_infeasible():
    node, edge = make(B=4, T=4, C=3, seed=3)
    edge[0, 1, 0, :] = -math.inf
    node[1, 2, :2] = -math.inf
    edge[2] = -math.inf  # infeasible for L >= 2
    edge[3, :, 1, 1] = -math.inf
    lengths = torch.tensor([4, 4, 3, 1])
    assert cs.choose_path(node, edge)[0] == "log"
    A, mu, emu = cs.log_partition_and_marginals(node, edge, lengths)
    lab = cs.viterbi(node, edge, lengths)
    for b in range(4):
        bz, bmu, bemu, best = brute(node[b], edge[b], int(lengths[b]))
        close(A[b], bz, 1e-12)
        close(mu[b], bmu, 1e-12)
        close(emu[b], bemu, 1e-12)
        if best is None:
            assert (lab[b] == -1).all()
        else:
            assert lab[b, : len(best)].tolist() == list(best) and (lab[b, len(best):] == -1).all()
    assert A[2] == -math.inf and not mu[2].any() and not emu[2].any()


def test_node_neg_inf_on_the_exp_path_has_no_nan_gradient():
    """−inf node scores keep the matmul path; structurally impossible entries give 0, not NaN."""
    node, edge = make(B=2, T=5, C=3, layout="shared", seed=4)
    node[:, 1, 0] = -math.inf
    node[1, 3, 1:] = -math.inf
    assert cs.choose_path(node, edge)[0] == "exp"
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    cs.log_partition(n, e, torch.tensor([5, 4])).sum().backward()
    n2, e2 = node.clone().requires_grad_(), edge.clone().requires_grad_()
    CHAIN.log_partition((n2, e2), lengths=torch.tensor([5, 4])).sum().backward()
    close(n.grad, n2.grad, 1e-12)
    close(e.grad, e2.grad, 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1.0, 200.0])
def test_gradcheck(layout, scale):
    node, edge = make(B=2, T=5, C=2, layout=layout, scale=scale, seed=5)
    if scale > 1:
        node, edge = node / scale * 3, edge.clone()  # log path (−inf edge) with moderate values
        edge.view(-1)[1] = -math.inf
    L = torch.tensor([5, 3])
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    mask = torch.isfinite(edge)

    def f(n_, e_):
        return cs.log_partition(n_, torch.where(mask, e_, edge), L)

    assert torch.autograd.gradcheck(f, (n, e))


def test_viterbi_ties_lowest_label():
    for layout in LAYOUTS:
        node, edge = make(B=3, T=9, C=3, layout=layout, seed=6)
        node, edge = node.round().clamp(-1, 1), edge.round().clamp(-1, 1)
        L = torch.tensor([9, 5, 2])
        assert torch.equal(cs.viterbi(node, edge, L), ref_labels(node, edge, L))
        z = torch.zeros_like(node)
        assert (cs.viterbi(z, torch.zeros_like(edge)) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    node, edge = make(B=2, T=5, C=3, layout="shared", seed=7)
    A, mu, emu = cs.log_partition_and_marginals(node.to(dtype), edge.to(dtype))
    assert A.dtype == mu.dtype == emu.dtype == dtype
    rA = CHAIN.log_partition((node.to(dtype).float(), edge.to(dtype).float()))
    close(A, rA, 1e-2)
    assert cs.viterbi(node.to(dtype), edge.to(dtype)).dtype == torch.long


def test_depth_is_logarithmic(monkeypatch):
    """One batched semiring product per tree level: ⌈log2(T − 1)⌉ of them, whatever T."""
    calls = []
    for name in ("_mm_exp", "_mm_exp_finite", "_mm_log"):
        real = getattr(cs, name)
        monkeypatch.setattr(cs, name, lambda X, Y, real=real: calls.append(X.shape[1]) or real(X, Y))
    node, edge = make(B=2, T=65, C=2, seed=8)
    for lengths in (None, torch.tensor([65, 30])):
        for kw in ({}, {"scale": 200.0}):
            node, edge = make(B=2, T=65, C=2, seed=8, **kw)
            calls.clear()
            cs.log_partition_and_marginals(node, edge, lengths)
            assert calls == [32, 16, 8, 4, 2, 1]


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 12), C=st.integers(1, 5),
    layout=st.sampled_from(LAYOUTS), wide=st.booleans(), seed=st.integers(0, 2**16), data=st.data(),
)
def test_random_shapes_match_sequential(B, T, C, layout, wide, seed, data):
    """Every tree shape (odd levels, padding), both paths, lengths anywhere in [0, T]."""
    node, edge = make(B=B, T=T, C=C, layout=layout, seed=seed, scale=200.0 if wide else 1.0)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    rA, (rmu, remu) = CHAIN.log_partition_and_marginals((node, edge), lengths=lengths)
    A, mu, emu = cs.log_partition_and_marginals(node, edge, lengths)
    close(A, rA, 1e-10)
    close(mu, rmu, 1e-9)
    close(emu, remu, 1e-9)
    assert torch.equal(cs.viterbi(node, edge, lengths), ref_labels(node, edge, lengths))
