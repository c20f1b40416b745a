"""Triton kernels for Mamba-1 on CUDA: causal conv1d, selective scan (prefill and one-step decode), RMSNorm.

Each kernel computes what its plain-torch twin in swarm.kernels.reference computes, with fp32 arithmetic. None of
them syncs with the host, so every one can be captured in a CUDA graph. Decode kernels take an optional slot index
(B,) int64 and address a state pool (S, I, ...) through it, so a graph gathers and scatters states for free.
Shapes: B batch, I d_inner, T tokens, N d_state, K d_conv, R dt_rank, D d_model.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from swarm.kernels import Backend

# The prefill scan's kernel and tiles: ("seq", BLOCK_I, num_warps[, segments[, stages[, maxnreg]]]) or ("chunk",
# BLOCK_T, BLOCK_I, num_warps); "seq" without a segment count (or with 0) takes _segments(); a fifth entry pipelines the
# token loop's loads over that many stages; a sixth caps the registers a thread (with a segment count).
# scripts/bench_gpu.py measures the alternatives: at 2.8b's width on an H100, 1024 tokens: ("seq", 16, 1, 16) 173 us,
# ("seq", 16, 2, 4) 190 us; 2048 tokens: ("seq", 16, 1, 16) 335 us, ("seq", 16, 2, 8) 364 us, ("seq", 16, 4, 1) 557 us.
# Inside a 2.8b prefill ("seq", 16, 1) with one segment per 64 tokens took 25.5 ms of scan against 23.9 for ("seq", 16,
# 2); with the loads pipelined over 2 stages the order turns: a 2048-token prefill through 16 blocks took 11.2 ms with
# ("seq", 16, 1, 16, 2), 11.8 with ("seq", 16, 2, 8, 2), 13.1 with ("seq", 16, 2) (graphs, one H100 run). Wider channel
# tiles cost fewer instructions per state element and token (fewer shuffles and per-token loads per element; PTX: 17 at
# 16 channels a warp, 13 at 64 over 2 warps, 11 at 128 over 2, which spills), and the scan is issue-bound (ncu: 73-75%
# SM throughput at 16 channels, 16 segments): through 16 blocks, ("seq", 32, 1, 0, 2) took 9.75 ms against 11.48 for
# ("seq", 16, 1, 0, 2), 10.3-10.4 for (64, 2) and (128, 4), 12.0-14.1 for the rest.
SCAN_CONFIG: tuple = ("seq", 32, 1, 0, 2)
# "seq" with segments 0 (_segments): one wave of programs, no segment under SCAN_MIN_SEGMENT tokens, and the
# register cap only where more segments are wanted than fit a wave without it. SCAN_WAVE: the warps an SM holds of
# the second pass uncapped (165 registers a thread: 12) and capped (SCAN_CAP registers, which spill a little
# outside the token loop: 16). Through 16 blocks at 2.8b's width (160 programs of 32 channels a segment), 4
# interleaved rounds: 13 segments capped 8.15-8.37 ms, 14 capped 8.18-8.43, the old 16 uncapped 8.27-8.50, 16
# capped 8.65-8.92, 13 uncapped 8.61-8.88; at 130m's (48 programs), 1024 tokens: 32 uncapped 2.64-2.67, 32 capped
# 2.73-2.76, 24 capped 2.71-2.73, the old 16 uncapped 2.81-2.84 (H100; scripts/sweep_gpu.py prefill_sweep)
SCAN_WAVE: tuple[int, int] = (12, 16)
SCAN_CAP: int = 128
SCAN_MIN_SEGMENT: int = 32
SCAN_OFF64_FROM: int = 2 ** 31  # the offsets from which the scan's token loop computes addresses in 64 bits
# The "seq" kernel's softplus and gate: _softplus_poly and _silu_rcp, or _softplus and _silu. The former cut the
# token loop's SASS by 20% (MODE 2) and 25% (MODE 1); through 16 blocks, 8.24-8.44 ms against 9.00-9.21 (H100).
# A kernel with the state transposed (a thread owning whole channels: half the instructions a state element) was
# slower in context, 9.66-11.9 ms, at 8-12 warps an SM (git 766de96 has it)
SCAN_POLY: bool = True
# (BLOCK_T, BLOCK_I, num_warps) of the prefill conv; scripts/sweep_gpu.py prefill_sweep measures the alternatives
CONV_CONFIG: tuple[int, int, int] = (32, 64, 4)


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without libdevice: log(u) * e / (u - 1) keeps the digits that log(1 + e) loses for small e
    e = tl.exp(x)
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    # FAST: one MUFU.RCP (rcp.approx, ~1 ulp) instead of a full division; Triton's interpreter cannot run PTX
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softplus_poly(x, FAST: tl.constexpr):
    # softplus(x) = max(x, 0) + log1p(t), t = exp(-|x|) in (0, 1]; log1p(t) = 2 atanh(s) with s = t / (2 + t) in
    # [0, 1/3], and 2 atanh(s) = s P(s^2), P fitted on [0, 1/9]. Relative error ~4e-7 for |x| < 5, the exp's own
    # beyond; ~13 instructions against ~55 for log(1 + e) through tl.log and a division (_softplus)
    t = tl.exp2(tl.abs(x) * -1.4426950408889634)
    s = t * _rcp(2.0 + t, FAST)
    w = s * s
    p = 0.2817467411751986 * w + 0.2796143390744809
    p = p * w + 0.4002485086022432
    p = p * w + 0.6666631607305751
    p = p * w + 2.0
    return s * p + tl.maximum(x, 0.0)


@triton.jit
def _silu_rcp(x, FAST: tl.constexpr):
    return x * _rcp(1.0 + tl.exp2(x * -1.4426950408889634), FAST)


# ---------------------------------------------------------------- RMSNorm (optionally fused with the residual add)

@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, r_ptr, D, sx, sd, sy, sr, eps,
                     HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
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
                                     HAS_DELTA=False, BLOCK_D=triton.next_power_of_2(x2.shape[1]))
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
                                     BLOCK_D=triton.next_power_of_2(r2.shape[1]))
    return y.view(residual.shape), r_out.view(residual.shape)


# ---------------------------------------------------------------- causal conv1d + SiLU

@triton.jit
def _conv_fwd_kernel(x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, len_ptr, T, I,
                     sx_b, sx_i, sx_t, ss_b, ss_i, ss_k, sw_i, sw_k, sy_b, sy_i, sy_t,
                     K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    # HAS_LEN: only the first len_ptr[0] of the T tokens are real (a padded piece of a captured prefill); every
    # output is written, the state advances by the real tokens
    # every operand is (BLOCK_T, 1) or (1, BLOCK_I), so all of them share the tile's layout as loaded
    pid_t = tl.program_id(0)
    i = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I))[None, :]  # (1, BI)
    b = tl.program_id(2).to(tl.int64)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))[:, None]  # (BT, 1)
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
            src = t + (k - (K - 1))
            xv = tl.load(x_base + src * sx_t, mask=(src >= 0) & mt & mi, other=0.0)
            sv = tl.load(s_base + (src + K) * ss_k, mask=(src < 0) & mt & mi, other=0.0)
            w = tl.load(w_ptr + i * sw_i + k * sw_k, mask=mi, other=0.0).to(tl.float32)
            acc += (xv.to(tl.float32) + sv.to(xv.dtype).to(tl.float32)) * w
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
        kk = tl.arange(0, KP)[:, None]
        if HAS_LEN:
            T = tl.load(len_ptr).to(tl.int32)
        last = T - K + kk  # new state[k] = full[T - 1 + k]
        mk = kk < K
        x_tail = tl.load(x_base + last * sx_t, mask=(last >= 0) & mk & mi, other=0.0)
        s_tail = tl.load(s_base + (last + K) * ss_k, mask=(last < 0) & mk & mi, other=0.0)
        new = x_tail.to(tl.float32) + s_tail.to(x_tail.dtype).to(tl.float32)
        tl.debug_barrier()  # every thread's reads of the old state happen before any write
        tl.store(s_base + kk * ss_k, new, mask=mk & mi)


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
    block_t, block_i, warps = CONV_CONFIG
    assert block_t >= k - 1  # only the first tile in time reaches into the state
    grid = (triton.cdiv(t, block_t), triton.cdiv(dim, block_i), bsz)
    _conv_fwd_kernel[grid](x, conv_state, weight, weight if bias is None else bias, y,
                           weight if length is None else length, t, dim,
                           *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
                           K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None, HAS_LEN=length is not None,
                           BLOCK_T=block_t, BLOCK_I=block_i, num_warps=warps)
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


# ---------------------------------------------------------------- selective scan

@triton.jit
def _combine(a1, b1, a2, b2):
    # h -> a1 h + b1, then h -> a2 h + b2, is h -> (a1 a2) h + (a2 b1 + b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_fwd_kernel(u_ptr, dl_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, y_ptr, T, I, N,
                     su_b, su_i, su_t, sd_b, sd_i, sd_t, sz_b, sz_i, sz_t,
                     sb_b, sb_t, sb_n, sc_b, sc_t, sc_n, sh_b, sh_i, sh_n, sy_b, sy_i, sy_t,
                     BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mi = i < I
    mn = n < N
    m_in = mi[:, None] & mn[None, :]
    A = tl.load(a_ptr + i[:, None] * N + n[None, :], mask=m_in, other=0.0)  # (BI, BN)
    h_ptrs = h_ptr + b * sh_b + i[:, None] * sh_i + n[None, :] * sh_n
    h = tl.load(h_ptrs, mask=m_in, other=0.0)  # (BI, BN)
    d_skip = tl.load(d_ptr + i, mask=mi, other=0.0)
    bias = tl.load(bias_ptr + i, mask=mi, other=0.0)
    tt = tl.arange(0, BLOCK_T)
    last = (tt == BLOCK_T - 1)[:, None, None]
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        mt = t < T
        m_ti = mt[:, None] & mi[None, :]
        m_tn = mt[:, None] & mn[None, :]
        u = tl.load(u_ptr + b * su_b + t[:, None] * su_t + i[None, :] * su_i, mask=m_ti, other=0.0).to(tl.float32)
        dl = tl.load(dl_ptr + b * sd_b + t[:, None] * sd_t + i[None, :] * sd_i, mask=m_ti, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * sz_b + t[:, None] * sz_t + i[None, :] * sz_i, mask=m_ti, other=0.0).to(tl.float32)
        bm = tl.load(bm_ptr + b * sb_b + t[:, None] * sb_t + n[None, :] * sb_n, mask=m_tn, other=0.0).to(tl.float32)
        cm = tl.load(cm_ptr + b * sc_b + t[:, None] * sc_t + n[None, :] * sc_n, mask=m_tn, other=0.0).to(tl.float32)
        dt = tl.where(m_ti, _softplus(dl + bias[None, :]), 0.0)  # (BT, BI); padding steps are h -> h
        da = tl.exp(dt[:, :, None] * A[None, :, :])  # (BT, BI, BN)
        dbu = (dt * u)[:, :, None] * bm[:, None, :]
        a_cum, b_cum = tl.associative_scan((da, dbu), 0, _combine)
        hs = a_cum * h[None, :, :] + b_cum  # state after each token of the chunk
        y = tl.sum(hs * cm[:, None, :], axis=2) + d_skip[None, :] * u  # (BT, BI)
        y = y * _silu(z)
        tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + i[None, :] * sy_i, y.to(y_ptr.dtype.element_ty), mask=m_ti)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)
    tl.store(h_ptrs, h, mask=m_in)


@triton.jit
def _cols8(x, BLOCK_I: tl.constexpr):
    """The 8 columns of x (BLOCK_I, 8), each (BLOCK_I, 1); tl.split keeps them in registers."""
    ev, od = tl.split(tl.reshape(x, (BLOCK_I, 4, 2)))  # columns 0 2 4 6 | 1 3 5 7
    e0, e1 = tl.split(tl.reshape(ev, (BLOCK_I, 2, 2)))  # 0 4 | 2 6
    o0, o1 = tl.split(tl.reshape(od, (BLOCK_I, 2, 2)))  # 1 5 | 3 7
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return c0[:, None], c1[:, None], c2[:, None], c3[:, None], c4[:, None], c5[:, None], c6[:, None], c7[:, None]


@triton.jit
def _row(p, t, s_t, T, mn):
    """B or C of token t as (1, BLOCK_N) fp32; past T, token T - 1's (its dt is 0 there: no effect)."""
    return tl.load(p + tl.minimum(t, T - 1) * s_t, mask=mn, other=0.0).to(tl.float32)


