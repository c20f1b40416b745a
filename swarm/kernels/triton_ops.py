"""Triton kernels for Mamba-1 on CUDA: causal conv1d, selective scan (prefill and one-step decode), RMSNorm.

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

# The prefill scan's kernel and tiles: ("seq", BLOCK_I, num_warps) or ("chunk", BLOCK_T, BLOCK_I, num_warps).
# The bench measures the alternatives.
SCAN_CONFIG: tuple = ("seq", 16, 8)


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
def _conv_fwd_kernel(x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, T, I,
                     sx_b, sx_i, sx_t, ss_b, ss_i, ss_k, sw_i, sw_k, sy_b, sy_i, sy_t,
                     K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_t = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mi = i < I
    mt = t < T
    x_base = x_ptr + b * sx_b
    s_base = s_ptr + b * ss_b
    acc = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
    # full = [conv_state[1:], x]: tap k of output t reads full[t + k], which is x[src] or conv_state[src + K]
    for k in tl.static_range(K):
        src = t + (k - (K - 1))
        xv = tl.load(x_base + src[:, None] * sx_t + i[None, :] * sx_i,
                     mask=((src >= 0) & mt)[:, None] & mi[None, :], other=0.0)
        sv = tl.load(s_base + (src + K)[:, None] * ss_k + i[None, :] * ss_i,
                     mask=((src < 0) & mt)[:, None] & mi[None, :], other=0.0)
        w = tl.load(w_ptr + i * sw_i + k * sw_k, mask=mi, other=0.0).to(tl.float32)
        acc += (xv.to(tl.float32) + sv.to(xv.dtype).to(tl.float32)) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + i, mask=mi, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + i[None, :] * sy_i, _silu(acc).to(y_ptr.dtype.element_ty),
             mask=mt[:, None] & mi[None, :])
    if pid_t == 0:  # only this program reads the old state, so only it may write the new one
        kk = tl.arange(0, KP)
        last = T - K + kk  # new state[k] = full[T - 1 + k]
        mk = kk < K
        x_tail = tl.load(x_base + last[:, None] * sx_t + i[None, :] * sx_i,
                         mask=((last >= 0) & mk)[:, None] & mi[None, :], other=0.0)
        s_tail = tl.load(s_base + (last + K)[:, None] * ss_k + i[None, :] * ss_i,
                         mask=((last < 0) & mk)[:, None] & mi[None, :], other=0.0)
        new = x_tail.to(tl.float32) + s_tail.to(x_tail.dtype).to(tl.float32)
        tl.debug_barrier()  # every thread's reads of the old state happen before any write
        tl.store(s_base + kk[:, None] * ss_k + i[None, :] * ss_i, new, mask=mk[:, None] & mi[None, :])


@triton.jit
def _conv_step_kernel(x_ptr, s_ptr, idx_ptr, w_ptr, b_ptr, y_ptr, I,
                      sx_b, sx_i, ss_b, ss_i, ss_k, sw_i, sw_k, sy_b, sy_i,
                      K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
                      BLOCK_I: tl.constexpr):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    if HAS_IDX:
        slot = tl.load(idx_ptr + b).to(tl.int64)
    else:
        slot = b
    mi = i < I
    kk = tl.arange(0, KP)
    s = s_ptr + slot * ss_b + i[:, None] * ss_i + kk[None, :] * ss_k
    m2 = mi[:, None] & (kk < K)[None, :]
    xv = tl.load(x_ptr + b * sx_b + i * sx_i, mask=mi, other=0.0)
    shifted = tl.load(s + ss_k, mask=mi[:, None] & (kk < K - 1)[None, :], other=0.0)
    new = tl.where((kk == K - 1)[None, :], xv.to(tl.float32)[:, None], shifted.to(xv.dtype).to(tl.float32))
    w = tl.load(w_ptr + i[:, None] * sw_i + kk[None, :] * sw_k, mask=m2, other=0.0).to(tl.float32)
    acc = tl.sum(new * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i, mask=mi, other=0.0).to(tl.float32)
    tl.debug_barrier()  # the shifted read above overlaps other threads' writes below
    tl.store(s, new, mask=m2)
    tl.store(y_ptr + b * sy_b + i * sy_i, _silu(acc).to(y_ptr.dtype.element_ty), mask=mi)


def causal_conv1d(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x: (B, I, T) any strides; conv_state: (B, I, K) fp32, updated; weight (I, K); bias (I,) or None.

    Returns silu(conv): (B, I, T) in x's dtype, laid out as (B, T, I) so that its transpose feeds x_proj as is.
    """
    bsz, dim, t = x.shape
    if t == 1:
        return conv1d_step(x[:, :, 0], conv_state, weight, bias).unsqueeze(-1)
    k = weight.shape[-1]
    y = torch.empty(bsz, t, dim, dtype=x.dtype, device=x.device).transpose(1, 2)  # (B, I, T)
    block_t, block_i = 32, 64
    grid = (triton.cdiv(t, block_t), triton.cdiv(dim, block_i), bsz)
    _conv_fwd_kernel[grid](x, conv_state, weight, weight if bias is None else bias, y, t, dim,
                           *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
                           K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None,
                           BLOCK_T=block_t, BLOCK_I=block_i, num_warps=4)
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
def _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t, T, mi, mn):
    ok = t < T  # a scalar: tl.where folds it into the masks (the interpreter mis-types scalar & vector)
    m_i, m_n = tl.where(ok, mi, False), tl.where(ok, mn, False)
    u = tl.load(p_u + t * su_t, mask=m_i, other=0.0).to(tl.float32)
    dl = tl.load(p_dl + t * sd_t, mask=m_i, other=0.0).to(tl.float32)
    z = tl.load(p_z + t * sz_t, mask=m_i, other=0.0).to(tl.float32)
    bm = tl.load(p_b + t * sb_t, mask=m_n, other=0.0).to(tl.float32)
    cm = tl.load(p_c + t * sc_t, mask=m_n, other=0.0).to(tl.float32)
    return u, dl, z, bm, cm


