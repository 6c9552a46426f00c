"""The common solver interface.

A *solver* computes, for the exponential family p(z; θ) ∝ exp⟨z, θ⟩ over a
discrete structured set 𝒵, some of

=================  ============================================  ===================
operation          math                                          returns
=================  ============================================  ===================
``map``            argmax_z ⟨z, θ⟩                               structure of θ
``marginals``      μ(θ) = E_p[z] = ∇A(θ)                         structure of θ
``log_partition``  A(θ) = log Σ_z exp⟨z, θ⟩                      ``(*batch,)``
``sample``         z ~ p(·; θ)                                   ``(S, *θ leaves)``
=================  ============================================  ===================

θ is a tensor or a tuple of tensors (*leaves*), batch dimensions first:
``(*batch, *event)``.  Outputs of ``map``, ``marginals`` and ``sample`` have, leaf by
leaf, shape ``(*batch, *event)``: the θ leaf's own shape when the leaf carries the
batch dimensions.  A leaf given without batch dimensions (a chain's shared transition
matrix ``(C, C)``) is shared by every instance; its output leaf gets the batch
dimensions added, and ∇ A(θ).sum() = μ summed over the batch.

Each solver declares :class:`Capabilities`; asking for an operation it lacks raises
:class:`~structgrad.errors.CapabilityError` naming the solvers that have it.

Writing a solver: subclass :class:`Solver`, set ``capabilities`` and ``event_ndim``,
and implement the hooks ``_map``, ``_marginals``, ``_log_partition``, ``_sample``
(and optionally ``_log_partition_and_marginals`` when one pass gives both).  The
public methods check capabilities, dtypes, devices and batch shapes, then call the
hook.  ``_log_partition`` must be differentiable with gradient ``marginals``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from . import _catalog
from . import checks as V
from .errors import CapabilityError, DeviceError, DTypeError, ShapeError, SolverOutputError

__all__ = ["OPERATIONS", "Capabilities", "Solver", "MapSolver"]

OPERATIONS = ("map", "marginals", "log_partition", "sample")
_QUALITIES = (None, "exact", "approximate")


@dataclass(frozen=True)
class Capabilities:
    """What a solver can do.

    Each operation is ``"exact"``, ``"approximate"`` or ``None`` (not available).
    ``devices`` lists the torch device types the solver accepts θ on; ``batched``
    says whether a call handles leading batch dimensions in one go (solvers that
    are not batched still accept batches, looping internally).
    ``differentiable_marginals`` says whether ``marginals(θ)`` is differentiable in θ
    (its Jacobian is the Hessian of A, Cov_p(z)); then second derivatives of
    ``log_partition`` and :func:`structgrad.nll` are exact, and estimators such as
    exact-marginal straight-through can backpropagate through the marginals.

    A solver's ``capabilities`` describe the instance (its options: a CPU-only
    backend, a time limit that makes the MAP approximate); the class attribute holds
    the defaults, which :func:`structgrad.list_solvers` shows.  Derive an instance's
    from the defaults with :meth:`replace`.
    """

    map: str | None = None
    marginals: str | None = None
    log_partition: str | None = None
    sample: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    batched: bool = True
    differentiable_marginals: bool = False

    def __post_init__(self) -> None:
        for op in OPERATIONS:
            q = getattr(self, op)
            V.check_choice(q, _QUALITIES, f"Capabilities.{op}")

    def replace(self, **changes: Any) -> "Capabilities":
        """A copy with ``changes`` applied (e.g. ``caps.replace(devices=("cpu",))``)."""
        return dataclasses.replace(self, **changes)

    def supports(self, op: str) -> bool:
        """True if operation ``op`` is available."""
        V.check_choice(op, OPERATIONS, "op")
        return getattr(self, op) is not None

    def is_exact(self, op: str) -> bool:
        """True if operation ``op`` is available and exact."""
        return self.supports(op) and getattr(self, op) == "exact"

    @property
    def operations(self) -> tuple[str, ...]:
        """The available operations, in the order of :data:`OPERATIONS`."""
        return tuple(op for op in OPERATIONS if getattr(self, op) is not None)

    def __str__(self) -> str:
        ops = ", ".join(f"{op} ({getattr(self, op)})" for op in self.operations) or "nothing"
        diff = "; differentiable marginals" if self.differentiable_marginals else ""
        return f"{ops}; devices {'/'.join(self.devices)}{'; batched' if self.batched else ''}{diff}"


class Solver:
    """Base class of every solver.  See the module docstring for the contract.

    Class attributes (a subclass sets them; instances may override them):
        capabilities: the declared :class:`Capabilities` (an instance sets its own
            when its options change them).
        event_ndim: number of trailing (event) dimensions of each θ leaf (an int for
            all leaves, a tuple per leaf, or ``None`` when unknown: batch shapes are
            then not checked).  Subclasses whose event dims depend on θ override
            :meth:`event_ndims`.
        num_leaves: how many tensors θ has: 1 for a plain tensor ``(*batch, n)`` (a
            tuple is then a ShapeError), k for a tuple of k parts (chain: 2), ``None``
            for "any structure" (wrapped user callables).
        call_kwargs: the per-call keyword arguments the operations accept (chain:
            ``("lengths",)``), or ``None`` for "any" (wrapped user callables).  Any other
            keyword raises :class:`~structgrad.errors.UnknownArgumentError`.
        batched_kwargs: the call kwargs that carry the batch dimensions: a tensor
            whose leading dims are θ's batch shape, one value per instance (chain:
            ``("lengths",)``).  Generic code that adds a sample dimension to θ (imle)
            expands exactly these; a tensor given for one of them must have θ's batch
            shape as its leading dims and sit on θ's device.  Every name in
            ``batched_kwargs`` is also a call kwarg.

    Instance attributes:
        name: the name it was obtained under from the registry (or ``None``).
        validate: run the checks that need a host synchronisation (NaN and +inf in
            θ, value ranges of call kwargs) on every call; ``get_solver(name,
            validate=False)`` switches them off for hot loops.  Structural checks
            (dtype, device, shapes) always run.

    Validation: every public operation calls :meth:`check_theta` (structure), then,
    when ``validate``, :meth:`check_values` (scores), then :meth:`check_kwargs`.  These
    are the public hooks a solver extends (calling ``super()``), with the helpers of
    :mod:`structgrad.checks`; built-in solvers use nothing else.

    Score policy, the same for every solver: ``-inf`` means "impossible" (a forbidden
    label, element or transition); NaN and ``+inf`` are refused with a
    :class:`~structgrad.errors.DomainError` naming the tensor (``+inf`` would make A
    infinite and the marginals undefined).
    """

    capabilities: ClassVar[Capabilities] = Capabilities()
    event_ndim: ClassVar[int | tuple[int, ...] | None] = 1
    call_kwargs: ClassVar[tuple[str, ...] | None] = ()
    batched_kwargs: ClassVar[tuple[str, ...]] = ()
    num_leaves: ClassVar[int | None] = None
    name: str | None = None
    validate: bool = True

    # ------------------------------------------------------------------ public API
    def map(self, theta: Any, **kwargs: Any) -> Any:
        """MAP structure argmax_z ⟨z, θ⟩; same structure as θ (see module doc)."""
        self._require("map")
        theta, kwargs = self._prepare(theta, kwargs)
        return self._map(theta, **kwargs)

    def marginals(self, theta: Any, **kwargs: Any) -> Any:
        """Marginals μ(θ) = E_{z~p(·;θ)}[z] = ∇A(θ); same structure as θ.

        Differentiable in θ when ``capabilities.differentiable_marginals``."""
        self._require("marginals")
        theta, kwargs = self._prepare(theta, kwargs)
        return self._marginals(theta, **kwargs)

    def log_partition(self, theta: Any, **kwargs: Any) -> torch.Tensor:
        """A(θ) = log Σ_z exp⟨z, θ⟩, shape ``(*batch,)``, differentiable (∇ = marginals)."""
        self._require("log_partition")
        theta, kwargs = self._prepare(theta, kwargs)
        return self._log_partition(theta, **kwargs)

    def log_partition_and_marginals(self, theta: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """``(log_partition(θ), marginals(θ))``, in one pass where the solver can.

        The values are detached from autograd (this is the building block of
        custom backward passes such as :func:`structgrad.nll`).
        """
        self._require("log_partition")
        self._require("marginals")
        theta, kwargs = self._prepare(theta, kwargs)
        with torch.no_grad():
            return self._log_partition_and_marginals(theta, **kwargs)

    def sample(
        self, theta: Any, num_samples: int = 1, generator: torch.Generator | None = None, **kwargs: Any
    ) -> Any:
        """``num_samples`` exact (or declared approximate) draws z ~ p(·; θ).

        Returns the structure of θ with a leading sample dimension ``(S, *batch, *event)``.
        Randomness comes only from ``generator`` (a ``torch.Generator`` on θ's device).
        """
        self._require("sample")
        theta, kwargs = self._prepare(theta, kwargs)
        num_samples = V.check_positive_int(num_samples, "num_samples")
        V.check_generator(generator, V.leaves(theta)[0].device)
        return self._sample(theta, num_samples, generator, **kwargs)

    def batch_shape(self, theta: Any) -> torch.Size:
        """The batch shape ``(*batch,)`` of θ; checks the leaves agree on it (no value checks)."""
        theta = self.check_theta(theta)
        return self._batch_shape(theta)

    def event_ndims(self, theta: Any) -> tuple[int, ...] | None:
        """Trailing event dims of each θ leaf (``None``: unknown)."""
        n = len(V.leaves(theta))
        if self.event_ndim is None:
            return None
        if isinstance(self.event_ndim, int):
            return (self.event_ndim,) * n
        if len(self.event_ndim) != n:
            raise ShapeError(
                f"theta: expected {len(self.event_ndim)} tensors for solver {self._label()}, got {n}"
            )
        return tuple(self.event_ndim)

    def unshare(self, theta: Any) -> Any:
        """θ with every shared leaf given a per-instance layout (views, no copies).

        Generic code that perturbs each instance separately (:func:`structgrad.imle`, the
        perturbation estimators) calls this.  A leaf given without batch dims becomes
        ``(*batch, *R, *E)``: ``E`` is the leaf's own shape, and ``R`` are replication
        dims over which the leaf's sufficient statistic sums — so that ``map`` of the
        unshared θ, summed over ``R``, is ``map``'s output layout for the shared leaf.
        The default is ``R = ()`` (the leaf broadcast over the batch); a solver whose
        shared leaf stands for several positions overrides it (chain: a ``(C, C)`` edge
        becomes ``(*batch, T-1, C, C)``, R = the positions, and transition counts are
        the sum over them).

        Shapes:
            θ leaves ``(*batch, *event)`` or shared ``(*event)`` → ``(*batch, [*R,] *event)``.
        """
        theta = self.check_theta(theta)
        nd = self.event_ndims(theta)
        if nd is None:
            return theta
        batch = tuple(self._batch_shape(theta))
        parts = V.leaves(theta)
        return V.rebuild(
            theta, (p.expand(batch + tuple(p.shape)) if i > 0 and p.dim() == k else p for i, (p, k) in enumerate(zip(parts, nd)))
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ------------------------------------------------------------------ validation hooks
    def check_theta(self, theta: Any) -> Any:
        """Structural checks of θ shared by every operation; returns θ (a list becomes a tuple).

        Checks: a tensor or non-empty tuple of tensors (as many as ``num_leaves`` says),
        floating dtype, one dtype and one device for all leaves, a device in
        ``capabilities.devices``, and batch shapes that agree.  No host synchronisation.
        Override to add structure-specific shape checks, then call ``super().check_theta``.
        """
        kind = type(theta).__name__
        if isinstance(theta, list):
            theta = tuple(theta)
        parts = V.leaves(theta)
        if len(parts) == 0:
            raise ShapeError("theta: expected a tensor or a non-empty tuple of tensors, got an empty tuple")
        if self.num_leaves == 1 and isinstance(theta, tuple) and all(isinstance(p, torch.Tensor) for p in parts):
            raise ShapeError(
                f"theta: expected one tensor (*batch, ...) for solver {self._label()}, got a {kind} of "
                f"{len(parts)} tensor{'' if len(parts) == 1 else 's'}"
            )
        if self.num_leaves is not None and self.num_leaves > 1 and (not isinstance(theta, tuple) or len(parts) != self.num_leaves):
            what = f"a tuple of {len(parts)}" if isinstance(theta, tuple) else type(theta).__name__
            raise ShapeError(f"theta: expected a tuple of {self.num_leaves} tensors for solver {self._label()}, got {what}")
        names = V.leaf_names(theta)
        for p, nm in zip(parts, names):
            V.check_float_tensor(p, nm)
        device = V.check_same_device(dict(zip(names, parts)))
        if device.type not in self.capabilities.devices:
            raise DeviceError(
                f"theta is on device {device} but solver {self._label()} runs on "
                f"{', '.join(self.capabilities.devices)}"
            )
        if len({p.dtype for p in parts}) > 1:
            raise DTypeError(
                "theta: expected all tensors to share one dtype, got "
                + ", ".join(f"{nm} {p.dtype}" for nm, p in zip(names, parts))
            )
        self._batch_shape(theta)
        return theta

    def check_values(self, theta: Any) -> None:
        """Value checks of θ (one host synchronisation): NaN and ``+inf`` are refused.

        Runs only when ``self.validate``.  See :func:`structgrad.checks.check_scores`."""
        V.check_scores(theta, V.leaf_names(theta))

    def check_kwargs(self, theta: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check the per-call keyword arguments against θ; returns them (possibly normalised).

        Base checks: every name is in ``call_kwargs`` (unless it is ``None``), and a
        tensor given for a name in ``batched_kwargs`` has θ's batch shape as its leading
        dims and θ's device.  Override to check values (``self.validate`` says whether
        checks that synchronise should run), then call ``super().check_kwargs``.
        """
        V.check_call_kwargs(kwargs, self.call_kwargs, self._label())
        if self.batched_kwargs and kwargs:
            batch = tuple(self._batch_shape(theta))
            device = V.leaves(theta)[0].device
            for name in self.batched_kwargs:
                v = kwargs.get(name)
                if isinstance(v, torch.Tensor):
                    V.check_leading_shape(v, batch, name, "(the batch shape of theta)")
                    if v.device != device:
                        raise DeviceError(f"{name} is on device {v.device} but theta is on {device}")
        return kwargs

    def _prepare(self, theta: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        theta = self.check_theta(theta)
        if self.validate:
            self.check_values(theta)
        return theta, self.check_kwargs(theta, kwargs)

    # ------------------------------------------------------------------ hooks
    def _map(self, theta: Any, **kwargs: Any) -> Any:  # pragma: no cover - guarded by _require
        raise CapabilityError(self._missing("map"))

    def _marginals(self, theta: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise CapabilityError(self._missing("marginals"))

    def _log_partition(self, theta: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover
        raise CapabilityError(self._missing("log_partition"))

    def _sample(self, theta: Any, num_samples: int, generator: torch.Generator | None, **kwargs: Any) -> Any:
        raise CapabilityError(self._missing("sample"))  # pragma: no cover

    def _log_partition_and_marginals(self, theta: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        detached = V.rebuild(theta, (t.detach() for t in V.leaves(theta)))
        return self._log_partition(detached, **kwargs).detach(), self._marginals(detached, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _label(self) -> str:
        return repr(self.name) if self.name else type(self).__name__

    def _missing(self, op: str) -> str:
        others = [n for n in _catalog.supporting(op) if n != self.name]
        have = ", ".join(others) if others else "none registered"
        return (
            f"solver {self._label()} cannot compute {op!r} (it declares: "
            f"{', '.join(self.capabilities.operations) or 'nothing'}); solvers that can: {have}"
        )

    def _require(self, op: str) -> None:
        if not self.capabilities.supports(op):
            raise CapabilityError(self._missing(op))

    def _batch_shape(self, theta: Any) -> torch.Size:
        parts = V.leaves(theta)
        nd = self.event_ndims(theta)
        if nd is None:
            return parts[0].shape[:-1] if parts[0].dim() else torch.Size()
        multi = isinstance(theta, tuple)
        batch: torch.Size | None = None
        first = None
        for i, (p, k) in enumerate(zip(parts, nd)):
            nm = f"theta[{i}]" if multi else "theta"
            if p.dim() < k:
                raise ShapeError(
                    f"{nm}: expected at least {k} dimensions (*batch, {k} event dims) for solver "
                    f"{self._label()}, got shape {V.fmt_shape(p.shape)}"
                )
            if p.dim() == k and i > 0:
                continue  # a shared leaf without batch dims
            b = p.shape[: p.dim() - k]
            if batch is None:
                batch, first = b, nm
            elif b != batch:
                raise ShapeError(
                    f"{nm} has batch shape {V.fmt_shape(b)} but {first} has {V.fmt_shape(batch)}; "
                    f"expected equal batch shapes (a leaf may omit the batch dims to be shared; "
                    f"nothing is broadcast)"
                )
        return batch if batch is not None else torch.Size()


class MapSolver(Solver):
    """A MAP-only solver wrapping a plain callable ``fn(theta, **kwargs) -> z``.

    The output is checked: the same structure and shapes as θ, values in {0, 1}
    (NaN is not binary).  A NumPy array, or a tensor of another dtype or on another
    device, is converted to θ's dtype and moved back to θ's device; the result is
    detached.  Violations raise :class:`~structgrad.errors.SolverOutputError`.

    Args:
        fn: callable θ -> z; called with θ exactly as given (tensor or tuple).
        name: label used in error messages.
        exact: whether ``fn`` solves the MAP problem exactly (declared capability).
        binary: check that values are in {0, 1} (turn off for count-valued parts).
    """

    event_ndim = None
    call_kwargs = None  # whatever the callable accepts; it sees every keyword

    def __init__(self, fn: Callable[..., Any], name: str | None = None, *, exact: bool = True, binary: bool = True):
        if not callable(fn):
            raise DTypeError(f"fn: expected a callable theta -> z, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.binary = binary
        self.capabilities = Capabilities(map="exact" if exact else "approximate")

    def _map(self, theta: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            z = self.fn(theta, **kwargs)
        return check_map_output(z, theta, self.name, binary=self.binary)


def check_map_output(z: Any, theta: Any, name: str | None, *, binary: bool = True) -> Any:
    """Check (and convert) a MAP solver's output against θ; see :class:`MapSolver`."""
    label = repr(name) if name else "custom solver"
    t_parts = V.leaves(theta)
    multi = isinstance(theta, tuple)
    if multi != isinstance(z, (tuple, list)):
        raise SolverOutputError(
            f"solver {label} returned a {type(z).__name__} for theta given as a "
            f"{'tuple of ' + str(len(t_parts)) + ' tensors' if multi else 'tensor'}; expected the same structure"
        )
    z_parts = V.leaves(z)
    if len(z_parts) != len(t_parts):
        raise SolverOutputError(f"solver {label} returned {len(z_parts)} parts, expected {len(t_parts)} like theta")
    out = []
    for i, (zp, tp) in enumerate(zip(z_parts, t_parts)):
        nm = f"[{i}]" if multi else ""
        if isinstance(zp, (np.ndarray, np.number, int, float, bool)) and not isinstance(zp, (str, bytes)):
            arr = np.asarray(zp)
            if arr.dtype.kind not in "biuf":
                raise SolverOutputError(
                    f"solver {label} returned an array of dtype {arr.dtype} as z{nm}; expected numbers of shape "
                    f"{V.fmt_shape(tp.shape)}"
                )
            zp = torch.as_tensor(arr)
        if isinstance(zp, torch.Tensor) and (zp.device.type == "meta" or zp.is_complex()):
            what = "a meta tensor (no data)" if zp.device.type == "meta" else f"a tensor of dtype {zp.dtype}"
            raise SolverOutputError(
                f"solver {label} returned {what} as z{nm}; expected real values of shape {V.fmt_shape(tp.shape)}"
            )
        if not isinstance(zp, torch.Tensor):
            raise SolverOutputError(
                f"solver {label} returned {type(zp).__name__} as z{nm}; expected a tensor or array of shape "
                f"{V.fmt_shape(tp.shape)}"
            )
        if tuple(zp.shape) != tuple(tp.shape):
            raise SolverOutputError(
                f"solver {label} returned z{nm} of shape {V.fmt_shape(zp.shape)}; expected the shape of "
                f"theta{nm}, {V.fmt_shape(tp.shape)}"
            )
        zp = zp.detach().to(device=tp.device, dtype=tp.dtype)
        if binary:
            ok = (zp == 0) | (zp == 1)
            if not bool(ok.all()):
                bad = zp[~ok].flatten()[:3].tolist()
                raise SolverOutputError(
                    f"solver {label} returned non-binary values in z{nm} (e.g. {bad}); expected values in {{0, 1}}"
                )
        out.append(zp)
    return V.rebuild(theta, out)
