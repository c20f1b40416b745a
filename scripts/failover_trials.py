"""Failover trials: N greedy generations, each with a random peer on the route killed (SIGKILL) or frozen (SIGSTOP)
at a random step; every run must give the tokens of the run without faults.

    python scripts/failover_trials.py [--trials 20] [--tokens 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import tempfile
import time

from swarm.client import ClientConfig, LocalModel, SwarmClient
from swarm.demo import random_mamba
from swarm.knot_convert import convert
from swarm.launch import FileServer, peer_id_of, start_bootstrap, start_peers, stop_all

LAYOUT = {"a": "0:4", "b": "4:8", "c": "0:8", "d": "2:8", "e": "0:6"}  # any one peer may go: blocks stay covered


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=16, help="checkpoint interval")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp(prefix="failover-")
    random_mamba(os.path.join(tmp, "m"), hidden=64, layers=8)
    knot = os.path.join(tmp, "m.knot")
    convert(os.path.join(tmp, "m"), knot, name="trials", progress=False)
    prompt = list(range(5, 25))
    reference = LocalModel(knot).generate(prompt, a.tokens)
    results = []
    with FileServer(tmp) as files:
        url = files.url("m.knot")
        boot = start_bootstrap()
        peers = dict(zip(LAYOUT, start_peers(url, LAYOUT, boot.maddrs, ["--update-period", "2"])))
        try:
            for trial in range(a.trials):
                mode = rng.choice(["SIGKILL", "SIGSTOP"])
                at = rng.randrange(1, a.tokens - 1)
                client = SwarmClient(initial_peers=boot.maddrs,
                                     config=ClientConfig(checkpoint_every=a.k, min_step_timeout=1.5))
                victim_name = None
                t0 = time.perf_counter()
                out = []
                with client.session() as s:
                    for tok in s.stream(prompt, a.tokens):
                        out.append(tok)
                        if len(out) == at:
                            by_id = {peer_id_of(p): n for n, p in peers.items()}
                            victim_name = by_id[rng.choice(s.route)[0]]
                            peers[victim_name].signal(signal.SIGKILL if mode == "SIGKILL" else signal.SIGSTOP)
                    stats = dict(s.stats)
                client.close()
                elapsed = time.perf_counter() - t0
                ok = out == reference
                results.append((trial, mode, at, victim_name, ok, stats["recoveries"], stats["replayed_tokens"],
                                elapsed))
                print(f"trial {trial:2d}: {mode} {victim_name} at token {at:3d}: "
                      f"{'identical' if ok else 'DIFFERENT'}, recoveries {stats['recoveries']}, replayed "
                      f"{stats['replayed_tokens']}, {elapsed:.1f}s", flush=True)
                # bring the victim back for the next trial
                old = peers[victim_name]
                old.stop(timeout=5)
                peers[victim_name] = start_peers(url, {victim_name: LAYOUT[victim_name]}, boot.maddrs,
                                                 ["--update-period", "2"])[0]
        finally:
            stop_all(list(peers.values()) + [boot])
    good = sum(r[4] for r in results)
    replayed = [r[6] for r in results]
    print(f"\n{good}/{len(results)} identical to the run without faults; replayed tokens per recovery: "
          f"max {max(replayed)}, median {statistics.median(replayed)} (K={a.k}); "
          f"median run time {statistics.median(r[7] for r in results):.1f}s")


if __name__ == "__main__":
    main()
