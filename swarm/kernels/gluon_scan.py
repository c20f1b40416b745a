"""The prefill's selective scan as a Gluon kernel (Hopper): triton_scan's "seq" scan with its register layout chosen.

triton_scan._scan_seq_kernel leaves the layout of its (BLOCK_I, BLOCK_N) state to Triton, which gives each thread
one state lane of 16 channels: C . h then costs four shuffles and four adds per state element and token (SASS of
the second pass: 20 instructions an element, 4 of them SHFL). Here each thread holds BLOCK_N / 4 state lanes of
BLOCK_I / 8 channels, so that C . h is a chain of FMAs in the thread and two shuffles over the 4 lanes of a
channel. The per-channel operands of a token (dt, dt u) and the per-state ones (B, C) come from shared memory,
where a turn of TT tokens puts them once, computed on tiles that give every (channel, token) to one thread.

Same arguments, segments and modes as _scan_seq_kernel (its comment says what MODE 0 / 1 / 2 and HAS_LEN do), and
its softplus, gate and PDL wait; triton_scan.selective_scan runs this kernel for a "gluon" config. Half the
instructions, the same time on an H100: both kernels are latency-bound at 10-13 warps an SM (ncu: issue 48-60% and
MUFU 56-71% of peak, most stalls waits on fixed-latency results and on loads), so "seq" stays the default
(triton_scan.SCAN_GLUON); docs/PERFORMANCE.md (fourteenth session) has the runs.
"""

from __future__ import annotations

from swarm.kernels.triton_scan import _grid_wait, _silu_rcp, _softplus_poly

try:  # Gluon is experimental: without it (or with another API), triton_scan keeps its own kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - any failure means "not here"
    _IMPORT_ERROR = e


def available() -> bool:
    """Whether Gluon imported (the caller checks the device: Hopper)."""
    return _IMPORT_ERROR is None


