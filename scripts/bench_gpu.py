"""GPU benchmark: decode and prefill of random-weight Mamba-130m and -2.8b (bf16) through GraphDecoder + Head.

Next to each number: transformers' MambaForCausalLM on the same weights in the same run, and the memory floor
(bytes of weights read per token over the measured device copy bandwidth). Also a peer's memory for 32 blocks of
2.8b, and the prefill scan's tile configurations. Run on the device machine:
    PYTHONPATH=$PWD python3 scripts/bench_gpu.py [--models 130m,2.8b]
Two peers sharing the GPU over loopback (the real network path): scripts/bench_gpu_swarm.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must not try to fetch hub kernels: no network there

import torch  # noqa: E402

from swarm.kernels import triton_decode as td  # noqa: E402
from swarm.kernels import triton_ops as tk  # noqa: E402
from swarm.kernels import triton_scan as ts  # noqa: E402
from swarm.model import BlockStack, Head, MambaConfig  # noqa: E402
from swarm.model.graphs import GraphDecoder  # noqa: E402

MODELS = {  # HF config fields of the two published sizes
    "130m": dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2),
    "2.8b": dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, conv_kernel=4, expand=2),
}
HF_DECODE_TOKENS = {"130m": (4, 36), "2.8b": (2, 6)}  # transformers is slow: time the difference of two lengths
# decode steps timed back to back per CUDA-event window: the window's first launch, from an idle GPU, costs ~0.15 ms
# (2.8b token graph, H100: windows of 5 / 20 / 50 tokens 2.206-2.210 / 2.187-2.188 / 2.178-2.179 ms a token,
# sweep_gpu.py token_window); 2.8b took windows of 5 until 2026-11-24
TOKEN_WINDOW = 20
ROWS: list[tuple[str, str, str, str, str]] = []


def cuda_ms(fn, iters: int, warmup: int = 3, inner: int = 1) -> float:
    """Median over `iters` timings of `inner` back-to-back fn() calls, in ms per call, by CUDA events.

    Nothing syncs inside a timing, so the host queues work ahead as a serving loop would.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def graph_ms(fn, reps: int = 20, iters: int = 10) -> float:
    """GPU time of one fn() call, from a CUDA graph of `reps` calls: no host launch overhead in the number."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return cuda_ms(g.replay, iters=iters) / reps


def top_kernels(fn, title: str, n: int = 7) -> None:
    """Print the GPU kernels of one fn() call by total time (torch.profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    print(f"{title}: {sum(r[0] for r in rows) / 1e3:.3f} ms of kernels, {sum(r[1] for r in rows)} launches")
    for us, count, key in rows[:n]:
        print(f"  {us / 1e3:8.3f} ms {count:5d}x {us / count:8.1f} us  {key[:100]}")


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written (a 2 GiB copy)."""
    src = torch.randn(2 ** 29, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def hf_model(name: str):
    import transformers
    hf_cfg = transformers.MambaConfig(**MODELS[name], use_cache=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.MambaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return hf_cfg, model.to(torch.bfloat16)


def hf_decode_ms(model, batch: int, lengths: tuple[int, int]) -> float:
    """transformers' decode with its cache: ms per generated token, from two generate() lengths."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 8), device="cuda")

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, use_cache=True, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(lengths[0])  # warm-up
    short, long = min(gen(lengths[0]) for _ in range(2)), min(gen(lengths[1]) for _ in range(2))
    return (long - short) * 1e3 / (lengths[1] - lengths[0])


def local_greedy_ms(cfg: MambaConfig, stack: BlockStack, head: Head, dec: GraphDecoder, session=None,
                    keep_logits: bool = False, lengths: tuple[int, int] = (8, 72), rounds: int = 3) -> float:
    """A local session's greedy decode (`swarm generate --local`: LocalSession.generate, each token's id on the
    host as it comes) in a slot of `dec`: ms a token from two generate() lengths, the median of `rounds`.
    session: the session class (LocalSession); keep_logits: the logits to the host, picked there."""
    from swarm.client.local import LocalModel, LocalSession
    model = LocalModel.__new__(LocalModel)  # its parts, without a KNOT file
    model.name, model.cfg, model.tokenizer = "bench", cfg, None
    model.stack, model.head, model.decoder = stack, head, dec

    def run(n: int) -> float:
        with (session or LocalSession)(model) as s:
            s.keep_logits = keep_logits
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            s.generate([1, 2, 3], n)
            return time.perf_counter() - t0

    run(lengths[0])  # warm-up
    return statistics.median((run(lengths[1]) - run(lengths[0])) * 1e3 / (lengths[1] - lengths[0])
                             for _ in range(rounds))


def bench_model(name: str, bandwidth: float, hf_prefill: bool) -> None:
    hf_cfg, hf = hf_model(name)
    cfg = MambaConfig.from_dict(hf_cfg.to_dict())
    tensors = hf.state_dict()  # shared with transformers' model, but in_proj, x_proj and out_proj: packed copies
    stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device="cuda", pack=True)
    head = Head.from_tensors(cfg, tensors, device="cuda")
    block_bytes = sum(p.numel() * p.element_size() for p in stack.parameters())
    head_bytes = head.embeddings.weight.numel() * head.embeddings.weight.element_size()  # tied lm_head
    floor_ms = (block_bytes + head_bytes) / bandwidth * 1e3
    floor_stack_ms = block_bytes / bandwidth * 1e3
    print(f"[{name}] {cfg.num_layers} blocks, weights {block_bytes / 1e9:.3f} GB + head {head_bytes / 1e9:.3f} GB")

    # the decode step's variants (GraphDecoder's xproj and gemv_batch): the default first
    # (step="auto": b=1 runs the persistent kernel where GraphDecoder picks it, 2.8b; the others are four kernels)
    variants = {"default (auto step; Triton GEMVs at b=1, x_proj too)": dict(xproj="gemv", gemv_batch=1),
                "four kernels a block (step='kernels')": dict(xproj="gemv", gemv_batch=1, step="kernels"),
                "four kernels without PDL": dict(xproj="gemv", gemv_batch=1, pdl=False, step="kernels"),
                "Triton GEMVs at b=1, cuBLAS x_proj": dict(xproj="cublas", gemv_batch=1, step="kernels"),
                "cuBLAS GEMVs": dict(xproj="cublas", gemv_batch=0, step="kernels"),
                "x_proj fused into the conv kernel": dict(xproj="fused", gemv_batch=1, step="kernels")}
    best = 1e9, variants["default (auto step; Triton GEMVs at b=1, x_proj too)"]
    for kind, kw in variants.items():
        kw = dict(kw)
        td.PDL = kw.pop("pdl", None)  # programmatic dependent launch: read by the kernels' wrappers at capture
        dec = GraphDecoder(stack, max_slots=16, buckets=(1, 2, 4, 8), **kw)
        for batch in ((1, 8) if kw["gemv_batch"] == 1 and kw["xproj"] != "fused" else (1,)):
            slots = [dec.alloc_slot() for _ in range(batch)]
            h1 = torch.randn(batch, 1, cfg.hidden_size, device="cuda")
            ms = cuda_ms(lambda: dec.step(slots, h1), iters=20, inner=TOKEN_WINDOW)
            ROWS.append((name, f"decode b={batch}, ms/step, blocks: {kind}", f"{ms:.3f}", "", f"{floor_stack_ms:.3f}"))
            if batch == 1 and ms < best[0]:
                best = ms, kw
            top_kernels(lambda: dec._step_blocks(dec._h_in[batch], dec._idx[batch], dec._h_out[batch]),
                        f"[{name}] eager step b={batch}, {kind}")
            for s in slots:
                dec.free_slot(s)
    print(f"[{name}] decoding below with {best[1]}")
    best_kw = dict(best[1])
    td.PDL = best_kw.pop("pdl", None)
    dec = GraphDecoder(stack, max_slots=16, buckets=(1, 2, 4, 8), head=head, **best_kw)
    for batch in (1, 8):
        slots = [dec.alloc_slot() for _ in range(batch)]
        for s in slots:
            dec.prefill(s, head.embed(torch.randint(0, cfg.vocab_size, (1, 16))))
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")

        def token():  # embed -> blocks -> norm_f + lm_head -> greedy pick, all on the device, no host sync
            nonlocal ids
            ids = head.logits(dec.step(slots, head.embed(ids)))[:, -1].argmax(-1, keepdim=True)

        def token_graph():  # the same, the embedding, the head and the greedy pick inside the replayed graph
            nonlocal ids
            ids = dec.step_greedy(slots, ids)

        py_ms = cuda_ms(token, iters=20, inner=TOKEN_WINDOW)
        ROWS.append((name, f"decode b={batch}, ms/token, + head from Python", f"{py_ms:.3f}", "", ""))
        tok_ms = cuda_ms(token_graph, iters=20, inner=TOKEN_WINDOW)
        hf_ms = hf_decode_ms(hf, batch, HF_DECODE_TOKENS[name])
        ROWS.append((name, f"decode b={batch}, ms/token, + head and greedy pick (one graph)", f"{tok_ms:.3f}",
                     f"{hf_ms:.2f}", f"{floor_ms:.3f}"))
        for s in slots:
            dec.free_slot(s)
        if batch == 1:  # what a user of `swarm generate --local` gets: host included, the next token queued ahead
            ms = local_greedy_ms(cfg, stack, head, dec)
            ROWS.append((name, "decode b=1, ms/token, local greedy generate (LocalSession)", f"{ms:.3f}", "",
                         f"{floor_ms:.3f}"))

    slot = dec.alloc_slot()
    for t in (16, 200):  # short prompts: bound by launches unless graphed
        short = torch.randn(1, t, cfg.hidden_size, device="cuda")
        ms = cuda_ms(lambda: dec.prefill(slot, short), iters=10, warmup=2)
        ROWS.append((name, f"prefill {t} tokens, ms (blocks only)", f"{ms:.2f}", "", ""))
    hidden = torch.randn(1, 2048, cfg.hidden_size, device="cuda")
    pre_ms = cuda_ms(lambda: dec.prefill(slot, hidden), iters=5, warmup=2)
    top_kernels(lambda: dec.prefill(slot, hidden), f"[{name}] prefill 2048")
    hf_pre = ""
    if hf_prefill:  # transformers without mamba-ssm loops over tokens in Python: 130m only
        ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
        with torch.no_grad():
            hf_pre = f"{cuda_ms(lambda: hf(ids), iters=1, warmup=0):.1f}"
    ROWS.append((name, "prefill 2048 tokens, ms (blocks only)", f"{pre_ms:.2f}", hf_pre, ""))


