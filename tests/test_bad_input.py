"""Bad input: each a clear one-line error and a non-zero exit, never a traceback or garbage."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from swarm.cli import main
from swarm.knot import ALIGNMENT, PREFIX_LEN, align_up
from swarm.launch import FileServer


def _split(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<I", raw[6:10])[0]
    meta = json.loads(raw[PREFIX_LEN:PREFIX_LEN + n])
    return raw, meta, raw[align_up(PREFIX_LEN + n, ALIGNMENT):]


def _rewrite(src, dst, mutate):
    raw, meta, data = _split(src)
    mutate(meta)
    js = json.dumps(meta).encode()
    head = raw[:6] + struct.pack("<I", len(js)) + js
    dst.write_bytes(head + b"\0" * (align_up(len(head), ALIGNMENT) - len(head)) + data)
    return str(dst)


def _run(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def _block0(meta, suffix):
    return meta["tensors"][f"backbone.layers.0.{suffix}"]


CASES = {
    "wrong_magic": (lambda raw: b"NOPE" + raw[4:], "bad magic"),
    "truncated": (lambda raw: raw[:6], "truncated"),
    "header_past_end": (lambda raw: raw[:6] + struct.pack("<I", len(raw) + 100) + raw[10:], "past the end"),
    "invalid_json": (lambda raw: raw[:10] + b"x" + raw[11:], "not valid JSON"),
}
META_CASES = {
    "offset_out_of_bounds": (lambda m: _block0(m, "mixer.D").update(offset=10**9), "past the end of the file"),
    "overlap": (lambda m: _block0(m, "mixer.D").update(offset=_block0(m, "mixer.A_log")["offset"]), "overlap"),
    "shape_mismatch": (lambda m: _block0(m, "mixer.D").update(shape=[3, 3]), "does not match dtype"),
    "unknown_dtype": (lambda m: _block0(m, "mixer.D").update(dtype="Q4"), "unknown dtype"),
    "missing_num_layers": (lambda m: m["config"].pop("num_layers"), "num_layers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_prefix(hf_models, tmp_path, capsys, case):
    fn, words = CASES[case]
    bad = tmp_path / "bad.knot"
    bad.write_bytes(fn(open(hf_models["tied"][2], "rb").read()))
    code, err = _run(capsys, "knot", "inspect", str(bad))
    assert code != 0 and words in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("case", list(META_CASES))
def test_broken_table_of_contents(hf_models, tmp_path, capsys, case):
    fn, words = META_CASES[case]
    bad = _rewrite(hf_models["tied"][2], tmp_path / "bad.knot", fn)
    code, err = _run(capsys, "knot", "inspect", bad)
    assert code != 0 and words in err and len(err.splitlines()) == 1, err


def test_checksum_mismatch_on_generate(hf_models, tmp_path, capsys):
    raw, meta, data = _split(hf_models["tied"][2])
    off = _block0(meta, "mixer.in_proj.weight")["offset"] + 5
    flipped = bytearray(raw)
    flipped[len(raw) - len(data) + off] ^= 0xFF
    bad = tmp_path / "flip.knot"
    bad.write_bytes(bytes(flipped))
    code, err = _run(capsys, "generate", "--local", "--model", str(bad), "--prompt-ids", "1,2", "--max-new-tokens",
                     "2")
    assert code != 0 and "checksum mismatch" in err and "in_proj" in err, err


def test_unknown_tensor_names(hf_models, tmp_path, capsys):
    def rename(m):
        m["tensors"]["mystery.weight"] = m["tensors"].pop("backbone.layers.1.mixer.x_proj.weight")
    bad = _rewrite(hf_models["tied"][2], tmp_path / "renamed.knot", rename)
    code, err = _run(capsys, "generate", "--local", "--model", bad, "--prompt-ids", "1", "--max-new-tokens", "1")
    assert code != 0 and "backbone.layers.1.mixer.x_proj.weight" in err and "missing" in err, err


def test_config_the_model_cannot_run(hf_models, tmp_path, capsys):
    bad = _rewrite(hf_models["tied"][2], tmp_path / "gelu.knot", lambda m: m["config"].update(hidden_act="gelu"))
    code, err = _run(capsys, "generate", "--local", "--model", bad, "--prompt-ids", "1", "--max-new-tokens", "1")
    assert code != 0 and "hidden_act 'gelu' is not supported" in err, err


def test_404_and_block_range_outside_model(hf_models, tmp_path, capsys):
    with FileServer(str(tmp_path)) as files:
        code, err = _run(capsys, "knot", "inspect", files.url("nothing-here.knot"))
    assert code != 0 and "404" in err and "nothing-here.knot" in err, err
    code, err = _run(capsys, "generate", "--local", "--model", hf_models["tied"][2], "--prompt-ids", "1,9999",
                     "--max-new-tokens", "1")
    assert code != 0 and "outside the vocabulary" in err, err


def test_real_process_exits_nonzero_without_traceback(tmp_path):
    bad = tmp_path / "garbage.knot"
    bad.write_bytes(b"\x00" * 64)
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "knot", "inspect", str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.strip().startswith("swarm: error:")
    assert "bad magic" in out.stderr
