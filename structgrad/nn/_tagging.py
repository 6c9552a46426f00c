"""Transition constraints for chunk-tagging schemes (BIO, BIOES, BILOU).

A constraint set is three boolean masks over C tags, ``True`` = allowed:

* ``transitions (C, C)``: ``transitions[i, j]`` — tag i may be followed by tag j;
* ``start (C,)``: the tags a sequence may begin with (``None``: any);
* ``end (C,)``: the tags a sequence may end with (``None``: any).

:class:`~structgrad.nn.LinearChainCRF` scores whatever a mask forbids as ``-inf``
(impossible): such sequences get probability 0 exactly, and decoding never returns one.

Schemes (tag names: ``"O"``, or a prefix letter, ``-`` and a chunk type, e.g. ``"B-PER"``;
an empty type such as ``"B"`` is an untyped chunk):

* ``"BIO"`` (IOB2): a chunk is ``B-X I-X* ``.  ``I-X`` may only follow ``B-X`` or
  ``I-X``, so a sequence cannot begin with ``I-X``.  (CoNLL-2003's original files use
  IOB1, where ``I-X`` may open a chunk: convert them to IOB2 first, or their gold
  sequences are forbidden.)
* ``"BIOES"``: a chunk is ``S-X`` (one token) or ``B-X I-X* E-X``.  Inside a chunk
  (after ``B-X`` or ``I-X``) only ``I-X`` or ``E-X`` may follow; outside one (at the
  start, after ``O``, ``E-*`` or ``S-*``) only ``O``, ``B-*`` or ``S-*``; a sequence
  must end outside a chunk.
* ``"BILOU"``: BIOES with ``L`` (last) for ``E`` and ``U`` (unit) for ``S``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from structgrad import checks as V
from structgrad.errors import DomainError, DTypeError

__all__ = ["TransitionConstraints", "allowed_transitions"]

# scheme -> {prefix letter: role}; roles: B begin, I inside, E end, S single
_SCHEMES = {
    "BIO": {"B": "B", "I": "I"},
    "BIOES": {"B": "B", "I": "I", "E": "E", "S": "S"},
    "BILOU": {"B": "B", "I": "I", "L": "E", "U": "S"},
}


class TransitionConstraints(NamedTuple):
    """Allowed-transition masks for :class:`~structgrad.nn.LinearChainCRF` (``True`` = allowed).

    Attributes:
        transitions: ``(C, C)`` bool; ``[i, j]``: tag i may be followed by tag j.
        start: ``(C,)`` bool or ``None`` (any tag may begin a sequence).
        end: ``(C,)`` bool or ``None`` (any tag may end a sequence).
    """

    transitions: torch.Tensor
    start: torch.Tensor | None = None
    end: torch.Tensor | None = None


def _parse(tag: object, roles: dict[str, str], scheme: str) -> tuple[str, str]:
    """``(role, chunk type)``; role ``"O"`` for the outside tag."""
    if not isinstance(tag, str):
        raise DTypeError(f"tags: expected tag names (str), got {type(tag).__name__} {tag!r}")
    if tag == "O":
        return "O", ""
    if tag[:1] in roles and (len(tag) == 1 or tag[1] == "-"):
        return roles[tag[0]], tag[2:]
    prefixes = "|".join(roles)
    raise DomainError(
        f"tags: expected 'O' or '<{prefixes}>-<type>' under scheme {scheme!r}, got {tag!r} "
        f"(drop padding or special tags from the list; the CRF needs none, lengths mask padding)"
    )


def allowed_transitions(tags: Sequence[str], scheme: str = "BIO") -> TransitionConstraints:
    """Masks of the transitions, first and last tags that a tagging scheme allows.

    Args:
        tags: the tag names in tag-id order (``tags[i]`` is the name of tag id i), e.g.
            ``["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]``.
        scheme: ``"BIO"`` (IOB2), ``"BIOES"`` or ``"BILOU"`` (see the module docstring).

    Returns:
        :class:`TransitionConstraints` ``(transitions (C, C), start (C,), end (C,))``,
            bool CPU tensors (a :class:`~structgrad.nn.LinearChainCRF` keeps them as
            buffers, which move with ``.to(device)``).

    Raises:
        DomainError: an unknown scheme, a tag name the scheme does not know, a repeated
            name or an empty list.
        DTypeError: a tag name that is not a string.
    Complexity: O(C²).

    Examples:
        >>> import structgrad as sg
        >>> c = sg.nn.allowed_transitions(["O", "B-PER", "I-PER"], scheme="BIO")
        >>> c.transitions.int()          # O -> I-PER is forbidden
        tensor([[1, 1, 0],
                [1, 1, 1],
                [1, 1, 1]], dtype=torch.int32)
        >>> c.start.tolist()             # a sequence cannot begin with I-PER
        [True, True, False]
    """
    scheme = V.check_choice(scheme, tuple(_SCHEMES), "scheme")
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        raise DTypeError(f"tags: expected a sequence of tag names, got {type(tags).__name__}")
    names = list(tags)
    if not names:
        raise DomainError("tags: expected at least one tag name, got an empty list")
    seen: dict[str, int] = {}
    for i, t in enumerate(names):
        if isinstance(t, str) and t in seen:
            raise DomainError(f"tags: expected distinct names, got {t!r} at ids {seen[t]} and {i}")
        seen[t] = i
    parsed = [_parse(t, _SCHEMES[scheme], scheme) for t in names]
    C = len(parsed)
    trans = torch.zeros((C, C), dtype=torch.bool)
    start = torch.zeros(C, dtype=torch.bool)
    end = torch.zeros(C, dtype=torch.bool)
    for i, (ri, xi) in enumerate(parsed):
        inside = ri in ("B", "I")  # a chunk is open after tag i (and, for BIO, may go on)
        start[i] = ri in ("O", "B", "S")
        # BIO has no explicit end tag: a chunk may stop anywhere
        end[i] = True if scheme == "BIO" else ri in ("O", "E", "S")
        for j, (rj, xj) in enumerate(parsed):
            if scheme == "BIO":
                ok = rj in ("O", "B") or (rj == "I" and inside and xi == xj)
            elif inside:
                ok = rj in ("I", "E") and xi == xj
            else:
                ok = rj in ("O", "B", "S")
            trans[i, j] = ok
    return TransitionConstraints(trans, start, end)


def check_constraints(constraints: object, num_tags: int) -> TransitionConstraints | None:
    """Normalise the ``constraints`` argument of the CRF layer: ``None``, a ``(C, C)`` bool
    mask, or a :class:`TransitionConstraints` / tuple ``(transitions, start=None, end=None)``
    (``transitions`` may be ``None``: start/end masks only).  Returns copies (the caller's
    tensors are never aliased) or ``None``.  Raises :class:`DomainError` when the masks
    forbid every sequence of every length."""
    if constraints is None:
        return None
    if isinstance(constraints, torch.Tensor):
        parts: tuple = (constraints,)
    elif isinstance(constraints, (tuple, list)) and 1 <= len(constraints) <= 3:
        parts = tuple(constraints)
    else:
        raise DTypeError(
            "constraints: expected None, a (C, C) bool tensor or a tuple (transitions (C, C), start (C,), end (C,)) "
            f"of bool tensors (see structgrad.nn.allowed_transitions), got {type(constraints).__name__}"
        )
    parts = parts + (None,) * (3 - len(parts))
    C = num_tags
    out = []
    for x, nm, shape in zip(parts, ("transitions", "start", "end"), ((C, C), (C,), (C,))):
        name = f"constraints.{nm}"
        if x is None:
            out.append(None)
            continue
        if not isinstance(x, torch.Tensor):
            raise DTypeError(f"{name}: expected a bool tensor or None, got {type(x).__name__}")
        if x.dtype != torch.bool:
            raise DTypeError(f"{name}: expected a bool mask (True = allowed), got dtype {x.dtype}; use .bool()")
        V.check_shape(x, shape, name, f"for num_tags={C}")
        out.append(x.detach().clone())
    trans, start, end = out
    if trans is None and start is None and end is None:
        return None
    _check_some_sequence(trans, start, end, C)
    return TransitionConstraints(trans, start, end)


def _check_some_sequence(trans, start, end, C: int) -> None:
    """DomainError unless some sequence of some length is allowed: a path from an allowed
    first tag to an allowed last tag (breadth-first over at most C steps, on the CPU)."""
    t = torch.ones((C, C), dtype=torch.bool) if trans is None else trans.cpu()
    reach = torch.ones(C, dtype=torch.bool) if start is None else start.cpu()
    last = torch.ones(C, dtype=torch.bool) if end is None else end.cpu()
    for _ in range(C):
        if bool((reach & last).any()):
            return
        nxt = reach | (reach.unsqueeze(1) & t).any(0)
        if bool((nxt == reach).all()):
            break
        reach = nxt
    if bool((reach & last).any()):
        return
    raise DomainError(
        "constraints: the masks forbid every tag sequence of every length (no path of allowed "
        "transitions from an allowed first tag to an allowed last tag)"
    )
