"""``chain`` under interface v2: integer dtypes of ``lengths``, refused second
derivatives, and huge finite scores against enumeration (issue 8)."""

from __future__ import annotations

import pytest
import torch

import structgrad as sg
from structgrad.logspace import safe_dot
from structgrad.testing import BruteForce

from _chain_cases import chain_enum

CHAIN = sg.get_solver("chain")
F64 = torch.float64
MODES = ("full", "positional", "shared")


def uniform(shape, scale, g, dtype=F64):
    """Scores uniform in [−scale, scale] (drawn in float64, then cast)."""
    return ((torch.rand(shape, generator=g, dtype=F64) * 2 - 1) * scale).to(dtype)


def make(B, T, C, mode, scale, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    node = uniform((B, T, C), scale, g, dtype)
    eshape = {"full": (B, T - 1, C, C), "positional": (T - 1, C, C), "shared": (C, C)}[mode]
    return node, uniform(eshape, scale, g, dtype)


def score_of(z, theta):
    """⟨z, θ⟩ per instance (a shared edge broadcast over the batch; 0·(−inf) = 0)."""
    (zn, ze), (n, e) = z, theta
    return safe_dot(zn.double(), n.double(), 2) + safe_dot(ze.double(), e.double().expand_as(ze), ze.dim() - 1)


# ----------------------------------------------------------------------------- lengths dtypes
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_lengths_any_integer_dtype(dtype):
    theta = make(3, 5, 3, "shared", 1.0, 0)
    ref = torch.tensor([5, 2, 0])
    lengths = ref.to(dtype)
    want_z = CHAIN.log_partition(theta, lengths=ref)
    torch.testing.assert_close(CHAIN.log_partition(theta, lengths=lengths), want_z)
    for a, b in zip(CHAIN.marginals(theta, lengths=lengths), CHAIN.marginals(theta, lengths=ref)):
        torch.testing.assert_close(a, b)
    for a, b in zip(CHAIN.map(theta, lengths=lengths), CHAIN.map(theta, lengths=ref)):
        assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for a, b in zip(CHAIN.sample(theta, 4, g1, lengths=lengths), CHAIN.sample(theta, 4, g2, lengths=ref)):
        assert torch.equal(a, b)
    gold = sg.chain_indicators(torch.zeros(3, 5, dtype=torch.long), 3, ref, shared_edge=True, dtype=F64)
    torch.testing.assert_close(sg.nll(theta, gold, CHAIN, lengths=lengths), sg.nll(theta, gold, CHAIN, lengths=ref))
    assert lengths.dtype == dtype  # the caller's tensor is untouched


def test_lengths_out_of_range_in_a_small_dtype_and_validate_off():
    theta = make(2, 4, 3, "full", 1.0, 1)
    with pytest.raises(sg.DomainError, match=r"lengths: expected values in \[0, 4\].*max 200"):
        CHAIN.log_partition(theta, lengths=torch.tensor([200, 1], dtype=torch.uint8))
    with pytest.raises(sg.DomainError, match="min -3"):
        CHAIN.marginals(theta, lengths=torch.tensor([-3, 1], dtype=torch.int8))
    with pytest.raises(sg.DTypeError, match="lengths: expected an integer tensor, got dtype torch.bool"):
        CHAIN.map(theta, lengths=torch.tensor([True, False]))
    fast = sg.get_solver("chain", validate=False)  # no value check, same answers for valid input
    lengths = torch.tensor([4, 2], dtype=torch.int16)
    torch.testing.assert_close(fast.log_partition(theta, lengths=lengths), CHAIN.log_partition(theta, lengths=lengths))


def test_unknown_keyword_is_named():
    theta = make(2, 4, 3, "full", 1.0, 2)
    with pytest.raises(sg.UnknownArgumentError, match=r"'chain'.*'length'.*accepts: lengths"):
        CHAIN.marginals(theta, length=torch.tensor([4, 2]))
    assert CHAIN.call_kwargs == CHAIN.batched_kwargs == ("lengths",)


# ----------------------------------------------------------------------------- second derivatives
@pytest.mark.parametrize("mode", MODES)
def test_create_graph_raises_capability_error(mode):
    node, edge = make(2, 4, 3, mode, 1.0, 3)
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    with pytest.raises(sg.CapabilityError, match=r"second derivatives of the chain log-partition are not available"):
        torch.autograd.grad(CHAIN.log_partition((n, e), lengths=torch.tensor([4, 2])).sum(), (n, e), create_graph=True)
    gold = sg.chain_indicators(torch.zeros(2, 4, dtype=torch.long), 3, shared_edge=mode == "shared", dtype=F64)
    if mode == "positional":
        gold = (gold[0], gold[1])
    with pytest.raises(sg.CapabilityError, match=r"second derivatives of nll.*differentiable_marginals=False"):
        torch.autograd.grad(sg.nll((n, e), gold, CHAIN).sum(), (n, e), create_graph=True)
    # gradgradcheck does not silently pass with a zero Hessian
    with pytest.raises(NotImplementedError):
        torch.autograd.gradgradcheck(lambda a, b: CHAIN.log_partition((a, b)), (n, e))


# ----------------------------------------------------------------------------- huge finite scores
CASES = [(F64, 1e30), (F64, 1e300), (torch.float32, 1e4), (torch.float32, 1e30)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,scale", CASES, ids=[f"{d}-{s:g}".replace("torch.", "") for d, s in CASES])
def test_huge_scores_match_enumeration(dtype, scale, mode):
    """No NaN or inf anywhere; marginals (and transition counts) equal enumeration's,
    which for such scores is the indicator of the best labelling; the MAP is that labelling."""
    node, edge = make(3, 4, 3, mode, scale, 7, dtype)
    node[1, 2, 0] = float("-inf")  # a forbidden label
    edge.view(-1)[1] = float("-inf")  # a forbidden transition
    lengths = torch.tensor([4, 3, 1])
    theta64 = (node.double(), edge.double())
    oracle = BruteForce(CHAIN, chain_enum(mode == "shared"))
    ref_n, ref_e = oracle.marginals(theta64, lengths=lengths)
    ref_z = oracle.log_partition(theta64, lengths=lengths)

    lz, (mu_n, mu_e) = CHAIN.log_partition_and_marginals((node, edge), lengths=lengths)
    for x in (lz, mu_n, mu_e):
        assert x.dtype == dtype and torch.isfinite(x).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(mu_n.double(), ref_n, atol=tol, rtol=0)
    torch.testing.assert_close(mu_e.double(), ref_e, atol=tol * 4, rtol=0)
    point_mass = bool(((ref_n == 0) | (ref_n == 1)).all())
    assert point_mass or scale < 1e30  # at ±1e30 the answer is determined: the best labelling
    if point_mass:
        assert torch.equal(mu_n.double(), ref_n) and torch.equal(mu_e.double(), ref_e)
    torch.testing.assert_close(lz.double(), ref_z, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    assert torch.equal(CHAIN.marginals((node, edge), lengths=lengths)[1], mu_e)

    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    CHAIN.log_partition((n, e), lengths=lengths).sum().backward()
    assert torch.isfinite(n.grad).all() and torch.isfinite(e.grad).all()
    torch.testing.assert_close(n.grad.double(), ref_n, atol=tol, rtol=0)
    torch.testing.assert_close(e.grad.double(), ref_e.sum(0) if mode != "full" else ref_e, atol=tol * 12, rtol=0)

    z = CHAIN.map((node, edge), lengths=lengths)
    torch.testing.assert_close(score_of(z, theta64), oracle.map_value(theta64, lengths=lengths), rtol=1e-12, atol=0)
    if point_mass:
        assert torch.equal(z[0].double(), ref_n) and torch.equal(z[1].double(), ref_e)
        s = CHAIN.sample((node, edge), 5, generator=torch.Generator().manual_seed(0), lengths=lengths)
        assert torch.equal(s[0].double(), ref_n.expand_as(s[0]))


@pytest.mark.parametrize("mode", MODES)
def test_near_float64_max_no_nan(mode):
    """Scores near the largest float64: finite marginals that sum to 1 per position."""
    node, edge = make(2, 6, 3, mode, 1e307, 11)
    lz, (mu_n, mu_e) = CHAIN.log_partition_and_marginals((node, edge))
    assert torch.isfinite(mu_n).all() and torch.isfinite(mu_e).all() and not torch.isnan(lz).any()
    torch.testing.assert_close(mu_n.sum(-1), torch.ones(2, 6, dtype=F64))
    z = CHAIN.map((node, edge))
    assert torch.equal(z[0].sum(-1), torch.ones(2, 6, dtype=F64))
    assert torch.equal(z[0], mu_n)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_huge_tied_scores_keep_the_small_differences(dtype):
    """Huge equal edge scores on the diagonal and O(1) node scores: the labellings that
    tie on the huge part are weighted by the small part exactly (no rescaling tricks)."""
    C, T = 3, 4
    big = 1e30 if dtype == torch.float32 else 1e300
    edge = torch.full((C, C), -big, dtype=dtype)
    edge.fill_diagonal_(big)
    node = torch.randn(2, T, C, generator=torch.Generator().manual_seed(5), dtype=F64).to(dtype)
    mu_n, mu_e = CHAIN.marginals((node, edge))
    # only constant labellings survive: p(y ≡ c) ∝ exp(Σ_t node[t, c])
    p = torch.softmax(node.double().sum(1), -1)  # (2, C)
    torch.testing.assert_close(mu_n.double(), p.unsqueeze(1).expand(2, T, C), atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    torch.testing.assert_close(mu_e.double(), torch.diag_embed(p) * (T - 1), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
