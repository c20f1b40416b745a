"""Fast CPU backend: numba kernels for the causal conv, the selective scan, RMSNorm and a small-batch GEMV.

Each kernel has the contract of its plain-torch twin in `reference.py` (states updated in place, same shapes and
output dtypes) and is tested against it in tests/kernels/test_cpu.py. The kernels run in fp32 over zero-copy numpy
views of the torch tensors; bf16 inputs are widened first (numba has no bf16). The scan is sequential over tokens
inside the kernel and fuses softplus(delta + bias), the D skip and the silu(z) gate; the conv fuses its state update
and SiLU. The model's activations are (B, T, I) in memory, channels contiguous, and both vectorise across channels:
the scan splits the work over (batch, block of _SCAN_CW channels) with prange, the conv, which has no state to carry
along the tokens but its K-1 inputs, over (batch, chunk of _CT tokens).

Decoding calls every kernel once per block per token, so the wrappers stay thin and tiny inputs run serially: a
parallel region costs more than a few thousand multiply-adds.

Signatures are explicit, so numba compiles (or, with cache=True, loads from __pycache__) exactly one fp32 build of
each kernel when this module is imported, never in the middle of a decode; any other argument type is a TypeError.
The GEMV and block-step kernels' bf16 builds come on the first bf16 weights (_bf16_kernels), before their first
token.

All the numba code stays in this one file, long as it is: numba's cache (cache=True, in __pycache__) is checked
against the timestamp of the file that defines a kernel, not of the files its callees live in (numba's pull
requests to track those, #8396 and #9563, were not merged). Split across files, an update that changed only a
callee's file would leave its callers' stale builds loading from the cache.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import float32, int64, njit, prange, types
from numba.extending import intrinsic, overload

from swarm.kernels import Backend

_F32 = torch.float32
# fastmath stays off for the scan, conv and norm (their numerics must match the reference to 1e-5, NaNs included).
# error_model="numpy": a float division is a division, not a branch that raises ZeroDivisionError (and stops
# LLVM from vectorising the loop around it).
_EXACT = dict(fastmath=False, error_model="numpy", cache=True, nogil=True)
# A dot product only vectorises if its sum may be reordered (BLAS does the same); no approximations, no nnan.
_DOT = dict(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True, nogil=True)

_CW = 64  # channels per block of work: LLVM's vector loop runs 32 lanes at a time, so fewer would stay scalar
# channels per job of the prefill scan: its channel loop runs once per token and state pair, and 64 channels are
# only 4 of AVX-512's vectors; 128 amortises the loop's set-up (1.87 -> 1.68 ms a 130m block at 512 tokens on Zen 5;
# 256 measured 1.82, 32 2.47)
_SCAN_CW = 128
# Below this many element updates a kernel runs serially: a parallel region costs a few microseconds when both
# cores are free, and far more when another process holds one (the region waits for its slowest thread).
_SMALL = 1 << 14

# numba array types: C = contiguous, A = any strides
_A3 = float32[:, :, :]
_C3 = float32[:, :, ::1]
_C2 = float32[:, ::1]
_C1 = float32[::1]
_U2 = types.uint16[:, ::1]  # bf16 weights, as their bit patterns

# The bf16 builds of the GEMV and block-step kernels are compiled (or loaded from the cache) on the first bf16
# weights, not at import: they are ~5 s of a cold start's ~16, which an fp32 run never uses.
_BF16_LATER: list = []  # (kernel, its bf16 signature), callees before callers
_bf16_lock = threading.Lock()
_bf16_ready = False


def _fp32_now_bf16_later(sig32, sig16, **opts):
    """njit compiling sig32 now and sig16 in _bf16_kernels()."""
    def wrap(fn):
        kernel = njit(sig32, **opts)(fn)
        _BF16_LATER.append((kernel, sig16))
        return kernel
    return wrap


def _bf16_kernels() -> None:
    """Build the kernels' bf16 signatures, once (a peer meets its first bf16 weights while it measures its
    throughput, before it serves; a local run on its first token)."""
    global _bf16_ready
    if _bf16_ready:
        return
    with _bf16_lock:
        if not _bf16_ready:
            for kernel, sig in _BF16_LATER:
                kernel.disable_compile(False)
                try:
                    kernel.compile(sig)
                finally:
                    kernel.disable_compile()
            _bf16_ready = True

# ------------------------------------------------------------------------------------- vectorisable exp and log1p
# libm's expf/log1pf are opaque calls that keep a loop scalar; these are Cephes' polynomials (max relative error
# 1.2e-7 where the scan uses them), written so that LLVM turns a loop of them into AVX2 code. Their polynomials may
# fuse multiply-adds ('contract', a single rounding where two were): 30% faster, and the scan is mostly exp.
_POLY = dict(_EXACT, fastmath={"contract"})

_I32, _FLT = ir.IntType(32), ir.FloatType()


def _bit_op(name: str, arg: types.Type, build):
    """A numba intrinsic float32 name(x: arg) whose LLVM body is build(builder, x): bit-level float work that
    numba has no operation for, and that LLVM still vectorises."""
    def typer(typingctx, x):
        if x != arg:
            return None
        return types.float32(arg), lambda context, builder, signature, args: build(builder, args[0])

    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


def _i32(v: int) -> ir.Constant:
    return ir.Constant(_I32, v)


# 2**k for a float32 k holding an integer in [-126, 127], built in the exponent field (k = -127 gives 0)
_pow2 = _bit_op("_pow2", types.float32,
                lambda b, k: b.bitcast(b.shl(b.add(b.fptosi(k, _I32), _i32(127)), _i32(23)), _FLT))
# u / 2**floor(log2 u), in [1, 2), for a positive normal float32
_mantissa = _bit_op("_mantissa", types.float32, lambda b, u: b.bitcast(
    b.or_(b.and_(b.bitcast(u, _I32), _i32(0x007FFFFF)), _i32(0x3F800000)), _FLT))
# floor(log2 u) as a float32, for a positive normal float32
_exponent = _bit_op("_exponent", types.float32, lambda b, u: b.sitofp(
    b.sub(b.lshr(b.bitcast(u, _I32), _i32(23)), _i32(127)), _FLT))
# the float32 of a bf16 bit pattern (uint16): its bits are the top half of the float's, so this is exact
_bf16 = _bit_op("_bf16", types.uint16, lambda b, u: b.bitcast(b.shl(b.zext(u, _I32), _i32(16)), _FLT))


def _round_bits(b, x):
    bits = b.bitcast(x, _I32)
    up = b.add(b.add(bits, _i32(0x7FFF)), b.and_(b.lshr(bits, _i32(16)), _i32(1)))  # ties to even
    return b.bitcast(b.and_(up, _i32(-65536)), _FLT)


# x rounded to the nearest bf16, as a float32; not for NaN (the caller keeps those)
_bf16_round_bits = _bit_op("_bf16_round_bits", types.float32, _round_bits)


@njit(float32(float32), **_EXACT)
def _round_bf16(v):
    return v if v != v else _bf16_round_bits(v)


def _wv(w_elem):
    """A weight element as float32: itself, or a bf16 bit pattern widened (exact)."""


@overload(_wv)
def _wv_impl(w_elem):
    if w_elem == types.float32:
        return lambda w_elem: w_elem
    if w_elem == types.uint16:
        return lambda w_elem: _bf16(w_elem)


def _like(v, w):
    """v rounded as a result in w's dtype is: fp32 weights keep it, bf16 weights round it to bf16 (as the separate
    kernels' outputs are), NaN kept."""


