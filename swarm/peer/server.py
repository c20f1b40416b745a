"""The peer: load its blocks by Range, serve inference streams over libp2p, announce itself on the DHT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

import torch

from swarm import __version__
from swarm import wire
from swarm.dht import (ModelRecord, ServerRecord, ServerState, announce_model, announce_server, config_digest,
                       start_dht)
from swarm.errors import PeerBusy, ProtocolError, SwarmError
from swarm.model import BlockStack, MambaConfig
from swarm.model.graphs import GraphDecoder
from swarm.peer.compute import Batcher, measure_throughput
from swarm.peer.config import PeerConfig
from swarm.peer.sessions import Session, SessionId, SessionTable, state_bytes

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Peer:
    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg
        self.dht: Any = None
        self.p2p: Any = None
        self.peer_id = ""
        self.state = ServerState.JOINING
        self.stack: BlockStack | None = None
        self.model_cfg: MambaConfig | None = None
        self.model_name = ""
        self.model_config_dict: dict[str, Any] = {}
        self.throughput = 0.0
        self.sessions: SessionTable | None = None
        self.batcher: Batcher | None = None
        self.tasks: list[asyncio.Task] = []
        self.stopping = asyncio.Event()
        self.device = torch.device(self._pick_device(cfg.device))

    @staticmethod
    def _pick_device(device: str) -> str:
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SwarmError("--device cuda was asked for but torch sees no CUDA device")
        if device not in ("cpu", "cuda"):
            raise SwarmError(f"--device must be cpu, cuda or auto, got {device!r}")
        return device

    def _graph_decoder(self, slots: int) -> GraphDecoder | None:
        """A state pool of `slots` batch-1 sessions and decode steps for batches up to max_batch: CUDA graphs on
        CUDA (--graphs auto), or the same kernels launched eagerly (--graphs eager, which a CPU runs only under
        Triton's interpreter: tests of the pool without a GPU)."""
        mode = self.cfg.graphs
        if mode == "off" or slots < 1 or (mode == "auto" and self.device.type != "cuda"):
            return None
        if mode == "eager" and self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SwarmError("--graphs eager on a CPU runs Triton kernels: set TRITON_INTERPRET=1 (slow; for tests)")
        buckets = tuple(sorted({min(2 ** k, self.cfg.max_batch) for k in range(8)}))
        return GraphDecoder(self.stack, max_slots=slots, buckets=buckets, graphs=mode == "auto")

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        from swarm.knot_fetch import open_source
        cfg = self.cfg
        src = await open_source(cfg.model, cache_dir=cfg.cache_dir, allow_full_download=cfg.allow_full_download,
                                progress=sys.stderr.isatty())
        try:
            self.model_cfg = MambaConfig.from_dict(src.config)
            self.model_cfg.check_blocks(cfg.start, cfg.end)
            self.model_name = src.name
            self.model_config_dict = src.config
            self.dht = start_dht(cfg.host, cfg.port, cfg.initial_peers, cfg.identity,
                                 announce_host=cfg.announce_host)
            self.peer_id = str(self.dht.peer_id)
            maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
            for m in maddrs:
                print(m, flush=True)
            print(f"peer {self.peer_id} serving blocks {cfg.start}:{cfg.end} of {self.model_name!r}",
                  file=sys.stderr, flush=True)
            await self._announce()  # JOINING
            t0 = time.perf_counter()
            tensors = await src.fetch(src.block_tensor_names(cfg.start, cfg.end))
            log.info("fetched %d tensors (%d bytes) in %.2fs", len(tensors), src.bytes_fetched,
                     time.perf_counter() - t0)
        finally:
            await src.close()
        if cfg.dtype:
            want = DTYPES[cfg.dtype]
            tensors = {k: v.to(want) if v.is_floating_point() and not k.endswith(("A_log", "mixer.D")) else v
                       for k, v in tensors.items()}
        self.stack = BlockStack.from_tensors(self.model_cfg, cfg.start, cfg.end, tensors, self.device)
        del tensors
        per_session = state_bytes(self.model_cfg, cfg.end - cfg.start, 1)
        budget = int(cfg.memory_budget_mb * 2**20) if cfg.memory_budget_mb else per_session * cfg.max_sessions
        decoder = self._graph_decoder(min(cfg.max_sessions, budget // per_session))
        self.throughput = measure_throughput(self.stack, decoder=decoder)
        log.info("kernel backend %s%s, throughput %.1f tokens/s a block", self.stack.kern.name,
                 " with CUDA graphs" if decoder else "", self.throughput)
        self.batcher = Batcher(self.stack, cfg.max_batch, cfg.corrupt_outputs, decoder)
        self.sessions = SessionTable(self.model_cfg, cfg.max_sessions, budget, self.device, pool=decoder,
                                     pool_start=cfg.start, release=self.batcher.release if decoder else None)
        self.p2p = await self.dht.replicate_p2p()
        await self.p2p.add_binary_stream_handler(wire.INFERENCE_PROTOCOL, self._handle_inference)
        await self.p2p.add_binary_stream_handler(wire.INFO_PROTOCOL, self._handle_info)
        self.state = ServerState.ONLINE
        await self._announce()
        pool = "" if decoder is None else f", {decoder.max_slots} session slots" + (
            ", CUDA graphs" if decoder.captured else ", eager")
        print(f"ONLINE: {self.throughput:.1f} tokens/s a block on {self.stack.kern.name}{pool}", file=sys.stderr,
              flush=True)
        self.tasks = [asyncio.create_task(self.batcher.run(), name="batcher"),
                      asyncio.create_task(self._refresh_loop(), name="announcer")]

    async def _announce(self) -> None:
        from hivemind.utils import get_dht_time
        exp = get_dht_time() + self.cfg.expiration
        rec = self._record()
        ok = await announce_server(self.dht, self.model_name, self.peer_id, rec, exp)
        if self.state == ServerState.ONLINE:
            n = self.model_cfg.num_layers if self.model_cfg else 0
            model = ModelRecord(self.model_name, (self.cfg.model,), n, config_digest(self.model_config_dict))
            ok = await announce_model(self.dht, model, exp, self.peer_id) and ok
        if not ok:
            log.warning("some DHT records were not stored (state %s)", self.state.value)

    def _record(self) -> ServerRecord:
        dtype = str(self.stack.dtype).replace("torch.", "") if self.stack else (self.cfg.dtype or "")
        return ServerRecord(self.state, self.cfg.start, self.cfg.end, round(self.throughput, 2),
                            self.sessions.free_slots if self.sessions else 0, self.device.type, dtype,
                            __version__, self.cfg.public_name)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.update_period)
            try:
                expired = self.sessions.expire(self.cfg.session_idle_timeout) if self.sessions else []
                if expired:
                    log.info("expired %d idle session(s)", len(expired))
                await self._announce()
            except Exception as e:  # keep refreshing whatever one round did
                log.warning("DHT refresh failed: %s", e)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.dht is not None and self.model_name:
            self.state = ServerState.OFFLINE
            try:
                await asyncio.wait_for(self._announce(), timeout=5)
            except Exception as e:  # shutting down anyway
                log.warning("could not announce OFFLINE: %s", e)
        if self.batcher:
            b = self.batcher
            print(f"served {b.pool_steps} decode steps and {b.pool_prefills} prefills from pool slots, {b.batches} "
                  f"batches of {b.batched_steps} steps", file=sys.stderr, flush=True)
            b.close()
        if self.p2p is not None:
            await self.p2p.shutdown()
        if self.dht is not None:
            self.dht.shutdown()

    # ---- RPC -------------------------------------------------------------------------------------------------

    async def _handle_info(self, stream_info: Any, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        try:
            msg = await asyncio.wait_for(wire.recv(reader), timeout=10)
            if not isinstance(msg, wire.InfoRequest):
                raise ProtocolError(f"expected an info request, got {msg.TAG!r}")
            st = self.sessions
            await wire.send(writer, wire.Info(
                self.peer_id, self.model_name, self.cfg.start, self.cfg.end, self.state.value, __version__,
                self.device.type, str(self.stack.dtype).replace("torch.", "") if self.stack else "",
                self.throughput, st.free_slots if st else 0, len(st.sessions) if st else 0, self.cfg.public_name))
        except (ProtocolError, asyncio.TimeoutError) as e:
            await _send_error(writer, "protocol", str(e))
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle_inference(self, stream_info: Any, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        session: Session | None = None
        assert self.sessions is not None
        try:
            msg = await asyncio.wait_for(wire.recv(reader), timeout=30)
            if not isinstance(msg, wire.Open):
                raise ProtocolError(f"an inference stream must start with 'open', got {msg.TAG!r}")
            if not (self.cfg.start <= msg.start < msg.end <= self.cfg.end):
                raise ProtocolError(f"blocks {msg.start}:{msg.end} are not inside this peer's "
                                    f"{self.cfg.start}:{self.cfg.end}")
            if not 1 <= msg.batch <= 64:
                raise ProtocolError(f"batch size {msg.batch} is out of range (1..64)")
            session = self.sessions.open(SessionId(msg.session_id[:128]), msg.start, msg.end, msg.batch)
            await wire.send(writer, wire.Opened(session.sid, session.start, session.end))
            while True:
                msg = await asyncio.wait_for(wire.recv(reader), timeout=self.cfg.session_idle_timeout)
                if session.sid not in self.sessions.sessions:
                    raise ProtocolError("session expired")
                session.last_used = time.monotonic()
                if isinstance(msg, wire.Step):
                    await self._step(session, msg, writer)
                elif isinstance(msg, wire.ImportState):
                    self._import(session, msg)
                    await wire.send(writer, wire.Ack(session.position))
                elif isinstance(msg, wire.Close):
                    break
                else:
                    raise ProtocolError(f"unexpected message {msg.TAG!r} on an inference stream")
        except PeerBusy as e:
            await _send_error(writer, "busy", str(e))
        except ProtocolError as e:
            log.info("inference stream from %s: %s", getattr(stream_info, "peer_id", "?"), e)
            await _send_error(writer, "protocol", str(e))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except Exception as e:  # a bug in one session must not take the peer down
            log.exception("inference stream failed")
            await _send_error(writer, "internal", f"{type(e).__name__}: {e}")
        finally:
            if session is not None:
                self.sessions.close(session.sid)
            writer.close()

    async def _step(self, session: Session, msg: wire.Step, writer: asyncio.StreamWriter) -> None:
        h = msg.hidden
        d = self.model_cfg.hidden_size
        if h.dim() != 3 or h.shape[0] != session.batch or h.shape[2] != d or not 1 <= h.shape[1] <= \
                self.cfg.max_step_tokens:
            raise ProtocolError(f"step hidden has shape {tuple(h.shape)}, expected ({session.batch}, T, {d}) "
                                f"with 1 <= T <= {self.cfg.max_step_tokens}")
        if h.dtype != torch.float32:
            raise ProtocolError(f"step hidden must be float32, got {h.dtype}")
        if msg.position != session.position:
            raise ProtocolError(f"step at position {msg.position}, but the session holds {session.position} tokens")
        t0 = time.perf_counter()
        out = await self.batcher.submit(session, h)
        session.position += h.shape[1]
        ms = (time.perf_counter() - t0) * 1000
        await wire.send(writer, wire.StepResult(msg.seq, session.position, out.cpu(), ms))
        if msg.checkpoint:
            states = [(s.conv.cpu().clone(), s.ssm.cpu().clone()) for s in session.states]
            await wire.send(writer, wire.Checkpoint(session.position, states))

    def _import(self, session: Session, msg: wire.ImportState) -> None:
        if len(msg.states) != len(session.states):
            raise ProtocolError(f"state import has {len(msg.states)} blocks, the session has {len(session.states)}")
        for st, (conv, ssm) in zip(session.states, msg.states):
            if conv.shape != st.conv.shape or ssm.shape != st.ssm.shape or conv.dtype != torch.float32 \
                    or ssm.dtype != torch.float32:
                raise ProtocolError(f"state import shapes {tuple(conv.shape)}/{tuple(ssm.shape)} do not match "
                                    f"{tuple(st.conv.shape)}/{tuple(st.ssm.shape)} float32")
        if msg.position < 0:
            raise ProtocolError("state import at a negative position")
        for st, (conv, ssm) in zip(session.states, msg.states):
            st.conv.copy_(conv)
            st.ssm.copy_(ssm)
        session.position = msg.position


async def _send_error(writer: asyncio.StreamWriter, code: str, message: str) -> None:
    try:
        await wire.send(writer, wire.Error(code, message[:1000]))
    except (ConnectionError, RuntimeError):
        pass


async def serve(cfg: PeerConfig) -> None:
    """Run a peer until SIGINT/SIGTERM, then announce OFFLINE and shut down."""
    peer = Peer(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.create_task(peer.start())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()
            await stop.wait()
        else:
            start.cancel()
    finally:
        print("shutting down: announcing OFFLINE", file=sys.stderr, flush=True)
        await peer.stop()
