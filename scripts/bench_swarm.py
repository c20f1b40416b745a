"""Swarm overheads on loopback: ms/token locally vs through 1 and 2 peers, hop overhead, checkpoint cost per K.

    python scripts/bench_swarm.py [--hidden 768 --layers 24 --vocab 50280] [--tokens 64]

Random weights of the given config (default: mamba-130m's), fp32, CPU peers as real subprocesses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from swarm.client import ClientConfig, LocalModel, SwarmClient
from swarm.demo import random_mamba
from swarm.knot_convert import convert
from swarm.launch import FileServer, start_bootstrap, start_peers, stop_all


def timed_generate(session, prompt, n):
    """Prefill `prompt`, then decode `n`; ms per token after the first (the first includes the prefill)."""
    first = None
    count = 0
    for _ in session.stream(prompt, n):
        count += 1
        if first is None:
            first = time.perf_counter()
    return (time.perf_counter() - first) / max(count - 1, 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix="bench-swarm-")
    random_mamba(os.path.join(tmp, "m"), hidden=a.hidden, layers=a.layers, vocab=a.vocab)
    knot = os.path.join(tmp, "m.knot")
    convert(os.path.join(tmp, "m"), knot, name="bench", progress=False)
    prompt = list(range(1, 17))
    rows = []
    local = LocalModel(knot)
    s = local.session()
    rows.append(("local (one process)", "-", timed_generate(s, prompt, a.tokens), "-"))
    del local, s
    n = a.layers
    with FileServer(tmp) as files:
        boot = start_bootstrap()
        try:
            for layout in ({"p0": f"0:{n}"}, {"p0": f"0:{n // 2}", "p1": f"{n // 2}:{n}"}):
                peers = start_peers(files.url("m.knot"), layout, boot.maddrs, ["--update-period", "5"])
                try:
                    for k in (1, 4, 16, 64):
                        client = SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(checkpoint_every=k))
                        with client.session() as sess:
                            ms = timed_generate(sess, prompt, a.tokens)
                            hop = statistics.median(sess.stats["hop_overhead_ms"])
                        client.close()
                        rows.append((f"swarm, {len(layout)} peer(s)", k, ms, hop))
                finally:
                    stop_all(peers)
        finally:
            boot.stop()
    state_mb = n * 2 * a.hidden * (4 + 16) * 4 / 1e6
    print(f"\nconfig: d_model {a.hidden}, {n} layers, vocab {a.vocab}, fp32, CPU peers on 127.0.0.1; "
          f"state of all blocks {state_mb:.2f} MB")
    print(f"{'path':24} {'K':>4} {'ms/token':>10} {'hop overhead ms (median)':>26}")
    for name, k, ms, hop in rows:
        print(f"{name:24} {k!s:>4} {ms:10.2f} {hop if isinstance(hop, str) else f'{hop:.2f}':>26}")


if __name__ == "__main__":
    main()
