"""Probe for a next decode kernel: can a warp-specialized producer keep streaming weights across grid-wide syncs?

    python3 scripts/probe_ws_stream.py [S,RB,WARPS,SYNC ...]      (Hopper; Triton's Gluon, Triton >= 3.6)

A chain of L = 64 GEMV layers, y_l = W_l y_{l-1} (bf16, K = 5120, N = SMs x RB rows), as one persistent kernel of a
program per SM. Each program owns RB rows of every layer. A one-warp producer partition streams [RB, 256] boxes of
all layers by TMA through a ring of S shared-memory slots, paced only by the ring; the consumer warps wait for the
previous layer at a counter (SYNC=1: every program's release, acquire spin), stage its output in shared memory and
reduce the boxes. SYNC=0 times the stream alone. This is the b=1 decode step's shape (a block is ~4 such 20 MB
dependencies) without its maths: docs/PERFORMANCE.md, eighth session, has the numbers."""
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared

KB = 20  # boxes of 256 columns a row (K = 5120)


@gluon.jit
def producer(desc, bufs, ready, empty, L, N, S: gl.constexpr, RB: gl.constexpr, KB: gl.constexpr):
    c = gl.program_id(0)
    for l in range(L):
        for kb in range(KB):
            i = l * KB + kb
            s = i % S
            mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [l * N + c * RB, kb * 256], ready.index(s), bufs.index(s))


@gluon.jit
def consumer(bufs, ready, empty, act_smem, act_ptr, cnt_ptr, L, N, G, AS, S: gl.constexpr, RB: gl.constexpr,
             KB: gl.constexpr, SYNC: gl.constexpr, num_warps: gl.constexpr):
    c = gl.program_id(0)
    wl: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    cols = gl.arange(0, 256, layout=gl.SliceLayout(0, wl))
    for l in range(L):
        if SYNC:
            if l > 0:
                while gl.atomic_add(cnt_ptr + l - 1, 0, sem="acquire", scope="gpu") < G:
                    pass
        src = act_ptr + (l % 2) * AS
        for kb in gl.static_range(KB):  # unrolled: the loads go out together
            act_smem.index(kb).store(gl.load(src + kb * 256 + cols, cache_modifier=".cg"))
        gl.thread_barrier()
        acc = gl.zeros([RB], gl.float32, layout=gl.SliceLayout(1, wl))
        for kb in range(KB):
            i = l * KB + kb
            s = i % S
            mbarrier.wait(ready.index(s), (i // S) & 1)
            w = bufs.index(s).load(wl)
            fence_async_shared()
            mbarrier.arrive(empty.index(s), count=1)
            av = act_smem.index(kb).load(gl.SliceLayout(0, wl))
            acc += gl.sum(w.to(gl.float32) * av.to(gl.float32)[None, :], axis=1)
        r = c * RB + gl.arange(0, RB, layout=gl.SliceLayout(1, wl))
        gl.store(act_ptr + ((l + 1) % 2) * AS + r, acc.to(gl.bfloat16))
        gl.thread_barrier()
        if SYNC:
            gl.atomic_add(cnt_ptr + l, 1, sem="release", scope="gpu")


@gluon.jit
def ws_kernel(desc, act_ptr, cnt_ptr, L, N, G, AS, S: gl.constexpr, RB: gl.constexpr, KB: gl.constexpr,
              SYNC: gl.constexpr, num_warps: gl.constexpr):
    bufs = gl.allocate_shared_memory(desc.dtype, [S] + desc.block_type.shape, desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    act_smem = gl.allocate_shared_memory(gl.bfloat16, [32, 256], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(S):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (consumer, (bufs, ready, empty, act_smem, act_ptr, cnt_ptr, L, N, G, AS, S, RB, KB, SYNC, num_warps)),
        (producer, (desc, bufs, ready, empty, L, N, S, RB, KB)),
    ], [1], [24])


def run(L=64, S=16, RB=16, warps=4, sync=True, reps=10):
    G = torch.cuda.get_device_properties(0).multi_processor_count
    N = G * RB
    W = torch.randn(L * N, KB * 256, device="cuda", dtype=torch.bfloat16)
    AS = max(N, KB * 256)  # a layer's activations: its input row and its output rows (two, alternating)
    act = torch.randn(2 * AS, device="cuda", dtype=torch.bfloat16)
    cnt = torch.zeros(L, device="cuda", dtype=torch.int32)
    layout = gl.NVMMASharedLayout.get_default_for([RB, 256], gl.bfloat16)
    desc = TensorDescriptor.from_tensor(W, [RB, 256], layout)

    def go():
        cnt.zero_()
        ws_kernel[(G,)](desc, act, cnt, L, N, G, AS, S=S, RB=RB, KB=KB, SYNC=sync, num_warps=warps)
    go()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        go()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    ms = sorted(times)[len(times) // 2]
    gb = W.numel() * 2 / 1e9
    print(f"L={L} S={S} RB={RB} warps={warps} sync={sync}: {ms * 1e3 / L:.2f} us a layer of "
          f"{W.numel() * 2 / L / 1e6:.1f} MB ({gb / ms:.2f} TB/s)", flush=True)


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["16,16,4,1", "16,16,4,0"]:
        S, RB, warps, sync = map(int, spec.split(","))
        try:
            run(S=S, RB=RB, warps=warps, sync=bool(sync))
        except Exception as e:
            import traceback
            tb = traceback.format_exc()
            print(spec, "failed:", tb[-2500:], flush=True)
            msgs, x = [], e
            while x is not None:
                msgs.append(f"{type(x).__name__}: {str(x).splitlines()[-1] if str(x) else ''}")
                x = x.__cause__ or x.__context__
            print("chain:", msgs, flush=True)
            break
