"""ReplicatedSoftmax and BernoulliRBM: free energy, CD gradients, exact log Z, errors.

Sampling (Gibbs, CD-k convergence, AIS) is in test_rbm_sampling.py; the examples in
test_rbm_examples.py.  Oracles enumerate every (v, h) of tiny models (_rbm_oracle.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.errors import DeviceError, DomainError, DTypeError, ShapeError
from structgrad.rbm import AISEstimate, BernoulliRBM, ReplicatedSoftmax, ais_betas

import _rbm_oracle as O

f64 = torch.float64


def _rsm(K=4, F_=3, seed=0, scale=0.7, scale_hidden_bias=True, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    m = ReplicatedSoftmax(K, F_, scale_hidden_bias=scale_hidden_bias, generator=g, dtype=dtype)
    O.randomize(m, g, scale)
    return m


def _rbm(K=4, F_=3, seed=0, scale=0.7, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    m = BernoulliRBM(K, F_, generator=g, dtype=dtype)
    O.randomize(m, g, scale)
    return m


def _docs(N, K, max_count=4, seed=1, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, max_count + 1, (N, K), generator=g).to(dtype)
    v[:, 0] += 1  # every document has at least one word
    return v


def _bits(N, K, seed=1, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (N, K), generator=g).to(dtype)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return model.weight.grad.clone(), model.visible_bias.grad.clone(), model.hidden_bias.grad.clone()


# ---------------------------------------------------------------------------- public names
def test_exported_names():
    assert sg.ReplicatedSoftmax is ReplicatedSoftmax
    assert sg.BernoulliRBM is BernoulliRBM
    assert {"ReplicatedSoftmax", "BernoulliRBM"} <= set(sg.__all__)


# ---------------------------------------------------------------------------- free energy
@settings(max_examples=15, deadline=None)
@given(
    K=st.integers(1, 5),
    F_=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
    scale_hidden_bias=st.booleans(),
)
def test_rsm_free_energy_matches_enumeration(K, F_, batch, seed, scale_hidden_bias):
    m = _rsm(K, F_, seed, scale_hidden_bias=scale_hidden_bias)
    v = _docs(math.prod(batch), K, seed=seed + 1).reshape(*batch, K)
    fe = m.free_energy(v)
    assert fe.shape == tuple(batch) and fe.dtype == f64
    ref = O.rsm_free_energy(m, v.reshape(-1, K)).reshape(batch)
    torch.testing.assert_close(fe.detach(), ref, atol=1e-10, rtol=0)


@settings(max_examples=15, deadline=None)
@given(K=st.integers(1, 5), F_=st.integers(1, 4), N=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rbm_free_energy_matches_enumeration(K, F_, N, seed):
    m = _rbm(K, F_, seed)
    v = _bits(N, K, seed + 1)
    torch.testing.assert_close(m.free_energy(v).detach(), O.rbm_free_energy(m, v), atol=1e-10, rtol=0)


def test_free_energy_is_bernoulli_log_partition():
    """F(v) = −v·b − A_bernoulli(u): the hidden part is the bernoulli solver's log-partition."""
    m = _rsm(5, 3)
    v = _docs(4, 5)
    u = v.sum(-1, keepdim=True) * m.hidden_bias + v @ m.weight
    ref = -(v @ m.visible_bias) - sg.get_solver("bernoulli").log_partition(u)
    torch.testing.assert_close(m.free_energy(v), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(m.hidden_marginals(v), torch.sigmoid(u), atol=1e-12, rtol=0)


def test_integer_counts_are_accepted_and_inputs_not_mutated():
    m = _rsm(4, 2)
    v_int = torch.tensor([[1, 2, 0, 3], [0, 0, 1, 0]])
    snapshot = v_int.clone()
    fe = m.free_energy(v_int)
    assert fe.dtype == f64
    torch.testing.assert_close(fe, m.free_energy(v_int.to(f64)))
    m.cd_loss(v_int, generator=torch.Generator().manual_seed(0)).backward()
    m.gibbs(v_int, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(v_int, snapshot)
    r = _rbm(3, 2)
    vb = torch.tensor([[True, False, True]])
    torch.testing.assert_close(r.free_energy(vb), r.free_energy(vb.to(f64)))


def test_float32_default_dtype_and_outputs_follow_parameters():
    m = ReplicatedSoftmax(6, 3, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.float32 and m.weight.shape == (6, 3)
    v = torch.tensor([[1.0, 0, 2, 0, 0, 1]])
    assert m.free_energy(v).dtype == torch.float32
    assert m.gibbs(v, 1, generator=torch.Generator().manual_seed(0)).dtype == torch.float32
    assert m.log_partition(torch.tensor([4])).dtype == torch.float32


# ---------------------------------------------------------------------------- CD gradient = hand-written update
@pytest.mark.parametrize("scale_hidden_bias", [True, False])
def test_rsm_cd_gradient_equals_hand_written_update(scale_hidden_bias):
    m = _rsm(7, 4, seed=3, scale_hidden_bias=scale_hidden_bias)
    v0 = _docs(5, 7, max_count=6, seed=4)
    vk = m.gibbs(v0, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(vk.sum(-1), v0.sum(-1))
    gW, gb, ga = _grads(m, m.cd_loss(v0, negatives=vk))
    W, b, a = m.weight.detach(), m.visible_bias.detach(), m.hidden_bias.detach()
    D = v0.sum(-1, keepdim=True)
    s = D if scale_hidden_bias else torch.ones_like(D)
    s0, sk = torch.sigmoid(s * a + v0 @ W), torch.sigmoid(s * a + vk @ W)
    B = v0.shape[0]
    # the textbook CD update, as a gradient of the loss (minus the update direction)
    refW = -(v0.T @ s0 - vk.T @ sk) / B
    refb = -(v0 - vk).sum(0) / B
    refa = -(s * (s0 - sk)).sum(0) / B  # the D_n factor of the seed
    torch.testing.assert_close(gW, refW, atol=1e-12, rtol=0)
    torch.testing.assert_close(gb, refb, atol=1e-12, rtol=0)
    torch.testing.assert_close(ga, refa, atol=1e-12, rtol=0)
    # reduction="sum" is B times the mean: a learning-rate factor B, the same direction
    gW2, gb2, ga2 = _grads(m, m.cd_loss(v0, negatives=vk, reduction="sum"))
    torch.testing.assert_close(gW2, B * refW, atol=1e-12, rtol=0)
    torch.testing.assert_close(gb2, B * refb, atol=1e-12, rtol=0)
    torch.testing.assert_close(ga2, B * refa, atol=1e-12, rtol=0)


def test_rbm_cd_gradient_equals_hand_written_update():
    m = _rbm(6, 4, seed=3)
    v0 = _bits(5, 6, seed=4)
    vk = m.gibbs(v0, 1, generator=torch.Generator().manual_seed(5))
    gW, gb, gc = _grads(m, m.cd_loss(v0, negatives=vk))
    W, b, c = m.weight.detach(), m.visible_bias.detach(), m.hidden_bias.detach()
    s0, sk = torch.sigmoid(c + v0 @ W), torch.sigmoid(c + vk @ W)
    B = v0.shape[0]
    torch.testing.assert_close(gW, -(v0.T @ s0 - vk.T @ sk) / B, atol=1e-12, rtol=0)
    torch.testing.assert_close(gb, -(v0 - vk).sum(0) / B, atol=1e-12, rtol=0)
    torch.testing.assert_close(gc, -(s0 - sk).sum(0) / B, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["rsm", "rsm_unscaled", "rbm"])
def test_cd_loss_gradient_matches_gradcheck(kind):
    """The library's cd_loss (fixed negatives), as a function of the parameters, passes
    gradcheck in float64: its autograd gradient agrees with finite differences of its value."""
    from torch.func import functional_call

    if kind == "rbm":
        m = _rbm(4, 3, seed=9)
        v0, vk = _bits(3, 4, seed=2), _bits(2, 4, seed=3)
    else:
        m = _rsm(4, 3, seed=9, scale_hidden_bias=kind == "rsm")
        v0 = _docs(3, 4, seed=2)
        vk = m.gibbs(v0, 1, generator=torch.Generator().manual_seed(3))  # same lengths as v0

    class Loss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, v0, vk):
            return self.model.cd_loss(v0, negatives=vk)

    wrapped = Loss(m)
    names = ("model.weight", "model.visible_bias", "model.hidden_bias")

    def f(W, b, a):
        return functional_call(wrapped, dict(zip(names, (W, b, a))), (v0, vk))

    params = tuple(p.detach().clone().requires_grad_(True) for p in (m.weight, m.visible_bias, m.hidden_bias))
    assert torch.autograd.gradcheck(f, params)
    # and functional_call really went through the library: the same value as the model's own call
    torch.testing.assert_close(f(*params).detach(), m.cd_loss(v0, negatives=vk).detach(), atol=1e-12, rtol=0)


def test_seed_working_energy_is_a_per_parameter_learning_rate():
    """The asker's TF energy F̃(v) = −v·b − B Σ softplus(a/B + vW): its autodiff gradient is the
    gradient of the un-scaled RSM with hidden bias c = a/B, multiplied by (B, 1, 1) for (W, b, a),
    i.e. SGD with learning rates (B·η, η, η/B) on (W, b, c)."""
    B = 6
    m = _rsm(5, 3, seed=11, scale_hidden_bias=False)  # hidden bias c, no D factor
    v0 = _docs(B, 5, seed=12)
    vk = m.gibbs(v0, 1, generator=torch.Generator().manual_seed(0))
    gW, gb, gc = _grads(m, m.cd_loss(v0, negatives=vk))
    W = m.weight.detach().clone().requires_grad_(True)
    b = m.visible_bias.detach().clone().requires_grad_(True)
    a = (B * m.hidden_bias.detach()).clone().requires_grad_(True)  # the asker's stored parameter

    def f_tilde(x):
        u = a / B + x @ W
        return -(x @ b) - B * F.softplus(u).sum(-1)

    loss = (f_tilde(v0) - f_tilde(vk)).mean()
    tW, tb, ta = torch.autograd.grad(loss, (W, b, a))
    torch.testing.assert_close(tW, B * gW, atol=1e-12, rtol=0)
    torch.testing.assert_close(tb, gb, atol=1e-12, rtol=0)
    torch.testing.assert_close(ta, gc, atol=1e-12, rtol=0)  # Δc = Δa / B = (η/B)·(−∂L/∂c)


# ---------------------------------------------------------------------------- exact log Z
@pytest.mark.parametrize("scale_hidden_bias", [True, False])
@pytest.mark.parametrize("K,F_", [(1, 2), (3, 2), (4, 3), (2, 5)])
def test_rsm_exact_log_partition_matches_enumeration_over_v_and_h(K, F_, scale_hidden_bias):
    m = _rsm(K, F_, seed=K * 10 + F_, scale_hidden_bias=scale_hidden_bias)
    lengths = torch.tensor([[1, 2], [3, 5]])
    lz = m.log_partition(lengths)
    assert lz.shape == (2, 2) and lz.dtype == f64
    ref = torch.stack([O.rsm_log_z(m, int(D)) for D in lengths.flatten()]).reshape(2, 2)
    torch.testing.assert_close(lz.detach(), ref, atol=1e-10, rtol=0)
    assert torch.allclose(m.log_partition(3).detach(), ref[1, 0], atol=1e-10, rtol=0)


def test_rsm_exact_log_partition_counting():
    """Zero parameters: Z_D = 2^F K^D (counting check)."""
    m = ReplicatedSoftmax(7, 4, init_std=0.0, dtype=f64)
    lz = m.log_partition(torch.tensor([1, 10, 300]))
    ref = 4 * math.log(2) + torch.tensor([1.0, 10, 300], dtype=f64) * math.log(7)
    torch.testing.assert_close(lz.detach(), ref, atol=1e-10, rtol=0)


def test_rsm_log_partition_chunking():
    """Enumeration in several chunks (large vocabulary) gives the same value as one pass."""
    g = torch.Generator().manual_seed(0)
    m = ReplicatedSoftmax(40000, 8, init_std=0.1, generator=g, dtype=f64)  # chunk < 2^8 rows
    lz = m.log_partition(torch.tensor([5, 50]))
    H = O.binary_vectors(8)
    lv = torch.logsumexp(m.visible_bias + H @ m.weight.T, -1)
    ref = torch.stack([torch.logsumexp(D * (H @ m.hidden_bias) + D * lv, 0) for D in (5.0, 50.0)])
    torch.testing.assert_close(lz.detach(), ref.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("K,F_", [(3, 2), (2, 6), (6, 3)])
def test_rbm_exact_log_partition_matches_enumeration(K, F_):
    m = _rbm(K, F_, seed=K + F_)  # both enumeration sides (F <= K and F > K)
    torch.testing.assert_close(m.log_partition().detach(), O.rbm_log_z(m), atol=1e-10, rtol=0)
    zero = BernoulliRBM(K, F_, init_std=0.0, dtype=f64)
    torch.testing.assert_close(zero.log_partition(), torch.tensor((K + F_) * math.log(2), dtype=f64))


@pytest.mark.parametrize("scale_hidden_bias", [True, False])
def test_rsm_log_partition_gradient_is_expected_sufficient_statistics(scale_hidden_bias):
    m = _rsm(4, 3, seed=21, scale_hidden_bias=scale_hidden_bias)
    D = 4
    gW, gb, ga = _grads(m, m.log_partition(D))
    EW, Eb, Ea = O.rsm_expected_stats(m, D)
    torch.testing.assert_close(gW, EW, atol=1e-10, rtol=0)
    torch.testing.assert_close(gb, Eb, atol=1e-10, rtol=0)
    torch.testing.assert_close(ga, Ea, atol=1e-10, rtol=0)  # D·E[h] with the paper's scaling


@pytest.mark.parametrize("K,F_", [(3, 4), (5, 2)])
def test_rbm_log_partition_gradient_is_expected_sufficient_statistics(K, F_):
    m = _rbm(K, F_, seed=22)
    gW, gb, gc = _grads(m, m.log_partition())
    EW, Eb, Ec = O.rbm_expected_stats(m)
    torch.testing.assert_close(gW, EW, atol=1e-10, rtol=0)
    torch.testing.assert_close(gb, Eb, atol=1e-10, rtol=0)
    torch.testing.assert_close(gc, Ec, atol=1e-10, rtol=0)


def test_log_prob_normalises_and_perplexity():
    m = _rsm(3, 3, seed=5)
    for D in (1, 4):
        vs = O.count_vectors(D, 3)
        total = torch.logsumexp(m.log_prob(vs, counts=True), 0)
        torch.testing.assert_close(total.detach(), torch.tensor(0.0, dtype=f64), atol=1e-10, rtol=0)
        # ordered sequences: K^D of them; summing p(V) over sequences = Σ_v multinomial(v) p(V)
        lp_seq = m.log_prob(vs) + O.log_multinomial(vs)
        torch.testing.assert_close(torch.logsumexp(lp_seq, 0).detach(), torch.tensor(0.0, dtype=f64), atol=1e-10, rtol=0)
    v = _docs(4, 3, seed=8)
    lp = m.log_prob(v).detach()
    ppl = m.perplexity(v)
    torch.testing.assert_close(ppl, torch.exp(-(lp / v.sum(-1)).mean()))
    # with a given log Z, log_prob uses it
    lz = m.log_partition(v.sum(-1)).detach()
    torch.testing.assert_close(m.log_prob(v, log_z=lz).detach(), lp)
    # a uniform model has perplexity K
    u = ReplicatedSoftmax(3, 2, init_std=0.0, dtype=f64)
    torch.testing.assert_close(u.perplexity(v), torch.tensor(3.0, dtype=f64))
    r = _rbm(4, 3, seed=6)
    torch.testing.assert_close(torch.logsumexp(r.log_prob(O.binary_vectors(4)), 0).detach(), torch.tensor(0.0, dtype=f64), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------- large scores
def test_no_nan_for_scores_up_to_1e4_in_float32():
    for model in (ReplicatedSoftmax(5, 3, init_std=0.0), BernoulliRBM(5, 3, init_std=0.0)):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1e4, -1e4, 0.0]] * 5))
            model.visible_bias.copy_(torch.tensor([1e4, -1e4, 0.0, 5.0, -5.0]))
            model.hidden_bias.copy_(torch.tensor([-1e4, 1e4, 0.0]))
        v = torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 0, 1, 0]])
        g = torch.Generator().manual_seed(0)
        loss = model.cd_loss(v, k=2, generator=g)
        model.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
        lz = model.log_partition(torch.tensor([1, 3])) if isinstance(model, ReplicatedSoftmax) else model.log_partition()
        model.zero_grad()
        lz.sum().backward()
        assert torch.isfinite(lz).all()
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
        assert torch.isfinite(model.free_energy(v)).all()


