"""``structgrad.nn.LinearChainCRF``: against enumeration, gradients, lengths, pytorch-crf parity, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.errors import DeviceError, DomainError, DTypeError, ShapeError

F64 = torch.float64
NEG = float("-inf")


# ----------------------------------------------------------------------------- oracle
def make_crf(C, *, seed=0, start_end=True, constraints=None, scale=1.0, validate=True):
    crf = sg.nn.LinearChainCRF(C, start_end=start_end, constraints=constraints, validate=validate).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * scale)
    return crf


def seq_score(crf, em, y):
    """s(y) for one sequence em (L, C), y a tuple of length L, by the definition."""
    if len(y) == 0:
        return torch.zeros((), dtype=F64)
    tr = crf.transitions.detach().clone()
    if crf.transition_mask is not None:
        tr[~crf.transition_mask] = NEG
    s = sum(em[t, c] for t, c in enumerate(y)) + sum(tr[a, b] for a, b in zip(y, y[1:]))
    if crf.start is not None:
        s = s + crf.start.detach()[y[0]] + crf.end.detach()[y[-1]]
    if crf.start_mask is not None and not crf.start_mask[y[0]]:
        s = s + NEG
    if crf.end_mask is not None and not crf.end_mask[y[-1]]:
        s = s + NEG
    return torch.as_tensor(s, dtype=F64)


def brute(crf, em, L):
    """(A, node marginals (T, C), best score, all (y, score)) by enumeration of length-L sequences."""
    T, C = em.shape
    seqs = list(itertools.product(range(C), repeat=L))
    scores = torch.stack([seq_score(crf, em.detach(), y) for y in seqs])
    A = torch.logsumexp(scores, 0)
    mu = torch.zeros(T, C, dtype=F64)
    if torch.isfinite(A):
        p = (scores - A).exp()
        for y, pi in zip(seqs, p):
            for t, c in enumerate(y):
                mu[t, c] += pi
    return A, mu, scores.max(), list(zip(seqs, scores))


def random_batch(B, T, C, seed, lengths=True):
    g = torch.Generator().manual_seed(seed)
    em = torch.randn(B, T, C, generator=g, dtype=F64)
    tags = torch.randint(C, (B, T), generator=g)
    L = torch.randint(0, T + 1, (B,), generator=g) if lengths else None
    if L is not None:
        L[0] = T
    return em, tags, L


CONFIGS = {
    "start_end": dict(start_end=True),
    "no_start_end": dict(start_end=False),
    "bio": dict(constraints=sg.nn.allowed_transitions(["O", "B-X", "I-X"], "BIO")),
    "transition_mask_only": dict(constraints=torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_against_enumeration(config):
    C, T = 3, 4
    crf = make_crf(C, seed=1, **CONFIGS[config])
    em, tags, L = random_batch(5, T, C, seed=2)
    L = torch.tensor([4, 3, 1, 0, 2])
    A = crf.log_partition(em, L)
    mu = crf.marginals(em, L)
    vit = crf.decode(em, L)
    mm = crf.decode(em, L, method="marginal")
    for b in range(5):
        Lb = int(L[b])
        A_ref, mu_ref, best, table = brute(crf, em[b], Lb)
        assert torch.allclose(A[b], A_ref, atol=1e-10)
        assert torch.allclose(mu[b], mu_ref, atol=1e-10)
        y = tuple(vit[b, :Lb].tolist())
        assert (vit[b, Lb:] == -1).all() and (mm[b, Lb:] == -1).all()
        assert torch.allclose(seq_score(crf, em[b], y), best, atol=1e-10)
        # max-marginal: the allowed sequence with the largest Σ_t μ_t(y_t)
        feasible = [(yy, sum(float(mu_ref[t, c]) for t, c in enumerate(yy))) for yy, s in table if s > NEG]
        best_mm = max(v for _, v in feasible)
        got = tuple(mm[b, :Lb].tolist())
        assert got in [yy for yy, _ in feasible]
        assert sum(float(mu_ref[t, c]) for t, c in enumerate(got)) == pytest.approx(best_mm, abs=1e-12)
    # loss of allowed gold sequences: A − s(gold)
    gold = vit.clamp(min=0)
    nll = crf(em, gold, L, reduction="none")
    for b in range(5):
        Lb = int(L[b])
        ref = A[b] - seq_score(crf, em[b], tuple(gold[b, :Lb].tolist()))
        assert torch.allclose(nll[b], ref, atol=1e-10)
    assert torch.allclose(crf.score(em, gold, L), A - nll, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(1, 3), seed=st.integers(0, 10_000), se=st.booleans())
def test_property_loss_and_marginals(B, T, C, seed, se):
    crf = make_crf(C, seed=seed, start_end=se)
    em, tags, L = random_batch(B, T, C, seed)
    nll = crf(em, tags, L, reduction="none")
    mu = crf.marginals(em, L)
    for b in range(B):
        Lb = int(L[b])
        A_ref, mu_ref, _, _ = brute(crf, em[b], Lb)
        ref = A_ref - seq_score(crf, em[b], tuple(tags[b, :Lb].tolist()))
        assert torch.allclose(nll[b], ref, atol=1e-9)
        assert torch.allclose(mu[b], mu_ref, atol=1e-9)


def test_counting_zero_scores():
    crf = sg.nn.LinearChainCRF(4).double()
    A = crf.log_partition(torch.zeros(3, 5, 4, dtype=F64), torch.tensor([5, 2, 0]))
    assert torch.allclose(A, torch.tensor([5, 2, 0], dtype=F64) * torch.log(torch.tensor(4.0, dtype=F64)))


# ----------------------------------------------------------------------------- gradients
def test_gradient_is_marginals_minus_gold():
    C, T = 4, 6
    crf = make_crf(C, seed=3)
    em, tags, L = random_batch(4, T, C, seed=4)
    em.requires_grad_()
    crf(em, tags, L, reduction="sum").backward()
    mu = crf.marginals(em, L)
    valid = (torch.arange(T) < L[:, None]).to(F64)
    gold = torch.nn.functional.one_hot(tags, C).to(F64) * valid[..., None]
    assert torch.allclose(em.grad, mu - gold, atol=1e-10)
    # transitions: expected minus gold transition counts; start/end: first/last tag
    exp_counts = sg.get_solver("chain").marginals(crf._potentials(em.detach(), L), lengths=L)[1].sum(0)
    gold_counts = torch.zeros(C, C, dtype=F64)
    first, last = torch.zeros(C, dtype=F64), torch.zeros(C, dtype=F64)
    for b in range(4):
        y = tags[b, : int(L[b])].tolist()
        for a, c in zip(y, y[1:]):
            gold_counts[a, c] += 1
        if y:
            first[y[0]] += 1
            last[y[-1]] += 1
    mu_first = (mu[:, 0] * (L > 0)[:, None]).sum(0)
    mu_last = torch.stack([mu[b, int(L[b]) - 1] if L[b] > 0 else torch.zeros(C, dtype=F64) for b in range(4)]).sum(0)
    assert torch.allclose(crf.transitions.grad, exp_counts - gold_counts, atol=1e-10)
    assert torch.allclose(crf.start.grad, mu_first - first, atol=1e-10)
    assert torch.allclose(crf.end.grad, mu_last - last, atol=1e-10)


@pytest.mark.parametrize("constrained", [False, True])
def test_gradcheck(constrained):
    C, T = 3, 4
    cons = sg.nn.allowed_transitions(["O", "B-X", "I-X"], "BIO") if constrained else None
    crf = make_crf(C, seed=5, constraints=cons)
    em, _, _ = random_batch(3, T, C, seed=6)
    L = torch.tensor([4, 2, 1])
    tags = crf.decode(em, L).clamp(min=0)  # allowed gold sequences

    leaves = [em.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in (crf.transitions, crf.start, crf.end)]

    def g(em, tr, s, e):
        m = sg.nn.LinearChainCRF(C, constraints=cons).double()
        del m.transitions, m.start, m.end
        m.transitions, m.start, m.end = tr, s, e
        return m(em, tags, L, reduction="none")

    assert torch.autograd.gradcheck(g, leaves)


def test_past_length_ignored_whatever_it_holds():
    C, T = 3, 6
    crf = make_crf(C, seed=7)
    em, tags, _ = random_batch(3, T, C, seed=8)
    L = torch.tensor([6, 3, 0])
    em1, em2 = em.clone().requires_grad_(), em.clone()
    tags2 = tags.clone()
    valid = torch.arange(T) < L[:, None]
    em2[~valid] = torch.tensor([NEG, 1e4, -3.0], dtype=F64)
    tags2[~valid] = torch.tensor(-100)
    tags2[1, 4] = 999  # out of range, but past the length
    em2.requires_grad_()
    l1, l2 = crf(em1, tags, L, reduction="none"), crf(em2, tags2, L, reduction="none")
    # equal up to rounding: the chain solver may pick its log-space path for the padded scores
    assert torch.allclose(l1, l2, rtol=0, atol=1e-12)
    assert l1[2] == 0
    l1.sum().backward()
    l2.sum().backward()
    assert torch.allclose(em1.grad, em2.grad, rtol=0, atol=1e-12)
    assert (em2.grad[~valid] == 0).all()
    assert torch.equal(crf.decode(em1, L), crf.decode(em2, L))


def test_zero_length_and_empty():
    crf = make_crf(3)
    em = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    L = torch.tensor([0, 0])
    loss = crf(em, torch.zeros(2, 4, dtype=torch.long), L, reduction="none")
    assert torch.equal(loss, torch.zeros(2, dtype=F64))
    loss.sum().backward()
    assert (em.grad == 0).all()
    assert (crf.decode(em, L) == -1).all() and (crf.decode(em, L, method="marginal") == -1).all()
    assert (crf.marginals(em, L) == 0).all()
    assert (crf.sample(em, 3, L) == -1).all()
    # T = 0 and B = 0
    e0 = torch.zeros(2, 0, 3, dtype=F64)
    assert crf(e0, torch.zeros(2, 0, dtype=torch.long), reduction="none").shape == (2,)
    assert crf.decode(e0).shape == (2, 0) and crf.sample(e0, 4).shape == (4, 2, 0)
    assert crf.marginals(e0).shape == (2, 0, 3) and torch.equal(crf.log_partition(e0), torch.zeros(2, dtype=F64))
    eb = torch.zeros(0, 5, 3, dtype=F64)
    assert crf(eb, torch.zeros(0, 5, dtype=torch.long)).item() == 0
    assert crf.decode(eb).shape == (0, 5)


def test_reductions():
    crf = make_crf(3)
    em, tags, L = random_batch(4, 5, 3, seed=9)
    none = crf(em, tags, L, reduction="none")
    assert torch.allclose(crf(em, tags, L), none.mean())
    assert torch.allclose(crf(em, tags, L, reduction="sum"), none.sum())
    assert torch.allclose(crf(em, tags, L, reduction="token_mean"), none.sum() / L.sum())
    assert torch.allclose(crf(em, tags, reduction="token_mean"), crf(em, tags, reduction="sum") / 20)


def test_sample_exact_frequencies_and_reproducible():
    C, T = 2, 3
    crf = make_crf(C, seed=11)
    em, _, _ = random_batch(1, T, C, seed=12)
    L = torch.tensor([3])
    _, _, _, table = brute(crf, em[0], 3)
    A = torch.logsumexp(torch.stack([s for _, s in table]), 0)
    S = 20000
    draws = crf.sample(em, S, L, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (S, 1, T) and draws.dtype == torch.long
    assert torch.equal(draws, crf.sample(em, S, L, generator=torch.Generator().manual_seed(0)))
    codes = (draws[:, 0] * torch.tensor([4, 2, 1])).sum(-1)
    freq = torch.bincount(codes, minlength=8).to(F64) / S
    p = torch.stack([(s - A).exp() for _, s in table])
    chi2 = float((S * (freq - p) ** 2 / p).sum())
    assert chi2 < 24.3  # χ²(7) at p = 0.001
    short = crf.sample(em, 5, torch.tensor([1]), generator=torch.Generator().manual_seed(1))
    assert (short[..., 1:] == -1).all() and (short[..., 0] >= 0).all()


def test_dtype_promotion_and_no_input_mutation():
    crf = sg.nn.LinearChainCRF(3)  # float32 parameters
    em = torch.randn(2, 4, 3, dtype=F64)
    tags = torch.randint(3, (2, 4), dtype=torch.int32)
    L = torch.tensor([4, 2], dtype=torch.int16)
    em0, tags0, L0 = em.clone(), tags.clone(), L.clone()
    assert crf(em, tags, L).dtype == F64 and crf.marginals(em, L).dtype == F64
    assert crf(em.half(), tags, L).dtype == torch.float32
    assert torch.equal(em, em0) and torch.equal(tags, tags0) and torch.equal(L, L0)
    assert crf.decode(em, L).dtype == torch.long


def test_state_dict_round_trip_keeps_masks():
    cons = sg.nn.allowed_transitions(["O", "B-A", "I-A"], "BIO")
    a = make_crf(3, constraints=cons)
    b = sg.nn.LinearChainCRF(3, constraints=cons).double()
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"transitions", "start", "end", "transition_mask", "start_mask", "end_mask"}
    em = torch.randn(2, 5, 3, dtype=F64)
    assert torch.equal(a.log_partition(em), b.log_partition(em))
    assert "constrained=True" in repr(a)
    assert set(sg.nn.LinearChainCRF(3, start_end=False).state_dict()) == {"transitions"}


def test_validate_false_skips_checks_but_computes_the_same():
    crf = make_crf(3, seed=2)
    fast = make_crf(3, seed=2, validate=False)
    em, tags, L = random_batch(3, 5, 3, seed=13)
    assert torch.equal(crf(em, tags, L, reduction="none"), fast(em, tags, L, reduction="none"))
    assert torch.equal(crf.decode(em, L), fast.decode(em, L))


# ----------------------------------------------------------------------------- pytorch-crf parity
def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-crf 0.7.2 uses a uint8 mask in torch.where
        return f(*a, **k)


@pytest.mark.parametrize("batch_first", [True, False])
def test_parity_with_pytorch_crf(batch_first):
    torchcrf = pytest.importorskip("torchcrf")
    C, B, T = 5, 6, 9
    torch.manual_seed(0)  # pytorch-crf initialises from the global generator
    ref = torchcrf.CRF(C, batch_first=batch_first).double()
    ours = sg.nn.LinearChainCRF(C).double()
    with torch.no_grad():  # the mapping documented in the README
        ours.transitions.copy_(ref.transitions)
        ours.start.copy_(ref.start_transitions)
        ours.end.copy_(ref.end_transitions)
    g = torch.Generator().manual_seed(1)
    em = torch.randn(B, T, C, generator=g, dtype=F64) * 3
    tags = torch.randint(C, (B, T), generator=g)
    lengths = torch.tensor([9, 1, 5, 9, 3, 7])  # pytorch-crf needs length >= 1
    mask = torch.arange(T) < lengths[:, None]  # (B, T) bool; lengths = mask.sum(1)
    em_ref, tags_ref, mask_ref = (em, tags, mask) if batch_first else (em.transpose(0, 1), tags.t(), mask.t())
    llh = _quiet(ref, em_ref, tags_ref, mask_ref, reduction="none")
    nll = ours(em, tags, mask.sum(1), reduction="none")
    assert torch.allclose(-llh, nll, rtol=0, atol=1e-10)
    paths = _quiet(ref.decode, em_ref, mask_ref)
    ours_paths = ours.decode(em, lengths)
    assert [row[: int(n)].tolist() for row, n in zip(ours_paths, lengths)] == paths
    # the gradients agree too (same function of the same parameters)
    _quiet(lambda: (-ref(em_ref, tags_ref, mask_ref, reduction="sum")).backward())
    ours(em, tags, lengths, reduction="sum").backward()
    for a, b in ((ours.transitions, ref.transitions), (ours.start, ref.start_transitions), (ours.end, ref.end_transitions)):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


# ----------------------------------------------------------------------------- bad input
def test_error_emissions():
    crf = sg.nn.LinearChainCRF(3)
    with pytest.raises(ShapeError, match="emissions: expected shape \\(B, T, C\\)"):
        crf(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match="num_tags = 3"):
        crf.decode(torch.randn(2, 4, 5))
    with pytest.raises(DTypeError, match="emissions"):
        crf.marginals(torch.zeros(2, 4, 3, dtype=torch.long))
    with pytest.raises(DomainError, match="emissions: expected scores that are finite or -inf"):
        crf.log_partition(torch.full((1, 2, 3), float("nan")))
    with pytest.raises(DomainError, match="emissions: .*\\+inf"):
        crf(torch.full((1, 2, 3), float("inf")), torch.zeros(1, 2, dtype=torch.long))
    with torch.no_grad():
        crf.transitions[0, 1] = float("nan")
    with pytest.raises(DomainError, match="transitions"):
        crf.decode(torch.zeros(1, 2, 3))


def test_error_tags():
    crf = sg.nn.LinearChainCRF(3)
    em = torch.randn(2, 4, 3)
    with pytest.raises(DTypeError, match="tags: expected an integer tensor"):
        crf(em, torch.zeros(2, 4))
    with pytest.raises(ShapeError, match="tags: expected shape \\(2, 4\\)"):
        crf(em, torch.zeros(2, 5, dtype=torch.long))
    bad = torch.zeros(2, 4, dtype=torch.long)
    bad[1, 2] = 3
    with pytest.raises(DomainError, match=r"tags: expected tag ids in \[0, 3\).*got 3 at \(b, t\) = \(1, 2\)"):
        crf(em, bad)
    bad[1, 2] = -1
    with pytest.raises(DomainError, match="got -1"):
        crf.score(em, bad)
    assert torch.isfinite(crf(em, bad, torch.tensor([4, 2])))  # past the length: ignored
    # unchecked, a bad id within a length still fails (in torch's indexing), never silently
    fast = sg.nn.LinearChainCRF(3, validate=False)
    for v in (3, -1):
        bad[1, 2] = v
        with pytest.raises((RuntimeError, IndexError)):
            fast(em, bad)
        with pytest.raises((RuntimeError, IndexError)):
            fast(em, bad, torch.tensor([4, 3]))
    assert torch.isfinite(fast(em, bad, torch.tensor([4, 2])))


def test_error_lengths_reduction_method_generator():
    crf = sg.nn.LinearChainCRF(3)
    em, tags = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(DomainError, match="lengths: expected values in \\[0, 4\\]"):
        crf(em, tags, torch.tensor([5, 1]))
    with pytest.raises(ShapeError, match="lengths"):
        crf(em, tags, torch.tensor([1, 1, 1]))
    with pytest.raises(DTypeError, match="lengths"):
        crf.decode(em, torch.tensor([1.0, 2.0]))
    with pytest.raises(DomainError, match="reduction: expected one of"):
        crf(em, tags, reduction="avg")
    with pytest.raises(DomainError, match="method: expected one of"):
        crf.decode(em, method="beam")
    with pytest.raises(DTypeError, match="generator"):
        crf.sample(em, 2, generator=0)
    with pytest.raises(DomainError, match="num_samples"):
        crf.sample(em, 0)


def test_error_constructor_and_masks():
    with pytest.raises(DomainError, match="num_tags"):
        sg.nn.LinearChainCRF(0)
    with pytest.raises(DomainError, match="start_end"):
        sg.nn.LinearChainCRF(3, start_end="yes")
    with pytest.raises(ShapeError, match=r"constraints.transitions: expected shape \(3, 3\)"):
        sg.nn.LinearChainCRF(3, constraints=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"constraints.start: expected shape \(3,\)"):
        sg.nn.LinearChainCRF(3, constraints=(None, torch.ones(2, dtype=torch.bool)))
    with pytest.raises(DTypeError, match="bool mask"):
        sg.nn.LinearChainCRF(3, constraints=torch.ones(3, 3))
    with pytest.raises(DTypeError, match="constraints: expected None"):
        sg.nn.LinearChainCRF(3, constraints="BIO")
    with pytest.raises(DomainError, match="forbid every tag sequence of every length"):
        sg.nn.LinearChainCRF(3, constraints=(None, torch.zeros(3, dtype=torch.bool)))
    # no path from an allowed first tag (0) to an allowed last tag (2)
    t = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    with pytest.raises(DomainError, match="every length"):
        sg.nn.LinearChainCRF(3, constraints=(t, torch.tensor([1, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 1], dtype=torch.bool)))


def test_masks_are_copied():
    m = torch.ones(3, 3, dtype=torch.bool)
    crf = sg.nn.LinearChainCRF(3, constraints=m)
    m[0, 0] = False
    assert bool(crf.transition_mask[0, 0])
    assert crf.constraints.start is None and sg.nn.LinearChainCRF(3).constraints is None


def test_device_mismatch():
    crf = sg.nn.LinearChainCRF(3)
    with pytest.raises(DeviceError):
        crf.decode(torch.randn(1, 2, 3, device="meta"))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("constrained", [False, True])
def test_cuda_matches_cpu(dtype, constrained):
    tags_names = ["O", "B-A", "I-A", "B-B", "I-B"]
    cons = sg.nn.allowed_transitions(tags_names, "BIO") if constrained else None
    cpu = make_crf(5, seed=21, constraints=cons).to(dtype)
    gpu = make_crf(5, seed=21, constraints=cons).to(dtype).cuda()
    g = torch.Generator().manual_seed(22)
    em = (torch.randn(6, 9, 5, generator=g, dtype=F64) * 3).to(dtype)
    L = torch.tensor([9, 0, 1, 5, 9, 3])
    tags = cpu.decode(em, L).clamp(min=0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    e_c, e_g = em.clone().requires_grad_(), em.cuda().requires_grad_()
    l_c = cpu(e_c, tags, L, reduction="none")
    l_g = gpu(e_g, tags.cuda(), L.cuda(), reduction="none")
    assert l_g.device.type == "cuda" and l_g.dtype == dtype
    torch.testing.assert_close(l_g.cpu(), l_c, **tol)
    l_c.sum().backward()
    l_g.sum().backward()
    torch.testing.assert_close(e_g.grad.cpu(), e_c.grad, **tol)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, **tol)
    for method in ("viterbi", "marginal"):
        d = gpu.decode(em.cuda(), L.cuda(), method=method)
        assert d.device.type == "cuda" and torch.equal(d.cpu(), cpu.decode(em, L, method=method))
    torch.testing.assert_close(gpu.marginals(em.cuda(), L.cuda()).cpu(), cpu.marginals(em, L), **tol)
    torch.testing.assert_close(gpu.log_partition(em.cuda(), L.cuda()).cpu(), cpu.log_partition(em, L), **tol)
    s = gpu.sample(em.cuda(), 7, L.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert s.shape == (7, 6, 9) and s.device.type == "cuda"
    valid = (torch.arange(9) < L[:, None]).cuda()
    assert ((s >= 0) == valid).all()
    if constrained:
        tm = gpu.transition_mask
        ok = tm[s[..., :-1].clamp(min=0), s[..., 1:].clamp(min=0)] | ~valid[:, 1:]
        assert ok.all() and gpu.start_mask[s[:, valid[:, 0], 0]].all()
