"""Triton kernels of the selective scan on CUDA: the prefill scan (from a given state, returning the final one)
and the one-step scan, with the math helpers they share with the conv and the decode kernels.

Each kernel computes what its plain-torch twin in swarm.kernels.reference computes, with fp32 arithmetic; none
syncs with the host. Shapes: B batch, I d_inner, T tokens, N d_state, R dt_rank.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from swarm.errors import BackendUnavailable

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
# The Gluon scan (gluon_scan: the same two passes with the state's layout chosen, half the instructions): ("gluon",
# BLOCK_I, TT[, segments[, maxnreg]]): BLOCK_I channels a one-warp program, TT tokens a turn; segments 0 (and maxnreg
# None) take _segments() with GLUON_WAVE. SCAN_GLUON makes it the default where it runs (a Hopper GPU, Gluon
# imported). Off: it ties with the "seq" kernel (H100, 2048-token prefill through 16 blocks of 2.8b width, 7.60-7.95
# ms against 7.59-7.80; ncu: both latency-bound at 10-13 warps an SM, issue 48-60% and MUFU 56-71% of peak)
GLUON_SCAN_CONFIG: tuple = ("gluon", 32, 8, 0)
SCAN_GLUON: bool = False
# the warps an SM holds of the second pass: uncapped (152 registers a thread: 13) and capped (SCAN_CAP: 16)
GLUON_WAVE: tuple[int, int] = (13, 16)
# The lane scan (gluon_scan._lane_scan_kernel: one state element a thread, a turn's tokens in registers, one pass
# where the width gives enough warps): ("lane", TT, num_warps[, segments[, maxnreg[, channels a thread[, ahead]]]]);
# segments 0 take _lane_segments(). LANE_WAVE: the warps an SM holds of it by (channels a thread, loads a turn
# ahead), TT 16 on sm_90: 84-96 registers a thread (1 channel), 128 (2), 148 (2, ahead). Off: slower than "seq" at
# every width (H100, the scan alone, 2048 tokens: 2.8b 188.9 us at this config against 166.2, 130m 79.5-81.0 against
# 65.2; ncu: latency-bound, 28% issue at 19 warps an SM with one channel a thread)
LANE_SCAN_CONFIG: tuple = ("lane", 16, 4, 0, None, 2, True)
SCAN_LANE: bool = False
LANE_WAVE: dict[tuple[int, bool], int] = {(1, False): 21, (1, True): 20, (2, False): 16, (2, True): 12}
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
# Programmatic dependent launch of the prefill's own kernels (RMSNorm, conv, both scan passes): each is launched
# while its predecessor drains and waits for it (gdc_wait) before its first load, so that the launch gap between
# two graph nodes goes where one of ours follows (cuBLAS's GEMMs launch plainly). None: where the GPU has it.
PREFILL_PDL: bool | None = None


# ---------------------------------------------------------------- softplus and gate

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
                     OFF64: tl.constexpr = True, PDL: tl.constexpr = 0):
    # Token by token over a (BLOCK_I, BLOCK_N) state in registers, 8 tokens a loop turn. The per-channel maths
    # (softplus, the gate, the D skip) runs on (BLOCK_I, 8) tiles, once per element, not once per state lane;
    # per token only exp2, two FMAs and the C . h reduction remain. Operands are shaped (BLOCK_I, 1) or
    # (1, BLOCK_N) so that they land in the state's layout; layouts change a few times a turn, not per token.
    #
    # Segments (program_id 2) add parallelism in time. The recurrence is affine, h -> exp(dt A) h + dt u B, and the
    # decay over a run of tokens is exp(A * sum dt). MODE 1 scans segment s from a zero state and writes that local
    # end state and sum(dt) to the workspaces hs (B, S, I, N), ds (B, S, I). MODE 2 starts segment s from the real
    # state, h0 folded through the earlier segments' (decay, local state) pairs, and writes y; its last segment
    # writes the final state to h. MODE 1's first segment copies h to hs[:, S - 1] (the last segment has no local
    # state to keep), and MODE 2 reads h0 there: no program of MODE 2 reads h, so its last one can write it in
    # place (no copy launch after the pass). MODE 0 is the whole sequence in one segment, from h to h. HAS_LEN:
    # only the first len_ptr[0] tokens are real; the others are skipped (y left unwritten there), so segments past
    # them leave the state as it is.
    _grid_wait(PDL)
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
    h0_row = hs_row + (n_seg - 1) * I * N  # MODE 1 -> 2: the initial state, through the workspace
    if MODE == 1:
        if seg == 0:
            tl.store(h0_row, tl.load(h_ptrs, mask=mi & mn, other=0.0), mask=mi & mn)
        h = tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32)
    elif MODE == 2:
        h = tl.load(h0_row, mask=mi & mn, other=0.0)
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
        tl.store(h_ptrs, h, mask=mi & mn)


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


@functools.lru_cache(maxsize=None)
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: a CUDA device of compute capability 9 or more (Hopper on)."""
    if device.type != "cuda":
        return False
    return _sm_major(torch.cuda.current_device() if device.index is None else device.index) >= 9


