"""`swarm knot convert`: a Hugging Face / original-mamba checkpoint folder -> one KNOT file, streamed tensor by tensor."""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import ExitStack
from typing import Callable

import torch

from swarm.errors import ConfigError, KnotFormatError
from swarm.knot import T_NEG_EXP_A, TensorSource, canonical_name, write_knot
from swarm.model.config import MambaConfig

log = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tiny and precision-critical: these stay fp32 whatever --dtype says (A_log feeds exp(); D is the skip gain).
KEEP_FP32_SUFFIXES = ("mixer.A_log", "mixer.D")


def _safetensors_files(src: str) -> list[str]:
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise KnotFormatError(f"{index}: not a valid safetensors index ({e})") from None
        return [os.path.join(src, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(src, "model.safetensors")
    return [single] if os.path.exists(single) else []


def _list_tensors(src: str, stack: ExitStack) -> dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """stored name -> (dtype, shape, loader), without loading any tensor data."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    files = _safetensors_files(src)
    if files:
        from safetensors import safe_open
        for path in files:
            try:
                f = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as e:  # safetensors raises its own error types
                raise KnotFormatError(f"{path}: cannot open safetensors file: {e}") from None
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                                        "I64": "int64"}.get(sl.get_dtype(), "float32"))
                out[name] = (dtype, tuple(sl.get_shape()), lambda f=f, name=name: f.get_tensor(name))
        return out
    bin_path = os.path.join(src, "pytorch_model.bin")
    if os.path.exists(bin_path):
        try:
            sd = torch.load(bin_path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch.load raises many types for a bad pickle
            raise KnotFormatError(f"{bin_path}: cannot read checkpoint: {e}") from None
        return {k: (v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()}
    raise KnotFormatError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


def convert(src: str, out: str, dtype: str | None = None, name: str | None = None, progress: bool = True) -> str:
    """Convert checkpoint folder `src` into KNOT file `out`; returns `out`. dtype None keeps the checkpoint's."""
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise KnotFormatError(f"{src}: not a folder (expected a Hugging Face checkpoint folder)")
    try:
        with open(cfg_path) as f:
            raw_cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path}: missing (a checkpoint folder needs config.json)") from None
    except ValueError as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = MambaConfig.from_dict(raw_cfg)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    target = DTYPE_NAMES.get(dtype) if dtype else None
    with ExitStack() as stack:
        stored = _list_tensors(src, stack)
        sources: list[TensorSource] = []
        for sname, (sdtype, shape, loader) in stored.items():
            canon = canonical_name(sname)
            if canon is None:
                log.warning("skipping tensor %s: not a Mamba-1 tensor name", sname)
                continue
            cname, transform = canon
            if cname == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embeddings are the head
            want = sdtype if target is None or not sdtype.is_floating_point else target
            if cname.endswith(KEEP_FP32_SUFFIXES) and sdtype.is_floating_point:
                want = torch.float32
            if transform == T_NEG_EXP_A:
                loader = (lambda ld: lambda: torch.log(-ld().float()))(loader)
            if cname.endswith("conv1d.weight") and len(shape) == 2:
                shape = (shape[0], 1, shape[1])
                loader = (lambda ld: lambda: ld().unsqueeze(1))(loader)
            sources.append(TensorSource(cname, want, tuple(shape), loader))
        names = {s.name for s in sources}
        if not cfg.tie_word_embeddings and "lm_head.weight" not in names:
            raise ConfigError(f"{src}: config says the head is not tied, but lm_head.weight is missing")
        blobs = {}
        tok = os.path.join(src, "tokenizer.json")
        if os.path.exists(tok):
            with open(tok, "rb") as f:
                blobs["tokenizer.json"] = f.read()
        total = sum(s.dtype.itemsize * math.prod(s.shape) for s in sources)
        model_name = name or os.path.basename(os.path.normpath(src))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {model_name}")
        try:
            write_knot(out, model_name, cfg.to_dict(), sources, blobs, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
    return out

