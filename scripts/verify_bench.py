"""Result verification: overhead per token at several rates, and how fast a corrupting peer is caught.

    python scripts/verify_bench.py [--tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from swarm.client import ClientConfig, SwarmClient
from swarm.demo import random_mamba
from swarm.knot_convert import convert
from swarm.launch import FileServer, peer_id_of, start_bootstrap, start_peers, stop_all


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="verify-")
    random_mamba(os.path.join(tmp, "m"), hidden=128, layers=8)
    convert(os.path.join(tmp, "m"), os.path.join(tmp, "m.knot"), name="verify", progress=False)
    prompt = list(range(3, 19))
    with FileServer(tmp) as files:
        url = files.url("m.knot")
        boot = start_bootstrap()
        honest = start_peers(url, {"h1": "0:8", "h2": "0:8"}, boot.maddrs, ["--update-period", "5"])
        try:
            print(f"{'verify rate':>12} {'ms/token':>9} {'verifications':>14}")
            for rate in (0.0, 0.02, 0.1, 1.0):
                client = SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(verify_rate=rate))
                with client.session() as s:
                    s.generate(prompt, 4)
                    t0 = time.perf_counter()
                    s.generate(None, a.tokens)
                    ms = (time.perf_counter() - t0) / a.tokens * 1000
                    print(f"{rate:12.2f} {ms:9.2f} {s.stats.get('verifications', 0):14d}", flush=True)
                client.close()
            liar = start_peers(url, {"liar": "0:8"}, boot.maddrs, ["--update-period", "5", "--corrupt-outputs",
                                                                   "0.05"])[0]
            honest.append(liar)
            lid = peer_id_of(liar)
            for rate in (0.02, 0.1):
                caught = []
                for _ in range(a.runs):
                    client = SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(verify_rate=rate))
                    n = None
                    with client.session() as s:
                        for i, _tok in enumerate(s.stream(prompt, 400)):
                            if lid in client.dishonest:
                                n = i + 1
                                break
                    caught.append(n)
                    client.close()
                found = [c for c in caught if c is not None]
                print(f"rate {rate}: liar caught in {len(found)}/{len(caught)} sessions of <= 400 tokens; tokens "
                      f"until caught: median {statistics.median(found) if found else '-'} {caught}", flush=True)
        finally:
            stop_all(honest + [boot])


if __name__ == "__main__":
    main()
