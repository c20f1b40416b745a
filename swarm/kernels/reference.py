"""Plain-torch reference kernels for Mamba-1: the ground truth every fast kernel is tested against.

Shapes use B = batch, I = d_inner, T = tokens, N = d_state, K = d_conv. States are updated in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over T tokens starting from `conv_state`, then SiLU.

    x: (B, I, T); conv_state: (B, I, K) fp32, the last K conv inputs (index -1 the newest), updated in place;
    weight: (I, K); bias: (I,) or None. Returns (B, I, T) in x's dtype.
    """
    k = weight.shape[-1]
    t = x.shape[-1]
    full = torch.cat([conv_state[:, :, 1:].to(x.dtype), x], dim=-1)  # (B, I, K-1+T)
    y = F.conv1d(full, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                 groups=weight.shape[0])  # (B, I, T)
    assert y.shape[-1] == t
    conv_state.copy_(full[:, :, -k:])
    return F.silu(y)


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                       D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                       ssm_state: torch.Tensor) -> torch.Tensor:
    """Selective scan from `ssm_state`, one token at a time (the definition, not a fast path).

    u, delta, z: (B, I, T); A: (I, N) fp32 (negative); Bm, Cm: (B, T, N); D, delta_bias: (I,) fp32;
    ssm_state: (B, I, N) fp32, updated in place to the state after the last token. Returns y: (B, I, T) fp32.
    delta is before bias and softplus; y = (C . h + D u) * silu(z).
    """
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])  # (B, I, T)
    uf = u.float()
    h = ssm_state.float()
    ys = []
    for i in range(u.shape[-1]):
        dA = torch.exp(dt[:, :, i, None] * A)  # (B, I, N)
        dBu = dt[:, :, i, None] * Bm[:, None, i, :].float() * uf[:, :, i, None]  # (B, I, N)
        h = dA * h + dBu
        ys.append(torch.einsum("bin,bn->bi", h, Cm[:, i, :].float()))
    y = torch.stack(ys, dim=-1)  # (B, I, T)
    y = (y + uf * D.float()[:, None]) * F.silu(z.float())
    ssm_state.copy_(h)
    return y


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' MambaRMSNorm: statistics in fp32, result in weight's dtype. x: (..., D)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)
