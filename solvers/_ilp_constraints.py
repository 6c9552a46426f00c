"""Constraint systems of the ``ilp`` solver: reading A, b, exact rational scaling, feasibility.

The solver works on an integer system.  Integer coefficients (any integer dtype, or
floats with integral values) are taken as they are.  A row with non-integral
coefficients is read as rationals and scaled to integers exactly:

1. each non-integral coefficient x, given in a floating dtype with spacing ``ulp(x)``
   between x and its neighbours in that dtype (float64, float32, float16, bfloat16;
   Python floats are float64), is read as the fraction p/q with the **smallest
   denominator** q among the fractions within half a unit in the last place of x,
   |x − p/q| ≤ ulp(x)/2 (the simplest fraction that the float stands for: 0.07 in
   float64 or in float32 is read as 7/100, 1/3 in float64 as 1/3).  It must have
   q ≤ ``max_denominator`` (default 10^6), else :class:`~structgrad.errors.DomainError`
   names the coefficient: nothing is ever rounded silently;
2. the row (its coefficients and its right-hand side) is multiplied by the least
   common multiple L of its denominators, which gives integers and the same set of
   solutions; L is the row's ``row_scale`` (1 for integer rows).  If the scaled row
   does not fit the int64 headroom (Σ|coefficients| + |rhs| < 2^62) a
   :class:`~structgrad.errors.DomainError` names the row and L.

Every z the solver returns satisfies the scaled integer system exactly (checked with
exact integer arithmetic), hence the rational system exactly; against the given
floats x themselves it satisfies each row up to the rounding of those floats,
Σ_j x_j z_j ≤ β + ½(Σ_j ulp(x_j) z_j + ulp(β)) (β the given right-hand side; the
same bound both ways for equality rows).

Complexity: O(m·n) for integer systems; for non-integral coefficients, one
continued-fraction expansion (O(log q) steps on exact fractions) per distinct value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from structgrad.checks import fmt_shape
from structgrad.errors import DomainError, DTypeError, ShapeError

__all__ = ["ConstraintSystem", "read_system", "MAX_ABS", "DEFAULT_MAX_DENOMINATOR"]

MAX_ABS = 2**62  # bound on Σ_j |A_ij| + |b_i| and on n · 2^objective_bits (int64 headroom)
DEFAULT_MAX_DENOMINATOR = 10**6

_TORCH_FLOATS = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


@dataclass(frozen=True)
class ConstraintSystem:
    """The integer system {z ∈ {0,1}^n : A z ≤ b, A_eq z = b_eq} (read-only int64 arrays).

    ``row_scale``/``row_scale_eq`` hold the factor each given row was multiplied by
    (1 for integer rows).  ``empty_row_infeasible`` is a reason when an all-zero row
    excludes 0 (then no z is feasible, whatever θ is).
    """

    A: np.ndarray
    b: np.ndarray
    A_eq: np.ndarray
    b_eq: np.ndarray
    row_scale: np.ndarray
    row_scale_eq: np.ndarray

    @property
    def n(self) -> int:
        return int(self.A.shape[1])

    @property
    def rows(self) -> np.ndarray:
        """``(m + p, n)``: the rows of A, then of A_eq."""
        return np.concatenate([self.A, self.A_eq])

    @property
    def rhs(self) -> np.ndarray:
        return np.concatenate([self.b, self.b_eq])

    @property
    def is_eq(self) -> np.ndarray:
        return np.concatenate([np.zeros(len(self.b), dtype=bool), np.ones(len(self.b_eq), dtype=bool)])

    def row_name(self, r: int) -> str:
        """``"A row r"`` or ``"A_eq row r'"`` for a row index of :attr:`rows`."""
        m = len(self.b)
        return f"A row {r}" if r < m else f"A_eq row {r - m}"

    @property
    def empty_row_infeasible(self) -> str | None:
        rows, rhs, is_eq = self.rows, self.rhs, self.is_eq
        for r in np.flatnonzero(~rows.any(1)):
            bad = rhs[r] != 0 if is_eq[r] else rhs[r] < 0
            if bad:
                return f"{self.row_name(int(r))} is all zeros but its right-hand side {int(rhs[r])} excludes 0"
        return None

    def row_values(self, Z: np.ndarray) -> np.ndarray:
        """``(B, m + p)``: (A z, A_eq z) for each row z of ``Z (B, n)`` with entries in {0, 1},
        exactly: from the nonzeros (O(B·nnz)), in float64 when every partial sum is an
        integer below 2^53, else in int64."""
        B, R = Z.shape[0], len(self.b) + len(self.b_eq)
        if not self._nz_val.size:
            return np.zeros((B, R), dtype=np.int64)
        picked = Z[:, self._nz_col]  # (B, nnz)
        bins = (self._nz_row + R * np.arange(B)[:, None]).ravel()
        size = B * R
        if self._sums_exact:
            r = np.bincount(bins, weights=(picked * self._nz_valf).ravel(), minlength=size)
        else:
            r = np.zeros(size, dtype=np.int64)
            np.add.at(r, bins, (picked * self._nz_val).ravel())
        return r.reshape(B, R)

    def feasible(self, Z: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: rows of ``Z (B, n)`` in {0,1}^n satisfying the system, exactly."""
        ok = ((Z == 0) | (Z == 1)).all(1)
        r = self.row_values(np.where(ok[:, None], Z, 0))
        m = len(self.b)
        return ok & (r[:, :m] <= self.b).all(1) & (r[:, m:] == self.b_eq).all(1)

    def first_infeasible(self, Z: np.ndarray) -> int:
        """The first row of ``Z (B, n)`` that :meth:`feasible` rejects, or −1.  Few array
        operations when all pass (this runs on every call): z ≥ 2 or z < 0 shows in
        ``z >> 1``; then, for small systems, every row (equalities as two inequalities)
        in one int64 product with a dense copy (no overflow: z is in {0, 1} by then),
        for large ones :meth:`row_values` from the nonzeros."""
        ok = not np.count_nonzero(Z >> 1)
        if ok and self._W is not None:
            ok = not np.count_nonzero(Z @ self._W > self._w)
        elif ok:
            r = self.row_values(Z)
            m = len(self.b)
            ok = not np.count_nonzero(r[:, :m] > self.b) and not np.count_nonzero(r[:, m:] != self.b_eq)
        return -1 if ok else int(np.flatnonzero(~self.feasible(Z))[0])

    def __post_init__(self) -> None:
        rows = self.rows
        nz_row, nz_col = np.nonzero(rows)
        val = rows[nz_row, nz_col]
        for k, v in (("_nz_row", nz_row), ("_nz_col", nz_col), ("_nz_val", val), ("_nz_valf", val.astype(np.float64))):
            object.__setattr__(self, k, v)
        exact = rows.size == 0 or np.abs(rows).astype(np.float64).sum(1).max() < 2**53
        object.__setattr__(self, "_sums_exact", bool(exact))
        # small systems: rows as one dense "≤" system A z ≤ b, A_eq z ≤ b_eq, −A_eq z ≤ −b_eq
        small = self.n * (len(self.b) + 2 * len(self.b_eq)) <= 1 << 14
        W = np.ascontiguousarray(np.concatenate([self.A, self.A_eq, -self.A_eq]).T) if small else None
        object.__setattr__(self, "_W", W)
        object.__setattr__(self, "_w", np.concatenate([self.b, self.b_eq, -self.b_eq]))


