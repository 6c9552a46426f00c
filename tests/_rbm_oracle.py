"""Brute-force oracles for the RBM tests: enumerate every (v, h) of tiny models.

Imported by tests/test_rbm*.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import itertools

import torch


def count_vectors(D: int, K: int) -> torch.Tensor:
    """All count vectors of K words summing to D, ``(C(D+K-1, K-1), K)`` float64."""
    out = []
    for cuts in itertools.combinations(range(D + K - 1), K - 1):
        prev, v = -1, []
        for c in cuts + (D + K - 1,):
            v.append(c - prev - 1)
            prev = c
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def binary_vectors(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=torch.float64)


def log_multinomial(v: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(v.sum(-1) + 1) - torch.lgamma(v + 1).sum(-1)


def rsm_energy_table(model, D: int):
    """(vs (S, K), hs (H, F), log weights (S, H)) of -E(V, h) for the count vectors of length D,
    *without* the multinomial coefficient (one ordered sequence per count vector)."""
    W, b, a = model.weight.detach(), model.visible_bias.detach(), model.hidden_bias.detach()
    vs = count_vectors(D, model.num_visible).to(W.dtype)
    hs = binary_vectors(model.num_hidden).to(W.dtype)
    s = float(D) if model.scale_hidden_bias else 1.0
    neg_e = (vs @ b).unsqueeze(1) + s * (hs @ a).unsqueeze(0) + vs @ W @ hs.T
    return vs, hs, neg_e


def rsm_log_z(model, D: int) -> torch.Tensor:
    vs, hs, neg_e = rsm_energy_table(model, D)
    return torch.logsumexp(neg_e + log_multinomial(vs).unsqueeze(1), dim=(0, 1))


def rsm_free_energy(model, v: torch.Tensor) -> torch.Tensor:
    """F(v) = -log Σ_h exp(-E(v, h)) by enumerating h, for v ``(N, K)``."""
    W, b, a = model.weight.detach(), model.visible_bias.detach(), model.hidden_bias.detach()
    hs = binary_vectors(model.num_hidden).to(W.dtype)
    D = v.sum(-1, keepdim=True)
    s = D if model.scale_hidden_bias else torch.ones_like(D)
    neg_e = (v @ b).unsqueeze(1) + s * (hs @ a).unsqueeze(0) + v @ W @ hs.T
    return -torch.logsumexp(neg_e, 1)


def rsm_distribution(model, D: int):
    """(count vectors (S, K), p(v) (S,)) of the documents of length D (multinomial coefficient included)."""
    vs, hs, neg_e = rsm_energy_table(model, D)
    lw = torch.logsumexp(neg_e, 1) + log_multinomial(vs)
    return vs, torch.softmax(lw, 0)


def rsm_expected_stats(model, D: int):
    """E[v hᵀ], E[v], E[s(D) h] under p_D, by enumeration."""
    vs, hs, neg_e = rsm_energy_table(model, D)
    p = torch.softmax((neg_e + log_multinomial(vs).unsqueeze(1)).flatten(), 0).reshape(neg_e.shape)
    s = float(D) if model.scale_hidden_bias else 1.0
    return vs.T @ p @ hs, p.sum(1) @ vs, s * (p.sum(0) @ hs)


def rbm_energy_table(model):
    W, b, c = model.weight.detach(), model.visible_bias.detach(), model.hidden_bias.detach()
    vs = binary_vectors(model.num_visible).to(W.dtype)
    hs = binary_vectors(model.num_hidden).to(W.dtype)
    neg_e = (vs @ b).unsqueeze(1) + (hs @ c).unsqueeze(0) + vs @ W @ hs.T
    return vs, hs, neg_e


def rbm_log_z(model) -> torch.Tensor:
    return torch.logsumexp(rbm_energy_table(model)[2], dim=(0, 1))


def rbm_free_energy(model, v: torch.Tensor) -> torch.Tensor:
    W, b, c = model.weight.detach(), model.visible_bias.detach(), model.hidden_bias.detach()
    hs = binary_vectors(model.num_hidden).to(W.dtype)
    neg_e = (v @ b).unsqueeze(1) + (hs @ c).unsqueeze(0) + v @ W @ hs.T
    return -torch.logsumexp(neg_e, 1)


def rbm_distribution(model):
    vs, hs, neg_e = rbm_energy_table(model)
    return vs, torch.softmax(torch.logsumexp(neg_e, 1), 0)


def rbm_expected_stats(model):
    vs, hs, neg_e = rbm_energy_table(model)
    p = torch.softmax(neg_e.flatten(), 0).reshape(neg_e.shape)
    return vs.T @ p @ hs, p.sum(1) @ vs, p.sum(0) @ hs


def total_variation(samples: torch.Tensor, states: torch.Tensor, probs: torch.Tensor) -> float:
    """TV distance between the empirical distribution of ``samples`` (N, K) and ``probs`` over ``states``."""
    eq = (samples.unsqueeze(1) == states.unsqueeze(0)).all(-1)  # (N, S)
    if not bool(eq.any(1).all()):
        raise AssertionError("a sample is not among the enumerated states")
    freq = eq.double().mean(0)
    return 0.5 * float((freq - probs).abs().sum())


def randomize(model, generator: torch.Generator, scale: float = 1.0) -> None:
    """Give every parameter N(0, scale²) values (in place, for tests)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator) * scale)