def scan_inputs_28b(t: int) -> tuple:
    """selective_scan's arguments at 2.8b's width for t tokens, bf16, laid out as a block gives them (u and z the
    halves of in_proj's output, B and C slices of x_proj's): u, delta, A, B, C, D, z, delta_bias, state."""
    i, n, r = 5120, 16, 160
    xz = torch.randn(1, t, 2 * i, device="cuda", dtype=torch.bfloat16)
    dbc = torch.randn(1, t, r + 2 * n, device="cuda", dtype=torch.bfloat16)
    delta = (torch.randn(1, t, i, device="cuda") * 0.5).to(torch.bfloat16).transpose(1, 2)
    a = -torch.rand(i, n, device="cuda") * n
    d, bias = torch.randn(i, device="cuda"), torch.randn(i, device="cuda") - 4
    return (xz[..., :i].transpose(1, 2), delta, a, dbc[..., r:r + n], dbc[..., r + n:], d, xz[..., i:].transpose(1, 2),
            bias, torch.zeros(1, i, n, device="cuda"))


def bench_scan_configs() -> None:
    """The chunked scan's tiles at 2.8b's width, T=2048 (bf16 inputs laid out as the block gives them)."""
    i, t = 5120, 2048
    args = scan_inputs_28b(t)
    u = args[0]
    conv_w, conv_state = torch.randn(i, 4, device="cuda", dtype=torch.bfloat16), torch.zeros(1, i, 4, device="cuda")
    conv_ms = graph_ms(lambda: tk.causal_conv1d(u, conv_state, conv_w, None))
    print(f"causal_conv1d 1x{i}x{t} bf16: {conv_ms * 1e3:.1f} us")
    for config in (ts.SCAN_CONFIG, ts.GLUON_SCAN_CONFIG, ("gluon", 64, 8), ("gluon", 32, 16), ("gluon", 16, 8),
                   ("seq", 16, 4), ("seq", 16, 2, 8), ("seq", 16, 1, 16), ("seq", 32, 2, 8), ("seq", 64, 2, 8)):
        try:
            ms = graph_ms(lambda: ts.selective_scan(*args, out_dtype=torch.bfloat16, config=config), reps=4, iters=5)
            print(f"selective_scan 1x{i}x{t} config {config}: {ms * 1e3:.1f} us")
        except Exception as e:  # a tile too large for the registers or shared memory: say so, try the next
            print(f"selective_scan config {config}: failed: {type(e).__name__}: {str(e)[:200]}")


