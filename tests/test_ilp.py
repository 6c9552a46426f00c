"""Tests of the ``ilp`` solver: conformance, scores, scaling, batches, errors, copying.

The routes (assignment, min-cost flow, LP first) are tested in tests/test_ilp_routes.py,
real-valued constraints in tests/test_ilp_real.py; both import the helpers below."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.errors import (
    DomainError,
    DTypeError,
    InfeasibleError,
    ShapeError,
    SolverTimeoutError,
)
from structgrad.testing import Case, check_solver

NEG, POS = float("-inf"), float("inf")
SCORE_POLICY = r"theta: expected scores that are finite or -inf \(impossible\), got"


# ----------------------------------------------------------------------------- helpers
# (shared with tests/test_ilp_routes.py and tests/test_ilp_real.py, which import them)
def all_binary(n):
    """(2^n, n) int64: every z in {0,1}^n."""
    return ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int64)


def feasible_matrix(n, A=None, b=None, A_eq=None, b_eq=None):
    """(K, n) int64: the z in {0,1}^n with A z <= b and A_eq z = b_eq (integer rows, exact)."""
    Z = all_binary(n)
    ok = np.ones(len(Z), dtype=bool)
    if A is not None and len(A):
        ok &= (Z @ np.asarray(A, dtype=np.int64).T <= np.asarray(b, dtype=np.int64)).all(1)
    if A_eq is not None and len(A_eq):
        ok &= (Z @ np.asarray(A_eq, dtype=np.int64).T == np.asarray(b_eq, dtype=np.int64)).all(1)
    return Z[ok]


def feasible_set(n, A=None, b=None, A_eq=None, b_eq=None):
    """The feasible z as a list of float64 tensors (an enumerator for check_solver)."""
    return list(torch.from_numpy(feasible_matrix(n, A, b, A_eq, b_eq).astype(np.float64)))


def brute_values(theta, Zf):
    """Best <z, theta> over the rows of Zf per instance of theta (B, n), -inf = forbidden; None if none."""
    th = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    out = []
    for t in th:
        ok = ~((Zf == 1) & np.isneginf(t)).any(1)
        vals = Zf[ok] @ np.where(np.isfinite(t), t, 0.0)
        out.append(float(vals.max()) if len(vals) else None)
    return out


def tolerance(theta):
    """The documented bound n * max|finite theta| * 2^-30 (+ float slack), per instance."""
    th = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    fin = np.where(np.isfinite(th), th, 0.0)
    return th.shape[1] * np.abs(fin).max(1) * 2.0**-30 + 1e-12


def assert_optimal(solver, theta, Zf, A=None, b=None, A_eq=None, b_eq=None):
    """solver.solve(theta) is feasible and optimal within the tolerance against the enumeration Zf;
    returns the result for the feasible instances (None if there are none)."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    th = theta.reshape(-1, theta.shape[-1]).numpy()
    best = brute_values(th, Zf)
    if any(v is None for v in best):  # the batch raises; its feasible instances are checked alone
        with pytest.raises(InfeasibleError, match=r"no z in \{0,1\}\^\d+ satisfies the constraints"):
            solver.map(theta)
        keep = [i for i, v in enumerate(best) if v is not None]
        if not keep:
            return None
        th, best = th[keep], [best[i] for i in keep]
        theta = torch.from_numpy(th)
    res = solver.solve(theta)
    Z = res.z.reshape(-1, th.shape[1]).numpy().astype(np.int64)
    tol = tolerance(th)
    for i, z in enumerate(Z):
        assert is_feasible(z, A, b, A_eq, b_eq), (i, z)
        assert not ((z == 1) & np.isneginf(th[i])).any()
        value = float(np.where(np.isfinite(th[i]), th[i], 0.0) @ z)
        assert best[i] - tol[i] <= value <= best[i] + 1e-9, (i, value, best[i])
        assert float(res.value.reshape(-1)[i]) == pytest.approx(value, abs=1e-12)
    assert bool(res.optimal.all())
    return res


