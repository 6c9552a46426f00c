"""Implicit maximum-likelihood estimation (I-MLE): gradients through any MAP solver.

For p(z; θ) ∝ exp⟨z, θ⟩ over a discrete set and a downstream loss L(z), I-MLE
(Niepert, Minervini, Franceschi, NeurIPS 2021; seeds 003/004) samples by
perturb-and-MAP and differentiates by comparing with a *target distribution*
q = p(·; θ′) whose parameters move θ against the loss gradient:

    forward:   z_s = MAP(θ + τ ε_s),                    ε_s ~ ρ,  s = 1..S
    backward:  ∇_θ ≈ (1/S) Σ_s [MAP(θ + τ ε_s) − MAP(α θ − λ g_s + τ′ ε_s)] / λ,
               g_s = ∂L/∂z_s,

with the same ε_s in both (drawn once per call), θ′ = αθ − λ g_s the target
parameters (α = 1 in the paper; α = 0 gives the "perturbation-only" target), λ > 0
the step, τ and τ′ the noise temperatures.  The bracket is the gradient of the
implicit loss 𝓛(θ, θ′) = A(θ) − E_q[⟨z, θ⟩], ∇_θ𝓛 = μ(θ) − μ(θ′), with both
marginals replaced by perturb-and-MAP estimates; divided by λ it is a finite
difference of μ along −g (Domke 2010), so for small λ it approaches the
Jacobian-vector product ∂μ/∂θ · g of the smoothed problem.  Two-sided (central)
differences use [MAP(αθ + λg + τ′ε) − MAP(αθ − λg + τ′ε)] / (2λ) instead.  With
no noise and α = 1 this is the blackbox differentiation of Vlastelica et al. (2020).

Cost: one batched ``map`` call of S·B instances in forward and one in backward (two
for central differences, made as one call of 2·S·B), plus O(size of θ · S) for the
noise and the differences.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable

from . import checks as V
from ._perturb import Layout, check_reduce, check_sign_options, prepare, sample_grads
from .aimle import AdaptiveLambda
from .errors import DTypeError
from .noise import resolve_noise

__all__ = ["imle", "with_imle"]


class _Run:
    """Everything one imle call needs in forward and backward (no autograd inputs)."""

    __slots__ = (
        "layout", "S", "eps", "sign", "tau", "tau_target", "lam", "alpha", "two_sided", "divide", "reduce", "z",
        "inputs",
    )


def _bool(x: Any, name: str) -> bool:
    if not isinstance(x, bool):
        raise DTypeError(f"{name}: expected True or False, got {x!r}")
    return x


def _scaled(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·θ, keeping −inf (impossible) entries −inf also when α = 0."""
    if alpha == 1.0:
        return u
    out = u * alpha
    if alpha == 0.0:
        out = torch.where(torch.isneginf(u), u, out)
    return out


def _theta_sq_norm(run: _Run) -> torch.Tensor:
    """‖θ_b‖² per instance (finite entries; shared leaves count whole for every instance)."""
    lay = run.layout
    total = torch.zeros((), dtype=lay.dtype, device=lay.device)
    nb = None if lay.batch is None else len(lay.batch)
    for p, s in zip(lay.parts, lay.shared):
        sq = V.finite_or_zero(p) ** 2
        if nb is None or s:
            total = total + sq.sum()
        else:
            total = total + (sq.sum(dim=tuple(range(nb, p.dim()))) if p.dim() > nb else sq)
    return total