def bench_gemv() -> None:
    """The decode GEMVs alone: fused Triton kernels (configs) vs cuBLAS (+ the separate norm / add), b = 1 and 8."""
    shapes = {"2.8b in_proj": (2560, 10240), "2.8b out_proj": (5120, 2560), "130m in_proj": (768, 3072),
              "130m out_proj": (1536, 768)}
    configs = {"in_proj": [(8, 4), (16, 4), (4, 2), (8, 2), (16, 8), (4, 4), (32, 8), (2, 2)],
               "out_proj": [(4, 4), (8, 4), (2, 2), (8, 2), (2, 1), (16, 8), (4, 1), (1, 1)]}
    for label, (k, n) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        mb = w.numel() * 2 / 1e6
        for b in (1, 2, 8):
            x = torch.randn(b, k, device="cuda")
            xb = x.to(torch.bfloat16)
            res = torch.randn(b, n, device="cuda")
            kind = label.split()[1]
            if kind == "in_proj":
                base = graph_ms(lambda: torch.nn.functional.linear(tk.rms_norm(x, nw, 1e-5), w))
                runs = {c: (lambda c=c: td.norm_gemv(x, nw, 1e-5, w, None, config=c)) for c in configs[kind]}
            else:
                base = graph_ms(lambda: res.add_(torch.nn.functional.linear(xb, w)))
                runs = {c: (lambda c=c: td.gemv_residual(xb, w, None, res, config=c)) for c in configs[kind]}
            out = [f"{label} {mb:.1f} MB b={b}: cublas(+norm/add) {base * 1e3:.1f} us ({mb / base * 1e-3:.2f} TB/s)"]
            for c, fn in runs.items():
                try:
                    ms = graph_ms(fn)
                    out.append(f"{c}: {ms * 1e3:.1f} us ({mb / ms * 1e-3:.2f} TB/s)")
                except Exception as e:
                    out.append(f"{c}: failed {type(e).__name__}")
            print("; ".join(out))


