"""An inference session through a chain of peers: steps with deadlines, checkpoints, and O(K) failover."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from swarm import wire
from swarm.client.failover import StepClock
from swarm.client.generation import GenerationSession
from swarm.client.routing import Hop
from swarm.dht.records import PeerId
from swarm.errors import DishonestPeer, NoRoute, PeerBusy, PeerUnavailable, ProtocolError, SwarmError

if TYPE_CHECKING:
    from swarm.client.swarm_client import SwarmClient

log = logging.getLogger(__name__)
_NET_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ProtocolError,
               PeerUnavailable)


@dataclass
class SpanConn:
    """One open inference stream: blocks start..end-1 on `peer`, and what is needed to rebuild it elsewhere."""

    peer: PeerId
    start: int
    end: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    clock: StepClock
    position: int = 0  # tokens in the peer's state
    ckpt_position: int = 0  # the last checkpoint's position (0 with no states = the zero state)
    ckpt_states: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)  # hidden inputs since the checkpoint, (1, T, D)
    seq: int = 0
    merge: bool = False  # checkpoint at the next step, then merge with the neighbour on the same peer

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # the stream may already be gone
            pass


class InferenceSession(GenerationSession):
    """A session through the swarm. Sync API (generate/stream) over the client's event loop thread."""

    def __init__(self, client: "SwarmClient", max_retries: int = 8):
        super().__init__(client.head, client.tokenizer)
        self.client = client
        self.session_id = uuid.uuid4().hex
        self.spans: list[SpanConn] = []
        self.max_retries = max_retries
        self.position = 0
        self.stats: dict[str, Any] = {"recoveries": 0, "replayed_tokens": 0, "steps": 0, "banned": []}
        self._culprit = PeerId("")  # the peer being talked to while (re)building a chain
        self._no_merge: set[tuple[PeerId, int, int]] = set()  # span pairs that could not be merged: not retried

    # ---- public ---------------------------------------------------------------------------------------------

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [(str(s.peer), s.start, s.end) for s in self.spans]

    def close(self) -> None:
        if self.spans:
            self.client.run(self._close_all())

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- GenerationSession ----------------------------------------------------------------------------------

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.client.run(self._forward_async(hidden))

    async def _forward_async(self, hidden: torch.Tensor) -> torch.Tensor:
        n = self.client.num_layers
        if not self.spans:
            await self._build(0, n, [], 0, None)
        block, h, tries = 0, hidden, 0
        while block < n:
            idx = next(i for i, s in enumerate(self.spans) if s.start == block)
            span = self.spans[idx]
            try:
                h = await self._step(span, h)
                block = span.end
            except _NET_ERRORS as e:
                tries += 1
                if tries > self.max_retries:
                    raise PeerUnavailable(f"gave up after {tries - 1} recoveries: {e}") from None
                await self._recover(idx, e)
        self.position += hidden.shape[1]
        self.stats["steps"] += 1
        if any(s.merge for s in self.spans):
            await self._merge_spans()
        self._mark_merges()
        return h

    # ---- steps ----------------------------------------------------------------------------------------------

    async def _step(self, span: SpanConn, hidden: torch.Tensor) -> torch.Tensor:
        """Send one step; returns the span's output. Raises a _NET_ERRORS member on any failure."""
        tokens = hidden.shape[1]
        k = self.client.config.checkpoint_every
        want_ckpt = tokens > 1 or span.position + tokens - span.ckpt_position >= k or span.merge
        span.seq += 1
        ckpt_bytes = self.client.state_bytes(span.end - span.start) if want_ckpt else 0
        timeout = span.clock.deadline(tokens, ckpt_bytes + hidden.numel() * 8)
        t0 = time.perf_counter()
        await wire.send(span.writer, wire.Step(span.seq, span.position, hidden, want_ckpt))
        try:
            res = await asyncio.wait_for(_expect(span.reader, wire.StepResult), timeout=timeout)
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"no answer within the {timeout:.1f}s step deadline") from None
        if res.seq != span.seq or res.position != span.position + tokens:
            raise ProtocolError(f"peer answered step {res.seq}@{res.position}, expected {span.seq}@"
                                f"{span.position + tokens}")
        if tuple(res.hidden.shape) != tuple(hidden.shape):
            raise ProtocolError(f"peer returned hidden of shape {tuple(res.hidden.shape)}")
        if self.client.config.verify_rate > 0 and random.random() < self.client.config.verify_rate:
            await self._verify(span, hidden, res.hidden)
        span.position = res.position
        if want_ckpt:
            remaining = max(0.5, timeout - (time.perf_counter() - t0))
            ck = await asyncio.wait_for(_expect(span.reader, wire.Checkpoint), timeout=remaining)
            if ck.position != span.position or len(ck.states) != span.end - span.start:
                raise ProtocolError("peer sent a checkpoint for the wrong position or blocks")
            span.ckpt_position, span.ckpt_states, span.inputs = ck.position, ck.states, []
        else:
            span.inputs.append(hidden)
        elapsed = time.perf_counter() - t0
        span.clock.observe(elapsed, tokens)
        if tokens == 1:  # what a hop costs beyond the peer's compute: network, codec, queueing
            overhead = self.stats.setdefault("hop_overhead_ms", [])
            overhead.append(elapsed * 1000 - res.compute_ms)
            del overhead[:-256]
        return res.hidden

    # ---- verification ---------------------------------------------------------------------------------------

    async def _verify(self, span: SpanConn, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """Re-run this step on other peers from the span's last checkpoint; ban the peer that disagrees.

        Raises DishonestPeer when `span.peer` is outvoted, so the failover path re-routes around it and the bad
        output is never used. A verifier that fails is only skipped: verification must not break generation.
        """
        from swarm.client.routing import Hop
        candidates = [p for p, r in self.client.view.online().items()
                      if p != span.peer and p not in self.client.bans.banned() and r.start <= span.start
                      and r.end >= span.end]
        random.shuffle(candidates)
        verdicts: list[tuple[PeerId, bool]] = []
        for peer in candidates[:2]:
            try:
                other = await self._open(Hop(peer, span.start, span.end))
                try:
                    await self._restore([other], span.start, [], span.ckpt_position, span.ckpt_states,
                                        count_replay=False)
                    h = torch.cat(span.inputs + [hidden], dim=1)  # (1, T since checkpoint + this step, D)
                    await wire.send(other.writer, wire.Step(1, other.position, h, False))
                    res = await asyncio.wait_for(_expect(other.reader, wire.StepResult),
                                                 timeout=other.clock.deadline(h.shape[1]))
                finally:
                    other.close()
            except _NET_ERRORS as e:
                log.info("verifier %s failed: %s", peer[:12], e)
                continue
            theirs = res.hidden[:, -hidden.shape[1]:]
            tol = self._tolerance(span.peer, peer) * (1 + output.abs().max().item())
            agree = (theirs - output).abs().max().item() <= tol
            self.stats["verifications"] = self.stats.get("verifications", 0) + 1
            verdicts.append((peer, agree))
            if agree:  # verifiers that disagreed with two agreeing peers are the liars
                for liar, ok in verdicts[:-1]:
                    self._report_dishonest(liar, span)
                    self.client.ban(liar, DishonestPeer("disagreed with two other peers"))
                return
        if not verdicts:
            return
        # every verifier disagreed: two of them outvote the peer; with one, we trust the randomly chosen verifier
        self._report_dishonest(span.peer, span)
        raise DishonestPeer(f"peer {span.peer[:12]} failed verification")

    def _tolerance(self, a: PeerId, b: PeerId) -> float:
        recs = [self.client.view.servers.get(p) for p in (a, b)]
        fp32 = all(r is not None and r.dtype == "float32" for r in recs)
        return self.client.config.verify_tolerance * (1.0 if fp32 else 30.0)  # half-precision peers differ more

    def _report_dishonest(self, peer: PeerId, span: SpanConn) -> None:
        self.stats["mismatches"] = self.stats.get("mismatches", 0) + 1
        self.stats.setdefault("dishonest", []).append(str(peer))
        self.client.dishonest[peer] = self.client.dishonest.get(peer, 0) + 1
        log.warning("peer %s gave a wrong result for blocks %d:%d; banning it", peer[:12], span.start, span.end)

    # ---- routing and recovery -------------------------------------------------------------------------------

    async def _open(self, hop: Hop, session_id: str | None = None) -> SpanConn:
        from hivemind.p2p import PeerID
        client = self.client
        try:
            _, reader, writer = await asyncio.wait_for(
                client.p2p.call_binary_stream_handler(PeerID.from_base58(hop.peer), wire.INFERENCE_PROTOCOL),
                timeout=client.config.connect_timeout)
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"peer {hop.peer[:12]}: connect timed out") from None
        except Exception as e:  # hivemind's dial errors are plain Exceptions
            raise PeerUnavailable(f"peer {hop.peer[:12]}: cannot open a stream: {e}") from None
        # one peer may hold several spans of this session (e.g. after a re-route): each stream is its own session there
        sid = session_id or f"{self.session_id}:{hop.start}-{hop.end}:{uuid.uuid4().hex[:8]}"
        await wire.send(writer, wire.Open(sid, hop.start, hop.end, 1))
        await asyncio.wait_for(_expect(reader, wire.Opened), timeout=client.config.connect_timeout)
        rec = client.view.servers.get(hop.peer)
        expected = (hop.end - hop.start) / rec.throughput if rec and rec.throughput > 0 else 0.5
        clock = StepClock(expected + client.rtt.get(hop.peer, 0.005), client.config.min_step_timeout)
        return SpanConn(hop.peer, hop.start, hop.end, reader, writer, clock)

    async def _build(self, start: int, end: int, inputs: list[torch.Tensor], ckpt_position: int,
                     ckpt_states: list | None) -> list[SpanConn]:
        """Open a chain for blocks start..end, restore the checkpoint and replay `inputs`; install it."""
        for attempt in range(self.max_retries + 1):
            hops = await self.client.route(start, end)
            built: list[SpanConn] = []
            try:
                for hop in hops:
                    self._culprit = hop.peer
                    built.append(await self._open(hop))
                await self._restore(built, start, inputs, ckpt_position, ckpt_states)
            except _NET_ERRORS as e:
                for s in built:
                    s.close()
                self.client.ban(self._culprit, e)
                self.stats["banned"].append(str(self._culprit))
                continue
            self.spans = sorted([s for s in self.spans if s.end <= start or s.start >= end] + built,
                                key=lambda s: s.start)
            return built
        raise PeerUnavailable(f"could not open a chain for blocks {start}:{end} after {self.max_retries + 1} "
                              "attempts")

    async def _restore(self, spans: list[SpanConn], start: int, inputs: list[torch.Tensor], ckpt_position: int,
                       ckpt_states: list | None, count_replay: bool = True) -> None:
        for s in spans:
            self._culprit = s.peer
            if ckpt_states is not None:
                part = ckpt_states[s.start - start:s.end - start]
                await wire.send(s.writer, wire.ImportState(ckpt_position, part))
                ack = await asyncio.wait_for(_expect(s.reader, wire.Ack), timeout=self.client.config.connect_timeout
                                             + self.client.state_bytes(s.end - s.start) / 20e6)
                if ack.position != ckpt_position:
                    raise ProtocolError("peer acknowledged the wrong position")
                s.ckpt_states = part
            s.position = s.ckpt_position = ckpt_position
        if inputs:
            h = torch.cat(inputs, dim=1)  # (1, T since checkpoint, D)
            if count_replay:
                self.stats["replayed_tokens"] += h.shape[1]
            for s in spans:
                self._culprit = s.peer
                h = await self._step(s, h)

    async def _recover(self, idx: int, error: BaseException) -> None:
        span = self.spans[idx]
        self.client.ban(span.peer, error)
        self.stats["recoveries"] += 1
        self.stats["banned"].append(str(span.peer))
        log.warning("peer %s (blocks %d:%d) failed: %s; re-routing, replaying %d token(s)", span.peer[:12],
                    span.start, span.end, error, sum(x.shape[1] for x in span.inputs))
        span.close()
        await self.client.refresh_view()
        await self._build(span.start, span.end, span.inputs, span.ckpt_position, span.ckpt_states)

    def _mark_merges(self) -> None:
        """Flag both spans of each adjacent pair on one peer: a re-route can pick, for a failed span, the peer that
        already serves the span before or after it, and two spans on one peer cost a round trip a token more."""
        for a, b in zip(self.spans, self.spans[1:]):
            if a.peer == b.peer and a.end == b.start and (a.peer, a.start, b.end) not in self._no_merge:
                a.merge = b.merge = True

    async def _merge_spans(self) -> None:
        """Replace each flagged pair by one span on their peer. Both checkpointed at this step, so the new span
        imports their two checkpoints and replays nothing; if anything fails, the two spans stay as they were."""
        i = 0
        while i + 1 < len(self.spans):
            a, b = self.spans[i], self.spans[i + 1]
            if not (a.merge and b.merge and a.peer == b.peer and a.end == b.start):
                i += 1
                continue
            ready = a.ckpt_position == b.ckpt_position == self.position and not a.inputs and not b.inputs \
                and a.ckpt_states is not None and b.ckpt_states is not None
            if not ready:
                self._no_merge.add((a.peer, a.start, b.end))
                i += 1
                continue
            try:
                merged = await self._open(Hop(a.peer, a.start, b.end))
                try:
                    await self._restore([merged], a.start, [], self.position, a.ckpt_states + b.ckpt_states)
                except BaseException:
                    merged.close()
                    raise
            except _NET_ERRORS as e:
                log.info("could not merge blocks %d:%d and %d:%d on peer %s: %s", a.start, a.end, b.start, b.end,
                         a.peer[:12], e)
                self._no_merge.add((a.peer, a.start, b.end))
                i += 1
                continue
            for old in (a, b):
                await self._close_span(old)
            self.spans[i:i + 2] = [merged]
            self.stats["merged_spans"] = self.stats.get("merged_spans", 0) + 1
            log.info("merged blocks %d:%d on peer %s into one span", merged.start, merged.end, merged.peer[:12])
        for s in self.spans:
            s.merge = False

    @staticmethod
    async def _close_span(span: SpanConn) -> None:
        try:
            await asyncio.wait_for(wire.send(span.writer, wire.Close()), timeout=1)
        except Exception:  # best effort: the peer expires idle sessions anyway
            pass
        span.close()

    async def _close_all(self) -> None:
        for s in self.spans:
            await self._close_span(s)
        self.spans = []


async def _expect(reader: asyncio.StreamReader, kind: type) -> Any:
    msg = await wire.recv(reader)
    if isinstance(msg, wire.Error):
        if msg.code == "busy":
            raise PeerBusy(msg.message)
        raise PeerUnavailable(f"peer error ({msg.code}): {msg.message}")
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.TAG!r}, got {msg.TAG!r}")
    return msg


__all__ = ["InferenceSession", "NoRoute", "SwarmError"]
