"""The QSFTP server: ``async with serve(root) as server`` and ``python -m qsftp.server``.

Every operation runs as one handler task in the server's TaskGroup. Handlers never let an
exception escape: an :class:`~qsftp.errors.OperationError` becomes an ERROR message with its
code, anything unexpected is logged and answered with INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

from . import __version__, fs, tcp, trust
from .engine import AIOQUIC, ENGINES, Engine, get_engine
from .errors import (
    BadRequest,
    ChecksumMismatch,
    ErrorCode,
    LocalFileError,
    NoSpace,
    OperationError,
    QsftpError,
    TooLarge,
    TransportError,
    UsageError,
)
from .protocol import (
    AbortRequested,
    CommitRequested,
    ControlState,
    DataReceived,
    Event,
    GetFromRequested,
    GetRequested,
    ListRequested,
    ProbeRequested,
    ProtocolViolation,
    PutRangeRequested,
    PutRequested,
    Role,
    SessionRequested,
    StatRequested,
    TerminateReceived,
    UploadEnded,
)
from .reset import StatelessReset
from .session import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    RECEIVE_WINDOW,
    Channel,
    QlogWriter,
    QsftpProtocol,
    SessionBase,
    cpu_time,
    datagram_size_for,
    event_error,
    is_loopback,
    loop_name,
    receive_body,
    run,
    send_body,
    transmit_batch,
)
from .tickets import TicketStore
from .udp import DatagramEndpoint
from .wire import ALPN, PROTOCOL_VERSION, EntryKind

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PORT",
    "DEFAULT_ROOT",
    "FS_THREADS",
    "Limits",
    "QsftpServer",
    "SMALL_UPLOAD_MAX",
    "main",
    "serve",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 5000  # the prototype's port, kept
DEFAULT_ROOT = "received"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one server accepts; every limit has a default (docs/SECURITY.md lists them)."""

    max_file_size: int = 1 << 40
    "Largest upload, bytes: 1 TiB is no practical limit, but absurd sizes fail before a byte."
    max_connections: int = 256
    "Sessions open at once; more are refused with BUSY. Each costs ~100 KB plus its transfers."
    max_operations: int = 64
    "Operations at once on one connection (QUIC allows 128 streams); more get BUSY."
    session_deadline: float = 10.0
    "Seconds from a connection's first packet to its CONN_REQUEST; silent connections close."
    idle_timeout: float = 60.0
    "QUIC idle timeout, seconds: a peer that sends nothing for this long is dropped."
    free_space_reserve: int = 64 * 1024 * 1024
    "An upload must leave this much free space on the root's file system, bytes."
    partial_ttl: float = 24 * 3600.0
    "Partial files (interrupted or abandoned uploads) untouched this long are deleted, s."


DEFAULT_LIMITS = Limits()
# How often stale partial files are looked for (at most; a short partial_ttl checks sooner).
_EXPIRY_PERIOD = 3600.0
# How long a worker process may take to print its ready line, and to stop.
_WORKER_START_TIMEOUT = 30.0
_WORKER_STOP_TIMEOUT = 10.0
# serve(transport="both", port=0): UDP ports tried until the same TCP port is free too.
_PORT_ATTEMPTS = 5
# A client whose session was refused gets this long to read the ERROR before we close.
_REJECT_GRACE = 1.0
# An upload declaring at most this many bytes is gathered in memory and stored by one call in a
# worker thread (Root.store) instead of a thread hop to create the file, one per written block
# and one to commit: a burst of small files costs the server per file, not per byte. It is well
# below the receive window (RECEIVE_WINDOW), so the body arrives without waiting for credit and
# buffering it holds no more than the window already lets a client queue on the stream.
SMALL_UPLOAD_MAX = 256 * 1024
# Threads of the server's own pool for blocking file-system work (creating, storing and
# committing uploads). A commit holds its thread for an fsync (~2 ms on this project's disk):
# with asyncio's default pool (min(32, cores + 4) threads: 6 on 2 cores) the commits of 32
# concurrent small uploads queued behind each other. Concurrent fsyncs on one file system
# share journal commits, and the directory fsyncs are grouped (fs.sync_directory), so more
# threads in flight is group commit, not more disk work (Root.store of 4 KiB files from a
# bare thread pool here: ~2000 files/s with 6 threads, ~2800 with 16 to 64). The pool is the
# server's own: the loop's default executor belongs to the application (in a notebook, the
# kernel's loop).
FS_THREADS = 32
_SERVER_NAME = f"qsftp/{__version__}"
_KINDS = {"file": EntryKind.FILE, "dir": EntryKind.DIR}


