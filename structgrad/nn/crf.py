"""``LinearChainCRF``: a linear-chain CRF layer for taggers, built on the ``chain`` solver.

A tag sequence y of length L ≤ T for emissions x (T, C) scores

    s(y) = start[y_0] + Σ_{t<L} x[t, y_t] + Σ_{t<L−1} transitions[y_t, y_{t+1}] + end[y_{L−1}],

p(y) = exp(s(y) − A) with A = log Σ_y exp s(y).  The layer folds ``start`` into the node
scores at position 0 and ``end`` at position L − 1 (one scatter, no loop over the batch),
so θ = (node (B, T, C), transitions (C, C)) is a ``chain`` problem with one shared
transition matrix: A, the marginals, Viterbi and samples are the solver's, with its
speed and numerics (forward-backward in probability space when the scores allow it,
else re-centred float64 log space; ``-inf`` anywhere without NaN).

Loss: the negative log-likelihood  nll(y) = A − s(y).  A comes from
``chain.log_partition``, whose backward is the marginals μ; s(y) is gathered from the
tag ids (no one-hot arrays), so the gradient is the model-marginals theorem,
∇ nll = μ − z(y): for the emissions μ_t[c] − [y_t = c], for the transitions the expected
minus the gold transition counts, for start/end the first/last-tag marginals minus the
gold first/last tag.

Constraints: forbidden transitions and first/last tags score exactly ``-inf``;
decoding (Viterbi and max-marginal) never returns a forbidden sequence.  A ``-inf``
transition sends the chain solver to its float64 log-space path (its probability-space
path needs finite transitions): measured on a CPU at (B, T, C) = (32, 128, 17), the
loss's forward+backward then takes about 9× the unconstrained time (about pytorch-crf's
time), while Viterbi decoding costs the same.

Infeasible instances (the constraints, or ``-inf`` emissions, forbid every sequence of
that instance's length): ``log_partition`` is ``-inf``, ``marginals`` are 0, ``decode``
and ``sample`` give −1 at every position.  In the loss, a gold sequence whose score is
``-inf`` (it uses something forbidden; necessarily so for an infeasible instance) is a
:class:`~structgrad.errors.DomainError` when ``validate`` (the default); with
``validate=False`` its loss is ``+inf`` with zero gradient (never NaN).

References: J. Lafferty, A. McCallum, F. Pereira, "Conditional random fields" (ICML
2001); Z. Huang, W. Xu, K. Yu, "Bidirectional LSTM-CRF models for sequence tagging"
(2015); D. McAllester, "The model marginals" (TTIC 31230, 2019).

Examples:
    >>> import torch, structgrad as sg
    >>> crf = sg.nn.LinearChainCRF(5)
    >>> emissions = torch.randn(2, 7, 5)
    >>> tags, lengths = torch.randint(5, (2, 7)), torch.tensor([7, 4])
    >>> crf(emissions, tags, lengths).shape                # mean NLL over the batch
    torch.Size([])
    >>> crf.decode(emissions, lengths)[1, 4:].tolist()     # -1 past the length
    [-1, -1, -1]
"""

from __future__ import annotations

from typing import Any

import torch

import structgrad.checks as V
from structgrad.errors import DeviceError, DomainError, ShapeError
from structgrad.labels import chain_labels
from structgrad.registry import get_solver

from ._tagging import TransitionConstraints, check_constraints

__all__ = ["LinearChainCRF"]

_REDUCTIONS = ("mean", "sum", "none", "token_mean")
_METHODS = ("viterbi", "marginal")