class _IMLE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, *parts: torch.Tensor):
        lay, S = run.layout, run.S
        if run.eps is None:
            inputs = [u.unsqueeze(0).expand((S,) + tuple(u.shape)) for u in lay.unshared]
        else:
            inputs = [torch.add(u, e, alpha=run.sign * run.tau) for u, e in zip(lay.unshared, run.eps)]
        _, z = lay.solve(inputs, S)
        run.z = z
        # the target αθ + σ(τ′ε − λg) is the forward input − σλg when α = 1 and τ′ = τ
        run.inputs = inputs if (run.alpha == 1.0 and run.tau_target == run.tau) else None
        if run.inputs is not None:
            run.eps = None
        ctx.run = run
        ctx.save_for_backward(*parts)  # version check: θ must not change before backward
        if run.reduce == "mean":
            return tuple(t.mean(0) for t in z)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        run: _Run = ctx.run
        ctx.saved_tensors  # raises if θ was modified in place since forward
        if not any(ctx.needs_input_grad[1:]):
            return (None,) * len(ctx.needs_input_grad)
        lay, S, sign = run.layout, run.S, run.sign
        g = sample_grads(grads, run.z, run.reduce)
        adaptive = isinstance(run.lam, AdaptiveLambda)
        if adaptive:
            lam = run.lam.magnitude(_theta_sq_norm(run), lay.per_instance([x * x for x in g]))  # (S, *batch)
        else:
            lam = run.lam
        gu = lay.unfold(g)
        pieces = []
        for i, (u, d) in enumerate(zip(lay.unshared, gu)):
            if run.inputs is not None:  # θ + στε, reused: one pass less
                base, noise = run.inputs[i], None
            else:
                base = _scaled(u, run.alpha)
                noise = None if run.eps is None else run.eps[i]
            step = lay.broadcast(lam, d) * d if adaptive else None
            if run.two_sided:
                step = d * lam if step is None else step
                plus, minus = torch.add(base, step, alpha=sign), torch.add(base, step, alpha=-sign)
                if noise is not None:
                    plus.add_(noise, alpha=sign * run.tau_target)
                    minus.add_(noise, alpha=sign * run.tau_target)
                pieces.append(torch.cat([plus, minus]))
            else:
                # αθ − σλg + στ′ε, σ = −1 when minimising (module docstring)
                t = torch.add(base, d, alpha=-sign * lam) if step is None else torch.add(base, step, alpha=-sign)
                if noise is not None:
                    t.add_(noise, alpha=sign * run.tau_target)
                pieces.append(t)
        if run.two_sided:
            _, zz = lay.solve(pieces, 2 * S)
            diff = [t[:S] - t[S:] for t in zz]
            half = 0.5
        else:
            _, zt = lay.solve(pieces, S)
            diff = [a - b for a, b in zip(run.z, zt)]
            half = 1.0
        if adaptive:
            run.lam.update(lay.per_instance([(d != 0).to(d.dtype) for d in diff]))
            if run.divide:
                safe = torch.where(lam > 0, lam, torch.ones_like(lam))
                diff = [d / lay.broadcast(safe, d) for d in diff]
            scale = sign * half / S
        else:
            scale = sign * half / (S * (lam if run.divide else 1.0))
        # Σ over the samples, then one scaling of the (smaller) result: mean, 1/λ, ½, sign
        out = tuple(o.mul(scale) if scale != 1.0 else o for o in lay.to_theta(diff, mean=False))
        return (None, *(o if need else None for o, need in zip(out, ctx.needs_input_grad[1:])))


