"""GPU tuning sweeps behind the defaults in swarm/kernels (docs/PERFORMANCE.md has the results).

    PYTHONPATH=$PWD python3 scripts/sweep_gpu.py [launch_costs prefill_profile ssm_decode_sweep step_sweep
                                                  step_parts prefill_sweep chunk_sweep scan_sweep prefill_kernels
                                                  read_ceiling conv_sweep prefill_gaps persistent_stages
                                                  persistent_knobs persistent_widths persistent_overhead
                                                  persistent_programs local_greedy persistent_small
                                                  token_window prefill_pdl gluon_scan_sweep
                                                  gluon_scan_models scan_once lane_scan_alone
                                                  lane_scan_sweep lane_scan_models]

launch_costs: host microseconds per call of each kernel wrapper (why prefill is captured in graphs);
prefill_profile: cProfile of an eager-then-graphed 130m prefill; ssm_decode_sweep: its tiles at 2.8b's width;
step_sweep: the decode step of 16 blocks of 2.8b width (1.3 GB, past L2) with x_proj tile variants;
step_parts: that step with kernels left out (what each one adds);
prefill_sweep: a 2048-token prefill through those blocks for scan and conv configs (in context, interleaved rounds);
chunk_sweep: a 2048-token prefill through whole models in pieces of 1024 and 2048 tokens, and its memory;
scan_sweep: the scan alone at 1024 tokens (L2-warm: context changes the order, see prefill_sweep);
prefill_kernels: that prefill's kernels by time; read_ceiling: how fast a 52 MB weight can be read at all;
conv_sweep: the prefill conv alone, its kernels and configs; prefill_gaps: where a graphed prefill idles;
persistent_stages: where the persistent step's time goes (each program's %globaltimer at its stages), against the
four kernels; persistent_knobs: the persistent step's knobs (ring slot size, bytes in flight, consumer warps);
persistent_widths: the persistent step against the four kernels at 790m's width; persistent_overhead: its
fixed cost a step (4, 16, 64 blocks); persistent_programs: one program an SM (an uneven split) against 128;
local_greedy: a local session's greedy decode, pipelined against waited for and against logits to the host;
persistent_small: the persistent step against the four kernels on whole 130m and 790m-width stacks;
token_window: bench_gpu's token row for windows of 5, 20 and 50 back-to-back tokens; prefill_pdl: a 2048-token
prefill with the prefill's own kernels launched with PDL and without; gluon_scan_sweep: the Gluon scan's tiles and
segments against the Triton scan (16 blocks); gluon_scan_models: both scans in whole-model prefills; scan_once:
each scan once at 2.8b's width, for ncu; lane_scan_alone: the lane scan's tiles and segments against the others,
alone at 2.8b's and 130m's widths; lane_scan_sweep: the same in context (16 blocks of each width); lane_scan_models:
the lane scan against the "seq" scan in whole-model prefills.
"""
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench_gpu import (MODELS, cuda_ms, graph_ms, hf_model, scan_inputs_28b, top_kernels,  # noqa: E402
                       wide_block_tensors)
from swarm.kernels import triton_decode as td  # noqa: E402
from swarm.kernels import triton_ops as tk  # noqa: E402
from swarm.kernels import triton_scan as ts  # noqa: E402
from swarm.model import BlockStack, MambaConfig  # noqa: E402
from swarm.model import graphs  # noqa: E402
from swarm.model.graphs import GraphDecoder  # noqa: E402

dev = "cuda"


def host_us(fn, n=300):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def launch_costs():
    bf = dict(device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, 8, 64, **bf)
    w = torch.randn(128, 64, **bf)
    nw = torch.ones(64, **bf)
    r = torch.randn(1, 8, 64, device=dev)
    u = torch.randn(1, 64, 16, **bf)
    cs = torch.zeros(1, 64, 4, device=dev)
    cw = torch.randn(64, 4, **bf)
    A = -torch.rand(64, 16, device=dev)
    Dv, bias = torch.randn(64, device=dev), torch.randn(64, device=dev)
    bm = torch.randn(1, 16, 16, **bf)
    st = torch.zeros(1, 64, 16, device=dev)
    u2 = torch.randn(1, 16, 1024, **bf)
    bm2 = torch.randn(1, 1024, 16, **bf)
    st2 = torch.zeros(1, 16, 16, device=dev)
    A2, D2, b2 = A[:16].contiguous(), Dv[:16].contiguous(), bias[:16].contiguous()
    y = torch.empty(8, 64, **bf)
    ops = {
        "torch.empty": lambda: torch.empty(8, 64, **bf),
        "F.linear": lambda: F.linear(x, w),
        "torch.add": lambda: torch.add(r, r),
        "tk.rms_norm": lambda: tk.rms_norm(r, nw, 1e-5),
        "raw _rms_norm_kernel[grid]": lambda: tk._rms_norm_kernel[(8,)](r, r, nw, y, y, 64, 64, 0, 64, 0, 1e-5,
                                                                       HAS_DELTA=False, BLOCK_D=64),
        "tk.add_rms_norm": lambda: tk.add_rms_norm(r, x, nw, 1e-5),
        "tk.causal_conv1d T=16": lambda: tk.causal_conv1d(u, cs, cw, None),
        "tk.selective_scan T=16 (1 launch)": lambda: tk.selective_scan(u, u, A, bm, bm, Dv, u, bias, st,
                                                                      out_dtype=torch.bfloat16),
        "tk.selective_scan T=1024 (2 launches+2 empty)": lambda: tk.selective_scan(
            u2, u2, A2, bm2, bm2, D2, u2, b2, st2, out_dtype=torch.bfloat16),
    }
    for name, fn in ops.items():
        print(f"host {name:55s} {host_us(fn):7.1f} us/call")


