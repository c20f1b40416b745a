"""Load: many concurrent sessions against two CPU peers; counts errors, busy answers and peak peer memory.

    python scripts/load_test.py [--sessions 32] [--tokens 24] [--max-sessions 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

from swarm.client import ClientConfig, LocalModel, SwarmClient
from swarm.demo import random_mamba
from swarm.knot_convert import convert
from swarm.launch import FileServer, Proc, start_bootstrap, start_peers, stop_all


def peak_rss_mb(proc: Proc) -> float:
    """VmHWM (peak resident set) of the peer's main process."""
    with open(f"/proc/{proc.popen.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--max-sessions", type=int, default=20)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="load-")
    random_mamba(os.path.join(tmp, "m"), hidden=128, layers=8)
    knot = os.path.join(tmp, "m.knot")
    convert(os.path.join(tmp, "m"), knot, name="load", progress=False)
    prompts = [[(7 * i + j) % 300 + 1 for j in range(8)] for i in range(a.sessions)]
    local = LocalModel(knot)
    expected = [local.generate(p, a.tokens) for p in prompts]
    with FileServer(tmp) as files:
        boot = start_bootstrap()
        peers = start_peers(files.url("m.knot"), {"p1": "0:8", "p2": "0:8"}, boot.maddrs,
                            ["--update-period", "5", "--max-sessions", str(a.max_sessions)])
        try:
            before = [peak_rss_mb(p) for p in peers]
            client = SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(ban_base=1.0))
            errors: list[str] = []
            wrong = 0
            outs: dict[int, list[int]] = {}

            def worker(i: int) -> None:
                try:
                    with client.session() as s:
                        outs[i] = s.generate(prompts[i], a.tokens)
                except Exception as e:  # counted and reported
                    errors.append(f"session {i}: {type(e).__name__}: {e}")

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            wrong = sum(outs.get(i) != expected[i] for i in range(a.sessions) if i in outs)
            after = [peak_rss_mb(p) for p in peers]
            client.close()
            batches = "see peer logs"
        finally:
            stop_all(peers + [boot])
    print(f"\n{a.sessions} concurrent sessions x {a.tokens} tokens against 2 CPU peers (max {a.max_sessions} "
          f"sessions each): {len(errors)} errors, {wrong} wrong outputs, {elapsed:.1f}s, "
          f"{a.sessions * a.tokens / elapsed:.0f} tokens/s in total")
    for name, b, c in zip(("p1", "p2"), before, after):
        print(f"  {name}: peak RSS {b:.0f} MB idle -> {c:.0f} MB under load")
    for e in errors[:5]:
        print("  ", e)
    del batches


if __name__ == "__main__":
    main()
