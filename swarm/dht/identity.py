"""The peer's identity key file, and the owner-signed subkeys that bind a DHT record to a peer id.

The file is a libp2p PrivateKey protobuf holding an RSA key (the format hivemind's p2pd reads with `-id`), so one
key gives both the peer id (sha256 multihash of the public key) and the signature on the peer's DHT records.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import stat
from typing import Any

from swarm.dht.records import PeerId
from swarm.errors import SwarmError

log = logging.getLogger(__name__)

# "<base58 peer id>[owner:<ssh-rsa key>]": hivemind's RSASignatureValidator finds the marker inside the subkey
_SUBKEY_RE = re.compile(r"([1-9A-HJ-NP-Za-km-z]{1,128})(\[owner:.+?\])", re.S)


def generate_identity(path: str) -> None:
    """Write a fresh RSA identity to `path`, created with mode 0600 (never readable by others, not even briefly)."""
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey
    key = RSAPrivateKey()
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        raise SwarmError(f"cannot create identity file {path}: its directory does not exist") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # whatever the umask was
    log.info("generated a new identity in %s", path)


def load_identity(path: str) -> Any:
    """The RSAPrivateKey in the identity file at `path`, generated first if the file is missing.

    Warns when the file is readable or writable by anyone but its owner.
    """
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey
    if not os.path.exists(path):
        generate_identity(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("identity file %s has mode %o: anyone who reads it can act as this peer (chmod 600 %s)",
                    path, mode, path)
    try:
        with open(path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError(f"key type {proto.key_type} is not RSA")
        der = serialization.load_der_private_key(proto.data, password=None)
        der_bytes = der.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
    except Exception as e:  # protobuf and cryptography raise their own types on a corrupt file
        raise SwarmError(f"identity file {path} does not hold an RSA libp2p private key ({e}); move it away to have "
                         f"a new one generated") from None
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der_bytes})  # hivemind's own unpickling path: no fresh key generated
    return key


def signed_subkey(peer_id: str, owner_marker: bytes) -> str:
    """The subkey a peer stores its records under: its id, then its validator's `[owner:...]` marker (ASCII).

    A str, like every other subkey: hivemind's storage orders subkeys of equal expiration, and str < bytes raises.
    """
    return peer_id + owner_marker.decode("ascii")


@functools.lru_cache(maxsize=4096)
def owner_of_subkey(subkey: Any) -> PeerId | None:
    """The peer id of a signed subkey, or None unless the subkey parses and its key hashes to that peer id.

    hivemind has already checked the signature against the marker's key; this checks the key is the peer's own,
    so nobody can sign a record for someone else's peer id with their own key.
    """
    m = _SUBKEY_RE.fullmatch(subkey) if isinstance(subkey, str) else None
    if m is None:
        return None
    peer = m.group(1)
    return PeerId(peer) if _peer_id_of_marker(m.group(2)) == peer else None


def _peer_id_of_marker(marker: str) -> str | None:
    """The base58 libp2p peer id of the RSA key in an `[owner:ssh-rsa ...]` marker; None if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPublicKey
    try:
        pub = RSAPublicKey.from_bytes(marker[len("[owner:"):-1].encode())._public_key
        spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # cryptography raises several types on junk
        return None
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=spki).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(proto).digest()).to_base58()
