"""The numba CPU backend against the plain-torch reference kernels, and a BlockStack on it against one on the reference.

Tolerances: fp32 inputs rtol 1e-5 / atol 1e-5 (outputs are O(1); the kernels differ from the reference only in
summation order and a ~2e-7-accurate exp). bf16 inputs rtol/atol 2e-2 where the reference computes in bf16 (conv,
norm): one bf16 rounding is 4e-3 relative and the two round in different places. The scan widens to fp32 in both,
so its bf16 case keeps the fp32 tolerance.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from swarm.kernels import cpu, reference
from swarm.model import BlockStack, Head, LayerState, MambaConfig

FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)

# (batch, d_inner, tokens, d_state or d_conv): odd sizes, T=1 decode, serial and parallel paths (see cpu._SMALL)
SHAPES = [(1, 7, 1, 4), (3, 33, 1, 4), (1, 65, 5, 3), (3, 130, 37, 4), (2, 300, 19, 16), (1, 1536, 1, 16),
          (2, 700, 33, 16)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_matches_reference(shape, with_bias, dtype):
    b, i, t, k = shape
    k = min(k, 4)
    g = gen(hash((shape, with_bias)) % 2**31)
    # x as the model passes it: a (B, I, T) transposed view of a (B, T, I) buffer
    x = torch.randn(b, t, i, generator=g).to(dtype).transpose(1, 2)
    state = torch.randn(b, i, k, generator=g)
    w = torch.randn(i, k, generator=g) / k
    bias = torch.randn(i, generator=g) if with_bias else None
    st_ref, st_cpu = state.clone(), state.clone()
    y_ref = reference.causal_conv1d_ref(x, st_ref, w, bias)
    y_cpu = cpu.conv1d(x, st_cpu, w, bias)
    assert y_cpu.shape == y_ref.shape and y_cpu.dtype == y_ref.dtype
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(y_cpu, y_ref, **tol)
    torch.testing.assert_close(st_cpu, st_ref, **tol)


def scan_inputs(shape, dtype, seed):
    b, i, t, n = shape
    g = gen(seed)
    u = torch.randn(b, t, i, generator=g).to(dtype).transpose(1, 2)  # (B, I, T) views, as in the model
    delta = (torch.randn(b, t, i, generator=g) * 2 - 1).to(dtype).transpose(1, 2)
    delta[0, 0, :] = 25.0  # past softplus's threshold
    z = torch.randn(b, t, i, generator=g).to(dtype).transpose(1, 2)
    dbc = torch.randn(b, t, 3 + 2 * n, generator=g).to(dtype)
    bm, cm = dbc[..., 3:3 + n], dbc[..., 3 + n:]  # strided slices, as split() gives them
    A = -torch.exp(torch.randn(i, n, generator=g))
    D = torch.randn(i, generator=g)
    dt_bias = torch.randn(i, generator=g) * 0.5
    state = torch.randn(b, i, n, generator=g)
    return u, delta, A, bm, cm, D, z, dt_bias, state


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_matches_reference(shape, dtype):
    *args, state = scan_inputs(shape, dtype, hash(shape) % 2**31)
    st_ref, st_cpu = state.clone(), state.clone()
    y_ref = reference.selective_scan_ref(*args, st_ref)
    y_cpu = cpu.scan(*args, st_cpu)
    assert y_cpu.shape == y_ref.shape and y_cpu.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y_cpu, y_ref, **FP32)
    torch.testing.assert_close(st_cpu, st_ref, **FP32)


@pytest.mark.parametrize("shape", [(1, 130, 37, 16), (2, 300, 19, 16), (3, 65, 5, 4)])
def test_kernels_read_channel_slices_in_place(shape):
    """x and z as the model passes them, the two halves of in_proj's (B, T, 2I) output: the kernels read them where
    they lie (no copy) and give what they give on contiguous copies, bit for bit. So do slices of a buffer whose
    storage starts mid-row, and of one whose last row ends at the storage's end."""
    b, i, t, n = shape
    g = gen(i)
    xz = torch.randn(b, t, 2 * i, generator=g)
    x, z = xz[..., :i].transpose(1, 2), xz[..., i:].transpose(1, 2)
    for part, off in ((x, 0), (z, i)):
        rows, got_off = cpu._btI(part)
        assert got_off == off and rows.shape == (b, t, 2 * i) and torch.from_numpy(rows).data_ptr() == xz.data_ptr()
    flat = torch.randn(5 + b * t * (i + 3), generator=g)
    odd = flat[5:].view(b, t, i + 3)[..., 3:].transpose(1, 2)  # ends where the storage ends
    assert cpu._btI(odd)[0].shape == (b, t, i + 3)
    u, delta, A, bm, cm, D, _, dt_bias, state = scan_inputs(shape, torch.float32, 5)
    conv_w = torch.randn(i, 4, generator=g) / 2
    for xs, zs in ((x, z), (odd, z)):
        st_a, st_b = torch.randn(b, i, 4, generator=gen(1)), torch.randn(b, i, 4, generator=gen(1))
        contiguous = xs.transpose(1, 2).contiguous().transpose(1, 2)
        torch.testing.assert_close(cpu.conv1d(xs, st_a, conv_w, D), cpu.conv1d(contiguous, st_b, conv_w, D),
                                   rtol=0, atol=0)
        torch.testing.assert_close(st_a, st_b, rtol=0, atol=0)
        s_a, s_b = state.clone(), state.clone()
        y_a = cpu.scan(xs, delta, A, bm, cm, D, zs, dt_bias, s_a)
        y_b = cpu.scan(contiguous, delta, A, bm, cm, D, zs.transpose(1, 2).contiguous().transpose(1, 2), dt_bias, s_b)
        torch.testing.assert_close(y_a, y_b, rtol=0, atol=0)
        torch.testing.assert_close(y_a, reference.selective_scan_ref(xs, delta, A, bm, cm, D, zs, dt_bias,
                                                                     state.clone()), **FP32)


