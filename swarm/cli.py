"""The `swarm` command: knot convert/inspect, dht, serve, generate, health, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from swarm.errors import SwarmError


def _blocks(text: str) -> tuple[int, int]:
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block range {text!r} must look like START:END, e.g. 0:12") from None


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated integers") from None


# ---------------------------------------------------------------------------------------------------------------
# knot


def cmd_knot_convert(a: argparse.Namespace) -> int:
    from swarm.knot_convert import convert
    t0 = time.perf_counter()
    convert(a.src, a.out, dtype=a.dtype, name=a.name, progress=not a.quiet)
    print(f"wrote {a.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _inspect(location: str) -> dict[str, Any]:
    import asyncio

    from swarm.knot_fetch import open_source

    async def run() -> dict[str, Any]:
        src = await open_source(location, progress=False)
        try:
            n = src.num_layers
            infos = src.tensor_infos
            per_block = [sum(infos[t].length for t in src.block_tensor_names(b, b + 1)) for b in range(n)]
            head = sum(infos[t].length for t in src.head_tensor_names())
            dtypes = sorted({i.dtype for i in infos.values()})
            return {"location": location, "name": src.name, "num_layers": n, "num_tensors": len(infos),
                    "dtypes": dtypes, "bytes_per_block": per_block, "head_bytes": head,
                    "total_tensor_bytes": sum(i.length for i in infos.values()), "config": src.config}
        finally:
            await src.close()

    return asyncio.run(run())


def cmd_knot_inspect(a: argparse.Namespace) -> int:
    info = _inspect(a.location)
    if a.json:
        print(json.dumps(info))
        return 0
    pb = info["bytes_per_block"]
    print(f"model       {info['name']}")
    print(f"location    {info['location']}")
    print(f"blocks      {info['num_layers']}   tensors {info['num_tensors']}   dtypes {', '.join(info['dtypes'])}")
    print(f"bytes       {info['total_tensor_bytes']:,} total; head {info['head_bytes']:,}; "
          f"per block {min(pb):,}" + (f"..{max(pb):,}" if max(pb) != min(pb) else ""))
    cfg = info["config"]
    keys = ("vocab_size", "hidden_size", "intermediate_size", "state_size", "conv_kernel", "time_step_rank",
            "tie_word_embeddings", "use_bias", "use_conv_bias")
    print("config      " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# generate


def cmd_generate(a: argparse.Namespace) -> int:
    if (a.prompt is None) == (a.prompt_ids is None):
        raise SwarmError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    prompt: str | list[int] = a.prompt if a.prompt is not None else a.prompt_ids
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
              repetition_penalty=a.repetition_penalty)
    if a.local:
        if not a.model:
            raise SwarmError("--local needs --model PATH_OR_URL")
        from swarm.client.local import LocalModel
        model = LocalModel(a.model, device=a.device, cache_dir=a.cache_dir, progress=not a.json)
        session, tokenizer, route = model.session(), model.tokenizer, None
    else:
        if not a.initial_peers:
            raise SwarmError("give --initial-peers MADDR ... (or --local --model PATH_OR_URL)")
        from swarm.client import ClientConfig, SwarmClient
        client = SwarmClient(initial_peers=a.initial_peers, model=a.model,
                             config=ClientConfig(cache_dir=a.cache_dir, device=a.device))
        session = client.session()
        tokenizer = client.tokenizer
        route = session
    t0 = time.perf_counter()
    first: list[float] = []
    tokens: list[int] = []
    try:
        for tok in session.stream(prompt, a.max_new_tokens, **kw):
            if not first:
                first.append(time.perf_counter() - t0)
            tokens.append(tok)
            if not a.json:
                sys.stdout.write(tokenizer.decode([tok]) if tokenizer.available else f"{tok} ")
                sys.stdout.flush()
        final_route = session.route if route is not None else None
    finally:
        if route is not None:
            session.close()
            client.close()
    dt = time.perf_counter() - t0
    rate = (len(tokens) - 1) / (dt - first[0]) if len(tokens) > 1 and dt > first[0] else 0.0
    if a.json:
        out = {"tokens": tokens, "text": tokenizer.decode(tokens) if tokenizer.available else None,
               "seconds": round(dt, 4), "tokens_per_s": round(rate, 2)}
        if route is not None:
            out["route"] = [list(r) for r in final_route]
            out["recoveries"] = session.stats.get("recoveries", 0)
            out["replayed_tokens"] = session.stats.get("replayed_tokens", 0)
        print(json.dumps(out))
    else:
        print(f"\n[{len(tokens)} tokens, {rate:.1f} tokens/s after the first]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# dht, serve


def _wait_for_signal() -> None:
    import signal
    import threading
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def cmd_dht(a: argparse.Namespace) -> int:
    from swarm.dht import start_dht
    dht = start_dht(a.host, a.port, a.initial_peers, a.identity)
    for m in dht.get_visible_maddrs():
        print(m, flush=True)
    try:
        _wait_for_signal()
    finally:
        dht.shutdown()
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import asyncio

    from swarm.peer.config import PeerConfig
    from swarm.peer.server import serve
    start, end = a.blocks
    cfg = PeerConfig(model=a.model, start=start, end=end, host=a.host, port=a.port, announce_host=a.announce_host,
                     initial_peers=tuple(a.initial_peers), device=a.device, dtype=a.dtype, identity=a.identity,
                     public_name=a.public_name, max_sessions=a.max_sessions, memory_budget_mb=a.memory_budget_mb,
                     cache_dir=a.cache_dir, update_period=a.update_period, max_batch=a.max_batch,
                     allow_full_download=a.allow_full_download, corrupt_outputs=a.corrupt_outputs,
                     graphs=a.graphs)
    asyncio.run(serve(cfg))
    return 0


def _add_node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=0, help="listen port (0: any free port)")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of peers already in the swarm")
    p.add_argument("--identity", help="private key file for a stable peer ID (created if missing)")


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm", description="Peer-to-peer inference for Mamba language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    knot = sub.add_parser("knot", help="KNOT model files").add_subparsers(dest="knot_command", required=True)
    c = knot.add_parser("convert", help="convert a Hugging Face checkpoint folder to KNOT")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--name")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_knot_convert)
    i = knot.add_parser("inspect", help="show a KNOT file's header (over HTTP: reads only the header)")
    i.add_argument("location")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_knot_inspect)

    g = sub.add_parser("generate", help="generate text, locally or through a swarm")
    g.add_argument("--model", help="PATH_OR_URL with --local; a model name in the swarm otherwise")
    g.add_argument("--local", action="store_true", help="run every block in this process")
    g.add_argument("--initial-peers", nargs="+", default=[])
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids", type=_ids)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="cpu", help="where the head runs (and every block, with --local)")
    g.add_argument("--cache-dir")
    g.add_argument("--json", action="store_true", help="last stdout line: one JSON object with 'tokens'")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("dht", help="run a DHT-only bootstrap node; prints its multiaddrs")
    _add_node_args(d)
    d.set_defaults(fn=cmd_dht)

    s = sub.add_parser("serve", help="serve a range of blocks to the swarm")
    s.add_argument("--model", required=True, help="KNOT (or safetensors) path or URL")
    s.add_argument("--blocks", type=_blocks, required=True, help="START:END, e.g. 0:12")
    _add_node_args(s)
    s.add_argument("--announce-host", help="address other peers should dial, if not --host")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    s.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--public-name", default="")
    s.add_argument("--max-sessions", type=int, default=16)
    s.add_argument("--memory-budget-mb", type=float, help="cap on session-state memory")
    s.add_argument("--max-batch", type=int, default=8, help="decode steps batched together")
    s.add_argument("--graphs", choices=("auto", "off", "eager"), default="auto",
                   help="decode through CUDA graphs with sessions in a state pool: auto = on CUDA; eager = the "
                        "same pool and kernels without graph capture (debugging; on a CPU it needs TRITON_INTERPRET=1)")
    s.add_argument("--cache-dir", help="on-disk cache of fetched tensors")
    s.add_argument("--update-period", type=float, default=15.0, help="seconds between DHT refreshes")
    s.add_argument("--allow-full-download", action="store_true", help="accept servers without Range support")
    s.add_argument("--corrupt-outputs", type=float, default=0.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_serve)

    dm = sub.add_parser("demo", help="a whole swarm on this machine, offline, with a peer killed mid-generation")
    dm.add_argument("--workdir", help="where to write the model (default: a new temporary folder)")
    dm.add_argument("--max-new-tokens", type=int, default=48)
    dm.set_defaults(fn=lambda a: __import__("swarm.demo", fromlist=["run_demo"]).run_demo(a.workdir,
                                                                                          a.max_new_tokens))
    from swarm.health.cli import add_parser as add_health_parser
    add_health_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args) or 0
    except SwarmError as e:
        print(f"swarm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
