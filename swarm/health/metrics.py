"""Prometheus text exposition (format 0.0.4) of a dashboard snapshot. Pure logic, no I/O."""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_metrics(snapshot: dict[str, Any]) -> str:
    """Every metric of docs/HEALTH_API.md as Prometheus text; label values escaped, missing numbers skipped."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{label_text}}} {_value(value)}" if label_text else f"{name} {_value(value)}")

    crawl, dropped = snapshot["crawl"], snapshot["dropped_records"]
    models = snapshot["models"]
    metric("swarm_health_peers", "gauge", "Peers listed in the DHT by announced state (gone: records expired).",
           [({"state": s}, n) for s, n in sorted(snapshot["peer_states"].items())])
    metric("swarm_health_peers_reachable", "gauge", "Peers that answered the last crawl's info RPC.",
           [({}, sum(1 for p in snapshot["peers"] if p["reachable"] is True))])
    metric("swarm_health_model_healthy", "gauge", "1 if every block of the model has an ONLINE peer.",
           [({"model": m["name"]}, int(m["state"] == "healthy")) for m in models])
    metric("swarm_health_model_blocks", "gauge", "Blocks in the model.",
           [({"model": m["name"]}, m["num_blocks"]) for m in models])
    metric("swarm_health_model_blocks_covered", "gauge", "Blocks served by at least one ONLINE peer.",
           [({"model": m["name"]}, m["blocks_covered"]) for m in models])
    metric("swarm_health_model_min_coverage", "gauge", "Fewest ONLINE peers serving any one block.",
           [({"model": m["name"]}, m["min_coverage"]) for m in models])
    metric("swarm_health_model_throughput_tokens_per_second", "gauge",
           "Announced decode throughput of the model's bottleneck block (batch 1).",
           [({"model": m["name"]}, m["throughput"]) for m in models])
    metric("swarm_health_crawl_duration_seconds", "gauge", "Duration of the last crawl.",
           [({}, crawl["duration_s"])])
    metric("swarm_health_last_crawl_timestamp_seconds", "gauge", "Unix time the last crawl started.",
           [({}, crawl["started_at"])])
    metric("swarm_health_crawls_total", "counter", "Crawls finished since start.", [({}, crawl["count"])])
    metric("swarm_health_crawl_errors_total", "counter", "Crawls that failed since start.", [({}, crawl["errors"])])
    metric("swarm_health_dropped_records_total", "counter",
           "Malformed or hostile DHT records ignored, summed over every crawl.", [({}, dropped["total"])])
    metric("swarm_health_last_crawl_dropped_records", "gauge",
           "Malformed or hostile DHT records ignored by the last crawl.", [({}, dropped["last_crawl"])])
    return "\n".join(out) + "\n"


def _escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: int | float) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))
