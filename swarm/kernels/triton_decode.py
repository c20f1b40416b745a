"""Triton kernels of the CUDA-graph decode step: one token of a block in four launches.

    norm_gemv      RMSNorm of the fp32 residual row fused into in_proj's GEMV; the conv step (state shift,
                   SiLU) in its epilogue on the x half                                -> xc | z (B, 2I)
    gemv           x_proj, unrounded fp32                                             -> dt_low, B, C (B, R + 2N)
    ssm_decode     dt_proj; state update; D skip; gate                                -> y (B, I)
    gemv_residual  out_proj's GEMV, added to the fp32 residual in place
(conv_xproj, the conv step with x_proj as partial sums, is GraphDecoder's xproj="fused" alternative.)

At batch 1 a decode step is bound by streaming the weights, so the GEMVs are written for bandwidth: each program
owns BLOCK_N output rows over the whole input, held in registers at once, and the batch is the grid's fastest
axis, so the programs that share a weight tile run together and the tile comes from L2 after the first. On Hopper
each kernel is launched with programmatic dependent launch (PDL): it loads its weights before waiting for its
predecessor's outputs, so kernel boundaries cost little. States live in pools (S, I, ...) addressed by a slot
index (B,), so a captured graph gathers and scatters them for free. Every kernel rounds where the eager block
rounds (weight-dtype outputs of each matmul and norm), so the two agree to the dtype's precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swarm.kernels.triton_ops import _conv_tap, _slot
from swarm.kernels.triton_scan import _grid_wait, _load_a_d, _ssm_state_update, pdl_available

# (BLOCK_N, num_warps) of the GEMVs; scripts/bench_gpu.py measures the alternatives
GEMV_IN_CONFIG: tuple[int, int] = (4, 4)
GEMV_OUT_CONFIG: tuple[int, int] = (2, 2)
GEMV_XPROJ_CONFIG: tuple[int, int] = (2, 2)
# Off CUDA (Triton's interpreter, in tests) each program is Python executing numpy, and every call into a helper
# costs a language patch: few wide programs (a tiny model's decode step: 1.5 s, against 10.6 s with the GPU's tiles)
INTERPRETER_GEMV_CONFIG: tuple[int, int] = (64, 4)
# (BLOCK_I, num_warps) of ssm_decode, or None for the measured best: (16, 1) at batch 1, (32, 1) above (2.8b, H100:
# 3.6 and 6.8 us against 4.0 and 10.6 for the old (32, 4))
SSM_DECODE_CONFIG: tuple[int, int] | None = None
# Programmatic dependent launch (Hopper and later): each kernel is launched while its predecessor drains, streams
# its weights in, and only then waits for the predecessor's outputs (gdc_wait), so the weight stream overlaps the
# tail, the launch gap and the latency-bound SSM step. None: on where the GPU has it (compute capability >= 9).
PDL: bool | None = None
# The kernels that let their successor launch as soon as all their own programs run, before their input is ready
# (the others let it launch once their input is ready): deeper overlap. All of them measured best (2.8b width,
# H100: 41.2 us a block against 41.8 with none early and 48.5 without PDL; scripts/sweep_gpu.py step_sweep).
PDL_EARLY: frozenset[str] = frozenset({"norm_gemv", "gemv", "ssm_decode", "gemv_residual"})


def _pdl(device: torch.device) -> bool:
    if PDL is not None:
        return PDL and device.type == "cuda"
    return pdl_available(device)


def _launch(kernel, grid, *args, pdl: bool, name: str, **kw) -> None:
    """kernel[grid](*args) with PDL = 0 (a plain launch), 1 (the successor launches after gdc_wait) or 2 (early)."""
    if pdl:
        kw["launch_pdl"] = True
    kernel[grid](*args, PDL=(2 if name in PDL_EARLY else 1) if pdl else 0, **kw)


def _pieces(k: int) -> tuple[int, int, int]:
    """k as three power-of-two tile widths p0 + p1 + p2 >= k (the last one masked; 0 = none): 2560 = 2048 + 512.

    A GEMV program holds its whole weight tile in registers, loaded before it waits for its input; Triton's tiles
    are powers of two, and three cover any width with at most a few masked columns."""
    p0 = 1 << (k.bit_length() - 1)
    p1 = 1 << ((k - p0).bit_length() - 1) if k > p0 else 0
    rest = k - p0 - p1
    return p0, p1, triton.next_power_of_2(rest) if rest else 0


@triton.jit
def _w_piece(w_rows, mn, OFF: tl.constexpr, P: tl.constexpr, K: tl.constexpr):
    k = OFF + tl.arange(0, P)
    return tl.load(w_rows + k[None, :], mask=mn[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _w_tile(w_ptr, b_ptr, n, mn, sw_n, K: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """A GEMV program's weight rows n in pieces of P0, P1, P2 columns (w0 stands in for an absent piece) and its
    bias in fp32 (zeros without one): everything it loads before waiting for its input."""
    w_rows = w_ptr + n[:, None].to(tl.int64) * sw_n
    w0 = _w_piece(w_rows, mn, 0, P0, K)
    w1, w2 = w0, w0
    if P1 > 0:
        w1 = _w_piece(w_rows, mn, P0, P1, K)
    if P2 > 0:
        w2 = _w_piece(w_rows, mn, P0 + P1, P2, K)
    bias = tl.zeros(n.shape, dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + n, mask=mn, other=0.0).to(tl.float32)
    return w0, w1, w2, bias


@triton.jit
def _v_piece(ptr, OFF: tl.constexpr, P: tl.constexpr, K: tl.constexpr):
    k = OFF + tl.arange(0, P)
    return tl.load(ptr + k, mask=k < K, other=0.0)


@triton.jit
def _normed(x, g, rstd, wdt: tl.constexpr):
    # the norm's output in the weight dtype (x is already rounded to it), rounding as the eager block does
    return ((x * rstd).to(wdt).to(tl.float32) * g.to(tl.float32)).to(wdt).to(tl.float32)


@triton.jit
def _norm_gemv_kernel(x_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, s_ptr, idx_ptr, cw_ptr, cb_ptr, N, I, sx_b, sw_n, sy_b,
                      ss_b, ss_i, ss_k, scw_i, scw_k, eps, D: tl.constexpr, HAS_BIAS: tl.constexpr,
                      CONV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HAS_CBIAS: tl.constexpr,
                      HAS_IDX: tl.constexpr, BLOCK_N: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
                      P2: tl.constexpr, PDL: tl.constexpr):
    # The program's whole weight tile (BLOCK_N rows, D = P0 + P1 + P2 columns) is loaded at once, so every load is
    # in flight together (waiting a DRAM latency per chunk streams at half the bandwidth), and before the input row
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = n < N
    wdt = nw_ptr.dtype.element_ty
    w0, w1, w2, bias = _w_tile(w_ptr, b_ptr, n, mn, sw_n, D, P0, P1, P2, HAS_BIAS)
    if CONV:
        mi = n < I
        kc = tl.arange(0, KP)[None, :]
        cw = tl.load(cw_ptr + n[:, None] * scw_i + kc * scw_k, mask=mi[:, None] & (kc < K), other=0.0)
        if HAS_CBIAS:
            cb = tl.load(cb_ptr + n, mask=mi, other=0.0).to(tl.float32)
    _grid_wait(PDL)
    x_row = x_ptr + b * sx_b
    if CONV:  # the conv step's state: its latency hides behind the products below
        slot = _slot(idx_ptr, b, HAS_IDX)
        s_rows = s_ptr + slot * ss_b + n[:, None] * ss_i
        shifted = tl.load(s_rows + (kc + 1) * ss_k, mask=mi[:, None] & (kc < K - 1), other=0.0)
    # the row's statistics (a few KB from L2, read by every program: cheaper than a launch to share them)
    x0 = _v_piece(x_row, 0, P0, D).to(wdt).to(tl.float32)
    ss = tl.sum(x0 * x0, axis=0)
    if P1 > 0:
        x1 = _v_piece(x_row, P0, P1, D).to(wdt).to(tl.float32)
        ss += tl.sum(x1 * x1, axis=0)
    if P2 > 0:
        x2 = _v_piece(x_row, P0 + P1, P2, D).to(wdt).to(tl.float32)
        ss += tl.sum(x2 * x2, axis=0)
    rstd = tl.rsqrt(ss / D + eps)
    y = tl.sum(w0.to(tl.float32) * _normed(x0, _v_piece(nw_ptr, 0, P0, D), rstd, wdt)[None, :], axis=1)
    if P1 > 0:
        y += tl.sum(w1.to(tl.float32) * _normed(x1, _v_piece(nw_ptr, P0, P1, D), rstd, wdt)[None, :], axis=1)
    if P2 > 0:
        y += tl.sum(w2.to(tl.float32) * _normed(x2, _v_piece(nw_ptr, P0 + P1, P2, D), rstd, wdt)[None, :], axis=1)
    if HAS_BIAS:
        y += bias
    y = y.to(w_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)  # rounded as the matmul's output
    if CONV:  # rows n < I are x: run them through the conv step (state shift, SiLU) and store xc in their place
        new = tl.where(kc == K - 1, y.to(tl.float32)[:, None], shifted.to(y.dtype).to(tl.float32))
        conv = tl.sum(new * cw.to(tl.float32), axis=1)
        if HAS_CBIAS:
            conv += cb
        tl.debug_barrier()  # every thread's read of the old state happened (above) before any write
        tl.store(s_rows + kc * ss_k, new, mask=mi[:, None] & (kc < K))
        y = tl.where(mi, (conv * tl.sigmoid(conv)).to(y.dtype), y)
    tl.store(y_ptr + b * sy_b + n, y, mask=mn)


@triton.jit
def _gemv_residual_kernel(x_ptr, w_ptr, b_ptr, r_ptr, N, sx_b, sw_n, sr_b, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
                          P2: tl.constexpr, PDL: tl.constexpr, ADD: tl.constexpr = True):
    # ADD: r += y rounded to the weight dtype (out_proj into the residual); else r = y in fp32 (x_proj, whose
    # consumer rounds it). The weight tile is loaded whole, before the input, as in _norm_gemv_kernel.
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = n < N
    w0, w1, w2, bias = _w_tile(w_ptr, b_ptr, n, mn, sw_n, K, P0, P1, P2, HAS_BIAS)
    _grid_wait(PDL)
    x_row = x_ptr + b * sx_b
    y = tl.sum(w0.to(tl.float32) * _v_piece(x_row, 0, P0, K).to(tl.float32)[None, :], axis=1)
    if P1 > 0:
        y += tl.sum(w1.to(tl.float32) * _v_piece(x_row, P0, P1, K).to(tl.float32)[None, :], axis=1)
    if P2 > 0:
        y += tl.sum(w2.to(tl.float32) * _v_piece(x_row, P0 + P1, P2, K).to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        y += bias
    r = r_ptr + b * sr_b + n
    if ADD:
        y = y.to(w_ptr.dtype.element_ty).to(tl.float32)  # the matmul's output in the weight dtype, then the fp32 add
        y += tl.load(r, mask=mn, other=0.0)
    tl.store(r, y, mask=mn)


def norm_gemv(x: torch.Tensor, norm_w: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
              config: tuple[int, int] | None = None, conv: tuple | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """linear(rms_norm(x), weight, bias) in one pass: x (B, D) fp32 -> (B, N) in weight's dtype (or out_dtype:
    the same values, rounded to weight's dtype first; fp32 logits without a conversion kernel after).

    Rounds as the eager block does: x to the weight dtype, the normalised row, then the scaled row.
    conv = (conv_state, conv_weight, conv_bias, idx): the first I = conv_weight.shape[0] outputs are in_proj's x
    half; they go through the conv step in the epilogue (conv_state (B, I, K) fp32, or with idx (B,) a pool
    (S, I, K), shifted in place) and come out as silu(conv(x)), what conv1d_step would return: one launch less.
    """
    bsz, dim = x.shape
    out_dim = weight.shape[0]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == dim
    block_n, warps = config or (GEMV_IN_CONFIG if x.is_cuda else INTERPRETER_GEMV_CONFIG)
    y = torch.empty(bsz, out_dim, dtype=out_dtype or weight.dtype, device=x.device)
    if conv is None:
        state, cw, cb, idx, n_conv, k = y, weight, None, None, 0, 1
        strides = (0, 0, 0, 0, 0)
    else:
        state, cw, cb, idx = conv
        n_conv, k = cw.shape
        strides = (*state.stride(), *cw.stride())
    p0, p1, p2 = _pieces(dim)
    _launch(_norm_gemv_kernel, (bsz, triton.cdiv(out_dim, block_n)),
            x, norm_w, weight, weight if bias is None else bias, y, state, x if idx is None else idx, cw,
            cw if cb is None else cb, out_dim, n_conv, x.stride(0), weight.stride(0), y.stride(0), *strides, eps,
            D=dim, HAS_BIAS=bias is not None, CONV=conv is not None, K=k, KP=triton.next_power_of_2(k),
            HAS_CBIAS=cb is not None, HAS_IDX=idx is not None, BLOCK_N=block_n, P0=p0, P1=p1, P2=p2,
            num_warps=warps, pdl=_pdl(x.device), name="norm_gemv")
    return y


def gemv_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                  config: tuple[int, int] | None = None) -> torch.Tensor:
    """residual += linear(x, weight, bias) rounded to weight's dtype: x (B, K), residual (B, N) fp32, in place."""
    bsz, k = x.shape
    out_dim = weight.shape[0]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and residual.stride(1) == 1 and weight.shape[1] == k
    assert residual.dtype == torch.float32 and tuple(residual.shape) == (bsz, out_dim)
    block_n, warps = config or (GEMV_OUT_CONFIG if x.is_cuda else INTERPRETER_GEMV_CONFIG)
    p0, p1, p2 = _pieces(k)
    _launch(_gemv_residual_kernel, (bsz, triton.cdiv(out_dim, block_n)),
            x, weight, weight if bias is None else bias, residual, out_dim, x.stride(0), weight.stride(0),
            residual.stride(0), K=k, HAS_BIAS=bias is not None, BLOCK_N=block_n, P0=p0, P1=p1, P2=p2,
            num_warps=warps, pdl=_pdl(x.device), name="gemv_residual")
    return residual