class LinearChainCRF(torch.nn.Module):
    """Linear-chain CRF layer: negative log-likelihood, decoding, marginals, samples.

    Args:
        num_tags: C ≥ 1.
        start_end: learn ``start (C,)`` and ``end (C,)`` scores for the first and last
            tag (``False``: no such parameters; ``start`` and ``end`` are ``None``).
        constraints: ``None``; an allowed-transition mask ``(C, C)`` bool
            (``mask[i, j]``: tag i may be followed by tag j); or a tuple
            ``(transitions (C, C) | None, start (C,) | None, end (C,) | None)`` such as
            :func:`structgrad.nn.allowed_transitions` returns.  Kept (copied) as bool
            buffers ``transition_mask``, ``start_mask``, ``end_mask`` (``None`` when
            absent).  Forbidden entries score ``-inf`` exactly; the corresponding
            parameter entries are unused and get zero gradient.
        validate: run the checks that need a host synchronisation on every call (tag
            ids in ``[0, C)`` within each length, lengths in ``[0, T]``, no NaN/+inf
            emissions, gold sequences the constraints allow); ``False`` for hot loops
            on trusted data.

    Parameters: ``transitions (C, C)`` (``transitions[i, j]`` scores tag i followed by
    tag j), ``start (C,)``, ``end (C,)``; initialised to 0 (the log-likelihood is
    concave in them; see :meth:`reset_parameters`).

    Shapes (every method): ``emissions (B, T, C)`` floating; ``tags (B, T)`` integer tag
    ids (any value past a length, e.g. a pad id or −100, is ignored); ``lengths (B,)``
    integers in ``[0, T]`` (``None``: every sequence has length T).  Computation runs in
    the promoted dtype of emissions and parameters (float16 emissions with float32
    parameters: float32; float64 emissions: float64).

    Raises (named errors): ``ShapeError`` (emissions not (B, T, C) with C = num_tags,
    tags or lengths of the wrong shape, a mask of the wrong shape), ``DTypeError``
    (float tags, integer emissions, non-bool masks), ``DomainError`` (a tag id outside
    ``[0, C)`` within a length, a gold sequence the constraints forbid, masks that
    forbid every sequence of every length, an unknown ``reduction``/``method``),
    ``DeviceError``.

    Complexity: O(B·T·C²) time and O(B·T·C) memory per call (the ``chain`` solver's).

    Examples:
        >>> import torch, structgrad as sg
        >>> tags = ["O", "B-PER", "I-PER"]
        >>> crf = sg.nn.LinearChainCRF(3, constraints=sg.nn.allowed_transitions(tags, "BIO"))
        >>> em = torch.zeros(1, 2, 3); em[0, :, 2] = 5.0   # emissions favour I-PER I-PER
        >>> crf.decode(em).tolist()                         # ... which BIO forbids
        [[1, 2]]
    """

    transitions: torch.nn.Parameter
    start: torch.nn.Parameter | None
    end: torch.nn.Parameter | None
    transition_mask: torch.Tensor | None
    start_mask: torch.Tensor | None
    end_mask: torch.Tensor | None

    def __init__(self, num_tags: int, *, start_end: bool = True, constraints: Any = None, validate: bool = True):
        super().__init__()
        C = V.check_positive_int(num_tags, "num_tags")
        for v, nm in ((start_end, "start_end"), (validate, "validate")):
            if not isinstance(v, bool):
                raise DomainError(f"{nm}: expected True or False, got {v!r}")
        self.num_tags = C
        self.start_end = start_end
        self.validate = validate
        self.transitions = torch.nn.Parameter(torch.zeros(C, C))
        if start_end:
            self.start = torch.nn.Parameter(torch.zeros(C))
            self.end = torch.nn.Parameter(torch.zeros(C))
        else:
            self.register_parameter("start", None)
            self.register_parameter("end", None)
        masks = check_constraints(constraints, C) or TransitionConstraints(None)
        self.register_buffer("transition_mask", masks.transitions)
        self.register_buffer("start_mask", masks.start)
        self.register_buffer("end_mask", masks.end)
        # the layer runs the value checks itself (naming its own arguments), once
        self._chain = get_solver("chain", validate=False)

    def reset_parameters(self) -> None:
        """Set ``transitions``, ``start`` and ``end`` to 0 (uniform over allowed sequences)."""
        with torch.no_grad():
            for p in (self.transitions, self.start, self.end):
                if p is not None:
                    p.zero_()

    @property
    def constraints(self) -> TransitionConstraints | None:
        """The allowed-transition masks, or ``None`` when unconstrained."""
        if self.transition_mask is None and self.start_mask is None and self.end_mask is None:
            return None
        return TransitionConstraints(self.transition_mask, self.start_mask, self.end_mask)

    def extra_repr(self) -> str:
        """``num_tags=..., start_end=..., constrained=...`` (shown by ``repr``)."""
        return f"num_tags={self.num_tags}, start_end={self.start_end}, constrained={self.constraints is not None}"

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        emissions: torch.Tensor,
        tags: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Negative log-likelihood A − s(tags) of the gold tags (a loss to minimise).

        Args:
            emissions: ``(B, T, C)`` scores.
            tags: ``(B, T)`` integer gold tag ids in ``[0, C)`` within each length.
            lengths: ``(B,)`` or ``None``.
            reduction: ``"mean"`` (over the batch), ``"sum"``, ``"none"`` (``(B,)``) or
                ``"token_mean"`` (sum over the batch ÷ number of tokens, at least 1).

        Returns:
            the loss: a scalar, or ``(B,)`` for ``"none"``.  A length-0 sequence has
                loss 0.  Backward: μ − z(tags) (model marginals minus gold indicators).
        """
        reduction = V.check_choice(reduction, _REDUCTIONS, "reduction")
        emissions, lengths = self._check_inputs(emissions, lengths)
        tags = self._check_tags(tags, emissions)
        node, edge = self._potentials(emissions, lengths)
        gold = self._gold(node, edge, tags, lengths, check=self.validate)
        if node.shape[1] == 0:
            nll = gold  # zeros
        else:
            logz = self._chain.log_partition((node, edge), lengths=lengths)
            # a forbidden gold sequence (validate=False): +inf loss, zero gradient, no NaN
            nll = torch.where(torch.isneginf(gold), torch.full_like(gold, float("inf")), logz - gold)
        return _reduce(nll, reduction, lengths, emissions.shape[1])

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The score s(tags) ``(B,)`` (start + emissions + transitions + end), differentiable;
        0 for length 0, ``-inf`` for a sequence the constraints forbid (also under ``validate``)."""
        emissions, lengths = self._check_inputs(emissions, lengths)
        tags = self._check_tags(tags, emissions)
        node, edge = self._potentials(emissions, lengths)
        return self._gold(node, edge, tags, lengths, check=False, range_check=self.validate)

    def log_partition(self, emissions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """A = log Σ_y exp s(y), ``(B,)``, differentiable (backward: the marginals); 0 for
        length 0, ``-inf`` for an instance the constraints make infeasible."""
        emissions, lengths = self._check_inputs(emissions, lengths)
        node, edge = self._potentials(emissions, lengths)
        if node.shape[1] == 0:
            return node.sum((1, 2))
        return self._chain.log_partition((node, edge), lengths=lengths)

    def marginals(self, emissions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Tag marginals p(y_t = c), ``(B, T, C)``, 0 past each length (and for infeasible
        instances); detached from autograd."""
        with torch.no_grad():
            emissions, lengths = self._check_inputs(emissions, lengths)
            node, edge = self._potentials(emissions, lengths)
            if node.shape[1] == 0:
                return node.clone()
            return self._chain.marginals((node, edge), lengths=lengths)[0]

    def decode(
        self, emissions: torch.Tensor, lengths: torch.Tensor | None = None, *, method: str = "viterbi"
    ) -> torch.Tensor:
        """Best tag sequences, ``(B, T)`` int64 on emissions' device, −1 past each length.

        Args:
            method: ``"viterbi"``: argmax_y s(y) (ties to the lowest tag).
                ``"marginal"``: the sequence maximising the expected number of correct
                tags Σ_t p(y_t) — per position, the tag of highest marginal when there
                are no transition constraints; with them, the best allowed sequence (a
                Viterbi pass over the marginals), so no forbidden sequence is returned.

        Returns:
            tag ids ``(B, T)``; an infeasible instance is −1 throughout.
        """
        method = V.check_choice(method, _METHODS, "method")
        with torch.no_grad():
            emissions, lengths = self._check_inputs(emissions, lengths)
            node, edge = self._potentials(emissions, lengths)
            B, T, _ = node.shape
            if T == 0:
                return torch.empty((B, 0), dtype=torch.long, device=node.device)
            solver = self._chain
            if method == "viterbi":
                return chain_labels(solver.map((node, edge), lengths=lengths)[0])
            mu = solver.marginals((node, edge), lengths=lengths)[0]
            if self.transition_mask is None:
                best, idx = mu.max(-1)
                return torch.where(best > 0, idx, torch.full_like(idx, -1))
            # maximise Σ_t μ_t(y_t) over allowed sequences whose every tag has μ > 0
            score = torch.where(mu > 0, mu, torch.full_like(mu, float("-inf")))
            allowed = torch.zeros_like(edge).masked_fill_(~self.transition_mask, float("-inf"))
            return chain_labels(solver.map((score, allowed), lengths=lengths)[0])

    def sample(
        self,
        emissions: torch.Tensor,
        num_samples: int = 1,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Exact draws y ~ p(y | emissions), ``(S, B, T)`` int64, −1 past each length (and
        throughout an infeasible instance).  Randomness only from ``generator``."""
        num_samples = V.check_positive_int(num_samples, "num_samples")
        with torch.no_grad():
            emissions, lengths = self._check_inputs(emissions, lengths)
            V.check_generator(generator, emissions.device)
            node, edge = self._potentials(emissions, lengths)
            B, T, _ = node.shape
            if T == 0:
                return torch.empty((num_samples, B, 0), dtype=torch.long, device=node.device)
            z = self._chain.sample((node, edge), num_samples, generator=generator, lengths=lengths)[0]
            return chain_labels(z)

    # ------------------------------------------------------------------ internals
    def _check_inputs(self, emissions: Any, lengths: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        V.check_float_tensor(emissions, "emissions")
        if emissions.dim() != 3 or emissions.shape[-1] != self.num_tags:
            raise ShapeError(
                f"emissions: expected shape (B, T, C) with C = num_tags = {self.num_tags}, "
                f"got {V.fmt_shape(emissions.shape)}"
            )
        V.check_same_device({"emissions": emissions, "transitions": self.transitions})
        B, T, _ = emissions.shape
        lengths = V.check_lengths(lengths, (B,), T, emissions.device, check_values=self.validate)
        if self.validate:  # one host sync: NaN / +inf in the emissions or the parameters
            named = {"emissions": emissions, "transitions": self.transitions, "start": self.start, "end": self.end}
            named = {k: v for k, v in named.items() if v is not None}
            V.check_scores(tuple(t.detach() for t in named.values()), list(named))
        return emissions, lengths

    def _check_tags(self, tags: Any, emissions: torch.Tensor) -> torch.Tensor:
        tags = V.check_index_tensor(tags, "tags")
        V.check_shape(tags, emissions.shape[:2], "tags", "(B, T) like emissions (B, T, C)")
        if tags.device != emissions.device:
            raise DeviceError(f"tags is on device {tags.device} but emissions is on {emissions.device}")
        return tags.long()

    def _boundary(self, param: torch.Tensor | None, mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
        """start/end scores (C,) in ``dtype`` with ``-inf`` where the mask forbids, or None."""
        if param is None and mask is None:
            return None
        v = param.to(dtype) if param is not None else torch.zeros(self.num_tags, dtype=dtype, device=mask.device)
        return v if mask is None else v.masked_fill(~mask, float("-inf"))

    def _potentials(self, emissions: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """θ = (node (B, T, C), transitions (C, C)): start added at position 0 and end at
        position L − 1 of each sequence by one differentiable scatter-add."""
        dtype = torch.promote_types(emissions.dtype, self.transitions.dtype)
        node = emissions.to(dtype)
        edge = self.transitions.to(dtype)
        if self.transition_mask is not None:
            edge = edge.masked_fill(~self.transition_mask, float("-inf"))
        start = self._boundary(self.start, self.start_mask, dtype)
        end = self._boundary(self.end, self.end_mask, dtype)
        B, T, C = node.shape
        if (start is None and end is None) or T == 0:
            return node, edge
        zero = torch.zeros(C, dtype=dtype, device=node.device)
        src = torch.stack([zero if start is None else start, zero if end is None else end])
        if lengths is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=node.device)
        else:
            last = (lengths - 1).clamp(0, T - 1)  # length 0: anything at position 0 is ignored
        pos = torch.stack([torch.zeros_like(last), last], 1)  # (B, 2)
        return node.scatter_add(1, pos.unsqueeze(-1).expand(B, 2, C), src.unsqueeze(0).expand(B, 2, C)), edge

    def _gold(self, node, edge, tags, lengths, *, check: bool, range_check: bool | None = None) -> torch.Tensor:
        """s(tags) (B,) gathered from the tag ids: Σ_{t<L} node[t, y_t] + Σ_{t<L−1} edge[y_t, y_{t+1}].
        ``check``: one host sync for tag ids out of range within a length and for
        gold scores of -inf (DomainError); ``range_check`` (default ``check``): ids only.
        Unchecked, an out-of-range id within a length fails in torch's indexing (never
        silently replaced); ids past a length are never read."""
        B, T, C = node.shape
        range_check = check or bool(range_check)
        valid = None if lengths is None else torch.arange(T, device=node.device) < lengths.unsqueeze(1)
        keep = valid
        if range_check:  # checked below, after the gathers (one sync for everything)
            in_range = (tags >= 0) & (tags < C)
            keep = in_range if valid is None else valid & in_range
        safe = tags if keep is None else torch.where(keep, tags, torch.zeros_like(tags))
        s = node.gather(2, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
        e = edge.reshape(-1)[safe[:, :-1] * C + safe[:, 1:]]  # (B, T−1)
        if valid is not None:
            s = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))
            e = torch.where(valid[:, 1:], e, torch.zeros((), dtype=e.dtype, device=e.device))
        gold = s.sum(1) + e.sum(1)
        if range_check:
            bad = ~in_range if valid is None else valid & ~in_range
            flags = [bad.any(), torch.isneginf(gold).any() if check else bad.new_zeros(())]
            bad_range, forbidden = torch.stack(flags).tolist()
            if bad_range:
                first = [int(i) for i in bad.nonzero()[0]]
                raise DomainError(
                    f"tags: expected tag ids in [0, {C}) within each length, got {int(tags[first[0], first[1]])} "
                    f"at (b, t) = ({first[0]}, {first[1]}) ({int(bad.sum())} such entries)"
                )
            if forbidden:
                raise DomainError(self._forbidden_message(node, safe, gold, lengths))
        return gold

    def _forbidden_message(self, node, tags, gold, lengths) -> str:
        """Why the first gold sequence of score -inf is impossible (error path only)."""
        b = int(torch.isneginf(gold).nonzero()[0])
        L = tags.shape[1] if lengths is None else int(lengths[b])
        y = tags[b, :L].tolist()
        why = "an emission of -inf"
        tm = self.transition_mask
        if self.start_mask is not None and not bool(self.start_mask[y[0]]):
            why = f"first tag {y[0]}, which constraints.start forbids"
        elif self.end_mask is not None and not bool(self.end_mask[y[-1]]):
            why = f"last tag {y[-1]}, which constraints.end forbids"
        elif tm is not None:
            for t in range(L - 1):
                if not bool(tm[y[t], y[t + 1]]):
                    why = f"the transition {y[t]} -> {y[t + 1]} at t = {t}, which the constraints forbid"
                    break
        return (
            f"tags: expected gold sequences the model allows, but sequence {b} (length {L}) has score -inf: "
            f"it uses {why}. Fix the data (e.g. convert IOB1 to IOB2 for a BIO mask), or pass validate=False "
            f"to get loss +inf with zero gradient for such sequences"
        )


def _reduce(nll: torch.Tensor, reduction: str, lengths: torch.Tensor | None, T: int) -> torch.Tensor:
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(nll.shape[0], 1)
    tokens = nll.shape[0] * T if lengths is None else lengths.sum()
    return total / (tokens.clamp(min=1) if isinstance(tokens, torch.Tensor) else max(tokens, 1))
