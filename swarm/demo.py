"""`swarm demo`: a whole swarm on this machine, offline: model, file server, bootstrap, 3 peers, a failover."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch


DEMO_TEXT = (
    "Mamba is a selective state space model. Each block keeps a small recurrent state instead of a cache that "
    "grows with the sequence, so a peer can hold a session for a few kilobytes a layer. The swarm splits the "
    "blocks across volunteers: each peer fetches only its own tensors by HTTP Range requests and announces on a "
    "distributed hash table which blocks it serves. A client embeds the prompt, sends hidden states through a "
    "chain of peers, and samples the next token from the logits. When a peer dies, the client restores the "
    "state from the last checkpoint on another peer and replays only a few tokens. "
)


def make_tokenizer(vocab_size: int) -> bytes:
    """A small byte-level BPE tokenizer trained on DEMO_TEXT (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([DEMO_TEXT] * 4, trainer)
    return tok.to_str().encode()


def random_mamba(folder: str, hidden: int = 64, layers: int = 8, state: int = 16, conv: int = 4, vocab: int = 384,
                 seed: int = 0) -> str:
    """Write a deterministic random-init Mamba-1 checkpoint (HF names, safetensors) with a tokenizer to `folder`."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    inner, rank = 2 * hidden, math.ceil(hidden / 16)

    def uniform(*shape: int, bound: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    t: dict[str, torch.Tensor] = {"backbone.embeddings.weight": torch.randn(vocab, hidden, generator=g) * 0.5,
                                  "backbone.norm_f.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"backbone.layers.{i}."
        dt = torch.exp(torch.rand(inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        t.update({
            p + "norm.weight": torch.ones(hidden),
            p + "mixer.A_log": torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1),
            p + "mixer.D": torch.ones(inner),
            p + "mixer.conv1d.weight": uniform(inner, 1, conv, bound=conv ** -0.5),
            p + "mixer.conv1d.bias": uniform(inner, bound=conv ** -0.5),
            p + "mixer.in_proj.weight": uniform(2 * inner, hidden, bound=2 * hidden ** -0.5),
            p + "mixer.x_proj.weight": uniform(rank + 2 * state, inner, bound=inner ** -0.5),
            p + "mixer.dt_proj.weight": uniform(inner, rank, bound=rank ** -0.5),
            p + "mixer.dt_proj.bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
            # large enough that the blocks, not the residual copy of the input embedding, drive the logits
            p + "mixer.out_proj.weight": uniform(hidden, inner, bound=6 * inner ** -0.5),
        })
    save_file(t, os.path.join(folder, "model.safetensors"))
    config = {"model_type": "mamba", "vocab_size": vocab, "hidden_size": hidden, "state_size": state,
              "num_hidden_layers": layers, "conv_kernel": conv, "expand": 2, "time_step_rank": rank,
              "use_bias": False, "use_conv_bias": True, "residual_in_fp32": True, "tie_word_embeddings": True,
              "layer_norm_epsilon": 1e-5, "hidden_act": "silu", "eos_token_id": 0, "bos_token_id": 0,
              "pad_token_id": 0}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "tokenizer.json"), "wb") as f:
        f.write(make_tokenizer(vocab))
    return folder


def _say(msg: str) -> None:
    print(msg, flush=True)


def _load_cpu_kernels() -> None:
    """Load the numba CPU kernels here before the peers start, compiling them on a checkout's first run (numba
    caches them in swarm/kernels/__pycache__): otherwise the first peer compiles them while the demo sits silent."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("swarm.kernels.cpu")
    here = os.path.dirname(spec.origin) if spec and spec.origin else ""
    cold = not glob.glob(os.path.join(here, "__pycache__", "cpu.*.nbi"))
    if cold:
        _say("      compiling the CPU kernels (a checkout's first run only; later runs load them)")
    t0 = time.perf_counter()
    import swarm.kernels.cpu  # noqa: F401
    if cold:
        _say(f"      compiled in {time.perf_counter() - t0:.1f} s")