def wide_block_tensors(cfg: MambaConfig, layers: int) -> dict[str, torch.Tensor]:
    """Plausible random bf16 tensors (HF names, on the GPU) for blocks 0..layers-1 of `cfg`."""
    i, n, r, k, dm = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel, cfg.hidden_size
    bf = dict(device="cuda", dtype=torch.bfloat16)
    tensors = {}
    for j in range(layers):
        p = f"backbone.layers.{j}."
        tensors.update({
            p + "norm.weight": torch.ones(dm, **bf), p + "mixer.in_proj.weight": torch.randn(2 * i, dm, **bf) * 0.02,
            p + "mixer.conv1d.weight": torch.randn(i, 1, k, **bf) * 0.3, p + "mixer.conv1d.bias": torch.zeros(i, **bf),
            p + "mixer.x_proj.weight": torch.randn(r + 2 * n, i, **bf) * 0.02,
            p + "mixer.dt_proj.weight": torch.randn(i, r, **bf) * 0.05,
            p + "mixer.dt_proj.bias": torch.full((i,), -4.0, **bf),
            p + "mixer.A_log": torch.log(torch.arange(1, n + 1, **bf)).expand(i, n).contiguous(),
            p + "mixer.D": torch.ones(i, **bf), p + "mixer.out_proj.weight": torch.randn(dm, i, **bf) * 0.02,
        })
    return tensors


