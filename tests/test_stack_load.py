"""Building a BlockStack / Head from tensors: zero-copy parameters, the same outputs, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from swarm.errors import ConfigError, UnknownTensor
from swarm.knot_fetch import load_tensors
from swarm.model import BlockStack, Head, MambaConfig


@pytest.fixture(scope="module")
def loaded(hf_models):
    """name -> (hf_model, cfg, tensors) for the tied and the untied-with-biases checkpoints."""
    out = {}
    for name in ("tied", "untied_bias"):
        model, _, knot = hf_models[name]
        src, tensors = load_tensors(knot)
        out[name] = (model, MambaConfig.from_dict(src.config), tensors)
    return out


def _copied(module: nn.Module, tensors, prefix_of) -> None:
    """The trusted slow path: allocate every parameter, then copy the source into it."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for pname, p in module.named_parameters():
            p.copy_(tensors[prefix_of(pname)])


def _stack_key(start: int):
    """Stack parameter name ('blocks.J.mixer...') -> file tensor name ('backbone.layers.{start+J}.mixer...')."""
    return lambda pname: f"backbone.layers.{start + int(pname.split('.')[1])}.{pname.split('.', 2)[2]}"


def _head_key(pname: str) -> str:
    mod, rest = pname.split(".", 1)
    return {"embeddings": "backbone.embeddings.", "norm_f": "backbone.norm_f.", "lm_head": "lm_head."}[mod] + rest


@pytest.mark.parametrize("name", ["tied", "untied_bias"])
def test_parameters_share_the_source_storage(loaded, name):
    _, cfg, tensors = loaded[name]
    stack = BlockStack.from_tensors(cfg, 1, cfg.num_layers, tensors)
    head = Head.from_tensors(cfg, tensors)
    for module, key in ((stack, _stack_key(1)), (head, _head_key)):
        params = list(module.named_parameters())
        assert params
        for pname, p in params:
            src = tensors[key(pname)]
            assert src.is_contiguous() and src.device.type == "cpu"
            assert p.data_ptr() == src.data_ptr(), f"{pname} was copied"
            assert p.dtype == src.dtype and not p.requires_grad and not p.is_meta


class _RealAllocations(TorchDispatchMode):
    """Records the ops that allocate or copy into real (non-meta) tensors."""

    ALLOC = ("empty", "empty_like", "empty_strided", "_to_copy", "copy_", "clone", "contiguous")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        real = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and not t.is_meta]
        if real and func.__name__.split(".")[0] in self.ALLOC:
            self.seen.append(str(func))
        return out


def test_nothing_is_allocated_or_copied_when_sources_match(loaded):
    _, cfg, tensors = loaded["untied_bias"]
    with _RealAllocations() as rec:
        BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors)
        Head.from_tensors(cfg, tensors)
    assert rec.seen == []


def test_non_contiguous_source_is_copied_once(loaded):
    _, cfg, tensors = loaded["tied"]
    key = "backbone.layers.0.mixer.in_proj.weight"
    w = tensors[key]
    strided = w.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    stack = BlockStack.from_tensors(cfg, 0, 1, {**tensors, key: strided})
    p = stack.blocks[0].mixer.in_proj.weight
    assert p.is_contiguous() and torch.equal(p, w) and p.data_ptr() != strided.data_ptr()


@pytest.mark.parametrize("name", ["tied", "untied_bias"])
def test_outputs_identical_to_copied_weights_and_match_transformers(loaded, name):
    model, cfg, tensors = loaded[name]
    n = cfg.num_layers
    stack, head = BlockStack.from_tensors(cfg, 0, n, tensors), Head.from_tensors(cfg, tensors)
    with torch.device("meta"):
        ref_stack, ref_head = BlockStack(cfg, 0, n), Head(cfg)
    _copied(ref_stack, tensors, _stack_key(0))
    _copied(ref_head, tensors, _head_key)
    ref_stack.set_backend(None)
    ref_head.kern = head.kern

    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    ours, ref = [], []
    for s, h, out in ((stack, head, ours), (ref_stack, ref_head, ref)):
        states = s.new_states(2)
        out.append(h.logits(s(h.embed(ids[:, :6]), states)))  # prefill, then single-token decode steps
        out.extend(h.logits(s(h.embed(ids[:, t:t + 1]), states)) for t in range(6, 9))
    assert torch.equal(torch.cat(ours, 1), torch.cat(ref, 1))
    with torch.no_grad():
        want = model(ids).logits
    assert (torch.cat(ours, 1) - want).abs().max().item() < 1e-4


def test_missing_tensor_and_wrong_shape_are_clear_errors(loaded):
    _, cfg, tensors = loaded["untied_bias"]
    key = "backbone.layers.2.mixer.x_proj.weight"
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(UnknownTensor, match="block 2: tensor 'backbone.layers.2.mixer.x_proj.weight' is missing"):
        BlockStack.from_tensors(cfg, 1, 3, missing)
    with pytest.raises(UnknownTensor, match="lm_head.weight"):
        Head.from_tensors(cfg, {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    with pytest.raises(ConfigError, match=r"'backbone.layers.2.mixer.x_proj.weight' has shape \(3, 4\)"):
        BlockStack.from_tensors(cfg, 2, 3, {**tensors, key: torch.zeros(3, 4)})


def test_a_parameter_left_on_meta_is_named():
    class HeadWithExtra(Head):
        def __init__(self, cfg: MambaConfig):
            super().__init__(cfg)
            self.extra = nn.Parameter(torch.ones(3))

    cfg = MambaConfig.from_dict(dict(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
    tensors = {"backbone.embeddings.weight": torch.randn(16, 8), "backbone.norm_f.weight": torch.ones(8)}
    with pytest.raises(ConfigError, match="'extra' was not loaded"):
        HeadWithExtra.from_tensors(cfg, tensors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peak_memory_is_the_weights_once(loaded):
    _, cfg, tensors = loaded["untied_bias"]
    weight_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("backbone.layers."))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device="cuda")
    # the weights, plus what prepare() derives (fp32 A, D, dt bias, flat conv weight: a small fraction)
    assert torch.cuda.max_memory_allocated() - base <= 1.5 * weight_bytes + 2**20
    on_gpu = {k: v.cuda() for k, v in tensors.items()}
    again = BlockStack.from_tensors(cfg, 0, cfg.num_layers, on_gpu, device="cuda")
    for (k, p) in again.named_parameters():
        assert p.device.type == "cuda" and p.data_ptr() == on_gpu[_stack_key(0)(k)].data_ptr()
    del stack
