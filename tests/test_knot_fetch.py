"""Tests for swarm.knot_fetch against a Range-serving aiohttp server on 127.0.0.1 and local files."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import types

import pytest
import torch
from aiohttp import web
from safetensors.torch import save_file

from swarm import knot, knot_fetch
from swarm.errors import ChecksumMismatch, FetchError, RangeNotSupported, UnknownTensor
from swarm.knot_fetch import load_tensors, open_source, pieces, plan_spans

LAYERS, D, DI, NS, R, V = 4, 64, 128, 8, 4, 256  # a tiny Mamba: ~115 KB a block, ~0.5 MB a file
CONFIG = {"model_type": "mamba", "num_layers": LAYERS, "num_hidden_layers": LAYERS, "hidden_size": D,
          "intermediate_size": DI, "state_size": NS, "time_step_rank": R, "vocab_size": V, "conv_kernel": 4}
FAST = {"progress": False, "retries": 2, "backoff": 0.001}  # retries must not slow the tests down
TOKENIZER = b'{"model": {"type": "BPE"}}'


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"norm.weight": (D,), "mixer.A_log": (DI, NS), "mixer.D": (DI,), "mixer.conv1d.weight": (DI, 1, 4),
              "mixer.conv1d.bias": (DI,), "mixer.in_proj.weight": (2 * DI, D), "mixer.x_proj.weight": (R + 2 * NS, DI),
              "mixer.dt_proj.weight": (DI, R), "mixer.dt_proj.bias": (DI,), "mixer.out_proj.weight": (D, DI)}
    out = {f"backbone.layers.{i}.{k}": torch.randn(s, generator=g) for i in range(LAYERS) for k, s in shapes.items()}
    for i in range(LAYERS):  # a few narrow dtypes, so that byte sizes are not all multiples of 4
        out[f"backbone.layers.{i}.mixer.out_proj.weight"] = out[f"backbone.layers.{i}.mixer.out_proj.weight"].half()
        out[f"backbone.layers.{i}.mixer.dt_proj.bias"] = out[f"backbone.layers.{i}.mixer.dt_proj.bias"].bfloat16()
    out["backbone.embeddings.weight"] = torch.randn(V, D, generator=g)
    out["backbone.norm_f.weight"] = torch.randn(D, generator=g)
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for n, w in want.items():
        g = got[n]
        assert g.dtype == w.dtype and g.shape == w.shape, n
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), n  # bit for bit


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A KNOT, a corrupted copy, a safetensors dir (original mamba names) and a sharded safetensors dir."""
    root = tmp_path_factory.mktemp("models")
    tensors = make_tensors()
    sources = [knot.TensorSource(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()]
    path = str(root / "model.knot")
    knot.write_knot(path, "tiny-mamba", CONFIG, sources, blobs={"tokenizer.json": TOKENIZER})
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    header = knot.parse_header(bytes(raw), len(raw))
    bad = header.data_start + header.tensors["backbone.layers.2.mixer.in_proj.weight"].offset + 100
    raw[bad] ^= 0x01
    (root / "corrupt.knot").write_bytes(bytes(raw))
    hf_config = {k: v for k, v in CONFIG.items() if k != "num_layers"}
    single = root / "mamba-st"
    single.mkdir()
    renamed = {("backbone.embedding.weight" if n == "backbone.embeddings.weight" else n): t for n, t in tensors.items()}
    save_file(renamed, str(single / "model.safetensors"))
    (single / "config.json").write_text(json.dumps(hf_config))
    (single / "tokenizer.json").write_bytes(TOKENIZER)
    sharded = root / "mamba-sharded"
    sharded.mkdir()
    shards = {"model-00001-of-00002.safetensors": {n: t for n, t in tensors.items() if knot.block_of(n) in (0, 1)},
              "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if knot.block_of(n) not in (0, 1)}}
    for fname, part in shards.items():
        save_file(part, str(sharded / fname))
    index = {"metadata": {}, "weight_map": {n: fname for fname, part in shards.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text(json.dumps(hf_config))
    return types.SimpleNamespace(root=str(root), path=path, header=header, tensors=tensors)


class Server:
    """Serves `root` with Range support (aiohttp's FileResponse), counting requests and body bytes, with faults."""

    def __init__(self, root: str):
        self.root, self.url = root, ""
        self.requests = self.bytes = 0
        self.fail_next = 0  # answer 503 to this many requests
        self.short_next = 0  # answer a 206 one byte short to this many Range requests
        self.ignore_range = False  # answer 200 with the whole file, as a server without Range support does
        self.delay = 0.0  # seconds each answer waits, so that requests overlap
        self.in_flight = self.max_in_flight = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = os.path.join(self.root, request.match_info["path"])
        if not os.path.isfile(path):
            raise web.HTTPNotFound()
        self.requests += 1
        if self.delay:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(self.delay)
            self.in_flight -= 1
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=503)
        size = os.path.getsize(path)
        if self.ignore_range or "Range" not in request.headers:
            self.bytes += size
            with open(path, "rb") as f:
                return web.Response(body=f.read())
        sl = request.http_range
        served = range(size)[sl]
        if self.short_next:
            self.short_next -= 1
            with open(path, "rb") as f:
                body = f.read()[sl][:-1]
            self.bytes += len(body)
            return web.Response(status=206, body=body,
                                headers={"Content-Range": f"bytes {served.start}-{served.stop - 1}/{size}"})
        self.bytes += len(served)
        return web.FileResponse(path)


@pytest.fixture
async def server(model: types.SimpleNamespace):
    srv = Server(model.root)
    app = web.Application()
    app.router.add_get("/{path:.+}", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    srv.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield srv
    await runner.cleanup()


def test_plan_spans_reads_padding_and_cuts_large_reads() -> None:
    infos = [knot.TensorInfo(f"t{i}", "U8", (n,), off, n, "") for i, (off, n) in
             enumerate([(0, 100), (128, 50), (192, 60), (10_000, 10), (10_010, 5000)])]
    spans = plan_spans([(0, i.offset, i) for i in infos], max_gap=64, piece_size=4096)
    assert [(s.start, s.end, s.names) for s in spans] == [(0, 252, ("t0", "t1", "t2")), (10_000, 10_010, ("t3",)),
                                                          (10_010, 15_010, ("t4",))]
    assert plan_spans([(1, 0, infos[0]), (0, 128, infos[1])])[0].file == 0  # files never share a span
    assert pieces(10_010, 15_010, 4096) == [(10_010, 12_510), (12_510, 15_010)]
    assert pieces(5, 5) == []


async def test_http_fetch_reads_only_the_blocks_span(server: Server, model: types.SimpleNamespace) -> None:
    async with await open_source(f"{server.url}/model.knot", **FAST) as src:
        head_bytes, head_requests = server.bytes, server.requests
        assert (src.format, src.name, src.num_layers, src.config) == ("knot", "tiny-mamba", LAYERS, CONFIG)
        names = src.block_tensor_names(1, 3)
        assert names == model.header.block_tensor_names(1, 3) and len(names) == 20
        got = await src.fetch(names)
        start, end = model.header.span(names)
        assert server.bytes - head_bytes == end - start == src.bytes_fetched  # the span and nothing else
        assert server.bytes <= (end - start) + head_bytes
        assert server.requests - head_requests == 1  # one contiguous span, one request
        assert_same(got, {n: model.tensors[n] for n in names})
        assert_same(await src.fetch(src.head_tensor_names()), {n: model.tensors[n] for n in knot.HEAD_NAMES[:2]})
        assert await src.fetch_blob("tokenizer.json") == TOKENIZER
        assert await src.fetch_blob("nothing.json") is None
        with pytest.raises(UnknownTensor, match="no tensor 'nope'"):
            await src.fetch(["nope"])


async def test_long_header_and_parallel_pieces(server: Server, model: types.SimpleNamespace,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knot_fetch, "HEAD_READ", 100)  # shorter than the header: a second request reads the rest
    async with await open_source(f"{server.url}/model.knot", piece_size=16 << 10, concurrency=3, **FAST) as src:
        assert server.requests == 2
        server.delay = 0.002
        got = await src.fetch(src.all_tensor_names())
    assert_same(got, model.tensors)
    assert server.requests > 2 + os.path.getsize(model.path) // (16 << 10)  # cut into pieces of at most 16 KiB
    assert server.max_in_flight == 3  # parallel, and bounded


def test_local_sync_load(model: types.SimpleNamespace) -> None:
    src, got = load_tensors(model.path, "blocks 2:4", progress=False)
    names = model.header.block_tensor_names(2, 4)
    assert list(got) == names
    assert_same(got, {n: model.tensors[n] for n in names})
    start, end = model.header.span(names)
    assert src.bytes_fetched == end - start
    assert_same(load_tensors(model.path, progress=False)[1], model.tensors)


async def test_server_without_range_support(server: Server, model: types.SimpleNamespace) -> None:
    server.ignore_range = True
    url = f"{server.url}/model.knot"
    with pytest.raises(RangeNotSupported) as e:
        await open_source(url, **FAST)
    assert url in str(e.value) and "allow_full_download" in str(e.value) and "\n" not in str(e.value)
    async with await open_source(url, allow_full_download=True, **FAST) as src:
        assert_same(await src.fetch(src.all_tensor_names()), model.tensors)
    assert server.requests == 2  # refused once, then one whole download that every tensor is sliced from


async def test_http_errors(server: Server, model: types.SimpleNamespace) -> None:
    url = f"{server.url}/missing.knot"
    with pytest.raises(FetchError, match="404") as e:
        await open_source(url, **FAST)
    assert url in str(e.value)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.knot"
    with pytest.raises(FetchError, match="gave up after 3 attempts") as e:
        await open_source(url, **FAST)
    assert url in str(e.value)
    with pytest.raises(FetchError, match="no such file"):
        await open_source(os.path.join(model.root, "missing.knot"), **FAST)


async def test_checksum_mismatch(server: Server) -> None:
    async with await open_source(f"{server.url}/corrupt.knot", **FAST) as src:
        await src.fetch(src.block_tensor_names(0, 2))  # untouched blocks are fine
        with pytest.raises(ChecksumMismatch, match="layers.2.mixer.in_proj.weight"):
            await src.fetch(src.block_tensor_names(2, 3))


async def test_transient_failures_are_retried(server: Server, model: types.SimpleNamespace) -> None:
    server.fail_next = 1
    async with await open_source(f"{server.url}/model.knot", **FAST) as src:
        server.fail_next, server.short_next = 1, 1  # a 503, then a short body: two retries of one request
        got = await src.fetch(src.block_tensor_names(0, 4))
        assert_same(got, {n: model.tensors[n] for n in got})
        assert server.requests == 2 + 3
        server.fail_next = 100
        with pytest.raises(FetchError, match="HTTP 503.*gave up after 3 attempts"):
            await src.fetch(src.head_tensor_names())


async def test_disk_cache(server: Server, model: types.SimpleNamespace, tmp_path) -> None:
    url, cache = f"{server.url}/model.knot", str(tmp_path / "cache")
    async with await open_source(url, cache_dir=cache, **FAST) as src:
        names = src.all_tensor_names()
        await src.fetch(names)
        assert src.bytes_fetched > 0 and src.bytes_from_cache == 0
    async with await open_source(url, cache_dir=cache, **FAST) as src:  # a restarted peer
        before = server.bytes
        got = await src.fetch(names)
        assert server.bytes == before and src.bytes_fetched == 0  # no tensor byte from the server
        assert src.bytes_from_cache == sum(i.length for i in src.tensor_infos.values())
        assert_same(got, model.tensors)
        info = src.tensor_infos["backbone.layers.1.mixer.x_proj.weight"]
        with open(os.path.join(cache, info.sha256[:2], info.sha256), "r+b") as f:  # a damaged entry is refetched
            f.write(b"\xff\xff")
        got = await src.fetch(names)
        assert src.bytes_fetched == info.length
        assert_same(got, model.tensors)


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("layout", ["mamba-st/model.safetensors", "mamba-sharded/model.safetensors.index.json"])
async def test_safetensors(server: Server, model: types.SimpleNamespace, where: str, layout: str) -> None:
    location = f"{server.url}/{layout}" if where == "http" else os.path.join(model.root, layout)
    async with await open_source(location, **FAST) as src:
        assert src.format == "safetensors" and src.name == layout.split("/")[0] and src.num_layers == LAYERS
        assert src.config["hidden_size"] == D
        assert set(src.tensor_infos) == set(model.tensors)  # backbone.embedding.weight read as embeddings
        names = src.block_tensor_names(1, 3)
        got = await src.fetch(names)
        assert_same(got, {n: model.tensors[n] for n in names})
        need = sum(src.tensor_infos[n].length for n in names)  # save_file sorts by dtype: small gaps are read along
        assert need <= src.bytes_fetched <= need * 1.05
        assert_same(await src.fetch(src.all_tensor_names()), model.tensors)
        assert await src.fetch_blob("tokenizer.json") == (TOKENIZER if layout.startswith("mamba-st/") else None)