def assignment_rows(r, c):
    """0/1 rows of an r x c assignment: r row constraints then c column constraints (z[i*c + j])."""
    rows = np.zeros((r, r * c), dtype=np.int64)
    cols = np.zeros((c, r * c), dtype=np.int64)
    for i in range(r):
        for j in range(c):
            rows[i, i * c + j] = 1
            cols[j, i * c + j] = 1
    return rows, cols


def is_feasible(z, A, b, A_eq, b_eq):
    z = np.asarray(z, dtype=np.int64)
    ok = set(np.unique(z)) <= {0, 1}
    if A is not None:
        ok &= bool((np.asarray(A) @ z <= np.asarray(b)).all())
    if A_eq is not None:
        ok &= bool((np.asarray(A_eq) @ z == np.asarray(b_eq)).all())
    return ok


def grid_flow(k):
    """Flow rows of s-t paths on a k x k grid (right and down edges): (A_eq, b_eq), s = 0, t = k*k - 1."""
    tails, heads = [], []
    for r in range(k):
        for c in range(k):
            if c + 1 < k:
                tails.append(r * k + c), heads.append(r * k + c + 1)
            if r + 1 < k:
                tails.append(r * k + c), heads.append((r + 1) * k + c)
    A_eq = np.zeros((k * k, len(tails)), dtype=np.int64)
    A_eq[tails, np.arange(len(tails))] = 1
    A_eq[heads, np.arange(len(tails))] = -1
    b_eq = np.zeros(k * k, dtype=np.int64)
    b_eq[0], b_eq[-1] = 1, -1
    return A_eq, b_eq


GRID3 = grid_flow(3)
WINDOWS = np.array([[1] * 3 + [0] * 4, [0] + [1] * 3 + [0] * 3, [0] * 2 + [1] * 3 + [0] * 2, [0] * 3 + [1] * 3 + [0]])  # sliding windows: not a flow
KNAP_A = np.array([[3, 5, 2, 7, 4, 1, 6, 3], [2, 1, 4, 3, 5, 6, 2, 1]])
KNAP_B = np.array([11, 9])
ROWS3, COLS3 = assignment_rows(3, 3)
ROWS23, COLS23 = assignment_rows(2, 3)


def _theta(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- conformance vs enumeration
CONFORMANCE = [
    # name, constructor options, enumerated feasible set, theta, expected method
    ("knapsack", dict(A=KNAP_A, b=KNAP_B), feasible_set(8, KNAP_A, KNAP_B), _theta((3, 8), 0), "cp-sat"),
    (
        "knapsack_neg_inf",
        dict(A=KNAP_A, b=KNAP_B),
        feasible_set(8, KNAP_A, KNAP_B),
        torch.where(torch.arange(8) % 3 == 0, torch.tensor(NEG, dtype=torch.float64), _theta((2, 8), 1)),
        "cp-sat",
    ),
    (
        "assignment_3x3",
        dict(A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6)),
        feasible_set(9, A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6)),
        _theta((2, 2, 9), 2),
        "assignment",
    ),
    (
        "assignment_2x3_rows_eq_cols_le",
        dict(A=COLS23, b=np.ones(3), A_eq=ROWS23, b_eq=np.ones(2)),
        feasible_set(6, COLS23, np.ones(3), ROWS23, np.ones(2)),
        _theta((3, 6), 4),
        "assignment",
    ),
    (
        "cardinality_eq",
        dict(A=np.zeros((0, 7)), b=np.zeros(0), A_eq=np.ones((1, 7)), b_eq=[3]),
        feasible_set(7, A_eq=np.ones((1, 7)), b_eq=[3]),
        _theta((4, 7), 6),
        "min-cost-flow",
    ),
    (
        "shortest_path_3x3_grid",
        dict(A_eq=GRID3[0], b_eq=GRID3[1]),
        feasible_set(12, A_eq=GRID3[0], b_eq=GRID3[1]),
        -_theta((3, 12), 7).abs(),
        "min-cost-flow",
    ),
    (
        "windows",
        dict(A=WINDOWS, b=[2, 2, 2, 1]),
        feasible_set(7, WINDOWS, [2, 2, 2, 1]),
        _theta((3, 7), 8),
        "lp-first",
    ),
    (
        "knapsack_lp_first",  # the LP is fractional: every instance falls back to CP-SAT
        dict(A=KNAP_A, b=KNAP_B, method="lp-first"),
        feasible_set(8, KNAP_A, KNAP_B),
        _theta((3, 8), 9),
        "lp-first",
    ),
    (
        "assignment_3x3_cpsat",
        dict(A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6), method="cp-sat"),
        feasible_set(9, A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6)),
        _theta((2, 9), 3),
        "cp-sat",
    ),
]