@triton.jit
def _scan_apply(h, u, dl, z, bm, cm, a2, bias, d_skip, p_y, sy_t, t, T, mi):
    ok = t < T
    dt = tl.where(ok, _softplus(dl + bias), 0.0)  # a step past T leaves h as it is
    h = tl.exp2(dt[:, None] * a2) * h + (dt * u)[:, None] * bm[None, :]
    y = (tl.sum(h * cm[None, :], axis=1) + d_skip * u) * _silu(z)
    tl.store(p_y + t * sy_t, y.to(p_y.dtype.element_ty), mask=tl.where(ok, mi, False))
    return h


@triton.jit
def _scan_seq_kernel(u_ptr, dl_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, y_ptr, T, I, N,
                     su_b, su_i, su_t, sd_b, sd_i, sd_t, sz_b, sz_i, sz_t,
                     sb_b, sb_t, sb_n, sc_b, sc_t, sc_n, sh_b, sh_i, sh_n, sy_b, sy_i, sy_t,
                     BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    # The recurrence runs token by token over a (BLOCK_I, BLOCK_N) tile held in registers. Its arithmetic is
    # short; what costs is waiting on loads, so each loop turn issues the loads of 8 tokens before it uses any.
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mi = i < I
    mn = n < N
    m_in = mi[:, None] & mn[None, :]
    a2 = tl.load(a_ptr + i[:, None] * N + n[None, :], mask=m_in, other=0.0) * 1.4426950408889634  # exp -> exp2
    h_ptrs = h_ptr + b * sh_b + i[:, None] * sh_i + n[None, :] * sh_n
    h = tl.load(h_ptrs, mask=m_in, other=0.0)
    d_skip = tl.load(d_ptr + i, mask=mi, other=0.0)
    bias = tl.load(bias_ptr + i, mask=mi, other=0.0)
    p_u, p_dl, p_z = u_ptr + b * su_b + i * su_i, dl_ptr + b * sd_b + i * sd_i, z_ptr + b * sz_b + i * sz_i
    p_b, p_c, p_y = bm_ptr + b * sb_b + n * sb_n, cm_ptr + b * sc_b + n * sc_n, y_ptr + b * sy_b + i * sy_i
    one = tl.full([], 1, tl.int64)  # token offsets in 64 bits: T times a (B, T, 2I) stride can pass 2**31
    for t0 in range(0, T, 8):
        t = t0 * one
        u0, d0, z0, b0, c0 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t, T, mi, mn)
        u1, d1, z1, b1, c1 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 1, T, mi, mn)
        u2, d2, z2, b2, c2 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 2, T, mi, mn)
        u3, d3, z3, b3, c3 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 3, T, mi, mn)
        u4, d4, z4, b4, c4 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 4, T, mi, mn)
        u5, d5, z5, b5, c5 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 5, T, mi, mn)
        u6, d6, z6, b6, c6 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 6, T, mi, mn)
        u7, d7, z7, b7, c7 = _scan_load(p_u, p_dl, p_z, p_b, p_c, su_t, sd_t, sz_t, sb_t, sc_t, t + 7, T, mi, mn)
        h = _scan_apply(h, u0, d0, z0, b0, c0, a2, bias, d_skip, p_y, sy_t, t, T, mi)
        h = _scan_apply(h, u1, d1, z1, b1, c1, a2, bias, d_skip, p_y, sy_t, t + 1, T, mi)
        h = _scan_apply(h, u2, d2, z2, b2, c2, a2, bias, d_skip, p_y, sy_t, t + 2, T, mi)
        h = _scan_apply(h, u3, d3, z3, b3, c3, a2, bias, d_skip, p_y, sy_t, t + 3, T, mi)
        h = _scan_apply(h, u4, d4, z4, b4, c4, a2, bias, d_skip, p_y, sy_t, t + 4, T, mi)
        h = _scan_apply(h, u5, d5, z5, b5, c5, a2, bias, d_skip, p_y, sy_t, t + 5, T, mi)
        h = _scan_apply(h, u6, d6, z6, b6, c6, a2, bias, d_skip, p_y, sy_t, t + 6, T, mi)
        h = _scan_apply(h, u7, d7, z7, b7, c7, a2, bias, d_skip, p_y, sy_t, t + 7, T, mi)
    tl.store(h_ptrs, h, mask=m_in)


