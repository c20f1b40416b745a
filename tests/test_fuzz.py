"""Fuzz the parsers that read untrusted bytes: RPC messages (wire), KNOT headers (knot) and DHT records (records).

Each property: hostile input only ever raises the parser's own error type (or returns None for records), and
valid input round-trips. SWARM_FUZZ_EXAMPLES sets the examples per property (scripts/fuzz_long.py raises it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm import knot, wire
from swarm.dht.records import ModelRecord, ServerRecord, ServerState
from swarm.errors import KnotFormatError, ProtocolError

EXAMPLES = int(os.environ.get("SWARM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# ---------------------------------------------------------------------------------------------------------------
# value strategies

# integers at every scale that matters: small, around 2**31 / 2**63, and past what msgpack or a float can hold
INTS = st.one_of(st.integers(-3, 70), st.integers(-(1 << 64), 1 << 64), st.sampled_from(
    [-1, 0, 1 << 31, (1 << 31) - 1, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1, 10**30]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
MSGPACK_SCALARS = st.one_of(st.none(), st.booleans(), INTS.filter(lambda i: -(1 << 63) <= i < 1 << 64), FLOATS,
                            st.text(max_size=20), st.binary(max_size=64))
MSGPACK_VALUES = st.recursive(MSGPACK_SCALARS, lambda c: st.one_of(
    st.lists(c, max_size=5), st.dictionaries(st.text(max_size=8), c, max_size=5)), max_leaves=20)
BIG_INTS = st.sampled_from([10**400, -10**400])  # JSON allows them; float() and math.isfinite() overflow
JSON_SCALARS = st.one_of(st.none(), st.booleans(), INTS, BIG_INTS, FLOATS, st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.one_of(
    st.lists(c, max_size=5), st.dictionaries(st.text(max_size=8), c, max_size=5)), max_leaves=20)

# ---------------------------------------------------------------------------------------------------------------
# (a) RPC messages


def _tensors(dtypes: list[str] | None = None) -> st.SearchStrategy[torch.Tensor]:
    """At least one dim: the swarm never sends 0-dim tensors (encode_tensor cannot view one as bytes)."""
    def make(code: str, shape: list[int], seed: int) -> torch.Tensor:
        dtype = knot.DTYPES[code][0]
        g = torch.Generator().manual_seed(seed)
        if dtype.is_floating_point:
            return torch.randn(shape, generator=g).to(dtype)
        return torch.randint(0, 100, shape, generator=g).to(dtype)
    return st.builds(make, st.sampled_from(dtypes or list(knot.DTYPES)),
                     st.lists(st.integers(0, 4), min_size=1, max_size=4), st.integers(0, 1 << 30))


WIRE_TEXT = st.text(max_size=30)
WIRE_INT = st.integers(-(1 << 63), (1 << 63) - 1)
STATES = st.lists(st.tuples(_tensors(), _tensors()), max_size=3)
VALID_MESSAGES = st.one_of(
    st.builds(wire.Open, WIRE_TEXT, WIRE_INT, WIRE_INT, WIRE_INT),
    st.builds(wire.Step, WIRE_INT, WIRE_INT, _tensors(["F32", "BF16"]), st.booleans()),
    st.builds(wire.ImportState, WIRE_INT, STATES),
    st.builds(wire.Close),
    st.builds(wire.Opened, WIRE_TEXT, WIRE_INT, WIRE_INT),
    st.builds(wire.StepResult, WIRE_INT, WIRE_INT, _tensors(), st.floats(allow_nan=False)),
    st.builds(wire.Checkpoint, WIRE_INT, STATES),
    st.builds(wire.Ack, WIRE_INT),
    st.builds(wire.Error, WIRE_TEXT, WIRE_TEXT),
    st.builds(wire.InfoRequest),
    st.builds(wire.Info, WIRE_TEXT, WIRE_TEXT, WIRE_INT, WIRE_INT, WIRE_TEXT, WIRE_TEXT, WIRE_TEXT, WIRE_TEXT,
              st.floats(allow_nan=False), WIRE_INT, WIRE_INT, WIRE_TEXT),
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _tensor_like() -> st.SearchStrategy[dict]:
    """Maps shaped like an encoded tensor, each part possibly wrong: dtype, shape (huge, negative) or byte count."""
    shape = st.one_of(st.lists(st.integers(0, 5), max_size=4), st.lists(INTS.filter(lambda i: -(1 << 63) <= i < 1 << 64),
                                                                         max_size=10), MSGPACK_VALUES)
    return st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(list(knot.DTYPES)), MSGPACK_VALUES),
                                  "shape": shape, "data": st.one_of(st.binary(max_size=200), MSGPACK_VALUES)})


@st.composite
def wrong_messages(draw: st.DrawFn) -> bytes:
    """A msgpack map that looks like a message: a known or random tag and version, each field random or wrong."""
    tag = draw(st.one_of(st.sampled_from(sorted(wire._REGISTRY)), MSGPACK_VALUES))
    body: dict = {"v": draw(st.one_of(st.just(wire.PROTOCOL_VERSION), MSGPACK_VALUES)), "t": tag}
    cls = wire._REGISTRY.get(tag) if isinstance(tag, str) else None
    names = [f.name for f in wire.dataclasses.fields(cls)] if cls else []
    for name in names + draw(st.lists(st.text(max_size=6), max_size=2)):
        if draw(st.integers(0, 9)) == 0:
            continue  # a missing field
        if name == "states":
            body[name] = draw(st.one_of(st.lists(st.lists(_tensor_like(), max_size=3), max_size=3), MSGPACK_VALUES))
        elif cls and name in cls.TENSORS:
            body[name] = draw(st.one_of(_tensor_like(), MSGPACK_VALUES))
        else:
            body[name] = draw(MSGPACK_VALUES)
    return msgpack.packb(body, use_bin_type=True)


def _unpack_only_protocol_errors(data: bytes) -> None:
    try:
        wire.unpack(data)
    except ProtocolError as e:  # ProtocolMismatch is a ProtocolError
        assert "\n" not in str(e) and len(str(e)) < 500, f"error is not one short line: {str(e)[:200]!r}"


@FUZZ
@given(st.binary(max_size=512))
def test_unpack_arbitrary_bytes(data):
    _unpack_only_protocol_errors(data)


@FUZZ
@given(wrong_messages())
def test_unpack_wrong_messages(data):
    _unpack_only_protocol_errors(data)


@FUZZ
@given(VALID_MESSAGES, st.data())
def test_unpack_valid_roundtrips_and_truncation_is_an_error(msg, data):
    packed = msg.pack()
    back = wire.unpack(packed)
    assert type(back) is type(msg)
    for f in wire.dataclasses.fields(msg):
        assert _same(getattr(msg, f.name), getattr(back, f.name)), f.name
    cut = data.draw(st.integers(0, len(packed) - 1))
    _unpack_only_protocol_errors(packed[:cut])

# ---------------------------------------------------------------------------------------------------------------
# (b) KNOT headers


def _valid_meta() -> dict:
    toc, off = {}, 0
    for name, shape in [("backbone.layers.0.norm.weight", [8]), ("backbone.layers.0.mixer.A_log", [8, 4]),
                        ("blk.1.ssm_a", [8, 4]), ("lm_head.weight", [16, 8])]:
        length = math.prod(shape) * 4
        toc[name] = {"dtype": "F32", "shape": shape, "offset": off, "length": length, "sha256": "0" * 64}
        off = knot.align_up(off + length)
    return {"format": "knot", "name": "tiny", "alignment": 64, "config": {"num_layers": 2, "d_model": 8},
            "tensors": toc, "blobs": {"tokenizer.json": {"offset": off, "length": 10, "sha256": "0" * 64}}}


def _encode_header(meta: object, version: int = knot.FORMAT_VERSION) -> bytes:
    body = json.dumps(meta, separators=(",", ":")).encode()
    return knot.MAGIC + struct.pack("<HI", version, len(body)) + body


@st.composite
def mutated_headers(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """A valid header with a few random edits: a value anywhere replaced (types, negative or huge numbers,
    shapes), a key deleted or added; then sometimes the raw bytes or the length prefix edited too."""
    meta = copy.deepcopy(_valid_meta())
    for _ in range(draw(st.integers(1, 4))):
        node, path = meta, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            if not isinstance(node[key], (dict, list)):
                break
            node, path = node[key], path + [key]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[key] = draw(JSON_VALUES)
            elif action == "delete":
                del node[key]
            else:
                node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(JSON_VALUES)
    try:
        raw = _encode_header(meta)
    except ValueError:  # json.dumps refuses nothing we generate, but keep the strategy total
        raw = _encode_header({})
    if draw(st.integers(0, 4)) == 0:  # a byte edit: breaks the JSON, the UTF-8 or the prefix
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    if draw(st.integers(0, 9)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    file_size = draw(st.one_of(st.none(), st.integers(0, 1 << 40), st.just(len(raw) + 4096)))
    return raw, file_size


def _parse_only_knot_errors(head: bytes, file_size: int | None) -> None:
    try:
        knot.parse_header(head, file_size)
    except KnotFormatError as e:
        assert "\n" not in str(e), f"error is not one line: {str(e)[:200]!r}"


def test_valid_header_parses():
    raw = _encode_header(_valid_meta())
    h = knot.parse_header(raw, len(raw) + 4096)
    assert h.name == "tiny" and "backbone.layers.1.mixer.A_log" in h.tensors


@FUZZ
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-10, 1 << 40)))
def test_parse_header_arbitrary_bytes(data, file_size):
    _parse_only_knot_errors(data, file_size)
    _parse_only_knot_errors(knot.MAGIC + struct.pack("<HI", 1, len(data)) + data, file_size)


@FUZZ
@given(mutated_headers())
def test_parse_header_mutated(case):
    _parse_only_knot_errors(*case)


@pytest.mark.parametrize("text", ["[" * 100_000, "1" * 5000, '{"blobs": [1]}', '{"name": "n", "config": '
                                  '{"num_layers": 1}, "tensors": {}, "blobs": [["a", 1]]}'],
                         ids=["deep", "long-int", "blobs-list-only", "blobs-list"])
def test_parse_header_edge_json(text):
    _parse_only_knot_errors(_encode_header_text(text), None)


def _encode_header_text(text: str) -> bytes:
    body = text.encode()
    return knot.MAGIC + struct.pack("<HI", knot.FORMAT_VERSION, len(body)) + body


@FUZZ
@given(JSON_VALUES)
def test_parse_header_any_json(meta):
    _parse_only_knot_errors(_encode_header(meta), None)

# ---------------------------------------------------------------------------------------------------------------
# (c) DHT records

GOOD_SERVER = ServerRecord(ServerState.ONLINE, 0, 4, 2.5, 3, public_name="p").to_dict()
GOOD_MODEL = ModelRecord("m", ("http://x/m.knot",), 4, "d" * 64).to_dict()


@st.composite
def record_like(draw: st.DrawFn, good: dict) -> dict:
    """A valid record with some fields replaced by random JSON-like values, dropped, or added."""
    rec = dict(good)
    for key in draw(st.lists(st.sampled_from(sorted(good)), max_size=4)):
        if draw(st.integers(0, 4)) == 0:
            rec.pop(key, None)
        else:
            rec[key] = draw(JSON_VALUES)
    return rec


@pytest.mark.parametrize("parser", [ServerRecord.parse, ModelRecord.parse], ids=["server", "model"])
def test_records_roundtrip(parser):
    good = GOOD_SERVER if parser == ServerRecord.parse else GOOD_MODEL
    assert parser(good).to_dict() == good


@pytest.mark.parametrize("field", ["throughput", "free_slots", "start", "num_layers", "v"])
def test_records_with_huge_numbers(field):
    for good in (GOOD_SERVER, GOOD_MODEL):
        for value in (10**400, -10**400, float("inf")):
            assert ServerRecord.parse({**good, field: value}) is None or field not in good
            ModelRecord.parse({**good, field: value})


@FUZZ
@given(st.one_of(JSON_VALUES, record_like(GOOD_SERVER), record_like(GOOD_MODEL)))
def test_record_parsers_never_raise(raw):
    for cls in (ServerRecord, ModelRecord):
        rec = cls.parse(raw)
        assert rec is None or isinstance(rec, cls)