@pytest.mark.parametrize("name,opts,structs,theta,method", CONFORMANCE, ids=[c[0] for c in CONFORMANCE])
def test_conformance_against_enumeration(name, opts, structs, theta, method):
    solver = sg.get_solver("ilp", **opts)
    assert solver.method == method
    ran = check_solver(solver, [Case(theta, enumerate=lambda th, S=structs: S, name=name)])
    assert ran["map_feasible_optimal"] >= 1
    assert ran["capability_error"] == 3  # marginals, log_partition, sample are refused


def test_capabilities_and_listing():
    caps = sg.list_solvers()["ilp"]
    assert caps.map == "exact" and caps.marginals is None and caps.sample is None
    s = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B)
    assert s.capabilities == type(s).capabilities
    with pytest.raises(sg.CapabilityError, match="solvers that can"):
        s.marginals(_theta(8, 0))
    for limit in (dict(time_limit=5.0), dict(deterministic_time_limit=5.0)):
        limited = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B, **limit)
        assert limited.capabilities == type(s).capabilities.replace(map="approximate")
    assert type(s).capabilities.map == "exact"  # the class default is untouched


# ----------------------------------------------------------------------------- random instances
@st.composite
def _instances(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(0, 3))
    p = draw(st.integers(0, 1))
    A = np.array(draw(st.lists(st.lists(st.integers(-3, 5), min_size=n, max_size=n), min_size=m, max_size=m)), dtype=np.int64).reshape(m, n)
    b = np.array(draw(st.lists(st.integers(-2, 9), min_size=m, max_size=m)), dtype=np.int64)
    A_eq = np.array(draw(st.lists(st.lists(st.integers(0, 2), min_size=n, max_size=n), min_size=p, max_size=p)), dtype=np.int64).reshape(p, n)
    b_eq = np.array(draw(st.lists(st.integers(0, 4), min_size=p, max_size=p)), dtype=np.int64)
    vals = st.one_of(st.floats(-10, 10, allow_nan=False, width=32), st.sampled_from([NEG, 0.0]))
    theta = draw(st.lists(st.lists(vals, min_size=n, max_size=n), min_size=1, max_size=3))
    return A, b, A_eq, b_eq, np.array(theta, dtype=np.float64)


@settings(max_examples=40, deadline=None)
@given(_instances(), st.sampled_from(["auto", "cp-sat", "lp-first"]))
def test_random_instances_match_brute_force(inst, method):
    A, b, A_eq, b_eq, theta = inst
    n = theta.shape[1]
    solver = sg.get_solver("ilp", A=A, b=b, A_eq=A_eq, b_eq=b_eq, num_threads=1, method=method)
    assert_optimal(solver, theta, feasible_matrix(n, A, b, A_eq, b_eq), A, b, A_eq, b_eq)


