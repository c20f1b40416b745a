"""Fetching a model's tensors (KNOT, or safetensors file / sharded index) from a local path or an http(s) URL.

Only the bytes asked for travel: tensors coalesce into contiguous spans (padding between them is read along), one
HTTP Range request per span, big spans cut into pieces, `concurrency` requests in flight, transient failures retried
with exponential backoff, each KNOT tensor's sha256 checked, verified bytes kept in an optional disk cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import aiohttp
import torch
from tqdm import tqdm

from swarm import knot
from swarm.errors import ChecksumMismatch, ConfigError, FetchError, KnotFormatError, UnknownTensor
from swarm.byte_range import HttpFile, LocalFile, RangeFile, Transient, is_url, status_error
from swarm.knot import TensorInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

HEAD_READ = 64 << 10  # first request of a file; a longer header costs one more request
MAX_GAP = 4096  # a gap up to this (alignment padding) is read along rather than starting another request
PIECE_SIZE = 32 << 20  # the largest single request: bigger reads are cut so that the pieces go in parallel
ST_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "U8")  # safetensors codes that equal KNOT's


@dataclass(frozen=True)
class FetchOptions:
    allow_full_download: bool = False  # accept a server that ignores Range: download the whole file once, slice it
    cache_dir: str | None = None  # verified tensor bytes of remote files, one file per content key
    progress: bool = True  # tqdm bar on stderr while fetching tensors
    retries: int = 4  # extra attempts after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    concurrency: int = 4  # requests in flight
    piece_size: int = PIECE_SIZE  # the largest single request, bytes


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) (absolute offsets) of file number `file`, holding whole tensors `names` in file order."""

    file: int
    start: int
    end: int
    names: tuple[str, ...]


def plan_spans(items: Iterable[tuple[int, int, TensorInfo]], max_gap: int = MAX_GAP,
               piece_size: int = PIECE_SIZE) -> list[Span]:
    """Group (file number, absolute offset, info) into spans: a gap <= max_gap is read along; a span stops growing
    at piece_size bytes (a single larger tensor gets a span of its own, which `pieces` cuts)."""
    spans: list[Span] = []
    f0, s0, e0, names = -1, 0, 0, []  # the span being grown
    for f, start, info in sorted(items, key=lambda it: (it[0], it[1])):
        end = start + info.length
        if names and f == f0 and start - e0 <= max_gap and end - s0 <= piece_size:
            e0 = max(e0, end)
            names.append(info.name)
            continue
        if names:
            spans.append(Span(f0, s0, e0, tuple(names)))
        f0, s0, e0, names = f, start, end, [info.name]
    if names:
        spans.append(Span(f0, s0, e0, tuple(names)))
    return spans


def pieces(start: int, end: int, piece_size: int = PIECE_SIZE) -> list[tuple[int, int]]:
    """Cut [start, end) into near-equal requests of at most piece_size bytes (none for an empty range)."""
    if end <= start:
        return []
    step = math.ceil((end - start) / math.ceil((end - start) / piece_size))
    return [(s, min(s + step, end)) for s in range(start, end, step)]


