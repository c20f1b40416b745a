"""Choosing a chain of peers that covers blocks a..b at the lowest estimated latency. Pure logic, no I/O.

Nodes are block boundaries 0..n; serving blocks i..j-1 on peer p is an edge i -> j costing
rtt(p) + (j - i) / throughput(p). Dijkstra from a to b gives the chain; fewer hops win through the rtt term.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from swarm.dht.records import PeerId, ServerRecord
from swarm.errors import NoRoute

DEFAULT_RTT = 0.005  # seconds, for peers not yet pinged


@dataclass(frozen=True)
class Hop:
    peer: PeerId
    start: int
    end: int


def _ranges(blocks: list[int]) -> str:
    out, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(f"{blocks[i]}:{blocks[j] + 1}")
        i = j + 1
    return ", ".join(out)


def find_route(servers: dict[PeerId, ServerRecord], start: int, end: int, rtt: dict[PeerId, float] | None = None,
               banned: set[PeerId] | frozenset[PeerId] = frozenset(), model: str = "") -> list[Hop]:
    """The cheapest chain of hops covering blocks start..end-1 using `servers` (assumed ONLINE)."""
    rtt = rtt or {}
    usable = {p: r for p, r in servers.items() if p not in banned and r.end > start and r.start < end}
    covered = set()
    for r in usable.values():
        covered.update(range(max(r.start, start), min(r.end, end)))
    missing = [b for b in range(start, end) if b not in covered]
    if missing:
        everyone = set()
        for p, r in servers.items():
            everyone.update(range(max(r.start, start), min(r.end, end)))
        why = "no ONLINE peer serves" if any(b not in everyone for b in missing) else \
            "every peer serving them is banned after failures:"
        raise NoRoute(f"{why} blocks {_ranges(missing)}" + (f" of model {model!r}" if model else ""))
    dist = {start: 0.0}
    prev: dict[int, tuple[int, Hop]] = {}
    heap = [(0.0, start)]
    while heap:
        d, i = heapq.heappop(heap)
        if i == end:
            break
        if d > dist.get(i, float("inf")):
            continue
        for p, r in usable.items():
            if not r.start <= i < r.end:
                continue
            per_block = 1.0 / max(r.throughput, 1e-3)
            hop_cost = rtt.get(p, DEFAULT_RTT)
            for j in range(i + 1, min(r.end, end) + 1):
                nd = d + hop_cost + (j - i) * per_block
                if nd < dist.get(j, float("inf")):
                    dist[j] = nd
                    prev[j] = (i, Hop(p, i, j))
                    heapq.heappush(heap, (nd, j))
    if end not in dist:  # covered block by block but not chainable: cannot happen with contiguous ranges
        raise NoRoute(f"no chain of peers covers blocks {start}:{end}")
    hops: list[Hop] = []
    node = end
    while node != start:
        node, hop = prev[node]
        hops.append(hop)
    return hops[::-1]
