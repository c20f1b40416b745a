"""The client: routing, inference sessions, failover, generation and sampling, tokenizer.

    from swarm.client import SwarmClient
    client = SwarmClient(initial_peers=[maddr])
    new_ids = client.generate("Hello", max_new_tokens=32)
"""

from swarm.client.local import LocalModel
from swarm.client.swarm_client import ClientConfig, SwarmClient

__all__ = ["ClientConfig", "LocalModel", "SwarmClient"]
