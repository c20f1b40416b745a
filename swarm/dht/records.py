"""DHT record formats and keys: per-block server records and the model record. Pure logic, no I/O.

Keys: "swarm.models" -> ModelRecord and "<model>.block.<i>" -> ServerRecord, each under a subkey signed by the
announcing peer ("<peer id>[owner:<public key>]").
Every record carries a version "v" and an "extras" dict that old readers ignore. Parsing never raises on hostile
input: it returns None, and callers count what they dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, NewType

RECORD_VERSION = 1
MODELS_KEY = "swarm.models"
MAX_BLOCKS = 4096

PeerId = NewType("PeerId", str)


class ServerState(str, Enum):
    OFFLINE = "offline"
    JOINING = "joining"
    ONLINE = "online"


def block_key(model: str, block: int) -> str:
    return f"{model}.block.{block}"


@dataclass(frozen=True)
class ServerRecord:
    """What a peer announces under each of its blocks' keys."""

    state: ServerState
    start: int  # first block served
    end: int  # one past the last block served
    throughput: float  # tokens per second through one of its blocks (decode, batch 1)
    free_slots: int  # sessions it can still open
    device: str = "cpu"
    dtype: str = "float32"
    version: str = ""  # swarm version
    public_name: str = ""
    protocol: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["v"] = RECORD_VERSION
        return d

    @classmethod
    def parse(cls, raw: Any) -> "ServerRecord | None":
        """A validated record, or None for anything malformed or hostile."""
        if not isinstance(raw, dict) or raw.get("v") != RECORD_VERSION:
            return None
        try:
            state = ServerState(raw["state"])
        except (KeyError, ValueError, TypeError):
            return None
        start, end = raw.get("start"), raw.get("end")
        if not (_is_int(start) and _is_int(end) and 0 <= start < end <= MAX_BLOCKS):
            return None
        thr, slots = raw.get("throughput"), raw.get("free_slots")
        if not (_is_num(thr) and thr >= 0 and _is_int(slots) and 0 <= slots < 1 << 20):
            return None
        strs = {k: raw.get(k, "") for k in ("device", "dtype", "version", "public_name")}
        if not all(isinstance(v, str) and len(v) <= 128 for v in strs.values()):
            return None
        protocol = raw.get("protocol", 1)
        extras = raw.get("extras", {})
        if not _is_int(protocol) or not isinstance(extras, dict):
            return None
        return cls(state, start, end, float(thr), slots, protocol=protocol, extras=extras, **strs)


@dataclass(frozen=True)
class ModelRecord:
    """Where a model's KNOT lives and what it is, so a client needs only the initial peers."""

    name: str
    locations: tuple[str, ...]  # KNOT paths or URLs
    num_layers: int
    config_digest: str  # sha256 of the canonical config JSON: peers and clients must agree
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, "name": self.name, "locations": list(self.locations),
                "num_layers": self.num_layers, "config_digest": self.config_digest, "extras": self.extras}

    @classmethod
    def parse(cls, raw: Any) -> "ModelRecord | None":
        if not isinstance(raw, dict) or raw.get("v") != RECORD_VERSION:
            return None
        name, locs, n, digest = raw.get("name"), raw.get("locations"), raw.get("num_layers"), raw.get("config_digest")
        if not (isinstance(name, str) and 0 < len(name) <= 256 and isinstance(digest, str) and len(digest) <= 128):
            return None
        if not (isinstance(locs, list) and 0 < len(locs) <= 16 and all(isinstance(x, str) and len(x) < 4096
                                                                       for x in locs)):
            return None
        if not (_is_int(n) and 0 < n <= MAX_BLOCKS):
            return None
        extras = raw.get("extras", {})
        return cls(name, tuple(locs), n, digest, extras if isinstance(extras, dict) else {})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite float, or an int a float can hold (math.isfinite overflows on larger ones)."""
    return isinstance(v, float) and math.isfinite(v) or _is_int(v) and abs(v) < 1 << 64
