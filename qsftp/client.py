"""The QSFTP client: ``async with connect(...)``, one-shot helpers, and ``python -m qsftp.client``.

Trust, in order: ``cafile`` (the TLS layer verifies chain and name), ``pin`` (the certificate's
SHA-256 must match), ``insecure`` (nothing is checked; a warning is logged), or by default
trust-on-first-use against a known-hosts file, as ssh does. The check happens right after the
handshake and before the token is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import secrets
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tqdm import tqdm

from . import __version__, fs, tcp, trust
from .engine import DEFAULT_ENGINE, ENGINES, Engine, get_engine
from .errors import (
    AuthFailed,
    BadPath,
    ChecksumMismatch,
    ConnectTimeout,
    LocalFileError,
    NotFound,
    OperationError,
    QsftpError,
    RemoteProtocolError,
    TransportError,
    TrustError,
    UsageError,
    error_for_code,
)
from .protocol import (
    DataReceived,
    EntryReceived,
    Event,
    FileStarted,
    OperationDone,
    Role,
    SessionAccepted,
    SessionRejected,
    TerminateReceived,
)
from .server import DEFAULT_PORT
from .session import (
    DEFAULT_CHUNK_SIZE,
    IDLE_TIMEOUT,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    READ_BLOCK,
    RECEIVE_WINDOW,
    Channel,
    NoHash,
    QlogWriter,
    QsftpProtocol,
    QuicStats,
    SessionBase,
    consume_result,
    cpu_time,
    datagram_size_for,
    event_error,
    receive_body,
    run,
    send_body,
    transmit_batch,
)
from .tickets import Ticket, TicketCache, TicketSink, cafile_digest, check_resumed, policy_refusal
from .udp import DatagramEndpoint
from .wire import ALPN, PROTOCOL_VERSION, UPLOAD_ID_LEN, EntryKind

__all__ = [
    "CONNECT_TIMEOUT",
    "Connection",
    "TransferResult",
    "connect",
    "connect_many",
    "download",
    "listdir",
    "main",
    "upload",
    "upload_striped",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

# How long the handshake and session opening may take before we give up: long enough for a
# slow, lossy path (several PTOs), short enough that a typo in the address fails quickly.
CONNECT_TIMEOUT = 10.0
# How long a graceful CONN_TERMINATE exchange may take when closing.
_TERMINATE_TIMEOUT = 1.0
# Operations run at once by the CLI and the tree helpers over one connection.
PARALLEL_TRANSFERS = 64  # below aioquic's 128 concurrent streams per connection
# Reconnection after a lost connection (resumable transfers): first wait, doubling up to the cap.
RETRY_BACKOFF_FIRST = 0.5
RETRY_BACKOFF_MAX = 8.0
# Attempts the CLI makes with --resume before it gives up on a file.
RESUME_RETRIES = 8
# With --connections N, files at least this large are striped; smaller ones gain nothing
# from the extra commit pass and go whole over the first connection.
STRIPE_MIN_SIZE = 8 * 1024 * 1024
# A striped upload hands the file out in blocks of this size, in file order, to whichever
# connection is ready, so the server's running hash of the contiguous beginning
# (fs.PrefixHash) keeps up with the blocks arriving. Large, because the tail of one block
# and the head of the next share their connection for a moment (the next starts when the
# previous is queued): 8 MiB blocks cost the server ~7% more CPU than 32 MiB on loopback.
STRIPE_BLOCK = 32 * 1024 * 1024
# TLS alerts arrive as QUIC CRYPTO_ERROR codes 0x100 + alert.
_CRYPTO_ERROR_MIN, _CRYPTO_ERROR_MAX = 0x100, 0x1FF
_NO_APPLICATION_PROTOCOL = 0x100 + 120


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferResult:
    """One verified transfer. ``seconds`` covers request sent → verified final status."""

    op: str
    "``upload`` or ``download``."
    name: str
    "Remote name."
    local_path: str
    "The local file read or written."
    size: int
    "Bytes transferred."
    seconds: float
    "perf_counter time from sending the request to the server's verified DONE (download: "
    "to the local file committed)."
    sha256: str
    "SHA-256 of the file, hex; equal on both sides."
    verified: bool
    "True when the server's SHA-256 and size matched the local ones."
    chunk_size: int
    "DATA payload size, bytes."
    handshake_ms: float
    "QUIC + TLS handshake of the connection used, ms."
    session_ms: float
    "CONN_REQUEST → CONN_ACK of the connection used, ms."
    smoothed_rtt_ms: float
    "Smoothed RTT at the end of the transfer, ms."
    packets_sent: int
    "QUIC packets this side sent during the transfer (the whole connection's, if shared)."
    packets_lost: int
    "Packets this side declared lost during the transfer."
    client_cpu_s: float
    "CPU seconds this process used during the transfer."
    server_cpu_s: float
    "CPU seconds the server process used during the operation (from its DONE)."
    max_datagram_size: int
    "QUIC max_datagram_size of the connection."
    congestion_control: str
    "Congestion control algorithm of this side."
    started_at: str
    "Wall-clock start, ISO 8601 UTC (for ordering only; durations use perf_counter)."
    connections: int = 1
    "QUIC connections the file was striped over (1: not striped)."
    qlog_path: str | None = None
    "This side's qlog file of the connection used (the first, if striped), written when it "
    "closes; None: no qlog."
    resumed_bytes: int = 0
    "Bytes kept from an earlier attempt (resume=True) and not sent again: held by the server "
    "(upload) or by the local partial file (download)."
    transport: str = "quic"
    "``quic``, or ``tcp``: TLS 1.3 over TCP, where the packet figures are TCP segments and "
    "``max_datagram_size`` is the TCP MSS."
    engine: str = DEFAULT_ENGINE
    "QUIC library of this side: ``aioquic`` or ``qh3``; empty over TCP (no QUIC library)."

    @property
    def throughput_mb_s(self) -> float:
        """Megabytes (10^6 bytes) per second."""
        return self.size / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A plain dict of every field plus ``throughput_mb_s``."""
        out = dataclasses.asdict(self)
        out["throughput_mb_s"] = self.throughput_mb_s
        return out


class ClientSession(SessionBase):
    """The client side of a qsftp/1 session, whatever transport carries it (a mixin)."""

    role = Role.CLIENT

    def _init_client(self) -> None:
        self.session: asyncio.Future[SessionAccepted] = self.loop.create_future()
        # connect() may give up before awaiting the session (trust failure, timeout).
        self.session.add_done_callback(consume_result)
        self.terminate_answered = asyncio.Event()

    def handle_event(self, event: Event) -> None:
        match event:
            case SessionAccepted():
                if self.session.done():
                    pass
                elif event.version != PROTOCOL_VERSION:
                    self.session.set_exception(
                        RemoteProtocolError(f"server speaks version {event.version}")
                    )
                else:
                    self.session.set_result(event)
            case SessionRejected():
                if not self.session.done():
                    self.session.set_exception(error_for_code(event.code, event.message))
            case TerminateReceived():
                if self.qsftp.control_state.value == "server-closing":
                    self.qsftp.terminate()
                self.terminate_answered.set()
            case _:
                logger.debug("ignored %r", event)

    def _connection_lost(self, event: Any) -> None:
        super()._connection_lost(event)
        if not self.session.done():
            self.session.set_exception(TransportError(self.termination_text()))
        self.terminate_answered.set()


