"""Every RPC message between client and peer, and the tensor codec (msgpack, versioned).

A message on the wire is msgpack of {"v": PROTOCOL_VERSION, "t": <type tag>, ...fields}; tensors travel as
{"dtype": "F32", "shape": [...], "data": <raw bytes>}. Frames are an 8-byte big-endian length then the payload
(hivemind's raw-data framing), capped at MAX_FRAME bytes on receive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import torch

from swarm.errors import ProtocolError, ProtocolMismatch
from swarm.knot import DTYPES, TORCH_TO_CODE

PROTOCOL_VERSION = 1
MAX_FRAME = 256 << 20  # 256 MiB: one prefill chunk of 2048 tokens x 2560 x 4 bytes is 21 MB
MAX_TENSOR_DIMS = 8
INFERENCE_PROTOCOL = "swarm.inference.v1"
INFO_PROTOCOL = "swarm.info.v1"
_LEN_BYTES = 8


# ---------------------------------------------------------------------------------------------------------------
# tensors


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().contiguous().cpu()
    if t.dtype not in TORCH_TO_CODE:
        raise ProtocolError(f"cannot send a tensor of dtype {t.dtype}")
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": TORCH_TO_CODE[t.dtype], "shape": list(t.shape), "data": data}


def decode_tensor(obj: Any, what: str = "tensor") -> torch.Tensor:
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed message: {what} must be a map, got {type(obj).__name__}")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"malformed message: {what} has unknown dtype {dtype!r:.40}")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 31 for s in shape)):
        raise ProtocolError(f"malformed message: {what} has a bad shape {shape!r:.80}")
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"malformed message: {what} data must be bytes")
    torch_dtype, size = DTYPES[dtype]
    if math.prod(shape) * size != len(data):
        raise ProtocolError(f"malformed message: {what} has {len(data)} bytes, dtype {dtype} and shape {shape} "
                            f"need {math.prod(shape) * size}")
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# messages

_REGISTRY: dict[str, type["Message"]] = {}


@dataclass(frozen=True)
class Message:
    TAG: ClassVar[str] = ""
    TENSORS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.TAG:
            _REGISTRY[cls.TAG] = cls

    def pack(self) -> bytes:
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TAG}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in self.TENSORS:
                v = None if v is None else encode_tensor(v)
            elif f.name == "states":
                v = [[encode_tensor(c), encode_tensor(s)] for c, s in v]
            body[f.name] = v
        return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> Message:
    """Decode and validate one message; raises ProtocolError (or ProtocolMismatch) with a one-line reason."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME,
                               max_array_len=1 << 16, max_map_len=1 << 10, max_str_len=1 << 20)
    except Exception as e:  # msgpack raises many types on garbage
        raise ProtocolError(f"malformed message: not valid msgpack ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError("malformed message: top level must be a map")
    version = body.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"protocol version {version!r:.40} is not supported (this side speaks "
                               f"{PROTOCOL_VERSION})")
    tag = body.get("t")
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"malformed message: unknown message type {tag!r:.40}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ProtocolError(f"malformed message: {cls.TAG} lacks field {f.name!r}")
        v = body[f.name]
        if f.name in cls.TENSORS:
            v = None if v is None else decode_tensor(v, f"{cls.TAG}.{f.name}")
        elif f.name == "states":
            if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
                raise ProtocolError(f"malformed message: {cls.TAG}.states must be a list of [conv, ssm] pairs")
            v = [(decode_tensor(c, "conv state"), decode_tensor(s, "ssm state")) for c, s in v]
        else:
            _check_type(cls.TAG, f.name, v, f.type)
        kwargs[f.name] = v
    return cls(**kwargs)


_TYPES = {"int": (int,), "str": (str,), "bool": (bool,), "float": (int, float), "dict": (dict,), "list": (list,),
          "str | None": (str, type(None)), "int | None": (int, type(None)), "float | None": (int, float, type(None))}