@triton.jit
def _scan_token(h, dt, dtu, bm, cm, a2, WANT_Y: tl.constexpr):
    """One token of the recurrence on the (BLOCK_I, BLOCK_N) state; returns it and C . h as (BLOCK_I, 1)."""
    h = tl.exp2(dt * a2) * h + dtu * bm
    if WANT_Y:
        return h, tl.sum(h * cm, axis=1, keep_dims=True)
    return h, dt


@triton.jit
def _scan_seq_kernel(u_ptr, dl_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, y_ptr, hs_ptr, ds_ptr,
                     len_ptr, T, I, N, SEG, NSEG,
                     su_b, su_i, su_t, sd_b, sd_i, sd_t, sz_b, sz_i, sz_t,
                     sb_b, sb_t, sb_n, sc_b, sc_t, sc_n, sh_b, sh_i, sh_n, sy_b, sy_i, sy_t,
                     MODE: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
                     STAGES: tl.constexpr = 1, POLY: tl.constexpr = False, FAST: tl.constexpr = False,
                     OFF64: tl.constexpr = True):
    # Token by token over a (BLOCK_I, BLOCK_N) state in registers, 8 tokens a loop turn. The per-channel maths
    # (softplus, the gate, the D skip) runs on (BLOCK_I, 8) tiles, once per element, not once per state lane;
    # per token only exp2, two FMAs and the C . h reduction remain. Operands are shaped (BLOCK_I, 1) or
    # (1, BLOCK_N) so that they land in the state's layout; layouts change a few times a turn, not per token.
    #
    # Segments (program_id 2) add parallelism in time. The recurrence is affine, h -> exp(dt A) h + dt u B, and the
    # decay over a run of tokens is exp(A * sum dt). MODE 1 scans segment s from a zero state and writes that local
    # end state and sum(dt) to the workspaces hs (B, S, I, N), ds (B, S, I). MODE 2 starts segment s from the real
    # state, h0 folded through the earlier segments' (decay, local state) pairs, and writes y; its last segment
    # writes the final state to hs[:, S - 1] (h itself is still being read by the other segments). MODE 0 is
    # the whole sequence in one segment, from h to h. HAS_LEN: only the first len_ptr[0] tokens are real; the
    # others are skipped (y left unwritten there), so segments past them leave the state as it is.
    if HAS_LEN:
        T = tl.load(len_ptr).to(tl.int32)
    i = (tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I))[:, None]  # (BI, 1)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = NSEG  # not num_programs: MODE 1 runs one segment fewer
    n = tl.arange(0, BLOCK_N)[None, :]  # (1, BN)
    mi = i < I
    mn = n < N
    a2 = tl.load(a_ptr + i * N + n, mask=mi & mn, other=0.0) * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    h_ptrs = h_ptr + b * sh_b + i * sh_i + n * sh_n
    hs_row = hs_ptr + ((b * n_seg) * I + i) * N + n  # + s * I * N: segment s
    ds_row = ds_ptr + (b * n_seg) * I + i  # + s * I
    if MODE == 1:
        h = tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32)
    else:
        h = tl.load(h_ptrs, mask=mi & mn, other=0.0)
    if MODE == 2:
        for s in range(0, seg):
            h = tl.exp2(a2 * tl.load(ds_row + s * I, mask=mi, other=0.0)) * h + \
                tl.load(hs_row + s * I * N, mask=mi & mn, other=0.0)
    d_skip = tl.load(d_ptr + i, mask=mi, other=0.0)
    bias = tl.load(bias_ptr + i, mask=mi, other=0.0)
    p_u, p_dl, p_z = u_ptr + b * su_b + i * su_i, dl_ptr + b * sd_b + i * sd_i, z_ptr + b * sz_b + i * sz_i
    p_b, p_c, p_y = bm_ptr + b * sb_b + n * sb_n, cm_ptr + b * sc_b + n * sc_n, y_ptr + b * sy_b + i * sy_i
    one = tl.full([], 1, tl.int64 if OFF64 else tl.int32)  # OFF64: T times a stride can pass 2**31
    cols = tl.arange(0, 8)[None, :]
    t_lo = seg * SEG
    t_hi = tl.minimum(t_lo + SEG, T)
    dsum = tl.zeros([BLOCK_I, 1], dtype=tl.float32)
    for t0 in tl.range(t_lo, t_hi, 8, num_stages=STAGES):  # STAGES > 1: the next turns' loads go out early
        t = t0 * one
        tt = t + cols  # (1, 8)
        m8 = mi & (tt < t_hi)
        # loads past t_hi read token t_hi - 1 instead (masks off the channel alone): dt is 0 there, so those
        # tokens leave h as it is, and their y is not stored
        tc = tl.minimum(tt, t_hi - 1)
        u = tl.load(p_u + tc * su_t, mask=mi, other=0.0).to(tl.float32)  # (BI, 8)
        dl = tl.load(p_dl + tc * sd_t, mask=mi, other=0.0).to(tl.float32) + bias
        dt = tl.where(m8, _softplus_poly(dl, FAST) if POLY else _softplus(dl), 0.0)
        if MODE == 1:
            dsum += tl.sum(dt, axis=1, keep_dims=True)
        dt0, dt1, dt2, dt3, dt4, dt5, dt6, dt7 = _cols8(dt, BLOCK_I)  # past the end: dt = 0 leaves h as it is
        du0, du1, du2, du3, du4, du5, du6, du7 = _cols8(dt * u, BLOCK_I)
        b0, c0 = _row(p_b, t, sb_t, t_hi, mn), _row(p_c, t, sc_t, t_hi, mn)
        b1, c1 = _row(p_b, t + 1, sb_t, t_hi, mn), _row(p_c, t + 1, sc_t, t_hi, mn)
        b2, c2 = _row(p_b, t + 2, sb_t, t_hi, mn), _row(p_c, t + 2, sc_t, t_hi, mn)
        b3, c3 = _row(p_b, t + 3, sb_t, t_hi, mn), _row(p_c, t + 3, sc_t, t_hi, mn)
        b4, c4 = _row(p_b, t + 4, sb_t, t_hi, mn), _row(p_c, t + 4, sc_t, t_hi, mn)
        b5, c5 = _row(p_b, t + 5, sb_t, t_hi, mn), _row(p_c, t + 5, sc_t, t_hi, mn)
        b6, c6 = _row(p_b, t + 6, sb_t, t_hi, mn), _row(p_c, t + 6, sc_t, t_hi, mn)
        b7, c7 = _row(p_b, t + 7, sb_t, t_hi, mn), _row(p_c, t + 7, sc_t, t_hi, mn)
        h, y0 = _scan_token(h, dt0, du0, b0, c0, a2, MODE != 1)
        h, y1 = _scan_token(h, dt1, du1, b1, c1, a2, MODE != 1)
        h, y2 = _scan_token(h, dt2, du2, b2, c2, a2, MODE != 1)
        h, y3 = _scan_token(h, dt3, du3, b3, c3, a2, MODE != 1)
        h, y4 = _scan_token(h, dt4, du4, b4, c4, a2, MODE != 1)
        h, y5 = _scan_token(h, dt5, du5, b5, c5, a2, MODE != 1)
        h, y6 = _scan_token(h, dt6, du6, b6, c6, a2, MODE != 1)
        h, y7 = _scan_token(h, dt7, du7, b7, c7, a2, MODE != 1)
        if MODE != 1:
            z = tl.load(p_z + tc * sz_t, mask=mi, other=0.0).to(tl.float32)
            # join appends a last axis, so the outermost join picks bit 0 of the token index and the innermost bit 2
            ys = tl.join(tl.join(tl.join(y0, y4), tl.join(y2, y6)), tl.join(tl.join(y1, y5), tl.join(y3, y7)))
            y = (tl.reshape(ys, (BLOCK_I, 8)) + d_skip * u) * (_silu_rcp(z, FAST) if POLY else _silu(z))
            tl.store(p_y + tt * sy_t, y.to(p_y.dtype.element_ty), mask=m8)
    if MODE == 0:
        tl.store(h_ptrs, h, mask=mi & mn)
    elif MODE == 1:
        tl.store(hs_row + seg * I * N, h, mask=mi & mn)
        tl.store(ds_row + seg * I, dsum, mask=mi)
    elif seg == n_seg - 1:
        tl.store(hs_row + seg * I * N, h, mask=mi & mn)


