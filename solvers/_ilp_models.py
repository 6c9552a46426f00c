"""Backends of the ``ilp`` solver: CP-SAT, linear sum assignment, min-cost flow, LP first.

Each backend is built once from the constraint system (in ``get_solver``) and solves
one instance at a time: ``solve(c, neg) -> (z, status)`` with ``c (n,)`` the integer
objective (maximised), ``neg (n,)`` bool the variables whose score is −inf (fixed to 0;
``None`` when there are none), ``z (n,)`` int64.  Only the costs (and the fixings) change per call.

* :class:`CpSat`: a pristine ``CpModel`` and a pool of copies, one per thread in use;
  a call replaces the objective and the fixed variables' domains of its copy.
  CP-SAT releases the GIL while it solves, so a batch runs on threads.
* :class:`Assignment` and :class:`MinCostFlow`: the arc arrays are built once; a call
  fills a fresh OR-Tools solver object from them with vectorised calls (their Python
  bindings have no way to change a cost in place) and reads the result back.  These
  bindings hold the GIL while they solve, so a batch runs on one thread (threads
  would add overhead and no speed).  They fall back to CP-SAT for an instance whose
  costs the solver reports could overflow its cost scaling, and the assignment route
  also for one it reports infeasible (its infeasibility check is a heuristic that
  errs on some sparse graphs).
* :class:`LpFirst`: the LP relaxation max cᵀx, G x ≤ h, E x = e, lo ≤ x ≤ hi (bound
  rows as variable bounds) in GLOP through ``pywraplp``, one model per thread (GLOP
  releases the GIL), solved from scratch each call (no warm start, so the result does
  not depend on earlier calls).  Its solution x is rounded to z = round(x); z is
  returned only if it is **feasible** (exact integer arithmetic) and **certified
  optimal**: for the duals λ = (y, w) GLOP reports (y clipped to ≥ 0), weak duality
  gives, for every feasible z' (integral or not),

      cᵀz' ≤ U(λ) = yᵀh + wᵀe + Σ_j max(d_j·lo_j, d_j·hi_j),   d = c − Gᵀy − Eᵀw,

  since cᵀz' = yᵀ(Gz' − h) + wᵀ(Ez' − e) + yᵀh + wᵀe + dᵀz' with yᵀ(Gz' − h) ≤ 0.  U is
  evaluated in float64 with a bound ε on its rounding error (γ-bounds of the dot
  products); c and z are integral, so cᵀz > U + ε − 1 proves that no integral z' beats
  z.  When z is integral and optimal for the LP (the LP's feasible set contains the
  ILP's, so an integral LP optimum is an ILP optimum) the certificate holds with exact
  duals, and GLOP's float duals miss by far less than 1 at the objective's scale
  (|c_j| < 2^P).  Anything else (fractional, infeasible or uncertified z, an LP status
  other than optimal; and every instance when P > 52 or a row does not fit float64
  exactly, since the error bound assumes exact data) goes to CP-SAT: no unchecked or
  fractional z is returned.

Status codes: :data:`OPTIMAL`, :data:`FEASIBLE` (a time limit stopped CP-SAT with a
solution), :data:`INFEASIBLE`, :data:`TIMEOUT` (no solution within the limit), :data:`OTHER`.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from typing import Any, Callable

import numpy as np

from structgrad.errors import DomainError

from ._ilp_constraints import ConstraintSystem
from ._ilp_routing import AssignmentPlan, Bounds, FlowPlan

__all__ = [
    "OPTIMAL", "FEASIBLE", "INFEASIBLE", "TIMEOUT", "OTHER",
    "CpSat", "Assignment", "MinCostFlow", "LpFirst", "run_batch", "available_cores", "scale_objective",
]

OPTIMAL, FEASIBLE, INFEASIBLE, TIMEOUT, OTHER = range(5)
_U = 2.0**-53  # unit roundoff of float64


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def scale_objective(theta: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The integer objective ``c (B, n)`` of θ ``(B, n)`` float64 (n ≥ 1) and the −inf mask
    (``None`` when every score is finite): c = round(θ · 2^(bits − k)) per instance, with
    max |finite θ| = f·2^k, f ∈ [1/2, 1) (multiplying by a power of two is exact; only
    the rounding loses anything).  Non-finite entries give 0.  A handful of array
    operations in the common all-finite case: this runs on every call."""
    if theta.shape[0] == 1:  # one instance: Python floats, five array operations in all
        m = float(np.abs(theta).max())
        if m < math.inf:
            return np.rint(theta * math.ldexp(1.0, bits - math.frexp(m)[1])).astype(np.int64), None
    absmax = np.abs(theta).max(axis=1)
    neg = None
    if not absmax.max() < np.inf:  # -inf (or unchecked NaN/+inf) scores: count them as 0
        neg = theta == -np.inf
        theta = np.where(np.isfinite(theta), theta, 0.0)
        absmax = np.abs(theta).max(axis=1)
    if absmax.shape[0] == 1:
        scale = math.ldexp(1.0, bits - math.frexp(float(absmax[0]))[1])
        return np.rint(theta * scale).astype(np.int64), neg
    _, k = np.frexp(absmax)  # k = 0 for an all-zero instance, whose c is 0 anyway
    return np.rint(np.ldexp(theta, (bits - k)[:, None])).astype(np.int64), neg


