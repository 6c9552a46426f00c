"""The ``tree`` solver's graph: validation and the message-passing plan (private).

:func:`make_plan` checks a networkx graph once (an undirected simple forest on the
nodes 0..N−1), roots each connected component at a centre, and lays the nodes out
*level by level*: positions ``0..R−1`` hold the R roots, then every node at depth 1,
depth 2, ...; inside a level, children of the same parent are contiguous and in the
order of their parents.  Each level is then one contiguous slice of any per-node
tensor, and a pass over the forest is one batch of tensor operations per level,
with no Python work per node.

Rooting at a centre (found by a double breadth-first search: the farthest node a
from any node, the farthest node b from a, the middle of the a–b path) makes the
height ⌈diameter / 2⌉, the smallest possible: half a path's length, which is the
number of sequential steps of each pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from structgrad.errors import DTypeError, GraphError

__all__ = ["Plan", "make_plan"]


@dataclass(frozen=True)
class Plan:
    """Index arrays of a rooted forest, laid out level by level (all NumPy int64 / bool).

    Attributes:
        num_nodes: N; num_edges: E = N − R; num_roots: R (one per component).
        edges: the graph's edges ``(u, v)`` in ``list(graph.edges())`` order.
        order: ``(N,)`` node id at each position; ``position``: ``(N,)`` its inverse.
        offsets: level boundaries: level ℓ holds positions ``offsets[ℓ]:offsets[ℓ+1]``
            (level 0 = the roots); ``height = len(offsets) − 2``.
        parent: ``(N−R,)`` the parent's position, for the non-root positions R..N−1.
        local_parent: ``(N−R,)`` the parent's index inside its own level.
        edge_of: ``(N−R,)`` the graph edge joining each non-root position to its parent.
        flip: ``(N−R,)`` True where that edge is listed as (child, parent), so that its
            scores must be transposed to read [parent label, child label].
        slot: ``(E,)`` the non-root index (position − R) of each graph edge's child.
    """

    num_nodes: int
    num_edges: int
    num_roots: int
    edges: tuple[tuple[int, int], ...]
    order: np.ndarray
    position: np.ndarray
    offsets: tuple[int, ...]
    parent: np.ndarray
    local_parent: np.ndarray
    edge_of: np.ndarray
    flip: np.ndarray
    slot: np.ndarray

    @property
    def height(self) -> int:
        return len(self.offsets) - 2


def _check_graph(graph: Any) -> tuple[int, list[tuple[int, int]]]:
    """N and the edge list of a valid forest; a named error otherwise."""
    try:
        import networkx as nx
    except ImportError as e:  # pragma: no cover - networkx is a dependency
        raise DTypeError(f"graph: the tree solver needs networkx ({e})") from e
    if not isinstance(graph, nx.Graph):
        raise DTypeError(f"graph: expected an undirected networkx.Graph (a forest on nodes 0..N-1), got {type(graph).__name__}")
    if graph.is_directed():
        raise GraphError(
            f"graph: expected an undirected networkx.Graph, got a directed {type(graph).__name__}; "
            f"convert it with graph.to_undirected() (edge scores then follow list(graph.edges()) of the result)"
        )
    if graph.is_multigraph():
        raise GraphError(
            f"graph: expected a simple networkx.Graph, got a {type(graph).__name__} (parallel edges are not a "
            f"tree; sum their scores into one edge of a networkx.Graph)"
        )
    nodes = list(graph.nodes())
    N = len(nodes)
    if N == 0:
        raise GraphError("graph: expected at least one node, got an empty graph")
    bad = [n for n in nodes if isinstance(n, bool) or not isinstance(n, Integral)]
    ids = set() if bad else {int(n) for n in nodes}
    if bad or ids != set(range(N)):
        extra = bad[:5] if bad else sorted(ids - set(range(N)))[:5]
        missing = [] if bad else sorted(set(range(N)) - ids)[:5]
        raise GraphError(
            f"graph: expected nodes labelled exactly 0..{N - 1} (the rows of node scores), got "
            f"{N} nodes including {extra!r}" + (f" and without {missing!r}" if missing else "")
            + "; relabel with networkx.convert_node_labels_to_integers(graph)"
        )
    loops = [int(u) for u, v in graph.edges() if u == v]
    if loops:
        raise GraphError(f"graph: expected a forest, got self-loop(s) at node(s) {loops[:5]}")
    edges = [(int(u), int(v)) for u, v in graph.edges()]
    R = nx.number_connected_components(graph)
    if len(edges) != N - R:
        cycle = nx.find_cycle(graph)
        nodes_on = [int(u) for u, _ in cycle]
        raise GraphError(
            f"graph: expected a forest (no cycles), got a cycle through nodes {nodes_on} "
            f"({len(edges)} edges on {N} nodes in {R} component(s); a forest has {N - R})"
        )
    return N, edges


def _bfs(adj: list[list[tuple[int, int, bool]]], start: int) -> tuple[list[int], dict[int, int]]:
    """Nodes in breadth-first order from ``start`` and each one's predecessor."""
    pred = {start: -1}
    seen = [start]
    q = deque([start])
    while q:
        u = q.popleft()
        for w, _, _ in adj[u]:
            if w not in pred:
                pred[w] = u
                seen.append(w)
                q.append(w)
    return seen, pred


