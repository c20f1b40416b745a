"""Local generation: every block in this process (`swarm generate --local`)."""

from __future__ import annotations

import asyncio

import torch

from swarm.client.generation import GenerationSession
from swarm.client.tokenizer import Tokenizer
from swarm.model import BlockStack, Head, MambaConfig


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
    """A whole model in this process. `generate` and `session()` mirror SwarmClient's API."""

    def __init__(self, location: str, device: str = "cpu", dtype: torch.dtype | None = None,
                 backend: str | None = None, cache_dir: str | None = None, allow_full_download: bool = False,
                 progress: bool = False):
        name, cfg, tensors, tok = asyncio.run(_load(location, cache_dir, allow_full_download, progress))
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(("A_log", "mixer.D")) else v
                       for k, v in tensors.items()}
        self.name, self.cfg = name, cfg
        self.head = Head.from_tensors(cfg, tensors, device)
        self.stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device, backend)
        self.tokenizer = Tokenizer(tok, name)

    def session(self) -> "LocalSession":
        return LocalSession(self)

    def generate(self, prompt: str | list[int], max_new_tokens: int, **kw) -> list[int]:
        return self.session().generate(prompt, max_new_tokens, **kw)


class LocalSession(GenerationSession):
    def __init__(self, model: LocalModel):
        super().__init__(model.head, model.tokenizer)
        self.stack = model.stack
        self.states = model.stack.new_states(1)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stack(hidden, self.states)

    def __enter__(self) -> "LocalSession":
        return self

    def __exit__(self, *exc) -> None:
        pass