# ---------------------------------------------------------------------------- persistent chains
def test_rsm_pcd_chains_take_the_current_batchs_lengths():
    """cd_loss(persistent=True) on batches of different lengths: the chains that served the
    current batch hold documents of the current lengths (they were its negatives)."""
    m = _rsm(5, 3, seed=1)
    g = torch.Generator().manual_seed(0)
    v1 = _docs(3, 5, seed=2)
    m.cd_loss(v1, k=1, persistent=True, generator=g)
    assert torch.equal(m.persistent_chains.sum(-1), v1.sum(-1))
    v2 = torch.tensor([[9.0, 0, 0, 3, 0], [0, 1, 0, 0, 0], [2, 2, 2, 2, 2]], dtype=f64)
    assert not torch.equal(v2.sum(-1), v1.sum(-1))
    loss = m.cd_loss(v2, k=2, persistent=True, generator=g)
    neg = m.persistent_chains
    assert neg.shape == (3, 5) and torch.equal(neg.sum(-1), v2.sum(-1))
    torch.testing.assert_close(loss, m.free_energy(v2).mean() - m.free_energy(neg).mean())


def test_rsm_pcd_negatives_have_the_current_documents_lengths():
    """PCD on the RSM: the negative of each document is drawn at that document's own length,
    batch after batch, not at the length of the document its chain last held."""
    m = _rsm(5, 3, seed=1)
    g = torch.Generator().manual_seed(0)
    assert m.persistent_chains is None
    v1 = _docs(4, 5, seed=2)
    n1 = m.persistent_negatives(v1, k=1, generator=g)
    assert n1.shape == (4, 5) and torch.equal(n1.sum(-1), v1.sum(-1))
    c1 = m.persistent_chains.clone()
    assert c1.shape == (4, 5) and torch.equal(c1, n1)  # the chains hold their last documents
    # the first call is CD-k exactly: the chains start at the data
    torch.testing.assert_close(n1, m.gibbs(v1, 1, generator=torch.Generator().manual_seed(0)))
    # a later, smaller batch of other lengths: negatives at *its* lengths, from chains 0 and 1
    v2 = torch.tensor([[9.0, 0, 0, 3, 0], [0, 1, 0, 0, 0]], dtype=f64)
    assert not torch.equal(v2.sum(-1), v1[:2].sum(-1))
    n2 = m.persistent_negatives(v2, k=2, generator=g)
    assert n2.shape == (2, 5) and torch.equal(n2.sum(-1), v2.sum(-1))
    c2 = m.persistent_chains
    # first in, first out: the unused chains 2, 3 move to the front, the two used ones to the back
    assert c2.shape == (4, 5) and torch.equal(c2[:2], c1[2:]) and torch.equal(c2[2:], n2)
    # the next batch is served by chains 2, 3 (then the used ones): here a leading batch shape
    v3 = _docs(6, 5, max_count=7, seed=5).reshape(2, 3, 5)
    n3 = m.persistent_negatives(v3, k=1, generator=g)
    assert n3.shape == (2, 3, 5) and torch.equal(n3.sum(-1), v3.sum(-1))
    assert m.persistent_chains.shape == (6, 5)  # two chains added for the larger batch
    # cd_loss(persistent=True) is cd_loss with these negatives (same generator state)
    v4 = _docs(3, 5, max_count=6, seed=6)
    twin = copy.deepcopy(m)
    loss = m.cd_loss(v4, k=2, persistent=True, generator=torch.Generator().manual_seed(9))
    neg = twin.persistent_negatives(v4, k=2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(neg.sum(-1), v4.sum(-1))
    torch.testing.assert_close(loss, twin.cd_loss(v4, negatives=neg), atol=1e-12, rtol=0)
    assert torch.equal(m.persistent_chains, twin.persistent_chains)
    # the PCD hidden-bias gradient carries each document's own D_n in both phases
    gW, gb, ga = _grads(twin, twin.cd_loss(v4, negatives=neg))
    D = v4.sum(-1, keepdim=True)
    W, a = twin.weight.detach(), twin.hidden_bias.detach()
    ref = -(D * (torch.sigmoid(D * a + v4 @ W) - torch.sigmoid(D * a + neg @ W))).sum(0) / 3
    torch.testing.assert_close(ga, ref, atol=1e-12, rtol=0)
    m.reset_chains()
    assert m.persistent_chains is None
    # reproducible: the same generator seed gives the same chains
    m.persistent_negatives(v1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.persistent_chains, c1)


def test_rbm_pcd_keeps_its_visible_chains():
    """The Bernoulli RBM's PCD: M visible chains set by the first batch, all advanced and all used."""
    m = _rbm(5, 3, seed=1)
    g = torch.Generator().manual_seed(0)
    v0 = _bits(4, 5, seed=2)
    m.cd_loss(v0, k=1, persistent=True, generator=g).backward()
    c1 = m.persistent_chains.clone()
    assert c1.shape == (4, 5) and bool(((c1 == 0) | (c1 == 1)).all())
    v1 = _bits(2, 5, seed=3)
    twin = copy.deepcopy(m)
    loss = m.cd_loss(v1, k=2, persistent=True, generator=torch.Generator().manual_seed(1))
    c2 = m.persistent_chains
    assert c2.shape == (4, 5) and not torch.equal(c1, c2)
    torch.testing.assert_close(loss, m.free_energy(v1).mean() - m.free_energy(c2).mean())
    # the chains moved by exactly k Gibbs sweeps from where they were
    torch.testing.assert_close(c2, twin.gibbs(c1, 2, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(twin.persistent_negatives(v1, k=2, generator=torch.Generator().manual_seed(1)), c2)


@pytest.mark.parametrize("kind", ["rsm", "rbm"])
def test_pcd_chains_are_saved_and_restored_by_state_dict(kind):
    m = _rsm(5, 3, seed=1) if kind == "rsm" else _rbm(5, 3, seed=1)
    data = _docs(4, 5, seed=2) if kind == "rsm" else _bits(4, 5, seed=2)
    assert "persistent_chains" not in m.state_dict()  # no chains yet
    m.cd_loss(data, persistent=True, generator=torch.Generator().manual_seed(0))
    sd = m.state_dict()
    assert torch.equal(sd["persistent_chains"], m.persistent_chains)
    # a fresh model (no chains) loads them, strictly, and continues exactly like the original
    fresh = ReplicatedSoftmax(5, 3, dtype=f64) if kind == "rsm" else BernoulliRBM(5, 3, dtype=f64)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.persistent_chains, m.persistent_chains)
    l1 = m.cd_loss(data[:3], k=2, persistent=True, generator=torch.Generator().manual_seed(5))
    l2 = fresh.cd_loss(data[:3], k=2, persistent=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(l1, l2) and torch.equal(fresh.persistent_chains, m.persistent_chains)
    # chains of another number M load too
    fresh.load_state_dict({**sd, "persistent_chains": sd["persistent_chains"][:2]})
    assert fresh.persistent_chains.shape[0] == 2
    # a state dict without chains (older checkpoint) loads strictly and restarts the chains
    fresh.load_state_dict({k: t for k, t in sd.items() if k != "persistent_chains"})
    assert fresh.persistent_chains is None
    # chains of the wrong width are refused by load_state_dict
    with pytest.raises(RuntimeError, match=r"persistent_chains: expected a floating-point tensor of shape \(M, 5\), got \(2, 7\)"):
        fresh.load_state_dict({**sd, "persistent_chains": torch.zeros(2, 7, dtype=f64)})


def test_cd_loss_is_reproducible_and_uses_negatives_exactly():
    m = _rbm(5, 3)
    v0 = _bits(6, 5)
    l1 = m.cd_loss(v0, k=3, generator=torch.Generator().manual_seed(7))
    l2 = m.cd_loss(v0, k=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(l1, l2)
    vk = m.gibbs(v0, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(m.cd_loss(v0, negatives=vk), l1)
    assert torch.equal(m.gibbs(v0, 0), v0)


def test_hidden_sampling_goes_through_the_bernoulli_solver():
    """One sampler: sample_hidden draws exactly what the bernoulli solver draws from u."""
    m = _rsm(5, 4, seed=2)
    v = _docs(3, 5)
    h = m.sample_hidden(v, generator=torch.Generator().manual_seed(3))
    u = v.sum(-1, keepdim=True) * m.hidden_bias + v @ m.weight
    ref = sg.get_solver("bernoulli").sample(u.detach(), 1, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(h, ref)
    w = m.sample_visible(h, v.sum(-1), generator=torch.Generator().manual_seed(4))
    assert torch.equal(w.sum(-1), v.sum(-1)) and (w >= 0).all()
    r = _rbm(4, 3)
    vb = r.sample_visible(torch.tensor([[1.0, 0.0, 1.0]], dtype=f64), generator=torch.Generator().manual_seed(0))
    assert vb.shape == (1, 4) and bool(((vb == 0) | (vb == 1)).all())


# ---------------------------------------------------------------------------- bad inputs
def test_bad_documents_raise_named_errors():
    m = _rsm(4, 2)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DomainError, match=r"v0: expected documents of length D = sum of counts >= 1, got a document of length 0 at batch index \(1,\)"):
        m.cd_loss(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0]], dtype=f64), generator=g)
    with pytest.raises(DomainError, match="v: expected non-negative word counts, got a minimum of -1"):
        m.free_energy(torch.tensor([[1.0, -1, 2, 0]], dtype=f64))
    with pytest.raises(DomainError, match=r"v: expected integer word counts, got non-integer values e\.g\. \[0\.5\]"):
        m.free_energy(torch.tensor([[1.0, 0.5, 2, 0]], dtype=f64))
    with pytest.raises(ShapeError, match=r"v: expected shape \(\*batch, 4\) \(num_visible = 4\), got \(2, 5\)"):
        m.free_energy(torch.ones(2, 5, dtype=f64))
    with pytest.raises(ShapeError, match=r"v0: expected shape \(\*batch, 4\)"):
        m.cd_loss(torch.ones(4, dtype=f64).sum(), generator=g)
    with pytest.raises(ShapeError, match=r"negatives: expected shape \(\*batch, 4\)"):
        m.cd_loss(torch.ones(2, 4, dtype=f64), negatives=torch.ones(2, 3, dtype=f64))
    with pytest.raises(DomainError, match="v: expected finite values"):
        m.free_energy(torch.tensor([[1.0, float("nan"), 0, 0]], dtype=f64))
    with pytest.raises(DTypeError, match=r"v: expected dtype torch.float64 \(the model's parameters\), got torch.float32"):
        m.free_energy(torch.ones(1, 4))
    with pytest.raises(DTypeError, match="v: expected a torch.Tensor of shape"):
        m.free_energy([[1, 2, 3, 4]])
    with pytest.raises(ShapeError, match=r"v0: expected at least one data vector"):
        m.cd_loss(torch.ones(0, 4, dtype=f64))


def test_bad_rbm_inputs_raise_named_errors():
    r = _rbm(3, 2)
    with pytest.raises(DomainError, match=r"v: expected values in \[0, 1\], got min 0 and max 2"):
        r.free_energy(torch.tensor([[0.0, 2.0, 1.0]], dtype=f64))
    with pytest.raises(DomainError, match=r"v: expected binary values in \{0, 1\} for an exact likelihood"):
        r.log_prob(torch.tensor([[0.0, 0.5, 1.0]], dtype=f64))
    # fractional values are allowed where they mean probabilities (positive phase)
    assert torch.isfinite(r.free_energy(torch.tensor([[0.0, 0.5, 1.0]], dtype=f64))).all()
    with pytest.raises(DTypeError, match="log_z: expected a tensor of dtype torch.float64"):
        r.log_prob(torch.ones(1, 3, dtype=f64), log_z=1.0)
    with pytest.raises(ShapeError, match=r"log_z: expected shape \(\) \(a 0-dim tensor\), got \(1,\)"):
        r.log_prob(torch.ones(1, 3, dtype=f64), log_z=torch.zeros(1, dtype=f64))
    with pytest.raises(DTypeError, match=r"h: expected dtype torch.float64"):
        r.sample_visible(torch.ones(1, 2))
    with pytest.raises(DomainError, match=r"h: expected hidden states in \{0, 1\}"):
        r.sample_visible(torch.full((1, 2), 0.5, dtype=f64))
    with pytest.raises(ShapeError, match=r"h: expected shape \(\*batch, 2\) \(num_hidden\), got \(1, 3\)"):
        r.sample_visible(torch.ones(1, 3, dtype=f64))


def test_bad_options_raise_named_errors():
    m = _rsm(4, 2)
    v = torch.tensor([[1.0, 2, 0, 0]], dtype=f64)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DomainError, match="k: expected an integer >= 1, got 0"):
        m.cd_loss(v, k=0, generator=g)
    with pytest.raises(DTypeError, match="k: expected an integer, got float"):
        m.gibbs(v, k=1.5)
    with pytest.raises(DomainError, match=r"reduction: expected one of \('mean', 'sum'\), got 'none'"):
        m.cd_loss(v, reduction="none")
    with pytest.raises(DomainError, match="negatives: given together with persistent=True"):
        m.cd_loss(v, persistent=True, negatives=v)
    with pytest.raises(DTypeError, match="persistent: expected a bool, got Tensor"):
        m.cd_loss(v, persistent=v)
    with pytest.raises(DomainError, match="k: expected an integer >= 1, got 0"):
        m.persistent_negatives(v, k=0)
    with pytest.raises(ShapeError, match=r"v0: expected at least one data vector"):
        m.persistent_negatives(torch.ones(0, 4, dtype=f64))
    with pytest.raises(DomainError, match=r"v0: expected documents of length D = sum of counts >= 1"):
        m.persistent_negatives(torch.zeros(1, 4, dtype=f64))
    with pytest.raises(DTypeError, match="generator: expected a torch.Generator or None, got int"):
        m.gibbs(v, 1, generator=0)
    with pytest.raises(DomainError, match=r"lengths: expected document lengths >= 1, got a minimum of 0"):
        m.log_partition(torch.tensor([3, 0]))
    with pytest.raises(DomainError, match="lengths: expected integer lengths, got non-integer values"):
        m.log_partition(torch.tensor([2.5], dtype=f64))
    with pytest.raises(DTypeError, match="lengths: expected an integer or a tensor of integers, got float"):
        m.log_partition(2.0)
    with pytest.raises(DomainError, match=r"log_partition: exact enumeration needs 2\^2 hidden states .* use ais_log_partition"):
        m.log_partition(3, max_states=2)
    with pytest.raises(ShapeError, match=r"log_z: expected shape \(1,\) \(one value per document\), got \(\)"):
        m.log_prob(v, log_z=torch.tensor(0.0, dtype=f64))
    with pytest.raises(ShapeError, match=r"lengths: expected shape \(2,\) \(the batch shape of h\), got \(1,\)"):
        m.sample_visible(torch.ones(2, 2, dtype=f64), torch.tensor([3]))
    with pytest.raises(DomainError, match="num_betas: expected an integer >= 2, got 1"):
        m.ais_log_partition(3, path="temperature", num_betas=1)
    with pytest.raises(DomainError, match="betas: expected a non-decreasing schedule from exactly 0 to exactly 1"):
        m.ais_log_partition(3, path="temperature", betas=torch.tensor([0.0, 0.9], dtype=f64))
    with pytest.raises(ShapeError, match=r"base_visible_bias: expected shape \(4,\) \(num_visible,\), got \(3,\)"):
        m.ais_log_partition(3, path="temperature", base_visible_bias=torch.zeros(3, dtype=f64))
    with pytest.raises(DomainError, match="num_chains: expected an integer >= 2, got 1"):
        m.ais_log_partition(3, num_chains=1)
    with pytest.raises(DomainError, match="path: expected 'length' or 'temperature', got 'beta'"):
        m.ais_log_partition(3, path="beta")
    with pytest.raises(DomainError, match="num_betas: used by path='temperature' only, got it with path='length'"):
        m.ais_log_partition(3, num_betas=100)
    with pytest.raises(DomainError, match="steps_per_word: used by path='length' only"):
        m.ais_log_partition(3, path="temperature", steps_per_word=2)
    with pytest.raises(DomainError, match="steps_per_word: expected an integer >= 1, got 0"):
        m.ais_log_partition(3, steps_per_word=0)
    with pytest.raises(DomainError, match=r"lengths: expected document lengths >= 1, got a minimum of 0"):
        m.ais_log_partition(torch.tensor([0, 2]))
    with pytest.raises(DomainError, match=r"log_partition: exact enumeration needs 2\^3 states"):
        BernoulliRBM(3, 5).log_partition(max_states=4)


def test_bad_constructor_arguments():
    with pytest.raises(DomainError, match="num_visible: expected an integer >= 1, got 0"):
        ReplicatedSoftmax(0, 3)
    with pytest.raises(DTypeError, match="num_hidden: expected an integer, got float"):
        BernoulliRBM(3, 2.0)
    with pytest.raises(DomainError, match=r"init_std: expected a value >= 0\.0, got -1\.0"):
        BernoulliRBM(3, 2, init_std=-1.0)
    with pytest.raises(DomainError, match=r"init_std: expected a finite number, got nan"):
        BernoulliRBM(3, 2, init_std=float("nan"))
    with pytest.raises(DTypeError, match="init_std: expected a float, got str"):
        BernoulliRBM(3, 2, init_std="0.1")
    with pytest.raises(DTypeError, match="init_std: expected a float, got Tensor"):
        ReplicatedSoftmax(3, 2, init_std=torch.tensor(0.1))
    with pytest.raises(DTypeError, match=r"dtype: expected a floating-point torch.dtype \(e.g. torch.float32\) or None, got str"):
        ReplicatedSoftmax(3, 2, dtype="float64")
    with pytest.raises(DTypeError, match="dtype: expected a floating-point torch.dtype .* got type"):
        BernoulliRBM(3, 2, dtype=float)
    with pytest.raises(DTypeError, match="dtype: expected a floating-point dtype, got torch.int64"):
        ReplicatedSoftmax(3, 2, dtype=torch.long)
    with pytest.raises(DTypeError, match="scale_hidden_bias: expected a bool, got str"):
        ReplicatedSoftmax(3, 2, scale_hidden_bias="yes")


def test_ais_betas_schedule():
    b = ais_betas(1000)
    assert b.shape == (1000,) and float(b[0]) == 0.0 and float(b[-1]) == 1.0
    assert bool((b[1:] > b[:-1]).all())
    assert int(((b > 0.9)).sum()) > 600  # most steps near β = 1
    for n in (2, 3, 4, 7):
        s = ais_betas(n)
        assert s.shape == (n,) and float(s[0]) == 0.0 and float(s[-1]) == 1.0 and bool((s[1:] > s[:-1]).all())
    assert isinstance(_rsm().ais_log_partition(2, path="temperature", num_chains=2, num_betas=3, generator=torch.Generator()), AISEstimate)
    assert isinstance(_rsm().ais_log_partition(2, num_chains=2, generator=torch.Generator()), AISEstimate)


# ---------------------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_and_keeps_device():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    m = ReplicatedSoftmax(50, 6, generator=g, device=dev)
    v = torch.randint(0, 3, (8, 50), device=dev, generator=g).float()
    v[:, 0] += 1
    loss = m.cd_loss(v, k=2, generator=g)
    loss.backward()
    assert m.weight.grad.device.type == "cuda"
    vk = m.gibbs(v, 3, generator=g)
    assert vk.device.type == "cuda" and torch.equal(vk.sum(-1), v.sum(-1))
    assert m.log_partition(v.sum(-1)).device.type == "cuda"
    est = m.ais_log_partition(v.sum(-1)[:2], path="temperature", num_chains=10, num_betas=20, generator=g)
    assert est.log_z.device.type == "cuda"
    est = m.ais_log_partition(v.sum(-1)[:2], num_chains=10, steps_per_word=2, generator=g)
    assert est.log_z.device.type == "cuda" and est.log_z.shape == (2,)
    est = BernoulliRBM(10, 4, generator=g, device=dev).ais_log_partition(num_chains=10, num_betas=20, generator=g)
    assert est.log_z.device.type == "cuda"
    m.cd_loss(v, persistent=True, generator=g)
    assert m.persistent_chains.device.type == "cuda"
    r = BernoulliRBM(10, 4, generator=g, device=dev)
    assert r.gibbs(torch.ones(3, 10, device=dev), 2, generator=g).device.type == "cuda"
    assert r.log_partition().device.type == "cuda"
    with pytest.raises(DeviceError, match="v is on device cpu but the model's parameters are on cuda"):
        m.free_energy(v.cpu())
    with pytest.raises(DeviceError, match="generator is a cpu generator"):
        m.gibbs(v, 1, generator=torch.Generator())
    # the CPU and CUDA free energies agree
    mc = ReplicatedSoftmax(50, 6)
    mc.load_state_dict({k: t.cpu() for k, t in m.state_dict().items()})
    torch.testing.assert_close(mc.free_energy(v.cpu()), m.free_energy(v).cpu(), atol=1e-4, rtol=1e-5)


def test_device_mismatch_for_lengths_is_named():
    m = _rsm(4, 2)
    # a "meta" tensor is on another device without needing CUDA
    with pytest.raises(DeviceError, match="lengths is on device meta but the model is on cpu"):
        m.log_partition(torch.ones(2, dtype=torch.long, device="meta"))
    with pytest.raises(DeviceError, match="v is on device meta but the model's parameters are on cpu"):
        m.free_energy(torch.ones(2, 4, dtype=f64, device="meta"))


def test_docstring_examples_run():
    import doctest

    import importlib

    attempted = 0
    for name in ("rbm", "_rbm_base", "_rbm_ais", "_rbm_bernoulli", "_rbm_softmax"):
        result = doctest.testmod(importlib.import_module(f"structgrad.{name}"), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name
        attempted += result.attempted
    assert attempted >= 10


def test_rbm_module_layout():
    """structgrad.rbm is split along its concepts; the public names stay where they were."""
    import pathlib

    import structgrad.rbm as rbm

    assert set(rbm.__all__) == {"AISEstimate", "BernoulliRBM", "ReplicatedSoftmax", "ais_betas"}
    assert sg.BernoulliRBM is rbm.BernoulliRBM and sg.ReplicatedSoftmax is rbm.ReplicatedSoftmax
    root = pathlib.Path(rbm.__file__).parent
    for f in ["rbm.py", *(p.name for p in root.glob("_rbm_*.py"))]:
        assert len((root / f).read_text().splitlines()) <= 600, f


def test_leading_batch_dimensions():
    m = _rsm(5, 3, seed=4)
    v = _docs(6, 5, seed=5).reshape(2, 3, 5)
    g = torch.Generator().manual_seed(0)
    vk = m.gibbs(v, 2, generator=g)
    assert vk.shape == (2, 3, 5) and torch.equal(vk.sum(-1), v.sum(-1))
    assert m.sample_hidden(v, generator=g).shape == (2, 3, 3)
    assert m.hidden_marginals(v).shape == (2, 3, 3)
    assert m.log_prob(v).shape == (2, 3)
    flat = m.cd_loss(v.reshape(6, 5), negatives=vk.reshape(6, 5))
    torch.testing.assert_close(m.cd_loss(v, negatives=vk), flat)
    m.cd_loss(v, persistent=True, generator=g)
    assert m.persistent_chains.shape == (6, 5)
    assert m.persistent_negatives(v, generator=g).shape == (2, 3, 5)
    r = _rbm(4, 2)
    b = _bits(6, 4).reshape(3, 2, 4)
    assert r.gibbs(b, 1, generator=g).shape == (3, 2, 4) and r.log_prob(b).shape == (3, 2)


@pytest.mark.parametrize("kind", ["rsm", "rbm"])
@pytest.mark.parametrize("param,value", [("weight", float("nan")), ("visible_bias", float("inf")), ("hidden_bias", float("nan"))])
def test_non_finite_parameters_refused_by_samplers(kind, param, value):
    """A NaN weight used to make ReplicatedSoftmax.gibbs return empty documents; every
    sampling entry point now names the parameter."""
    m = _rsm(5, 3) if kind == "rsm" else _rbm(5, 3)
    v = _docs(3, 5) if kind == "rsm" else _bits(3, 5)
    with torch.no_grad():
        getattr(m, param)[1] = value
    g = torch.Generator().manual_seed(0)
    what = "NaN" if value != value else "inf"
    n_bad = 3 if param == "weight" else 1  # weight[1] is a row of num_hidden = 3 entries
    msg = rf"{param}: expected finite parameters, got {n_bad} {what} \(first at index \(1,"
    h = torch.zeros(3, 3, dtype=f64)
    calls = [
        lambda: m.gibbs(v, 1, generator=g),
        lambda: m.cd_loss(v, 1, generator=g),
        lambda: m.cd_loss(v, 1, persistent=True, generator=g),
        lambda: m.persistent_negatives(v, generator=g),
        lambda: m.sample_hidden(v, generator=g),
        lambda: m.sample_visible(h, torch.tensor([2, 3, 4]), generator=g) if kind == "rsm" else m.sample_visible(h, generator=g),
        lambda: m.ais_log_partition(torch.tensor([3]), num_chains=2, generator=g) if kind == "rsm"
        else m.ais_log_partition(num_chains=2, num_betas=3, generator=g),
    ]
    for call in calls:
        with pytest.raises(DomainError, match=msg):
            call()
    # k = 0 samples nothing and given negatives need no sampling: NaN propagates instead
    assert torch.equal(m.gibbs(v, 0), v)
    assert torch.isnan(m.free_energy(v)).any() or torch.isinf(m.free_energy(v)).any()
