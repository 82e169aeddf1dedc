"""A UDP endpoint that reads datagrams in batches, on any asyncio event loop.

asyncio's own datagram transport reads one datagram per loop iteration and aioquic transmits
after every datagram it receives: per packet, a full pass through the loop plus one
``transmit()`` (building ACKs, re-arming timers) — about a third of a receiver's CPU. This
endpoint drains the socket (up to :data:`MAX_BATCH` datagrams per wake-up), hands each to
``receive``, and calls ``after_batch`` once, where the QUIC glue transmits.

It quacks like an ``asyncio.DatagramTransport`` as far as aioquic uses one (``sendto``,
``get_extra_info``, ``close``), so aioquic's protocol and server classes sit on it unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_BATCH", "SOCKET_BUFFER", "DatagramEndpoint", "tune_socket"]

logger = logging.getLogger(__name__)

# Datagrams read per wake-up before ACKs are sent: enough to amortise the loop and transmit
# costs (a batch is ~100 µs of aioquic work per datagram), few enough that ACKs stay timely.
MAX_BATCH = 64
# Kernel socket buffers asked for: the default (~208 KiB) drops datagrams at loopback rates
# while the receiver is busy in Python. Linux caps the request at net.core.[rw]mem_max.
SOCKET_BUFFER = 4 * 1024 * 1024
# Largest datagram we accept: the UDP maximum, so nothing is ever truncated.
_RECV_SIZE = 65535
# Datagrams kept while the socket's send buffer is full, before we drop (QUIC recovers).
_MAX_BACKLOG = 1024


def tune_socket(sock: socket.socket) -> None:
    """Ask for SOCKET_BUFFER-sized kernel buffers (best effort) and make ``sock`` non-blocking."""
    sock.setblocking(False)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError as exc:  # pragma: no cover - platform refusal
            logger.debug("cannot set socket buffer: %s", exc)


class DatagramEndpoint:
    """Owns a UDP socket; calls ``receive(data, addr)`` per datagram and ``after_batch()``."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        receive: Callable[[bytes, Any], None],
        after_batch: Callable[[], None],
        error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._receive = receive
        self._after_batch = after_batch
        self._error = error
        self._backlog: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._closed = False
        try:
            self._peer: Any = sock.getpeername()  # a connected (client) socket
        except OSError:
            self._peer = None
        self.dropped = 0
        "Datagrams dropped because the send buffer stayed full."
        tune_socket(sock)
        self._loop.add_reader(self._fd, self._read_ready)

    # --- the asyncio.DatagramTransport subset aioquic uses ----------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._sock.getsockname()
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._peer if self._peer is not None else default
        return default

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._closed:
            return
        if not self._backlog:
            try:
                self._send(data, addr)
                return
            except BlockingIOError:
                self._loop.add_writer(self._fd, self._write_ready)
            except OSError as exc:
                self._report(exc)
                return
        if len(self._backlog) >= _MAX_BACKLOG:
            self.dropped += 1
            return
        self._backlog.append((data, addr))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._backlog.clear()
        self._sock.close()

    def is_closing(self) -> bool:
        return self._closed

    # --- internals --------------------------------------------------------------------------

    def _send(self, data: bytes, addr: Any) -> None:
        if self._peer is not None or addr is None:
            self._sock.send(data)  # connected (client) socket: the address is implied
        else:
            self._sock.sendto(data, addr)

    def _read_ready(self) -> None:
        sock = self._sock
        receive = self._receive
        for _ in range(MAX_BATCH):
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._report(exc)
                break
            receive(data, addr)
            if self._closed:
                return
        self._after_batch()

    def _write_ready(self) -> None:
        while self._backlog:
            data, addr = self._backlog[0]
            try:
                self._send(data, addr)
            except BlockingIOError:
                return
            except OSError as exc:
                self._backlog.popleft()
                self._report(exc)
                continue
            self._backlog.popleft()
        self._loop.remove_writer(self._fd)

    def _report(self, exc: OSError) -> None:
        if exc.errno in (errno.EMSGSIZE,):
            logger.warning("datagram too large for the path: %s", exc)
        if self._error is not None:
            self._error(exc)