def prefill_profile():
    hf_cfg, hf = hf_model("130m")
    cfg = MambaConfig.from_dict(hf_cfg.to_dict())
    stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, hf.state_dict(), device=dev)
    dec = GraphDecoder(stack, max_slots=2, buckets=(1,))
    slot = dec.alloc_slot()
    for t in (2048, 16):
        hidden = torch.randn(1, t, cfg.hidden_size, device=dev)
        ms = cuda_ms(lambda: dec.prefill(slot, hidden), iters=5, warmup=2)
        h = host_us(lambda: dec.prefill(slot, hidden), n=5)
        print(f"130m prefill T={t}: {ms:.2f} ms (host loop {h / 1e3:.2f} ms)")
    hidden = torch.randn(1, 2048, cfg.hidden_size, device=dev)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(3):
        dec.prefill(slot, hidden)
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue())


def ssm_decode_sweep():
    i, n, r = 5120, 16, 160
    for b in (1, 8):
        xc = torch.randn(b, i, device=dev, dtype=torch.bfloat16)
        dbc = torch.randn(b, 1, r + 2 * n, device=dev)
        wdt = torch.randn(i, r, device=dev, dtype=torch.bfloat16) * 0.05
        A = -torch.rand(i, n, device=dev)
        Dv, bias = torch.randn(i, device=dev), torch.randn(i, device=dev) - 4
        z = torch.randn(b, i, device=dev, dtype=torch.bfloat16)
        pool = torch.zeros(17, i, n, device=dev)
        idx = torch.arange(b, device=dev)
        out = []
        for cfg in [(32, 4), (16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (64, 2), (64, 4), (8, 1), (128, 4)]:
            try:
                ms = graph_ms(lambda: td.ssm_decode(xc, dbc, wdt, A, Dv, z, bias, pool, idx, config=cfg))
                out.append(f"{cfg}: {ms * 1e3:.1f}")
            except Exception as e:
                out.append(f"{cfg}: failed {type(e).__name__}")
        print(f"ssm_decode 2.8b b={b} us: " + "; ".join(out))


def _whole_model(name):
    """A whole model of random bf16 weights on the GPU: (config, its blocks' stack, its head)."""
    from swarm.model import Head
    cfg = MambaConfig.from_dict(MODELS[name])
    tensors = wide_block_tensors(cfg, cfg.num_layers)
    bf = dict(device=dev, dtype=torch.bfloat16)
    tensors["backbone.embeddings.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size, **bf) * 0.02
    tensors["backbone.norm_f.weight"] = torch.ones(cfg.hidden_size, **bf)
    stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device=dev, pack=True)
    return cfg, stack, Head.from_tensors(cfg, tensors, device=dev)


def _wide_stack(layers, model="2.8b"):
    cfg = MambaConfig.from_dict(dict(MODELS[model], num_hidden_layers=layers))
    return cfg, BlockStack.from_tensors(cfg, 0, layers, wide_block_tensors(cfg, layers), device=dev,
                                                pack=True)


def prefill_sweep(scans=None, convs=None, model="2.8b", rounds=1, chunk=None):
    """Prefill of 2048 tokens through 16 blocks of 2.8b width (graphs), for scan and conv configs: in context.

    rounds > 1: every config is measured once a round, the rounds interleaved (clocks drift by a few % a minute)."""
    cfg, stack = _wide_stack(16, model)
    hidden = torch.randn(1, 2048, cfg.hidden_size, device=dev)
    # wider channel tiles cost fewer instructions a state element (fewer shuffles and per-token loads per element;
    # PTX: 17 a state element per token at (16, 1), 13 at (64, 2), 11 at (128, 2)) but hold more registers
    if scans is None:
        scans = [("seq", 16, 1, 0, 2), ("seq", 32, 1, 0, 2), ("seq", 32, 1, 0, 3), ("seq", 32, 1, 32, 2),
                 ("seq", 32, 1, 8, 2), ("seq", 64, 2, 0, 3), ("seq", 64, 1, 0, 2), ("seq", 128, 4, 0, 3)]
    if convs is None:
        convs = [("seq", 32, 128, 1, 3), ("seq", 32, 64, 1, 3), ("seq", 32, 128, 1, 4), ("seq", 64, 64, 2, 3),
                 ("seq", 32, 96, 1, 3), (32, 64, 4), (64, 64, 4), (32, 128, 4)]
    default = ts.SCAN_CONFIG, tk.CONV_CONFIG, ts.SCAN_GLUON, ts.SCAN_LANE
    ts.SCAN_GLUON = ts.SCAN_LANE = False  # SCAN_CONFIG is then the scan everywhere, the Gluon ones included
    runs = []
    for what, conf in [("scan", c) for c in scans] + [("conv", c) for c in convs]:
        ts.SCAN_CONFIG, tk.CONV_CONFIG = (conf, default[1]) if what == "scan" else (default[0], conf)
        try:  # captured under this config: the graph keeps it
            dec = GraphDecoder(stack, max_slots=2, buckets=(1,), prefill_chunk=chunk)
            sl = dec.alloc_slot()
            dec.prefill(sl, hidden)
            runs.append((f"{what} {conf}", dec, sl))
        except Exception as e:
            print(f"prefill {what} {conf}: failed {type(e).__name__}: {str(e)[:200]}")
    ts.SCAN_CONFIG, tk.CONV_CONFIG, ts.SCAN_GLUON, ts.SCAN_LANE = default
    times = _prefill_rounds(runs, hidden, rounds)
    for name, _, _ in runs:
        each = " ".join(f"{t:.2f}" for t in times[name])
        print(f"prefill 2048, 16 blocks {model}, pieces of {chunk or 'auto'}, {name}: {min(times[name]):.2f} ms "
              f"(rounds: {each})")


def _prefill_rounds(runs, hidden, rounds):
    """{key: [ms, one a round]} for runs of (key, GraphDecoder, slot), each prefilling `hidden` once a round."""
    times = {}
    for _ in range(rounds):
        for key, dec, sl in runs:
            times.setdefault(key, []).append(cuda_ms(lambda: dec.prefill(sl, hidden), iters=5, warmup=2))
    return times


def chunk_sweep(rounds=3):
    """A 2048-token prefill through every block of 130m and 2.8b with prefill pieces of 1024 and 2048 tokens
    (interleaved rounds), and what each decoder adds to the allocator's peak over the weights and the state pool."""
    for model in ("130m", "2.8b"):
        cfg, stack = _wide_stack(MODELS[model]["num_hidden_layers"], model)
        weights = sum(p.numel() * p.element_size() for p in stack.parameters())
        hidden = torch.randn(1, 2048, cfg.hidden_size, device=dev)
        runs = []
        for chunk in (1024, 2048):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            dec = GraphDecoder(stack, max_slots=16, buckets=(1, 2, 4, 8), prefill_chunk=chunk)
            pool = (dec.conv.numel() + dec.ssm.numel()) * 4
            sl = dec.alloc_slot()
            dec.prefill(sl, hidden)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base - pool
            print(f"{model}: prefill pieces of {chunk}: peak over weights and states {extra / 2**20:.0f} MiB "
                  f"({extra / weights * 100:.1f}% of the weights, {weights / 2**30:.2f} GiB)")
            runs.append((chunk, dec, sl))
        times = _prefill_rounds(runs, hidden, rounds)
        for chunk, each in times.items():
            print(f"{model}: prefill 2048 tokens, all {cfg.num_layers} blocks, pieces of {chunk}: {min(each):.2f} ms "
                  f"(rounds: {' '.join(f'{t:.2f}' for t in each)})")
        runs = stack = dec = None  # noqa: F841  (free the model before the next one)
        torch.cuda.empty_cache()


def prefill_kernels():
    """Where a graphed 2048-token prefill through 16 blocks of 2.8b width spends its time (torch.profiler)."""
    cfg, stack = _wide_stack(16)
    hidden = torch.randn(1, 2048, cfg.hidden_size, device=dev)
    dec = GraphDecoder(stack, max_slots=2, buckets=(1,))
    sl = dec.alloc_slot()
    print(f"prefill 2048, 16 blocks: {cuda_ms(lambda: dec.prefill(sl, hidden), iters=7, warmup=2):.2f} ms (graphs)")
    top_kernels(lambda: dec.prefill(sl, hidden), "prefill 2048 x 16 blocks (graph replays)", n=10)


@triton.jit
def _read_kernel(w_ptr, out_ptr, n_elem, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(ITERS):
        off = (pid + k * nprog).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + off, mask=off < n_elem, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_ceiling():
    """How fast a 52 MB weight (2.8b's in_proj) can be read at all, next to norm_gemv streaming it (8 copies: no L2)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copies = [torch.randn(10240, 2560, device=dev, dtype=torch.bfloat16) for _ in range(8)]
    mb, ne = copies[0].numel() * 2 / 1e6, copies[0].numel()
    out = torch.empty(1 << 16, device=dev)
    turn = [0]

    def nxt():
        turn[0] = (turn[0] + 1) % len(copies)
        return copies[turn[0]]

    for block, progs in [(8192, sms * 2), (2048, sms * 8), (8192, sms * 8)]:
        iters = triton.cdiv(ne, block * progs)
        ms = graph_ms(lambda: _read_kernel[(progs,)](nxt(), out, ne, BLOCK=block, ITERS=iters, num_warps=8), reps=16)
        print(f"read {mb:.0f} MB, BLOCK={block} programs={progs}: {ms * 1e3:.1f} us, {mb / ms * 1e-3:.2f} TB/s")
    x, nw = torch.randn(1, 2560, device=dev), torch.ones(2560, device=dev, dtype=torch.bfloat16)
    ms = graph_ms(lambda: td.norm_gemv(x, nw, 1e-5, nxt(), None), reps=16)
    print(f"norm_gemv in_proj {td.GEMV_IN_CONFIG}: {ms * 1e3:.1f} us, {mb / ms * 1e-3:.2f} TB/s")


def step_sweep():
    """Decode step of 16 blocks of 2.8b width (1.3 GB: no L2 reuse): PDL variants and the GEMVs' tiles."""
    cfg, stack = _wide_stack(16)
    dm = cfg.hidden_size
    default = (td.GEMV_IN_CONFIG, td.GEMV_OUT_CONFIG, td.GEMV_XPROJ_CONFIG)
    early_default = td.PDL_EARLY
    ssm_only, no_in = frozenset({"ssm_decode"}), frozenset({"ssm_decode", "gemv", "gemv_residual"})
    every = no_in | {"norm_gemv"}
    variants = [("default", {}, None, None, early_default), ("default without PDL", {}, None, False, frozenset()),
                ("PDL early: none", {}, None, None, frozenset()),
                ("ssm_decode reads its state after the wait", dict(state_early=False), None, None, early_default),
                ("PDL early: ssm_decode", {}, None, None, ssm_only),
                ("PDL early: all but in_proj", {}, None, None, no_in),
                ("PDL early: all", {}, None, None, every)]
    for early in (frozenset(), every):
        for c in [(4, 4), (4, 2), (2, 2), (2, 1)]:
            variants.append((f"in_proj {c} early {len(early)}", {}, (c, default[1], default[2]), None, early))
        for c in [(1, 1), (4, 4), (1, 2), (8, 8)]:
            variants.append((f"out_proj {c} early {len(early)}", {}, (default[0], c, default[2]), None, early))
        for c in [(1, 1), (4, 4), (1, 2)]:
            variants.append((f"x_proj {c} early {len(early)}", {}, (default[0], default[1], c), None, early))
    for name, kw, configs, pdl, early in variants:
        td.GEMV_IN_CONFIG, td.GEMV_OUT_CONFIG, td.GEMV_XPROJ_CONFIG = configs or default
        td.PDL, td.PDL_EARLY = pdl, early
        kw = dict(kw)
        graphs.SSM_STATE_EARLY = kw.pop("state_early", True)
        try:
            dec = GraphDecoder(stack, max_slots=4, buckets=(1,), **kw)
            sl = [dec.alloc_slot()]
            h1 = torch.randn(1, 1, dm, device=dev)
            ms = cuda_ms(lambda: dec.step(sl, h1), iters=20, inner=10)
            print(f"step 16 blocks 2.8b b=1 {name:35s} {ms * 1e3 / 16:.1f} us/block")
        except Exception as e:
            print(f"step {name}: failed {type(e).__name__}: {str(e)[:200]}")
    td.GEMV_IN_CONFIG, td.GEMV_OUT_CONFIG, td.GEMV_XPROJ_CONFIG = default
    td.PDL, td.PDL_EARLY = None, early_default
    graphs.SSM_STATE_EARLY = True


def step_parts():
    """What each kernel of the b=1 decode step adds: 16 blocks of 2.8b width (PDL chain, one graph) with parts of
    the block left out (the outputs are meaningless; the launches, the bytes and the dependencies are real)."""
    cfg, stack = _wide_stack(16)
    dec = GraphDecoder(stack, max_slots=2, buckets=(1,))  # its weights views and state pools
    n = cfg.intermediate_size
    idx = torch.zeros(1, dtype=torch.int64, device=dev)
    res = torch.randn(1, cfg.hidden_size, device=dev)

    def chain(parts):
        def run():
            for j, w in enumerate(dec._w):
                conv = (dec.conv[j], w.conv_w, w.conv_b, idx)
                xz = td.norm_gemv(res, w.norm_w, w.eps, w.in_w, w.in_b, conv=conv) if "in" in parts else None
                y = xz[:, :n] if xz is not None else torch.zeros(1, n, device=dev, dtype=w.in_w.dtype)
                if "x" in parts:
                    dbc = td.gemv(y, w.x_w).unsqueeze(1)
                    if "ssm" in parts:
                        y = td.ssm_decode(y, dbc, w.dt_w, w.A, w.D, xz[:, n:], w.dt_b, dec.ssm[j], idx,
                                          out_dtype=dec.dtype, state_early=True)
                if "out" in parts:
                    td.gemv_residual(y, w.out_w, w.out_b, res)
        return run

    for parts in [("in", "x", "ssm", "out"), ("in", "x", "out"), ("in", "out"), ("in",), ("out",), ("in", "x"),
                  ("in", "x", "ssm")]:
        ms = graph_ms(chain(parts), reps=4, iters=10)
        print(f"step parts {'+'.join(parts):16s} {ms * 1e3 / 16:.1f} us/block")


def scan_sweep():
    i, t = 5120, 1024
    args = scan_inputs_28b(t)
    for config in [("seq", 16, 2, 4), ("seq", 16, 2, 8), ("seq", 16, 1, 8), ("seq", 16, 1, 16), ("seq", 32, 2, 8),
                   ("seq", 32, 2, 16), ("seq", 16, 2, 16), ("seq", 8, 1, 16), ("seq", 32, 1, 16), ("seq", 16, 1, 32),
                   ("chunk", 16, 16, 4), ("chunk", 32, 8, 4)]:
        try:
            ms = graph_ms(lambda: ts.selective_scan(*args, out_dtype=torch.bfloat16, config=config), reps=4, iters=5)
            print(f"scan 1x{i}x{t} {config}: {ms * 1e3:.1f} us")
        except Exception as e:
            print(f"scan {config}: failed {type(e).__name__}: {str(e)[:150]}")


def conv_sweep():
    """The prefill conv alone at 2.8b's width, 2048 tokens of in_proj's strided x half (4 inputs: past L2), for the
    tile kernel and token-loop configs; every config must give the first one's bits."""
    t, dim = 2048, 5120
    bf = dict(dtype=torch.bfloat16, device=dev)
    xzs = [torch.randn(1, t, 2 * dim, **bf) for _ in range(4)]
    w, bb = torch.randn(dim, 4, **bf) * 0.5, torch.randn(dim, **bf)
    st0 = torch.randn(1, dim, 4, device=dev)
    length = torch.tensor([t - 5], dtype=torch.int32, device=dev)
    default, base = tk.CONV_CONFIG, None
    for c in [tk.CONV_TILE, ("seq", 32, 128, 1, 3), ("seq", 32, 128, 1, 4), ("seq", 32, 64, 1, 3),
              ("seq", 32, 96, 1, 3), ("seq", 64, 64, 2, 3), ("seq", 64, 128, 1, 3), ("seq", 32, 256, 1, 4)]:
        tk.CONV_CONFIG = c
        st = st0.clone()
        y = tk.causal_conv1d(xzs[0][..., :dim].transpose(1, 2), st, w, bb, length=length)
        base = base or (y.clone(), st.clone())
        same = torch.equal(y, base[0]) and torch.equal(st, base[1])
        k = [0]

        def run():
            k[0] = (k[0] + 1) % len(xzs)
            tk.causal_conv1d(xzs[k[0]][..., :dim].transpose(1, 2), st, w, bb, length=length)
        print(f"conv {str(c):24s}: {graph_ms(run, reps=16) * 1e3:6.1f} us, the tile kernel's bits: {same}")
    tk.CONV_CONFIG = default


def prefill_gaps(layers=64):
    """Where a graphed 2048-token prefill through `layers` blocks of 2.8b width idles between kernels (a profiler
    trace: the gaps summed by the pair of kernels around them)."""
    import collections
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    cfg, stack = _wide_stack(layers)
    hidden = torch.randn(1, 2048, cfg.hidden_size, device=dev)
    dec = GraphDecoder(stack, max_slots=2, buckets=(1,))
    sl = dec.alloc_slot()
    dec.prefill(sl, hidden)
    print(f"prefill 2048 x {layers} blocks: {cuda_ms(lambda: dec.prefill(sl, hidden), iters=7, warmup=2):.3f} ms")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.prefill(sl, hidden)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    ev = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                key=lambda e: e["ts"])
    gaps = collections.defaultdict(lambda: [0, 0.0])
    for a, b in zip(ev, ev[1:]):
        key = (a["name"].split("<")[0][:40], b["name"].split("<")[0][:40])
        gaps[key][0] += 1
        gaps[key][1] += b["ts"] - (a["ts"] + a["dur"])
    busy = sum(e["dur"] for e in ev)
    span = ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]
    print(f"{len(ev)} kernels over {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms")
    for (a, b), (n, us) in sorted(gaps.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {us / 1e3:7.3f} ms {n:5d}x {us / n:6.2f} us  {a} -> {b}")


def persistent_stages(layers=16):
    """The persistent step (gluon_step) at 2.8b width: each stage's time over programs (median / max, the mean
    over blocks), then the graphed step against the four-kernel one, interleaved."""
    cfg, stack = _wide_stack(layers)
    pers = GraphDecoder(stack, max_slots=2, buckets=(1,), step="persistent")
    kern = GraphDecoder(stack, max_slots=2, buckets=(1,), step="kernels")
    ps = pers._persistent
    res = torch.randn(1, cfg.hidden_size, device=dev)
    idx = torch.zeros(1, dtype=torch.int64, device=dev)
    T = torch.zeros(layers, ps.plan.G, 16, dtype=torch.int64, device=dev)
    for _ in range(3):
        ps.step(res, idx, T)
    torch.cuda.synchronize()
    t = (T.double() - T[0, :, 0].double().min()) / 1e3
    names = ["wait C", "x rows, conv, x_proj's share", "z rows (queue), release A", "wait A",
             "SSM step", "release B", "wait B", "gate, out_proj (queue)"]
    order = [0, 1, 2, 3, 4, 5, 8, 6, 7]
    for k, name in enumerate(names):
        part = t[2:-1, :, order[k + 1]] - t[2:-1, :, order[k]]
        print(f"persistent {ps.plan}: {name:36s} {part.median(1).values.mean().item():6.2f} / "
              f"{part.max(1).values.mean().item():6.2f} us")
    h = torch.randn(1, 1, cfg.hidden_size, device=dev)
    decs = {"kernels": (kern, [kern.alloc_slot()]), "persistent": (pers, [pers.alloc_slot()])}
    for r in range(3):
        for name, (d, sl) in decs.items():
            ms = cuda_ms(lambda: d.step(sl, h), iters=20, inner=10)
            print(f"round {r} step 16 blocks 2.8b b=1 {name:10s} {ms * 1e3 / layers:.1f} us/block", flush=True)


def persistent_knobs(layers=16):
    """The persistent step at 2.8b width for (slot KB, bytes in flight KB, consumer warps) variants, graphed,
    interleaved rounds."""
    from swarm.kernels import gluon_step
    cfg, stack = _wide_stack(layers)
    h = torch.randn(1, 1, cfg.hidden_size, device=dev)
    decs = {}
    for key in [(8, 24, 4), (8, 32, 4), (16, 32, 4), (16, 48, 4), (8, 24, 8), (16, 32, 8)]:
        gluon_step.SLOT_BYTES, gluon_step.FLIGHT_BYTES = (key[0] << 10,), key[1] << 10
        gluon_step.CONSUMER_WARPS = key[2]
        try:
            d = GraphDecoder(stack, max_slots=2, buckets=(1,), step="persistent")
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit is reported, not fatal
            print(f"slot KB, flight KB, warps {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        decs[key] = (d, [d.alloc_slot()])
    for r in range(3):
        for key, (d, sl) in decs.items():
            ms = cuda_ms(lambda: d.step(sl, h), iters=20, inner=10)
            print(f"round {r} slot KB, flight KB, warps {key}: {ms * 1e3 / layers:.1f} us/block", flush=True)


def persistent_programs(layers=16, rounds=4):
    """The persistent step at 2.8b width with one program an SM (132 on an H100: an uneven split of the channels)
    against 128 programs (the even split), graphed, interleaved rounds; 16 and 64 blocks."""
    from swarm.kernels import gluon_step
    runs = {}
    for n in (layers, 64):
        cfg, stack = _wide_stack(n)
        h = torch.randn(1, 1, cfg.hidden_size, device=dev)
        for programs in (128, 0):
            gluon_step.PROGRAMS = programs
            d = GraphDecoder(stack, max_slots=2, buckets=(1,), step="persistent")
            print(f"{n} blocks, PROGRAMS={programs}: {d._persistent.plan}", flush=True)
            runs[(n, d._persistent.plan.G)] = (d, [d.alloc_slot()], h)
    gluon_step.PROGRAMS = 0
    for r in range(rounds):
        for (n, g), (d, sl, h) in runs.items():
            ms = cuda_ms(lambda: d.step(sl, h), iters=20, inner=10)
            print(f"round {r} {n:2d} blocks 2.8b b=1, {g} programs: {ms * 1e3 / n:.2f} us/block, {ms:.3f} ms a step",
                  flush=True)


def local_greedy(rounds=3):
    """A local session's greedy decode (swarm generate --local --device cuda), ms a token from two generate()
    lengths: the token after each one queued before its value reaches the host (LocalSession), against each token
    waited for before the next is queued, and against the logits brought to the host
    and picked there (keep_logits: step_logits, as before step_greedy); whole models of random weights."""
    from bench_gpu import local_greedy_ms
    from swarm.client.generation import Next
    from swarm.client.local import LocalSession

    class Serial(LocalSession):
        def _take(self, pick, feed):  # the pick's value first, then the step that feeds it
            tok = int(pick[0, 0])
            if not feed:
                return tok, None
            picks, logits = self.decoder.step_greedy([self.slot], torch.tensor([[tok]]), logits=True)
            return tok, Next(logits[0], picks)

    for name in ("130m", "2.8b"):
        cfg, stack, head = _whole_model(name)
        d = GraphDecoder(stack, max_slots=2, buckets=(1,), head=head)
        for r in range(rounds):
            for what, cls, keep in (("fed ahead (LocalSession)", LocalSession, False),
                                    ("each token waited for", Serial, False),
                                    ("logits to the host", LocalSession, True)):
                ms = local_greedy_ms(cfg, stack, head, d, session=cls, keep_logits=keep, rounds=1)
                print(f"round {r} {name} local greedy decode, {what:26s}: {ms:.3f} ms/token", flush=True)
        del d, stack, head
        torch.cuda.empty_cache()


def _whole_prefills(flag, settings, rounds):
    """A 2048-token prefill through whole 130m and 2.8b models (graphs), one decoder for each (label, value) of
    `settings` captured with triton_scan's `flag` (read at capture) set to the value, interleaved rounds."""
    default = getattr(ts, flag)
    for name in ("130m", "2.8b"):
        cfg, stack = _wide_stack(MODELS[name]["num_hidden_layers"], name)
        hidden = torch.randn(1, 2048, cfg.hidden_size, device=dev)
        decs = {}
        for label, value in settings:
            setattr(ts, flag, value)
            d = GraphDecoder(stack, max_slots=2, buckets=(1,))
            slot = d.alloc_slot()
            d.prefill(slot, hidden)  # captures with this setting
            decs[label] = (d, slot)
        setattr(ts, flag, default)
        outs = [d.prefill(s, hidden) for d, s in decs.values()]
        scale = outs[0].abs().max().item()
        print(f"{name}: outputs differ by {(outs[0] - outs[1]).abs().max().item():.2e} (scale {scale:.2e})", flush=True)
        for r in range(rounds):
            for label, (d, s) in decs.items():
                ms = cuda_ms(lambda: d.prefill(s, hidden), iters=5, warmup=2)
                print(f"round {r} {name} prefill 2048, {label}: {ms:.2f} ms", flush=True)
        del decs, stack
        torch.cuda.empty_cache()


def prefill_pdl(rounds=4):
    """The prefill's own kernels launched with PDL against without (triton_scan.PREFILL_PDL), whole models."""
    _whole_prefills("PREFILL_PDL", [("PDL off", False), ("PDL on", True)], rounds)


def gluon_scan_sweep(rounds=3):
    """The Gluon scan's tiles and segments against the Triton "seq" scan, in a 2048-token prefill through 16 blocks
    of 2.8b width (graphs, interleaved rounds)."""
    prefill_sweep(scans=[ts.SCAN_CONFIG, ("gluon", 32, 8), ("gluon", 32, 8, 11), ("gluon", 32, 8, 8),
                         ("gluon", 32, 8, 16, 128), ("gluon", 32, 8, 6), ("gluon", 32, 16), ("gluon", 64, 8),
                         ("gluon", 16, 8)], convs=[], rounds=rounds)


def scan_once(configs=(("seq", 32, 1, 0, 2), ("gluon", 32, 8))):
    """Each scan config once at 2.8b's width, 2048 tokens, after a compile run on other inputs (for ncu)."""
    warm = scan_inputs_28b(64)
    args = scan_inputs_28b(2048)
    for conf in configs:
        ts.selective_scan(*warm, out_dtype=torch.bfloat16, config=conf)
    torch.cuda.synchronize()
    for conf in configs:
        ts.selective_scan(*args, out_dtype=torch.bfloat16, config=conf)
    torch.cuda.synchronize()
    print("scan_once done", flush=True)


def gluon_scan_models(rounds=4):
    """The Gluon scan against the Triton "seq" scan (triton_scan.SCAN_GLUON), whole models."""
    _whole_prefills("SCAN_GLUON", [("triton scan", False), ("gluon scan", True)], rounds)


def lane_scan_alone():
    """The scan alone (graphs of 4 calls, L2-cold inputs of 2048 tokens) at 2.8b's width and 130m's: the "seq" and
    Gluon scans against the lane scan's turns, warps and segments. Returns {model: (ms, fastest config)}."""
    best = {}
    for name, width in (("2.8b", 5120), ("130m", 1536)):
        args = scan_inputs_28b(2048)
        args = tuple(a[:, :width] if k in (0, 1, 6) else a[:width] if k in (2, 5, 7) else a[:, :width]
                     if k == 8 else a for k, a in enumerate(args))
        args = tuple(a.contiguous() if k in (2, 5, 7, 8) else a for k, a in enumerate(args))
        lane = [("lane", 16, 1), ("lane", 16, 4), ("lane", 16, 4, 0, None, 1, True), ("lane", 16, 1, 0, None, 2),
                ("lane", 16, 4, 0, None, 2), ("lane", 16, 8, 0, None, 2), ("lane", 16, 4, 0, None, 2, True),
                ("lane", 16, 2, 0, None, 2, True)]
        if name == "130m":
            lane += [("lane", 16, 4, 4), ("lane", 16, 4, 6, None, 2), ("lane", 16, 4, 6, None, 2, True)]
        for config in [ts.SCAN_CONFIG, ts.GLUON_SCAN_CONFIG] + lane:
            try:
                ms = graph_ms(lambda: ts.selective_scan(*args, out_dtype=torch.bfloat16, config=config), reps=4,
                              iters=7)
                print(f"scan alone {name} width, 2048 tokens, {config}: {ms * 1e3:.1f} us", flush=True)
                best[name] = min(best.get(name, (ms, config)), (ms, config))
            except Exception as e:
                print(f"scan alone {name} {config}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
    return best


def lane_scan_sweep(rounds=3):
    """The lane scan's configs against the "seq" scan, in a 2048-token prefill through 16 blocks (graphs,
    interleaved rounds), at 2.8b's and 130m's widths."""
    prefill_sweep(scans=[ts.SCAN_CONFIG, ("lane", 16, 1), ("lane", 16, 2), ("lane", 8, 1), ("lane", 32, 1)],
                  convs=[], rounds=rounds)
    prefill_sweep(scans=[ts.SCAN_CONFIG, ("lane", 16, 1), ("lane", 16, 1, 2), ("lane", 16, 1, 4), ("lane", 16, 1, 6)],
                  convs=[], rounds=rounds, model="130m")


def lane_scan_models(rounds=4):
    """The lane scan against the "seq" scan (triton_scan.SCAN_LANE), whole models."""
    _whole_prefills("SCAN_LANE", [("seq scan", False), ("lane scan", True)], rounds)


def token_window(rounds=3):
    """bench_gpu's token row (step_greedy back to back, each pick the next input, CUDA events around `inner` tokens)
    for windows of 5, 20 and 50 tokens, whole 2.8b model of random weights, interleaved rounds: what a window's
    first launch adds to a token."""
    _, stack, head = _whole_model("2.8b")
    d = GraphDecoder(stack, max_slots=2, buckets=(1,), head=head)
    slot = d.alloc_slot()
    ids = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def token():
        nonlocal ids
        ids = d.step_greedy([slot], ids)

    for r in range(rounds):
        for inner in (5, 20, 50):
            ms = cuda_ms(token, iters=10, inner=inner)
            print(f"round {r} 2.8b token graph, windows of {inner:2d} tokens: {ms:.3f} ms/token", flush=True)


def _kernels_against_persistent(label, cfg, layers, rounds, inner):
    """The b=1 graphed step of a stack of `layers` random blocks of `cfg`: four kernels a block against the
    persistent kernel, interleaved rounds."""
    stack = BlockStack.from_tensors(cfg, 0, layers, wide_block_tensors(cfg, layers), device=dev, pack=True)
    h = torch.randn(1, 1, cfg.hidden_size, device=dev)
    decs = {}
    for step in ("kernels", "persistent"):
        d = GraphDecoder(stack, max_slots=2, buckets=(1,), step=step)
        decs[step] = (d, [d.alloc_slot()])
    print(f"{label}: {decs['persistent'][0]._persistent.plan}", flush=True)
    a, b = (d.step(sl, h) for d, sl in decs.values())
    print(f"{label}: outputs differ by {(a - b).abs().max().item():.2e} (scale {a.abs().max().item():.2e})")
    for r in range(rounds):
        for step, (d, sl) in decs.items():
            ms = cuda_ms(lambda: d.step(sl, h), iters=20, inner=inner)
            print(f"round {r} {label} {layers} blocks b=1 {step:10s} {ms * 1e3:.1f} us a step, "
                  f"{ms * 1e3 / layers:.2f} us a block", flush=True)


def persistent_small(rounds=3):
    """The b=1 graphed step of whole 130m and 790m-width stacks (24 and 48 blocks): four kernels a block against the
    persistent kernel, which fits 130m's width since its plan takes uneven channel splits; interleaved rounds."""
    for name, width, layers in (("130m", 768, 24), ("790m", 1536, 48)):
        cfg = MambaConfig.from_dict(dict(MODELS["130m"], hidden_size=width, num_hidden_layers=layers))
        _kernels_against_persistent(name, cfg, layers, rounds, inner=20)


def persistent_widths(layers=16):
    """The b=1 graphed step, four kernels a block against the persistent one, at 790m's width (d_model 1536, the
    other width below 2.8b's that the persistent kernel's plan fits), interleaved rounds."""
    cfg = MambaConfig.from_dict(dict(MODELS["2.8b"], hidden_size=1536, num_hidden_layers=layers))
    _kernels_against_persistent("d_model 1536", cfg, layers, rounds=3, inner=10)


def persistent_overhead():
    """The persistent step's cost a step beyond its blocks: graphed steps of 4, 16 and 64 blocks of 2.8b width
    (GraphDecoder.step, and a graph of the bare kernel with its counters' zeroing), interleaved rounds; the
    intercept of time against blocks is the fixed cost."""
    runs = {}
    for layers in (4, 16, 64):
        cfg, stack = _wide_stack(layers)
        d = GraphDecoder(stack, max_slots=2, buckets=(1,), step="persistent")
        ps, res = d._persistent, torch.randn(1, cfg.hidden_size, device=dev)
        idx = torch.zeros(1, dtype=torch.int64, device=dev)
        g = torch.cuda.CUDAGraph()
        ps.step(res, idx)
        with torch.cuda.graph(g):
            ps.step(res, idx)
        # the graph holds res's and idx's addresses: they live as long as it
        runs[layers] = (d, [d.alloc_slot()], torch.randn(1, 1, cfg.hidden_size, device=dev), g, res, idx)
    for r in range(3):
        for layers, (d, sl, h, g, _, _) in runs.items():
            ms = cuda_ms(lambda: d.step(sl, h), iters=20, inner=10)
            bare = cuda_ms(g.replay, iters=20, inner=10)
            print(f"round {r} {layers:3d} blocks: GraphDecoder.step {ms * 1e3:8.1f} us, bare kernel graph "
                  f"{bare * 1e3:8.1f} us", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    for part in sys.argv[1:] or ["launch_costs", "prefill_profile", "ssm_decode_sweep", "step_sweep", "scan_sweep"]:
        t0 = time.time()
        globals()[part]()
        print(f"--- {part} {time.time() - t0:.0f}s", flush=True)
