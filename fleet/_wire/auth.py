"""The data plane's handshake: mutual proof of the instance secret, no I/O here.

The secret never crosses a socket. Each side sends a fresh nonce; each proves it holds
the secret with an HMAC over both nonces, labelled by its role so that one side's proof
can never be replayed as the other's::

    caller -> server   AUTH  MAGIC + caller_nonce
    server -> caller   AUTH  server_nonce + HMAC(secret, b"server" + caller_nonce + server_nonce)
    caller -> server   AUTH  HMAC(secret, b"caller" + caller_nonce + server_nonce)

The caller checks the server's proof before it sends anything else (its calls wait
until then), and the server unpickles nothing before the caller's proof matched. On
Unix sockets both sides also check that the peer runs as the same user (SO_PEERCRED).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from typing import Any

MAGIC = b"fleet-auth-1"
NONCE_SIZE = 32
_MAC_SIZE = 32


def _mac(secret: bytes, label: bytes, caller_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, label + caller_nonce + server_nonce, hashlib.sha256).digest()


def hello() -> tuple[bytes, bytes]:
    """The caller's nonce and its first AUTH payload."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce, MAGIC + nonce


def server_reply(secret: bytes, payload: bytes) -> tuple[bytes, bytes, bytes] | None:
    """For a caller's hello: (caller_nonce, server_nonce, reply payload); None when the
    hello is malformed."""
    if len(payload) != len(MAGIC) + NONCE_SIZE or not payload.startswith(MAGIC):
        return None
    caller_nonce = bytes(payload[len(MAGIC):])
    server_nonce = os.urandom(NONCE_SIZE)
    return caller_nonce, server_nonce, \
        server_nonce + _mac(secret, b"server", caller_nonce, server_nonce)


def caller_proof(secret: bytes, caller_nonce: bytes, payload: bytes) -> bytes | None:
    """Check the server's reply; the caller's proof when it holds, else None."""
    if len(payload) != NONCE_SIZE + _MAC_SIZE:
        return None
    server_nonce, mac = bytes(payload[:NONCE_SIZE]), bytes(payload[NONCE_SIZE:])
    if not hmac.compare_digest(mac, _mac(secret, b"server", caller_nonce, server_nonce)):
        return None
    return _mac(secret, b"caller", caller_nonce, server_nonce)


def check_caller(secret: bytes, caller_nonce: bytes, server_nonce: bytes,
                 payload: bytes) -> bool:
    """Whether the caller's proof matches (constant time)."""
    return hmac.compare_digest(bytes(payload),
                               _mac(secret, b"caller", caller_nonce, server_nonce))


_CREDS = struct.Struct("3i")


def foreign_peer(transport: Any) -> str | None:
    """Why the peer of a Unix-socket transport is refused (it runs as another user), or
    None. TCP peers and platforms without SO_PEERCRED rely on the handshake alone."""
    peer_cred = getattr(socket, "SO_PEERCRED", None)
    sock = transport.get_extra_info("socket")
    if peer_cred is None or sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, _gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, peer_cred,
                                                       _CREDS.size))
    except OSError as exc:
        return f"its credentials could not be read ({exc})"
    if uid != os.getuid():
        return f"it runs as uid {uid} (pid {pid}), not as this user (uid {os.getuid()})"
    return None
