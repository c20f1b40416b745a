"""Fast CPU backend: numba kernels for the causal conv, the selective scan, RMSNorm and a small-batch GEMV.

Each kernel has the contract of its plain-torch twin in `reference.py` (states updated in place, same shapes and
output dtypes) and is tested against it in tests/kernels/test_cpu.py. The kernels run in fp32 over zero-copy
numpy views of the torch tensors; bf16 inputs are widened first (numba has no bf16). Work is split over
(batch, d_inner) with prange; the scan is sequential over tokens inside the kernel and fuses softplus(delta + bias),
the D skip and the silu(z) gate; the conv fuses its state update and SiLU.

Decoding calls every kernel once per block per token, so the wrappers stay thin and tiny inputs go to serial
builds of the same loop bodies: a parallel region costs more than 1536 multiply-adds.

Signatures are explicit, so numba compiles (or, with cache=True, loads from __pycache__) exactly one fp32 build of
each kernel when this module is imported, never in the middle of a decode; any other argument type is a TypeError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import float32, int64, njit, prange, types
from numba.extending import intrinsic

from swarm.kernels import Backend

_F32 = torch.float32
# fastmath stays off for the scan, conv and norm: their numerics must match the reference to 1e-5, NaNs included.
_EXACT = dict(fastmath=False, cache=True, nogil=True)
# A dot product only vectorises if the sum may be reordered (BLAS does the same); no approximate maths, no nnan.
_DOT = dict(fastmath={"reassoc", "contract"}, cache=True, nogil=True)

_SMALL = 1 << 14  # below this many (row x column) updates a parallel region costs more than it saves

# numba array types: C = contiguous, A = any strides (the transposed (B, I, T) views the model passes)
_A3 = float32[:, :, :]
_C3 = float32[:, :, ::1]
_C2 = float32[:, ::1]
_C1 = float32[::1]


# ---------------------------------------------------------------------------------------------------- exp for the scan

@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret int32 bits as a float32: how the fast exp builds 2**k without a libm call."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 = HI + LO, HI exact in few bits so k * HI is exact (Cody-Waite)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.33654)  # ln(FLT_MIN): below it exp is 0 here (no denormals in the state)
_EXP_MAX = np.float32(88.0)  # above it exp is inf here (exact exp overflows at 88.72)
_P = [np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                               1.6666665459e-1, 5.0000001201e-1)]
_P0, _P1, _P2, _P3, _P4, _P5 = _P
_HALF, _ONE, _ZERO, _TWENTY = np.float32(0.5), np.float32(1.0), np.float32(0.0), np.float32(20.0)
_INF = np.float32(np.inf)


@njit(float32(float32), **_EXACT)
def _exp(x):
    """expf (Cephes polynomial, max relative error ~2e-7) that LLVM can vectorise, unlike a call into libm.

    The scan evaluates exp(dt * A) d_state times per token and channel; this is most of its arithmetic.
    """
    xc = min(max(x, _EXP_MIN), _EXP_MAX)
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
    y = p * _f32_from_bits(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))
    if x < _EXP_MIN:
        y = _ZERO
    if x > _EXP_MAX:
        y = _INF
    if x != x:  # NaN in, NaN out (min/max above would swallow it)
        y = x
    return y


# ------------------------------------------------------------------------------------------------------- conv kernel

@njit(types.void(_A3, _C3, _C2, _C1, _C3, int64, int64), **_EXACT)
def _conv_rows(x, state, w, bias, y, lo, hi):
    """Rows lo..hi of the flattened (batch, channel) grid; see conv1d. y: (B, T, I)."""
    n_ch, k_w = w.shape
    t_len = x.shape[2]
    for row in range(lo, hi):
        b = row // n_ch
        c = row - b * n_ch
        for t in range(t_len):
            acc = bias[c]
            for k in range(k_w):
                j = t + k  # index into [state[1:], x], the K-1+T inputs the conv sees
                v = state[b, c, 1 + j] if j < k_w - 1 else x[b, c, j - (k_w - 1)]
                acc += w[c, k] * v
            y[b, t, c] = acc / (_ONE + np.exp(-acc))
        # new state = the last K of [state[1:], x]; increasing k only reads entries not yet overwritten
        for k in range(k_w):
            j = t_len - 1 + k
            state[b, c, k] = state[b, c, 1 + j] if j < k_w - 1 else x[b, c, j - (k_w - 1)]


@njit(types.void(_A3, _C3, _C2, _C1, _C3), parallel=True, **_EXACT)
def _conv_par(x, state, w, bias, y):
    rows = x.shape[0] * x.shape[1]
    chunk = 64
    for ci in prange((rows + chunk - 1) // chunk):
        _conv_rows(x, state, w, bias, y, ci * chunk, min(rows, (ci + 1) * chunk))


_zero_bias: dict[int, torch.Tensor] = {}


def conv1d(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over T tokens starting from `conv_state`, then SiLU (see causal_conv1d_ref).

    x: (B, I, T) any strides; conv_state: (B, I, K) fp32, updated in place; weight: (I, K); bias: (I,) or None.
    Returns (B, I, T) in x's dtype, as a transposed view of a (B, T, I) buffer: the layout x_proj wants next.
    """
    bsz, ch, t_len = x.shape
    xf = x if x.dtype == _F32 else x.float()
    if bias is None:
        bias = _zero_bias.get(ch)
        if bias is None:
            bias = _zero_bias.setdefault(ch, torch.zeros(ch))
    st = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    y = torch.empty(bsz, t_len, ch)  # (B, T, I)
    args = (xf.numpy(), st.numpy(), _f32c(weight).numpy(), _f32c(bias).numpy(), y.numpy())
    if bsz * ch * t_len * weight.shape[1] < _SMALL:
        _conv_rows(*args, 0, bsz * ch)
    else:
        _conv_par(*args)
    if st is not conv_state:
        conv_state.copy_(st)
    y = y.transpose(1, 2)  # (B, I, T)
    return y if x.dtype == _F32 else y.to(x.dtype)


