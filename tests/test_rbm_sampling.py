"""Sampling side of the RBMs: Gibbs chains reach the exact distribution, CD-k tends to the
exact gradient as k grows, AIS estimates log Z, and CD/PCD training improves the exact
likelihood.  Every random draw uses a fixed-seed torch.Generator."""

from __future__ import annotations

import copy

import pytest
import torch

from structgrad.rbm import BernoulliRBM, ReplicatedSoftmax

import _rbm_oracle as O

f64 = torch.float64


def _rsm(K, F_, seed, scale):
    g = torch.Generator().manual_seed(seed)
    m = ReplicatedSoftmax(K, F_, generator=g, dtype=f64)
    O.randomize(m, g, scale)
    return m


def _rbm(K, F_, seed, scale):
    g = torch.Generator().manual_seed(seed)
    m = BernoulliRBM(K, F_, generator=g, dtype=f64)
    O.randomize(m, g, scale)
    return m


def _float32_copy(model):
    """(float32 model, float64 model) with the same (float32-representable) parameter values."""
    m32 = copy.deepcopy(model).float()
    return m32, copy.deepcopy(m32).double()


# ---------------------------------------------------------------------------- Gibbs reaches p(v)
TV_BOUND = 0.03  # with 20000 chains the sampling noise alone gives TV ≈ 0.01 on ~15 states


def test_rsm_gibbs_reaches_exact_distribution():
    m = _rsm(3, 3, seed=1, scale=0.8)
    D, N = 4, 20000
    start = torch.zeros(N, 3, dtype=f64)
    start[:, 0] = D  # every chain starts with all words on word 0
    g = torch.Generator().manual_seed(123)
    vk = m.gibbs(start, 30, generator=g)
    assert torch.equal(vk.sum(-1), torch.full((N,), float(D), dtype=f64))
    states, probs = O.rsm_distribution(m, D)
    tv = O.total_variation(vk, states, probs)
    assert tv < TV_BOUND, f"TV {tv:.4f}"
    # and the start is far from it (the test can fail)
    assert O.total_variation(start, states, probs) > 0.5


def test_rbm_gibbs_reaches_exact_distribution():
    m = _rbm(4, 3, seed=2, scale=0.8)
    N = 20000
    g = torch.Generator().manual_seed(7)
    vk = m.gibbs(torch.ones(N, 4, dtype=f64), 30, generator=g)
    states, probs = O.rbm_distribution(m)
    tv = O.total_variation(vk, states, probs)
    assert tv < TV_BOUND, f"TV {tv:.4f}"


def test_rsm_gibbs_with_mixed_lengths_in_one_batch():
    """Documents of different lengths in one batch each sample from their own p_D."""
    m = _rsm(3, 2, seed=3, scale=0.8)
    N = 12000
    start = torch.zeros(2 * N, 3, dtype=f64)
    start[:N, 0], start[N:, 1] = 2, 5
    vk = m.gibbs(start, 25, generator=torch.Generator().manual_seed(11))
    for sl, D in ((slice(0, N), 2), (slice(N, 2 * N), 5)):
        states, probs = O.rsm_distribution(m, D)
        assert O.total_variation(vk[sl], states, probs) < TV_BOUND


