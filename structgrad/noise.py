"""Noise distributions for perturb-and-MAP: Gumbel, Normal, Sum-of-Gamma, and Gamma draws.

Perturb-and-MAP approximates a sample of p(z; θ) ∝ exp⟨z, θ⟩ by z = MAP(θ + ε) with
ε drawn from a noise distribution ρ.  :func:`structgrad.imle` and the baseline
estimators take ``noise=`` as a name, ``None`` (no noise), or any object with a
``sample`` method.

The noise protocol (what ``noise=`` accepts besides a name):

* ``sample(shape, generator)`` returning a floating tensor of exactly ``shape``,
  drawn only from ``generator`` (a ``torch.Generator``, or ``None`` for torch's
  global one).  If ``sample`` also accepts the keywords ``dtype`` and ``device`` (or
  ``**kwargs``), they are passed (θ's dtype and device); the result must then be on
  θ's device (otherwise :class:`~structgrad.errors.DeviceError`) and is cast to θ's
  dtype.  A result of another shape is a :class:`~structgrad.errors.ShapeError`.
* optionally ``grad_neg_log_density(eps)``, ∇ν(ε) with ν = −log ρ: the
  perturbed-optimizer estimator (Berthet et al. 2020) needs it.

Built-in noises (all draw on the requested device from the generator, vectorised):

=================  =====================================================  ==============
name               ε                                                      ∇ν(ε)
=================  =====================================================  ==============
``"gumbel"``       Gumbel(0, 1): −log(−log U)                              1 − e^(−ε)
``"normal"``       N(0, 1)                                                 ε
``"sum_of_gamma"`` (1/k)·(Σ_{i=1}^{s} Gamma(1/k, rate i/k) − log s)        –
=================  =====================================================  ==============

Sum-of-Gamma (Niepert, Minervini, Franceschi 2021, Sec. 3.2).  For a k-subset,
the sum of k i.i.d. copies of the Sum-of-Gamma variable SoG(k, s) is

    Σ_{i=1}^{s} Gamma(1, rate i) − log s  =  (max of s Exp(1) draws) − log s,

which tends to Gumbel(0, 1) as s → ∞ (Rényi's representation of exponential order
statistics).  So θ + SoG noise on each of n elements makes the k selected elements'
total perturbation approximately Gumbel: the right noise for perturb-and-MAP
over k-subsets.  Each Gamma(1/k, rate i/k) is k/i times a Gamma(1/k, 1) draw, so
SoG(k, s) = Σ_i X_i / i − (log s)/k with X_i ~ Gamma(1/k, 1) i.i.d.

Gamma draws (:func:`sample_gamma`).  Public torch has no generator argument for
Gamma sampling, so the draws are made here from generator-driven normals and
uniforms by the method of Marsaglia and Tsang (2000): for a ≥ 1, with d = a − 1/3 and
c = 1/√(9d), draw x ~ N(0, 1) and u ~ U(0, 1), set v = (1 + c x)³, and accept d·v when
v > 0 and log u < x²/2 + d − d v + d log v (acceptance ≥ 95 %); for a < 1, draw
G ~ Gamma(a + 1) and return G·U^(1/a) (computed in log space).  Every entry first
gets one candidate (one vectorised pass); rejected entries are redrawn in further
passes over the rejected entries only (a host synchronisation per pass, about
log(N)/log(20) passes for N entries).  Computed in float64, cast to ``dtype``.

References:
    G. Marsaglia, W. W. Tsang, "A simple method for generating gamma variables",
    ACM TOMS 26(3), 2000.
    M. Niepert, P. Minervini, L. Franceschi, "Implicit MLE: Backpropagating through
    discrete exponential family distributions", NeurIPS 2021.
    G. Papandreou, A. Yuille, "Perturb-and-MAP random fields", ICCV 2011.

Examples:
    >>> import torch, structgrad as sg
    >>> g = torch.Generator().manual_seed(0)
    >>> eps = sg.SumOfGammaNoise(k=3, num_terms=10).sample((1000, 5), g)
    >>> eps.shape
    torch.Size([1000, 5])
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch

from . import checks as V
from .errors import DeviceError, DomainError, DTypeError
from .logspace import sample_gumbel

__all__ = [
    "Noise",
    "GumbelNoise",
    "NormalNoise",
    "SumOfGammaNoise",
    "sample_gamma",
    "resolve_noise",
    "draw_noise",
    "NOISE_NAMES",
]

NOISE_NAMES = ("gumbel", "normal", "sum_of_gamma")
_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Draw half-precision noise in float32 (then cast): rand/log in half lose too much."""
    return torch.float32 if dtype in _HALF else dtype


