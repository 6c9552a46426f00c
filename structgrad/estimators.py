"""Baseline gradient estimators through discrete structures, under :func:`structgrad.imle`'s convention.

Each takes ``(theta, solver, *, ..., **solver_kwargs)`` like :func:`structgrad.imle`
(θ a tensor or tuple of tensors with leading batch dims, ``solver`` anything
:func:`structgrad.get_solver` accepts, extra keywords forwarded to the solver, the
call kwargs in ``solver.batched_kwargs`` expanded along the samples, shared θ leaves
perturbed per instance) and returns S structures ``(S, *batch, *event)``, or their
mean with ``reduce="mean"``.  The backward pass averages the per-sample estimates
over the S samples (sum per-sample losses over the sample dimension to make g_s the
gradient of one sample's loss).

The θ-gradient each returns for g_s = ∂L/∂z_s, before the mean over s, and what it
needs from the solver:

* :func:`straight_through`: g_s, with z_s = MAP(θ + τε_s) treated as the identity
  (``map``);
* :func:`marginal_straight_through` (SIMPLE): (∂μ/∂θ)ᵀ g_s with exact samples
  z_s ~ p(·; θ) (exact ``sample`` and differentiable ``marginals``);
* :func:`blackbox` (Vlastelica et al.): [MAP(θ) − MAP(θ − λg)] / λ (``map``);
* :func:`score_function`: (L(z_s) − b_s)(z_s − μ(θ)) with z_s ~ p(·; θ) (``sample``
  and ``log_partition``);
* :func:`structgrad.perturbed_optimizer` (Berthet et al.): (1/τ)⟨y_s, g_s⟩ ∇ν(ε_s),
  y_s = MAP(θ + τε_s) (``map``);
* :func:`structgrad.imle`: [MAP(θ + τε_s) − MAP(αθ − λg_s + τ′ε_s)] / λ (``map``).

``minimize=True`` (where offered) is for solvers that minimise ⟨z, θ⟩ (θ are costs):
the model is p(z) ∝ exp(−⟨z, θ⟩), noise enters as θ − τε, and the gradient is that of
the costs.

References:
    Y. Bengio, N. Léonard, A. Courville, "Estimating or propagating gradients through
    stochastic neurons", 2013 (straight-through).
    K. Ahmed, Z. Zeng, M. Niepert, G. Van den Broeck, "SIMPLE: a gradient estimator
    for k-subset sampling", ICLR 2023.
    M. Vlastelica, A. Paulus, V. Musil, G. Martius, M. Rolínek, "Differentiation of
    blackbox combinatorial solvers", ICLR 2020.
    R. J. Williams, "Simple statistical gradient-following algorithms for
    connectionist reinforcement learning", 1992 (score function / REINFORCE).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable

from . import checks as V
from ._perturb import Layout, check_reduce, check_sign_options, prepare
from .errors import CapabilityError, DTypeError
from .logspace import safe_dot
from .noise import resolve_noise

__all__ = ["straight_through", "marginal_straight_through", "blackbox", "score_function"]


# ----------------------------------------------------------------------------- straight-through
class _ST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lay: Layout, eps, S: int, tau: float, sign: float, reduce: str, *parts):
        if eps is None:
            inputs = [u.unsqueeze(0).expand((S,) + tuple(u.shape)) for u in lay.unshared]
        else:
            inputs = [torch.add(u, e, alpha=sign * tau) for u, e in zip(lay.unshared, eps)]
        _, z = lay.solve(inputs, S)
        ctx.lay, ctx.S, ctx.sign, ctx.reduce = lay, S, sign, reduce
        ctx.shapes = [t.shape for t in z]
        return tuple(t.mean(0) for t in z) if reduce == "mean" else z

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        g = []
        for gr, shape in zip(grads, ctx.shapes):
            if gr is None:
                gr = torch.zeros(shape[1:] if ctx.reduce == "mean" else shape, dtype=ctx.lay.dtype, device=ctx.lay.device)
            g.append(gr.unsqueeze(0) if ctx.reduce == "mean" else gr)
        out = ctx.lay.to_theta(g)
        need = ctx.needs_input_grad[6:]
        return (None,) * 6 + tuple((ctx.sign * o if ctx.sign < 0 else o) if n else None for o, n in zip(out, need))


def straight_through(
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
    """Perturb-and-MAP samples with the straight-through gradient ∂z/∂θ := I.

    Forward z_s = MAP(θ + τε_s); backward ∇_θ = (1/S) Σ_s g_s (a shared θ leaf gets
    the sum over the batch of its statistic's gradient; with ``minimize``, −g_s).

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)``, as for
            :func:`structgrad.imle`.
        solver: a name, a Solver or a callable θ -> z with ``map``, as for
            :func:`structgrad.imle`.
        samples: S ≥ 1 noise samples per instance.
        noise: the perturbation (``"gumbel"``, ``"sum_of_gamma"``, ``"normal"``,
            ``None`` or a noise object), as for :func:`structgrad.imle`.
        noise_temperature: τ ≥ 0, the scale of the noise.
        generator: the ``torch.Generator`` (on θ's device) the noise is drawn from.
        minimize: the solver *minimises* ⟨z, θ⟩ (θ are costs); the gradient is negated.
        reduce: ``"none"`` (the S samples) or ``"mean"`` (their average).
        **solver_kwargs: passed to every ``map`` call (``lengths=`` for the chain).

    Returns:
        the structure of θ, ``(S, *batch, *event)`` per leaf (``"mean"``: without S).
    Complexity: one batched ``map`` of S·B instances; backward O(S·|θ|).

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.randn(2, 5, requires_grad=True)
        >>> z = sg.straight_through(theta, "categorical", samples=3, generator=torch.Generator().manual_seed(0))
        >>> z.sum().backward(); theta.grad
        tensor([[1., 1., 1., 1., 1.],
                [1., 1., 1., 1., 1.]])
    """
    theta, solver = prepare(theta, solver, "map")
    S = V.check_positive_int(samples, "samples")
    tau = V.check_real(noise_temperature, "noise_temperature", lo=0.0)
    sign = check_sign_options(minimize)
    reduce = check_reduce(reduce)
    noise_obj = resolve_noise(noise, solver)
    lay = Layout(solver, theta, solver_kwargs)
    V.check_generator(generator, lay.device)
    eps = lay.draw(noise_obj, S, generator)
    return V.rebuild(theta, _ST.apply(lay, eps, S, tau, sign, reduce, *V.leaves(theta)))


# ----------------------------------------------------------------------------- SIMPLE
def marginal_straight_through(
    theta: Any,
    solver: Any,
    *,
    samples: int = 1,
    generator: torch.Generator | None = None,
    reduce: str = "none",
    **solver_kwargs: Any,
) -> Any:
    """Exact samples with the exact-marginal straight-through gradient (SIMPLE).

    Forward: z_s ~ p(·; θ) exactly (``solver.sample``).  Backward: the samples are
    treated as the marginals μ(θ) = E[z], whose Jacobian ∂μ/∂θ = Cov_p(z) is exact:
    ∇_θ = (∂μ/∂θ)ᵀ (1/S) Σ_s g_s, by autograd through ``solver.marginals``.  For a
    loss linear in z this is the exact gradient of E_p[L(z)].

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)``, as for
            :func:`structgrad.imle`.
        solver: a name or a Solver with exact ``sample`` and differentiable
            ``marginals``.
        samples: S ≥ 1 exact samples per instance (no noise: the samples are exact).
        generator: the ``torch.Generator`` (on θ's device) the samples are drawn from.
        reduce: ``"none"`` (the S samples) or ``"mean"`` (their average).
        **solver_kwargs: passed to the ``sample`` and ``marginals`` calls
            (``lengths=`` for the chain).

    Returns:
        the structure of θ, ``(S, *batch, *event)`` per leaf (``"mean"``: without S).

    Raises:
        CapabilityError: the solver's ``sample`` is not exact or its marginals are not
            differentiable (``capabilities.differentiable_marginals``).
    Complexity: ``sample`` of S per instance plus one ``marginals`` with autograd.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.randn(3, 8, requires_grad=True)
        >>> z = sg.marginal_straight_through(theta, sg.get_solver("ksubset", k=2), samples=4,
        ...                                  generator=torch.Generator().manual_seed(0))
        >>> z.shape
        torch.Size([4, 3, 8])
    """
    theta, solver = prepare(theta, solver, "sample")
    caps = solver.capabilities
    if not caps.is_exact("sample") or not caps.differentiable_marginals:
        raise CapabilityError(
            f"solver: marginal_straight_through needs exact samples and differentiable marginals, but "
            f"{solver._label()} declares sample={caps.sample!r}, differentiable_marginals="
            f"{caps.differentiable_marginals}; use straight_through or imle (MAP only) instead"
        )
    S = V.check_positive_int(samples, "samples")
    reduce = check_reduce(reduce)
    device = V.leaves(theta)[0].device
    V.check_generator(generator, device)
    detached = V.rebuild(theta, (t.detach() for t in V.leaves(theta)))
    z = V.leaves(solver.sample(detached, S, generator, **solver_kwargs))
    mu = V.leaves(solver.marginals(theta, **solver_kwargs))
    out = []
    for zi, mi in zip(z, mu):
        delta = mi - mi.detach()
        out.append(zi.mean(0) + delta if reduce == "mean" else zi + delta.unsqueeze(0) / S)
    return V.rebuild(theta, out)


# ----------------------------------------------------------------------------- blackbox
class _Blackbox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lay: Layout, lam: float, sign: float, *parts):
        _, z = lay.solve([u.unsqueeze(0) for u in lay.unshared], 1)
        ctx.lay, ctx.lam, ctx.sign, ctx.z = lay, lam, sign, z
        return tuple(t[0] for t in z)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        lay, lam, sign = ctx.lay, ctx.lam, ctx.sign
        g = [torch.zeros_like(z) if gr is None else gr.unsqueeze(0) for gr, z in zip(grads, ctx.z)]
        # maximisation: w' = θ − λ g;  minimisation (costs c): c' = c + λ g
        shifted = [u.unsqueeze(0) - (sign * lam) * d for u, d in zip(lay.unshared, lay.unfold(g))]
        _, zl = lay.solve(shifted, 1)
        diff = [(a - b) / lam for a, b in zip(ctx.z, zl)]
        out = lay.to_theta(diff)
        need = ctx.needs_input_grad[3:]
        return (None,) * 3 + tuple((sign * o if sign < 0 else o) if n else None for o, n in zip(out, need))


def blackbox(theta: Any, solver: Any, *, lam: float = 1.0, minimize: bool = False, **solver_kwargs: Any) -> Any:
    """MAP with the blackbox-differentiation gradient of Vlastelica et al. (2020).

    Forward z = MAP(θ).  Backward: the gradient of the piecewise-linear interpolation
    of L(MAP(·)) with step λ,

        maximisation:  ∇_θ = [MAP(θ) − MAP(θ − λ g)] / λ,
        minimisation (θ = costs c, ``minimize=True``):  ∇_c = −[MIN(c) − MIN(c + λ g)] / λ,

    the second being the paper's form.  Equal to :func:`structgrad.imle` with
    ``noise=None``, α = 1 and the same λ and ``minimize``.

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)``, as for
            :func:`structgrad.imle`.
        solver: a name, a Solver or a callable θ -> z with ``map``, as for
            :func:`structgrad.imle`.
        lam: λ > 0, the interpolation step.
        minimize: the solver *minimises* ⟨z, θ⟩ (θ are costs); the gradient is negated.
        **solver_kwargs: passed to both ``map`` calls (``lengths=`` for the chain).

    Returns:
        z = MAP(θ), the structure of θ (no sample dimension: the method is deterministic).
    Complexity: one ``map`` in forward, one in backward.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> z = sg.blackbox(theta, "categorical", lam=2.0)
        >>> (z * torch.tensor([0.0, 0.0, 1.0])).sum().backward(); theta.grad   # push mass off index 2
        tensor([[ 0.0000, -0.5000,  0.5000]])
    """
    theta, solver = prepare(theta, solver, "map")
    lam = V.check_real(lam, "lam", lo=0.0, lo_open=True)
    sign = check_sign_options(minimize)
    lay = Layout(solver, theta, solver_kwargs)
    return V.rebuild(theta, _Blackbox.apply(lay, lam, sign, *V.leaves(theta)))


# ----------------------------------------------------------------------------- score function
_BASELINES = ("leave_one_out",)


def score_function(
    theta: Any,
    solver: Any,
    loss: Callable[[Any], torch.Tensor],
    *,
    samples: int = 2,
    baseline: Any = "leave_one_out",
    generator: torch.Generator | None = None,
    **solver_kwargs: Any,
) -> torch.Tensor:
    """The score-function (REINFORCE) estimator with a baseline.

    ∇_θ E_p[L(z)] = E_p[(L(z) − b) ∇_θ log p(z; θ)],  ∇_θ log p(z; θ) = z − μ(θ),

    estimated with S exact samples z_s ~ p(·; θ) (``solver.sample``) and
    ∇̂ = (1/S) Σ_s (L(z_s) − b_s)(z_s − μ(θ)).  With the leave-one-out baseline
    b_s = mean of the other samples' losses the estimate stays unbiased.

    Unlike the other estimators it needs the loss *values*, so it takes the loss
    function and returns the per-sample losses, with the estimator attached to
    their gradient with respect to θ: ``score_function(...).sum().backward()``
    leaves ∇̂ in ``theta.grad`` (the losses' own dependence on other parameters
    flows through unchanged).

    Args:
        theta: potentials, a tensor or a tuple of tensors ``(*batch, *event)``, as for
            :func:`structgrad.imle`.
        solver: a name or a Solver with exact ``sample`` and ``log_partition``.
        loss: ``z -> (S, *batch)`` losses, called once with the samples (the
            structure of θ, ``(S, *batch, *event)`` per leaf).
        samples: S (≥ 2 with the leave-one-out baseline).
        baseline: ``"leave_one_out"``, ``None`` (no baseline), a number, or a tensor
            broadcastable to ``(*batch,)``.
        generator: the ``torch.Generator`` (on θ's device) the samples are drawn from.
        **solver_kwargs: passed to the ``sample`` and ``log_partition`` calls
            (``lengths=`` for the chain).

    Returns:
        ``(S, *batch)``: the losses L(z_s), differentiable with the estimator above.

    Raises:
        CapabilityError: a solver without ``sample`` or ``log_partition``.
        ShapeError: ``loss`` returned a shape other than ``(S, *batch)``.
        DomainError: the leave-one-out baseline with S < 2.
    Complexity: ``sample`` of S per instance, one ``log_partition`` with autograd.

    Examples:
        >>> import torch, structgrad as sg
        >>> theta = torch.zeros(3, requires_grad=True)
        >>> b = torch.tensor([1.0, 0.0, 0.0])
        >>> f = sg.score_function(theta, "categorical", lambda z: ((z - b) ** 2).sum(-1), samples=8,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> f.shape
        torch.Size([8])
        >>> f.sum().backward()          # theta.grad: an unbiased estimate of ∇ E[‖z − b‖²]
    """
    theta, solver = prepare(theta, solver, "sample")
    if not solver.capabilities.supports("log_partition"):
        raise CapabilityError(
            f"solver: score_function needs log_partition (∇ log p = z − μ), but {solver._label()} declares "
            f"{', '.join(solver.capabilities.operations)}"
        )
    if not callable(loss):
        raise DTypeError(f"loss: expected a callable z -> (S, *batch) losses, got {type(loss).__name__}")
    S = V.check_positive_int(samples, "samples")
    parts = V.leaves(theta)
    V.check_generator(generator, parts[0].device)
    if isinstance(baseline, str):
        V.check_choice(baseline, _BASELINES, "baseline")
        V.check_positive_int(S, "samples (with the leave-one-out baseline)", minimum=2)
    elif baseline is not None and not isinstance(baseline, torch.Tensor):
        baseline = V.check_real(baseline, "baseline")
    detached = V.rebuild(theta, (t.detach() for t in parts))
    batch = tuple(solver.batch_shape(detached))
    z = solver.sample(detached, S, generator, **solver_kwargs)
    f = loss(z)
    if not isinstance(f, torch.Tensor):
        raise DTypeError(f"loss: expected it to return a tensor of shape (S, *batch), got {type(f).__name__}")
    V.check_shape(f, (S,) + batch, "loss(z)", "(S, *batch)")
    log_z = solver.log_partition(theta, **solver_kwargs)  # (*batch,), ∇ = μ
    score = torch.zeros((S,) + batch, dtype=parts[0].dtype, device=parts[0].device)
    for zi, ti in zip(V.leaves(z), parts):
        score = score + safe_dot(zi, ti, zi.dim() - 1 - len(batch))
    log_p = score - log_z
    fd = f.detach().to(log_p.dtype)
    if isinstance(baseline, str):
        b = (fd.sum(0, keepdim=True) - fd) / (S - 1)
    elif baseline is None:
        b = torch.zeros_like(fd)
    else:
        b = torch.as_tensor(baseline, dtype=fd.dtype, device=fd.device).detach()
    weight = (fd - b) / S
    return f + (weight * (log_p - log_p.detach())).to(f.dtype)
