"""The asyncio glue: QUIC events in, qsftp/1 events out, futures resolved, timeouts owned.

This is the only module that touches aioquic's asyncio layer. :class:`QsftpProtocol` feeds
each QUIC stream event into the sans-I/O :class:`~qsftp.protocol.QsftpConnection`, writes what
that queues back into QUIC, and routes every operation's events to a :class:`Channel` that one
coroutine (a client call or a server handler) consumes. The QUIC connection under it comes
from an :class:`~qsftp.engine.Engine` (aioquic, or qh3): everything library-specific, private
details included, goes through ``self.engine``; :meth:`Engine.protocol_class` binds a
protocol class to an engine.

What does not depend on QUIC (the protocol state, channels, dispatch, send backpressure) lives
in :class:`SessionBase`, which :mod:`qsftp.tcp` reuses to carry the same operations over one
TLS-over-TCP connection; the client and server logic are mixins over that base.

aioquic gives no backpressure in either direction (its stream writer's ``drain()`` never
blocks, and it raises flow-control credit as bytes arrive, not as they are used), so this module
bounds both itself:

- sending: :meth:`SessionBase.wait_writable` waits until the stream's unacknowledged bytes
  in aioquic's send buffer fall below :data:`SEND_HIGH_WATER`; it is woken after every batch
  of received datagrams (that is when acknowledgements free the buffer);
- receiving: flow-control credit is granted as the application *consumes* bytes
  (:meth:`QsftpProtocol.consumed`), never more than :data:`RECEIVE_WINDOW` ahead of it,
  instead of aioquic's rule of doubling the window as bytes merely arrive.

With qh3 the send bound counts bytes not yet sent once (in-flight bytes are bounded by the
congestion window), and the receive bound does not exist: qh3 raises credit as data is
delivered, and offers no hook to tie it to consumption (docs/QH3-ENGINE.md).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import hashlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, TypeVar

from aioquic.asyncio.protocol import QuicConnectionProtocol

from .engine import AIOQUIC, Engine
from .errors import (
    Cancelled,
    ErrorCode,
    LocalFileError,
    QsftpError,
    RemoteProtocolError,
    TransportError,
    error_for_code,
)
from .protocol import (
    DataReceived,
    Event,
    OperationFailed,
    ProtocolViolation,
    QsftpConnection,
    Role,
    StreamAborted,
)
from .reset import is_stateless_reset

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_DATAGRAM_SIZE",
    "LOOPBACK_DATAGRAM_SIZE",
    "IDLE_TIMEOUT",
    "INLINE_READ_MAX",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "READ_BLOCK",
    "RECEIVE_WINDOW",
    "SEND_HIGH_WATER",
    "Channel",
    "NoHash",
    "QlogWriter",
    "QsftpProtocol",
    "QuicStats",
    "SessionBase",
    "consume_result",
    "datagram_size_for",
    "is_loopback",
    "limit_heap_growth",
    "cpu_time",
    "event_error",
    "loop_name",
    "run",
    "receive_body",
    "send_body",
    "transmit_batch",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# DATA frame payload size when the caller does not choose: large enough that framing and the
# per-call cost of handing bytes to QUIC are negligible, small enough to keep latency low.
DEFAULT_CHUNK_SIZE = 64 * 1024
# Chunk sizes outside this range only measure overhead, or exceed the codec's DATA limit.
MIN_CHUNK_SIZE = 1
MAX_CHUNK_SIZE = 16 * 1024 * 1024
# Bytes read from (or written to) disk per call in the worker thread: big enough that the
# thread hop (~30 µs) is amortised, small enough to bound memory per transfer.
READ_BLOCK = 1024 * 1024
# Bodies up to this size are read and hashed on the event loop instead of in a worker thread:
# from the page cache that takes a few µs, less than the hop to a thread and back costs the
# loop (submit, wake-up, future callbacks), which was a visible share of a burst of 4 KiB
# uploads. A cold read of 64 KiB holds the loop for one disk read, as opening the file does.
INLINE_READ_MAX = 64 * 1024
# Most bytes queued in aioquic's send buffer for one stream before the sender waits for
# acknowledgements. aioquic never pushes back itself; 1 MiB covers the bandwidth-delay product
# of loopback and of a 100 Mbit/s, 80 ms path while bounding memory per stream.
SEND_HIGH_WATER = 1024 * 1024
# Flow-control credit granted beyond what the application has consumed on a stream: this is
# what bounds the receiver's memory when the disk (or the handler) is slower than the network.
# It is the connection's max_stream_data (the receive_window option of connect and serve).
RECEIVE_WINDOW = 2 * 1024 * 1024
# QUIC datagram sizes. There is no path-MTU discovery in aioquic, so on a real network the
# default is QUIC's minimum, which every path must carry (1452 suits a known 1500-byte-MTU path).
# Loopback carries 64 KiB datagrams; 16384 stays below aioquic's 16414-byte ceiling (its STREAM
# frame length is a 2-byte varint) and is ~7x faster there, as Python's cost is per packet.
DEFAULT_DATAGRAM_SIZE = 1200
LOOPBACK_DATAGRAM_SIZE = 16384
# Every network wait is bounded: an operation that makes no progress for this long fails.
IDLE_TIMEOUT = 60.0
# Allocations at least this large get their own mapping, returned to the system when freed
# (glibc's mallopt M_MMAP_THRESHOLD; see limit_heap_growth).
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> constant


@dataclass(frozen=True, slots=True, kw_only=True)
class QuicStats:
    """A snapshot of one connection's transport figures."""

    packets_sent: int
    "QUIC packets sent so far (all packet number spaces)."
    packets_lost: int
    "Packets the loss detector declared lost so far."
    smoothed_rtt_ms: float
    "Smoothed round-trip time estimate, ms."
    min_rtt_ms: float
    "Smallest RTT sample, ms (0 before the first sample)."
    congestion_window: int
    "Congestion window, bytes."


