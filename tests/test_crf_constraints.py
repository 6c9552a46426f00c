"""Transition constraints of ``structgrad.nn.LinearChainCRF``: scheme masks, -inf scoring,
decoding never forbidden, training without NaN, infeasible lengths."""

from __future__ import annotations

import itertools

import pytest
import torch

import structgrad as sg
from structgrad.errors import DomainError, DTypeError

F64 = torch.float64
BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
BIOES = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]
BILOU = [t.replace("E-", "L-").replace("S-", "U-") for t in BIOES]


def split(name):
    return ("O", "") if name == "O" else (name[0], name[2:])


def valid_bio(names):
    """IOB2: I-X only after B-X or I-X (an independent reading of the scheme)."""
    prev = ("O", "")
    for n in names:
        r, x = split(n)
        if r == "I" and not (prev[0] in "BI" and prev[1] == x):
            return False
        prev = (r, x)
    return True


def valid_bioes(names):
    """BIOES/BILOU: (O | S-X | B-X I-X* E-X)* as a small state machine."""
    open_ = None
    for n in names:
        r, x = split(n)
        r = {"L": "E", "U": "S"}.get(r, r)
        if open_ is None:
            if r in "IE":
                return False
            if r == "B":
                open_ = x
        else:
            if r not in "IE" or x != open_:
                return False
            if r == "E":
                open_ = None
    return open_ is None


def allowed_by(c, ids):
    ok = bool(c.start[ids[0]]) and bool(c.end[ids[-1]])
    return ok and all(bool(c.transitions[a, b]) for a, b in zip(ids, ids[1:]))


@pytest.mark.parametrize("tags, scheme, oracle", [(BIO, "BIO", valid_bio), (BIOES, "BIOES", valid_bioes), (BILOU, "BILOU", valid_bioes)])
def test_scheme_masks_match_an_independent_parser(tags, scheme, oracle):
    c = sg.nn.allowed_transitions(tags, scheme=scheme)
    C = len(tags)
    assert c.transitions.shape == (C, C) and c.start.shape == c.end.shape == (C,)
    assert c.transitions.dtype == c.start.dtype == torch.bool
    for L in (1, 2, 3):
        for ids in itertools.product(range(C), repeat=L):
            assert allowed_by(c, ids) == oracle([tags[i] for i in ids]), [tags[i] for i in ids]


def test_bio_mask_explicit():
    c = sg.nn.allowed_transitions(BIO, "BIO")
    expected = torch.tensor(
        [  # to: O  B-P I-P B-L I-L
            [1, 1, 0, 1, 0],  # O
            [1, 1, 1, 1, 0],  # B-PER
            [1, 1, 1, 1, 0],  # I-PER
            [1, 1, 0, 1, 1],  # B-LOC
            [1, 1, 0, 1, 1],  # I-LOC
        ],
        dtype=torch.bool,
    )
    assert torch.equal(c.transitions, expected)
    assert c.start.tolist() == [True, True, False, True, False] and c.end.all()
    untyped = sg.nn.allowed_transitions(["B", "I", "O"], "BIO")
    assert untyped.transitions.tolist() == [[True, True, True], [True, True, True], [True, False, True]]


def test_scheme_errors():
    with pytest.raises(DomainError, match="scheme: expected one of 'BIO', 'BIOES', 'BILOU'"):
        sg.nn.allowed_transitions(BIO, scheme="IOB1")
    with pytest.raises(DomainError, match=r"expected 'O' or '<B\|I>-<type>' under scheme 'BIO', got 'E-PER'"):
        sg.nn.allowed_transitions(["O", "E-PER"], "BIO")
    with pytest.raises(DomainError, match="'<pad>'"):
        sg.nn.allowed_transitions(["<pad>", "O"], "BIOES")
    with pytest.raises(DomainError, match="distinct names, got 'O' at ids 0 and 2"):
        sg.nn.allowed_transitions(["O", "B-X", "O"])
    with pytest.raises(DomainError, match="empty"):
        sg.nn.allowed_transitions([])
    with pytest.raises(DTypeError, match="tag names"):
        sg.nn.allowed_transitions(["O", 3])
    with pytest.raises(DTypeError, match="sequence of tag names"):
        sg.nn.allowed_transitions("BIO")


