"""Conformance suite for solvers: brute-force oracles and :func:`check_solver`.

Anyone who writes a solver gets, for free, the checks every built-in passes::

    from structgrad.testing import Case, check_solver, one_hot_structures
    report = check_solver(my_solver, [Case(theta, enumerate=lambda th: one_hot_structures(th.shape[-1]))])

A *case* is a batched θ (float64 recommended) plus an *enumerator*: a function
``(theta_i, **kwargs_i) -> list of structures z_i`` listing the whole feasible set 𝒵
of one instance (θ_i is θ with the batch dims indexed away; the keyword arguments
named in ``batched_kwargs``, such as a chain's ``lengths``, are indexed alike and
the others passed whole).  From it the oracle
computes by enumeration

    A(θ) = log Σ_z exp⟨z, θ⟩,   μ = Σ_z p(z) z,   max_z ⟨z, θ⟩,   p(z) = exp(⟨z, θ⟩ − A),

and :func:`check_solver` compares each declared operation against it.  Failures
raise ``AssertionError`` with a message saying which check, which case, and how
far off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import itertools

import torch

from . import checks as V
from .errors import CapabilityError, DomainError, ShapeError, StructgradError, UnknownArgumentError
from .logspace import logsumexp, safe_dot
from .nll import nll
from .registry import get_solver
from .solver import OPERATIONS, Solver

__all__ = [
    "Case",
    "BruteForce",
    "check_solver",
    "chi_square_threshold",
    "one_hot_structures",
    "binary_structures",
    "subset_structures",
    "labeling_structures",
]


# ---------------------------------------------------------------------------- enumerators
def one_hot_structures(n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The n one-hot vectors of length n (the categorical family)."""
    return list(torch.eye(n, dtype=dtype))


