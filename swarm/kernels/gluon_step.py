"""The batch-1 decode step through all of a stack's blocks as one persistent Gluon kernel (Hopper, TMA).

The four-kernel step (triton_decode) pays each of a block's grid-wide dependencies (in_proj -> x_proj -> SSM step
-> out_proj -> next in_proj) with ~2-3 us in which little streams: 40 us a block of 2.8b against ~30 us of weight
reads. Here one program an SM stays resident for every block and splits in two:

- a producer warp streams the block's weights by TMA into a ring of shared-memory slots, in the order the maths
  uses them, paced by the ring and by FLIGHT_BYTES (never by a dependency), so the weights keep streaming while
  the consumers wait;
- four consumer warps do the maths and meet the other programs at three counters a block (release / acquire):

      A  RMSNorm of the residual; in_proj's x rows of the program's channels (static), with the conv step and
         the program's share of x_proj (its columns stream through the ring too); then z rows taken from a
         queue, so that faster SMs stream more of them, stored as silu(z). The program counts in at A after its
         first z row group: A says that its x_proj share is in
      B  after its z rows, x_proj's shares added up (every program reads all of them, in program order:
         deterministic), then the SSM step of the program's channels (dt_proj, state update, D skip) -> y before
         the gate. Only x_proj needs the other programs here, and their shares are long in by then
      C  the gate (y silu(z), rounded), then out_proj rows from a queue, added to the fp32 residual

  Plain loads (the SSM step's rows, the next block's norm and conv rows, the residual rows that out_proj adds to)
  are issued well ahead of their use and after the fences of the counters, which wait for every load in flight:
  their latency (~1-2 us while the weights stream) would otherwise stop the consumers.

A wait longer than SPIN_NS (some program never became resident) ends the step with a NaN output and a flag that
the host reads (PersistentStep.failed; GraphDecoder raises), instead of a hang.

Every value is rounded where the four-kernel step rounds it, so the two agree to the dtype's precision (sums run
in another order). `PersistentStep.build` says whether a stack fits: Hopper, Gluon, bf16/fp16 weights, no in_proj
or out_proj bias, and in_proj, x_proj and out_proj each packed in one tensor (BlockStack.from_tensors packs them
on CUDA). docs/PERFORMANCE.md (ninth and tenth sessions) has the measurements behind the choices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:  # Gluon is experimental: without it (or with another API) the four-kernel step stays
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - any failure means "not here"
    _IMPORT_ERROR = e

SLOT_BYTES = (8192,)  # the largest TMA box, a ring slot: 16 KB slots measured slower (39.6 against 38.0 us a 2.8b
# block: half the slots), 32 KB ones need fewer programs to fit the shapes (55.7)
SMEM_BYTES = 212 * 1024  # the ring, the two input rows and the staged conv rows (227 KB at most for one block)
MAX_SLOTS = 48
# TMA bytes in flight a program: enough for the bandwidth (2.7 TB/s x ~1 us over 128 SMs: ~21 KB), no more. A
# ring full of requests in flight queued every other access behind ~4 us of traffic (the counters' release, the
# SSM step's loads). H100, 16 blocks of 2.8b width: 24 / 32 / 48 KB / all 36.0-36.5 / 36.4-36.7 / 38.1-38.8 /
# 38.9-39.2 us a block
FLIGHT_BYTES = 24 * 1024
CONSUMER_WARPS = 4
N_PTRS = 7  # per-block pointers: norm_w, conv_w, conv_b, dt_w, dt_b, A, D (x_proj streams by its descriptor)
PROGRAMS = 0  # at most this many programs (0: one an SM); a sweep's knob (scripts/sweep_gpu.py persistent_programs)
SPIN_NS = 2_000_000_000  # a wait at a counter longer than this (ns) is a failure: see _spin
N_CNT = 40  # int32 counters a block: 3 counters and 2 queues, each in its own 32-byte sector (polled and added to
# at once)


@dataclass(frozen=True)
class Plan:
    G: int  # programs (one an SM)
    CH: int  # the most channels a program has: their x rows (static), conv step, x_proj share and SSM step
    BRI: int  # rows a box (in_proj; a program's channels come in groups of BRI), pieces a box, piece width
    BPI: int
    PWI: int
    BRO: int  # out_proj's box: rows (a queue item), pieces, piece width
    BPO: int
    PWO: int
    CS: int  # CH to a power of two
    S: int  # ring slots
    slot: int  # bytes a slot
    units: int  # channel groups of BRI (d_inner / BRI), split over the G programs as evenly as they go

    def channels(self, c: int) -> tuple[int, int]:
        """Program c's first channel and its number of channels, as the kernel computes them: the first
        units % G programs take one group more than the others."""
        ub, ue = divmod(self.units, self.G)
        return (c * ub + min(c, ue)) * self.BRI, (ub + (c < ue)) * self.BRI


def _box(rows: int, k: int, max_elems: int) -> tuple[int, int, int] | None:
    """The largest [BR, BP, PW] box of at most `max_elems` (a power of two) with PW | k (pieces of a row),
    BP | k / PW and BR | rows."""
    best = None
    for pw in (256, 128, 64):
        if k % pw:
            continue
        np_ = k // pw
        bp = np_ & -np_
        while bp >= 1:
            br = max_elems // (pw * bp)
            while br >= 1 and rows % br:
                br //= 2
            if br >= 1 and (best is None or br * bp * pw > best[0] * best[1] * best[2]):
                best = (br, bp, pw)
            bp //= 2
    return best


def plan(d: int, i: int, sms: int, slot_bytes: int | None = None, elsize: int = 2) -> Plan | None:
    """How the kernel splits a model of d_model d and d_inner i over at most `sms` programs, or None.

    Boxes are the largest up to SLOT_BYTES[0] (or `slot_bytes`); a ring slot holds the larger of the in_proj and
    out_proj boxes. Every SM gets a program where there are as many channel groups (in_proj's box rows): the x rows
    of a program's channels are static, the z and out_proj rows are queued (so an uneven split of the channels
    evens out there). An H100's 132 SMs at 2.8b's width: 112 programs of 40 channels and 20 of 32, where an even
    split had to leave 4 SMs idle (128 programs)."""
    cap = (slot_bytes or SLOT_BYTES[0]) // elsize
    bi, bo = _box(i, d, cap), _box(d, i, cap)  # a box's rows: all x or all z
    if bi is None or bo is None:
        return None
    units = i // bi[0]
    g = min(sms, units)
    ch = -(-units // g) * bi[0]
    if g < 2 or ch > 128:
        return None
    slot = max(bi[0] * bi[1] * bi[2], bo[0] * bo[1] * bo[2]) * elsize
    # the two input rows and the staged conv rows (K <= 4: 16 fp32 rows a group, in blocks of 4)
    act = (_np2(d // bi[2]) * bi[2] + _np2(i // bo[2]) * bo[2]) * elsize + 16 * _np2(ch // bi[0]) * bi[0] * 4
    slots = min(MAX_SLOTS, (SMEM_BYTES - act) // slot)
    if slots < 2:
        return None
    return Plan(g, ch, *bi, *bo, _np2(ch), slots, slot, units)


def available(device: torch.device) -> bool:
    """Gluon imported and `device` is a Hopper GPU (the kernel was built and measured on an H100)."""
    if _IMPORT_ERROR is not None or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _np2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if _IMPORT_ERROR is None:
    CNT_STRIDE = gl.constexpr(N_CNT)
    PTRS = gl.constexpr(N_PTRS)

    @gluon.jit
    def _fence():
        gl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _poll(ptr):
        return gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _spin(ptr, target, dead, limit):
        """Wait until *ptr >= target; returns 1 where this or an earlier wait timed out (dead: then no wait).

        Every thread polls with acquire loads (no read-modify-write: 128 programs polling that way queued at L2
        behind the counters' real updates): what the other programs wrote before their arrive is visible after.
        A wait longer than `limit` ns means some program never became resident (an SM share under MPS, say): the
        kernel then runs to its end without waiting, so that the host gets an error instead of a hang."""
        if dead == 0:
            t0 = _now()
            while (_poll(ptr) < target) & (dead == 0):
                dead = (_now() - t0 > limit).to(gl.int32)
        return dead

    @gluon.jit
    def _arrive(ptr):
        # every thread fences its own stores (a release by one thread after a barrier left other warps' stores in
        # flight: stale rows were read on the other side), then one thread counts the program in
        _fence()
        gl.thread_barrier()
        gl.atomic_add(ptr, 1, sem="relaxed", scope="gpu")

    @gluon.jit
    def _parity(cnt_ptr, L):
        """Which half of the counters this step uses: [2L, N_CNT] then a word that says 0 or 1. The other half was
        the previous step's; program 0 zeroes it for the next step, then flips the word at its end."""
        return gl.load(cnt_ptr + 2 * L * CNT_STRIDE, cache_modifier=".cg")

    @gluon.jit
    def _channels(c, I: gl.constexpr, BRI: gl.constexpr, G: gl.constexpr):
        """Program c's first channel and its number of channels (Plan.channels): I // BRI groups of BRI channels,
        the first (I // BRI) % G programs one group more than the others."""
        UB: gl.constexpr = I // BRI // G
        UE: gl.constexpr = I // BRI % G
        return (c * UB + gl.minimum(c, UE)) * BRI, (UB + (c < UE).to(gl.int32)) * BRI

    @gluon.jit
    def _now():
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _mark(t_ptr, k: gl.constexpr, TIMES: gl.constexpr):
        if TIMES:
            gl.store(t_ptr + k, _now())

    @gluon.jit
    def _box_in(desc, dst, ready, empty, it, S: gl.constexpr, coord, FLIGHT: gl.constexpr):
        s = it % S
        mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
        if it >= FLIGHT:  # at most FLIGHT boxes in flight: box it - FLIGHT has landed (its slot is not reused yet)
            mbarrier.wait(ready.index((it - FLIGHT) % S), ((it - FLIGHT) // S) & 1)
        mbarrier.expect(ready.index(s), desc.block_type.nbytes)
        B0: gl.constexpr = desc.block_type.shape[0]
        tma.async_copy_global_to_shared(desc, coord, ready.index(s), dst.index(s).slice(0, B0))

    @gluon.jit
    def _grab(q_ptr, n, meta, ready, empty, it, S: gl.constexpr):
        """The next item of a queue (an atomic counter of n items), told to the consumer in the meta of the slot
        that its first box takes; when the queue is empty, -1 there and the slot's barrier completed without data."""
        item = gl.atomic_add(q_ptr, 1, sem="relaxed", scope="gpu")
        s = it % S
        mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
        ml: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        meta.index(s).store(gl.full([1], gl.where(item < n, item, -1), gl.int32, layout=ml))
        if item >= n:
            mbarrier.arrive(ready.index(s), count=1)
        return item

    @gluon.jit
    def _stream_queue(desc, dst, ready, empty, meta, q_ptr, n, row_base, it, S: gl.constexpr, NPG: gl.constexpr,
                      FLIGHT: gl.constexpr):
        """Stream the NPG boxes of each queue item (a row group of desc's box rows, from row_base) until the queue
        is empty; returns the slot counter past the end-of-queue slot."""
        B0: gl.constexpr = desc.block_type.shape[0]
        BP: gl.constexpr = desc.block_type.shape[1]
        item = _grab(q_ptr, n, meta, ready, empty, it, S)
        while item < n:
            for pg in gl.static_range(NPG):
                _box_in(desc, dst, ready, empty, it, S, [row_base + item * B0, pg * BP, 0], FLIGHT)
                it += 1
            item = _grab(q_ptr, n, meta, ready, empty, it, S)
        return it + 1

    @gluon.jit
    def _producer(win_desc, wout_desc, wx_desc, ring, ring_o, ring_x, ready, empty, meta, cnt_ptr, L,
                  D: gl.constexpr, I: gl.constexpr, G: gl.constexpr, S: gl.constexpr,
                  FLIGHT: gl.constexpr):
        # per block: the program's x rows (static: their conv step and x_proj share stay with the program), then
        # z rows and out_proj rows from queues, so that faster SMs stream more of them
        c = gl.program_id(0)
        cnt_ptr = cnt_ptr + _parity(cnt_ptr, L) * (L * CNT_STRIDE)  # this step's half of the counters
        BRI: gl.constexpr = win_desc.block_type.shape[0]
        BPI: gl.constexpr = win_desc.block_type.shape[1]
        PWI: gl.constexpr = win_desc.block_type.shape[2]
        BRO: gl.constexpr = wout_desc.block_type.shape[0]
        BPO: gl.constexpr = wout_desc.block_type.shape[1]
        PWO: gl.constexpr = wout_desc.block_type.shape[2]
        ch0, nch = _channels(c, I, BRI, G)
        it = 0
        for j in range(L):
            for g in range(nch // BRI):
                row0 = ch0 + g * BRI
                for pg in gl.static_range(D // PWI // BPI):
                    _box_in(win_desc, ring, ready, empty, it, S, [j * 2 * I + row0, pg * BPI, 0], FLIGHT)
                    it += 1
                _box_in(wx_desc, ring_x, ready, empty, it, S, [j, 0, row0], FLIGHT)  # the group's x_proj columns
                it += 1
            # z rows, then out_proj rows, from the block's queues
            it = _stream_queue(win_desc, ring, ready, empty, meta, cnt_ptr + j * CNT_STRIDE + 24, I // BRI,
                               j * 2 * I + I, it, S, D // PWI // BPI, FLIGHT)
            it = _stream_queue(wout_desc, ring_o, ready, empty, meta, cnt_ptr + j * CNT_STRIDE + 32, D // BRO,
                               j * D, it, S, I // PWO // BPO, FLIGHT)

    @gluon.jit
    def _load(ring, ready, it, S: gl.constexpr, B0: gl.constexpr, layout: gl.constexpr):
        """The ring's box `it` (the first B0 rows of its slot), once it has landed, as a register tensor."""
        s = it % S
        mbarrier.wait(ready.index(s), (it // S) & 1)
        return ring.index(s).slice(0, B0).load(layout)

    @gluon.jit
    def _release(empty, it, n: gl.constexpr, S: gl.constexpr):
        """Slots of boxes it .. it + n - 1 go back to the producer. Released together: Gluon brackets an arrive
        with barriers of the consumer warps, so one release a box kept the warps in lockstep (~0.3 us a box)."""
        fence_async_shared()
        for k in gl.static_range(n):
            mbarrier.arrive(empty.index((it + k) % S), count=1)

    @gluon.jit
    def _peek(meta, ready, it, S: gl.constexpr, num_warps: gl.constexpr):
        """The queue item whose boxes start at slot `it`, or -1 at the end of the queue."""
        s = it % S
        mbarrier.wait(ready.index(s), (it // S) & 1)
        ml: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        return gl.max(meta.index(s).load(ml), axis=0)

    @gluon.jit
    def _take(ring, ready, empty, it, S: gl.constexpr, B0: gl.constexpr, layout: gl.constexpr):
        w = _load(ring, ready, it, S, B0, layout)
        _release(empty, it, 1, S)
        return w

    @gluon.jit
    def _block_rows(nw_p, cw_p, cb_p, conv_j, pi, ch3, k3, m3, D: gl.constexpr, K: gl.constexpr,
                    HAS_CBIAS: gl.constexpr):
        """A block's rows that stage A needs first: the norm weight, and the program's channels' old conv taps
        1..K-1, conv weights and bias (each [KP, row group, row]). Loaded a block ahead, so that their latency
        (~1-2 us while the weights stream) is not on the way."""
        g = gl.load(nw_p + pi, mask=pi < D, other=0.0).to(gl.float32)
        old = gl.load(conv_j + ch3 * K + k3 + 1, mask=m3 & (k3 < K - 1), other=0.0)
        cw = gl.load(cw_p + ch3 * K + k3, mask=m3 & (k3 < K), other=0.0).to(gl.float32)
        if HAS_CBIAS:
            cb = gl.load(cb_p + ch3 + k3 * 0, mask=m3 & (k3 < 1), other=0.0).to(gl.float32)
        else:
            cb = gl.zeros_like(cw)
        return g, old, cw, cb

    @gluon.jit
    def _ssm_rows(dw_p, h_ptrs, a_p, d_p, db_p, xc_ptr, cd, rr, ch, nn, mcd, mch, R: gl.constexpr, N: gl.constexpr):
        """The SSM step's rows of the program's channels: dt_proj's rows, the state, A, D, dt's bias, xc."""
        gl.thread_barrier()  # xc's stores (stage A, other consumer threads) are visible
        wdt = gl.load(dw_p + cd[:, None] * R + rr[None, :], mask=mcd[:, None] & (rr < R)[None, :], other=0.0)
        h = gl.load(h_ptrs, mask=mch[:, None], other=0.0)
        A = gl.load(a_p + ch[:, None] * N + nn[None, :], mask=mch[:, None], other=0.0)
        Dv = gl.load(d_p + ch, mask=mch, other=0.0)
        bias = gl.load(db_p + ch, mask=mch, other=0.0)
        u = gl.load(xc_ptr + ch, mask=mch, other=0.0, cache_modifier=".cg").to(gl.float32)
        return wdt, h, A, Dv, bias, u

    @gluon.jit
    def _row_group(ring, ready, empty, act, it, S: gl.constexpr, NPG: gl.constexpr, BR: gl.constexpr,
                   layout: gl.constexpr):
        """One row group's GEMV: NPG boxes [BR, BP, PW] from the ring against act's pieces -> (BR,) fp32 sums.
        Products accumulate elementwise, one cross-lane reduction a group (an 8 KB box: 32 registers a thread)."""
        BP: gl.constexpr = ring.shape[2]
        PW: gl.constexpr = ring.shape[3]
        acc = gl.zeros([BR, BP, PW], gl.float32, layout=layout)
        for pg in gl.static_range(NPG):  # unrolled: act slices need constant starts
            w = _load(ring, ready, it + pg, S, BR, layout)
            xv = act.slice(pg * BP, BP).load(gl.SliceLayout(0, layout))
            acc += w.to(gl.float32) * xv.to(gl.float32)[None, :, :]
        out = gl.sum(gl.sum(acc, axis=2), axis=1)
        _release(empty, it, NPG, S)
        return out

    @gluon.jit
    def _consumer(ring, ring_o, ring_x, ready, empty, meta, dbc_sm, act_in, act_out, stg, res_ptr, tab_ptr,
                  conv_ptr, ssm_ptr, idx_ptr, xc_ptr, z_ptr, y_ptr, acc_ptr, cnt_ptr, err_addr, spin_ns, in_ptr,
                  ids_ptr, L, eps, conv_l, ssm_l, D: gl.constexpr, I: gl.constexpr, R: gl.constexpr,
                  N: gl.constexpr, K: gl.constexpr, G: gl.constexpr, CS: gl.constexpr,
                  JP: gl.constexpr, RP: gl.constexpr, BRI: gl.constexpr, BPI: gl.constexpr, PWI: gl.constexpr,
                  BRO: gl.constexpr, BPO: gl.constexpr, PWO: gl.constexpr, NPIP: gl.constexpr, NPOP: gl.constexpr,
                  HAS_CBIAS: gl.constexpr, S: gl.constexpr, IN_MODE: gl.constexpr, t_ptr, TIMES: gl.constexpr,
                  num_warps: gl.constexpr):
        c = gl.program_id(0)
        WDT: gl.constexpr = ring.dtype
        J: gl.constexpr = R + 2 * N
        # layouts: boxes [rows, pieces, piece] with a warp across a piece; rows of pieces for the norm and y
        WPI: gl.constexpr = BPI if BPI < num_warps else num_warps
        WPO: gl.constexpr = BPO if BPO < num_warps else num_warps
        wl_i: gl.constexpr = gl.BlockedLayout([1, 1, PWI // 32], [1, 1, 32], [num_warps // WPI, WPI, 1], [2, 1, 0])
        wl_o: gl.constexpr = gl.BlockedLayout([1, 1, PWO // 32], [1, 1, 32], [num_warps // WPO, WPO, 1], [2, 1, 0])
        rl_i: gl.constexpr = gl.BlockedLayout([1, PWI // 32], [1, 32], [num_warps, 1], [1, 0])
        rl_o: gl.constexpr = gl.BlockedLayout([1, PWO // 32], [1, 32], [num_warps, 1], [1, 0])
        xl3: gl.constexpr = gl.BlockedLayout([1, 1, BRI], [1, 32, 1], [1, num_warps, 1], [2, 1, 0])
        yl: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, wl_i))  # a row group's in_proj outputs
        sl2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        dtl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        hl: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])
        pl: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])
        pg16 = gl.arange(0, 16, layout=gl.SliceLayout(1, pl))
        pj = gl.arange(0, JP, layout=gl.SliceLayout(0, pl))

        par = _parity(cnt_ptr, L)
        cnt0 = cnt_ptr
        cnt_ptr = cnt_ptr + par * (L * CNT_STRIDE)
        if c == 0:  # the previous step's half, zeroed for the next step (all programs of that step are done)
            zl: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
            zo = gl.arange(0, 32 * num_warps, layout=zl)
            for k in range(0, L * CNT_STRIDE, 32 * num_warps):
                gl.store(cnt0 + (1 - par) * (L * CNT_STRIDE) + k + zo, gl.zeros_like(zo), mask=k + zo < L * CNT_STRIDE)
        slot = gl.load(idx_ptr)
        if IN_MODE == 2:
            in_row = in_ptr + gl.load(ids_ptr) * D
        else:
            in_row = in_ptr
        conv_s = conv_ptr + slot * (I * K)
        ssm_s = ssm_ptr + slot * (I * N)
        # the norm's and out_proj's input rows, as [pieces, piece]
        pi = gl.arange(0, NPIP, layout=gl.SliceLayout(1, rl_i))[:, None] * PWI + \
            gl.arange(0, PWI, layout=gl.SliceLayout(0, rl_i))[None, :]
        po = gl.arange(0, NPOP, layout=gl.SliceLayout(1, rl_o))[:, None] * PWO + \
            gl.arange(0, PWO, layout=gl.SliceLayout(0, rl_o))[None, :]
        KP: gl.constexpr = 4  # the conv's taps, padded (K <= 4)
        NRGP: gl.constexpr = stg.shape[0] // (4 * KP)
        stg3 = stg._reinterpret(gl.float32, [4 * KP, NRGP, BRI], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        ch0, nch = _channels(c, I, BRI, G)  # the program's channels: x rows, conv, x_proj share, SSM step
        c3: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 4, 8], [1, num_warps, 1], [2, 1, 0])
        k3 = gl.arange(0, KP, layout=gl.SliceLayout(1, gl.SliceLayout(2, c3)))[:, None, None]
        ch3 = ch0 + gl.arange(0, NRGP, layout=gl.SliceLayout(0, gl.SliceLayout(2, c3)))[None, :, None] * BRI + \
            gl.arange(0, BRI, layout=gl.SliceLayout(0, gl.SliceLayout(1, c3)))[None, None, :]
        m3 = ch3 < ch0 + nch
        rr = gl.arange(0, RP, layout=gl.SliceLayout(0, dtl))
        nn = gl.arange(0, N, layout=gl.SliceLayout(0, hl))
        cd = ch0 + gl.arange(0, CS, layout=gl.SliceLayout(1, dtl))
        ch = ch0 + gl.arange(0, CS, layout=gl.SliceLayout(1, hl))
        mcd = cd < ch0 + nch
        mch = ch < ch0 + nch
        it = 0
        dead = 0
        g, old, cw, cb = _block_rows(gl.load(tab_ptr + 0).to(gl.pointer_type(WDT)),
                                     gl.load(tab_ptr + 1).to(gl.pointer_type(WDT)),
                                     gl.load(tab_ptr + 2).to(gl.pointer_type(WDT)), conv_s, pi, ch3, k3, m3, D, K,
                                     HAS_CBIAS)
        for j in range(L):
            tj = t_ptr + (j * G + c) * 16
            _mark(tj, 0, TIMES)
            tab = tab_ptr + j * PTRS
            dw_p = gl.load(tab + 3).to(gl.pointer_type(WDT))
            db_p = gl.load(tab + 4).to(gl.pointer_type(gl.float32))
            a_p = gl.load(tab + 5).to(gl.pointer_type(gl.float32))
            d_p = gl.load(tab + 6).to(gl.pointer_type(gl.float32))
            jn = gl.minimum(j + 1, L - 1)  # the next block's pointers, for its rows loaded during this one
            tabn = tab_ptr + jn * PTRS
            nw_n = gl.load(tabn + 0).to(gl.pointer_type(WDT))
            cw_n = gl.load(tabn + 1).to(gl.pointer_type(WDT))
            cb_n = gl.load(tabn + 2).to(gl.pointer_type(WDT))
            # the block's conv state rows and weights for this program's channels, staged in shared memory
            gl.thread_barrier()  # the previous block's reads of the staged rows are done
            stg3.slice(0, KP).store(old)
            stg3.slice(KP, KP).store(cw)
            stg3.slice(2 * KP, KP).store(cb)
            # ---- A: RMSNorm of the residual (after the previous block's out_proj), in_proj rows, conv, x_proj
            if j > 0:
                dead = _spin(cnt_ptr + (j - 1) * CNT_STRIDE + 16, G, dead, spin_ns)
            _mark(tj, 1, TIMES)
            if IN_MODE == 0:
                x = gl.load(res_ptr + pi, mask=pi < D, other=0.0, cache_modifier=".cg")
            elif j == 0:  # the step's input row (a hidden row, or the token's embedding)
                x = gl.load(in_row + pi, mask=pi < D, other=0.0).to(gl.float32)
            else:
                x = gl.load(res_ptr + pi, mask=pi < D, other=0.0, cache_modifier=".cg")
            x = x.to(WDT).to(gl.float32)
            rstd = gl.rsqrt(gl.sum(gl.sum(x * x, axis=1), axis=0) / D + eps)
            act_in.store(((x * rstd).to(WDT).to(gl.float32) * g).to(WDT))
            gl.thread_barrier()
            partial = gl.zeros([JP], gl.float32, layout=gl.SliceLayout(0, gl.SliceLayout(2, xl3)))
            for rg in range(nch // BRI):  # the program's x rows: the conv step (state shift, SiLU), x_proj's share
                row0 = ch0 + rg * BRI
                yr = _row_group(ring, ready, empty, act_in, it, S, D // PWI // BPI, BRI, wl_i).to(WDT)  # rounded
                it += D // PWI // BPI
                chy = row0 + gl.arange(0, BRI, layout=yl)
                st_rows = conv_s + j * conv_l + chy * K
                yf = yr.to(gl.float32)
                conv = yf * stg.index((KP + K - 1) * NRGP + rg).load(yl)
                for k in gl.static_range(K - 1):
                    tap = stg.index(k * NRGP + rg).load(yl).to(WDT).to(gl.float32)  # rounded as norm_gemv does
                    conv += tap * stg.index((KP + k) * NRGP + rg).load(yl)
                    gl.store(st_rows + k, tap)
                gl.store(st_rows + K - 1, yf)
                if HAS_CBIAS:
                    conv += stg.index(2 * KP * NRGP + rg).load(yl)
                xc = (conv / (1.0 + gl.exp(-conv))).to(WDT)
                gl.store(xc_ptr + chy, xc)
                wx = _take(ring_x, ready, empty, it, S, 1, xl3)  # [1, JP, BRI]
                it += 1
                xcx = gl.convert_layout(xc, gl.SliceLayout(0, gl.SliceLayout(1, xl3))).to(gl.float32)
                partial += gl.sum(gl.sum(wx.to(gl.float32) * xcx[None, None, :], axis=2), axis=0)
            # the program's share of x_proj, stored for every program to add up after the wait (fp32, in program
            # order: deterministic; atomics serialised 128 programs at each row, ~5 us). Stored before the z rows, so
            # that the release at the end of the stage does not wait for it.
            jj = gl.arange(0, JP, layout=gl.SliceLayout(0, gl.SliceLayout(2, xl3)))
            gl.store(acc_ptr + c * JP + jj, partial)
            _mark(tj, 2, TIMES)
            # z rows from the queue, stored as silu(z) in fp32 for stage C's gate. The program counts in at A after
            # its first z row group, before that group's stores: by then the stores above have landed, and the
            # fence there (which waits for the program's loads and stores in flight) waits for little. The SSM
            # step's rows are loaded right after it, so that their latency passes in the z rows
            wdt = gl.zeros([CS, RP], WDT, layout=dtl)
            h = gl.zeros([CS, N], gl.float32, layout=hl)
            A = gl.zeros([CS, N], gl.float32, layout=hl)
            Dv = gl.zeros([CS], gl.float32, layout=gl.SliceLayout(1, hl))
            bias = gl.zeros([CS], gl.float32, layout=gl.SliceLayout(1, hl))
            u = gl.zeros([CS], gl.float32, layout=gl.SliceLayout(1, hl))
            h_ptrs = ssm_s + j * ssm_l + ch[:, None] * N + nn[None, :]
            n_z = 0
            item = _peek(meta, ready, it, S, num_warps)
            while item >= 0:
                zr = _row_group(ring, ready, empty, act_in, it, S, D // PWI // BPI, BRI, wl_i).to(WDT)
                if n_z == 0:
                    _arrive(cnt_ptr + j * CNT_STRIDE + 0)
                    wdt, h, A, Dv, bias, u = _ssm_rows(dw_p, h_ptrs, a_p, d_p, db_p, xc_ptr, cd, rr, ch, nn, mcd, mch,
                                                       R, N)
                zf = zr.to(gl.float32)
                gl.store(z_ptr + item * BRI + gl.arange(0, BRI, layout=yl), zf / (1.0 + gl.exp(-zf)))
                it += D // PWI // BPI
                n_z += 1
                item = _peek(meta, ready, it, S, num_warps)
            _release(empty, it, 1, S)
            it += 1
            if n_z == 0:
                _arrive(cnt_ptr + j * CNT_STRIDE + 0)
                wdt, h, A, Dv, bias, u = _ssm_rows(dw_p, h_ptrs, a_p, d_p, db_p, xc_ptr, cd, rr, ch, nn, mcd, mch, R, N)
            _mark(tj, 3, TIMES)
            # ---- B: the SSM step of the program's channels. It needs every program's x_proj share (A), long
            # counted in by now, and not z: the gate moved to stage C, so no grid-wide wait sits between the stages
            dead = _spin(cnt_ptr + j * CNT_STRIDE + 0, G, dead, spin_ns)
            _mark(tj, 4, TIMES)
            # x_proj: the programs' shares added up (16 programs' rows a load, all loads in flight), then rounded
            # as a matmul's output
            sh = gl.zeros([16, JP], gl.float32, layout=pl)
            for g0 in gl.static_range(0, G, 16):
                sh += gl.load(acc_ptr + (g0 + pg16)[:, None] * JP + pj[None, :],
                              mask=((g0 + pg16) < G)[:, None] & (pj < J)[None, :], other=0.0, cache_modifier=".cg")
            gl.thread_barrier()  # the previous block's reads of dbc_sm are done
            dbc_sm.store(gl.sum(sh, axis=0))
            gl.thread_barrier()
            dlow = gl.where(rr < R, dbc_sm.slice(0, RP).load(gl.SliceLayout(0, dtl)), 0.0).to(WDT).to(gl.float32)
            bm = dbc_sm.slice(R, N).load(gl.SliceLayout(0, hl)).to(WDT).to(gl.float32)
            cm = dbc_sm.slice(R + N, N).load(gl.SliceLayout(0, hl)).to(WDT).to(gl.float32)
            dl = gl.sum(wdt.to(gl.float32) * dlow[None, :], axis=1).to(WDT).to(gl.float32)
            dl = gl.convert_layout(dl, gl.SliceLayout(1, hl)) + bias
            e = gl.exp(dl)  # softplus as triton_scan._softplus
            uu = 1.0 + e
            sp = gl.where(uu == 1.0, e, gl.log(uu) * (e / (uu - 1.0)))
            dt = gl.where(dl > 20.0, dl, sp)
            h = gl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * bm[None, :]
            gl.store(h_ptrs, h, mask=mch[:, None])
            y = gl.sum(h * cm[None, :], axis=1) + Dv * u
            gl.store(y_ptr + ch, y, mask=mch)  # fp32, before the gate
            _mark(tj, 5, TIMES)
            _arrive(cnt_ptr + j * CNT_STRIDE + 8)
            _mark(tj, 8, TIMES)
            # the next block's first rows, loaded after the fence above (which would wait for them)
            g, old, cw, cb = _block_rows(nw_n, cw_n, cb_n, conv_s + jn * conv_l, pi, ch3, k3, m3, D, K, HAS_CBIAS)
            # ---- C: the gate (y silu(z), rounded), out_proj rows, added to the residual
            dead = _spin(cnt_ptr + j * CNT_STRIDE + 8, G, dead, spin_ns)
            _mark(tj, 6, TIMES)
            yg = gl.load(y_ptr + po, mask=po < I, other=0.0, cache_modifier=".cg") * \
                gl.load(z_ptr + po, mask=po < I, other=0.0, cache_modifier=".cg")
            act_out.store(yg.to(WDT))
            gl.thread_barrier()
            item = _peek(meta, ready, it, S, num_warps)
            while item >= 0:  # out_proj rows from the queue
                rows = item * BRO + gl.arange(0, BRO, layout=gl.SliceLayout(1, gl.SliceLayout(2, wl_o)))
                # loaded first: its latency passes in the GEMV
                if IN_MODE == 0:
                    r = gl.load(res_ptr + rows, cache_modifier=".cg")
                elif j == 0:
                    r = gl.load(in_row + rows).to(gl.float32)
                else:
                    r = gl.load(res_ptr + rows, cache_modifier=".cg")
                yo = _row_group(ring_o, ready, empty, act_out, it, S, I // PWO // BPO, BRO, wl_o)
                yo = yo.to(WDT).to(gl.float32)
                it += I // PWO // BPO
                gl.store(res_ptr + rows, r + yo)
                item = _peek(meta, ready, it, S, num_warps)
            _release(empty, it, 1, S)
            it += 1
            _mark(tj, 7, TIMES)
            _arrive(cnt_ptr + j * CNT_STRIDE + 16)
        if c == 0:  # every program has read the parity: they all counted in at C of block L - 2 (L >= 2), or the
            # host zeroes the counters before each step (L = 1)
            gl.store(cnt0 + 2 * L * CNT_STRIDE, 1 - par)
        if dead != 0:  # a wait timed out: the output is NaN and the host is told (PersistentStep.failed)
            gl.store(res_ptr + pi, gl.full(pi.shape, float("nan"), gl.float32, layout=rl_i), mask=pi < D)
            gl.store(err_addr.to(gl.pointer_type(gl.int32)), 1)

    @gluon.jit
    def _step_kernel(win_desc, wout_desc, wx_desc, res_ptr, tab_ptr, conv_ptr, ssm_ptr, idx_ptr, xc_ptr, z_ptr,
                     y_ptr, acc_ptr, cnt_ptr, err_addr, spin_ns, in_ptr, ids_ptr, L, eps, conv_l, ssm_l,
                     D: gl.constexpr,
                     I: gl.constexpr, R: gl.constexpr,
                     N: gl.constexpr, K: gl.constexpr, G: gl.constexpr,
                     CS: gl.constexpr, JP: gl.constexpr, RP: gl.constexpr, NRGP: gl.constexpr, NPIP: gl.constexpr,
                     NPOP: gl.constexpr, HAS_CBIAS: gl.constexpr, S: gl.constexpr, SLOT: gl.constexpr,
                     FLIGHT: gl.constexpr, IN_MODE: gl.constexpr, t_ptr, TIMES: gl.constexpr,
                     num_warps: gl.constexpr):
        WDT: gl.constexpr = win_desc.dtype
        # ring slots of SLOT elements; a stream whose box is smaller uses the first rows of a slot (a view as
        # [S] + box would put slot s at s box sizes, inside other slots)
        BI: gl.constexpr = win_desc.block_type.shape
        BO: gl.constexpr = wout_desc.block_type.shape
        BX: gl.constexpr = wx_desc.block_type.shape
        ring = gl.allocate_shared_memory(WDT, [S, SLOT // (BI[1] * BI[2]), BI[1], BI[2]], win_desc.layout)
        ring_o = ring._reinterpret(WDT, [S, SLOT // (BO[1] * BO[2]), BO[1], BO[2]], wout_desc.layout)
        ring_x = ring._reinterpret(WDT, [S, SLOT // (BX[1] * BX[2]), BX[1], BX[2]], wx_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        meta = gl.allocate_shared_memory(gl.int32, [S, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        dbc_sm = gl.allocate_shared_memory(gl.float32, [JP], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        act_in = gl.allocate_shared_memory(WDT, [NPIP, win_desc.block_type.shape[2]], flat)
        act_out = gl.allocate_shared_memory(WDT, [NPOP, wout_desc.block_type.shape[2]], flat)
        # the conv's old state taps 1..K-1, weights 0..K-1 and bias (rows 0, 4, 8 of 16), each [row group, row]
        stg = gl.allocate_shared_memory(gl.float32, [16 * NRGP, win_desc.block_type.shape[0]],
                                        gl.SwizzledSharedLayout(1, 1, 1, [0]))
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (ring, ring_o, ring_x, ready, empty, meta, dbc_sm, act_in, act_out, stg, res_ptr, tab_ptr,
                         conv_ptr, ssm_ptr, idx_ptr, xc_ptr, z_ptr, y_ptr, acc_ptr, cnt_ptr, err_addr, spin_ns,
                         in_ptr, ids_ptr, L, eps, conv_l, ssm_l, D, I, R, N, K, G, CS, JP, RP, BI[0], BI[1],
                         BI[2], BO[0], BO[1], BO[2], NPIP, NPOP, HAS_CBIAS, S, IN_MODE, t_ptr, TIMES, num_warps)),
            (_producer, (win_desc, wout_desc, wx_desc, ring, ring_o, ring_x, ready, empty, meta, cnt_ptr, L, D, I, G,
                         S, FLIGHT)),
        ], [1], [24])


def _packed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The (L * rows, cols) tensor that `tensors` (L of (rows, cols)) are consecutive views of, or None."""
    t0 = tensors[0]
    if not t0.is_contiguous():
        return None
    n = t0.numel()
    for j, t in enumerate(tensors):
        if (t.shape != t0.shape or not t.is_contiguous() or t.dtype != t0.dtype
                or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
                or t.data_ptr() != t0.data_ptr() + j * n * t0.element_size()):
            return None
    return torch.as_strided(t0, (len(tensors) * t0.shape[0], t0.shape[1]), (t0.shape[1], 1))


class PersistentStep:
    """The persistent kernel's descriptors, pointer table and buffers for one stack's blocks.

    step(res, idx): res (1, D) fp32, the residual row, updated in place through every block; idx (1,) int64, the
    session's slot in the conv (L, S, I, K) and SSM (L, S, I, N) pools. Launch-only (no host sync): graph-capturable.
    """

    def __init__(self, blocks: list, conv: torch.Tensor, ssm: torch.Tensor, plan_: Plan):
        w0 = blocks[0]
        self.L = len(blocks)
        self.D, self.I = w0.in_w.shape[1], w0.out_w.shape[1]
        self.R, self.N, self.K = w0.dt_w.shape[1], w0.A.shape[1], w0.conv_w.shape[1]
        self.eps = w0.eps
        self.plan = p = plan_
        self.dtype = w0.in_w.dtype
        win, wout = _packed([b.in_w for b in blocks]), _packed([b.out_w for b in blocks])
        wx = _packed([b.x_w for b in blocks])
        assert win is not None and wout is not None and wx is not None
        l3 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
        self._win = win.view(-1, self.D // p.PWI, p.PWI)
        self._wout = wout.view(-1, self.I // p.PWO, p.PWO)
        self.win_desc = TensorDescriptor.from_tensor(self._win, [p.BRI, p.BPI, p.PWI], l3)
        self.wout_desc = TensorDescriptor.from_tensor(self._wout, [p.BRO, p.BPO, p.PWO], l3)
        self.jp, self.rp = _np2(self.R + 2 * self.N), _np2(self.R)
        self._wx = wx.view(self.L, self.R + 2 * self.N, self.I)  # rows past R + 2N read as zeros (out of bounds)
        self.wx_desc = TensorDescriptor.from_tensor(self._wx, [1, self.jp, p.BRI], l3)
        dev = w0.in_w.device
        ptrs = [[b.norm_w.data_ptr(), b.conv_w.data_ptr(), 0 if b.conv_b is None else b.conv_b.data_ptr(),
                 b.dt_w.data_ptr(), b.dt_b.data_ptr(), b.A.data_ptr(), b.D.data_ptr()]
                for b in blocks]
        self._keep = blocks  # the table holds raw pointers: keep their tensors alive with it
        self.tab = torch.tensor(ptrs, dtype=torch.int64, device=dev)
        self.has_cbias = w0.conv_b is not None
        self.conv, self.ssm = conv, ssm
        self.xc = torch.empty(self.I, dtype=self.dtype, device=dev)
        self.z = torch.empty(self.I, dtype=torch.float32, device=dev)  # silu(z)
        self.y = torch.empty(self.I, dtype=torch.float32, device=dev)  # the SSM step's output before the gate
        # set by the kernel where a wait timed out; pinned host memory, which the kernel writes through its mapped
        # address, so that the host reads it without a copy or a sync (failed())
        self.err = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.spin_ns = SPIN_NS
        self._grid = plan_.G  # the programs launched (a test launches fewer, to see the waits time out)
        self.acc = torch.zeros(plan_.G, self.jp, dtype=torch.float32, device=dev)  # x_proj's shares
        # two halves of counters (a step's and the previous one's) and the word that says which is whose: the kernel
        # zeroes them itself (no fill kernel a step) from two blocks on
        self.cnt = torch.zeros(2 * self.L + 1, N_CNT, dtype=torch.int32, device=dev)

    @classmethod
    def build(cls, blocks: list, conv: torch.Tensor, ssm: torch.Tensor,
              slot_bytes: int | None = None) -> "PersistentStep | None":
        """The step for these blocks (GraphDecoder's _BlockWeights), or None where the kernel does not apply."""
        if _IMPORT_ERROR is not None or not blocks:
            return None
        w0 = blocks[0]
        dev = w0.in_w.device
        if not available(dev) or w0.in_w.dtype not in (torch.bfloat16, torch.float16):
            return None
        if any(b.in_b is not None or b.out_b is not None or b.eps != w0.eps for b in blocks):
            return None
        if w0.A.shape[1] not in (16,) or w0.conv_w.shape[1] > 4 or w0.dt_w.shape[1] > 256:
            return None
        if any(_packed([getattr(b, n) for b in blocks]) is None for n in ("in_w", "x_w", "out_w")):
            return None
        sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
        sms = min(sms, PROGRAMS) if PROGRAMS else sms
        p = plan(w0.in_w.shape[1], w0.out_w.shape[1], sms, slot_bytes)
        # x_proj's boxes: [J (padded), BRI] with rows of at least 16 bytes, within a ring slot
        jp = _np2(w0.dt_w.shape[1] + 2 * w0.A.shape[1])
        if p is None or jp > 256 or p.BRI * 2 < 16 or jp * p.BRI * 2 > p.slot:
            return None
        return cls(blocks, conv, ssm, p)

    def failed(self) -> bool:
        """Whether a step that has finished timed out at a wait (its output is NaN): some of the kernel's programs
        were not resident at once, e.g. under an MPS share of the SMs."""
        return bool(self.err[0])

    def step(self, res: torch.Tensor, idx: torch.Tensor, times: torch.Tensor | None = None,
             hidden: torch.Tensor | None = None, embed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The input is res itself, or `hidden` ((1, D) fp32; res is then output only), or `embed` = (table, ids):
        the embedding row of token ids[0] of a contiguous (vocab, D) table, in fp32 (what Head.embed returns), so
        that a token graph needs no embedding, conversion or copy kernels before this one.

        times: an int64 (L, G, 16) tensor that gets each program's %globaltimer at its stages (a probe, see
        scripts/sweep_gpu.py persistent_stages)."""
        p = self.plan
        if embed is not None:
            table, ids = embed
            assert table.is_contiguous() and table.shape[1] == self.D and table.device == res.device
            in_mode, in_t, ids_t = 2, table, ids
        elif hidden is None or hidden.data_ptr() == res.data_ptr():
            in_mode, in_t, ids_t = 0, res, idx
        else:  # read in the first block, while its out_proj writes res: they must not overlap
            assert hidden.is_contiguous() and hidden.numel() == self.D and hidden.dtype == torch.float32
            in_mode, in_t, ids_t = 1, hidden, idx
        if self.L < 2:  # no wait tells program 0 that every program has read the parity word
            self.cnt.zero_()
        _step_kernel[(self._grid,)](
            self.win_desc, self.wout_desc, self.wx_desc, res, self.tab, self.conv, self.ssm, idx, self.xc, self.z,
            self.y, self.acc, self.cnt, self.err.data_ptr(), self.spin_ns, in_t, ids_t, self.L, self.eps,
            self.conv.stride(0), self.ssm.stride(0), D=self.D, I=self.I, R=self.R, N=self.N, K=self.K, G=p.G,
            CS=p.CS, JP=self.jp, RP=self.rp,
            NRGP=_np2(p.CH // p.BRI), NPIP=_np2(self.D // p.PWI), NPOP=_np2(self.I // p.PWO),
            HAS_CBIAS=self.has_cbias, S=p.S, SLOT=p.slot // 2, FLIGHT=min(p.S - 1, max(1, FLIGHT_BYTES // p.slot)),
            IN_MODE=in_mode, t_ptr=self.acc if times is None else times, TIMES=times is not None,
            num_warps=CONSUMER_WARPS)