class _ClientProtocol(ClientSession, QsftpProtocol):
    def __init__(
        self,
        quic: Any,
        stream_handler: Any = None,
        *,
        batch: set[QsftpProtocol] | None = None,
    ) -> None:
        super().__init__(quic, stream_handler, batch=batch)
        self._init_client()


class _TcpClientProtocol(ClientSession, tcp.TcpSession):
    def __init__(self, *, receive_window: int) -> None:
        super().__init__(receive_window=receive_window, idle_timeout=IDLE_TIMEOUT)
        self._init_client()


@dataclass(frozen=True, slots=True, kw_only=True)
class _ClockStart:
    """The clocks and counters at the start of a transfer (:meth:`Connection._result`)."""

    started_at: str
    "Wall-clock start, ISO 8601 (the result's ``started_at``)."
    stats: QuicStats
    "The connection's counters, for the packets this transfer sent and lost."
    cpu: float
    "This process's CPU time (``cpu_time()``)."
    perf: float
    "``time.perf_counter()``, taken last: the result's ``seconds`` start here."


class Connection:
    """An open qsftp/1 session. Get one with :func:`connect`; operations may run concurrently."""

    def __init__(
        self,
        protocol: ClientSession,
        *,
        host: str,
        port: int,
        trust_decision: trust.TrustDecision,
        handshake_ms: float,
        session_ms: float,
        server: str,
        configuration: Any,
        session_resumed: bool = False,
        ticket_sink: TicketSink | None = None,
    ) -> None:
        self._protocol = protocol
        self._ticket_sink = ticket_sink
        self.session_resumed = session_resumed
        "True when the TLS handshake resumed an earlier session with a ticket (no certificate)."

        self.host = host
        self.port = port
        self.trust = trust_decision
        self.fingerprint = trust_decision.fingerprint
        self.handshake_ms = handshake_ms
        self.session_ms = session_ms
        self.server = server
        self.transport = "quic" if configuration is not None else "tcp"
        "``quic`` or ``tcp`` (TLS 1.3 over TCP, qsftp.tcp)."
        self.qlog_path: str | None = None
        "This side's qlog file (written when the connection closes); None: no qlog."
        self.engine = ""
        "QUIC library of this side: ``aioquic`` or ``qh3``; empty over TCP."
        if isinstance(protocol, tcp.TcpSession):
            # TCP: the segment size and the kernel's congestion control stand in for QUIC's.
            self.max_datagram_size = protocol.mss()
            self.congestion_control = protocol.congestion_control()
            self.receive_window = protocol.receive_window
            return
        assert isinstance(protocol, QsftpProtocol) and configuration is not None
        self.max_datagram_size = configuration.max_datagram_size
        self.engine = protocol.engine.name
        self.congestion_control = protocol.engine.congestion_control(configuration)
        self.receive_window = configuration.max_stream_data
        writer = configuration.quic_logger
        if isinstance(writer, QlogWriter) and writer.paths:
            self.qlog_path = str(writer.paths[0])

    def __repr__(self) -> str:
        return f"<Connection {self.transport} {self.host}:{self.port} server={self.server!r}>"

    @property
    def closed(self) -> bool:
        """True once the QUIC connection has ended (closed by either side, or timed out)."""
        return self._protocol.terminated is not None

    @property
    def session_ticket(self) -> Ticket | None:
        """The newest session ticket the (trusted) server sent on this connection, for
        ``connect(..., session_ticket=...)``; None before it arrives (usually it has by the
        time :func:`connect` returns) or on an ``insecure`` connection."""
        return self._ticket_sink.latest if self._ticket_sink is not None else None

    def stats(self) -> QuicStats:
        """Transport figures of this connection so far (over TCP: from the kernel's TCP_INFO,
        see :func:`qsftp.tcp.tcp_stats`)."""
        return self._protocol.stats()

    def _open(self) -> Channel:
        protocol = self._protocol
        if protocol.terminated is not None:
            raise TransportError(protocol.termination_text())
        return protocol.open_channel(protocol.next_stream_id())

    @contextlib.asynccontextmanager
    async def _operation(self) -> AsyncIterator[Channel]:
        channel = self._open()
        finished = False
        try:
            yield channel
            finished = True
        finally:
            self._protocol.close_channel(channel, abort=not finished)

    def _start_clock(self) -> _ClockStart:
        """What a transfer's result is measured from, taken as the transfer starts."""
        return _ClockStart(
            started_at=_now_iso(), stats=self.stats(), cpu=cpu_time(), perf=time.perf_counter()
        )

    def _result(
        self,
        *,
        op: str,
        name: str,
        local_path: Path,
        size: int,
        start: _ClockStart,
        sha256: str,
        chunk_size: int,
        server_cpu_us: int,
        resumed_bytes: int = 0,
    ) -> TransferResult:
        seconds = time.perf_counter() - start.perf
        stats = self.stats()
        return TransferResult(
            op=op,
            name=name,
            local_path=str(local_path),
            size=size,
            seconds=seconds,
            sha256=sha256,
            verified=True,
            chunk_size=chunk_size,
            handshake_ms=self.handshake_ms,
            session_ms=self.session_ms,
            smoothed_rtt_ms=stats.smoothed_rtt_ms,
            packets_sent=stats.packets_sent - start.stats.packets_sent,
            packets_lost=stats.packets_lost - start.stats.packets_lost,
            client_cpu_s=cpu_time() - start.cpu,
            server_cpu_s=server_cpu_us / 1e6,
            max_datagram_size=self.max_datagram_size,
            congestion_control=self.congestion_control,
            started_at=start.started_at,
            qlog_path=self.qlog_path,
            resumed_bytes=resumed_bytes,
            transport=self.transport,
            engine=self.engine,
        )

    async def upload(
        self,
        path: str | os.PathLike[str],
        remote_name: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Callable[[int], None] | None = None,
        resume: bool = False,
    ) -> TransferResult:
        """Upload one file; returns when the server has verified and stored it.

        With ``resume`` the upload is resumable: the server keeps what arrived in a hidden
        partial file even if the transfer is cut, and a later ``resume=True`` upload of the
        same file to the same name sends only the rest (after checking that what the server
        holds matches the local file's beginning; otherwise it starts over).
        """
        _check_chunk_size(chunk_size)
        local = Path(path)
        name = fs.normalize_name(remote_name if remote_name is not None else local.name)
        if resume:
            return await self._upload_resumable(local, name, chunk_size, progress)
        file = _open_local(local)
        with file:
            size = os.fstat(file.fileno()).st_size
            protocol = self._protocol
            async with self._operation() as channel:
                start = self._start_clock()
                protocol.qsftp.send_put(channel.stream_id, name, size)
                protocol.flush()
                digest, event = await self._send_verified(
                    channel, file, size, chunk_size=chunk_size, progress=progress
                )
                return self._result(
                    op="upload",
                    name=name,
                    local_path=local,
                    size=size,
                    start=start,
                    sha256=digest.hex(),
                    chunk_size=chunk_size,
                    server_cpu_us=event.server_cpu_us,
                )

    async def _upload_resumable(
        self,
        local: Path,
        name: str,
        chunk_size: int,
        progress: Callable[[int], None] | None,
    ) -> TransferResult:
        with _open_local(local) as probe:
            size = os.fstat(probe.fileno()).st_size
        upload_id = resumable_upload_id(name, size)
        start = self._start_clock()
        # The whole file's digest (for COMMIT) is computed in a thread while the rest travels.
        whole = asyncio.ensure_future(asyncio.to_thread(fs.sha256_file, local))
        whole.add_done_callback(consume_result)  # a failure is raised where it is awaited
        try:
            held, held_digest = await self._probe(name, upload_id)
            if held > size or (
                held and await asyncio.to_thread(_prefix_digest, local, held) != held_digest
            ):
                logger.info("%s: the server's partial file differs: starting over", name)
                await self._finish_striped(
                    name=name, total_size=size, upload_id=upload_id, sha256=None
                )
                held = 0
            server_us = 0
            if held < size or held == 0:
                server_us = await self._upload_range(
                    local,
                    name=name,
                    total_size=size,
                    offset=held,
                    length=size - held,
                    upload_id=upload_id,
                    chunk_size=chunk_size,
                    progress=progress,
                )
            digest = bytes.fromhex(await whole)
            done = await self._finish_striped(
                name=name, total_size=size, upload_id=upload_id, sha256=digest
            )
        finally:
            whole.cancel()
        return self._result(
            op="upload",
            name=name,
            local_path=local,
            size=size,
            start=start,
            sha256=digest.hex(),
            chunk_size=chunk_size,
            server_cpu_us=server_us + done.server_cpu_us,
            resumed_bytes=held,
        )

    async def _probe(self, name: str, upload_id: bytes) -> tuple[int, bytes]:
        """How many bytes of resumable upload ``upload_id`` the server holds, and their
        SHA-256."""
        protocol = self._protocol
        async with self._operation() as channel:
            protocol.qsftp.send_probe(channel.stream_id, name=name, upload_id=upload_id)
            protocol.flush()
            event = await channel.next_event()
            if not isinstance(event, OperationDone):
                raise event_error(event)
            return event.size, event.sha256

    async def _send_verified(
        self,
        channel: Channel,
        file: BinaryIO,
        size: int,
        *,
        chunk_size: int,
        progress: Callable[[int], None] | None,
        sent: asyncio.Event | None = None,
        checked: bool = True,
    ) -> tuple[bytes, OperationDone]:
        """Send ``size`` bytes of ``file`` and END (then set ``sent``), wait for DONE and check
        that the server stored exactly what was sent; returns the digest and the DONE. With
        ``checked`` False (PUT_BLOCK) nothing is hashed: END carries 32 zero bytes, DONE no
        digest, and only the size is compared."""
        protocol = self._protocol
        digest = await send_body(
            protocol,
            channel,
            file,
            size,
            chunk_size,
            progress=progress,
            hasher=None if checked else NoHash(),
        )
        protocol.qsftp.send_end(channel.stream_id, digest)
        protocol.flush()
        if sent is not None:
            sent.set()
        event = await channel.next_event()
        if not isinstance(event, OperationDone):
            raise event_error(event)
        if event.size != size or (checked and event.sha256 != digest):
            raise ChecksumMismatch(
                f"server stored {event.size} bytes with SHA-256 {event.sha256.hex()}, "
                f"sent {size} bytes with SHA-256 {digest.hex()}"
            )
        return digest, event

    async def _upload_range(
        self,
        path: Path,
        *,
        name: str,
        total_size: int,
        offset: int,
        length: int,
        upload_id: bytes,
        chunk_size: int,
        progress: Callable[[int], None] | None,
        sent: asyncio.Event | None = None,
        checked: bool = True,
    ) -> int:
        """Send one range of a striped upload; return the server's CPU µs for it. ``sent`` is
        set once the whole range is queued for sending (its DONE may still be on the way).
        ``checked`` False sends it as PUT_BLOCK: no SHA-256 of its own on either side."""
        protocol = self._protocol
        with _open_local(path) as file:
            await asyncio.to_thread(file.seek, offset)
            async with self._operation() as channel:
                protocol.qsftp.send_put_range(
                    channel.stream_id,
                    name=name,
                    total_size=total_size,
                    offset=offset,
                    length=length,
                    upload_id=upload_id,
                    checked=checked,
                )
                protocol.flush()
                _, event = await self._send_verified(
                    channel,
                    file,
                    length,
                    chunk_size=chunk_size,
                    progress=progress,
                    sent=sent,
                    checked=checked,
                )
                return event.server_cpu_us

    async def _finish_striped(
        self, *, name: str, total_size: int, upload_id: bytes, sha256: bytes | None
    ) -> OperationDone:
        """COMMIT (with the whole file's digest) or, with ``sha256`` None, ABORT. A COMMIT's
        DONE must report exactly that size and digest, else ChecksumMismatch."""
        protocol = self._protocol
        async with self._operation() as channel:
            if sha256 is None:
                protocol.qsftp.send_abort(channel.stream_id, name=name, upload_id=upload_id)
            else:
                protocol.qsftp.send_commit(
                    channel.stream_id,
                    name=name,
                    total_size=total_size,
                    upload_id=upload_id,
                    sha256=sha256,
                )
            protocol.flush()
            event = await channel.next_event()
            if not isinstance(event, OperationDone):
                raise event_error(event)
            if sha256 is not None and (event.sha256 != sha256 or event.size != total_size):
                raise ChecksumMismatch(
                    f"server stored {event.size} bytes with SHA-256 {event.sha256.hex()}"
                )
            return event

    async def download(
        self,
        remote_name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Callable[[int], None] | None = None,
        on_start: Callable[[int], None] | None = None,
        resume: bool = False,
    ) -> TransferResult:
        """Download one file to ``dest`` (a file path, or an existing directory; default: the
        current directory). Nothing appears under the final name unless the SHA-256 matches.

        With ``resume`` the download is resumable: the bytes go to a hidden partial file next
        to the destination (``.<name>.qsftp-part``) that outlives a failed attempt, and a later
        ``resume=True`` download to the same destination asks only for the rest — after the
        server has checked that the partial file is a prefix of its file; otherwise it sends
        the whole file again. The SHA-256 checked at the end covers the whole file.
        """
        _check_chunk_size(chunk_size)
        name = fs.normalize_name(remote_name)
        target = Path(dest) if dest is not None else Path(name.rsplit("/", 1)[-1])
        if target.is_dir():
            target = target / name.rsplit("/", 1)[-1]
        if resume:
            return await self._download_resumable(name, target, chunk_size, progress, on_start)
        protocol = self._protocol
        async with self._operation() as channel:
            start = self._start_clock()
            protocol.qsftp.send_get(channel.stream_id, name, chunk_size=chunk_size)
            started_event = await self._file_started(channel)
            size = started_event.size
            if on_start is not None:
                on_start(size)
            writer = await asyncio.to_thread(fs.open_local_writer, target, size=size)
            try:
                event = await self._receive_file(channel, writer.write, progress)
                digest = await asyncio.to_thread(writer.commit, expected_sha256=event.sha256.hex())
            finally:
                writer.abort()
            return self._downloaded(
                name,
                target,
                started_event,
                event,
                start=start,
                sha256=digest,
                chunk_size=chunk_size,
            )

    async def _download_resumable(
        self,
        name: str,
        target: Path,
        chunk_size: int,
        progress: Callable[[int], None] | None,
        on_start: Callable[[int], None] | None,
    ) -> TransferResult:
        protocol = self._protocol
        partial = await asyncio.to_thread(fs.PartialDownload, target)
        try:
            start = self._start_clock()
            held_digest = await asyncio.to_thread(partial.prefix_sha256)
            held = partial.size
            async with self._operation() as channel:
                protocol.qsftp.send_get_from(
                    channel.stream_id, name, chunk_size=chunk_size, offset=held, sha256=held_digest
                )
                started_event = await self._file_started(channel)
                size, offset = started_event.size, started_event.offset
                if offset != held:
                    logger.info(
                        "%s: the partial download is not a prefix of it: starting over", name
                    )
                    await asyncio.to_thread(partial.restart)
                if on_start is not None:
                    on_start(size)
                if progress is not None and offset:
                    progress(offset)
                event = await self._receive_file(channel, partial.write, progress)
                digest = await asyncio.to_thread(
                    partial.commit, size=size, expected_sha256=event.sha256.hex()
                )
        finally:
            partial.close()  # kept, unless committed or found wrong
        return self._downloaded(
            name,
            target,
            started_event,
            event,
            start=start,
            sha256=digest,
            chunk_size=chunk_size,
            resumed_bytes=offset,
        )

    async def _file_started(self, channel: Channel) -> FileStarted:
        """Send what was queued for a GET and wait for the server's FileStarted."""
        self._protocol.flush()
        event = await channel.next_event()
        if not isinstance(event, FileStarted):
            raise event_error(event)
        return event

    async def _receive_file(
        self,
        channel: Channel,
        write: Callable[[bytes], None],
        progress: Callable[[int], None] | None,
    ) -> OperationDone:
        """Receive a GET's data into ``write`` up to the server's OperationDone."""
        event = await channel.next_event()
        if isinstance(event, DataReceived):
            event = await receive_body(
                self._protocol, channel, write, first=event.data, progress=progress
            )
        if not isinstance(event, OperationDone):
            raise event_error(event)
        return event

    def _downloaded(
        self,
        name: str,
        target: Path,
        started_event: FileStarted,
        done: OperationDone,
        *,
        start: _ClockStart,
        sha256: str,
        chunk_size: int,
        resumed_bytes: int = 0,
    ) -> TransferResult:
        """A committed download: the remote mtime set on ``target``, and its result."""
        mtime_ns = started_event.mtime_ns
        with contextlib.suppress(OSError):
            os.utime(target, ns=(mtime_ns, mtime_ns))
        return self._result(
            op="download",
            name=name,
            local_path=target,
            size=started_event.size,
            start=start,
            sha256=sha256,
            chunk_size=chunk_size,
            server_cpu_us=done.server_cpu_us,
            resumed_bytes=resumed_bytes,
        )

    async def _entries(self, send: Callable[[int], None]) -> list[fs.Entry]:
        async with self._operation() as channel:
            send(channel.stream_id)
            self._protocol.flush()
            entries: list[fs.Entry] = []
            while True:
                event = await channel.next_event()
                if isinstance(event, EntryReceived):
                    kind = "dir" if event.kind == EntryKind.DIR else "file"
                    entries.append(
                        fs.Entry(
                            name=event.name, kind=kind, size=event.size, mtime_ns=event.mtime_ns
                        )
                    )
                elif isinstance(event, OperationDone):
                    return entries
                else:
                    raise event_error(event)

    async def listdir(self, path: str = "", *, recursive: bool = False) -> list[fs.Entry]:
        """Entries (name, kind, size, mtime_ns) under a remote directory, sorted by name."""
        path = fs.normalize_name(path, allow_empty=True)
        qsftp = self._protocol.qsftp
        return await self._entries(lambda sid: qsftp.send_list(sid, path, recursive=recursive))

    async def stat(self, path: str) -> fs.Entry:
        """One remote entry; ``""`` is the root."""
        path = fs.normalize_name(path, allow_empty=True)
        qsftp = self._protocol.qsftp
        entries = await self._entries(lambda sid: qsftp.send_stat(sid, path))
        if len(entries) != 1:
            raise TransportError(f"STAT answered {len(entries)} entries")
        return entries[0]


