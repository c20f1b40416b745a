"""The decode loop shared by local and swarm sessions: prefill, sample, feed back, stream tokens."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from swarm.client.sampling import Sampler, SamplingParams
from swarm.client.tokenizer import Tokenizer
from swarm.errors import SwarmError
from swarm.model import Head

PREFILL_CHUNK = 2048  # tokens per prefill call: bounds a peer's activation memory and a message's size


class GenerationSession:
    """Keeps a sequence's history and the last sampled token (not yet fed through the blocks).

    Subclasses implement `_forward(hidden)`: hidden (1, T, d_model) fp32 -> (1, T, d_model) fp32, advancing the
    blocks' state by T tokens.
    """

    def __init__(self, head: Head, tokenizer: Tokenizer):
        self.head = head
        self.tokenizer = tokenizer
        self.history: list[int] = []  # every token fed or sampled, in order
        self.pending: list[int] = []  # sampled but not yet fed through the blocks
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

    def _feed_greedy(self, tok: int) -> int | None:
        """Feed `tok` and return the argmax of the logits after it (Sampler's greedy pick), or None where only
        `_feed` can (the caller then feeds it there). A local CUDA session picks on the device: no logits leave it."""
        return None

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
        if not ids:
            raise SwarmError("nothing to generate from: give a prompt (the session is empty)")
        if max_new_tokens < 1:
            return
        self.last_logits = []
        self.history.extend(ids[len(self.pending):])
        self.pending = []
        greedy = sampler.greedy and not self.keep_logits  # the pick needs no logits on the host

        def feed(ids: list[int]) -> tuple[int | None, torch.Tensor | None]:
            """-> (the next token where the session picked it, else None; the logits where it did not)"""
            picked = self._feed_greedy(ids[0]) if greedy and len(ids) == 1 else None
            return picked, (self._feed(ids) if picked is None else None)

        picked, logits = feed(ids)
        for i in range(max_new_tokens):
            if picked is not None:
                tok = picked
            else:
                if self.keep_logits:
                    self.last_logits.append(logits)
                tok = sampler(logits, self.history)
            self.history.append(tok)
            self.pending = [tok]
            if on_token:
                on_token(tok)
            yield tok
            if tok in params.stop_tokens or i == max_new_tokens - 1:
                return
            self.pending = []
            picked, logits = feed([tok])

    def generate(self, prompt: str | list[int] | None, max_new_tokens: int, **kw) -> list[int]:
        return list(self.stream(prompt, max_new_tokens, **kw))