# ----------------------------------------------------------------------------- scores, scaling, tolerance
@pytest.mark.parametrize(
    "opts",
    [
        dict(A=np.zeros((0, 4)), b=np.zeros(0), A_eq=np.ones((1, 4)), b_eq=[2]),
        dict(A=np.zeros((0, 4)), b=np.zeros(0), A_eq=np.ones((1, 4)), b_eq=[2], method="cp-sat"),
        dict(A=np.zeros((0, 4)), b=np.zeros(0), A_eq=np.ones((1, 4)), b_eq=[2], method="lp-first"),
    ],
    ids=["min-cost-flow", "cp-sat", "lp-first"],
)
def test_neg_inf_fixes_to_zero_and_pos_inf_is_refused(opts):
    s = sg.get_solver("ilp", **opts)
    z = s.map(torch.tensor([[3.0, -1.0, -2.0, 5.0], [NEG, NEG, 0.1, 0.2]]))
    assert torch.equal(z, torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 1]]))
    # +inf used to mean "fix to 1"; it is now refused by the shared score policy, for every route
    th = torch.tensor([[POS, -1.0, -2.0, 5.0]])
    for call in (s.map, s.solve):
        with pytest.raises(DomainError, match=SCORE_POLICY + r" 1 \+inf \(first at index \(0, 0\)\)"):
            call(th)
    with pytest.raises(DomainError, match=SCORE_POLICY + r" 1 NaN"):
        s.solve(torch.tensor([0.0, float("nan"), 1.0, 1.0]))
    # the hook is deferred to the scaling pass (which finds non-finite scores anyway);
    # the shared check it then runs is the base class's
    assert s.check_values(th) is None
    with pytest.raises(DomainError, match=SCORE_POLICY):
        sg.Solver.check_values(s, th)
    # validate=False: not checked; NaN and +inf count as 0 and z is still feasible
    fast = sg.get_solver("ilp", validate=False, **opts)
    z = fast.map(torch.tensor([POS, float("nan"), -2.0, 5.0]))
    assert z.sum() == 2 and z[3] == 1 and z[2] == 0


