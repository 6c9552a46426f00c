"""AdaptiveLambda (AIMLE): the per-instance step β‖θ_b‖/‖g_{s,b}‖, consistent for S > 1,
the adaptation of β towards the target density, and its state."""

from __future__ import annotations

import pytest
import torch

import structgrad as sg

F64 = torch.float64
KS = sg.get_solver("ksubset", k=3)


def _theta(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _grad(theta, upstream, lam, **kw):
    t = theta.clone().requires_grad_(True)
    sg.imle(t, KS, lam=lam, **kw).backward(upstream)
    return t.grad


def test_step_is_beta_times_norm_ratio_per_instance():
    theta = _theta(2, 8) * torch.tensor([[1.0], [4.0]], dtype=F64)  # different norms per instance
    g = _theta(1, 2, 8, seed=1)
    ada = sg.AdaptiveLambda(initial=0.3, step=0.0)
    got = _grad(theta, g, ada, noise=None)
    for b in range(2):
        lam = 0.3 * float(theta[b].norm()) / float(g[0, b].norm())
        want = _grad(theta[b : b + 1], g[:, b : b + 1], lam, noise=None)
        assert torch.allclose(got[b : b + 1], want, atol=1e-12)


def test_no_sqrt_s_mismatch():
    """S copies of the same sample give the same gradient as one (the published code's
    perturbation and rescaling differ by √S there)."""
    theta, g = _theta(3, 8), _theta(1, 3, 8, seed=2)
    one = _grad(theta, g, sg.AdaptiveLambda(initial=0.5, step=0.0), noise=None, samples=1)
    four = _grad(theta, g.expand(4, 3, 8), sg.AdaptiveLambda(initial=0.5, step=0.0), noise=None, samples=4)
    assert torch.allclose(one, four, atol=1e-12)


def test_beta_adapts_towards_the_target_density():
    theta, g = _theta(4, 10), _theta(2, 4, 10, seed=3)
    up = sg.AdaptiveLambda(target_nonzeros=50.0, initial=1.0, step=0.1, decay=0.0)  # unreachable: β grows
    _grad(theta, g, up, samples=2, generator=torch.Generator().manual_seed(0))
    assert float(up.beta) == pytest.approx(1.1) and up.steps == 1
    down = sg.AdaptiveLambda(target_nonzeros=1e-3, initial=1.0, step=0.1, decay=0.0)  # any change is too many
    _grad(theta, g * 100, down, samples=2, generator=torch.Generator().manual_seed(0))
    assert float(down.beta) == pytest.approx(0.9)
    assert float(down.density) > 1e-3
    floor = sg.AdaptiveLambda(target_nonzeros=1e-3, initial=0.05, step=0.1, decay=0.9, initial_density=10.0)
    _grad(theta, g * 100, floor, samples=2, generator=torch.Generator().manual_seed(0))
    assert float(floor.beta) == 0.0  # β ≥ 0


def test_state_dict_round_trip():
    theta, g = _theta(4, 10), _theta(1, 4, 10, seed=4)
    a = sg.AdaptiveLambda(target_nonzeros=3.0, step=0.05, momentum=0.5)
    for s in range(3):
        _grad(theta, g, a, generator=torch.Generator().manual_seed(s))
    state = a.state_dict()
    assert set(state) == {"beta", "density", "velocity", "steps"} and state["steps"] == 3
    b = sg.AdaptiveLambda(target_nonzeros=3.0, step=0.05, momentum=0.5)
    b.load_state_dict(state)
    ga = _grad(theta, g, a, generator=torch.Generator().manual_seed(9))
    gb = _grad(theta, g, b, generator=torch.Generator().manual_seed(9))
    assert torch.equal(ga, gb) and torch.equal(a.state_dict()["beta"], b.state_dict()["beta"])
    assert "AdaptiveLambda(" in repr(a)


def test_bad_arguments_and_state():
    with pytest.raises(sg.DomainError):
        sg.AdaptiveLambda(target_nonzeros=0.0)
    with pytest.raises(sg.DomainError):
        sg.AdaptiveLambda(initial=-1.0)
    with pytest.raises(sg.DomainError):
        sg.AdaptiveLambda(momentum=1.0)
    with pytest.raises(sg.DomainError):
        sg.AdaptiveLambda(decay=1.5)
    a = sg.AdaptiveLambda()
    with pytest.raises(sg.DomainError, match="missing"):
        a.load_state_dict({"beta": 1.0})
    with pytest.raises(sg.DTypeError):
        a.load_state_dict([1.0])
    with pytest.raises(sg.DomainError):
        a.load_state_dict({"beta": -1.0, "density": 0.0, "velocity": 0.0, "steps": 0})


def test_zero_gradient_gives_zero():
    theta = _theta(2, 6)
    g = torch.zeros(1, 2, 6, dtype=F64)
    assert torch.equal(_grad(theta, g, sg.AdaptiveLambda(), generator=torch.Generator().manual_seed(0)), torch.zeros_like(theta))