@overload(_like)
def _like_impl(v, w):
    if w.dtype == types.float32:
        return lambda v, w: v
    if w.dtype == types.uint16:
        return lambda v, w: _round_bf16(v)


_f = np.float32
_ZERO, _HALF, _ONE, _TWENTY, _INF, _SQRT2 = _f(0), _f(0.5), _f(1), _f(20), _f(np.inf), _f(1.41421356)
_LOG2E, _LN2_HI, _LN2_LO = _f(1.44269504088896341), _f(0.693359375), _f(-2.12194440e-4)  # ln2 = HI + LO
_EXP_MIN, _EXP_MAX = _f(-87.33654), _f(88.0)  # ln(FLT_MIN); exp is 0 below (no denormals), inf above 88
_E0, _E1, _E2, _E3, _E4, _E5 = (_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = (_f(c) for c in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
    2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))


@njit(float32(float32), **_POLY)
def _exp(x):
    """expf; NaN in, NaN out."""
    xc = min(max(x, _EXP_MIN), _EXP_MAX)
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO  # Cody-Waite: k * HI is exact
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * (r * r) + r + _ONE
    y = p * _pow2(k)
    y = _ZERO if x < _EXP_MIN else y
    y = _INF if x > _EXP_MAX else y
    return x if x != x else y


_DECAY_MIN = _f(-88.0)  # the scan's exp: its 2**k is 2**-127, an all-zero bit pattern, from here down


@njit(float32(float32), **_POLY)
def _exp_decay(x):
    """expf for x <= 0 (the scan's dt * A: dt = softplus >= 0, A = -exp(A_log) <= 0); NaN in, NaN out.

    _exp less its overflow clamp and its underflow test, the scan's hottest loop being mostly this: below -88 the
    scale 2**k is 2**-127, whose bit pattern is zero, so the result is exactly 0 with no test; between -88 and
    -87.3 it is a denormal (as torch's) or 0."""
    xc = max(x, _DECAY_MIN)
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * (r * r) + r + _ONE
    y = p * _pow2(k)
    return x if x != x else y


@njit(float32(float32), **_POLY)
def _log1p(x):
    """log1p for x >= 0 (NaN propagates): log(1 + x) plus the rounding error of 1 + x."""
    u = _ONE + x
    m, e = _mantissa(u), _exponent(u)
    big = m > _SQRT2
    m = m * _HALF if big else m  # m in [sqrt(1/2), sqrt(2))
    e = e + _ONE if big else e
    f = m - _ONE
    z = f * f
    p = ((((((((_L0 * f + _L1) * f + _L2) * f + _L3) * f + _L4) * f + _L5) * f + _L6) * f + _L7) * f + _L8) * f * z
    r = f + (p + _LN2_LO * e - _HALF * z) + _LN2_HI * e
    return r + (x - (u - _ONE)) / u


@njit(float32(float32), **_EXACT)
def _softplus(x):
    """F.softplus (beta 1, threshold 20)."""
    sp = _log1p(_exp(x))
    return x if x > _TWENTY else sp


@njit(float32(float32), **_EXACT)
def _silu(x):
    return x / (_ONE + _exp(-x))


# ------------------------------------------------------------------------------------------------------------ conv

_CT = 32  # tokens a conv job


