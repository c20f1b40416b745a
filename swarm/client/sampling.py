"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.errors import SwarmError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL-style)
    seed: int | None = None
    stop_tokens: tuple[int, ...] = field(default_factory=tuple)  # generation stops after emitting one of these

    def validate(self) -> None:
        if self.temperature < 0:
            raise SwarmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SwarmError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SwarmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise SwarmError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    """Stateful only in its random generator, so a seeded run is reproducible."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    @property
    def greedy(self) -> bool:
        """Every pick is the logits' argmax (the first index of the largest value), whatever the history."""
        return self.p.temperature == 0 and self.p.repetition_penalty == 1.0

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: (vocab,) fp32 for the last position; history: tokens so far (for the repetition penalty)."""
        p = self.p
        if p.temperature == 0 and (p.repetition_penalty == 1.0 or not history):
            return int(torch.argmax(logits))  # where the logits are: one number to the host, not the vocabulary
        logits = logits.float().cpu()
        if p.repetition_penalty != 1.0 and history:
            idx = torch.tensor(sorted(set(history)), dtype=torch.long)
            idx = idx[idx < logits.numel()]
            vals = logits[idx]
            logits = logits.clone()
            logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k is not None and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p is not None and p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p  # always keeps the most likely token
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.gen))