def test_score_errors_come_before_infeasibility():
    s = sg.get_solver("ilp", A=np.zeros((1, 3)), b=[-1])  # infeasible for every theta
    with pytest.raises(DomainError, match=SCORE_POLICY):
        s.map(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(InfeasibleError, match="all zeros"):
        s.map(torch.tensor([0.0, NEG, 0.0]))


def test_large_float32_scores_no_nan_and_optimal():
    A = np.array([[4, 9, 2, 7, 3, 8, 5, 6, 1, 2]])
    b = [15]
    theta = (torch.randn(3, 10, generator=torch.Generator().manual_seed(3)) * 1e4).float()
    res = sg.get_solver("ilp", A=A, b=b).solve(theta)
    assert res.z.dtype == torch.float32 and not torch.isnan(res.value).any()
    best = brute_values(theta.double().numpy(), feasible_matrix(10, A, b))
    for i in range(3):
        assert float(theta[i].double() @ res.z[i].double()) >= best[i] - tolerance(theta[i].double().numpy())[0]


def test_integer_scores_are_exact_and_tolerance_is_honoured():
    card = dict(A=np.zeros((0, 5)), b=np.zeros(0), A_eq=np.ones((1, 5)), b_eq=[2])
    # integer-valued theta: no rounding, the unique optimum is found even when it wins by 1
    th = torch.tensor([1e6, 999_999.0, 1e6 - 1, 3.0, 1e6 + 1], dtype=torch.float64)
    assert torch.equal(sg.get_solver("ilp", **card).map(th), torch.tensor([1.0, 0, 0, 0, 1]))
    # tiny scores beside a huge one fall below the quantum M * 2^-P at P = 30 ...
    th = torch.tensor([1e4, 2e-6, 3e-6, -1.0, -2.0], dtype=torch.float64)
    best = 1e4 + 3e-6
    z = sg.get_solver("ilp", **card).map(th)
    assert float(th @ z) >= best - 5 * 1e4 * 2.0**-30
    # ... and are resolved with more objective bits
    z = sg.get_solver("ilp", objective_bits=50, **card).map(th)
    assert torch.equal(z, torch.tensor([1.0, 0, 1, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_batch_shapes(dtype):
    s = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B)
    theta = _theta((2, 3, 8), 8).to(dtype)
    z = s.map(theta)
    assert z.shape == (2, 3, 8) and z.dtype == dtype
    flat = s.map(theta.reshape(6, 8))
    assert torch.equal(z.reshape(6, 8), flat)
    assert torch.equal(z[1, 2], s.map(theta[1, 2]))
    assert s.map(torch.zeros(0, 8, dtype=dtype)).shape == (0, 8)


def test_parallel_batch_equals_serial_and_inputs_untouched():
    A = np.random.default_rng(0).integers(1, 20, size=(4, 30))
    b = A.sum(1) // 2
    theta = _theta((12, 30), 9)
    theta[::3, ::4] = NEG  # per-instance fixings must not leak between the threads' model copies
    before = theta.clone()
    serial = sg.get_solver("ilp", A=A, b=b, num_threads=1).solve(theta)
    par = sg.get_solver("ilp", A=A, b=b, num_threads=2)
    first = par.solve(theta)
    again = par.solve(theta)  # model copies are reused across calls
    assert torch.equal(serial.z, first.z) and torch.equal(first.z, again.z)
    assert torch.equal(theta, before)
    for z in first.z.numpy():
        assert is_feasible(z, A, b, None, None)
    assert torch.allclose(first.value, (first.z * theta.nan_to_num(neginf=0.0)).sum(-1))


def test_result_fields():
    s = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B)
    theta = _theta((2, 8), 10)
    theta[0, 0] = NEG
    res = s.solve(theta)
    from structgrad.solvers.ilp import ILPResult

    assert isinstance(res, ILPResult)
    assert res.z.shape == (2, 8) and res.value.shape == (2,) and res.optimal.shape == (2,)
    assert res.optimal.dtype == torch.bool and bool(res.optimal.all())
    assert torch.isfinite(res.value).all()
    assert torch.equal(res.z, s.map(theta))


# ----------------------------------------------------------------------------- infeasible / time-outs
def test_infeasible_instances():
    s = sg.get_solver("ilp", A=np.ones((1, 3)), b=[-1])
    with pytest.raises(InfeasibleError, match=r"instance \(0,\) of batch shape \(1,\)"):
        s.map(torch.zeros(1, 3))
    card = sg.get_solver("ilp", A_eq=np.ones((1, 3)), b_eq=[2])
    theta = torch.tensor([[0.0, 1.0, 2.0], [NEG, NEG, 1.0]])
    with pytest.raises(InfeasibleError, match=r"instance \(1,\).*after fixing the variables whose score is -inf"):
        card.map(theta)
    with pytest.raises(InfeasibleError, match="all zeros"):
        sg.get_solver("ilp", A=np.zeros((1, 3)), b=[-1]).map(torch.zeros(3))
    rows, cols = assignment_rows(2, 3)
    uneven = sg.get_solver("ilp", A_eq=np.concatenate([rows, cols]), b_eq=np.ones(5))
    assert uneven.method == "assignment"
    with pytest.raises(InfeasibleError, match="needs equal sides"):
        uneven.map(torch.zeros(6))
    a = sg.get_solver("ilp", A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6))
    th = torch.zeros(9)
    th[6:] = NEG  # the last row can take no column
    with pytest.raises(InfeasibleError):
        a.map(th)


# Time-outs are tested with CP-SAT's deterministic time limit (a count of work, not
# wall-clock seconds), so they do not depend on the machine's speed or load.  Margins,
# measured with OR-Tools 9.15 and one worker:
# * subset sum (60 weights in [1e9, 2e9), target half the total + 1): no feasible z
#   within 3.0 units of deterministic time; the tests allow 0.01;
# * knapsack (n = 200, 20 rows, all scores positive): a first feasible z after
#   about 0.015 units, optimality not proven after 10; the tests allow 0.1.
def _subset_sum():
    a = np.random.default_rng(1).integers(10**9, 2 * 10**9, size=60)
    return dict(A_eq=a[None], b_eq=[int(a.sum() // 2) + 1])


def _hard_knapsack():
    A = np.random.default_rng(0).integers(1, 101, size=(20, 200))
    theta = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # all positive: hard
    return A, A.sum(1) // 2, theta


def test_time_out_without_a_solution_raises():
    s = sg.get_solver("ilp", deterministic_time_limit=0.01, **_subset_sum())
    for _ in range(2):  # the same outcome every time
        with pytest.raises(SolverTimeoutError, match=r"instance \(\) .*no feasible z within deterministic_time_limit=0.01;"):
            s.map(_theta(60, 0))


def test_time_out_with_a_solution_returns_it_flagged_and_is_reproducible():
    A, b, theta = _hard_knapsack()
    s = sg.get_solver("ilp", A=A, b=b, deterministic_time_limit=0.1, num_threads=2)
    res = s.solve(theta)
    assert not bool(res.optimal)
    assert is_feasible(res.z.numpy(), A, b, None, None) and float(res.value) > 0
    # deterministic: the same z again, in a batch solved on two threads, and by a fresh solver
    batch = s.solve(theta.expand(3, 200))
    fresh = sg.get_solver("ilp", A=A, b=b, deterministic_time_limit=0.1, num_threads=1).solve(theta)
    for r in (batch, fresh):
        assert not bool(r.optimal.any())
        assert torch.equal(r.z, res.z.expand_as(r.z))


def test_wall_clock_time_limit():
    # A shorter effective limit (a loaded machine) only makes a time-out more certain here.
    s = sg.get_solver("ilp", time_limit=0.05, **_subset_sum())
    assert s.time_limit == 0.05 and s.capabilities.map == "approximate"
    with pytest.raises(SolverTimeoutError, match=r"no feasible z within time_limit=0.05 s;"):
        s.map(_theta(60, 0))
    both = sg.get_solver("ilp", time_limit=60.0, deterministic_time_limit=0.01, **_subset_sum())
    with pytest.raises(SolverTimeoutError, match=r"within time_limit=60.0 s and deterministic_time_limit=0.01;"):
        both.map(_theta(60, 0))
    # an easy instance is solved to optimality well inside the limits
    easy = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B, time_limit=60.0, deterministic_time_limit=60.0)
    res = easy.solve(_theta((2, 8), 0))
    assert bool(res.optimal.all())
    assert torch.equal(res.z, sg.get_solver("ilp", A=KNAP_A, b=KNAP_B).map(_theta((2, 8), 0)))


# ----------------------------------------------------------------------------- copying
@pytest.mark.parametrize(
    "opts",
    [
        dict(A=KNAP_A, b=KNAP_B, num_threads=2, deterministic_time_limit=30.0),
        dict(A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6)),
        dict(A_eq=GRID3[0], b_eq=GRID3[1]),
        dict(A=WINDOWS, b=[2, 2, 2, 1]),
        dict(A=[[0.25, 0.5, 0.75]], b=[1.0]),
        dict(A=np.zeros((1, 3)), b=[-1]),  # an all-zero row that excludes 0
    ],
    ids=["cp-sat", "assignment", "min-cost-flow", "lp-first", "real-valued", "infeasible"],
)
def test_deepcopy_and_pickle(opts):
    s = sg.get_solver("ilp", **opts)
    theta = _theta((4, s.n), 21)
    copies = [copy.deepcopy(s), pickle.loads(pickle.dumps(s)), copy.deepcopy({"solver": s})["solver"]]
    for c in copies:
        assert type(c) is type(s) and c is not s and repr(c) == repr(s)
        assert c.name == "ilp" and c.method == s.method and c.capabilities == s.capabilities
        assert c._backend is not s._backend and c._cpsat._base is not s._cpsat._base
        assert np.array_equal(c.A, s.A) and np.array_equal(c.b_eq, s.b_eq) and np.array_equal(c.row_scale, s.row_scale)
        if s._infeasible is None:
            assert torch.equal(c.map(theta), s.map(theta))
            assert torch.equal(c.map(theta), c.map(theta))  # the copy's model pool is reused
        else:
            for solver in (s, c):
                with pytest.raises(InfeasibleError, match="all zeros"):
                    solver.map(theta)
    again = pickle.loads(pickle.dumps(copies[0]))  # a copy of a copy
    assert repr(again) == repr(s) and again._cpsat._lock is not copies[0]._cpsat._lock


# ----------------------------------------------------------------------------- bad arguments
BAD_OPTIONS = [
    (dict(A=[1, 2, 3], b=[1]), ShapeError, r"A: expected a 2-D array of shape \(m, n\), got shape \(3,\)"),
    (dict(A=np.ones((2, 3)), b=[1]), ShapeError, r"b: expected shape \(2,\), one entry per row of A \(2, 3\), got \(1,\)"),
    (dict(A=np.ones((2, 3)), b=np.ones((2, 1))), ShapeError, r"b: expected a 1-D array"),
    (dict(A=np.ones((1, 3)), b=[1], A_eq=np.ones((1, 4)), b_eq=[1]), ShapeError, r"A_eq: expected 3 columns like A"),
    (dict(A=np.ones((1, 3))), ShapeError, r"b: expected it together with A, got None"),
    (dict(b_eq=[1]), ShapeError, r"A_eq: expected it together with b_eq"),
    (dict(), ShapeError, r"got neither"),
    (dict(A=[[1, 2], [3]], b=[1, 1]), ShapeError, r"A: expected a rectangular array"),
    (dict(A=[[1.0, float("inf")]], b=[1]), DomainError, r"A: expected finite coefficients, got inf at index \(0, 1\)"),
    (dict(A=[[1.0, float("nan")]], b=[1]), DomainError, r"A: expected finite coefficients, got nan"),
    (dict(A=[[1, 1]], b=[float("-inf")]), DomainError, r"b: expected finite coefficients, got -inf"),
    (dict(A=[[2.0**63, 1.0]], b=[1]), DomainError, r"A: expected coefficients of magnitude < 2\^62"),
    (dict(A=[[2**61, 2**61, 2**61]], b=[1]), DomainError, r"A: row 0 has .* expected < 2\^62"),
    (dict(A=[["a", "b"]], b=[1]), DTypeError, r"A: expected real coefficients .* got dtype <U1"),
    (dict(A=np.ones((1, 2), dtype=complex), b=[1]), DTypeError, r"A: expected real coefficients .* complex128"),
    (dict(A=torch.ones(1, 2, dtype=torch.complex64), b=[1]), DTypeError, r"A: expected real coefficients, got dtype torch.complex64"),
    (dict(A=np.ones((1, 2), dtype=np.longdouble), b=[1]), DTypeError, r"A: expected float64 or narrower"),
    (dict(A=[[1, 1]], b=[1], max_denominator=0), DomainError, r"max_denominator: expected an integer >= 1, got 0"),
    (dict(A=[[1, 1]], b=[1], max_denominator=10.0), DTypeError, r"max_denominator: expected an integer, got float"),
    (dict(A=KNAP_A, b=KNAP_B, method="min-cost-flow"), DomainError, r"method: 'min-cost-flow' needs rows with coefficients in"),
    (dict(A=KNAP_A, b=KNAP_B, time_limit=0), DomainError, r"time_limit: expected a value > 0.0, got 0.0"),
    (dict(A=KNAP_A, b=KNAP_B, time_limit=float("inf")), DomainError, r"time_limit: expected a finite number"),
    (dict(A=KNAP_A, b=KNAP_B, time_limit="1"), DTypeError, r"time_limit: expected a number of seconds or None, got str"),
    (dict(A=KNAP_A, b=KNAP_B, deterministic_time_limit=0.0), DomainError, r"deterministic_time_limit: expected a value > 0.0, got 0.0"),
    (dict(A=KNAP_A, b=KNAP_B, deterministic_time_limit=-1), DomainError, r"deterministic_time_limit: expected a value > 0.0, got -1.0"),
    (dict(A=KNAP_A, b=KNAP_B, deterministic_time_limit=float("nan")), DomainError, r"deterministic_time_limit: expected a finite number, got nan"),
    (dict(A=KNAP_A, b=KNAP_B, deterministic_time_limit=True), DTypeError, r"deterministic_time_limit: expected a number of deterministic time units or None, got bool"),
    (dict(A=KNAP_A, b=KNAP_B, num_threads=0), DomainError, r"num_threads: expected an integer >= 1, got 0"),
    (dict(A=KNAP_A, b=KNAP_B, num_threads=1.5), DTypeError, r"num_threads: expected an integer, got float"),
    (dict(A=KNAP_A, b=KNAP_B, num_threads=True), DTypeError, r"num_threads: expected an integer, got bool"),
    (dict(A=KNAP_A, b=KNAP_B, objective_bits=0), DomainError, r"objective_bits: expected an integer >= 1, got 0"),
    (dict(A=KNAP_A, b=KNAP_B, objective_bits=30.0), DTypeError, r"objective_bits: expected an integer, got float"),
    (dict(A=KNAP_A, b=KNAP_B, objective_bits=60), DomainError, r"objective_bits: .*n = 8\), got 60"),
    (dict(A=KNAP_A, b=KNAP_B, method="gurobi"), DomainError, r"method: expected one of 'auto', 'cp-sat', 'assignment', 'min-cost-flow', 'lp-first', got 'gurobi'"),
]


@pytest.mark.parametrize("opts,exc,pattern", BAD_OPTIONS)
def test_bad_options(opts, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sg.get_solver("ilp", **opts)


def test_bad_theta():
    s = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B)
    with pytest.raises(ShapeError, match=r"theta: expected shape \(\*batch, 8\) \(n = 8 columns of A\), got \(2, 7\)"):
        s.map(torch.zeros(2, 7))
    with pytest.raises(ShapeError, match=r"theta: expected at least 1 dimensions"):
        s.map(torch.tensor(1.0))
    th = torch.zeros(2, 8)
    th[1, 3] = float("nan")
    with pytest.raises(DomainError, match=SCORE_POLICY + r" 1 NaN \(first at index \(1, 3\)\)"):
        s.map(th)
    with pytest.raises(DTypeError, match="floating-point"):
        s.map(torch.zeros(8, dtype=torch.long))
    with pytest.raises(DTypeError, match="floating-point"):
        s.solve(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"theta: expected shape \(\*batch, 8\)"):
        s.solve(torch.zeros(3))
    with pytest.raises(sg.UnknownArgumentError, match="unexpected keyword argument"):
        s.map(torch.zeros(8), lengths=3)
    for tup in [(torch.zeros(8), torch.zeros(8)), [torch.zeros(8)]]:
        with pytest.raises(ShapeError, match=r"theta: expected one tensor \(\*batch, \.\.\.\) for solver 'ilp', got a"):
            s.map(tup)


@pytest.mark.parametrize("A,b,expect", [(np.zeros((2, 0)), [0, 3], "ok"), (np.zeros((1, 0)), [-1], "infeasible")])
def test_zero_variables(A, b, expect):
    """n = 0: the empty z is the only candidate; map returns shape (*b, 0), or InfeasibleError."""
    s = sg.get_solver("ilp", A=A, b=b)
    assert s.n == 0
    for shape in [(0,), (3, 0), (2, 4, 0), (0, 0)]:
        theta = torch.zeros(shape, dtype=torch.float32)
        if expect == "ok" or np.prod(shape[:-1]) == 0:  # no instance: nothing to be infeasible
            z = s.map(theta)
            assert z.shape == shape and z.dtype == torch.float32
            res = s.solve(theta)
            assert res.value.shape == shape[:-1] and bool(res.optimal.all())
        else:
            with pytest.raises(InfeasibleError, match=r"A row 0 is all zeros but its right-hand side -1 excludes 0"):
                s.map(theta)
    eq = sg.get_solver("ilp", A_eq=np.zeros((1, 0)), b_eq=[0])
    assert eq.map(torch.zeros(5, 0)).shape == (5, 0)
    with pytest.raises(ShapeError, match=r"theta: expected shape \(\*batch, 0\)"):
        s.map(torch.zeros(3))


def test_inputs_are_copied_not_aliased():
    A = np.array(KNAP_A)
    b = torch.tensor(KNAP_B)
    s = sg.get_solver("ilp", A=A, b=b)
    A[0, 0] = 100
    b[0] = -5
    assert s.A[0, 0] == 3 and s.b[0] == 11
    assert not s.A.flags.writeable
    assert "ILPSolver(n=8, m=2, p=0" in repr(s)


# ----------------------------------------------------------------------------- packaging, devices
def test_import_structgrad_does_not_import_ortools():
    code = (
        "import sys, structgrad as sg; import structgrad.solvers.ilp; sg.list_solvers(); "
        "assert 'ortools' not in sys.modules, 'imported too early'; "
        "sg.get_solver('ilp', A=[[1, 1]], b=[1]); assert 'ortools' in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_theta_gives_cuda_z():
    s = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B)
    theta = _theta((3, 8), 12)
    res = s.solve(theta.cuda())
    assert res.z.device.type == "cuda" and res.value.device.type == "cuda" and res.optimal.device.type == "cuda"
    assert torch.equal(res.z.cpu(), s.map(theta))
