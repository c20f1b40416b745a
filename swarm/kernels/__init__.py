"""Kernel dispatch: one backend per device, chosen once and named; a missing backend that was asked for is an error.

A backend provides:
    conv1d(x, conv_state, weight, bias) -> y           # see reference.causal_conv1d_ref
    scan(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state) -> y   # see reference.selective_scan_ref
    rms_norm(x, weight, eps) -> y
    linear(x, weight, bias=None) -> y                  # F.linear's contract; F.linear unless the backend has better
  optional, together: a block's whole decode token in one call, where the backend can (None: the kernels above)
    block_weights(norm_w, eps, in_w, in_b, conv_w, conv_b, x_w, dt_w, dt_bias, A, D, out_w, out_b) -> weights or None
    block_step(hidden, weights, conv_state, ssm_state) -> new hidden or None
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from swarm.errors import BackendUnavailable
from swarm.kernels import reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str
    conv1d: Callable[..., torch.Tensor]
    scan: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor] = F.linear
    block_weights: Callable[..., object] | None = None
    block_step: Callable[..., torch.Tensor | None] | None = None


REFERENCE = Backend("reference", reference.causal_conv1d_ref, reference.selective_scan_ref, reference.rms_norm_ref)


def _cpu_backend() -> Backend:
    try:
        from swarm.kernels import cpu
    except ImportError as e:  # numba missing or broken: say so, never fall back silently
        raise BackendUnavailable(f"the fast CPU backend needs numba, which failed to import: {e}") from None
    return cpu.BACKEND


def _cuda_backend() -> Backend:
    if not torch.cuda.is_available():
        raise BackendUnavailable("backend 'cuda' was asked for but torch sees no CUDA device")
    try:
        from swarm.kernels import triton_ops
    except ImportError as e:
        raise BackendUnavailable(f"backend 'cuda' needs Triton, which failed to import: {e}") from None
    return triton_ops.BACKEND


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "reference": lambda: REFERENCE,
    "cpu": _cpu_backend,
    "cuda": _cuda_backend,
}
_cache: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called `name` ('reference', 'cpu' or 'cuda'); raises BackendUnavailable if it cannot run here."""
    if name not in _FACTORIES:
        raise BackendUnavailable(f"unknown kernel backend {name!r} (known: {', '.join(_FACTORIES)})")
    if name not in _cache:
        _cache[name] = _FACTORIES[name]()
        log.info("kernel backend: %s", _cache[name].name)
    return _cache[name]


def backend_for(device: torch.device | str) -> Backend:
    """The fast backend for tensors on `device`."""
    return get_backend("cuda" if torch.device(device).type == "cuda" else "cpu")
