"""qsftp/1 over TLS 1.3 on TCP: the same sessions and operations, one TCP connection.

QUIC gives every operation its own stream, with its own flow control, so one stalled
operation never holds up another. TCP gives one ordered byte stream, so this module carries
qsftp/1's streams over it in frames (docs/PROTOCOL.md, "qsftp/1 over TCP")::

    kind (1 byte) | stream id (8 bytes) | length (4 bytes) | payload (length bytes)

``DATA`` / ``DATA_FIN`` carry stream bytes (``_FIN``: the sender's half ends after them),
``RESET`` and ``STOP_SENDING`` abort one half of a stream as their QUIC namesakes do,
``CREDIT`` raises a stream's flow-control limit (QUIC's MAX_STREAM_DATA) and ``CLOSE`` ends
the connection with an application error code. Everything above the frames -- the qsftp/1
codec and state machines, the client and server logic, trust checks, tokens, hashing and
atomic writes -- is the code QUIC uses (:class:`~qsftp.session.SessionBase` and the client and
server mixins).

Flow control: every stream may carry :data:`INITIAL_CREDIT` bytes before the receiver's first
``CREDIT``; after that the receiver grants credit as the application *consumes* bytes, never
more than its receive window ahead (the rule :class:`~qsftp.session.QsftpProtocol` applies to
QUIC). A sender holds a stream's bytes beyond its credit in that stream's queue, and
:meth:`~qsftp.session.SessionBase.wait_writable` stops the operation when the queue reaches
SEND_HIGH_WATER; the TCP transport's own buffer is bounded by :data:`WRITE_HIGH_WATER`
(asyncio's pause_writing/resume_writing). So memory stays bounded on both sides and a stalled
operation holds only its own stream.

The frame decoder (:class:`FrameDecoder`, :func:`encode_frame`) does no I/O.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aioquic.quic.events import ConnectionTerminated
from cryptography import x509

from .errors import (
    ConnectTimeout,
    ErrorCode,
    LocalFileError,
    RemoteProtocolError,
    TransportError,
    TrustError,
    UsageError,
)
from .protocol import Role
from .session import QuicStats, SessionBase
from .wire import ALPN

__all__ = [
    "FRAME_HEADER",
    "INITIAL_CREDIT",
    "MAX_FRAME_PAYLOAD",
    "MAX_STREAMS",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "TcpSession",
    "client_context",
    "default_congestion_control",
    "encode_frame",
    "listen",
    "open_connection",
    "server_context",
    "tcp_stats",
]

logger = logging.getLogger(__name__)
SessionT = TypeVar("SessionT", bound="TcpSession")

# kind, stream id, payload length: fixed width, so a header is parsed with one unpack.
FRAME_HEADER = struct.Struct("!BQI")
# Largest payload a frame may declare; a longer one is a protocol error before anything is
# buffered, so the decoder never holds more than one such frame (plus a partial header).
MAX_FRAME_PAYLOAD = 1024 * 1024
# Payload of the DATA frames this side writes: streams with bytes to send take turns in these
# units, so one large transfer cannot keep another waiting for more than a frame.
WRITE_FRAME_SIZE = 256 * 1024
# Bytes a stream may carry before the receiver's first CREDIT (QUIC's initial
# max_stream_data): enough for any request header and a first flight of data.
INITIAL_CREDIT = 256 * 1024
# Streams the peer may have open at once (QUIC: max_streams_bidi, aioquic's 128).
MAX_STREAMS = 128
# Most bytes queued in the TCP transport (on top of the kernel's socket buffer) before asyncio
# pauses this side's writing: a few frames, so the kernel buffer stays full.
WRITE_HIGH_WATER = 1024 * 1024
# Longest CLOSE reason sent (bytes of UTF-8).
_MAX_REASON = 1024
# The TLS handshake of an accepted connection must end within this long.
HANDSHAKE_TIMEOUT = 10.0
# How long closing waits for the peer's TLS close before dropping the socket.
CLOSE_TIMEOUT = 1.0
_CODE = struct.Struct("!Q")
# struct tcp_info (linux/tcp.h): offsets of the fields stats() reads, all u32.
_TCPI_SND_MSS, _TCPI_RTT, _TCPI_SND_CWND = 16, 68, 80
_TCPI_TOTAL_RETRANS, _TCPI_SEGS_OUT, _TCPI_MIN_RTT = 100, 136, 148
_TCPI_LENGTH = 232


class FrameKind(enum.IntEnum):
    DATA = 0
    DATA_FIN = 1
    RESET = 2
    STOP_SENDING = 3
    CREDIT = 4
    CLOSE = 5


_KINDS = frozenset(FrameKind)
# Payload length each control frame must have (CLOSE: at least the code).
_FIXED = {FrameKind.RESET: 8, FrameKind.STOP_SENDING: 8, FrameKind.CREDIT: 8}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    kind: FrameKind
    stream_id: int
    payload: bytes

    def __repr__(self) -> str:
        return f"Frame({self.kind.name}, {self.stream_id}, {len(self.payload)} bytes)"

    @property
    def code(self) -> int:
        """The error code (RESET, STOP_SENDING, CLOSE) or the new limit (CREDIT)."""
        value: int = _CODE.unpack_from(self.payload)[0]
        return value


def encode_frame(kind: FrameKind, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame's bytes."""
    return FRAME_HEADER.pack(kind, stream_id, len(payload)) + payload


