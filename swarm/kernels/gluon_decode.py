"""out_proj of the b=1 decode step as a Gluon kernel that prefetches its whole weight slice into shared memory by TMA.

The decode step's four kernels per block (triton_decode) are chained by programmatic dependent launch (PDL): each
one becomes resident while its predecessor still runs and loads its weights before waiting for its input. The
Triton GEMVs hold those weights in registers, so a kernel only gets ahead as far as the registers that its
predecessors leave free allow. x_proj and the SSM step between in_proj and out_proj are latency-bound (a few MB, ~6 us
a block at 2.8b width); while they run, nothing streams the 26 MB of out_proj unless out_proj is already resident.

Here each program owns RPC consecutive output rows, one program an SM, and its rows fit in shared memory (2.8b: 20
rows x 5120 = 200 KB): at its start it issues TMA copies for all of them, lets its successor launch, and only then
waits for its input. Shared memory is what the Triton kernels around it barely use, so the program becomes resident
as soon as its launch is allowed and streams out_proj behind the latency-bound kernels. After the wait it reduces
the boxes as they land and adds the rounded result to the fp32 residual row, as `gemv_residual` does.

Hopper or later with Triton's Gluon (Triton >= 3.6); `available()` says whether this machine has it.
"""

from __future__ import annotations

import functools

import torch

try:  # Gluon is experimental: a Triton without it (or with another API) leaves the Triton GEMV in place
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - any failure means "not here"
    _IMPORT_ERROR = e

RB = 4  # rows a box
PB = 4  # pieces (of PW columns) a box
SMEM_BUDGET = 216 * 1024  # bytes of weights and input a program may hold (227 KB at most for one block)