def resumable_upload_id(name: str, size: int) -> bytes:
    """The upload id of a resumable upload: the same for the same remote name and size, so
    that a later attempt (another process, after a crash) finds the partial file again."""
    return hashlib.sha256(f"qsftp-resume\0{name}\0{size}".encode()).digest()[:UPLOAD_ID_LEN]


def _prefix_digest(path: Path, count: int) -> bytes:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while count > 0:
            block = file.read(min(READ_BLOCK, count))
            if not block:
                break
            hasher.update(block)
            count -= len(block)
    return hasher.digest()


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")


def _open_local(path: Path) -> Any:
    try:
        file = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise LocalFileError(f"{path} is not a regular file")
    return file


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def client_configuration(
    host: str,
    *,
    cafile: str | os.PathLike[str] | None = None,
    max_datagram_size: int | None = None,
    congestion_control: str | None = None,
    receive_window: int | None = None,
    qlog_dir: str | os.PathLike[str] | None = None,
    engine: str | Engine | None = None,
) -> Any:
    """The QUIC settings of a qsftp/1 client (a ``QuicConfiguration`` of the engine's
    library); ``qlog_dir`` (created) receives qlog files."""
    quic_engine = get_engine(engine)
    configuration = quic_engine.configuration(
        is_client=True,
        alpn=ALPN,
        server_name=host,
        max_stream_data=receive_window or RECEIVE_WINDOW,
        max_datagram_size=max_datagram_size,
        congestion_control=congestion_control,
    )
    if cafile is not None:
        quic_engine.load_verify_locations(configuration, os.fspath(cafile))
    if qlog_dir is not None:
        configuration.quic_logger = QlogWriter(qlog_dir, engine=quic_engine)
    return configuration


