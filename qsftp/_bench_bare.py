"""The reference transfers of ``python -m qsftp.bench``: bare QUIC engines and TCP + TLS.

Nothing here knows qsftp/1. The bare QUIC transfer uses the engine's own asyncio layer
(``serve`` / ``connect``, ``QuicConnectionProtocol`` and its stream reader/writer) of aioquic
or of qh3 (``engine="qh3"``, its GSO/GRO transport on the client) with the QUIC settings the
QSFTP case uses, so its figure is the engine ceiling the QSFTP figures are compared with. The
one thing added is a send high-water mark: neither library's ``drain()`` ever blocks, and
without a bound the client would queue the whole file in the stream's send buffer.

Both servers read and discard (no disk, no hash) and answer one byte once the whole file has
arrived; both clients time from the start of the transfer to that answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "ALPN",
    "SEND_CHUNK",
    "SEND_HIGH_WATER",
    "TransferTiming",
    "bare_handshakes",
    "bare_upload",
    "quic_configuration",
    "serve_bare",
    "serve_tcp_tls",
    "tcp_tls_upload",
]

# The bare connection's ALPN: anything but qsftp/1, so neither server accepts the other's client.
ALPN = "qsftp-bench-bare"
# Bytes read from the file and written to the stream per call; the QSFTP client's default DATA
# chunk, so both hand aioquic pieces of the same size.
SEND_CHUNK = 64 * 1024
# Most unacknowledged bytes the bare client leaves in aioquic's send buffer before it waits
# (woken when acknowledgements bring it under half of this): the same bound QSFTP's glue uses,
# enough for loopback's bandwidth-delay product while keeping memory flat.
SEND_HIGH_WATER = 1024 * 1024
# The server reads at most this much per call (it discards everything).
RECEIVE_BLOCK = 1024 * 1024
# The TCP client announces the file size in this header (TLS streams cannot be half-closed).
_SIZE_HEADER = struct.Struct("!Q")
# Every wait for the network is bounded; a transfer that makes no progress this long fails.
IDLE_TIMEOUT = 60.0
# What the servers answer when the whole file has arrived.
ANSWER = b"\x01"


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferTiming:
    """One reference transfer as the client measured it."""

    seconds: float
    "perf_counter time from opening the stream (or the first write, TCP) to the answer byte."
    size: int
    "Bytes sent."
    cpu_s: float
    "CPU seconds this process used inside the timed region."


def quic_configuration(
    *,
    is_client: bool,
    max_datagram_size: int | None,
    congestion_control: str | None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    engine: str = "aioquic",
) -> Any:
    """The engine's defaults plus the two settings the bench varies, as the QSFTP glue sets
    them (qh3: CUBIC only, and no path-MTU probing, so the datagram size stays as chosen)."""
    if engine == "qh3":
        from qh3.quic.configuration import QuicConfiguration as Qh3Configuration  # noqa: PLC0415

        if congestion_control not in (None, "cubic"):
            raise ValueError(f"qh3 has no congestion control {congestion_control!r}")
        configuration: Any = Qh3Configuration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            verify_mode=ssl.CERT_NONE,
            probe_datagram_size=False,
        )
    else:
        from aioquic.quic.configuration import QuicConfiguration  # noqa: PLC0415

        configuration = QuicConfiguration(
            is_client=is_client, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
        )
        if congestion_control is not None:
            configuration.congestion_control_algorithm = congestion_control
    if max_datagram_size is not None:
        configuration.max_datagram_size = max_datagram_size
    if certfile is not None and keyfile is not None:
        configuration.load_cert_chain(certfile, keyfile)
    return configuration


# --- bare engines (aioquic, qh3) -------------------------------------------------------------


@cache
def _library(engine: str) -> tuple[Any, Any, Any]:
    """The engine's ``(connect, serve, bare client protocol class)``."""
    package = "qh3" if engine == "qh3" else "aioquic"
    connect = importlib.import_module(f"{package}.asyncio.client").connect
    serve = importlib.import_module(f"{package}.asyncio.server").serve
    events = importlib.import_module(f"{package}.quic.events")
    base: Any = importlib.import_module(f"{package}.asyncio.protocol").QuicConnectionProtocol

    def buffered(quic: Any, stream_id: int) -> int:
        if engine == "qh3":  # bytes not yet sent once
            return int(quic.get_send_buffer_size(stream_id))
        stream = quic._streams.get(stream_id)  # bytes not yet acknowledged
        return len(stream.sender._buffer) if stream is not None else 0

    class BareClientProtocol(base):  # type: ignore[misc]
        """The engine's protocol plus a send high-water mark and handshake timestamps."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._writable: asyncio.Future[None] | None = None
            self._stream_id = -1
            self.connect_started = 0.0
            self.handshake_done = 0.0

        def connect(self, addr: Any, **kwargs: Any) -> None:
            # The same window as QSFTP's handshake_ms: the first Initial to HandshakeCompleted.
            self.connect_started = time.perf_counter()
            super().connect(addr, **kwargs)

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.HandshakeCompleted) and not self.handshake_done:
                self.handshake_done = time.perf_counter()
            elif isinstance(event, events.ConnectionTerminated):
                self._wake()
            super().quic_event_received(event)

        def _buffered(self) -> int:
            return buffered(self._quic, self._stream_id)

        def _wake(self) -> None:
            if self._writable is not None and not self._writable.done():
                self._writable.set_result(None)

        def _acks_arrived(self) -> None:
            # Acknowledgements arrive in datagrams: that is when the send buffer shrinks.
            if self._writable is not None and self._buffered() < SEND_HIGH_WATER // 2:
                self._wake()

        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            super().datagram_received(data, addr)
            self._acks_arrived()

        def datagrams_received(self, data: list[bytes], addr: Any) -> None:
            super().datagrams_received(data, addr)  # qh3's batched (GRO) path
            self._acks_arrived()

        async def wait_writable(self, stream_id: int) -> None:
            """Wait while ``stream_id`` has SEND_HIGH_WATER or more bytes buffered."""
            self._stream_id = stream_id
            while self._buffered() >= SEND_HIGH_WATER:
                if self._closed.is_set():
                    raise ConnectionError("connection closed while sending")
                self._writable = self._loop.create_future()
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        await self._writable
                finally:
                    self._writable = None

    return connect, serve, BareClientProtocol


async def bare_upload(
    host: str,
    port: int,
    path: Path,
    *,
    max_datagram_size: int | None,
    congestion_control: str | None,
    engine: str = "aioquic",
) -> TransferTiming:
    """Send ``path`` on one stream of a new bare connection; time it to the answer."""
    configuration = quic_configuration(
        is_client=True,
        max_datagram_size=max_datagram_size,
        congestion_control=congestion_control,
        engine=engine,
    )
    connect, _, client_class = _library(engine)
    # connect() returns after HandshakeCompleted; the worker bounds the whole call.
    # (wait_connected=False would defer the first Initial: aioquic then sends a PING-only
    # probe first, which the server rejects for carrying no CRYPTO frame.)
    async with connect(
        host, port, configuration=configuration, create_protocol=client_class
    ) as client:
        size = 0
        # Page-cache reads of 64 KiB on the loop: part of the sender's work, as in QSFTP.
        with open(path, "rb") as file:  # noqa: ASYNC230
            cpu_start = time.process_time()
            started = time.perf_counter()
            reader, writer = await client.create_stream()
            stream_id = writer.get_extra_info("stream_id")
            while chunk := file.read(SEND_CHUNK):
                await client.wait_writable(stream_id)
                writer.write(chunk)
                size += len(chunk)
            writer.write_eof()
            async with asyncio.timeout(IDLE_TIMEOUT):
                answer = await reader.read(1)
            seconds = time.perf_counter() - started
            cpu_s = time.process_time() - cpu_start
    if answer != ANSWER:
        raise ConnectionError("the bare server did not confirm the transfer")
    return TransferTiming(seconds=seconds, size=size, cpu_s=cpu_s)


async def bare_handshakes(
    host: str,
    port: int,
    count: int,
    *,
    max_datagram_size: int | None,
    congestion_control: str | None,
    engine: str = "aioquic",
) -> list[float]:
    """``count`` sequential bare connections; each one's Initial → HandshakeCompleted, in ms."""
    connect, _, client_class = _library(engine)
    samples: list[float] = []
    for _ in range(count):
        configuration = quic_configuration(
            is_client=True,
            max_datagram_size=max_datagram_size,
            congestion_control=congestion_control,
            engine=engine,
        )
        async with connect(
            host, port, configuration=configuration, create_protocol=client_class
        ) as client:
            samples.append((client.handshake_done - client.connect_started) * 1000.0)
    return samples