class Channel:
    """The events of one operation stream, for the one coroutine that handles it."""

    def __init__(self, protocol: SessionBase, stream_id: int) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        self._events: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.error: QsftpError | None = None

    def push(self, event: Event) -> None:
        self._events.append(event)
        self._wake()

    def fail(self, error: QsftpError) -> None:
        """Make every later wait on this channel raise ``error``."""
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def pending(self) -> bool:
        """True when an event is ready without waiting."""
        return bool(self._events)

    def check(self) -> None:
        """Raise if the operation already failed (an ERROR, reset or lost connection)."""
        if self._events and not isinstance(self._events[0], DataReceived):
            event = self._events[0]
            if isinstance(event, OperationFailed | StreamAborted | ProtocolViolation):
                self._events.popleft()
                raise event_error(event)
        if self.error is not None:
            raise self.error

    async def next_event(self, timeout: float = IDLE_TIMEOUT) -> Event:
        """The next event; raises the channel's error, or TransportError after ``timeout``."""
        while not self._events:
            if self.error is not None:
                raise self.error
            self._waiter = self.protocol.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise TransportError(f"no progress for {timeout:.0f} s") from None
            finally:
                self._waiter = None
        return self._events.popleft()

    def take_data(self, first: bytes, limit: int) -> tuple[list[bytes], int]:
        """``first`` plus the data events queued right behind it, up to ``limit`` bytes."""
        parts, total = [first], len(first)
        events = self._events
        while events and total < limit:
            event = events[0]
            if not isinstance(event, DataReceived):
                break
            events.popleft()
            parts.append(event.data)
            total += len(event.data)
        return parts, total


def event_error(event: Event) -> QsftpError:
    """The exception an operation raises when ``event`` ends it unsuccessfully."""
    if isinstance(event, OperationFailed):
        return error_for_code(event.code, event.message)
    if isinstance(event, StreamAborted):
        return Cancelled(f"the peer aborted the operation (code {event.error_code})")
    if isinstance(event, ProtocolViolation):
        return RemoteProtocolError(event.message)
    return RemoteProtocolError(f"unexpected {type(event).__name__}")