def run_batch(solve: Callable[[int], None], B: int, workers: int) -> None:
    """Call ``solve(i)`` for i < B on ``workers`` threads (the caller's included), each
    pulling the next index; the first exception is re-raised after all have stopped."""
    if workers <= 1 or B <= 1:
        for i in range(B):
            solve(i)
        return
    counter = itertools.count()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in iter(counter.__next__, None):
                if i >= B or errors:
                    return
                solve(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=work, name="structgrad-ilp", daemon=True) for _ in range(min(workers, B) - 1)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- CP-SAT
class _Slot:
    """One CP-SAT model and solver, used by one thread at a time."""

    __slots__ = ("model", "proto", "solver")

    def __init__(self, model: Any, solver: Any):
        self.model = model
        self.proto = model.proto
        self.solver = solver


class CpSat:
    """CP-SAT with one worker per solve and optional time limits (see module docstring)."""

    releases_gil = True

    def __init__(self, system: ConstraintSystem, time_limit: float | None, deterministic_time_limit: float | None):
        from ortools.sat.python import cp_model  # lazy: `import structgrad` never imports ortools

        self._cp = cp_model
        self.n = system.n
        self.time_limit = time_limit
        self.deterministic_time_limit = deterministic_time_limit
        rows, rhs, is_eq = system.rows, system.rhs, system.is_eq
        model = cp_model.CpModel()
        x = [model.new_bool_var(f"z{i}") for i in range(self.n)]
        lo64 = -(2**63)
        for r in range(rows.shape[0]):
            nz = np.flatnonzero(rows[r])
            if nz.size == 0:
                continue  # all-zero rows: ConstraintSystem.empty_row_infeasible
            expr = cp_model.LinearExpr.weighted_sum([x[j] for j in nz], rows[r, nz].tolist())
            model.add_linear_constraint(expr, int(rhs[r]) if is_eq[r] else lo64, int(rhs[r]))
        obj = model.proto.objective
        obj.vars.extend(range(self.n))
        obj.coeffs.extend([0] * self.n)
        msg = model.validate()
        if msg:
            raise DomainError(f"A: OR-Tools rejected the model: {msg.splitlines()[0]}")
        # The pristine model is never solved or edited, so copies of it are clean even
        # while other threads change their own copy's objective and variable bounds.
        self._base = model
        self._slots: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._slots.put(self._new_slot(model.clone()))

    def _new_slot(self, model: Any) -> _Slot:
        solver = self._cp.CpSolver()
        solver.parameters.num_workers = 1
        if self.time_limit is not None:
            solver.parameters.max_time_in_seconds = self.time_limit
        if self.deterministic_time_limit is not None:
            solver.parameters.max_deterministic_time = self.deterministic_time_limit
        return _Slot(model, solver)

    def _acquire(self) -> _Slot:
        try:
            return self._slots.get_nowait()
        except queue.Empty:
            with self._lock:
                return self._new_slot(self._base.clone())

    def solve(self, c: np.ndarray, neg: np.ndarray | None) -> tuple[np.ndarray, int]:
        cp = self._cp
        slot = self._acquire()
        try:
            proto = slot.proto
            coeffs = proto.objective.coeffs
            coeffs.clear()
            coeffs.extend((-c).tolist())  # CP-SAT minimises
            fixed = np.flatnonzero(neg) if neg is not None else ()
            for j in fixed:
                dom = proto.variables[int(j)].domain
                dom.clear()
                dom.extend([0, 0])
            try:
                st = slot.solver.solve(slot.model)
            finally:
                for j in fixed:
                    dom = proto.variables[int(j)].domain
                    dom.clear()
                    dom.extend([0, 1])
            if st == cp.OPTIMAL or st == cp.FEASIBLE:
                z = np.fromiter(slot.solver.response_proto.solution, dtype=np.int64, count=self.n)
                return z, (OPTIMAL if st == cp.OPTIMAL else FEASIBLE)
            zero = np.zeros(self.n, dtype=np.int64)
            if st == cp.INFEASIBLE:
                return zero, INFEASIBLE
            limited = self.time_limit is not None or self.deterministic_time_limit is not None
            if st == cp.UNKNOWN and limited:
                return zero, TIMEOUT
            return zero, OTHER  # pragma: no cover
        finally:
            self._slots.put(slot)