def _ticket_to_offer(
    ticket: Ticket | None,
    host: str,
    port: int,
    *,
    insecure: bool,
    pin: str | None,
    known_hosts: trust.KnownHosts,
    cafile_sha256: str | None,
) -> Ticket | None:
    """``ticket`` if it may be offered to ``host:port`` under this trust policy, else None.
    Never with ``insecure``: there is no policy to hold the stored identity to, and a ticket
    is single-use, so spending it here would only cost a later verified connection its
    resumption."""
    if ticket is None or insecure:
        return None
    reason = policy_refusal(
        ticket, host, port, pin=pin, known_hosts=known_hosts, cafile_sha256=cafile_sha256
    )
    if reason is not None:
        logger.info("full handshake with %s:%d: %s", host, port, reason)
        return None
    return ticket


def _handshake_error(protocol: _ClientProtocol, host: str, port: int, cafile: Any) -> QsftpError:
    where = f"{host}:{port}"
    error = protocol.transport_error
    if error is not None:
        if isinstance(error, ConnectionRefusedError):
            return TransportError(f"connection refused by {where} (is a qsftp server running?)")
        return TransportError(f"cannot reach {where}: {error.strerror or error}")
    event = protocol.terminated
    if event is not None and event.error_code == _NO_APPLICATION_PROTOCOL:
        return TransportError(f"{where} does not speak {ALPN}")
    if event is not None and _CRYPTO_ERROR_MIN <= event.error_code <= _CRYPTO_ERROR_MAX:
        if cafile is not None:
            return TrustError(
                f"certificate of {where} not trusted by {cafile}: {event.reason_phrase}"
            )
        return TransportError(f"TLS handshake with {where} failed: {event.reason_phrase}")
    return TransportError(f"handshake with {where} failed: {protocol.termination_text()}")


