"""imle, the noises and the baselines on CUDA: noise drawn on θ's device from the given
generator, reproducible, and the same formulas as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

import structgrad as sg
from structgrad.noise import sample_gamma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
F64 = torch.float64


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("noise", ["gumbel", "sum_of_gamma", "normal", None])
def test_imle_ksubset_on_cuda(noise):
    ks = sg.get_solver("ksubset", k=3)
    theta = torch.randn(4, 9, dtype=F64, device="cuda")
    g = torch.randn(2, 4, 9, dtype=F64, device="cuda")
    t = theta.clone().requires_grad_(True)
    z = sg.imle(t, ks, samples=2, noise=noise, lam=0.7, generator=_gen(3))
    assert z.device.type == "cuda" and z.dtype == F64
    z.backward(g)
    # the same formula, noise redrawn from the same CUDA generator seed
    from structgrad.noise import resolve_noise

    obj = resolve_noise(noise, ks)
    eps = torch.zeros(2, 4, 9, dtype=F64, device="cuda") if obj is None else obj.sample(
        (2, 4, 9), _gen(3), dtype=F64, device=torch.device("cuda", torch.cuda.current_device()))
    zf = ks.map(theta + eps)
    assert torch.equal(z.detach(), zf)
    want = ((zf - ks.map(theta - 0.7 * g + eps)) / 0.7).mean(0)
    assert torch.allclose(t.grad, want, atol=1e-12)
    t2 = theta.clone().requires_grad_(True)
    sg.imle(t2, ks, samples=2, noise=noise, lam=0.7, generator=_gen(3)).backward(g)
    assert torch.equal(t.grad, t2.grad)


def test_chain_with_lengths_on_cuda():
    node = torch.randn(2, 5, 3, device="cuda", requires_grad=True)
    edge = torch.randn(3, 3, device="cuda", requires_grad=True)
    lengths = torch.tensor([5, 2], device="cuda")
    zn, ze = sg.imle((node, edge), "chain", samples=3, generator=_gen(), lengths=lengths)
    assert zn.shape == (3, 2, 5, 3) and ze.shape == (3, 2, 3, 3) and ze.device.type == "cuda"
    assert torch.equal(ze.sum((-1, -2)).cpu(), torch.tensor([[4.0, 1.0]] * 3))
    (zn.sum() + ze.sum()).backward()
    assert edge.grad.shape == (3, 3) and edge.grad.device.type == "cuda"


def test_gamma_and_sum_of_gamma_on_cuda():
    n = 20000
    for a in (0.2, 3.0):
        x = sample_gamma(a, (n,), generator=_gen(1), dtype=F64, device="cuda")
        assert x.device.type == "cuda"
        x, _ = torch.sort(x.cpu())
        F = torch.special.gammainc(torch.full_like(x, a), x)
        i = torch.arange(1, n + 1, dtype=F64)
        assert float(torch.maximum(i / n - F, F - (i - 1) / n).max()) < 2.7 / math.sqrt(n)
    y = sg.SumOfGammaNoise(4).sample((3, 5), _gen(2), dtype=torch.float32, device="cuda")
    assert y.device.type == "cuda" and torch.equal(y, sg.SumOfGammaNoise(4).sample((3, 5), _gen(2), device="cuda"))


def test_baselines_and_adaptive_on_cuda():
    ks = sg.get_solver("ksubset", k=2)
    theta = torch.randn(3, 6, device="cuda", requires_grad=True)
    for z in (
        sg.straight_through(theta, ks, samples=2, generator=_gen()),
        sg.marginal_straight_through(theta, ks, samples=2, generator=_gen()),
        sg.perturbed_optimizer(theta, ks, samples=2, generator=_gen()),
        sg.blackbox(theta, ks).unsqueeze(0),
        sg.imle(theta, ks, lam=sg.AdaptiveLambda(), samples=2, generator=_gen()),
    ):
        assert z.device.type == "cuda"
        z.sum().backward()
    b = torch.randn(6, device="cuda")
    f = sg.score_function(theta, ks, lambda z: ((z - b) ** 2).sum(-1), samples=4, generator=_gen())
    f.sum().backward()
    loss = sg.perturbed_fenchel_young_loss(theta, ks.map(theta.detach()), ks, samples=2, generator=_gen())
    loss.sum().backward()
    assert theta.grad.device.type == "cuda"


def test_lab_on_cuda():
    task = sg.lab.ksubset_task(n=8, k=3, batch=4, device="cuda")
    res = sg.lab.run(task, estimators=["imle", "marginal-st"], samples=(4,), lams=(1.0,), seeds=2)
    assert len(res.rows) == 2


def test_wrong_generator_device():
    with pytest.raises(sg.DeviceError, match="generator"):
        sg.imle(torch.randn(2, 4, device="cuda"), sg.get_solver("ksubset", k=1), generator=torch.Generator())
