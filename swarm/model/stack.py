"""A contiguous range of Mamba blocks (what a peer serves) and the client head (embeddings, norm_f, lm_head)."""

from __future__ import annotations

from collections import ChainMap
from typing import Mapping

import torch
from torch import nn

from swarm.errors import ConfigError, UnknownTensor
from swarm.kernels import Backend, backend_for, get_backend
from swarm.model.block import LayerState, MambaBlock, RMSNorm
from swarm.model.config import MambaConfig


def _assign(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str, what: str,
            device: torch.device) -> None:
    """Make each parameter of `module` the tensor `prefix + param_name`, checking names and shapes with clear errors.

    The module is built on the meta device, so nothing is allocated but the source tensors themselves: a source already
    on `device` and contiguous becomes the parameter as is (same storage, zero copy); otherwise it is moved / made
    contiguous once. Allocating with `to_empty` and then replacing the data put the peak at 3x the weights on a GPU.
    Weights keep the source's dtype.
    """
    for mname, sub in module.named_modules():
        for pname, param in list(sub.named_parameters(recurse=False)):
            key = f"{prefix}{mname}.{pname}" if mname else prefix + pname
            if key not in tensors:
                raise UnknownTensor(f"{what}: tensor {key!r} is missing from the model file")
            src = tensors[key]
            if tuple(src.shape) != tuple(param.shape):
                raise ConfigError(f"{what}: tensor {key!r} has shape {tuple(src.shape)}, the config implies "
                                  f"{tuple(param.shape)}")
            if src.is_meta:
                raise ConfigError(f"{what}: tensor {key!r} is on the meta device and holds no data")
            setattr(sub, pname, nn.Parameter(src.to(device=device).contiguous(), requires_grad=False))


def _check_materialized(module: nn.Module, what: str) -> None:
    """Raise if a parameter or buffer was left on the meta device (a module field that no tensor was loaded into)."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_meta:
            raise ConfigError(f"{what}: {name!r} was not loaded from any tensor (still on the meta device)")


# On CUDA these weights of a stack's blocks are loaded into one tensor each, block after block (each block's
# parameter a view): the persistent decode step (swarm.kernels.gluon_step) streams each through one TMA descriptor
PACKED = ("mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.out_proj.weight")


def _pack(tensors: Mapping[str, torch.Tensor], start: int, end: int,
          device: torch.device) -> dict[str, torch.Tensor]:
    """PACKED weights of blocks start..end-1 copied into one tensor each on `device`, as {name: view}; a weight
    that is missing, differs in shape or dtype between blocks, or lives on the meta device is left to _assign."""
    out: dict[str, torch.Tensor] = {}
    for name in PACKED:
        keys = [f"backbone.layers.{j}.{name}" for j in range(start, end)]
        if not all(k in tensors for k in keys):
            continue
        srcs = [tensors[k] for k in keys]
        s0 = srcs[0]
        if any(t.is_meta or t.shape != s0.shape or t.dtype != s0.dtype for t in srcs):
            continue
        packed = torch.empty((len(srcs), *s0.shape), dtype=s0.dtype, device=device)
        for j, (k, t) in enumerate(zip(keys, srcs)):
            packed[j].copy_(t)
            out[k] = packed[j]
    return out


# A peer runs a longer prefill in pieces of this many tokens, the states carried from one to the next: the same
# result, with activations bounded (2.8b: ~0.15 GB for 1024 tokens instead of growing with the prompt).
PREFILL_CHUNK = 1024


class BlockStack(nn.Module):
    """Blocks start..end-1 of a model. forward(hidden, states) runs T tokens through them all."""

    def __init__(self, cfg: MambaConfig, start: int, end: int):
        super().__init__()
        cfg.check_blocks(start, end)
        self.cfg, self.start, self.end = cfg, start, end
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(start, end))
        self.kern: Backend | None = None

    @classmethod
    def from_tensors(cls, cfg: MambaConfig, start: int, end: int, tensors: Mapping[str, torch.Tensor],
                     device: str | torch.device = "cpu", backend: str | None = None,
                     pack: bool | None = None) -> "BlockStack":
        """Build from canonical (HF) tensor names; weights keep the file's dtype unless already cast.

        pack: on CUDA, load PACKED weights into one tensor each (what the persistent decode step streams). None:
        where the sources are not on the device already (the copy is made anyway: no extra memory); sources
        already there stay the parameters themselves unless pack=True (a second copy while loading)."""
        device = torch.device(device)
        with torch.device("meta"):
            stack = cls(cfg, start, end)
        if pack is None:  # ("cuda" and "cuda:0" are the same device here)
            pack = not any(t.device.type == device.type and (device.index is None or t.device.index == device.index)
                           for k, t in tensors.items() if k.endswith(PACKED))
        if device.type == "cuda" and pack:
            tensors = ChainMap(_pack(tensors, start, end, device), tensors)
        for j, block in enumerate(stack.blocks):
            _assign(block, tensors, f"backbone.layers.{start + j}.", f"block {start + j}", device)
        _check_materialized(stack, f"blocks {start}:{end}")
        stack.set_backend(backend)
        return stack

    def set_backend(self, name: str | None) -> None:
        dev = next(self.parameters()).device
        self.kern = get_backend(name) if name else backend_for(dev)
        for b in self.blocks:
            b.mixer.prepare()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].mixer.in_proj.weight.dtype

    def new_states(self, batch: int) -> list[LayerState]:
        return [LayerState.zeros(self.cfg, batch, self.device) for _ in self.blocks]

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, states: list[LayerState]) -> torch.Tensor:
        """hidden: (B, T, d_model) fp32 -> (B, T, d_model) fp32; each of `states` advances by T tokens."""
        assert len(states) == len(self.blocks)
        assert self.kern is not None
        hidden = hidden.to(self.device, torch.float32)
        for block, st in zip(self.blocks, states):
            hidden = block(hidden, st, self.kern)
        return hidden


class Head(nn.Module):
    """What the client holds: token embeddings, the final norm and the LM head (tied to the embeddings or not)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kern: Backend | None = None

    @classmethod
    def from_tensors(cls, cfg: MambaConfig, tensors: Mapping[str, torch.Tensor],
                     device: str | torch.device = "cpu", backend: str | None = None) -> "Head":
        """Build from canonical (HF) tensor names; `backend` names the kernels, default the fast one for `device`."""
        device = torch.device(device)
        with torch.device("meta"):
            head = cls(cfg)
        _assign(head.embeddings, tensors, "backbone.embeddings.", "head", device)
        _assign(head.norm_f, tensors, "backbone.norm_f.", "head", device)
        if head.lm_head is not None:
            _assign(head.lm_head, tensors, "lm_head.", "head", device)
        _check_materialized(head, "head")
        head.kern = get_backend(backend) if backend else backend_for(device)
        return head

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, T) int64 -> hidden (B, T, d_model) fp32."""
        return self.embeddings(ids.to(self.embeddings.weight.device)).float()

    @property
    def lm_weight(self) -> torch.Tensor:
        """The LM head's (vocab, d_model) weight: the embeddings' where they are tied."""
        return self.embeddings.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, d_model) fp32 -> logits (B, T, vocab) fp32."""
        w = self.norm_f.weight
        kern = self.kern or backend_for(w.device)
        h = kern.rms_norm(hidden.to(w.device, w.dtype), w, self.norm_f.eps)
        weight = self.lm_weight
        # the LM head is the largest matrix per token (vocab x d_model); a backend's own matmul streams it fastest
        return kern.linear(h, weight).float()
