"""Adaptive λ for I-MLE (AIMLE; Minervini, Franceschi, Niepert, AAAI 2023).

I-MLE's finite difference [MAP(θ + ε) − MAP(θ − λ g + ε)]/λ is zero when the step
λ g is too small to change the MAP, and biased when it is large.  AIMLE sets the
step relative to the scales of θ and of the loss gradient, per instance b and
sample s,

    λ_{s,b} = β · ‖θ_b‖ / ‖g_{s,b}‖        (0 where g_{s,b} = 0),

and adapts the single scale β so that the gradient estimates have a target
*density*, the average number of non-zero entries per instance and sample:

    ρ ← d·ρ + (1 − d)·mean_{s,b} nnz(MAP(θ+ε_s) − MAP(θ′_s))     (running estimate)
    Δ ← m·Δ + η·sign(c − ρ),      β ← max(β + Δ, 0),

with target c, step η, momentum m and decay d.  Too few non-zero entries (the
perturbation rarely changes the MAP) raise β; too many lower it.  The estimate is
then divided by the same λ_{s,b} that made the step.

Shapes are consistent for S > 1: ‖θ_b‖ is the norm of instance b's own potentials
(θ is never repeated S times before taking it) and ‖g_{s,b}‖ the norm of the
gradient of sample s of instance b, and the one λ_{s,b} is used both to perturb and
to rescale.  (The published code perturbs with the norm of θ repeated S times and
rescales with the norm of θ, a factor √S apart; here the two are the same.)

Use: pass an instance as ``lam=`` to :func:`structgrad.imle`; it keeps its state
across calls, and ``state_dict``/``load_state_dict`` save and restore it (e.g. in
a training checkpoint).

Examples:
    >>> import torch, structgrad as sg
    >>> adaptive = sg.AdaptiveLambda(target_nonzeros=2.0)
    >>> theta = torch.randn(8, 20, requires_grad=True)
    >>> z = sg.imle(theta, sg.get_solver("ksubset", k=5), lam=adaptive, generator=torch.Generator().manual_seed(0))
    >>> (z * torch.randn(20)).sum().backward()
    >>> sorted(adaptive.state_dict())
    ['beta', 'density', 'steps', 'velocity']
"""

from __future__ import annotations

from typing import Any

import torch

from . import checks as V
from .errors import DomainError, DTypeError

__all__ = ["AdaptiveLambda"]

_KEYS = ("beta", "density", "velocity", "steps")