@triton.jit
def _load_a_d(a_ptr, d_ptr, i, n, mi, mn, N):
    """A (BLOCK_I, BLOCK_N) and D (BLOCK_I,) of channels i, fp32."""
    return (tl.load(a_ptr + i[:, None] * N + n[None, :], mask=mi[:, None] & mn[None, :], other=0.0),
            tl.load(d_ptr + i, mask=mi, other=0.0))


@triton.jit
def _ssm_state_update(u, dl, bias, A, Dv, bm, cm, z, h, h_ptrs, mi, mn):
    """h <- exp(dt A) h + dt u B, stored at h_ptrs (BLOCK_I, BLOCK_N); returns (C . h + D u) silu(z) (BLOCK_I,)."""
    dt = _softplus(dl + bias)
    m_in = mi[:, None] & mn[None, :]
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * bm[None, :]
    tl.store(h_ptrs, h, mask=m_in)
    y = tl.sum(h * cm[None, :], axis=1) + Dv * u
    return y * _silu(z)


@triton.jit
def _ssm_step_kernel(u_ptr, dl_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, y_ptr, I, N,
                     su_b, su_i, sd_b, sd_i, sz_b, sz_i, sb_b, sb_n, sc_b, sc_n, sh_b, sh_i, sh_n, sy_b, sy_i,
                     BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mi = i < I
    mn = n < N
    u = tl.load(u_ptr + b * su_b + i * su_i, mask=mi, other=0.0).to(tl.float32)
    dl = tl.load(dl_ptr + b * sd_b + i * sd_i, mask=mi, other=0.0).to(tl.float32)
    bm = tl.load(bm_ptr + b * sb_b + n * sb_n, mask=mn, other=0.0).to(tl.float32)
    cm = tl.load(cm_ptr + b * sc_b + n * sc_n, mask=mn, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * sz_b + i * sz_i, mask=mi, other=0.0).to(tl.float32)
    A, Dv = _load_a_d(a_ptr, d_ptr, i, n, mi, mn, N)
    h_ptrs = h_ptr + b * sh_b + i[:, None] * sh_i + n[None, :] * sh_n
    h = tl.load(h_ptrs, mask=mi[:, None] & mn[None, :], other=0.0)
    y = _ssm_state_update(u, dl, tl.load(bias_ptr + i, mask=mi, other=0.0), A, Dv, bm, cm, z, h, h_ptrs, mi, mn)
    tl.store(y_ptr + b * sy_b + i * sy_i, y.to(y_ptr.dtype.element_ty), mask=mi)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _segments(t: int, programs: int, warps: int, device: torch.device) -> tuple[int, int | None]:
    """Time segments of the "seq" scan (a config's 0) and its register cap (None: none).

    Each pass runs programs x segments programs: as many as make one wave on the GPU, since a second, partial
    wave runs a few warps an SM, latency-bound. Segments are at least SCAN_MIN_SEGMENT tokens (the second pass
    folds every earlier segment's state in, so their number costs too). The cap widens the wave; it is taken only
    where the tokens allow more segments than the uncapped wave holds. Off CUDA (the interpreter): one segment per
    64 tokens, at most 16."""
    if device.type != "cuda":
        return max(1, min(16, t // 64)), None
    sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    most = max(1, t // SCAN_MIN_SEGMENT)
    plain, capped = (max(1, round(sms * w // warps / programs)) for w in SCAN_WAVE)
    return (most, None) if most <= plain else (min(most, capped), SCAN_CAP)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor,
                   out_dtype: torch.dtype = torch.float32, config: tuple | None = None,
                   length: torch.Tensor | None = None) -> torch.Tensor:
    """Selective scan from ssm_state; shapes and maths as reference.selective_scan_ref.

    u, delta, z: (B, I, T); Bm, Cm: (B, T, N); A: (I, N) fp32; D, delta_bias: (I,) fp32; ssm_state (B, I, N) fp32.
    Returns y: (B, I, T) in out_dtype, laid out as (B, T, I). T == 1 takes the one-step kernel.
    `length`: a one-element int device tensor: only the first `length` tokens are scanned (y past them unwritten).
    """
    bsz, dim, t = u.shape
    nst = A.shape[1]
    A, D, delta_bias = A.float().contiguous(), D.float().contiguous(), delta_bias.float().contiguous()
    if t == 1 and length is None:
        return ssm_step(u[:, :, 0], delta[:, :, 0], A, Bm[:, 0], Cm[:, 0], D, z[:, :, 0], delta_bias, ssm_state,
                        out_dtype).unsqueeze(-1)
    y = torch.empty(bsz, t, dim, dtype=out_dtype, device=u.device).transpose(1, 2)  # (B, I, T)
    config = config or SCAN_CONFIG
    if length is not None and config[0] != "seq":
        raise ValueError("selective_scan: a device-side length needs the 'seq' kernel")
    strides = (*u.stride(), *delta.stride(), *z.stride(), *Bm.stride(), *Cm.stride(), *ssm_state.stride(), *y.stride())
    if config[0] == "seq":
        _, block_i, warps = config[:3]
        n_i = triton.cdiv(dim, block_i)
        if len(config) > 3 and config[3]:
            n_seg, cap = config[3], config[5] if len(config) > 5 else None
        else:
            n_seg, cap = _segments(t, n_i * bsz, warps, u.device)
        stages = config[4] if len(config) > 4 else 1
        seg_len = triton.cdiv(triton.cdiv(t, n_seg), 8) * 8
        n_seg = triton.cdiv(t, seg_len)
        # token offsets in 32 bits where T times every token stride stays below SCAN_OFF64_FROM (2**31): the token
        # loop's SASS is 9% (first pass) and 7% (second) shorter
        off64 = t * max(abs(x) for x in (u.stride(2), delta.stride(2), z.stride(2), Bm.stride(1), Cm.stride(1),
                                         y.stride(2))) >= SCAN_OFF64_FROM
        kw = dict(HAS_LEN=length is not None, STAGES=stages, BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst),
                  POLY=SCAN_POLY, FAST=u.is_cuda, OFF64=off64, num_warps=warps)  # the interpreter: no rcp.approx
        if cap and u.is_cuda:
            kw["maxnreg"] = cap
        n_ptr = D if length is None else length
        if n_seg == 1:
            _scan_seq_kernel[(n_i, bsz, 1)](u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, ssm_state, D, n_ptr,
                                            t, dim, nst, seg_len, 1, *strides, MODE=0, **kw)
        else:
            hs = torch.empty(bsz, n_seg, dim, nst, dtype=torch.float32, device=u.device)
            ds = torch.empty(bsz, n_seg, dim, dtype=torch.float32, device=u.device)
            args = (u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, hs, ds, n_ptr, t, dim, nst, seg_len, n_seg,
                    *strides)
            _scan_seq_kernel[(n_i, bsz, n_seg - 1)](*args, MODE=1, **kw)  # the last segment's local state is unused
            _scan_seq_kernel[(n_i, bsz, n_seg)](*args, MODE=2, **kw)
            ssm_state.copy_(hs[:, n_seg - 1])
    else:
        _, block_t, block_i, warps = config
        _scan_fwd_kernel[(triton.cdiv(dim, block_i), bsz)](
            u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, t, dim, nst, *strides,
            BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst), num_warps=warps)
    return y


def ssm_step(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
             D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One token of the selective scan with gating: u, delta, z: (B, I); Bm, Cm: (B, N) -> y (B, I) in out_dtype.

    ssm_state: (B, I, N) fp32, updated. A (I, N), D and delta_bias (I,) fp32 and contiguous.
    """
    bsz, dim = u.shape
    nst = A.shape[1]
    y = torch.empty(bsz, dim, dtype=out_dtype, device=u.device)
    block_i = 32
    _ssm_step_kernel[(triton.cdiv(dim, block_i), bsz)](
        u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, dim, nst, *u.stride(), *delta.stride(), *z.stride(),
        *Bm.stride(), *Cm.stride(), *ssm_state.stride(), *y.stride(),
        BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst), num_warps=4)
    return y


BACKEND = Backend("cuda-triton", causal_conv1d, selective_scan, rms_norm)