ARGMAX_BLOCK = 1024  # logits a program of argmax_rows' first pass takes (50280 for GPT-NeoX's vocabulary: 50)


@triton.jit
def _argmax_part_kernel(x_ptr, v_ptr, i_ptr, N, sx_b, P, BLOCK: tl.constexpr):
    """The largest of a row's BLOCK values at program p's place and its first index (NaN counts as largest)."""
    b, p = tl.program_id(0), tl.program_id(1)
    n = p * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + b * sx_b + n, mask=n < N, other=float("-inf")).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)
    m = tl.max(v, axis=0)
    tl.store(v_ptr + b * P + p, m)
    tl.store(i_ptr + b * P + p, tl.min(tl.where(v == m, n, N), axis=0))


@triton.jit
def _argmax_final_kernel(v_ptr, i_ptr, out_ptr, P, PB: tl.constexpr):
    b = tl.program_id(0)
    p = tl.arange(0, PB)
    v = tl.load(v_ptr + b * P + p, mask=p < P, other=float("-inf"))
    idx = tl.load(i_ptr + b * P + p, mask=p < P, other=0)
    m = tl.max(v, axis=0)
    tl.store(out_ptr + b, tl.min(tl.where((v == m) & (p < P), idx, 2147483647), axis=0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """The greedy pick: x (B, N) -> (B, 1) int64, the first index of each row's largest value (torch.argmax's
    answer; a NaN counts as +inf). Two small launches, where torch's one-block reduction over a vocabulary's
    50280 logits takes ~14 us on an H100."""
    bsz, n = x.shape
    assert x.stride(1) == 1
    parts = triton.cdiv(n, ARGMAX_BLOCK)
    v = torch.empty(bsz, parts, dtype=torch.float32, device=x.device)
    i = torch.empty(bsz, parts, dtype=torch.int32, device=x.device)
    out = torch.empty(bsz, 1, dtype=torch.int64, device=x.device)
    _argmax_part_kernel[(bsz, parts)](x, v, i, n, x.stride(0), parts, BLOCK=ARGMAX_BLOCK, num_warps=4)
    _argmax_final_kernel[(bsz,)](v, i, out, parts, PB=triton.next_power_of_2(parts), num_warps=1)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int] | None = None) -> torch.Tensor:
    """linear(x, weight) for a few rows, unrounded: x (B, K) -> (B, N) fp32 (x_proj of the decode step)."""
    bsz, k = x.shape
    out_dim = weight.shape[0]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == k
    block_n, warps = config or (GEMV_XPROJ_CONFIG if x.is_cuda else INTERPRETER_GEMV_CONFIG)
    y = torch.empty(bsz, out_dim, dtype=torch.float32, device=x.device)
    p0, p1, p2 = _pieces(k)
    _launch(_gemv_residual_kernel, (bsz, triton.cdiv(out_dim, block_n)),
            x, weight, weight, y, out_dim, x.stride(0), weight.stride(0), y.stride(0), K=k, HAS_BIAS=False,
            BLOCK_N=block_n, P0=p0, P1=p1, P2=p2, ADD=False, num_warps=warps, pdl=_pdl(x.device), name="gemv")
    return y


