"""Mamba-1 model code: config, blocks over a LayerState, the client head. No I/O, no networking."""

from swarm.model.block import LayerState, MambaBlock
from swarm.model.config import MambaConfig
from swarm.model.stack import BlockStack, Head

__all__ = ["BlockStack", "Head", "LayerState", "MambaBlock", "MambaConfig"]