def parse_safetensors_header(head: bytes, file_size: int | None, source: str) -> tuple[dict[str, TensorInfo], int]:
    """Parse a safetensors header (u64 LE N, then N bytes of JSON): canonical name -> info (no checksums), data start."""
    if len(head) < 8:
        raise KnotFormatError(f"{source}: truncated: {len(head)} bytes is not a KNOT or safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    data_start = 8 + n
    if n < 2 or n > knot.MAX_HEADER_LEN or (file_size is not None and data_start > file_size):
        raise KnotFormatError(f"{source}: not a KNOT or safetensors file (safetensors header length {n} is invalid)")
    if len(head) < data_start:
        raise KnotFormatError(f"{source}: truncated: header needs {data_start} bytes, got {len(head)}")
    try:
        meta = json.loads(head[8:data_start])
    except ValueError as e:
        raise KnotFormatError(f"{source}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise KnotFormatError(f"{source}: safetensors header must be a JSON object")
    data_size = None if file_size is None else file_size - data_start
    out: dict[str, TensorInfo] = {}
    for stored, entry in meta.items():
        if stored == "__metadata__":
            continue
        where = f"{source}: tensor {stored!r}"
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise KnotFormatError(f"{where}: malformed entry {entry!r}") from None
        if dtype not in ST_DTYPES:
            raise KnotFormatError(f"{where}: dtype {dtype} is not supported (supported: {', '.join(ST_DTYPES)})")
        if (not isinstance(begin, int) or not isinstance(end, int) or not 0 <= begin <= end or min(shape, default=0) < 0
                or end - begin != math.prod(shape) * knot.DTYPES[dtype][1]):
            raise KnotFormatError(f"{where}: data_offsets {begin}..{end} do not match dtype {dtype} shape {shape}")
        if data_size is not None and end > data_size:
            raise KnotFormatError(f"{where}: bytes {begin}..{end} run past the end of the file")
        cname, transform = knot.canonical_name(stored) or (stored, knot.T_NONE)
        if cname in out:
            raise KnotFormatError(f"{where}: duplicate tensor {cname!r}")
        out[cname] = TensorInfo(cname, dtype, tuple(shape), begin, end - begin, "", stored if stored != cname else "",
                                transform)
    return out, data_start


def _beside(location: str, name: str) -> str:
    """The file `name` in the same directory (or URL prefix) as `location`."""
    if is_url(location):
        return urllib.parse.urljoin(location, name)
    return os.path.join(os.path.dirname(location), name)


def _dir_name(location: str) -> str:
    path = urllib.parse.urlparse(location).path if is_url(location) else os.path.abspath(location)
    parts = [p for p in path.split("/") if p][:-1]
    return parts[-1] if parts else "model"


async def _gather(aws: Iterable[Awaitable[T]]) -> list[T]:
    """asyncio.gather that cancels the rest when one fails, so no request outlives the call."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ModelSource:
    """One opened model (KNOT file, or safetensors file or index), local or URL. Build it with `open_source`.

    `bytes_fetched` counts tensor bytes read from the source (network or local file); `bytes_from_cache` those
    read from the disk cache. Header and JSON reads are not counted.
    """

    def __init__(self, location: str, opts: FetchOptions):
        self.location, self.opts = location, opts
        self.format = ""  # "knot" or "safetensors"
        self.name = ""
        self.config: dict[str, Any] = {}
        self.num_layers = 0
        self.tensor_infos: dict[str, TensorInfo] = {}  # canonical name -> info (offset relative to its data start)
        self.bytes_fetched = 0
        self.bytes_from_cache = 0
        self._files: list[RangeFile] = []
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file number, that file's data start)
        self._cache_keys: dict[str, str] = {}  # name -> content key (KNOT: the tensor's sha256)
        self._blobs: dict[str, knot.BlobInfo] = {}
        self._knot_data_start = 0
        self._session: aiohttp.ClientSession | None = None
        self._sem = asyncio.Semaphore(opts.concurrency)

    async def __aenter__(self) -> ModelSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def block_tensor_names(self, start: int, end: int) -> list[str]:
        """Canonical names of every tensor of blocks start..end-1, in file order."""
        if not 0 <= start < end <= self.num_layers:
            raise ConfigError(f"block range {start}:{end} is outside model {self.name!r} (blocks 0:{self.num_layers})")
        names = [n for n in self.tensor_infos if (b := knot.block_of(n)) is not None and start <= b < end]
        return sorted(names, key=self._file_order)

    def head_tensor_names(self) -> list[str]:
        return [n for n in knot.HEAD_NAMES if n in self.tensor_infos]

    def all_tensor_names(self) -> list[str]:
        return sorted(self.tensor_infos, key=self._file_order)

    def _file_order(self, name: str) -> tuple[int, int]:
        return self._where[name][0], self.tensor_infos[name].offset

    async def fetch(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Fetch and verify the named tensors (canonical names); a dict in the order asked."""
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self.tensor_infos]
        if missing:
            raise UnknownTensor(f"{self.location}: no tensor {missing[0]!r} ({len(missing)} unknown names)")
        t0, fetched0, cached0 = time.monotonic(), self.bytes_fetched, self.bytes_from_cache
        out = await asyncio.to_thread(self._cache_load, names)
        self.bytes_from_cache += sum(self.tensor_infos[n].length for n in out)
        todo = [(self._where[n][0], self._where[n][1] + self.tensor_infos[n].offset, self.tensor_infos[n])
                for n in names if n not in out]
        spans = plan_spans(todo, MAX_GAP, self.opts.piece_size)
        total = sum(s.end - s.start for s in spans)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"fetch {self.name}",
                  file=sys.stderr, disable=not self.opts.progress or total == 0, leave=False) as bar:
            for part in await _gather(self._fetch_span(s, bar) for s in spans):
                out.update(part)
        log.info("fetched %d tensors of %s: %d bytes from %s, %d from cache, in %.2fs", len(names), self.name,
                 self.bytes_fetched - fetched0, self.location, self.bytes_from_cache - cached0, time.monotonic() - t0)
        return {n: out[n] for n in names}

    async def _fetch_span(self, span: Span, bar: tqdm) -> dict[str, torch.Tensor]:
        f = self._files[span.file]
        parts = await _gather(self._read(f, s, e, bar) for s, e in pieces(span.start, span.end, self.opts.piece_size))
        data = parts[0] if len(parts) == 1 else b"".join(parts)  # (span.end - span.start) bytes
        return await asyncio.to_thread(self._decode_span, span, data)

    async def _read(self, f: RangeFile, start: int, end: int, bar: tqdm) -> bytes:
        async with self._sem:
            data = await self._retry(f.location, lambda: f.read(start, end))
        self.bytes_fetched += len(data)
        bar.update(len(data))
        return data

    def _decode_span(self, span: Span, data: bytes) -> dict[str, torch.Tensor]:
        """Slice, verify and decode each tensor of a span (in a worker thread: sha256 releases the GIL)."""
        view, out = memoryview(data), {}
        for n in span.names:
            info = self.tensor_infos[n]
            off = self._where[n][1] + info.offset - span.start
            raw = view[off:off + info.length]
            try:
                out[n] = knot.decode_tensor(info, raw)
            except ChecksumMismatch as e:
                raise ChecksumMismatch(f"{self._files[span.file].location}: {e}") from None
            if (path := self._cache_path(n)) is not None and not os.path.exists(path):
                self._cache_store(path, raw)
        return out

    async def _retry(self, where: str, op: Callable[[], Awaitable[T]]) -> T:
        err = ""
        for attempt in range(self.opts.retries + 1):
            try:
                return await op()
            except Transient as e:
                err = str(e)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:  # refused, reset, timed out, EIO
                err = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < self.opts.retries:
                delay = self.opts.backoff * 2 ** attempt
                log.warning("%s: %s; retry %d/%d in %.2fs", where, err, attempt + 1, self.opts.retries, delay)
                await asyncio.sleep(delay)
        raise FetchError(f"{where}: {err} (gave up after {self.opts.retries + 1} attempts)")

    # -- disk cache: <cache_dir>/<key[:2]>/<key>, holding a tensor's verified bytes; remote files only

    def _cache_path(self, name: str) -> str | None:
        if self.opts.cache_dir is None or not isinstance(self._files[self._where[name][0]], HttpFile):
            return None
        key = self._cache_keys[name]
        return os.path.join(self.opts.cache_dir, key[:2], key)

    def _cache_load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            if (path := self._cache_path(n)) is None:
                continue
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
                out[n] = knot.decode_tensor(self.tensor_infos[n], raw)
            except FileNotFoundError:
                continue
            except (OSError, KnotFormatError) as e:  # a bad entry (checksum, length) is fetched again
                log.warning("cache entry %s for %s is unusable (%s); fetching it again", path, n, e)
        return out

    def _cache_store(self, path: str, raw: memoryview) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
            os.replace(tmp, path)  # atomic: a reader never sees half an entry
        except OSError as e:
            log.warning("cannot write cache entry %s: %s", path, e)

    async def fetch_blob(self, name: str) -> bytes | None:
        """A non-tensor file: a KNOT blob (checksummed), or for safetensors the file beside it; None if absent."""
        if self.format == "safetensors":
            return await self._get_small(_beside(self._files[0].location, name))
        b = self._blobs.get(name)
        if b is None:
            return None
        f, start = self._files[0], self._knot_data_start + b.offset
        data = await self._retry(f.location, lambda: f.read(start, start + b.length)) if b.length else b""
        if knot.sha256_hex(data) != b.sha256:
            raise ChecksumMismatch(f"{f.location}: blob {name!r}: checksum mismatch (the file is corrupt or changed)")
        return data

    # -- opening

    async def _open(self) -> None:
        loc = self.location
        if is_url(loc):
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
                headers={"Accept-Encoding": "identity"})  # byte ranges must address the stored bytes
        if urllib.parse.urlparse(loc).path.endswith(".json"):
            index = await self._get_json(loc, "safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise KnotFormatError(f"{loc}: not a safetensors index (no weight_map)")
            await self._open_safetensors([_beside(loc, s) for s in sorted(set(map(str, weight_map.values())))])
            return
        self._files.append(self._new_file(loc))
        head = await self._head(0)
        if head[:4] != knot.MAGIC:
            try:
                await self._open_safetensors([loc], head)
            except KnotFormatError:
                if urllib.parse.urlparse(loc).path.endswith(".safetensors"):
                    raise
                raise KnotFormatError(f"{loc}: bad magic {head[:4]!r}, expected {knot.MAGIC!r} (not a KNOT file, "
                                      "nor a safetensors file)") from None
            return
        hdr = knot.parse_header(head, self._files[0].size, loc)
        if bad := [n for n, i in hdr.tensors.items() if not re.fullmatch(r"[0-9a-f]{64}", i.sha256)]:
            raise KnotFormatError(f"{loc}: tensor {bad[0]!r} has no valid sha256 (every KNOT tensor must have one)")
        self.format, self.name, self.config, self.num_layers = "knot", hdr.name, hdr.config, hdr.num_layers
        self.tensor_infos = dict(hdr.tensors)
        self._where = {n: (0, hdr.data_start) for n in hdr.tensors}
        self._cache_keys = {n: i.sha256 for n, i in hdr.tensors.items()}
        self._blobs, self._knot_data_start = dict(hdr.blobs), hdr.data_start

    async def _open_safetensors(self, locations: list[str], first_head: bytes | None = None) -> None:
        if first_head is None:
            self._files += [self._new_file(loc) for loc in locations]
            heads = await _gather(self._head(i) for i in range(len(locations)))
        else:
            heads = [first_head]
        for i, head in enumerate(heads):
            infos, data_start = parse_safetensors_header(head, self._files[i].size, locations[i])
            salt = hashlib.sha256(head[:data_start]).hexdigest()  # the header is the file's identity
            for n, info in infos.items():
                if n in self.tensor_infos:
                    raise KnotFormatError(f"{locations[i]}: tensor {n!r} is also in another shard")
                self.tensor_infos[n] = info
                self._where[n] = (i, data_start)
                self._cache_keys[n] = hashlib.sha256(f"{salt}:{info.stored_name or n}".encode()).hexdigest()
        self.format, self.name = "safetensors", _dir_name(locations[0])
        self.config = await self._get_json(_beside(locations[0], "config.json"), "model config")
        n = next((self.config[k] for k in ("num_layers", "num_hidden_layers", "n_layer") if k in self.config), None)
        if n is None:
            n = 1 + max((b for t in self.tensor_infos if (b := knot.block_of(t)) is not None), default=-1)
        if not isinstance(n, int) or n <= 0:
            raise KnotFormatError(f"{self.location}: cannot tell the number of layers (config says {n!r})")
        self.num_layers = n

    def _new_file(self, location: str) -> RangeFile:
        if is_url(location):
            assert self._session is not None
            return HttpFile(location, self._session, self.opts.allow_full_download)
        return LocalFile(location)

    async def _head(self, i: int) -> bytes:
        """A file's header bytes: one HEAD_READ request, and one more when the header is longer."""
        f = self._files[i]
        head = await self._retry(f.location, lambda: f.read(0, HEAD_READ, head=True))
        if head[:4] == knot.MAGIC:
            need = knot.PREFIX_LEN + knot.read_prefix(head[:knot.PREFIX_LEN], f.location)
        elif len(head) >= 8:
            need = 8 + struct.unpack("<Q", head[:8])[0]
        else:
            raise KnotFormatError(f"{f.location}: truncated: {len(head)} bytes is too short for a KNOT or "
                                  "safetensors file")
        have = len(head)
        if have < need <= min(f.size if f.size is not None else need, knot.MAX_HEADER_LEN + 8):
            head += await self._retry(f.location, lambda: f.read(have, need))
        return head

    async def _get_small(self, location: str) -> bytes | None:
        """A whole small file (JSON, tokenizer); None if it does not exist."""
        if not is_url(location):
            try:
                with open(location, "rb") as fh:
                    return fh.read()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise FetchError(f"{location}: cannot read: {e.strerror}") from None
        assert self._session is not None

        async def get() -> bytes | None:
            async with self._session.get(location) as resp:  # type: ignore[union-attr]
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise status_error(resp.status, resp.reason, location)
                return await resp.read()
        return await self._retry(location, get)

    async def _get_json(self, location: str, what: str) -> dict[str, Any]:
        data = await self._get_small(location)
        if data is None:
            raise FetchError(f"{location}: no such file (the {what})")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise KnotFormatError(f"{location}: the {what} is not valid JSON: {e}") from None
        return obj

    async def close(self) -> None:
        for f in self._files:
            if isinstance(f, LocalFile):
                f.close()
        self._files = []
        if self._session is not None:
            await self._session.close()
            self._session = None


async def open_source(location: str, *, allow_full_download: bool = False, cache_dir: str | None = None,
                      progress: bool = True, retries: int = 4, concurrency: int = 4, backoff: float = 0.5,
                      piece_size: int = PIECE_SIZE) -> ModelSource:
    """Open a KNOT file, safetensors file or safetensors index (a local path or http(s) URL): read its header only."""
    if retries < 0 or backoff < 0 or concurrency < 1 or piece_size < 1:
        raise ValueError(f"bad fetch options: retries={retries} backoff={backoff} concurrency={concurrency}")
    opts = FetchOptions(allow_full_download, cache_dir, progress, retries, backoff, concurrency, piece_size)
    src = ModelSource(location, opts)
    try:
        await src._open()
    except BaseException:
        await src.close()
        raise
    log.info("opened %s %r from %s: %d tensors, %d layers", src.format, src.name, src.location,
             len(src.tensor_infos), src.num_layers)
    return src


def select_names(source: ModelSource, spec: str | Iterable[str] | None) -> list[str]:
    """Tensor names from a selection: None or "all", "head", "blocks A:B" (A..B-1), a single name, or a list."""
    if spec is None or spec == "all":
        return source.all_tensor_names()
    if isinstance(spec, str):
        if spec == "head":
            return source.head_tensor_names()
        m = re.fullmatch(r"blocks\s+(\d+):(\d+)", spec.strip())
        return source.block_tensor_names(int(m[1]), int(m[2])) if m else [spec]
    return list(spec)


def load_tensors(location: str, names: str | Iterable[str] | None = None,
                 **kw: Any) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """Sync convenience: open, fetch `names` (see select_names), close. The returned source's metadata stays readable.

    Not for use inside a running event loop (it calls asyncio.run); there, use open_source and fetch.
    """
    async def run() -> tuple[ModelSource, dict[str, torch.Tensor]]:
        async with await open_source(location, **kw) as src:
            return src, await src.fetch(select_names(src, names))
    return asyncio.run(run())

