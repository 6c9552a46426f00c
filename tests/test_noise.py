"""Noise for perturb-and-MAP: Gamma draws against the Gamma law, Sum-of-Gamma against its
closed-form law, Gumbel, reproducibility, and the noise protocol's checks."""

from __future__ import annotations

import math

import pytest
import torch

import structgrad as sg
from structgrad.noise import draw_noise, resolve_noise, sample_gamma

F64 = torch.float64
N = 20000
# Kolmogorov-Smirnov: P(sqrt(N) D > c) ≈ 2 exp(-2 c²); c = 2.7 gives p ≈ 1e-6
KS = 2.7 / math.sqrt(N)


def _ks(x: torch.Tensor, cdf) -> float:
    x, _ = torch.sort(x.to(F64))
    n = x.numel()
    F = cdf(x)
    i = torch.arange(1, n + 1, dtype=F64)
    return float(torch.maximum(i / n - F, F - (i - 1) / n).max())


@pytest.mark.parametrize("a", [0.05, 0.3, 1.0, 2.5, 17.0])
def test_gamma_draws_follow_the_gamma_law(a):
    x = sample_gamma(a, (N,), generator=torch.Generator().manual_seed(1), dtype=F64)
    assert x.shape == (N,) and x.dtype == F64 and bool((x >= 0).all())
    d = _ks(x, lambda t: torch.special.gammainc(torch.full_like(t, a), t))
    assert d < KS, f"KS distance {d:.4f} >= {KS:.4f} for Gamma({a})"
    # mean and variance a (within 6 standard errors)
    assert abs(float(x.mean()) - a) < 6 * math.sqrt(a / N)


def test_gamma_per_entry_concentration_and_reproducible():
    a = torch.tensor([0.5, 4.0], dtype=F64).repeat(N // 2)
    x = sample_gamma(a, (N,), generator=torch.Generator().manual_seed(2), dtype=F64)
    for val in (0.5, 4.0):
        d = _ks(x[a == val], lambda t: torch.special.gammainc(torch.full_like(t, val), t))
        assert d < 2.7 / math.sqrt(N // 2)
    y = sample_gamma(a, (N,), generator=torch.Generator().manual_seed(2), dtype=F64)
    assert torch.equal(x, y)
    z = sample_gamma(a, (N,), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert not torch.equal(x, z)


def test_gamma_bad_concentration():
    with pytest.raises(sg.DomainError):
        sample_gamma(0.0, (3,))
    with pytest.raises(sg.DomainError):
        sample_gamma(torch.tensor([1.0, -1.0]), (2,))
    with pytest.raises(sg.DTypeError):
        sample_gamma(torch.tensor([1, 2]), (2,))


@pytest.mark.parametrize("k,s", [(1, 10), (4, 10), (10, 3)])
def test_sum_of_gamma_k_copies_is_max_of_exponentials_minus_log_s(k, s):
    """Σ of k i.i.d. SoG(k, s) = Σ_i Exp(rate i) − log s = max of s Exp(1) − log s,
    CDF (1 − e^{−(y + log s)})^s."""
    eps = sg.SumOfGammaNoise(k, num_terms=s).sample((N, k), torch.Generator().manual_seed(4), dtype=F64)
    x = eps.sum(-1)
    cdf = lambda y: torch.clamp(1.0 - torch.exp(-(y + math.log(s))), min=0.0) ** s  # noqa: E731
    d = _ks(x, cdf)
    assert d < KS, f"KS distance {d:.4f}"


def test_gumbel_noise_law_and_dtypes():
    g = torch.Generator().manual_seed(5)
    x = sg.GumbelNoise().sample((N,), g, dtype=F64)
    assert _ks(x, lambda t: torch.exp(-torch.exp(-t))) < KS
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        e = sg.GumbelNoise().sample((10,), g, dtype=dt)
        assert e.dtype == dt and bool(torch.isfinite(e).all())
    assert sg.SumOfGammaNoise(3).sample((5,), g, dtype=torch.float32).dtype == torch.float32


def test_grad_neg_log_density():
    e = torch.linspace(-2, 3, 7, dtype=F64, requires_grad=True)
    for noise, logpdf in (
        (sg.GumbelNoise(), lambda z: -(z + torch.exp(-z))),
        (sg.NormalNoise(), lambda z: -0.5 * z**2),
    ):
        (g,) = torch.autograd.grad(logpdf(e).sum(), e)
        assert torch.allclose(noise.grad_neg_log_density(e.detach()), -g)


def test_resolve_noise():
    ks = sg.get_solver("ksubset", k=3)
    assert isinstance(resolve_noise("gumbel"), sg.GumbelNoise)
    assert isinstance(resolve_noise("normal"), sg.NormalNoise)
    sog = resolve_noise("sum_of_gamma", ks)
    assert isinstance(sog, sg.SumOfGammaNoise) and sog.k == 3 and sog.num_terms == 10
    assert resolve_noise(None) is None
    with pytest.raises(sg.DomainError, match="k attribute"):
        resolve_noise("sum_of_gamma", sg.get_solver("categorical"))
    with pytest.raises(sg.DomainError, match="expected one of"):
        resolve_noise("gaussian")
    with pytest.raises(sg.DTypeError, match="sample"):
        resolve_noise(3.0)
    with pytest.raises(sg.DomainError):
        sg.SumOfGammaNoise(0)


class _Plain:
    """A third-party noise: sample(shape, generator) only."""

    def __init__(self, shape=None, kind="ok"):
        self.shape, self.kind = shape, kind

    def sample(self, shape, generator):
        if self.kind == "list":
            return [0.0]
        if self.kind == "int":
            return torch.zeros(shape, dtype=torch.long)
        return torch.rand(self.shape or shape, generator=generator)


class _Typed:
    def __init__(self):
        self.got = None

    def sample(self, shape, generator, dtype, device):
        self.got = (dtype, device)
        return torch.zeros(shape, dtype=dtype, device=device)


def test_draw_noise_protocol():
    dev = torch.device("cpu")
    e = draw_noise(_Plain(), (2, 3), torch.Generator().manual_seed(0), F64, dev)
    assert e.shape == (2, 3) and e.dtype == F64  # cast to θ's dtype
    t = _Typed()
    draw_noise(t, (2,), None, torch.float16, dev)
    assert t.got == (torch.float16, dev)
    with pytest.raises(sg.ShapeError, match="requested shape"):
        draw_noise(_Plain(shape=(3, 2)), (2, 3), None, F64, dev)
    with pytest.raises(sg.DTypeError):
        draw_noise(_Plain(kind="list"), (2, 3), None, F64, dev)
    with pytest.raises(sg.DTypeError):
        draw_noise(_Plain(kind="int"), (2, 3), None, F64, dev)
