"""swarm: peer-to-peer inference for Mamba-1 language models."""

__version__ = "0.1.0"
