"""Edge cases of the categorical family (issue 8, item 5): n = 0, a tuple θ for the
one-tensor solvers, and the argument checks of logspace.multinomial_counts.

The conformance suite of categorical and bernoulli is in test_core.py.
"""

from __future__ import annotations

import pytest
import torch

import structgrad as sg
from structgrad import logspace as ls
from structgrad.errors import DeviceError, DomainError, DTypeError, ShapeError

F64 = torch.float64
NEG = float("-inf")


# ---------------------------------------------------------------------------- n = 0
@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_categorical_with_no_outcomes(batch):
    """θ (*b, 0): no feasible outcome, like a row of all -inf: A = -inf, empty μ/MAP/samples."""
    s = sg.get_solver("categorical")
    th = torch.zeros(batch + (0,), dtype=F64, requires_grad=True)
    A = s.log_partition(th)
    assert A.shape == batch and torch.isneginf(A).all()
    assert s.marginals(th).shape == batch + (0,)
    assert s.map(th).shape == batch + (0,) and s.map(th).dtype == F64
    z = s.sample(th, 3, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3,) + batch + (0,)
    (g,) = torch.autograd.grad(A.sum(), th)
    assert g.shape == th.shape
    A2, mu2 = s.log_partition_and_marginals(th)
    assert torch.isneginf(A2).all() and mu2.shape == th.shape
    # gradient through the marginals (differentiable_marginals) and second derivatives
    (g2,) = torch.autograd.grad(s.marginals(th).sum(), th)
    assert g2.shape == th.shape
    (h,) = torch.autograd.grad(s.log_partition(th).sum(), th, create_graph=True)
    assert h.shape == th.shape


def test_logspace_primitives_on_empty_dims():
    x = torch.zeros(2, 0, dtype=F64, requires_grad=True)
    y = ls.logsumexp(x, -1)
    assert torch.isneginf(y).all()
    y.sum().backward()
    assert x.grad.shape == (2, 0)
    assert ls.logsumexp(x.detach(), -1, keepdim=True).shape == (2, 1)
    assert ls.softmax(x, -1).shape == (2, 0)
    assert (ls.gumbel_argmax(torch.zeros(2, 0), 4) == -1).all()
    assert ls.gumbel_argmax(torch.zeros(2, 0), 4).shape == (4, 2)


def test_bernoulli_and_ksubset_with_n_zero():
    """bernoulli: one structure, the empty vector (A = 0); ksubset k = 0 likewise."""
    th = torch.zeros(3, 0, dtype=F64)
    for s in (sg.get_solver("bernoulli"), sg.get_solver("ksubset", k=0)):
        torch.testing.assert_close(s.log_partition(th), torch.zeros(3, dtype=F64))
        assert s.marginals(th).shape == (3, 0) and s.map(th).shape == (3, 0)
        assert s.sample(th, 2).shape == (2, 3, 0)
    with pytest.raises(DomainError, match=r"k: expected 0 <= k <= n, where n = 0"):
        sg.get_solver("ksubset", k=1).marginals(th)


# ---------------------------------------------------------------------------- tuple θ
@pytest.mark.parametrize("name,opts", [("categorical", {}), ("bernoulli", {}), ("ksubset", {"k": 1})])
@pytest.mark.parametrize("op", ["map", "marginals", "log_partition", "sample"])
def test_tuple_theta_is_a_named_shape_error(name, opts, op):
    s = sg.get_solver(name, **opts)
    for th, what in (((torch.zeros(3), torch.zeros(3)), "tuple of 2 tensors"), ([torch.zeros(3)], "list of 1 tensor")):
        with pytest.raises(ShapeError, match=rf"theta: expected one tensor \(\*batch, \.\.\.\) for solver '{name}', got a {what}"):
            getattr(s, op)(th)
    with pytest.raises(ShapeError, match=r"theta: expected one tensor"):
        sg.nll((torch.zeros(3), torch.zeros(3)), (torch.zeros(3), torch.zeros(3)), s)


# ---------------------------------------------------------------------------- multinomial_counts
def test_multinomial_counts_argument_errors():
    logits = torch.zeros(2, 3, dtype=F64)
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.tensor([-1, 2]), DomainError, r"totals: expected trial counts >= 0, got a minimum of -1"),
        (torch.tensor([1.5, 2.0]), DTypeError, r"totals: expected an integer tensor, got dtype torch.float32"),
        (torch.tensor([1.0, 2.0], dtype=F64), DTypeError, r"totals: expected an integer tensor, got dtype torch.float64"),
        (torch.tensor([True, False]), DTypeError, r"totals: expected an integer tensor, got dtype torch.bool"),
        ([1, 2], DTypeError, r"totals: expected an integer torch.Tensor, got list"),
        (torch.tensor([1, 2, 3]), ShapeError, r"totals: expected shape \(2,\) \(the batch shape of logits\), got \(3,\)"),
        (torch.tensor([1, 2], device="meta"), DeviceError, r"totals is on device meta but logits is on cpu"),
    ]
    for totals, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            ls.multinomial_counts(logits, totals, generator=g)
    with pytest.raises(DomainError, match=r"logits: expected scores that are finite or -inf .*1 NaN"):
        ls.multinomial_counts(torch.tensor([[0.0, float("nan")]]), torch.tensor([1]))
    with pytest.raises(DomainError, match=r"totals: row \(1,\) asks for 2 draws but its logits are all -inf"):
        ls.multinomial_counts(torch.tensor([[0.0, 0.0], [NEG, NEG]]), torch.tensor([1, 2]))
    with pytest.raises(DTypeError, match=r"logits: expected a floating-point tensor"):
        ls.multinomial_counts(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 2]))
    with pytest.raises(DTypeError, match=r"generator"):
        ls.multinomial_counts(logits, torch.tensor([1, 2]), generator=3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_multinomial_counts_any_integer_totals(dtype):
    logits = torch.log(torch.tensor([[0.2, 0.8], [1.0, 0.0]], dtype=F64))
    c = ls.multinomial_counts(logits, torch.tensor([5, 3], dtype=dtype), generator=torch.Generator().manual_seed(0))
    assert torch.equal(c.sum(-1), torch.tensor([5.0, 3.0], dtype=F64)) and c[1, 1] == 0
    # a dead row (all -inf) or n = 0 with total 0 is fine: zeros
    z = ls.multinomial_counts(torch.full((2, 3), NEG), torch.zeros(2, dtype=dtype))
    assert torch.equal(z, torch.zeros(2, 3))
    assert ls.multinomial_counts(torch.zeros(2, 0), torch.zeros(2, dtype=dtype)).shape == (2, 0)
