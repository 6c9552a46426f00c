"""The machinery both RBMs of :mod:`structgrad.rbm` share (private).

:class:`RBMBase` holds the parameters (W, visible bias, hidden bias) and what does
not depend on the visible layer's law: argument checks, the free energy through the
``bernoulli`` solver's log-partition, hidden marginals and draws, block-Gibbs sweeps,
the contrastive-divergence surrogate, and the persistent (PCD) chains with their
state-dict handling.  A subclass supplies the hooks listed in the class docstring.
The math is in the docstring of :mod:`structgrad.rbm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import checks as V
from .errors import DeviceError, DomainError, DTypeError, ShapeError
from .registry import get_solver

__all__ = ["RBMBase", "hidden_states", "check_hidden", "check_log_z"]

_REDUCTIONS = ("mean", "sum")
_PARAMETERS = ("weight", "visible_bias", "hidden_bias")


def hidden_states(num_hidden: int, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows ``start..stop-1`` of the 2^F binary hidden configurations (bit j of the index)."""
    idx = torch.arange(start, stop, device=device)
    bits = torch.arange(num_hidden, device=device)
    return ((idx.unsqueeze(-1) >> bits) & 1).to(dtype)



class RBMBase(nn.Module):
    """Shared machinery: validation, Gibbs sweeps, the CD loss, PCD chains.

    Subclasses define the hooks ``_check_values`` (allowed visible values),
    ``_lengths`` (D per document, or ``None``), ``_input`` (u with
    p(h_j = 1 | v) = σ(u_j), for given parameters), ``_draw_visible`` (a draw from
    p(v | h) given its logits), ``_base_log_z`` (log Z of the AIS base model) and,
    for PCD, ``_pcd_negatives`` (the RSM overrides the default: one chain per
    document of the batch, words drawn at its length).
    """

    def __init__(
        self,
        num_visible: int,
        num_hidden: int,
        *,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.num_visible = V.check_positive_int(num_visible, "num_visible")
        self.num_hidden = V.check_positive_int(num_hidden, "num_hidden")
        init_std = V.check_real(init_std, "init_std", lo=0.0, what="a float")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise DTypeError(
                f"dtype: expected a floating-point torch.dtype (e.g. torch.float32) or None, got {type(dtype).__name__}"
            )
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise DTypeError(f"dtype: expected a floating-point dtype, got {dtype}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        V.check_generator(generator, device)
        w = torch.randn(self.num_visible, self.num_hidden, dtype=dtype, device=device, generator=generator)
        self.weight = nn.Parameter(w * init_std)
        self.visible_bias = nn.Parameter(torch.zeros(self.num_visible, dtype=dtype, device=device))
        self.hidden_bias = nn.Parameter(torch.zeros(self.num_hidden, dtype=dtype, device=device))
        # PCD chains: a buffer, so .to() moves it and state_dict() saves it once it exists
        # (see _load_from_state_dict for loading a state dict with or without it).
        self.register_buffer("persistent_chains", None)
        # No per-call NaN check (a host sync in every sweep): inputs are checked finite, and
        # the samplers check the parameters once per call (_check_parameters).
        self._bernoulli = get_solver("bernoulli", validate=False)

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (inputs are checked against it)."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.weight.device

    def extra_repr(self) -> str:
        return f"num_visible={self.num_visible}, num_hidden={self.num_hidden}"

    # ------------------------------------------------------------------ validation
    def _check_visible(self, v: Any, name: str, *, strict: bool = False) -> torch.Tensor:
        """Type, dtype, device, shape and value checks; integer/bool input is cast."""
        if not isinstance(v, torch.Tensor):
            raise DTypeError(f"{name}: expected a torch.Tensor of shape (*batch, {self.num_visible}), got {type(v).__name__}")
        if v.dtype.is_complex:
            raise DTypeError(f"{name}: expected a real tensor, got dtype {v.dtype}")
        if v.device != self.device:
            raise DeviceError(
                f"{name} is on device {v.device} but the model's parameters are on {self.device}; "
                f"expected the same device (move one with .to())"
            )
        if v.dtype.is_floating_point:
            if v.dtype != self.dtype:
                raise DTypeError(
                    f"{name}: expected dtype {self.dtype} (the model's parameters), got {v.dtype}; "
                    f"convert with {name}.to({self.dtype}) or the model with .to({v.dtype})"
                )
        else:
            v = v.to(self.dtype)  # integer counts / bool bits are exact in any float dtype we accept
        if v.dim() == 0 or v.shape[-1] != self.num_visible:
            raise ShapeError(
                f"{name}: expected shape (*batch, {self.num_visible}) (num_visible = {self.num_visible}), "
                f"got {V.fmt_shape(v.shape)}"
            )
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise DomainError(f"{name}: expected finite values, got NaN or inf")
        self._check_values(v, name, strict)
        return v

    def _check_generator(self, generator: Any) -> None:
        V.check_generator(generator, self.device)

    def _check_k(self, k: Any, minimum: int = 1) -> int:
        return V.check_positive_int(k, "k", minimum=minimum)

    def _check_parameters(self) -> None:
        """Refuse parameters that are not finite (one host synchronisation).

        A NaN or infinite weight or bias has no distribution to sample from: the
        conditionals' logits turn NaN, and a draw would come out as garbage (an RSM
        document with no words).  Every sampling entry point (``gibbs``, ``cd_loss``,
        ``persistent_negatives``, ``sample_hidden``, ``sample_visible``, AIS) calls this
        first; deterministic ones (``free_energy``, ``log_prob``) propagate NaN as
        torch does.

        Raises:
            DomainError: naming the parameter, the count of NaN / ±inf entries and the
                index of the first (e.g. after a diverged optimizer step).
        """
        params = [getattr(self, name) for name in _PARAMETERS]
        if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        for name, p in zip(_PARAMETERS, params):
            bad = ~torch.isfinite(p.detach())
            if bool(bad.any()):
                nan = int(torch.isnan(p).sum())
                inf = int(bad.sum()) - nan
                what = " and ".join(f"{c} {label}" for c, label in ((nan, "NaN"), (inf, "inf")) if c)
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                raise DomainError(
                    f"{name}: expected finite parameters, got {what} (first at index {first}); "
                    f"the model cannot be sampled (did an optimizer step diverge?)"
                )

    def _check_values(self, v: torch.Tensor, name: str, strict: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _lengths(self, v: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ energies
    def _input(
        self, v: torch.Tensor, lengths: torch.Tensor | None, weight: torch.Tensor, hidden_bias: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """u with p(h_j = 1 | v) = σ(u_j), for the given weight and hidden bias (AIS passes float64 copies)."""
        raise NotImplementedError

    def _hidden_input(self, v: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        return self._input(v, lengths, self.weight, self.hidden_bias)

    def _visible_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.visible_bias + h @ self.weight.T

    def _free_energy(self, v: torch.Tensor) -> torch.Tensor:
        u = self._hidden_input(v, self._lengths(v))
        return -(v @ self.visible_bias) - self._bernoulli.log_partition(u)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = −log Σ_h exp(−E(v, h)), differentiable in the parameters.

        Args:
            v: ``(*batch, K)`` visible vectors (see the class docstring for values).

        Returns:
            ``(*batch,)`` free energies, in the parameters' dtype.
        Complexity: O(B·K·F).
        """
        return self._free_energy(self._check_visible(v, "v"))

    def hidden_marginals(self, v: torch.Tensor) -> torch.Tensor:
        """p(h_j = 1 | v) = σ(u_j), the ``bernoulli`` solver's marginals of u.

        Args:
            v: ``(*batch, K)``.

        Returns:
            ``(*batch, F)``, differentiable.
        """
        v = self._check_visible(v, "v")
        return self._bernoulli.marginals(self._hidden_input(v, self._lengths(v)))

    def sample_hidden(self, v: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw h ∼ p(h | v) (independent Bernoulli bits).

        Args:
            v: ``(*batch, K)``.
            generator: a ``torch.Generator`` on the model's device (``None``: torch's default).

        Returns:
            ``(*batch, F)`` in {0, 1}, detached.
        """
        v = self._check_visible(v, "v")
        self._check_generator(generator)
        self._check_parameters()
        with torch.no_grad():
            return self._sample_hidden(v, self._lengths(v), generator)

    def _sample_hidden(self, v: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        return self._bernoulli.sample(self._hidden_input(v, lengths), 1, generator=generator)[0]

    def _draw_visible(self, logits: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _gibbs(self, v: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        lengths = self._lengths(v)
        with torch.no_grad():
            for _ in range(k):
                h = self._sample_hidden(v, lengths, generator)
                v = self._draw_visible(self._visible_logits(h), lengths, generator)
        return v

    def gibbs(self, v: torch.Tensor, k: int = 1, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """k block-Gibbs sweeps v → h ∼ p(h|v) → v' ∼ p(v|h), under ``no_grad``.

        Args:
            v: ``(*batch, K)`` chain starts (not modified).
            k: number of sweeps, ≥ 0 (0 returns a copy).
            generator: a ``torch.Generator`` on the model's device.

        Returns:
            ``(*batch, K)`` the chains after k sweeps, detached (RSM: each document
                keeps its length D).
        Complexity: O(k·B·K·F) (+ O(k·B·max D) for the RSM's word draws).
        """
        v = self._check_visible(v, "v")
        k = self._check_k(k, minimum=0)
        self._check_generator(generator)
        if k == 0:
            return v.detach().clone()
        self._check_parameters()
        return self._gibbs(v.detach(), k, generator)

    # ------------------------------------------------------------------ contrastive divergence
    def cd_loss(
        self,
        v0: torch.Tensor,
        k: int = 1,
        *,
        persistent: bool = False,
        negatives: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Contrastive-divergence surrogate mean_n F(v⁰_n) − mean_m F(v^k_m).

        Its value means nothing; its gradient is the CD-k (or PCD-k) estimate of the
        negative log-likelihood gradient (see the module docstring for the formulas).

        Args:
            v0: ``(*batch, K)`` data.
            k: Gibbs sweeps for the negative phase (≥ 1).
            persistent: ``False``: CD-k, chains start at ``v0``.  ``True``: PCD-k, the
                negatives come from :meth:`persistent_negatives` (chains kept in
                ``self.persistent_chains`` between calls; the RSM draws each negative
                at the length of its own document of ``v0``).  Clear them with
                :meth:`reset_chains`.
            negatives: ``(*batch', K)`` given negative samples (then no sampling;
                ``k`` and ``persistent`` are not used), e.g. from your own sampler.
            generator: a ``torch.Generator`` on the model's device.
            reduction: ``"mean"`` (the default) or ``"sum"`` (= B × mean, B the number
                of data vectors: the same gradient with the learning rate × B).

        Returns:
            A scalar; ``loss.backward()`` gives the CD gradient in ``.grad``.
        Complexity: O(k·B·K·F).
        """
        v0 = self._check_visible(v0, "v0")
        if reduction not in _REDUCTIONS:
            raise DomainError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
        if not isinstance(persistent, bool):
            raise DTypeError(f"persistent: expected a bool, got {type(persistent).__name__}")
        if v0.numel() == 0:
            raise ShapeError(f"v0: expected at least one data vector, got shape {V.fmt_shape(v0.shape)}")
        self._check_generator(generator)
        if negatives is not None:
            if persistent:
                raise DomainError("negatives: given together with persistent=True; expected one of the two")
            vk = self._check_visible(negatives, "negatives").detach()
            if vk.numel() == 0:
                raise ShapeError(f"negatives: expected at least one vector, got shape {V.fmt_shape(vk.shape)}")
        else:
            k = self._check_k(k)
            self._check_parameters()
            if persistent:
                vk = self._pcd_negatives(v0.detach().reshape(-1, self.num_visible), k, generator)
            else:
                vk = self._gibbs(v0.detach(), k, generator)
        loss = self._free_energy(v0).mean() - self._free_energy(vk).mean()
        if reduction == "sum":
            loss = loss * (v0.numel() // self.num_visible)
        return loss

    def persistent_negatives(
        self, v0: torch.Tensor, k: int = 1, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Advance the persistent (PCD) chains by k sweeps and return the negative samples.

        ``cd_loss(v0, k, persistent=True)`` is ``cd_loss(v0, negatives=persistent_negatives(v0, k))``
        (same generator state, same result).  What persists, and how many negatives come
        back, depends on the model:

        * :class:`BernoulliRBM`: ``self.persistent_chains`` ``(M, K)`` holds visible
          states, M set by the first batch (its rows are the chain starts); every call
          runs k sweeps v → h → v on all M chains and returns them, whatever the
          size of ``v0``.
        * :class:`ReplicatedSoftmax`: the negative phase of a document of length D_n is
          under p_{D_n}, so every call draws the words at the current documents'
          lengths.  ``self.persistent_chains`` ``(M, K)`` holds each chain's last
          document (of the length it was last drawn for).  Row n of ``v0``
          (flattened) takes the n-th chain in first-in-first-out order and runs k
          sweeps: h ∼ p(h | chain's document), then D_n words ∼ p(v | h), then
          h ∼ p(h | those words), ...; the k-th draw of D_n words is the negative and
          replaces the chain's document, which goes to the back of the queue, so
          successive smaller batches use the chains in turn.  The chain's old document
          reaches the negative only through h, so the negative has the current length
          D_n.  The chains start at the first batch's
          documents (the first call is CD-k exactly), and when a batch has more rows
          than there are chains, the rows without one start new chains at their data.
          Returns ``v0.shape``: one negative per document, of its length.

        Args:
            v0: ``(*batch, K)`` the current data (for the RSM its lengths; also the
                chain starts on the first call).
            k: sweeps per call, ≥ 1.
            generator: a ``torch.Generator`` on the model's device.

        Returns:
            The negatives, detached: ``(M, K)`` (RBM) or ``v0.shape`` (RSM).
        Complexity: O(k·M·K·F) (RBM), O(k·B·(K·F + max D)) (RSM).

        Examples:
            >>> import torch, structgrad as sg
            >>> g = torch.Generator().manual_seed(0)
            >>> rsm = sg.ReplicatedSoftmax(num_visible=4, num_hidden=2, generator=g)
            >>> rsm.persistent_negatives(torch.tensor([[3, 0, 1, 0], [1, 1, 0, 0]]), generator=g).sum(-1)
            tensor([4., 2.])
            >>> rsm.persistent_negatives(torch.tensor([[0, 9, 0, 0]]), generator=g).sum(-1)  # first chain, now 9 words
            tensor([9.])
        """
        v0 = self._check_visible(v0, "v0")
        if v0.numel() == 0:
            raise ShapeError(f"v0: expected at least one data vector, got shape {V.fmt_shape(v0.shape)}")
        k = self._check_k(k)
        self._check_generator(generator)
        self._check_parameters()
        vk = self._pcd_negatives(v0.detach().reshape(-1, self.num_visible), k, generator)
        return vk.reshape(v0.shape) if self._pcd_per_document else vk

    _pcd_per_document = False  # True: one PCD negative per data row (the RSM)

    def _pcd_negatives(self, v0: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """Default (Bernoulli RBM): persistent visible chains ``(M, K)``, all advanced, all returned."""
        start = self.persistent_chains
        if start is None:
            start = v0
        vk = self._gibbs(start, k, generator)
        self.persistent_chains = vk
        return vk

    def reset_chains(self) -> None:
        """Forget the persistent (PCD) chains; the next ``cd_loss(persistent=True)`` restarts them at its data."""
        self.persistent_chains = None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The PCD chains are saved once they exist, and their number M is free: a state
        # dict with chains restores them (whatever M, and also into a fresh model), one
        # without them (an older or partial checkpoint) leaves none, so the next PCD call
        # restarts the chains at its data.  Neither case is a missing or unexpected key.
        key = prefix + "persistent_chains"
        chains = state_dict.get(key)
        if chains is None:
            self.persistent_chains = None
        elif (
            not isinstance(chains, torch.Tensor)
            or not chains.dtype.is_floating_point
            or chains.dim() != 2
            or chains.shape[1] != self.num_visible
        ):
            error_msgs.append(
                f"{key}: expected a floating-point tensor of shape (M, {self.num_visible}), got "
                f"{V.fmt_shape(chains.shape) if isinstance(chains, torch.Tensor) else type(chains).__name__}"
                f"{' of dtype ' + str(chains.dtype) if isinstance(chains, torch.Tensor) else ''}"
            )
            self.persistent_chains = None
            state_dict = {k: t for k, t in state_dict.items() if k != key}
        else:  # a placeholder of the right shape; the base class copies the values into it
            self.persistent_chains = torch.zeros(chains.shape, dtype=self.dtype, device=self.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def check_hidden(model: RBMBase, h: Any) -> torch.Tensor:
    if not isinstance(h, torch.Tensor):
        raise DTypeError(f"h: expected a torch.Tensor of shape (*batch, {model.num_hidden}), got {type(h).__name__}")
    if h.device != model.device:
        raise DeviceError(f"h is on device {h.device} but the model is on {model.device}")
    if h.dtype != model.dtype:
        if h.dtype.is_floating_point or h.dtype.is_complex:
            raise DTypeError(f"h: expected dtype {model.dtype} (the model's parameters), got {h.dtype}")
        h = h.to(model.dtype)
    if h.dim() == 0 or h.shape[-1] != model.num_hidden:
        raise ShapeError(f"h: expected shape (*batch, {model.num_hidden}) (num_hidden), got {V.fmt_shape(h.shape)}")
    if h.numel() and bool(((h != 0) & (h != 1)).any()):
        raise DomainError("h: expected hidden states in {0, 1}")
    return h


def check_log_z(model: RBMBase, log_z: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(log_z, torch.Tensor) or log_z.dtype != model.dtype:
        raise DTypeError(
            f"log_z: expected a tensor of dtype {model.dtype}, got {getattr(log_z, 'dtype', type(log_z).__name__)}"
        )
    if log_z.device != model.device:
        raise DeviceError(f"log_z is on device {log_z.device} but the model is on {model.device}")
    V.check_shape(log_z, shape, "log_z", "(one value per document)" if shape else "(a 0-dim tensor)")
    return log_z
