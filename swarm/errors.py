"""Every error swarm raises on purpose: one class per thing a user or a caller can act on."""

from __future__ import annotations


class SwarmError(Exception):
    """Base class: its message is one line a user can act on."""


class KnotFormatError(SwarmError):
    """A KNOT (or safetensors) file is malformed: bad magic, header, table of contents or tensor bytes."""


class ChecksumMismatch(KnotFormatError):
    """A tensor's bytes do not match the checksum in the table of contents."""


class UnknownTensor(SwarmError):
    """A tensor was asked for that the file does not hold."""


class FetchError(SwarmError):
    """Fetching bytes from a path or URL failed (404, connection refused, short read, ...)."""


class RangeNotSupported(FetchError):
    """The HTTP server ignored our Range header and would send the whole file."""


class ConfigError(SwarmError):
    """A model config the model code cannot run, or a block range outside the model."""


class ProtocolError(SwarmError):
    """A malformed RPC message or DHT record."""


class ProtocolMismatch(ProtocolError):
    """The other side speaks a protocol version we do not."""


class PeerUnavailable(SwarmError):
    """A peer failed, timed out or refused a step."""


class DishonestPeer(PeerUnavailable):
    """A peer's output disagreed with other peers' for the same step from the same state."""


class PeerBusy(PeerUnavailable):
    """A peer has no free session slot or memory."""


class NoRoute(SwarmError):
    """No chain of peers covers every block."""


class BackendUnavailable(SwarmError):
    """A compute backend (cuda, triton) was asked for and is not available."""
