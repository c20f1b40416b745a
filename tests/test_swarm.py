"""The swarm end to end: a bootstrap node and peers as real `swarm` subprocesses on 127.0.0.1, served by HTTP Range."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import concurrent_generate, hf_greedy, swarm_client

from swarm.errors import NoRoute
from swarm.launch import FileServer, peer_id_of, start_bootstrap, start_peer, start_peers, stop_all

pytestmark = pytest.mark.slow
PROMPT = [4, 8, 15, 16, 23, 42]
FAST = ["--update-period", "2"]  # records expire after 6 s


@pytest.fixture(scope="module")
def swarm_env(hf_models):
    """A file server for the KNOTs and a bootstrap node; peers are started per test."""
    folder = os.path.dirname(hf_models["noconvbias_rank"][2])
    with FileServer(folder) as files:
        boot = start_bootstrap()
        try:
            yield files, boot, hf_models["noconvbias_rank"]
        finally:
            boot.stop()




@pytest.mark.parametrize("split", [["0:5"], ["0:2", "2:5"], ["0:1", "1:3", "3:5"], ["0:2", "2:3", "3:4", "4:5"]])
def test_greedy_through_peers_equals_transformers(swarm_env, peers, split):
    files, boot, (model, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    peers += start_peers(url, {f"p{i}": blocks for i, blocks in enumerate(split)}, boot.maddrs, FAST)
    ref, ref_logits = hf_greedy(model, PROMPT, 10)
    client = swarm_client(boot)
    try:
        with client.session() as s:
            s.keep_logits = True
            first = s.generate(PROMPT, 4)
            logits = list(s.last_logits)
            rest = s.generate(None, 6)  # continues from the session's state
            logits += s.last_logits
            assert len(s.route) == len(split)
        assert first + rest == ref
        import torch
        assert (torch.stack(logits) - ref_logits).abs().max().item() < 1e-4
    finally:
        client.close()


def test_sigkill_mid_generation_recovers_with_identical_tokens(swarm_env, peers):
    files, boot, (model, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    peers += start_peers(url, {"a": "0:3", "b": "3:5", "backup": "2:5"}, boot.maddrs, FAST)
    ref, _ = hf_greedy(model, PROMPT, 24)
    client = swarm_client(boot, checkpoint_every=4)
    try:
        with client.session() as s:
            out = s.generate(PROMPT, 6)
            by_id = {peer_id_of(p): p for p in peers}
            victim = by_id[s.route[-1][0]]
            victim.kill()  # dies without a word
            out += s.generate(None, 18)
            assert s.stats["recoveries"] >= 1
            assert 0 < s.stats["replayed_tokens"] <= 4  # at most K tokens, not the whole prefix
            assert peer_id_of(victim) not in [p for p, _, _ in s.route]
        assert out == ref
    finally:
        client.close()


def test_two_spans_on_one_peer_merge_into_one(swarm_env, peers):
    """A re-route can hand a failed span to the peer that already serves the span before it (the demo's route read
    peer-a[0:2] -> peer-a[2:4] -> peer-b[4:8]): the session then merges the two streams into one on that peer,
    from checkpoints both take at one step, replaying nothing, and the tokens stay transformers' tokens."""
    files, boot, (model, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    peers += start_peers(url, {"a": "0:5"}, boot.maddrs, FAST)
    ref, _ = hf_greedy(model, PROMPT, 12)
    client = swarm_client(boot, checkpoint_every=1)
    try:
        with client.session() as s:
            out = s.generate(PROMPT, 4)
            (span,) = s.spans
            assert span.ckpt_position == s.position and not span.inputs
            # the chain as such a re-route leaves it: blocks 0:2 and 2:5 in two streams on peer a
            client.run(s._build(0, 2, [], span.ckpt_position, span.ckpt_states[:2]))
            client.run(s._build(2, 5, [], span.ckpt_position, span.ckpt_states[2:]))
            span.close()
            assert [(p, a, b) for p, a, b in s.route] == [(span.peer, 0, 2), (span.peer, 2, 5)]
            client.config = dataclasses.replace(client.config, checkpoint_every=100)  # the merge asks for its own
            out += s.generate(None, 8)
            assert s.route == [(span.peer, 0, 5)]
            assert s.stats["merged_spans"] == 1 and s.stats["replayed_tokens"] == 0
        assert out == ref
    finally:
        client.close()


def test_sigstop_frozen_peer_hits_the_deadline(swarm_env, peers):
    files, boot, (model, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    peers += start_peers(url, {"x": "0:5", "y": "0:5"}, boot.maddrs, FAST)
    ref, _ = hf_greedy(model, PROMPT, 12)
    client = swarm_client(boot, min_step_timeout=1.5)
    try:
        with client.session() as s:
            out = s.generate(PROMPT, 5)
            frozen = next(p for p in peers if peer_id_of(p) == s.route[0][0])
            frozen.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            out += s.generate(None, 7)
            assert time.monotonic() - t0 < 15
            assert s.stats["recoveries"] == 1
        assert out == ref
    finally:
        client.close()


def test_late_join_used_leaver_dropped_and_gap_named(swarm_env, peers):
    files, boot, (_, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    peers.append(start_peer(url, "0:3", boot.maddrs, "early", FAST))
    client = swarm_client(boot, lookup_timeout=1.0, view_max_age=0.5)
    try:
        with pytest.raises(NoRoute, match=r"no ONLINE peer serves blocks 3:5"):
            client.generate(PROMPT, 2)
        late = start_peer(url, "3:5", boot.maddrs, "late", FAST)
        peers.append(late)
        with client.session() as s:
            s.generate(PROMPT, 2)
            assert any(p == peer_id_of(late) for p, _, _ in s.route)
        late.kill()  # no OFFLINE announcement: its records must expire (3 x 2 s)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            client.run(client.refresh_view())
            if peer_id_of(late) not in client.view.online():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the dead peer's records did not expire")
        with pytest.raises(NoRoute, match="3:5"):
            client.generate(PROMPT, 2)
    finally:
        client.close()


def test_cli_generate_through_swarm(swarm_env, peers, tmp_path):
    files, boot, (model, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    peers += start_peers(url, {"c1": "0:2", "c2": "2:5"}, boot.maddrs, FAST)
    ref, _ = hf_greedy(model, PROMPT, 6)
    cache = tmp_path / "head-cache"
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--initial-peers", *boot.maddrs,
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--json",
                          "--cache-dir", str(cache)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == ref and len(result["route"]) == 2
    assert any(p.is_file() for p in cache.rglob("*"))  # the head's tensors went through --cache-dir


def test_pool_slots_without_a_gpu(swarm_env, peers, monkeypatch):
    """The CUDA peer's session pool (GraphDecoder slots, batched slot steps, state import into a slot, slots freed
    on close) run here through Triton's interpreter (`--graphs eager`): same tokens as transformers, a failover
    whose replacement restores the state into a slot, and concurrent sessions that must not see each other."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the peers
    files, boot, (model, _, knot) = swarm_env
    url = files.url(os.path.basename(knot))
    pool = FAST + ["--graphs", "eager", "--max-sessions", "3"]
    peers += start_peers(url, {"pa": "0:3", "pb": "3:5", "pc": "0:5"}, boot.maddrs, pool)
    ref, _ = hf_greedy(model, PROMPT, 12)
    client = swarm_client(boot, checkpoint_every=4, verify_rate=0.0)
    try:
        with client.session() as s:  # a route over pa + pb or pc; kill whichever holds block 0
            out = s.generate(PROMPT, 5)
            victim = {peer_id_of(p): p for p in peers}[s.route[0][0]]
            victim.kill()
            out += s.generate(None, 7)
            assert s.stats["recoveries"] >= 1
        assert out == ref
        prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8]]
        refs = [hf_greedy(model, p, 6)[0] for p in prompts]
        for _ in range(2):  # twice: the first round's slots must have been freed for the second
            assert concurrent_generate(client, prompts, 6) == refs
    finally:
        client.close()
    survivors = [p for p in peers if p.popen.poll() is None]
    assert any("session slots, eager" in line for p in survivors for line in p.stderr)
    stop_all(survivors)
    served = [p.wait_for(lambda line: line.startswith("served "), 10, "a 'served' line").split() for p in survivors]
    assert sum(int(w[1]) for w in served) > 0  # decode steps did run from the slots
    assert sum(int(w[5]) for w in served) > 0  # and prefills (prompts, replays after the restore) through them