# ----------------------------------------------------------------------------- reading
def _as_array(x: Any, name: str, ndim: int) -> tuple[np.ndarray, Any]:
    """``x`` as a NumPy array with ``ndim`` dims, and the floating dtype its values were
    given in (a torch or NumPy dtype; ``None`` for integers and booleans)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype.is_complex:
            raise DTypeError(f"{name}: expected real coefficients, got dtype {t.dtype}")
        src = t.dtype if t.dtype in _TORCH_FLOATS else None
        arr = (t.double() if src is not None else t.long()).numpy()
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise ShapeError(f"{name}: expected a rectangular array of numbers, got {type(x).__name__} ({e})") from None
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
            raise DTypeError(f"{name}: expected float64 or narrower coefficients, got dtype {arr.dtype}")
        src = arr.dtype if arr.dtype.kind == "f" else None
        if arr.dtype == np.bool_:
            arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        raise DTypeError(f"{name}: expected real coefficients (an integer or floating array), got dtype {arr.dtype}")
    if arr.ndim != ndim:
        want = "(m, n)" if ndim == 2 else "(m,)"
        raise ShapeError(f"{name}: expected a {ndim}-D array of shape {want}, got shape {fmt_shape(arr.shape)}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DomainError(
                f"{name}: expected finite coefficients, got {float(arr[bad].flat[0])} at index "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}"
            )
        if arr.size and np.abs(arr).max() >= MAX_ABS:
            raise DomainError(f"{name}: expected coefficients of magnitude < 2^62, got {np.abs(arr).max():g}")
        arr = arr.astype(np.float64)
    elif arr.dtype.kind == "u" and arr.size and int(arr.max()) >= MAX_ABS:
        raise DomainError(f"{name}: expected coefficients of magnitude < 2^62, got {int(arr.max())}")
    return arr, src


def _neighbours(values: np.ndarray, src: Any) -> tuple[np.ndarray, np.ndarray]:
    """The next float below and above each of ``values`` (float64) in dtype ``src``."""
    tdt = src if isinstance(src, torch.dtype) else torch.from_numpy(np.zeros(0, dtype=src)).dtype
    t = torch.from_numpy(values).to(tdt)
    inf = torch.full_like(t, math.inf)
    return torch.nextafter(t, -inf).double().numpy(), torch.nextafter(t, inf).double().numpy()


def simplest_fraction(lo: Fraction, hi: Fraction) -> Fraction:
    """The fraction with the smallest denominator in ``[lo, hi]`` (0 ≤ lo ≤ hi), by the
    continued-fraction (Stern–Brocot) descent."""
    f = math.floor(lo)
    if f == lo:
        return Fraction(f)
    if f + 1 <= hi:
        return Fraction(f + 1)
    return f + 1 / simplest_fraction(1 / (hi - f), 1 / (lo - f))


def _rationals(arr: np.ndarray, src: Any, name: str, max_den: int) -> np.ndarray:
    """Object array of Fractions (non-integral entries) and ints (integral entries)."""
    out = np.empty(arr.shape, dtype=object)
    integral = arr == np.round(arr)
    out[integral] = [int(v) for v in arr[integral]]
    frac = ~integral
    if not frac.any():
        return out
    values, inverse = np.unique(arr[frac], return_inverse=True)
    below, above = _neighbours(values, src)
    got = []
    for k, (x, lo, hi) in enumerate(zip(values, below, above)):
        X = Fraction(float(x))
        a, b = (X + Fraction(float(lo))) / 2, (X + Fraction(float(hi))) / 2
        r = simplest_fraction(a, b) if X > 0 else -simplest_fraction(-b, -a)
        if r.denominator > max_den:
            at = tuple(int(i) for i in np.argwhere(frac & (arr == x))[0])
            raise DomainError(
                f"{name}: coefficient {float(x)!r} at index {at} is not within half a unit in the last place "
                f"(of its dtype) of a fraction with denominator <= max_denominator={max_den} (the simplest "
                f"fraction there has denominator {r.denominator}); round the coefficients (e.g. to a few "
                f"decimals) or raise max_denominator"
            )
        got.append(r)
    out[frac] = [got[i] for i in inverse]
    return out


def _scale_rows(A: np.ndarray, b: np.ndarray, nameA: str, nameb: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer rows from rows of ints/Fractions: each row times the lcm of its denominators."""
    m, n = A.shape
    As = np.zeros((m, n), dtype=np.int64)
    bs = np.zeros(m, dtype=np.int64)
    scale = np.ones(m, dtype=np.int64)
    for i in range(m):
        row = list(A[i]) + [b[i]]
        L = math.lcm(*(v.denominator if isinstance(v, Fraction) else 1 for v in row))
        ints = [int(v * L) for v in row]
        size = sum(abs(v) for v in ints)
        if size >= MAX_ABS:
            what = f"times the common denominator {L} of its fractions " if L > 1 else ""
            raise DomainError(
                f"{nameA}: row {i} {what}has Σ|coefficients| + |{nameb}[{i}]| = {float(size):.3g}, expected < 2^62 "
                f"(int64 overflow)" + ("; use fewer decimals or smaller denominators" if L > 1 else "")
            )
        As[i] = ints[:n]
        bs[i] = ints[n]
        scale[i] = L
    return As, bs, scale