@pytest.mark.parametrize("tags, scheme, oracle", [(BIO, "BIO", valid_bio), (BIOES, "BIOES", valid_bioes)])
@pytest.mark.parametrize("method", ["viterbi", "marginal"])
def test_decoding_never_returns_a_forbidden_sequence(tags, scheme, oracle, method):
    C = len(tags)
    crf = sg.nn.LinearChainCRF(C, constraints=sg.nn.allowed_transitions(tags, scheme))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        crf.transitions.copy_(torch.randn(C, C, generator=g) * 5)  # forbidden entries large on purpose
    em = torch.randn(200, 12, C, generator=g) * 4
    lengths = torch.randint(0, 13, (200,), generator=g)
    paths = crf.decode(em, lengths, method=method)
    for row, L in zip(paths.tolist(), lengths.tolist()):
        assert all(v == -1 for v in row[L:])
        assert all(v >= 0 for v in row[:L])
        if L:
            assert oracle([tags[i] for i in row[:L]])
    samples = crf.sample(em[:20], 10, lengths[:20], generator=g)
    for s in range(10):
        for row, L in zip(samples[s].tolist(), lengths[:20].tolist()):
            assert L == 0 or oracle([tags[i] for i in row[:L]])


def test_forbidden_is_minus_inf_exactly():
    c = sg.nn.allowed_transitions(["O", "B-X", "I-X"], "BIO")
    crf = sg.nn.LinearChainCRF(3, constraints=c).double()
    em = torch.randn(2, 4, 3, dtype=F64)
    node, edge = crf._potentials(em, None)
    assert edge[0, 2].item() == float("-inf") and torch.isfinite(edge[c.transitions]).all()
    assert node[:, 0, 2].eq(float("-inf")).all()  # start at I-X
    # with a huge finite score on O -> I-X, the probability of it is still exactly 0
    with torch.no_grad():
        crf.transitions[0, 2] = 1e4
    counts = sg.get_solver("chain").marginals(crf._potentials(em, None))[1]
    assert counts[:, 0, 2].eq(0).all()
    tags = crf.decode(em)
    crf(em, tags).backward()
    assert crf.transitions.grad[0, 2] == 0 and crf.start.grad[2] == 0


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.float32, 1e4), (F64, 30.0)])
def test_training_with_constraints_has_no_nan(dtype, scale):
    tags = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B"]
    C = len(tags)
    teacher = sg.nn.LinearChainCRF(C, constraints=sg.nn.allowed_transitions(tags, "BIOES")).to(dtype)
    crf = sg.nn.LinearChainCRF(C, constraints=sg.nn.allowed_transitions(tags, "BIOES")).to(dtype)
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Linear(4, C).to(dtype)
    opt = torch.optim.Adam(list(crf.parameters()) + list(emb.parameters()), lr=0.1)
    for step in range(8):
        x = torch.randn(16, 10, 4, generator=g, dtype=dtype)
        lengths = torch.randint(0, 11, (16,), generator=g)
        with torch.no_grad():
            gold = teacher.sample(torch.randn(16, 10, C, generator=g, dtype=dtype) * 3, 1, lengths, generator=g)[0]
        em = emb(x) * scale
        loss = crf(em, gold, lengths)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        for p in list(crf.parameters()) + list(emb.parameters()):
            assert torch.isfinite(p.grad).all()
        opt.step()


