"""Local generation against transformers' MambaForCausalLM on identical weights (the correctness oracle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, hf_greedy, make_hf_model

from swarm.client import LocalModel
from swarm.knot_convert import convert

PROMPT = [3, 17, 5, 9, 22, 1, 14]
NEW = 12


def _ours(location: str, prompt=PROMPT, new=NEW, backend: str | None = None):
    model = LocalModel(location, backend=backend)
    s = model.session()
    s.keep_logits = True
    tokens = s.generate(prompt, new)
    return tokens, torch.stack(s.last_logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_python_api_matches_transformers(hf_models, name):
    model, _, knot = hf_models[name]
    ref_tokens, ref_logits = hf_greedy(model, PROMPT, NEW)
    tokens, logits = _ours(knot)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_reference_backend_matches_too(hf_models):
    model, _, knot = hf_models["untied_bias"]
    ref_tokens, ref_logits = hf_greedy(model, PROMPT, NEW)
    tokens, logits = _ours(knot, backend="reference")
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_cli_local_generate_json(hf_models):
    model, _, knot = hf_models["tied"]
    ref_tokens, _ = hf_greedy(model, PROMPT, 8)
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", knot, "--local",
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == ref_tokens


def test_sharded_safetensors_checkpoint(tmp_path):
    folder = str(tmp_path / "sharded")
    model = make_hf_model(folder, "untied_bias", seed=3, max_shard_size="20KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    knot = str(tmp_path / "sharded.knot")
    convert(folder, knot, progress=False)
    ref_tokens, ref_logits = hf_greedy(model, PROMPT, NEW)
    tokens, logits = _ours(knot)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-4
    # and served straight from the safetensors index, without conversion
    tokens2, _ = _ours(os.path.join(folder, "model.safetensors.index.json"))
    assert tokens2 == ref_tokens


def test_original_mamba_naming(tmp_path):
    from safetensors.torch import save_file
    folder = str(tmp_path / "hf")
    model = make_hf_model(folder, "tied", seed=5)
    cfg = model.config
    orig = str(tmp_path / "orig")
    os.makedirs(orig)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.contiguous()
          for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(orig, "model.safetensors"))
    with open(os.path.join(orig, "config.json"), "w") as f:
        json.dump({"d_model": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
                   "ssm_cfg": {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel}, "rms_norm": True,
                   "residual_in_fp32": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}, f)
    knot = str(tmp_path / "orig.knot")
    convert(orig, knot, progress=False)
    ref_tokens, ref_logits = hf_greedy(model, PROMPT, NEW)
    tokens, logits = _ours(knot)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_bf16_conversion_runs_close(hf_models, tmp_path):
    model, folder, _ = hf_models["tied"]
    knot = str(tmp_path / "bf16.knot")
    convert(folder, knot, dtype="bfloat16", progress=False)
    _, ref_logits = hf_greedy(model, PROMPT, 4)
    _, logits = _ours(knot, new=4)
    assert (logits - ref_logits).abs().max().item() < 0.1
