"""Triton kernels and the CUDA-graph decoder against the plain-torch references and against transformers' Mamba.

Runs on a CUDA device (the device machine). The kernel tests also run on the CPU under Triton's interpreter
(TRITON_INTERPRET=1); the graph and transformers tests need CUDA. Errors are ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from swarm.errors import BackendUnavailable
from swarm.kernels import reference as ref

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)"),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

if DEVICE is not None:
    tk = pytest.importorskip("swarm.kernels.triton_ops", reason="Triton is not installed")
    ts = pytest.importorskip("swarm.kernels.triton_scan", reason="Triton is not installed")
    td = pytest.importorskip("swarm.kernels.triton_decode", reason="Triton is not installed")

# Tolerance on the relative error of an output, by its dtype: fp32 kernels differ from the reference only in the
# order of additions and exp's last bits; bf16/fp16 outputs are rounded once where the reference rounds twice.
# Triton's interpreter converts fp32 to bf16 by truncation (1 + 3 * 2**-9 becomes 1.0, not 1.0078125), twice
# round-to-nearest's error and biased, so on the CPU bf16 gets twice the tolerance.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2 if DEVICE == "cuda" else 2e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _deterministic_and_exact(request):
    # each test's random inputs are its own, whatever ran before it: a tolerance that holds once holds every run
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False  # the reference conv1d in fp32 must be fp32
        torch.backends.cuda.matmul.allow_tf32 = False


def assert_state_equal(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Conv states hold copies of inputs: exact on CUDA; the interpreter rounds to bf16/fp16 its own way."""
    if DEVICE == "cuda":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert rel_err(got, want) < TOL[dtype]


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in kernel output"
    return ((out.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 100), (2, 5, 768)])
def test_rms_norm(shape, dtype):
    x = _rand(*shape, dtype=dtype, scale=3.0)
    w = _rand(shape[-1], dtype=dtype) + 1
    out = tk.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref.rms_norm_ref(x, w, 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 37), (5, 1, 257), (8, 2560)])
def test_add_rms_norm(shape, dtype):
    res = _rand(*shape, scale=2.0)
    delta = _rand(*shape, dtype=dtype)
    w = _rand(shape[-1], dtype=dtype) + 1
    out, new_res = tk.add_rms_norm(res, delta, w, 1e-5)
    want_res = res + delta.float()
    assert rel_err(new_res, want_res) < 1e-6
    assert rel_err(out, ref.rms_norm_ref(want_res.to(dtype), w, 1e-5)) < TOL[dtype]


# ------------------------------------------------------------------ causal conv1d

CONV_SEQ = ("seq", 32, 16, 1, 2)  # the token-loop conv, its segments short enough that the tests cross them;
# "tile": tk.CONV_TILE, the tile kernel


def _conv_inputs(b, i, t, k, dtype, bias):
    xz = _rand(b, t, 2 * i, dtype=dtype)  # the block hands the kernel a strided view of in_proj's output
    x = xz[..., :i].transpose(1, 2)  # (B, I, T)
    state = _rand(b, i, k)
    w = _rand(i, k, dtype=dtype, scale=0.5)
    bb = _rand(i, dtype=dtype) if bias else None
    return x, state, w, bb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,i,t,k", [(1, 37, 1, 4), (2, 64, 2, 4), (3, 100, 3, 4), (1, 256, 50, 4),
                                     (2, 33, 257, 4), (1, 70, 5, 3), (2, 48, 2, 2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", [CONV_SEQ, "tile"])
def test_causal_conv1d(b, i, t, k, dtype, bias, config, monkeypatch):
    monkeypatch.setattr(tk, "CONV_CONFIG", tk.CONV_TILE if config == "tile" else config)
    x, state, w, bb = _conv_inputs(b, i, t, k, dtype, bias)
    state_ref = state.clone()
    want = ref.causal_conv1d_ref(x, state_ref, w, bb)
    out = tk.causal_conv1d(x, state, w, bb)
    assert out.shape == (b, i, t) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]
    assert_state_equal(state, state_ref, dtype)


@pytest.mark.parametrize("t,length", [(16, 1), (16, 2), (16, 11), (64, 64), (32, 17), (300, 290)])
@pytest.mark.parametrize("config", [CONV_SEQ, "tile"])
def test_causal_conv1d_device_length(t, length, config, monkeypatch):
    """A padded piece: outputs of the real tokens and the state as if only they had come."""
    monkeypatch.setattr(tk, "CONV_CONFIG", tk.CONV_TILE if config == "tile" else config)
    x, state, w, bb = _conv_inputs(2, 40, t, 4, torch.float32, True)
    state_ref = state.clone()
    want = ref.causal_conv1d_ref(x[..., :length], state_ref, w, bb)
    out = tk.causal_conv1d(x, state, w, bb, length=torch.tensor([length], dtype=torch.int32, device=DEVICE))
    assert rel_err(out[..., :length], want) < TOL[torch.float32]
    assert_state_equal(state, state_ref, torch.float32)


@pytest.mark.parametrize("b,i,t,k,seg", [(1, 37, 5, 4, 8), (2, 100, 300, 4, 64), (1, 70, 131, 3, 16),
                                        (3, 33, 64, 2, 24), (1, 200, 1000, 4, 128)])
