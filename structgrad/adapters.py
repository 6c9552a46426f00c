"""Adapters that turn plain functions into solvers.

:func:`per_instance_solver` wraps a function that solves ONE instance of a MAP
problem on NumPy arrays,

    fn(theta_i, **kwargs_i) -> z_i,     z_i = argmax_{z ∈ 𝒵} ⟨z, theta_i⟩,

into a batched MAP-only :class:`~structgrad.solver.Solver` usable wherever a
solver is expected (``solver=`` arguments, :func:`structgrad.get_solver`,
:func:`structgrad.testing.check_solver`).  The adapter splits θ ``(*batch, *event)``
into its instances, calls ``fn`` on each (in order, or over a thread pool), checks
and stacks the results.  It is the second of the three ways to plug in a custom
MAP solver (the first: any batched callable θ -> z, wrapped by
:class:`~structgrad.solver.MapSolver`; the third: a :class:`~structgrad.solver.Solver`
subclass, registered by name).

What ``fn`` receives: θ_i as a read-only NumPy array (float16/32/64 keep their
dtype; bfloat16 becomes float32), on the CPU whatever θ's device; for a θ given as
a tuple of tensors, a tuple of arrays (a leaf given without batch dimensions is
shared: every instance gets all of it).  Keyword arguments of the call whose
leading dimensions equal the batch shape are indexed per instance (tensors become
NumPy arrays); others are passed unchanged.

What ``fn`` may return: a NumPy array, a tensor (any dtype, any device) or a
scalar, of the instance's event shape (a tuple for tuple θ).  The result is
converted to θ's dtype, moved to θ's device and detached.  A wrong shape or
structure, or (with ``binary=True``) a value outside {0, 1}, raises
:class:`~structgrad.errors.SolverOutputError` naming the instance.

Threads: ``threads=k`` ≥ 2 solves instances on ``k`` threads.  That speeds things
up only if ``fn`` releases the GIL (OR-Tools, SciPy, NumPy on large arrays,
``numba.njit(nogil=True)``), and ``fn`` must then be thread-safe.

Example:
    >>> import numpy as np, torch, structgrad as sg
    >>> def top2(th):                      # one instance: the 2 largest scores
    ...     z = np.zeros_like(th); z[np.argsort(-th, kind="stable")[:2]] = 1; return z
    >>> solver = sg.per_instance_solver(top2)
    >>> solver.map(torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.0, 0.5]]))
    tensor([[1., 0., 1.],
            [1., 0., 1.]])
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from . import _validate as V
from .errors import DomainError, DTypeError, SolverOutputError
from .solver import Capabilities, Solver, check_map_output

__all__ = ["PerInstanceSolver", "per_instance_solver"]


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A read-only NumPy view (or copy, for bfloat16 / non-CPU) of a detached tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    arr = t.numpy()
    arr = arr.view()  # a fresh view, so the flag below does not touch anyone else's array
    arr.flags.writeable = False
    return arr


def _writable(z: Any) -> Any:
    """A copy of a read-only NumPy array (e.g. ``fn`` returned its input), else ``z``."""
    if isinstance(z, np.ndarray) and not z.flags.writeable:
        return z.copy()
    return z


class PerInstanceSolver(Solver):
    """A MAP-only solver calling ``fn`` once per instance; see the module docstring.

    Args:
        fn: ``fn(theta_i, **kwargs_i) -> z_i`` on NumPy arrays for one instance.
        event_ndim: trailing event dims of θ (an int for every leaf, or a tuple per
            leaf of a tuple θ); default 1, i.e. θ ``(*batch, n)``.
        threads: ``None`` or 1: call ``fn`` in order in the calling thread; k ≥ 2:
            over a pool of k threads (useful when ``fn`` releases the GIL).
        name: label in error messages and ``repr`` (default: ``fn.__name__``).
        exact: whether ``fn`` solves the MAP exactly (the declared capability).
        binary: check that every returned value is 0 or 1.

    Shapes:
        θ: ``(*batch, *event)`` (leaf by leaf) → ``map``: the same, θ's dtype and device.

    Complexity: one call of ``fn`` per instance, plus O(size of θ) to convert and check.
    """

    capabilities = Capabilities(map="exact", batched=False)

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        event_ndim: int | tuple[int, ...] = 1,
        threads: int | None = None,
        name: str | None = None,
        exact: bool = True,
        binary: bool = True,
    ):
        if not callable(fn):
            raise DTypeError(f"fn: expected a callable theta_i -> z_i (one instance, NumPy), got {type(fn).__name__}")
        nds = (event_ndim,) if not isinstance(event_ndim, (tuple, list)) else tuple(event_ndim)
        if not nds:
            raise DomainError("event_ndim: expected an integer >= 0 or a non-empty tuple of them, got ()")
        for k in nds:
            if isinstance(k, bool) or not hasattr(k, "__index__"):
                raise DTypeError(f"event_ndim: expected an integer >= 0 or a tuple of them, got {event_ndim!r}")
            if int(k) < 0:
                raise DomainError(f"event_ndim: expected integers >= 0, got {event_ndim!r}")
        if threads is not None:
            if isinstance(threads, bool) or not hasattr(threads, "__index__"):
                raise DTypeError(f"threads: expected an integer >= 1 or None, got {type(threads).__name__}")
            if int(threads) < 1:
                raise DomainError(f"threads: expected an integer >= 1 or None, got {int(threads)}")
            threads = int(threads)
        self.fn = fn
        self.event_ndim = int(nds[0]) if not isinstance(event_ndim, (tuple, list)) else tuple(int(k) for k in nds)
        self.threads = threads
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.binary = bool(binary)
        self.capabilities = Capabilities(map="exact" if exact else "approximate", batched=False)

    def __repr__(self) -> str:
        return f"PerInstanceSolver(fn={self.name!r}, event_ndim={self.event_ndim!r}, threads={self.threads})"

    def _map(self, theta: Any, **kwargs: Any) -> Any:
        batch = tuple(self._batch_shape(theta))
        parts = V.leaves(theta)
        multi = isinstance(theta, tuple)
        nds = self.event_ndims(theta)
        shared = [i > 0 and p.dim() == k for i, (p, k) in enumerate(zip(parts, nds))]
        cpu = [p.detach().cpu() for p in parts]
        arrays = [_numpy_view(p) for p in cpu]
        kw_batched = {
            k: (_numpy_view(v) if isinstance(v, torch.Tensor) else v)
            for k, v in kwargs.items()
            if batch and tuple(getattr(v, "shape", ())[: len(batch)]) == batch
        }
        kw_plain = {k: v for k, v in kwargs.items() if k not in kw_batched}
        index = list(np.ndindex(*batch)) if batch else [()]
        num = len(index)

        def one(idx: tuple[int, ...]) -> Any:
            th = [a if s else a[idx] for a, s in zip(arrays, shared)]
            kw = dict(kw_plain)
            kw.update({k: v[idx] for k, v in kw_batched.items()})
            z = self.fn(tuple(th) if multi else th[0], **kw)
            if isinstance(z, (tuple, list)):
                z = type(z)(_writable(zp) for zp in z)
            else:
                z = _writable(z)
            ref = V.rebuild(theta, (c if s else c[idx] for c, s in zip(cpu, shared)))
            try:
                return V.leaves(check_map_output(z, ref, self.name, binary=self.binary))
            except SolverOutputError as e:
                raise SolverOutputError(f"{e} (instance {idx} of batch shape {V.fmt_shape(batch)})") from None

        if self.threads is not None and self.threads > 1 and num > 1:
            with ThreadPoolExecutor(max_workers=min(self.threads, num), thread_name_prefix="structgrad-per-instance") as ex:
                results = list(ex.map(one, index))
        else:
            results = [one(idx) for idx in index]

        out = []
        for j, p in enumerate(parts):
            event = tuple(p.shape) if shared[j] else tuple(p.shape[len(batch):])
            if results:
                leaf = torch.stack([r[j] for r in results]).reshape(batch + event)
            else:
                leaf = torch.zeros(batch + event, dtype=p.dtype)
            out.append(leaf.to(p.device))
        return V.rebuild(theta, out)


def per_instance_solver(
    fn: Callable[..., Any],
    *,
    event_ndim: int | tuple[int, ...] = 1,
    threads: int | None = None,
    name: str | None = None,
    exact: bool = True,
    binary: bool = True,
) -> PerInstanceSolver:
    """Adapt a one-instance NumPy MAP function ``fn(theta_i, **kw_i) -> z_i`` into a batched solver.

    Args:
        fn: solves one instance: gets θ_i as a read-only NumPy array (a tuple of
            arrays for tuple θ) and returns z_i of the same event shape (array,
            tensor or scalar; values in {0, 1} unless ``binary=False``).
        event_ndim: trailing event dims of θ (int, or a tuple per leaf); default 1.
        threads: ``None``/1: sequential; k ≥ 2: a pool of k threads (only useful when
            ``fn`` releases the GIL; ``fn`` must then be thread-safe).
        name: label in error messages (default ``fn.__name__``).
        exact: declare the MAP exact (``True``) or approximate.
        binary: check outputs are in {0, 1}.

    Returns:
        A :class:`PerInstanceSolver` (MAP only): ``solver.map(theta)`` gives
        ``(*batch, *event)`` in θ's dtype and device; pass it as ``solver=`` anywhere.

    Raises:
        DTypeError / DomainError: bad ``fn``, ``event_ndim`` or ``threads``.
        SolverOutputError (per call): ``fn`` returned a wrong shape/structure or a
        non-binary value; the message names the instance.

    Shapes:
        θ ``(*batch, *event)`` → z ``(*batch, *event)``; ``fn`` sees ``(*event)``.

    Example:
        >>> import numpy as np, torch, structgrad as sg
        >>> solver = sg.per_instance_solver(lambda th: (th > 0).astype(np.float64), threads=2)
        >>> solver.map(torch.tensor([[1.0, -2.0], [-1.0, 3.0]]))
        tensor([[1., 0.],
                [0., 1.]])
    """
    return PerInstanceSolver(fn, event_ndim=event_ndim, threads=threads, name=name, exact=exact, binary=binary)
