"""Public argument checks, shared by the core, the built-in solvers and third-party solvers.

Each check raises a structgrad error (a subclass of ``ValueError``/``TypeError``)
whose message names the argument, what was expected and what came.  None of them
mutates or copies its input.  A solver uses them from its validation hooks
(:meth:`structgrad.Solver.check_theta`, :meth:`~structgrad.Solver.check_values`,
:meth:`~structgrad.Solver.check_kwargs`); the built-in solvers use nothing else.

Also here, the small numeric helpers every solver needs once: :data:`NEG_INF`,
:func:`finite_or_zero`, :func:`flatten_batch`.

Examples:
    >>> import torch
    >>> from structgrad import checks
    >>> checks.check_choice("rows", ("rows", "columns"), "schedule")
    'rows'
    >>> checks.check_scores(torch.tensor([0.0, float("-inf")]), "theta")   # -inf is allowed
    >>> checks.check_scores(torch.tensor([0.0, float("nan")]), "theta")
    Traceback (most recent call last):
    ...
    structgrad.errors.DomainError: theta: expected scores that are finite or -inf (impossible), got 1 NaN (first at index (1,))
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .errors import DeviceError, DomainError, DTypeError, ShapeError, UnknownArgumentError

#: The score of an impossible outcome.  Never replaced by a large negative number.
NEG_INF = float("-inf")


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` where finite, else 0 (for re-centring by a maximum that may be ±inf)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def flatten_batch(x: torch.Tensor, event_ndim: int) -> tuple[torch.Tensor, torch.Size]:
    """``x (*batch, *event)`` as ``(B, *event)`` (a view where possible) and the batch shape."""
    batch = x.shape[: x.dim() - event_ndim]
    return x.reshape((-1,) + tuple(x.shape[x.dim() - event_ndim :])), batch

__all__ = [
    "NEG_INF",
    "finite_or_zero",
    "flatten_batch",
    "fmt_shape",
    "leaves",
    "leaf_names",
    "rebuild",
    "check_scores",
    "check_call_kwargs",
    "check_choice",
    "check_leading_shape",
    "check_float_tensor",
    "check_same_device",
    "check_shape",
    "check_index_tensor",
    "check_lengths",
    "check_generator",
    "check_real",
    "check_positive_int",
]


def fmt_shape(shape: Sequence[int]) -> str:
    """``(2, 3)`` style text for a shape (``()`` for a scalar)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join(str(s) for s in shape) + ")"