def binary_structures(n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """All 2^n binary vectors of length n."""
    return [torch.tensor(bits, dtype=dtype) for bits in itertools.product((0.0, 1.0), repeat=n)]


def subset_structures(n: int, k: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """All C(n, k) binary vectors of length n with exactly k ones."""
    out = []
    for idx in itertools.combinations(range(n), k):
        z = torch.zeros(n, dtype=dtype)
        z[list(idx)] = 1.0
        out.append(z)
    return out


def labeling_structures(
    num_nodes: int,
    num_classes: int,
    edges: Sequence[tuple[int, int]],
    *,
    active: int | None = None,
    shared_edge: bool = False,
    dtype: torch.dtype = torch.float64,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All labellings of a pairwise model as (node (N, C), edge (E, C, C)) indicators.

    Args:
        num_nodes: N; num_classes: C; edges: the E pairs (u, v), edge[e, a, b] = [y_u = a, y_v = b].
        active: only nodes ``< active`` are labelled (a chain's length); others and
            edges touching them are 0.
        shared_edge: sum the edge indicators over edges (transition counts (C, C)).
    """
    A = num_nodes if active is None else active
    out = []
    for lab in itertools.product(range(num_classes), repeat=A):
        node = torch.zeros(num_nodes, num_classes, dtype=dtype)
        node[torch.arange(A), torch.tensor(lab, dtype=torch.long)] = 1.0 if A else 0.0
        edge = torch.zeros(len(edges), num_classes, num_classes, dtype=dtype)
        for e, (u, v) in enumerate(edges):
            if u < A and v < A:
                edge[e, lab[u], lab[v]] = 1.0
        out.append((node, edge.sum(0) if shared_edge else edge))
    return out


# ---------------------------------------------------------------------------- oracle
@dataclass
class Case:
    """One conformance case: batched θ, an enumerator of one instance's structures,
    per-call keyword arguments, and a name for messages.

    ``batched_kwargs`` names the keyword arguments that carry one value per instance
    (leading dims = the batch shape; indexed per instance for the enumerator); the
    others are passed whole to every instance.  ``None`` (the default) means: the
    solver's own declaration, ``solver.batched_kwargs``.  Nothing is guessed from shapes."""

    theta: Any
    enumerate: Callable[..., Iterable[Any]]
    kwargs: dict = field(default_factory=dict)
    name: str = "case"
    batched_kwargs: tuple[str, ...] | None = None


class BruteForce:
    """Brute-force oracle for the family a solver computes, by enumeration.

    Args:
        solver: used only for its ``batch_shape``/``event_ndims`` (to split θ into instances).
        enumerate: ``(theta_i, **kwargs_i) -> iterable of structures`` (see :class:`Case`).
        batched_kwargs: names of the per-instance keyword arguments; ``None``: the
            solver's declaration ``solver.batched_kwargs`` (see :class:`Case`).
    """

    def __init__(
        self, solver: Solver, enumerate: Callable[..., Iterable[Any]], batched_kwargs: Sequence[str] | None = None
    ):
        self.solver = get_solver(solver)
        self.enumerate = enumerate
        self.batched_kwargs = tuple(self.solver.batched_kwargs if batched_kwargs is None else batched_kwargs)

    # -- splitting a batch into instances
    def instances(self, theta: Any, **kwargs: Any) -> list[tuple[tuple[int, ...], Any, dict]]:
        """``[(index, theta_i, kwargs_i)]`` over the batch."""
        batch = tuple(self.solver.batch_shape(theta))
        nd = self.solver.event_ndims(theta)
        parts = V.leaves(theta)
        out = []
        for idx in itertools.product(*(range(b) for b in batch)):
            th = [p[idx] if nd is None or p.dim() > k else p for p, k in zip(parts, nd or [0] * len(parts))]
            kw = {name: (v[idx] if self._per_instance(name, v, batch) else v) for name, v in kwargs.items()}
            out.append((idx, V.rebuild(theta, th), kw))
        return out

    def _per_instance(self, name: str, v: Any, batch: tuple[int, ...]) -> bool:
        if name not in self.batched_kwargs or v is None:
            return False
        if not isinstance(v, torch.Tensor) or tuple(v.shape[: len(batch)]) != batch:
            shape = V.fmt_shape(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ShapeError(f"{name}: expected leading dims {V.fmt_shape(batch)} (it is in batched_kwargs), got {shape}")
        return True

    def table(self, theta_i: Any, **kwargs_i: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stacked structures (one ``(K, *event)`` tensor per leaf) and their scores ``(K,)``."""
        structs = list(self.enumerate(theta_i, **kwargs_i))
        if not structs:
            raise AssertionError("enumerator returned no structures")
        t_parts = V.leaves(theta_i)
        stacked = [torch.stack([V.leaves(z)[j] for z in structs]).to(t.dtype) for j, t in enumerate(t_parts)]
        scores = sum(safe_dot(Z, t.detach(), t.dim()) for Z, t in zip(stacked, t_parts))
        return stacked, scores

    def log_partition(self, theta: Any, **kwargs: Any) -> torch.Tensor:
        """``(*batch,)`` A(θ) by enumeration."""
        batch = self.solver.batch_shape(theta)
        vals = [logsumexp(self.table(th, **kw)[1], -1) for _, th, kw in self.instances(theta, **kwargs)]
        return torch.stack(vals).reshape(batch)

    def marginals(self, theta: Any, **kwargs: Any) -> Any:
        """μ(θ) by enumeration, leaves ``(*batch, *event)``."""
        batch = tuple(self.solver.batch_shape(theta))
        per = []
        for _, th, kw in self.instances(theta, **kwargs):
            Z, s = self.table(th, **kw)
            p = torch.softmax(s, 0) if bool(torch.isfinite(s).any()) else torch.zeros_like(s)
            per.append([torch.tensordot(p, z, dims=1) for z in Z])
        parts = [torch.stack([m[j] for m in per]).reshape(batch + tuple(per[0][j].shape)) for j in range(len(per[0]))]
        return V.rebuild(theta, parts)

    def map_value(self, theta: Any, **kwargs: Any) -> torch.Tensor:
        """``(*batch,)`` max_z ⟨z, θ⟩ by enumeration."""
        batch = self.solver.batch_shape(theta)
        return torch.stack([self.table(th, **kw)[1].max() for _, th, kw in self.instances(theta, **kwargs)]).reshape(batch)

    def locate(self, z_i: Any, theta_i: Any, **kwargs_i: Any) -> int:
        """Index of structure ``z_i`` in the enumeration, or -1 if it is not feasible."""
        Z, _ = self.table(theta_i, **kwargs_i)
        match = torch.ones(Z[0].shape[0], dtype=torch.bool)
        for Zj, zj in zip(Z, V.leaves(z_i)):
            match &= (Zj == zj.to(Zj.dtype).cpu()).flatten(1).all(1)
        hits = match.nonzero().flatten()
        return int(hits[0]) if len(hits) else -1


def chi_square_threshold(dof: int, p_value: float = 1e-6) -> float:
    """Upper ``p_value`` quantile of χ²(dof) (Wilson–Hilferty approximation)."""
    if dof <= 0:
        return 0.0
    # z for the upper tail by bisection on the normal survival function
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(mid / math.sqrt(2)) > p_value:
            lo = mid
        else:
            hi = mid
    z = 0.5 * (lo + hi)
    k = float(dof)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """χ² statistic and dof, pooling outcomes with expected count < 5."""
    n = float(counts.sum())
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = counts[big].double(), exp[big].double()
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    cells = int(big.sum())
    rest_e = float(exp[~big].sum())
    rest_o = float(counts[~big].sum())
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / max(rest_e, 1e-12)
        cells += 1
    return stat, max(cells - 1, 0)


# ---------------------------------------------------------------------------- check_solver
def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str) -> None:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        _fail(f"{what}: shape {tuple(a.shape)} != expected {tuple(b.shape)}")
    both_inf = (a == b) & torch.isinf(a)
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    worst = float(diff.nan_to_num(float("inf")).max()) if diff.numel() else 0.0
    if worst > atol:
        _fail(f"{what}: max abs error {worst:.3g} > {atol:g}")


def _absmax(x: torch.Tensor) -> float:
    x = x.detach()
    x = x[torch.isfinite(x)]
    return float(x.abs().max()) if x.numel() else 0.0


def _expected_shapes(solver: Solver, theta: Any) -> list[tuple[int, ...]]:
    batch = tuple(solver.batch_shape(theta))
    nd = solver.event_ndims(theta)
    parts = V.leaves(theta)
    if nd is None:
        return [tuple(p.shape) for p in parts]
    return [batch + tuple(p.shape[p.dim() - k :]) for p, k in zip(parts, nd)]


def _check_structure(out: Any, theta: Any, shapes: list[tuple[int, ...]], what: str, lead: tuple = ()) -> None:
    parts = V.leaves(out)
    if isinstance(theta, tuple) != isinstance(out, tuple) or len(parts) != len(shapes):
        _fail(f"{what}: expected the structure of theta ({len(shapes)} leaves), got {type(out).__name__}")
    t0 = V.leaves(theta)[0]
    for j, (p, s) in enumerate(zip(parts, shapes)):
        if tuple(p.shape) != lead + s:
            _fail(f"{what}[{j}]: shape {tuple(p.shape)}, expected {lead + s}")
        if p.dtype != t0.dtype:
            _fail(f"{what}[{j}]: dtype {p.dtype}, expected theta's {t0.dtype}")
        if p.device != t0.device:
            _fail(f"{what}[{j}]: device {p.device}, expected theta's {t0.device}")


def _cast(theta: Any, dtype: torch.dtype | None = None, device: Any = None) -> Any:
    return V.rebuild(theta, (p.detach().to(dtype=dtype or p.dtype, device=device or p.device) for p in V.leaves(theta)))


def _cast_kwargs(kwargs: dict, device: Any) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def _check_second_derivatives(solver: Solver, theta64: Any, gold: Any, kwargs: dict, where: str, tick) -> None:
    """No silently wrong second derivatives.

    ``gradgradcheck`` of ``log_partition`` and ``nll²``: it must pass when the solver
    declares ``differentiable_marginals``; otherwise it must either pass or be refused
    with :class:`~structgrad.errors.CapabilityError` (any other error, or a wrong
    Hessian, fails)."""
    t_parts = tuple(p.clone().requires_grad_(True) for p in V.leaves(theta64))
    declared = solver.capabilities.differentiable_marginals

    def logz(*ps: torch.Tensor) -> torch.Tensor:
        return solver.log_partition(V.rebuild(theta64, ps), **kwargs)

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        return nll(V.rebuild(theta64, ps), gold, solver, **kwargs) ** 2

    for f, what in ((logz, "log_partition"), (loss, "nll**2")):
        try:
            ok = torch.autograd.gradgradcheck(f, t_parts, eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False)
        except CapabilityError:
            if declared:
                _fail(f"{where} second derivatives of {what} refused, but differentiable_marginals is declared")
            tick("second_derivative_refused")
            continue
        except Exception as e:  # noqa: BLE001 - any other failure is a finding
            _fail(f"{where} second derivatives of {what} raised {type(e).__name__} ({e}); expected correct values "
                  f"or a CapabilityError")
        if not ok:
            _fail(f"{where} gradgradcheck of {what} failed: second derivatives are wrong (they must be right, "
                  f"or refused with CapabilityError)")
        tick("gradgradcheck")


def check_solver(
    solver: Any,
    cases: Sequence[Case],
    *,
    atol: float = 1e-9,
    float32_atol: float = 1e-4,
    num_samples: int = 3000,
    p_value: float = 1e-6,
    seed: int = 0,
    gradcheck: bool = True,
    devices: Sequence[str] | None = None,
    bad_inputs: Sequence[tuple[Callable[[Solver], Any], type, str]] = (),
) -> dict[str, int]:
    """Run the standard conformance checks on ``solver`` over ``cases``.

    For every declared operation, on every case:

    * output structure, shapes ``(*batch, *event)``, dtype and device follow θ
      (float64 and float32; and CUDA when available and declared);
    * θ is not mutated;
    * float64 agreement with the brute-force oracle within ``atol``: A(θ), μ(θ);
      the MAP is feasible (in the enumeration) and optimal (score = max);
    * autograd of ``log_partition(θ).sum()`` equals the marginals (summed over the
      batch for shared leaves);
    * ``torch.autograd.gradcheck`` of :func:`structgrad.nll` against a feasible gold
      structure (float64, cases with finite θ);
    * second derivatives: ``gradgradcheck`` of ``log_partition`` and ``nll²`` when
      ``capabilities.differentiable_marginals``; otherwise a ``create_graph`` backward
      must raise :class:`~structgrad.errors.CapabilityError`;
    * the declared interface: an undeclared call keyword raises
      :class:`~structgrad.errors.UnknownArgumentError`, every name in ``batched_kwargs``
      is in ``call_kwargs``, and NaN or ``+inf`` in θ raise
      :class:`~structgrad.errors.DomainError`;
    * float32 results agree with float64 within ``float32_atol``;
    * samples are feasible, reproducible with a seeded generator, and their
      frequencies pass a χ² test against the oracle at ``p_value`` (fixed ``seed``);
    * undeclared operations raise :class:`~structgrad.errors.CapabilityError`;
      integer θ raises a ``TypeError`` (:class:`~structgrad.errors.DTypeError`);
    * each ``bad_inputs`` entry ``(fn(solver), ExceptionType, regex)`` raises that
      exception with a message matching the regex.

    Returns:
        ``{check name: number of times it ran}``; raises ``AssertionError`` on the first failure.
    """
    import re

    solver = get_solver(solver)
    caps = solver.capabilities
    ran: dict[str, int] = {}

    def tick(name: str) -> None:
        ran[name] = ran.get(name, 0) + 1

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in caps.devices else [])

    for op in OPERATIONS:
        if not caps.supports(op) and cases:
            c = cases[0]
            try:
                if op == "sample":
                    solver.sample(c.theta, 1, **c.kwargs)
                else:
                    getattr(solver, op)(c.theta, **c.kwargs)
            except CapabilityError as e:
                if "solvers that can" not in str(e):
                    _fail(f"CapabilityError for {op!r} does not name the solvers that can: {e}")
                tick("capability_error")
            else:
                _fail(f"{op!r} is not declared but did not raise CapabilityError")

    for case in cases:
        theta64 = _cast(case.theta, torch.float64)
        oracle = BruteForce(solver, case.enumerate, case.batched_kwargs)
        where = f"[{case.name}]"
        shapes = _expected_shapes(solver, theta64)
        batch = tuple(solver.batch_shape(theta64))

        # the declared interface: unknown call kwargs and NaN/+inf scores are refused by name
        op0 = caps.operations[0] if caps.operations else None
        if op0 is not None:
            call = (lambda th, **kw: solver.sample(th, 1, **kw)) if op0 == "sample" else getattr(solver, op0)
            if solver.call_kwargs is not None:
                bogus = "not_a_keyword_of_" + type(solver).__name__.lower()
                try:
                    call(theta64, **case.kwargs, **{bogus: 1})
                except UnknownArgumentError as e:
                    if bogus not in str(e):
                        _fail(f"{where} UnknownArgumentError does not name the unknown keyword: {e}")
                    tick("unknown_kwarg_error")
                else:
                    _fail(f"{where} {op0} accepted an undeclared keyword {bogus!r} (call_kwargs = {solver.call_kwargs})")
                for name in solver.batched_kwargs:
                    if name not in solver.call_kwargs:
                        _fail(f"batched_kwargs names {name!r}, which is not in call_kwargs {solver.call_kwargs}")
            if solver.validate:
                for bad in (float("nan"), float("inf")):
                    poisoned = [p.clone() for p in V.leaves(theta64)]
                    if poisoned[0].numel() == 0:
                        break
                    poisoned[0].view(-1)[0] = bad
                    try:
                        call(V.rebuild(theta64, poisoned), **case.kwargs)
                    except DomainError:
                        tick("nan_inf_refused")
                    else:
                        _fail(f"{where} {op0} accepted a {bad} score; expected a DomainError (NaN and +inf are refused)")

        # integer theta is refused
        int_theta = V.rebuild(theta64, (torch.zeros(p.shape, dtype=torch.long) for p in V.leaves(theta64)))
        for op in caps.operations:
            try:
                if op == "sample":
                    solver.sample(int_theta, 1, **case.kwargs)
                else:
                    getattr(solver, op)(int_theta, **case.kwargs)
            except TypeError as e:
                if not isinstance(e, StructgradError):
                    _fail(f"{where} {op} on integer theta raised a bare TypeError: {e}")
                tick("integer_theta_error")
            else:
                _fail(f"{where} {op} accepted integer theta; expected a DTypeError")

        for dev in devices:
            th = _cast(theta64, device=dev)
            kw = _cast_kwargs(case.kwargs, dev)
            snapshot = [p.clone() for p in V.leaves(th)]
            if caps.supports("log_partition"):
                lz = solver.log_partition(th, **kw)
                if tuple(lz.shape) != batch:
                    _fail(f"{where} log_partition: shape {tuple(lz.shape)}, expected the batch shape {batch}")
                if lz.dtype != torch.float64 or lz.device.type != dev:
                    _fail(f"{where} log_partition: dtype/device {lz.dtype}/{lz.device}, expected float64/{dev}")
                _close(lz, oracle.log_partition(theta64, **case.kwargs), atol, f"{where} log_partition vs oracle")
                tick("log_partition_oracle")
            if caps.supports("marginals"):
                mu = solver.marginals(th, **kw)
                _check_structure(mu, th, shapes, f"{where} marginals")
                ref = oracle.marginals(theta64, **case.kwargs)
                for j, (a, b) in enumerate(zip(V.leaves(mu), V.leaves(ref))):
                    _close(a, b, atol, f"{where} marginals[{j}] vs oracle")
                tick("marginals_oracle")
            if caps.supports("log_partition") and caps.supports("marginals"):
                req = V.rebuild(th, (p.clone().requires_grad_(True) for p in V.leaves(th)))
                solver.log_partition(req, **kw).sum().backward()
                mu = solver.marginals(th, **kw)
                for j, (p, m) in enumerate(zip(V.leaves(req), V.leaves(mu))):
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    _close(g, m.sum_to_size(p.shape), atol * 10, f"{where} grad log_partition[{j}] vs marginals")
                lz2, mu2 = solver.log_partition_and_marginals(th, **kw)
                _close(lz2, solver.log_partition(th, **kw), atol, f"{where} log_partition_and_marginals (A)")
                for j, (a, b) in enumerate(zip(V.leaves(mu2), V.leaves(mu))):
                    _close(a, b, atol, f"{where} log_partition_and_marginals (mu[{j}])")
                tick("grad_log_partition_equals_marginals")
            if caps.supports("map"):
                z = solver.map(th, **kw)
                _check_structure(z, th, shapes, f"{where} map")
                best = oracle.map_value(theta64, **case.kwargs)
                for idx, th_i, kw_i in oracle.instances(theta64, **case.kwargs):
                    z_i = V.rebuild(z, (p[idx].cpu() for p in V.leaves(z)))
                    Z, s = oracle.table(th_i, **kw_i)
                    k = oracle.locate(z_i, th_i, **kw_i)
                    if not bool(torch.isfinite(s).any()):
                        continue  # no feasible structure has positive probability
                    if k < 0:
                        _fail(f"{where} map instance {idx}: returned structure is not feasible")
                    if abs(float(s[k]) - float(best[idx])) > max(atol, 1e-9 * abs(float(best[idx]))):
                        _fail(f"{where} map instance {idx}: score {float(s[k])} < optimum {float(best[idx])}")
                tick("map_feasible_optimal")
            if caps.supports("sample"):
                g1 = torch.Generator(device=dev).manual_seed(seed)
                smp = solver.sample(th, num_samples, generator=g1, **kw)
                _check_structure(smp, th, shapes, f"{where} sample", lead=(num_samples,))
                g2 = torch.Generator(device=dev).manual_seed(seed)
                again = solver.sample(th, num_samples, generator=g2, **kw)
                for a, b in zip(V.leaves(smp), V.leaves(again)):
                    if not torch.equal(a, b):
                        _fail(f"{where} sample: not reproducible with the same seeded generator")
                for idx, th_i, kw_i in oracle.instances(theta64, **case.kwargs):
                    Z, s = oracle.table(th_i, **kw_i)
                    if not bool(torch.isfinite(s).any()):
                        continue
                    probs = torch.softmax(s, 0)
                    counts = torch.zeros_like(probs)
                    # match samples to structures in one go
                    flat_Z = torch.cat([z.flatten(1) for z in Z], 1)
                    flat_S = torch.cat([p[(slice(None),) + idx].flatten(1).double().cpu() for p in V.leaves(smp)], 1)
                    eq = (flat_S[:, None, :] == flat_Z[None, :, :]).all(-1)
                    found = eq.any(1)
                    if not bool(found.all()):
                        _fail(f"{where} sample instance {idx}: {int((~found).sum())} infeasible samples")
                    counts += eq.double().sum(0)
                    if bool((counts[probs == 0] > 0).any()):
                        _fail(f"{where} sample instance {idx}: drew a structure of probability 0")
                    stat, dof = _chi_square(counts, probs)
                    thr = chi_square_threshold(dof, p_value)
                    if stat > thr:
                        _fail(f"{where} sample instance {idx}: chi2 {stat:.1f} > {thr:.1f} (dof {dof}, p {p_value:g})")
                tick("sample_frequencies")
            for a, b in zip(V.leaves(th), snapshot):
                if not torch.equal(a, b):
                    _fail(f"{where} theta was mutated")
            tick(f"device_{dev}")

        # float32 agrees with float64
        th32 = _cast(theta64, torch.float32)
        for op in ("log_partition", "marginals"):
            if caps.supports(op):
                a = getattr(solver, op)(th32, **case.kwargs)
                b = getattr(solver, op)(theta64, **case.kwargs)
                for j, (pa, pb) in enumerate(zip(V.leaves(a), V.leaves(b))):
                    if pa.dtype != torch.float32:
                        _fail(f"{where} {op}[{j}] on float32 theta returned {pa.dtype}")
                    _close(pa, pb, float32_atol * max(1.0, _absmax(pb)) if op == "log_partition" else float32_atol, f"{where} {op}[{j}] float32 vs float64")
                tick("float32")

        # gradcheck of nll against a feasible gold structure
        if gradcheck and caps.supports("log_partition") and caps.supports("marginals"):
            finite = all(bool(torch.isfinite(p).all()) for p in V.leaves(theta64))
            if finite:
                golds = []
                for idx, th_i, kw_i in oracle.instances(theta64, **case.kwargs):
                    Z, s = oracle.table(th_i, **kw_i)
                    k = int(torch.randint(len(s), (1,), generator=torch.Generator().manual_seed(seed + len(golds))))
                    golds.append([z[k] for z in Z])
                gold_parts = [torch.stack([g[j] for g in golds]).reshape(sh) for j, sh in enumerate(shapes)]
                gold = V.rebuild(theta64, gold_parts)
                t_parts = [p.clone().requires_grad_(True) for p in V.leaves(theta64)]

                def f(*ps: torch.Tensor) -> torch.Tensor:
                    return nll(V.rebuild(theta64, ps), gold, solver, **case.kwargs)

                if not torch.autograd.gradcheck(f, tuple(t_parts), eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False):
                    _fail(f"{where} gradcheck of nll failed")
                # and the analytic gradient is marginals - gold
                out = f(*t_parts)
                out.sum().backward()
                mu = solver.marginals(theta64, **case.kwargs)
                for j, (p, m, g) in enumerate(zip(t_parts, V.leaves(mu), gold_parts)):
                    _close(p.grad, (m - g).sum_to_size(p.shape), atol * 10, f"{where} nll grad[{j}] = marginals - gold")
                tick("nll_gradcheck")
                _check_second_derivatives(solver, theta64, gold, case.kwargs, where, tick)

    for fn, exc, pattern in bad_inputs:
        try:
            fn(solver)
        except exc as e:
            if not re.search(pattern, str(e)):
                _fail(f"bad input raised {type(e).__name__} but the message {str(e)!r} does not match {pattern!r}")
            if not isinstance(e, (ValueError, TypeError, NotImplementedError, RuntimeError)):
                _fail(f"bad input raised {type(e).__name__}, which is not a ValueError/TypeError")
            tick("bad_input")
        else:
            _fail(f"bad input {fn} did not raise {exc.__name__}")
    return ran
