"""CPU speed of swarm's model (BlockStack + Head) next to transformers' MambaForCausalLM on the same random weights.

mamba-130m shapes, fp32 (or --dtype bfloat16: both models on the same bf16 weights), batch 1: greedy decode
tokens/s and a 512-token prefill (states plus last-token logits).
Run: python scripts/bench_cpu.py [--rounds 3] [--steps 32] [--prefill 512] [--threads 2] [--dtype float32]
     [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from swarm.model import BlockStack, Head, MambaConfig


def hf_model(layers: int):
    import transformers

    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=layers, state_size=16,
                                   conv_kernel=4, expand=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).eval()
    return cfg, model


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls after one untimed call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


class Ours:
    def __init__(self, cfg: MambaConfig, tensors: dict[str, torch.Tensor], backend: str):
        self.stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, backend=backend)
        self.head = Head.from_tensors(cfg, tensors)

    def prefill(self, ids: torch.Tensor):
        states = self.stack.new_states(ids.shape[0])
        hidden = self.stack(self.head.embed(ids), states)
        return self.head.logits(hidden[:, -1:])[:, -1], states

    def decode(self, ids: torch.Tensor, steps: int, warmup: int) -> list[float]:
        """Seconds of each of `steps` greedy decode steps after `ids` and `warmup` untimed steps."""
        logits, states = self.prefill(ids)
        tok = logits.argmax(-1, keepdim=True)  # (B, 1)
        ts = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            logits = self.head.logits(self.stack(self.head.embed(tok), states))[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            ts.append(time.perf_counter() - t)
        return ts[warmup:]


class Transformers:
    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.cache_params

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, steps: int, warmup: int) -> list[float]:
        logits, cache = self.prefill(ids)
        tok = logits.argmax(-1, keepdim=True)
        ts = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            out = self.model(input_ids=tok, cache_params=cache, use_cache=True)
            cache = out.cache_params
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ts.append(time.perf_counter() - t)
        return ts[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32, help="decode tokens timed per round (after --warmup)")
    ap.add_argument("--warmup", type=int, default=4, help="decode tokens run before timing")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill benchmark")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (decode, one prefill) for every runner")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (numba uses every core)")
    ap.add_argument("--layers", type=int, default=24, help="blocks (24 is mamba-130m)")
    ap.add_argument("--no-reference", action="store_true", help="skip our model on the plain-torch kernels")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the weights' dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from swarm.kernels import cpu
    cpu.warmup(bf16=args.dtype == "bfloat16")
    hf_cfg, model = hf_model(args.layers)
    model.to(getattr(torch, args.dtype))
    cfg = MambaConfig.from_dict(hf_cfg.to_dict())
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    runners = {"swarm (cpu)": Ours(cfg, tensors, "cpu")}
    if not args.no_reference:
        runners["swarm (reference)"] = Ours(cfg, tensors, "reference")
    runners["transformers"] = Transformers(model)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=g)
    long_prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=g)

    # same weights, same maths: the last-token logits of the long prompt must agree
    got = {name: r.prefill(long_prompt)[0] for name, r in runners.items()}
    base = got["transformers"]
    for name, logits in got.items():
        print(f"{name:>18}: max |logits - transformers| = {(logits - base).abs().max().item():.2e} "
              f"(logits scale {base.abs().max().item():.1f})")
    print("  (24 random-init blocks amplify fp32 rounding: a 1e-7 relative nudge to the embeddings moves these logits "
          "by ~3e-3, so the fast kernels' ~2e-3 is rounding, not error)")

    t0, busy0 = time.perf_counter(), busy_elsewhere()
    dec: dict[str, list[float]] = {name: [] for name in runners}
    pre: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved, so that a burst of load elsewhere hits every runner alike
        for name, r in runners.items():
            dec[name] += r.decode(prompt, args.steps, args.warmup)
            pre[name] += timed(lambda: r.prefill(long_prompt), 1)
    # (ticks are coarse: on a short run this can come out a little below 0)
    others = max(0.0, (busy_elsewhere() - busy0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1)))
    print(f"\nmamba-130m shapes, {args.dtype} weights, batch 1, torch threads {torch.get_num_threads()}; decode: "
          f"{args.rounds} x {args.steps} steps (median, best); prefill: {args.prefill} tokens, states + last logits "
          f"(best, median of {args.rounds}); other processes used {others:.0%} of the cores meanwhile")
    print(machine())
    print_table(dec, pre, args.prefill)


def machine() -> str:
    """The CPU as these numbers depend on it: its model, the vector width numba's LLVM targets, bf16 arithmetic,
    and the GEMM that our prefill uses."""
    import llvmlite.binding as llvm

    from swarm.kernels import cpu
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    from numba.core import config  # NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, where set, are what numba targets
    target = config.CPU_NAME or llvm.get_host_cpu_name()
    feats = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    isa = "AVX-512" if "+avx512f" in feats else "AVX2" if "+avx2" in feats else "no AVX2"
    return (f"CPU: {name}, {os.cpu_count()} cores, LLVM target {target} ({isa}); bf16 arithmetic: "
            f"{'yes' if cpu._NATIVE_BF16 else 'no'}; GEMM past 8 rows: {'oneDNN' if cpu._GEMM else 'F.linear'}")


def busy_elsewhere() -> float:
    """CPU seconds the machine has spent busy, less this process's (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK") - time.process_time()


def print_table(dec: dict[str, list[float]], pre: dict[str, list[float]], prefill: int) -> None:
    """dec: seconds per decode step, pre: seconds per prefill, per runner; the last runner is the baseline."""
    base = list(dec)[-1]
    base_dec, base_pre = statistics.median(dec[base]), min(pre[base])
    print(f"{'':>18} | {'decode tok/s':>12} | {'best tok/s':>10} | {'ms/token':>8} | {'prefill s':>9} | "
          f"{'median s':>8} | {'prefill tok/s':>13} | {'decode x':>8} | {'prefill x':>9}")
    for name in dec:
        d, p = statistics.median(dec[name]), min(pre[name])
        print(f"{name:>18} | {1 / d:12.1f} | {1 / min(dec[name]):10.1f} | {d * 1e3:8.1f} | {p:9.3f} | "
              f"{statistics.median(pre[name]):8.3f} | {prefill / p:13.0f} | {base_dec / d:8.1f} | "
              f"{base_pre / p:9.1f}")
    print(f"(x: speed relative to {base}, decode on medians, prefill on bests; other processes on these cores slow "
          "any run, so a best is the nearest to the machine's own speed)")


if __name__ == "__main__":
    main()
