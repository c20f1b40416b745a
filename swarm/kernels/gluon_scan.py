"""The prefill's selective scan as Gluon kernels (Hopper): _scan_kernel, triton_scan's "seq" scan with its register
layout chosen, and _lane_scan_kernel, one state element a thread and one pass (its section below says why).

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

from swarm.kernels.triton_scan import _combine, _grid_wait, _silu_rcp, _softplus_poly

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


# ---------------------------------------------------------------- the lane scan: one state element a thread
#
# The kernel above gives a thread 16 state elements (4 channels x 4 states) and runs two passes over segments of
# the tokens, because 2.8b's 81920 (channel, state) recurrences make only 5120 such threads: the second pass
# recomputes every exp2 of the first. Here a thread holds ONE state element, so the 81920 recurrences are 2560
# warps (19 an SM on an H100) and the whole sequence runs in one pass (segments stay possible for narrow models):
# half the exp2s, and 2 state registers (h, A) instead of 32. A turn's TT tokens sit in the thread's registers
# along the tile's first axis: the recurrence over them is an in-thread associative scan (no shuffles), and C . h,
# a sum over the 16 state lanes, is one layout change through shared memory (tokens move onto lanes, states into
# registers) and 15 adds in the thread, instead of four shuffle levels per token. CPT > 1 gives a thread CPT
# channels of its state (more independent work a warp, fewer warps).
#
# Measured on an H100 (docs/PERFORMANCE.md, fifteenth session): correct, and slower than the two-pass scans at
# every width. The scan alone at 2.8b's width, 2048 tokens: 294 us at one channel a thread, 189 at 2 channels with
# the loads a turn ahead, against 166 for "seq" and 163 for the Gluon two-pass kernel. ncu: issue 28% busy, under
# one eligible warp a scheduler: a warp's turn is a long chain (loads, softplus, three layout changes, exp2, the
# scan, the sum), and the warps an SM are too few to hide it. triton_scan.SCAN_LANE stays off.

if _IMPORT_ERROR is None:
    @gluon.jit
    def _last(a, b):
        return b

    @gluon.jit
    def _lane_turn(h, dacc, u_t, dl_t, z_t, b_t, c_t, p_y, t0, t_hi, t_y, t_3, sy_t, m_y, a2, d_skip, bias,
                   TL: gl.constexpr, NL: gl.constexpr, R3: gl.constexpr, YL: gl.constexpr, FULL: gl.constexpr,
                   OFF64: gl.constexpr, MODE: gl.constexpr):
        """TT tokens from t0 on the state h (BLOCK_I, BLOCK_N), from their raw tiles (_turn); returns h and
        dacc (MODE 1: + each token's dt). FULL: all TT tokens are below t_hi; otherwise those past it get dt = 0
        (the state stays) and their y is not stored."""
        u = u_t.to(gl.float32)
        m_t = m_y if FULL else m_y & (t0 + t_y < t_hi)
        dt = gl.where(m_t, _softplus_poly(dl_t.to(gl.float32) + bias, True), 0.0)  # (TT, BI)
        if MODE == 1:
            dacc += dt
        # B and C were loaded as whole rows (a vector a thread, the warps sharing the tile); they go to every
        # channel lane through shared memory, as dt and dt u go to every state lane
        b3 = gl.convert_layout(b_t.to(gl.float32), NL)[:, None, :]
        dt3 = gl.convert_layout(dt, TL)[:, :, None]  # (TT, BI, 1)
        du3 = gl.convert_layout(dt * u, TL)[:, :, None]
        da = gl.exp2(dt3 * a2[None, :, :])  # (TT, BI, BN)
        # the recurrence h_j = da_j h_{j-1} + dt_j u_j B_j over the thread's tokens, h folded into the first
        db = du3 * b3
        db = gl.where(t_3 == 0, da * h[None, :, :] + db, db)
        _, hs = gl.associative_scan((da, db), 0, _combine)  # the state after each token of the turn
        h = gl.reduce(hs, 0, _last)
        if MODE != 1:
            c3 = gl.convert_layout(c_t.to(gl.float32), NL)[:, None, :]
            yc = gl.convert_layout(hs * c3, R3)  # tokens onto the lanes, the states into the thread
            y = (gl.convert_layout(gl.sum(yc, axis=2), YL) + d_skip * u) * _silu_rcp(z_t.to(gl.float32), True)
            ty = t0 + t_y
            if OFF64:
                ty = ty.to(gl.int64)
            gl.store(p_y + ty * sy_t, y.to(p_y.dtype.element_ty), mask=m_t)
        return h, dacc

    @gluon.jit
    def _lane_scan_kernel(u_ptr, dl_ptr, z_ptr, bm_ptr, cm_ptr, a_ptr, d_ptr, bias_ptr, h_ptr, y_ptr, hs_ptr, ds_ptr,
                          len_ptr, T, I, N: gl.constexpr, SEG, NSEG,
                          su_b, su_i, su_t, sd_b, sd_i, sd_t, sz_b, sz_i, sz_t,
                          sb_b, sb_t: gl.constexpr, sb_n, sc_b, sc_t: gl.constexpr, sc_n, sh_b, sh_i, sh_n,
                          sy_b, sy_i, sy_t,
                          MODE: gl.constexpr, HAS_LEN: gl.constexpr, BLOCK_I: gl.constexpr, BLOCK_N: gl.constexpr,
                          TT: gl.constexpr, OFF64: gl.constexpr, PDL: gl.constexpr, CPT: gl.constexpr = 1,
                          AHEAD: gl.constexpr = False):
        # Same arguments, segments and modes as _scan_kernel, but the state width N and B and C's token strides are
        # compile-time constants (B and C's rows then load as unmasked 16-byte vectors where aligned). A program is
        # num_warps warps; a warp holds CPT x 32 // BLOCK_N channels x BLOCK_N states (BLOCK_N <= 32), CPT channels
        # of one state a lane. AHEAD: each turn's tiles are loaded a turn early.
        NW: gl.constexpr = gl.num_warps()
        CW: gl.constexpr = 32 // BLOCK_N  # channels a warp
        gl.static_assert(BLOCK_I == CPT * CW * NW, "BLOCK_I is CPT x (32 // BLOCK_N) x num_warps")
        # (TT, BLOCK_I, BLOCK_N): a thread holds TT tokens of CPT (channel, state) elements
        L3: gl.constexpr = gl.BlockedLayout([TT, CPT, 1], [1, CW, BLOCK_N], [1, NW, 1], [2, 1, 0])
        HL: gl.constexpr = gl.SliceLayout(0, L3)  # (BLOCK_I, BLOCK_N): the state
        TL: gl.constexpr = gl.SliceLayout(2, L3)  # (TT, BLOCK_I): dt, dt u on every state lane
        NL: gl.constexpr = gl.SliceLayout(1, L3)  # (TT, BLOCK_N): B, C on every channel lane
        # the same tile with the tokens on the lanes and the states in a thread: C . h sums in the thread
        TW: gl.constexpr = 32 // CW if TT >= 32 // CW else TT  # token lanes
        NR: gl.constexpr = 32 // (TW * CW)  # state lanes (where TT is short)
        R3: gl.constexpr = gl.BlockedLayout([1, CPT, BLOCK_N // NR], [TW, CW, NR], [1, NW, 1], [2, 1, 0])
        # (TT, BLOCK_I) tiles of u, delta, z and y, and their per-(token, channel) maths: lanes along the channels
        # (the program's), then tokens, warps along tokens; a warp's load then touches 32 // BLOCK_I token rows,
        # not all TT of them (ncu: with the tokens on the lanes, L1 was 78% busy on those rows' wavefronts)
        LC: gl.constexpr = BLOCK_I if BLOCK_I < 32 else 32
        YL: gl.constexpr = gl.BlockedLayout([1, 1], [32 // LC, LC], [NW, 1], [1, 0])

        _grid_wait(PDL)
        if HAS_LEN:
            T = gl.load(len_ptr).to(gl.int32)
        i0 = gl.program_id(0) * BLOCK_I
        b = gl.program_id(1).to(gl.int64)
        seg = gl.program_id(2)
        n_seg = NSEG  # not num_programs: MODE 1 runs one segment fewer

        i_h = i0 + gl.arange(0, BLOCK_I, layout=gl.SliceLayout(1, HL))[:, None]
        n_h = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, HL))[None, :]
        m_h = (i_h < I) & (n_h < N)
        a2 = gl.load(a_ptr + i_h * N + n_h, mask=m_h, other=0.0) * 1.4426950408889634  # exp(x) = exp2(x log2 e)
        h_ptrs = h_ptr + b * sh_b + i_h * sh_i + n_h * sh_n
        hs_row = hs_ptr + ((b * n_seg) * I + i_h) * N + n_h  # + s * I * N: segment s
        h0_row = hs_row + (n_seg - 1) * I * N
        if MODE == 1:
            if seg == 0:
                gl.store(h0_row, gl.load(h_ptrs, mask=m_h, other=0.0), mask=m_h)
            h = gl.zeros([BLOCK_I, BLOCK_N], gl.float32, layout=HL)
        elif MODE == 2:
            h = gl.load(h0_row, mask=m_h, other=0.0)
            i_s = i0 + gl.arange(0, BLOCK_I, layout=gl.SliceLayout(1, HL))
            for s in range(0, seg):
                ds = gl.load(ds_ptr + (b * n_seg + s) * I + i_s, mask=i_s < I, other=0.0)
                h = gl.exp2(a2 * ds[:, None]) * h + gl.load(hs_row + s * I * N, mask=m_h, other=0.0)
        else:
            h = gl.load(h_ptrs, mask=m_h, other=0.0)

        i_y = i0 + gl.arange(0, BLOCK_I, layout=gl.SliceLayout(0, YL))[None, :]
        t_y = gl.arange(0, TT, layout=gl.SliceLayout(1, YL))[:, None]
        m_y = i_y < I
        d_skip = gl.load(d_ptr + i_y, mask=m_y, other=0.0)
        bias = gl.load(bias_ptr + i_y, mask=m_y, other=0.0)
        p_u = u_ptr + b * su_b + i_y * su_i
        p_dl = dl_ptr + b * sd_b + i_y * sd_i
        p_z = z_ptr + b * sz_b + i_y * sz_i
        p_y = y_ptr + b * sy_b + i_y * sy_i
        # (TT, BLOCK_N) rows of B and C as loaded: VB-element vectors, lanes along the states, then tokens and warps
        VB: gl.constexpr = 8 if BLOCK_N >= 8 else BLOCK_N
        BW: gl.constexpr = BLOCK_N // VB if BLOCK_N // VB < 32 else 32
        BL: gl.constexpr = gl.BlockedLayout([1, VB], [32 // BW, BW], [NW, 1], [1, 0])
        n_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, BL))[None, :]
        t_n = gl.arange(0, TT, layout=gl.SliceLayout(1, BL))[:, None]
        m_n = n_n < N
        p_b = bm_ptr + b * sb_b + n_n * sb_n
        p_c = cm_ptr + b * sc_b + n_n * sc_n
        t_3 = gl.arange(0, TT, layout=gl.SliceLayout(1, TL))[:, None, None]

        t_lo = seg * SEG
        t_hi = gl.minimum(t_lo + SEG, T)
        t_full = t_lo + gl.maximum(t_hi - t_lo, 0) // TT * TT  # segments past a device-side length: none
        dacc = gl.zeros([TT, BLOCK_I], gl.float32, layout=YL)
        if AHEAD:  # each turn's tiles are loaded during the turn before: their latency hides behind its maths
            nxt = _turn(p_u, p_dl, p_z, p_b, p_c, t_lo, t_hi, t_y, t_n, su_t, sd_t, sz_t, sb_t, sc_t, m_y, m_n,
                        OFF64, MODE)
        for t0 in range(t_lo, t_full, TT):
            if AHEAD:
                cur = nxt
                nxt = _turn(p_u, p_dl, p_z, p_b, p_c, t0 + TT, t_hi, t_y, t_n, su_t, sd_t, sz_t, sb_t, sc_t, m_y,
                            m_n, OFF64, MODE)
            else:
                cur = _turn(p_u, p_dl, p_z, p_b, p_c, t0, t_hi, t_y, t_n, su_t, sd_t, sz_t, sb_t, sc_t, m_y, m_n,
                            OFF64, MODE)
            h, dacc = _lane_turn(h, dacc, cur[0], cur[1], cur[2], cur[3], cur[4], p_y, t0, t_hi, t_y, t_3, sy_t, m_y,
                                 a2, d_skip, bias, TL, NL, R3, YL, True, OFF64, MODE)
        if t_full < t_hi:
            if AHEAD:
                cur = nxt
            else:
                cur = _turn(p_u, p_dl, p_z, p_b, p_c, t_full, t_hi, t_y, t_n, su_t, sd_t, sz_t, sb_t, sc_t, m_y,
                            m_n, OFF64, MODE)
            h, dacc = _lane_turn(h, dacc, cur[0], cur[1], cur[2], cur[3], cur[4], p_y, t_full, t_hi, t_y, t_3, sy_t,
                                 m_y, a2, d_skip, bias, TL, NL, R3, YL, False, OFF64, MODE)
        if MODE == 0:
            gl.store(h_ptrs, h, mask=m_h)
        elif MODE == 1:
            gl.store(hs_row + seg * I * N, h, mask=m_h)
            gl.store(ds_ptr + (b * n_seg + seg) * I + i_y, gl.sum(dacc, axis=0)[None, :], mask=m_y)
        elif seg == n_seg - 1:
            gl.store(h_ptrs, h, mask=m_h)