def _refuse_anonymous(host: str) -> NoReturn:
    raise UsageError(
        f"refusing to serve {host} without a token: set one (--token or QSFTP_TOKEN) "
        "or pass --allow-anonymous"
    )


class QsftpServer:
    """A running server (from :func:`serve`)."""

    def __init__(
        self,
        *,
        root: fs.Root,
        token: str | None,
        certfile: Path,
        keyfile: Path,
        fingerprint: str,
        limits: Limits,
        tickets: TicketStore | None = None,
        engine: Engine = AIOQUIC,
    ) -> None:
        self.root = root
        self.tickets = tickets
        "Session tickets this server issued (None: it issues none, every handshake is full)."
        self.engine = engine.name
        "QUIC library of this server's QUIC listener: ``aioquic`` or ``qh3``."
        self._engine = engine
        self._protocol_class = engine.protocol_class(_ServerProtocol)
        self.certfile = certfile
        self._keyfile = keyfile
        self._reset = StatelessReset.from_key_file(keyfile)
        self.fingerprint = fingerprint
        self.limits = limits
        self.sessions: set[SessionBase] = set()
        self.host = ""
        self.port = 0
        self._token = token
        self._tasks: asyncio.TaskGroup | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._quic: Any = None  # the engine's QuicServer
        self._batch: set[QsftpProtocol] = set()
        self._qlog: QlogWriter | None = None
        self._tcp: asyncio.Server | None = None
        self.tcp_sessions: set[tcp.TcpSession] = set()
        "Open TCP connections (sessions or not yet), closed when the server stops."
        self.transports: tuple[str, ...] = ()
        "What the server listens with: ``('quic',)``, ``('tcp',)`` or ``('quic', 'tcp')``."
        self.fs_pool = ThreadPoolExecutor(max_workers=FS_THREADS, thread_name_prefix="qsftp-fs")
        """Threads for the server's blocking file-system work (:data:`FS_THREADS`), shut down
        when the server closes; :meth:`run_fs` runs a call on them."""

    def __repr__(self) -> str:
        return f"<QsftpServer {self.host}:{self.port} root={self.root.path}>"

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets), for display."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _create_protocol(self, quic: Any, stream_handler: Any = None) -> QsftpProtocol:
        self._engine.adopt_reset_tokens(quic, self._reset)
        return self._protocol_class(quic, stream_handler, server=self, batch=self._batch)

    def _datagram_received(self, data: bytes, addr: Any) -> None:
        """Every datagram for the QUIC port: a short-header packet for a connection this
        process does not know (it restarted, or the connection ended) gets a stateless reset;
        the rest goes to the QUIC library. Only for engines whose tokens are derived
        (:attr:`Engine.derives_reset_tokens`): other tokens a restart cannot recompute."""
        quic = self._quic
        assert quic is not None
        cid_length = quic._configuration.connection_id_length
        if data and not data[0] & 0x80 and data[1 : 1 + cid_length] not in quic._protocols:
            reset = self._reset.packet_for(data, cid_length)
            if reset is not None and quic._transport is not None:
                quic._transport.sendto(reset, addr)
            return
        quic.datagram_received(data, addr)

    async def _listen(
        self,
        host: str,
        port: int,
        configuration: Any,
        *,
        reuse_port: bool,
        retry: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except (OSError, socket.gaierror) as exc:
            raise TransportError(f"cannot listen on {host}:{port}: {exc}") from exc
        try:
            if reuse_port:  # several worker processes share the port; the kernel spreads
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # clients by 4-tuple
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        # retry: QUIC address validation, one extra round trip before any state is kept
        # (always on with qh3, whose handshake with aioquic clients needs it).
        tickets = self.tickets
        quic = self._engine.server(
            configuration=configuration,
            create_protocol=self._create_protocol,
            retry=retry,
            session_ticket_fetcher=tickets.pop if tickets is not None else None,
            session_ticket_handler=tickets.add if tickets is not None else None,
        )
        endpoint = DatagramEndpoint(
            sock,
            receive=(
                self._datagram_received
                if self._engine.derives_reset_tokens
                else quic.datagram_received
            ),
            after_batch=lambda: transmit_batch(self._batch),
        )
        quic.connection_made(endpoint)
        self._quic = quic
        if isinstance(configuration.quic_logger, QlogWriter):
            self._qlog = configuration.quic_logger
        self.host, self.port = sock.getsockname()[:2]

    async def _listen_all(
        self,
        transport: str,
        host: str,
        port: int,
        configuration: Any,
        *,
        reuse_port: bool,
        retry: bool,
        receive_window: int,
        congestion_control: str | None,
    ) -> None:
        """Listen with QUIC, TCP or both; both share one port number (UDP and TCP)."""
        if transport not in ("quic", "tcp", "both"):
            raise UsageError(f"transport must be 'quic', 'tcp' or 'both', not {transport!r}")
        if transport == "quic":
            await self._listen(host, port, configuration, reuse_port=reuse_port, retry=retry)
            self.transports = ("quic",)
            return
        context = tcp.server_context(self.certfile, self._keyfile)

        def factory() -> tcp.TcpSession:
            return _TcpServerProtocol(server=self, receive_window=receive_window)

        if transport == "tcp":
            self._tcp = await tcp.listen(
                factory,
                host,
                port,
                context,
                reuse_port=reuse_port,
                congestion_control=congestion_control,
            )
            self.host, self.port = self._tcp.sockets[0].getsockname()[:2]
            self.transports = ("tcp",)
            return
        # Both: the UDP port first; with port 0 the kernel's choice may be taken on TCP, in
        # which case another UDP port is tried.
        for attempt in range(_PORT_ATTEMPTS):
            await self._listen(host, port, configuration, reuse_port=reuse_port, retry=retry)
            try:
                self._tcp = await tcp.listen(
                    factory,
                    host,
                    self.port,
                    context,
                    reuse_port=reuse_port,
                    congestion_control=congestion_control,
                )
                break
            except TransportError:
                assert self._quic is not None
                self._quic.close()
                self._quic = None
                if port != 0 or attempt == _PORT_ATTEMPTS - 1:
                    raise
        self.transports = ("quic", "tcp")

    async def run_fs(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run blocking file-system work (``func(*args, **kwargs)``) on the server's own
        threads (:data:`FS_THREADS`) and return its result."""
        call = functools.partial(func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.fs_pool, call)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run an operation handler in the server's TaskGroup."""
        if self._tasks is None or self._stopping.is_set():
            coro.close()
            return
        task = self._tasks.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        # The handler TaskGroup lives in a task of its own, so that an exception raised in the
        # body of ``async with serve()`` reaches the caller as it is, not wrapped in a group.
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self.spawn(self._expire_partials())
            ready.set_result(None)
            await self._stopping.wait()
            for task in list(self._running):
                task.cancel()

    async def _expire_partials(self) -> None:
        """At start and then periodically, delete partial files older than partial_ttl."""
        ttl = self.limits.partial_ttl
        while True:
            try:
                await asyncio.to_thread(self.root.remove_stale_partials, ttl)
            except (OSError, QsftpError) as exc:
                logger.warning("could not expire partial files: %s", exc)
            await asyncio.sleep(min(_EXPIRY_PERIOD, max(ttl / 4, 1.0)))

    def check_token(self, offered: str) -> bool:
        if not self._token:
            return True
        return hmac.compare_digest(offered.encode(), self._token.encode())

    async def _close(self, supervisor: asyncio.Task[None]) -> None:
        if self._quic is not None:
            self._quic.close()
        if self._tcp is not None:
            self._tcp.close()
            for session in list(self.tcp_sessions):
                session.close(0, "server shutting down")
        if self._qlog is not None:  # connections still closing will not finish: write them now
            self._qlog.end_open_traces()
        self._stopping.set()
        await supervisor
        # Handlers are gone, but file-system calls they started may still run (a thread cannot
        # be cancelled): refuse new ones, then wait for those before the root is closed.
        self.fs_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.fs_pool.shutdown, wait=True)
        await asyncio.sleep(0)  # let the transport release the port before we return


class ServerSession(SessionBase):
    """The server side of a qsftp/1 session, whatever transport carries it (a mixin): the
    session checks, the limits, and one handler task per operation."""

    role = Role.SERVER

    def _init_server(self, server: QsftpServer) -> None:
        self.server = server
        # A connection that has not asked for a session by then is closed: handshakes alone
        # must not hold server state forever.
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(
            server.limits.session_deadline, self._deadline_passed
        )

    def stack_name(self) -> str:
        """What carries the session, for the server's name in SESSION_OK: the QUIC engine
        (``aioquic`` or ``qh3``) or ``tcp``."""
        raise NotImplementedError

    def _deadline_passed(self) -> None:
        self._deadline = None
        if not self.qsftp.session_open and self.terminated is None:
            logger.info("closing a connection that opened no session in time")
            self.close(ErrorCode.AUTH_FAILED, "no session request in time")

    def _connection_lost(self, event: Any) -> None:
        super()._connection_lost(event)
        self.server.sessions.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_event(self, event: Event) -> None:
        qsftp = self.qsftp
        match event:
            case SessionRequested():
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None
                if event.version != PROTOCOL_VERSION:
                    self._reject(ErrorCode.BAD_REQUEST, f"unsupported version {event.version}")
                elif not self.server.check_token(event.token):
                    text = "invalid token" if event.token else "this server requires a token"
                    self._reject(ErrorCode.AUTH_FAILED, text)
                elif len(self.server.sessions) >= self.server.limits.max_connections:
                    self._reject(ErrorCode.BUSY, "too many connections; try again later")
                else:
                    self.server.sessions.add(self)
                    stack = f"{loop_name()}, {self.stack_name()}"
                    qsftp.accept_session(server=f"{_SERVER_NAME} ({stack})")
            case TerminateReceived():
                self.server.sessions.discard(self)  # the session is over: free its slot now
                if qsftp.control_state is ControlState.CLIENT_CLOSING:
                    qsftp.terminate()
            case (
                PutRequested()
                | GetRequested()
                | GetFromRequested()
                | ListRequested()
                | StatRequested()
                | PutRangeRequested()
                | CommitRequested()
                | AbortRequested()
                | ProbeRequested()
            ):
                if len(self.channels) >= self.server.limits.max_operations:
                    self._answer_error(
                        event.stream_id, ErrorCode.BUSY, "too many operations on this connection"
                    )
                    return
                channel = self.open_channel(event.stream_id)
                self.server.spawn(self._run(channel, event))
            case ProtocolViolation():
                self.stop_receiving(event.stream_id)
            case _:
                logger.debug("ignored %r", event)

    def _reject(self, code: ErrorCode, message: str) -> None:
        logger.info("session refused: %s", message)
        self.qsftp.reject_session(code, message)
        self.loop.call_later(_REJECT_GRACE, self.close, code, message)

    async def _run(self, channel: Channel, request: Event) -> None:
        stream_id = channel.stream_id
        try:
            match request:
                case PutRequested():
                    await self._put(channel, request)
                case GetRequested() | GetFromRequested():
                    await self._get(channel, request)
                case ListRequested():
                    await self._list(channel, request)
                case StatRequested():
                    await self._stat(channel, request)
                case PutRangeRequested():
                    await self._put_range(channel, request)
                case CommitRequested():
                    await self._commit(channel, request)
                case AbortRequested():
                    await self._abort(channel, request)
                case ProbeRequested():
                    await self._probe(channel, request)
        except OperationError as exc:
            logger.info("stream %d: %s: %s", stream_id, type(exc).__name__, exc.message)
            self._answer_error(stream_id, exc.error_code, exc.message)
        except TransportError as exc:
            # The connection is gone, or the stream stalled: nothing can be said on it any
            # more, so (if the connection still lives) reset it instead of leaving it open.
            logger.info("stream %d: %s", stream_id, exc)
            self.close_channel(channel, abort=True)
        except LocalFileError as exc:
            logger.warning("stream %d: %s", stream_id, exc)
            self._answer_error(stream_id, ErrorCode.INTERNAL, str(exc))
        except Exception:
            logger.exception("stream %d: unexpected failure", stream_id)
            self._answer_error(stream_id, ErrorCode.INTERNAL, "internal server error")
        finally:
            self.close_channel(channel)
            if self.terminated is None:
                self.flush()

    def _answer_error(self, stream_id: int, code: int, message: str) -> None:
        if self.terminated is not None:
            return
        self.qsftp.send_error(stream_id, code, message)
        if not self.receive_finished(stream_id):
            self.stop_receiving(stream_id)  # the client may still be sending: tell it to stop

    async def _put(self, channel: Channel, request: PutRequested) -> None:
        name = fs.normalize_name(request.name)
        self._check_size(request.size, writes=request.size)
        if request.size <= SMALL_UPLOAD_MAX:
            await self._put_small(channel, name, request.size)
            return
        server = self.server
        writer = await server.run_fs(server.root.create_writer, name, size=request.size)
        try:
            cpu_start = cpu_time()
            event = await channel.next_event()
            if isinstance(event, DataReceived):
                event = await receive_body(
                    self, channel, writer.write, first=event.data, executor=server.fs_pool
                )
            if not isinstance(event, UploadEnded):
                raise event_error(event)
            digest = await server.run_fs(writer.commit, expected_sha256=event.sha256.hex())
            logger.info("stored %s (%d bytes)", name, writer.bytes_written)
            self.qsftp.send_done(
                channel.stream_id,
                size=writer.bytes_written,
                sha256=bytes.fromhex(digest),
                server_cpu_us=round((cpu_time() - cpu_start) * 1e6),
            )
        finally:
            writer.abort()

    async def _put_small(self, channel: Channel, name: str, size: int) -> None:
        """A PUT of at most SMALL_UPLOAD_MAX bytes: the body is gathered in memory (credit
        returned as it is buffered) and stored by one Root.store call."""
        cpu_start = cpu_time()
        parts: list[bytes] = []
        received = 0
        event = await channel.next_event()
        while isinstance(event, DataReceived):
            more, count = channel.take_data(event.data, size + 1 - received)
            received += count
            if received > size:
                raise fs.too_large(name, size)
            parts += more
            self.consumed(channel.stream_id, count)
            event = await channel.next_event()
        if not isinstance(event, UploadEnded):
            raise event_error(event)
        server = self.server
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        digest = await server.run_fs(
            server.root.store, name, data, size=size, expected_sha256=event.sha256.hex()
        )
        logger.info("stored %s (%d bytes)", name, size)
        self.qsftp.send_done(
            channel.stream_id,
            size=size,
            sha256=bytes.fromhex(digest),
            server_cpu_us=round((cpu_time() - cpu_start) * 1e6),
        )

    def _check_size(self, size: int, *, writes: int) -> None:
        """``size`` is the whole file's; ``writes`` the bytes this operation will add."""
        limit = self.server.limits.max_file_size
        if size > limit:
            raise TooLarge(f"{size} bytes exceeds the limit of {limit}")
        free = self.server.root.free_bytes() - self.server.limits.free_space_reserve
        if writes > free:
            raise NoSpace(f"{writes} bytes do not fit: {max(free, 0)} bytes free for uploads")

    async def _put_range(self, channel: Channel, request: PutRangeRequested) -> None:
        name = fs.normalize_name(request.name)
        self._check_size(request.total_size, writes=request.length)
        writer = await self.server.run_fs(
            self.server.root.open_range,
            name,
            request.upload_id.hex(),
            total_size=request.total_size,
            hashed=request.checked,
        )
        position = request.offset

        def write(data: bytes) -> None:  # runs in a worker thread, one call at a time
            nonlocal position
            writer.write_at(position, data)
            position += len(data)

        try:
            cpu_start = cpu_time()
            event = await channel.next_event()
            if isinstance(event, DataReceived):
                event = await receive_body(
                    self, channel, write, first=event.data, executor=self.server.fs_pool
                )
            if not isinstance(event, UploadEnded):
                raise event_error(event)
            if not request.checked:  # PUT_BLOCK: the COMMIT's whole-file digest checks it
                if event.sha256 != bytes(len(event.sha256)):
                    raise BadRequest("END of PUT_BLOCK must carry 32 zero bytes")
                digest = b""
            elif (digest := bytes.fromhex(writer.hexdigest())) != event.sha256:
                raise ChecksumMismatch(f"range at {request.offset}: SHA-256 {digest.hex()} differs")
            self.qsftp.send_done(
                channel.stream_id,
                size=request.length,
                sha256=digest,
                server_cpu_us=round((cpu_time() - cpu_start) * 1e6),
            )
        finally:
            writer.close()

    async def _commit(self, channel: Channel, request: CommitRequested) -> None:
        name = fs.normalize_name(request.name)
        cpu_start = cpu_time()
        digest = await self.server.run_fs(
            self.server.root.commit_partial,
            name,
            request.upload_id.hex(),
            total_size=request.total_size,
            expected_sha256=request.sha256.hex(),
        )
        logger.info("stored %s (%d bytes, striped)", name, request.total_size)
        self.qsftp.send_done(
            channel.stream_id,
            size=request.total_size,
            sha256=bytes.fromhex(digest),
            server_cpu_us=round((cpu_time() - cpu_start) * 1e6),
        )

    async def _abort(self, channel: Channel, request: AbortRequested) -> None:
        name = fs.normalize_name(request.name)
        removed = await self.server.run_fs(
            self.server.root.abort_partial, name, request.upload_id.hex()
        )
        self.qsftp.send_done(channel.stream_id, size=int(removed))

    async def _probe(self, channel: Channel, request: ProbeRequested) -> None:
        name = fs.normalize_name(request.name)
        held, digest = await self.server.run_fs(
            self.server.root.probe_partial, name, request.upload_id.hex()
        )
        self.qsftp.send_done(channel.stream_id, size=held, sha256=bytes.fromhex(digest))

    async def _get(self, channel: Channel, request: GetRequested | GetFromRequested) -> None:
        name = fs.normalize_name(request.name)
        chunk_size = request.chunk_size or DEFAULT_CHUNK_SIZE
        if chunk_size > MAX_CHUNK_SIZE:
            raise BadRequest(f"chunk size {chunk_size} exceeds {MAX_CHUNK_SIZE}")
        file, entry = await asyncio.to_thread(self.server.root.open_read, name)
        with file:
            cpu_start = cpu_time()
            mtime_ns = max(0, entry.mtime_ns)
            if isinstance(request, GetFromRequested):
                offset, hasher = await asyncio.to_thread(
                    _resume_point, file, request.offset, request.sha256, entry.size
                )
                self.qsftp.send_file_from(channel.stream_id, entry.size, mtime_ns, offset)
            else:
                offset, hasher = 0, None
                self.qsftp.send_file_info(channel.stream_id, entry.size, mtime_ns)
            self.flush()
            digest = await send_body(
                self, channel, file, entry.size - offset, chunk_size, hasher=hasher
            )
        self.qsftp.send_done(
            channel.stream_id,
            size=entry.size,
            sha256=digest,
            server_cpu_us=round((cpu_time() - cpu_start) * 1e6),
        )
        logger.info("sent %s (%d bytes from %d)", name, entry.size - offset, offset)

    async def _list(self, channel: Channel, request: ListRequested) -> None:
        path = fs.normalize_name(request.path, allow_empty=True)
        root = self.server.root
        entries = await asyncio.to_thread(root.listdir, path, recursive=request.recursive)
        for entry in entries:
            await self.wait_writable(channel)
            self._send_entry(channel.stream_id, entry)
            self.flush()
        self.qsftp.send_done(channel.stream_id, size=len(entries))

    async def _stat(self, channel: Channel, request: StatRequested) -> None:
        path = fs.normalize_name(request.path, allow_empty=True)
        entry = await asyncio.to_thread(self.server.root.stat, path)
        self._send_entry(channel.stream_id, entry)
        self.qsftp.send_done(channel.stream_id, size=1)

    def _send_entry(self, stream_id: int, entry: fs.Entry) -> None:
        self.qsftp.send_entry(
            stream_id,
            name=entry.name,
            kind=_KINDS[entry.kind],
            size=entry.size,
            mtime_ns=max(0, entry.mtime_ns),  # the wire has no times before 1970
        )


def _resume_point(
    file: BinaryIO, offset: int, sha256: bytes, size: int
) -> tuple[int, hashlib._Hash | None]:
    """Where a resumed download continues: ``offset`` when the file's first ``offset`` bytes
    have SHA-256 ``sha256`` (the file is left there, with a hash of them to continue), else 0
    (the client's partial file is not a prefix of this file: it starts over)."""
    if 0 < offset <= size:
        held, hasher = fs.sha256_prefix(file, offset)
        if held == offset and hasher.digest() == sha256:
            return offset, hasher
        file.seek(0)
    return 0, None


class _ServerProtocol(ServerSession, QsftpProtocol):
    def stack_name(self) -> str:
        return self.engine.name

    def __init__(
        self,
        quic: Any,
        stream_handler: Any,
        *,
        server: QsftpServer,
        batch: set[QsftpProtocol] | None = None,
    ) -> None:
        super().__init__(quic, stream_handler, batch=batch)
        self._init_server(server)


class _TcpServerProtocol(ServerSession, tcp.TcpSession):
    def stack_name(self) -> str:
        return "tcp"

    def __init__(self, *, server: QsftpServer, receive_window: int) -> None:
        super().__init__(
            receive_window=receive_window,
            idle_timeout=server.limits.idle_timeout,
            registry=server.tcp_sessions,
        )
        self._init_server(server)


def server_configuration(
    certfile: Path,
    keyfile: Path,
    *,
    idle_timeout: float = DEFAULT_LIMITS.idle_timeout,
    receive_window: int | None = None,
    max_datagram_size: int | None = None,
    congestion_control: str | None = None,
    qlog_dir: str | os.PathLike[str] | None = None,
    engine: str | Engine | None = None,
) -> Any:
    """The QUIC settings of a qsftp/1 server (a ``QuicConfiguration`` of the engine's
    library); ``qlog_dir`` (created) receives qlog files."""
    quic_engine = get_engine(engine)
    configuration = quic_engine.configuration(
        is_client=False,
        alpn=ALPN,
        idle_timeout=idle_timeout,
        max_stream_data=receive_window or RECEIVE_WINDOW,
        max_datagram_size=max_datagram_size,
        congestion_control=congestion_control,
    )
    if qlog_dir is not None:
        configuration.quic_logger = QlogWriter(qlog_dir, engine=quic_engine)
    quic_engine.load_cert_chain(configuration, certfile, keyfile)
    return configuration


@contextlib.asynccontextmanager
async def serve(
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    allow_anonymous: bool = False,
    state_dir: str | os.PathLike[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    retry: bool = False,
    max_datagram_size: int | None = None,
    congestion_control: str | None = None,
    receive_window: int | None = None,
    reuse_port: bool = False,
    qlog_dir: str | os.PathLike[str] | None = None,
    session_tickets: bool = True,
    transport: str = "quic",
    engine: str | Engine | None = None,
) -> AsyncIterator[QsftpServer]:
    """Run a QSFTP server for the duration of the ``async with`` block.

    ``transport`` is ``"quic"`` (UDP), ``"tcp"`` (TLS 1.3 over TCP, :mod:`qsftp.tcp`) or
    ``"both"`` (one port number, UDP and TCP); the limits apply to both, and
    ``max_connections`` counts their sessions together.

    ``port=0`` picks a free port (read it from ``server.port``). Without ``cert``/``key`` a
    self-signed certificate is created once in ``state_dir`` (default: the user's state
    directory) and reused. Listening on a non-loopback address needs a ``token`` unless
    ``allow_anonymous`` is set. ``reuse_port`` sets SO_REUSEPORT so that several server
    processes can share one port (``python -m qsftp.server --workers N``). ``qlog_dir``
    (created if missing) receives one qlog trace per connection, ``<ODCID>.qlog``, written
    when the connection ends or the server stops. With ``session_tickets`` (the default) the
    server issues TLS session tickets, kept in memory (``server.tickets``), so that a client
    can resume a session without the certificate exchange (:mod:`qsftp.tickets`).

    ``engine`` is the QUIC library, ``"aioquic"`` (None: the default) or ``"qh3"`` (``pip
    install qsftp[qh3]``; it always uses Retry); clients of either engine can connect. It
    applies to the QUIC listener: with ``transport="tcp"`` giving one is a UsageError.
    """
    if not token and not allow_anonymous and not is_loopback(host):
        _refuse_anonymous(host)
    if (cert is None) != (key is None):
        raise UsageError("give both a certificate and its key, or neither")
    if transport == "tcp" and engine is not None:
        raise UsageError("engine is a QUIC option (transport='tcp')")
    quic_engine = get_engine(engine)
    if transport != "tcp":
        quic_engine.warm()
    if cert is None or key is None:
        certfile, keyfile = trust.ensure_self_signed(Path(state_dir) if state_dir else None)
    else:
        certfile, keyfile = Path(cert), Path(key)
    configuration = server_configuration(
        certfile,
        keyfile,
        idle_timeout=limits.idle_timeout,
        receive_window=receive_window,
        max_datagram_size=datagram_size_for(host, max_datagram_size),
        congestion_control=congestion_control,
        qlog_dir=qlog_dir,
        engine=quic_engine,
    )
    fingerprint = trust.fingerprint(trust.load_certificate(certfile))
    with fs.Root(root) as root_dir:
        server = QsftpServer(
            root=root_dir,
            token=token,
            certfile=certfile,
            keyfile=keyfile,
            fingerprint=fingerprint,
            limits=limits,
            tickets=TicketStore() if session_tickets else None,
            engine=quic_engine,
        )
        await server._listen_all(
            transport,
            host,
            port,
            configuration,
            reuse_port=reuse_port,
            retry=retry,
            receive_window=receive_window or RECEIVE_WINDOW,
            congestion_control=congestion_control,
        )
        ready = asyncio.get_running_loop().create_future()
        supervisor = asyncio.create_task(server._supervise(ready))
        await ready
        logger.info(
            "listening on %s (%s), root %s",
            server.address,
            "+".join(server.transports),
            root_dir.path,
        )
        try:
            yield server
        finally:
            await server._close(supervisor)


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.server",
        description="Serve a directory over QSFTP (QUIC, or TLS over TCP).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 5000)")
    parser.add_argument(
        "--transport",
        choices=["quic", "tcp", "both"],
        default="quic",
        help="QUIC over UDP (default), TLS 1.3 over TCP, or both on the same port number",
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help="directory served (./received)")
    parser.add_argument("--cert", help="certificate (PEM); default: a generated self-signed one")
    parser.add_argument("--key", help="private key of --cert (PEM)")
    parser.add_argument("--token", help="required client token (default: $QSFTP_TOKEN)")
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="allow a non-loopback address without a token",
    )
    parser.add_argument("--state-dir", help="where the generated certificate is kept")
    parser.add_argument("--max-datagram-size", type=int, help="QUIC datagram size, bytes")
    parser.add_argument("--qlog-dir", metavar="DIR", help="write a qlog trace per connection here")
    parser.add_argument(
        "--congestion-control", choices=["reno", "cubic"], help="congestion control algorithm"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="QUIC library: aioquic (default) or qh3 (pip install qsftp[qh3]); QUIC only",
    )
    parser.add_argument(
        "--receive-window", type=int, metavar="BYTES", help="flow-control window per stream"
    )
    limits = parser.add_argument_group("limits (docs/SECURITY.md)")
    limits.add_argument("--max-file-size", type=int, default=DEFAULT_LIMITS.max_file_size)
    limits.add_argument("--max-connections", type=int, default=DEFAULT_LIMITS.max_connections)
    limits.add_argument("--max-operations", type=int, default=DEFAULT_LIMITS.max_operations)
    limits.add_argument(
        "--session-deadline", type=float, default=DEFAULT_LIMITS.session_deadline, metavar="S"
    )
    limits.add_argument(
        "--idle-timeout", type=float, default=DEFAULT_LIMITS.idle_timeout, metavar="S"
    )
    limits.add_argument("--free-space-reserve", type=int, default=DEFAULT_LIMITS.free_space_reserve)
    limits.add_argument(
        "--partial-ttl", type=float, default=DEFAULT_LIMITS.partial_ttl, metavar="S"
    )
    parser.add_argument(
        "--retry", action="store_true", help="QUIC address validation (one more round trip)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N server processes sharing the port (SO_REUSEPORT); default 1",
    )
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    return parser