class SessionBase:
    """What every qsftp/1 connection has, whatever carries it: the protocol state, the
    channels of the running operations, event dispatch and send backpressure.

    A transport class (:class:`QsftpProtocol` for QUIC, :class:`qsftp.tcp.TcpSession` for TCP)
    supplies the methods below that raise NotImplementedError; the client and server logic
    (``qsftp.client.ClientSession``, ``qsftp.server.ServerSession``) are mixins on top.
    """

    role: Role = Role.CLIENT
    loop: asyncio.AbstractEventLoop
    qsftp: QsftpConnection
    channels: dict[int, Channel]
    terminated: Any
    "Why the connection ended: the QUIC library's ConnectionTerminated event (TCP makes one)."
    transport_error: OSError | None
    receive_window: int
    _writers: dict[int, asyncio.Future[None]]
    _unconsumed: dict[int, int]  # DATA bytes handed to a channel, not yet used

    def _init_session(self, receive_window: int) -> None:
        self.receive_window = receive_window
        self.loop = asyncio.get_running_loop()
        self.qsftp = QsftpConnection(self.role)
        self.channels = {}
        self.terminated = None
        self.transport_error = None
        self._writers = {}
        self._unconsumed = {}

    # --- what a transport provides ----------------------------------------------------------

    def flush(self) -> None:
        """Hand what the protocol queued to the transport."""
        raise NotImplementedError

    def buffered(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` this side holds that the peer has not taken yet."""
        raise NotImplementedError

    def consumed(self, stream_id: int, count: int) -> None:
        """The application has taken ``count`` more DATA bytes of ``stream_id``: grant credit."""
        raise NotImplementedError

    def stats(self) -> QuicStats:
        """Transport figures of this connection so far."""
        raise NotImplementedError

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Close the whole connection with an application error code."""
        raise NotImplementedError

    def next_stream_id(self) -> int:
        """Client: the id of the next operation stream."""
        raise NotImplementedError

    def abort_stream(self, stream_id: int) -> None:
        """Reset ``stream_id`` both ways (code CANCELLED)."""
        raise NotImplementedError

    def stop_receiving(self, stream_id: int) -> None:
        """Ask the peer to stop sending on ``stream_id`` (STOP_SENDING, code CANCELLED)."""
        raise NotImplementedError

    def receive_finished(self, stream_id: int) -> bool:
        """True when the peer's half of ``stream_id`` has ended (or the stream is gone)."""
        raise NotImplementedError

    def peer_certificate(self) -> Any:
        """The peer's certificate as seen in the handshake (client side), or None."""
        raise NotImplementedError

    # --- sending ----------------------------------------------------------------------------

    async def wait_writable(self, channel: Channel) -> None:
        """Wait until ``channel``'s stream has room below SEND_HIGH_WATER."""
        stream_id = channel.stream_id
        while self.buffered(stream_id) >= SEND_HIGH_WATER:
            channel.check()
            waiter = self._writers[stream_id] = self.loop.create_future()
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    await waiter
            except TimeoutError:
                raise TransportError(f"no acknowledgement for {IDLE_TIMEOUT:.0f} s") from None
            finally:
                self._writers.pop(stream_id, None)
        channel.check()

    def _wake_writers(self) -> None:
        for stream_id, waiter in list(self._writers.items()):
            if waiter.done():
                continue
            channel = self.channels.get(stream_id)
            failed = channel is None or channel.error is not None or channel.pending()
            if failed or self.buffered(stream_id) < SEND_HIGH_WATER // 2:
                waiter.set_result(None)

    # --- receiving --------------------------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            channel = self.channels.get(stream_id) if stream_id is not None else None
            if channel is not None:
                if isinstance(event, DataReceived):
                    self._unconsumed[channel.stream_id] = self._unconsumed.get(
                        channel.stream_id, 0
                    ) + len(event.data)
                channel.push(event)
            else:
                self.handle_event(event)

    def handle_event(self, event: Event) -> None:
        """An event no channel claimed (session events, new requests). Overridden."""
        logger.debug("ignored %r", event)

    def _connection_lost(self, event: Any) -> None:
        self.terminated = event
        error = TransportError(self.termination_text())
        for channel in self.channels.values():
            channel.fail(error)
        for waiter in self._writers.values():
            if not waiter.done():
                waiter.set_result(None)

    def termination_text(self) -> str:
        """Why the connection ended, for humans."""
        if self.transport_error is not None:
            return f"connection failed: {self.transport_error.strerror or self.transport_error}"
        event = self.terminated
        if event is None:
            return "connection closed"
        reason = f": {event.reason_phrase}" if event.reason_phrase else ""
        return f"connection closed (code {event.error_code}){reason}"

    # --- channels ---------------------------------------------------------------------------

    def open_channel(self, stream_id: int) -> Channel:
        channel = self.channels[stream_id] = Channel(self, stream_id)
        if self.terminated is not None:
            channel.fail(TransportError(self.termination_text()))
        return channel

    def close_channel(self, channel: Channel, *, abort: bool = False) -> None:
        """Forget ``channel``; with ``abort``, reset the stream both ways (code CANCELLED)."""
        stream_id = channel.stream_id
        self.channels.pop(stream_id, None)
        self._unconsumed.pop(stream_id, None)
        if abort and self.terminated is None:
            self.qsftp.reset_stream(stream_id)
            self.abort_stream(stream_id)


class QsftpProtocol(QuicConnectionProtocol, SessionBase):
    """One QUIC connection speaking qsftp/1. Subclassed by the client and server glue.

    It derives from aioquic's asyncio protocol for its bookkeeping (``connect``,
    ``wait_connected``, ``close``, the timer and transmit handles), which drives the
    connection only through the public API aioquic and qh3 share; event classes and private
    details come from :attr:`engine`.
    """

    engine: ClassVar[Engine] = AIOQUIC
    "The QUIC library of this class's connections (Engine.protocol_class binds another)."

    def __init__(
        self,
        quic: Any,
        stream_handler: Any = None,
        *,
        batch: set[QsftpProtocol] | None = None,
    ) -> None:
        super().__init__(quic, stream_handler)
        self._init_session(quic.configuration.max_stream_data)
        self.batch = batch
        self.packets_lost = 0
        "Packets declared lost (kept up to date by the engine)."
        self.datagrams_sent = 0
        "Datagrams handed to the socket (after the handshake, one packet each)."
        self.min_rtt = 0.0
        "Smallest RTT sample seen, s, where the engine samples it (0: none)."
        self.last_smoothed_rtt = 0.0
        self._events = self.engine.events
        self._observe_transmit = self.engine.observes_transmit
        self._receive_ended: set[int] = set()  # streams whose peer sent FIN or RESET_STREAM
        self._instrument(quic)

    # --- QUIC library internals we adjust (in the engine; documented there) ----------------

    def _instrument(self, quic: Any) -> None:
        """Let the engine adjust the new connection (counters, the receive-credit rule)."""
        self.engine.instrument(self)

    def consumed(self, stream_id: int, count: int) -> None:
        """The application has taken ``count`` more DATA bytes of ``stream_id``: grant credit."""
        self._unconsumed[stream_id] = self._unconsumed.get(stream_id, 0) - count
        self._grant(stream_id)

    def _grant(self, stream_id: int) -> None:
        if self.engine.raise_credit(self, stream_id, self._unconsumed.get(stream_id, 0)):
            self._transmit_soon()

    def stats(self) -> QuicStats:
        """Transport figures of this connection so far."""
        return QuicStats(**self.engine.stats(self))

    def discard(self) -> None:
        """Stop this connection's timer: the caller closes the socket without waiting for
        aioquic's closing period, and nothing may fire on the connection afterwards."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_task is not None:
            self._transmit_task.cancel()
            self._transmit_task = None
        if self.terminated is None:
            self._connection_lost(
                self._events.ConnectionTerminated(
                    error_code=0, frame_type=None, reason_phrase="closed by this side"
                )
            )

    def abandon_connect_waiter(self) -> None:
        """After a timed-out ``wait_connected``: aioquic still fails its (shielded) waiter when
        the connection closes; mark that failure as seen so asyncio does not log it."""
        waiter = self._connected_waiter
        if waiter is not None:
            waiter.add_done_callback(consume_result)

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER) as seen in the handshake (client side), or None."""
        return self.engine.peer_certificate(self._quic)

    # --- sending ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand what the protocol queued to QUIC and schedule a transmit."""
        quic = self._quic
        for stream_id, data, end_stream in self.qsftp.data_to_send():
            try:
                quic.send_stream_data(stream_id, data, end_stream)
            except self.engine.stream_errors:
                # The peer reset the stream (STOP_SENDING) after we queued: the bytes have no
                # reader any more, and the operation learns of it through its channel.
                logger.debug("stream %d: dropped %d bytes after reset", stream_id, len(data))
        self._transmit_soon()

    def buffered(self, stream_id: int) -> int:
        """Bytes queued for ``stream_id`` in the QUIC library: not yet acknowledged (aioquic),
        not yet sent (qh3)."""
        return self.engine.send_buffered(self._quic, stream_id)

    # aioquic's asyncio layer reads the clock with loop.time(); uvloop's is cached per loop
    # iteration at 1 ms resolution, which on a sub-millisecond path turns every RTT sample
    # into 0 or 1 ms and upsets pacing and loss detection. time.monotonic() is the same clock
    # (CLOCK_MONOTONIC) at full resolution, so these three methods use it instead.

    def transmit(self) -> None:
        self._transmit_task = None
        quic, transport = self._quic, self._transport
        try:
            datagrams = quic.datagrams_to_send(now=time.monotonic())
        except self.engine.transmit_errors as exc:
            # qh3 raises out of its packet builder in rare states; the connection lives on
            # and its timer (re-armed below) retries.
            logger.warning("could not build packets: %s", exc)
            datagrams = []
        for data, addr in datagrams:
            transport.sendto(data, addr)  # type: ignore[union-attr]
        self.datagrams_sent += len(datagrams)
        if self._observe_transmit:
            self.engine.on_transmit(self)
        timer_at = quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self.loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        if self._writers:
            self._wake_writers()

    def _handle_timer(self) -> None:
        now = max(self._timer_at or 0.0, time.monotonic())
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=now)
        self._process_events()
        self.transmit()

    def _process_events(self) -> None:
        # aioquic's version tests aioquic's event classes; this one, the engine's.
        events = self._events
        quic = self._quic
        event = quic.next_event()
        while event is not None:
            if isinstance(event, events.ConnectionIdIssued):
                self._connection_id_issued_handler(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._connection_id_retired_handler(event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                self._connection_terminated_handler()
                waiter = self._connected_waiter
                if waiter is not None:
                    self._connected_waiter = None
                    waiter.set_exception(ConnectionError)
                self._closed.set()
            elif isinstance(event, events.HandshakeCompleted):
                self._connected = True
                waiter = self._connected_waiter
                if waiter is not None:
                    self._connected_waiter = None
                    waiter.set_result(None)
            self.quic_event_received(event)
            event = quic.next_event()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        if self.role is Role.CLIENT and is_stateless_reset(
            data, (self.engine.peer_reset_token(self._quic),)
        ):
            # The server no longer knows this connection (qsftp.reset): end it now rather
            # than at the idle timeout, so a resumable transfer reconnects at once.
            self._abort_connection("stateless reset from the server (restarted?)")
            return
        # Under a batching endpoint (qsftp.udp) the transmit waits for the end of the batch.
        self._quic.receive_datagram(data, addr, now=time.monotonic())
        self._process_events()
        if self.batch is None:
            self.transmit()
        else:
            self.batch.add(self)

    # --- receiving --------------------------------------------------------------------------

    def quic_event_received(self, event: Any) -> None:
        events = self._events
        try:
            if isinstance(event, events.StreamDataReceived):
                stream_id = event.stream_id
                self._dispatch(self.qsftp.receive(stream_id, event.data, event.end_stream))
                if event.end_stream and stream_id in self.channels:
                    self._receive_ended.add(stream_id)  # forgotten with the channel
                self._grant(stream_id)
            elif isinstance(event, events.StreamReset):
                self._dispatch(self.qsftp.stream_reset(event.stream_id, event.error_code))
                if event.stream_id in self.channels:
                    self._receive_ended.add(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                # A server stops our upload only after its ERROR, which is the answer the
                # client waits for; a client that stops a server's response abandons it.
                if self.role is Role.SERVER:
                    self._dispatch(self.qsftp.stream_reset(event.stream_id, event.error_code))
            elif isinstance(event, events.ConnectionTerminated):
                self._connection_lost(event)
        except RemoteProtocolError as exc:
            logger.warning("closing connection: %s", exc)
            self.close(error_code=ErrorCode.BAD_REQUEST, reason_phrase=str(exc))
            return
        self.flush()

    def error_received(self, exc: Exception) -> None:
        # A connected UDP socket reports ICMP errors (port unreachable → ECONNREFUSED) here:
        # fail at once instead of waiting for the handshake to time out.
        logger.debug("socket error: %s", exc)
        self.transport_error = exc if isinstance(exc, OSError) else OSError(str(exc))
        self._abort_connection(str(exc))

    def _abort_connection(self, reason: str) -> None:
        """End the connection at once, without a CONNECTION_CLOSE: the peer is gone."""
        self.engine.abort(self._quic, reason)
        self._process_events()

    # --- streams ----------------------------------------------------------------------------

    def next_stream_id(self) -> int:
        return self._quic.get_next_available_stream_id()

    def abort_stream(self, stream_id: int) -> None:
        self.engine.abort_stream(self._quic, stream_id, ErrorCode.CANCELLED)
        self._transmit_soon()

    def stop_receiving(self, stream_id: int) -> None:
        self.engine.stop_stream(self._quic, stream_id, ErrorCode.CANCELLED)

    def receive_finished(self, stream_id: int) -> bool:
        return self.engine.receive_finished(self, stream_id)

    def close_channel(self, channel: Channel, *, abort: bool = False) -> None:
        self._receive_ended.discard(channel.stream_id)
        super().close_channel(channel, abort=abort)


def transmit_batch(batch: set[QsftpProtocol]) -> None:
    """Transmit once for every connection that received datagrams in the batch just read."""
    while batch:
        batch.pop().transmit()


class NoHash:
    """Stands in for a hashlib object where the bytes sent need no digest of their own (the
    blocks of a striped upload, PUT_BLOCK): :meth:`digest` is 32 zero bytes."""

    def update(self, data: bytes | memoryview) -> None:
        """Ignore ``data``."""

    def digest(self) -> bytes:
        """32 zero bytes."""
        return bytes(32)


def _read_block(file: BinaryIO, hasher: Any, size: int) -> bytes:
    data = file.read(size)
    hasher.update(data)
    return data


async def send_body(
    protocol: SessionBase,
    channel: Channel,
    file: BinaryIO,
    size: int,
    chunk_size: int,
    *,
    progress: Callable[[int], None] | None = None,
    hasher: hashlib._Hash | NoHash | None = None,
) -> bytes:
    """Send exactly ``size`` bytes of ``file`` as DATA frames; return their SHA-256.

    Disk reads and hashing run in a worker thread, one block ahead of the network; a body of
    at most :data:`INLINE_READ_MAX` bytes is read and hashed at once on the loop. ``hasher``
    (a hashlib object) continues a hash of bytes that came before: the digest then covers both.
    """
    if hasher is None:
        hasher = hashlib.sha256()
    stream_id = channel.stream_id
    block_size = max(READ_BLOCK, chunk_size)  # a DATA frame never spans two reads
    remaining = size
    pending: asyncio.Future[bytes] | None = None
    if 0 < remaining <= INLINE_READ_MAX:
        pending = protocol.loop.create_future()
        pending.set_result(_read_block(file, hasher, remaining))
    elif remaining:
        pending = asyncio.ensure_future(
            asyncio.to_thread(_read_block, file, hasher, min(block_size, remaining))
        )
    try:
        while pending is not None:
            block = await pending
            pending = None
            if not block:
                raise LocalFileError("the file shrank while it was being sent")
            remaining -= len(block)
            if remaining:
                pending = asyncio.ensure_future(
                    asyncio.to_thread(_read_block, file, hasher, min(block_size, remaining))
                )
            view = memoryview(block)
            for offset in range(0, len(view), chunk_size):
                await protocol.wait_writable(channel)
                piece = view[offset : offset + chunk_size]
                protocol.qsftp.send_data(stream_id, piece)
                protocol.flush()
                if progress is not None:
                    progress(len(piece))
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    return hasher.digest()


async def receive_body(
    protocol: SessionBase,
    channel: Channel,
    write: Callable[[bytes], None],
    *,
    first: bytes,
    progress: Callable[[int], None] | None = None,
    executor: Executor | None = None,
) -> Event:
    """Write DATA bytes with ``write`` (in a worker thread of ``executor``, default the
    loop's) until a non-data event comes.

    ``first`` is the data of the DataReceived event that started the body. Returns the event
    that ended it. At most one write is in flight while the next batch gathers, and credit is
    granted to the peer only as writes complete.
    """
    in_flight: asyncio.Future[None] | None = None
    receiving = True

    def written(future: asyncio.Future[None], size: int) -> None:
        # Credit goes back the moment a write completes, not when the next DATA arrives: a
        # write may hold most of the window, and then no more DATA can come until it is back.
        if receiving and not future.cancelled() and future.exception() is None:
            protocol.consumed(channel.stream_id, size)
            if progress is not None:
                progress(size)

    data: bytes | None = first
    try:
        while True:
            if data is not None:
                parts, total = channel.take_data(data, READ_BLOCK)
                blob = parts[0] if len(parts) == 1 else b"".join(parts)
                if in_flight is not None:
                    await in_flight  # one write at a time; raises the write's error
                in_flight = protocol.loop.run_in_executor(executor, write, blob)
                in_flight.add_done_callback(functools.partial(written, size=total))
            event = await channel.next_event()
            if isinstance(event, DataReceived):
                data = event.data
                continue
            if in_flight is not None:
                await in_flight
                in_flight = None
            return event
    finally:
        receiving = False  # no credit for a write that completes after the body failed
        if in_flight is not None:
            # Let a started write finish before the caller aborts the file under it.
            await asyncio.gather(in_flight, return_exceptions=True)


def limit_heap_growth() -> bool:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD`; True if it was set.

    Transfers move 1 MiB blocks through worker threads. glibc starts by giving such blocks
    their own mappings, but after the first is freed it raises its threshold to that size, and
    from then on each thread's arena carves them from its heap, where fragmentation keeps the
    memory: a long-running server's RSS crept up by ~15–30 MB over a soak. A fixed threshold
    also turns off that adjustment. No-op where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a CLI's main coroutine: on asyncio's default loop, or on uvloop when QSFTP_LOOP is
    "uvloop" (the ``fast`` extra installs it). Library code never calls this: in a notebook
    the kernel's loop is used as it is. A CLI process also pins the allocator's mmap threshold
    (:func:`limit_heap_growth`).

    uvloop is not the default because its timers have 1 ms resolution: aioquic's pacer and ACK
    timers ask for sub-millisecond waits on fast paths, and rounded up they made transfers
    bimodal (docs/PERFORMANCE.md).
    """
    limit_heap_growth()
    if os.environ.get("QSFTP_LOOP", "asyncio") == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 - optional

            return uvloop.run(main)
        except ImportError:
            logger.warning("QSFTP_LOOP=uvloop, but uvloop is not installed: using asyncio")
    return asyncio.run(main)


def loop_name() -> str:
    """The running event loop's implementation, e.g. "asyncio" or "uvloop"."""
    module = type(asyncio.get_running_loop()).__module__
    return module.split(".", 1)[0]


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def datagram_size_for(host: str, requested: int | None) -> int:
    """``requested``, or the default for a path to ``host`` (an address, or localhost)."""
    if requested is not None:
        return requested
    return LOOPBACK_DATAGRAM_SIZE if is_loopback(host) else DEFAULT_DATAGRAM_SIZE


def consume_result(future: asyncio.Future[Any]) -> None:
    """A done-callback that marks a future's exception as retrieved (nobody else will)."""
    if not future.cancelled():
        future.exception()


def cpu_time() -> float:
    """CPU seconds used by this process (user + system)."""
    return time.process_time()


class QlogWriter:
    """A qlog writer for a QUIC configuration's ``quic_logger``: the engine's QuicFileLogger
    (one ``<ODCID>.qlog`` per connection, written when its trace ends) behind a front that
    creates the directory, knows each trace's file, and can end the traces still open: the
    library ends a trace only when a close completes, after the closing period, which a client
    that drops its socket at once (or a server shutting down) never waits for."""

    def __init__(self, directory: str | os.PathLike[str], *, engine: Engine = AIOQUIC) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._logger = engine.file_logger_class(os.fspath(path))
        self.directory = path
        self.paths: list[Path] = []
        "Files of the traces started so far (a file exists once its trace ended)."
        self._open: set[Any] = set()

    def start_trace(self, is_client: bool, odcid: bytes) -> Any:
        trace = self._logger.start_trace(is_client=is_client, odcid=odcid)
        self.paths.append(self.directory / f"{odcid.hex()}.qlog")
        self._open.add(trace)
        return trace

    def end_trace(self, trace: Any) -> None:
        if trace in self._open:  # the library may end a trace we already ended
            self._open.remove(trace)
            self._logger.end_trace(trace)

    def end_open_traces(self) -> None:
        """Write every trace not yet ended (their connections are being abandoned)."""
        for trace in list(self._open):
            self.end_trace(trace)