def test_scan_in_chunks_equals_one_pass():
    """Decoding token by token from the state must give what one prefill pass gives."""
    u, delta, A, bm, cm, D, z, dt_bias, state = scan_inputs((2, 40, 9, 16), torch.float32, 7)
    st_one, st_steps = state.clone(), state.clone()
    y_one = cpu.scan(u, delta, A, bm, cm, D, z, dt_bias, st_one)
    ys = [cpu.scan(u[..., s:s + 1], delta[..., s:s + 1], A, bm[:, s:s + 1], cm[:, s:s + 1], D, z[..., s:s + 1],
                   dt_bias, st_steps) for s in range(9)]
    torch.testing.assert_close(torch.cat(ys, -1), y_one, rtol=0, atol=0)
    torch.testing.assert_close(st_steps, st_one, rtol=0, atol=0)


def test_scan_decay_extremes():
    """exp(dt * A) over its whole range: decays that underflow to denormals and to 0 (A down to -inf), and ones
    that barely decay; the kernel's exp skips the underflow test (its 2**k is exactly 0 below -88)."""
    u, delta, A, bm, cm, D, z, dt_bias, state = scan_inputs((2, 70, 6, 16), torch.float32, 11)
    g = gen(12)
    A = -torch.exp(torch.empty(70, 16).uniform_(-14, 10, generator=g))  # -8e-7 .. -2.2e4
    A[3, :4] = torch.tensor([-float("inf"), -88.5, -87.5, -87.0])
    dt_bias.fill_(0.0)
    delta[:, :, 3] = 0.5413  # dt = softplus(0.5413) ~ 1, so row 3 decays by exp(A) itself
    st_ref, st_cpu = state.clone(), state.clone()
    y_ref = reference.selective_scan_ref(u, delta, A, bm, cm, D, z, dt_bias, st_ref)
    y_cpu = cpu.scan(u, delta, A, bm, cm, D, z, dt_bias, st_cpu)
    assert not y_cpu.isnan().any() and not st_cpu.isnan().any()
    torch.testing.assert_close(y_cpu, y_ref, **FP32)
    torch.testing.assert_close(st_cpu, st_ref, **FP32)


def test_scan_propagates_nan():
    u, delta, A, bm, cm, D, z, dt_bias, state = scan_inputs((1, 8, 3, 4), torch.float32, 3)
    delta[0, 2, 1] = float("nan")
    y = cpu.scan(u, delta, A, bm, cm, D, z, dt_bias, state)
    assert y[0, 2, 1:].isnan().all() and state[0, 2].isnan().all() and not y[0, 3].isnan().any()


def test_noncontiguous_state_updated_in_place():
    b, i, t, k = 2, 9, 3, 4
    x = torch.randn(b, i, t)
    big = torch.randn(b, i, 2 * k)
    state = big[:, :, ::2]  # a strided view: the kernel must still write through to `big`
    st_ref = state.clone()
    y_ref = reference.causal_conv1d_ref(x, st_ref, torch.randn(i, k, generator=gen(1)), None)
    y_cpu = cpu.conv1d(x, state, torch.randn(i, k, generator=gen(1)), None)
    torch.testing.assert_close(y_cpu, y_ref, **FP32)
    torch.testing.assert_close(big[:, :, ::2], st_ref, **FP32)


