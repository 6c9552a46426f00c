"""Recognition rules of the ``ilp`` solver: which backend a constraint system goes to.

All rules read the integer system (after the exact rational scaling of
:mod:`._ilp_constraints`), once, in ``get_solver``.  With ``method="auto"`` they are
tried in this order and the first that holds picks the route (``solver.method``):

**Bound rows.**  A row with exactly one nonzero coefficient (a·z_j ≤ β or a·z_j = β)
only restricts z_j to the values v ∈ {0, 1} with a·v ≤ β (= β): it fixes z_j to 0 or
to 1, or does nothing, or (no value left) makes every instance infeasible.  The
flow and LP routes read bound rows as variable bounds; the rules below speak of the
other rows, the *structural* rows (all-zero rows are handled separately).

1. **Assignment** (``"assignment"``, OR-Tools' linear sum assignment): every
   coefficient of every row is 0 or 1, every row has a 1 and right-hand side 1 (rows
   of ``A`` read "at most one", rows of ``A_eq`` "exactly one"); every variable is in
   exactly two rows; the rows split into two groups with each variable in one row of
   each (the graph with rows as nodes and variables as edges is bipartite), no two
   variables sharing both rows; and the solver's cost scaling cannot overflow int64:
   2^P·(N + 1)·(2N + 1)·4 < 2^63 (N nodes a side, P = ``objective_bits``).
2. **Network flow** (``"min-cost-flow"``, OR-Tools' min-cost-flow solver): every
   structural row has coefficients in {−1, 0, +1}; every variable has at most two
   nonzeros among the structural rows; and the rows can be given signs σ_r = ±1 such
   that, after multiplying each row by its sign, every variable has at most one +1
   and at most one −1 (a variable with two nonzeros of the same sign needs opposite
   signs on its two rows, of opposite signs equal ones: a 2-colouring, found by
   search).  The signed rows are then the node–arc incidence matrix of a directed
   graph: each structural row is a node r, each variable an arc from its +1 row to
   its −1 row, a missing end being a root node ρ; row r reads
   σ_r·(outflow(r) − inflow(r)) ≤ β_r (or = β_r).  Node r gets supply σ_r·β_r, ρ gets
   minus their sum, variable arcs capacity 1 (0 where fixed to 0; a variable fixed
   to 1 has its unit moved into the supplies), and an inequality row a zero-cost
   slack arc r → ρ (σ_r = +1) or ρ → r (σ_r = −1) of capacity β_r + (its inflow arcs,
   resp. outflow arcs).  Feasible flows of this network and z ∈ 𝒵 correspond one to
   one (z = the flows on the variable arcs), and a min-cost flow with unit costs −c
   is an optimal z (the matrix is totally unimodular, so integral flows are exact).
   This covers shortest paths and flows written as conservation rows (with ≤ rows
   for capacities at nodes), transportation problems with supplies and demands
   written with all coefficients +1, bipartite b-matchings, cardinality rows.
3. **Interval rows, LP first** (``"lp-first"``, GLOP then CP-SAT): every structural
   row has all its nonzero coefficients equal to +1, or all equal to −1, in
   consecutive columns (an interval matrix up to row signs, totally unimodular), so
   every vertex of the LP relaxation is integral and the LP optimum found by the
   simplex method is the ILP optimum (the route still checks it; see
   :mod:`._ilp_models`).  "At most k in every window of w consecutive variables".
4. Otherwise **CP-SAT** (``"cp-sat"``).

The rules are sufficient conditions, read from the rows as given (a row is not
divided by the gcd of its coefficients: 2·z_1 + 2·z_2 ≤ 2 is not a flow row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._ilp_constraints import ConstraintSystem

__all__ = ["Bounds", "variable_bounds", "AssignmentPlan", "detect_assignment", "FlowPlan", "detect_flow", "is_interval"]


# ----------------------------------------------------------------------------- bound rows
@dataclass(frozen=True)
class Bounds:
    """Variable bounds from the bound rows (rows with one nonzero coefficient)."""

    rows: np.ndarray  # (R,) bool over system.rows: the bound rows
    lo: np.ndarray  # (n,) int64 in {0, 1}
    hi: np.ndarray  # (n,) int64 in {0, 1}
    infeasible: str | None  # a reason when a bound row leaves no value


def variable_bounds(system: ConstraintSystem) -> Bounds:
    """Read the bound rows of ``system`` (see the module docstring)."""
    rows, rhs, is_eq = system.rows, system.rhs, system.is_eq
    n = system.n
    lo, hi = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    single = (rows != 0).sum(1) == 1
    reason = None
    for r in np.flatnonzero(single):
        j = int(np.flatnonzero(rows[r])[0])
        a, beta = int(rows[r, j]), int(rhs[r])
        ok = [v for v in (0, 1) if (a * v == beta if is_eq[r] else a * v <= beta)]
        lo[j], hi[j] = max(lo[j], min(ok, default=1)), min(hi[j], max(ok, default=0))
        if reason is None and lo[j] > hi[j]:
            reason = f"{system.row_name(int(r))} leaves z[{j}] no value in {{0, 1}} (with the other rows on z[{j}] alone)"
    for arr in (lo, hi, single):
        arr.setflags(write=False)
    return Bounds(single, lo, hi, reason)


def _structural(system: ConstraintSystem, bounds: Bounds) -> np.ndarray:
    """Indices of the structural rows: neither bound rows nor all-zero rows."""
    return np.flatnonzero(~bounds.rows & system.rows.any(1))


# ----------------------------------------------------------------------------- 1. assignment
@dataclass(frozen=True)
class AssignmentPlan:
    """The bipartite graph of an assignment-structured problem (rule 1)."""

    num_left: int  # left nodes of the graph the solver runs on (= right nodes)
    tails: np.ndarray  # (n,) int32 left node of each variable's arc
    heads: np.ndarray  # (n,) int32 right node of each variable's arc
    mirror_tails: np.ndarray  # (n,) int32 or empty: mirror arc of each variable (doubled graph)
    mirror_heads: np.ndarray
    slack_tails: np.ndarray  # zero-cost slack arcs (doubled graph)
    slack_heads: np.ndarray
    infeasible: str | None  # a reason when no assignment can exist whatever θ is


def _two_colour(num: int, edges: list[tuple[int, int, int]]) -> np.ndarray | None:
    """Colours in {0, 1} of ``num`` nodes with colour[u] ^ colour[v] == parity for every
    edge (u, v, parity), or None if there are none."""
    adj: list[list[tuple[int, int]]] = [[] for _ in range(num)]
    for u, v, par in edges:
        adj[u].append((v, par))
        adj[v].append((u, par))
    colour = np.full(num, -1)
    for start in range(num):
        if colour[start] >= 0:
            continue
        colour[start] = 0
        stack = [start]
        while stack:
            u = stack.pop()
            for v, par in adj[u]:
                want = colour[u] ^ par
                if colour[v] < 0:
                    colour[v] = want
                    stack.append(v)
                elif colour[v] != want:
                    return None
    return colour


def detect_assignment(system: ConstraintSystem, objective_bits: int) -> AssignmentPlan | None:
    """The assignment plan of ``system`` (rule 1), or None if the rule does not hold."""
    rows, rhs, is_eq, n = system.rows, system.rhs, system.is_eq, system.n
    if n == 0 or rows.shape[0] == 0:
        return None
    if not np.isin(rows, (0, 1)).all() or not (rhs == 1).all():
        return None
    if (rows.sum(1) == 0).any() or not (rows.sum(0) == 2).all():
        return None
    r_of = np.sort(np.argwhere(rows.T == 1)[:, 1].reshape(n, 2), axis=1)  # the two rows of each variable
    if len({(int(a), int(b)) for a, b in r_of}) != n:
        return None  # two variables share both rows
    R = rows.shape[0]
    colour = _two_colour(R, [(int(a), int(b), 1) for a, b in r_of])
    if colour is None:
        return None  # odd cycle: not bipartite
    left, right = np.flatnonzero(colour == 0), np.flatnonzero(colour == 1)
    L, Rn = len(left), len(right)
    N = L if is_eq.all() else L + Rn
    if 2.0**objective_bits * (N + 1) * (2 * N + 1) * 4 >= 2.0**63:
        return None
    index = np.empty(R, dtype=np.int64)
    index[left] = np.arange(L)
    index[right] = np.arange(Rn)
    first_left = colour[r_of[:, 0]] == 0
    lrow = np.where(first_left, r_of[:, 0], r_of[:, 1])
    rrow = np.where(first_left, r_of[:, 1], r_of[:, 0])
    tails, heads = index[lrow].astype(np.int32), index[rrow].astype(np.int32)
    empty = np.zeros(0, dtype=np.int32)
    if is_eq.all():
        reason = None
        if L != Rn:
            reason = (
                f"the equality rows form a bipartite assignment with {L} rows on one side and {Rn} on the "
                f"other; 'exactly one' on every row needs equal sides"
            )
        return AssignmentPlan(L, tails, heads, empty, empty, empty, empty, reason)
    # doubled graph: left = L rows + Rn copies j', right = Rn rows + L copies i'
    mt, mh = (L + heads).astype(np.int32), (Rn + tails).astype(np.int32)
    le = np.flatnonzero(~is_eq[left])  # 'at most one' left rows i -> (i, Rn + i)
    re = np.flatnonzero(~is_eq[right])  # 'at most one' right rows j -> (L + j, j)
    st = np.concatenate([le, L + re]).astype(np.int32)
    sh = np.concatenate([Rn + le, re]).astype(np.int32)
    return AssignmentPlan(L + Rn, tails, heads, mt, mh, st, sh, None)


# ----------------------------------------------------------------------------- 2. network flow
@dataclass(frozen=True)
class FlowPlan:
    """The network of a flow-structured problem (rule 2); node ``num_nodes - 1`` is the root."""

    num_nodes: int
    tails: np.ndarray  # (n + s,) int32: the n variable arcs, then the s slack arcs
    heads: np.ndarray  # (n + s,) int32
    capacities: np.ndarray  # (n + s,) int64: 1 (0 for a variable fixed by a bound row), slack capacities
    supplies: np.ndarray  # (num_nodes,) int64, the units of variables fixed to 1 already moved
    lo: np.ndarray  # (n,) int64: 1 where a bound row fixes the variable to 1 (its arc has capacity 0)
    infeasible: str | None  # a reason when no z is feasible whatever θ is


def detect_flow(system: ConstraintSystem, bounds: Bounds) -> FlowPlan | None:
    """The network of ``system`` (rule 2), or None if the rule does not hold."""
    n = system.n
    if n == 0:
        return None
    srows = _structural(system, bounds)
    S = system.rows[srows]
    if not np.isin(S, (-1, 0, 1)).all():
        return None
    per_col = (S != 0).sum(0)
    if (per_col > 2).any():
        return None
    K = len(srows)
    edges = []
    for j in np.flatnonzero(per_col == 2):
        r0, r1 = np.flatnonzero(S[:, j])
        edges.append((int(r0), int(r1), int(S[r0, j] == S[r1, j])))  # same sign: opposite row signs
    colour = _two_colour(K, edges)
    if colour is None:
        return None
    sigma = np.where(colour == 0, 1, -1).astype(np.int64)
    inc = S * sigma[:, None]  # node-arc incidence: +1 tail, -1 head
    root = K
    tails = np.full(n, root, dtype=np.int64)
    heads = np.full(n, root, dtype=np.int64)
    r_pos, c_pos = np.nonzero(inc == 1)
    tails[c_pos] = r_pos
    r_neg, c_neg = np.nonzero(inc == -1)
    heads[c_neg] = r_neg
    beta = system.rhs[srows]
    supplies = np.zeros(K + 1, dtype=np.int64)
    supplies[:K] = sigma * beta
    # slack arcs of the inequality rows
    ineq = np.flatnonzero(~system.is_eq[srows])
    n_in = (inc == -1).sum(1)
    n_out = (inc == 1).sum(1)
    cap = beta[ineq] + np.where(sigma[ineq] > 0, n_in[ineq], n_out[ineq])
    reason = bounds.infeasible
    if reason is None and (cap < 0).any():
        r = int(srows[ineq[int(np.argmax(cap < 0))]])
        reason = f"{system.row_name(r)} cannot hold for any z in {{0,1}}^{n}"
    st = np.where(sigma[ineq] > 0, ineq, root)
    sh = np.where(sigma[ineq] > 0, root, ineq)
    lo, hi = bounds.lo, bounds.hi
    vcap = (hi - lo).clip(0)  # a fixed variable's arc carries no free flow
    forced = np.flatnonzero(lo == 1)
    np.subtract.at(supplies, tails[forced], 1)
    np.add.at(supplies, heads[forced], 1)
    supplies[root] = 0
    supplies[root] = -supplies[:K].sum()
    plan = FlowPlan(
        num_nodes=K + 1,
        tails=np.concatenate([tails, st]).astype(np.int32),
        heads=np.concatenate([heads, sh]).astype(np.int32),
        capacities=np.concatenate([vcap, cap.clip(0)]).astype(np.int64),
        supplies=supplies,
        lo=lo,
        infeasible=reason,
    )
    for arr in (plan.tails, plan.heads, plan.capacities, plan.supplies):
        arr.setflags(write=False)
    return plan


# ----------------------------------------------------------------------------- 3. interval rows
def is_interval(system: ConstraintSystem, bounds: Bounds) -> bool:
    """Rule 3: every structural row is ±(0…0 1…1 0…0)."""
    if system.n == 0:
        return False
    for r in _structural(system, bounds):
        row = system.rows[r]
        nz = np.flatnonzero(row)
        if abs(int(row[nz[0]])) != 1 or not (row[nz] == row[nz[0]]).all() or nz[-1] - nz[0] + 1 != len(nz):
            return False
    return True