def leaves(theta: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a potential: ``theta`` itself, or the items of a tuple/list."""
    if isinstance(theta, (tuple, list)):
        return tuple(theta)
    return (theta,)


def leaf_names(theta: Any) -> list[str]:
    """Names for messages: ``["theta"]`` for a tensor, ``["theta[0]", ...]`` for a tuple."""
    if isinstance(theta, (tuple, list)):
        return [f"theta[{i}]" for i in range(len(theta))]
    return ["theta"]


def check_scores(x: Any, name: str | Sequence[str]) -> None:
    """Scores must be finite or ``-inf`` (impossible): NaN and ``+inf`` are refused.

    ``x`` is a tensor or a tuple of tensors (then ``name`` is a list of names, one per
    tensor).  One host synchronisation for all of them; the message counts the bad
    entries and gives the first one's index.
    """
    parts = leaves(x)
    names = [name] if isinstance(name, str) else list(name)
    tops = [p.detach().amax() for p in parts if p.numel()]
    if not tops:
        return
    top = torch.stack(tops).amax()  # one reduction per tensor: amax is NaN if any entry is, +inf if any is
    if not bool(torch.isnan(top) | torch.isposinf(top)):
        return
    for p, nm in zip(parts, names):
        nan, pinf = torch.isnan(p), torch.isposinf(p)
        if bool((nan | pinf).any()):
            what = []
            for mask, label in ((nan, "NaN"), (pinf, "+inf")):
                c = int(mask.sum())
                if c:
                    first = tuple(int(i) for i in mask.nonzero()[0].tolist())
                    what.append(f"{c} {label} (first at index {first})")
            raise DomainError(
                f"{nm}: expected scores that are finite or -inf (impossible), got {' and '.join(what)}"
            )


def check_call_kwargs(kwargs: dict, accepted: Sequence[str] | None, solver: str) -> None:
    """Every key of ``kwargs`` must be in ``accepted`` (``None``: anything goes).

    Raises :class:`~structgrad.errors.UnknownArgumentError` (a ``TypeError``) naming the
    solver, the unknown names and the accepted ones."""
    if accepted is None:
        return
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        acc = ", ".join(accepted) if accepted else "none"
        raise UnknownArgumentError(
            f"solver {solver} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {acc}"
        )


def check_choice(x: Any, choices: Sequence[Any], name: str) -> Any:
    """``x`` must be one of ``choices`` (compared with ``==``); returns it."""
    if isinstance(x, (str, int, bool, type(None))) or not hasattr(x, "__len__"):
        try:
            if x in tuple(choices):
                return x
        except TypeError:
            pass
    raise DomainError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {x!r}")


def check_leading_shape(x: Any, lead: Sequence[int], name: str, what: str = "") -> None:
    """``x.shape`` (a tensor's or an array's) must start with ``lead`` exactly (no broadcasting)."""
    lead = tuple(lead)
    if tuple(x.shape[: len(lead)]) != lead or len(x.shape) < len(lead):
        extra = f" {what}" if what else ""
        dims = ", ".join(str(s) for s in lead)
        raise ShapeError(
            f"{name}: expected leading dims ({dims}{',' if len(lead) == 1 else ''} ...){extra}, got {fmt_shape(x.shape)}"
        )


def rebuild(like: Any, parts: Iterable[Any]) -> Any:
    """Give ``parts`` the structure of ``like`` (a tensor or a tuple of tensors)."""
    parts = tuple(parts)
    if isinstance(like, (tuple, list)):
        return tuple(parts)
    if len(parts) != 1:
        raise ShapeError(f"expected a single tensor, got {len(parts)} parts")
    return parts[0]


def check_float_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` must be a floating-point tensor (float16/bfloat16/float32/float64)."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name}: expected a floating-point torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DTypeError(
            f"{name}: expected a floating-point tensor (scores), got dtype {x.dtype}; "
            f"convert with {name}.float() or .double()"
        )
    return x


def check_same_device(named: dict[str, torch.Tensor]) -> torch.device:
    """All tensors in ``named`` must be on one device; returns it."""
    items = [(k, v) for k, v in named.items() if isinstance(v, torch.Tensor)]
    if not items:
        return torch.device("cpu")
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise DeviceError(
                f"{k} is on device {v.device} but {first_name} is on {first.device}; "
                f"expected both on the same device"
            )
    return first.device


def check_shape(x: torch.Tensor, expected: Sequence[int], name: str, what: str = "") -> None:
    """``x.shape`` must equal ``expected`` exactly (no broadcasting)."""
    if tuple(x.shape) != tuple(expected):
        extra = f" {what}" if what else ""
        raise ShapeError(f"{name}: expected shape {fmt_shape(expected)}{extra}, got {fmt_shape(x.shape)}")


def check_index_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` must be an integer (not bool) tensor."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name}: expected an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise DTypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    return x


def check_lengths(
    lengths: Any,
    batch_shape: Sequence[int],
    max_length: int,
    device: torch.device,
    name: str = "lengths",
    *,
    check_values: bool = True,
) -> torch.Tensor | None:
    """Validate per-instance lengths: an integer tensor (any integer dtype) of shape
    ``batch_shape`` on ``device``, with values in ``[0, max_length]`` (checked when
    ``check_values``: one host synchronisation).  Returns them as int64; ``None``
    passes through."""
    if lengths is None:
        return None
    lengths = check_index_tensor(lengths, name)
    check_shape(lengths, batch_shape, name, "(the batch shape of theta)")
    if lengths.device != device:
        raise DeviceError(f"{name} is on device {lengths.device} but theta is on {device}")
    lengths = lengths.long()
    if check_values and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > max_length:
            raise DomainError(
                f"{name}: expected values in [0, {max_length}] (the sequence dimension of theta), "
                f"got min {lo} and max {hi}"
            )
    return lengths


def check_generator(generator: Any, device: torch.device, name: str = "generator") -> None:
    """``generator`` is ``None`` or a ``torch.Generator`` on ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise DTypeError(f"{name}: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise DeviceError(
            f"{name} is a {generator.device.type} generator but theta is on {device}; "
            f"create it with torch.Generator(device=theta.device)"
        )


def check_real(
    x: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    allow_inf: bool = False,
    tensors: bool = False,
    what: str = "a real number",
) -> float:
    """``x`` is a real number (Python or NumPy; with ``tensors``, also a one-element
    floating tensor), finite unless ``allow_inf``, in ``[lo, hi]`` (``(lo, hi]`` with
    ``lo_open``); returns it as a float.  ``what`` names the expected kind in messages."""
    ok = isinstance(x, (int, float, np.integer, np.floating)) or (
        tensors and isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype.is_floating_point
    )
    if isinstance(x, (bool, np.bool_)) or not ok:
        raise DTypeError(f"{name}: expected {what}, got {type(x).__name__}")
    v = float(x)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise DomainError(f"{name}: expected a finite number, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise DomainError(f"{name}: expected a value {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise DomainError(f"{name}: expected a value <= {hi}, got {v}")
    return v


def check_positive_int(x: Any, name: str, minimum: int = 1) -> int:
    """``x`` is a Python/NumPy integer ≥ ``minimum``."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise DTypeError(f"{name}: expected an integer, got {type(x).__name__}")
    x = int(x)
    if x < minimum:
        raise DomainError(f"{name}: expected an integer >= {minimum}, got {x}")
    return x