@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 37, 130), (3, 300, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(shape, dtype):
    g = gen(shape[1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    y_ref = reference.rms_norm_ref(x, w, 1e-5)
    y_cpu = cpu.rms_norm(x, w, 1e-5)
    assert y_cpu.shape == y_ref.shape and y_cpu.dtype == y_ref.dtype
    torch.testing.assert_close(y_cpu, y_ref, **(FP32 if dtype == torch.float32 else BF16))


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("n_out", [131, 1200])  # serial and parallel GEMV
def test_linear_matches_torch(rows, n_out):
    g = gen(rows)
    x = torch.randn(rows, 1, 497, generator=g)
    w = torch.randn(n_out, 497, generator=g) / 10
    bias = torch.randn(n_out, generator=g)
    torch.testing.assert_close(cpu.linear(x, w), F.linear(x, w), **FP32)
    torch.testing.assert_close(cpu.linear(x, w, bias), F.linear(x, w, bias), **FP32)


def test_bf16_builds_wait_for_bf16_weights():
    """Importing the backend builds only the fp32 kernels (the bf16 builds are ~1/4 of a cold start); the first bf16
    weights build the rest, and those kernels then take bf16 bit patterns."""
    code = ("import torch; from swarm.kernels import cpu\n"
            "n = len(cpu._BF16_LATER); before = cpu._bf16_ready, sum(len(k.signatures) for k, _ in cpu._BF16_LATER)\n"
            "y = cpu.linear(torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(32, 64, dtype=torch.bfloat16))\n"
            "after = cpu._bf16_ready, sum(len(k.signatures) for k, _ in cpu._BF16_LATER)\n"
            "print(n, *before, *after, y.dtype, float(y[0, 0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    n, ready0, sigs0, ready1, sigs1, dtype, val = out.stdout.split()
    assert int(n) >= 7 and (ready0, int(sigs0)) == ("False", int(n)) and (ready1, int(sigs1)) == ("True", 2 * int(n))
    assert (dtype, float(val)) == ("torch.bfloat16", 64.0)


def test_linear_gemm_is_onednn():
    """Past _GEMV_ROWS, fp32 rows go to oneDNN's GEMM (2.3x MKL's on AMD CPUs with AVX-512): the torch that CI
    installs has it, so losing it is a failure here, not a silent slowdown. Where a gradient is wanted, F.linear."""
    assert cpu._GEMM is not None
    g = gen(5)
    x, w, b = torch.randn(2, 33, 97, generator=g), torch.randn(65, 97, generator=g), torch.randn(65, generator=g)
    torch.testing.assert_close(cpu._GEMM(x, w, b), F.linear(x, w, b), **FP32)
    # strided inputs and weights (oneDNN has no primitive for some strided weights: those take F.linear)
    xs = torch.randn(2, 40, 200, generator=g)[..., ::2][..., :97]
    for wx in (w, torch.randn(97, 65, generator=g).t(), torch.randn(65, 200, generator=g)[:, ::2][:, :97]):
        torch.testing.assert_close(cpu.linear(xs, wx, b), F.linear(xs, wx, b), **FP32)
    wg = w.clone().requires_grad_()
    out = cpu.linear(x, wg, b)
    assert out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(wg.grad, x.sum(dim=(0, 1)).expand_as(w), **FP32)


@pytest.mark.parametrize("rows", [1, 3, 8, 40])  # the bf16 GEMV, and the GEMM past _GEMV_ROWS
@pytest.mark.parametrize("n_out", [131, 1200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native_bf16", [False, True])  # bf16 past _GEMV_ROWS: widened, or torch's own bf16 GEMM
def test_half_linear_matches_torch(rows, n_out, dtype, native_bf16, monkeypatch):
    """Half-precision weights: the output dtype is F.linear's and the values are fp32 sums rounded once, so they
    are within one rounding of torch's own (which also sums in fp32)."""
    monkeypatch.setattr(cpu, "_NATIVE_BF16", native_bf16)
    g = gen(rows + n_out)
    x = torch.randn(2, rows, 497, generator=g).to(dtype)[:1]
    w = (torch.randn(n_out, 497, generator=g) / 10).to(dtype)
    bias = torch.randn(n_out, generator=g).to(dtype)
    for b in (None, bias):
        got = cpu.linear(x, w, b)
        assert got.dtype == dtype and got.shape == (1, rows, n_out)
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=8e-3)  # one bf16 rounding: 2**-8
        torch.testing.assert_close(got, F.linear(x, w, b), **BF16)


TINY = MambaConfig(vocab_size=64, hidden_size=48, state_size=8, num_layers=3, intermediate_size=96, conv_kernel=4,
                   time_step_rank=3)


def random_tensors(cfg: MambaConfig, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random weights for every block, scaled so activations stay O(1) through the stack."""
    g = gen(seed)
    proto = BlockStack(cfg, 0, cfg.num_layers)
    out = {}
    for name, p in proto.blocks.named_parameters():
        j, rest = name.split(".", 1)
        t = torch.randn(p.shape, generator=g)
        if p.dim() == 2 or "conv1d.weight" in name:
            t /= p.shape[-1] ** 0.5
        if rest.endswith("A_log"):
            t = torch.log(torch.rand(p.shape, generator=g) * 8 + 0.5)
        out[f"backbone.layers.{j}.{rest}"] = t
    out["backbone.embeddings.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    out["backbone.norm_f.weight"] = 1 + 0.1 * torch.randn(cfg.hidden_size, generator=g)
    return out


def test_model_on_cpu_backend_matches_reference():
    """Embed, prefill 11 tokens, decode 5 greedily: hidden states, logits and final states agree."""
    tensors = random_tensors(TINY, 0)
    ref = BlockStack.from_tensors(TINY, 0, 3, tensors, backend="reference")
    fast = BlockStack.from_tensors(TINY, 0, 3, tensors, backend="cpu")
    head_ref, head_fast = Head.from_tensors(TINY, tensors, backend="reference"), Head.from_tensors(TINY, tensors)
    assert fast.kern.name == head_fast.kern.name == "cpu"
    s_ref, s_fast = ref.new_states(2), fast.new_states(2)
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=gen(1))
    for _ in range(6):  # prefill, then decode steps
        h_ref, h_fast = ref(head_ref.embed(ids), s_ref), fast(head_fast.embed(ids), s_fast)
        torch.testing.assert_close(h_fast, h_ref, **FP32)
        logits = head_fast.logits(h_fast[:, -1:])
        torch.testing.assert_close(logits, head_ref.logits(h_ref[:, -1:]), **FP32)
        ids = logits.argmax(-1)  # (2, 1)
    for a, b in zip(s_fast, s_ref):
        torch.testing.assert_close(a.conv, b.conv, **FP32)
        torch.testing.assert_close(a.ssm, b.ssm, **FP32)
    assert isinstance(s_fast[0], LayerState)


def test_model_bf16_on_cpu_backend_near_fp32_maths():
    """bf16 weights: the cpu backend (fp32 sums, each stage rounded to bf16) against the fp32 maths on the same
    weights, next to the reference backend (torch's bf16 kernels) against the same: within 2% of the hidden
    states' scale at every step, and over the run no further off than the reference is."""
    t16 = {k: v.to(torch.bfloat16) for k, v in random_tensors(TINY, 0).items()}
    exact = BlockStack.from_tensors(TINY, 0, 3, {k: v.float() for k, v in t16.items()}, backend="reference")
    ref = BlockStack.from_tensors(TINY, 0, 3, t16, backend="reference")
    fast = BlockStack.from_tensors(TINY, 0, 3, t16, backend="cpu")
    states = [m.new_states(2) for m in (exact, ref, fast)]
    x = torch.randn(2, 11, TINY.hidden_size, generator=gen(1)) * 2
    err_ref = err_fast = 0.0
    for step in range(6):  # a prefill, then decode steps (the fused block step)
        h_exact, h_ref, h_fast = (m(x, st) for m, st in zip((exact, ref, fast), states))
        e = (h_fast - h_exact).abs().max().item()
        assert e <= 0.02 * h_exact.abs().max().item(), (step, e)
        err_fast, err_ref = err_fast + e, err_ref + (h_ref - h_exact).abs().max().item()
        x = torch.randn(2, 1, TINY.hidden_size, generator=gen(2 + step)) * 2
    assert err_fast <= 1.5 * err_ref, (err_fast, err_ref)


@pytest.mark.parametrize("cfg_kw, batch, dtype", [
    (dict(state_size=16, intermediate_size=130, conv_kernel=4), 1, torch.float32),  # a last pass of 2 (< _SB)
    (dict(state_size=16, intermediate_size=130, conv_kernel=4), 8, torch.float32),
    (dict(state_size=5, intermediate_size=67, conv_kernel=3), 3, torch.float32),  # odd N, a conv without bias
    (dict(state_size=16, intermediate_size=130, conv_kernel=4), 2, torch.bfloat16),
    (dict(state_size=5, intermediate_size=67, conv_kernel=3), 1, torch.bfloat16),
])
def test_block_step_matches_separate_kernels(cfg_kw, batch, dtype):
    """The fused decode token (one call a block) against the same block on the separate CPU kernels: hidden
    states and both states after several tokens, with non-contiguous state tensors (updated through). Both do the
    same arithmetic in the same order, bf16 weights included (each stage's output rounded to bf16 where the
    separate kernels return bf16), so FP32 holds for both dtypes: a missed rounding would be ~4e-3 off."""
    import dataclasses

    cfg = MambaConfig(vocab_size=64, hidden_size=40, num_layers=2, time_step_rank=4, **cfg_kw)
    tensors = {k: v.to(dtype) for k, v in random_tensors(cfg, 5).items()}
    if cfg.conv_kernel == 3:
        tensors = {k: v for k, v in tensors.items() if not k.endswith("conv1d.bias")}
        cfg = dataclasses.replace(cfg, use_conv_bias=False)
    stack = BlockStack.from_tensors(cfg, 0, 2, tensors, backend="cpu")
    assert stack.kern.block_step is cpu.block_step
    separate = dataclasses.replace(stack.kern, block_step=None)
    big = [LayerState(torch.zeros(batch, cfg.intermediate_size, 2 * cfg.conv_kernel),
                      torch.zeros(batch, cfg.intermediate_size, 2 * cfg.state_size)) for _ in range(2)]
    fused_st = [LayerState(b.conv[..., ::2], b.ssm[..., ::2]) for b in big]  # strided views
    sep_st = stack.new_states(batch)
    x = torch.randn(batch, 6, cfg.hidden_size, generator=gen(6))
    with torch.inference_mode():
        for t in range(6):
            h_f = h_s = x[:, t:t + 1]
            for blk, sf, ss in zip(stack.blocks, fused_st, sep_st):
                h_f, h_s = blk(h_f, sf, stack.kern), blk(h_s, ss, separate)
            torch.testing.assert_close(h_f, h_s, **FP32)
    for b, ss in zip(big, sep_st):
        torch.testing.assert_close(b.conv[..., ::2], ss.conv, **FP32)
        torch.testing.assert_close(b.ssm[..., ::2], ss.ssm, **FP32)
        assert b.ssm.abs().sum() > 0


def test_block_step_declines_what_it_does_not_cover():
    """Projection biases or mixed dtypes (block_weights), more than one token or more rows than its GEMV takes
    (block_step): None, and the block takes the kernels. States of another batch: an error, not garbage."""
    m = TINY
    i, n, k, r, d = m.intermediate_size, m.state_size, m.conv_kernel, m.time_step_rank, m.hidden_size
    w = dict(norm_w=torch.ones(d), eps=1e-5, in_w=torch.randn(2 * i, d), in_b=None, conv_w=torch.randn(i, k),
             conv_b=None, x_w=torch.randn(r + 2 * n, i), dt_w=torch.randn(i, r), dt_bias=torch.zeros(i),
             A=-torch.rand(i, n), D=torch.ones(i), out_w=torch.randn(d, i), out_b=None)
    assert cpu.block_weights(**dict(w, in_w=w["in_w"].bfloat16())) is None
    assert cpu.block_weights(**dict(w, out_b=torch.zeros(d))) is None
    weights = cpu.block_weights(**w)
    st = lambda b: (torch.zeros(b, i, k), torch.zeros(b, i, n))  # noqa: E731
    assert cpu.block_step(torch.randn(1, 1, d), weights, *st(1)) is not None
    assert cpu.block_step(torch.randn(1, 2, d), weights, *st(1)) is None
    assert cpu.block_step(torch.randn(9, 1, d), weights, *st(9)) is None
    with pytest.raises(ValueError, match="do not fit 1 rows"):
        cpu.block_step(torch.randn(1, 1, d), weights, *st(2))


def test_bf16_rounding_matches_torch():
    """The fused step's rounding to bf16 (ties to even, NaN and infinities kept) against torch's own conversion."""
    g = gen(21)
    x = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-130, 128, (4000,), generator=g).float())
    halfway = (torch.randint(0, 2**15, (500,), generator=g, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.3895314e38, -3.3895314e38,
                            1e-45, 1.1754942e-38, 1.0, 1.00390625, 1.01171875])
    x = torch.cat([x, halfway, halfway.nextafter(torch.zeros(1)), special])
    got = torch.tensor([float(cpu._round_bf16(v)) for v in x.numpy()])
    want = x.bfloat16().float()
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32))