def run_demo(workdir: str | None = None, new_tokens: int = 48, kill_at: int = 16) -> int:
    from swarm.client import ClientConfig, LocalModel, SwarmClient
    from swarm.knot_convert import convert
    from swarm.launch import FileServer, start_bootstrap, start_peer

    tmp = workdir or tempfile.mkdtemp(prefix="swarm-demo-")
    layers = 8
    _say(f"[1/6] making a small random Mamba (8 blocks, d_model 64) in {tmp}")
    random_mamba(os.path.join(tmp, "demo-mamba"), layers=layers)
    knot = os.path.join(tmp, "demo-mamba.knot")
    convert(os.path.join(tmp, "demo-mamba"), knot, name="demo-mamba", progress=False)
    _say(f"      wrote {knot} ({os.path.getsize(knot) / 1e6:.2f} MB)")
    procs = []
    try:
        with FileServer(tmp) as files:
            url = files.url("demo-mamba.knot")
            _say(f"[2/6] serving it at {url} (HTTP Range)")
            try:
                boot = start_bootstrap()
                procs.append(boot)
                _say(f"[3/6] bootstrap node: {boot.maddrs[0]}")
                _load_cpu_kernels()
                ranges = {"peer-a": "0:4", "peer-b": "4:8", "peer-c": "2:8"}
                for name, blocks in ranges.items():
                    procs.append(start_peer(url, blocks, boot.maddrs, name, ["--update-period", "5"]))
                    _say(f"      {name} ONLINE, blocks {blocks}")
                by_id = {p.maddrs[0].rsplit("/", 1)[-1]: p for p in procs[1:]}
                prompt = "The swarm splits the blocks"
                sampling = dict(temperature=0.8, top_k=40, seed=7)
                _say(f"[4/6] generating {new_tokens} tokens through the swarm ({sampling}), prompt: {prompt!r}")
                client = SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(checkpoint_every=8))
                tokens: list[int] = []
                t0 = time.perf_counter()
                killed = []
                with client.session() as s:
                    for tok in s.stream(prompt, new_tokens, **sampling):
                        if not tokens:
                            _say("      route: " + "  ->  ".join(f"{by_id[p].name}[{a}:{b}]" for p, a, b in s.route))
                            sys.stdout.write("      text: ")
                        tokens.append(tok)
                        sys.stdout.write(_printable(client.tokenizer.decode([tok])))
                        sys.stdout.flush()
                        if len(tokens) == kill_at:
                            victim = _victim(s.route, ranges, by_id, layers)
                            victim.kill()
                            killed.append(victim.name)
                            sys.stdout.write(f" [SIGKILL {victim.name}] ")
                    route_after = list(s.route)
                    stats = dict(s.stats)
                dt = time.perf_counter() - t0
                _say("")
                _say(f"[5/6] {len(tokens)} tokens in {dt:.2f}s ({len(tokens) / dt:.1f} tokens/s); killed "
                     f"{', '.join(killed)}; recoveries {stats['recoveries']}, replayed tokens "
                     f"{stats['replayed_tokens']} (not the whole prefix)")
                _say("      route after: " + "  ->  ".join(f"{by_id[p].name}[{a}:{b}]" for p, a, b in route_after))
                client.close()
                local = LocalModel(knot).generate(prompt, new_tokens, **sampling)
                same = "identical" if local == tokens else "DIFFERENT"
                _say(f"      the same prompt run locally in one process gives {same} tokens (the weights are random, "
                     "so the text is noise: what matters is that the failure changed nothing)")
            finally:
                # a closed stdout (`swarm demo | head`) raises here too, and must not leave the peers running
                with contextlib.suppress(OSError):
                    _say("[6/6] shutting down peers and bootstrap" + ("" if workdir else f", removing {tmp}"))
                for p in reversed(procs):
                    p.stop()
    finally:
        if not workdir:  # a folder of our own: leave nothing behind (--workdir keeps the model)
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if local == tokens else 1


def _printable(text: str) -> str:
    """Random weights emit stray bytes of multi-byte characters; show them as a dot."""
    return "".join(c if c.isprintable() or c == " " else "\u00b7" for c in text.replace("\ufffd", "\u00b7"))


def _victim(route, ranges, by_id, layers):
    """A peer on the route whose loss still leaves every block covered."""
    for peer_id, _, _ in reversed(route):
        proc = by_id[peer_id]
        covered = set()
        for name, blocks in ranges.items():
            if name != proc.name:
                a, b = map(int, blocks.split(":"))
                covered.update(range(a, b))
        if covered >= set(range(layers)):
            return proc
    return by_id[route[-1][0]]


if __name__ == "__main__":
    sys.exit(run_demo())