# ----------------------------------------------------------------------------- assignment
class Assignment:
    """OR-Tools' linear sum assignment on the graph of an :class:`AssignmentPlan`."""

    releases_gil = False

    def __init__(self, plan: AssignmentPlan, fallback: CpSat):
        from ortools.graph.python import linear_sum_assignment

        self._lsa = linear_sum_assignment
        self.plan = plan
        self.fallback = fallback
        self.n = len(plan.tails)
        self._tails = np.concatenate([plan.tails, plan.mirror_tails, plan.slack_tails])  # every arc, no -inf
        self._heads = np.concatenate([plan.heads, plan.mirror_heads, plan.slack_heads])

    def solve(self, c: np.ndarray, neg: np.ndarray | None) -> tuple[np.ndarray, int]:
        plan, n = self.plan, self.n
        if plan.infeasible is not None:
            return np.zeros(n, dtype=np.int64), INFEASIBLE
        if neg is None:
            tails, heads, keep = self._tails, self._heads, None
            costs = np.zeros(len(tails), dtype=np.int64)
            np.negative(c, out=costs[:n])
        else:
            keep = ~neg
            mirror = plan.mirror_tails.size > 0
            tails = np.concatenate([plan.tails[keep], plan.mirror_tails[keep] if mirror else plan.mirror_tails, plan.slack_tails])
            heads = np.concatenate([plan.heads[keep], plan.mirror_heads[keep] if mirror else plan.mirror_heads, plan.slack_heads])
            costs = np.zeros(len(tails), dtype=np.int64)
            costs[: int(keep.sum())] = -c[keep]
        lsa = self._lsa.SimpleLinearSumAssignment()
        lsa.add_arcs_with_cost(tails, heads, costs)
        if lsa.num_nodes() != plan.num_left:
            return np.zeros(n, dtype=np.int64), INFEASIBLE  # a left node lost all its arcs
        st = lsa.solve()
        if st != lsa.OPTIMAL:
            # POSSIBLE_OVERFLOW, or INFEASIBLE, which this solver's heuristic infeasibility
            # check also reports for some feasible sparse graphs (OR-Tools 9.15 logs
            # "Infeasibility detection triggered after first iteration found a feasible
            # assignment!"): CP-SAT decides.
            return self.fallback.solve(c, neg)
        mate = np.array([lsa.right_mate(i) for i in range(plan.num_left)], dtype=np.int64)
        z = (mate[plan.tails] == plan.heads).view(np.int8).astype(np.int64)
        if keep is not None:
            z &= keep
        return z, OPTIMAL


