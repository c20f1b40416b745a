"""The block contract: splitting blocks across stacks, and T-token calls vs T single-token calls."""

from __future__ import annotations

import pytest
import torch

from swarm.knot_fetch import load_tensors
from swarm.model import BlockStack, Head, MambaConfig


@pytest.fixture(scope="module")
def loaded(hf_models):
    _, _, knot = hf_models["noconvbias_rank"]
    src, tensors = load_tensors(knot)
    return MambaConfig.from_dict(src.config), tensors


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_any_split_equals_whole(loaded, backend):
    cfg, tensors = loaded
    n = cfg.num_layers
    head = Head.from_tensors(cfg, tensors)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    whole = BlockStack.from_tensors(cfg, 0, n, tensors, backend=backend)
    ref = whole(head.embed(ids), whole.new_states(2))
    for k in range(1, n):
        a = BlockStack.from_tensors(cfg, 0, k, tensors, backend=backend)
        b = BlockStack.from_tensors(cfg, k, n, tensors, backend=backend)
        sa, sb = a.new_states(2), b.new_states(2)
        # prefill 5 tokens, hand over, then 4 decode steps, handing hidden state and LayerStates over each time
        outs = [b(a(head.embed(ids[:, :5]), sa), sb)]
        for t in range(5, 9):
            outs.append(b(a(head.embed(ids[:, t:t + 1]), sa), sb))
        assert torch.allclose(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5), f"split at {k}"


def test_t_tokens_equal_t_single_steps_from_a_state(loaded):
    cfg, tensors = loaded
    stack = BlockStack.from_tensors(cfg, 1, 4, tensors)
    h0 = torch.randn(1, 6, cfg.hidden_size)
    h = torch.randn(1, 7, cfg.hidden_size)
    s1 = stack.new_states(1)
    stack(h0, s1)  # a non-zero starting state
    s2 = [st.clone() for st in s1]
    many = stack(h, s1)
    single = torch.cat([stack(h[:, t:t + 1], s2) for t in range(7)], dim=1)
    assert torch.allclose(many, single, atol=1e-5, rtol=1e-5)
    for x, y in zip(s1, s2):
        assert torch.allclose(x.ssm, y.ssm, atol=1e-5) and torch.allclose(x.conv, y.conv, atol=1e-5, rtol=1e-5)


def test_peer_prefill_in_pieces_equals_one_call(loaded, monkeypatch):
    """A peer runs long prefills PREFILL_CHUNK tokens at a time (bounded activations): same output and states."""
    from swarm.peer import compute
    cfg, tensors = loaded
    stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors)
    hidden = torch.randn(2, 13, cfg.hidden_size)
    whole_states = stack.new_states(2)
    whole = stack(hidden, whole_states)
    monkeypatch.setattr(compute, "PREFILL_CHUNK", 5)  # 5 + 5 + 3 tokens
    piece_states = stack.new_states(2)
    pieces = compute.run_span(stack, 0, cfg.num_layers, hidden, piece_states)
    assert pieces.shape == whole.shape
    assert torch.allclose(pieces, whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(piece_states, whole_states):
        assert torch.allclose(a.ssm, b.ssm, atol=1e-5, rtol=1e-5) and torch.allclose(a.conv, b.conv, atol=1e-5)
    sub = compute.run_span(stack, 1, 3, hidden, stack.new_states(2)[1:3])  # a sub-span in pieces too
    assert sub.shape == hidden.shape


def test_graph_prefill_pieces_follow_the_memory_budget():
    """GraphDecoder's automatic prefill pieces: 2048 tokens where their activations are cheap next to the weights,
    1024 for a 2.8b peer of 32 blocks (whose budget is the weights + 10% + the states)."""
    from swarm.model.graphs import auto_prefill_chunk

    def cfg(d):
        return MambaConfig(vocab_size=50280, hidden_size=d, state_size=16, num_layers=1, intermediate_size=2 * d,
                           conv_kernel=4, time_step_rank=-(-d // 16))

    def block_bytes(d, elsize):  # in_proj, out_proj, x_proj, dt_proj: what dominates a block
        i, r = 2 * d, -(-d // 16)
        return (2 * i * d + i * d + (r + 32) * i + r * i) * elsize

    wide, small = cfg(2560), cfg(768)
    assert auto_prefill_chunk(wide, 64 * block_bytes(2560, 2), 2) == 2048  # all of 2.8b: 2048 tokens take 3.6%
    assert auto_prefill_chunk(wide, 32 * block_bytes(2560, 2), 2) == 1024  # half of it: 2048 would take 7.2%
    assert auto_prefill_chunk(wide, 4 * block_bytes(2560, 2), 2) == 1024
    assert auto_prefill_chunk(small, 24 * block_bytes(768, 2), 2) == 2048  # 130m bf16: 57 MB, under the floor
    assert auto_prefill_chunk(small, 24 * block_bytes(768, 4), 4) == 1024  # 130m fp32: 88 MB