def _out(text: str, *, err: bool = False) -> None:
    """The CLI's only way to print."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(
        args.root,
        args.host,
        args.port,
        token=args.token or os.environ.get("QSFTP_TOKEN") or None,
        cert=args.cert,
        key=args.key,
        allow_anonymous=args.allow_anonymous,
        state_dir=args.state_dir,
        max_datagram_size=args.max_datagram_size,
        congestion_control=args.congestion_control,
        receive_window=args.receive_window,
        reuse_port=args.reuse_port,
        retry=args.retry,
        qlog_dir=args.qlog_dir,
        transport=args.transport,
        engine=args.engine,
        limits=Limits(
            max_file_size=args.max_file_size,
            max_connections=args.max_connections,
            max_operations=args.max_operations,
            session_deadline=args.session_deadline,
            idle_timeout=args.idle_timeout,
            free_space_reserve=args.free_space_reserve,
            partial_ttl=args.partial_ttl,
        ),
    ) as server:
        _out(
            f"qsftp server ready on {server.address}, transport {'+'.join(server.transports)}, "
            f"root {server.root.path}, certificate sha256:{server.fingerprint}"
        )
        await stop.wait()
    _out("qsftp server stopped")


_READY = re.compile(
    r"ready on (\S+), transport (\S+), root (.+), certificate sha256:([0-9a-f]{64})"
)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


async def _supervise_workers(args: argparse.Namespace, argv: list[str]) -> None:
    """Start ``args.workers`` server processes on one port and stop them on SIGINT/SIGTERM."""
    if args.cert is None or args.key is None:  # generated once here, shared by every worker
        cert, key = trust.ensure_self_signed(Path(args.state_dir) if args.state_dir else None)
        args.cert, args.key = str(cert), str(key)
    port = args.port or _free_port(args.host)
    command = [sys.executable, "-m", "qsftp.server", *argv, "--workers", "1", "--reuse-port"]
    command += ["--port", str(port), "--cert", args.cert, "--key", args.key]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    workers: list[asyncio.subprocess.Process] = []
    try:
        match = None
        for _ in range(args.workers):
            worker = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
            )
            workers.append(worker)
            assert worker.stdout is not None
            try:
                line = await asyncio.wait_for(worker.stdout.readline(), _WORKER_START_TIMEOUT)
            except TimeoutError:
                line = b""
            match = _READY.search(line.decode(errors="replace"))
            if match is None:
                raise TransportError("a worker process did not start (see its error above)")
        assert match is not None
        _out(
            f"qsftp server ready on {match.group(1)}, transport {match.group(2)}, "
            f"root {match.group(3)}, certificate sha256:{match.group(4)}, {args.workers} workers"
        )
        waiters = [asyncio.ensure_future(w.wait()) for w in workers]
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                await asyncio.wait_for(worker.wait(), _WORKER_STOP_TIMEOUT)
            except TimeoutError:
                worker.kill()
                await worker.wait()
    _out("qsftp server stopped")


def _worker_argv(argv: list[str]) -> list[str]:
    """The command line minus the options the supervisor sets for each worker itself."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        option = arg.split("=", 1)[0]
        if option in ("--workers", "--port", "--cert", "--key"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qsftp.server``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.workers < 1:
        _out("qsftp-server: error: --workers must be at least 1", err=True)
        return 2
    try:
        if args.workers > 1:
            token = args.token or os.environ.get("QSFTP_TOKEN")
            if not token and not args.allow_anonymous and not is_loopback(args.host):
                _refuse_anonymous(args.host)
            run(_supervise_workers(args, _worker_argv(raw)))
            return 0
        run(_serve_until_signalled(args))
    except QsftpError as exc:
        _out(f"qsftp-server: error: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