# ----------------------------------------------------------------------------- min-cost flow
class MinCostFlow:
    """OR-Tools' min-cost-flow solver on the network of a :class:`FlowPlan`."""

    releases_gil = False

    def __init__(self, plan: FlowPlan, fallback: CpSat):
        from ortools.graph.python import min_cost_flow

        self._mcf = min_cost_flow
        self.plan = plan
        self.fallback = fallback
        self.n = len(plan.lo)
        self._nodes = np.arange(plan.num_nodes, dtype=np.int32)
        self._arcs = np.arange(self.n, dtype=np.int32)
        self._fixed1 = plan.lo.astype(bool)
        self._any_fixed1 = bool(self._fixed1.any())
        self._slack = len(plan.tails) > self.n

    def solve(self, c: np.ndarray, neg: np.ndarray | None) -> tuple[np.ndarray, int]:
        plan, n = self.plan, self.n
        caps = plan.capacities
        if neg is not None:
            if self._any_fixed1 and (neg & self._fixed1).any():
                return np.zeros(n, dtype=np.int64), INFEASIBLE
            caps = caps.copy()
            caps[:n][neg] = 0
        if plan.infeasible is not None:
            return np.zeros(n, dtype=np.int64), INFEASIBLE
        if self._slack:
            costs = np.zeros(len(plan.tails), dtype=np.int64)
            np.negative(c, out=costs[:n])
        else:
            costs = -c
        f = self._mcf.SimpleMinCostFlow()
        f.add_arcs_with_capacity_and_unit_cost(plan.tails, plan.heads, caps, costs)
        f.set_nodes_supplies(self._nodes, plan.supplies)
        st = f.solve()
        if st == f.OPTIMAL:
            z = f.flows(self._arcs)
            return (z + plan.lo if self._any_fixed1 else z), OPTIMAL
        if st == f.INFEASIBLE:
            return np.zeros(n, dtype=np.int64), INFEASIBLE
        return self.fallback.solve(c, neg)  # BAD_COST_RANGE: possible overflow


# ----------------------------------------------------------------------------- LP first
class _LpSlot:
    __slots__ = ("solver", "x", "cts", "obj", "hi")

    def __init__(self, solver: Any, x: list, cts: list, obj: Any, hi: np.ndarray):
        self.solver, self.x, self.cts, self.obj, self.hi = solver, x, cts, obj, hi


