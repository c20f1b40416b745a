"""CUDA-graph decoding for a BlockStack: a state pool addressed by session slot, one captured step per batch bucket.

The decode step of a whole block range is a few hundred small kernels; launched one by one from Python they cost
more than the weights take to stream. Captured once per batch bucket and replayed, the step costs one launch. States
live in a pool (per block conv (S+1, I, K) and ssm (S+1, I, N), fp32) that the step's kernels index by slot, so the
graph gathers and scatters states without copies; row S is scratch for the padding rows of a bucket. Prefill is
captured too, per power-of-two length bucket (the real length a device scalar), on row S: a session's states are
copied there and back around it. Given the client's Head (the local path), a bucket's graph can also hold the
embedding before the blocks and the final norm and LM head after them: a token in one replay.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swarm.errors import BackendUnavailable
from swarm.model.block import LayerState, MambaBlock
from swarm.model.config import MambaConfig
from swarm.model.stack import PREFILL_CHUNK, BlockStack, Head

SSM_STATE_EARLY = True  # ssm_decode reads the slot's state before its PDL wait (see _ssm)
# step="auto" runs the batch-1 step as one persistent kernel (gluon_step) from this width on: measured faster at
# 2.8b's (H100: 34.0-34.5 us a block against 40.0-40.6); narrower models keep the four-kernel step, which is faster
# there (whole stacks: 790m's width 20.8 against 19.3 us a block, 130m's 10.6 against 9.7, sweep_gpu.py
# persistent_small; 370m and 1.4b do not fit the kernel's plan)
PERSISTENT_MIN_D_MODEL = 2560
PREFILL_MIN_BUCKET = 16  # the smallest padded prefill piece (buckets 16, 32, ... prefill_chunk tokens)
# GraphDecoder's automatic prefill pieces (auto_prefill_chunk): PREFILL_CHUNK_MAX tokens where a piece's activations
# take at most PREFILL_MEMORY_SHARE of the weights (or PREFILL_MEMORY_FLOOR bytes), else stack.PREFILL_CHUNK
PREFILL_CHUNK_MAX = 2048
PREFILL_MEMORY_SHARE = 0.05
PREFILL_MEMORY_FLOOR = 64 << 20


def auto_prefill_chunk(cfg: MambaConfig, weight_bytes: int, elsize: int) -> int:
    """The prefill piece GraphDecoder takes unless told: PREFILL_CHUNK_MAX or PREFILL_CHUNK tokens.

    Longer pieces run the GEMMs in fuller waves (H100, a 2048-token prefill through all 64 blocks of 2.8b: 30.5 ms
    in one piece against 32.7 in two; 130m 3.2 against 4.0) and hold twice the activations: about 5 I weight-dtype
    values and 16 bytes a d_model unit a token (2.8b: 92 KB). A 2.8b peer of 32 blocks therefore stays at 1024
    (its budget is the weights + 10% + the states); one of 64 blocks, or a small model, takes 2048."""
    per_token = 5 * cfg.intermediate_size * elsize + 16 * cfg.hidden_size
    room = max(PREFILL_MEMORY_SHARE * weight_bytes, PREFILL_MEMORY_FLOOR)
    return PREFILL_CHUNK_MAX if PREFILL_CHUNK_MAX * per_token <= room else PREFILL_CHUNK


def _triton_kernels():
    try:
        from swarm.kernels import triton_decode, triton_ops
    except ImportError as e:  # a CPU-only install: say so where the decoder is asked for, not at import
        raise BackendUnavailable(f"GraphDecoder needs Triton, which failed to import: {e}") from None
    return triton_ops, triton_decode


@dataclass(frozen=True)
class _BlockWeights:
    """One block's tensors as the fused step reads them (views of the stack's parameters, fp32 where the maths is)."""

    norm_w: torch.Tensor  # (D,)
    eps: float
    in_w: torch.Tensor  # (2I, D)
    in_b: torch.Tensor | None
    conv_w: torch.Tensor  # (I, K)
    conv_b: torch.Tensor | None
    x_w: torch.Tensor  # (R + 2N, I)
    dt_w: torch.Tensor  # (I, R)
    dt_b: torch.Tensor  # (I,) fp32
    A: torch.Tensor  # (I, N) fp32, -exp(A_log)
    D: torch.Tensor  # (I,) fp32
    out_w: torch.Tensor  # (D, I)
    out_b: torch.Tensor | None

    @classmethod
    def of(cls, block: MambaBlock) -> "_BlockWeights":
        m = block.mixer
        p = m.prepared  # the eager block's own A, D, dt bias and flat conv weight: no second copy
        return cls(
            norm_w=block.norm.weight.detach(), eps=block.norm.eps,
            in_w=m.in_proj.weight.detach(), in_b=None if m.in_proj.bias is None else m.in_proj.bias.detach(),
            conv_w=p["conv_w"], conv_b=p["conv_b"],
            x_w=m.x_proj.weight.detach(), dt_w=m.dt_proj.weight.detach(),
            dt_b=p["dt_bias"].contiguous(), A=p["A"].contiguous(), D=p["D"].contiguous(),
            out_w=m.out_proj.weight.detach(), out_b=None if m.out_proj.bias is None else m.out_proj.bias.detach(),
        )


class GraphDecoder:
    """Decode and prefill for `stack` on CUDA through captured graphs, with per-session states in a slot pool.

    dec = GraphDecoder(stack, max_slots=16, buckets=(1, 2, 4, 8))
    slot = dec.alloc_slot(); h = dec.prefill(slot, hidden); h = dec.step([slot, ...], hidden); dec.free_slot(slot)
    `graphs=False` runs the same step eagerly (debugging, or the Triton interpreter on CPU). With `head` (on the
    stack's device), `step_logits(slots, ids)` replays embedding, blocks and head as one graph per bucket, and
    `step_greedy(slots, ids)` the same with the greedy pick (argmax) inside: the next tokens, no logits.

    Two choices shape a block's decode step; the defaults are what measured fastest on an H100 (docs/PERFORMANCE.md):
    - `xproj="cublas"`: conv step, x_proj by cuBLAS, then the SSM step reads its output; `"gemv"`: the same with a
      Triton GEMV for x_proj (no split-K reduction launch, fp32 output); `"fused"`: the conv kernel
      also computes x_proj as partial sums over channel blocks, which the SSM step adds up (one launch fewer).
    - buckets of up to `gemv_batch` rows run in_proj and out_proj as Triton GEMVs with the norm and the residual add
      fused into them (and, unless xproj="fused", the conv step in in_proj's epilogue); other buckets use cuBLAS
      with a fused residual-add + RMSNorm between blocks.
    A prefill runs in pieces of `prefill_chunk` tokens (None: auto_prefill_chunk, by the weights' size).
    `step`: how a batch-1 step runs: "kernels", the four kernels a block above; "persistent", one persistent kernel
    through all blocks (swarm.kernels.gluon_step: Hopper, Triton's Gluon, weights packed by BlockStack; an error
    where it does not apply); "auto", persistent where it applies from PERSISTENT_MIN_D_MODEL on, else kernels.
    The persistent kernel needs all its programs (one an SM) resident at once: where they are not (an MPS share of
    the SMs), its waits time out and the step raises BackendUnavailable; "auto" then falls back to the kernels if
    its warm-up steps already timed out.
    """

    def __init__(self, stack: BlockStack, max_slots: int = 16, buckets: tuple[int, ...] = (1, 2, 4, 8),
                 graphs: bool = True, gemv_batch: int = 1, xproj: str = "gemv", head: Head | None = None,
                 prefill_chunk: int | None = None, step: str = "auto"):
        if graphs and stack.device.type != "cuda":
            raise ValueError(f"GraphDecoder captures CUDA graphs; the stack is on {stack.device}")
        if max_slots < 1 or not buckets or min(buckets) < 1:
            raise ValueError(f"GraphDecoder needs max_slots >= 1 and buckets >= 1, got {max_slots}, {buckets}")
        if prefill_chunk is None:
            weight_bytes = sum(p.numel() * p.element_size() for p in stack.parameters())
            prefill_chunk = auto_prefill_chunk(stack.cfg, weight_bytes, stack.dtype.itemsize)
        if prefill_chunk < PREFILL_MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"GraphDecoder prefill_chunk must be a power of two >= {PREFILL_MIN_BUCKET}, "
                             f"got {prefill_chunk}")
        if xproj not in ("cublas", "gemv", "fused"):
            raise ValueError(f"GraphDecoder xproj must be 'cublas', 'gemv' or 'fused', got {xproj!r}")
        if step not in ("auto", "persistent", "kernels"):
            raise ValueError(f"GraphDecoder step must be 'auto', 'persistent' or 'kernels', got {step!r}")
        self._k, self._d = _triton_kernels()
        self.gemv_batch, self.xproj, self.prefill_chunk = gemv_batch, xproj, prefill_chunk
        cfg = stack.cfg
        self.cfg, self.device, self.dtype = cfg, stack.device, stack.dtype
        self.max_slots = max_slots
        self.buckets = tuple(sorted(set(buckets)))
        self._w = [_BlockWeights.of(b) for b in stack.blocks]
        n_blocks, scratch = len(self._w), max_slots
        self.conv = torch.zeros(n_blocks, max_slots + 1, cfg.intermediate_size, cfg.conv_kernel, device=self.device)
        self.ssm = torch.zeros(n_blocks, max_slots + 1, cfg.intermediate_size, cfg.state_size, device=self.device)
        # the batch-1 step as one persistent kernel (gluon_step) where it applies; "kernels": four a block always
        self._persistent = None
        wide = cfg.hidden_size >= PERSISTENT_MIN_D_MODEL
        if stack.device.type == "cuda" and (step == "persistent" or step == "auto" and wide):
            from swarm.kernels import gluon_step  # guards its own Gluon import: None where the kernel cannot run
            self._persistent = gluon_step.PersistentStep.build(self._w, self.conv, self.ssm)
        if step == "persistent" and self._persistent is None:
            raise BackendUnavailable("GraphDecoder step='persistent' needs a Hopper GPU, Triton's Gluon, bf16 or fp16 "
                                     "weights packed by BlockStack.from_tensors and a model the kernel's plan fits")
        self._free = list(range(max_slots))
        self._used: set[int] = set()
        self._lock = threading.Lock()  # a peer allocates slots on its event loop and frees them on its compute thread
        self._scratch = scratch
        # static buffers a replay reads and writes: copy into them, never rebind them
        self._idx = {bk: torch.full((bk,), scratch, dtype=torch.int64, device=self.device) for bk in self.buckets}
        self._idx_now: dict[int, list[int]] = {}  # the slots each bucket's index holds
        self._h_in = {bk: torch.zeros(bk, cfg.hidden_size, device=self.device) for bk in self.buckets}
        self._h_out = {bk: torch.zeros(bk, cfg.hidden_size, device=self.device) for bk in self.buckets}
        self._idx_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.head = head
        if head is not None and head.embeddings.weight.device != self.device:
            raise ValueError(f"GraphDecoder: the head is on {head.embeddings.weight.device}, "
                             f"the stack on {self.device}")
        self._ids = {bk: torch.zeros(bk, 1, dtype=torch.int64, device=self.device) for bk in self.buckets}
        self._logits: dict[int, torch.Tensor] = {}  # a token graph's output, (Bk, vocab) fp32
        self._token_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._next: dict[int, torch.Tensor] = {}  # a greedy graph's output, (Bk, 1) int64
        self._next_logits: dict[int, torch.Tensor] = {}  # the logits it picked from, (Bk, vocab) fp32
        self._greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._len = torch.zeros(1, dtype=torch.int32, device=self.device)  # a prefill piece's real length
        self._prefill_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self.captured = graphs
        if graphs:
            self._capture()
            if self._persistent is not None and self._persistent.failed():  # its warm-up steps timed out
                if step == "persistent":
                    self._check_persistent()
                self._persistent = None  # "auto": the four kernels a block instead
                self._capture()

    # ------------------------------------------------------------------ slots and states

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc_slot(self) -> int:
        """A free slot with zeroed states; raises RuntimeError when all max_slots are taken."""
        with self._lock:
            if not self._free:
                raise RuntimeError(f"GraphDecoder: all {self.max_slots} session slots are in use")
            slot = self._free.pop(0)
            self._used.add(slot)
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()
        return slot

    def free_slot(self, slot: int) -> None:
        with self._lock:
            self._check_slots([slot])
            self._used.discard(slot)
            self._free.append(slot)
            self._free.sort()

    def views(self, slot: int, lo: int = 0, hi: int | None = None) -> list[LayerState]:
        """The slot's states of blocks lo..hi-1 (indices inside the stack) as LayerStates that alias the pool.

        Eager code (a prefill through BlockStack, a state import) that updates them in place updates the slot.
        """
        self._check_slots([slot])
        hi = len(self._w) if hi is None else hi
        return [LayerState(self.conv[j, slot:slot + 1], self.ssm[j, slot:slot + 1]) for j in range(lo, hi)]

    def export_state(self, slot: int) -> list[LayerState]:
        """The slot's states, one LayerState (batch 1, fp32, on the CPU) per block."""
        self._check_slots([slot])
        return [LayerState(self.conv[j, slot:slot + 1].cpu().clone(), self.ssm[j, slot:slot + 1].cpu().clone())
                for j in range(len(self._w))]

    def import_state(self, slot: int, states: list[LayerState]) -> None:
        self._check_slots([slot])
        if len(states) != len(self._w):
            raise ValueError(f"import_state: {len(states)} layer states for a stack of {len(self._w)} blocks")
        for j, st in enumerate(states):
            self.conv[j, slot:slot + 1].copy_(st.conv.reshape(self.conv[j, slot:slot + 1].shape))
            self.ssm[j, slot:slot + 1].copy_(st.ssm.reshape(self.ssm[j, slot:slot + 1].shape))

    def _check_slots(self, slots: list[int]) -> None:
        for s in slots:
            if s not in self._used:
                raise ValueError(f"GraphDecoder: slot {s} is not allocated")
        if len(set(slots)) != len(slots):
            raise ValueError(f"GraphDecoder: a slot appears twice in one step: {slots}")

    # ------------------------------------------------------------------ prefill and step

    @torch.no_grad()
    def prefill(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (1, T, D) fp32 -> (1, T, D) fp32, prefill_chunk tokens at a time; the slot advances by T tokens.

        Each piece is padded to a power-of-two bucket (at least PREFILL_MIN_BUCKET tokens) and runs as that bucket's
        captured graph, captured on the bucket's first use: an eager prefill costs a few hundred microseconds of
        Python a block, more than its kernels take on the GPU. The real length travels as a device scalar that the
        conv and scan kernels read, so padding never touches the state. The slot's states are copied to the scratch
        row, which the graphs address, and back.
        """
        self._check_slots([slot])
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(f"prefill takes hidden (1, T, d_model), got {tuple(hidden.shape)}")
        hidden = hidden.to(self.device, torch.float32)
        outs = []
        s = self._scratch
        self.conv[:, s].copy_(self.conv[:, slot])
        self.ssm[:, s].copy_(self.ssm[:, slot])
        for piece in hidden.split(self.prefill_chunk, dim=1):
            t = piece.shape[1]
            bucket = max(PREFILL_MIN_BUCKET, 1 << (t - 1).bit_length())
            h_in, h_out = self._prefill_buffers(bucket)
            h_in[:, :t].copy_(piece)
            self._len.fill_(t)
            graph = self._prefill_graphs.get(bucket)
            if graph is not None:
                graph.replay()
            elif not self.captured:
                self._prefill_piece(h_in, h_out)
            else:  # the bucket's first piece runs eagerly on a side stream (compiles, warms cuBLAS), then capture
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._prefill_piece(h_in, h_out)
                torch.cuda.current_stream(self.device).wait_stream(side)
                self._capture_prefill(bucket)
            outs.append(h_out[:, :t].clone())
        self.conv[:, slot].copy_(self.conv[:, s])
        self.ssm[:, slot].copy_(self.ssm[:, s])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _prefill_buffers(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        bufs = self._prefill_io.get(bucket)
        if bufs is None:
            shape = (1, bucket, self.cfg.hidden_size)
            bufs = self._prefill_io[bucket] = (torch.zeros(shape, device=self.device),
                                               torch.zeros(shape, device=self.device))
        return bufs

    def _prefill_piece(self, res: torch.Tensor, result: torch.Tensor) -> None:
        """res (1, Tb, D) fp32 -> result, the scratch row's states advancing by self._len tokens (what is captured)."""
        out = None
        n, s = self.cfg.intermediate_size, self._scratch
        r, ns = self.cfg.time_step_rank, self.cfg.state_size
        for j, w in enumerate(self._w):
            if out is None:
                h = self._k.rms_norm(res, w.norm_w, w.eps)
            else:
                h, res = self._k.add_rms_norm(res, out, w.norm_w, w.eps)
            xz = F.linear(h, w.in_w, w.in_b)  # (1, T, 2I)
            x = self._k.causal_conv1d(xz[..., :n].transpose(1, 2), self.conv[j, s:s + 1], w.conv_w, w.conv_b,
                                      length=self._len)
            dbc = F.linear(x.transpose(1, 2), w.x_w)  # (1, T, R + 2N)
            delta = F.linear(dbc[..., :r], w.dt_w).transpose(1, 2)  # (1, I, T)
            y = self._k.selective_scan(x, delta, w.A, dbc[..., r:r + ns], dbc[..., r + ns:], w.D,
                                       xz[..., n:].transpose(1, 2), w.dt_b, self.ssm[j, s:s + 1],
                                       out_dtype=self.dtype, length=self._len)  # (1, I, T)
            out = F.linear(y.transpose(1, 2), w.out_w, w.out_b)  # (1, T, D)
        torch.add(res, out, out=result)

    def _capture_prefill(self, bucket: int) -> None:
        """Capture the bucket's prefill into the decode graphs' memory pool (no two replays ever overlap)."""
        h_in, h_out = self._prefill_buffers(bucket)
        g = torch.cuda.CUDAGraph()
        # records, runs nothing: the scratch states stay as they are. thread_local: a peer captures while serving,
        # and its event-loop thread may copy another session's output to the host meanwhile; in the default
        # ("global") mode such a synchronizing call from any thread would invalidate the capture
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            self._prefill_piece(h_in, h_out)
        torch.cuda.synchronize(self.device)
        self._prefill_graphs[bucket] = g
        torch.cuda.empty_cache()  # the side stream's warm-up blocks: cached there, unusable by the graphs' pool

    @torch.no_grad()
    def step(self, slots: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, 1, D) fp32 for sessions `slots` (B of them) -> (B, 1, D) fp32; their states advance a token."""
        self._check_persistent()
        bsz = len(slots)
        bk = self._bucket("step", slots, hidden, (bsz, 1, self.cfg.hidden_size))
        self._h_in[bk][:bsz].copy_(hidden[:, 0])
        if self._graphs:
            self._graphs[bk].replay()
        else:
            self._step_blocks(self._h_in[bk], self._idx[bk], self._h_out[bk])
        return self._h_out[bk][:bsz].clone().unsqueeze(1)

    @torch.no_grad()
    def step_logits(self, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
        """ids (B, 1) int64 for sessions `slots` -> the next token's logits (B, vocab) fp32; their states advance.

        The embedding, every block and the head (final norm, LM head) run as one replay: at batch 1 on a small
        model the head's few launches from Python cost more than the blocks' whole graph."""
        bsz, bk = self._token_input("step_logits", slots, ids)
        if self._token_graphs:
            self._token_graphs[bk].replay()
            return self._logits[bk][:bsz].clone()
        return self._token(bk)[:bsz]

    @torch.no_grad()
    def step_greedy(self, slots: list[int], ids: torch.Tensor,
                    logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (B, 1) int64 for sessions `slots` (on the device too: a previous pick) -> the next tokens (B, 1)
        int64 on the device, each its logits' argmax (step_logits(...).argmax(-1, keepdim=True)); their states
        advance. The pick is inside the replay; `logits`: also the logits (B, vocab) fp32 it picked from."""
        bsz, bk = self._token_input("step_greedy", slots, ids)
        if self._greedy_graphs:
            self._greedy_graphs[bk].replay()
            picks, out = self._next[bk], self._next_logits[bk]
        else:
            out = self._token(bk)
            picks = self._d.argmax_rows(out)
        if logits:
            return picks[:bsz].clone(), out[:bsz].clone()
        return picks[:bsz].clone()

    def _token_input(self, what: str, slots: list[int], ids: torch.Tensor) -> tuple[int, int]:
        """Check a token step's sessions and ids and copy the ids into their bucket's buffer -> (B, bucket)."""
        if self.head is None:
            raise ValueError(f"{what} needs a GraphDecoder built with head=")
        self._check_persistent()
        bsz = len(slots)
        bk = self._bucket(what, slots, ids, (bsz, 1))
        self._ids[bk][:bsz].copy_(ids)
        return bsz, bk

    def _check_persistent(self) -> None:
        """Raise if a finished persistent step timed out at a wait (a flag in pinned memory: no sync, no copy)."""
        if self._persistent is not None and self._persistent.failed():
            raise BackendUnavailable(
                f"GraphDecoder: the persistent decode step timed out: its {self._persistent.plan.G} programs were not "
                "all resident at once (fewer SMs free than the GPU reports, e.g. an MPS share); use step='kernels'")

    def _bucket(self, what: str, slots: list[int], x: torch.Tensor, shape: tuple[int, ...]) -> int:
        """Check a step's sessions and input; returns their bucket, whose slot index now holds them."""
        if not 0 < len(slots) <= self.buckets[-1]:
            raise ValueError(f"{what} takes 1..{self.buckets[-1]} sessions, got {len(slots)}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{what} takes an input of shape {shape}, got {tuple(x.shape)}")
        self._check_slots(slots)
        bk = next(b for b in self.buckets if b >= len(slots))
        if self._idx_now.get(bk) != slots:  # a decode loop steps the same sessions: no copy then
            self._idx[bk].copy_(self._index(bk, slots))
            self._idx_now[bk] = list(slots)
        return bk

    def _token(self, bk: int) -> torch.Tensor:
        """embedding -> blocks -> head for bucket bk's ids (what a token graph holds) -> logits (Bk, vocab) fp32.

        Up to gemv_batch rows the head is norm_gemv, final norm and LM head in one pass: the LM head is the largest
        matrix a token reads (257 MB for 2.8b), and the GEMV streams it at the read ceiling."""
        head = self.head
        table, out = head.embeddings.weight, self._h_out[bk]
        if bk == 1 and self._persistent is not None and table.is_contiguous() and table.device == out.device:
            # the persistent kernel reads the token's embedding row itself: no gather, conversion or copy kernels
            self._persistent.step(self._h_out[bk], self._idx[bk], embed=(table, self._ids[bk]))
        else:
            self._h_in[bk].copy_(head.embed(self._ids[bk])[:, 0])
            self._step_blocks(self._h_in[bk], self._idx[bk], self._h_out[bk])
        if bk <= self.gemv_batch:
            norm = head.norm_f
            return self._d.norm_gemv(self._h_out[bk], norm.weight, norm.eps, head.lm_weight, None,
                                     out_dtype=torch.float32)
        return head.logits(self._h_out[bk].unsqueeze(1))[:, 0]

    def _index(self, bucket: int, slots: list[int]) -> torch.Tensor:
        """A device tensor of the slots padded with scratch; cached, since a batch's slots repeat every step."""
        key = (bucket, *slots)
        idx = self._idx_cache.get(key)
        if idx is None:
            if len(self._idx_cache) > 256:
                self._idx_cache.clear()
            pad = [self._scratch] * (bucket - len(slots))
            idx = self._idx_cache[key] = torch.tensor(list(slots) + pad, dtype=torch.int64, device=self.device)
        return idx

    def _step_blocks(self, hidden: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One token through every block (what is captured): hidden (Bk, D) fp32, idx (Bk,) slots -> out (Bk, D)."""
        k, d = self._k, self._d
        if hidden.shape[0] == 1 and self._persistent is not None:
            self._persistent.step(out, idx, hidden=hidden)  # reads hidden in its first block: no copy before
            return out
        if hidden.shape[0] <= self.gemv_batch:  # the residual stream lives in `out` from the first block on
            out.copy_(hidden)
            fuse_conv = self.xproj != "fused"  # the conv step in in_proj's epilogue: x comes out as silu(conv(x))
            for j, w in enumerate(self._w):
                conv = (self.conv[j], w.conv_w, w.conv_b, idx) if fuse_conv else None
                xz = d.norm_gemv(out, w.norm_w, w.eps, w.in_w, w.in_b, conv=conv)  # (Bk, 2I)
                y = self._ssm(j, w, xz, idx, conv_done=fuse_conv)
                d.gemv_residual(y, w.out_w, w.out_b, out)
            return out
        res, delta = hidden, None
        for j, w in enumerate(self._w):
            if delta is None:
                h = k.rms_norm(res, w.norm_w, w.eps)
            else:
                h, res = k.add_rms_norm(res, delta, w.norm_w, w.eps)
            y = self._ssm(j, w, F.linear(h, w.in_w, w.in_b), idx)
            delta = F.linear(y, w.out_w, w.out_b)  # (Bk, D) in the weight dtype
        return torch.add(res, delta, out=out)

    def _ssm(self, j: int, w: _BlockWeights, xz: torch.Tensor, idx: torch.Tensor,
             conv_done: bool = False) -> torch.Tensor:
        """Block j's conv, x_proj, dt_proj, state update and gate for one token: xz (Bk, 2I) -> y (Bk, I).

        conv_done: xz's x half is already silu(conv(x)) and the conv state shifted (norm_gemv's epilogue)."""
        n = self.cfg.intermediate_size
        if self.xproj == "fused":  # x_proj as partial sums inside the conv kernel
            xc, dbc = self._d.conv_xproj(xz[:, :n], self.conv[j], w.conv_w, w.conv_b, w.x_w, idx)
        else:  # x_proj's (Bk, R + 2N) output is ssm_decode's single "partial sum"
            xc = xz[:, :n] if conv_done else self._k.conv1d_step(xz[:, :n], self.conv[j], w.conv_w, w.conv_b, idx)
            dbc = (self._d.gemv(xc, w.x_w) if self.xproj == "gemv" else F.linear(xc, w.x_w)).unsqueeze(1)
        # state_early: every step starts with an op that is not PDL-launched (out.copy_, the embedding's copy, the
        # first rms_norm), which waits for all work before it, and block j's state is written once a step: nothing
        # still running can write what ssm_decode reads before its wait
        return self._d.ssm_decode(xc, dbc, w.dt_w, w.A, w.D, xz[:, n:], w.dt_b, self.ssm[j], idx,
                                  out_dtype=self.dtype, state_early=SSM_STATE_EARLY)

    @torch.no_grad()
    def _capture(self) -> None:
        """Capture one graph per bucket, largest first, all in one memory pool (replays never overlap)."""
        pool = self._pool
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compile the kernels and warm cuBLAS; idx is all scratch, so no slot changes
            for bk in self.buckets:
                for _ in range(2):
                    self._step_blocks(self._h_in[bk], self._idx[bk], self._h_out[bk])
                    if self.head is not None:
                        self._d.argmax_rows(self._token(bk))
        torch.cuda.current_stream(self.device).wait_stream(side)
        for bk in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._step_blocks(self._h_in[bk], self._idx[bk], self._h_out[bk])
            self._graphs[bk] = g
            if self.head is not None:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._logits[bk] = self._token(bk)
                self._token_graphs[bk] = g
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._next_logits[bk] = self._token(bk)
                    self._next[bk] = self._d.argmax_rows(self._next_logits[bk])
                self._greedy_graphs[bk] = g
        torch.cuda.synchronize(self.device)
