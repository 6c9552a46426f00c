"""ksubset at extreme scores (issue 8, item 5): for any finite θ no inf or NaN, and
the answer enumeration gives, to the precision the dtype allows.

At ±1e30 in float64 the torch backend's marginals used to come out as 0 or inf
(k = 2 marginals summing to 0 or 4): exp(α + θ + β − A) cancels catastrophically
when the terms are ~1e30 and their rounding ~1e14.  Scales: ±1e30 and ±1e300 in
float64, ±1e4 and ±1e30 in float32; backends: torch (both schedules) and numba.
"""

from __future__ import annotations

import math

import pytest
import torch

import structgrad as sg
from structgrad.testing import subset_structures

NEG_INF = float("-inf")
N = 7

BACKENDS = [
    {"backend": "torch", "schedule": "rows"},
    {"backend": "torch", "schedule": "columns"},
    {"backend": "numba"},
]
BACKEND_IDS = ["torch-rows", "torch-columns", "numba"]
SCALES = [(torch.float64, 1e30), (torch.float64, 1e300), (torch.float32, 1e4), (torch.float32, 1e30)]
SCALE_IDS = ["f64-1e30", "f64-1e300", "f32-1e4", "f32-1e30"]


def _theta(scale: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``(6, N)`` rows of extreme scores.

    Row 0 is ``scale * randn`` (no ties: subsets' scores differ by far more than their
    rounding).  The rows with ties use integer multiples of ``base``, the power of two
    nearest ``scale``, so that every subset's score is exact and ties are ties in any
    order of summation (with 1e30 itself, (a + x) + b and (a + b) + x may differ by an
    ulp, ~1e14, and then neither enumeration nor a DP can call them tied): exact ties
    at the top and bottom, O(1) scores (equal: an O(1) difference is below the
    rounding of a score of 1e30) beside huge ones and -inf, all equal, ±base, and
    multiples with ties.
    """
    g = torch.Generator().manual_seed(seed)
    base = 2.0 ** round(math.log2(scale))
    m = torch.tensor(
        [
            [5, 5, -3, -3, 2, 1, -4],
            [0, 0, 0, 3, -2, 0, 1],
            [2, 2, 2, 2, 2, 2, 2],
            [1, -1, 1, -1, -1, 1, -1],
            [3, -3, 2, 2, -2, 0, 1],
        ],
        dtype=torch.float64,
    )
    th = torch.cat([scale * torch.randn(1, N, generator=g, dtype=torch.float64), base * m])
    th[2, :3] = 0.5
    th[2, 5] = NEG_INF
    return th.to(dtype)


def _enumerate(theta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enumeration in float64 of θ's values: (A (B,), μ (B, n), Z (|Z|, n), p (B, |Z|))."""
    Z = torch.stack(subset_structures(theta.shape[-1], k))
    t = theta.to(torch.float64)
    scores = torch.where(Z.bool().unsqueeze(0), t.unsqueeze(1), torch.zeros(())).sum(-1)  # (B, |Z|), 0·(−inf) = 0
    scores = torch.where((Z.bool().unsqueeze(0) & torch.isneginf(t).unsqueeze(1)).any(-1), NEG_INF, scores)
    A = torch.logsumexp(scores, -1)
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return A, p @ Z, Z, p


def _solver(k, opts):
    if opts.get("backend") == "numba":
        pytest.importorskip("numba")
    return sg.get_solver("ksubset", k=k, **opts)


@pytest.mark.parametrize("opts", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype,scale", SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_extreme_scores_match_enumeration(k, dtype, scale, opts):
    s = _solver(k, opts)
    th = _theta(scale, dtype, seed=k)
    A_ref, mu_ref, _, _ = _enumerate(th, k)
    tol = 1e-6 if dtype == torch.float32 else 1e-12

    mu = s.marginals(th)
    assert mu.dtype == dtype and torch.isfinite(mu).all(), mu
    torch.testing.assert_close(mu.double(), mu_ref, atol=tol, rtol=0)
    torch.testing.assert_close(mu.double().sum(-1), torch.full((6,), float(k), dtype=torch.float64), atol=tol * N, rtol=0)

    A = s.log_partition(th)
    assert torch.isfinite(A).all()
    torch.testing.assert_close(A.double(), A_ref, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)

    A2, mu2 = s.log_partition_and_marginals(th)
    torch.testing.assert_close(mu2, mu)
    torch.testing.assert_close(A2, A)

    # gradient of A = marginals; double backward (H v) stays finite
    x = th.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s.log_partition(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g.detach().double(), mu_ref, atol=tol, rtol=0)
    (h,) = torch.autograd.grad((g * torch.linspace(-1, 1, N, dtype=dtype)).sum(), x)
    assert torch.isfinite(h).all(), h

    m = s.map(th)
    assert torch.equal(m.sum(-1), torch.full((6,), float(k), dtype=dtype))


@pytest.mark.parametrize("opts", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype,scale", SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("sampler", ["rejection", "sequential"])
def test_extreme_scores_samples_are_exact(sampler, dtype, scale, opts):
    """Samples have k ones and come only from structures of non-negligible probability,
    with the tied ones in about equal shares."""
    k = 2
    s = _solver(k, dict(opts, sampler=sampler))
    th = _theta(scale, dtype, seed=5)
    _, _, Z, p = _enumerate(th, k)
    S = 400
    z = s.sample(th, S, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(z).all() and torch.equal(z.sum(-1), torch.full((S, 6), float(k), dtype=dtype))
    idx = (z.double().unsqueeze(-2) == Z).all(-1).double().argmax(-1)  # (S, 6) structure index
    for row in range(6):
        counts = torch.bincount(idx[:, row], minlength=Z.shape[0]).double()
        assert (counts[p[row] < 1e-12] == 0).all(), (row, counts, p[row])
        big = p[row] > 0.01
        se = torch.sqrt(p[row][big] * (1 - p[row][big]) / S).clamp(min=1e-3)
        assert float(((counts[big] / S - p[row][big]).abs() / se).max()) < 5.0, (row, counts, p[row])


@pytest.mark.parametrize("opts", BACKENDS, ids=BACKEND_IDS)
def test_largest_finite_scores(opts):
    """Near float64's largest value: finite marginals while A = Σ of k scores is representable."""
    big = torch.finfo(torch.float64).max / 4
    th = torch.tensor([[big, -big, 0.0, big / 2, -big, big / 8]], dtype=torch.float64)
    for k in (1, 2, 3):
        s = _solver(k, opts)
        mu = s.marginals(th)
        _, mu_ref, _, _ = _enumerate(th, k)
        assert torch.isfinite(mu).all()
        torch.testing.assert_close(mu, mu_ref, atol=1e-12, rtol=0)
        z = s.sample(th, 5, generator=torch.Generator().manual_seed(1))
        assert torch.equal(z, s.map(th).expand(5, 1, 6))


@pytest.mark.parametrize("scale", [1e3, 1e8, 1e30])
def test_extreme_float32_random_batches_against_enumeration(scale):
    """Many random float32 rows with ties and -inf, torch backend (auto schedule)."""
    g = torch.Generator().manual_seed(int(scale) % 1000)
    th = (torch.randn(64, N, generator=g) * scale).float()
    th[::3, 2] = th[::3, 4]
    th[1::5, 6] = NEG_INF
    for k in (1, 3, 5):
        mu = sg.get_solver("ksubset", k=k).marginals(th)
        _, mu_ref, _, _ = _enumerate(th, k)
        assert torch.isfinite(mu).all()
        torch.testing.assert_close(mu.double(), mu_ref, atol=2e-6, rtol=0)


def test_numba_backend_reports_cpu_only_on_the_instance():
    pytest.importorskip("numba")
    s = sg.get_solver("ksubset", k=2, backend="numba")
    assert s.capabilities.devices == ("cpu",)
    assert "cuda" in type(s).capabilities.devices  # the class default is untouched
    assert "cuda" in sg.get_solver("ksubset", k=2).capabilities.devices
    assert "cuda" in sg.list_solvers()["ksubset"].devices


def test_module_layout():
    """ksubset.py reads as the interface; kernels live in private modules, each < 600 lines."""
    import pathlib

    from structgrad.solvers import ksubset

    root = pathlib.Path(ksubset.__file__).parent
    files = ["ksubset.py", *(p.name for p in root.glob("_ksubset_*.py")), "_numba_ksubset.py"]
    assert len(files) >= 4
    for f in files:
        assert len((root / f).read_text().splitlines()) <= 600, f


@pytest.mark.parametrize("op", ["map", "marginals", "log_partition", "sample"])
def test_tuple_theta_is_a_shape_error(op):
    s = sg.get_solver("ksubset", k=1)
    for th in ((torch.zeros(3), torch.zeros(3)), [torch.zeros(3)]):
        with pytest.raises(sg.ShapeError, match=r"theta: expected one tensor \(\*batch, \.\.\.\) for solver 'ksubset'"):
            getattr(s, op)(th)



@pytest.mark.parametrize("opts", [{"backend": "torch", "sampler": "sequential"}, {"backend": "numba", "sampler": "sequential"}, {"backend": "torch"}], ids=["torch-seq", "numba-seq", "torch-auto"])
def test_split_tables_pass_the_conformance_suite(monkeypatch, opts):
    """The split tables at ordinary scores (forced by a threshold of 0): the whole
    check_solver suite (log Z, marginals, MAP, gradients, gradgradcheck, χ² of samples)."""
    from structgrad.solvers import ksubset as ks
    from structgrad.testing import Case, check_solver

    monkeypatch.setattr(ks, "_SPLIT_ABOVE", 0.0)
    s = _solver(3, opts)
    g = torch.Generator().manual_seed(3)
    th = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 1.5
    th[1, 0, 2] = NEG_INF
    th[0, 1, :4] = NEG_INF  # 2 possible elements < k: infeasible
    enum = lambda th_i: subset_structures(6, 3)  # noqa: E731
    t, _ = s._flat(th)
    assert s._kind(t) == "split"
    check_solver(s, [Case(th, enum, name="split")], num_samples=1500)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schedule", ["rows", "columns"])
def test_cuda_extreme_scores_match_cpu(schedule):
    for dtype, scale in SCALES:
        for k in (1, 2, 3):
            s = sg.get_solver("ksubset", k=k, schedule=schedule)
            th = _theta(scale, dtype, seed=k)
            x = th.cuda().requires_grad_(True)
            A = s.log_partition(x)
            (g,) = torch.autograd.grad(A.sum(), x, create_graph=True)
            (h,) = torch.autograd.grad((g * torch.linspace(-1, 1, N, dtype=dtype, device="cuda")).sum(), x)
            assert A.device.type == "cuda" and torch.isfinite(h).all()
            torch.testing.assert_close(g.detach().cpu(), s.marginals(th), atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
            torch.testing.assert_close(A.detach().cpu(), s.log_partition(th))
            z = s.sample(th.cuda(), 200, generator=torch.Generator(device="cuda").manual_seed(0))
            assert torch.equal(z.sum(-1).cpu(), torch.full((200, 6), float(k), dtype=dtype))
