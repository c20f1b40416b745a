"""The decode loop shared by local and swarm sessions: prefill, sample, feed back, stream tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from swarm.client.sampling import Sampler, SamplingParams
from swarm.client.tokenizer import Tokenizer
from swarm.errors import SwarmError
from swarm.model import Head

PREFILL_CHUNK = 2048  # tokens per prefill call: bounds a peer's activation memory and a message's size


@dataclass
class Next:
    """What the blocks said about the next position: its logits (vocab,) fp32, and where the session picked on the
    device, their argmax there, (1, 1) int64 (logits may then be None: nothing asked for them)."""
    logits: torch.Tensor | None
    pick: torch.Tensor | None = None


class GenerationSession:
    """Keeps a sequence's history and either the last sampled token (`pending`, not yet fed through the blocks) or,
    where a greedy session fed it ahead of time, what the blocks said after it (`_ahead`).

    Subclasses implement `_forward(hidden)`: hidden (1, T, d_model) fp32 -> (1, T, d_model) fp32, advancing the
    blocks' state by T tokens. A session that can pick greedy tokens on the device (LocalSession in a GraphDecoder
    slot) also overrides `_next` (it returns the pick) and `_take` (it queues the next step before it waits for
    the pick's value), so that a greedy decode keeps one token queued ahead of the host.
    """

    def __init__(self, head: Head, tokenizer: Tokenizer):
        self.head = head
        self.tokenizer = tokenizer
        self.history: list[int] = []  # every token fed or sampled, in order
        self.pending: list[int] = []  # sampled but not yet fed through the blocks
        self._ahead: Next | None = None  # or: the whole history fed, and what the blocks said after it
        self.last_logits: list[torch.Tensor] = []  # logits of each sampling step of the last call (for tests)
        self.keep_logits = False

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the blocks; returns the logits at the last position, (vocab,) fp32."""
        hidden = None
        for i in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[i:i + PREFILL_CHUNK]], dtype=torch.long)  # (1, T)
            hidden = self._forward(self.head.embed(chunk))
        assert hidden is not None
        return self.head.logits(hidden[:, -1:])[0, -1]

    def _next(self, ids: list[int], greedy: bool) -> Next:
        """Feed `ids`; what the blocks say about the next position. `greedy`: only the argmax will be asked for."""
        return Next(self._feed(ids))

    def _take(self, pick: torch.Tensor, feed: bool) -> tuple[int, Next | None]:
        """A device pick's value; `feed`: the pick is fed too (a local CUDA session queues that step before it waits
        for the value, so that the device never waits for the host) -> what the blocks say after it, logits
        included: a stop there keeps it for a next call, which may sample."""
        tok = int(pick.reshape(-1)[0])
        return tok, (self._next([tok], False) if feed else None)

    def encode(self, prompt: str | list[int] | None) -> list[int]:
        if prompt is None:
            return []
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = self.head.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise SwarmError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return ids

    def stream(self, prompt: str | list[int] | None, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
               seed: int | None = None, stop_tokens: tuple[int, ...] | list[int] = (),
               on_token: Callable[[int], None] | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` new tokens; prompt None continues from where the last call stopped."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, tuple(stop_tokens))
        sampler = Sampler(params)
        ids = self.pending + self.encode(prompt)
        if not ids and self._ahead is None:
            raise SwarmError("nothing to generate from: give a prompt (the session is empty)")
        if max_new_tokens < 1:
            return
        self.last_logits = []
        self.history.extend(ids[len(self.pending):])
        self.pending = []
        greedy = sampler.greedy and not self.keep_logits  # the pick needs no logits on the host
        nxt = self._next(ids, greedy) if ids else self._ahead
        self._ahead = None
        for i in range(max_new_tokens):
            last = i == max_new_tokens - 1
            if greedy and nxt.pick is not None:
                # the token after this one is on its way before this one reaches the host, unless it is the last
                tok, after = self._take(nxt.pick, feed=not last)
            else:
                assert nxt.logits is not None
                if self.keep_logits:
                    self.last_logits.append(nxt.logits)
                tok, after = sampler(nxt.logits, self.history), None
            self.history.append(tok)
            # fed ahead: a stop here (or the caller leaving) keeps what the blocks said after tok for the next call
            self.pending, self._ahead = ([], after) if after is not None else ([tok], None)
            if on_token:
                on_token(tok)
            yield tok
            if tok in params.stop_tokens or last:
                return
            self.pending, self._ahead = [], None
            nxt = after if after is not None else self._next([tok], greedy)

    def generate(self, prompt: str | list[int] | None, max_new_tokens: int, **kw) -> list[int]:
        return list(self.stream(prompt, max_new_tokens, **kw))
