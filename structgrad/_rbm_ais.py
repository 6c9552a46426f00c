"""Annealed importance sampling (AIS) for the RBMs of :mod:`structgrad.rbm` (private).

Two annealing paths, both run in float64 whatever the model's dtype (parameters,
schedule, chains and log-weight increments), the result rounded once to the
model's dtype:

* :func:`temperature_ais`, Salakhutdinov & Murray's temperature path β = 0 → 1 from
  a base-rate model (W = 0, hidden bias 0, visible bias b_A) to the model, one
  Gibbs sweep per β; used by both models (one run per distinct length for the RSM);
* :func:`length_ais`, the RSM's document-length path t = 0 → D with the words summed
  out, one run for every length (see :meth:`ReplicatedSoftmax.ais_log_partition`).

Either way log Ẑ = log Z_0 + log mean_m w_m, with a delta-method standard error.
The functions take the model as their first argument and use only its hooks
(``_input``, ``_draw_visible``, ``_base_log_z``, ``_bernoulli``) and parameters.

References:
    R. Neal, "Annealed importance sampling", Statistics and Computing 2001.
    R. Salakhutdinov and I. Murray, "On the quantitative analysis of deep belief networks", ICML 2008.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from . import checks as V
from .errors import DeviceError, DomainError, DTypeError, ShapeError
from .logspace import logsumexp, multinomial_counts

__all__ = ["AISEstimate", "ais_betas", "temperature_ais", "length_ais"]


class AISEstimate(NamedTuple):
    """Result of annealed importance sampling.

    Attributes:
        log_z: the estimate log Ẑ = log Z_0 + log mean_m w_m (detached).
        stderr: its standard error by the delta method, std(w) / (√M · mean(w)).
        log_weights: ``(num_chains, *log_z.shape)`` the log importance weights log w_m.

    All three are computed in float64 and returned in the model's dtype (so ``log_z``
    can be passed to ``log_prob``).
    """

    log_z: torch.Tensor
    stderr: torch.Tensor
    log_weights: torch.Tensor


def ais_betas(num_betas: int, *, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """The default AIS temperature schedule 0 = β_0 < … < β_{K−1} = 1.

    Salakhutdinov & Murray's proportions (500 : 4000 : 10000 steps on [0, 0.5],
    [0.5, 0.9], [0.9, 1]) scaled to ``num_betas`` points: the annealing slows
    down where the distribution changes fastest.

    Args:
        num_betas: K ≥ 2 intermediate distributions, endpoints included.

    Returns:
        ``(num_betas,)`` increasing, from 0 to 1.

    Examples:
        >>> ais_betas(5)
        tensor([0.0000, 0.5000, 0.9000, 0.9500, 1.0000], dtype=torch.float64)
    """
    num_betas = V.check_positive_int(num_betas, "num_betas", minimum=2)
    total = num_betas - 1  # number of steps
    n1 = max(1, round(total * 500 / 14500))
    n2 = max(1, round(total * 4000 / 14500)) if total - n1 >= 2 else 0
    n3 = total - n1 - n2
    if n3 < 1:  # very short schedules
        return torch.linspace(0.0, 1.0, num_betas, dtype=dtype, device=device)
    parts = [torch.linspace(0.0, 0.5, n1 + 1, dtype=dtype, device=device)[:-1]]
    if n2:
        parts.append(torch.linspace(0.5, 0.9, n2 + 1, dtype=dtype, device=device)[:-1])
        parts.append(torch.linspace(0.9, 1.0, n3 + 1, dtype=dtype, device=device))
    else:
        parts.append(torch.linspace(0.5, 1.0, n3 + 1, dtype=dtype, device=device))
    return torch.cat(parts)



def _estimate(model: Any, log_z0: torch.Tensor, lw: torch.Tensor, out_shape: tuple[int, ...]) -> AISEstimate:
    """log Ẑ = log Z_0 + log mean_m w_m and its standard error from float64 log weights
    ``lw (M, R)``, returned in the model's dtype with the batch shape ``out_shape``."""
    M = lw.shape[0]
    log_z = log_z0 + logsumexp(lw, 0) - math.log(M)
    w = torch.exp(lw - lw.amax(0, keepdim=True))
    stderr = w.std(0) / (math.sqrt(M) * w.mean(0))
    return AISEstimate(
        log_z.to(model.dtype).reshape(out_shape),
        stderr.to(model.dtype).reshape(out_shape),
        lw.to(model.dtype).reshape((M,) + tuple(out_shape)),
    )