@njit(float32[::1](_C3, int64, _C2, int64, int64, int64), **_EXACT)
def _conv_input(x, xo, head, b, j, n_ch):
    """Input token j of batch row b: x's row j (its channels from column xo on), or for j < 0 the state's, from
    head (see _conv_jobs)."""
    k1 = head.shape[0] // x.shape[0]  # K - 1
    return x[b, j, xo:xo + n_ch] if j >= 0 else head[b * k1 + k1 + j]


@njit(types.void(_C3, int64, _C2, _C2, _C1, _C3, int64, int64), **_EXACT)
def _conv_jobs(x, xo, head, wt, bias, y, lo, hi):
    """Jobs lo..hi of the (batch, chunk of _CT tokens) grid. x: (B, T, W), its channels from column xo on (_btI);
    head: (B * (K-1), I), the inputs before x (the state's last K-1, token-major); wt: (K, I), the weight
    transposed; y: (B, T, I).

    A job reads and writes whole rows, in order. Jobs over channel blocks walked every row at a 6-12 KB stride
    and paid a memory latency a row where x was not in cache, as it is not after in_proj: 0.72 against 0.28 ms
    for a 130m block at 512 tokens."""
    t_len, n_ch = y.shape[1], y.shape[2]
    k_w = wt.shape[0]
    chunks = (t_len + _CT - 1) // _CT
    for job in range(lo, hi):
        b = job // chunks
        t0 = (job - b * chunks) * _CT
        for t in range(t0, min(t_len, t0 + _CT)):
            yr = y[b, t]
            for c in range(n_ch):
                yr[c] = bias[c]
            for k in range(k_w):
                src = _conv_input(x, xo, head, b, t + k - (k_w - 1), n_ch)
                wk = wt[k]
                for c in range(n_ch):
                    yr[c] += wk[c] * src[c]
            for c in range(n_ch):
                yr[c] = _silu(yr[c])


@njit(types.Tuple((_C2, _C2))(_C3, _C2), **_EXACT)
def _conv_head(state, w):
    """The state's last K-1 inputs token-major, (B * (K-1), I), and the weight transposed, (K, I)."""
    bsz, n_ch, k_w = state.shape
    head = np.empty((bsz * (k_w - 1), n_ch), np.float32)
    wt = np.empty((k_w, n_ch), np.float32)
    for c in range(n_ch):
        for k in range(k_w):
            wt[k, c] = w[c, k]
    for b in range(bsz):
        for c in range(n_ch):
            for k in range(k_w - 1):
                head[b * (k_w - 1) + k, c] = state[b, c, k + 1]
    return head, wt


@njit(types.void(_C3, int64, _C2, _C3), **_EXACT)
def _conv_tail(x, xo, head, state):
    """The new state: the last K inputs of [state's last K-1, x]."""
    bsz, n_ch, k_w = state.shape
    t_len = x.shape[1]
    for b in range(bsz):
        for k in range(k_w):
            src = _conv_input(x, xo, head, b, t_len - k_w + k, n_ch)
            for c in range(n_ch):
                state[b, c, k] = src[c]


