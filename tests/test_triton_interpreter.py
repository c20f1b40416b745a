"""The Triton kernels' tests (tests/kernels/test_triton.py) on the CPU, through Triton's interpreter.

The device machine, where those tests run for real, is not always to be had; this way every run of the test suite
still checks the CUDA path's kernels (scan, conv, norms, GEMVs, the decode step, the graph decoder's slots) against
their references. What the interpreter cannot run (CUDA graphs, the persistent Gluon kernel, transformers on CUDA)
stays skipped there. A subprocess, because TRITON_INTERPRET must be set before Triton is imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the interpreter run needs Triton (a dev extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest(args: list[str], out, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                            env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the Triton tests run on it directly")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreter's run itself")
def test_triton_kernels_under_the_interpreter(tmp_path):
    """The interpreter is single-threaded numpy: the tests run as two halves side by side (4.3 -> ~2.5 min on two
    cores), each half every other test of the collected list."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    listing = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                              "tests/kernels/test_triton.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    ids = [line for line in listing.stdout.splitlines() if line.startswith("tests/kernels/test_triton.py::")]
    assert len(ids) >= 200, listing.stdout[-2000:] + listing.stderr[-2000:]
    logs = [tmp_path / f"half{k}.log" for k in range(2)]
    procs = []
    try:
        for k, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(_pytest(ids[k::2], out, env))
        codes = [p.wait(timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    for code, text in zip(codes, texts):
        assert code == 0, text[-5000:]
    passed = sum(int(m.group(1)) for text in texts for m in [re.search(r"(\d+) passed", text)] if m)
    assert passed >= 200, "\n".join(t[-2000:] for t in texts)  # the kernel tests ran, not skipped wholesale