@triton.jit
def _ssm_step_kernel(u_ptr, dl_ptr, wdt_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, idx_ptr, y_ptr,
                     I, N, R, su_b, su_i, sd_b, sd_i, sw_i, sw_r, sz_b, sz_i, sb_b, sb_n, sc_b, sc_n,
                     sh_b, sh_i, sh_n, sy_b, sy_i,
                     FUSE_DT: tl.constexpr, HAS_IDX: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    if HAS_IDX:
        slot = tl.load(idx_ptr + b).to(tl.int64)
    else:
        slot = b
    n = tl.arange(0, BLOCK_N)
    mi = i < I
    mn = n < N
    m_in = mi[:, None] & mn[None, :]
    u = tl.load(u_ptr + b * su_b + i * su_i, mask=mi, other=0.0).to(tl.float32)
    if FUSE_DT:  # delta = dt_proj(dt_low), rounded to the weight dtype as the unfused matmul's output would be
        r = tl.arange(0, BLOCK_R)
        mr = r < R
        dlow = tl.load(dl_ptr + b * sd_b + r * sd_i, mask=mr, other=0.0).to(tl.float32)
        w = tl.load(wdt_ptr + i[:, None] * sw_i + r[None, :] * sw_r, mask=mi[:, None] & mr[None, :], other=0.0)
        dl = tl.sum(w.to(tl.float32) * dlow[None, :], axis=1).to(w.dtype).to(tl.float32)
    else:
        dl = tl.load(dl_ptr + b * sd_b + i * sd_i, mask=mi, other=0.0).to(tl.float32)
    dt = _softplus(dl + tl.load(bias_ptr + i, mask=mi, other=0.0))
    A = tl.load(a_ptr + i[:, None] * N + n[None, :], mask=m_in, other=0.0)
    bm = tl.load(bm_ptr + b * sb_b + n * sb_n, mask=mn, other=0.0).to(tl.float32)
    cm = tl.load(cm_ptr + b * sc_b + n * sc_n, mask=mn, other=0.0).to(tl.float32)
    h_ptrs = h_ptr + slot * sh_b + i[:, None] * sh_i + n[None, :] * sh_n
    h = tl.load(h_ptrs, mask=m_in, other=0.0)
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * bm[None, :]
    tl.store(h_ptrs, h, mask=m_in)
    y = tl.sum(h * cm[None, :], axis=1) + tl.load(d_ptr + i, mask=mi, other=0.0) * u
    z = tl.load(z_ptr + b * sz_b + i * sz_i, mask=mi, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * sy_b + i * sy_i, (y * _silu(z)).to(y_ptr.dtype.element_ty), mask=mi)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor,
                   out_dtype: torch.dtype = torch.float32, config: tuple | None = None) -> torch.Tensor:
    """Selective scan from ssm_state; shapes and maths as reference.selective_scan_ref.

    u, delta, z: (B, I, T); Bm, Cm: (B, T, N); A: (I, N) fp32; D, delta_bias: (I,) fp32; ssm_state (B, I, N) fp32.
    Returns y: (B, I, T) in out_dtype, laid out as (B, T, I). T == 1 takes the one-step kernel.
    """
    bsz, dim, t = u.shape
    nst = A.shape[1]
    A, D, delta_bias = A.float().contiguous(), D.float().contiguous(), delta_bias.float().contiguous()
    if t == 1:
        return ssm_step(u[:, :, 0], delta[:, :, 0], A, Bm[:, 0], Cm[:, 0], D, z[:, :, 0], delta_bias, ssm_state,
                        out_dtype=out_dtype).unsqueeze(-1)
    y = torch.empty(bsz, t, dim, dtype=out_dtype, device=u.device).transpose(1, 2)  # (B, I, T)
    config = config or SCAN_CONFIG
    args = (u, delta, z, Bm, Cm, A, D, delta_bias, ssm_state, y, t, dim, nst,
            *u.stride(), *delta.stride(), *z.stride(), *Bm.stride(), *Cm.stride(), *ssm_state.stride(), *y.stride())
    if config[0] == "seq":
        _, block_i, warps = config
        _scan_seq_kernel[(triton.cdiv(dim, block_i), bsz)](
            *args, BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst), num_warps=warps)
    else:
        _, block_t, block_i, warps = config
        _scan_fwd_kernel[(triton.cdiv(dim, block_i), bsz)](
            *args, BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst), num_warps=warps)
    return y


