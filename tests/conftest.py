"""Shared fixtures: tiny random-init transformers Mamba checkpoints and their KNOT files."""

from __future__ import annotations

import os

import pytest
import torch

# name -> transformers.MambaConfig kwargs; covers tied/untied heads, biases, conv and state sizes
CONFIGS = {
    "tied": dict(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=4, conv_kernel=4),
    "untied_bias": dict(vocab_size=80, hidden_size=48, state_size=8, num_hidden_layers=3, conv_kernel=3,
                        use_bias=True, tie_word_embeddings=False),
    "noconvbias_rank": dict(vocab_size=64, hidden_size=40, state_size=4, num_hidden_layers=5, conv_kernel=2,
                            use_conv_bias=False, time_step_rank=7, expand=3),
}


def make_hf_model(folder: str, name: str = "tied", seed: int = 0, **save_kw):
    """Save a random-init MambaForCausalLM (fp32) with save_pretrained; return the model (eval mode)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**CONFIGS[name])).eval()
    with torch.no_grad():  # make the SSM matter: larger dt and non-trivial D than the default init
        for layer in model.backbone.layers:  # and let the blocks, not the residual embedding, drive the logits
            layer.mixer.out_proj.weight.mul_(6)
            layer.mixer.in_proj.weight.mul_(2)
            layer.mixer.D.uniform_(-1, 1)
            layer.norm.weight.uniform_(0.5, 1.5)
        model.backbone.norm_f.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder, **save_kw)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (hf_model, checkpoint_dir, knot_path) for every config in CONFIGS."""
    from swarm.knot_convert import convert
    out = {}
    for name in CONFIGS:
        folder = str(tmp_path_factory.mktemp(f"hf-{name}"))
        model = make_hf_model(folder, name)
        knot = os.path.join(folder, f"{name}.knot")
        convert(folder, knot, name=name, progress=False)
        out[name] = (model, folder, knot)
    return out


def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy generate, and its logits for every generated position from a full forward pass."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None)
        full = model(out).logits[0]  # (L, vocab)
    gen = out[0, len(prompt):].tolist()
    return gen, full[len(prompt) - 1:len(prompt) - 1 + new_tokens]


def concurrent_generate(client, prompts: list[list[int]], new_tokens: int, timeout: float = 180) -> list[list[int]]:
    """Greedy-generate every prompt in its own session, all at once (one thread each); re-raise the first error."""
    import threading
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with client.session() as s:
                results[k] = s.generate(prompts[k], new_tokens)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return [results.get(k, []) for k in range(len(prompts))]


@pytest.fixture
def peers():
    """Peer processes a test starts; all stopped at its end."""
    from swarm.launch import stop_all
    started = []
    yield started
    stop_all(started)


def swarm_client(boot, **config):
    """A SwarmClient bootstrapped from `boot` with ClientConfig(**config)."""
    from swarm.client import ClientConfig, SwarmClient
    return SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(**config))