def _code_frame(kind: FrameKind, stream_id: int, code: int, reason: bytes = b"") -> bytes:
    return encode_frame(kind, stream_id, _CODE.pack(code) + reason)


class FrameDecoder:
    """Bytes from the TLS stream in, whole frames out; RemoteProtocolError on any bad input."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        position, header = 0, FRAME_HEADER.size
        while len(buffer) - position >= header:
            kind, stream_id, length = FRAME_HEADER.unpack_from(buffer, position)
            if kind not in _KINDS:
                raise RemoteProtocolError(f"unknown frame kind {kind}")
            if length > MAX_FRAME_PAYLOAD:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_PAYLOAD}")
            fixed = _FIXED.get(kind)
            if (fixed is not None and length != fixed) or (
                kind == FrameKind.CLOSE and not 8 <= length <= 8 + _MAX_REASON
            ):
                raise RemoteProtocolError(f"{FrameKind(kind).name} frame of {length} bytes")
            end = position + header + length
            if len(buffer) < end:
                break
            frames.append(Frame(FrameKind(kind), stream_id, bytes(buffer[position + header : end])))
            position = end
        del buffer[:position]
        return frames


@dataclass(slots=True)
class _Stream:
    stream_id: int
    queue: collections.deque[bytes | memoryview] = field(default_factory=collections.deque)
    queued: int = 0  # bytes in queue
    sent: int = 0  # bytes written to the transport
    limit: int = INITIAL_CREDIT  # the peer's credit: sent may not pass it
    fin_queued: bool = False
    send_closed: bool = False  # FIN written, RESET written, or the peer asked us to stop
    received: int = 0
    granted: int = INITIAL_CREDIT  # the credit we gave: received may not pass it
    fin_received: bool = False
    reset_received: bool = False
    stopped: bool = False  # we sent STOP_SENDING: later bytes are dropped


class TcpSession(SessionBase, asyncio.Protocol):
    """One TLS-over-TCP connection speaking qsftp/1. Subclassed (with the client or server
    mixin) by qsftp.client and qsftp.server."""

    def __init__(
        self,
        *,
        receive_window: int,
        idle_timeout: float,
        registry: set[TcpSession] | None = None,
    ) -> None:
        self._init_session(receive_window)
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self._registry = registry
        self._decoder = FrameDecoder()
        self._streams: dict[int, _Stream] = {0: _Stream(0)}
        self._sending: dict[int, _Stream] = {}  # streams with bytes or a FIN to write, in turn
        self._next_local = 4  # client: stream 0 is the control stream
        self._highest_peer = 0  # server: the largest stream id the client has used
        self._paused = False
        self._last_receive = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._last_stats = QuicStats(
            packets_sent=0, packets_lost=0, smoothed_rtt_ms=0.0, min_rtt_ms=0.0, congestion_window=0
        )

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._registry is not None:
            self._registry.add(self)
        self._last_receive = self.loop.time()
        self._idle = self.loop.call_later(self.idle_timeout, self._check_idle)
        if self.alpn() != ALPN:
            logger.info("closing a TCP connection that did not negotiate %s", ALPN)
            transport.abort()
        elif self.terminated is not None:  # closed (e.g. its deadline) during the handshake
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self._last_receive = self.loop.time()
        try:
            for frame in self._decoder.feed(data):
                self._handle_frame(frame)
                if self.terminated is not None:
                    return
        except RemoteProtocolError as exc:
            logger.warning("closing connection: %s", exc)
            self.close(ErrorCode.BAD_REQUEST, str(exc))
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._registry is not None:
            self._registry.discard(self)
        if self.terminated is None:
            if isinstance(exc, OSError):
                self.transport_error = exc
            reason = str(exc) if exc is not None else "closed by the peer"
            self._terminate(0, reason)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    # --- the transport interface of SessionBase ---------------------------------------------

    def flush(self) -> None:
        for stream_id, data, end_stream in self.qsftp.data_to_send():
            stream = self._streams.get(stream_id)
            if stream is None or stream.send_closed or stream.fin_queued:
                # The peer stopped the stream (or it is gone) after we queued: nobody reads
                # these bytes any more, and the operation learns of it through its channel.
                logger.debug("stream %d: dropped %d bytes", stream_id, len(data))
                continue
            if data:
                stream.queue.append(data)
                stream.queued += len(data)
            stream.fin_queued = end_stream
            self._sending[stream_id] = stream
        self._pump()

    def buffered(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.queued if stream is not None else 0

    def consumed(self, stream_id: int, count: int) -> None:
        self._unconsumed[stream_id] = self._unconsumed.get(stream_id, 0) - count
        self._grant(stream_id)

    def stats(self) -> QuicStats:
        """TCP figures of this connection so far, from the kernel (:func:`tcp_stats`)."""
        sock = self._socket()
        if sock is not None:
            self._last_stats = tcp_stats(sock)
        return self._last_stats

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        transport = self.transport
        if self.terminated is None:
            self._terminate(error_code, reason_phrase, local=True)
        if transport is not None and not transport.is_closing():
            reason = reason_phrase.encode()[:_MAX_REASON]
            transport.write(_code_frame(FrameKind.CLOSE, 0, error_code, reason))
            transport.close()

    def next_stream_id(self) -> int:
        stream_id, self._next_local = self._next_local, self._next_local + 4
        self._streams[stream_id] = _Stream(stream_id)
        return stream_id

    def abort_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._reset_sending(stream, ErrorCode.CANCELLED)
        self.stop_receiving(stream_id)
        self._forget_if_done(stream)

    def stop_receiving(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.stopped or stream.fin_received or stream.reset_received:
            return
        stream.stopped = True
        self._write(_code_frame(FrameKind.STOP_SENDING, stream_id, ErrorCode.CANCELLED))

    def receive_finished(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is None or stream.fin_received or stream.reset_received

    def peer_certificate(self) -> x509.Certificate | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return x509.load_der_x509_certificate(der) if der else None

    # --- more about the connection -----------------------------------------------------------

    def alpn(self) -> str | None:
        """The application protocol TLS negotiated (``qsftp/1``), or None."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        return ssl_object.selected_alpn_protocol() if ssl_object is not None else None

    def mss(self) -> int:
        """The TCP maximum segment size this side sends with, bytes (0 if unknown)."""
        sock = self._socket()
        info = _tcp_info(sock) if sock is not None else b""
        return _u32(info, _TCPI_SND_MSS)

    def congestion_control(self) -> str:
        """The kernel's congestion control algorithm for this connection ("" if unknown)."""
        sock = self._socket()
        if sock is None or not hasattr(socket, "TCP_CONGESTION"):
            return ""
        try:
            name: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        except OSError:
            return ""
        return name.split(b"\0", 1)[0].decode()

    def set_congestion_control(self, name: str) -> None:
        """Use the kernel's ``name`` algorithm (e.g. reno, cubic) for this connection."""
        sock = self._socket()
        if sock is not None:
            _set_congestion_control(sock, name)

    async def shutdown(self) -> None:
        """Close (CLOSE frame, then TLS close) and wait a moment for the socket to go."""
        self.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self._closed)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    def _socket(self) -> Any:
        return self.transport.get_extra_info("socket") if self.transport else None

    def _terminate(self, code: int, reason: str, *, local: bool = False) -> None:
        """The connection is over: fail every operation (once)."""
        if local and not reason:
            reason = "closed by this side"
        self._connection_lost(
            ConnectionTerminated(error_code=code, frame_type=None, reason_phrase=reason)
        )

    def _check_idle(self) -> None:
        self._idle = None
        quiet = self.loop.time() - self._last_receive
        if quiet >= self.idle_timeout:
            logger.info("closing a TCP connection idle for %.0f s", quiet)
            self.close(0, "idle timeout")
        elif self.transport is not None:
            self._idle = self.loop.call_later(self.idle_timeout - quiet, self._check_idle)

    # --- receiving ---------------------------------------------------------------------------

    def _handle_frame(self, frame: Frame) -> None:
        kind, stream_id = frame.kind, frame.stream_id
        if kind == FrameKind.CLOSE:
            reason = frame.payload[8:].decode(errors="replace")
            self._terminate(frame.code, reason)
            if self.transport is not None:
                self.transport.close()
            return
        stream = self._streams.get(stream_id)
        if stream is None and kind <= FrameKind.DATA_FIN:
            stream = self._peer_stream(stream_id)
        if stream is None:
            return  # a stream already finished (or reset) on this side: late frames
        match kind:
            case FrameKind.DATA | FrameKind.DATA_FIN:
                self._receive_data(stream, frame.payload, kind == FrameKind.DATA_FIN)
            case FrameKind.RESET:
                if not (stream.fin_received or stream.reset_received):
                    stream.reset_received = True
                    self._dispatch(self.qsftp.stream_reset(stream_id, frame.code))
            case FrameKind.STOP_SENDING:
                self._reset_sending(stream, frame.code)
                # As over QUIC: a server's STOP_SENDING only follows its ERROR, which is what
                # the client waits for; a client that stops a response abandons it.
                if self.role is Role.SERVER:
                    self._dispatch(self.qsftp.stream_reset(stream_id, frame.code))
                self._wake_writers()
            case FrameKind.CREDIT:
                if frame.code > stream.limit:
                    stream.limit = frame.code
                    self._pump()
        self._forget_if_done(stream)

    def _peer_stream(self, stream_id: int) -> _Stream | None:
        """The state of a stream the client opens with this frame (server side), or None."""
        if self.role is not Role.SERVER or stream_id <= self._highest_peer:
            return None
        if stream_id % 4 != 0:
            raise RemoteProtocolError(f"stream {stream_id} is not a client bidirectional stream")
        if len(self._streams) > MAX_STREAMS:
            raise RemoteProtocolError(f"more than {MAX_STREAMS} streams open")
        self._highest_peer = stream_id
        stream = self._streams[stream_id] = _Stream(stream_id)
        return stream

    def _receive_data(self, stream: _Stream, data: bytes, fin: bool) -> None:
        if stream.fin_received or stream.reset_received:
            raise RemoteProtocolError(f"stream {stream.stream_id}: data after its end")
        if stream.stopped:
            stream.fin_received = fin
            return  # we asked the peer to stop: these bytes have no reader
        if stream.received + len(data) > stream.granted:
            raise RemoteProtocolError(
                f"stream {stream.stream_id}: {stream.received + len(data)} bytes exceed the "
                f"credit of {stream.granted}"
            )
        stream.received += len(data)
        stream.fin_received = fin
        self._dispatch(self.qsftp.receive(stream.stream_id, data, fin))
        self._grant(stream.stream_id)

    def _grant(self, stream_id: int) -> None:
        # The rule QsftpProtocol._grant applies to QUIC: bytes received, less the DATA
        # payload bytes not yet consumed, plus the window; raised in quarter-window steps.
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_received or stream.reset_received or stream.stopped:
            return
        target = stream.received - self._unconsumed.get(stream_id, 0) + self.receive_window
        if target - stream.granted >= self.receive_window // 4:
            stream.granted = target
            self._write(_code_frame(FrameKind.CREDIT, stream_id, target))

    # --- sending -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _pump(self) -> None:
        """Write frames while the transport takes them: each stream with bytes and credit
        writes up to WRITE_FRAME_SIZE in turn."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        progress = True
        while progress and self._sending and not self._paused:
            progress = False
            for stream in list(self._sending.values()):
                if self._paused:
                    break
                progress |= self._write_frame(transport, stream)
        if self._writers:
            self._wake_writers()

    def _write_frame(self, transport: asyncio.Transport, stream: _Stream) -> bool:
        count = min(stream.queued, stream.limit - stream.sent, WRITE_FRAME_SIZE)
        fin = stream.fin_queued and count == stream.queued
        if count <= 0 and not fin:
            return False
        parts: list[bytes | memoryview] = []
        need, queue = count, stream.queue
        while need:
            piece = queue[0]
            if len(piece) <= need:
                parts.append(queue.popleft())
                need -= len(piece)
            else:
                view = memoryview(piece)
                parts.append(view[:need])
                queue[0] = view[need:]
                need = 0
        stream.queued -= count
        stream.sent += count
        kind = FrameKind.DATA_FIN if fin else FrameKind.DATA
        transport.write(b"".join([FRAME_HEADER.pack(kind, stream.stream_id, count), *parts]))
        if fin:
            stream.send_closed = True
        if fin or not stream.queued:
            self._sending.pop(stream.stream_id, None)
        if fin:
            self._forget_if_done(stream)
        return True

    def _reset_sending(self, stream: _Stream, code: int) -> None:
        """End our half of ``stream`` abruptly: drop what is queued, tell the peer (RESET)."""
        if stream.send_closed:
            return
        stream.send_closed = True
        stream.queue.clear()
        stream.queued = 0
        self._sending.pop(stream.stream_id, None)
        self._write(_code_frame(FrameKind.RESET, stream.stream_id, code))

    def _forget_if_done(self, stream: _Stream) -> None:
        if stream.send_closed and (stream.fin_received or stream.reset_received):
            self._streams.pop(stream.stream_id, None)


def tcp_stats(sock: Any) -> QuicStats:
    """A TCP socket's figures in QuicStats' fields, from Linux TCP_INFO: segments sent
    (``tcpi_segs_out``), segments retransmitted (``tcpi_total_retrans``), smoothed and
    minimum RTT, and the congestion window in bytes (``tcpi_snd_cwnd`` × ``tcpi_snd_mss``).
    All zero where TCP_INFO is not available."""
    info = _tcp_info(sock)
    return QuicStats(
        packets_sent=_u32(info, _TCPI_SEGS_OUT),
        packets_lost=_u32(info, _TCPI_TOTAL_RETRANS),
        smoothed_rtt_ms=_u32(info, _TCPI_RTT) / 1000.0,
        min_rtt_ms=_u32(info, _TCPI_MIN_RTT) / 1000.0,
        congestion_window=_u32(info, _TCPI_SND_CWND) * _u32(info, _TCPI_SND_MSS),
    )


def _tcp_info(sock: Any) -> bytes:
    if not hasattr(socket, "TCP_INFO"):
        return b""
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LENGTH)
    except OSError:
        return b""
    return info


def _u32(info: bytes, offset: int) -> int:
    if len(info) < offset + 4:
        return 0
    value: int = struct.unpack_from("=I", info, offset)[0]
    return value


def default_congestion_control() -> str:
    """The kernel's default TCP congestion control ("" where it cannot be read)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return ""


