"""KNOT container: the header and table of contents, tensor names and dtypes, and a streaming writer.

Layout (docs/KNOT_FORMAT.md has the full spec):
    bytes 0-3   b"KNOT"
    bytes 4-5   u16 LE format version
    bytes 6-9   u32 LE N, length of the JSON header
    bytes 10..  N bytes of UTF-8 JSON
    padding to a multiple of `alignment`: the data section starts there ("data_start")
    tensor bytes, each tensor aligned, block 0's tensors first, then block 1's, ..., then the head, then blobs.
All offsets in the JSON are relative to data_start. This module does no I/O beyond the writer's local file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from swarm.errors import ChecksumMismatch, KnotFormatError, UnknownTensor

MAGIC = b"KNOT"
FORMAT_VERSION = 1
PREFIX_LEN = 10
ALIGNMENT = 64
MAX_HEADER_LEN = 64 << 20  # a sane ceiling: a 64-layer model's header is ~100 KB

# KNOT dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "U8": (torch.uint8, 1),
}
TORCH_TO_CODE = {v[0]: k for k, v in DTYPES.items()}

# Per-block tensor suffixes (Hugging Face -hf names, after "backbone.layers.N.")
BLOCK_SUFFIXES = (
    "norm.weight",
    "mixer.A_log",
    "mixer.D",
    "mixer.conv1d.weight",
    "mixer.conv1d.bias",
    "mixer.in_proj.weight",
    "mixer.in_proj.bias",
    "mixer.x_proj.weight",
    "mixer.dt_proj.weight",
    "mixer.dt_proj.bias",
    "mixer.out_proj.weight",
    "mixer.out_proj.bias",
)
HEAD_NAMES = ("backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight")

_GGUF_BLOCK = {
    "attn_norm.weight": "norm.weight",
    "ssm_a": "mixer.A_log",  # GGUF holds A = -exp(A_log): converted on read
    "ssm_d": "mixer.D",
    "ssm_conv1d.weight": "mixer.conv1d.weight",
    "ssm_conv1d.bias": "mixer.conv1d.bias",
    "ssm_in.weight": "mixer.in_proj.weight",
    "ssm_in.bias": "mixer.in_proj.bias",
    "ssm_x.weight": "mixer.x_proj.weight",
    "ssm_dt.weight": "mixer.dt_proj.weight",
    "ssm_dt.bias": "mixer.dt_proj.bias",
    "ssm_out.weight": "mixer.out_proj.weight",
    "ssm_out.bias": "mixer.out_proj.bias",
}
_GGUF_HEAD = {
    "token_embd.weight": "backbone.embeddings.weight",
    "output_norm.weight": "backbone.norm_f.weight",
    "output.weight": "lm_head.weight",
}
_ORIGINAL_HEAD = {"backbone.embedding.weight": "backbone.embeddings.weight"}
_HF_BLOCK_RE = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# transform codes applied when a tensor is decoded (see canonical_name)
T_NONE, T_NEG_EXP_A = "", "a_from_neg_exp"


def canonical_name(name: str) -> tuple[str, str] | None:
    """Map a Hugging Face, original-mamba or GGUF tensor name to (hf_name, transform); None if not a Mamba tensor."""
    if name in HEAD_NAMES:
        return name, T_NONE
    if name in _ORIGINAL_HEAD:
        return _ORIGINAL_HEAD[name], T_NONE
    if name in _GGUF_HEAD:
        return _GGUF_HEAD[name], T_NONE
    m = _HF_BLOCK_RE.match(name)
    if m and m.group(2) in BLOCK_SUFFIXES:
        return name, T_NONE
    m = _GGUF_BLOCK_RE.match(name)
    if m and m.group(2) in _GGUF_BLOCK:
        transform = T_NEG_EXP_A if m.group(2) == "ssm_a" else T_NONE
        return f"backbone.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}", transform
    return None


def block_of(name: str) -> int | None:
    """The block index of a canonical tensor name, or None for head tensors."""
    m = _HF_BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the table of contents. `offset` is relative to the data section; `name` is canonical."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    sha256: str
    stored_name: str = ""  # the name as written in the file, when it differs from `name`
    transform: str = T_NONE

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class BlobInfo:
    """A non-tensor payload in the data section (e.g. tokenizer.json)."""

    name: str
    offset: int
    length: int
    sha256: str


@dataclass(frozen=True)
class KnotHeader:
    """A parsed, validated KNOT header. Offsets in `tensors` are absolute file offsets after `absolute()`."""

    version: int
    name: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    blobs: dict[str, BlobInfo]
    data_start: int
    header_len: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise UnknownTensor(f"tensor {name!r} is not in KNOT model {self.name!r}")
        return self.tensors[name]

    def block_tensor_names(self, start: int, end: int) -> list[str]:
        """Canonical names of every tensor of blocks start..end-1, in file order."""
        names = [n for n in self.tensors if (b := block_of(n)) is not None and start <= b < end]
        return sorted(names, key=lambda n: self.tensors[n].offset)

    def head_tensor_names(self) -> list[str]:
        return [n for n in HEAD_NAMES if n in self.tensors]

    def span(self, names: Iterable[str]) -> tuple[int, int]:
        """Absolute (start, end) byte span covering the named tensors."""
        infos = [self.tensor(n) for n in names]
        return (self.data_start + min(i.offset for i in infos),
                self.data_start + max(i.offset + i.length for i in infos))


def read_prefix(prefix: bytes, source: str = "KNOT file") -> int:
    """Validate the 10-byte prefix; return the JSON length N."""
    if len(prefix) < PREFIX_LEN:
        raise KnotFormatError(f"{source}: truncated: {len(prefix)} bytes, a KNOT header needs at least {PREFIX_LEN}")
    if prefix[:4] != MAGIC:
        raise KnotFormatError(f"{source}: bad magic {prefix[:4]!r}, expected {MAGIC!r} (not a KNOT file)")
    (version,) = struct.unpack("<H", prefix[4:6])
    if version != FORMAT_VERSION:
        raise KnotFormatError(f"{source}: unsupported KNOT version {version} (this reader knows {FORMAT_VERSION})")
    (n,) = struct.unpack("<I", prefix[6:10])
    if n == 0 or n > MAX_HEADER_LEN:
        raise KnotFormatError(f"{source}: header length {n} is out of range (1..{MAX_HEADER_LEN})")
    return n


def parse_header(head: bytes, file_size: int | None, source: str = "KNOT file") -> KnotHeader:
    """Parse and validate a KNOT header from the file's first bytes (at least 10 + N).

    `file_size` (when known) bounds every tensor; None skips that check (it is re-checked on fetch).
    """
    n = read_prefix(head[:PREFIX_LEN], source)
    if file_size is not None and PREFIX_LEN + n > file_size:
        raise KnotFormatError(f"{source}: header length {n} runs past the end of the file ({file_size} bytes)")
    if len(head) < PREFIX_LEN + n:
        raise KnotFormatError(f"{source}: truncated: header needs {PREFIX_LEN + n} bytes, got {len(head)}")
    try:
        meta = json.loads(head[PREFIX_LEN:PREFIX_LEN + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also JSON nested too deep, or an integer of 4300+ digits
        raise KnotFormatError(f"{source}: header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise KnotFormatError(f"{source}: header JSON must be an object, got {type(meta).__name__}")
    return _validate(meta, n, file_size, source)


def _field(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise KnotFormatError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise KnotFormatError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _validate(meta: dict[str, Any], n: int, file_size: int | None, source: str) -> KnotHeader:
    name = _field(meta, "name", str, source)
    config = _field(meta, "config", dict, source)
    num_layers = _field(config, "num_layers", int, f"{source}: config")
    if num_layers <= 0:
        raise KnotFormatError(f"{source}: config.num_layers must be positive, got {num_layers}")
    alignment = meta.get("alignment", ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment > 1 << 20:
        raise KnotFormatError(f"{source}: bad alignment {alignment!r}")
    data_start = align_up(PREFIX_LEN + n, alignment)
    data_size = None if file_size is None else file_size - data_start
    raw_tensors = _field(meta, "tensors", dict, source)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for stored, entry in raw_tensors.items():
        where = f"{source}: tensor {stored!r}"
        if not isinstance(entry, dict):
            raise KnotFormatError(f"{where}: entry must be an object")
        dtype = _field(entry, "dtype", str, where)
        if dtype not in DTYPES:
            raise KnotFormatError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        shape = _field(entry, "shape", list, where)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise KnotFormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offset = _field(entry, "offset", int, where)
        length = _field(entry, "length", int, where)
        digest = _field(entry, "sha256", str, where)
        if offset < 0 or length < 0:
            raise KnotFormatError(f"{where}: negative offset or length")
        expect = math.prod(shape) * DTYPES[dtype][1]
        if length != expect:
            raise KnotFormatError(f"{where}: length {length} does not match dtype {dtype} and shape {shape} "
                                  f"({expect} bytes)")
        if data_size is not None and offset + length > data_size:
            raise KnotFormatError(f"{where}: bytes {offset}..{offset + length} run past the end of the file")
        canon = canonical_name(stored)
        cname, transform = canon if canon else (stored, T_NONE)
        if cname in tensors:
            raise KnotFormatError(f"{where}: duplicate tensor (also stored as {tensors[cname].stored_name!r})")
        tensors[cname] = TensorInfo(cname, dtype, tuple(shape), offset, length, digest,
                                    stored if stored != cname else "", transform)
        spans.append((offset, offset + length, stored))
    blobs: dict[str, BlobInfo] = {}
    raw_blobs = meta.get("blobs") or {}
    if not isinstance(raw_blobs, dict):
        raise KnotFormatError(f"{source}: field 'blobs' has the wrong type ({type(raw_blobs).__name__})")
    for bname, entry in raw_blobs.items():
        where = f"{source}: blob {bname!r}"
        if not isinstance(entry, dict):
            raise KnotFormatError(f"{where}: entry must be an object")
        off, ln = _field(entry, "offset", int, where), _field(entry, "length", int, where)
        if off < 0 or ln < 0 or (data_size is not None and off + ln > data_size):
            raise KnotFormatError(f"{where}: bytes {off}..{off + ln} are out of bounds")
        blobs[bname] = BlobInfo(bname, off, ln, _field(entry, "sha256", str, where))
        spans.append((off, off + ln, bname))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0 and e1 > s1 and e0 > s0:
            raise KnotFormatError(f"{source}: tensors {n0!r} and {n1!r} overlap (bytes {s1}..{e0})")
    extras = {k: v for k, v in meta.items() if k not in ("name", "config", "tensors", "blobs", "alignment")}
    return KnotHeader(FORMAT_VERSION, name, config, tensors, blobs, data_start, n, extras)


def decode_tensor(info: TensorInfo, data: bytes | bytearray | memoryview, verify: bool = True) -> torch.Tensor:
    """Turn a tensor's raw bytes into a torch tensor (canonical meaning: A_log, not GGUF's A), checking its sha256.

    An empty `info.sha256` (safetensors has no checksums) skips the check.
    """
    if len(data) != info.length:
        raise KnotFormatError(f"tensor {info.name!r}: got {len(data)} bytes, expected {info.length}")
    if verify and info.sha256 and sha256_hex(data) != info.sha256:
        raise ChecksumMismatch(f"tensor {info.name!r}: checksum mismatch (the file is corrupt or was changed)")
    dtype = info.torch_dtype
    if info.length == 0:
        t = torch.empty(info.shape, dtype=dtype)
    else:
        t = torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape)
    if info.transform == T_NEG_EXP_A:
        t = torch.log(-t.float()).to(dtype)
    if info.name.endswith("conv1d.weight") and t.dim() == 2:  # GGUF stores (d_inner, d_conv)
        t = t.unsqueeze(1)
    return t


# ---------------------------------------------------------------------------------------------------------------
# Writer


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its canonical name, final dtype and shape, and a loader called once when it is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def file_order(name: str) -> tuple[int, int, str]:
    """Sort key: blocks in order (each block's tensors together), then the head."""
    b = block_of(name)
    if b is not None:
        suffix = name.split(".", 3)[3]
        rank = BLOCK_SUFFIXES.index(suffix) if suffix in BLOCK_SUFFIXES else len(BLOCK_SUFFIXES)
        return (0, b * 100 + rank, name)
    return (1, HEAD_NAMES.index(name) if name in HEAD_NAMES else len(HEAD_NAMES), name)


def write_knot(path: str, name: str, config: dict[str, Any], tensors: list[TensorSource],
               blobs: Mapping[str, bytes] | None = None, progress: Callable[[int], None] | None = None) -> None:
    """Write a KNOT file, loading one tensor at a time (memory stays at about one tensor).

    The header is written first with placeholder checksums of the same length and rewritten at the end.
    """
    if "num_layers" not in config:
        raise KnotFormatError("config must contain num_layers")
    tensors = sorted(tensors, key=lambda t: file_order(t.name))
    blobs = dict(blobs or {})
    toc: dict[str, dict[str, Any]] = {}
    off = 0
    for t in tensors:
        code = TORCH_TO_CODE[t.dtype]
        length = math.prod(t.shape) * DTYPES[code][1]
        toc[t.name] = {"dtype": code, "shape": list(t.shape), "offset": off, "length": length, "sha256": "0" * 64}
        off = align_up(off + length)
    blob_toc: dict[str, dict[str, Any]] = {}
    for bname, data in blobs.items():
        blob_toc[bname] = {"offset": off, "length": len(data), "sha256": sha256_hex(data)}
        off = align_up(off + len(data))
    meta = {"format": "knot", "name": name, "alignment": ALIGNMENT, "config": config, "tensors": toc,
            "blobs": blob_toc}

    def encode() -> bytes:
        return json.dumps(meta, separators=(",", ":")).encode("utf-8")

    header = encode()
    data_start = align_up(PREFIX_LEN + len(header))
    with open(path, "wb") as f:
        f.write(b"\0" * data_start)
        for t in tensors:
            entry = toc[t.name]
            value = t.load().to(t.dtype).contiguous()
            if tuple(value.shape) != t.shape:
                raise KnotFormatError(f"tensor {t.name!r}: shape {tuple(value.shape)} != declared {t.shape}")
            raw = value.view(torch.uint8).numpy().tobytes() if value.numel() else b""
            entry["sha256"] = sha256_hex(raw)
            f.seek(data_start + entry["offset"])
            f.write(raw)
            if progress:
                progress(len(raw))
        for bname, data in blobs.items():
            f.seek(data_start + blob_toc[bname]["offset"])
            f.write(data)
        f.truncate(data_start + off)
        final = encode()
        assert len(final) == len(header), "checksums must not change the header length"
        f.seek(0)
        f.write(MAGIC + struct.pack("<HI", FORMAT_VERSION, len(final)) + final)
