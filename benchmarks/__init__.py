"""structgrad's benchmarks, side by side with the peers.

``python -m benchmarks`` runs them all (``--quick`` for a smoke run); each module
also runs alone (``python benchmarks/chain.py`` or ``python -m benchmarks.chain``).
Every module exposes ``run(quick=False) -> list[dict]`` with rows in the one
convention of :mod:`benchmarks._common` (ratio = peer time ÷ our time, "× faster").
"""
