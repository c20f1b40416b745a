"""The health dashboard: pure snapshot logic, then `swarm health` against a real swarm of subprocesses on 127.0.0.1
(JSON, metrics, hostile DHT records, a peer's SIGKILL showing as a gap) and the page in headless Chromium.

The browser test writes its screenshot to a temporary folder; set SWARM_DASHBOARD_SCREENSHOT=docs/dashboard.png
to refresh the README's picture (tests do not rewrite tracked files by default).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

from swarm.dht import ModelRecord, PeerId, ServerRecord, ServerState, SwarmView
from swarm.health.metrics import render_metrics
from swarm.health.snapshot import (CrawlResult, PingResult, Totals, build_snapshot, find_peer, update_history,
                                   update_models)
from swarm.launch import FileServer, peer_id_of, spawn, start_bootstrap, start_peers, stop_all

pytestmark = pytest.mark.slow
MODEL = "noconvbias_rank"  # 5 blocks
RANGES = {"alpha": "0:3", "beta": "3:5", "gamma": "0:2"}
HOSTILE_NAME = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
                         r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')


# ---------------------------------------------------------------------------------------------------------------
# pure logic: no network


def _rec(start: int, end: int, state: ServerState = ServerState.ONLINE, **kw: Any) -> ServerRecord:
    return ServerRecord(state, start, end, kw.pop("throughput", 10.0), kw.pop("free_slots", 4), **kw)


def _crawl(t: float, servers: dict[str, ServerRecord], pings: dict[str, PingResult], n: int = 4,
           error: str = "") -> CrawlResult:
    view = SwarmView({PeerId(p): r for p, r in servers.items()}, {PeerId(p): t + 6 for p in servers}, dropped=2)
    model = ModelRecord("m", ("http://x/m.knot",), n, "d" * 64)
    if error:
        return CrawlResult(t, 0.5, error=error)
    return CrawlResult(t, 0.1, {"m": model}, {"m": view}, {PeerId(p): v for p, v in pings.items()}, dropped=2)


def test_snapshot_coverage_gap_gone_peer_and_odd_values():
    ok = PingResult(True, 0.004, "0.1.0", 1)
    c1 = _crawl(100.0, {"A": _rec(0, 2, public_name="a"), "B": _rec(2, 4, throughput=4.0),
                        "J": _rec(0, 4, ServerState.JOINING)},
                {"A": ok, "B": PingResult(True, float("nan"), "x" * 500), "J": PingResult(False, error="dial failed")})
    hist = update_history({}, c1, forget_after=60)
    models = update_models({}, c1, forget_after=60)
    snap = build_snapshot(c1, hist, models, Totals(1, 0, 2), 1.0, 100.5)
    m = snap["models"][0]
    assert (m["state"], m["coverage"], m["uncovered"], m["min_coverage"]) == ("healthy", [1, 1, 1, 1], [], 1)
    assert m["throughput"] == 2.0  # B: 4 tokens/s over 2 blocks is the bottleneck
    b = find_peer(snap, "B")
    assert b["ping_ms"] is None and len(b["version"]) <= 128  # NaN never reaches JSON; long strings are cut
    assert find_peer(snap, "J")["reachable"] is False and find_peer(snap, "J")["ping_error"] == "dial failed"
    json.dumps(snap, allow_nan=False)

    c2 = _crawl(110.0, {"A": _rec(0, 2)}, {"A": ok})  # B's records expired, J's too
    hist = update_history(hist, c2, forget_after=60)
    snap = build_snapshot(c2, hist, update_models(models, c2, 60), Totals(2, 0, 4), 1.0, 110.2)
    m = snap["models"][0]
    assert (m["state"], m["uncovered"], m["coverage"]) == ("broken", [[2, 4]], [1, 1, 0, 0])
    assert find_peer(snap, "B")["state"] == "gone" and find_peer(snap, "B")["last_seen"] == 100.0
    assert snap["peer_states"] == {"online": 1, "joining": 0, "offline": 0, "gone": 2}

    failed = _crawl(120.0, {}, {}, error="DHT timed out")  # a failed crawl forgets nobody
    assert update_history(hist, failed, 60) == hist and "m" in update_models(models, failed, 60)
    late = _crawl(200.0, {"A": _rec(0, 2)}, {"A": ok})
    assert set(p for _, p in update_history(hist, late, forget_after=60)) == {"A"}


def test_metrics_escape_hostile_labels_and_parse():
    name = 'x"}\n{evil="1\\'
    c = _crawl(1.0, {"A": _rec(0, 4)}, {"A": PingResult(True, 0.01)})
    c = CrawlResult(c.started_at, c.duration, {name: ModelRecord(name, ("u",), 4, "d")}, {name: c.views["m"]},
                    c.pings, c.dropped)
    text = render_metrics(build_snapshot(c, update_history({}, c, 60), update_models({}, c, 60), Totals(1, 0, 2),
                                         1.0, 2.0))
    samples = _parse_metrics(text)
    assert samples["swarm_health_model_healthy"] == 1.0
    assert samples["swarm_health_dropped_records_total"] == 2.0


# ---------------------------------------------------------------------------------------------------------------
# a live swarm


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _state(url: str) -> dict[str, Any]:
    status, _, body = _get(url + "api/v1/state")
    assert status == 200
    return json.loads(body)


def _poll(url: str, check: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
    """Poll the JSON state until `check` holds; fail with the last state if it never does."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = _state(url)
        if check(state):
            return state
        time.sleep(0.25)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s; last state:\n{json.dumps(state, indent=1)[:3000]}")


