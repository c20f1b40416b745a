"""The batch-1 decode step of a whole block range as one persistent Triton kernel (GraphDecoder's step="persistent").

At batch 1 a decode step streams every weight once, and the kernel-per-stage step (triton_decode) pays a ramp at
each of a block's four grid-wide dependencies: the weights of the next kernel can only be loaded by its programs once
they are resident, and the stream drains and refills around every boundary. Here a program per SM stays resident for
the whole step and walks its own list of work items, block after block:

    A  in_proj rows (RMSNorm fused, the conv step on the x half)      -> xz: silu(conv(x)) | z
    B  x_proj rows (at most one item a program)                       -> dbc: dt_low | B | C, fp32
    C  dt_proj, state update, D skip and gate for a tile of channels  -> y
    D  out_proj rows, added to the fp32 residual in place

Every A, B and D item reads a tile of RT rows of length I (in_proj's rows taken in pairs: 2 D = I), so one register
ring holds the weights of the next two items whatever their stage: their loads are in flight while the program
waits at a dependency, and the weight stream does not stop there. The stages meet at counters (n_blocks, 4) that
each program increments (release) after its items of a stage and spins on (acquire) before the next; the step's
graph zeroes them first. All programs must be resident at once (one per SM, launched after everything before it),
or the spin would wait for a program that cannot start. Cross-program data is read past L1 (.cg).

Rounding is the eager block's (weight-dtype outputs of each matmul, the norm and the conv); sums run in another order
than triton_decode's, so the two agree to the weight dtype's precision, not bitwise.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from swarm.kernels.triton_decode import _normed, _pieces
from swarm.kernels.triton_scan import _load_a_d, _ssm_state_update

# (RT rows a tile, num_warps, programs an SM)
STEP_CONFIG: tuple[int, int, int] = (2, 16, 1)
# the pointer table's columns, one row a block
_IN_W, _NORM_W, _CONV_W, _CONV_B, _X_W, _DT_W, _DT_B, _A, _D, _OUT_W = range(10)
NCOL = 10
_A_DONE, _B_DONE, _C_DONE, _D_DONE = range(4)


@triton.jit
def _col(tab_ptr, j, col, ty: tl.constexpr):
    return tl.load(tab_ptr + j * 10 + col).to(tl.pointer_type(ty))


@triton.jit
def _item(q, pid, n_a, n_b, n_d, NPROG: tl.constexpr):
    """Program pid's item q: (block j, stage 0-3 = A-D, tile t, k-th item of its stage, the stage's last?, the
    program's B items, its items a block). Tiles t = pid + k NPROG; A and D have an item or more a program (NPROG
    is at most their tile counts), B may have none, C is one item (its channels may lie past I)."""
    na_p = (n_a - pid + NPROG - 1) // NPROG
    nb_p = tl.maximum(n_b - pid + NPROG - 1, 0) // NPROG
    nd_p = (n_d - pid + NPROG - 1) // NPROG
    per = na_p + nb_p + 1 + nd_p
    j = q // per
    r = q - j * per
    kind = tl.where(r < na_p, 0, tl.where(r < na_p + nb_p, 1, tl.where(r == na_p + nb_p, 2, 3)))
    k = tl.where(kind == 0, r, tl.where(kind == 1, r - na_p, tl.where(kind == 3, r - na_p - nb_p - 1, 0)))
    n_stage = tl.where(kind == 0, na_p, tl.where(kind == 1, nb_p, tl.where(kind == 3, nd_p, 1)))
    return j, kind, pid + k * NPROG, k, k == n_stage - 1, nb_p, per


@triton.jit
def _fetch(tab_ptr, conv_ptr, slot, q, pid, n_a, n_b, n_d, n_blocks, cs_j, cs_s, I, J, DM,
           WDT: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, RT: tl.constexpr, P0: tl.constexpr,
           P1: tl.constexpr, P2: tl.constexpr, HAS_CBIAS: tl.constexpr, NPROG: tl.constexpr):
    """Everything item q loads that does not depend on the step's progress: its weight tile (RT, I) in pieces; for
    an A item also the conv weights, bias and shifted state of its channels (lo: rows 2s, hi: rows 2s + 1)."""
    j, kind, t, _, _, _, _ = _item(q, pid, n_a, n_b, n_d, NPROG)
    live = j < n_blocks
    jj = tl.minimum(j, n_blocks - 1)
    col = tl.where(kind == 0, 0, tl.where(kind == 1, 4, 9))  # _IN_W, _X_W, _OUT_W
    base = _col(tab_ptr, jj, col, WDT)
    nrows = tl.where(kind == 0, I, tl.where(kind == 1, J, tl.where(kind == 3, DM, 0)))
    nrows = tl.where(live, nrows, 0)
    s = t * RT + tl.arange(0, RT)
    ms = s < nrows
    rows = base + s[:, None].to(tl.int64) * I
    c0 = tl.arange(0, P0)[None, :]
    w0 = tl.load(rows + c0, mask=ms[:, None] & (c0 < I), other=0.0)
    w1, w2 = w0, w0
    if P1 > 0:
        c1 = P0 + tl.arange(0, P1)[None, :]
        w1 = tl.load(rows + c1, mask=ms[:, None] & (c1 < I), other=0.0)
    if P2 > 0:
        c2 = P0 + P1 + tl.arange(0, P2)[None, :]
        w2 = tl.load(rows + c2, mask=ms[:, None] & (c2 < I), other=0.0)
    # the conv step's inputs for the x half of an A tile (channels 2s and 2s + 1 below I)
    lo = 2 * s
    x_rows = tl.where(kind == 0, I, 0)  # (a vector-and-scalar mask trips Triton's interpreter: compare instead)
    mlo = ms & (lo < x_rows)
    mhi = ms & (lo + 1 < x_rows)
    kc = tl.arange(0, KP)[None, :]
    cw_base = _col(tab_ptr, jj, 2, WDT)
    cwl = tl.load(cw_base + lo[:, None] * K + kc, mask=mlo[:, None] & (kc < K), other=0.0)
    cwh = tl.load(cw_base + (lo + 1)[:, None] * K + kc, mask=mhi[:, None] & (kc < K), other=0.0)
    st = conv_ptr + jj.to(tl.int64) * cs_j + slot * cs_s
    csl = tl.load(st + lo[:, None] * K + kc + 1, mask=mlo[:, None] & (kc < K - 1), other=0.0)
    csh = tl.load(st + (lo + 1)[:, None] * K + kc + 1, mask=mhi[:, None] & (kc < K - 1), other=0.0)
    cbl = tl.zeros([RT], dtype=tl.float32)
    cbh = tl.zeros([RT], dtype=tl.float32)
    if HAS_CBIAS:
        cb_base = _col(tab_ptr, jj, 3, WDT)
        cbl = tl.load(cb_base + lo, mask=mlo, other=0.0).to(tl.float32)
        cbh = tl.load(cb_base + lo + 1, mask=mhi, other=0.0).to(tl.float32)
    return w0, w1, w2, cwl, cwh, csl, csh, cbl, cbh


@triton.jit
def _signal(cnt_ptr):
    tl.debug_barrier()  # every thread's stores of the stage are issued before the release
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(cnt_ptr, NPROG: tl.constexpr):
    while tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu") < NPROG:
        pass
    tl.debug_barrier()


@triton.jit
def _act(ptr, OFF: tl.constexpr, P: tl.constexpr, n):
    c = OFF + tl.arange(0, P)
    return tl.load(ptr + c, mask=c < n, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _normed_dup(res_ptr, nw_ptr, eps, OFF: tl.constexpr, P: tl.constexpr, I, DM, rstd, WDT: tl.constexpr):
    # the normalised residual at columns c of a row pair: element c % DM (in_proj's rows 2s and 2s + 1 side by side)
    c = OFF + tl.arange(0, P)
    m = c < I
    x = tl.load(res_ptr + c % DM, mask=m, other=0.0, cache_modifier=".cg").to(WDT).to(tl.float32)
    g = tl.load(nw_ptr + c % DM, mask=m, other=0.0)
    return tl.where(m, _normed(x, g, rstd, WDT), 0.0)


@triton.jit
def _dot2(w, a, OFF: tl.constexpr, P: tl.constexpr, DM):
    """Row sums of w * a over columns below DM and from DM on: an A tile's two in_proj rows, or a row in two parts."""
    p = w.to(tl.float32) * a[None, :]
    c = (OFF + tl.arange(0, P))[None, :]
    return tl.sum(tl.where(c < DM, p, 0.0), axis=1), tl.sum(tl.where(c >= DM, p, 0.0), axis=1)


