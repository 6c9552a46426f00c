"""Argument checks and tensor kernels of the DPM objective (private).

Used by :mod:`structgrad.dpm` (see its docstring for the math); plain functions of
tensors, no state.  Both directions are computed together: a ``(2, B)`` tensor holds
in row 0 what the anchors x_i use and in row 1 what the anchors y_j use.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import checks as V
from . import logspace as ls
from .errors import DeviceError, DomainError, ShapeError

__all__ = [
    "ZETA_ESTIMATORS",
    "NEG_INF",
    "check_real",
    "check_xi",
    "check_estimator",
    "check_sim_shape",
    "sim_has_neginf",
    "check_index",
    "check_vector",
    "as_dtype",
    "work_dtype",
    "marginals",
    "finish",
]

#: the ζ estimators :class:`~structgrad.dpm.DPMLoss` accepts (see the docstring of :mod:`structgrad.dpm`).
ZETA_ESTIMATORS = ("seed", "unbiased")

NEG_INF = V.NEG_INF


# ---------------------------------------------------------------------------- checks
def check_real(x: Any, name: str, **bounds: Any) -> float:
    return V.check_real(x, name, tensors=True, **bounds)


def check_xi(x: Any, name: str) -> float:
    v = check_real(x, name, allow_inf=True)
    if v == NEG_INF:
        raise DomainError(f"{name}: expected a finite value or +inf (no offset), got -inf (an infinite offset)")
    return v


def check_estimator(x: Any) -> str:
    if x not in ZETA_ESTIMATORS:
        raise DomainError(f"zeta_estimator: expected one of {ZETA_ESTIMATORS}, got {x!r}")
    return x


def check_sim_shape(sim: Any, num_samples: int) -> int:
    """sim is a float (B, B) tensor with 2 <= B <= n; returns B."""
    V.check_float_tensor(sim, "sim")
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ShapeError(
            f"sim: expected a square (B, B) matrix with sim[i, j] = E(x_i, y_j), got shape {V.fmt_shape(sim.shape)}"
        )
    B = sim.shape[0]
    if B < 2:
        raise ShapeError(
            f"sim: expected B >= 2 pairs (each anchor needs a negative), got shape {V.fmt_shape(sim.shape)}"
        )
    if B > num_samples:
        raise ShapeError(
            f"sim: batch of B = {B} pairs is larger than the dataset (num_samples = {num_samples}); "
            f"expected B <= num_samples"
        )
    return B


def sim_has_neginf(sim: torch.Tensor) -> bool:
    """Check sim's values (no NaN or +inf; finite diagonal); True if it holds −inf (masked pairs)."""
    s = sim.detach()
    lo, hi = torch.aminmax(s)
    lo, hi, dmin = torch.stack((lo, hi, s.diagonal().amin())).tolist()
    if not hi < math.inf:
        raise DomainError("sim: expected finite scores (or -inf for an impossible pair), got NaN or +inf")
    if dmin == NEG_INF:
        raise DomainError("sim: expected a finite diagonal (the positive pairs sim[i, i]), got -inf there")
    return lo == NEG_INF


def check_index(index: Any, B: int, num_samples: int, device: torch.device) -> torch.Tensor:
    index = V.check_index_tensor(index, "index")
    V.check_shape(index, (B,), "index", "(the dataset position of each row of sim)")
    if index.device != device:
        raise DeviceError(f"index is on device {index.device} but sim is on {device}; expected the same device")
    srt = torch.sort(index).values  # one sort gives min, max and duplicates, one host sync
    same = srt[1:] == srt[:-1]
    lo, hi, dup = torch.stack((srt[0].long(), srt[-1].long(), same.any().long())).tolist()
    if lo < 0 or hi >= num_samples:
        raise DomainError(
            f"index: expected dataset positions in [0, {num_samples - 1}] (num_samples = {num_samples}), "
            f"got min {lo} and max {hi}"
        )
    if dup:
        d = srt[1:][same].unique()[:5].tolist()
        raise DomainError(
            f"index: expected distinct dataset positions in one batch (each pair once), got duplicates {d}"
        )
    return index.to(torch.long)  # index_copy_/index_fill_ need int64; any integer dtype is accepted


def check_vector(x: Any, name: str, B: int, device: torch.device) -> torch.Tensor:
    V.check_float_tensor(x, name)
    V.check_shape(x, (B,), name, "(one value per pair in the batch)")
    if x.device != device:
        raise DeviceError(f"{name} is on device {x.device} but sim is on {device}; expected the same device")
    return x


# ---------------------------------------------------------------------------- kernels
# Both directions are computed together.  A "(2, B)" tensor holds in row 0 what the
# anchors x_i use (their s; ζ, ξ of their candidates y_j) and in row 1 what the anchors
# y_j use (their s; ζ, ξ of their candidates x_i).  The state is laid out the same way.
def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    wd = torch.float32
    for d in dtypes:
        wd = torch.promote_types(wd, d)
    return wd