if _IMPORT_ERROR is None:
    @gluon.jit
    def _turn(p_u, p_dl, p_z, p_b, p_c, t0, t_hi, tt_d, tt_b, su_t, sd_t, sz_t, sb_t, sc_t, mi_d, mn_b,
              OFF64: gl.constexpr, MODE: gl.constexpr):
        """A turn's raw tiles from token t0: u, delta, z (TT, BLOCK_I) and B, C (TT, BLOCK_N), as stored. Tokens
        past t_hi read token t_hi - 1 (dt is 0 there: the state stays, and their y is not stored); MODE 1 needs no
        z or C (u and B stand in)."""
        tc_d = gl.minimum(t0 + tt_d, t_hi - 1)
        tc_b = gl.minimum(t0 + tt_b, t_hi - 1)
        if OFF64:  # T times a token stride can pass 2**31
            tc_d = tc_d.to(gl.int64)
            tc_b = tc_b.to(gl.int64)
        u = gl.load(p_u + tc_d * su_t, mask=mi_d, other=0.0)
        dl = gl.load(p_dl + tc_d * sd_t, mask=mi_d, other=0.0)
        bt = gl.load(p_b + tc_b * sb_t, mask=mn_b, other=0.0)
        if MODE == 1:
            return u, dl, u, bt, bt
        return u, dl, gl.load(p_z + tc_d * sz_t, mask=mi_d, other=0.0), bt, gl.load(p_c + tc_b * sc_t, mask=mn_b,
                                                                                 other=0.0)

    @gluon.jit
    def _scan_kernel(u_ptr, dl_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, y_ptr, hs_ptr, ds_ptr,
                     len_ptr, T, I, N, SEG, NSEG,
                     su_b, su_i, su_t, sd_b, sd_i, sd_t, sz_b, sz_i, sz_t,
                     sb_b, sb_t, sb_n, sc_b, sc_t, sc_n, sh_b, sh_i, sh_n, sy_b, sy_i, sy_t,
                     MODE: gl.constexpr, HAS_LEN: gl.constexpr, BLOCK_I: gl.constexpr, BLOCK_N: gl.constexpr,
                     TT: gl.constexpr, OFF64: gl.constexpr, PDL: gl.constexpr):
        # the state: each thread BLOCK_I / 8 channels x BLOCK_N / 4 states; 8 lanes along channels, 4 along states
        L: gl.constexpr = gl.BlockedLayout([BLOCK_I // 8, BLOCK_N // 4], [8, 4], [1, 1], [1, 0])
        LI: gl.constexpr = gl.SliceLayout(1, L)  # (BLOCK_I,): a channel's value on its 4 state lanes
        LN: gl.constexpr = gl.SliceLayout(0, L)  # (BLOCK_N,)
        # (TT, BLOCK_I) tiles, one (token, channel) a thread and register, channels across the lanes (coalesced)
        CI: gl.constexpr = BLOCK_I if BLOCK_I < 32 else 32
        DL: gl.constexpr = gl.BlockedLayout([1, BLOCK_I // CI], [32 // CI, CI], [1, 1], [1, 0])
        DT: gl.constexpr = gl.SliceLayout(1, DL)  # (TT,)
        DI: gl.constexpr = gl.SliceLayout(0, DL)  # (BLOCK_I,)
        # (TT, BLOCK_N) tiles of B and C
        NB: gl.constexpr = BLOCK_N if BLOCK_N < 32 else 32
        BL: gl.constexpr = gl.BlockedLayout([1, BLOCK_N // NB], [32 // NB, NB], [1, 1], [1, 0])
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])  # whole tiles in
        ROW: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # the same memory, a token's row out

        _grid_wait(PDL)
        if HAS_LEN:
            T = gl.load(len_ptr).to(gl.int32)
        i0 = gl.program_id(0) * BLOCK_I
        b = gl.program_id(1).to(gl.int64)
        seg = gl.program_id(2)
        n_seg = NSEG  # not num_programs: MODE 1 runs one segment fewer

        i_l = i0 + gl.arange(0, BLOCK_I, layout=LI)
        n_l = gl.arange(0, BLOCK_N, layout=LN)
        m_l = (i_l < I)[:, None] & (n_l < N)[None, :]
        # (BI, BN), A log2(e): exp(x) = exp2(x log2 e)
        a2 = gl.load(a_ptr + i_l[:, None] * N + n_l[None, :], mask=m_l, other=0.0) * 1.4426950408889634
        h_ptrs = h_ptr + b * sh_b + i_l[:, None] * sh_i + n_l[None, :] * sh_n
        hs_row = hs_ptr + ((b * n_seg) * I + i_l[:, None]) * N + n_l[None, :]  # + s * I * N: segment s
        ds_row = ds_ptr + (b * n_seg) * I + i_l  # + s * I
        h0_row = hs_row + (n_seg - 1) * I * N
        if MODE == 1:
            if seg == 0:
                gl.store(h0_row, gl.load(h_ptrs, mask=m_l, other=0.0), mask=m_l)
            h = gl.zeros([BLOCK_I, BLOCK_N], gl.float32, layout=L)
        elif MODE == 2:
            h = gl.load(h0_row, mask=m_l, other=0.0)
            for s in range(0, seg):
                dsum_s = gl.load(ds_row + s * I, mask=i_l < I, other=0.0)
                h = gl.exp2(a2 * dsum_s[:, None]) * h + gl.load(hs_row + s * I * N, mask=m_l, other=0.0)
        else:
            h = gl.load(h_ptrs, mask=m_l, other=0.0)

        i_d = i0 + gl.arange(0, BLOCK_I, layout=DI)
        mi_d = (i_d < I)[None, :]
        d_skip = gl.load(d_ptr + i_d, mask=i_d < I, other=0.0)[None, :]
        bias = gl.load(bias_ptr + i_d, mask=i_d < I, other=0.0)[None, :]
        p_u = u_ptr + b * su_b + i_d[None, :] * su_i
        p_dl = dl_ptr + b * sd_b + i_d[None, :] * sd_i
        p_z = z_ptr + b * sz_b + i_d[None, :] * sz_i
        p_y = y_ptr + b * sy_b + i_d[None, :] * sy_i
        n_b = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, BL))[None, :]
        p_b = bm_ptr + b * sb_b + n_b * sb_n
        p_c = cm_ptr + b * sc_b + n_b * sc_n
        tt_d = gl.arange(0, TT, layout=DT)[:, None]
        tt_b = gl.arange(0, TT, layout=gl.SliceLayout(1, BL))[:, None]

        dt_s = gl.allocate_shared_memory(gl.float32, [TT, BLOCK_I], SH)
        du_s = gl.allocate_shared_memory(gl.float32, [TT, BLOCK_I], SH)
        b_s = gl.allocate_shared_memory(gl.float32, [TT, BLOCK_N], SH)
        c_s = gl.allocate_shared_memory(gl.float32, [TT, BLOCK_N], SH)
        y_s = gl.allocate_shared_memory(gl.float32, [TT, BLOCK_I], SH)
        dt_r = dt_s._reinterpret(gl.float32, [TT, BLOCK_I], ROW)
        du_r = du_s._reinterpret(gl.float32, [TT, BLOCK_I], ROW)
        b_r = b_s._reinterpret(gl.float32, [TT, BLOCK_N], ROW)
        c_r = c_s._reinterpret(gl.float32, [TT, BLOCK_N], ROW)
        y_r = y_s._reinterpret(gl.float32, [TT, BLOCK_I], ROW)

        t_lo = seg * SEG
        t_hi = gl.minimum(t_lo + SEG, T)
        dsum = gl.zeros([1, BLOCK_I], gl.float32, layout=DL)
        for t0 in range(t_lo, t_hi, TT):
            u_t, dl_t, z_t, b_t, c_t = _turn(p_u, p_dl, p_z, p_b, p_c, t0, t_hi, tt_d, tt_b, su_t, sd_t, sz_t, sb_t,
                                             sc_t, mi_d, n_b < N, OFF64, MODE)
            t_d = t0 + tt_d
            u = u_t.to(gl.float32)  # (TT, BI)
            dl = dl_t.to(gl.float32) + bias
            bt = b_t.to(gl.float32)  # (TT, BN)
            dt = gl.where((t_d < t_hi) & mi_d, _softplus_poly(dl, True), 0.0)
            if MODE == 1:
                dsum += gl.sum(dt, axis=0)[None, :]
            gl.thread_barrier()  # the last turn's reads of the shared tiles are done
            dt_s.store(dt)
            du_s.store(dt * u)
            b_s.store(bt)
            if MODE != 1:
                c_s.store(c_t.to(gl.float32))
            gl.thread_barrier()
            for j in gl.static_range(TT):
                dtj = dt_r.index(j).load(LI)[:, None]  # (BI, 1)
                duj = du_r.index(j).load(LI)[:, None]
                h = gl.exp2(dtj * a2) * h + duj * b_r.index(j).load(LN)[None, :]
                if MODE != 1:
                    y_r.index(j).store(gl.sum(h * c_r.index(j).load(LN)[None, :], axis=1))
            if MODE != 1:
                gl.thread_barrier()
                y = (y_s.load(DL) + d_skip * u) * _silu_rcp(z_t.to(gl.float32), True)
                t_y = t_d.to(gl.int64) if OFF64 else t_d
                gl.store(p_y + t_y * sy_t, y.to(y_ptr.dtype.element_ty), mask=(t_d < t_hi) & mi_d)
        if MODE == 0:
            gl.store(h_ptrs, h, mask=m_l)
        elif MODE == 1:
            gl.store(hs_row + seg * I * N, h, mask=m_l)
            gl.store(ds_ptr + (b * n_seg + seg) * I + i_d[None, :], dsum, mask=mi_d)
        elif seg == n_seg - 1:
            gl.store(h_ptrs, h, mask=m_l)
