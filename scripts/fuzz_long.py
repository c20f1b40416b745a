"""Long fuzz run: the properties of tests/test_fuzz.py with many more examples (default 100,000 each).

    python scripts/fuzz_long.py                    # every property, 100k examples each (hours on 2 cores)
    python scripts/fuzz_long.py -n 20000 -k unpack # the RPC decoder only
A failure prints hypothesis's shrunk example; it exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--examples", type=int, default=100_000, help="examples per property")
    p.add_argument("-k", default="", help="pytest -k expression selecting properties")
    a = p.parse_args()
    os.environ["SWARM_FUZZ_EXAMPLES"] = str(a.examples)  # read by tests/test_fuzz.py at import
    import pytest
    args = [os.path.join(ROOT, "tests", "test_fuzz.py"), "-q", "-p", "no:cacheprovider", "--durations=0"]
    if a.k:
        args += ["-k", a.k]
    t0 = time.perf_counter()
    rc = pytest.main(args)
    print(f"fuzz_long: {a.examples} examples per property, {time.perf_counter() - t0:.0f}s, "
          f"{'ok' if rc == 0 else 'FAILED'}", flush=True)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