def test_conv_kernels_agree_bitwise(b, i, t, k, seg, monkeypatch):
    """The token-loop conv adds each output's taps in the tile kernel's order: the same bits, output and state,
    across segment boundaries (each segment's first outputs read the previous segment's last inputs), with token
    offsets in 32 or 64 bits."""
    x, state, w, bb = _conv_inputs(b, i, t, k, torch.bfloat16, True)
    length = torch.tensor([max(1, t - 3)], dtype=torch.int32, device=DEVICE)
    outs = []
    for config, off64_from in [(("seq", 32, seg, 1, 2), 2 ** 31), (tk.CONV_TILE, 2 ** 31), (("seq", 32, seg, 1, 2), 0),
                               (tk.CONV_TILE, 0)]:  # 0: token offsets in 64 bits
        monkeypatch.setattr(tk, "CONV_CONFIG", config)
        monkeypatch.setattr(tk, "CONV_OFF64_FROM", off64_from)
        st = state.clone()
        outs.append((tk.causal_conv1d(x, st, w, bb, length=length), st))
    for out, st in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(st, outs[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_step_addresses_pool_slots(dtype):
    b, i, k, slots = 3, 130, 4, 6
    x = _rand(b, 2 * i, dtype=dtype)[:, :i]
    pool = _rand(slots, i, k)
    idx = torch.tensor([4, 0, 2], device=DEVICE)
    w, bb = _rand(i, k, dtype=dtype), _rand(i, dtype=dtype)
    gathered = pool[idx].clone()
    want = ref.causal_conv1d_ref(x.unsqueeze(-1), gathered, w, bb)[..., 0]
    untouched = pool[[1, 3, 5]].clone()
    out = tk.conv1d_step(x, pool, w, bb, idx)
    assert rel_err(out, want) < TOL[dtype]
    assert_state_equal(pool[idx], gathered, dtype)
    torch.testing.assert_close(pool[[1, 3, 5]], untouched, rtol=0, atol=0)


# ------------------------------------------------------------------ selective scan

def _scan_inputs(b, i, t, n, r, dtype, layout):
    if layout == "block":  # strides as the block produces them: (B, T, I) memory, B and C sliced from x_proj's output
        xz = _rand(b, t, 2 * i, dtype=dtype)
        u, z = xz[..., :i].transpose(1, 2), xz[..., i:].transpose(1, 2)
        delta = _rand(b, t, i, dtype=dtype, scale=0.5).transpose(1, 2)
        dbc = _rand(b, t, r + 2 * n, dtype=dtype)
        bm, cm = dbc[..., r:r + n], dbc[..., r + n:]
    else:
        u, z = _rand(b, i, t, dtype=dtype), _rand(b, i, t, dtype=dtype)
        delta = _rand(b, i, t, dtype=dtype, scale=0.5)
        bm, cm = _rand(b, t, n, dtype=dtype), _rand(b, t, n, dtype=dtype)
    a = -torch.exp(torch.log(torch.arange(1, n + 1, device=DEVICE, dtype=torch.float32)).expand(i, n)
                   + 0.3 * _rand(i, n))
    dt0 = torch.exp(torch.rand(i, device=DEVICE) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus, as Mamba initialises it
    d = _rand(i)
    state = _rand(b, i, n)
    return u, delta, a, bm, cm, d, z, delta_bias, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,i,t,n", [(1, 33, 1, 16), (2, 64, 7, 16), (1, 128, 16, 16), (2, 37, 100, 5),
                                     (1, 256, 300, 16), (3, 20, 33, 4), (2, 24, 530, 8)])  # last: 2 segments
@pytest.mark.parametrize("layout", ["block", "contiguous"])
def test_selective_scan(b, i, t, n, dtype, layout):
    args = _scan_inputs(b, i, t, n, 6, dtype, layout)
    state_ref = args[-1].clone()
    want = ref.selective_scan_ref(*args[:-1], state_ref)
    out = ts.selective_scan(*args)
    assert out.shape == (b, i, t) and out.dtype == torch.float32
    assert rel_err(out, want) < TOL[torch.float32] * 5
    assert rel_err(args[-1], state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("fast", [False, True])
def test_softplus_poly_and_gate_against_torch(fast):
    """The scan's polynomial softplus and rcp gate over a range wider than dt's (rcp.approx needs the GPU)."""
    if fast and DEVICE != "cuda":
        pytest.skip("rcp.approx is PTX: the interpreter cannot run it")
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, sp_ptr, g_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + k, mask=k < n, other=0.0)
        tl.store(sp_ptr + k, ts._softplus_poly(x, FAST), mask=k < n)
        tl.store(g_ptr + k, ts._silu_rcp(x, FAST), mask=k < n)

    x = torch.cat([torch.linspace(-40, 40, 4001, device=DEVICE), torch.randn(999, device=DEVICE) * 3])
    sp, g = torch.empty_like(x), torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 1024),)](x, sp, g, x.numel(), BLOCK=1024, FAST=fast)
    want_sp = torch.nn.functional.softplus(x.double())
    want_g = torch.nn.functional.silu(x.double())
    assert ((sp.double() - want_sp).abs() / want_sp).max().item() < 3e-6
    assert ((g.double() - want_g).abs() / want_g.abs().clamp_min(1e-30)).max().item() < 3e-6


@pytest.mark.parametrize("config", [("seq", 8, 4), ("seq", 32, 4), ("seq", 4, 2), ("seq", 16, 4, 3), ("seq", 8, 2, 9),
                                    ("seq", 16, 2, 4, 3), ("seq", 16, 1, 5, 2, 128),
                                    ("chunk", 16, 16, 4), ("chunk", 32, 8, 4),
                                    ("gluon", 32, 8), ("gluon", 16, 8, 3), ("gluon", 64, 8, 5, 128),
                                    ("gluon", 8, 16, 2), ("gluon", 16, 16, 1),
                                    ("lane", 16, 1), ("lane", 8, 2, 3), ("lane", 16, 4, 5), ("lane", 32, 1, 2),
                                    ("lane", 16, 1, 1), ("lane", 4, 1, 0, 64), ("lane", 16, 1, 0, None, 2),
                                    ("lane", 8, 4, 3, None, 2), ("lane", 16, 4, 0, None, 2, True),
                                    ("lane", 8, 2, 3, None, 1, True)])
@pytest.mark.parametrize("off64", [False, True])
def test_selective_scan_configs(config, off64, monkeypatch):
    _skip_without_gluon(config)
    if off64:  # token offsets in 64 bits, as for a sequence whose offsets pass 2**31
        monkeypatch.setattr(ts, "SCAN_OFF64_FROM", 0)
    args = _scan_inputs(2, 80, 70, 16, 6, torch.bfloat16, "block")
    state_ref = args[-1].clone()
    want = ref.selective_scan_ref(*args[:-1], state_ref)
    out = ts.selective_scan(*args, out_dtype=torch.bfloat16, config=config)
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert rel_err(args[-1], state_ref) < TOL[torch.float32]


def _skip_without_gluon(config):
    if config and config[0] in ("gluon", "lane") and not ts.gluon_scan_available(torch.device(DEVICE)):
        pytest.skip("the Gluon scans need a Hopper GPU")


