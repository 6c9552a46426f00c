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
shared: every instance gets all of it).

Keyword arguments of the call (``solver.map(theta, k=..., A=...)``) are shared by
every instance unless named in ``batched_kwargs``; nothing is guessed from shapes.

* A keyword named in ``batched_kwargs`` is per instance: it must be a tensor, a
  NumPy array or a nested list whose leading dimensions are θ's batch shape
  (else :class:`~structgrad.errors.ShapeError`), and instance ``i`` gets ``v[i]``.
  A keyword in ``batched_kwargs`` that the call omits is simply not passed.
* Every other keyword reaches every instance whole, whatever its shape (a shared
  matrix ``A (m, n)`` stays ``(m, n)`` even when the batch shape is ``(m,)``).

Tensors (per-instance or shared) reach ``fn`` as read-only NumPy arrays, converted
like θ; NumPy arrays as read-only views.  ``fn`` therefore cannot modify the
caller's data.  Other values (numbers, strings, lists given as shared, objects) are
passed as they are.

What ``fn`` may return: a NumPy array, a tensor (any dtype, any device) or a
scalar, of the instance's event shape (a tuple for tuple θ).  The result is
converted to θ's dtype, moved to θ's device and detached.  A wrong shape or
structure, or (with ``binary=True``) a value outside {0, 1}, raises
:class:`~structgrad.errors.SolverOutputError` naming the instance.

Threads: ``threads=k`` ≥ 2 solves instances on ``k`` threads.  That speeds things
up only if ``fn`` releases the GIL (OR-Tools, SciPy, NumPy on large arrays,
``numba.njit(nogil=True)``), and ``fn`` must then be thread-safe.

Examples:
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

from . import checks as V
from .errors import DomainError, DTypeError, ShapeError, SolverOutputError
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


def _read_only(v: Any) -> Any:
    """Tensors as read-only NumPy arrays, NumPy arrays as read-only views; others unchanged."""
    if isinstance(v, torch.Tensor):
        return _numpy_view(v)
    if isinstance(v, np.ndarray):
        v = v.view()
        v.flags.writeable = False
    return v


