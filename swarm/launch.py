"""Starting and stopping swarm processes (bootstrap node, peers) and a local Range-capable file server.

Used by `swarm demo` and the multi-process tests. Each process runs in its own process group, so a kill takes
its DHT child and p2pd daemon with it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from swarm.errors import SwarmError


@dataclass
class Proc:
    """A `swarm ...` subprocess whose stdout/stderr lines are collected by reader threads."""

    name: str
    popen: subprocess.Popen
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _lines: "queue.Queue[tuple[str, str]]" = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        for stream, sink, tag in ((self.popen.stdout, self.stdout, "out"), (self.popen.stderr, self.stderr, "err")):
            threading.Thread(target=self._pump, args=(stream, sink, tag), daemon=True).start()

    def _pump(self, stream, sink: list[str], tag: str) -> None:
        for line in iter(stream.readline, ""):
            sink.append(line.rstrip("\n"))
            self._lines.put((tag, line.rstrip("\n")))
        self._lines.put((tag, ""))

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        """Block until a line satisfies `predicate` (a str -> bool); raise with the process's output if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.popen.poll() is not None and self._lines.empty():
                    break
                continue
            if line and predicate(line):
                return line
        tail = "\n".join(self.stderr[-15:])
        raise SwarmError(f"{self.name}: {what} did not happen within {timeout:.0f}s "
                         f"(exit code {self.popen.poll()}); its stderr ends with:\n{tail}")

    @property
    def maddrs(self) -> list[str]:
        return [line for line in self.stdout if line.startswith("/ip4/")]

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean OFFLINE announcement), then SIGKILL after `timeout`; also resumes a stopped one."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)  # the main process only: it shuts its DHT child down itself
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # the group: DHT child and p2pd too
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)


def swarm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli", *args]


def spawn(name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    popen = subprocess.Popen(swarm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=full_env)
    return Proc(name, popen)


def start_bootstrap(timeout: float = 60.0) -> Proc:
    p = spawn("bootstrap", ["dht", "--host", "127.0.0.1"])
    p.wait_for(lambda line: line.startswith("/ip4/"), timeout, "printing its multiaddr")
    return p


def start_peer(model: str, blocks: str, initial_peers: list[str], name: str = "peer", extra: list[str] | None = None,
               timeout: float = 120.0, wait_online: bool = True) -> Proc:
    p = spawn(name, ["serve", "--model", model, "--blocks", blocks, "--initial-peers", *initial_peers,
                     "--public-name", name, *(extra or [])])
    if wait_online:
        p.wait_for(lambda line: line.startswith("ONLINE"), timeout, "coming ONLINE")
    return p


def start_peers(model: str, ranges: dict[str, str], initial_peers: list[str], extra: list[str] | None = None,
                timeout: float = 120.0) -> list[Proc]:
    """Start several peers at once (name -> "A:B") and wait until every one is ONLINE."""
    procs = [start_peer(model, blocks, initial_peers, name, extra, wait_online=False) for name, blocks in ranges.items()]
    try:
        for p in procs:
            p.wait_for(lambda line: line.startswith("ONLINE"), timeout, "coming ONLINE")
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def stop_all(procs: list[Proc], timeout: float = 10.0) -> None:
    """Stop several processes at once: SIGTERM to each, then wait (each announces OFFLINE in parallel)."""
    for p in procs:
        if p.popen.poll() is None:
            p.signal(signal.SIGCONT)
            p.popen.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop(timeout)


def peer_id_of(proc: Proc) -> str:
    return proc.maddrs[0].rsplit("/", 1)[-1]


class FileServer:
    """An aiohttp static file server on 127.0.0.1 in a background thread (aiohttp answers Range requests)."""

    def __init__(self, root: str, port: int = 0):
        self.root, self.port = root, port
        self.bytes_served = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner = None

    def __enter__(self) -> "FileServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise SwarmError("the local file server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _run(self) -> None:
        from aiohttp import web
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            app = web.Application()
            app.router.add_static("/", self.root)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # the port the OS picked
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
