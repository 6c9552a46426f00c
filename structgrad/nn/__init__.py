"""Layers built on structgrad solvers, in the manner of ``torch.nn``.

* :class:`LinearChainCRF`: a linear-chain CRF layer for taggers (negative
  log-likelihood with the model-marginals gradient, Viterbi and max-marginal decoding,
  marginals, samples, transition constraints), built on the ``chain`` solver.
* :func:`allowed_transitions`: the transition masks of the BIO, BIOES and BILOU tagging
  schemes, as a :class:`TransitionConstraints`.
"""

from ._tagging import TransitionConstraints, allowed_transitions
from .crf import LinearChainCRF

__all__ = ["LinearChainCRF", "TransitionConstraints", "allowed_transitions"]