def imle(
    theta: Any,
    solver: Any,
    *,
    lam: float | AdaptiveLambda = 1.0,
    samples: int = 1,
    noise: Any = "gumbel",
    noise_temperature: float = 1.0,
    target_noise_temperature: float | None = None,
    generator: torch.Generator | None = None,
    alpha: float = 1.0,
    two_sided: bool = False,
    divide_by_lam: bool = True,
    minimize: bool = False,
    reduce: str = "none",
    **solver_kwargs: Any,
) -> Any:
    """Perturb-and-MAP samples of p(z; θ) with the I-MLE gradient (module docstring).

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)`` (a
            leaf may omit the batch dims to be shared; see *Layout* below).
        solver: anything :func:`structgrad.get_solver` accepts: a name (``"ksubset"``
            needs options, so pass ``sg.get_solver("ksubset", k=3)``), a Solver, or a
            plain callable θ -> z (wrapped as a MAP-only solver).  It needs ``map``.
        lam: λ > 0, the size of the step towards the target distribution, on the
            scale of θ; or an :class:`~structgrad.AdaptiveLambda` (AIMLE), which sets
            λ per instance and sample and adapts itself in every backward pass.
        samples: S ≥ 1 noise samples per instance.
        noise: ``"gumbel"`` (default), ``"sum_of_gamma"`` (k from the solver's ``k``,
            10 terms), ``"normal"``, ``None`` (no noise: blackbox differentiation
            when α = 1), or any object with ``sample(shape, generator)``
            (:mod:`structgrad.noise`), e.g. ``sg.SumOfGammaNoise(k=5, num_terms=20)``.
        noise_temperature: τ ≥ 0, the scale of the noise in forward.
        target_noise_temperature: τ′ ≥ 0 for the target (default: τ).
        generator: the ``torch.Generator`` (on θ's device) the noise is drawn from.
        alpha: α ≥ 0, the weight of θ in the target parameters αθ − λg.
        two_sided: central differences (two target MAPs, one batched call of 2·S·B).
        divide_by_lam: divide the difference by λ (default).  ``False`` gives the
            unscaled form [MAP(θ+τε) − MAP(αθ−λg+τ′ε)] (halved when two-sided) of
            code that folds 1/λ into the learning rate.
        minimize: the solver *minimises* ⟨z, θ⟩ (θ are costs).  Handled inside: the
            model is p(z) ∝ exp(−⟨z, θ⟩), the solver receives θ − τε in forward and
            αθ + λg − τ′ε in backward, and the gradient is negated; do not negate θ.
        reduce: ``"none"``: return the S samples ``(S, *batch, *event)``, always with
            the sample dimension (also for S = 1); ``"mean"``: their average
            ``(*batch, *event)``, with g_s = the gradient of the average for every s.
        **solver_kwargs: passed to every ``map`` call (``lengths=`` for the chain);
            those named in ``solver.batched_kwargs`` are expanded along the samples.

    Returns:
        z, the structure of θ: per leaf ``(S, *batch, *event)`` (``reduce="none"``)
            or ``(*batch, *event)`` (``"mean"``), θ's dtype and device, differentiable
            with the I-MLE backward.  The backward returns the average over the S samples
            of the per-sample estimates: sum per-sample losses over the sample dimension
            (rather than average them) when g_s should be the gradient of one sample's
            loss; an average divides every g_s, and so the step λ·g_s, by S.

    Shapes and layout:
        θ leaf ``(*b, *e)`` → z leaf ``(S, *b, *e)``.  The solver is called on θ with
        a leading sample dim, ``(S, *b, *e)``; a plain callable must accept it.  A leaf
        *shared* by the batch (given without batch dims) gets per-instance noise:
        it is first broadcast to a per-instance layout and perturbed there.  For the
        chain, a shared edge ``(C, C)`` or ``(T-1, C, C)`` becomes the per-instance,
        per-position edge ``(S, *b, T-1, C, C)``: the perturbed θ the solver sees is
        ``(node (S, *b, T, C) + τε, edge (S, *b, T-1, C, C) + τε)``, noise on every
        position's transitions (the low-order perturbation of every factor).  Its MAP
        gives per-position transitions, summed back over positions into the counts
        ``(S, *b, C, C)`` that ``map`` returns for a ``(C, C)`` edge; the gradient of
        the shared edge sums over the batch (and averages over samples).  A solver
        describes this through :meth:`structgrad.Solver.unshare` (the chain overrides
        it; the default makes a shared leaf ``E`` into ``(*b, *E)``).
        Call kwargs in ``solver.batched_kwargs`` (chain ``lengths (*b,)``) are passed
        as ``(S, *b)``.

    Raises:
        DTypeError: θ not floating point; a non-bool flag; a noise that is not a name
            or an object with ``sample``.
        DomainError: samples < 1, λ ≤ 0, negative temperatures or α, unknown
            ``noise``/``reduce``, ``"sum_of_gamma"`` for a solver without ``k``.
        ShapeError: a noise object whose samples have the wrong shape.
        CapabilityError: a solver without ``map``.

    Complexity: 2 batched ``map`` calls of S·B instances (forward + backward) plus
    O(S · |θ|) elementwise work; memory O(S · |θ|) for the noise and the samples.

    References: M. Niepert, P. Minervini, L. Franceschi, "Implicit MLE:
    backpropagating through discrete exponential family distributions", NeurIPS
    2021; J. Domke, "Implicit differentiation by perturbation", NeurIPS 2010;
    P. Minervini, L. Franceschi, M. Niepert, "Adaptive perturbation-based gradient
    estimation for discrete latent variable models", AAAI 2023.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.randn(4, 10, requires_grad=True)
        >>> z = sg.imle(theta, sg.get_solver("ksubset", k=3), lam=1.0, samples=5,
        ...             generator=torch.Generator().manual_seed(0))
        >>> z.shape, z.sum(-1).unique().tolist()
        (torch.Size([5, 4, 10]), [3.0])
        >>> (z * torch.randn(10)).sum().backward()       # theta.grad: the I-MLE estimate
    """
    theta, solver = prepare(theta, solver, "map")
    S = V.check_positive_int(samples, "samples")
    run = _Run()
    if isinstance(lam, AdaptiveLambda):
        run.lam = lam
    else:
        run.lam = V.check_real(lam, "lam", lo=0.0, lo_open=True)
    run.tau = V.check_real(noise_temperature, "noise_temperature", lo=0.0)
    run.tau_target = (
        run.tau if target_noise_temperature is None
        else V.check_real(target_noise_temperature, "target_noise_temperature", lo=0.0)
    )
    run.alpha = V.check_real(alpha, "alpha", lo=0.0)
    run.two_sided = _bool(two_sided, "two_sided")
    run.divide = _bool(divide_by_lam, "divide_by_lam")
    run.sign = check_sign_options(minimize)
    run.reduce = check_reduce(reduce)
    noise_obj = resolve_noise(noise, solver)
    layout = Layout(solver, theta, solver_kwargs)
    V.check_generator(generator, layout.device)
    run.layout, run.S = layout, S
    run.eps = layout.draw(noise_obj, S, generator)
    run.z = None
    out = _IMLE.apply(run, *V.leaves(theta))
    return V.rebuild(theta, out)


def with_imle(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Decorator form of :func:`imle`: turn a MAP function θ -> z into a differentiable layer.

    ``@with_imle(lam=..., samples=..., ...)`` (any option of :func:`imle`) on a
    callable (or ``with_imle(solver, **options)`` on anything
    :func:`structgrad.get_solver` accepts) returns ``f(theta, *, generator=None,
    **solver_kwargs)`` that runs :func:`imle` with those options.

    Examples:
        >>> import torch, structgrad as sg
        >>> @sg.with_imle(lam=2.0, samples=3)
        ... def top2(theta):
        ...     return torch.zeros_like(theta).scatter(-1, theta.topk(2, dim=-1).indices, 1.0)
        >>> top2(torch.randn(4, 6), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3, 4, 6])
    """
    if fn is None:
        return functools.partial(with_imle, **options)

    def layer(theta: Any, *, generator: torch.Generator | None = None, **solver_kwargs: Any) -> Any:
        return imle(theta, fn, generator=generator, **options, **solver_kwargs)

    if callable(fn) and hasattr(fn, "__name__"):
        functools.update_wrapper(layer, fn)
    return layer