async def _discard_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(RECEIVE_BLOCK):
        pass
    writer.write(ANSWER)
    writer.write_eof()


async def serve_bare(
    host: str,
    port: int,
    *,
    certfile: Path,
    keyfile: Path,
    max_datagram_size: int | None,
    congestion_control: str | None,
    ready: Callable[[str, int], None],
    engine: str = "aioquic",
) -> None:
    """A bare server of ``engine`` that discards every stream; runs until SIGTERM or SIGINT."""
    configuration = quic_configuration(
        is_client=False,
        max_datagram_size=max_datagram_size,
        congestion_control=congestion_control,
        certfile=certfile,
        keyfile=keyfile,
        engine=engine,
    )
    _, serve, _ = _library(engine)
    handlers: set[asyncio.Task[None]] = set()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(_discard_stream(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await serve(host, port, configuration=configuration, stream_handler=on_stream)
    try:
        assert server._transport is not None
        bound = server._transport.get_extra_info("sockname")
        ready(bound[0], bound[1])
        await _wait_for_signal()
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


# --- asyncio TCP + TLS 1.3 --------------------------------------------------------------------


def _client_context(certfile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certfile))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certfile, keyfile)
    return context


async def tcp_tls_upload(host: str, port: int, path: Path, *, certfile: Path) -> TransferTiming:
    """Send ``path`` over a new TLS 1.3 connection; time from the first write to the answer."""
    async with asyncio.timeout(IDLE_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=_client_context(certfile), server_hostname=host
        )
    try:
        size = path.stat().st_size  # noqa: ASYNC240
        with open(path, "rb") as file:  # noqa: ASYNC230
            cpu_start = time.process_time()
            started = time.perf_counter()
            writer.write(_SIZE_HEADER.pack(size))
            while chunk := file.read(SEND_CHUNK):
                writer.write(chunk)
                async with asyncio.timeout(IDLE_TIMEOUT):
                    await writer.drain()  # asyncio's TCP transport does push back
            async with asyncio.timeout(IDLE_TIMEOUT):
                answer = await reader.readexactly(1)
            seconds = time.perf_counter() - started
            cpu_s = time.process_time() - cpu_start
        if answer != ANSWER:
            raise ConnectionError("the TCP server did not confirm the transfer")
        return TransferTiming(seconds=seconds, size=size, cpu_s=cpu_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(IDLE_TIMEOUT):
                await writer.wait_closed()


async def _discard_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(IDLE_TIMEOUT):
            header = await reader.readexactly(_SIZE_HEADER.size)
        (remaining,) = _SIZE_HEADER.unpack(header)
        while remaining:
            async with asyncio.timeout(IDLE_TIMEOUT):
                data = await reader.read(min(RECEIVE_BLOCK, remaining))
            if not data:
                return
            remaining -= len(data)
        writer.write(ANSWER)
        await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve_tcp_tls(
    host: str, port: int, *, certfile: Path, keyfile: Path, ready: Callable[[str, int], None]
) -> None:
    """A TLS 1.3 server that discards what each connection sends; runs until SIGTERM/SIGINT."""
    server = await asyncio.start_server(
        _discard_connection, host, port, ssl=_server_context(certfile, keyfile)
    )
    async with server:
        bound = server.sockets[0].getsockname()
        ready(bound[0], bound[1])
        await _wait_for_signal()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def print_ready(host: str, port: int) -> None:
    """The ready line the bench waits for."""
    print(f"ready {host} {port}", flush=True)  # noqa: T201 - the parent reads it
