"""Mamba-1 model config, read from a Hugging Face config.json (or original mamba's) and validated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from swarm.errors import ConfigError

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class MambaConfig:
    vocab_size: int
    hidden_size: int  # d_model
    state_size: int  # d_state
    num_layers: int
    intermediate_size: int  # d_inner = expand * d_model
    conv_kernel: int  # d_conv
    time_step_rank: int  # dt_rank
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False  # in_proj / out_proj biases
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    eos_token_id: int | None = 0
    bos_token_id: int | None = 0
    pad_token_id: int | None = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MambaConfig":
        """Accept HF MambaConfig fields, original mamba fields (d_model, n_layer, ssm_cfg) or our own."""
        try:
            return cls._from_dict(d)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"model config: cannot read field {e} ({type(e).__name__})") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> "MambaConfig":
        if "d_model" in d and "hidden_size" not in d:  # original state-spaces/mamba config.json
            ssm = d.get("ssm_cfg") or {}
            if ssm.get("layer", "Mamba1") not in ("Mamba1", "Mamba"):
                raise ConfigError(f"model config: ssm_cfg.layer {ssm.get('layer')!r} is not Mamba-1")
            hidden = int(d["d_model"])
            vocab = int(d["vocab_size"])
            mult = int(d.get("pad_vocab_size_multiple", 8))
            if vocab % mult:
                vocab += mult - vocab % mult
            expand = int(ssm.get("expand", 2))
            d = {
                "vocab_size": vocab, "hidden_size": hidden, "state_size": ssm.get("d_state", 16),
                "num_hidden_layers": d["n_layer"], "expand": expand, "conv_kernel": ssm.get("d_conv", 4),
                "time_step_rank": ssm.get("dt_rank", "auto"), "use_bias": ssm.get("bias", False),
                "use_conv_bias": ssm.get("conv_bias", True), "residual_in_fp32": d.get("residual_in_fp32", True),
                "tie_word_embeddings": d.get("tie_embeddings", True), "layer_norm_epsilon": 1e-5,
                "model_type": "mamba",
            }
            if not d.get("rms_norm", True):
                raise ConfigError("model config: rms_norm=false (LayerNorm) Mamba is not supported")
        model_type = d.get("model_type", "mamba")
        if model_type != "mamba":
            raise ConfigError(f"model config: model_type {model_type!r} is not supported (only Mamba-1, 'mamba')")
        hidden = int(d["hidden_size"])
        layers = int(d.get("num_layers", d.get("num_hidden_layers", 0)))
        expand = d.get("expand", 2)
        inter = int(d.get("intermediate_size", int(expand * hidden)))
        rank = d.get("time_step_rank", "auto")
        rank = math.ceil(hidden / 16) if rank == "auto" else int(rank)
        act = d.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"model config: hidden_act {act!r} is not supported (supported: silu)")
        eos = d.get("eos_token_id", 0)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        cfg = cls(
            vocab_size=int(d["vocab_size"]), hidden_size=hidden, state_size=int(d.get("state_size", 16)),
            num_layers=layers, intermediate_size=inter, conv_kernel=int(d.get("conv_kernel", 4)),
            time_step_rank=rank, layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            use_bias=bool(d.get("use_bias", False)), use_conv_bias=bool(d.get("use_conv_bias", True)),
            hidden_act=act, residual_in_fp32=bool(d.get("residual_in_fp32", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), eos_token_id=eos,
            bos_token_id=d.get("bos_token_id", 0), pad_token_id=d.get("pad_token_id", 0),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "state_size", "num_layers", "intermediate_size", "conv_kernel",
                     "time_step_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.num_layers > 4096 or self.hidden_size > 1 << 16 or self.state_size > 1024 or self.conv_kernel > 64:
            raise ConfigError("model config: sizes are out of any sane range")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"model config: layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    def to_dict(self) -> dict[str, Any]:
        """HF-style config dict (what KNOT stores), with num_layers as the contract requires."""
        d = asdict(self)
        d["num_hidden_layers"] = self.num_layers
        d["expand"] = self.intermediate_size / self.hidden_size
        if d["expand"] == int(d["expand"]):
            d["expand"] = int(d["expand"])
        d["model_type"] = "mamba"
        return d

    def check_blocks(self, start: int, end: int) -> None:
        if not (0 <= start < end <= self.num_layers):
            raise ConfigError(f"block range {start}:{end} is outside the model (it has blocks 0:{self.num_layers})")