def _check_betas(model: Any, betas: Any, num_betas: int) -> torch.Tensor:
    if betas is None:
        return ais_betas(num_betas, dtype=torch.float64, device=model.device)
    if not isinstance(betas, torch.Tensor) or not betas.dtype.is_floating_point:
        raise DTypeError(f"betas: expected a floating-point tensor, got {type(betas).__name__}")
    if betas.dim() != 1 or betas.numel() < 2:
        raise ShapeError(f"betas: expected shape (K,) with K >= 2, got {V.fmt_shape(betas.shape)}")
    if betas.device != model.device:
        raise DeviceError(f"betas is on device {betas.device} but the model is on {model.device}")
    if float(betas[0]) != 0.0 or float(betas[-1]) != 1.0 or not bool((betas[1:] >= betas[:-1]).all()):
        raise DomainError("betas: expected a non-decreasing schedule from exactly 0 to exactly 1")
    return betas


def _check_base_visible_bias(model: Any, b_A: Any) -> torch.Tensor:
    if b_A is None:
        return model.visible_bias.detach()
    if not isinstance(b_A, torch.Tensor) or b_A.dtype != model.dtype:
        raise DTypeError(
            f"base_visible_bias: expected a tensor of dtype {model.dtype}, got "
            f"{getattr(b_A, 'dtype', type(b_A).__name__)}"
        )
    V.check_shape(b_A, (model.num_visible,), "base_visible_bias", "(num_visible,)")
    if b_A.device != model.device:
        raise DeviceError(f"base_visible_bias is on device {b_A.device} but the model is on {model.device}")
    if not bool(torch.isfinite(b_A).all()):
        raise DomainError("base_visible_bias: expected finite values")
    return b_A.detach()


