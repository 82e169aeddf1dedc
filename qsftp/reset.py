"""Stateless reset (RFC 9000 §10.3): a restarted server tells clients at once that their
connection is gone, instead of leaving them to notice at their idle timeout.

aioquic 1.7.2 neither sends stateless resets nor recognises them, and it draws every reset
token at random, so a restarted server could not compute the token of a connection it no longer
remembers. QSFTP therefore:

- derives each token from the connection ID with a keyed hash (:class:`StatelessReset`),
  keyed from the server's private key: stable across restarts and shared by ``--workers``
  processes, secret to anyone without the key;
- on the server, answers a short-header packet for an unknown connection ID with a stateless
  reset (smaller than the packet that caused it, so two endpoints cannot loop, and at most
  :data:`RESETS_PER_SECOND` a second);
- on the client, compares the tail of every short-header datagram with the reset tokens the
  server gave for its connection IDs (:func:`is_stateless_reset`); a match ends the connection
  with a clear error, and a resumable transfer reconnects.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import LocalFileError

__all__ = [
    "MIN_RESET_SIZE",
    "RESETS_PER_SECOND",
    "TOKEN_SIZE",
    "StatelessReset",
    "is_stateless_reset",
]

logger = logging.getLogger(__name__)

TOKEN_SIZE = 16
# Five bytes of "unpredictable bits" after the first byte, then the token (RFC 9000 §10.3:
# an endpoint must treat datagrams of at least 21 bytes as possible resets).
MIN_RESET_SIZE = 21
# A reset is smaller than the packet that caused it; this caps its size anyway.
_MAX_RESET_SIZE = 43
# Resets sent per second at most: an attacker spraying junk at the port gets a trickle back.
RESETS_PER_SECOND = 100
_KEY_LABEL = b"qsftp/1 stateless reset key"


def _short_header(data: bytes) -> bool:
    # Header form bit 0 (short header), fixed bit 1.
    return len(data) >= MIN_RESET_SIZE and data[0] & 0xC0 == 0x40


class StatelessReset:
    """Reset tokens derived from a secret, and the resets a server sends."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
        self._window = 0
        self._sent = 0

    @classmethod
    def from_key_file(cls, keyfile: Path) -> StatelessReset:
        """Keyed from the server's private key file (its bytes never leave this object)."""
        try:
            return cls(keyfile.read_bytes())
        except OSError as exc:
            raise LocalFileError(f"cannot read key {keyfile}: {exc.strerror}") from exc

    def token(self, cid: bytes) -> bytes:
        """The stateless reset token of connection ID ``cid``."""
        return hmac.new(self._key, cid, hashlib.sha256).digest()[:TOKEN_SIZE]

    def adopt(self, quic: Any) -> None:
        """Give a new aioquic server connection derived tokens instead of random ones.

        Its first connection ID's token goes out in the transport parameters during the
        handshake and later ones in NEW_CONNECTION_ID frames, both after this runs; aioquic
        draws a token for each ID it adds in ``_replenish_connection_ids``, so that method is
        wrapped to replace them (aioquic 1.x internals, kept in this one place).
        """
        replenish = quic._replenish_connection_ids

        def derive() -> None:
            for connection_id in quic._host_cids:
                connection_id.stateless_reset_token = self.token(connection_id.cid)

        def replenish_derived() -> None:
            replenish()
            derive()

        derive()
        quic._replenish_connection_ids = replenish_derived

    def packet_for(self, datagram: bytes, cid_length: int) -> bytes | None:
        """The stateless reset answering ``datagram`` (a packet for a connection this server
        does not know), or None when none may be sent: not a short-header packet, too small
        to answer with a smaller one, or over the rate limit."""
        if not _short_header(datagram) or len(datagram) <= MIN_RESET_SIZE:
            return None
        now = int(time.monotonic())
        if now != self._window:
            self._window, self._sent = now, 0
        if self._sent >= RESETS_PER_SECOND:
            return None
        self._sent += 1
        size = min(len(datagram) - 1, _MAX_RESET_SIZE)
        cid = datagram[1 : 1 + cid_length]
        # Short-header form with random bits, so the reset looks like any other packet.
        head = bytes([0x40 | (os.urandom(1)[0] & 0x3F)]) + os.urandom(size - TOKEN_SIZE - 1)
        return head + self.token(cid)


def is_stateless_reset(datagram: bytes, tokens: Iterable[bytes | None]) -> bool:
    """True if ``datagram`` ends with one of ``tokens`` (compared in constant time)."""
    if not _short_header(datagram):
        return False
    tail = datagram[-TOKEN_SIZE:]
    found = False
    for token in tokens:
        if token is not None and len(token) == TOKEN_SIZE:
            found |= hmac.compare_digest(tail, token)
    return found
