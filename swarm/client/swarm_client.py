"""SwarmClient: finds the model and its peers on the DHT, holds the head, opens inference sessions."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Coroutine, TypeVar

from swarm import wire
from swarm.client.failover import BanList
from swarm.client.routing import Hop, find_route
from swarm.client.session import InferenceSession
from swarm.client.tokenizer import Tokenizer
from swarm.dht import ModelRecord, PeerId, SwarmView, lookup_models, lookup_servers, start_dht
from swarm.errors import DishonestPeer, NoRoute, SwarmError
from swarm.model import Head, MambaConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ClientConfig:
    checkpoint_every: int = 16  # K: peers send their state every K decode tokens (see docs/PERFORMANCE.md)
    min_step_timeout: float = 2.0  # a step's deadline is never shorter: a frozen peer is caught in ~this
    connect_timeout: float = 5.0  # opening a stream and a session
    ping_timeout: float = 2.0
    lookup_timeout: float = 15.0  # how long to wait for the model and full coverage to appear on the DHT
    view_max_age: float = 5.0  # re-read the DHT when routing with an older view
    ban_base: float = 5.0  # first ban of a failed peer, doubled each further failure
    max_retries: int = 8  # recoveries a single step may need before giving up
    cache_dir: str | None = None  # disk cache for the head's tensors
    verify_rate: float = 0.02  # share of steps re-run on another peer from the last checkpoint and compared
    verify_tolerance: float = 1e-3  # relative: max |a - b| <= tol * (1 + max |a|); fp32 prefill vs decode differ ~1e-6
    device: str = "cpu"  # where the head (embeddings, norm_f, LM head) lives and runs, with that device's kernels


class SwarmClient:
    def __init__(self, initial_peers: list[str], model: str | None = None, config: ClientConfig | None = None):
        if not initial_peers:
            raise SwarmError("SwarmClient needs at least one initial peer multiaddr")
        self.config = config or ClientConfig()
        self.bans = BanList(base=self.config.ban_base)
        self.rtt: dict[PeerId, float] = {}
        self.dishonest: dict[PeerId, int] = {}  # peers caught by result verification, and how often
        self.view = SwarmView()
        self.view_time = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="swarm-client", daemon=True)
        self.thread.start()
        self.dht = start_dht("127.0.0.1", 0, initial_peers, None, client_mode=True)
        self.p2p: Any = None
        try:
            self.run(self._init(model))
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the client's event loop thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _init(self, model: str | None) -> None:
        from swarm.knot_fetch import open_source
        self.p2p = await self.dht.replicate_p2p()
        record = await self._find_model(model)
        self.model_name = record.name
        self.record = record
        src = await open_source(record.locations[0], cache_dir=self.config.cache_dir, progress=False)
        try:
            self.cfg = MambaConfig.from_dict(src.config)
            tensors = await src.fetch(src.head_tensor_names())
            tok = await src.fetch_blob("tokenizer.json")
        finally:
            await src.close()
        self.head = Head.from_tensors(self.cfg, tensors, self.config.device)
        self.tokenizer = Tokenizer(tok, record.name)
        await self.refresh_view()

    async def _find_model(self, model: str | None) -> ModelRecord:
        deadline = time.monotonic() + self.config.lookup_timeout
        while True:
            models, _ = await lookup_models(self.dht)
            if model is not None and model in models:
                return models[model]
            if model is None and len(models) == 1:
                return next(iter(models.values()))
            if model is None and len(models) > 1:
                raise SwarmError(f"the swarm serves several models, pick one with model=...: {', '.join(models)}")
            if time.monotonic() > deadline:
                what = f"model {model!r}" if model else "any model"
                known = f" (it serves: {', '.join(models)})" if models else ""
                raise SwarmError(f"the swarm does not serve {what}{known}")
            await asyncio.sleep(0.25)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def state_bytes(self, blocks: int) -> int:
        return blocks * self.cfg.intermediate_size * (self.cfg.conv_kernel + self.cfg.state_size) * 4

    async def refresh_view(self) -> None:
        """Re-read the DHT. A record that this lookup missed but that has not expired is kept: a frozen DHT node
        can make a lookup come back short, and a record stays valid until its expiration time."""
        from hivemind.utils import get_dht_time
        view = await lookup_servers(self.dht, self.model_name, self.cfg.num_layers)
        now = get_dht_time()
        for peer, rec in self.view.servers.items():
            if peer not in view.servers and self.view.expirations.get(peer, 0.0) > now:
                view.servers[peer] = rec
                view.expirations[peer] = self.view.expirations[peer]
        self.view = view
        self.view_time = time.monotonic()

    async def route(self, start: int, end: int) -> list[Hop]:
        """The cheapest chain for blocks start..end-1, waiting up to lookup_timeout for coverage."""
        deadline = time.monotonic() + self.config.lookup_timeout
        while True:
            if time.monotonic() - self.view_time > self.config.view_max_age:
                await self.refresh_view()
            online = self.view.online()
            await self._ping_new(online)
            try:
                return find_route(online, start, end, self.rtt, self.bans.banned(), self.model_name)
            except NoRoute:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.5)
            await self.refresh_view()

    async def _ping_new(self, servers: dict[PeerId, Any]) -> None:
        todo = [p for p in servers if p not in self.rtt and p not in self.bans.banned()]
        results = await asyncio.gather(*(self._first_ping(p) for p in todo), return_exceptions=True)
        for p, r in zip(todo, results):
            if isinstance(r, BaseException):
                self.ban(p, r)
            else:
                self.rtt[p] = r[0]

    async def _first_ping(self, peer: PeerId) -> tuple[float, wire.Info]:
        """ping, tried twice unless it timed out: the first stream to a peer that has just come up can close under
        it (seen on loopback with two busy cores), and a ban would keep a healthy peer out of routes for seconds."""
        try:
            return await self.ping(peer)
        except asyncio.TimeoutError:
            raise
        except Exception as e:
            log.debug("first ping of %s failed (%s); trying once more", str(peer)[:12], e)
            await asyncio.sleep(0.2)
            return await self.ping(peer)

    async def ping(self, peer: PeerId) -> tuple[float, wire.Info]:
        """Round-trip time in seconds of an info RPC, and the peer's answer."""
        t0 = time.perf_counter()
        info = await asyncio.wait_for(wire.request_info(self.p2p, peer), timeout=self.config.ping_timeout)
        if not isinstance(info, wire.Info):
            raise SwarmError(f"peer {peer[:12]} answered {info.TAG!r} to info")
        return time.perf_counter() - t0, info

    def ban(self, peer: PeerId, error: BaseException) -> None:
        seconds = self.bans.ban(peer, long=isinstance(error, DishonestPeer))
        self.rtt.pop(peer, None)
        log.warning("banned peer %s for %.0fs: %s", str(peer)[:12], seconds, error)

    def session(self) -> InferenceSession:
        return InferenceSession(self, self.config.max_retries)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, **kw: Any) -> list[int]:
        with self.session() as s:
            return s.generate(prompt, max_new_tokens, **kw)

    def close(self) -> None:
        async def shutdown() -> None:
            if self.p2p is not None:
                await self.p2p.shutdown()

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=5)
            except Exception as e:  # closing anyway
                log.debug("p2p shutdown: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