def marginals(sim: torch.Tensor, nzs: torch.Tensor, tau: float, wd: torch.dtype, masked: bool):
    """Both directions' categorical marginals over the candidates and log-partitions.

    The anchors x_i have logits L_ij = (E_ij − E_ii − ζ_j)/τ over the candidates j ≠ i (the
    positive is left out), the anchors y_j have L_ij = (E_ij − E_jj − ζ_i)/τ over i ≠ j.
    E_aa only shifts an anchor's logits, so the marginals π are the softmax of
    A = E/τ − ζ/τ (diagonal −inf) and log Σ exp(L) = logsumexp(A) − E_aa/τ, where
    logsumexp(A) = max A − log max π (the largest marginal is exp(max A − logsumexp A)),
    one fused softmax and two max passes per direction.

    Args:
        sim: ``(B, B)`` the similarities E.
        nzs: ``(2, B)`` −ζ/τ of the candidates of each direction.
        tau: the temperature τ > 0.
        wd: the working dtype the similarities are cast to.
        masked: ``sim`` holds −inf (masked pairs): an anchor whose candidates are all
            impossible gets lse = −inf instead of NaN.

    Returns:
        (tuple[torch.Tensor, torch.Tensor, torch.Tensor]): ``(pi_x, pi_y, lse)``, π_x
            ``(B, B)`` with rows summing to 1, π_y ``(B, B)`` with columns summing to 1,
            and ``lse (2, B)`` the two directions' log-partitions.
    """
    E = as_dtype(sim.detach(), wd)
    r = 1.0 / tau
    Ax = torch.add(nzs[0], E, alpha=r)
    Ay = torch.add(nzs[1].unsqueeze(1), E, alpha=r)
    Ax.diagonal().fill_(NEG_INF)
    Ay.diagonal().fill_(NEG_INF)
    # the categorical marginals (an anchor whose candidates are all impossible: zeros)
    pi_x, pi_y = ls.softmax(Ax, 1), ls.softmax(Ay, 0)
    top = torch.stack((pi_x.amax(1), pi_y.amax(0))).log_()
    lse = torch.stack((Ax.amax(1), Ay.amax(0))).sub_(top).sub_(E.diagonal(), alpha=r)
    if masked:
        lse.nan_to_num_(nan=NEG_INF)  # (−inf) − (−inf) for those anchors: Σ exp(L) = 0
    return pi_x, pi_y, lse


def finish(sim, pi_x, pi_y, lse, log_s, nzs, xi, tau, n, estimator, masked) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Weights, surrogate, monitors and n Ĝ_ζ from both directions.

    Args (rows as above): π_x, π_y, ``lse`` from :func:`marginals` (π_x is overwritten);
    ``log_s (2, B)`` log s of the anchors for this batch; ``nzs (2, B)`` −ζ/τ of the
    candidates; ``xi (2,)`` ξ of the candidates.
    Returns the fields of a :class:`~structgrad.dpm.DPMOutput` (surrogate, objective,
    objective_x, objective_y, zeta_grad_x, zeta_grad_y) and n Ĝ_ζ ``(2, B)`` of the
    candidates, in the working dtype.

    W_aj = exp(L_aj)/(offset + s_a) = rho_a π_aj with rho_a = S_a/(offset + s_a) ≤ 1/γ
    (S_a = exp(lse_a)), and q_aj = kappa_a π_aj likewise: no factor that could overflow
    is ever formed.
    """
    B = pi_x.shape[0]
    log_ratio = math.log(B - 1) - math.log(n - 1)  # log((B−1)/(n−1))
    log_norm = ls.logaddexp(log_s, xi.div(-tau).add_(log_ratio).unsqueeze(1))  # log(offset + s)
    rb = (lse - log_norm).sub_(math.log(B)).exp_()  # Σ_j W_aj / B
    if masked:
        rb.nan_to_num_(nan=0.0)  # S_a = 0 and no offset
    # (n−1) s̃_a = exp(−ζ_a/τ) + ((n−1)/(B−1)) s_a; exp(−ζ_a/τ)/(n−1) is offset_tilde
    log_t = ls.logaddexp(nzs, log_s - log_ratio)
    kappa, q_diag = torch.stack((lse, nzs)).sub_(log_t).exp_().unbind()
    kx, ky = kappa.unbind()
    col = torch.stack((torch.mv(pi_x.t(), kx), torch.mv(pi_y, ky)))  # Σ_{a≠c} q_ac
    if estimator == "seed":
        g = col.add_(q_diag).mul_(-n / B).add_(1.0)
    else:
        g = col.mul_(-(n - 1) / (B - 1)).sub_(q_diag).add_(1.0)
    obj = as_dtype(log_norm.mean(1).sub_(log_ratio).mul_(tau), sim.dtype)
    C = pi_x.mul_(rb[0].unsqueeze(1)).addcmul_(pi_y, rb[1])
    C.diagonal().sub_(rb.sum(0))  # the diagonal of π is 0
    # the surrogate <C, sim> through autograd: its gradient with respect to sim is C
    s = as_dtype(sim, C.dtype)
    if masked:
        s = s.masked_fill(torch.isneginf(s.detach()), 0.0)  # C is 0 there: no 0·(−inf)
    obj_x, obj_y = obj.unbind()
    g_y, g_x = as_dtype(g, sim.dtype).unbind()
    surrogate = as_dtype(torch.dot(s.reshape(-1), C.reshape(-1)), sim.dtype)
    return (surrogate, obj.sum(), obj_x, obj_y, g_x, g_y), g