def _check_type(tag: str, name: str, v: Any, annotation: Any) -> None:
    ok = _TYPES.get(str(annotation))
    if ok is None:
        return
    if isinstance(v, bool) and bool not in ok:
        ok = ()
    if not isinstance(v, ok):
        raise ProtocolError(f"malformed message: {tag}.{name} must be {annotation}, got {type(v).__name__}")


# client -> peer, on an inference stream


@dataclass(frozen=True)
class Open(Message):
    """First message of an inference stream: this stream serves blocks start..end-1 of one session."""

    TAG: ClassVar[str] = "open"
    session_id: str
    start: int
    end: int
    batch: int = 1


@dataclass(frozen=True)
class Step(Message):
    """Run `hidden` (batch, T, d_model) fp32 through the span from `position` tokens; T > 1 is a prefill."""

    TAG: ClassVar[str] = "step"
    TENSORS: ClassVar[tuple[str, ...]] = ("hidden",)
    seq: int
    position: int
    hidden: torch.Tensor
    checkpoint: bool = False  # send the span's state after this step


@dataclass(frozen=True)
class ImportState(Message):
    """Replace the session's state with a checkpoint taken after `position` tokens. states: [(conv, ssm)] a block."""

    TAG: ClassVar[str] = "import"
    position: int
    states: list = field(default_factory=list)


@dataclass(frozen=True)
class Close(Message):
    TAG: ClassVar[str] = "close"


# peer -> client


@dataclass(frozen=True)
class Opened(Message):
    TAG: ClassVar[str] = "opened"
    session_id: str
    start: int
    end: int


@dataclass(frozen=True)
class StepResult(Message):
    TAG: ClassVar[str] = "result"
    TENSORS: ClassVar[tuple[str, ...]] = ("hidden",)
    seq: int
    position: int  # tokens in the state after this step
    hidden: torch.Tensor
    compute_ms: float = 0.0


@dataclass(frozen=True)
class Checkpoint(Message):
    """The span's state after `position` tokens, one (conv, ssm) pair a block, in block order."""

    TAG: ClassVar[str] = "ckpt"
    position: int
    states: list = field(default_factory=list)


@dataclass(frozen=True)
class Ack(Message):
    TAG: ClassVar[str] = "ack"
    position: int


@dataclass(frozen=True)
class Error(Message):
    """A refused or failed request. code: busy | bad_request | protocol | position | internal."""

    TAG: ClassVar[str] = "error"
    code: str
    message: str


# info / ping


@dataclass(frozen=True)
class InfoRequest(Message):
    TAG: ClassVar[str] = "info?"


@dataclass(frozen=True)
class Info(Message):
    TAG: ClassVar[str] = "info"
    peer_id: str
    model: str
    start: int
    end: int
    state: str
    version: str
    device: str
    dtype: str
    throughput: float
    free_slots: int
    sessions: int
    public_name: str = ""


# ---------------------------------------------------------------------------------------------------------------
# framing


async def send(writer: asyncio.StreamWriter, msg: Message) -> None:
    data = msg.pack()
    writer.write(len(data).to_bytes(_LEN_BYTES, "big"))
    writer.write(data)
    await writer.drain()


async def request_info(p2p: Any, peer_id: str) -> Message:
    """One info RPC on hivemind P2P `p2p`: the peer's answer (normally an Info). The caller sets the deadline."""
    from hivemind.p2p import PeerID
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), INFO_PROTOCOL)
    try:
        await send(writer, InfoRequest())
        return await recv(reader)
    finally:
        writer.close()


async def recv(reader: asyncio.StreamReader) -> Message:
    """Read one framed message. EOF -> ConnectionError; an oversized frame -> ProtocolError (before reading it)."""
    try:
        header = await reader.readexactly(_LEN_BYTES)
    except asyncio.IncompleteReadError:
        raise ConnectionError("stream closed") from None
    n = int.from_bytes(header, "big")
    if n > MAX_FRAME:
        raise ProtocolError(f"malformed message: frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        data = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ConnectionError("stream closed mid-message") from None
    return unpack(data)