# ------------------------------------------------------------------------------------------------------- scan kernel

@njit(types.void(_A3, _A3, _C2, _C3, _C3, _C1, _A3, _C1, _C3, _C3, int64, int64), **_EXACT)
def _scan_rows(u, delta, a, bm, cm, d_skip, z, dt_bias, state, y, lo, hi):
    """Rows lo..hi of the flattened (batch, channel) grid, sequential over tokens; see scan. y: (B, T, I)."""
    n_ch, n_st = a.shape
    t_len = u.shape[2]
    for row in range(lo, hi):
        b = row // n_ch
        c = row - b * n_ch
        for t in range(t_len):
            dt = delta[b, c, t] + dt_bias[c]
            if not dt > _TWENTY:  # F.softplus(threshold=20); NaN goes through log1p and stays NaN
                dt = np.log1p(np.exp(dt))
            ut = u[b, c, t]
            for n in range(n_st):  # vectorised: no reduction in this loop
                state[b, c, n] = _exp(dt * a[c, n]) * state[b, c, n] + dt * bm[b, t, n] * ut
            acc = _ZERO
            for n in range(n_st):
                acc += state[b, c, n] * cm[b, t, n]
            zt = z[b, c, t]
            y[b, t, c] = (acc + ut * d_skip[c]) * (zt / (_ONE + np.exp(-zt)))