@triton.jit
def _dot(w0, w1, w2, a0, a1, a2, P1: tl.constexpr, P2: tl.constexpr):
    """Row sums of the tile times the activation row, fp32 (the pieces past I are zero in both)."""
    y = tl.sum(w0.to(tl.float32) * a0[None, :], axis=1)
    if P1 > 0:
        y += tl.sum(w1.to(tl.float32) * a1[None, :], axis=1)
    if P2 > 0:
        y += tl.sum(w2.to(tl.float32) * a2[None, :], axis=1)
    return y


@triton.jit
def _conv_out(y, cs, cw, cb, xz_ptr, st_rows, ch, m, kc, K: tl.constexpr):
    # the conv step of channels ch on their new input y (weight dtype): shifted state in, new state out, silu(conv)
    new = tl.where(kc == K - 1, y.to(tl.float32)[:, None], cs.to(y.dtype).to(tl.float32))
    conv = tl.sum(new * cw.to(tl.float32), axis=1) + cb
    tl.store(st_rows + ch[:, None] * K + kc, new, mask=m[:, None] & (kc < K))
    tl.store(xz_ptr + ch, (conv * tl.sigmoid(conv)).to(y.dtype), mask=m)


@triton.jit
def _step_kernel(res_ptr, xz_ptr, dbc_ptr, y_ptr, cnt_ptr, idx_ptr, tab_ptr, conv_ptr, ssm_ptr, n_blocks, eps,
                 cs_j, cs_s, hs_j, hs_s, DM, I, R, N, J, WDT: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, RT: tl.constexpr,
                 CT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, HAS_CBIAS: tl.constexpr,
                 NPROG: tl.constexpr):
    pid = tl.program_id(0)
    slot = tl.load(idx_ptr)
    n_a = (I + RT - 1) // RT
    n_d = (DM + RT - 1) // RT
    n_b = (J + RT - 1) // RT
    _, _, _, _, _, _, per = _item(0, pid, n_a, n_b, n_d, NPROG)
    kc = tl.arange(0, KP)[None, :]
    cur = _fetch(tab_ptr, conv_ptr, slot, 0, pid, n_a, n_b, n_d, n_blocks, cs_j, cs_s, I, J, DM, WDT, K, KP, RT, P0, P1,
                 P2, HAS_CBIAS, NPROG)
    nxt = _fetch(tab_ptr, conv_ptr, slot, 1, pid, n_a, n_b, n_d, n_blocks, cs_j, cs_s, I, J, DM, WDT, K, KP, RT, P0, P1,
                 P2, HAS_CBIAS, NPROG)
    a0 = tl.zeros([P0], dtype=tl.float32)
    a1 = tl.zeros([P1 if P1 > 0 else P0], dtype=tl.float32)
    a2 = tl.zeros([P2 if P2 > 0 else P0], dtype=tl.float32)
    for q in range(0, per * n_blocks):
        new = _fetch(tab_ptr, conv_ptr, slot, q + 2, pid, n_a, n_b, n_d, n_blocks, cs_j, cs_s, I, J, DM, WDT, K, KP, RT,
                     P0, P1, P2, HAS_CBIAS, NPROG)
        w0, w1, w2, cwl, cwh, csl, csh, cbl, cbh = cur
        j, kind, t, k, last, nb_p, _ = _item(q, pid, n_a, n_b, n_d, NPROG)
        cnt = cnt_ptr + j * 4
        s = t * RT + tl.arange(0, RT)
        if kind == 0:  # A: in_proj rows 2s and 2s + 1
            if k == 0:
                if j > 0:
                    _wait(cnt - 4 + 3, NPROG)
                nw = _col(tab_ptr, j, 1, WDT)
                x0 = _act(res_ptr, 0, P0, DM).to(WDT).to(tl.float32)
                ss = tl.sum(x0 * x0, axis=0)
                if P1 > 0:
                    x1 = _act(res_ptr, P0, P1, DM).to(WDT).to(tl.float32)
                    ss += tl.sum(x1 * x1, axis=0)
                if P2 > 0:
                    x2 = _act(res_ptr, P0 + P1, P2, DM).to(WDT).to(tl.float32)
                    ss += tl.sum(x2 * x2, axis=0)
                rstd = tl.rsqrt(ss / DM + eps)
                a0 = _normed_dup(res_ptr, nw, eps, 0, P0, I, DM, rstd, WDT)
                if P1 > 0:
                    a1 = _normed_dup(res_ptr, nw, eps, P0, P1, I, DM, rstd, WDT)
                if P2 > 0:
                    a2 = _normed_dup(res_ptr, nw, eps, P0 + P1, P2, I, DM, rstd, WDT)
            lo, hi = _dot2(w0, a0, 0, P0, DM)
            if P1 > 0:
                l1, h1 = _dot2(w1, a1, P0, P1, DM)
                lo += l1
                hi += h1
            if P2 > 0:
                l2, h2 = _dot2(w2, a2, P0 + P1, P2, DM)
                lo += l2
                hi += h2
            lo = lo.to(WDT)
            hi = hi.to(WDT)
            ch = 2 * s
            ms = s < I
            st_rows = conv_ptr + j.to(tl.int64) * cs_j + slot * cs_s
            _conv_out(lo, csl, cwl, cbl, xz_ptr, st_rows, ch, ms & (ch < I), kc, K)
            _conv_out(hi, csh, cwh, cbh, xz_ptr, st_rows, ch + 1, ms & (ch + 1 < I), kc, K)
            tl.store(xz_ptr + ch, lo, mask=ms & (ch >= I))
            tl.store(xz_ptr + ch + 1, hi, mask=ms & (ch + 1 >= I))
            if last:
                _signal(cnt + 0)
        elif kind == 1:  # B: x_proj rows s (fp32, unrounded: the SSM step rounds them)
            if k == 0:
                _wait(cnt + 0, NPROG)
                a0 = _act(xz_ptr, 0, P0, I)
                if P1 > 0:
                    a1 = _act(xz_ptr, P0, P1, I)
                if P2 > 0:
                    a2 = _act(xz_ptr, P0 + P1, P2, I)
            tl.store(dbc_ptr + s, _dot(w0, w1, w2, a0, a1, a2, P1, P2), mask=s < J)
            if last:
                _signal(cnt + 1)
        elif kind == 2:  # C: the SSM step of channels pid * CT ...
            i = pid * CT + tl.arange(0, CT)
            n = tl.arange(0, BLOCK_N)
            rr = tl.arange(0, BLOCK_R)
            mi, mn, mr = i < I, n < N, rr < R
            dtw = tl.load(_col(tab_ptr, j, 5, WDT) + i[:, None] * R + rr[None, :], mask=mi[:, None] & mr[None, :],
                          other=0.0)
            bias = tl.load(_col(tab_ptr, j, 6, tl.float32) + i, mask=mi, other=0.0)
            A, Dv = _load_a_d(_col(tab_ptr, j, 7, tl.float32), _col(tab_ptr, j, 8, tl.float32), i, n, mi, mn, N)
            h_ptrs = ssm_ptr + j.to(tl.int64) * hs_j + slot * hs_s + i[:, None] * N + n[None, :]
            h = tl.load(h_ptrs, mask=mi[:, None] & mn[None, :], other=0.0)
            if nb_p == 0:
                _signal(cnt + 1)  # no x_proj rows here
            _wait(cnt + 1, NPROG)
            dlow = tl.load(dbc_ptr + rr, mask=mr, other=0.0, cache_modifier=".cg").to(WDT).to(tl.float32)
            bm = tl.load(dbc_ptr + R + n, mask=mn, other=0.0, cache_modifier=".cg").to(WDT).to(tl.float32)
            cm = tl.load(dbc_ptr + R + N + n, mask=mn, other=0.0, cache_modifier=".cg").to(WDT).to(tl.float32)
            u = tl.load(xz_ptr + i, mask=mi, other=0.0, cache_modifier=".cg").to(tl.float32)
            z = tl.load(xz_ptr + I + i, mask=mi, other=0.0, cache_modifier=".cg").to(tl.float32)
            dl = tl.sum(dtw.to(tl.float32) * dlow[None, :], axis=1).to(WDT).to(tl.float32)
            yv = _ssm_state_update(u, dl, bias, A, Dv, bm, cm, z, h, h_ptrs, mi, mn)
            tl.store(y_ptr + i, yv.to(WDT), mask=mi)
            _signal(cnt + 2)
        else:  # D: out_proj rows s into the residual
            if k == 0:
                _wait(cnt + 2, NPROG)
                a0 = _act(y_ptr, 0, P0, I)
                if P1 > 0:
                    a1 = _act(y_ptr, P0, P1, I)
                if P2 > 0:
                    a2 = _act(y_ptr, P0 + P1, P2, I)
            y = _dot(w0, w1, w2, a0, a1, a2, P1, P2)
            md = s < DM
            old = tl.load(res_ptr + s, mask=md, other=0.0, cache_modifier=".cg")
            tl.store(res_ptr + s, old + y.to(WDT).to(tl.float32), mask=md)
            if last:
                _signal(cnt + 3)
        cur = nxt
        nxt = new


