"""``ilp``: MAP over binary vectors with linear constraints, through OR-Tools.

θ ``(*b, n)``; 𝒵 = {z ∈ {0, 1}^n : A z ≤ b, A_eq z = b_eq} with integer ``A (m, n)``,
``b (m,)``, ``A_eq (p, n)``, ``b_eq (p,)``.  MAP only:

    map(θ) = argmax_{z ∈ 𝒵} ⟨z, θ⟩,

solved per instance by the CP-SAT solver of OR-Tools (one worker per solve), or by
OR-Tools' linear sum assignment solver when the constraints are a bipartite
assignment (see *Routing* below).  A batch is solved in parallel threads, one
CP-SAT model per thread (CP-SAT releases the GIL while it solves).  This is the
MAP oracle that perturb-and-MAP estimators such as I-MLE call in the inner loop.

Integer scaling of θ (CP-SAT optimises integer objectives).  Per instance, with
M = max_i |θ_i| over the finite entries and P = ``objective_bits`` (default 30),
the scores are scaled by the power of two s = 2^(P − k), where M = f·2^k with
f ∈ [1/2, 1), so that M·s ∈ [2^(P−1), 2^P), and rounded: c_i = round(s·θ_i).  The
scaling itself is exact in floating point; only the rounding loses anything, at
most 1/(2s) ≤ M·2^(−P) per entry.  A z that is optimal for c is therefore optimal
for θ up to

    ⟨z, θ⟩ ≥ max_{z' ∈ 𝒵} ⟨z', θ⟩ − ‖z − z*‖₁ · M · 2^(−P)  ≥  max − n · ‖θ‖_∞ · 2^(−P)

(z* a true optimum): ≈ 1.9e-7·‖θ‖_∞ for n = 200 at the default, below float32's
resolution of θ itself.  When every finite s·θ_i is already an integer (for
instance integer-valued θ with |θ_i| < 2^P) nothing is rounded and the MAP is
exact.  Ties are broken arbitrarily but deterministically (one worker).

Infinite scores.  ``-inf`` means impossible: that variable is fixed to 0.
``+inf`` fixes it to 1 (as in the ``bernoulli`` solver).  If the fixed
variables leave no feasible z, :class:`~structgrad.errors.InfeasibleError` is
raised.  NaN is a :class:`~structgrad.errors.DomainError`.

Routing (``method="auto"``, the default).  The problem goes to the linear sum
assignment solver (``ortools.graph.python.linear_sum_assignment``) when all of
the following hold, and to CP-SAT otherwise:

1. every coefficient of ``A`` and ``A_eq`` is 0 or 1, every row has at least one 1,
   and every right-hand side (``b`` and ``b_eq``) is 1, so each row reads
   "at most one" (a row of ``A``) or "exactly one" (a row of ``A_eq``);
2. every variable appears in exactly two rows;
3. the rows split into two groups, "left" and "right", such that each variable
   has one row in each group (the graph with rows as nodes and variables as edges
   is bipartite), and no two variables share both of their rows;
4. the assignment solver's cost scaling cannot overflow int64:
   2^P · (N + 1) · (2N + 1) · 4 < 2^63, N the number of nodes on each side of the
   graph it runs on (below); at the default P = 30 this allows N up to about 2^15.

Each variable is then an arc (left row, right row) of a bipartite graph, and 𝒵 is
the set of matchings that cover every "exactly one" row.  When every row is an
equality the solver runs on that graph directly (it is infeasible unless both
groups have the same size).  Otherwise it runs on the doubled graph that has a
copy j' of every right node on the left and a copy i' of every left node on the
right, the mirror arc (j', i') of every arc (i, j), and a zero-cost slack arc
(i, i') for every "at most one" left row and (j', j) for every "at most one" right
row; its perfect matchings restricted to the original arcs are exactly 𝒵.
Instances with a ``+inf`` score, or for which the assignment solver reports a
possible cost overflow, go to CP-SAT.  The resolved backend is ``solver.method``
(``"assignment"`` or ``"cp-sat"``); ``method="cp-sat"`` forces CP-SAT, and
``method="assignment"`` insists on the assignment solver (a
:class:`~structgrad.errors.DomainError` if the rule does not hold).  The time
limits do not apply to the assignment solver, which is polynomial.

Time limits.  ``time_limit`` bounds each CP-SAT solve in wall-clock seconds, so what
it returns depends on the machine's speed and load; ``deterministic_time_limit``
bounds CP-SAT's deterministic time (its ``max_deterministic_time``, a count of work
that does not depend on the machine), so a time-out with it is reproducible.  On a
time-out the best z found so far is returned, flagged ``optimal=False`` by
:meth:`ILPSolver.solve`; if none was found,
:class:`~structgrad.errors.SolverTimeoutError` is raised.

Every returned z is checked against the constraints and the fixed variables with
exact integer arithmetic (:class:`~structgrad.errors.SolverOutputError` if a
backend ever returned an infeasible z).

Complexity: model construction O(m·n + p·n) once; per instance O(n + nnz) set-up
plus the solve, which is worst-case exponential for CP-SAT (binary integer
programming is NP-hard) and O(N·E·log(N·C)) for the assignment solver (cost
scaling; N nodes, E arcs, C the largest cost).

References:
    L. Perron and F. Didier, *CP-SAT*, Google OR-Tools (https://developers.google.com/optimization).
    A. V. Goldberg and R. Kennedy, "An efficient cost scaling algorithm for the
    assignment problem", Mathematical Programming 71 (1995).

Example:
    >>> import torch, structgrad as sg
    >>> A = torch.tensor([[3, 2, 2]]); b = torch.tensor([4])     # a knapsack row
    >>> ilp = sg.get_solver("ilp", A=A, b=b)
    >>> ilp.map(torch.tensor([3.0, 2.0, 2.0]))
    tensor([0., 1., 1.])
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from structgrad.checks import check_positive_int, check_real, fmt_shape
from structgrad.errors import (
    DomainError,
    DTypeError,
    InfeasibleError,
    ShapeError,
    SolverOutputError,
    SolverTimeoutError,
)
from structgrad.logspace import safe_dot
from structgrad.solver import Capabilities, Solver

__all__ = ["ILPSolver", "ILPResult"]

_METHODS = ("auto", "cp-sat", "assignment")
_MAX_ABS = 2**62  # bound on Σ_j |A_ij| + |b_i| and on n · 2^objective_bits (int64 headroom)

# per-instance outcome codes (internal)
_OPTIMAL, _FEASIBLE, _INFEASIBLE, _TIMEOUT, _OTHER = range(5)


@dataclass(frozen=True)
class ILPResult:
    """What :meth:`ILPSolver.solve` returns.

    Attributes:
        z: ``(*b, n)`` the solutions, θ's dtype and device (as :meth:`ILPSolver.map`).
        value: ``(*b,)`` the objective ⟨z, θ⟩ (``0 · (−inf)`` counts as 0).
        optimal: ``(*b,)`` bool; False where a time limit (``time_limit`` or
            ``deterministic_time_limit``) stopped CP-SAT with a feasible but
            unproven solution.
    """

    z: torch.Tensor
    value: torch.Tensor
    optimal: torch.Tensor


# ----------------------------------------------------------------------------- argument checks
def _int_matrix(x: Any, name: str, ndim: int) -> np.ndarray:
    """``x`` as an int64 array with ``ndim`` dims; integral, finite values only."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.double()
        arr = x.numpy()
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise ShapeError(f"{name}: expected a rectangular array of integers, got {type(x).__name__} ({e})") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        raise DTypeError(f"{name}: expected integer coefficients (an integer or integral float array), got dtype {arr.dtype}")
    if arr.ndim != ndim:
        want = "(m, n)" if ndim == 2 else "(m,)"
        raise ShapeError(f"{name}: expected a {ndim}-D array of shape {want}, got shape {fmt_shape(arr.shape)}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DomainError(f"{name}: expected finite integer coefficients, got {float(arr[bad].flat[0])} at index {tuple(int(i) for i in np.argwhere(bad)[0])}")
        frac = arr != np.round(arr)
        if frac.any():
            raise DomainError(
                f"{name}: expected integer coefficients, got {float(arr[frac].flat[0])!r} at index "
                f"{tuple(int(i) for i in np.argwhere(frac)[0])}; scale the constraint rows to integers"
            )
        if arr.size and np.abs(arr).max() >= _MAX_ABS:
            raise DomainError(f"{name}: expected coefficients of magnitude < 2^62, got {np.abs(arr).max():g}")
    elif arr.dtype.kind == "u" and arr.size and int(arr.max()) >= _MAX_ABS:
        raise DomainError(f"{name}: expected coefficients of magnitude < 2^62, got {int(arr.max())}")
    out = arr.astype(np.int64)
    out.setflags(write=False)
    return out


def _pair(A: Any, b: Any, nameA: str, nameb: str) -> tuple[np.ndarray, np.ndarray] | None:
    if A is None and b is None:
        return None
    if A is None or b is None:
        given, missing = (nameA, nameb) if b is None else (nameb, nameA)
        raise ShapeError(f"{missing}: expected it together with {given}, got None")
    Am = _int_matrix(A, nameA, 2)
    bm = _int_matrix(b, nameb, 1)
    if bm.shape != (Am.shape[0],):
        raise ShapeError(
            f"{nameb}: expected shape ({Am.shape[0]},), one entry per row of {nameA} {fmt_shape(Am.shape)}, "
            f"got {fmt_shape(bm.shape)}"
        )
    size = np.abs(Am).astype(np.float64).sum(1) + np.abs(bm).astype(np.float64)
    if size.size and size.max() >= _MAX_ABS:
        r = int(size.argmax())
        raise DomainError(f"{nameA}: row {r} has Σ|coefficients| + |{nameb}[{r}]| ≈ {size[r]:.3g}, expected < 2^62 (int64 overflow)")
    return Am, bm


def _time_limit(x: Any, name: str, unit: str) -> float | None:
    """``None`` or a finite number > 0, as a float."""
    if x is None:
        return None
    return check_real(x, name, lo=0.0, lo_open=True, what=f"a number of {unit} or None")


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- scaling
def _scale(theta: np.ndarray, bits: int) -> np.ndarray:
    """Integer objective c (B, n) from θ (B, n) float64: c = round(θ · 2^(bits − k)),
    max |finite θ| = f·2^k, f ∈ [1/2, 1).  Infinite entries give 0."""
    finite = np.isfinite(theta)
    th = np.where(finite, theta, 0.0)
    absmax = np.abs(th).max(axis=1) if th.shape[1] else np.zeros(th.shape[0])
    _, k = np.frexp(absmax)
    e = np.where(absmax > 0, bits - k, 0)
    return np.rint(np.ldexp(th, e[:, None])).astype(np.int64)


# ----------------------------------------------------------------------------- assignment routing
@dataclass(frozen=True)
class _AssignmentPlan:
    """The bipartite graph of an assignment-structured problem (see module doc)."""

    num_left: int  # left nodes of the graph the solver runs on (= right nodes)
    tails: np.ndarray  # (n,) int32 left node of each variable's arc
    heads: np.ndarray  # (n,) int32 right node of each variable's arc
    mirror_tails: np.ndarray  # (n,) int32 or empty: mirror arc of each variable (doubled graph)
    mirror_heads: np.ndarray
    slack_tails: np.ndarray  # zero-cost slack arcs (doubled graph)
    slack_heads: np.ndarray
    infeasible: str | None  # a reason when no assignment can exist whatever θ is


def _detect_assignment(rows: np.ndarray, rhs: np.ndarray, is_eq: np.ndarray, n: int) -> _AssignmentPlan | None:
    """The assignment plan of the constraint rows, or None if the rule does not hold."""
    if n == 0 or rows.shape[0] == 0:
        return None
    if not np.isin(rows, (0, 1)).all() or not (rhs == 1).all():
        return None
    if (rows.sum(1) == 0).any():
        return None
    if not (rows.sum(0) == 2).all():
        return None
    r_of = np.sort(np.argwhere(rows.T == 1)[:, 1].reshape(n, 2), axis=1)  # the two rows of each variable
    if len({(int(a), int(b)) for a, b in r_of}) != n:
        return None  # two variables share both rows
    R = rows.shape[0]
    adj: list[list[int]] = [[] for _ in range(R)]
    for a, b in r_of:
        adj[a].append(int(b))
        adj[b].append(int(a))
    colour = np.full(R, -1)
    for start in range(R):
        if colour[start] >= 0:
            continue
        colour[start] = 0
        stack = [start]
        while stack:
            u = stack.pop()
            for v in adj[u]:
                if colour[v] < 0:
                    colour[v] = 1 - colour[u]
                    stack.append(v)
                elif colour[v] == colour[u]:
                    return None  # odd cycle: not bipartite
    left = np.flatnonzero(colour == 0)
    right = np.flatnonzero(colour == 1)
    index = np.empty(R, dtype=np.int64)
    index[left] = np.arange(len(left))
    index[right] = np.arange(len(right))
    first_left = colour[r_of[:, 0]] == 0
    lrow = np.where(first_left, r_of[:, 0], r_of[:, 1])
    rrow = np.where(first_left, r_of[:, 1], r_of[:, 0])
    tails, heads = index[lrow].astype(np.int32), index[rrow].astype(np.int32)
    L, Rn = len(left), len(right)
    empty = np.zeros(0, dtype=np.int32)
    if is_eq.all():
        reason = None
        if L != Rn:
            reason = (
                f"the equality rows form a bipartite assignment with {L} rows on one side and {Rn} on the "
                f"other; 'exactly one' on every row needs equal sides"
            )
        return _AssignmentPlan(L, tails, heads, empty, empty, empty, empty, reason)
    # doubled graph: left = L rows + Rn copies j', right = Rn rows + L copies i'
    mt, mh = (L + heads).astype(np.int32), (Rn + tails).astype(np.int32)
    le = np.flatnonzero(~is_eq[left])  # 'at most one' left rows i -> (i, Rn + i)
    re = np.flatnonzero(~is_eq[right])  # 'at most one' right rows j -> (L + j, j)
    st = np.concatenate([le, L + re]).astype(np.int32)
    sh = np.concatenate([Rn + le, re]).astype(np.int32)
    return _AssignmentPlan(L + Rn, tails, heads, mt, mh, st, sh, None)


# ----------------------------------------------------------------------------- the solver
class _Slot:
    """One CP-SAT model and solver, used by one thread at a time."""

    __slots__ = ("model", "proto", "solver")

    def __init__(self, model: Any, solver: Any):
        self.model = model
        self.proto = model.proto
        self.solver = solver


class ILPSolver(Solver):
    """MAP over {z ∈ {0,1}^n : A z ≤ b, A_eq z = b_eq} with OR-Tools; see the module docstring.

    Args:
        A: ``(m, n)`` integer coefficients of the "≤" rows (tensor, array or nested
            lists; floats must be integral).  ``m = 0`` is allowed.
        b: ``(m,)`` integer right-hand sides.
        A_eq: ``(p, n)`` integer coefficients of the equality rows (optional).
        b_eq: ``(p,)`` integer right-hand sides of the equality rows.
        time_limit: wall-clock seconds per instance for CP-SAT (``None``: no limit).
            On a time-out the best solution found is returned (see :meth:`solve` for
            the flag), or :class:`~structgrad.errors.SolverTimeoutError` if none was
            found.  With a time limit the declared MAP capability is ``"approximate"``.
            Which solution comes back depends on the machine's speed and load.
        deterministic_time_limit: a limit per instance on CP-SAT's *deterministic
            time* (its ``max_deterministic_time`` parameter: a count of the work done,
            in units roughly comparable to seconds, that does not depend on the
            machine or its load); ``None``: no limit.  Time-outs behave as with
            ``time_limit``, but reproducibly: with one worker per solve the same
            instance, limit and OR-Tools version always give the same z, the same
            ``optimal`` flag, or the same :class:`~structgrad.errors.SolverTimeoutError`.
            Both limits may be given; whichever is reached first stops the solve.
        num_threads: threads solving the instances of a batch in parallel, each with
            its own model and one CP-SAT worker (``None``: the cores available to this
            process, at most the batch size).
        objective_bits: P of the integer scaling of θ (module docstring); 1 ≤ P and
            n · 2^P < 2^62.
        method: ``"auto"`` (route assignment structure to the linear sum assignment
            solver), ``"cp-sat"`` or ``"assignment"``.

    Shapes:
        θ: ``(*b, n)`` float → ``map``: ``(*b, n)`` in {0, 1}, θ's dtype and device.

    Attributes:
        n: the number of variables.  A, b, A_eq, b_eq: read-only int64 copies of the
        constraints (empty ``(0, n)``/``(0,)`` when not given).  method: the resolved
        backend, ``"assignment"`` or ``"cp-sat"``.  time_limit,
        deterministic_time_limit, num_threads, objective_bits: the options.

    Raises (at construction):
        ShapeError: A/b/A_eq/b_eq of the wrong shape, or only one of a pair given.
        DomainError: non-integer, infinite or too large coefficients; bad options.
        DTypeError: coefficients that are not numbers.
    Raises (per call):
        ShapeError: θ's last dimension is not n.  DomainError: NaN in θ.
        InfeasibleError: an instance has no feasible z.
        SolverTimeoutError: a time limit hit before any feasible z was found.

    Copying: an ``ILPSolver`` can be pickled and deep-copied; the copy rebuilds its
    own CP-SAT model (and its lock and pool of per-thread models) from the stored
    constraints and options.

    Example:
        >>> import torch, structgrad as sg
        >>> n = 4                                   # pick exactly 2 of 4
        >>> ilp = sg.get_solver("ilp", A=torch.zeros(0, n), b=torch.zeros(0), A_eq=torch.ones(1, n), b_eq=[2])
        >>> ilp.map(torch.tensor([[0.1, 0.5, -1.0, 0.3]]))
        tensor([[0., 1., 0., 1.]])
    """

    capabilities = Capabilities(map="exact", devices=("cpu", "cuda"), batched=False)
    event_ndim = 1

    def __init__(
        self,
        A: Any = None,
        b: Any = None,
        A_eq: Any = None,
        b_eq: Any = None,
        *,
        time_limit: float | None = None,
        deterministic_time_limit: float | None = None,
        num_threads: int | None = None,
        objective_bits: int = 30,
        method: str = "auto",
    ):
        ineq = _pair(A, b, "A", "b")
        eq = _pair(A_eq, b_eq, "A_eq", "b_eq")
        if ineq is None and eq is None:
            raise ShapeError(
                "A: expected A (m, n) with b (m,), and/or A_eq (p, n) with b_eq (p,), to give the number "
                "of variables n; got neither (for no '<=' rows pass A of shape (0, n) and b of shape (0,))"
            )
        if ineq is not None and eq is not None and ineq[0].shape[1] != eq[0].shape[1]:
            raise ShapeError(
                f"A_eq: expected {ineq[0].shape[1]} columns like A {fmt_shape(ineq[0].shape)}, "
                f"got shape {fmt_shape(eq[0].shape)}"
            )
        n = (ineq or eq)[0].shape[1]
        empty = (np.zeros((0, n), dtype=np.int64), np.zeros(0, dtype=np.int64))
        self.A, self.b = ineq or empty
        self.A_eq, self.b_eq = eq or empty
        self.n = int(n)

        self.time_limit = _time_limit(time_limit, "time_limit", "seconds")
        self.deterministic_time_limit = _time_limit(
            deterministic_time_limit, "deterministic_time_limit", "deterministic time units"
        )
        self.num_threads = None if num_threads is None else check_positive_int(num_threads, "num_threads")
        objective_bits = check_positive_int(objective_bits, "objective_bits")
        if max(self.n, 1) * 2.0**objective_bits >= _MAX_ABS:
            raise DomainError(
                f"objective_bits: expected 1 <= P with n * 2^P < 2^62 (n = {self.n}), got {objective_bits}"
            )
        self.objective_bits = objective_bits
        if method not in _METHODS:
            raise DomainError(f"method: expected one of {_METHODS}, got {method!r}")

        rows = np.concatenate([self.A, self.A_eq])
        rhs = np.concatenate([self.b, self.b_eq])
        small = rows.size == 0 or (np.abs(rows).astype(np.float64).sum(1).max() < 2**53 and np.abs(rhs).max() < 2**53)
        self._float_check = (
            tuple(x.astype(np.float64) for x in (self.A, self.b, self.A_eq, self.b_eq)) if small else None
        )
        is_eq = np.concatenate([np.zeros(len(self.b), dtype=bool), np.ones(len(self.b_eq), dtype=bool)])
        plan = _detect_assignment(rows, rhs, is_eq, self.n) if method != "cp-sat" else None
        if plan is not None and 2.0**objective_bits * (plan.num_left + 1) * (2 * plan.num_left + 1) * 4 >= 2.0**63:
            if method == "assignment":
                raise DomainError(
                    f"method: 'assignment' with objective_bits={objective_bits} on a graph of {plan.num_left} "
                    f"nodes a side could overflow the assignment solver's cost scaling; lower objective_bits"
                )
            plan = None
        if method == "assignment" and plan is None:
            raise DomainError(
                "method: 'assignment' needs 0/1 rows with right-hand side 1, every variable in exactly two "
                "rows, and the rows splitting into two groups with one row of each variable in each group "
                "(see the ilp module docstring); these constraints are not of that form"
            )
        self._plan = plan
        self.method = "assignment" if plan is not None else "cp-sat"
        if self._limited:
            self.capabilities = type(self).capabilities.replace(map="approximate")
        self._build_model()

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        # The OR-Tools objects, the lock and the queue of per-thread models cannot be
        # pickled or deep-copied; they are rebuilt from the constraints on arrival.
        state = self.__dict__.copy()
        for k in ("_cp", "_base", "_slots", "_slot_lock", "_empty_row_infeasible"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_model()

    def _build_model(self) -> None:
        """Build the pristine CP-SAT model from the constraints, and the pool of copies."""
        # The CP-SAT model is built once, here; threads get copies of it (see _acquire).
        from ortools.sat.python import cp_model  # lazy: `import structgrad` never imports ortools

        rows = np.concatenate([self.A, self.A_eq])
        rhs = np.concatenate([self.b, self.b_eq])
        is_eq = np.concatenate([np.zeros(len(self.b), dtype=bool), np.ones(len(self.b_eq), dtype=bool)])
        self._cp = cp_model
        model = cp_model.CpModel()
        x = [model.new_bool_var(f"z{i}") for i in range(self.n)]
        lo64 = -(2**63)
        self._empty_row_infeasible: str | None = None
        for r in range(rows.shape[0]):
            nz = np.flatnonzero(rows[r])
            lo = int(rhs[r]) if is_eq[r] else lo64
            hi = int(rhs[r])
            if nz.size == 0:
                if not (lo <= 0 <= hi):
                    name = f"A_eq row {r - len(self.b)}" if is_eq[r] else f"A row {r}"
                    self._empty_row_infeasible = f"{name} is all zeros but its right-hand side {hi} excludes 0"
                continue
            expr = cp_model.LinearExpr.weighted_sum([x[j] for j in nz], rows[r, nz].tolist())
            model.add_linear_constraint(expr, lo, hi)
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
        self._slot_lock = threading.Lock()
        self._slots.put(self._new_slot(model.clone()))

    # ------------------------------------------------------------------ public
    def solve(self, theta: torch.Tensor) -> ILPResult:
        """Solve every instance of θ and report the objective and optimality.

        Args:
            theta: ``(*b, n)`` floating-point scores.
        Returns:
            :class:`ILPResult` with ``z (*b, n)``, ``value (*b,)`` = ⟨z, θ⟩ and
            ``optimal (*b,)`` (False only where a time limit stopped CP-SAT early).
        """
        theta = self.check_theta(theta)
        z, optimal = self._solve(theta)
        value = safe_dot(z, theta.detach(), 1)
        return ILPResult(z=z, value=value, optimal=torch.from_numpy(optimal).reshape(theta.shape[:-1]).to(theta.device))

    def __repr__(self) -> str:
        return (
            f"ILPSolver(n={self.n}, m={self.A.shape[0]}, p={self.A_eq.shape[0]}, method={self.method!r}, "
            f"time_limit={self.time_limit}, deterministic_time_limit={self.deterministic_time_limit}, "
            f"num_threads={self.num_threads})"
        )

    @property
    def _limited(self) -> bool:
        return self.time_limit is not None or self.deterministic_time_limit is not None

    # ------------------------------------------------------------------ hooks
    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        return self._solve(theta)[0]

    # ------------------------------------------------------------------ internals
    def _solve(self, theta: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        if theta.shape[-1] != self.n:
            raise ShapeError(
                f"theta: expected shape (*batch, {self.n}) (n = {self.n} columns of A), got {fmt_shape(theta.shape)}"
            )
        batch = theta.shape[:-1]
        th = theta.detach().to(device="cpu", dtype=torch.float64).reshape(-1, self.n).numpy()
        if np.isnan(th).any():
            idx = np.unravel_index(int(np.argwhere(np.isnan(th))[0, 0]), tuple(batch))
            raise DomainError(f"theta: expected scores or ±inf, got NaN in instance {tuple(int(i) for i in idx)}")
        B = th.shape[0]
        c = _scale(th, self.objective_bits)
        neg, pos = np.isneginf(th), np.isposinf(th)
        Z = np.zeros((B, self.n), dtype=np.int64)
        status = np.full(B, _OPTIMAL)

        def one(i: int) -> None:
            Z[i], status[i] = self._solve_one(c[i], neg[i], pos[i])

        workers = min(B, self.num_threads or _available_cores())
        if workers <= 1:
            for i in range(B):
                one(i)
                if status[i] not in (_OPTIMAL, _FEASIBLE):
                    break
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="structgrad-ilp") as ex:
                for f in [ex.submit(one, i) for i in range(B)]:
                    f.result()

        bad = np.flatnonzero(~np.isin(status, (_OPTIMAL, _FEASIBLE)))
        if bad.size:
            i = int(bad[0])
            where = f"instance {tuple(int(k) for k in np.unravel_index(i, tuple(batch)))} of batch shape {fmt_shape(batch)}"
            fixed = " (after fixing the variables whose score is -inf to 0 and +inf to 1)" if (neg[i] | pos[i]).any() else ""
            if status[i] == _INFEASIBLE:
                why = self._empty_row_infeasible or (self._plan.infeasible if self._plan is not None else None)
                raise InfeasibleError(
                    f"theta {where}: no z in {{0,1}}^{self.n} satisfies the constraints{fixed}"
                    + (f": {why}" if why else "")
                )
            if status[i] == _TIMEOUT:
                limits = [f"time_limit={self.time_limit} s"] if self.time_limit is not None else []
                if self.deterministic_time_limit is not None:
                    limits.append(f"deterministic_time_limit={self.deterministic_time_limit}")
                raise SolverTimeoutError(
                    f"theta {where}: CP-SAT found no feasible z within {' and '.join(limits)}; "
                    f"raise the time limit"
                )
            raise SolverOutputError(f"theta {where}: CP-SAT ended with an unexpected status")  # pragma: no cover
        self._check_feasible(Z, neg, pos, batch)
        z = torch.from_numpy(Z).to(dtype=theta.dtype, device=theta.device).reshape(theta.shape)
        return z, status == _OPTIMAL

    def _check_feasible(self, Z: np.ndarray, neg: np.ndarray, pos: np.ndarray, batch: torch.Size) -> None:
        ok = ((Z == 0) | (Z == 1)).all(1)
        if self._float_check is not None:  # exact: every |A z| and |b| < 2^53 (BLAS is faster than int64)
            A, b, A_eq, b_eq = self._float_check
            Zf = Z.astype(np.float64)
            ok &= (Zf @ A.T <= b).all(1)
            ok &= (Zf @ A_eq.T == b_eq).all(1)
        else:
            ok &= (Z @ self.A.T <= self.b).all(1)
            ok &= (Z @ self.A_eq.T == self.b_eq).all(1)
        ok &= ~((Z == 1) & neg).any(1) & ~((Z == 0) & pos).any(1)
        if not ok.all():  # pragma: no cover - a backend bug guard
            i = int(np.flatnonzero(~ok)[0])
            raise SolverOutputError(
                f"solver 'ilp' ({self.method}) returned an infeasible z for instance "
                f"{tuple(int(k) for k in np.unravel_index(i, tuple(batch)))}; please report this"
            )

    def _solve_one(self, c: np.ndarray, neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, int]:
        if self._empty_row_infeasible is not None:
            return np.zeros(self.n, dtype=np.int64), _INFEASIBLE
        if self._plan is not None and not pos.any():
            got = self._assign_one(c, neg)
            if got is not None:
                return got
        return self._cpsat_one(c, neg, pos)

    def _assign_one(self, c: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, int] | None:
        from ortools.graph.python import linear_sum_assignment

        plan = self._plan
        zero = np.zeros(self.n, dtype=np.int64)
        if plan.infeasible is not None:
            return zero, _INFEASIBLE
        keep = ~neg
        tails = [plan.tails[keep], plan.mirror_tails[keep] if plan.mirror_tails.size else plan.mirror_tails, plan.slack_tails]
        heads = [plan.heads[keep], plan.mirror_heads[keep] if plan.mirror_heads.size else plan.mirror_heads, plan.slack_heads]
        costs = np.zeros(sum(len(t) for t in tails), dtype=np.int64)
        costs[: int(keep.sum())] = -c[keep]
        lsa = linear_sum_assignment.SimpleLinearSumAssignment()
        lsa.add_arcs_with_cost(np.concatenate(tails), np.concatenate(heads), costs)
        if lsa.num_nodes() != plan.num_left:
            return zero, _INFEASIBLE  # a left node lost all its arcs
        st = lsa.solve()
        if st == lsa.INFEASIBLE:
            return zero, _INFEASIBLE
        if st != lsa.OPTIMAL:
            return None  # possible overflow: let CP-SAT do it
        mate = np.fromiter((lsa.right_mate(i) for i in range(plan.num_left)), dtype=np.int64, count=plan.num_left)
        z = ((mate[plan.tails] == plan.heads) & keep).astype(np.int64)
        return z, _OPTIMAL

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
            with self._slot_lock:
                return self._new_slot(self._base.clone())

    def _cpsat_one(self, c: np.ndarray, neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, int]:
        cp = self._cp
        slot = self._acquire()
        try:
            proto = slot.proto
            coeffs = proto.objective.coeffs
            coeffs.clear()
            coeffs.extend((-c).tolist())  # CP-SAT minimises
            fixed = np.flatnonzero(neg | pos)
            for j in fixed:
                dom = proto.variables[int(j)].domain
                dom.clear()
                v = 1 if pos[j] else 0
                dom.extend([v, v])
            try:
                st = slot.solver.solve(slot.model)
            finally:
                for j in fixed:
                    dom = proto.variables[int(j)].domain
                    dom.clear()
                    dom.extend([0, 1])
            if st == cp.OPTIMAL or st == cp.FEASIBLE:
                sol = slot.solver.response_proto.solution
                z = np.fromiter(sol, dtype=np.int64, count=self.n)
                return z, (_OPTIMAL if st == cp.OPTIMAL else _FEASIBLE)
            zero = np.zeros(self.n, dtype=np.int64)
            if st == cp.INFEASIBLE:
                return zero, _INFEASIBLE
            if st == cp.UNKNOWN and self._limited:
                return zero, _TIMEOUT
            return zero, _OTHER  # pragma: no cover
        finally:
            self._slots.put(slot)
