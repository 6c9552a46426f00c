"""Tests of the ``ilp`` solver with real-valued constraints (exact rational reading).

The oracle reads each coefficient as the decimal it was written as (Fraction(str(x)))
and enumerates with exact rational arithmetic, independently of the solver's rule.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ilp import NEG, all_binary, brute_values, tolerance

import structgrad as sg
from structgrad.errors import DomainError
from structgrad.solvers._ilp_constraints import simplest_fraction


def exact_feasible(n, A=None, b=None, A_eq=None, b_eq=None):
    """(K, n) z in {0,1}^n feasible for the decimals as written (exact Fractions)."""
    Z = all_binary(n)
    rows = []
    for M, rhs, eq in ((A, b, False), (A_eq, b_eq, True)):
        if M is not None:
            rows += [([Fraction(str(v)) for v in r], Fraction(str(beta)), eq) for r, beta in zip(M, rhs)]
    ok = []
    for z in Z:
        good = True
        for coeffs, beta, eq in rows:
            lhs = sum((c for c, zj in zip(coeffs, z) if zj), Fraction(0))
            if (lhs != beta) if eq else (lhs > beta):
                good = False
                break
        ok.append(good)
    return Z[np.array(ok, dtype=bool)]


def assert_exactly_optimal(solver, theta, Zf):
    th = np.atleast_2d(theta.numpy())
    best = brute_values(th, Zf)
    assert all(v is not None for v in best)
    z = solver.map(theta).reshape(th.shape).numpy().astype(np.int64)
    feasible = {tuple(r) for r in Zf}
    for i in range(len(th)):
        assert tuple(z[i]) in feasible
        v = float(np.where(np.isfinite(th[i]), th[i], 0.0) @ z[i])
        assert best[i] - tolerance(th[i])[0] <= v <= best[i] + 1e-9


# ----------------------------------------------------------------------------- the reading rule
@pytest.mark.parametrize(
    "value,dtype,expect",
    [
        (0.07, torch.float64, Fraction(7, 100)),
        (0.07, torch.float32, Fraction(7, 100)),
        (0.07, torch.float16, Fraction(7, 100)),
        (0.07, torch.bfloat16, Fraction(3, 43)),  # bfloat16 is coarse: a simpler fraction is within half an ulp
        (1 / 3, torch.float64, Fraction(1, 3)),
        (0.1, torch.float64, Fraction(1, 10)),
        (-2.75, torch.float32, Fraction(-11, 4)),
        (12345.67, torch.float64, Fraction(1234567, 100)),
    ],
)
def test_coefficients_are_read_as_the_simplest_fraction(value, dtype, expect):
    s = sg.get_solver("ilp", A=torch.tensor([[value, 1.0]], dtype=dtype), b=[5])
    L = int(s.row_scale[0])
    assert L == math.lcm(expect.denominator, 1)
    assert Fraction(int(s.A[0, 0]), L) == expect and s.A[0, 1] == L and s.b[0] == 5 * L
    t = torch.tensor(value, dtype=dtype)
    lo, hi = (torch.nextafter(t, torch.tensor(v, dtype=dtype)).item() for v in (-math.inf, math.inf))
    x = Fraction(t.item())
    assert (x + Fraction(lo)) / 2 <= expect <= (x + Fraction(hi)) / 2  # within half an ulp of the float


def test_simplest_fraction():
    assert simplest_fraction(Fraction(3, 10), Fraction(1, 3)) == Fraction(1, 3)
    assert simplest_fraction(Fraction(2), Fraction(5, 2)) == 2
    assert simplest_fraction(Fraction(31, 100), Fraction(32, 100)) == Fraction(5, 16)
    # brute force: the smallest q with some p/q in [lo, hi]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lo = Fraction(int(rng.integers(0, 10**6)), 10**6)
        hi = lo + Fraction(int(rng.integers(1, 1000)), 10**7)
        got = simplest_fraction(lo, hi)
        assert lo <= got <= hi
        q = next(q for q in range(1, 10**5) if math.ceil(lo * q) <= hi * q)
        assert got.denominator == q


def test_integer_rows_are_untouched_and_rows_scale_separately():
    s = sg.get_solver("ilp", A=[[3, 2, 2], [0.5, 0.25, 1]], b=[4, 1.125], A_eq=[[1, 1, 1]], b_eq=[2])
    assert s.row_scale.tolist() == [1, 8] and s.row_scale_eq.tolist() == [1]
    assert s.A.tolist() == [[3, 2, 2], [4, 2, 8]] and s.b.tolist() == [4, 9]
    assert s.A.dtype == np.int64 and not s.A.flags.writeable


# ----------------------------------------------------------------------------- against enumeration
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 9),
    m=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
    decimals=st.integers(1, 3),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    eq=st.booleans(),
)
def test_decimal_knapsacks_match_exact_enumeration(n, m, seed, decimals, dtype, eq):
    rng = np.random.default_rng(seed)
    A = np.round(rng.uniform(0.01, 5.0, size=(m, n)), decimals)
    b = np.round(A.sum(1) * rng.uniform(0.2, 0.7, size=m), decimals)
    opts = dict(A=torch.tensor(A, dtype=dtype), b=torch.tensor(b, dtype=dtype))
    Zf = exact_feasible(n, A, b)
    if eq:  # plus one equality row with decimals that some z meets
        w = np.round(rng.uniform(0.05, 1.0, size=n), decimals)
        target = w[: n // 2].sum().round(decimals)
        opts.update(A_eq=torch.tensor(w[None], dtype=dtype), b_eq=torch.tensor([target], dtype=dtype))
        Zf = exact_feasible(n, A, b, w[None], [target])
    s = sg.get_solver("ilp", **opts)
    assert (s.row_scale <= 10**decimals).all()
    theta = torch.randn(3, n, generator=torch.Generator().manual_seed(seed % 1000), dtype=torch.float64)
    theta[0] = theta[0].abs()  # all positive: the capacity binds
    theta[2, 0] = NEG
    if len(Zf) == 0 or any(v is None for v in brute_values(theta.numpy(), Zf)):
        with pytest.raises(sg.InfeasibleError):
            s.map(theta)
        return
    assert_exactly_optimal(s, theta, Zf)


def test_float_rounding_does_not_cut_feasible_points():
    """0.1 + 0.2 <= 0.3 holds for the decimals (though not in float arithmetic): z = (1, 1) is feasible."""
    s = sg.get_solver("ilp", A=[[0.1, 0.2]], b=[0.3])
    assert torch.equal(s.map(torch.tensor([1.0, 1.0])), torch.tensor([1.0, 1.0]))
    assert 0.1 + 0.2 > 0.3  # what a float check would have said
    eq = sg.get_solver("ilp", A_eq=[[0.1, 0.2, 0.3]], b_eq=[0.3])
    z = eq.map(torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]))
    assert torch.equal(z, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_returned_z_meets_the_float_rows_within_half_ulps():
    """The documented tolerance against the given floats: |sum x_j z_j - sum r_j z_j| <= sum ulp/2."""
    rng = np.random.default_rng(3)
    A = np.round(rng.uniform(0.01, 3.0, size=(2, 8)), 2).astype(np.float32)
    b = np.round(A.sum(1) / 2, 2).astype(np.float32)
    s = sg.get_solver("ilp", A=A, b=b)
    z = s.map(torch.rand(16, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).numpy().astype(int)
    for zi in z:
        for i in range(2):
            lhs = sum(Fraction(float(A[i, j])) for j in range(8) if zi[j])
            slack = sum(Fraction(float(np.spacing(A[i, j]))) / 2 for j in range(8) if zi[j]) + Fraction(float(np.spacing(b[i]))) / 2
            assert lhs <= Fraction(float(b[i])) + slack


# ----------------------------------------------------------------------------- refusals
def test_coefficients_beyond_max_denominator_are_refused_by_name():
    with pytest.raises(DomainError, match=r"A: coefficient 3.14159\d* at index \(0, 1\) is not within half a unit .* max_denominator=1000000 .* denominator \d{7,}"):
        sg.get_solver("ilp", A=[[1.0, math.pi]], b=[3])
    with pytest.raises(DomainError, match=r"b_eq: coefficient 0.123457 at index \(0,\) .*max_denominator=100 "):
        sg.get_solver("ilp", A_eq=[[1, 1]], b_eq=[0.123457], max_denominator=100)
    assert sg.get_solver("ilp", A_eq=[[1, 1]], b_eq=[0.123457]).row_scale_eq[0] == 1000000
    # float32 noise that is no short fraction
    x = float(torch.rand(1, generator=torch.Generator().manual_seed(1)).item())
    with pytest.raises(DomainError, match="max_denominator=10 "):
        sg.get_solver("ilp", A=torch.tensor([[x, 1.0]], dtype=torch.float32), b=[1], max_denominator=10)


def test_row_whose_common_denominator_overflows_is_refused_by_name():
    primes = [101, 103, 107, 109, 113, 127, 131, 137, 139, 149]
    A = [[1 / p for p in primes]]
    with pytest.raises(DomainError, match=r"A: row 0 times the common denominator \d+ of its fractions has .* expected < 2\^62"):
        sg.get_solver("ilp", A=A, b=[1])


# ----------------------------------------------------------------------------- the exact feasibility check
@pytest.mark.parametrize("n,rows,big", [(8, 3, False), (400, 50, False), (6, 2, True)])
def test_feasibility_check_is_exact_on_every_path(n, rows, big):
    """Small systems use a dense int64 product, large ones the nonzeros (float64 sums when
    exact, int64 when a row's Σ|coefficients| reaches 2^53); all agree with Python integers."""
    from structgrad.solvers._ilp_constraints import read_system

    rng = np.random.default_rng(n)
    scale = 2**55 if big else 5
    A = rng.integers(-scale, scale, size=(rows, n)) * (rng.random((rows, n)) < 0.5)
    Z = rng.integers(0, 2, size=(40, n))
    lhs = np.array([[sum(int(a) * int(zj) for a, zj in zip(row, z)) for row in A] for z in Z], dtype=object)
    b = np.array([int(v) for v in np.median(lhs, axis=0).astype(np.int64)])
    sy = read_system(A[: rows // 2], b[: rows // 2], A[rows // 2:], b[rows // 2:], 10**6)
    assert (sy._W is None) == (n == 400) and sy._sums_exact == (not big)
    want = np.array([all(lhs[i, r] <= b[r] for r in range(rows // 2)) and all(lhs[i, r] == b[r] for r in range(rows // 2, rows)) for i in range(len(Z))])
    assert np.array_equal(sy.feasible(Z), want)
    Zok = Z[want] if want.any() else Z[:0]
    assert sy.first_infeasible(Zok) == -1
    if not want.all():
        assert sy.first_infeasible(Z) == int(np.flatnonzero(~want)[0])
    bad = Zok.copy()
    if len(bad):
        bad[0, 0] = 2  # not binary
        assert sy.first_infeasible(bad) == 0 and not sy.feasible(bad)[0]