def available(device: torch.device) -> bool:
    """Gluon imported and `device` is a Hopper or later GPU (TMA, PDL)."""
    if _IMPORT_ERROR is not None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device.index if device.index is not None
                                            else torch.cuda.current_device())[0] >= 9


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(n: int, k: int, sms: int) -> tuple[int, int, int] | None:
    """(rows a program, piece width, pieces a register tile) for an (n, k) weight, or None where the kernel does not
    apply: k must be a multiple of a piece width (256, 128 or 64 columns; at most 256 pieces), and a program's rows
    must fit SMEM_BUDGET with one program an SM."""
    pw = next((p for p in (256, 128, 64) if k % p == 0), None)
    if pw is None or k // pw > 256:
        return None
    rpc = -(-n // sms)
    rpc = -(-rpc // RB) * RB
    if (rpc + 1) * k * 2 > SMEM_BUDGET:  # the rows and the input row
        return None
    np_ = k // pw
    return rpc, pw, min(4, np_ & -np_)


if _IMPORT_ERROR is None:

    @gluon.jit
    def _griddep(asm: gl.constexpr):
        gl.inline_asm_elementwise(asm + " // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _out_tma_kernel(w_desc, x_desc, b_ptr, r_ptr, N, RPC: gl.constexpr, RPC2: gl.constexpr, NRG: gl.constexpr,
                        NPG: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
        # w_desc: the weight as (N, NP, PW) pieces of a row, in boxes of [RB rows, PB pieces, PW]; x_desc: the input
        # row as (NP, PW), in boxes of [PB, PW]. A program's RPC rows are NRG row groups of NPG boxes each.
        RB_: gl.constexpr = w_desc.block_type.shape[0]
        PB_: gl.constexpr = w_desc.block_type.shape[1]
        PW: gl.constexpr = w_desc.block_type.shape[2]
        c = gl.program_id(0)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [NRG * NPG] + w_desc.block_type.shape, w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [NPG] + x_desc.block_type.shape, x_desc.layout)
        y_smem = gl.allocate_shared_memory(gl.float32, [RPC2], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        bars = gl.allocate_shared_memory(gl.int64, [NRG + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NRG + 1):
            mbarrier.init(bars.index(i), count=1)
        for rg in gl.static_range(NRG):  # all of the program's rows in flight at once, before the wait
            mbarrier.expect(bars.index(rg), NPG * w_desc.block_type.nbytes)
            for pg in gl.static_range(NPG):
                tma.async_copy_global_to_shared(w_desc, [c * RPC + rg * RB_, pg * PB_, 0], bars.index(rg),
                                                w_smem.index(rg * NPG + pg))
        if PDL == 2:
            _griddep("griddepcontrol.launch_dependents;")
        if PDL > 0:
            _griddep("griddepcontrol.wait;")
        if PDL == 1:
            _griddep("griddepcontrol.launch_dependents;")
        # the input row by TMA too, and the residual (and bias) rows at once: one latency for all of them
        mbarrier.expect(bars.index(NRG), NPG * x_desc.block_type.nbytes)
        for pg in gl.static_range(NPG):
            tma.async_copy_global_to_shared(x_desc, [pg * PB_, 0], bars.index(NRG), x_smem.index(pg))
        ol: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        rows = c * RPC + gl.arange(0, RPC2, layout=ol)
        m = (rows < N) & (rows < c * RPC + RPC)
        r = gl.load(r_ptr + rows, mask=m, other=0.0)
        if HAS_BIAS:
            bias = gl.load(b_ptr + rows, mask=m, other=0.0).to(gl.float32)
        # a thread owns PW / 32 columns of a piece; a warp spans the piece, the warps split pieces (then rows)
        WP: gl.constexpr = PB_ if PB_ < num_warps else num_warps
        wl: gl.constexpr = gl.BlockedLayout([1, 1, PW // 32], [1, 1, 32], [num_warps // WP, WP, 1], [2, 1, 0])
        xl: gl.constexpr = gl.SliceLayout(0, wl)
        mbarrier.wait(bars.index(NRG), 0)
        for rg in gl.static_range(NRG):
            acc = gl.zeros([RB_, PB_, PW], gl.float32, layout=wl)
            mbarrier.wait(bars.index(rg), 0)
            for pg in gl.static_range(NPG):
                w = w_smem.index(rg * NPG + pg).load(wl)
                xv = x_smem.index(pg).load(xl)
                acc += w.to(gl.float32) * xv.to(gl.float32)[None, :, :]
            y_smem.slice(rg * RB_, RB_).store(gl.sum(gl.sum(acc, axis=2), axis=1))
        gl.thread_barrier()
        y = y_smem.load(ol)
        if HAS_BIAS:
            y += bias
        y = y.to(w_desc.dtype).to(gl.float32)  # the matmul's output in the weight dtype, then the fp32 add
        gl.store(r_ptr + rows, y + r, mask=m)


def gemv_residual_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      pdl: int, num_warps: int = 4) -> bool:
    """residual += linear(x, weight, bias) rounded to weight's dtype for one row (x (1, K), residual (1, N) fp32),
    if the kernel applies to this weight; returns False, having done nothing, where it does not.

    pdl: 0 a plain launch, 1 the successor launches after the wait, 2 before it (as triton_decode._launch)."""
    n, k = weight.shape
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    p = plan(n, k, _sm_count(index))
    if (p is None or x.shape[0] != 1 or not weight.is_contiguous() or x.stride(1) != 1
            or weight.dtype not in (torch.bfloat16, torch.float16) or x.dtype != weight.dtype
            or weight.data_ptr() % 16 or x.data_ptr() % 16):
        return False
    rpc, pw, pb = p
    # descriptors are built each call (a few us of host time): the step is replayed from a CUDA graph, and a cached
    # descriptor would keep its weight alive after the peer drops the block
    w_desc = TensorDescriptor.from_tensor(weight.view(n, k // pw, pw), [RB, pb, pw],
                                          gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3))
    x_desc = TensorDescriptor.from_tensor(x.view(k // pw, pw), [pb, pw],
                                          gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2))
    kw = dict(launch_pdl=True) if pdl else {}
    _out_tma_kernel[(-(-n // rpc),)](w_desc, x_desc, weight if bias is None else bias, residual, n, RPC=rpc,
                                     RPC2=max(32, 1 << (rpc - 1).bit_length()), NRG=rpc // RB, NPG=k // pw // pb,
                                     HAS_BIAS=bias is not None, PDL=pdl, num_warps=num_warps, **kw)
    return True
