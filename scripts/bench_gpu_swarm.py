"""Two swarm peers on one GPU: decode ms/token through one peer (all blocks) vs two (half each), and the hop overhead.

    PYTHONPATH=$PWD python3 scripts/bench_gpu_swarm.py [--models 130m,2.8b] [--tokens 64] [--workdir DIR]
    python scripts/bench_gpu_swarm.py --device cpu --tiny      # the same path end to end, tiny fp32 model, on CPU

Random bf16 weights of each size (written to a temporary folder: ~5.5 GB for 2.8b, plus 11 GB of fp32 checkpoint
while converting), served from a local HTTP file server to real `swarm serve --device cuda` subprocesses on 127.0.0.1
that share the GPU. The client is a SwarmClient (checkpoint_every=16, verification off) whose head is moved to the
same device. A local baseline (LocalModel, every block in one process) is measured first.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from swarm.client import ClientConfig, LocalModel, SwarmClient
from swarm.demo import random_mamba
from swarm.knot_convert import convert
from swarm.launch import FileServer, start_bootstrap, start_peers, stop_all

from bench_swarm import timed_generate  # noqa: E402  (scripts/ is on sys.path when run as a script)

# HF config fields, as scripts/bench_gpu.py's MODELS (random_mamba fixes expand=2 and time_step_rank=ceil(d/16))
MODELS = {
    "130m": dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2),
    "2.8b": dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, conv_kernel=4, expand=2),
}
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, state_size=16, conv_kernel=4, expand=2)
PROMPT = list(range(1, 17))
WARMUP_TOKENS = 4  # per measured path: kernel compilation and allocator growth stay out of the timings
PEER_START_TIMEOUT = 600.0  # 2.8b: each peer fetches and checksums up to 5.5 GB over loopback before ONLINE

Row = tuple[str, str, float, float | None]  # (model, path, decode ms/token, median hop overhead ms or None)


def log(msg: str) -> None:
    print(f"[bench_gpu_swarm] {msg}", file=sys.stderr, flush=True)


def make_knot(workdir: str, name: str, cfg: dict, dtype: str) -> str:
    """Random weights of `cfg` as a KNOT file in `workdir` (reused if already there); returns its file name."""
    fname = f"{name}-{dtype}.knot"
    if os.path.exists(os.path.join(workdir, fname)):
        log(f"{name}: reusing {fname}")
        return fname
    ckpt = os.path.join(workdir, f"{name}-ckpt")
    t0 = time.perf_counter()
    random_mamba(ckpt, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], state=cfg["state_size"],
                 conv=cfg["conv_kernel"], vocab=cfg["vocab_size"])
    log(f"{name}: random fp32 checkpoint written in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    convert(ckpt, os.path.join(workdir, fname), dtype=dtype, name=f"bench-{name}", progress=False)
    shutil.rmtree(ckpt)  # only the KNOT is served: free the disk before the next size
    log(f"{name}: converted to {fname} ({os.path.getsize(os.path.join(workdir, fname)) / 1e9:.2f} GB) "
        f"in {time.perf_counter() - t0:.0f}s")
    return fname


def decode_ms(session, tokens: int) -> float:
    """Prefill PROMPT, then decode `tokens`; ms per token after the first (the first includes the prefill)."""
    return timed_generate(session, PROMPT, tokens)


def measure_local(location: str, device: str, tokens: int) -> float:
    model = LocalModel(location, device=device)
    try:
        model.session().generate(PROMPT, WARMUP_TOKENS)
        return decode_ms(model.session(), tokens)
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the peers that follow share this GPU


def measure_swarm(boot_maddrs: list[str], device: str, tokens: int) -> tuple[float, float]:
    """(decode ms/token, median hop overhead ms) through whatever peers serve the model."""
    client = SwarmClient(initial_peers=boot_maddrs,
                         config=ClientConfig(checkpoint_every=16, verify_rate=0.0, device=device))
    try:
        with client.session() as warm:
            warm.generate(PROMPT, WARMUP_TOKENS)
        with client.session() as sess:
            ms = decode_ms(sess, tokens)
            hop = statistics.median(sess.stats["hop_overhead_ms"])
        return ms, hop
    finally:
        client.close()


def run(models: tuple[str, ...] = ("130m", "2.8b"), tokens: int = 64, device: str = "cuda", tiny: bool = False,
        workdir: str | None = None) -> list[Row]:
    """Measure every model in `models` (or the tiny fp32 one): local, 1 peer, 2 peers. Returns the table's rows."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device (use --device cpu --tiny to try it here)")
    configs = {"tiny": TINY} if tiny else {m: MODELS[m] for m in models}
    dtype = "float32" if tiny else "bfloat16"
    keep = workdir is not None
    workdir = workdir or tempfile.mkdtemp(prefix="bench-gpu-swarm-")
    os.makedirs(workdir, exist_ok=True)
    rows: list[Row] = []
    try:
        with FileServer(workdir) as files:
            boot = start_bootstrap()
            try:
                for name, cfg in configs.items():
                    fname = make_knot(workdir, name, cfg, dtype)
                    rows.append((name, "local (one process)", measure_local(os.path.join(workdir, fname), device,
                                                                            tokens), None))
                    log(f"{name}: local {rows[-1][2]:.2f} ms/token")
                    n = cfg["num_hidden_layers"]
                    for layout in ({"p0": f"0:{n}"}, {"p0": f"0:{n // 2}", "p1": f"{n // 2}:{n}"}):
                        t0 = time.perf_counter()
                        peers = start_peers(files.url(fname), layout, boot.maddrs,
                                            ["--device", device, "--update-period", "5"], timeout=PEER_START_TIMEOUT)
                        log(f"{name}: {len(layout)} peer(s) ONLINE in {time.perf_counter() - t0:.0f}s")
                        try:
                            ms, hop = measure_swarm(boot.maddrs, device, tokens)
                        finally:
                            stop_all(peers)
                        rows.append((name, f"swarm, {len(layout)} peer(s)", ms, hop))
                        log(f"{name}: {len(layout)} peer(s) {ms:.2f} ms/token, hop overhead {hop:.2f} ms")
            finally:
                boot.stop()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def print_table(rows: list[Row], device: str, tokens: int, tiny: bool) -> None:
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{'fp32' if tiny else 'bf16'} random weights on {dev}; prompt {len(PROMPT)} tokens, {tokens} decoded; "
          f"peers are processes on 127.0.0.1 sharing the device; client head on {device}; checkpoint_every=16")
    print(f"{'model':6} {'path':22} {'ms/token':>10} {'hop overhead ms (median)':>26}")
    for model, path, ms, hop in rows:
        print(f"{model:6} {path:22} {ms:10.2f} {'-' if hop is None else f'{hop:.2f}':>26}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="130m,2.8b", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens timed per path")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where peers and the client head run")
    ap.add_argument("--tiny", action="store_true", help="one tiny fp32 model (d_model 64, 4 layers, vocab 512)")
    ap.add_argument("--workdir", help="keep the KNOT files here and reuse them (default: a temporary folder)")
    a = ap.parse_args()
    models = tuple(m for m in a.models.split(",") if m)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    rows = run(models, a.tokens, device=a.device, tiny=a.tiny, workdir=a.workdir)
    print_table(rows, a.device, a.tokens, a.tiny)


if __name__ == "__main__":
    main()