def make_plan(graph: Any) -> Plan:
    """Validate ``graph`` and build its :class:`Plan` (time O(N log N) for the sorting of
    children, once per solver).

    Raises:
        DTypeError: ``graph`` is not a networkx graph.
        GraphError: directed, multigraph, empty, node labels not exactly 0..N−1,
            a self-loop, or a cycle (named by its nodes).
    """
    N, edges = _check_graph(graph)
    adj: list[list[tuple[int, int, bool]]] = [[] for _ in range(N)]
    for e, (u, v) in enumerate(edges):
        adj[u].append((v, e, False))  # from u, edge e is (u, v): u first
        adj[v].append((u, e, True))  # from v, edge e is (u, v) = (other, v): transposed
    for a in adj:
        a.sort()
    # a centre of each component by a double BFS; components in order of their smallest node
    roots, done = [], np.zeros(N, dtype=bool)
    for s in range(N):
        if done[s]:
            continue
        comp, _ = _bfs(adj, s)
        done[comp] = True
        a = comp[-1]  # farthest from s
        far, pred = _bfs(adj, a)
        path = [far[-1]]
        while pred[path[-1]] != -1:
            path.append(pred[path[-1]])
        roots.append(path[(len(path) - 1) // 2])
    # level-by-level layout from all roots at once
    order = list(roots)
    offsets = [0, len(roots)]
    parent, edge_of, flip = [], [], []
    pos = np.full(N, -1, dtype=np.int64)
    pos[roots] = np.arange(len(roots))
    level_start = 0
    while offsets[-1] > level_start:
        lo, hi = level_start, offsets[-1]
        for p in range(lo, hi):
            u = order[p]
            for w, e, transposed in adj[u]:
                if pos[w] < 0:
                    pos[w] = len(order)
                    order.append(w)
                    parent.append(p)
                    edge_of.append(e)
                    flip.append(transposed)
        level_start = hi
        if len(order) > hi:
            offsets.append(len(order))
    R = len(roots)
    parent_a = np.asarray(parent, dtype=np.int64)
    level_of_child = np.searchsorted(np.asarray(offsets), np.arange(R, N), side="right") - 1
    local_parent = parent_a - np.asarray(offsets, dtype=np.int64)[np.maximum(level_of_child - 1, 0)]
    edge_of_a = np.asarray(edge_of, dtype=np.int64)
    slot = np.empty(len(edges), dtype=np.int64)
    slot[edge_of_a] = np.arange(len(edges))
    return Plan(
        num_nodes=N,
        num_edges=len(edges),
        num_roots=R,
        edges=tuple(edges),
        order=np.asarray(order, dtype=np.int64),
        position=pos,
        offsets=tuple(offsets),
        parent=parent_a,
        local_parent=local_parent,
        edge_of=edge_of_a,
        flip=np.asarray(flip, dtype=bool),
        slot=slot,
    )