class AdaptiveLambda:
    """Stateful adaptive λ for :func:`structgrad.imle` (module docstring).

    Args:
        target_nonzeros: c > 0, the target average number of non-zero entries of a
            single sample's gradient estimate for one instance (for k-subsets a
            change of the MAP moves at least 2 entries).
        initial: β at the start (> 0).
        step: η ≥ 0, the size of each update of β.
        momentum: m in [0, 1).
        decay: d in [0, 1), of the running density estimate (0: the last batch only).
        initial_density: ρ at the start (default: the target, so the first updates
            follow the first batches).

    Attributes (read-only views of the state): ``beta``, ``density``, ``steps``.

    State: β, ρ and Δ are 0-dim float64 tensors that move to θ's device at the first
    use; nothing synchronises with the host.
    """

    def __init__(
        self,
        target_nonzeros: float = 1.0,
        *,
        initial: float = 1.0,
        step: float = 1e-3,
        momentum: float = 0.0,
        decay: float = 0.9,
        initial_density: float | None = None,
    ):
        self.target_nonzeros = V.check_real(target_nonzeros, "target_nonzeros", lo=0.0, lo_open=True)
        init = V.check_real(initial, "initial", lo=0.0, lo_open=True)
        self.step = V.check_real(step, "step", lo=0.0)
        self.momentum = V.check_real(momentum, "momentum", lo=0.0)
        if self.momentum >= 1.0:
            raise DomainError(f"momentum: expected a value in [0, 1), got {self.momentum}")
        self.decay = V.check_real(decay, "decay", lo=0.0)
        if self.decay >= 1.0:
            raise DomainError(f"decay: expected a value in [0, 1), got {self.decay}")
        rho = self.target_nonzeros if initial_density is None else V.check_real(initial_density, "initial_density", lo=0.0)
        f64 = torch.float64
        self._beta = torch.tensor(init, dtype=f64)
        self._density = torch.tensor(rho, dtype=f64)
        self._velocity = torch.tensor(0.0, dtype=f64)
        self._steps = 0

    def __repr__(self) -> str:
        return (
            f"AdaptiveLambda(target_nonzeros={self.target_nonzeros}, beta={float(self._beta):.6g}, "
            f"step={self.step}, momentum={self.momentum}, decay={self.decay}, steps={self._steps})"
        )

    # ------------------------------------------------------------------ state
    @property
    def beta(self) -> torch.Tensor:
        """β, the current relative scale of λ (0-dim float64 tensor)."""
        return self._beta.clone()

    @property
    def density(self) -> torch.Tensor:
        """ρ, the running estimate of non-zero gradient entries per instance and sample."""
        return self._density.clone()

    @property
    def steps(self) -> int:
        """Number of updates so far (backward passes)."""
        return self._steps

    def state_dict(self) -> dict[str, Any]:
        """``{"beta", "density", "velocity": 0-dim float64 CPU tensors, "steps": int}``."""
        return {
            "beta": self._beta.detach().cpu().clone(),
            "density": self._density.detach().cpu().clone(),
            "velocity": self._velocity.detach().cpu().clone(),
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the hyper-parameters stay as constructed)."""
        if not isinstance(state, dict):
            raise DTypeError(f"state: expected a dict from AdaptiveLambda.state_dict(), got {type(state).__name__}")
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise DomainError(f"state: missing key(s) {', '.join(missing)}; expected {', '.join(_KEYS)}")
        vals = {}
        for k in ("beta", "density", "velocity"):
            v = state[k]
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise DomainError(f"state[{k!r}]: expected one number, got shape {V.fmt_shape(v.shape)}")
                v = float(v)
            vals[k] = V.check_real(v, f"state[{k!r}]", lo=None if k == "velocity" else 0.0)
        f64 = torch.float64
        self._beta = torch.tensor(vals["beta"], dtype=f64)
        self._density = torch.tensor(vals["density"], dtype=f64)
        self._velocity = torch.tensor(vals["velocity"], dtype=f64)
        self._steps = V.check_positive_int(state["steps"], "state['steps']", minimum=0)

    # ------------------------------------------------------------------ used by imle
    def magnitude(self, theta_sq_norm: torch.Tensor, grad_sq_norm: torch.Tensor) -> torch.Tensor:
        """λ_{s,b} = β·‖θ_b‖/‖g_{s,b}‖ (0 where either norm is 0), shape of ``grad_sq_norm``.

        Args:
            theta_sq_norm: ‖θ_b‖², ``(*batch,)`` or a scalar.
            grad_sq_norm: ‖g_{s,b}‖², ``(S, *batch)``.
        """
        dtype, device = grad_sq_norm.dtype, grad_sq_norm.device
        beta = self._beta.to(device=device, dtype=dtype)
        tn = torch.sqrt(theta_sq_norm.to(dtype))
        gn = torch.sqrt(grad_sq_norm)
        ok = (gn > 0) & (tn > 0)
        return torch.where(ok, beta * tn / torch.where(ok, gn, torch.ones_like(gn)), torch.zeros_like(gn))

    def update(self, nonzeros: torch.Tensor) -> None:
        """One adaptation step from the non-zero counts ``(S, *batch)`` of the estimates."""
        device = nonzeros.device
        f64 = torch.float64
        mean = nonzeros.to(f64).mean() if nonzeros.numel() else torch.zeros((), dtype=f64, device=device)
        rho = self.decay * self._density.to(device) + (1.0 - self.decay) * mean
        direction = torch.sign(torch.tensor(self.target_nonzeros, dtype=f64, device=device) - rho)
        vel = self.momentum * self._velocity.to(device) + self.step * direction
        self._beta = torch.clamp(self._beta.to(device) + vel, min=0.0)
        self._density = rho
        self._velocity = vel
        self._steps += 1
