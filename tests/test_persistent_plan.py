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
    assert p.G <= sms and p.G % 2 == 0 and (2 * i) % p.G == 0 and d % p.G == 0
    assert p.RI == 2 * i // p.G and p.RO == d // p.G
    ch = p.RI // 2  # a program's channels: a box's rows are all x or all z
    assert ch % p.BRI == 0 and p.RO % p.BRO == 0
    assert d % (p.BPI * p.PWI) == 0 and i % (p.BPO * p.PWO) == 0
    for box in ((p.BRI, p.BPI, p.PWI), (p.BRO, p.BPO, p.PWO)):
        assert all(x & (x - 1) == 0 for x in box)  # Gluon's tensors and TMA boxes: powers of two
        assert box[0] * box[1] * box[2] * 2 <= p.slot <= gs.SLOT_BYTES[0]
    assert 2 <= p.S <= gs.MAX_SLOTS and p.S * p.slot <= gs.SMEM_BYTES
    assert p.CS >= ch and p.CS & (p.CS - 1) == 0


def test_plan_of_2p8b_on_an_h100():
    p = gs.plan(2560, 5120, 132)
    assert (p.G, p.RI, p.RO, p.slot) == (128, 80, 20, 8192)
    assert (p.BRI, p.BPI, p.PWI) == (8, 2, 256) and (p.BRO, p.BPO, p.PWO) == (4, 4, 256)
    assert gs.plan(2560, 5120, 132, slot_bytes=16384).slot == 8192  # 40 channels a program: boxes of 8 rows


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
