"""PeerConfig: everything `swarm serve` can be told, one field each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerConfig:
    model: str  # KNOT path or URL (also published in the model record for clients)
    start: int  # first block served
    end: int  # one past the last block served
    host: str = "127.0.0.1"  # listen address of the libp2p daemon
    port: int = 0  # 0 = any free port
    announce_host: str | None = None  # address others should dial, if not `host`
    initial_peers: tuple[str, ...] = ()  # multiaddrs; empty = start a new swarm
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str | None = None  # float32 | float16 | bfloat16; None keeps the file's dtype
    identity: str | None = None  # private key file (created if missing): a stable peer ID
    public_name: str = ""  # shown on the dashboard
    max_sessions: int = 16  # concurrent sessions; beyond that, "busy"
    memory_budget_mb: float | None = None  # session-state memory cap; None = max_sessions' worth
    cache_dir: str | None = None  # on-disk cache of fetched tensors
    update_period: float = 15.0  # seconds between DHT refreshes; records expire after 3 periods
    session_idle_timeout: float = 300.0  # an idle session is dropped after this many seconds
    max_batch: int = 8  # decode steps of several sessions run together, up to this many
    max_step_tokens: int = 4096  # largest T a step may carry
    allow_full_download: bool = False  # accept a server without Range support (reads the whole file)
    graphs: str = "auto"  # auto: GraphDecoder (state pool + CUDA graphs) on CUDA | off | eager: pool, no capture
    corrupt_outputs: float = 0.0  # TESTING ONLY (hidden flag): add noise of this size to every output

    @property
    def expiration(self) -> float:
        return 3 * self.update_period
