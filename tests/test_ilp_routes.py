"""Tests of the ``ilp`` solver's routes: assignment, min-cost flow, LP first.

Every route agrees with brute-force enumeration on small instances and with CP-SAT
on larger random ones; look-alike instances must not be routed.  Helpers come from
tests/test_ilp.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ilp import (
    KNAP_A,
    KNAP_B,
    NEG,
    ROWS3,
    COLS3,
    assert_optimal,
    assignment_rows,
    feasible_matrix,
    grid_flow,
    is_feasible,
)

import structgrad as sg
from structgrad.errors import DomainError, InfeasibleError


def _theta(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


class Spy:
    """Counts the instances a solver hands to its CP-SAT fallback."""

    def __init__(self, solver):
        self.calls = 0
        inner = solver._cpsat.solve

        def solve(c, neg):
            self.calls += 1
            return inner(c, neg)

        solver._cpsat.solve = solve


def same_values(a, b, theta):
    """Both solvers reach the same objective on every instance (within the scaling tolerance)."""
    za, zb = a.map(theta), b.map(theta)
    th = torch.where(torch.isinf(theta), torch.zeros((), dtype=theta.dtype), theta)
    va, vb = (za * th).sum(-1), (zb * th).sum(-1)
    tol = theta.shape[-1] * th.abs().amax(-1) * 2.0**-29 + 1e-12
    assert ((va - vb).abs() <= tol).all(), (va, vb)
    return za, zb


# ----------------------------------------------------------------------------- assignment (rule 1)
@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 3),
    c=st.integers(1, 3),
    row_eq=st.booleans(),
    col_eq=st.booleans(),
    seed=st.integers(0, 10_000),
    forbid=st.floats(0.0, 0.6),
)
def test_assignment_route_matches_brute_force(r, c, row_eq, col_eq, seed, forbid):
    rows, cols = assignment_rows(r, c)
    ineq = [x for x, eq in ((rows, row_eq), (cols, col_eq)) if not eq]
    eqs = [x for x, eq in ((rows, row_eq), (cols, col_eq)) if eq]
    opts = {}
    if ineq:
        A = np.concatenate(ineq)
        opts.update(A=A, b=np.ones(len(A)))
    if eqs:
        A_eq = np.concatenate(eqs)
        opts.update(A_eq=A_eq, b_eq=np.ones(len(A_eq)))
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(2, r * c, generator=g, dtype=torch.float64)
    theta = torch.where(torch.rand(2, r * c, generator=g) < forbid, torch.tensor(NEG, dtype=torch.float64), theta)
    fast = sg.get_solver("ilp", **opts)
    assert fast.method == "assignment"
    cons = opts.get("A"), opts.get("b"), opts.get("A_eq"), opts.get("b_eq")
    assert_optimal(fast, theta, feasible_matrix(r * c, *cons), *cons)


def test_assignment_rule_look_alikes():
    # coefficient 2; a variable in three rows; an odd cycle: neither assignment nor flow
    assert sg.get_solver("ilp", A=2 * ROWS3, b=2 * np.ones(3)).method == "cp-sat"
    three = np.concatenate([ROWS3, COLS3, np.ones((1, 9), dtype=np.int64)])
    assert sg.get_solver("ilp", A=three, b=np.ones(7)).method == "cp-sat"
    triangle = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])  # rows = nodes of an odd cycle, same signs
    assert sg.get_solver("ilp", A=triangle.T, b=np.ones(3)).method == "cp-sat"
    # right-hand side 2: not an assignment, but a bipartite b-matching: a flow
    assert sg.get_solver("ilp", A=np.concatenate([ROWS3, COLS3]), b=2 * np.ones(6)).method == "min-cost-flow"
    with pytest.raises(DomainError, match="method: 'assignment' needs"):
        sg.get_solver("ilp", A=KNAP_A, b=KNAP_B, method="assignment")
    assert sg.get_solver("ilp", A_eq=np.concatenate([ROWS3, COLS3]), b_eq=np.ones(6), method="assignment").method == "assignment"
    # the overflow condition of rule 1: with many objective bits the next rule takes it
    rows, cols = assignment_rows(30, 30)
    big = dict(A_eq=np.concatenate([rows, cols]), b_eq=np.ones(60), objective_bits=52)
    assert sg.get_solver("ilp", **big).method == "min-cost-flow"
    with pytest.raises(DomainError, match="costs that cannot overflow at objective_bits=52"):
        sg.get_solver("ilp", method="assignment", **big)
    assert sg.get_solver("ilp", **dict(big, objective_bits=30)).method == "assignment"


# ----------------------------------------------------------------------------- min-cost flow (rule 2)
def undirected_grid(r, c):
    """Flow rows of s-t paths on an r x c grid with both directions of every edge (cycles exist)."""
    edges = []
    for i in range(r):
        for j in range(c):
            if j + 1 < c:
                edges.append((i * c + j, i * c + j + 1))
            if i + 1 < r:
                edges.append((i * c + j, (i + 1) * c + j))
    arcs = edges + [(v, u) for u, v in edges]
    A_eq = np.zeros((r * c, len(arcs)), dtype=np.int64)
    for k, (u, v) in enumerate(arcs):
        A_eq[u, k], A_eq[v, k] = 1, -1
    b_eq = np.zeros(r * c, dtype=np.int64)
    b_eq[0], b_eq[-1] = 1, -1
    return A_eq, b_eq


def transportation(supply, demand, eq_supply=True, eq_demand=True):
    """Rows 'ship from i' (all +1) and 'ship to j' (all +1), z[i*len(demand) + j]."""
    rows, cols = assignment_rows(len(supply), len(demand))
    opts, A, b, A_eq, b_eq = {}, [], [], [], []
    for M, rhs, eq in ((rows, supply, eq_supply), (cols, demand, eq_demand)):
        (A_eq if eq else A).append(M)
        (b_eq if eq else b).append(np.asarray(rhs))
    if A:
        opts.update(A=np.concatenate(A), b=np.concatenate(b))
    if A_eq:
        opts.update(A_eq=np.concatenate(A_eq), b_eq=np.concatenate(b_eq))
    return opts


def _cons(opts):
    return opts.get("A"), opts.get("b"), opts.get("A_eq"), opts.get("b_eq")


FLOWS = {
    "grid 3x3 (shortest path)": dict(zip(("A_eq", "b_eq"), grid_flow(3))),
    "undirected grid 2x3 (cycles)": dict(zip(("A_eq", "b_eq"), undirected_grid(2, 3))),
    "transportation 2x3, equalities": transportation([2, 1], [1, 1, 1]),
    "transportation 3x3, supplies <=": transportation([2, 2, 1], [1, 2, 1], eq_supply=False),
    "transportation 2x4, both <=": transportation([3, 2], [1, 2, 1, 1], False, False),
    "b-matching 3x3, <= 2": dict(A=np.concatenate([ROWS3, COLS3]), b=2 * np.ones(6)),
    # node rows as inequalities with both signs: out - in <= 1 at node 0, in - out <= 0 at node 2
    "node inequalities": dict(A=np.array([[1, 1, 0, -1, 0], [0, 0, 1, 1, -1]]), b=[1, 0],
                              A_eq=np.array([[-1, 0, -1, 0, 1]]), b_eq=[0]),
    # bound rows: -z0 <= -1 forces the arc 0->1, 3 z8 <= 2 forbids 4->7, z3 = 1 fixes 1->4
    "grid 3x3 with bound rows": dict(
        A=np.eye(12, dtype=np.int64)[[0, 8]] * np.array([[-1], [3]]), b=[-1, 2],
        A_eq=np.concatenate([grid_flow(3)[0], np.eye(12, dtype=np.int64)[[3]]]), b_eq=np.concatenate([grid_flow(3)[1], [1]]),
    ),
    "free variables and cardinality": dict(A=np.array([[1, 1, 1, 0, 0, 0, 0]]), b=[2]),
}


@pytest.mark.parametrize("name", list(FLOWS))
def test_flow_route_matches_brute_force(name):
    opts = FLOWS[name]
    s = sg.get_solver("ilp", **opts)
    assert s.method == "min-cost-flow"
    spy = Spy(s)
    n = s.n
    Zf = feasible_matrix(n, *_cons(opts))
    theta = _theta((6, n), 1)
    theta[3:] = -theta[3:].abs()  # all-negative scores: the cheapest flow (shortest path)
    theta[5, 1::4] = NEG
    theta[4, :] = NEG  # infeasible unless z = 0 is feasible
    assert_optimal(s, theta, Zf, *_cons(opts))
    assert spy.calls == 0  # every instance was solved by the min-cost-flow solver
    # integer scores tie a lot: still optimal, and each instance's z does not depend on the batch
    ties = torch.randint(-2, 2, (5, n), generator=torch.Generator().manual_seed(2)).double()
    res = assert_optimal(s, ties, Zf, *_cons(opts))
    for i in range(len(res.z)):
        assert torch.equal(res.z[i], s.map(ties[i]))


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_random_flow_systems_match_brute_force(data):
    """Random directed (multi)graphs with dangling arcs and self-loops on the root, rows
    flipped at random, equality and inequality node rows, and a few bound rows."""
    n = data.draw(st.integers(1, 9))
    K = data.draw(st.integers(1, 4))
    ends = data.draw(st.lists(st.tuples(st.integers(-1, K - 1), st.integers(-1, K - 1)), min_size=n, max_size=n))
    S = np.zeros((K, n), dtype=np.int64)
    for j, (u, v) in enumerate(ends):
        if u >= 0:
            S[u, j] += 1
        if v >= 0 and v != u:
            S[v, j] -= 1
        elif v >= 0:
            S[v, j] = 0  # a loop on one node: the variable leaves that row
    S *= np.array(data.draw(st.lists(st.sampled_from([-1, 1]), min_size=K, max_size=K)))[:, None]
    rhs = np.array(data.draw(st.lists(st.integers(-2, 2), min_size=K, max_size=K)))
    is_eq = np.array(data.draw(st.lists(st.booleans(), min_size=K, max_size=K)))
    bounds = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from([-2, -1, 1, 2]), st.integers(-2, 2)), max_size=2))
    Bd = np.zeros((len(bounds), n), dtype=np.int64)
    for r, (j, a, _) in enumerate(bounds):
        Bd[r, j] = a
    A = np.concatenate([S[~is_eq], Bd])
    b = np.concatenate([rhs[~is_eq], [beta for _, _, beta in bounds]]).astype(np.int64)
    A_eq, b_eq = S[is_eq], rhs[is_eq]
    s = sg.get_solver("ilp", A=A, b=b, A_eq=A_eq, b_eq=b_eq, num_threads=1)
    if ((S != 0).sum(0) <= 2).all() and s.method != "assignment":
        assert s.method == "min-cost-flow"  # every such system is a flow (rule 2)
    theta = torch.tensor(data.draw(st.lists(st.lists(st.one_of(st.floats(-5, 5, width=32), st.just(NEG)), min_size=n, max_size=n), min_size=1, max_size=3)), dtype=torch.float64)
    assert_optimal(s, theta, feasible_matrix(n, A, b, A_eq, b_eq), A, b, A_eq, b_eq)


def test_flow_rule_look_alikes_are_not_routed_and_still_solved():
    """Systems that look like flows but are not: the rule must not fire."""
    A_eq, b_eq = grid_flow(3)
    cases = {
        # a coefficient 2 in one conservation row
        "coefficient 2": dict(A_eq=np.where((np.arange(12) == 0)[None] & (A_eq == 1), 2, A_eq), b_eq=b_eq),
        # a variable in three rows (a side constraint across the grid)
        "side constraint": dict(A_eq=A_eq, b_eq=b_eq, A=np.ones((1, 12), dtype=np.int64) * (np.arange(12) % 2), b=[2]),
        # same-sign pairs around an odd cycle: no signing exists
        "odd cycle": dict(A=np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]]), b=[1, 1, 1]),
        # two +1 and one -1 in a column after every signing
        "three nonzeros": dict(A_eq=np.array([[1, 1, 0], [1, 0, 1], [-1, 1, 1]]), b_eq=[1, 1, 1]),
    }
    for name, opts in cases.items():
        s = sg.get_solver("ilp", **opts)
        assert s.method in ("cp-sat", "lp-first"), (name, s.method)
        with pytest.raises(DomainError, match="method: 'min-cost-flow' needs"):
            sg.get_solver("ilp", method="min-cost-flow", **opts)
        assert_optimal(s, _theta((3, s.n), 3), feasible_matrix(s.n, *_cons(opts)), *_cons(opts))


def test_flow_infeasible_instances():
    A_eq, b_eq = grid_flow(3)
    s = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq)
    theta = _theta((2, 12), 4)
    theta[1, A_eq[0] == 1] = NEG  # the source loses both out-arcs
    with pytest.raises(InfeasibleError, match=r"instance \(1,\).*after fixing the variables whose score is -inf"):
        s.map(theta)
    unbalanced = sg.get_solver("ilp", A_eq=A_eq[:, :], b_eq=np.where(np.arange(9) == 8, 0, b_eq))  # a source, no sink
    assert unbalanced.method == "min-cost-flow"
    with pytest.raises(InfeasibleError, match=r"no z in \{0,1\}\^12"):
        unbalanced.map(theta[0])
    # a row that no z can satisfy (net outflow <= -3 with two in-arcs) and a bound row with no value
    never = sg.get_solver("ilp", A=np.array([[-1, -1, 0]]), b=[-3])
    with pytest.raises(InfeasibleError, match="A row 0 cannot hold"):
        never.map(torch.zeros(3))
    clash = sg.get_solver("ilp", A=np.array([[-1, 0], [1, 0]]), b=[-1, 0])  # z0 >= 1 and z0 <= 0
    assert clash.method == "min-cost-flow"
    with pytest.raises(InfeasibleError, match=r"A row 1 leaves z\[0\] no value"):
        clash.map(torch.zeros(2))
    forced = sg.get_solver("ilp", A=np.array([[-1, 0]]), b=[-1])  # z0 = 1 forced, then forbidden
    with pytest.raises(InfeasibleError):
        forced.map(torch.tensor([NEG, 1.0]))


def test_flow_cost_overflow_falls_back_to_cpsat():
    A_eq, b_eq = grid_flow(3)
    s = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq, objective_bits=58)  # costs ~2^57: the flow solver refuses
    assert s.method == "min-cost-flow"
    spy = Spy(s)
    theta = -1.0 - _theta((2, 12), 5).abs() / 4  # every |theta| in [1, 2): every cost >= 2^56
    assert_optimal(s, theta, feasible_matrix(12, A_eq=A_eq, b_eq=b_eq), A_eq=A_eq, b_eq=b_eq)
    assert spy.calls == 2


def test_flow_and_lp_routes_agree_with_cpsat_on_larger_instances():
    g = torch.Generator().manual_seed(6)
    A_eq, b_eq = grid_flow(5)  # 40 edge variables
    tr = transportation([3, 2, 4, 1, 2], [2, 2, 2, 2, 2, 2], eq_supply=True, eq_demand=True)
    windows = np.array([[1 if i <= j < i + 4 else 0 for j in range(30)] for i in range(27)])
    cases = [
        (dict(A_eq=A_eq, b_eq=b_eq), -torch.rand(16, 40, generator=g, dtype=torch.float64), "min-cost-flow"),
        (tr, torch.randn(16, 30, generator=g, dtype=torch.float64), "min-cost-flow"),
        (dict(A=windows, b=2 * np.ones(27)), torch.randn(16, 30, generator=g, dtype=torch.float64), "lp-first"),
        (dict(A=-windows, b=-np.ones(27)), torch.randn(16, 30, generator=g, dtype=torch.float64), "lp-first"),  # at least one per window
    ]
    for opts, theta, method in cases:
        theta[::5, ::7] = NEG
        fast = sg.get_solver("ilp", **opts)
        assert fast.method == method
        spy = Spy(fast)
        same_values(fast, sg.get_solver("ilp", method="cp-sat", **opts), theta)
        assert spy.calls == 0
        lp = sg.get_solver("ilp", method="lp-first", num_threads=2, **opts)
        za, _ = same_values(lp, fast, theta)
        for z in za.numpy():
            assert is_feasible(z, *_cons(opts))


# ----------------------------------------------------------------------------- LP first (rule 3)
def test_lp_first_interval_rows_are_certified_without_cpsat():
    windows = np.array([[1 if i <= j < i + 3 else 0 for j in range(8)] for i in range(6)])
    for opts in (dict(A=windows, b=[1, 2, 1, 2, 1, 2]), dict(A=-windows, b=-np.ones(6)),
                 dict(A=np.concatenate([windows, -windows]), b=np.concatenate([2 * np.ones(6), -np.ones(6)]))):
        s = sg.get_solver("ilp", **opts)
        assert s.method == "lp-first"
        spy = Spy(s)
        assert_optimal(s, _theta((8, 8), 7), feasible_matrix(8, *_cons(opts)), *_cons(opts))
        assert spy.calls == 0


def test_lp_first_falls_back_when_the_lp_is_fractional():
    s = sg.get_solver("ilp", A=KNAP_A, b=KNAP_B, method="lp-first", num_threads=2)
    spy = Spy(s)
    theta = _theta((6, 8), 8).abs()  # all positive: the knapsack rows bind, the LP optimum is fractional
    assert_optimal(s, theta, feasible_matrix(8, KNAP_A, KNAP_B), KNAP_A, KNAP_B)
    assert spy.calls >= 1


def test_lp_first_with_more_objective_bits_than_float64_holds_uses_cpsat():
    A_eq, b_eq = grid_flow(3)
    s = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq, method="lp-first", objective_bits=56)
    spy = Spy(s)
    assert_optimal(s, -_theta((2, 12), 10).abs(), feasible_matrix(12, A_eq=A_eq, b_eq=b_eq), A_eq=A_eq, b_eq=b_eq)
    assert spy.calls == 2  # costs up to 2^56 are not exact in float64: no certificate is attempted


def test_lp_certificate_rejects_a_worse_integral_z():
    A_eq, b_eq = grid_flow(3)
    s = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq, method="lp-first")
    backend = s._backend
    from structgrad.solvers._ilp_models import scale_objective

    theta = -_theta((1, 12), 9).abs()
    c = scale_objective(theta.numpy(), 30)[0][0]
    slot = backend._acquire()
    z, y = backend._lp_solve(slot, c, backend.bounds.hi, True)
    lo, hi = backend.bounds.lo, backend.bounds.hi
    assert z is not None and backend._certified(c, z, y, lo, hi)
    others = [zz for zz in feasible_matrix(12, A_eq=A_eq, b_eq=b_eq) if c @ zz < c @ z]
    assert others
    for worse in others:
        assert not backend._certified(c, worse, y, lo, hi)
    assert not backend._certified(c, z, np.zeros_like(y), lo, hi)  # no duals: U is a trivial bound