def _pair(A: Any, b: Any, nameA: str, nameb: str, max_den: int):
    if A is None and b is None:
        return None
    if A is None or b is None:
        given, missing = (nameA, nameb) if b is None else (nameb, nameA)
        raise ShapeError(f"{missing}: expected it together with {given}, got None")
    Am, srcA = _as_array(A, nameA, 2)
    bm, srcb = _as_array(b, nameb, 1)
    if bm.shape != (Am.shape[0],):
        raise ShapeError(
            f"{nameb}: expected shape ({Am.shape[0]},), one entry per row of {nameA} {fmt_shape(Am.shape)}, "
            f"got {fmt_shape(bm.shape)}"
        )
    integral = (srcA is None or bool((Am == np.round(Am)).all())) and (srcb is None or bool((bm == np.round(bm)).all()))
    if integral:
        Ai, bi = Am.astype(np.int64), bm.astype(np.int64)
        size = np.abs(Ai).astype(np.float64).sum(1) + np.abs(bi).astype(np.float64)
        if size.size and size.max() >= MAX_ABS:
            r = int(size.argmax())
            raise DomainError(
                f"{nameA}: row {r} has Σ|coefficients| + |{nameb}[{r}]| ≈ {size[r]:.3g}, expected < 2^62 (int64 overflow)"
            )
        return Ai, bi, np.ones(len(bi), dtype=np.int64)
    RA = _rationals(Am, srcA, nameA, max_den) if srcA is not None else Am.astype(object)
    Rb = _rationals(bm, srcb, nameb, max_den) if srcb is not None else bm.astype(object)
    return _scale_rows(RA, Rb, nameA, nameb)