@dataclass(frozen=True, slots=True, kw_only=True)
class _TrustPolicy:
    """How connect() decides to trust a server (see trust.check_peer)."""

    pin: str | None
    insecure: bool
    known_hosts: str | os.PathLike[str] | None
    cafile: str | os.PathLike[str] | None


def _check_peer(
    protocol: ClientSession, host: str, port: int, policy: _TrustPolicy
) -> trust.TrustDecision:
    """Trust decision on the certificate the handshake presented."""
    return trust.check_peer(
        host,
        port,
        protocol.peer_certificate(),
        pin=policy.pin,
        known_hosts=trust.KnownHosts(Path(policy.known_hosts) if policy.known_hosts else None),
        insecure=policy.insecure,
        cafile_verified=policy.cafile is not None,
    )


@contextlib.asynccontextmanager
async def _session(
    protocol: ClientSession,
    host: str,
    port: int,
    *,
    token: str | None,
    decision: trust.TrustDecision,
    timeout: float,
    handshake_ms: float,
    configuration: Any,
    session_resumed: bool = False,
    ticket_sink: TicketSink | None = None,
) -> AsyncIterator[Connection]:
    """After the handshake and the trust decision, on either transport: open the session (the
    token goes out only to a trusted server); on exit, the graceful CONN_TERMINATE exchange."""
    if decision.message:
        logger.warning("%s", decision.message)
    started = time.perf_counter()
    protocol.qsftp.request_session(token=token or "", client=f"qsftp/{__version__}")
    protocol.flush()
    try:
        async with asyncio.timeout(timeout):
            accepted = await protocol.session
    except TimeoutError:
        raise ConnectTimeout(f"{host}:{port} did not open a session in {timeout:g} s") from None
    session_ms = (time.perf_counter() - started) * 1000.0
    yield Connection(
        protocol,
        host=host,
        port=port,
        trust_decision=decision,
        handshake_ms=handshake_ms,
        session_ms=session_ms,
        server=accepted.server,
        configuration=configuration,
        session_resumed=session_resumed,
        ticket_sink=ticket_sink,
    )
    if protocol.terminated is None and protocol.qsftp.session_open:
        protocol.qsftp.terminate()
        protocol.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_TERMINATE_TIMEOUT):
                await protocol.terminate_answered.wait()


@contextlib.asynccontextmanager
async def _connect_tcp(
    host: str,
    port: int,
    *,
    token: str | None,
    policy: _TrustPolicy,
    timeout: float,
    congestion_control: str | None,
    receive_window: int,
) -> AsyncIterator[Connection]:
    started = time.perf_counter()
    protocol = await tcp.open_connection(
        lambda: _TcpClientProtocol(receive_window=receive_window),
        host,
        port,
        cafile=policy.cafile,
        timeout=timeout,
        congestion_control=congestion_control,
    )
    try:
        handshake_ms = (time.perf_counter() - started) * 1000.0
        async with _session(
            protocol,
            host,
            port,
            token=token,
            decision=_check_peer(protocol, host, port, policy),
            timeout=timeout,
            handshake_ms=handshake_ms,
            configuration=None,
        ) as conn:
            yield conn
    finally:
        await protocol.shutdown()


@contextlib.asynccontextmanager
async def connect(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    token: str | None = None,
    cafile: str | os.PathLike[str] | None = None,
    pin: str | None = None,
    insecure: bool = False,
    known_hosts: str | os.PathLike[str] | None = None,
    timeout: float = CONNECT_TIMEOUT,
    max_datagram_size: int | None = None,
    congestion_control: str | None = None,
    receive_window: int | None = None,
    qlog_dir: str | os.PathLike[str] | None = None,
    session_ticket: Ticket | None = None,
    tickets: TicketCache | None = None,
    transport: str = "quic",
    engine: str | Engine | None = None,
) -> AsyncIterator[Connection]:
    """Open a verified, authenticated qsftp/1 session; close it gracefully on exit.

    ``transport="tcp"`` carries the same session over TLS 1.3 on TCP (:mod:`qsftp.tcp`), with
    the same trust checks and token; ``congestion_control`` then names a Linux TCP algorithm
    and ``max_datagram_size`` / ``qlog_dir`` / ``engine`` do not apply (giving one is a
    UsageError).

    ``engine`` is the QUIC library of this side, ``"aioquic"`` (None: the default) or
    ``"qh3"`` (``pip install qsftp[qh3]``); either talks to a server running either.

    ``receive_window`` is the flow-control credit, in bytes, a stream may run ahead of what
    this side has written to disk (default RECEIVE_WINDOW, 2 MiB): it bounds memory per
    download and, over a long fat path, throughput (at most one window per round trip).

    ``qlog_dir`` (created if missing) receives this side's qlog trace of the connection,
    ``<ODCID>.qlog``, written when the connection closes (``Connection.qlog_path``).

    Session resumption (:mod:`qsftp.tickets`): ``session_ticket`` (a ``Connection.
    session_ticket`` of an earlier connection) or ``tickets`` (a :class:`TicketCache`, which
    also keeps the tickets this connection receives) offer a ticket in the handshake, but only
    when the server identity stored with it satisfies this connection's pin / CA file / known
    hosts; ``Connection.session_resumed`` says whether the server accepted it.
    """
    if insecure and (pin or cafile):
        raise UsageError("--insecure cannot be combined with --pin or --cafile")
    if pin is not None:
        pin = trust.normalize_fingerprint(pin)
    policy = _TrustPolicy(pin=pin, insecure=insecure, known_hosts=known_hosts, cafile=cafile)
    if transport == "tcp":
        if max_datagram_size is not None or qlog_dir is not None or engine is not None:
            raise UsageError(
                "max_datagram_size, qlog_dir and engine are QUIC options (transport='tcp')"
            )
        async with _connect_tcp(
            host,
            port,
            token=token,
            policy=policy,
            timeout=timeout,
            congestion_control=congestion_control,
            receive_window=receive_window or RECEIVE_WINDOW,
        ) as conn:
            yield conn
        return
    if transport != "quic":
        raise UsageError(f"transport must be 'quic' or 'tcp', not {transport!r}")
    quic_engine = get_engine(engine)
    quic_engine.warm()
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve {host}: {exc.strerror}") from exc
    family, _, _, _, addr = infos[0]
    configuration = client_configuration(
        host,
        cafile=cafile,
        max_datagram_size=datagram_size_for(str(addr[0]), max_datagram_size),
        congestion_control=congestion_control,
        receive_window=receive_window,
        qlog_dir=qlog_dir,
        engine=quic_engine,
    )
    known = trust.KnownHosts(Path(known_hosts) if known_hosts else None)
    cafile_sha256 = cafile_digest(cafile) if cafile is not None else None
    if session_ticket is None and tickets is not None:
        session_ticket = tickets.get(host, port)
    offered = _ticket_to_offer(
        session_ticket,
        host,
        port,
        insecure=insecure,
        pin=pin,
        known_hosts=known,
        cafile_sha256=cafile_sha256,
    )
    if offered is not None:
        configuration.session_ticket = quic_engine.session_ticket(offered.session_ticket)
    sink = TicketSink(host, port, tickets, cafile_sha256=cafile_sha256)
    quic = quic_engine.connection(configuration, session_ticket_handler=sink.received)
    # A connected socket, so an ICMP "port unreachable" fails the handshake at once.
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot reach {host}:{port}: {exc.strerror}") from exc
    batch: set[QsftpProtocol] = set()
    protocol = quic_engine.protocol_class(_ClientProtocol)(quic, batch=batch)
    endpoint = DatagramEndpoint(
        sock,
        receive=protocol.datagram_received,
        after_batch=lambda: transmit_batch(batch),
        error=protocol.error_received,
    )
    protocol.connection_made(endpoint)  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        protocol.connect(addr)
        try:
            async with asyncio.timeout(timeout):
                if protocol.terminated is not None:
                    raise ConnectionError  # refused while the first flight was still going out
                await protocol.wait_connected()
        except TimeoutError:
            protocol.abandon_connect_waiter()
            raise ConnectTimeout(
                f"no answer from {host}:{port} within {timeout:g} s (is a qsftp server running?)"
            ) from None
        except ConnectionError:
            raise _handshake_error(protocol, host, port, cafile) from None
        handshake_ms = (time.perf_counter() - started) * 1000.0
        # A resumed handshake has no certificate: the identity stored with the ticket stands in.
        resumed = quic_engine.session_resumed(quic)
        if resumed and offered is not None:
            decision = check_resumed(
                offered, host, port, pin=pin, known_hosts=known, cafile_sha256=cafile_sha256
            )
        else:
            decision = _check_peer(protocol, host, port, policy)
        sink.trusted(decision)
        async with _session(
            protocol,
            host,
            port,
            token=token,
            decision=decision,
            timeout=timeout,
            handshake_ms=handshake_ms,
            configuration=configuration,
            session_resumed=resumed,
            ticket_sink=sink,
        ) as conn:
            yield conn
    finally:
        # close() sends CONNECTION_CLOSE at once. aioquic would then linger for three probe
        # timeouts (~100 ms on loopback) before reporting the connection closed; the session
        # is already over (CONN_TERMINATE was answered), so the socket goes now.
        protocol.close()
        protocol.discard()
        endpoint.close()
        # Discarding skips the end of aioquic's close, where it would write the qlog trace.
        if isinstance(configuration.quic_logger, QlogWriter):
            configuration.quic_logger.end_open_traces()


