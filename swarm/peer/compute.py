"""The peer's compute loop: one worker thread runs the blocks; decode steps of several sessions share a batch."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from swarm.errors import ProtocolError
from swarm.model import BlockStack, LayerState
from swarm.model.graphs import GraphDecoder
from swarm.model.stack import PREFILL_CHUNK
from swarm.peer.sessions import Session

log = logging.getLogger(__name__)


@dataclass
class _Job:
    session: Session
    hidden: torch.Tensor  # (batch, T, d_model) fp32
    future: asyncio.Future


def run_span(stack: BlockStack, start: int, end: int, hidden: torch.Tensor, states: list[LayerState]) -> torch.Tensor:
    """Run blocks start..end-1 (absolute indices inside the stack's range), PREFILL_CHUNK tokens at a time.

    hidden: (B, T, D) fp32 -> (B, T, D) fp32 on the stack's device; `states` advance by T tokens.
    """
    blocks = stack.blocks[start - stack.start:end - stack.start]
    outs = []
    with torch.inference_mode():
        for piece in hidden.to(stack.device, torch.float32).split(PREFILL_CHUNK, dim=1):
            for block, st in zip(blocks, states):
                piece = block(piece, st, stack.kern)
            outs.append(piece)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class Batcher:
    """Queues steps; the worker thread takes every waiting decode step of the same span as one batch.

    With a GraphDecoder, decode steps and prefills of sessions that hold a pool slot and span the whole stack replay
    its captured graphs; everything else (sub-spans, sessions without a slot) runs the stack eagerly.
    """

    def __init__(self, stack: BlockStack, max_batch: int, corrupt: float = 0.0, decoder: GraphDecoder | None = None):
        self.stack, self.max_batch, self.corrupt, self.decoder = stack, max_batch, corrupt, decoder
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="swarm-compute")
        self.batches = 0
        self.batched_steps = 0
        self.pool_steps = 0  # session-steps that ran through the GraphDecoder
        self.pool_prefills = 0

    async def submit(self, session: Session, hidden: torch.Tensor) -> torch.Tensor:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(session, hidden, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty() and len(jobs) < self.max_batch:
                jobs.append(self.queue.get_nowait())
            for j in jobs:
                if j.session.closed and not j.future.done():
                    j.future.set_exception(ProtocolError("session closed"))
            jobs = [j for j in jobs if not j.future.done()]
            for group in self._groups(jobs):
                try:
                    outs = await loop.run_in_executor(self.pool, self._compute, group)
                except Exception as e:  # a bad step fails its own sessions only
                    log.warning("step failed for %d session(s): %s", len(group), e)
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, out in zip(group, outs):
                    if not j.future.done():
                        j.future.set_result(out)

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Decode steps (T == 1) over the same span batch together; anything else runs alone."""
        groups: dict[tuple[int, int], list[_Job]] = {}
        alone: list[list[_Job]] = []
        for j in jobs:
            if j.hidden.shape[1] == 1:
                groups.setdefault((j.session.start, j.session.end), []).append(j)
            else:
                alone.append([j])
        return list(groups.values()) + alone

    def release(self, slot: int) -> None:
        """Free a GraphDecoder slot on the compute thread, after every step already handed to it."""
        assert self.decoder is not None
        self.pool.submit(self.decoder.free_slot, slot)

    def _pool_run(self, group: list[_Job]) -> list[torch.Tensor] | None:
        """Through the GraphDecoder, when every session holds a slot and spans the whole stack: decode steps as one
        batched graph replay, a lone longer step as a prefill (or a replay after a restore) through the prefill
        graphs. None when the group cannot."""
        dec, whole = self.decoder, (self.stack.start, self.stack.end)
        if dec is None or any(j.session.slot is None or (j.session.start, j.session.end) != whole for j in group):
            return None
        if len(group) <= dec.buckets[-1] and all(j.hidden.shape[1] == 1 for j in group):
            out = dec.step([j.session.slot for j in group], torch.cat([j.hidden for j in group]))
            self.pool_steps += len(group)
            if len(group) > 1:
                self.batches += 1
                self.batched_steps += len(group)
            return [self._maybe_corrupt(o) for o in out.split(1)]
        if len(group) == 1:
            self.pool_prefills += 1
            return [self._maybe_corrupt(dec.prefill(group[0].session.slot, group[0].hidden))]
        return None

    def _compute(self, group: list[_Job]) -> list[torch.Tensor]:
        if any(j.session.closed for j in group):  # closed while queued: its slot may be someone else's by now
            raise ProtocolError("session closed")
        outs = self._pool_run(group)
        if outs is not None:
            return outs
        s0 = group[0].session
        if len(group) == 1:
            out = run_span(self.stack, s0.start, s0.end, group[0].hidden, s0.states)
            return [self._maybe_corrupt(out)]
        # several sessions: concatenate their states along the batch, run once, scatter back
        sizes = [j.session.batch for j in group]
        hidden = torch.cat([j.hidden for j in group], dim=0)  # (sum B, 1, D)
        states = [LayerState(torch.cat([j.session.states[i].conv for j in group]),
                             torch.cat([j.session.states[i].ssm for j in group]))
                  for i in range(len(s0.states))]
        out = run_span(self.stack, s0.start, s0.end, hidden, states)
        for i, st in enumerate(states):
            for j, conv, ssm in zip(group, st.conv.split(sizes), st.ssm.split(sizes)):
                j.session.states[i].conv.copy_(conv)
                j.session.states[i].ssm.copy_(ssm)
        self.batches += 1
        self.batched_steps += len(group)
        return [self._maybe_corrupt(o) for o in out.split(sizes)]

    def _maybe_corrupt(self, out: torch.Tensor) -> torch.Tensor:
        if self.corrupt:
            out = out + self.corrupt * torch.randn_like(out)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def measure_throughput(stack: BlockStack, steps: int = 5, decoder: GraphDecoder | None = None) -> float:
    """Tokens per second through one block: decode steps of batch 1 over the whole stack (graphs if given)."""
    hidden = torch.zeros(1, 1, stack.cfg.hidden_size, device=stack.device)
    if decoder is not None:
        slot = decoder.alloc_slot()
        step = lambda: decoder.step([slot], hidden)  # noqa: E731
        steps *= 4 if decoder.captured else 1  # a replay is short: time more of them
    else:
        states = stack.new_states(1)
        step = lambda: stack(hidden, states)  # noqa: E731
    step()  # warm-up (kernel compile, allocator)
    if stack.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if stack.device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    if decoder is not None:
        decoder.free_slot(slot)
    return (stack.end - stack.start) / max(per_step, 1e-9)