# ---------------------------------------------------------------------------- CD-k -> exact gradient
def _param_grads(model, v: torch.Tensor) -> torch.Tensor:
    """(S, P) the gradient of F(v_s) in all parameters, one row per state."""
    rows = []
    for s in range(v.shape[0]):
        model.zero_grad()
        model.free_energy(v[s : s + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def _transition(model, states: torch.Tensor, rsm: bool) -> torch.Tensor:
    """Exact Gibbs kernel T[v, v'] = Σ_h p(h | v) p(v' | h) over the enumerated states."""
    hs = O.binary_vectors(model.num_hidden)
    with torch.no_grad():
        ph = model.hidden_marginals(states)  # (S, F)
        p_h = (ph.unsqueeze(1) ** hs * (1 - ph.unsqueeze(1)) ** (1 - hs)).prod(-1)  # (S, H)
        logits = model.visible_bias + hs @ model.weight.T  # (H, K)
        if rsm:
            logp = torch.log_softmax(logits, -1)
            p_v = torch.exp(states @ logp.T + O.log_multinomial(states).unsqueeze(1)).T  # (H, S)
        else:
            q = torch.sigmoid(logits)
            p_v = (q.unsqueeze(1) ** states * (1 - q.unsqueeze(1)) ** (1 - states)).prod(-1)  # (H, S)
    return p_h @ p_v


@pytest.mark.parametrize("kind", ["rsm", "rbm"])
def test_cd_k_gradient_approaches_exact_gradient(kind):
    if kind == "rsm":
        m = _rsm(3, 2, seed=5, scale=1.5)
        D = 3
        states, p = O.rsm_distribution(m, D)
    else:
        m = _rbm(3, 2, seed=5, scale=1.5)
        states, p = O.rbm_distribution(m)
    T = _transition(m, states, kind == "rsm")
    torch.testing.assert_close(T.sum(1), torch.ones(len(states), dtype=f64))
    torch.testing.assert_close(p @ T, p)  # p is stationary: the kernel is right
    G = _param_grads(m, states)  # (S, P)
    i0 = 0
    v0 = states[i0 : i0 + 1]
    # exact NLL gradient: ∇F(v0) + ∇log Z = ∇F(v0) − E_p[∇F]
    exact = G[i0] - p @ G
    row = torch.zeros(len(states), dtype=f64)
    row[i0] = 1.0
    errors = {}
    cd_exact = {}
    for k in range(1, 61):
        row = row @ T
        cd_exact[k] = G[i0] - row @ G  # the CD-k gradient in expectation over the chain
        errors[k] = float((cd_exact[k] - exact).norm())
    assert errors[1] > 1e-2  # CD-1 is biased here
    assert errors[5] < errors[1] and errors[20] < errors[5]
    assert errors[60] < 1e-8

    # the sampled cd_loss agrees with the expected CD-k gradient (Monte Carlo, 5 sd)
    N = 6000
    data = v0.expand(N, -1).clone()
    mc = {}
    for k in (1, 30):
        m.zero_grad()
        m.cd_loss(data, k=k, generator=torch.Generator().manual_seed(k)).backward()
        g = torch.cat([q.grad.flatten() for q in m.parameters()])
        row_k = torch.zeros(len(states), dtype=f64)
        row_k[i0] = 1.0
        row_k = row_k @ torch.linalg.matrix_power(T, k)
        sd = ((row_k @ (G - row_k @ G) ** 2) / N).sqrt()
        assert bool(((g - cd_exact[k]).abs() <= 5 * sd + 1e-9).all()), (k, g, cd_exact[k], sd)
        mc[k] = float((g - exact).norm())
    assert mc[30] < mc[1]


# ---------------------------------------------------------------------------- AIS
@pytest.mark.parametrize("scale_hidden_bias", [True, False])
def test_rsm_ais_length_path_within_001_nats_of_exact(scale_hidden_bias):
    g = torch.Generator().manual_seed(7)
    m = ReplicatedSoftmax(6, 5, scale_hidden_bias=scale_hidden_bias, generator=g, dtype=f64)
    O.randomize(m, g, 0.3)
    lengths = torch.tensor([[1, 3], [8, 3]])
    exact = m.log_partition(lengths).detach()
    est = m.ais_log_partition(lengths, num_chains=2000, steps_per_word=10, generator=torch.Generator().manual_seed(0))
    assert est.log_z.shape == (2, 2) and est.stderr.shape == (2, 2) and est.log_weights.shape == (2000, 2, 2)
    err = (est.log_z - exact).abs()
    assert bool((err < 0.01).all()), (est.log_z, exact, est.stderr)
    assert bool((est.stderr < 0.01).all()) and bool((est.stderr > 0).all())
    assert torch.equal(est.log_z[0, 1], est.log_z[1, 1])  # one run serves every length
    again = m.ais_log_partition(lengths, num_chains=2000, steps_per_word=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(est.log_z, again.log_z)  # reproducible with the same seed
    # a coarser grid is visibly noisier (the test can fail)
    coarse = m.ais_log_partition(8, num_chains=2000, steps_per_word=1, generator=torch.Generator().manual_seed(0))
    assert float(coarse.stderr) > 1.5 * float(est.stderr[1, 0])


def test_rsm_ais_temperature_path_within_001_nats_of_exact():
    m = _rsm(6, 5, seed=7, scale=0.3)
    lengths = torch.tensor([[1, 3], [8, 3]])
    exact = m.log_partition(lengths).detach()
    kw = dict(path="temperature", num_chains=2000, num_betas=500)
    est = m.ais_log_partition(lengths, **kw, generator=torch.Generator().manual_seed(0))
    assert est.log_z.shape == (2, 2) and est.stderr.shape == (2, 2) and est.log_weights.shape == (2000, 2, 2)
    err = (est.log_z - exact).abs()
    assert bool((err < 0.01).all()), (est.log_z, exact, est.stderr)
    assert bool((est.stderr < 0.01).all()) and bool((est.stderr > 0).all())
    # one run per distinct length, in sorted order: the distinct lengths alone, in any order and
    # with the same seed, reproduce the estimates (a run per entry would give [0, 1] ≠ [1, 1])
    again = m.ais_log_partition(torch.tensor([8, 3, 1]), **kw, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.log_z, torch.stack([est.log_z[1, 0], est.log_z[0, 1], est.log_z[0, 0]]))
    assert torch.equal(again.log_z[1], est.log_z[1, 1])
    # a poor schedule is visibly worse than a good one (the test can fail)
    crude = m.ais_log_partition(8, path="temperature", num_chains=2000, betas=torch.tensor([0.0, 1.0], dtype=f64),
                                generator=torch.Generator().manual_seed(0))
    assert float((crude.log_z - exact[1, 0]).abs()) > float(err[1, 0])


def test_rsm_length_path_beats_temperature_path_on_a_peaked_model():
    """Topics separate in proportion to D: with large weights, the temperature path's chains
    stay in the wrong mode for a long document while the length path still finds it."""
    g = torch.Generator().manual_seed(3)
    m = ReplicatedSoftmax(8, 4, generator=g, dtype=f64)
    O.randomize(m, g, 0.3)
    with torch.no_grad():
        m.weight.mul_(3.0)  # sharp topics
    D = 60
    exact = float(m.log_partition(D).detach())
    ln = m.ais_log_partition(D, num_chains=200, steps_per_word=2, generator=torch.Generator().manual_seed(0))
    tp = m.ais_log_partition(D, path="temperature", num_chains=200, num_betas=200, generator=torch.Generator().manual_seed(0))
    err_ln, err_tp = abs(float(ln.log_z) - exact), abs(float(tp.log_z) - exact)
    assert err_ln < 0.1, (float(ln.log_z), exact)
    assert err_tp > 0.5 and err_tp > 5 * err_ln, (float(tp.log_z), float(ln.log_z), exact)


def test_rbm_ais_within_001_nats_of_exact():
    """A float32 model (the float64 one gives the same estimate: test_ais_runs_in_float64_...),
    against the exact log Z of its parameters enumerated in float64."""
    m, m64 = _float32_copy(_rbm(10, 8, seed=8, scale=0.6))
    exact = float(m64.log_partition().detach())
    g = torch.Generator().manual_seed(1)
    est = m.ais_log_partition(num_chains=3000, num_betas=500, generator=g)
    assert est.log_z.shape == () and est.log_weights.shape == (3000,) and est.log_z.dtype == torch.float32
    assert abs(float(est.log_z) - exact) < 0.01, (est.log_z, exact, est.stderr)
    # a data-like base model works as well
    base = torch.logit(torch.sigmoid(m.visible_bias.detach()).clamp(0.05, 0.95))
    est2 = m.ais_log_partition(num_chains=3000, num_betas=500, base_visible_bias=base, generator=g)
    assert abs(float(est2.log_z) - exact) < 0.01, (est2.log_z, exact, est2.stderr)


@pytest.mark.parametrize("path", ["length", "temperature", "rbm"])
def test_ais_runs_in_float64_whatever_the_model_dtype(path):
    """A float32 model gets the float64 model's AIS estimate (same parameter values, same seed),
    rounded once: the chains and the log-weight increments are not computed in float32."""
    if path == "rbm":
        m32, m64 = _float32_copy(_rbm(7, 5, seed=4, scale=2.0))
        kw = dict(num_chains=40, num_betas=60)
    else:
        g = torch.Generator().manual_seed(4)
        m = ReplicatedSoftmax(6, 4, generator=g, dtype=f64)
        O.randomize(m, g, 0.5)
        with torch.no_grad():
            m.hidden_bias.mul_(20.0)  # large inputs D·a: the increments are differences of terms ~1e3
        m32, m64 = _float32_copy(m)
        lengths = torch.tensor([[40, 3], [7, 40]])
        kw = dict(lengths=lengths, num_chains=40, steps_per_word=1) if path == "length" else dict(
            lengths=lengths, path="temperature", num_chains=40, num_betas=60)
    e32 = m32.ais_log_partition(**kw, generator=torch.Generator().manual_seed(0))
    e64 = m64.ais_log_partition(**kw, generator=torch.Generator().manual_seed(0))
    assert e32.log_z.dtype == e32.stderr.dtype == e32.log_weights.dtype == torch.float32
    assert torch.equal(e32.log_z, e64.log_z.float())
    assert torch.equal(e32.stderr, e64.stderr.float())
    assert torch.equal(e32.log_weights, e64.log_weights.float())


def test_float32_rsm_ais_within_001_nats_of_exact():
    """A float32 RSM (length path) against the exact log Z of its own parameters (enumerated in
    float64); the float32 Bernoulli RBM (temperature path) is test_rbm_ais_within_001_nats_of_exact."""
    g = torch.Generator().manual_seed(7)
    m = ReplicatedSoftmax(6, 5, generator=g, dtype=f64)
    O.randomize(m, g, 0.3)
    m32, m64 = _float32_copy(m)
    lengths = torch.tensor([3, 8, 30])
    exact = m64.log_partition(lengths).detach()
    est = m32.ais_log_partition(lengths, num_chains=2000, steps_per_word=10, generator=torch.Generator().manual_seed(0))
    assert est.log_z.dtype == torch.float32
    assert bool(((est.log_z.double() - exact).abs() < 0.01).all()), (est.log_z, exact, est.stderr)


# ---------------------------------------------------------------------------- PCD negatives under p_D
def test_rsm_pcd_negatives_follow_each_documents_own_length():
    """PCD with batches whose lengths change from call to call: after a few calls the negatives of
    the documents of length D are distributed as p_D (only a chain's hidden layer carries over
    from one length to the next).  Chains that kept the first batch's lengths would not even give documents of
    the right length."""
    m = _rsm(3, 2, seed=3, scale=0.8)
    N = 6000
    short, long_ = torch.zeros(N, 3, dtype=f64), torch.zeros(N, 3, dtype=f64)
    short[:, 0], long_[:, 1] = 2, 5
    g = torch.Generator().manual_seed(11)
    for call in range(6):  # the same 2N chains; each one alternates between D = 5 and D = 2
        batch = torch.cat([short, long_]) if call % 2 else torch.cat([long_, short])
        m.cd_loss(batch, k=4, persistent=True, generator=g)
        neg = m.persistent_chains  # a full batch uses every chain, in order: these are the negatives
        assert neg.shape == batch.shape and torch.equal(neg.sum(-1), batch.sum(-1))
    for sl, D in ((slice(0, N), 2), (slice(N, 2 * N), 5)):
        states, probs = O.rsm_distribution(m, D)
        assert O.total_variation(neg[sl], states, probs) < TV_BOUND
        assert O.total_variation(batch[sl], states, probs) > 0.5  # the data are far from p_D


# ---------------------------------------------------------------------------- training improves the likelihood
def _topic_docs(N, K, D, generator):
    """Two topics over a vocabulary of K words (first half / second half), D words each."""
    half = K // 2
    topic = torch.randint(0, 2, (N,), generator=generator)
    probs = torch.full((N, K), 0.02 / half, dtype=f64)
    probs[topic == 0, :half] += 0.98 / half
    probs[topic == 1, half:] += 0.98 / half
    idx = torch.multinomial(probs, D, replacement=True, generator=generator)
    return torch.zeros(N, K, dtype=f64).scatter_add_(1, idx, torch.ones(N, D, dtype=f64))


@pytest.mark.parametrize("persistent", [False, True])
def test_rsm_training_improves_exact_log_likelihood(persistent):
    g = torch.Generator().manual_seed(0)
    K, D = 8, 10
    train, test = _topic_docs(200, K, D, g), _topic_docs(100, K, D, g)
    m = ReplicatedSoftmax(K, 2, generator=g, dtype=f64)
    with torch.no_grad():
        before = float(m.log_prob(test).mean())
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for epoch in range(15):
        for i in range(0, 200, 20):
            opt.zero_grad()
            m.cd_loss(train[i : i + 20], k=1, persistent=persistent, generator=g).backward()
            opt.step()
    with torch.no_grad():
        after = float(m.log_prob(test).mean())
    # uniform: −D log K = −20.8 nats; the two-topic truth is about −14.5
    assert after > before + 3.0, (before, after)


def test_rbm_training_improves_exact_log_likelihood():
    g = torch.Generator().manual_seed(0)
    K = 8
    proto = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4], dtype=f64)
    which = torch.randint(0, 2, (300,), generator=g)
    flip = torch.rand(300, K, generator=g, dtype=f64) < 0.05
    data = (proto[which] + flip.to(f64)) % 2
    m = BernoulliRBM(K, 3, generator=g, dtype=f64)
    with torch.no_grad():
        before = float(m.log_prob(data).mean())
    opt = torch.optim.SGD(m.parameters(), lr=0.3)
    for epoch in range(20):
        for i in range(0, 300, 30):
            opt.zero_grad()
            m.cd_loss(data[i : i + 30], k=1, generator=g).backward()
            opt.step()
    with torch.no_grad():
        after = float(m.log_prob(data).mean())
    assert after > before + 2.5, (before, after)