def _run_temperature(
    model: Any,
    lengths: torch.Tensor | None,
    num_chains: int,
    betas: torch.Tensor,
    base_visible_bias: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Log AIS weights ``(num_chains, R)`` for ``R`` = number of lengths (1 for the RBM).

    Everything (parameters, schedule, chains, increments) is float64 whatever the
    model's dtype: the same parameter values give the same weights in a float32
    and a float64 model.
    """
    f64 = torch.float64
    bern = model._bernoulli
    R = 1 if lengths is None else lengths.numel()
    M = num_chains
    rows = None if lengths is None else lengths.to(f64).reshape(1, R).expand(M, R).reshape(-1)
    b_A = base_visible_bias.detach().to(f64)
    b_B = model.visible_bias.detach().to(f64)
    W = model.weight.detach().to(f64)
    c = model.hidden_bias.detach().to(f64)
    betas = betas.to(f64)
    lw = torch.zeros(M * R, dtype=f64, device=model.device)
    with torch.no_grad():
        v = model._draw_visible(b_A.expand(M * R, model.num_visible), rows, generator)
        for i in range(1, betas.numel()):
            b_prev, b_cur = betas[i - 1], betas[i]
            u = model._input(v, rows, W, c)
            # log p*_β(v) = v·((1−β) b_A + β b) + Σ_j softplus(β u_j)
            lw += (b_cur - b_prev) * (v @ (b_B - b_A)) + (bern.log_partition(b_cur * u) - bern.log_partition(b_prev * u))
            if i == betas.numel() - 1:
                break
            h = bern.sample(b_cur * u, 1, generator=generator)[0]
            logits = (1 - b_cur) * b_A + b_cur * (b_B + h @ W.T)
            v = model._draw_visible(logits, rows, generator)
    return lw.reshape(M, R)


def temperature_ais(
    model: Any,
    lengths: torch.Tensor | None,
    out_shape: tuple[int, ...],
    inverse: torch.Tensor | None,
    num_chains: int,
    num_betas: int,
    betas: torch.Tensor | None,
    base_visible_bias: torch.Tensor | None,
    generator: torch.Generator | None,
) -> AISEstimate:
    """The temperature path (see the models' ``ais_log_partition``).

    Args:
        model: a :class:`~structgrad.BernoulliRBM` or :class:`~structgrad.ReplicatedSoftmax`.
        lengths: ``None`` (RBM) or ``(R,)`` the distinct document lengths (RSM).
        out_shape: shape of the result; ``inverse`` maps it to the R lengths (or ``None``).
        num_chains: M ≥ 2 runs per distinct length.
        num_betas: the schedule length for :func:`ais_betas` (ignored when ``betas``
            is given).
        betas: ``None`` or ``(S,)`` a non-decreasing schedule from 0 to 1.
        base_visible_bias: ``None`` (the model's visible bias) or ``(K,)`` b_A, the
            visible bias of the base model.
        generator: a ``torch.Generator`` on the model's device.

    Returns:
        :class:`AISEstimate` of shape ``out_shape``.
    """
    num_chains = V.check_positive_int(num_chains, "num_chains", minimum=2)
    V.check_generator(generator, model.device)
    betas = _check_betas(model, betas, num_betas)
    b_A = _check_base_visible_bias(model, base_visible_bias)
    lw = _run_temperature(model, lengths, num_chains, betas, b_A, generator)  # (M, R), float64
    log_z0 = model._base_log_z(b_A.to(torch.float64), None if lengths is None else lengths.to(torch.float64))
    if inverse is not None:
        log_z0, lw = log_z0[inverse], lw[:, inverse]
    return _estimate(model, log_z0, lw, out_shape)


def _run_length(model: Any, d_max: int, M: int, steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """Cumulative log AIS weights ``(d_max + 1, M)`` at the whole lengths 0..d_max, all in float64."""
    f64 = torch.float64
    dev = model.device
    W, b, a = (p.detach().to(f64) for p in (model.weight, model.visible_bias, model.hidden_bias))
    scaled = model.scale_hidden_bias
    bern = model._bernoulli

    def r(h: torch.Tensor) -> torch.Tensor:  # log π*_{t+1}(h) − log π*_t(h)
        out = logsumexp(b + h @ W.T, -1)
        return out + h @ a if scaled else out

    def gibbs_h(h: torch.Tensor, d: int) -> torch.Tensor:  # h → d words → h'
        if d == 0:
            u = torch.zeros_like(h) if scaled else a.expand_as(h)
        else:
            tot = torch.full((M,), d, dtype=torch.long, device=dev)
            v = multinomial_counts(b + h @ W.T, tot, generator=generator)
            u = (d * a if scaled else a) + v @ W
        return bern.sample(u, 1, generator=generator)[0]

    out = torch.zeros(d_max + 1, M, dtype=f64, device=dev)
    with torch.no_grad():
        h = gibbs_h(torch.zeros(M, model.num_hidden, dtype=f64, device=dev), 0)  # exact π_0
        r_h = r(h)
        lw = torch.zeros(M, dtype=f64, device=dev)
        n = d_max * steps
        for i in range(1, n + 1):
            lw += r_h / steps
            d, frac = divmod(i, steps)
            if frac == 0:
                out[d] = lw
            if i == n:
                break
            prop = gibbs_h(h, d)
            r_p = r(prop)
            if frac == 0:
                h, r_h = prop, r_p
            else:
                u = torch.rand(M, dtype=f64, device=dev, generator=generator)
                acc = torch.log(u) < (frac / steps) * (r_p - r_h)
                h = torch.where(acc.unsqueeze(-1), prop, h)
                r_h = torch.where(acc, r_p, r_h)
    return out


def length_ais(
    model: Any, lengths: torch.Tensor, num_chains: int, steps_per_word: int | None, generator: torch.Generator | None
) -> AISEstimate:
    """The RSM's document-length path (see :meth:`ReplicatedSoftmax.ais_log_partition`).

    Args:
        model: a :class:`~structgrad.ReplicatedSoftmax`.
        lengths: checked document lengths (float, integral values >= 1), any shape.
        num_chains: M ≥ 2 runs.
        steps_per_word: grid points per word (``None``: 1).
        generator: a ``torch.Generator`` on the model's device.

    Returns:
        :class:`AISEstimate` of ``lengths.shape``.
    """
    num_chains = V.check_positive_int(num_chains, "num_chains", minimum=2)
    steps = V.check_positive_int(1 if steps_per_word is None else steps_per_word, "steps_per_word")
    V.check_generator(generator, model.device)
    flat = lengths.reshape(-1).round().to(torch.long)
    d_max = int(flat.max()) if flat.numel() else 0
    lw = _run_length(model, d_max, num_chains, steps, generator)  # (d_max + 1, M)
    if model.scale_hidden_bias:
        log_z0 = torch.tensor(model.num_hidden * math.log(2.0), dtype=torch.float64, device=model.device)
    else:
        log_z0 = model._bernoulli.log_partition(model.hidden_bias.detach().to(torch.float64))
    return _estimate(model, log_z0, lw[flat].T, tuple(lengths.shape))