# --- one-shot helpers -------------------------------------------------------------------------


async def upload_striped(
    connections: list[Connection],
    path: str | os.PathLike[str],
    remote_name: str | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> TransferResult:
    """Upload one file as byte ranges over several connections at once.

    The file is cut into blocks of :data:`STRIPE_BLOCK` (fewer, larger ones for a file under
    ``STRIPE_BLOCK`` × connections), taken in file order by whichever connection is ready for
    one, so the connections move through the file side by side and a faster one takes more;
    each sends its blocks one after another, starting the next as soon as the previous one is
    queued. The server writes every block in place into one hidden partial file
    and keeps a running SHA-256 of its contiguous beginning (fs.PrefixHash), so that the COMMIT
    on the first connection, sent when every block is stored, finds the whole file hashed; it
    compares that digest with the SHA-256 computed here (in a worker thread, while the blocks
    travel) and renames the file.
    """
    _check_chunk_size(chunk_size)
    if not connections:
        raise UsageError("no connections to stripe over")
    local = Path(path)
    name = fs.normalize_name(remote_name if remote_name is not None else local.name)
    with _open_local(local) as probe:
        size = os.fstat(probe.fileno()).st_size
    first = connections[0]
    upload_id = secrets.token_bytes(UPLOAD_ID_LEN)
    # Blocks are whole multiples of READ_BLOCK, so every disk read stays aligned.
    per = min(STRIPE_BLOCK, -(-size // len(connections) // READ_BLOCK) * READ_BLOCK) or READ_BLOCK
    blocks = [(offset, min(per, size - offset)) for offset in range(0, size, per)] or [(0, 0)]
    started_at = _now_iso()
    stats_start = [conn.stats() for conn in connections]
    cpu_start = cpu_time()
    started = time.perf_counter()
    whole = asyncio.ensure_future(asyncio.to_thread(fs.sha256_file, local))
    whole.add_done_callback(consume_result)  # a failure is raised where it is awaited

    queue = iter(blocks)  # shared: each connection takes the next block when it is ready

    async def send_blocks(conn: Connection) -> list[int]:
        """Blocks from the queue over ``conn``, one after another; the server CPU µs of each."""
        async with asyncio.TaskGroup() as tasks:
            running = []
            for offset, length in queue:
                sent = asyncio.Event()
                task = tasks.create_task(
                    conn._upload_range(
                        local,
                        name=name,
                        total_size=size,
                        offset=offset,
                        length=length,
                        upload_id=upload_id,
                        chunk_size=chunk_size,
                        progress=progress,
                        sent=sent,
                        checked=False,  # PUT_BLOCK: COMMIT checks the whole file
                    )
                )
                running.append(task)
                queued = asyncio.ensure_future(sent.wait())
                try:
                    await asyncio.wait([task, queued], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    queued.cancel()
        return [task.result() for task in running]

    try:
        per_connection = await _gather_ranges([send_blocks(conn) for conn in connections])
        digest = bytes.fromhex(await whole)
        done = await first._finish_striped(
            name=name, total_size=size, upload_id=upload_id, sha256=digest
        )
    except BaseException:
        whole.cancel()
        with contextlib.suppress(QsftpError, asyncio.CancelledError):
            await asyncio.shield(
                first._finish_striped(name=name, total_size=size, upload_id=upload_id, sha256=None)
            )
        raise
    seconds = time.perf_counter() - started
    stats_end = [conn.stats() for conn in connections]
    spans = list(zip(stats_start, stats_end, strict=True))
    # Each block's figure is the server process's CPU while it was handled, so blocks of
    # other connections served at the same time are in it too: summing every block would
    # count one process's CPU N times. A connection's own blocks follow one another, so the
    # busiest connection's sum is about the process's CPU over the transfer.
    server_us = max(sum(done) for done in per_connection) + done.server_cpu_us
    return TransferResult(
        op="upload",
        name=name,
        local_path=str(local),
        size=size,
        seconds=seconds,
        sha256=digest.hex(),
        verified=True,
        chunk_size=chunk_size,
        handshake_ms=first.handshake_ms,
        session_ms=first.session_ms,
        smoothed_rtt_ms=stats_end[0].smoothed_rtt_ms,
        packets_sent=sum(e.packets_sent - b.packets_sent for b, e in spans),
        packets_lost=sum(e.packets_lost - b.packets_lost for b, e in spans),
        client_cpu_s=cpu_time() - cpu_start,
        server_cpu_s=server_us / 1e6,
        max_datagram_size=first.max_datagram_size,
        congestion_control=first.congestion_control,
        started_at=started_at,
        connections=len(connections),
        qlog_path=first.qlog_path,
        transport=first.transport,
        engine=first.engine,
    )


async def _gather_ranges(jobs: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the range uploads together; the first failure cancels the rest and is raised as it
    is (not wrapped in an exception group)."""
    try:
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(job) for job in jobs]
    except BaseExceptionGroup as group:
        first = _flatten(group)[0]
        raise first from None
    return [task.result() for task in running]


@contextlib.asynccontextmanager
async def connect_many(
    count: int, host: str, port: int, **options: Any
) -> AsyncIterator[list[Connection]]:
    """Open ``count`` connections to one server at once (for striping)."""
    async with contextlib.AsyncExitStack() as stack:
        opened = await asyncio.gather(
            *(stack.enter_async_context(connect(host, port, **options)) for _ in range(count))
        )
        yield list(opened)


async def upload(
    path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    remote_name: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    connections: int = 1,
    resume: bool = False,
    retries: int = 0,
    **options: Any,
) -> TransferResult:
    """Connect, upload one file, verify, disconnect. ``options`` go to :func:`connect`.

    ``connections`` > 1 stripes the file over that many connections (:func:`upload_striped`).
    ``resume`` makes the upload resumable (see :meth:`Connection.upload`); with ``retries``
    > 0 a connection that fails or is lost (a server restart, a cut link) is opened again,
    after 0.5, 1, 2, 4, 8 … s, and the upload continues where the server's copy stops.
    """
    if connections > 1:
        async with connect_many(connections, host, port, **options) as conns:
            return await upload_striped(conns, path, remote_name, chunk_size=chunk_size)

    async def attempt(conn: Connection) -> TransferResult:
        return await conn.upload(path, remote_name, chunk_size=chunk_size, resume=resume)

    return await _with_retries(attempt, host, port, retries if resume else 0, options)


async def download(
    remote_name: str,
    dest: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resume: bool = False,
    retries: int = 0,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> TransferResult:
    """Connect, download one file, verify, disconnect. ``options`` go to :func:`connect`.

    ``resume`` makes the download resumable (see :meth:`Connection.download`); with
    ``retries`` > 0 a connection that fails or is lost is opened again, after 0.5, 1, 2, 4,
    8 … s, and the download continues from what the local partial file holds.
    """

    async def attempt(conn: Connection) -> TransferResult:
        return await conn.download(
            remote_name, dest, chunk_size=chunk_size, progress=progress, resume=resume
        )

    return await _with_retries(attempt, host, port, retries if resume else 0, options)


async def _with_retries(
    attempt: Callable[[Connection], Coroutine[Any, Any, TransferResult]],
    host: str,
    port: int,
    retries: int,
    options: dict[str, Any],
) -> TransferResult:
    """Run ``attempt`` on a new connection; after a TransportError (a refused or lost
    connection) try again on another, up to ``retries`` times, with doubling waits."""
    tries = 0
    while True:
        try:
            async with connect(host, port, **options) as conn:
                return await attempt(conn)
        except TransportError as exc:
            if tries >= retries:
                raise
            delay = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_FIRST * 2**tries)
            tries += 1
            logger.warning("%s; retrying in %.1f s (%d/%d)", exc, delay, tries, retries)
            await asyncio.sleep(delay)


async def listdir(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    path: str = "",
    *,
    recursive: bool = False,
    **options: Any,
) -> list[fs.Entry]:
    """Connect and list a remote directory. ``options`` go to :func:`connect`."""
    async with connect(host, port, **options) as conn:
        return await conn.listdir(path, recursive=recursive)


# --- command line -----------------------------------------------------------------------------

# Exit statuses of the CLI, one per failure class (README lists them).
EXIT_OK = 0
EXIT_FAILED = 1  # an operation failed for another reason
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_TRUST = 4
EXIT_AUTH = 5
EXIT_LOCAL_FILE = 6
EXIT_BAD_PATH = 7
EXIT_NOT_FOUND = 8
EXIT_CHECKSUM = 9

_EXIT_FOR: list[tuple[type[QsftpError], int]] = [
    (UsageError, EXIT_USAGE),
    (TransportError, EXIT_CONNECT),
    (TrustError, EXIT_TRUST),
    (AuthFailed, EXIT_AUTH),
    (LocalFileError, EXIT_LOCAL_FILE),
    (BadPath, EXIT_BAD_PATH),
    (NotFound, EXIT_NOT_FOUND),
    (ChecksumMismatch, EXIT_CHECKSUM),
]


def exit_status(error: QsftpError) -> int:
    """The CLI exit status for ``error``."""
    for cls, status in _EXIT_FOR:
        if isinstance(error, cls):
            return status
    return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.client",
        description="Upload files to, download from, or list a QSFTP server.",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="files or directories to upload")
    parser.add_argument("--as", dest="remote_name", metavar="NAME", help="remote name (one FILE)")
    parser.add_argument("--get", metavar="NAME", help="download a remote file or directory")
    parser.add_argument("-o", "--output", metavar="DEST", help="where --get writes (default: .)")
    parser.add_argument(
        "--list", nargs="?", const="", default=None, metavar="DIR", help="list a remote directory"
    )
    parser.add_argument("--host", default="127.0.0.1", help="server address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (5000)")
    parser.add_argument("--token", help="authentication token (default: $QSFTP_TOKEN)")
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="DATA frame size, bytes"
    )
    parser.add_argument("--max-datagram-size", type=int, help="QUIC datagram size, bytes")
    parser.add_argument("--qlog-dir", metavar="DIR", help="write a qlog trace per connection here")
    parser.add_argument(
        "--transport",
        choices=["quic", "tcp"],
        default="quic",
        help="QUIC (default), or TLS 1.3 over TCP to a server started with --transport tcp/both",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="QUIC library: aioquic (default) or qh3 (pip install qsftp[qh3]); QUIC only",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resumable transfers: continue an interrupted upload or download (--get); "
        "reconnect if the link drops",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        metavar="N",
        help="stripe uploads of files >= 8 MiB over N connections (default 1)",
    )
    trust_group = parser.add_mutually_exclusive_group()
    trust_group.add_argument("--cafile", help="trust only certificates issued by this PEM file")
    trust_group.add_argument("--pin", metavar="SHA256", help="expected certificate fingerprint")
    trust_group.add_argument(
        "--insecure", action="store_true", help="do NOT verify the server (testing only)"
    )
    parser.add_argument("--known-hosts", help="trust-on-first-use file (default: user config)")
    parser.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT, help="connect timeout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    parser.add_argument("--json", action="store_true", help="one JSON object per transfer")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    return parser


def _human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class _Cli:
    """State of one CLI run: output mode, failures seen, progress bars."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.status = EXIT_OK
        self.show_progress = not (args.quiet or args.json) and sys.stderr.isatty()

    def fail(self, error: QsftpError, what: str = "") -> None:
        prefix = f"{what}: " if what else ""
        _out(f"qsftp: error: {prefix}{error}", err=True)
        if self.status == EXIT_OK:
            self.status = exit_status(error)

    def report(self, result: TransferResult) -> None:
        if self.args.json:
            fields = (
                "op",
                "name",
                "local_path",
                "size",
                "seconds",
                "sha256",
                "verified",
                "resumed_bytes",
            )
            record = {key: getattr(result, key) for key in fields}
            record["mb_s"] = round(result.throughput_mb_s, 3)
            _out(json.dumps(record))
        elif not self.args.quiet:
            arrow = "→" if result.op == "upload" else "←"
            _out(
                f"{result.op} {result.local_path} {arrow} {result.name}: "
                f"{_human_size(result.size)} in {result.seconds:.2f} s "
                f"({result.throughput_mb_s:.1f} MB/s), sha256 {result.sha256[:16]}… verified"
            )

    @contextlib.contextmanager
    def progress(self, label: str, total: int | None) -> Any:
        if not self.show_progress:
            yield None
            return
        with tqdm(
            total=total, desc=label, unit="B", unit_scale=True, leave=False, file=sys.stderr
        ) as bar:
            yield bar.update


def _out(text: str, *, err: bool = False) -> None:
    """The CLI's only way to print: one line to stdout (results) or stderr (failures)."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _upload_plan(files: list[str], remote_name: str | None) -> list[tuple[Path, str]]:
    plan: list[tuple[Path, str]] = []
    for item in files:
        path = Path(item)
        if path.is_dir():
            base = remote_name or path.resolve().name
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for filename in sorted(filenames):
                    full = Path(dirpath) / filename
                    rel = full.relative_to(path).as_posix()
                    plan.append((full, f"{base}/{rel}"))
        else:
            plan.append((path, remote_name or path.name))
    return plan


async def _run_transfers(cli: _Cli, jobs: list[Callable[[], Any]]) -> None:
    limit = asyncio.Semaphore(PARALLEL_TRANSFERS)

    async def run(job: Callable[[], Any]) -> None:
        async with limit:
            await job()

    async with asyncio.TaskGroup() as tasks:
        for job in jobs:
            tasks.create_task(run(job))


async def _cli_main(cli: _Cli) -> None:
    args = cli.args
    options: dict[str, Any] = {
        "token": args.token or os.environ.get("QSFTP_TOKEN") or None,
        "cafile": args.cafile,
        "pin": args.pin,
        "insecure": args.insecure,
        "known_hosts": args.known_hosts,
        "timeout": args.timeout,
        "max_datagram_size": args.max_datagram_size,
        "qlog_dir": args.qlog_dir,
        "transport": args.transport,
        "engine": args.engine,
    }
    if args.connections < 1:
        raise UsageError("--connections must be at least 1")
    count = args.connections if args.files else 1
    async with connect_many(count, args.host, args.port, **options) as conns:
        conn = conns[0]
        if args.list is not None:
            for entry in await conn.listdir(args.list):
                when = datetime.datetime.fromtimestamp(entry.mtime_ns / 1e9)
                suffix = "/" if entry.kind == "dir" else ""
                _out(f"{entry.size:>14}  {when:%Y-%m-%d %H:%M}  {entry.name}{suffix}")
            return
        if args.get is not None:
            await _cli_download(cli, conn, args.get, args.output, options)
            return
        plan = _upload_plan(args.files, args.remote_name)

        def job(path: Path, name: str) -> Callable[[], Any]:
            async def go() -> None:
                try:
                    size = await asyncio.to_thread(_size_or_none, path)
                    with cli.progress(name, size) as update:
                        if args.resume:
                            result = await upload(
                                path,
                                args.host,
                                args.port,
                                remote_name=name,
                                chunk_size=args.chunk_size,
                                resume=True,
                                retries=RESUME_RETRIES,
                                **options,
                            )
                        elif len(conns) > 1 and (size or 0) >= STRIPE_MIN_SIZE:
                            result = await upload_striped(
                                conns, path, name, chunk_size=args.chunk_size, progress=update
                            )
                        else:
                            result = await conn.upload(
                                path, name, chunk_size=args.chunk_size, progress=update
                            )
                    cli.report(result)
                except (OperationError, LocalFileError, UsageError) as exc:
                    cli.fail(exc, str(path))

            return go

        await _run_transfers(cli, [job(path, name) for path, name in plan])


async def _cli_download(
    cli: _Cli, conn: Connection, name: str, output: str | None, options: dict[str, Any]
) -> None:
    args = cli.args
    entry = await conn.stat(name)
    if entry.kind == "file":
        dest = Path(output) if output else None
        with cli.progress(name, entry.size) as update:
            if args.resume:  # on a connection of its own, opened again if it is lost
                result = await download(
                    name,
                    dest,
                    args.host,
                    args.port,
                    chunk_size=args.chunk_size,
                    resume=True,
                    retries=RESUME_RETRIES,
                    progress=update,
                    **options,
                )
            else:
                result = await conn.download(
                    name, dest, chunk_size=args.chunk_size, progress=update
                )
            cli.report(result)
        return
    # A directory: every file below it, into DEST/<basename>/...; names from the server are
    # untrusted, so each is validated again before it becomes a local path.
    base = Path(output) if output else Path(".")
    top = base / (name.rsplit("/", 1)[-1] or "root")
    prefix = f"{entry.name}/" if entry.name else ""
    jobs: list[Callable[[], Any]] = []
    for item in await conn.listdir(name, recursive=True):
        rel = fs.normalize_name(item.name[len(prefix) :] if item.name.startswith(prefix) else "")
        local = top.joinpath(*rel.split("/"))
        if item.kind == "dir":
            local.mkdir(parents=True, exist_ok=True)
            continue

        def job(remote: str = item.name, local: Path = local) -> Callable[[], Any]:
            async def go() -> None:
                try:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    cli.report(
                        await conn.download(
                            remote, local, chunk_size=args.chunk_size, resume=args.resume
                        )
                    )
                except (OperationError, LocalFileError) as exc:
                    cli.fail(exc, remote)

            return go

        jobs.append(job())
    top.mkdir(parents=True, exist_ok=True)
    await _run_transfers(cli, jobs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qsftp.client``."""
    parser = _parser()
    args = parser.parse_args(argv)
    modes = sum((bool(args.files), args.get is not None, args.list is not None))
    if modes != 1:
        parser.error("give FILEs to upload, or --get NAME, or --list [DIR] (exactly one)")
    if args.remote_name and (len(args.files) != 1):
        parser.error("--as names exactly one FILE")
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    cli = _Cli(args)
    try:
        run(_cli_main(cli))
    except KeyboardInterrupt:
        _out("qsftp: interrupted", err=True)
        return 130
    except (QsftpError, ExceptionGroup) as exc:
        for error in _flatten(exc):
            if not isinstance(error, QsftpError):
                raise
            cli.fail(error)
    return cli.status


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _flatten(inner)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
