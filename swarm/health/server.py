"""The dashboard's web server: a background crawl loop and aiohttp routes serving its last snapshot."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm.dht import start_dht
from swarm.health.crawler import CrawlConfig, Crawler
from swarm.health.metrics import CONTENT_TYPE, render_metrics
from swarm.health.snapshot import (CrawlResult, History, Models, Totals, build_snapshot, find_peer, update_history,
                                   update_models)

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# Pages render from JSON with textContent only; this policy is a second wall against injected markup.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class HealthConfig:
    initial_peers: tuple[str, ...]  # multiaddrs of peers already in the swarm
    host: str = "127.0.0.1"  # listen address of the web server (0.0.0.0 to publish it)
    port: int = 8000  # 0 = any free port
    refresh: float = 20.0  # seconds between the starts of two crawls
    forget_after: float = 600.0  # peers and models whose records expired stay listed (as gone) this long
    crawl: CrawlConfig = field(default_factory=CrawlConfig)


class Dashboard:
    """Owns a client-mode DHT node, the crawl task and the web server; `start()` returns the page's URL."""

    def __init__(self, config: HealthConfig):
        self.config = config
        self.dht: Any = None
        self.p2p: Any = None
        self.crawler: Crawler | None = None
        self.history: History = {}
        self.models: Models = {}
        self.totals = Totals()
        self.snapshot = build_snapshot(None, {}, {}, self.totals, config.refresh, time.time())
        self.first_crawl = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        cfg = self.config
        self.dht = start_dht("127.0.0.1", 0, cfg.initial_peers, None, client_mode=True)
        self.p2p = await self.dht.replicate_p2p()
        self.crawler = Crawler(self.dht, self.p2p, cfg.crawl)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the port the OS picked when cfg.port is 0
        host = "127.0.0.1" if cfg.host in ("", "0.0.0.0") else f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.url = f"http://{host}:{port}/"
        self._task = asyncio.create_task(self._crawl_loop(), name="health-crawl")
        return self.url

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.p2p is not None:
            await self.p2p.shutdown()
        if self.dht is not None:
            self.dht.shutdown()

    # ---- crawling --------------------------------------------------------------------------------------------

    async def _crawl_loop(self) -> None:
        assert self.crawler is not None
        while True:
            result = await self.crawler.crawl()
            try:
                self.apply(result)
            except Exception:  # a bug must not freeze the page: keep serving the previous snapshot
                log.exception("could not build a snapshot from crawl %d", self.totals.crawls + 1)
            self.first_crawl.set()
            await asyncio.sleep(max(0.0, self.config.refresh - result.duration))

    def apply(self, result: CrawlResult) -> None:
        """Fold one crawl into the history and publish a new snapshot."""
        t = self.totals
        self.totals = Totals(t.crawls + 1, t.crawl_errors + bool(result.error), t.dropped + result.dropped)
        self.history = update_history(self.history, result, self.config.forget_after)
        self.models = update_models(self.models, result, self.config.forget_after)
        self.snapshot = build_snapshot(result, self.history, self.models, self.totals, self.config.refresh,
                                       time.time())
        log.info("crawl %d: %d models, %d peers, %d dropped records, %.2fs%s", self.totals.crawls,
                 len(result.models), sum(len(v.servers) for v in result.views.values()), result.dropped,
                 result.duration, f" (error: {result.error})" if result.error else "")

    # ---- web -------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/v1/state", self._state)
        app.router.add_get("/api/v1/peers/{peer_id}", self._peer)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_static("/static/", STATIC)
        app.on_response_prepare.append(_add_headers)
        return app

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _state(self, request: web.Request) -> web.Response:
        return _json({**self.snapshot, "now": round(time.time(), 3)})

    async def _peer(self, request: web.Request) -> web.Response:
        peer_id = request.match_info["peer_id"]
        peer = find_peer(self.snapshot, peer_id)
        if peer is None:
            return _json({"error": "unknown peer", "peer_id": peer_id[:128]}, status=404)
        return _json(peer)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render_metrics(self.snapshot).encode(), headers={"Content-Type": CONTENT_TYPE,
                                                                                   "Cache-Control": "no-store"})


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=partial(json.dumps, allow_nan=False),
                             headers={"Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"})


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


async def run_dashboard(config: HealthConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut the DHT node and the web server down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dash = Dashboard(config)
    try:
        url = await dash.start()
        print(f"dashboard: {url}", flush=True)
        await stop.wait()
    finally:
        await dash.close()