@njit(types.void(_A3, _A3, _C2, _C3, _C3, _C1, _A3, _C1, _C3, _C3), parallel=True, **_EXACT)
def _scan_par(u, delta, a, bm, cm, d_skip, z, dt_bias, state, y):
    rows = u.shape[0] * u.shape[1]
    chunk = 32
    for ci in prange((rows + chunk - 1) // chunk):
        _scan_rows(u, delta, a, bm, cm, d_skip, z, dt_bias, state, y, ci * chunk, min(rows, (ci + 1) * chunk))


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
         D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """Selective scan from `ssm_state` (see selective_scan_ref for the maths).

    u, delta, z: (B, I, T) any strides; A: (I, N) fp32; Bm, Cm: (B, T, N); D, delta_bias: (I,) fp32;
    ssm_state: (B, I, N) fp32, updated in place. Returns y: (B, I, T) fp32, a transposed view of a (B, T, I)
    buffer (what out_proj wants next).
    """
    bsz, ch, t_len = u.shape
    st = ssm_state if ssm_state.is_contiguous() else ssm_state.contiguous()
    y = torch.empty(bsz, t_len, ch)  # (B, T, I)
    args = (_f32(u).numpy(), _f32(delta).numpy(), _f32c(A).numpy(), _f32c(Bm).numpy(), _f32c(Cm).numpy(),
            _f32c(D).numpy(), _f32(z).numpy(), _f32c(delta_bias).numpy(), st.numpy(), y.numpy())
    if bsz * ch * t_len * A.shape[1] < _SMALL:
        _scan_rows(*args, 0, bsz * ch)
    else:
        _scan_par(*args)
    if st is not ssm_state:
        ssm_state.copy_(st)
    return y.transpose(1, 2)


# --------------------------------------------------------------------------------------------------------- RMSNorm

@njit(types.void(_C2, _C1, float32, _C2, int64, int64), **_EXACT)
def _rms_rows(x, w, eps, out, lo, hi):
    dim = x.shape[1]
    for r in range(lo, hi):
        ss = 0.0  # float64: the mean of squares is exact to fp32 whatever the order
        for j in range(dim):
            ss += np.float64(x[r, j]) * x[r, j]
        inv = _ONE / np.sqrt(np.float32(ss / dim) + eps)
        for j in range(dim):
            out[r, j] = w[j] * (x[r, j] * inv)


@njit(types.void(_C2, _C1, float32, _C2), parallel=True, **_EXACT)
def _rms_par(x, w, eps, out):
    rows = x.shape[0]
    chunk = 16
    for ci in prange((rows + chunk - 1) // chunk):
        _rms_rows(x, w, eps, out, ci * chunk, min(rows, (ci + 1) * chunk))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as rms_norm_ref: statistics in fp32, result in weight's dtype. x: (..., D); weight: (D,)."""
    dim = x.shape[-1]
    x2 = _f32c(x).reshape(-1, dim)  # (rows, D)
    out = torch.empty(x2.shape)
    args = (x2.numpy(), _f32c(weight).numpy(), np.float32(eps), out.numpy())
    if x2.shape[0] * dim < _SMALL:
        _rms_rows(*args, 0, x2.shape[0])
    else:
        _rms_par(*args)
    out = out.view(x.shape)
    return out if weight.dtype == _F32 else out.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------- linear

_GEMV_ROWS = 8  # up to this many token rows the GEMV below streams each weight once and beats MKL; past it MKL wins


@njit(types.void(_C2, _C2, _C2), parallel=True, **_DOT)
def _gemv(x, w, y):
    """y = x @ w.T for a few rows x. x: (R, In), w: (Out, In), y: (R, Out).

    Decoding is memory-bound: this reads each weight row once for all R rows, on both cores; MKL's sgemv reaches
    about half of this machine's bandwidth.
    """
    n_rows, n_in = x.shape
    n_out = w.shape[0]
    chunk = 64
    for ci in prange((n_out + chunk - 1) // chunk):
        for o in range(ci * chunk, min(n_out, (ci + 1) * chunk)):
            for r in range(n_rows):
                acc = _ZERO
                for j in range(n_in):
                    acc += x[r, j] * w[o, j]
                y[r, o] = acc


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV above for a few fp32 rows. x: (..., In); weight: (Out, In) -> (..., Out)."""
    n_in = x.shape[-1]
    rows = x.numel() // n_in if n_in else 0
    if rows > _GEMV_ROWS or rows == 0 or x.dtype != _F32 or weight.dtype != _F32 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, n_in)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty(rows, weight.shape[0])
    _gemv(x2.numpy(), weight.numpy(), y.numpy())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------------------- helpers

def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == _F32 else t.float()


def _f32c(t: torch.Tensor) -> torch.Tensor:
    t = t if t.dtype == _F32 else t.float()
    return t if t.is_contiguous() else t.contiguous()


def warmup() -> None:
    """Run every kernel once on tiny inputs, serial and parallel builds, so the first real token pays nothing."""
    for t_len in (1, 64):
        b, i, n, k = 1, 256, 16, 4
        x = torch.randn(b, i, t_len)
        conv1d(x, torch.zeros(b, i, k), torch.randn(i, k), None)
        scan(x, x, -torch.rand(i, n), torch.randn(b, t_len, n), torch.randn(b, t_len, n), torch.ones(i), x,
             torch.zeros(i), torch.zeros(b, i, n))
        rms_norm(torch.randn(t_len, i), torch.ones(i), 1e-5)
    linear(torch.randn(1, i), torch.randn(64, i))


@dataclass(frozen=True)
class CpuBackend(Backend):
    """The Backend contract plus `linear` (F.linear's contract), which the model uses when a backend has one."""

    linear: Callable[..., torch.Tensor] = F.linear


BACKEND = CpuBackend("cpu", conv1d, scan, rms_norm, linear)