def _set_congestion_control(sock: Any, name: str) -> None:
    if not hasattr(socket, "TCP_CONGESTION"):
        raise UsageError("choosing TCP congestion control needs Linux")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        raise UsageError(f"TCP congestion control {name!r} is not available: {exc}") from exc


# --- TLS ---------------------------------------------------------------------------------------


def client_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """TLS 1.3 client settings: with ``cafile`` the chain and name are verified by TLS; without,
    nothing is, and the caller decides trust afterwards (pin, known hosts) as over QUIC."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN])
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        context.load_verify_locations(cafile=os.fspath(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise LocalFileError(f"cannot load CA file {cafile}: {exc}") from exc
    return context


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """TLS 1.3 server settings with the server's certificate and ALPN qsftp/1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN])
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise LocalFileError(f"cannot load certificate {certfile} / key {keyfile}: {exc}") from exc
    return context


# --- opening and listening ------------------------------------------------------------------------


async def open_connection(
    factory: Callable[[], SessionT],
    host: str,
    port: int,
    *,
    cafile: str | os.PathLike[str] | None,
    timeout: float,
    congestion_control: str | None = None,
) -> SessionT:
    """Connect and complete the TLS handshake; the session is not opened yet."""
    where = f"{host}:{port}"
    context = client_context(cafile)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                factory, host, port, ssl=context, ssl_handshake_timeout=timeout
            )
    except TimeoutError:
        raise ConnectTimeout(f"no answer from {where} (TCP) within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise TrustError(
            f"certificate of {where} not trusted by {cafile}: {exc.verify_message}"
        ) from None
    except ssl.SSLError as exc:
        raise TransportError(f"TLS handshake with {where} failed: {exc.reason or exc}") from None
    except ConnectionRefusedError:
        raise TransportError(
            f"connection refused by {where} (is a qsftp server listening on TCP?)"
        ) from None
    except OSError as exc:
        raise TransportError(f"cannot reach {where}: {exc.strerror or exc}") from None
    if protocol.alpn() != ALPN:
        await protocol.shutdown()
        raise TransportError(f"{where} does not speak {ALPN}")
    if congestion_control is not None:
        try:
            protocol.set_congestion_control(congestion_control)
        except UsageError:
            await protocol.shutdown()
            raise
    return protocol


async def listen(
    factory: Callable[[], TcpSession],
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    reuse_port: bool = False,
    congestion_control: str | None = None,
) -> asyncio.Server:
    """Listen for qsftp/1 over TLS on TCP; every accepted connection gets ``factory()``."""
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            factory,
            host,
            port,
            ssl=context,
            reuse_port=reuse_port or None,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    except OSError as exc:
        raise TransportError(f"cannot listen on {host}:{port} (TCP): {exc.strerror}") from exc
    if congestion_control is not None:
        try:  # accepted sockets inherit the listening socket's algorithm
            for sock in server.sockets:
                _set_congestion_control(sock, congestion_control)
        except UsageError:
            server.close()
            raise
    return server
