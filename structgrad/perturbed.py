"""Perturbed optimizers and their Fenchel–Young loss (Berthet et al., NeurIPS 2020).

For a MAP solver y*(θ) = argmax_{y ∈ 𝒴} ⟨y, θ⟩ and noise Z with density
ρ(z) ∝ exp(−ν(z)), the perturbed optimizer is the smooth map

    ȳ_τ(θ) = E_Z[ y*(θ + τ Z) ],     F_τ(θ) = E_Z[ max_y ⟨y, θ + τ Z⟩ ],  ∇F_τ = ȳ_τ,

whose Jacobian has the unbiased Monte-Carlo form (integration by parts)

    ∂ȳ_τ/∂θ = (1/τ) E_Z[ y*(θ + τ Z) ∇ν(Z)ᵀ ],

∇ν(z) = z for normal noise and 1 − e^(−z) for Gumbel noise.  With Gumbel noise over
one-hot structures ȳ_τ(θ) = softmax(θ/τ) exactly.  The Fenchel–Young loss of a
target y,

    ℓ_FY(θ; y) = F_τ(θ) − ⟨θ, y⟩  (+ Ω_τ(y), constant in θ, omitted),

is convex in θ with gradient ȳ_τ(θ) − y: training with it needs no backward through
the solver at all.

Shapes follow :func:`structgrad.imle`: θ a tensor or tuple with leading batch dims,
shared leaves perturbed per instance, the call kwargs in ``solver.batched_kwargs``
expanded along the S samples.

Reference: Q. Berthet, M. Blondel, O. Teboul, M. Cuturi, J.-P. Vert, F. Bach,
"Learning with differentiable perturbed optimizers", NeurIPS 2020.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import checks as V
from ._perturb import Layout, check_reduce, check_sign_options, prepare, sample_grads
from .errors import DeviceError, DomainError, DTypeError, ShapeError
from .noise import resolve_noise

__all__ = ["perturbed_optimizer", "perturbed_fenchel_young_loss"]


def _noise_with_density(noise: Any, solver: Any) -> Any:
    if noise is None:
        raise DomainError("noise: the perturbed optimizer needs noise ('gumbel' or 'normal'), got None")
    obj = resolve_noise(noise, solver)
    if not callable(getattr(obj, "grad_neg_log_density", None)):
        raise DomainError(
            f"noise: the perturbed optimizer needs the noise's grad_neg_log_density (∇ of −log density); "
            f"'gumbel' and 'normal' have it, {obj!r} does not"
        )
    return obj


def _perturbed_inputs(lay: Layout, eps, tau: float, sign: float) -> list[torch.Tensor]:
    return [torch.add(u, e, alpha=sign * tau) for u, e in zip(lay.unshared, eps)]


class _Perturbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lay: Layout, noise, eps, S: int, tau: float, sign: float, reduce: str, *parts):
        _, y = lay.solve(_perturbed_inputs(lay, eps, tau, sign), S)
        ctx.lay, ctx.noise, ctx.eps, ctx.S, ctx.tau, ctx.sign, ctx.reduce, ctx.y = lay, noise, eps, S, tau, sign, reduce, y
        return tuple(t.mean(0) for t in y) if reduce == "mean" else y

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        lay = ctx.lay
        g = sample_grads(grads, ctx.y, ctx.reduce)
        c = lay.per_instance([y * gr for y, gr in zip(ctx.y, g)])  # ⟨y_s, g_s⟩ per instance: (S, *batch)
        gu = []
        for e in ctx.eps:
            w = ctx.noise.grad_neg_log_density(e)
            gu.append(lay.broadcast(c, w) * w / ctx.tau)
        out = lay.unshared_to_theta(gu)
        need = ctx.needs_input_grad[7:]
        return (None,) * 7 + tuple((ctx.sign * o if ctx.sign < 0 else o) if n else None for o, n in zip(out, need))


def perturbed_optimizer(
    theta: Any,
    solver: Any,
    *,
    samples: int = 1,
    noise: Any = "gumbel",
    noise_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    minimize: bool = False,
    reduce: str = "none",
    **solver_kwargs: Any,
) -> Any:
    """The perturbed optimizer ȳ_τ(θ) with its Monte-Carlo Jacobian (module docstring).

    Forward y_s = MAP(θ + τ ε_s); backward ∇_θ = (1/S) Σ_s (1/τ) ⟨y_s, g_s⟩ ∇ν(ε_s)
    (inner product per instance; a shared leaf sums over the batch).

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)``, as for
            :func:`structgrad.imle`.
        solver: a name, a Solver or a callable θ -> z with ``map``, as for
            :func:`structgrad.imle`.
        samples: S ≥ 1 noise samples per instance.
        noise: ``"gumbel"`` (default) or ``"normal"``, or an object with ``sample`` and
            ``grad_neg_log_density`` (:mod:`structgrad.noise`).
        noise_temperature: τ > 0.
        generator: the ``torch.Generator`` (on θ's device) the noise is drawn from.
        minimize: the solver *minimises* ⟨z, θ⟩ (θ are costs); the gradient is negated.
        reduce: ``"none"`` (the S samples) or ``"mean"`` (their average, ȳ_τ itself).
        **solver_kwargs: passed to every ``map`` call (``lengths=`` for the chain).

    Returns:
        the structure of θ, ``(S, *batch, *event)`` per leaf (``"mean"``: without S).

    Raises:
        DomainError: ``noise=None``, a noise without ``grad_neg_log_density``, τ ≤ 0.
    Complexity: one batched ``map`` of S·B instances; backward O(S·|θ|), no solver call.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
        >>> y = sg.perturbed_optimizer(theta, "categorical", samples=20000, reduce="mean",
        ...                  generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(y, torch.softmax(theta, -1), atol=0.02)     # Gumbel: ȳ = softmax(θ)
        True
    """
    theta, solver = prepare(theta, solver, "map")
    S = V.check_positive_int(samples, "samples")
    tau = V.check_real(noise_temperature, "noise_temperature", lo=0.0, lo_open=True)
    sign = check_sign_options(minimize)
    reduce = check_reduce(reduce)
    noise_obj = _noise_with_density(noise, solver)
    lay = Layout(solver, theta, solver_kwargs)
    V.check_generator(generator, lay.device)
    eps = lay.draw(noise_obj, S, generator)
    return V.rebuild(theta, _Perturbed.apply(lay, noise_obj, eps, S, tau, sign, reduce, *V.leaves(theta)))


def _masked(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """y·t with 0·(±inf) = 0."""
    return y * torch.where(y != 0, t, torch.zeros((), dtype=t.dtype, device=t.device))


class _FenchelYoung(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lay: Layout, eps, S: int, tau: float, sign: float, n: int, *tensors):
        target = tensors[n:]
        inputs = _perturbed_inputs(lay, eps, tau, sign)
        raw, y = lay.solve(inputs, S)
        # F̂(θ_eff) = mean_s ⟨y_s, θ_eff + τ ε_s⟩ with θ_eff = sign·θ: the solver's input times sign
        value = lay.per_instance([_masked(r, sign * x) for r, x in zip(raw, inputs)]).mean(0)
        value = value - lay.per_instance([_masked(t.unsqueeze(0), sign * p) for t, p in zip(target, lay.parts)])[0]
        ctx.lay, ctx.sign, ctx.n = lay, sign, n
        ctx.ybar = [t.mean(0) for t in y]
        ctx.save_for_backward(*target)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        lay, sign, n = ctx.lay, ctx.sign, ctx.n
        target = ctx.saved_tensors
        u = grad.unsqueeze(0)  # (1, *batch)
        diff = [lay.broadcast(u, yb.unsqueeze(0)) * (yb - t).unsqueeze(0) for yb, t in zip(ctx.ybar, target)]
        g_theta = lay.to_theta(diff, mean=False)
        g_theta = [sign * x if sign < 0 else x for x in g_theta]
        g_target = []
        for i, (t, p) in enumerate(zip(target, lay.parts)):
            if ctx.needs_input_grad[6 + n + i]:
                g_target.append((-sign * p.expand_as(t)) * lay.broadcast(u, t.unsqueeze(0))[0])
            else:
                g_target.append(None)
        need = ctx.needs_input_grad[6 : 6 + n]
        return (None,) * 6 + tuple(x if k else None for x, k in zip(g_theta, need)) + tuple(g_target)


def perturbed_fenchel_young_loss(
    theta: Any,
    target: Any,
    solver: Any,
    *,
    samples: int = 1,
    noise: Any = "gumbel",
    noise_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    minimize: bool = False,
    **solver_kwargs: Any,
) -> torch.Tensor:
    """The perturbed Fenchel–Young loss F̂_τ(θ) − ⟨θ, y⟩ per instance, gradient ȳ_τ(θ) − y.

    F̂_τ(θ) = (1/S) Σ_s ⟨y_s, θ + τ ε_s⟩ with y_s = MAP(θ + τ ε_s) (the Monte-Carlo
    estimate of F_τ; the constant Ω_τ(y) is omitted, so the value is not ≥ 0).  With
    ``minimize=True`` (θ = costs c) the loss is that of the maximisation problem in
    −c and the gradient y − ȳ.

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)``, as for
            :func:`structgrad.imle`.
        target: the target structure y, shaped like ``solver.map(theta)`` (for a
            chain with a ``(C, C)`` edge: transition counts ``(*batch, C, C)``).
        solver: a name, a Solver or a callable θ -> z with ``map``, as for
            :func:`structgrad.imle`.
        samples: S ≥ 1 noise samples per instance.
        noise: any noise (:mod:`structgrad.noise`; its density is not needed here).
        noise_temperature: τ ≥ 0.
        generator: the ``torch.Generator`` (on θ's device) the noise is drawn from.
        minimize: the solver *minimises* ⟨z, θ⟩ (θ are costs): the loss is that of the
            maximisation problem in −θ.
        **solver_kwargs: passed to every ``map`` call (``lengths=`` for the chain).

    Returns:
        ``(*batch,)`` losses; gradient w.r.t. θ: ȳ_τ(θ) − y (shared leaves summed over
            the batch); w.r.t. the target: −θ.
    Complexity: one batched ``map`` of S·B instances; the backward calls no solver.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.zeros(2, 4, requires_grad=True)
        >>> y = torch.eye(4)[[1, 3]]
        >>> loss = sg.perturbed_fenchel_young_loss(theta, y, "categorical", samples=100,
        ...                                         generator=torch.Generator().manual_seed(0))
        >>> loss.shape
        torch.Size([2])
        >>> loss.sum().backward()        # theta.grad = ȳ − y
    """
    theta, solver = prepare(theta, solver, "map")
    S = V.check_positive_int(samples, "samples")
    tau = V.check_real(noise_temperature, "noise_temperature", lo=0.0)
    sign = check_sign_options(minimize)
    noise_obj = resolve_noise(noise, solver)
    lay = Layout(solver, theta, solver_kwargs)
    V.check_generator(generator, lay.device)
    if isinstance(target, list):
        target = tuple(target)
    t_parts = V.leaves(target)
    if isinstance(target, tuple) != lay.is_tuple or len(t_parts) != len(lay.parts):
        raise ShapeError(f"target: expected the structure of theta ({len(lay.parts)} tensor(s)), got {len(t_parts)}")
    cast = []
    for i, (t, shape) in enumerate(zip(t_parts, lay.out_shapes)):
        nm = f"target[{i}]" if lay.is_tuple else "target"
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != lay.device:
            raise DeviceError(f"{nm} is on device {t.device} but theta is on {lay.device}")
        V.check_shape(t, shape, nm, "(the shape of solver.map(theta))")
        cast.append(t if t.dtype == lay.dtype else t.to(lay.dtype))
    if noise_obj is None:
        eps = tuple(torch.zeros((S,) + tuple(u.shape), dtype=lay.dtype, device=lay.device) for u in lay.unshared)
    else:
        eps = lay.draw(noise_obj, S, generator)
    n = len(lay.parts)
    return _FenchelYoung.apply(lay, eps, S, tau, sign, n, *V.leaves(theta), *cast)
