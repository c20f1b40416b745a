"""Triton kernels for Mamba-1 on CUDA: RMSNorm, causal conv1d (prefill and one step), and the Backend that
swarm.kernels dispatches to (its selective scan is swarm.kernels.triton_scan's).

Each kernel computes what its plain-torch twin in swarm.kernels.reference computes, with fp32 arithmetic. None of
them syncs with the host, so every one can be captured in a CUDA graph. Decode kernels take an optional slot index
(B,) int64 and address a state pool (S, I, ...) through it, so a graph gathers and scatters states for free.
Shapes: B batch, I d_inner, T tokens, N d_state, K d_conv, R dt_rank, D d_model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swarm.kernels import Backend
from swarm.kernels.triton_scan import _cols8, _grid_wait, _silu, pdl_kw, prefill_pdl, selective_scan

# The prefill conv: (BLOCK_T, BLOCK_I, num_warps) for the tile kernel, or ("seq", BLOCK_I, SEG, num_warps, stages)
# for the token-loop kernel (d_conv <= 4; wider convs take CONV_TILE). Both give the same bits. At 2.8b's width, 2048
# tokens of in_proj's strided x half, past L2 (H100): the tile kernel 29.5-29.8 us, ("seq", 32, 128, 1, 3) 17.9,
# other token-loop configs 16.0-24.6 (segments of 256 tokens: 19.6-40.4); through 16 blocks, a 2048-token prefill
# 7.61-7.86 -> 7.44-7.72 ms (interleaved rounds; scripts/sweep_gpu.py prefill_sweep measures in context)
CONV_TILE: tuple[int, int, int] = (32, 64, 4)
CONV_CONFIG: tuple = ("seq", 32, 128, 1, 3)
CONV_OFF64_FROM: int = 2 ** 31  # the offsets from which the conv kernels compute token addresses in 64 bits


# ---------------------------------------------------------------- RMSNorm (optionally fused with the residual add)

@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, r_ptr, D, sx, sd, sy, sr, eps,
                     HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0):
    _grid_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_D)
    m = c < D
    x = tl.load(x_ptr + row * sx + c, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:  # residual stream: x + delta in fp32, written back for the next block
        x += tl.load(d_ptr + row * sd + c, mask=m, other=0.0).to(tl.float32)
        tl.store(r_ptr + row * sr + c, x, mask=m)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    # the block normalises the residual cast to the weight dtype, and rounds the result to it before the scale
    x = x.to(w.dtype).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    y = (x * rstd).to(w.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * sy + c, y.to(y_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) -> (..., D) in weight's dtype; as reference.rms_norm_ref."""
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=weight.dtype, device=x.device)
    _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, y, y, x2.shape[1], x2.stride(0), 0, y.stride(0), 0, eps,
                                     HAS_DELTA=False, BLOCK_D=triton.next_power_of_2(x2.shape[1]),
                                     **pdl_kw(prefill_pdl(x.device)))
    return y.view(x.shape)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual: (..., D) fp32, delta: (..., D) any dtype -> (rms_norm(residual + delta), residual + delta fp32).

    One pass instead of an add, a cast and a norm: the step between two blocks of the decode graph.
    """
    r2, d2 = _rows(residual), _rows(delta)
    y = torch.empty(r2.shape, dtype=weight.dtype, device=residual.device)
    r_out = torch.empty(r2.shape, dtype=torch.float32, device=residual.device)
    _rms_norm_kernel[(r2.shape[0],)](r2, d2, weight, y, r_out, r2.shape[1], r2.stride(0), d2.stride(0), y.stride(0),
                                     r_out.stride(0), eps, HAS_DELTA=True,
                                     BLOCK_D=triton.next_power_of_2(r2.shape[1]),
                                     **pdl_kw(prefill_pdl(residual.device)))
    return y.view(residual.shape), r_out.view(residual.shape)


# ---------------------------------------------------------------- causal conv1d + SiLU

@triton.jit
def _conv_fwd_kernel(x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, len_ptr, T, I,
                     sx_b, sx_i, sx_t, ss_b, ss_i, ss_k, sw_i, sw_k, sy_b, sy_i, sy_t,
                     K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, OFF64: tl.constexpr = False):
    # HAS_LEN: only the first len_ptr[0] of the T tokens are real (a padded piece of a captured prefill); every
    # output is written, the state advances by the real tokens
    # every operand is (BLOCK_T, 1) or (1, BLOCK_I), so all of them share the tile's layout as loaded
    pid_t = tl.program_id(0)
    i = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I))[None, :]  # (1, BI)
    b = tl.program_id(2).to(tl.int64)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))[:, None]  # (BT, 1)
    if OFF64:  # T times a token stride can pass 2**31
        t = t.to(tl.int64)
    mi = i < I
    mt = t < T
    x_base = x_ptr + b * sx_b + i * sx_i
    s_base = s_ptr + b * ss_b + i * ss_i
    # full = [conv_state[1:], x]: tap k of output t reads full[t + k], which is x[src] or conv_state[src + K].
    # Only the first tile in time reaches back into the state. Its branch loads the state tile in a layout of its
    # own; the other programs' accumulator keeps x's coalesced layout (a state load in the common path pulled every
    # program into the state's layout, with a shared-memory round trip a tap and 16-bit loads: 4.5x the memory time)
    if pid_t == 0:
        acc = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for k in tl.static_range(K):
            w = tl.load(w_ptr + i * sw_i + k * sw_k, mask=mi, other=0.0).to(tl.float32)
            acc += _conv_full(x_base, s_base, t + (k - (K - 1)), sx_t, ss_k, K, mt & mi) * w
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for k in tl.static_range(K):
            src = t + (k - (K - 1))
            xv = tl.load(x_base + src * sx_t, mask=mt & mi, other=0.0)
            w = tl.load(w_ptr + i * sw_i + k * sw_k, mask=mi, other=0.0).to(tl.float32)
            acc += xv.to(tl.float32) * w
    if HAS_BIAS:
        acc += tl.load(b_ptr + i, mask=mi, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * sy_b + t * sy_t + i * sy_i, _silu(acc).to(y_ptr.dtype.element_ty), mask=mt & mi)
    if pid_t == 0:  # only this program reads the old state, so only it may write the new one
        _conv_new_state(x_base, s_base, len_ptr, T, sx_t, ss_k, tl.arange(0, KP)[:, None], mi, K, HAS_LEN, OFF64)


@triton.jit
def _conv_new_state(x_base, s_base, len_ptr, T, sx_t, ss_k, kk, mi, K: tl.constexpr, HAS_LEN: tl.constexpr,
                    OFF64: tl.constexpr):
    """The state after the real tokens, the last K of full = [conv_state[1:], x] (kk: 0..KP-1 on the axis that
    is not the channels'), written over the old one by the one program that read it."""
    if HAS_LEN:
        T = tl.load(len_ptr).to(tl.int32)
    last = T - K + kk  # new state[k] = full[T - 1 + k]
    if OFF64:
        last = last.to(tl.int64)
    mk = kk < K
    new = _conv_full(x_base, s_base, last, sx_t, ss_k, K, mk & mi)
    tl.debug_barrier()  # every thread's reads of the old state happen before any write
    tl.store(s_base + kk * ss_k, new, mask=mk & mi)


@triton.jit
def _conv_full(x_base, s_base, t, sx_t, ss_k, K: tl.constexpr, m):
    """Input t of the conv (a tensor of token indices; 0 where ~m) as fp32 rounded to x's dtype: x[t], or before
    the first token the state's (full = [conv_state[1:], x], so x[t] is conv_state[t + K] for t < 0); 0 before
    that (where a K < 4 token-loop kernel pads its taps)."""
    xv = tl.load(x_base + t * sx_t, mask=m & (t >= 0), other=0.0)
    sv = tl.load(s_base + (t + K) * ss_k, mask=m & (t < 0) & (t + K >= 1), other=0.0)
    return xv.to(tl.float32) + sv.to(xv.dtype).to(tl.float32)


@triton.jit
def _conv_prev(x_base, s_base, t, sx_t, ss_k, K: tl.constexpr, mi, OFF64: tl.constexpr):
    """Input t (a scalar) of channels mi (BI, 1): _conv_full on a tensor, since Triton's interpreter mishandles
    masks that combine a scalar condition with a tensor."""
    t = tl.zeros(mi.shape, dtype=tl.int64 if OFF64 else tl.int32) + t
    return _conv_full(x_base, s_base, t, sx_t, ss_k, K, mi)


@triton.jit
def _conv_w(w_ptr, i, mi, sw_i, sw_k, k: tl.constexpr, K: tl.constexpr):
    """Tap k of 4 (fp32, (BI, 1)): the weights right-aligned, zeros in front where K < 4."""
    if k < 4 - K:
        return tl.zeros(i.shape, dtype=tl.float32)
    return tl.load(w_ptr + i * sw_i + (k - (4 - K)) * sw_k, mask=mi, other=0.0).to(tl.float32)


@triton.jit
def _conv4(a, b, c, d, w0, w1, w2, w3):
    acc = a * w0
    acc += b * w1
    acc += c * w2
    acc += d * w3
    return acc


@triton.jit
def _conv_seq_kernel(x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, len_ptr, T, I, SEG,
                     sx_b, sx_i, sx_t, ss_b, ss_i, ss_k, sw_i, sw_k, sy_b, sy_i, sy_t,
                     K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
                     BLOCK_I: tl.constexpr, STAGES: tl.constexpr, OFF64: tl.constexpr = False,
                     PDL: tl.constexpr = 0):
    # A run of SEG tokens for BLOCK_I channels, 8 tokens a loop turn, each thread's 8 tokens of a channel in its
    # own registers (_cols8): every input is loaded and converted once (the tile kernel loads each K times, once a
    # tap), and a turn's last 3 inputs carry into the next. K <= 4 (taps padded to 4 in front).
    _grid_wait(PDL)
    i = (tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I))[:, None]  # (BI, 1)
    seg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    mi = i < I
    x_base = x_ptr + b * sx_b + i * sx_i
    s_base = s_ptr + b * ss_b + i * ss_i
    y_base = y_ptr + b * sy_b + i * sy_i
    w0 = _conv_w(w_ptr, i, mi, sw_i, sw_k, 0, K)
    w1 = _conv_w(w_ptr, i, mi, sw_i, sw_k, 1, K)
    w2 = _conv_w(w_ptr, i, mi, sw_i, sw_k, 2, K)
    w3 = _conv_w(w_ptr, i, mi, sw_i, sw_k, 3, K)
    bias = tl.zeros([BLOCK_I, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + i, mask=mi, other=0.0).to(tl.float32)
    t_lo = seg * SEG
    t_hi = tl.minimum(t_lo + SEG, T)
    p1 = _conv_prev(x_base, s_base, t_lo - 3, sx_t, ss_k, K, mi, OFF64)
    p2 = _conv_prev(x_base, s_base, t_lo - 2, sx_t, ss_k, K, mi, OFF64)
    p3 = _conv_prev(x_base, s_base, t_lo - 1, sx_t, ss_k, K, mi, OFF64)
    cols = tl.arange(0, 8)[None, :]
    for t0 in tl.range(t_lo, t_hi, 8, num_stages=STAGES):
        tt = t0 + cols  # (1, 8)
        if OFF64:  # T times a token stride can pass 2**31
            tt = tt.to(tl.int64)
        m8 = mi & (tt < t_hi)
        x8 = tl.load(x_base + tt * sx_t, mask=m8, other=0.0)
        c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(x8.to(tl.float32), BLOCK_I)
        o0 = _conv4(p1, p2, p3, c0, w0, w1, w2, w3)
        o1 = _conv4(p2, p3, c0, c1, w0, w1, w2, w3)
        o2 = _conv4(p3, c0, c1, c2, w0, w1, w2, w3)
        o3 = _conv4(c0, c1, c2, c3, w0, w1, w2, w3)
        o4 = _conv4(c1, c2, c3, c4, w0, w1, w2, w3)
        o5 = _conv4(c2, c3, c4, c5, w0, w1, w2, w3)
        o6 = _conv4(c3, c4, c5, c6, w0, w1, w2, w3)
        o7 = _conv4(c4, c5, c6, c7, w0, w1, w2, w3)
        p1, p2, p3 = c5, c6, c7
        # join appends a last axis, so the outermost join picks bit 0 of the token index and the innermost bit 2
        outs = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
        acc = tl.reshape(outs, (BLOCK_I, 8)) + bias
        tl.store(y_base + tt * sy_t, _silu(acc).to(y_ptr.dtype.element_ty), mask=m8)
    if seg == 0:  # only this program reads the old state, so only it may write the new one
        _conv_new_state(x_base, s_base, len_ptr, T, sx_t, ss_k, tl.arange(0, KP)[None, :], mi, K, HAS_LEN, OFF64)


@triton.jit
def _conv_tap(x_ptrs, s_ptrs, w_ptr, b_ptr, i, mi, sw_i, sw_k, ss_k,
              K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One token of the conv for channels i: x_ptrs (BI,) this token's inputs, s_ptrs (BI, 1) the state rows.

    Returns the new state (BI, KP) fp32 and silu(conv) (BI,) fp32, rounded to x's dtype as a stored output is.
    """
    kk = tl.arange(0, KP)[None, :]
    xv = tl.load(x_ptrs, mask=mi, other=0.0)
    shifted = tl.load(s_ptrs + (kk + 1) * ss_k, mask=mi[:, None] & (kk < K - 1), other=0.0)
    new = tl.where(kk == K - 1, xv.to(tl.float32)[:, None], shifted.to(xv.dtype).to(tl.float32))
    w = tl.load(w_ptr + i[:, None] * sw_i + kk * sw_k, mask=mi[:, None] & (kk < K), other=0.0).to(tl.float32)
    acc = tl.sum(new * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i, mask=mi, other=0.0).to(tl.float32)
    return new, _silu(acc).to(xv.dtype).to(tl.float32)


@triton.jit
def _slot(idx_ptr, b, HAS_IDX: tl.constexpr):
    """The state row of batch row b: idx[b] in a slot pool, or b itself."""
    if HAS_IDX:
        return tl.load(idx_ptr + b).to(tl.int64)
    return b


@triton.jit
def _conv_step_kernel(x_ptr, s_ptr, idx_ptr, w_ptr, b_ptr, y_ptr, I,
                      sx_b, sx_i, ss_b, ss_i, ss_k, sw_i, sw_k, sy_b, sy_i,
                      K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
                      BLOCK_I: tl.constexpr):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    slot = _slot(idx_ptr, b, HAS_IDX)
    mi = i < I
    s_rows = s_ptr + slot * ss_b + i[:, None] * ss_i
    new, y = _conv_tap(x_ptr + b * sx_b + i * sx_i, s_rows, w_ptr, b_ptr, i, mi, sw_i, sw_k, ss_k, K, KP, HAS_BIAS)
    kk = tl.arange(0, KP)[None, :]
    tl.debug_barrier()  # the shifted read above overlaps other threads' writes below
    tl.store(s_rows + kk * ss_k, new, mask=mi[:, None] & (kk < K))
    tl.store(y_ptr + b * sy_b + i * sy_i, y.to(y_ptr.dtype.element_ty), mask=mi)


def causal_conv1d(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, length: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, I, T) any strides; conv_state: (B, I, K) fp32, updated; weight (I, K); bias (I,) or None.

    Returns silu(conv): (B, I, T) in x's dtype, laid out as (B, T, I) so that its transpose feeds x_proj as is.
    `length`: a one-element int device tensor, 1 <= length <= T: only that many leading tokens are real, and the
    state advances by them (the outputs past it are computed from the padding and mean nothing).
    """
    bsz, dim, t = x.shape
    if t == 1 and length is None:
        return conv1d_step(x[:, :, 0], conv_state, weight, bias).unsqueeze(-1)
    k = weight.shape[-1]
    y = torch.empty(bsz, t, dim, dtype=x.dtype, device=x.device).transpose(1, 2)  # (B, I, T)
    args = (x, conv_state, weight, weight if bias is None else bias, y, weight if length is None else length, t, dim)
    strides = (*x.stride(), *conv_state.stride(), *weight.stride(), *y.stride())
    off64 = t * max(abs(x.stride(2)), abs(y.stride(2))) >= CONV_OFF64_FROM  # token offsets in 64 bits
    kw = dict(K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None, HAS_LEN=length is not None,
              OFF64=off64)
    if CONV_CONFIG[0] == "seq" and k <= 4:
        _, block_i, seg, warps, stages = CONV_CONFIG
        seg = max(8, min(seg, triton.cdiv(t, 8) * 8))
        grid = (triton.cdiv(dim, block_i), triton.cdiv(t, seg), bsz)
        _conv_seq_kernel[grid](*args, seg, *strides, **kw, BLOCK_I=block_i, STAGES=stages, num_warps=warps,
                               **pdl_kw(prefill_pdl(x.device)))
        return y
    block_t, block_i, warps = CONV_CONFIG if CONV_CONFIG[0] != "seq" else CONV_TILE
    assert block_t >= k - 1  # only the first tile in time reaches into the state
    grid = (triton.cdiv(t, block_t), triton.cdiv(dim, block_i), bsz)
    _conv_fwd_kernel[grid](*args, *strides, **kw, BLOCK_T=block_t, BLOCK_I=block_i, num_warps=warps)
    return y


def conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                idx: torch.Tensor | None = None) -> torch.Tensor:
    """One token: x (B, I) -> silu(conv) (B, I) in x's dtype; shifts x into conv_state.

    conv_state: (B, I, K) fp32, or with `idx` (B,) int64 a pool (S, I, K) whose rows idx[b] are the batch's states.
    """
    bsz, dim = x.shape
    k = weight.shape[-1]
    y = torch.empty(bsz, dim, dtype=x.dtype, device=x.device)
    block_i = 128
    _conv_step_kernel[(triton.cdiv(dim, block_i), bsz)](
        x, conv_state, x if idx is None else idx, weight, weight if bias is None else bias, y, dim,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None, HAS_IDX=idx is not None,
        BLOCK_I=block_i, num_warps=4)
    return y


BACKEND = Backend("cuda-triton", causal_conv1d, selective_scan, rms_norm)
