"""Local generation: every block in this process (`swarm generate --local`)."""

from __future__ import annotations

import asyncio
import logging
import weakref

import torch

from swarm.client.generation import GenerationSession, Next
from swarm.client.tokenizer import Tokenizer
from swarm.model import BlockStack, Head, MambaConfig

log = logging.getLogger(__name__)
GRAPH_SLOTS = 4  # sessions of one LocalModel that decode through the CUDA graphs at once; more run eagerly


async def _load(location: str, cache_dir: str | None, allow_full_download: bool, progress: bool):
    from swarm.knot_fetch import open_source
    src = await open_source(location, cache_dir=cache_dir, allow_full_download=allow_full_download,
                            progress=progress)
    try:
        cfg = MambaConfig.from_dict(src.config)
        names = src.head_tensor_names() + src.block_tensor_names(0, cfg.num_layers)
        tensors = await src.fetch(names)
        tok = await src.fetch_blob("tokenizer.json")
        return src.name, cfg, tensors, tok
    finally:
        await src.close()


class LocalModel:
    """A whole model in this process. `generate` and `session()` mirror SwarmClient's API.

    On CUDA (graphs="auto") sessions decode through a GraphDecoder: the whole step is one graph replay instead of
    hundreds of launches from Python. graphs="off" runs every step eagerly through the BlockStack; "eager" is the
    GraphDecoder's slot pool without capture (the Triton interpreter on a CPU).
    """

    def __init__(self, location: str, device: str = "cpu", dtype: torch.dtype | None = None,
                 backend: str | None = None, cache_dir: str | None = None, allow_full_download: bool = False,
                 progress: bool = False, graphs: str = "auto"):
        if graphs not in ("auto", "off", "eager"):
            raise ValueError(f"LocalModel graphs must be 'auto', 'off' or 'eager', got {graphs!r}")
        name, cfg, tensors, tok = asyncio.run(_load(location, cache_dir, allow_full_download, progress))
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(("A_log", "mixer.D")) else v
                       for k, v in tensors.items()}
        self.name, self.cfg = name, cfg
        self.head = Head.from_tensors(cfg, tensors, device)
        self.stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device, backend)
        self.tokenizer = Tokenizer(tok, name)
        self.decoder = None
        if graphs == "eager" or (graphs == "auto" and self.stack.device.type == "cuda" and backend in (None, "cuda")):
            from swarm.model.graphs import GraphDecoder
            self.decoder = GraphDecoder(self.stack, max_slots=GRAPH_SLOTS, buckets=(1,), graphs=graphs == "auto",
                                        head=self.head)

    def session(self) -> "LocalSession":
        return LocalSession(self)

    def generate(self, prompt: str | list[int], max_new_tokens: int, **kw) -> list[int]:
        with self.session() as s:
            return s.generate(prompt, max_new_tokens, **kw)


class LocalSession(GenerationSession):
    """One sequence. With the model's GraphDecoder it holds a slot of its state pool until close() (or until it is
    garbage-collected); when every slot is taken it keeps its own states and runs eagerly."""

    def __init__(self, model: LocalModel):
        super().__init__(model.head, model.tokenizer)
        self.stack = model.stack
        self.decoder, self.slot = model.decoder, None
        if self.decoder is not None:
            try:
                self.slot = self.decoder.alloc_slot()
            except RuntimeError:
                log.warning("all %d graph slots are taken: this session runs eagerly", self.decoder.max_slots)
        if self.slot is None:
            self.states = model.stack.new_states(1)
        else:
            self._release = weakref.finalize(self, self.decoder.free_slot, self.slot)
            if self.decoder.device.type == "cuda":  # where a greedy pick's value lands, and when
                self._host = torch.empty(1, 1, dtype=torch.long, pin_memory=True)
                self._copied = torch.cuda.Event()

    def _next(self, ids: list[int], greedy: bool) -> Next:
        if self.slot is None:
            return super()._next(ids, greedy)
        if len(ids) > 1:  # a prefill; a greedy session's pick stays on the device, where the next step reads it
            logits = self._feed(ids)
            return Next(logits, logits.argmax().view(1, 1) if greedy else None)
        t = torch.tensor([ids], dtype=torch.long)
        if greedy:  # embedding, blocks, head and the argmax in one replay
            return Next(None, self.decoder.step_greedy([self.slot], t))
        return Next(self.decoder.step_logits([self.slot], t)[0])

    def _take(self, pick: torch.Tensor, feed: bool) -> tuple[int, Next | None]:
        if self.slot is None:
            return super()._take(pick, feed)
        cuda = pick.device.type == "cuda"
        if cuda:  # the value's copy is queued before the next step, and waited for after it is queued
            self._host.copy_(pick, non_blocking=True)
            self._copied.record()
        after = None
        if feed:  # the logits too: a stop here keeps them for a next call that samples
            picks, logits = self.decoder.step_greedy([self.slot], pick, logits=True)
            after = Next(logits[0], picks)
        if cuda:
            self._copied.synchronize()
            return int(self._host[0, 0]), after
        return int(pick[0, 0]), after

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.slot is None:
            return self.stack(hidden, self.states)
        if hidden.shape[1] == 1:
            return self.decoder.step([self.slot], hidden)
        return self.decoder.prefill(self.slot, hidden)

    def close(self) -> None:
        if self.slot is not None:
            self._release()

    def __enter__(self) -> "LocalSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