def _batched_kwarg(name: str, v: Any, batch: tuple[int, ...]) -> np.ndarray:
    """A per-instance keyword as a read-only array whose leading dims are ``batch``."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        arr = _read_only(v)
    else:
        try:
            arr = np.array(v)
        except (ValueError, TypeError) as e:
            raise ShapeError(
                f"{name}: expected an array with leading dims {V.fmt_shape(batch)} (the batch shape of theta; "
                f"{name} is in batched_kwargs), got {type(v).__name__} ({e})"
            ) from None
        arr.flags.writeable = False
    V.check_leading_shape(arr, batch, name, f"(the batch shape of theta; {name} is in batched_kwargs)")
    return arr


def _names(batched_kwargs: Any) -> tuple[str, ...]:
    """``batched_kwargs`` as a tuple of names (a single string is one name)."""
    if isinstance(batched_kwargs, str):
        batched_kwargs = (batched_kwargs,)
    try:
        names = tuple(batched_kwargs)
    except TypeError:
        raise DTypeError(
            f"batched_kwargs: expected a tuple of keyword-argument names, got {type(batched_kwargs).__name__}"
        ) from None
    for k in names:
        if not isinstance(k, str) or not k.isidentifier():
            raise DTypeError(f"batched_kwargs: expected keyword-argument names (identifiers), got {k!r}")
    if len(set(names)) != len(names):
        raise DomainError(f"batched_kwargs: expected distinct names, got {names!r}")
    return names


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
        batched_kwargs: names of the keyword arguments that are per instance (leading
            dims = θ's batch shape, indexed for each call of ``fn``); every other
            keyword is passed whole to every instance.  A string is one name.
        name: label in error messages and ``repr`` (default: ``fn.__name__``).
        exact: whether ``fn`` solves the MAP exactly (the declared capability).
        binary: check that every returned value is 0 or 1.

    Shapes:
        θ: ``(*batch, *event)`` (leaf by leaf) → ``map``: the same, θ's dtype and device.
        a keyword in ``batched_kwargs``: ``(*batch, ...)``; ``fn`` gets ``(...)``.

    Complexity: one call of ``fn`` per instance, plus O(size of θ) to convert and check.
    """

    capabilities = Capabilities(map="exact", batched=False)
    call_kwargs = None  # whatever ``fn`` accepts: shared keywords reach it whole

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        event_ndim: int | tuple[int, ...] = 1,
        threads: int | None = None,
        batched_kwargs: tuple[str, ...] | str = (),
        name: str | None = None,
        exact: bool = True,
        binary: bool = True,
    ):
        if not callable(fn):
            raise DTypeError(f"fn: expected a callable theta_i -> z_i (one instance, NumPy), got {type(fn).__name__}")
        multi = isinstance(event_ndim, (tuple, list))
        nds = tuple(event_ndim) if multi else (event_ndim,)
        if not nds:
            raise DomainError("event_ndim: expected an integer >= 0 or a non-empty tuple of them, got ()")
        nds = tuple(
            V.check_positive_int(k, f"event_ndim[{i}]" if multi else "event_ndim", minimum=0) for i, k in enumerate(nds)
        )
        self.fn = fn
        self.event_ndim = nds if multi else nds[0]
        self.threads = None if threads is None else V.check_positive_int(threads, "threads")
        self.batched_kwargs = _names(batched_kwargs)
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.binary = bool(binary)
        self.capabilities = Capabilities(map="exact" if exact else "approximate", batched=False)

    def __repr__(self) -> str:
        return (
            f"PerInstanceSolver(fn={self.name!r}, event_ndim={self.event_ndim!r}, threads={self.threads}, "
            f"batched_kwargs={self.batched_kwargs!r})"
        )

    def _map(self, theta: Any, **kwargs: Any) -> Any:
        batch = tuple(self._batch_shape(theta))
        parts = V.leaves(theta)
        multi = isinstance(theta, tuple)
        nds = self.event_ndims(theta)
        shared = [i > 0 and p.dim() == k for i, (p, k) in enumerate(zip(parts, nds))]
        cpu = [p.detach().cpu() for p in parts]
        arrays = [_numpy_view(p) for p in cpu]
        kw_batched = {k: _batched_kwarg(k, v, batch) for k, v in kwargs.items() if k in self.batched_kwargs}
        kw_plain = {k: _read_only(v) for k, v in kwargs.items() if k not in kw_batched}
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
    batched_kwargs: tuple[str, ...] | str = (),
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
        batched_kwargs: names of the per-instance keyword arguments of a call: each
            must have θ's batch shape as leading dims and ``fn`` gets its slice; all
            other keywords reach every instance whole (module docstring).
        name: label in error messages (default ``fn.__name__``).
        exact: declare the MAP exact (``True``) or approximate.
        binary: check outputs are in {0, 1}.

    Returns:
        A new :class:`PerInstanceSolver` (MAP only); ``solver.map(theta)`` gives
            ``(*batch, *event)`` in θ's dtype and device; pass it as ``solver=`` anywhere.

    Raises:
        DTypeError: bad ``fn``, ``event_ndim``, ``threads`` or ``batched_kwargs`` (a wrong type).
        DomainError: bad ``event_ndim``, ``threads`` or ``batched_kwargs`` (a wrong value).
        ShapeError: (per call) a keyword in ``batched_kwargs`` whose leading dims are
            not θ's batch shape.
        SolverOutputError: (per call) ``fn`` returned a wrong shape/structure or a
            non-binary value; the message names the instance.

    Shapes:
        θ ``(*batch, *event)`` → z ``(*batch, *event)``; ``fn`` sees ``(*event)``;
        a batched keyword ``(*batch, ...)`` → ``fn`` sees ``(...)``.

    Examples:
        >>> import numpy as np, torch, structgrad as sg
        >>> solver = sg.per_instance_solver(lambda th: (th > 0).astype(np.float64), threads=2)
        >>> solver.map(torch.tensor([[1.0, -2.0], [-1.0, 3.0]]))
        tensor([[1., 0.],
                [0., 1.]])
        >>> def topk(th, k):                  # k differs per instance
        ...     z = np.zeros_like(th); z[np.argsort(-th, kind="stable")[:k]] = 1; return z
        >>> sg.per_instance_solver(topk, batched_kwargs=("k",)).map(torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]]), k=torch.tensor([1, 2]))
        tensor([[0., 1., 0.],
                [0., 1., 1.]])
    """
    return PerInstanceSolver(
        fn, event_ndim=event_ndim, threads=threads, batched_kwargs=batched_kwargs, name=name, exact=exact, binary=binary
    )