def test_gold_sequence_the_constraints_forbid():
    c = sg.nn.allowed_transitions(["O", "B-X", "I-X"], "BIO")
    em = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    gold = torch.tensor([[0, 2, 2], [1, 2, 0]])  # O -> I-X in sequence 0
    crf = sg.nn.LinearChainCRF(3, constraints=c).double()
    with pytest.raises(DomainError, match=r"sequence 0 \(length 3\) has score -inf: it uses the transition 0 -> 2 at t = 0"):
        crf(em, gold)
    with pytest.raises(DomainError, match="first tag 2, which constraints.start forbids"):
        crf(em, torch.tensor([[2, 2, 0], [0, 0, 0]]))
    fast = sg.nn.LinearChainCRF(3, constraints=c, validate=False).double()
    loss = fast(em, gold, reduction="none")
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    loss.sum().backward()
    assert (em.grad[0] == 0).all() and torch.isfinite(em.grad).all()
    assert torch.isfinite(fast.transitions.grad).all()
    assert fast.score(em, gold)[0] == float("-inf")


def test_mask_that_forbids_every_sequence_of_some_lengths():
    """Only 0 -> 1 is allowed, sequences start with 0 and end with 1: only length 2 is
    possible.  Lengths 1 and 3 give A = -inf, zero marginals, -1 decodes and samples;
    their loss is a DomainError (validate) or +inf with zero gradient (validate=False)."""
    trans = torch.tensor([[False, True], [False, False]])
    start, end = torch.tensor([True, False]), torch.tensor([False, True])
    crf = sg.nn.LinearChainCRF(2, constraints=(trans, start, end)).double()
    em = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    L = torch.tensor([1, 2, 3, 0])
    A = crf.log_partition(em, L)
    assert A[0] == float("-inf") and A[2] == float("-inf") and torch.isfinite(A[1]) and A[3] == 0
    mu = crf.marginals(em, L)
    assert (mu[[0, 2]] == 0).all() and torch.allclose(mu[1, :2], torch.eye(2, dtype=F64))
    for method in ("viterbi", "marginal"):
        d = crf.decode(em, L, method=method)
        assert d.tolist() == [[-1, -1, -1], [0, 1, -1], [-1, -1, -1], [-1, -1, -1]]
    s = crf.sample(em, 5, L, generator=torch.Generator().manual_seed(0))
    assert (s[:, [0, 2, 3]] == -1).all() and (s[:, 1, :2] == torch.tensor([0, 1])).all()
    gold = torch.tensor([[0, 1, 1]] * 4)
    with pytest.raises(DomainError, match="score -inf"):
        crf(em, gold, L)
    crf.validate = False
    loss = crf(em, gold, L, reduction="none")
    assert loss.tolist()[0] == float("inf") and loss.tolist()[2] == float("inf") and loss[3] == 0
    assert torch.isfinite(loss[1])
    loss.sum().backward()
    assert not torch.isnan(em.grad).any() and (em.grad[[0, 2]] == 0).all()
    assert torch.isfinite(crf.transitions.grad).all() and torch.isfinite(crf.start.grad).all()
    # A(θ) = -inf is also what A gives through autograd: its gradient is 0, never NaN
    em.grad = None
    crf.log_partition(em, L).sum().backward()
    assert not torch.isnan(em.grad).any()


def test_start_end_masks_without_transition_mask():
    start = torch.tensor([True, False, False])
    end = torch.tensor([False, False, True])
    crf = sg.nn.LinearChainCRF(3, start_end=False, constraints=(None, start, end)).double()
    em = torch.randn(50, 4, 3, dtype=F64) * 3
    L = torch.randint(2, 5, (50,))
    for method in ("viterbi", "marginal"):
        d = crf.decode(em, L, method=method)
        assert (d[:, 0] == 0).all()
        assert (d.gather(1, (L - 1).unsqueeze(1)) == 2).all()
    one = crf.log_partition(em[:1], torch.tensor([1]))
    assert one.item() == float("-inf")  # length 1 needs a tag that may both start and end
