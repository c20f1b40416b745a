"""Byte ranges of one file, local (os.pread) or remote (HTTP Range requests), for knot_fetch.

A remote file's size comes from the first answer's Content-Range; a server that ignores Range is an error unless
the caller allows downloading the whole file once. Failures worth retrying (5xx, 408/429, short reads) raise
Transient; knot_fetch retries them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Union

import aiohttp

from swarm.errors import FetchError, RangeNotSupported

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Transient(Exception):
    """A failure worth retrying: 5xx, 408/429, short read (connection errors come as aiohttp.ClientError/OSError)."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def status_error(status: int, reason: str | None, url: str) -> Exception:
    if status >= 500 or status in (408, 429):
        return Transient(f"HTTP {status} {reason or ''}".strip())
    return FetchError(f"{url}: HTTP {status} {reason or ''}".strip())


class LocalFile:
    """A local file read with os.pread (in a worker thread)."""

    def __init__(self, path: str):
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FetchError(f"{path}: no such file") from None
        except OSError as e:
            raise FetchError(f"{path}: cannot open: {e.strerror}") from None
        self.location, self.size = path, os.fstat(self._fd).st_size

    async def read(self, start: int, end: int, head: bool = False) -> bytes:
        """Bytes [start, end); `head` clamps end to the file size (the first read of a file of unknown length)."""
        end = min(end, self.size) if head else end
        data = await asyncio.to_thread(os.pread, self._fd, end - start, start)
        if len(data) != end - start:
            raise Transient(f"short read: got {len(data)} of {end - start} bytes")
        return data

    def close(self) -> None:
        os.close(self._fd)


class HttpFile:
    """A remote file read by HTTP Range requests; its size comes from the first answer's Content-Range."""

    def __init__(self, url: str, session: aiohttp.ClientSession, allow_full: bool):
        self.location, self.size = url, None
        self._session, self._allow_full = session, allow_full
        self._whole: bytes | None = None  # the whole file, when the server ignores Range and that was allowed

    async def read(self, start: int, end: int, head: bool = False) -> bytes:
        if self._whole is None:
            data = await self._request(start, end, head)
        else:
            data = self._whole[start:end]
        want = (min(end, self.size) if head and self.size is not None else end) - start
        if len(data) != want:
            raise Transient(f"short read: got {len(data)} of {want} bytes")
        return data

    async def _request(self, start: int, end: int, head: bool) -> bytes:
        url = self.location
        async with self._session.get(url, headers={"Range": f"bytes={start}-{end - 1}"}) as resp:
            if resp.status == 206:
                cr = resp.headers.get("Content-Range", "")
                m = _CONTENT_RANGE.fullmatch(cr)
                if not m or int(m.group(1)) != start:
                    raise FetchError(f"{url}: bad Content-Range {cr!r} for bytes {start}-{end - 1}")
                total = None if m.group(3) == "*" else int(m.group(3))
                if self.size is not None and total is not None and total != self.size:
                    raise FetchError(f"{url}: the file changed size ({self.size} -> {total} bytes) while being read")
                self.size = total if total is not None else self.size
                return await resp.read()
            if resp.status == 200:
                if not self._allow_full:
                    raise RangeNotSupported(f"{url}: the server ignores HTTP Range requests (it answered 200 with the "
                                            f"whole file); pass allow_full_download=True to download all of it")
                self._whole = await resp.read()
                self.size = len(self._whole)
                log.info("%s: no Range support; downloaded the whole file (%d bytes)", url, self.size)
                return self._whole[start:end]
            if resp.status == 416 and head:  # an empty file
                self.size = 0
                return b""
            raise status_error(resp.status, resp.reason, url)


RangeFile = Union[LocalFile, HttpFile]