def read_system(A: Any, b: Any, A_eq: Any, b_eq: Any, max_denominator: int) -> ConstraintSystem:
    """Check and read the constraints (see the module docstring) into a :class:`ConstraintSystem`."""
    ineq = _pair(A, b, "A", "b", max_denominator)
    eq = _pair(A_eq, b_eq, "A_eq", "b_eq", max_denominator)
    if ineq is None and eq is None:
        raise ShapeError(
            "A: expected A (m, n) with b (m,), and/or A_eq (p, n) with b_eq (p,), to give the number "
            "of variables n; got neither (for no '<=' rows pass A of shape (0, n) and b of shape (0,))"
        )
    if ineq is not None and eq is not None and ineq[0].shape[1] != eq[0].shape[1]:
        raise ShapeError(
            f"A_eq: expected {ineq[0].shape[1]} columns like A {fmt_shape(ineq[0].shape)}, "
            f"got shape {fmt_shape(eq[0].shape)}"
        )
    n = (ineq or eq)[0].shape[1]
    empty = (np.zeros((0, n), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    parts = [*(ineq or empty), *(eq or empty)]
    for p in parts:
        p.setflags(write=False)
    A_, b_, s_, Aeq_, beq_, seq_ = parts
    return ConstraintSystem(A=A_, b=b_, A_eq=Aeq_, b_eq=beq_, row_scale=s_, row_scale_eq=seq_)