@triton.jit
def _conv_xproj_kernel(x_ptr, s_ptr, idx_ptr, cw_ptr, cb_ptr, wx_ptr, xc_ptr, p_ptr, I, J: tl.constexpr,
                       sx_b, sx_i, ss_b, ss_i, ss_k, sw_i, sw_k, swx_j, swx_i, sxc_b, sp_b, sp_p,
                       K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
                       BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr):
    # One token: conv + SiLU for BLOCK_I channels, the shift of their conv state, then their share of x_proj,
    # x_proj[:, i-block] . xc[i-block], written as a partial sum (B, P, J) that the SSM step adds up. Splitting
    # x_proj over channels instead of over its R + 2N outputs gives enough programs to stream its weight.
    pid_i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slot = _slot(idx_ptr, b, HAS_IDX)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = i < I
    s_rows = s_ptr + slot * ss_b + i[:, None] * ss_i
    new, xc = _conv_tap(x_ptr + b * sx_b + i * sx_i, s_rows, cw_ptr, cb_ptr, i, mi, sw_i, sw_k, ss_k, K, KP, HAS_BIAS)
    kk = tl.arange(0, KP)[None, :]
    tl.debug_barrier()  # the shifted read in _conv_tap overlaps other threads' writes below
    tl.store(s_rows + kk * ss_k, new, mask=mi[:, None] & (kk < K))
    tl.store(xc_ptr + b * sxc_b + i, xc.to(xc_ptr.dtype.element_ty), mask=mi)
    for j0 in tl.static_range(0, J, BLOCK_J):  # unrolled: all of the x_proj tile's loads in flight at once
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < J
        w = tl.load(wx_ptr + j[:, None] * swx_j + i[None, :] * swx_i, mask=mj[:, None] & mi[None, :], other=0.0)
        tl.store(p_ptr + b * sp_b + pid_i * sp_p + j, tl.sum(w.to(tl.float32) * xc[None, :], axis=1), mask=mj)