class LpFirst:
    """GLOP on the LP relaxation, certified, else CP-SAT (see the module docstring)."""

    releases_gil = True

    def __init__(self, system: ConstraintSystem, bounds: Bounds, fallback: CpSat, objective_bits: int = 30):
        from ortools.linear_solver import linear_solver_pb2, pywraplp

        self._lp, self._pb = pywraplp, linear_solver_pb2
        self.system = system
        self.bounds = bounds
        self.fallback = fallback
        self.n = system.n
        keep = np.flatnonzero(~bounds.rows & system.rows.any(1))
        rows, rhs = system.rows[keep], system.rhs[keep]
        # the certificate's error bound needs the rows and the costs (|c| < 2^objective_bits) exact in float64
        self._exact = bool((np.abs(rows) < 2**53).all() and (np.abs(rhs) < 2**53).all() and objective_bits <= 52)
        self._M = rows.astype(np.float64)  # (k, n), the structural rows; bound rows are variable bounds
        self._MT = np.ascontiguousarray(self._M.T)
        self._r = rhs.astype(np.float64)
        self._ineq = ~system.is_eq[keep]
        self._any_ineq = bool(self._ineq.any())
        self._size_rows = np.abs(self._M).sum(1) + np.abs(self._r)  # Σ_j |M_ij| + |r_i|
        self._free = bool((bounds.lo == 0).all() and (bounds.hi == 1).all())  # no bound rows bite
        self._slots: queue.SimpleQueue = queue.SimpleQueue()
        self._params = pywraplp.MPSolverParameters()
        self._params.SetIntegerParam(self._params.INCREMENTALITY, self._params.INCREMENTALITY_OFF)
        self._slots.put(self._new_slot())

    def _new_slot(self) -> _LpSlot:
        lp = self._lp
        s = lp.Solver.CreateSolver("GLOP")
        if s is None:  # pragma: no cover - GLOP ships with every OR-Tools wheel
            raise DomainError("method: 'lp-first' needs OR-Tools' GLOP solver, which this OR-Tools build lacks")
        lo, hi = self.bounds.lo, self.bounds.hi
        x = [s.NumVar(float(lo[j]), float(max(lo[j], hi[j])), f"z{j}") for j in range(self.n)]
        cts = []
        for i in range(self._M.shape[0]):
            ct = s.Constraint(-s.infinity() if self._ineq[i] else self._r[i], self._r[i])
            for j in np.flatnonzero(self._M[i]):
                ct.SetCoefficient(x[j], self._M[i, j])
            cts.append(ct)
        obj = s.Objective()
        obj.SetMaximization()
        return _LpSlot(s, x, cts, obj, self.bounds.hi)

    def _acquire(self) -> _LpSlot:
        try:
            return self._slots.get_nowait()
        except queue.Empty:
            return self._new_slot()

    def solve(self, c: np.ndarray, neg: np.ndarray | None) -> tuple[np.ndarray, int]:
        lo, hi = self.bounds.lo, self.bounds.hi
        if neg is not None:
            hi = np.where(neg, 0, hi)
            if (lo > hi).any():  # a variable fixed to 1 by a bound row has score -inf
                return self.fallback.solve(c, neg)
        if self.bounds.infeasible is not None or not self._exact:
            return self.fallback.solve(c, neg)
        slot = self._acquire()
        try:
            z, y = self._lp_solve(slot, c, hi, neg is None and self._free)
        finally:
            self._slots.put(slot)
        if z is not None and self._certified(c, z, y, lo, hi, neg is None and self._free):
            return z, OPTIMAL
        return self.fallback.solve(c, neg)

    def _lp_solve(self, slot: _LpSlot, c: np.ndarray, hi: np.ndarray, free: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """Solve the LP from scratch; the rounded solution if it is feasible, and the duals."""
        for xj, cj in zip(slot.x, c.tolist()):
            slot.obj.SetCoefficient(xj, cj)
        if hi is not slot.hi:
            for j in np.flatnonzero(hi != slot.hi):
                slot.x[j].SetUb(float(hi[j]))
            slot.hi = hi
        if slot.solver.Solve(self._params) != self._lp.Solver.OPTIMAL:
            return None, np.zeros(0)
        resp = self._pb.MPSolutionResponse()
        slot.solver.FillSolutionResponseProto(resp)
        y = np.array(resp.dual_value, dtype=np.float64)
        z = np.rint(np.array(resp.variable_value, dtype=np.float64)).astype(np.int64)
        if self.system.first_infeasible(z[None]) >= 0:
            return None, y
        if not free and np.count_nonzero(np.clip(z, self.bounds.lo, hi) != z):
            return None, y
        return z, y

    def _certified(self, c: np.ndarray, z: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, free: bool = False) -> bool:
        """cᵀz > U(λ) + ε − 1 (module docstring): z is optimal for the integer objective c.

        ε bounds the float64 rounding of U: every quantity is a sum of at most
        k + n + 2 products, so |error| ≤ 2(k + n + 4)·u·S with S the sum of the
        magnitudes, S ≤ Σ|c_j| + Σ_i |λ_i|(Σ_j |M_ij| + |r_i|); a factor 2 of margin."""
        if len(y) != len(self._r):
            return False
        lam = np.where(self._ineq, np.maximum(y, 0.0), y) if self._any_ineq else y
        cf = c.astype(np.float64)
        d = cf - self._MT @ lam
        gain = np.maximum(d, 0.0).sum() if free else np.where(d > 0, d * hi, d * lo).sum()
        U = float(lam @ self._r) + float(gain)
        size = float(np.abs(cf).sum()) + float(np.abs(lam) @ self._size_rows)
        eps = 4.0 * (len(self._r) + self.n + 4) * _U * size
        return int(c @ z) > U + eps - 1.0
