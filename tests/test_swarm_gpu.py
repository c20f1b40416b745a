"""The swarm on a GPU: peers as real `swarm serve --device cuda` subprocesses whose sessions live in CUDA-graph slots.

Same oracle as tests/test_swarm.py (transformers' MambaForCausalLM, fp32, same weights): greedy tokens equal and
logits within 1e-4, through one and two peers sharing the GPU, with a peer SIGKILLed mid-generation (its state
restored into another peer's slot), and with several sessions decoding at once (batched graph replays).
Runs on the device machine (hivemind travels there as wheels).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import concurrent_generate, hf_greedy, swarm_client

from swarm.launch import FileServer, peer_id_of, start_bootstrap, start_peers

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="peers on CUDA need a CUDA device")]
PROMPT = [4, 8, 15, 16, 23, 42]
GPU = ["--update-period", "2", "--device", "cuda"]


@pytest.fixture(scope="module")
def gpu_swarm(hf_models):
    folder = os.path.dirname(hf_models["untied_bias"][2])
    with FileServer(folder) as files:
        boot = start_bootstrap()
        try:
            yield files, boot, hf_models["untied_bias"]
        finally:
            boot.stop()




@pytest.mark.parametrize("split", [["0:3"], ["0:1", "1:3"]])
def test_gpu_peers_equal_transformers(gpu_swarm, peers, split):
    files, boot, (model, _, knot) = gpu_swarm
    peers += start_peers(files.url(os.path.basename(knot)), {f"g{i}": b for i, b in enumerate(split)},
                         boot.maddrs, GPU)
    ref, ref_logits = hf_greedy(model, PROMPT, 10)
    client = swarm_client(boot, device="cuda")  # the client's head on the GPU too
    try:
        assert client.head.embeddings.weight.is_cuda
        with client.session() as s:
            s.keep_logits = True
            out = s.generate(PROMPT, 4)
            logits = list(s.last_logits)
            out += s.generate(None, 6)
            logits += s.last_logits
        assert out == ref
        assert (torch.stack(logits).cpu() - ref_logits).abs().max().item() < 1e-4
    finally:
        client.close()


def test_gpu_failover_restores_state_into_a_slot(gpu_swarm, peers):
    files, boot, (model, _, knot) = gpu_swarm
    peers += start_peers(files.url(os.path.basename(knot)), {"a": "0:2", "b": "2:3", "backup": "0:3"},
                         boot.maddrs, GPU)
    ref, _ = hf_greedy(model, PROMPT, 20)
    client = swarm_client(boot, checkpoint_every=4)
    try:
        with client.session() as s:
            out = s.generate(PROMPT, 6)
            victim = {peer_id_of(p): p for p in peers}[s.route[0][0]]
            victim.kill()
            out += s.generate(None, 14)
            assert s.stats["recoveries"] >= 1 and 0 < s.stats["replayed_tokens"] <= 4
        assert out == ref
    finally:
        client.close()


def test_gpu_concurrent_sessions_each_equal_transformers(gpu_swarm, peers):
    """Sessions decoding at the same time share graph replays (batched slots) and must not see each other."""
    files, boot, (model, _, knot) = gpu_swarm
    peers += start_peers(files.url(os.path.basename(knot)), {"all": "0:3"}, boot.maddrs, GPU)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 7, 1, 8]]
    refs = [hf_greedy(model, p, 12)[0] for p in prompts]
    client = swarm_client(boot)
    try:
        assert concurrent_generate(client, prompts, 12) == refs
    finally:
        client.close()


def test_gpu_local_model_decodes_through_graphs(hf_models):
    """`swarm generate --local --device cuda`: LocalModel's sessions take GraphDecoder slots; the oracle holds."""
    from swarm.client import LocalModel
    model, _, knot = hf_models["tied"]
    ref, ref_logits = hf_greedy(model, PROMPT, 10)
    local = LocalModel(knot, device="cuda")
    assert local.decoder is not None and local.decoder.captured
    with local.session() as s:
        assert s.slot is not None
        s.keep_logits = True
        out = s.generate(PROMPT, 10)
        logits = torch.stack(s.last_logits).cpu()
    assert out == ref
    assert (logits - ref_logits).abs().max().item() < 1e-4
    with local.session() as s:  # greedy, no logits kept: the pick is inside the token graph (step_greedy)
        assert local.decoder._greedy_graphs
        assert s.generate(PROMPT, 10) == ref and not s.last_logits
    with local.session() as s:  # a stop token fed ahead: the next call goes on from what came after it
        k = ref.index(ref[3]) + 1
        got = s.generate(PROMPT, 10, stop_tokens=[ref[3]])
        assert got == ref[:k] and s._ahead is not None
        assert got + s.generate(None, 10 - k) == ref
    assert local.decoder.free_slots == local.decoder.max_slots  # closing the sessions gave their slots back