def conv_xproj(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               x_proj: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: xc = silu(conv(x)) (B, I) in x's dtype, shifting conv_state, and x_proj(xc) as partial sums.

    x: (B, I); conv_state (B, I, K) fp32 or with idx a pool (S, I, K); weight (I, K); x_proj: (R + 2N, I).
    Returns xc and partials (B, P, R + 2N) fp32 whose sum over P is x_proj(xc); ssm_decode adds them up.
    """
    bsz, dim = x.shape
    k, out_dim = weight.shape[-1], x_proj.shape[0]
    # wider channel blocks on wide models: fewer partial sums for every ssm_decode program to add up
    block_i, block_j, warps = (32, 64, 4) if dim <= 2048 else (128, 64, 8)
    n_part = triton.cdiv(dim, block_i)
    xc = torch.empty(bsz, dim, dtype=x.dtype, device=x.device)
    partials = torch.empty(bsz, n_part, out_dim, dtype=torch.float32, device=x.device)
    _conv_xproj_kernel[(n_part, bsz)](
        x, conv_state, x if idx is None else idx, weight, weight if bias is None else bias, x_proj, xc, partials,
        dim, out_dim, *x.stride(), *conv_state.stride(), *weight.stride(), *x_proj.stride(), xc.stride(0),
        partials.stride(0), partials.stride(1), K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None,
        HAS_IDX=idx is not None, BLOCK_J=block_j, BLOCK_I=block_i, num_warps=warps)
    return xc, partials



@triton.jit
def _ssm_decode_kernel(xc_ptr, p_ptr, wdt_ptr, z_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, idx_ptr, y_ptr, I, N, R,
                       sxc_b, sp_b, sp_p, sw_i, sw_r, sz_b, sz_i, sh_b, sh_i, sh_n, sy_b, sy_i, P: tl.constexpr,
                       HAS_IDX: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr, PDL: tl.constexpr, STATE_EARLY: tl.constexpr):
    # The decode graph's SSM step: add up x_proj's partial sums into dt_low, B and C (rounded to the weight dtype
    # as a matmul's output would be), dt_proj for this block of channels, then the state update and the gate.
    # STATE_EARLY: the slot index and the state rows are read before the wait too (see ssm_decode).
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    mi, mn, mr = i < I, n < N, r < R
    w = tl.load(wdt_ptr + i[:, None] * sw_i + r[None, :] * sw_r, mask=mi[:, None] & mr[None, :], other=0.0)
    bias = tl.load(bias_ptr + i, mask=mi, other=0.0)
    A, Dv = _load_a_d(a_ptr, d_ptr, i, n, mi, mn, N)
    if STATE_EARLY:
        h_ptrs = h_ptr + _slot(idx_ptr, b, HAS_IDX) * sh_b + i[:, None] * sh_i + n[None, :] * sh_n
        h = tl.load(h_ptrs, mask=mi[:, None] & mn[None, :], other=0.0)
    _grid_wait(PDL)
    if not STATE_EARLY:
        h_ptrs = h_ptr + _slot(idx_ptr, b, HAS_IDX) * sh_b + i[:, None] * sh_i + n[None, :] * sh_n
        h = tl.load(h_ptrs, mask=mi[:, None] & mn[None, :], other=0.0)
    acc_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in tl.static_range(0, P, BLOCK_P):  # unrolled: the partial sums' loads go out together
        p = p0 + tl.arange(0, BLOCK_P)
        rows = p_ptr + b * sp_b + p[:, None] * sp_p
        mp = (p < P)[:, None]
        acc_r += tl.sum(tl.load(rows + r[None, :], mask=mp & mr[None, :], other=0.0), axis=0)
        acc_b += tl.sum(tl.load(rows + R + n[None, :], mask=mp & mn[None, :], other=0.0), axis=0)
        acc_c += tl.sum(tl.load(rows + R + N + n[None, :], mask=mp & mn[None, :], other=0.0), axis=0)
    xdt = xc_ptr.dtype.element_ty
    u = tl.load(xc_ptr + b * sxc_b + i, mask=mi, other=0.0).to(tl.float32)
    dlow = acc_r.to(xdt).to(tl.float32)
    dl = tl.sum(w.to(tl.float32) * dlow[None, :], axis=1).to(w.dtype).to(tl.float32)
    z = tl.load(z_ptr + b * sz_b + i * sz_i, mask=mi, other=0.0).to(tl.float32)
    y = _ssm_state_update(u, dl, bias, A, Dv, acc_b.to(xdt).to(tl.float32), acc_c.to(xdt).to(tl.float32), z, h,
                          h_ptrs, mi, mn)
    tl.store(y_ptr + b * sy_b + i * sy_i, y.to(y_ptr.dtype.element_ty), mask=mi)


def ssm_decode(xc: torch.Tensor, partials: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor,
               D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor,
               idx: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
               config: tuple[int, int] | None = None, state_early: bool = False) -> torch.Tensor:
    """The decode graph's SSM step after conv_xproj: xc (B, I), partials (B, P, R + 2N) -> y (B, I) in out_dtype.

    dt_weight: (I, R); z: (B, I); ssm_state (B, I, N) fp32, or with idx (B,) a pool (S, I, N) addressed by idx[b].
    state_early (with PDL): read idx and the state before waiting for the previous kernel, off the critical path.
    Only for a caller that guarantees that no kernel still running can write them: GraphDecoder's step writes a
    slot's state once, and each step starts with a copy, which is not PDL-launched and so waits for all before it.
    """
    bsz, dim = xc.shape
    nst, rank, n_part = A.shape[1], dt_weight.shape[1], partials.shape[1]
    y = torch.empty(bsz, dim, dtype=out_dtype, device=xc.device)
    block_i, warps = config or SSM_DECODE_CONFIG or ((16, 1) if bsz == 1 else (32, 1))
    if n_part > 16:
        warps = max(warps, 4)  # many partial sums to add up
    _launch(_ssm_decode_kernel, (triton.cdiv(dim, block_i), bsz),
            xc, partials, dt_weight, z, A, D, delta_bias, ssm_state, xc if idx is None else idx, y, dim, nst, rank,
            xc.stride(0), partials.stride(0), partials.stride(1), *dt_weight.stride(), *z.stride(),
            *ssm_state.stride(), *y.stride(), P=n_part, HAS_IDX=idx is not None, BLOCK_I=block_i,
            BLOCK_N=triton.next_power_of_2(nst), BLOCK_R=triton.next_power_of_2(rank), BLOCK_P=16, num_warps=warps,
            STATE_EARLY=state_early, pdl=_pdl(xc.device), name="ssm_decode")
    return y