def ssm_step(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
             D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor,
             idx: torch.Tensor | None = None, dt_weight: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One token of the selective scan with gating: u, z: (B, I); Bm, Cm: (B, N) -> y (B, I) in out_dtype.

    delta: (B, I) before bias and softplus, or with `dt_weight` (I, R) the low-rank dt (B, R) whose projection is
    fused here. ssm_state: (B, I, N) fp32, or with `idx` (B,) int64 a pool (S, I, N) addressed by idx[b].
    A, D, delta_bias must be fp32 and contiguous (the graph runner prepares them once).
    """
    bsz, dim = u.shape
    nst = A.shape[1]
    y = torch.empty(bsz, dim, dtype=out_dtype, device=u.device)
    rank = 1 if dt_weight is None else dt_weight.shape[1]
    block_i = 32 if dt_weight is None else 16
    _ssm_step_kernel[(triton.cdiv(dim, block_i), bsz)](
        u, delta, delta if dt_weight is None else dt_weight, z, Bm, Cm, A, D, delta_bias, ssm_state,
        u if idx is None else idx, y, dim, nst, rank,
        *u.stride(), *delta.stride(), *((0, 0) if dt_weight is None else dt_weight.stride()), *z.stride(),
        *Bm.stride(), *Cm.stride(), *ssm_state.stride(), *y.stride(),
        FUSE_DT=dt_weight is not None, HAS_IDX=idx is not None,
        BLOCK_I=block_i, BLOCK_N=triton.next_power_of_2(nst), BLOCK_R=triton.next_power_of_2(rank), num_warps=4)
    return y


BACKEND = Backend("cuda-triton", causal_conv1d, selective_scan, rms_norm)