def peer_memory(prefill_chunk: int | None = None) -> None:
    """A peer serving 32 blocks of 2.8b in bf16, 16 slots, after a 2048-token prefill and 8-wide decode steps.

    prefill_chunk None: GraphDecoder's own choice, what `swarm serve` takes (1024 tokens for these 32 blocks)."""
    cfg = MambaConfig.from_dict(dict(MODELS["2.8b"], num_hidden_layers=64))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()  # what earlier parts hold
    dm = cfg.hidden_size
    tensors = wide_block_tensors(cfg, 32)
    stack = BlockStack.from_tensors(cfg, 0, 32, tensors, device="cuda")
    del tensors
    weights = sum(p.numel() * p.element_size() for p in stack.parameters())
    load_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    dec = GraphDecoder(stack, max_slots=16, buckets=(1, 2, 4, 8), prefill_chunk=prefill_chunk)
    prefill_chunk = dec.prefill_chunk
    pool = (dec.conv.numel() + dec.ssm.numel()) * 4
    slots = [dec.alloc_slot() for _ in range(8)]
    dec.prefill(slots[0], torch.randn(1, 2048, dm, device="cuda"))
    for _ in range(4):
        dec.step(slots, torch.randn(8, 1, dm, device="cuda"))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    reserved = torch.cuda.memory_reserved() - base_reserved
    print(f"peer memory (prefill pieces of {prefill_chunk}): reserved by the allocator after serving "
          f"{reserved / 2**30:.2f} GiB (includes the graphs' pool)")
    print(f"peer memory, 2.8b blocks 0:32 bf16, 16 slots: weights {weights / 2**30:.2f} GiB, state pool "
          f"{pool / 2**30:.3f} GiB; peak allocated while loading {load_peak / 2**30:.2f} GiB, while serving "
          f"(graphs, 2048-token prefill, 8-wide steps) {peak / 2**30:.2f} GiB ({peak / weights:.3f} x weights)")
    pre_ms = cuda_ms(lambda: dec.prefill(slots[1], torch.randn(1, 2048, dm, device="cuda")), iters=3, warmup=1)
    what = f"peer 32 blocks, prefill pieces of {prefill_chunk}"
    ROWS.append(("2.8b", f"{what}: serving peak GiB (weights)", f"{peak / 2**30:.2f}", "", f"{weights / 2**30:.2f}"))
    ROWS.append(("2.8b", f"{what}: reserved GiB", f"{reserved / 2**30:.2f}", "", ""))
    ROWS.append(("2.8b", f"{what}: prefill 2048 tokens, ms", f"{pre_ms:.2f}", "", ""))
    ROWS.append(("2.8b", "peer 32 blocks: loading peak GiB", f"{load_peak / 2**30:.2f}", "", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="130m,2.8b")
    ap.add_argument("--skip-scan-configs", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = copy_bandwidth()
    print(f"device copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    if not args.skip_scan_configs:
        bench_gemv()
        bench_scan_configs()
    for chunk in (None, 512):
        peer_memory(chunk)
        torch.cuda.empty_cache()  # the stack and its graphs went with peer_memory's frame
    for name in args.models.split(","):
        bench_model(name, bw, hf_prefill=name == "130m")
        torch.cuda.empty_cache()  # the model's tensors went with bench_model's frame
    print(f"\n{'model':6} {'what':70} {'swarm':>10} {'transformers':>13} {'floor':>8}")
    for row in ROWS:
        print(f"{row[0]:6} {row[1]:70} {row[2]:>10} {row[3]:>13} {row[4]:>8}")


if __name__ == "__main__":
    main()
