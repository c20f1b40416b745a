"""The persistent decode step's host side, without a GPU: how it splits a model (plan), the weight packing it
needs (BlockStack on CUDA), and GraphDecoder's step choice. The kernel itself is tested on the device machine
(tests/kernels/test_triton.py, test_persistent_*)."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import BackendUnavailable
from swarm.kernels import gluon_step as gs
from swarm.model import BlockStack, MambaConfig
from swarm.model.stack import PACKED, _pack

# Mamba-1's widths (d_model, d_inner): 130m, 370m, 790m, 1.4b, 2.8b
WIDTHS = [(768, 1536), (1024, 2048), (1536, 3072), (2048, 4096), (2560, 5120)]


@pytest.mark.parametrize("d,i", WIDTHS)
@pytest.mark.parametrize("sms", [132, 114, 78])
def test_plan_divides_the_model_and_fits_shared_memory(d, i, sms):
    p = gs.plan(d, i, sms)
    assert p is not None
    assert p.G == min(sms, p.units) and p.units * p.BRI == i  # every SM where there are channel groups enough
    # the programs' channels: consecutive, whole groups of BRI (a box's rows are all x or all z), every channel once,
    # at most one group apart and at most CH
    split = [p.channels(c) for c in range(p.G)]
    assert split[0][0] == 0 and sum(n for _, n in split) == i
    assert all(a[0] + a[1] == b[0] for a, b in zip(split, split[1:]))
    assert all(n % p.BRI == 0 and 0 < n <= p.CH for _, n in split)
    assert max(n for _, n in split) - min(n for _, n in split) <= p.BRI and max(n for _, n in split) == p.CH
    assert d % p.BRO == 0  # out_proj's queue items
    assert d % (p.BPI * p.PWI) == 0 and i % (p.BPO * p.PWO) == 0
    for box in ((p.BRI, p.BPI, p.PWI), (p.BRO, p.BPO, p.PWO)):
        assert all(x & (x - 1) == 0 for x in box)  # Gluon's tensors and TMA boxes: powers of two
        assert box[0] * box[1] * box[2] * 2 <= p.slot <= gs.SLOT_BYTES[0]
    assert 2 <= p.S <= gs.MAX_SLOTS and p.S * p.slot <= gs.SMEM_BYTES
    assert p.CS >= p.CH and p.CS & (p.CS - 1) == 0


def test_plan_of_2p8b_on_an_h100():
    p = gs.plan(2560, 5120, 132)
    assert (p.G, p.CH, p.units, p.slot) == (132, 40, 640, 8192)  # all 132 SMs (an even split had 128)
    assert [p.channels(c)[1] for c in (0, 111, 112, 131)] == [40, 40, 32, 32]  # 112 x 40 + 20 x 32 = 5120
    assert (p.BRI, p.BPI, p.PWI) == (8, 2, 256) and (p.BRO, p.BPO, p.PWO) == (4, 4, 256)
    p = gs.plan(2560, 5120, 128)
    assert (p.G, p.CH) == (128, 40) and {p.channels(c)[1] for c in range(128)} == {40}
    p = gs.plan(2560, 5120, 132, slot_bytes=16384)
    assert (p.slot, p.BRI, p.CH) == (16384, 16, 48)  # 320 groups of 16: 56 programs of 48 channels, 76 of 32


def test_plan_refuses_what_does_not_divide():
    assert gs.plan(2560 + 2, 5120, 132) is None  # d_model odd multiple of 2: no piece width divides it
    assert gs.plan(770, 1540, 132) is None


def _tensors(cfg, n):
    g = torch.Generator().manual_seed(0)
    d, i = cfg.hidden_size, cfg.intermediate_size
    return {f"backbone.layers.{j}.mixer.{name}.weight": torch.randn(*shape, generator=g)
            for j in range(n) for name, shape in (("in_proj", (2 * i, d)), ("x_proj", (10, i)),
                                                  ("out_proj", (d, i)))}


def test_pack_lays_blocks_out_back_to_back():
    cfg = MambaConfig(vocab_size=10, hidden_size=8, state_size=4, num_layers=3, intermediate_size=16,
                      conv_kernel=4, time_step_rank=2)
    src = _tensors(cfg, 3)
    out = _pack(src, 0, 3, torch.device("cpu"))
    assert len(out) == 3 * len(PACKED)
    for name in PACKED:
        views = [out[f"backbone.layers.{j}.{name}"] for j in range(3)]
        base = views[0].untyped_storage().data_ptr()
        for j, v in enumerate(views):
            assert torch.equal(v, src[f"backbone.layers.{j}.{name}"])  # copied, values unchanged
            assert v.untyped_storage().data_ptr() == base and v.data_ptr() == views[0].data_ptr() + j * v.nbytes
        assert gs._packed(views) is not None
        assert gs._packed([v.clone() for v in views]) is None  # separate tensors are not packed
    # a range that starts later packs its own blocks; a block with another shape is left to _assign
    assert set(_pack(src, 1, 3, torch.device("cpu"))) == {f"backbone.layers.{j}.{n}" for j in (1, 2) for n in PACKED}
    bad = dict(src)
    bad["backbone.layers.2.mixer.out_proj.weight"] = torch.zeros(8, 15)
    assert not any(k.endswith("out_proj.weight") for k in _pack(bad, 0, 3, torch.device("cpu")))


def test_graph_decoder_step_choice_without_the_kernel():
    pytest.importorskip("triton")
    from swarm.model.graphs import GraphDecoder
    from tests.kernels.test_triton import _config, _random_tensors
    cfg = _config(hidden_size=512, intermediate_size=1024, time_step_rank=32, num_layers=1)
    tensors = {k: v.to(torch.bfloat16) for k, v in _random_tensors(cfg).items()}
    stack = BlockStack.from_tensors(cfg, 0, 1, tensors, device="cpu", backend="reference")
    assert not gs.available(torch.device("cpu"))
    with pytest.raises(ValueError, match="step must be"):
        GraphDecoder(stack, max_slots=1, buckets=(1,), graphs=False, step="fastest")
    with pytest.raises(BackendUnavailable, match="persistent"):
        GraphDecoder(stack, max_slots=1, buckets=(1,), graphs=False, step="persistent")
    assert GraphDecoder(stack, max_slots=1, buckets=(1,), graphs=False)._persistent is None  # auto: kernels