@njit(types.void(_C3, int64, _C3, _C2, _C1, _C3), **_EXACT)
def _conv_serial(x, xo, state, w, bias, y):
    head, wt = _conv_head(state, w)
    _conv_jobs(x, xo, head, wt, bias, y, 0, y.shape[0] * ((y.shape[1] + _CT - 1) // _CT))
    _conv_tail(x, xo, head, state)


@njit(types.void(_C2, _C2, _C3, _C2, _C1), **_EXACT)
def _conv_rows(xz, xc, state, w, bias):
    """The T = 1 (decode) conv: x in xz's first I columns, (B, >= I) -> xc (B, I), silu'd; state (B, I, K). Per
    channel, the state row is contiguous and nothing needs transposing. xz is in_proj's whole (B, 2I) output in
    block_step, the (B, I) input itself in conv1d."""
    n_rows, n_ch = xc.shape
    k_w = w.shape[1]
    for r in range(n_rows):
        xr, yr = xz[r, :n_ch], xc[r]
        for c in range(n_ch):
            st = state[r, c]
            acc = bias[c]
            for k in range(k_w - 1):
                v = st[k + 1]
                st[k] = v
                acc += w[c, k] * v
            v = xr[c]
            st[k_w - 1] = v
            yr[c] = acc + w[c, k_w - 1] * v
        for c in range(n_ch):  # apart, so that it vectorises
            yr[c] = _silu(yr[c])


@njit(types.void(_C3, int64, _C3, _C2, _C1, _C3), parallel=True, **_EXACT)
def _conv_par(x, xo, state, w, bias, y):
    head, wt = _conv_head(state, w)
    jobs = y.shape[0] * ((y.shape[1] + _CT - 1) // _CT)
    for job in prange(jobs):
        _conv_jobs(x, xo, head, wt, bias, y, job, job + 1)
    _conv_tail(x, xo, head, state)


def conv1d(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over T tokens starting from `conv_state`, then SiLU (see causal_conv1d_ref).

    x: (B, I, T) any strides; conv_state: (B, I, K) fp32, updated in place; weight: (I, K); bias: (I,) or None.
    Returns (B, I, T) in x's dtype, as a transposed view of a (B, T, I) buffer: the layout x_proj wants next.
    """
    bsz, ch, t_len = x.shape
    st, st_back = _state(conv_state)
    y = np.empty((bsz, t_len, ch), np.float32)
    args = (*_btI(x), st, _c32(weight), _zeros(ch) if bias is None else _c32(bias), y)
    if t_len == 1:
        _conv_rows(args[0].reshape(bsz, ch), y.reshape(bsz, ch), *args[2:5])
    elif bsz * ch * t_len * weight.shape[1] < _SMALL:
        _conv_serial(*args)
    else:
        _conv_par(*args)
    if st_back:
        conv_state.copy_(torch.from_numpy(st))
    out = torch.from_numpy(y.transpose(0, 2, 1))  # (B, I, T)
    return out if x.dtype == _F32 else out.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------ scan

_SCAN_ARGS = (_C3, int64, _C3, int64, _C2, _A3, _A3, _C1, _C3, int64, _C1, _C3, _C3)


@njit(types.void(*_SCAN_ARGS, int64, int64), **_EXACT)
def _scan_jobs(u, uo, delta, do, a, bm, cm, d_skip, z, zo, dt_bias, state, y, lo, hi):
    """Jobs lo..hi of the (batch, channel block) grid. u, delta, z: (B, T, W), their channels from columns uo, do,
    zo on (_btI); y: (B, T, I); bm, cm: (B, T, N).

    The loops index row slices (ur[cc], not u[b, t, c0 + cc]): an index that numba cannot prove non-negative gets
    a wraparound select, and LLVM then loads lane by lane."""
    t_len, n_ch = y.shape[1], y.shape[2]
    n_st = a.shape[1]
    blocks = (n_ch + _SCAN_CW - 1) // _SCAN_CW
    # one scratch array, so LLVM sees that its rows do not alias: h (N rows), A (N rows), dt, dt * u, y
    w = np.empty((2 * n_st + 3, _SCAN_CW), np.float32)
    r_dt, r_du, r_y = 2 * n_st, 2 * n_st + 1, 2 * n_st + 2
    for job in range(lo, hi):
        b = job // blocks
        c0 = (job - b * blocks) * _SCAN_CW
        cw = min(_SCAN_CW, n_ch - c0)
        c1 = c0 + cw
        for n in range(n_st):
            for cc in range(cw):
                w[n, cc] = state[b, c0 + cc, n]
                w[n_st + n, cc] = a[c0 + cc, n]
        dbias, dskip = dt_bias[c0:c1], d_skip[c0:c1]
        for t in range(t_len):
            ur, dr = u[b, t, uo + c0:uo + c1], delta[b, t, do + c0:do + c1]
            for cc in range(cw):
                dt = _softplus(dr[cc] + dbias[cc])
                w[r_dt, cc] = dt
                w[r_du, cc] = dt * ur[cc]
                w[r_y, cc] = _ZERO
            for n in range(0, n_st - 1, 2):  # two states a pass: dt, dt * u and y loaded once for both
                bn, cn, bn1, cn1 = bm[b, t, n], cm[b, t, n], bm[b, t, n + 1], cm[b, t, n + 1]
                for cc in range(cw):
                    dt, du = w[r_dt, cc], w[r_du, cc]
                    h = _exp_decay(dt * w[n_st + n, cc]) * w[n, cc] + du * bn
                    h1 = _exp_decay(dt * w[n_st + n + 1, cc]) * w[n + 1, cc] + du * bn1
                    w[n, cc] = h
                    w[n + 1, cc] = h1
                    w[r_y, cc] = (w[r_y, cc] + h * cn) + h1 * cn1
            if n_st % 2:
                n = n_st - 1
                bn, cn = bm[b, t, n], cm[b, t, n]
                for cc in range(cw):
                    h = _exp_decay(w[r_dt, cc] * w[n_st + n, cc]) * w[n, cc] + w[r_du, cc] * bn
                    w[n, cc] = h
                    w[r_y, cc] += h * cn
            yr, zr = y[b, t, c0:c1], z[b, t, zo + c0:zo + c1]
            for cc in range(cw):
                yr[cc] = (w[r_y, cc] + ur[cc] * dskip[cc]) * _silu(zr[cc])
        for n in range(n_st):
            for cc in range(cw):
                state[b, c0 + cc, n] = w[n, cc]


@njit(types.void(*_SCAN_ARGS), parallel=True, **_EXACT)
def _scan_par(u, uo, delta, do, a, bm, cm, d_skip, z, zo, dt_bias, state, y):
    jobs = y.shape[0] * ((y.shape[2] + _SCAN_CW - 1) // _SCAN_CW)
    for job in prange(jobs):
        _scan_jobs(u, uo, delta, do, a, bm, cm, d_skip, z, zo, dt_bias, state, y, job, job + 1)


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
         D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """Selective scan from `ssm_state` (see selective_scan_ref for the maths).

    u, delta, z: (B, I, T) any strides; A: (I, N) fp32, <= 0 (the model's -exp(A_log)); Bm, Cm: (B, T, N);
    D, delta_bias: (I,) fp32; ssm_state: (B, I, N) fp32, updated in place. Returns y: (B, I, T) fp32, a
    transposed view of a (B, T, I) buffer (what out_proj wants next).
    """
    bsz, ch, t_len = u.shape
    st, st_back = _state(ssm_state)
    y = np.empty((bsz, t_len, ch), np.float32)
    args = (*_btI(u), *_btI(delta), _c32(A), _np32(Bm), _np32(Cm), _c32(D), *_btI(z), _c32(delta_bias), st, y)
    if bsz * ch * t_len * A.shape[1] < _SMALL:
        _scan_jobs(*args, 0, bsz * ((ch + _SCAN_CW - 1) // _SCAN_CW))
    else:
        _scan_par(*args)
    if st_back:
        ssm_state.copy_(torch.from_numpy(st))
    return torch.from_numpy(y.transpose(0, 2, 1))  # (B, I, T)


# --------------------------------------------------------------------------------------------------------- RMSNorm

@njit(types.void(_C2, _C1, float32, _C2, int64, int64), **_EXACT)
def _rms_rows(x, w, eps, out, lo, hi):
    dim = x.shape[1]
    for r in range(lo, hi):
        ss = 0.0  # float64: the mean of squares comes out exact to fp32 whatever the order
        for j in range(dim):
            ss += np.float64(x[r, j]) * x[r, j]
        inv = _ONE / np.sqrt(np.float32(ss / dim) + eps)
        for j in range(dim):
            out[r, j] = w[j] * (x[r, j] * inv)


@njit(types.void(_C2, _C1, float32, _C2), parallel=True, **_EXACT)
def _rms_par(x, w, eps, out):
    for r in prange(x.shape[0]):
        _rms_rows(x, w, eps, out, r, r + 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as rms_norm_ref: statistics in fp32, result in weight's dtype. x: (..., D); weight: (D,)."""
    dim = x.shape[-1]
    x2 = _c32(x).reshape(-1, dim)  # (rows, D)
    out = np.empty(x2.shape, np.float32)
    args = (x2, _c32(weight), np.float32(eps), out)
    if x2.shape[0] * dim < _SMALL:
        _rms_rows(*args, 0, x2.shape[0])
    else:
        _rms_par(*args)
    y = torch.from_numpy(out.reshape(x.shape))
    return y if weight.dtype == _F32 else y.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------- linear

_GEMV_ROWS = 8  # up to this many token rows the GEMV below (one pass over the weights) beats MKL's GEMM
_SERIAL_GEMV = 1 << 16  # smaller weights stream fast enough from one core


@_fp32_now_bf16_later(float32(float32[::1], float32[::1]), float32(float32[::1], types.uint16[::1]), **_DOT)
def _dot(a, w):
    """a . w, w fp32 or bf16 bits; the sum in any order (it vectorises)."""
    acc = _ZERO
    for j in range(a.shape[0]):
        acc += a[j] * _wv(w[j])
    return acc


@_fp32_now_bf16_later(types.void(_C2, _C2, _C2, int64, int64), types.void(_C2, _U2, _C2, int64, int64), **_DOT)
def _gemv_rows(x, w, y, lo, hi):
    """Outputs lo..hi of y = x @ w.T for a few rows x. x: (R, In), w: (Out, In) fp32 or bf16 bits, y: (R, Out).

    Decoding is memory-bound: this streams each weight row once for all R rows, at about twice the bandwidth
    MKL's sgemv reaches on this AMD machine; bf16 weights stream half the bytes, widened in the loop (exact).
    """
    for o in range(lo, hi):
        for r in range(x.shape[0]):
            y[r, o] = _dot(x[r], w[o])


@_fp32_now_bf16_later(types.void(_C2, _C2, _C2, int64), types.void(_C2, _U2, _C2, int64), parallel=True, **_DOT)
def _gemv_par(x, w, y, chunk):
    n_out = w.shape[0]
    for ci in prange((n_out + chunk - 1) // chunk):
        _gemv_rows(x, w, y, ci * chunk, min(n_out, (ci + 1) * chunk))


def _chunk(weight: torch.Tensor) -> int:
    """Outputs a parallel GEMV job: x_proj has 80, and 64 a job would leave one core idle."""
    return 64 if weight.shape[0] >= 4096 else 8


_BF16 = torch.bfloat16
_HALF_TYPES = (torch.bfloat16, torch.float16)


def _wnp(weight: torch.Tensor) -> np.ndarray:
    """An fp32 or bf16 weight as the numpy array the kernels take: itself, or its bf16 bit patterns (uint16)."""
    w = weight.detach()
    return w.view(torch.uint16).numpy() if w.dtype == _BF16 else w.numpy()


def _onednn_gemm():
    """oneDNN's fp32 GEMM, as torch's compiler calls it for a linear layer, where this torch has it: it uses the
    CPU's widest vectors, where F.linear's MKL sgemm keeps to AVX2 on AMD CPUs (512 x 768 x 3072 on a 2-core Zen 5
    VM: 5.4 against 12.5 ms; with oneDNN held to AVX2, 10.1 ms). None, and F.linear, where it is missing or wrong."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w, b = torch.randn(3, 2, 5), torch.randn(4, 5), torch.randn(4)
        if not torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-5):
            return None
    except (AttributeError, RuntimeError):
        return None
    return lambda x, w, b: op(x, w, b, "none", [], "")


def _native_bf16() -> bool:
    """Whether the CPU multiplies bf16 itself (AVX512-BF16 or AMX): torch's bf16 GEMM is then 2x oneDNN's fp32 one;
    without, it is emulated and ~7x slower than widening to fp32 (121 against 18 ms for 512 x 768 x 3072 on AVX2)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_GEMM = _onednn_gemm()
_NATIVE_BF16 = _native_bf16()


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for fp32, through oneDNN where it is there, the weight is contiguous (oneDNN has no primitive for
    some strided ones) and no gradient is wanted (it has none)."""
    if _GEMM is None or not weight.is_contiguous() or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return F.linear(x, weight, bias)
    return _GEMM(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (same output dtype), faster: x: (..., In); weight: (Out, In) -> (..., Out).

    - up to _GEMV_ROWS rows of fp32 or bf16 weights: the GEMVs above (fp32 sums; a bf16 result is rounded once,
      as F.linear rounds it);
    - more rows of fp32: oneDNN's GEMM (_gemm);
    - more rows of bf16 on a CPU with bf16 arithmetic: torch's bf16 GEMM (oneDNN: fp32 sums, rounded once);
    - more rows of bf16 elsewhere, or of fp16: widened to fp32 for _gemm, then rounded;
    - anything else: F.linear.
    """
    n_in = x.shape[-1]
    rows = x.numel() // n_in if n_in else 0
    wdt = weight.dtype
    if rows == 0 or x.dtype != wdt:
        return F.linear(x, weight, bias)
    if rows > _GEMV_ROWS or (wdt != _F32 and wdt != _BF16) or not weight.is_contiguous():
        if wdt == _F32:
            return _gemm(x, weight, bias)
        if wdt not in _HALF_TYPES or (wdt == _BF16 and _NATIVE_BF16):
            return F.linear(x, weight, bias)
        return _gemm(x.float(), weight.float(), None if bias is None else bias.float()).to(wdt)
    x2 = _np32(x).reshape(rows, n_in)
    if not x2.flags.c_contiguous:
        x2 = np.ascontiguousarray(x2)
    y = np.empty((rows, weight.shape[0]), np.float32)
    if wdt == _BF16:
        _bf16_kernels()
    w = _wnp(weight)
    if weight.numel() < _SERIAL_GEMV:
        _gemv_rows(x2, w, y, 0, weight.shape[0])
    else:
        _gemv_par(x2, w, y, _chunk(weight))
    out = torch.from_numpy(y.reshape(*x.shape[:-1], weight.shape[0]))
    if bias is not None:
        out.add_(bias.float())
    return out if wdt == _F32 else out.to(wdt)


# ------------------------------------------------------------------------------------------- one block's decode step
# A decode token through the separate kernels costs 7 kernel calls and ~15 small torch ops a block (~120 us of
# Python on this machine, against ~530 us to stream a 130m block's weights). block_step runs a block's whole token
# in one call: four parallel regions (in_proj, x_proj, dt_proj with the SSM step, out_proj with the residual add),
# the norm and the conv between them serially. Each stage is the arithmetic of the kernel above it, in the same
# order.

@_fp32_now_bf16_later(types.void(_C2, _C2, _C2, int64, int64), types.void(_C2, _U2, _C2, int64, int64), **_DOT)
def _gemv_add_rows(x, w, y, lo, hi):
    """y[:, lo:hi] += x @ w[lo:hi].T (out_proj into the residual: the sum, rounded as out_proj's output, then one
    add, as hidden + out)."""
    for o in range(lo, hi):
        for r in range(x.shape[0]):
            y[r, o] += _like(_dot(x[r], w[o]), w)


_SB = 4  # channels a pass of the decode step's state update: 4 * N = 64 lanes, two of LLVM's 32-wide vector loops


@_fp32_now_bf16_later(*[types.void(_C2, _C2, _C2, _C1, w_t, _C1, _C1, _C2, _C2, int64, int64) for w_t in (_C2, _U2)],
                      **_EXACT)
def _ssm_step_channels(xz, xc, dbc, dt_bias, w_dt, a, d_skip, y, state, lo, hi):
    """Channels lo..hi of the SSM step for every row: delta (dt_proj and its bias, softplus), the state update,
    y = C.h + D x, gated by silu(z). xz: (B, 2I) in_proj's output (z is its second half); xc: (B, I) the conv's;
    dbc: (B, R + 2N) x_proj's; a: A flat, (I * N,); state: (B, I * N), A's and the state's own (I, N) layouts.
    delta and y are rounded as dt_proj's and the scan's outputs are for w_dt's dtype (see _like).

    The update runs over _SB channels' N states as one flat row (a loop over one channel's 16 stays scalar), with
    dt, dt * x, B and C laid out along it."""
    n_rows, n_ch = xc.shape
    r_dt = w_dt.shape[1]
    n_st = (dbc.shape[1] - r_dt) // 2
    nb, nc = _SB * n_st, hi - lo
    dtx, dux, bmx, cmx = np.empty(nb, np.float32), np.empty(nb, np.float32), np.empty(nb, np.float32), \
        np.empty(nb, np.float32)
    dts, dus, acc = np.empty(nc, np.float32), np.empty(nc, np.float32), np.empty(nc, np.float32)
    br, ds = dt_bias[lo:hi], d_skip[lo:hi]
    for r in range(n_rows):
        dtr, bm, cm = dbc[r, :r_dt], dbc[r, r_dt:r_dt + n_st], dbc[r, r_dt + n_st:r_dt + 2 * n_st]
        xr, zr, yr = xc[r, lo:hi], xz[r, n_ch + lo:n_ch + hi], y[r, lo:hi]
        for k in range(_SB):
            for n in range(n_st):
                bmx[k * n_st + n] = bm[n]
                cmx[k * n_st + n] = cm[n]
        for k in range(nc):
            dts[k] = _like(_dot(dtr, w_dt[lo + k]), w_dt)
        for k in range(nc):  # softplus and the gate across channels, where they vectorise
            dt = _softplus(dts[k] + br[k])
            dts[k] = dt
            dus[k] = dt * xr[k]
        for k0 in range(0, nc, _SB):
            cb = min(_SB, nc - k0)
            m = cb * n_st
            for k in range(cb):
                dt, du = dts[k0 + k], dus[k0 + k]
                for n in range(n_st):
                    dtx[k * n_st + n] = dt
                    dux[k * n_st + n] = du
            off = (lo + k0) * n_st
            h, ar = state[r, off:off + m], a[off:off + m]
            for j in range(m):
                hj = _exp_decay(dtx[j] * ar[j]) * h[j] + dux[j] * bmx[j]
                h[j] = hj
                dux[j] = hj * cmx[j]  # dux is free again: it holds the products that C.h sums
            for k in range(cb):
                sm = _ZERO
                for n in range(n_st):
                    sm += dux[k * n_st + n]
                acc[k0 + k] = sm
        for k in range(nc):
            yr[k] = _like((acc[k] + xr[k] * ds[k]) * _silu(zr[k]), w_dt)


@_fp32_now_bf16_later(*[types.void(_C2, w_t) for w_t in (_C2, _U2)], **_EXACT)
def _round_rows(x, w):
    """x, in place, rounded as an output in w's dtype (see _like): nothing to do for fp32 weights."""
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[r, j] = _like(x[r, j], w)


@_fp32_now_bf16_later(*[types.void(_C2, _C1, float32, w_t, _C3, _C2, _C1, w_t, _C1, w_t, _C1, _C1, _C2, w_t, int64,
                                   int64, int64) for w_t in (_C2, _U2)], parallel=True, **_EXACT)
def _block_step(res, norm_w, eps, in_w, conv_state, conv_w, conv_b, x_w, dt_bias, dt_w, a, d_skip, state, out_w,
                in_chunk, x_chunk, out_chunk):
    """A block's decode token for rows res (B, D), in place: one call, so one dispatch from Python (each costs
    ~10 us with this many arrays); the four prange loops are its parallel regions. a: (I * N,); state: (B, I * N).

    The projections' weights are fp32 or bf16 bits, all alike; with bf16 each stage's output is rounded to bf16
    where the separate kernels' is (they return the weights' dtype), so the two paths agree to fp32 rounding."""
    n_rows, n_ch = res.shape[0], conv_w.shape[0]
    h_in = res.copy()
    _round_rows(h_in, in_w)  # the norm reads hidden in the weights' dtype
    h = np.empty_like(res)
    _rms_rows(h_in, norm_w, eps, h, 0, n_rows)
    _round_rows(h, in_w)
    xz = np.empty((n_rows, 2 * n_ch), np.float32)
    n_out = in_w.shape[0]
    for ci in prange((n_out + in_chunk - 1) // in_chunk):
        _gemv_rows(h, in_w, xz, ci * in_chunk, min(n_out, (ci + 1) * in_chunk))
    _round_rows(xz, in_w)
    xc = np.empty((n_rows, n_ch), np.float32)
    _conv_rows(xz, xc, conv_state, conv_w, conv_b)
    _round_rows(xc, in_w)
    dbc = np.empty((n_rows, x_w.shape[0]), np.float32)
    n_out = x_w.shape[0]
    for ci in prange((n_out + x_chunk - 1) // x_chunk):
        _gemv_rows(xc, x_w, dbc, ci * x_chunk, min(n_out, (ci + 1) * x_chunk))
    _round_rows(dbc, in_w)
    y = np.empty((n_rows, n_ch), np.float32)
    for ci in prange((n_ch + _CW - 1) // _CW):
        _ssm_step_channels(xz, xc, dbc, dt_bias, dt_w, a, d_skip, y, state, ci * _CW, min(n_ch, (ci + 1) * _CW))
    n_out = out_w.shape[0]
    for ci in prange((n_out + out_chunk - 1) // out_chunk):
        _gemv_add_rows(y, out_w, res, ci * out_chunk, min(n_out, (ci + 1) * out_chunk))


def block_weights(norm_w: torch.Tensor, eps: float, in_w: torch.Tensor, in_b: torch.Tensor | None,
                  conv_w: torch.Tensor, conv_b: torch.Tensor | None, x_w: torch.Tensor, dt_w: torch.Tensor,
                  dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor, out_w: torch.Tensor,
                  out_b: torch.Tensor | None) -> tuple | None:
    """A block's weights as block_step takes them, made once (numpy views, bf16 as bit patterns, small vectors
    widened): preparing them costs ~70 us, which a token would otherwise pay in every block. None where block_step
    does not apply: projection biases, or projections not all contiguous fp32 or all bf16."""
    big = (in_w, x_w, dt_w, out_w)
    wdt = in_w.dtype
    if in_b is not None or out_b is not None or wdt not in (_F32, _BF16) \
            or any(w.dtype != wdt or not w.is_contiguous() for w in big):
        return None
    if wdt == _BF16:
        _bf16_kernels()
    n_ch = conv_w.shape[0]
    return (_c32(norm_w), np.float32(eps), _wnp(in_w), _c32(conv_w), _zeros(n_ch) if conv_b is None else _c32(conv_b),
            _wnp(x_w), _c32(dt_bias), _wnp(dt_w), _c32(A).reshape(-1), _c32(D), _wnp(out_w), _chunk(in_w),
            _chunk(x_w), _chunk(out_w))


def block_step(hidden: torch.Tensor, weights: tuple, conv_state: torch.Tensor,
               ssm_state: torch.Tensor) -> torch.Tensor | None:
    """One block's decode token: hidden (B, 1, D) fp32 -> hidden + mixer(norm(hidden)), states updated in place;
    `weights` from block_weights. As MambaBlock.forward on the separate kernels, for an fp32 hidden and up to
    _GEMV_ROWS rows; None otherwise (the caller then takes the separate kernels)."""
    bsz, t_len, d_model = hidden.shape
    if t_len != 1 or not 0 < bsz <= _GEMV_ROWS or hidden.dtype != _F32:
        return None
    norm_w, eps, in_w, conv_w, conv_b, x_w, dt_bias, dt_w, a, d_skip, out_w, c_in, c_x, c_out = weights
    n_ch, k_w, n_st = conv_w.shape[0], conv_w.shape[1], a.shape[0] // conv_w.shape[0]
    if conv_state.shape != (bsz, n_ch, k_w) or ssm_state.shape != (bsz, n_ch, n_st):
        raise ValueError(f"block_step: states {tuple(conv_state.shape)} and {tuple(ssm_state.shape)} do not fit "
                         f"{bsz} rows of {n_ch} channels (conv {k_w}, state {n_st})")
    res = hidden.detach().reshape(bsz, d_model).numpy().copy()  # the new hidden: out_proj adds into it
    cst, cst_back = _state(conv_state)
    sst, sst_back = _state(ssm_state)
    _block_step(res, norm_w, eps, in_w, cst, conv_w, conv_b, x_w, dt_bias, dt_w, a, d_skip, sst.reshape(bsz, -1),
                out_w, c_in, c_x, c_out)
    if cst_back:
        conv_state.copy_(torch.from_numpy(cst))
    if sst_back:
        ssm_state.copy_(torch.from_numpy(sst))
    return torch.from_numpy(res).reshape(bsz, 1, d_model)


# --------------------------------------------------------------------------------------------------------- helpers

# The wrappers run once per kernel per block per token: numpy's views cost a fifth of torch's, so they work in numpy.

def _np32(t: torch.Tensor) -> np.ndarray:
    """An fp32 numpy view of `t` (any strides; a widened copy if `t` is not fp32)."""
    t = t.detach()
    return (t if t.dtype == _F32 else t.float()).numpy()


def _c32(t: torch.Tensor) -> np.ndarray:
    """A contiguous fp32 numpy array of `t`: a view where possible."""
    a = _np32(t)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _btI(x: torch.Tensor) -> tuple[np.ndarray, int]:
    """A (B, I, T) tensor as a contiguous fp32 (B, T, W) array, W >= I, and the column where its I channels start.

    The model's activations are channel slices of (B, T, W) buffers: conv's and the scan's outputs (W = I), and x
    and z, the two halves of in_proj's output (W = 2I); for them this is a view of that buffer, where a copy of the
    slice would cost ~0.5 ms a block at 512 tokens. Anything else is copied (offset 0): the loops vectorise across
    channels at unit stride."""
    bti = x.detach().transpose(1, 2)
    bsz, t_len, ch = bti.shape
    width, start = bti.stride(1), bti.storage_offset()
    if bti.dtype == _F32 and bti.stride(2) == 1 and t_len > 1 and width >= ch and (
            bsz == 1 or bti.stride(0) == t_len * width):
        # rows of `width` from start - off, inside the storage: off <= start, and the last row ends by its end
        off = max(0, start + bsz * t_len * width - bti.untyped_storage().nbytes() // 4)
        if off <= min(start, width - ch):
            return torch.as_strided(bti, (bsz, t_len, width), (t_len * width, width, 1), start - off).numpy(), off
    return np.ascontiguousarray(_np32(x).transpose(0, 2, 1)), 0


def _state(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A state tensor as a contiguous fp32 array the kernel updates in place, and whether to copy it back."""
    if t.dtype != _F32:
        raise TypeError(f"kernel states are fp32, got {t.dtype}")
    a = t.numpy()
    return (a, False) if a.flags.c_contiguous else (np.ascontiguousarray(a), True)


_zero_cache: dict[int, np.ndarray] = {}


def _zeros(n: int) -> np.ndarray:
    """A shared zero bias for a conv without one (the kernels only read it; adding 0.0 changes nothing)."""
    z = _zero_cache.get(n)
    if z is None:
        z = _zero_cache[n] = np.zeros(n, np.float32)
    return z


def warmup(bf16: bool = False) -> None:
    """Run every kernel once, serial and parallel, so that the first real token pays for no page faults; with
    bf16, the bf16 builds too."""
    b, i, n, k = 1, 256, 16, 4
    for t_len in (1, 64):
        x = torch.randn(b, t_len, i).transpose(1, 2)
        conv1d(x, torch.zeros(b, i, k), torch.randn(i, k), None)
        scan(x, x, -torch.rand(i, n), torch.randn(b, t_len, n), torch.randn(b, t_len, n), torch.ones(i), x,
             torch.zeros(i), torch.zeros(b, i, n))
        rms_norm(torch.randn(t_len, i), torch.ones(i), 1e-5)
    linear(torch.randn(1, i), torch.randn(64, i))
    linear(torch.randn(1, i), torch.randn(_SERIAL_GEMV // i, i))
    for n_out in (64, _SERIAL_GEMV // i) if bf16 else ():
        linear(torch.randn(1, i, dtype=_BF16), torch.randn(n_out, i, dtype=_BF16))
    d, r = 64, 8
    w = block_weights(torch.ones(d), 1e-5, torch.randn(2 * i, d), None, torch.randn(i, k), None,
                      torch.randn(r + 2 * n, i), torch.randn(i, r), torch.zeros(i), -torch.rand(i, n), torch.ones(i),
                      torch.randn(d, i), None)
    block_step(torch.randn(b, 1, d), w, torch.zeros(b, i, k), torch.zeros(b, i, n))


BACKEND = Backend("cpu", conv1d, scan, rms_norm, linear, block_weights, block_step)