@pytest.mark.parametrize("n", [16, 5, 2, 32, 1])
@pytest.mark.parametrize("r", [6, 16])  # B and C at 12 / 32 bytes into x_proj's rows: element loads / 16-byte vectors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lane_scan_widths_and_alignment(n, r, dtype):
    """The lane scan holds one state element a lane: widths that pad lanes (5), fill a warp with channels (1, 2) or
    with states (32); B and C rows as vectors where they are aligned, one element a load where not."""
    _skip_without_gluon(("lane",))
    args = _scan_inputs(2, 72, 90, n, r, dtype, "block")
    state_ref = args[-1].clone()
    want = ref.selective_scan_ref(*args[:-1], state_ref)
    for config in (("lane", 16, 2, 1), ("lane", 8, 1, 3), ("lane", 16, 1, 2, None, 2),
                   ("lane", 16, 4, 3, None, 2, True)):
        state = args[-1].clone()
        out = ts.selective_scan(*args[:-1], state, out_dtype=dtype, config=config)
        assert rel_err(out, want) < TOL[dtype] * (5 if dtype == torch.float32 else 1), config
        assert rel_err(state, state_ref) < TOL[torch.float32], config


def test_lane_scan_needs_at_most_32_states():
    args = _scan_inputs(1, 8, 20, 33, 2, torch.float32, "block")
    if not ts.gluon_scan_available(torch.device(DEVICE)):
        with pytest.raises(BackendUnavailable, match="lane"):
            ts.selective_scan(*args, config=("lane", 16, 1))
    else:
        with pytest.raises(ValueError, match="at most 32 states"):
            ts.selective_scan(*args, config=("lane", 16, 1))


