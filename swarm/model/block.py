"""A Mamba-1 block (RMSNorm + mixer + residual) that runs T >= 1 tokens from a LayerState and updates it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from swarm.kernels import Backend
from swarm.model.config import MambaConfig


@dataclass
class LayerState:
    """One block's recurrent state for a batch of sequences (fp32, updated in place).

    conv: (batch, d_inner, d_conv) the last d_conv conv inputs, newest last; ssm: (batch, d_inner, d_state).
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(cls, cfg: MambaConfig, batch: int, device: torch.device | str = "cpu") -> "LayerState":
        return cls(torch.zeros(batch, cfg.intermediate_size, cfg.conv_kernel, device=device),
                   torch.zeros(batch, cfg.intermediate_size, cfg.state_size, device=device))

    def clone(self) -> "LayerState":
        return LayerState(self.conv.clone(), self.ssm.clone())

    def copy_(self, other: "LayerState") -> None:
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)


class Mixer(nn.Module):
    """The selective SSM mixer. Parameter names match the HF checkpoint (`mixer.in_proj.weight`, ...)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        i, n, r, k = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * i, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(i, i, k, groups=i, bias=cfg.use_conv_bias, padding=k - 1)
        self.x_proj = nn.Linear(i, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, i, bias=True)
        self.A_log = nn.Parameter(torch.empty(i, n))
        self.D = nn.Parameter(torch.empty(i))
        self.out_proj = nn.Linear(i, cfg.hidden_size, bias=cfg.use_bias)
        self._prepared: dict[str, torch.Tensor] | None = None
        self._step: tuple[str, object] | None = None  # (backend name, its block_weights), see MambaBlock

    def prepare(self) -> None:
        """Precompute what does not change between calls (A = -exp(A_log), fp32 D and dt bias, flat conv weight)."""
        self._step = None
        self._prepared = {
            "A": -torch.exp(self.A_log.detach().float()),  # (I, N)
            "D": self.D.detach().float(),
            "dt_bias": self.dt_proj.bias.detach().float(),
            "conv_w": self.conv1d.weight.detach()[:, 0, :].contiguous(),  # (I, K)
            "conv_b": None if self.conv1d.bias is None else self.conv1d.bias.detach(),
        }

    @property
    def prepared(self) -> dict[str, torch.Tensor]:
        """prepare()'s tensors, computed on first use (shared with GraphDecoder: one copy on the device)."""
        if self._prepared is None:
            self.prepare()
        assert self._prepared is not None
        return self._prepared

    def forward(self, h: torch.Tensor, state: LayerState, kern: Backend) -> torch.Tensor:
        """h: (B, T, d_model) in weight dtype -> (B, T, d_model) in weight dtype."""
        p = self.prepared
        cfg = self.cfg
        i = cfg.intermediate_size
        linear = kern.linear  # the CPU backend's streams weights faster than MKL's GEMV for a few rows
        xz = linear(h, self.in_proj.weight, self.in_proj.bias)  # (B, T, 2I)
        x, z = xz[..., :i], xz[..., i:]  # (B, T, I) views
        x = kern.conv1d(x.transpose(1, 2), state.conv, p["conv_w"], p["conv_b"])  # (B, I, T)
        dbc = linear(x.transpose(1, 2), self.x_proj.weight)  # (B, T, R + 2N)
        dt, bm, cm = torch.split(dbc, [cfg.time_step_rank, cfg.state_size, cfg.state_size], dim=-1)
        delta = linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, I, T), bias added inside the scan
        y = kern.scan(x, delta, p["A"], bm, cm, p["D"], z.transpose(1, 2), p["dt_bias"], state.ssm)  # (B, I, T)
        return linear(y.transpose(1, 2).to(h.dtype), self.out_proj.weight, self.out_proj.bias)


class MambaBlock(nn.Module):
    """norm -> mixer -> + residual. The residual stream between blocks is fp32."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = Mixer(cfg)

    def forward(self, hidden: torch.Tensor, state: LayerState, kern: Backend) -> torch.Tensor:
        """hidden: (B, T, d_model) fp32 -> (B, T, d_model) fp32; `state` advances by T tokens."""
        if kern.block_step is not None and hidden.shape[1] == 1:
            weights = self.step_weights(kern)
            out = None if weights is None else kern.block_step(hidden, weights, state.conv, state.ssm)
            if out is not None:
                return out
        wdtype = self.norm.weight.dtype
        h = kern.rms_norm(hidden.to(wdtype), self.norm.weight, self.norm.eps)
        out = self.mixer(h, state, kern).float()  # a new tensor (out_proj's output, or its fp32 copy)
        return out.add_(hidden.float())

    def step_weights(self, kern: Backend) -> object:
        """`kern`'s block_weights for this block, made on first use and kept with the mixer's prepared tensors
        (Mixer.prepare drops them)."""
        m = self.mixer
        if m._step is None or m._step[0] != kern.name:
            p = m.prepared
            m._step = (kern.name, kern.block_weights(
                self.norm.weight, self.norm.eps, m.in_proj.weight, m.in_proj.bias, p["conv_w"], p["conv_b"],
                m.x_proj.weight, m.dt_proj.weight, p["dt_bias"], p["A"], p["D"], m.out_proj.weight, m.out_proj.bias))
        return m._step[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