def _model(state: dict[str, Any]) -> dict[str, Any]:
    return next((m for m in state["models"] if m["name"] == MODEL), {})


def _parse_metrics(text: str) -> dict[str, float]:
    """Strict enough for Prometheus' text format 0.0.4: every line a comment or a sample; sums samples by name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert METRIC_LINE.match(line), f"not a Prometheus sample line: {line!r}"
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        value = float(line.rsplit(" ", 1)[1])
        assert math.isfinite(value)
        out[name] = out.get(name, 0.0) + value
    return out


@pytest.fixture(scope="module")
def health(hf_models):
    """A file server, a bootstrap node, three peers and `swarm health --refresh 1`; yields (url, boot, peers)."""
    folder = os.path.dirname(hf_models[MODEL][2])
    procs = []
    with FileServer(folder) as files:
        boot = start_bootstrap()
        procs.append(boot)
        try:
            dash = spawn("health", ["health", "--initial-peers", *boot.maddrs, "--port", "0", "--refresh", "1"])
            procs.append(dash)  # it starts while the peers load
            peers = start_peers(files.url(os.path.basename(hf_models[MODEL][2])), RANGES, boot.maddrs,
                                ["--update-period", "2"])  # records expire 6 s after the last refresh
            procs += peers
            url = dash.wait_for(lambda line: line.startswith("dashboard: "), 60, "printing its URL").split()[1]
            yield url, boot, {name: p for name, p in zip(RANGES, peers)}
        finally:
            stop_all(procs[::-1])


def test_state_lists_every_peer_and_the_model_healthy(health):
    url, _, peers = health
    ids = {peer_id_of(p): name for name, p in peers.items()}
    state = _poll(url, lambda s: _model(s).get("state") == "healthy" and
                  sum(p["state"] == "online" and p["reachable"] is True for p in s["peers"]) == 3, 30,
                  "the model healthy with three reachable peers")
    m = _model(state)
    assert (m["num_blocks"], m["coverage"], m["blocks_covered"], m["min_coverage"]) == (5, [2, 2, 1, 1, 1], 5, 1)
    assert m["throughput"] > 0
    for p in state["peers"]:
        name = ids[p["peer_id"]]
        assert p["public_name"] == name and f"{p['start']}:{p['end']}" == RANGES[name]
        assert p["version"] and p["device"] == "cpu" and p["ping_ms"] > 0 and p["free_slots"] > 0
    some_id = next(iter(ids))
    status, _, body = _get(url + "api/v1/peers/" + some_id)
    assert status == 200 and json.loads(body)["peer_id"] == some_id
    status, headers, body = _get(url + "api/v1/peers/QmNoSuchPeer")
    assert status == 404 and headers["Content-Type"].startswith("application/json") and json.loads(body)["error"]
    samples = _parse_metrics(_get(url + "metrics")[2].decode())
    assert samples["swarm_health_model_healthy"] == 1 and samples["swarm_health_model_blocks_covered"] == 5


def test_hostile_records_are_counted_and_break_nothing(health):
    from hivemind.utils import get_dht_time

    from swarm.dht import signed_subkey, start_dht
    url, boot, _ = health
    node = start_dht("127.0.0.1", 0, boot.maddrs, None, client_mode=False)
    try:
        exp = get_dht_time() + 30
        good = ServerRecord(ServerState.ONLINE, 0, 5, 1.0, 1).to_dict()
        garbage = [  # (block, subkey, value): each must be dropped once
            (0, "wrong-type", "not a record"),
            (1, "a-list", [1, 2, 3]),
            (2, "huge-range", {**good, "end": 10**9}),
            (3, "past-the-model", {**good, "start": 3, "end": 4096}),
            (4, "strings", {**good, "start": "0", "end": "5", "throughput": "fast", "free_slots": "many"}),
            (0, "nan", {**good, "throughput": float("nan")}),
            (1, "not-a-peer-id", good),  # well formed, but under a subkey nobody can dial
        ]
        for block, subkey, value in garbage:
            assert node.store(f"{MODEL}.block.{block}", subkey=subkey, value=value, expiration_time=exp)
        liar = {**good, "state": "joining", "public_name": HOSTILE_NAME}  # valid, so listed: its name is data
        liar_subkey = signed_subkey(str(node.peer_id), node.swarm_validator.local_public_key)  # signed by itself
        assert node.store(f"{MODEL}.block.0", subkey=liar_subkey, value=liar, expiration_time=exp)
        models = [("junk", 42), ("mismatch", {**ModelRecord("other", ("u",), 5, "d").to_dict()}),
                  ("huge", {**ModelRecord("huge", ("u",), 5, "d").to_dict(), "num_layers": 10**12}),
                  ("typed", {**ModelRecord("typed", ("u",), 5, "d").to_dict(), "num_layers": "5"})]
        for subkey, value in models:
            assert node.store("swarm.models", subkey=subkey, value=value, expiration_time=exp)
        want = len(garbage) + len(models)
        state = _poll(url, lambda s: s["dropped_records"]["last_crawl"] >= want and
                      any(p["public_name"] == HOSTILE_NAME for p in s["peers"]), 20, "the hostile records counted")
    finally:
        node.shutdown()
    assert state["dropped_records"]["last_crawl"] == want and state["dropped_records"]["total"] >= want
    assert [m["name"] for m in state["models"]] == [MODEL] and _model(state)["state"] == "healthy"
    assert {p["public_name"] for p in state["peers"] if p["state"] == "online"} == set(RANGES)
    liar_row = find_peer(state, str(node.peer_id))
    assert liar_row["state"] == "joining" and liar_row["reachable"] is False  # no info RPC behind it
    samples = _parse_metrics(_get(url + "metrics")[2].decode())
    assert samples["swarm_health_last_crawl_dropped_records"] == want
    status, headers, body = _get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"static/app.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    chromium = _chromium()
    if chromium:  # the name reaches the DOM as text, never as markup
        dom = _dump_dom(chromium, url, "hostile")
        assert "&lt;script&gt;alert" in dom and "<script>alert" not in dom and "<img src=\"x\"" not in dom


def test_sigkilled_peer_leaves_a_named_gap(health):
    url, _, peers = health
    _poll(url, lambda s: _model(s).get("state") == "healthy", 30, "the model healthy")
    victim = peers["beta"]  # the only peer of blocks 3:5
    victim.kill()  # no OFFLINE announcement: only the records' expiry tells
    state = _poll(url, lambda s: _model(s).get("state") == "broken", 30, "the gap after beta's records expired")
    m = _model(state)
    assert m["uncovered"] == [[3, 5]] and m["coverage"] == [2, 2, 1, 0, 0] and m["min_coverage"] == 0
    status, _, body = _get(url + "api/v1/peers/" + peer_id_of(victim))
    assert status == 200 and json.loads(body)["state"] == "gone"
    samples = _parse_metrics(_get(url + "metrics")[2].decode())
    assert samples["swarm_health_model_healthy"] == 0 and samples["swarm_health_model_blocks_covered"] == 3


# ---------------------------------------------------------------------------------------------------------------
# a real browser (last: in a full run it sees the gap left by the test above)


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and os.access(p, os.X_OK)), None)


def _chromium_args(chromium: str, profile: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000"]


def _dump_dom(chromium: str, url: str, tag: str) -> str:
    profile = f"/tmp/swarm-health-chromium-{os.getpid()}-{tag}"
    try:
        out = subprocess.run([*_chromium_args(chromium, profile), "--dump-dom", url], capture_output=True,
                             text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_browser_renders_peers_and_coverage(health, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not found (apt-get install -y chromium): the browser test cannot run")
    url, _, _ = health
    state = _poll(url, lambda s: bool(_model(s)), 30, "the model listed")
    dom = _dump_dom(chromium, url, "dom")
    m = _model(state)
    cells = re.findall(r'<div class="cell cov-(\d)[^"]*"[^>]*data-block="(\d+)"', dom)
    assert len(cells) == m["num_blocks"], dom[:3000]
    gaps = sorted(int(b) for cov, b in cells if cov == "0")
    assert gaps == [b for a, e in m["uncovered"] for b in range(a, e)]
    for p in state["peers"]:
        if p["state"] in ("online", "gone") and p["public_name"] != HOSTILE_NAME:
            assert f">{p['public_name']}</td>" in dom
    assert ("healthy" if m["state"] == "healthy" else "Not covered by any ONLINE peer") in dom

    shot = os.environ.get("SWARM_DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
    profile = str(tmp_path / "profile")
    out = subprocess.run([*_chromium_args(chromium, profile), f"--screenshot={shot}", "--window-size=1280,900",
                          url], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