class Noise:
    """Base class of the built-in noises (a third-party noise needs only ``sample``)."""

    def sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """``shape`` i.i.d. draws from ``generator`` (on ``device``), of ``dtype``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GumbelNoise(Noise):
    """Standard Gumbel(0, 1) noise, ε = −log(−log U); ∇ν(ε) = 1 − e^(−ε).

    With it, MAP(θ + ε) over one-hot structures is an exact sample of softmax(θ)
    (the Gumbel-max trick); over other structures an approximate one."""

    def sample(self, shape, generator=None, *, dtype=torch.float32, device=None):
        """``shape`` Gumbel(0, 1) draws, −log(−log U) with U from ``generator`` (half precision: drawn in float32)."""
        wd = _work_dtype(dtype)
        eps = sample_gumbel(tuple(shape), dtype=wd, device=torch.device(device or "cpu"), generator=generator)
        return eps if wd == dtype else eps.to(dtype)

    def grad_neg_log_density(self, eps: torch.Tensor) -> torch.Tensor:
        """∇ν(ε) = 1 − exp(−ε), ν(ε) = ε + e^(−ε) the negative log-density."""
        return -torch.expm1(-eps)


class NormalNoise(Noise):
    """Standard normal noise N(0, 1); ∇ν(ε) = ε."""

    def sample(self, shape, generator=None, *, dtype=torch.float32, device=None):
        """``shape`` N(0, 1) draws from ``generator`` (half precision: drawn in float32)."""
        wd = _work_dtype(dtype)
        eps = torch.randn(tuple(shape), dtype=wd, device=torch.device(device or "cpu"), generator=generator)
        return eps if wd == dtype else eps.to(dtype)

    def grad_neg_log_density(self, eps: torch.Tensor) -> torch.Tensor:
        """∇ν(ε) = ε, ν(ε) = ε²/2 (+ const) the negative log-density."""
        return eps


class SumOfGammaNoise(Noise):
    """Sum-of-Gamma noise SoG(k, s) = (1/k)(Σ_{i=1}^{s} Gamma(1/k, rate i/k) − log s).

    The sum of k i.i.d. copies is (max of s Exp(1)) − log s → Gumbel(0, 1) as s → ∞
    (module docstring): use it with k-subset structures of size k.

    Args:
        k: the subset size (an integer ≥ 1).
        num_terms: s, the number of Gamma terms (≥ 1; default 10 as in the I-MLE paper).
    Complexity: s Gamma draws per entry (vectorised; see :func:`sample_gamma`).
    """

    def __init__(self, k: int, num_terms: int = 10):
        self.k = V.check_positive_int(k, "k")
        self.num_terms = V.check_positive_int(num_terms, "num_terms")

    def __repr__(self) -> str:
        return f"SumOfGammaNoise(k={self.k}, num_terms={self.num_terms})"

    def sample(self, shape, generator=None, *, dtype=torch.float32, device=None):
        """``shape`` SoG(k, s) draws: Σ_i X_i / i − (log s)/k, X_i ~ Gamma(1/k, 1) (computed in float64)."""
        shape = tuple(shape)
        device = torch.device(device or "cpu")
        k, s = self.k, self.num_terms
        acc = torch.zeros(shape, dtype=torch.float64, device=device)
        for i in range(1, s + 1):
            acc.add_(sample_gamma(1.0 / k, shape, generator=generator, dtype=torch.float64, device=device), alpha=1.0 / i)
        acc.sub_(math.log(s) / k)
        return acc.to(dtype)


def sample_gamma(
    concentration: float | torch.Tensor,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gamma(a, 1) draws of ``shape`` from ``generator`` (Marsaglia–Tsang; module docstring).

    Args:
        concentration: a > 0, a number or a tensor broadcastable to ``shape``.
        shape: the output shape.
        generator: a ``torch.Generator`` on ``device`` (``None``: torch's global one).
        dtype: the floating dtype of the result (the draws are computed in float64).
        device: the device of the result (``None``: the CPU).

    Returns:
        ``shape`` tensor of Gamma(a, 1) variables (density x^(a−1) e^(−x) / Γ(a)).

    Complexity:
        O(N) work for N = prod(shape) entries, about log(N)/log(20) vectorised passes.

    Examples:
        >>> import torch
        >>> from structgrad.noise import sample_gamma
        >>> x = sample_gamma(0.5, (100000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> abs(float(x.mean()) - 0.5) < 0.01
        True
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device or "cpu")
    f64 = torch.float64
    if isinstance(concentration, torch.Tensor):
        if not concentration.dtype.is_floating_point:
            raise DTypeError(f"concentration: expected a floating-point tensor, got dtype {concentration.dtype}")
        a = concentration.to(device=device, dtype=f64).expand(shape).reshape(-1)
        if a.numel() and not bool((a > 0).all() & torch.isfinite(a).all()):
            raise DomainError("concentration: expected finite values > 0")
    else:
        a_val = V.check_real(concentration, "concentration", lo=0.0, lo_open=True)
        a = torch.full((math.prod(shape),), a_val, dtype=f64, device=device)
    N = a.numel()
    if N == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    boost = a < 1.0
    a1 = torch.where(boost, a + 1.0, a)
    d = a1 - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    out = torch.empty(N, dtype=f64, device=device)
    pending: torch.Tensor | None = None  # indices still to draw; None = all (first pass)
    while True:
        dd, cc = (d, c) if pending is None else (d[pending], c[pending])
        m = dd.numel()
        x = torch.randn(m, dtype=f64, device=device, generator=generator)
        u = torch.rand(m, dtype=f64, device=device, generator=generator)
        v = (1.0 + cc * x) ** 3
        pos = v > 0
        logv = torch.log(torch.where(pos, v, torch.ones_like(v)))
        ok = pos & (torch.log(u) < 0.5 * x * x + dd - dd * v + dd * logv)
        val = dd * v
        if pending is None:
            out.copy_(torch.where(ok, val, torch.zeros_like(val)))
            pending = (~ok).nonzero().flatten()
        else:
            out[pending[ok]] = val[ok]
            pending = pending[~ok]
        if pending.numel() == 0:
            break
    if bool(boost.any()):
        u = torch.rand(N, dtype=f64, device=device, generator=generator)
        # G(a) = G(a + 1) · U^(1/a), in log space so that tiny a does not underflow early
        logu = torch.log(u.clamp_min(torch.finfo(f64).tiny))
        boosted = torch.exp(torch.log(out) + logu / a)
        out = torch.where(boost, boosted, out)
    return out.reshape(shape).to(dtype)


def resolve_noise(noise: Any, solver: Any = None, name: str = "noise") -> Any:
    """A noise object from ``noise`` (a name, ``None`` or an object with ``sample``).

    ``"sum_of_gamma"`` takes k from the solver's ``k`` attribute (the ``ksubset``
    solver has one); for other solvers pass ``SumOfGammaNoise(k=...)``.  Returns
    ``None`` for no noise.
    """
    if noise is None:
        return None
    if isinstance(noise, str):
        V.check_choice(noise, NOISE_NAMES, name)
        if noise == "gumbel":
            return GumbelNoise()
        if noise == "normal":
            return NormalNoise()
        k = getattr(solver, "k", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DomainError(
                f"{name}: 'sum_of_gamma' needs the subset size k, taken from the solver's k attribute, but solver "
                f"{getattr(solver, 'name', None) or type(solver).__name__} has k = {k!r}; pass "
                f"noise=structgrad.SumOfGammaNoise(k=..., num_terms=...)"
            )
        return SumOfGammaNoise(k)
    if not callable(getattr(noise, "sample", None)):
        raise DTypeError(
            f"{name}: expected None, one of {', '.join(map(repr, NOISE_NAMES))}, or an object with a method "
            f"sample(shape, generator), got {type(noise).__name__}"
        )
    return noise


def _accepts_dtype_device(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in params}
    return any(p.kind is p.VAR_KEYWORD for p in params) or {"dtype", "device"} <= names


def draw_noise(
    noise: Any,
    shape: Sequence[int],
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
    name: str = "noise",
) -> torch.Tensor:
    """``noise.sample(shape, generator)`` checked: a floating tensor of ``shape`` on
    ``device``, cast to ``dtype`` (see the protocol in the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if isinstance(noise, Noise):
        return noise.sample(shape, generator, dtype=dtype, device=device)
    if _accepts_dtype_device(noise.sample):
        eps = noise.sample(shape, generator, dtype=dtype, device=device)
    else:
        eps = noise.sample(shape, generator)
    if not isinstance(eps, torch.Tensor) or not eps.dtype.is_floating_point:
        what = f"tensor of dtype {eps.dtype}" if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise DTypeError(f"{name}.sample: expected a floating-point tensor, got a {what}")
    V.check_shape(eps, shape, f"{name}.sample(shape, generator)", "(the requested shape)")
    if eps.device != device:
        raise DeviceError(
            f"{name}.sample returned a tensor on {eps.device} but theta is on {device}; draw it on the "
            f"generator's device (accept dtype= and device= keywords to be told which)"
        )
    return eps.to(dtype)