def prefill_pdl(device: torch.device) -> bool:
    """Whether the prefill's kernels (RMSNorm, conv, scan) launch with PDL on `device` (PREFILL_PDL, or where
    the GPU has it)."""
    if PREFILL_PDL is not None:
        return PREFILL_PDL and device.type == "cuda"
    return pdl_available(device)


def pdl_kw(pdl: bool) -> dict:
    """A launch's keywords for PDL 1 (wait, then let the successor launch) or 0 (a plain launch)."""
    return {"PDL": 1, "launch_pdl": True} if pdl else {"PDL": 0}


@triton.jit
def _grid_wait(PDL: tl.constexpr):
    # everything above this reads only weights; below it the predecessor's outputs are complete and visible
    if PDL == 2:
        gdc_launch_dependents()
    if PDL > 0:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()  # the successor may now launch (and wait for this one at its own _grid_wait)


def _segments(t: int, programs: int, warps: int, device: torch.device,
              wave: tuple[int, int] | None = None) -> tuple[int, int | None]:
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
    plain, capped = (max(1, round(sms * w // warps / programs)) for w in wave or SCAN_WAVE)
    return (most, None) if most <= plain else (min(most, capped), SCAN_CAP)


def _lane_segments(t: int, warps: int, device: torch.device, wave: int) -> int:
    """Time segments of the "lane" scan (a config's 0): one (a single pass) where a segment's warps fill a wave
    of `wave` warps an SM, else as many as fill one wave, no segment under SCAN_MIN_SEGMENT tokens. Off CUDA
    (no Gluon there: tests of this rule): 132 SMs."""
    sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" \
        else 132
    return max(1, min(t // SCAN_MIN_SEGMENT, sms * wave // warps))


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
    config = config or default_scan_config(u.device, nst)
    if length is not None and config[0] not in ("seq", "gluon", "lane"):
        raise ValueError("selective_scan: a device-side length needs the 'seq', 'gluon' or 'lane' kernel")
    strides = (*u.stride(), *delta.stride(), *z.stride(), *Bm.stride(), *Cm.stride(), *ssm_state.stride(), *y.stride())
    if config[0] in ("seq", "gluon", "lane"):
        turn = 8  # segments are whole turns
        if config[0] in ("gluon", "lane"):
            if not gluon_scan_available(u.device):
                raise BackendUnavailable(f"selective_scan: the '{config[0]}' scan needs Gluon and a Hopper GPU")
            from swarm.kernels import gluon_scan  # it imports this module's maths
        if config[0] == "lane":  # ("lane", TT, num_warps[, segments[, maxnreg[, channels a thread[, ahead]]]])
            _, turn, warps = config[:3]
            bn = triton.next_power_of_2(nst)
            if bn > 32:
                raise ValueError(f"selective_scan: the 'lane' scan holds at most 32 states a channel, not {nst}")
            cpt = config[5] if len(config) > 5 else 1
            block_i, kernel = cpt * (32 // bn) * warps, gluon_scan._lane_scan_kernel
            cap = config[4] if len(config) > 4 else None
            kw = dict(TT=turn, BLOCK_N=bn, CPT=cpt, AHEAD=bool(config[6]) if len(config) > 6 else False,
                      num_warps=warps)
        elif config[0] == "gluon":  # ("gluon", BLOCK_I, TT[, segments[, maxnreg]])
            _, block_i, tt = config[:3]
            warps, wave, kernel = 1, GLUON_WAVE, gluon_scan._scan_kernel
            cap = config[4] if len(config) > 4 else None
            # the state's layout spreads BLOCK_N over 4 lanes and BLOCK_I over 8
            kw = dict(TT=tt, BLOCK_N=max(4, triton.next_power_of_2(nst)), num_warps=1)
        else:  # ("seq", BLOCK_I, num_warps[, segments[, stages[, maxnreg]]])
            _, block_i, warps = config[:3]
            wave, kernel = SCAN_WAVE, _scan_seq_kernel
            cap = config[5] if len(config) > 5 else None
            kw = dict(STAGES=config[4] if len(config) > 4 else 1, BLOCK_N=triton.next_power_of_2(nst),
                      POLY=SCAN_POLY, FAST=u.is_cuda, num_warps=warps)  # the interpreter: no rcp.approx
        n_i = triton.cdiv(dim, block_i)
        if len(config) > 3 and config[3]:
            n_seg = config[3]
        elif config[0] == "lane":
            n_seg = _lane_segments(t, n_i * bsz * warps, u.device, LANE_WAVE[kw["CPT"], kw["AHEAD"]])
        else:
            n_seg, cap = _segments(t, n_i * bsz, warps, u.device, wave)
        seg_len = triton.cdiv(triton.cdiv(t, n_seg), turn) * turn
        n_seg = triton.cdiv(t, seg_len)
        # token offsets in 32 bits where T times every token stride stays below SCAN_OFF64_FROM (2**31): the token
        # loop's SASS is 9% (first pass) and 7% (second) shorter
        off64 = t * max(abs(x) for x in (u.stride(2), delta.stride(2), z.stride(2), Bm.stride(1), Cm.stride(1),
                                         y.stride(2))) >= SCAN_OFF64_FROM
        kw.update(HAS_LEN=length is not None, BLOCK_I=block_i, OFF64=off64, **pdl_kw(prefill_pdl(u.device)))
        if cap and u.is_cuda:
            kw["maxnreg"] = cap
        n_ptr = D if length is None else length
        if n_seg == 1:
            kernel[(n_i, bsz, 1)](u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, ssm_state, D, n_ptr,
                                  t, dim, nst, seg_len, 1, *strides, MODE=0, **kw)
        else:
            hs = torch.empty(bsz, n_seg, dim, nst, dtype=torch.float32, device=u.device)
            ds = torch.empty(bsz, n_seg, dim, dtype=torch.float32, device=u.device)
            args = (u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, hs, ds, n_ptr, t, dim, nst, seg_len, n_seg,
                    *strides)
            kernel[(n_i, bsz, n_seg - 1)](*args, MODE=1, **kw)  # the last segment's local state: unused
            kernel[(n_i, bsz, n_seg)](*args, MODE=2, **kw)
    else:
        _, block_t, block_i, warps = config
        _scan_fwd_kernel[(triton.cdiv(dim, block_i), bsz)](
            u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, t, dim, nst, *strides,
            BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst), num_warps=warps)
    return y


def gluon_scan_available(device: torch.device) -> bool:
    """Whether the Gluon scan runs on `device`: Gluon imported and a Hopper GPU (compute capability 9)."""
    from swarm.kernels import gluon_scan  # it imports this module's maths
    if not gluon_scan.available() or device.type != "cuda":
        return False
    return _sm_major(torch.cuda.current_device() if device.index is None else device.index) == 9


def default_scan_config(device: torch.device, d_state: int = 16) -> tuple:
    """Where the Gluon kernels run: LANE_SCAN_CONFIG if SCAN_LANE is on (and the state has at most 32 elements a
    channel), else GLUON_SCAN_CONFIG if SCAN_GLUON is; SCAN_CONFIG otherwise."""
    if (SCAN_LANE or SCAN_GLUON) and gluon_scan_available(device):
        if SCAN_LANE and d_state <= 32:
            return LANE_SCAN_CONFIG
        if SCAN_GLUON:
            return GLUON_SCAN_CONFIG
    return SCAN_CONFIG


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
