"""``ilp``: MAP over binary vectors with linear constraints, through OR-Tools.

θ ``(*b, n)``; 𝒵 = {z ∈ {0, 1}^n : A z ≤ b, A_eq z = b_eq} with ``A (m, n)``,
``b (m,)``, ``A_eq (p, n)``, ``b_eq (p,)``, integer or real-valued.  MAP only:

    map(θ) = argmax_{z ∈ 𝒵} ⟨z, θ⟩,

solved per instance by one of four OR-Tools backends, chosen once in ``get_solver``
from the structure of the constraints (*Routing*); ``solver.method`` tells which.
This is the MAP oracle that perturb-and-MAP estimators such as I-MLE call in their
inner loop, so the fast routes matter.

Routing (``method="auto"``, the default; rules in full in ``solvers/_ilp_routing.py``):

* ``"assignment"``: 0/1 rows with right-hand side 1, every variable in exactly two
  rows, the rows bipartite: OR-Tools' linear sum assignment solver.
* ``"min-cost-flow"``: every row with one nonzero is a *bound row* (it fixes a
  variable or does nothing); every other row has coefficients in {−1, 0, +1}, every
  variable at most two nonzeros among them, and the rows can be signed ±1 so that each
  variable has at most one +1 and one −1: the rows are then flow-conservation rows of
  a directed graph (nodes = rows plus a root, variables = arcs, ≤ rows get slack
  arcs), solved by OR-Tools' min-cost-flow solver.  Shortest paths and flows written
  as conservation rows, transportation problems, b-matchings, cardinality rows.
* ``"lp-first"``: every non-bound row has equal ±1 coefficients on consecutive
  variables (an interval matrix: totally unimodular): the LP relaxation is solved by
  GLOP; its solution, rounded, is returned only if it is feasible (exact integer
  arithmetic) and certified optimal by the LP duals; otherwise CP-SAT solves it.
  Why the LP answer is the ILP answer: the ILP's feasible set is contained in the
  LP's, so an LP optimum that is integral is an ILP optimum; the dual certificate
  (weak duality, evaluated with a rounding-error bound, ``_ilp_models.py``) proves it
  for the integer objective without trusting GLOP's tolerances.
* ``"cp-sat"``: everything else, by CP-SAT (one worker per solve).

``method`` forces a route: ``"cp-sat"``; ``"lp-first"`` for any constraints (the LP
path is tried on every instance, CP-SAT when it does not certify);
``"assignment"``/``"min-cost-flow"`` insist on their rule
(:class:`~structgrad.errors.DomainError` if it does not hold).  The assignment and
flow routes hand an instance to CP-SAT when their solver reports a possible cost
overflow, the assignment route also when its solver reports the instance infeasible
(a heuristic check that errs on some sparse graphs).  The time limits apply to
CP-SAT only (the other solvers are polynomial).

Batches.  The models are built once, in ``get_solver``; a call only changes costs
and fixings.  CP-SAT and GLOP release the GIL, so their batches run on
``num_threads`` threads, one model copy per thread.  OR-Tools' assignment and
min-cost-flow bindings hold the GIL while they solve (measured: a second thread
gains nothing), so those routes solve a batch in the calling thread, one instance
after the other (each instance's z does not depend on the rest of the batch).

Real-valued constraints.  Coefficients may be any real numbers; a row with
non-integral ones is read exactly as rationals and scaled to integers: each float x
is read as the fraction with the smallest denominator within half a unit in the last
place of x in its dtype (0.07 → 7/100, in float64 or float32), which must be at most
``max_denominator`` (default 10^6; else a :class:`~structgrad.errors.DomainError`
names the coefficient: nothing is rounded silently), and the row is multiplied by the
lcm L of its denominators (``solver.row_scale``).  The returned z satisfies the
rational system exactly, hence the given floats up to their own rounding:
Σ_j x_j z_j ≤ β + ½(Σ_j ulp(x_j) z_j + ulp(β)).  Details in ``_ilp_constraints.py``.

Integer scaling of θ.  Per instance, with M = max_i |θ_i| over the finite entries
and P = ``objective_bits`` (default 30), the scores are scaled by the power of two
s = 2^(P − k), where M = f·2^k with f ∈ [1/2, 1), and rounded: c_i = round(s·θ_i).
Only the rounding loses anything, at most 1/(2s) ≤ M·2^(−P) per entry, so the z
returned (optimal for c) satisfies

    ⟨z, θ⟩ ≥ max_{z' ∈ 𝒵} ⟨z', θ⟩ − ‖z − z*‖₁ · M · 2^(−P)  ≥  max − n · ‖θ‖_∞ · 2^(−P)

(z* a true optimum): ≈ 1.9e-7·‖θ‖_∞ for n = 200 at the default.  Integer-valued θ with
|θ_i| < 2^P is solved exactly.  Ties are broken arbitrarily but deterministically.

Scores.  ``-inf`` means impossible: that variable is fixed to 0 (as for every
structgrad solver); NaN and ``+inf`` are refused by the shared check
(:meth:`~structgrad.Solver.check_values`, a :class:`~structgrad.errors.DomainError`
"expected scores that are finite or -inf").  (Before interface v2, ``+inf`` fixed a
variable to 1; to force z_j = 1, add the row z_j ≥ 1, i.e. ``-z_j <= -1``.)  With
``validate=False`` they are not checked and count as a score of 0 (the z returned is
still feasible).  If the fixed variables leave no feasible z,
:class:`~structgrad.errors.InfeasibleError` is raised.

Time limits.  ``time_limit`` bounds each CP-SAT solve in wall-clock seconds (the
outcome depends on the machine's speed and load); ``deterministic_time_limit`` bounds
CP-SAT's deterministic time (``max_deterministic_time``, a count of work), so a
time-out with it is reproducible.  On a time-out the best z found is returned, flagged
``optimal=False`` by :meth:`ILPSolver.solve`; if none was found,
:class:`~structgrad.errors.SolverTimeoutError`.  With either limit the instance's
``capabilities.map`` is ``"approximate"``.

Every returned z is checked against the constraints and the fixings with exact
integer arithmetic (:class:`~structgrad.errors.SolverOutputError` if a backend ever
returned an infeasible z).  n = 0 is allowed: z has shape ``(*b, 0)`` (the empty z is
feasible when every right-hand side admits 0, else ``InfeasibleError``).

Complexity: construction O((m + p)·n) plus the rational reading of non-integral
coefficients; per instance O(n + nnz) set-up plus the solve: worst-case exponential
for CP-SAT (binary integer programming is NP-hard), polynomial for the assignment
(cost scaling, O(N·E·log(N·C))), min-cost-flow (cost-scaling push-relabel) and LP
(simplex, in practice) routes.

References:
    L. Perron and F. Didier, *CP-SAT*, Google OR-Tools (https://developers.google.com/optimization).
    A. V. Goldberg and R. Kennedy, "An efficient cost scaling algorithm for the
    assignment problem", Mathematical Programming 71 (1995).
    A. V. Goldberg, "An efficient implementation of a scaling minimum-cost flow
    algorithm", Journal of Algorithms 22 (1997).
    A. Schrijver, *Theory of Linear and Integer Programming*, Wiley 1986 (total
    unimodularity, Ch. 19; Heller–Tompkins signing, Thm. 19.3).

Examples:
    >>> import torch, structgrad as sg
    >>> A = torch.tensor([[3, 2, 2]]); b = torch.tensor([4])     # a knapsack row
    >>> ilp = sg.get_solver("ilp", A=A, b=b)
    >>> ilp.map(torch.tensor([3.0, 2.0, 2.0]))
    tensor([0., 1., 1.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from structgrad.checks import check_choice, check_positive_int, check_real, fmt_shape
from structgrad.errors import DomainError, InfeasibleError, ShapeError, SolverOutputError, SolverTimeoutError
from structgrad.logspace import safe_dot
from structgrad.solver import Capabilities, Solver

from . import _ilp_models as M
from ._ilp_constraints import DEFAULT_MAX_DENOMINATOR, MAX_ABS, read_system
from ._ilp_routing import detect_assignment, detect_flow, is_interval, variable_bounds

__all__ = ["ILPSolver", "ILPResult"]

_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}
_METHODS = ("auto", "cp-sat", "assignment", "min-cost-flow", "lp-first")


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


def _time_limit(x: Any, name: str, unit: str) -> float | None:
    """``None`` or a finite number > 0, as a float."""
    if x is None:
        return None
    return check_real(x, name, lo=0.0, lo_open=True, what=f"a number of {unit} or None")


class ILPSolver(Solver):
    """MAP over {z ∈ {0,1}^n : A z ≤ b, A_eq z = b_eq} with OR-Tools; see the module docstring.

    Args:
        A: ``(m, n)`` coefficients of the "≤" rows (tensor, array or nested lists;
            integers, or reals read as exact fractions: module docstring).  ``m = 0``
            is allowed.
        b: ``(m,)`` right-hand sides.
        A_eq: ``(p, n)`` coefficients of the equality rows (optional).
        b_eq: ``(p,)`` right-hand sides of the equality rows.
        time_limit: wall-clock seconds per instance for CP-SAT (``None``: no limit).
            On a time-out the best solution found is returned (see :meth:`solve` for
            the flag), or :class:`~structgrad.errors.SolverTimeoutError` if none was
            found.  With a time limit the instance's MAP capability is ``"approximate"``.
        deterministic_time_limit: a limit per instance on CP-SAT's deterministic time
            (its ``max_deterministic_time``: a count of work in units roughly
            comparable to seconds, independent of the machine); ``None``: no limit.
            Time-outs behave as with ``time_limit``, but reproducibly.  Both limits may
            be given; whichever is reached first stops the solve.
        num_threads: threads solving the instances of a batch in parallel on the
            CP-SAT and LP routes, each with its own model (``None``: the cores
            available to this process, at most the batch size).
        objective_bits: P of the integer scaling of θ (module docstring); 1 ≤ P and
            n · 2^P < 2^62.
        method: ``"auto"`` (routing rules), ``"cp-sat"``, ``"assignment"``,
            ``"min-cost-flow"`` or ``"lp-first"``.
        max_denominator: the largest denominator a non-integral coefficient may be
            read with (module docstring); an integer ≥ 1.

    Shapes:
        θ: ``(*b, n)`` float → ``map``: ``(*b, n)`` in {0, 1}, θ's dtype and device.

    Attributes:
        n: the number of variables.
        A: ``(m, n)`` the "≤" rows solved, a read-only int64 array (``(0, n)`` when not
            given); a row given with non-integral coefficients appears multiplied by its
            ``row_scale``.
        b: ``(m,)`` their right-hand sides, likewise.
        A_eq: ``(p, n)`` the equality rows solved, likewise.
        b_eq: ``(p,)`` their right-hand sides.
        row_scale: ``(m,)`` int64, the factor each row of ``A`` was multiplied by (1 for
            integer rows).
        row_scale_eq: ``(p,)`` int64, likewise for ``A_eq``.
        method: the resolved route, ``"assignment"``, ``"min-cost-flow"``,
            ``"lp-first"`` or ``"cp-sat"``.
        time_limit: the option, as are ``deterministic_time_limit``, ``num_threads``,
            ``objective_bits`` and ``max_denominator``.

    Raises (at construction):
        ShapeError: A/b/A_eq/b_eq of the wrong shape, or only one of a pair given.
        DomainError: infinite or too large coefficients, a fraction beyond
            ``max_denominator``, a forced method whose rule does not hold, bad options.
        DTypeError: coefficients that are not real numbers.
    Raises (per call):
        ShapeError: θ's last dimension is not n.  DomainError: NaN or +inf in θ.
        InfeasibleError: an instance has no feasible z.
        SolverTimeoutError: a time limit hit before any feasible z was found.

    Copying: an ``ILPSolver`` can be pickled and deep-copied; the copy rebuilds its
    own models (and locks and per-thread pools) from the stored constraints and options.

    Examples:
        >>> import torch, structgrad as sg
        >>> n = 4                                   # pick exactly 2 of 4
        >>> ilp = sg.get_solver("ilp", A=torch.zeros(0, n), b=torch.zeros(0), A_eq=torch.ones(1, n), b_eq=[2])
        >>> ilp.map(torch.tensor([[0.1, 0.5, -1.0, 0.3]]))
        tensor([[0., 1., 0., 1.]])
        >>> ilp.method
        'min-cost-flow'
    """

    capabilities = Capabilities(map="exact", devices=("cpu", "cuda"), batched=False)
    event_ndim = 1
    num_leaves = 1

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
        max_denominator: int = DEFAULT_MAX_DENOMINATOR,
    ):
        self.max_denominator = check_positive_int(max_denominator, "max_denominator")
        self._system = read_system(A, b, A_eq, b_eq, self.max_denominator)
        sy = self._system
        self.A, self.b, self.A_eq, self.b_eq = sy.A, sy.b, sy.A_eq, sy.b_eq
        self.row_scale, self.row_scale_eq = sy.row_scale, sy.row_scale_eq
        self.n = sy.n
        self.time_limit = _time_limit(time_limit, "time_limit", "seconds")
        self.deterministic_time_limit = _time_limit(
            deterministic_time_limit, "deterministic_time_limit", "deterministic time units"
        )
        self.num_threads = None if num_threads is None else check_positive_int(num_threads, "num_threads")
        objective_bits = check_positive_int(objective_bits, "objective_bits")
        if max(self.n, 1) * 2.0**objective_bits >= MAX_ABS:
            raise DomainError(
                f"objective_bits: expected 1 <= P with n * 2^P < 2^62 (n = {self.n}), got {objective_bits}"
            )
        self.objective_bits = objective_bits
        self._requested = check_choice(method, _METHODS, "method")
        if self.time_limit is not None or self.deterministic_time_limit is not None:
            self.capabilities = type(self).capabilities.replace(map="approximate")
        self._build()

    # ------------------------------------------------------------------ models
    def _build(self) -> None:
        """Resolve the route and build its models (once; again after unpickling)."""
        sy, want = self._system, self._requested
        self._infeasible = sy.empty_row_infeasible
        bounds = variable_bounds(sy)
        cpsat = M.CpSat(sy, self.time_limit, self.deterministic_time_limit)
        backend: Any = None
        if want in ("auto", "assignment"):
            plan = detect_assignment(sy, self.objective_bits)
            if plan is not None:
                backend = M.Assignment(plan, cpsat)
            elif want == "assignment":
                raise DomainError(
                    "method: 'assignment' needs 0/1 rows with right-hand side 1, every variable in exactly two "
                    "rows, the rows splitting into two groups with one row of each variable in each group, and "
                    f"costs that cannot overflow at objective_bits={self.objective_bits} (rule 1 in "
                    "solvers/_ilp_routing.py); these constraints are not of that form"
                )
        if backend is None and want in ("auto", "min-cost-flow"):
            flow = detect_flow(sy, bounds)
            if flow is not None:
                backend = M.MinCostFlow(flow, cpsat)
            elif want == "min-cost-flow":
                raise DomainError(
                    "method: 'min-cost-flow' needs rows with coefficients in {-1, 0, 1} (rows with one nonzero "
                    "aside), every variable in at most two of them, and row signs making each variable one +1 "
                    "and one -1 at most (rule 2 in solvers/_ilp_routing.py); these constraints are not of that form"
                )
        if backend is None and (want == "lp-first" or (want == "auto" and is_interval(sy, bounds))):
            backend = M.LpFirst(sy, bounds, cpsat, self.objective_bits)
        self._backend = backend or cpsat
        self._cpsat = cpsat
        self.method = {
            M.Assignment: "assignment", M.MinCostFlow: "min-cost-flow", M.LpFirst: "lp-first", M.CpSat: "cp-sat"
        }[type(self._backend)]

    def __getstate__(self) -> dict:
        # The OR-Tools objects, locks and per-thread pools cannot be pickled or
        # deep-copied; they are rebuilt from the constraints on arrival.
        state = self.__dict__.copy()
        for k in ("_backend", "_cpsat"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    # ------------------------------------------------------------------ validation
    def check_theta(self, theta: Any) -> Any:
        """Shared structural checks, then θ must be one tensor whose last dimension is n."""
        theta = super().check_theta(theta)
        if theta.shape[-1] != self.n:
            raise ShapeError(
                f"theta: expected shape (*batch, {self.n}) (n = {self.n} columns of A), got {fmt_shape(theta.shape)}"
            )
        return theta

    # ------------------------------------------------------------------ public
    def check_values(self, theta: Any) -> None:
        """Deferred to the solve: the pass that scales θ to integers finds non-finite
        scores anyway, so the shared check (:meth:`Solver.check_values`, which refuses NaN
        and +inf) runs there, and only when θ has one; for finite θ it could not fail.
        This matters on the fast routes, where a whole call takes tens of microseconds."""

    def solve(self, theta: torch.Tensor) -> ILPResult:
        """Solve every instance of θ and report the objective and optimality.

        Runs the same checks as :meth:`map` (:meth:`check_theta`, and
        :meth:`check_values` when ``self.validate`` and θ has a non-finite score).

        Args:
            theta: ``(*b, n)`` floating-point scores.

        Returns:
            :class:`ILPResult` with ``z (*b, n)``, ``value (*b,)`` = ⟨z, θ⟩ and
                ``optimal (*b,)`` (False only where a time limit stopped CP-SAT early).
        """
        self._require("map")
        theta, _ = self._prepare(theta, {})
        z, status = self._solve(theta)
        value = safe_dot(z, theta.detach(), 1)
        optimal = torch.tensor([st == M.OPTIMAL for st in status], dtype=torch.bool)
        return ILPResult(z=z, value=value, optimal=optimal.reshape(theta.shape[:-1]).to(theta.device))

    def __repr__(self) -> str:
        return (
            f"ILPSolver(n={self.n}, m={self.A.shape[0]}, p={self.A_eq.shape[0]}, method={self.method!r}, "
            f"time_limit={self.time_limit}, deterministic_time_limit={self.deterministic_time_limit}, "
            f"num_threads={self.num_threads})"
        )

    # ------------------------------------------------------------------ hooks
    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        return self._solve(theta)[0]

    # ------------------------------------------------------------------ internals
    def _solve(self, theta: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        # Lean on purpose: on the flow route one call is a few tens of microseconds, so
        # every array operation here shows (see benchmarks/ilp.py).
        batch = theta.shape[:-1]
        B, n = batch.numel(), self.n
        t = theta.detach() if theta.requires_grad else theta
        if t.dtype is not torch.float64 or not t.is_cpu:
            t = t.to(device="cpu", dtype=torch.float64)
        th = t.numpy().reshape(B, n)
        status = [M.OPTIMAL] * B
        neg = None
        if B and self._infeasible is not None:
            if self.validate:
                Solver.check_values(self, theta)
            status = [M.INFEASIBLE] * B
            Z = np.zeros((B, n), dtype=np.int64)
        elif B and n:
            c, neg = M.scale_objective(th, self.objective_bits)
            if neg is not None and self.validate:  # a non-finite score: the shared policy decides
                Solver.check_values(self, theta)
            backend = self._backend
            if B == 1:
                z0, status[0] = backend.solve(c[0], None if neg is None else neg[0])
                Z = z0[None]
            else:
                has_neg = neg.any(1).tolist() if neg is not None else [False] * B
                rows: list = [None] * B

                def one(i: int) -> None:
                    rows[i], status[i] = backend.solve(c[i], neg[i] if has_neg[i] else None)

                workers = min(B, self.num_threads or M.available_cores()) if backend.releases_gil else 1
                M.run_batch(one, B, workers)
                Z = np.stack(rows)
        else:
            Z = np.zeros((B, n), dtype=np.int64)
        if B and max(status) > M.FEASIBLE:
            self._raise_for_status(np.array(status), th, batch)
        self._check_feasible(Z, neg, batch)
        np_dtype = _NUMPY_DTYPES.get(theta.dtype)
        if np_dtype is not None and theta.is_cpu:  # one conversion, no torch reshape
            z = torch.from_numpy(Z.astype(np_dtype).reshape(theta.shape))
        else:
            z = torch.from_numpy(Z).to(dtype=theta.dtype, device=theta.device).reshape(theta.shape)
        return z, status

    def _where(self, i: int, batch: torch.Size) -> str:
        return f"instance {tuple(int(k) for k in np.unravel_index(i, tuple(batch)))} of batch shape {fmt_shape(batch)}"

    def _raise_for_status(self, status: np.ndarray, th: np.ndarray, batch: torch.Size) -> None:
        i = int(np.flatnonzero(status > M.FEASIBLE)[0])
        where = self._where(i, batch)
        if status[i] == M.INFEASIBLE:
            fixed = " (after fixing the variables whose score is -inf to 0)" if np.isneginf(th[i]).any() else ""
            plan = getattr(self._backend, "plan", None)
            why = self._infeasible or getattr(plan, "infeasible", None)
            raise InfeasibleError(
                f"theta {where}: no z in {{0,1}}^{self.n} satisfies the constraints{fixed}" + (f": {why}" if why else "")
            )
        if status[i] == M.TIMEOUT:
            limits = [f"time_limit={self.time_limit} s"] if self.time_limit is not None else []
            if self.deterministic_time_limit is not None:
                limits.append(f"deterministic_time_limit={self.deterministic_time_limit}")
            raise SolverTimeoutError(
                f"theta {where}: CP-SAT found no feasible z within {' and '.join(limits)}; raise the time limit"
            )
        raise SolverOutputError(f"theta {where}: CP-SAT ended with an unexpected status")  # pragma: no cover

    def _check_feasible(self, Z: np.ndarray, neg: np.ndarray | None, batch: torch.Size) -> None:
        i = self._system.first_infeasible(Z)
        if i < 0 and neg is not None and (Z.astype(bool) & neg).any():
            i = int(np.flatnonzero((Z.astype(bool) & neg).any(1))[0])
        if i >= 0:  # pragma: no cover - a backend bug guard
            raise SolverOutputError(
                f"solver 'ilp' ({self.method}) returned an infeasible z for {self._where(i, batch)}; please report this"
            )
