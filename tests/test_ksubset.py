"""Tests of the ``ksubset`` solver (exactly-k binary vectors)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.errors import DeviceError, DomainError, DTypeError, ShapeError
from structgrad.testing import BruteForce, Case, check_solver, subset_structures
from structgrad.solvers import _ksubset_sampling as kss
from structgrad.solvers import ksubset as ks
from structgrad.solvers.ksubset import KSubsetSolver

INF = math.inf
CUDA = torch.cuda.is_available()

# (backend, schedule, sampler): every code path of the solver
CONFIGS = [
    ("torch", "rows", "auto"),
    ("torch", "rows", "sequential"),
    ("torch", "columns", "rejection"),
    ("torch", "columns", "sequential"),
    ("numba", "auto", "sequential"),
    ("numba", "auto", "rejection"),
]
CONFIG_IDS = ["-".join(c) for c in CONFIGS]


def _solver(k: int, config: tuple[str, str, str]) -> KSubsetSolver:
    backend, schedule, sampler = config
    return sg.get_solver("ksubset", k=k, backend=backend, schedule=schedule, sampler=sampler)


def _enum(k: int):
    return lambda th: subset_structures(th.shape[-1], k)


def _theta(shape, seed, *, neg_inf=(), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    th = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    for idx in neg_inf:
        th[idx] = -INF
    return th


def _brute(theta: torch.Tensor, k: int):
    """(A, μ) by enumeration for a (*b, n) float64 θ."""
    oracle = BruteForce(KSubsetSolver(k), _enum(k))
    return oracle.log_partition(theta), oracle.marginals(theta)


# ----------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_check_solver_conformance(config):
    """Oracle, gradients, dtypes, devices, χ² sample frequencies over k, -inf and batch shapes."""
    cases = []
    # batch () ; k = 0, 1, 2, n-1, n
    for k in (0, 1, 2, 5, 6):
        cases.append((k, Case(_theta((6,), 10 + k), _enum(k), name=f"n6-k{k}-batch()")))
    # batch (3,) with -inf entries; instance 2 has only 2 possible elements (infeasible for k = 3)
    th = _theta((3, 7), 1, neg_inf=[(0, 1), (1, 0), (1, 6), (2, slice(0, 5))])
    cases.append((3, Case(th, _enum(3), name="n7-k3-batch(3,)-neginf")))
    # batch (2, 3), finite, larger spread
    cases.append((2, Case(_theta((2, 3, 5), 2, scale=3.0), _enum(2), name="n5-k2-batch(2,3)")))
    cases.append((4, Case(_theta((2, 3, 8), 3), _enum(4), name="n8-k4-batch(2,3)")))
    for k, case in cases:
        ran = check_solver(_solver(k, config), [case], num_samples=2000)
        assert ran["log_partition_oracle"] >= 1 and ran["marginals_oracle"] >= 1
        assert ran["sample_frequencies"] >= 1 and ran["map_feasible_optimal"] >= 1


def test_check_solver_n10_all_k():
    """n = 10 (the largest enumerated size), every k, default solver."""
    for k in range(0, 11):
        th = _theta((2, 10), 100 + k, neg_inf=[(1, 3)] if k < 10 else [])
        check_solver(sg.get_solver("ksubset", k=k), [Case(th, _enum(k), name=f"n10-k{k}")], num_samples=1500)


def test_check_solver_bad_inputs():
    s = sg.get_solver("ksubset", k=3)
    th = torch.zeros(2, 5)
    bad = [
        (lambda sv: sv.marginals(torch.zeros(2, 2)), DomainError, r"k: expected 0 <= k <= n.*n = 2.*k = 3"),
        (lambda sv: sv.log_partition(torch.tensor([0.0, float("nan"), 0.0, 0.0])), DomainError, r"theta:.*1 NaN"),
        (lambda sv: sv.map(torch.tensor([0.0, INF, 0.0, 0.0])), DomainError, r"theta:.*1 \+inf"),
        (lambda sv: sv.sample(th, 0), DomainError, r"num_samples"),
        (lambda sv: sv.sample(th, 2, generator=3), DTypeError, r"generator"),
        (lambda sv: sv.log_partition(torch.tensor(1.0)), ShapeError, r"theta: expected at least 1 dimensions"),
    ]
    check_solver(s, [Case(th.double(), _enum(3))], bad_inputs=bad, num_samples=500)


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("schedule", ["rows", "columns"])
def test_log_partition_at_zero_is_log_binomial(schedule):
    s_by_k = {}
    for n, k in [(1, 0), (1, 1), (7, 3), (30, 15), (200, 7), (200, 193), (500, 250)]:
        s = s_by_k.setdefault(k, KSubsetSolver(k, schedule=schedule))
        got = s.log_partition(torch.zeros(2, n, dtype=torch.float64))
        want = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        assert torch.allclose(got, torch.full((2,), want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        mu = s.marginals(torch.zeros(n, dtype=torch.float64))
        assert torch.allclose(mu, torch.full((n,), k / n, dtype=torch.float64), atol=1e-12)


def test_numba_log_binomial():
    s = KSubsetSolver(40, backend="numba")
    got = s.log_partition(torch.zeros(3, 100, dtype=torch.float64))
    want = math.lgamma(101) - math.lgamma(41) - math.lgamma(61)
    assert torch.allclose(got, torch.full((3,), want, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_k_zero_and_k_n(backend):
    th = _theta((3, 6), 5)
    th_req = th.clone().requires_grad_(True)
    s0 = KSubsetSolver(0, backend=backend)
    a0 = s0.log_partition(th_req)
    assert torch.equal(a0, torch.zeros(3, dtype=torch.float64))
    a0.sum().backward()
    assert torch.equal(th_req.grad, torch.zeros_like(th))
    assert torch.equal(s0.marginals(th), torch.zeros_like(th))
    assert torch.equal(s0.map(th), torch.zeros_like(th))
    assert torch.equal(s0.sample(th, 4), torch.zeros(4, 3, 6, dtype=torch.float64))
    sn = KSubsetSolver(6, backend=backend)
    assert torch.allclose(sn.log_partition(th), th.sum(-1), atol=1e-12)
    assert torch.allclose(sn.marginals(th), torch.ones_like(th), atol=1e-12)
    assert torch.equal(sn.map(th), torch.ones_like(th))
    assert torch.equal(sn.sample(th, 4), torch.ones(4, 3, 6, dtype=torch.float64))


def test_empty_shapes():
    s = KSubsetSolver(0)
    assert s.log_partition(torch.zeros(3, 0)).shape == (3,)
    assert torch.equal(s.log_partition(torch.zeros(3, 0)), torch.zeros(3))
    assert s.marginals(torch.zeros(0, 5)).shape == (0, 5)
    s2 = KSubsetSolver(2)
    assert s2.log_partition(torch.zeros(0, 5)).shape == (0,)
    assert s2.marginals(torch.zeros(0, 5)).shape == (0, 5)
    assert s2.map(torch.zeros(0, 5)).shape == (0, 5)
    assert s2.sample(torch.zeros(0, 5), 3).shape == (3, 0, 5)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_infeasible_instance(backend):
    """Fewer than k possible elements: A = -inf, μ = MAP = samples = 0, gradients 0 (no NaN)."""
    s = KSubsetSolver(3, backend=backend)
    th = torch.tensor([[0.5, -INF, 1.0, -INF, -INF], [0.1, 0.2, 0.3, -INF, 0.4]], dtype=torch.float64)
    a = s.log_partition(th)
    assert a[0] == -INF and torch.isfinite(a[1])
    x = th.clone().requires_grad_(True)
    s.log_partition(x).sum().backward()
    assert not torch.isnan(x.grad).any()
    assert torch.equal(x.grad[0], torch.zeros(5, dtype=torch.float64))
    mu = s.marginals(th)
    assert torch.equal(mu[0], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(s.map(th)[0], torch.zeros(5, dtype=torch.float64))
    smp = s.sample(th, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(smp[:, 0], torch.zeros(50, 5, dtype=torch.float64))
    assert torch.equal(smp[:, 1].sum(-1), torch.full((50,), 3.0, dtype=torch.float64))
    assert torch.equal(smp[:, 1, 3], torch.zeros(50, dtype=torch.float64))
    # double backward through the infeasible row is NaN-free as well
    x = th.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s.log_partition(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * torch.arange(5.0, dtype=torch.float64)).sum(), x)
    assert not torch.isnan(h).any() and torch.equal(h[0], torch.zeros(5, dtype=torch.float64))


def test_map_top_k_ties_lowest_index():
    s = KSubsetSolver(2)
    th = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [-INF, 1.0, -INF, 1.0, 1.0]])
    want = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.float32)
    assert torch.equal(s.map(th), want)
    big = torch.zeros(3000)
    z = KSubsetSolver(5).map(big)
    assert torch.equal(z.nonzero().flatten(), torch.arange(5))


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("schedule", ["rows", "columns"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_hessian_is_covariance(schedule, backend):
    """Double backward of A and backward of μ give Cov_p(z), checked against enumeration."""
    n, k = 6, 3
    th = _theta((3, n), 7, neg_inf=[(1, 2), (2, slice(0, 4))])  # row 2 infeasible
    Z = torch.stack(subset_structures(n, k))
    want = []
    for b in range(3):
        sc = (Z * torch.where(Z > 0, th[b], torch.zeros(()))).sum(-1)
        if bool(torch.isinf(sc).all()):
            want.append(torch.zeros(n, n, dtype=torch.float64))
            continue
        p = torch.softmax(sc, 0)
        mu = p @ Z
        want.append((Z.t() * p) @ Z - torch.outer(mu, mu))
    want = torch.stack(want)
    s = KSubsetSolver(k, backend=backend, schedule=schedule)
    x = th.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s.log_partition(x).sum(), x, create_graph=True)
    h_logz = torch.stack([torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0] for i in range(n)], 1)
    mu = s.marginals(x)
    h_mu = torch.stack([torch.autograd.grad(mu[:, i].sum(), x, retain_graph=True)[0] for i in range(n)], 1)
    assert torch.allclose(h_logz, want, atol=1e-12)
    assert torch.allclose(h_mu, want, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_gradcheck_and_gradgradcheck(backend):
    s = KSubsetSolver(3, backend=backend)
    x = _theta((2, 7), 8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: s.log_partition(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: s.log_partition(t), (x,))
    assert torch.autograd.gradcheck(lambda t: s.marginals(t), (x,))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_outputs_modified_in_place_do_not_break_backward(backend):
    s = KSubsetSolver(2, backend=backend)
    th = _theta((3, 5), 13)
    x = th.clone().requires_grad_(True)
    a = s.log_partition(x)
    a.mul_(1.0)  # modifying the output must not touch what backward needs
    a.sum().backward()
    assert torch.allclose(x.grad, s.marginals(th), atol=1e-12)
    x = th.clone().requires_grad_(True)
    v = torch.linspace(-1.0, 2.0, 5, dtype=th.dtype)
    (ref,) = torch.autograd.grad((s.marginals(x) * v).sum(), x)  # Cov(z)·v
    mu2 = s.marginals(x)
    mu2.mul_(1.0)  # an in-place change of the output after the call
    (g,) = torch.autograd.grad((mu2 * v).sum(), x)
    assert torch.allclose(g, ref, atol=1e-12) and ref.abs().max() > 1e-3


def test_third_derivative_raises():
    """Third derivatives are not implemented: an error, never a silent zero."""
    s = KSubsetSolver(2)
    x = _theta((5,), 9).requires_grad_(True)
    w = torch.arange(5.0, dtype=torch.float64, requires_grad=True)
    mu = s.marginals(x)
    (h,) = torch.autograd.grad((mu * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(h.sum(), x)
    (h,) = torch.autograd.grad((mu * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        h.sum().backward()


def test_nll_gradient_is_marginals_minus_gold():
    s = sg.get_solver("ksubset", k=2)
    th = _theta((4, 6), 11).requires_grad_(True)
    gold = torch.zeros(4, 6, dtype=torch.float64)
    gold[:, 0] = 1
    gold[:, 3] = 1
    loss = sg.nll(th, gold, s)
    a, mu = _brute(th.detach(), 2)
    assert torch.allclose(loss, a - th.detach()[:, [0, 3]].sum(-1), atol=1e-12)
    loss.sum().backward()
    assert torch.allclose(th.grad, mu - gold, atol=1e-12)


# ----------------------------------------------------------------------------- properties
@st.composite
def _instances(draw):
    n = draw(st.integers(1, 8))
    k = draw(st.integers(0, n))
    batch = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 300.0]))
    seed = draw(st.integers(0, 2**16))
    th = _theta(batch + (n,), seed, scale=scale)
    mask = torch.rand(th.shape, generator=torch.Generator().manual_seed(seed + 1)) < draw(st.sampled_from([0.0, 0.3]))
    th = torch.where(mask, torch.full_like(th, -INF), th)
    return th, k


@settings(max_examples=25, deadline=None)
@given(_instances(), st.sampled_from(CONFIGS))
def test_property_against_enumeration(inst, config):
    th, k = inst
    s = _solver(k, config)
    a_ref, mu_ref = _brute(th, k)
    a, mu = s.log_partition_and_marginals(th)
    finite = torch.isfinite(a_ref)
    assert torch.equal(torch.isfinite(a), finite)
    assert torch.allclose(a[finite], a_ref[finite], rtol=1e-11, atol=1e-9)
    assert torch.allclose(mu, mu_ref, atol=1e-9)
    assert bool(((mu >= 0) & (mu <= 1 + 1e-12)).all())
    assert torch.allclose(mu.sum(-1), torch.where(finite, float(k), 0.0).to(mu.dtype), atol=1e-9)
    # MAP is feasible and optimal where feasible
    z = s.map(th)
    assert torch.equal(z.sum(-1), torch.where(finite, float(k), 0.0).to(z.dtype))
    val = torch.where(z > 0, th, torch.zeros_like(th)).sum(-1)
    best = BruteForce(KSubsetSolver(k), _enum(k)).map_value(th)
    assert torch.allclose(val[finite], best[finite], atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 40),
    st.data(),
    st.floats(-50.0, 50.0),
    st.integers(0, 2**16),
)
def test_property_shift_and_complement(n, data, c, seed):
    """A(θ + c) = A(θ) + k c; A(θ; k) = Σθ + A(−θ; n − k); μ(θ; k) = 1 − μ(−θ; n − k); schedules agree."""
    k = data.draw(st.integers(0, n))
    th = _theta((3, n), seed, scale=5.0)
    rows, cols = KSubsetSolver(k, schedule="rows"), KSubsetSolver(k, schedule="columns")
    comp = KSubsetSolver(n - k)
    a, mu = rows.log_partition_and_marginals(th)
    a2, mu2 = cols.log_partition_and_marginals(th)
    assert torch.allclose(a, a2, rtol=1e-12, atol=1e-10) and torch.allclose(mu, mu2, atol=1e-10)
    assert torch.allclose(rows.log_partition(th + c), a + k * c, rtol=1e-11, atol=1e-9)
    ac, muc = comp.log_partition_and_marginals(-th)
    assert torch.allclose(a, th.sum(-1) + ac, rtol=1e-11, atol=1e-9)
    assert torch.allclose(mu, 1 - muc, atol=1e-10)


# ----------------------------------------------------------------------------- float32, large n
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_float32_large_scores(backend):
    """n = 2000, k = 100, scores ±1e4 in float32: finite, accurate, Σμ = k, finite gradients."""
    g = torch.Generator().manual_seed(3)
    th = (torch.rand(4, 2000, generator=g) * 2 - 1) * 1e4
    th[0] = th[0].abs() * torch.where(torch.arange(2000) % 20 == 7, 1.0, -1.0)  # 100 positive, 1900 negative
    th[1, :1000] = 1e4  # many ties at the top
    th[2, ::3] = -INF
    th = th.float()
    s = KSubsetSolver(100, backend=backend)
    x = th.clone().requires_grad_(True)
    a = s.log_partition(x)
    a.sum().backward()
    mu = s.marginals(th)
    a64, mu64 = KSubsetSolver(100).log_partition_and_marginals(th.double())
    assert a.dtype == torch.float32 and mu.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert bool(torch.isfinite(a).all() & torch.isfinite(mu).all() & torch.isfinite(x.grad).all())
    assert torch.allclose(a.double(), a64, rtol=1e-6)
    assert torch.allclose(mu.double(), mu64, atol=1e-6)
    assert torch.allclose(x.grad.double(), mu64, atol=1e-6)
    assert torch.allclose(mu.double().sum(-1), torch.full((4,), 100.0, dtype=torch.float64), atol=1e-3)
    # 100 positive and 1900 negative scores ~1e4 apart: the distribution is a point mass on the MAP
    assert torch.allclose(mu[0], s.map(th)[0], atol=1e-6)
    assert torch.allclose(mu[1, :1000], torch.full((1000,), 0.1), atol=1e-6)
    smp = s.sample(th, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(smp.sum(-1), torch.full((3, 4), 100.0))
    assert torch.equal(smp[:, 2, ::3], torch.zeros(3, 667))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_tiny_marginals_relative_accuracy(backend):
    """μ_i = exp(θ_i + A(θ_{−i}; k−1) − A(θ; k)) to relative 1e-9, down to μ ~ 1e-250."""
    n, k = 120, 6
    th = _theta((n,), 17, scale=30.0)
    th[5] = -INF
    mu = KSubsetSolver(k, backend=backend).marginals(th)
    others = torch.stack([torch.cat([th[:i], th[i + 1 :]]) for i in range(n)])  # (n, n−1)
    want = torch.exp(th + KSubsetSolver(k - 1, schedule="rows").log_partition(others) - KSubsetSolver(k).log_partition(th))
    assert mu[5] == 0 and want[5] == 0
    small = (want > 1e-250) & (want < 1e-20)
    assert int(small.sum()) >= 10  # the case has tiny marginals to check
    sel = want > 1e-250
    assert float(((mu[sel] - want[sel]).abs() / want[sel]).max()) < 1e-9


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler", ["rejection", "sequential"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_sample_means_large_n(sampler, backend):
    """n = 60, k = 7: every sample has k ones and the frequencies match μ (z-scores)."""
    th = _theta((2, 60), 21, scale=1.5, neg_inf=[(1, slice(0, 10))])
    s = KSubsetSolver(7, backend=backend, sampler=sampler)
    S = 4000
    smp = s.sample(th, S, generator=torch.Generator().manual_seed(5))
    assert torch.equal(smp.sum(-1), torch.full((S, 2), 7.0, dtype=torch.float64))
    assert torch.equal(smp[:, 1, :10], torch.zeros(S, 10, dtype=torch.float64))
    mu = s.marginals(th)
    se = torch.sqrt(mu * (1 - mu) / S).clamp(min=1e-3)
    assert float(((smp.mean(0) - mu).abs() / se).max()) < 5.0


def test_rejection_fallback_is_exact(monkeypatch):
    """Rejection that runs out of rounds leaves slots to the sequential sampler: still exact (χ²)."""
    monkeypatch.setattr(kss, "MAX_ROUNDS", 1)
    monkeypatch.setattr(kss, "ROUND_ELEMENTS", 7 * 200)  # 200 candidates per round: most slots go sequential
    th = _theta((7,), 31, scale=1.0)
    s = KSubsetSolver(3, sampler="rejection")
    check_solver(s, [Case(th, _enum(3), name="fallback")], num_samples=3000)
    # and the first slots really came from rejection: a partial fill happened
    t, _ = s._flat(th)
    p, acc = kss.rejection_plan(t, 3, torch.isfinite(t).sum(-1), torch.ones(1, dtype=torch.bool))
    out, filled = kss.sample_rejection(t, 3, p, acc, torch.ones(1, dtype=torch.bool), 3000, torch.Generator().manual_seed(0))
    assert 0 < int(filled[0]) < 3000
    assert torch.equal(out[0, : int(filled[0])].sum(-1), torch.full((int(filled[0]),), 3))


def test_rejection_shift_gives_mean_k():
    th = _theta((3, 50), 41, scale=4.0, neg_inf=[(2, slice(0, 20))])
    c = kss.shift_for_mean(th, 5)
    means = torch.sigmoid(th + c.unsqueeze(-1)).sum(-1)
    assert torch.allclose(means, torch.full((3,), 5.0, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0, 300.0])
@pytest.mark.parametrize("n, k", [(1000, 50), (100, 50), (20, 3), (300, 299)])
def test_acceptance_estimate_close_to_exact(scale, n, k):
    """The local-limit estimate of P(Σz = k) vs the exact exp(A + k c − Σ softplus(θ + c))."""
    t = _theta((4, n), n + k, scale=scale)
    p, acc = kss.rejection_plan(t, k, torch.full((4,), n), torch.ones(4, dtype=torch.bool))
    c = kss.shift_for_mean(t, k)
    exact = torch.exp(KSubsetSolver(k).log_partition(t) + k * c - torch.nn.functional.softplus(t + c[:, None]).sum(-1))
    ratio = acc / exact
    assert bool(((ratio > 0.6) & (ratio < 1.05)).all()), ratio


def test_auto_sampler_choices():
    """auto: rejection for a small sharp problem, the sequential sampler when acceptance is tiny."""
    s = KSubsetSolver(50)
    t = torch.zeros(32, 1000, dtype=torch.float64)
    p, acc = kss.rejection_plan(t, 50, torch.full((32,), 1000), torch.ones(32, dtype=torch.bool))
    assert 0.04 < float(acc[0]) < 0.08  # ≈ 1/sqrt(2π·47.5)
    cheap_many = s._rejection_is_cheaper(t, acc, torch.ones(32, dtype=torch.bool), 2000)
    assert not bool(cheap_many)
    t1 = _theta((1, 1000), 3, scale=300.0)  # sharp: high acceptance
    p1, acc1 = kss.rejection_plan(t1, 50, torch.full((1,), 1000), torch.ones(1, dtype=torch.bool))
    assert float(acc1[0]) > 0.3
    assert bool(s._rejection_is_cheaper(t1, acc1, torch.ones(1, dtype=torch.bool), 1))


def test_auto_schedule_choices():
    """CPU: a loop over the k sizes for one long instance, over the n elements for a big batch."""
    s = KSubsetSolver(10)
    assert s._use_columns(torch.zeros(1, 20000, dtype=torch.float64))
    assert not KSubsetSolver(50)._use_columns(torch.zeros(32, 1000, dtype=torch.float64))
    assert KSubsetSolver(10, schedule="columns")._use_columns(torch.zeros(32, 1000, dtype=torch.float64))
    assert not KSubsetSolver(10, schedule="rows")._use_columns(torch.zeros(1, 20000, dtype=torch.float64))
    th = _theta((1, 3000), 12)
    a, mu = s.log_partition_and_marginals(th)
    a2, mu2 = KSubsetSolver(10, schedule="rows").log_partition_and_marginals(th)
    assert torch.allclose(a, a2, rtol=1e-12) and torch.allclose(mu, mu2, atol=1e-10)


@pytest.mark.parametrize("sampler", ["auto", "rejection", "sequential"])
def test_sample_reproducible_and_seed_dependent(sampler):
    s = KSubsetSolver(4, sampler=sampler)
    th = _theta((3, 20), 2)
    a = s.sample(th, 30, generator=torch.Generator().manual_seed(1))
    b = s.sample(th, 30, generator=torch.Generator().manual_seed(1))
    c = s.sample(th, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (30, 3, 20) and a.dtype == th.dtype


def test_inputs_not_mutated_and_dtype_kept():
    th = _theta((2, 9), 4).float()
    th[0, 0] = -INF
    snap = th.clone()
    s = KSubsetSolver(3)
    for out in (s.marginals(th), s.map(th), s.sample(th, 2)[0]):
        assert out.dtype == torch.float32 and out.shape == th.shape
    assert s.log_partition(th).dtype == torch.float32
    assert torch.equal(th, snap)


# ----------------------------------------------------------------------------- options and errors
def test_registry_and_capabilities():
    s = sg.get_solver("ksubset", k=3)
    assert isinstance(s, KSubsetSolver) and s.name == "ksubset" and s.k == 3
    caps = sg.list_solvers()["ksubset"]
    assert caps.is_exact("sample") and caps.is_exact("marginals") and "cuda" in caps.devices
    assert sg.get_solver("ksubset", k=3, backend="numba").capabilities.devices == ("cpu",)
    assert "k=3" in repr(s)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({}, DTypeError, r"k: expected the subset size.*got None"),
        ({"k": -1}, DomainError, r"k: expected an integer subset size >= 0, got k = -1"),
        ({"k": 2.5}, DTypeError, r"k: expected an integer subset size >= 0, got float"),
        ({"k": True}, DTypeError, r"k: expected an integer.*got bool"),
        ({"k": 2, "backend": "jax"}, DomainError, r"backend: expected one of 'torch', 'numba', got 'jax'"),
        ({"k": 2, "schedule": "diag"}, DomainError, r"schedule: expected one of .*'rows'.*got 'diag'"),
        ({"k": 2, "sampler": "gibbs"}, DomainError, r"sampler: expected one of .*'rejection'.*got 'gibbs'"),
    ],
)
def test_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sg.get_solver("ksubset", **kwargs)


@pytest.mark.parametrize("op", ["map", "marginals", "log_partition", "sample"])
def test_k_larger_than_n(op):
    s = KSubsetSolver(4)
    with pytest.raises(DomainError, match=r"k: expected 0 <= k <= n, where n = 3 .*got k = 4"):
        getattr(s, op)(torch.zeros(2, 3))


@pytest.mark.parametrize("op", ["map", "marginals", "log_partition", "sample"])
def test_nan_and_posinf_rejected(op):
    s = KSubsetSolver(1)
    with pytest.raises(DomainError, match=r"theta: expected scores that are finite or -inf.*1 NaN .* and 1 \+inf"):
        getattr(s, op)(torch.tensor([[0.0, float("nan"), INF]]))


def test_integer_theta_rejected():
    with pytest.raises(DTypeError, match=r"theta: expected a floating-point tensor"):
        KSubsetSolver(1).marginals(torch.zeros(3, dtype=torch.long))


def test_numba_backend_is_cpu_only():
    s = KSubsetSolver(1, backend="numba")
    th = torch.zeros(3, device="meta")
    with pytest.raises(DeviceError, match=r"theta is on device meta but solver .* runs on cpu"):
        s.marginals(th)


def test_docstring_examples():
    import doctest

    result = doctest.testmod(ks, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0


def test_import_structgrad_does_not_import_numba():
    code = (
        "import sys, torch, structgrad as sg\n"
        "s = sg.get_solver('ksubset', k=2)\n"
        "s.marginals(torch.zeros(4)); s.sample(torch.zeros(4), 2)\n"
        "sg.list_solvers()\n"
        "assert 'numba' not in sys.modules, 'numba was imported'\n"
        "sg.get_solver('ksubset', k=2, backend='numba').marginals(torch.zeros(4))\n"
        "assert 'numba' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_benchmark_quick_runs():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ksubset.py"
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "speed-up vs simple-autograd" in res.stdout and "structgrad numba" in res.stdout
    assert "exact samples, S=8" in res.stdout


# ----------------------------------------------------------------------------- CUDA (run by the lead)
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("schedule", ["auto", "rows", "columns"])
def test_cuda_matches_cpu(schedule):
    s = KSubsetSolver(20, schedule=schedule)
    th = _theta((8, 300), 6, scale=3.0, neg_inf=[(0, slice(0, 100)), (3, 7)])
    a, mu = s.log_partition_and_marginals(th)
    x = th.cuda().requires_grad_(True)
    ac = s.log_partition(x)
    ac.sum().backward()
    assert ac.device.type == "cuda" and x.grad.device.type == "cuda"
    assert torch.allclose(ac.cpu(), a, rtol=1e-12) and torch.allclose(x.grad.cpu(), mu, atol=1e-10)
    assert torch.allclose(s.marginals(th.cuda().float()).cpu().double(), mu, atol=1e-5)
    assert torch.equal(s.map(th.cuda()).cpu(), s.map(th))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["auto", "rejection", "sequential"])
def test_cuda_samples(sampler):
    s = KSubsetSolver(5, sampler=sampler)
    th = _theta((2, 40), 8, scale=1.5).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    smp = s.sample(th, 3000, generator=g)
    assert smp.device.type == "cuda" and torch.equal(smp.sum(-1).cpu(), torch.full((3000, 2), 5.0, dtype=torch.float64))
    mu = s.marginals(th)
    se = torch.sqrt(mu * (1 - mu) / 3000).clamp(min=1e-3)
    assert float(((smp.mean(0) - mu).abs() / se).max()) < 5.0
    with pytest.raises(DeviceError, match="generator"):
        s.sample(th, 2, generator=torch.Generator())