def test_lane_scan_segments(monkeypatch):
    """One pass where a segment's warps fill a wave; else segments up to one wave, none under SCAN_MIN_SEGMENT."""
    monkeypatch.setattr(ts, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert ts._lane_segments(2048, 2560, cuda, 21) == 1  # 2.8b's width: 5120 x 16 elements, 2560 warps
    assert ts._lane_segments(2048, 768, cuda, 21) == 3  # 130m's: 1536 x 16
    assert ts._lane_segments(2048, 384, cuda, 16) == 5  # the same, 2 channels a thread
    assert ts._lane_segments(40, 768, cuda, 21) == 1
    assert ts._lane_segments(100, 96, cuda, 21) == 100 // ts.SCAN_MIN_SEGMENT


@pytest.mark.parametrize("n", [16, 5, 2, 32])
def test_gluon_scan_state_widths(n):
    """The Gluon scan's layout spreads the states over 4 lanes: widths under 4, odd and over 16 (padded lanes)."""
    _skip_without_gluon(("gluon",))
    args = _scan_inputs(2, 72, 90, n, 6, torch.bfloat16, "block")
    state_ref = args[-1].clone()
    want = ref.selective_scan_ref(*args[:-1], state_ref)
    out = ts.selective_scan(*args, out_dtype=torch.bfloat16, config=("gluon", 16, 8, 3))
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert rel_err(args[-1], state_ref) < TOL[torch.float32]


def test_scan_config_by_device():
    """The Gluon scan is the default only where it runs; asked for elsewhere, it is an error, not a slow path."""
    if not ts.gluon_scan_available(torch.device(DEVICE)):
        assert ts.default_scan_config(torch.device(DEVICE)) == ts.SCAN_CONFIG
        args = _scan_inputs(1, 16, 20, 4, 2, torch.float32, "block")
        with pytest.raises(BackendUnavailable, match="gluon"):
            ts.selective_scan(*args, config=("gluon", 16, 8))
        with pytest.raises(BackendUnavailable, match="lane"):
            ts.selective_scan(*args, config=("lane", 16, 1))
    else:
        want = ts.LANE_SCAN_CONFIG if ts.SCAN_LANE else ts.GLUON_SCAN_CONFIG if ts.SCAN_GLUON else ts.SCAN_CONFIG
        assert ts.default_scan_config(torch.device(DEVICE)) == want
        wide = ts.GLUON_SCAN_CONFIG if ts.SCAN_GLUON else ts.SCAN_CONFIG  # the lane scan holds <= 32 states
        assert ts.default_scan_config(torch.device(DEVICE), 64) == wide
    assert ts.default_scan_config(torch.device("cpu")) == ts.SCAN_CONFIG


def test_scan_segments_fill_one_wave(monkeypatch):
    """The "seq" scan's automatic segments: one wave of programs; the register cap only where it buys segments."""
    monkeypatch.setattr(ts, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert ts._segments(1024, 160, 1, cuda) == (13, ts.SCAN_CAP)  # 2.8b's width: 2080 programs, 16 warps an SM
    assert ts._segments(1024, 48, 1, cuda) == (32, None)  # 130m's: the tokens bound it; 1536 fit uncapped
    assert ts._segments(40, 160, 1, cuda) == (1, None)
    assert ts._segments(1024, 160, 1, torch.device("cpu")) == (16, None)
    # the Gluon scan's second pass: 13 warps an SM uncapped, 16 capped
    assert ts._segments(1024, 160, 1, cuda, ts.GLUON_WAVE) == (13, ts.SCAN_CAP)
    assert ts._segments(1024, 48, 1, cuda, ts.GLUON_WAVE) == (32, None)


@needs_cuda
@pytest.mark.parametrize("t", [2048, 1000])
@pytest.mark.parametrize("config", [("lane", 16, 1), ("lane", 16, 4, 0, None, 2, True)])
def test_lane_scan_at_full_width(t, config):
    """2.8b's width (5120 channels), B and C sliced from x_proj's rows as the block has them: one pass."""
    _skip_without_gluon(("lane",))
    args = _scan_inputs(1, 5120, t, 16, 160, torch.bfloat16, "block")
    cpt, ahead = (config[5], config[6]) if len(config) > 6 else (1, False)
    warps = 5120 // (cpt * 2 * config[2]) * config[2]
    assert ts._lane_segments(t, warps, torch.device(DEVICE), ts.LANE_WAVE[cpt, ahead]) == 1
    state_ref = args[-1].clone()
    want = ref.selective_scan_ref(*args[:-1], state_ref)
    out = ts.selective_scan(*args, out_dtype=torch.bfloat16, config=config)
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert rel_err(args[-1], state_ref) < TOL[torch.float32]


@needs_cuda
@pytest.mark.parametrize("kind", ["seq", "gluon"])
def test_selective_scan_wide_with_the_register_cap(kind):
    """At a width where the automatic segments take the register cap (the path a 2.8b prefill takes)."""
    config, wave = (ts.SCAN_CONFIG, ts.SCAN_WAVE) if kind == "seq" else (ts.GLUON_SCAN_CONFIG, ts.GLUON_WAVE)
    _skip_without_gluon(config)
    args = _scan_inputs(1, 2560, 1024, 16, 6, torch.bfloat16, "block")
    warps = config[2] if kind == "seq" else 1
    n_seg, cap = ts._segments(1024, 2560 // config[1], warps, torch.device(DEVICE), wave)
    assert cap is not None and n_seg > 1
    state_ref = args[-1].clone()
    want = ref.selective_scan_ref(*args[:-1], state_ref)
    out = ts.selective_scan(*args, out_dtype=torch.bfloat16, config=config)
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert rel_err(args[-1], state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("t,length,config", [(16, 1, None), (16, 9, None), (32, 32, None), (520, 300, ("seq", 8, 2, 4)),
                                            (520, 100, ("seq", 8, 2, 4)), (64, 63, ("seq", 16, 2, 3)),
                                            (16, 1, ("seq", 32, 1)), (520, 300, ("gluon", 8, 8, 4)),
                                            (520, 100, ("gluon", 16, 16, 4)), (64, 63, ("gluon", 32, 8)),
                                            (16, 9, ("gluon", 8, 8, 1)), (520, 300, ("lane", 16, 1, 4)),
                                            (520, 100, ("lane", 16, 2, 4)), (64, 63, ("lane", 16, 1)),
                                            (16, 9, ("lane", 8, 1, 1)), (40, 17, ("lane", 16, 4)),
                                            (520, 100, ("lane", 16, 4, 4, None, 2, True))])
def test_selective_scan_device_length(t, length, config):
    """Only the first `length` tokens count: their outputs, and the state after them (segments past them too)."""
    _skip_without_gluon(config)
    args = list(_scan_inputs(2, 24, t, 8, 6, torch.float32, "block"))
    state_ref = args[-1].clone()
    cut = [a[..., :length] if k in (0, 1, 6) else a[:, :length] if k in (3, 4) else a for k, a in enumerate(args[:-1])]
    want = ref.selective_scan_ref(*cut, state_ref)
    out = ts.selective_scan(*args, config=config, length=torch.tensor([length], dtype=torch.int32, device=DEVICE))
    assert rel_err(out[..., :length], want) < TOL[torch.float32] * 5
    assert rel_err(args[-1], state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,i,n", [(1, 96, 16), (3, 37, 5)])
def test_ssm_step(b, i, n, dtype):
    u, delta, a, bm, cm, d, z, delta_bias, state = _scan_inputs(b, i, 1, n, 4, dtype, "block")
    state_ref = state.clone()
    want = ref.selective_scan_ref(u, delta, a, bm, cm, d, z, delta_bias, state_ref)[..., 0]
    out = ts.ssm_step(u[..., 0], delta[..., 0], a.contiguous(), bm[:, 0], cm[:, 0], d, z[..., 0], delta_bias, state,
                      out_dtype=dtype)
    assert out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]
    assert rel_err(state, state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("i,n,r,k,bias", [(96, 16, 6, 4, True), (300, 5, 3, 3, False), (2500, 16, 160, 4, True)])
def test_conv_xproj_and_ssm_decode(i, n, r, k, bias, dtype):
    """The decode graph's pair: conv + shift + x_proj partial sums, then their sum + dt_proj + state update + gate."""
    b, slots = 3, 5
    xz = _rand(b, 2 * i, dtype=dtype)
    x, z = xz[:, :i], xz[:, i:]
    conv_pool, ssm_pool = _rand(slots, i, k), _rand(slots, i, n)
    conv_w, conv_b = _rand(i, k, dtype=dtype, scale=0.5), (_rand(i, dtype=dtype) if bias else None)
    x_w = _rand(r + 2 * n, i, dtype=dtype, scale=i ** -0.5)
    dt_w = _rand(i, r, dtype=dtype, scale=r ** -0.5)
    _, _, a, _, _, d, _, delta_bias, _ = _scan_inputs(b, i, 1, n, r, dtype, "contiguous")
    a = a.contiguous()
    idx = torch.tensor([2, 0, 4], device=DEVICE)
    conv_ref, ssm_ref = conv_pool[idx].clone(), ssm_pool[idx].clone()
    ssm_ref_before = ssm_ref.clone()
    xc_ref = ref.causal_conv1d_ref(x.unsqueeze(-1), conv_ref, conv_w, conv_b)[..., 0]  # (B, I) in dtype
    dbc = torch.nn.functional.linear(xc_ref, x_w)
    delta = torch.nn.functional.linear(dbc[:, :r], dt_w)
    y_ref = ref.selective_scan_ref(xc_ref[..., None], delta[..., None], a, dbc[:, None, r:r + n],
                                   dbc[:, None, r + n:], d, z[..., None], delta_bias, ssm_ref)[..., 0]
    before_conv, before_ssm = conv_pool.clone(), ssm_pool.clone()
    xc, partials = td.conv_xproj(x, conv_pool, conv_w, conv_b, x_w, idx)
    assert xc.dtype == dtype and rel_err(xc, xc_ref) < TOL[dtype]
    assert rel_err(partials.sum(1), dbc) < TOL[dtype]
    assert_state_equal(conv_pool[idx], conv_ref, dtype)
    y = td.ssm_decode(xc, partials, dt_w, a, d, z, delta_bias, ssm_pool, idx, out_dtype=dtype)
    assert y.dtype == dtype and rel_err(y, y_ref) < TOL[dtype] * 2
    assert rel_err(ssm_pool[idx], ssm_ref) < TOL[dtype] * 2
    untouched = [s for s in range(slots) if s not in idx.tolist()]
    assert torch.equal(conv_pool[untouched], before_conv[untouched])
    # x_proj's output itself (weight dtype) as the single partial sum, as GraphDecoder's cuBLAS path feeds it
    ssm_again = ssm_pool.clone()
    ssm_again[idx] = ssm_ref_before
    y1 = td.ssm_decode(xc_ref, dbc.unsqueeze(1), dt_w, a, d, z, delta_bias, ssm_again, idx, out_dtype=dtype)
    assert rel_err(y1, y_ref) < TOL[dtype] * 2
    assert rel_err(ssm_again[idx], ssm_ref) < TOL[dtype] * 2
    assert torch.equal(ssm_pool[untouched], before_ssm[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d,n,bias,config", [(1, 64, 96, False, None), (3, 100, 37, True, None),
                                               (8, 96, 40, True, None), (2, 2560, 300, False, (16, 4)),
                                               (1, 768, 1000, True, (64, 8))])
def test_norm_gemv(b, d, n, bias, config, dtype):
    """RMSNorm fused into in_proj: as rms_norm then linear, both rounding to the weight dtype."""
    torch.manual_seed(d + n)  # its own inputs, whatever ran before
    x = _rand(b, d, scale=2.0)
    nw = _rand(d, dtype=dtype, scale=0.1) + 1
    w = _rand(n, d, dtype=dtype, scale=d ** -0.5)
    bb = _rand(n, dtype=dtype) if bias else None
    want = torch.nn.functional.linear(ref.rms_norm_ref(x.to(dtype), nw, 1e-5).float(), w.float(),
                                      None if bb is None else bb.float())
    out = td.norm_gemv(x, nw, 1e-5, w, bb, config=config)
    assert out.dtype == dtype and out.shape == (b, n)
    # fp32 out (the LM head's logits): the same values, rounded to the weight dtype first
    assert torch.equal(td.norm_gemv(x, nw, 1e-5, w, bb, config=config, out_dtype=torch.float32), out.float())
    # the interpreter rounds to bf16 its own way (0.0104 seen at d = 2560 with other inputs): 1.5x there
    assert rel_err(out, want) < TOL[dtype] * (1.5 if DEVICE == "cpu" and dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("b,n", [(1, 50280), (3, 1000), (2, 7), (1, 1024), (4, 2049)])
def test_argmax_rows(b, n):
    """The greedy pick as torch.argmax: the first index of the largest value, with ties across the first pass's
    blocks and inside one, all-negative rows, a NaN (torch takes it as the largest)."""
    torch.manual_seed(n)
    x = _rand(b, n, scale=3.0) - 10
    if n > 1:
        top = x.max() + 1
        x[0, n - 1] = top  # a tie: the later copy must lose
        x[0, n // 3] = top
        x[-1, 1:3] = top + 1
    if b > 2:
        x[1, n // 2] = float("nan")
    got = td.argmax_rows(x)
    assert got.dtype == torch.int64 and got.shape == (b, 1)
    assert torch.equal(got.cpu(), x.cpu().argmax(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,d,i,k,cbias,config", [(1, 48, 72, 4, True, None), (3, 36, 50, 3, False, (8, 4)),
                                                  (2, 256, 300, 4, True, (16, 4)), (8, 40, 24, 4, True, None)])
def test_norm_gemv_with_the_conv_step(b, d, i, k, cbias, config, dtype):
    """in_proj's epilogue runs the conv step on its x half: as norm_gemv, then conv1d_step on a slot pool."""
    x = _rand(b, d, scale=2.0)
    nw = _rand(d, dtype=dtype, scale=0.1) + 1
    w = _rand(2 * i, d, dtype=dtype, scale=d ** -0.5)
    cw, cb = _rand(i, k, dtype=dtype, scale=0.5), (_rand(i, dtype=dtype) if cbias else None)
    pool = _rand(b + 3, i, k)
    idx = torch.arange(b + 2, 2, -1, device=DEVICE)[:b]
    want_pool = pool.clone()
    xz_ref = td.norm_gemv(x, nw, 1e-5, w, None, config=config)
    xc_ref = tk.conv1d_step(xz_ref[:, :i], want_pool, cw, cb, idx)
    out = td.norm_gemv(x, nw, 1e-5, w, None, config=config, conv=(pool, cw, cb, idx))
    torch.testing.assert_close(out[:, i:], xz_ref[:, i:], rtol=0, atol=0)  # z: untouched
    assert rel_err(out[:, :i], xc_ref) < TOL[dtype]
    assert_state_equal(pool, want_pool, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k,n,bias,config", [(1, 96, 64, False, None), (3, 37, 100, True, None),
                                               (2, 5120, 300, True, (8, 4)), (1, 1536, 768, False, (32, 4))])
def test_gemv_residual(b, k, n, bias, config, dtype):
    """out_proj with the residual add fused: residual += linear(x) in the weight dtype, in place."""
    x = _rand(b, k, dtype=dtype)
    w = _rand(n, k, dtype=dtype, scale=k ** -0.5)
    bb = _rand(n, dtype=dtype) if bias else None
    res = _rand(b, n, scale=3.0)
    want = res + torch.nn.functional.linear(x.float(), w.float(), None if bb is None else bb.float()).to(dtype).float()
    out = td.gemv_residual(x, w, bb, res, config=config)
    assert out is res
    assert rel_err(res, want) < TOL[dtype] * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k,n,config", [(1, 96, 35, None), (3, 5120, 192, None), (2, 1536, 80, (1, 1)),
                                          (8, 300, 41, (4, 4))])
def test_gemv_unrounded(b, k, n, config, dtype):
    """x_proj's GEMV: linear(x) in fp32, not rounded (its consumer rounds)."""
    x = _rand(b, k, dtype=dtype)
    w = _rand(n, k, dtype=dtype, scale=k ** -0.5)
    out = td.gemv(x, w, config=config)
    assert out.dtype == torch.float32 and out.shape == (b, n)
    assert rel_err(out, torch.nn.functional.linear(x.float(), w.float())) < TOL[torch.float32] * 5


# ------------------------------------------------------------------ GraphDecoder vs BlockStack

def _config(**kw):
    from swarm.model import MambaConfig
    d = dict(vocab_size=300, hidden_size=36, state_size=16, num_layers=3, intermediate_size=72, conv_kernel=4,
             time_step_rank=3)
    d.update(kw)
    return MambaConfig(**d)


def _random_tensors(cfg, seed=0):
    """Plausible Mamba weights in HF names (A_log and dt bias as Mamba initialises them), fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    i, n, r, k, d = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel, cfg.hidden_size

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    t = {"backbone.embeddings.weight": rnd(cfg.vocab_size, d, scale=0.5),
         "backbone.norm_f.weight": 1 + rnd(d, scale=0.1)}
    for j in range(cfg.num_layers):
        p = f"backbone.layers.{j}."
        dt0 = torch.exp(torch.rand(i, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        t.update({
            p + "norm.weight": 1 + rnd(d, scale=0.1),
            p + "mixer.in_proj.weight": rnd(2 * i, d, scale=d ** -0.5),
            p + "mixer.conv1d.weight": rnd(i, 1, k, scale=0.5),
            p + "mixer.conv1d.bias": rnd(i, scale=0.1),
            p + "mixer.x_proj.weight": rnd(r + 2 * n, i, scale=i ** -0.5),
            p + "mixer.dt_proj.weight": rnd(i, r, scale=r ** -0.5),
            p + "mixer.dt_proj.bias": dt0 + torch.log(-torch.expm1(-dt0)),
            p + "mixer.A_log": torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(i, n).contiguous(),
            p + "mixer.D": 1 + rnd(i, scale=0.1),
            p + "mixer.out_proj.weight": rnd(d, i, scale=i ** -0.5),
        })
    return t


def _stacks(cfg, dtype):
    from swarm.model import BlockStack
    tensors = {k: v.to(dtype) for k, v in _random_tensors(cfg).items()
               if cfg.use_conv_bias or not k.endswith("conv1d.bias")}
    want = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device="cpu", backend="reference")
    fast = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device=DEVICE, backend="reference")
    return want, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemv_batch,xproj", [(0, "cublas"), (1, "fused"), (4, "gemv")])
def test_graph_decoder_matches_block_stack(dtype, gemv_batch, xproj):
    from swarm.model.graphs import GraphDecoder
    torch.manual_seed(7)  # the inputs below: the bf16 tolerances hold for them whatever ran before
    cfg = _config()
    want, fast = _stacks(cfg, dtype)
    # bf16: outputs rounded once per matmul; the interpreter (DEVICE "cpu") rounds to bf16 its own way
    tol = 1e-4 if dtype == torch.float32 else (2e-2 if DEVICE == "cuda" else 3e-2)
    dec = GraphDecoder(fast, max_slots=5, buckets=(1, 2, 4), graphs=DEVICE == "cuda", gemv_batch=gemv_batch,
                       xproj=xproj)
    slots = [dec.alloc_slot() for _ in range(3)]
    ref_states = {s: want.new_states(1) for s in slots}
    for s, t in zip(slots, (5, 17, 1)):
        h = torch.randn(1, t, cfg.hidden_size)
        assert rel_err(dec.prefill(s, h).cpu(), want(h, ref_states[s])) < tol
    for order in ([0, 1, 2], [0, 1, 2], [2, 0], [1], [2, 1, 0]):
        batch = [slots[o] for o in order]
        h = torch.randn(len(batch), 1, cfg.hidden_size)
        out = dec.step(batch, h).cpu()
        for row, s in enumerate(batch):
            assert rel_err(out[row:row + 1], want(h[row:row + 1], ref_states[s])) < tol
    # bf16 rounding differences accumulate over the steps (more so under the interpreter's own rounding)
    state_tol = 1e-4 if dtype == torch.float32 else (6e-2 if DEVICE == "cuda" else 9e-2)
    for s in slots:
        for got, st in zip(dec.export_state(s), ref_states[s]):
            assert rel_err(got.ssm, st.ssm) < state_tol and rel_err(got.conv, st.conv) < state_tol
    # a state exported from one slot and imported into another continues identically
    moved = dec.alloc_slot()
    dec.import_state(moved, dec.export_state(slots[1]))
    h = torch.randn(1, 1, cfg.hidden_size).expand(2, 1, -1).contiguous()
    out = dec.step([slots[1], moved], h)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    # a freed slot comes back zeroed
    dec.free_slot(slots[0])
    again = dec.alloc_slot()
    assert again == slots[0] and all(st.ssm.abs().sum() == 0 and st.conv.abs().sum() == 0
                                     for st in dec.export_state(again))
    with pytest.raises(ValueError):
        dec.step([slots[1], slots[1]], torch.zeros(2, 1, cfg.hidden_size))


@needs_cuda
def test_graph_decoder_replays_without_host_sync():
    """The captured step is what runs: a second replay of the same input continues from the advanced state."""
    from swarm.model.graphs import GraphDecoder
    cfg = _config(num_layers=2)
    want, fast = _stacks(cfg, torch.float32)
    dec = GraphDecoder(fast, max_slots=2, buckets=(1,))
    s = dec.alloc_slot()
    st = want.new_states(1)
    h = torch.randn(1, 1, cfg.hidden_size)
    for _ in range(3):
        assert rel_err(dec.step([s], h).cpu(), want(h, st)) < 1e-4


@needs_cuda
def test_graph_prefill_buckets_across_pieces_and_slots():
    """Captured prefill graphs: lengths that share a bucket, a prompt longer than PREFILL_CHUNK (two pieces), two
    slots interleaved, and a decode step after each; all against the eager BlockStack in fp32."""
    from swarm.model.graphs import GraphDecoder
    from swarm.model.stack import PREFILL_CHUNK
    torch.manual_seed(3)
    cfg = _config(num_layers=2)
    want, fast = _stacks(cfg, torch.float32)
    dec = GraphDecoder(fast, max_slots=3, buckets=(1, 2), prefill_chunk=PREFILL_CHUNK)
    slots = [dec.alloc_slot(), dec.alloc_slot()]
    ref = {s: want.new_states(1) for s in slots}
    for s, t in [(slots[0], 20), (slots[1], 31), (slots[0], 17), (slots[1], PREFILL_CHUNK + 300), (slots[0], 5)]:
        h = torch.randn(1, t, cfg.hidden_size)
        assert rel_err(dec.prefill(s, h).cpu(), want(h, ref[s])) < 1e-4
        h1 = torch.randn(1, 1, cfg.hidden_size)
        assert rel_err(dec.step([s], h1).cpu(), want(h1, ref[s])) < 1e-4
    assert sorted(dec._prefill_graphs) == [16, 32, 512, PREFILL_CHUNK]
    # a small model takes pieces of PREFILL_CHUNK_MAX by default: one piece, one graph, for the same prompt length
    auto = GraphDecoder(fast, max_slots=1, buckets=(1,))
    assert auto.prefill_chunk == 2048
    s = auto.alloc_slot()
    st = want.new_states(1)
    h = torch.randn(1, PREFILL_CHUNK + 300, cfg.hidden_size)
    assert rel_err(auto.prefill(s, h).cpu(), want(h, st)) < 1e-4
    assert sorted(auto._prefill_graphs) == [2048]


def _persistent_or_skip(dec):
    from swarm.kernels import gluon_step
    if not gluon_step.available(torch.device("cuda")):
        pytest.skip("the persistent step needs a Hopper GPU and Triton's Gluon")
    assert dec._persistent is not None


@needs_cuda
@pytest.mark.parametrize("dtype,conv_kernel,conv_bias,programs", [
    (torch.bfloat16, 4, True, 0), (torch.float16, 4, True, 0), (torch.bfloat16, 3, False, 0),
    (torch.bfloat16, 2, True, 0), (torch.bfloat16, 4, True, 100)])
def test_persistent_step_matches_block_stack(dtype, conv_kernel, conv_bias, programs, monkeypatch):
    """GraphDecoder(step="persistent"), the batch-1 step as one persistent Gluon kernel: prefills, steps of slots
    taken in turns (the kernel addresses the pools by slot), a batch of two between them (the four-kernel path), a
    state moved between slots; outputs and states against the eager BlockStack in fp32 on the CPU. Conv widths
    below the kernel's padded 4 taps, with and without the conv's bias; 100 programs split the 128 channel groups
    unevenly (28 programs take two, 72 one), as 132 SMs split 2.8b's 640."""
    from swarm.kernels import gluon_step
    monkeypatch.setattr(gluon_step, "PROGRAMS", programs)
    from swarm.model.graphs import GraphDecoder
    torch.manual_seed(11)
    cfg = _config(hidden_size=512, intermediate_size=1024, time_step_rank=32, conv_kernel=conv_kernel,
                  use_conv_bias=conv_bias)  # a width the kernel's plan fits
    want, fast = _stacks(cfg, dtype)
    if not gluon_step.available(torch.device("cuda")):
        with pytest.raises(BackendUnavailable):
            GraphDecoder(fast, max_slots=4, buckets=(1, 2), step="persistent")
        pytest.skip("the persistent step needs a Hopper GPU and Triton's Gluon")
    dec = GraphDecoder(fast, max_slots=4, buckets=(1, 2), step="persistent")
    _persistent_or_skip(dec)
    p = dec._persistent.plan
    if programs:
        assert p.G == programs and p.channels(0)[1] == 2 * p.channels(p.G - 1)[1]
    slots = [dec.alloc_slot() for _ in range(3)]
    ref_states = {s: want.new_states(1) for s in slots}
    for s, t in zip(slots, (5, 17, 1)):
        h = torch.randn(1, t, cfg.hidden_size)
        assert rel_err(dec.prefill(s, h).cpu(), want(h, ref_states[s])) < 2e-2
    for order in ([0], [1], [2], [0, 1], [2], [1], [0], [0], [2]):
        batch = [slots[o] for o in order]
        h = torch.randn(len(batch), 1, cfg.hidden_size)
        out = dec.step(batch, h).cpu()
        for row, s in enumerate(batch):
            assert rel_err(out[row:row + 1], want(h[row:row + 1], ref_states[s])) < 2e-2
    for s in slots:
        for got, st in zip(dec.export_state(s), ref_states[s]):
            assert rel_err(got.ssm, st.ssm) < 6e-2 and rel_err(got.conv, st.conv) < 6e-2
    moved = dec.alloc_slot()
    dec.import_state(moved, dec.export_state(slots[1]))
    h = torch.randn(1, 1, cfg.hidden_size)
    a, b = dec.step([slots[1]], h).clone(), dec.step([moved], h)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic: no atomics in its sums


@needs_cuda
def test_persistent_step_agrees_with_the_four_kernels():
    """The two batch-1 steps of the same stack, replayed from graphs for 8 tokens: outputs and states agree to bf16
    rounding (they sum in other orders), and auto picks the persistent one only from PERSISTENT_MIN_D_MODEL on."""
    from swarm.model import graphs
    from swarm.model.graphs import GraphDecoder
    torch.manual_seed(12)
    cfg = _config(hidden_size=512, intermediate_size=1024, time_step_rank=32, num_layers=4)
    _, fast = _stacks(cfg, torch.bfloat16)
    kern = GraphDecoder(fast, max_slots=2, buckets=(1,), step="kernels")
    assert kern._persistent is None
    auto = GraphDecoder(fast, max_slots=2, buckets=(1,))
    assert auto._persistent is None  # 512 < PERSISTENT_MIN_D_MODEL
    pers = GraphDecoder(fast, max_slots=2, buckets=(1,), step="persistent")
    _persistent_or_skip(pers)
    sk, sp = kern.alloc_slot(), pers.alloc_slot()
    for _ in range(8):
        h = torch.randn(1, 1, cfg.hidden_size, device="cuda")
        assert rel_err(pers.step([sp], h), kern.step([sk], h)) < 1e-2
    assert rel_err(pers.ssm[:, sp], kern.ssm[:, sk]) < 2e-2
    assert rel_err(pers.conv[:, sp], kern.conv[:, sk]) < 2e-2
    graphs_min = graphs.PERSISTENT_MIN_D_MODEL
    try:
        graphs.PERSISTENT_MIN_D_MODEL = cfg.hidden_size
        assert GraphDecoder(fast, max_slots=1, buckets=(1,))._persistent is not None
    finally:
        graphs.PERSISTENT_MIN_D_MODEL = graphs_min


@needs_cuda
def test_persistent_step_times_out_instead_of_hanging():
    """A persistent step whose programs are not all running (here one is never launched, as when an MPS share or
    another kernel holds SMs) must not hang: its waits time out, the step ends with a NaN output, failed() says so
    and the decoder's next step raises a one-line error."""
    import time

    from swarm.model.graphs import GraphDecoder
    torch.manual_seed(13)
    cfg = _config(hidden_size=512, intermediate_size=1024, time_step_rank=32, num_layers=3)
    _, fast = _stacks(cfg, torch.bfloat16)
    from swarm.kernels import gluon_step
    if not gluon_step.available(torch.device("cuda")):
        pytest.skip("the persistent step needs a Hopper GPU and Triton's Gluon")
    dec = GraphDecoder(fast, max_slots=2, buckets=(1,), graphs=False, step="persistent")
    ps = dec._persistent
    slot = dec.alloc_slot()
    h = torch.randn(1, 1, cfg.hidden_size, device="cuda")
    assert torch.isfinite(dec.step([slot], h)).all()
    torch.cuda.synchronize()
    assert not ps.failed()
    ps.spin_ns = 20_000_000  # 20 ms
    ps._grid = ps.plan.G - 1
    t0 = time.perf_counter()
    out = dec.step([slot], h)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 10
    assert ps.failed() and torch.isnan(out).all()
    with pytest.raises(BackendUnavailable, match="timed out"):
        dec.step([slot], h)


@needs_cuda
def test_step_greedy_is_the_argmax_of_step_logits():
    """step_greedy (the greedy pick inside the token graph) against step_logits' argmax from the same states, one
    session and two at once; states stay equal."""
    from swarm.model import Head
    from swarm.model.graphs import GraphDecoder
    torch.manual_seed(14)
    cfg = _config(vocab_size=3001, hidden_size=64, intermediate_size=128, time_step_rank=4)
    tensors = {k: v.to(torch.bfloat16) for k, v in _random_tensors(cfg).items()}
    _, fast = _stacks(cfg, torch.bfloat16)
    head = Head.from_tensors(cfg, tensors, device="cuda")
    dec = GraphDecoder(fast, max_slots=4, buckets=(1, 2), head=head)
    a, b, c, d = (dec.alloc_slot() for _ in range(4))
    emb = head.embed(torch.randint(0, cfg.vocab_size, (1, 9)))
    for s in (a, b, c, d):
        dec.prefill(s, emb)
    ids = torch.randint(0, cfg.vocab_size, (2, 1), device="cuda")  # two sessions at once: a, c against b, d
    want = dec.step_logits([a, c], ids).argmax(-1, keepdim=True)
    got = dec.step_greedy([b, d], ids)
    assert got.dtype == torch.int64 and got.shape == (2, 1) and torch.equal(got, want)
    ids = got[:1]
    for _ in range(6):  # one session
        want = dec.step_logits([a], ids).argmax(-1, keepdim=True)
        got = dec.step_greedy([b], ids)
        assert torch.equal(got, want)
        ids = got
    assert torch.equal(dec.ssm[:, a], dec.ssm[:, b]) and torch.equal(dec.conv[:, a], dec.conv[:, b])


# ------------------------------------------------------------------ logits vs transformers

# small configs covering a tied head and an untied one with biases, another conv width, state size and expand
HF_CONFIGS = {
    "tied": dict(vocab_size=512, hidden_size=64, state_size=16, num_hidden_layers=3, conv_kernel=4),
    # a width the persistent step fits, through it (GraphDecoder step="persistent", Hopper only)
    "persistent": dict(vocab_size=512, hidden_size=512, state_size=16, num_hidden_layers=3, conv_kernel=4),
    "untied_bias": dict(vocab_size=320, hidden_size=48, state_size=8, num_hidden_layers=3, conv_kernel=3,
                        use_bias=True, tie_word_embeddings=False, time_step_rank=5, expand=3),
}


@needs_cuda
@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_logits_match_transformers(name, dtype, tol):
    """Prefill 16 tokens, then decode 8 through the graphs (half of them through the token graph, embedding and
    head included): logits vs transformers' fp32 forward on the CPU."""
    transformers = pytest.importorskip("transformers")
    from swarm.model import BlockStack, Head, MambaConfig
    from swarm.model.graphs import GraphDecoder
    hf_cfg = transformers.MambaConfig(**HF_CONFIGS[name])
    step = "persistent" if name == "persistent" else "auto"
    if step == "persistent":
        from swarm.kernels import gluon_step
        if dtype == torch.float32:
            pytest.skip("the persistent step streams bf16 or fp16 weights")
        if not gluon_step.available(torch.device("cuda")):
            pytest.skip("the persistent step needs a Hopper GPU and Triton's Gluon")
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # let the SSM, not the residual embedding, drive the logits
        for layer in hf.backbone.layers:
            layer.mixer.out_proj.weight.mul_(6)
            layer.mixer.in_proj.weight.mul_(2)
            layer.mixer.D.uniform_(-1, 1)
    ids = torch.randint(0, hf_cfg.vocab_size, (1, 24))
    with torch.no_grad():
        want = hf(ids).logits.float()  # (1, 24, vocab), fp32 on the CPU
    cfg = MambaConfig.from_dict(hf_cfg.to_dict())
    tensors = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    stack = BlockStack.from_tensors(cfg, 0, cfg.num_layers, tensors, device="cuda")
    head = Head.from_tensors(cfg, tensors, device="cuda")
    dec = GraphDecoder(stack, max_slots=2, buckets=(1, 2), head=head, step=step)
    assert (dec._persistent is not None) == (step == "persistent")
    slot = dec.alloc_slot()
    emb = head.embed(ids)
    logits = [head.logits(dec.prefill(slot, emb[:, :16]))]
    for t in range(16, 24):  # the blocks' graph with the head from Python, or the token graph (head inside)
        if t % 2:
            logits.append(dec.step_logits([slot], ids[:, t:t + 1]).unsqueeze(1))
        else:
            logits.append(head.logits(dec.step([slot], emb[:, t:t + 1])))
    got = torch.cat(logits, dim=1).cpu()
    err = rel_err(got, want)
    print(f"logits vs transformers fp32 ({name}, ours {dtype}): relative error {err:.2e}")
    if step == "persistent":
        # bf16 at this width: 5.1% for either step (H100), the prefill alone (the same code for both) 5.3%;
        # so the bound is wider, and the decoded logits are held to the four-kernel step's as well
        tol = 6e-2
        kern = GraphDecoder(stack, max_slots=2, buckets=(1, 2), head=head, step="kernels")
        ks = kern.alloc_slot()
        kern.prefill(ks, emb[:, :16])
        kl = torch.cat([kern.step_logits([ks], ids[:, t:t + 1]).unsqueeze(1) for t in range(16, 24)], dim=1)
        dec2 = GraphDecoder(stack, max_slots=2, buckets=(1, 2), head=head, step="persistent")
        ps = dec2.alloc_slot()
        dec2.prefill(ps, emb[:, :16])
        pl = torch.cat([dec2.step_logits([ps], ids[:, t:t + 1]).unsqueeze(1) for t in range(16, 24)], dim=1)
        assert rel_err(pl, kl) < 1e-2
    assert err < tol
