"""Sessions on a peer: their per-block states, limits (count and memory) and idle expiry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NewType

import torch

from swarm.errors import PeerBusy, ProtocolError
from swarm.model import LayerState, MambaConfig

if TYPE_CHECKING:
    from swarm.model.graphs import GraphDecoder

SessionId = NewType("SessionId", str)


@dataclass
class Session:
    sid: SessionId
    start: int
    end: int
    batch: int
    states: list[LayerState]
    position: int = 0  # tokens in the state
    last_used: float = field(default_factory=time.monotonic)
    slot: int | None = None  # the GraphDecoder slot whose pool rows hold `states`, if any
    closed: bool = False  # set on close; a step still queued for it is refused, not run

    @property
    def nbytes(self) -> int:
        return sum(s.conv.numel() * s.conv.element_size() + s.ssm.numel() * s.ssm.element_size()
                   for s in self.states)


def state_bytes(cfg: MambaConfig, blocks: int, batch: int) -> int:
    return blocks * batch * cfg.intermediate_size * (cfg.conv_kernel + cfg.state_size) * 4


class SessionTable:
    """Open sessions, bounded by a count and by the bytes of their states.

    With a GraphDecoder `pool` (a CUDA peer), a batch-1 session's states are views of a pool slot, so its decode
    steps can run in the captured graph; `release(slot)` gives the slot back once no step of the session can
    still be running (the peer runs it on its compute thread, after whatever was queued there before).
    """

    def __init__(self, cfg: MambaConfig, max_sessions: int, budget_bytes: int, device: torch.device,
                 pool: GraphDecoder | None = None, pool_start: int = 0,
                 release: Callable[[int], None] | None = None):
        self.cfg, self.max_sessions, self.budget, self.device = cfg, max_sessions, budget_bytes, device
        self.pool, self.pool_start, self.release = pool, pool_start, release
        self.sessions: dict[SessionId, Session] = {}

    @property
    def used_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    @property
    def free_slots(self) -> int:
        return max(0, self.max_sessions - len(self.sessions))

    def open(self, sid: SessionId, start: int, end: int, batch: int) -> Session:
        if sid in self.sessions:
            raise ProtocolError(f"session {sid!r} is already open on this peer")
        if len(self.sessions) >= self.max_sessions:
            raise PeerBusy(f"peer is full: {len(self.sessions)} of {self.max_sessions} sessions open")
        need = state_bytes(self.cfg, end - start, batch)
        if self.used_bytes + need > self.budget:
            raise PeerBusy(f"peer is out of state memory: {need} bytes needed, "
                           f"{self.budget - self.used_bytes} free")
        slot = None
        if self.pool is not None and batch == 1 and self.pool.free_slots:
            slot = self.pool.alloc_slot()
            states = self.pool.views(slot, start - self.pool_start, end - self.pool_start)
        else:
            states = [LayerState.zeros(self.cfg, batch, self.device) for _ in range(start, end)]
        s = Session(sid, start, end, batch, states, slot=slot)
        self.sessions[sid] = s
        return s

    def close(self, sid: SessionId) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        s.closed = True
        if s.slot is not None:
            assert self.pool is not None
            (self.release or self.pool.free_slot)(s.slot)

    def expire(self, idle_timeout: float) -> list[SessionId]:
        now = time.monotonic()
        dead = [sid for sid, s in self.sessions.items() if now - s.last_used > idle_timeout]
        for sid in dead:
            self.close(sid)
        return dead