class PersistentStep:
    """The batch-1 decode step of GraphDecoder's blocks as one launch: step(residual, idx) updates the fp32 residual
    row (1, D) in place through every block and the slot idx's states in the pools.

    blocks: GraphDecoder's _BlockWeights; conv_pool (n_blocks, S, I, K) and ssm_pool (n_blocks, S, I, N), fp32.
    PersistentStep.supports(blocks) says whether the kernel covers them (expand 2, no in/out_proj bias, one eps)."""

    def __init__(self, blocks, conv_pool: torch.Tensor, ssm_pool: torch.Tensor, config: tuple[int, int, int] | None = None):
        if not self.supports(blocks):
            raise ValueError("PersistentStep needs in_proj (2I, D) with I = 2D, no in_proj/out_proj bias and one eps")
        w = blocks[0]
        dev = w.in_w.device
        self.dm, self.i = w.in_w.shape[1], w.in_w.shape[0] // 2
        self.k, self.n, self.r = w.conv_w.shape[1], w.A.shape[1], w.dt_w.shape[1]
        self.j = w.x_w.shape[0]
        self.wdt = w.in_w.dtype
        self.eps = w.eps
        self.conv, self.ssm = conv_pool, ssm_pool
        assert conv_pool.is_contiguous() and ssm_pool.is_contiguous()
        rows = []
        for b in blocks:
            cb = b.conv_b if b.conv_b is not None else b.conv_w
            rows.append([t.data_ptr() for t in (b.in_w, b.norm_w, b.conv_w, cb, b.x_w, b.dt_w, b.dt_b, b.A, b.D,
                                                b.out_w)])
        self._keep = blocks  # the table holds their addresses
        self.tab = torch.tensor(rows, dtype=torch.int64, device=dev)
        self.has_cbias = w.conv_b is not None
        self.n_blocks = len(blocks)
        rt, warps, per_sm = config or STEP_CONFIG
        if dev.type != "cuda":  # the interpreter runs programs one after another: one program does every item
            self.nprog, warps = 1, 4
        else:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            self.nprog = min(sms * per_sm, triton.cdiv(self.i, rt), triton.cdiv(self.dm, rt))
        self.rt, self.warps = rt, warps
        self.ct = triton.next_power_of_2(triton.cdiv(self.i, self.nprog))
        self.xz = torch.empty(2 * self.i, dtype=self.wdt, device=dev)
        self.dbc = torch.empty(self.j, dtype=torch.float32, device=dev)
        self.y = torch.empty(self.i, dtype=self.wdt, device=dev)
        self.cnt = torch.zeros(self.n_blocks * 4, dtype=torch.int32, device=dev)

    @staticmethod
    def supports(blocks) -> bool:
        w = blocks[0]
        return (all(b.in_b is None and b.out_b is None and b.eps == w.eps for b in blocks)
                and w.in_w.shape[0] == 2 * w.out_w.shape[1] and w.in_w.shape[0] == 4 * w.in_w.shape[1]
                and all(t.is_contiguous() for b in blocks for t in (b.in_w, b.x_w, b.dt_w, b.out_w, b.conv_w, b.A)))

    def step(self, residual: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        assert residual.shape == (1, self.dm) and residual.dtype == torch.float32 and residual.is_contiguous()
        self.cnt.zero_()
        p0, p1, p2 = _pieces(self.i)
        _step_kernel[(self.nprog,)](
            residual, self.xz, self.dbc, self.y, self.cnt, idx, self.tab, self.conv, self.ssm, self.n_blocks,
            self.eps, self.conv.stride(0), self.conv.stride(1), self.ssm.stride(0), self.ssm.stride(1), self.dm,
            self.i, self.r, self.n, self.j, WDT=_tl_dtype(self.wdt), K=self.k, KP=triton.next_power_of_2(self.k),
            BLOCK_N=triton.next_power_of_2(self.n), BLOCK_R=triton.next_power_of_2(self.r),
            BLOCK_J=triton.next_power_of_2(self.j), RT=self.rt, CT=self.ct, P0=p0, P1=p1, P2=p2,
            HAS_CBIAS=self.has_cbias, NPROG=self.nprog, num_warps=self.warps, num_stages=1)
        return residual


def _tl_dtype(dt: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dt]
