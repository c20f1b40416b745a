"""LocalModel's GraphDecoder slots on a CPU, through Triton's interpreter (the same kernels a CUDA device runs).

A subprocess, because TRITON_INTERPRET must be set before Triton is imported. Tokens must equal transformers'
greedy tokens for more sessions than there are slots (the extra ones run eagerly), slots must come back on close
and on garbage collection, and a session must not see another's state. Greedy decode steps in a slot pick on the
device (GraphDecoder.step_greedy); kept logits or a repetition penalty take the logits (step_logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import hf_greedy

pytest.importorskip("triton", reason="the interpreter test needs Triton (a dev extra)")

SCRIPT = r"""
import gc, json, sys
from swarm.client import local
from swarm.client.local import LocalModel
local.GRAPH_SLOTS = 2
m = LocalModel(sys.argv[1], graphs="eager")
calls = {"step_greedy": 0, "step_logits": 0}
for name in calls:
    def counted(*a, _f=getattr(m.decoder, name), _n=name, **k):
        calls[_n] += 1
        return _f(*a, **k)
    setattr(m.decoder, name, counted)
a, b, c = m.session(), m.session(), m.session()  # c: no slot left, eager
out = {"slots": [a.slot, b.slot, c.slot], "free_after_open": m.decoder.free_slots}
ta = a.generate([3, 17, 5, 9], 3)
tb = b.generate([22, 1, 14], 3)  # b's prefill between a's calls: states must not mix
tc = c.generate([3, 17, 5, 9], 3)
ta += a.generate(None, 3)
out.update(a=ta, b=tb, c=tc, greedy_calls=dict(calls))
a.keep_logits = True
out["kept"] = a.generate([3, 17, 5, 9], 3)  # logits on the host: step_logits
out["kept_logits"] = len(a.last_logits)
b.generate([22, 1, 14], 3, repetition_penalty=1.5)  # the penalty needs the logits: step_logits
out["calls"] = dict(calls)  # before d
a.close()
del b
gc.collect()
out["free_after_close"] = m.decoder.free_slots
with m.session() as d:
    out["d"] = d.generate([22, 1, 14], 2)
# a stop token after a token fed ahead: the next calls go on from what the blocks said after it, greedy or not
with m.session() as e:
    stop = int(sys.argv[2])
    out["e"] = e.generate([3, 17, 5, 9], 6, stop_tokens=[stop])
    e.keep_logits = True
    out["e"] += e.generate(None, 2)
    out["e_logits"] = len(e.last_logits)
    e.keep_logits = False
    out["e"] += e.generate(None, 2)
print(json.dumps(out))
"""


def test_local_sessions_in_graph_slots_under_the_interpreter(hf_models):
    model, _, knot = hf_models["tied"]
    env = dict(os.environ, TRITON_INTERPRET="1")
    full = hf_greedy(model, [3, 17, 5, 9], 8)[0]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, knot, str(full[1])], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["slots"] == [0, 1, None] and out["free_after_open"] == 0
    assert out["a"] == full[:6]
    stop_at = full.index(full[1]) + 1
    assert out["e"] == full[:stop_at + 4] and out["e_logits"] == 2
    # a's and b's decode steps (2 + 2 + 3 tokens after their prefills) picked on the device; c has no slot
    assert out["greedy_calls"] == {"step_greedy": 7, "step_logits": 0}
    # the logits to the host (kept) after a's greedy calls: a's whole history, then the new prompt
    assert out["kept"] == hf_greedy(model, [3, 17, 5, 9] + out["a"] + [3, 17, 5, 9], 3)[0]
    assert out["kept_logits"] == 3
    assert out["calls"]["step_greedy"] == 7 and out["calls"]["step_logits"] == 4
    assert out["c"] == out["a"][:3]
    assert out["b"] == hf_greedy(model, [22, 1, 14], 3)[0]
    assert out["d"] == out["b"][:2]
    assert out["free_after_close"] == 2
