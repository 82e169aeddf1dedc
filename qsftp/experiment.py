"""Transfer sweeps into tidy pandas frames, and ``python -m qsftp.experiment``.

``df = await sweep(sizes=["64KB", "1MB"], chunk_sizes=[1024, 65536], repeats=3)`` runs every
configuration (sizes × chunk sizes × the other dimensions × directions) ``repeats`` times in
a shuffled order whose seed is recorded, after one warm-up transfer, and returns one row per
transfer. Without ``target`` it starts a QSFTP server in a separate process (so client and
server do not share one core), with its own temporary root and certificate, and stops it
afterwards. ``links=[None, LinkProfile(delay_ms=25, loss=0.01)]`` adds emulated links as a
dimension: each runs as a :class:`qsftp.netem.LinkEmulator` in front of the server, or with
``link_mode="packet"`` as a :class:`qsftp.packetlink.PacketLink` (Linux, root) between the
real client and server CLIs in two network namespaces.
``handshake=["fresh", "resumed", "reused"]`` makes how connections are set up a dimension, and
``qlog_dir=`` keeps a qlog trace of every transfer's connection. :func:`handshakes` measures
connection setup alone, full vs resumed, under emulated delay.
docs/MEASUREMENT.md says exactly what every column measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from . import __version__
from .client import Connection, TransferResult, connect
from .engine import DEFAULT_ENGINE, ENGINES, engine_name, get_engine
from .errors import PacketLinkUnavailable, QsftpError, TransportError, UsageError
from .netem import (
    DirectionStats,
    LinkEmulator,
    LinkProfile,
    LinkStats,
    StreamRelay,
    stream_relay_problems,
)
from .packetlink import LabServer, PacketLink, lab_server, lab_transfer, unavailable_reason
from .session import DEFAULT_CHUNK_SIZE, RECEIVE_WINDOW, cpu_time, datagram_size_for
from .tcp import default_congestion_control as tcp_default_congestion_control
from .tickets import TicketCache

__all__ = [
    "COLUMNS",
    "HANDSHAKE_COLUMNS",
    "HANDSHAKE_MODES",
    "LINK_COLUMNS",
    "LINK_MODES",
    "SCHEMA_VERSION",
    "Target",
    "cache_dir",
    "collect_metadata",
    "handshakes",
    "load_results",
    "main",
    "parse_size",
    "save_results",
    "summarize",
    "summarize_handshakes",
    "sweep",
    "test_file",
]

logger = logging.getLogger(__name__)

# Bumped whenever a column changes meaning; stored with every saved result.
SCHEMA_VERSION = 1
# Above this share of the transfer's wall time spent on a CPU, the figure measures Python on
# that side rather than the network (iperf3 reports CPU use for the same reason).
CPU_BOUND_SHARE = 0.9
# aioquic's default congestion controller, recorded when a configuration does not choose one.
DEFAULT_CONGESTION_CONTROL = "reno"
# How long the embedded server may take to print its ready line.
_SERVER_START_TIMEOUT = 30.0
# Test files are written in blocks of this size, so a large file never sits in memory.
_GENERATE_BLOCK = 1 << 20
# QUIC datagram size through an emulated link when none is chosen: the emulator listens on
# loopback, where the client would pick 16 KiB datagrams no real path carries; 1200 bytes is
# QUIC's minimum, which every path must carry.
LINK_DATAGRAM_SIZE = 1200
# How long a sweep waits after a transfer for the packets still in an emulated link (e.g.
# the CONNECTION_CLOSE) before reading its counters; it goes on regardless after that.
_LINK_DRAIN_TIMEOUT = 5.0

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}

# Every column of a sweep frame, in order (docs/MEASUREMENT.md describes each).
COLUMNS = [
    "run_id",
    "timestamp",
    "direction",
    "file_size_bytes",
    "chunk_size_bytes",
    "max_datagram_size",
    "congestion_control",
    "receive_window_bytes",
    "transport",
    "engine",
    "connection",
    "handshake",
    "repeat",
    "warmup",
    "seconds",
    "throughput_mbps",
    "handshake_ms",
    "session_ms",
    "session_resumed",
    "verified",
    "sha256",
    "smoothed_rtt_ms",
    "packets_sent",
    "packets_lost",
    "client_cpu_s",
    "server_cpu_s",
    "cpu_bound",
    "qlog_path",
    "server_qlog_path",
    "error",
]
# How a sweep sets up the connection of each transfer (the ``handshake`` column):
# "fresh": a new connection and a full handshake per transfer; "resumed": a new connection per
# transfer that resumes the TLS session of the previous one with its session ticket;
# "reused": one connection per configuration, opened once and used for all its transfers.
HANDSHAKE_MODES = ("fresh", "resumed", "reused")

# How a row's transfer met its link (the ``link_mode`` column): "none" for a direct
# connection, "relay" through the UDP LinkEmulator, "packet" through a PacketLink.
LINK_MODES = ("none", "relay", "packet")

# Added after COLUMNS when ``sweep(links=...)`` is given: the link's label and mode, both
# directions' profiles and the emulator's seed (LinkEmulator.as_dict), then its counters for
# the transfer (LinkEmulator.stats_dict). Empty (None) on "direct" rows.
_LINK_PROFILE_COLUMNS = [
    *LinkProfile().as_dict("link_up_"),
    *LinkProfile().as_dict("link_down_"),
    "link_seed",
]
_LINK_STATS_COLUMNS = list(
    LinkStats(uplink=DirectionStats(), downlink=DirectionStats(), clients=0).as_dict()
)
LINK_COLUMNS = ["link", "link_mode", *_LINK_PROFILE_COLUMNS, *_LINK_STATS_COLUMNS]
# Text columns of COLUMNS (besides sha256 and error), kept as text when a CSV is read back.
_TEXT_COLUMNS = ["handshake", "engine", "qlog_path", "server_qlog_path"]
# Text columns among them, kept as text when a CSV is read back.
_LINK_TEXT_COLUMNS = ["link", "link_mode", "link_up_loss_model", "link_down_loss_model"]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string: "64KB" = 64 000 (SI), "64KiB" = 65 536 (binary)."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise UsageError(f"cannot read size {size!r} (try 65536, '64KB' or '64KiB')")
    if isinstance(size, int):
        if size < 0:
            raise UsageError(f"negative size {size}")
        return size
    match = _SIZE_RE.match(size)
    unit = (match.group(2) or "").lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"cannot read size {size!r} (try 65536, '64KB' or '64KiB')")
    value = float(match.group(1)) * _UNITS[unit]
    if value != int(value):
        raise UsageError(f"{size!r} is not a whole number of bytes")
    return int(value)


def cache_dir() -> Path:
    """Where generated test files are kept: $QSFTP_CACHE_DIR, else the user's cache dir."""
    if override := os.environ.get("QSFTP_CACHE_DIR"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qsftp" / "files"


def test_file(size: int, *, seed: int = 0, directory: Path | None = None) -> Path:
    """A file of exactly ``size`` seeded pseudo-random bytes, generated once and cached."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"qsftp-{size}-seed{seed}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    rng = random.Random(f"qsftp-{seed}-{size}")
    temp = directory / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp, "wb") as out:
            remaining = size
            while remaining:
                block = min(_GENERATE_BLOCK, remaining)
                out.write(rng.randbytes(block))
                remaining -= block
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


test_file.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A server to measure against, and how to connect to it."""

    host: str
    "Address of the server."
    port: int
    "UDP port."
    options: Mapping[str, Any] = field(default_factory=dict)
    "Extra keyword arguments for :func:`qsftp.connect` (token, cafile, pin, ...)."
    embedded: bool = False
    "True when the sweep started this server itself."


# --- the embedded server --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _embedded_server(
    workdir: Path,
    *,
    max_datagram_size: int | None,
    congestion_control: str | None,
    receive_window: int | None = None,
    qlog_dir: Path | None = None,
    transport: str = "quic",
    engine: str | None = None,
) -> AsyncIterator[tuple[Target, int]]:
    """A ``python -m qsftp.server`` child process on a free loopback port; yields its target
    and PID, and ends it (by its PID) afterwards. ``qlog_dir``: the server's qlog traces;
    ``transport="both"``: UDP and TCP; ``engine``: its QUIC library (None: the default)."""
    name = "-".join(
        str(v or "default") for v in (max_datagram_size, congestion_control, receive_window, engine)
    )
    root, state = workdir / f"root-{name}", workdir / f"state-{name}"
    command = [
        sys.executable,
        "-m",
        "qsftp.server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--root",
        str(root),
        "--state-dir",
        str(state),
    ]
    if max_datagram_size is not None:
        command += ["--max-datagram-size", str(max_datagram_size)]
    if congestion_control is not None:
        command += ["--congestion-control", congestion_control]
    if receive_window is not None:
        command += ["--receive-window", str(receive_window)]
    if qlog_dir is not None:
        command += ["--qlog-dir", str(qlog_dir)]
    if transport != "quic":
        command += ["--transport", transport]
    if engine is not None:
        command += ["--engine", engine]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _SERVER_START_TIMEOUT)
        except TimeoutError:
            line = b""
        match = re.search(rb"ready on (\S+):(\d+),.*sha256:([0-9a-f]{64})", line)
        if match is None:
            err = b""
            if process.stderr is not None and process.returncode is not None:
                err = await process.stderr.read()
            raise TransportError(
                f"embedded server did not start: {(line + err).decode(errors='replace').strip()}"
            )
        target = Target(
            host=match.group(1).decode(),
            port=int(match.group(2)),
            options={"pin": match.group(3).decode()},
            embedded=True,
        )
        yield target, process.pid
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


# --- metadata -------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def collect_metadata() -> dict[str, Any]:
    """Facts about this machine and software, stored with every result."""
    return {
        "schema_version": SCHEMA_VERSION,
        "qsftp_version": __version__,
        "aioquic_version": _version("aioquic"),
        "qh3_version": _version("qh3"),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pandas_version": pd.__version__,
        "event_loop": type(asyncio.get_event_loop_policy()).__module__,
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --- the sweep ------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _target(target: Any) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, Mapping):
        options = {k: v for k, v in target.items() if k not in ("host", "port")}
        return Target(host=target["host"], port=int(target["port"]), options=options)
    host, port, *rest = target
    options = dict(rest[0]) if rest else {}
    return Target(host=host, port=int(port), options=options)


@dataclass(frozen=True, slots=True)
class _Link:
    """One emulated link of a sweep: a profile per direction."""

    uplink: LinkProfile
    downlink: LinkProfile

    def label(self) -> str:
        if self.uplink == self.downlink:
            return self.uplink.label()
        return f"up: {self.uplink.label()}; down: {self.downlink.label()}"


def _transports(value: Any) -> list[str]:
    transports = list(dict.fromkeys(_as_list(value)))
    for transport in transports:
        if transport not in ("quic", "tcp"):
            raise UsageError(f"transport must be 'quic' or 'tcp', not {transport!r}")
    return transports


def _check_stream_links(links: list[_Link | None]) -> None:
    """TCP goes through a byte-stream relay: refuse links it cannot emulate, before starting."""
    for link in links:
        if link is None:
            continue
        for profile in (link.uplink, link.downlink):
            problems = stream_relay_problems(profile)
            if problems:
                raise UsageError(
                    f"transport 'tcp' through the link {link.label()!r}: a byte-stream relay "
                    f"cannot apply {', '.join(problems)}; sweep TCP over links with delay and "
                    "rate only, or use the packet-level mode"
                )


def _link(value: Any) -> _Link | None:
    if value is None:
        return None
    if isinstance(value, LinkProfile):
        return _Link(value, value)
    if isinstance(value, tuple) and len(value) == 2:
        up, down = (p if p is not None else LinkProfile() for p in value)
        if isinstance(up, LinkProfile) and isinstance(down, LinkProfile):
            return _Link(up, down)
    raise UsageError(
        f"a link is None, a LinkProfile or an (uplink, downlink) pair of them, not {value!r}"
    )


def _links(links: Any) -> list[_Link | None]:
    if links is None:
        return [None]
    # A tuple is one (uplink, downlink) pair, not a list of links.
    values = [links] if isinstance(links, LinkProfile | tuple) else _as_list(links)
    result = list(dict.fromkeys(_link(value) for value in values))
    if not result:
        raise UsageError("links is empty (None in the list means a direct connection)")
    return result


@dataclass(frozen=True, slots=True)
class _Config:
    direction: str
    size: int
    chunk_size: int
    max_datagram_size: int | None
    congestion_control: str | None
    receive_window: int | None = None
    link: _Link | None = None
    handshake: str = "fresh"
    transport: str = "quic"
    engine: str | None = None
    "QUIC library (``aioquic`` or ``qh3``); None for transport tcp, which has none."

    @property
    def server_key(self) -> tuple[int | None, str | None, int | None, str | None]:
        """The settings an embedded server is started with (its engine: None for the
        default, which also serves the TCP transfers)."""
        engine = None if self.engine == DEFAULT_ENGINE else self.engine
        return (self.max_datagram_size, self.congestion_control, self.receive_window, engine)


def _row(
    run_id: str,
    config: _Config,
    repeat: int,
    warmup: bool,
    connection: str,
    *,
    with_links: bool = False,
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS + LINK_COLUMNS if with_links else COLUMNS)
    if with_links:
        row.update(link="direct", link_mode="none")
    row.update(
        run_id=run_id,
        direction=config.direction,
        file_size_bytes=config.size,
        chunk_size_bytes=config.chunk_size,
        max_datagram_size=config.max_datagram_size,
        congestion_control=config.congestion_control,
        receive_window_bytes=config.receive_window or RECEIVE_WINDOW,
        transport=config.transport,
        engine=config.engine or "",
        connection=connection,
        handshake=config.handshake,
        repeat=repeat,
        warmup=warmup,
        session_resumed=False,
        verified=False,
        cpu_bound=False,
        qlog_path="",
        server_qlog_path="",
        error="",
    )
    return row


async def _measure(
    target: Target,
    config: _Config,
    *,
    local: Path,
    remote: str,
    row: dict[str, Any],
    workdir: Path,
    software: set[str],
    qlog_dir: Path | None = None,
    tickets: TicketCache | None = None,
    pool: _Pool | None = None,
) -> None:
    """One transfer; fills ``row`` (or its ``error``) and adds what the server says it runs
    (e.g. "qsftp/0.1.0 (uvloop)") to ``software``. The connection is new (resuming a ticket
    from ``tickets`` for "resumed"), or for "reused" the configuration's one in ``pool``."""
    # The settings in effect, also for a row that fails before a connection reports them,
    # so failed and successful transfers of one configuration group together.
    row["max_datagram_size"] = datagram_size_for(target.host, config.max_datagram_size)
    row["congestion_control"] = _congestion_control(config)
    options = _connect_options(target, config, qlog_dir=qlog_dir)
    if config.transport == "tcp":
        # TCP: the MSS stands in for the datagram size (known once connected), and the
        # kernel's default algorithm applies unless one is chosen.
        row["max_datagram_size"] = None
        row["congestion_control"] = config.congestion_control or tcp_default_congestion_control()
    if config.handshake == "resumed":
        options["tickets"] = tickets

    async def transfer(conn: Connection) -> TransferResult:
        software.add(conn.server)
        if config.direction == "upload":
            return await conn.upload(local, remote, chunk_size=config.chunk_size)
        dest = workdir / f"download-{uuid.uuid4().hex[:8]}.bin"
        try:
            return await conn.download(remote, dest, chunk_size=config.chunk_size)
        finally:
            dest.unlink(missing_ok=True)

    try:
        if config.handshake == "reused" and pool is not None:
            conn, opened = await pool.get(config, target, options)
            row["connection"] = "new" if opened else "reused"
            try:
                result = await transfer(conn)
            except QsftpError:
                await pool.drop(config)  # the next transfer starts on a clean connection
                raise
        else:
            async with connect(target.host, target.port, **options) as conn:
                result = await transfer(conn)
        row["session_resumed"] = conn.session_resumed
    except QsftpError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        logger.info("transfer failed: %s", row["error"])
        return
    seconds = result.seconds
    row.update(
        timestamp=result.started_at,
        seconds=seconds,
        throughput_mbps=result.size * 8 / seconds / 1e6 if seconds > 0 else float("nan"),
        handshake_ms=result.handshake_ms,
        session_ms=result.session_ms,
        qlog_path=result.qlog_path or "",
        verified=result.verified,
        sha256=result.sha256,
        smoothed_rtt_ms=result.smoothed_rtt_ms,
        packets_sent=result.packets_sent,
        packets_lost=result.packets_lost,
        client_cpu_s=result.client_cpu_s,
        server_cpu_s=result.server_cpu_s,
        max_datagram_size=result.max_datagram_size,
        congestion_control=result.congestion_control,
        engine=result.engine,
        cpu_bound=seconds > 0
        and max(result.client_cpu_s, result.server_cpu_s) > CPU_BOUND_SHARE * seconds,
    )


async def _packet_lab(
    stack: contextlib.AsyncExitStack,
    link: _Link,
    key: tuple[int | None, str | None, int | None, str | None],
    *,
    seed: int,
    root: Path,
    files: Mapping[str, Path],
    transport: str = "quic",
) -> tuple[PacketLink, LabServer]:
    """A PacketLink and the server CLI in its server namespace, serving ``root``, where
    ``files`` ({remote name: local file}) are placed first, for downloads (not measured)."""
    for name, source in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, source, target)
    packet_link = await stack.enter_async_context(
        PacketLink(uplink=link.uplink, downlink=link.downlink, seed=seed)
    )
    server = await stack.enter_async_context(
        lab_server(
            packet_link,
            root,
            max_datagram_size=key[0],
            transport=transport,
            extra_args=("--engine", key[3]) if key[3] else (),
        )
    )
    return packet_link, server


def _absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against the working directory (no file-system access)."""
    return Path(os.path.abspath(path))


def _connect_options(
    target: Target, config: _Config, *, qlog_dir: Path | None = None
) -> dict[str, Any]:
    """Keyword arguments of :func:`connect` for one transfer of ``config``."""
    options = dict(target.options)
    if config.transport == "tcp":
        options["transport"] = "tcp"
    elif config.max_datagram_size is not None:
        options["max_datagram_size"] = config.max_datagram_size
    if config.congestion_control is not None:
        options["congestion_control"] = config.congestion_control
    if config.receive_window is not None:
        options["receive_window"] = config.receive_window
    if qlog_dir is not None and config.transport == "quic":
        options["qlog_dir"] = qlog_dir
    if config.engine is not None and config.transport == "quic":
        options["engine"] = config.engine
    return options


class _Pool:
    """The connections of handshake="reused": one per configuration, opened at its first
    transfer and kept until :meth:`aclose` (or reopened when it died, e.g. idle timeout)."""

    def __init__(self) -> None:
        self._open: dict[_Config, tuple[contextlib.AsyncExitStack, Connection]] = {}

    async def get(
        self, config: _Config, target: Target, options: Mapping[str, Any]
    ) -> tuple[Connection, bool]:
        """The configuration's connection, and whether it was opened just now."""
        entry = self._open.get(config)
        if entry is not None and not entry[1].closed:
            return entry[1], False
        await self.drop(config)
        stack = contextlib.AsyncExitStack()
        conn = await stack.enter_async_context(connect(target.host, target.port, **options))
        self._open[config] = (stack, conn)
        return conn, True

    async def drop(self, config: _Config) -> None:
        """Close the configuration's connection, if open."""
        entry = self._open.pop(config, None)
        if entry is not None:
            with contextlib.suppress(QsftpError):
                await entry[0].aclose()

    async def aclose(self) -> None:
        """Close every connection."""
        for config in list(self._open):
            await self.drop(config)


async def _record_link(emulator: LinkEmulator | StreamRelay, row: dict[str, Any]) -> None:
    """Fill ``row``'s link columns once the packets of the transfer have left the link."""
    try:
        await emulator.wait_drained(_LINK_DRAIN_TIMEOUT)
    except TimeoutError:
        logger.warning("link %s still held packets after the transfer", emulator.label())
    mode = "stream-relay" if isinstance(emulator, StreamRelay) else "relay"
    row.update(link=emulator.label(), link_mode=mode)
    row.update(emulator.as_dict())
    row.update(emulator.stats_dict())


def _congestion_control(config: _Config) -> str:
    """The QUIC congestion control a transfer of ``config`` runs: the chosen one, else its
    engine's default."""
    if config.congestion_control:
        return config.congestion_control
    if engine_name(config.engine) == DEFAULT_ENGINE:
        return DEFAULT_CONGESTION_CONTROL
    return get_engine(config.engine).congestion_controls[0]


async def _measure_packet(
    link: PacketLink,
    server: LabServer,
    config: _Config,
    *,
    local: Path,
    remote: str,
    row: dict[str, Any],
) -> None:
    """One transfer by the client CLI in ``link``'s client namespace; fills ``row``'s
    result and link columns (the CLI reports no handshake, RTT, packet or CPU figures)."""
    if config.transport == "tcp":  # the kernel's TCP in the client namespace
        row["max_datagram_size"] = None
        row["congestion_control"] = tcp_default_congestion_control()
    else:
        row["max_datagram_size"] = datagram_size_for(server.host, config.max_datagram_size)
        row["congestion_control"] = _congestion_control(config)
    result = await lab_transfer(
        link,
        local,
        server=server,
        direction=config.direction,
        remote=remote,
        chunk_size=config.chunk_size,
        max_datagram_size=config.max_datagram_size if config.transport == "quic" else None,
        transport=config.transport,
        engine=config.server_key[3] if config.transport == "quic" else None,
    )
    row.update(
        {
            key: result[key]
            for key in ("timestamp", "seconds", "throughput_mbps", "sha256", "verified", "error")
        }
    )
    row.update({key: result[key] for key in LINK_COLUMNS if key in result})


def _progress_bar(total: int, *, enabled: bool) -> tqdm:
    if not enabled:
        return tqdm(total=total, disable=True)
    # tqdm.auto draws a widget in Jupyter, and there warns at import time when ipywidgets is
    # missing: imported only when a bar is wanted, so progress=False stays silent.
    from tqdm.auto import tqdm as auto_tqdm  # noqa: PLC0415

    return auto_tqdm(total=total, desc="qsftp sweep", unit="transfer")


async def sweep(
    sizes: Sequence[int | str] = ("64KB", "1MB", "16MB"),
    chunk_sizes: Sequence[int] = (DEFAULT_CHUNK_SIZE,),
    repeats: int = 3,
    direction: str = "upload",
    *,
    target: Any = None,
    max_datagram_size: int | Sequence[int | None] | None = None,
    congestion_control: str | Sequence[str | None] | None = None,
    receive_window: int | Sequence[int | None] | None = None,
    engine: str | Sequence[str | None] | None = None,
    links: LinkProfile
    | tuple[LinkProfile, LinkProfile]
    | Sequence[LinkProfile | tuple[LinkProfile, LinkProfile] | None]
    | None = None,
    handshake: str | Sequence[str] = "fresh",
    qlog_dir: str | os.PathLike[str] | None = None,
    transport: str | Sequence[str] = "quic",
    link_mode: str = "relay",
    warmup: bool = True,
    seed: int | None = None,
    file_seed: int = 0,
    progress: bool = True,
    files_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Run every configuration ``repeats`` times and return one row per transfer.

    ``direction`` is "upload", "download" or "both". ``target`` is ``(host, port)``,
    ``(host, port, {connect options})``, a mapping with host/port/options, or None for an
    embedded server in a child process. ``max_datagram_size``, ``congestion_control`` and
    ``receive_window`` (flow-control window per stream, bytes, both sides) may be lists: they
    become dimensions. ``engine`` ("aioquic", the default, or "qh3"; a list is a dimension) is
    the client's QUIC library, and the embedded server's: rows carry it as ``engine``. The
    shuffle ``seed`` (random when None) is stored in ``df.attrs`` so a run can be repeated in
    the same order.

    ``links`` makes emulated links a dimension too: a :class:`~qsftp.netem.LinkProfile` (both
    directions), an ``(uplink, downlink)`` pair, or a list of them in which None means a
    direct connection. Each runs as a :class:`~qsftp.netem.LinkEmulator` in front of each
    server, with a seed derived from the shuffle seed; rows then carry the link's profile and
    its counters for that transfer (:data:`LINK_COLUMNS`). Through a link the datagram size
    defaults to :data:`LINK_DATAGRAM_SIZE`.

    ``handshake`` (one of :data:`HANDSHAKE_MODES`, or a list: a dimension) says how each
    transfer's connection is set up: "fresh" (a new connection and full handshake each),
    "resumed" (a new connection each, resuming the previous one's TLS session with its
    session ticket; one unmeasured connection per server and link fetches the first ticket)
    or "reused" (one connection per configuration for all its transfers; the ``connection``
    column says "new" for the transfer that opened it, "reused" after).

    ``qlog_dir`` (created) receives a qlog trace of every transfer's connection: the client's
    in ``qlog_dir/client``, the embedded server's in ``qlog_dir/server``; the ``qlog_path`` and
    ``server_qlog_path`` columns hold their absolute paths (:func:`qsftp.qlog.load` reads
    them). Writing qlog costs CPU on both sides: measure throughput without it.

    ``transport`` is "quic", "tcp" (qsftp/1 over TLS on TCP) or a list of them, another
    dimension; the embedded server then listens on both. Through a link a TCP transfer goes
    through a :class:`~qsftp.netem.StreamRelay`, which applies delay and rate but no packet
    impairment: a link with loss, jitter, reordering, duplication or corruption is a
    UsageError for TCP, except with ``link_mode="packet"``.

    ``link_mode="packet"`` (Linux, root) runs each link as a
    :class:`~qsftp.packetlink.PacketLink` instead: the server CLI in one network namespace,
    each transfer by the client CLI in another, every IP packet through the link. It needs
    the embedded server (no ``target``), takes no ``congestion_control`` or
    ``receive_window`` (the client CLI has no such options), and only ``handshake="fresh"``
    without ``qlog_dir``; there TCP meets the same loss as QUIC, in the kernel. Rows say which
    mode produced them in ``link_mode``: "none" (direct), "relay" (UDP datagrams, QUIC),
    "stream-relay" (the TCP byte stream) or "packet". The engine is a QUIC dimension
    only: TCP transfers are not multiplied by it, their ``engine`` is empty, and they go to the
    embedded server of the default engine (which listens on TCP too).
    """
    directions = {"upload": ["upload"], "download": ["download"], "both": ["upload", "download"]}
    if direction not in directions:
        raise UsageError(f"direction must be upload, download or both, not {direction!r}")
    if repeats < 1:
        raise UsageError("repeats must be at least 1")
    byte_sizes = [parse_size(s) for s in _as_list(sizes)]
    chunks = [int(c) for c in _as_list(chunk_sizes)]
    datagrams = _as_list(max_datagram_size)
    algorithms = _as_list(congestion_control)
    windows = _as_list(receive_window)
    transports = _transports(transport)
    engines = list(dict.fromkeys(engine_name(name) for name in _as_list(engine)))
    if "quic" in transports:
        for name in engines:
            get_engine(name)  # an unknown or missing engine fails here, not in every row
    with_links = links is not None
    link_list = _links(links)
    modes = list(dict.fromkeys(_as_list(handshake)))
    if not modes or any(mode not in HANDSHAKE_MODES for mode in modes):
        raise UsageError(f"handshake must be one or more of {HANDSHAKE_MODES}, not {handshake!r}")
    qlog_root = _absolute(qlog_dir) if qlog_dir is not None else None
    if link_mode not in ("relay", "packet"):
        raise UsageError(f"link_mode must be 'relay' or 'packet', not {link_mode!r}")
    packet = link_mode == "packet" and any(link is not None for link in link_list)
    if packet:
        if target is not None:
            raise UsageError("link_mode='packet' runs its own server in a namespace: no target")
        if any(a is not None for a in algorithms) or any(w is not None for w in windows):
            raise UsageError(
                "link_mode='packet' takes no congestion_control or receive_window "
                "(the client CLI has no such options)"
            )
        if modes != ["fresh"] or qlog_dir is not None:
            raise UsageError(
                "link_mode='packet' runs one client CLI per transfer: handshake='fresh' only, "
                "and no qlog_dir"
            )
        if (reason := unavailable_reason()) is not None:
            raise PacketLinkUnavailable(reason)
    elif "tcp" in transports:
        _check_stream_links(link_list)
    if "tcp" in transports and "resumed" in modes:
        raise UsageError("handshake='resumed' needs QUIC session tickets, not transport tcp")
    configs = [
        # Through a link the loopback default datagram size would be unrealistic.
        _Config(
            d,
            s,
            c,
            LINK_DATAGRAM_SIZE if m is None and k is not None else m,
            a,
            w,
            k,
            h,
            t,
            e if t == "quic" else None,  # the engine is QUIC's: TCP rows have none
        )
        for d, s, c, m, a, w, k, h, t, e in itertools.product(
            directions[direction],
            byte_sizes,
            chunks,
            datagrams,
            algorithms,
            windows,
            link_list,
            modes,
            transports,
            engines,
        )
    ]
    configs = list(dict.fromkeys(configs))  # TCP configurations differ by no engine
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    order = [(config, repeat) for config in configs for repeat in range(repeats)]
    random.Random(seed).shuffle(order)
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    files = Path(files_dir) if files_dir is not None else None
    local = {size: test_file(size, seed=file_seed, directory=files) for size in byte_sizes}
    rows: list[dict[str, Any]] = []
    software: set[str] = set()  # the server's self-description, from CONN_ACK
    # Every transfer opens its own connection (handshake_ms is its own), except with
    # handshake="reused", where _measure records "reused" after a configuration's first.
    connection = "new"

    with tempfile.TemporaryDirectory(prefix="qsftp-sweep-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            servers: dict[tuple[int | None, str | None, int | None, str | None], Target] = {}
            # In packet mode the loopback servers serve the direct rows only.
            for key in dict.fromkeys(c.server_key for c in configs if c.link is None or not packet):
                if target is None:
                    server, _pid = await stack.enter_async_context(
                        _embedded_server(
                            workdir,
                            max_datagram_size=key[0],
                            congestion_control=key[1],
                            receive_window=key[2],
                            qlog_dir=qlog_root / "server" if qlog_root is not None else None,
                            transport="both" if "tcp" in transports else "quic",
                            engine=key[3],
                        )
                    )
                    servers[key] = server
                else:
                    servers[key] = _target(target)

            def remote_name(size: int) -> str:
                return f"qsftp-sweep/{size}-seed{file_seed}.bin"

            # One emulator per (server, link), in front of that server; seeds derived from the
            # shuffle seed, so the same seed repeats the same losses (as far as timing allows).
            # TCP transfers go through a stream relay of the same link instead.
            emulators: dict[tuple[Any, _Link, bool], LinkEmulator | StreamRelay] = {}
            # Packet mode: one PacketLink per (server settings, link), its server CLI inside
            # (listening with every transport of the sweep).
            labs: dict[tuple[Any, _Link], tuple[PacketLink, LabServer]] = {}
            for index, (key, link, stream) in enumerate(
                dict.fromkeys(
                    (c.server_key, c.link, c.transport == "tcp" and not packet)
                    for c in configs
                    if c.link is not None
                )
            ):
                link_seed = random.Random(f"qsftp-link-{seed}-{index}").randrange(1 << 31)
                if packet:
                    labs[key, link] = await _packet_lab(
                        stack,
                        link,
                        key,
                        seed=link_seed,
                        root=workdir / f"packet-root-{index}",
                        files={remote_name(size): local[size] for size in byte_sizes}
                        if "download" in directions[direction]
                        else {},
                        transport="both" if "tcp" in transports else "quic",
                    )
                    continue
                server = servers[key]
                relay = StreamRelay if stream else LinkEmulator
                emulators[key, link, stream] = await stack.enter_async_context(
                    relay(
                        (server.host, server.port),
                        uplink=link.uplink,
                        downlink=link.downlink,
                        seed=link_seed,
                    )
                )

            # Closed before the emulators and servers they talk to (the stack unwinds backwards).
            pool = _Pool()
            stack.push_async_callback(pool.aclose)
            tickets = TicketCache()
            client_qlog = qlog_root / "client" if qlog_root is not None else None

            def address(config: _Config) -> Target:
                """Where a transfer of ``config`` connects: the server or its link."""
                server = servers[config.server_key]
                if config.link is None:
                    return server
                emulator = emulators[config.server_key, config.link, config.transport == "tcp"]
                return Target(
                    host=emulator.host,
                    port=emulator.port,
                    options=server.options,
                    embedded=server.embedded,
                )

            # Downloads need the file on the server: put it there first (not measured, and
            # direct: never through an emulated link).
            if "download" in directions[direction]:
                for key, server in servers.items():
                    for size in byte_sizes:
                        setup = _row(run_id, configs[0], -1, True, connection)
                        quic = transports[0] == "quic"
                        cfg = _Config(
                            "upload",
                            size,
                            DEFAULT_CHUNK_SIZE,
                            *key[:3],
                            transport=transports[0],
                            engine=(key[3] or DEFAULT_ENGINE) if quic else None,
                        )
                        await _measure(
                            server,
                            cfg,
                            local=local[size],
                            remote=remote_name(size),
                            row=setup,
                            workdir=workdir,
                            software=software,
                        )
                        if setup["error"]:
                            raise TransportError(f"could not place test file: {setup['error']}")

            # "resumed" transfers resume the previous connection's session: fetch a first
            # ticket per server and link, so that the first measured one resumes too.
            for config in dict.fromkeys(c for c in configs if c.handshake == "resumed"):
                there = address(config)
                if tickets.get(there.host, there.port) is None:
                    with contextlib.suppress(QsftpError):
                        async with connect(
                            there.host,
                            there.port,
                            tickets=tickets,
                            **_connect_options(there, config),
                        ):
                            pass

            bar = _progress_bar(len(order) + (1 if warmup else 0), enabled=progress)
            with bar:
                plan = [(order[0][0], -1, True)] if warmup else []
                plan += [(config, repeat, False) for config, repeat in order]
                for config, repeat, is_warmup in plan:
                    row = _row(run_id, config, repeat, is_warmup, connection, with_links=with_links)
                    if config.link is not None and packet:
                        await _measure_packet(
                            *labs[config.server_key, config.link],
                            config,
                            local=local[config.size],
                            remote=remote_name(config.size),
                            row=row,
                        )
                        rows.append(row)
                        bar.update(1)
                        continue
                    emulator = None
                    if config.link is not None:
                        stream = config.transport == "tcp"
                        emulator = emulators[config.server_key, config.link, stream]
                        emulator.reset_stats()
                    name = remote_name(config.size)
                    await _measure(
                        address(config),
                        config,
                        local=local[config.size],
                        remote=name,
                        row=row,
                        workdir=workdir,
                        software=software,
                        qlog_dir=client_qlog,
                        tickets=tickets,
                        pool=pool,
                    )
                    if emulator is not None:
                        await _record_link(emulator, row)
                    rows.append(row)
                    bar.update(1)

    if qlog_root is not None:
        # The embedded server names its trace of a connection as the client does (by the
        # original destination connection ID); it exists once the server has stopped.
        for row in rows:
            if row["qlog_path"]:
                mirror = qlog_root / "server" / Path(row["qlog_path"]).name
                row["server_qlog_path"] = str(mirror) if mirror.exists() else ""
    frame = pd.DataFrame(rows, columns=COLUMNS + LINK_COLUMNS if with_links else COLUMNS)
    frame.attrs.update(collect_metadata())
    if with_links:
        # Numbers stay numbers on "direct" rows (NaN, not None), so saved files read back equal.
        for column in LINK_COLUMNS:
            if column not in _LINK_TEXT_COLUMNS:
                frame[column] = pd.to_numeric(frame[column])
        frame.attrs.update(
            links=[link.label() if link else "direct" for link in link_list],
            link_seeds={
                **{
                    f"{e.label()} → {e.target[0]}:{e.target[1]}": e.seed for e in emulators.values()
                },
                **{f"{p.label()} → {p.server_ns}": p.seed for p, _ in labs.values()},
            },
            link_mode=link_mode,
        )
    frame.attrs.update(
        run_id=run_id,
        shuffle_seed=seed,
        file_seed=file_seed,
        repeats=repeats,
        warmup=warmup,
        target="embedded" if target is None else f"{servers[next(iter(servers))].host}",
        connection=connection if modes != ["reused"] else "per-configuration",
        handshake=modes,
        qlog_dir=str(qlog_root) if qlog_root is not None else None,
        server_software=", ".join(sorted(software)),
    )
    return frame


# --- handshakes -----------------------------------------------------------------------------

# Every column of a handshakes() frame, in order (docs/MEASUREMENT.md describes each).
HANDSHAKE_COLUMNS = [
    "run_id",
    "timestamp",
    "delay_ms",
    "rtt_ms",
    "mode",
    "repeat",
    "warmup",
    "session_resumed",
    "handshake_ms",
    "session_ms",
    "setup_ms",
    "first_reply_ms",
    "client_cpu_ms",
    "packets_up",
    "bytes_up",
    "packets_down",
    "bytes_down",
    "error",
]
# What handshakes() compares: a full handshake (no ticket offered) and a resumed one.
_SETUP_MODES = ("full", "resumed")


async def _one_setup(
    emulator: LinkEmulator,
    target: Target,
    *,
    mode: str,
    tickets: TicketCache,
    max_datagram_size: int,
    row: dict[str, Any],
) -> None:
    """Open one connection through ``emulator``, ask one STAT, close; fill ``row``."""
    options = dict(target.options)
    options["max_datagram_size"] = max_datagram_size
    if mode == "resumed":
        options["tickets"] = tickets
    emulator.reset_stats()
    row["timestamp"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    try:
        cpu_start = cpu_time()
        started = time.perf_counter()
        async with connect(emulator.host, emulator.port, **options) as conn:
            setup = time.perf_counter() - started
            cpu = cpu_time() - cpu_start
            link = emulator.stats()
            await conn.stat("")
            first_reply = time.perf_counter() - started
            row.update(
                session_resumed=conn.session_resumed,
                handshake_ms=conn.handshake_ms,
                session_ms=conn.session_ms,
            )
    except QsftpError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        logger.info("handshake failed: %s", row["error"])
        return
    row.update(
        setup_ms=setup * 1000.0,
        first_reply_ms=first_reply * 1000.0,
        client_cpu_ms=cpu * 1000.0,
        packets_up=link.uplink.received_packets,
        bytes_up=link.uplink.received_bytes,
        packets_down=link.downlink.received_packets,
        bytes_down=link.downlink.received_bytes,
    )
    with contextlib.suppress(TimeoutError):  # let the close leave the link before the next
        await emulator.wait_drained(_LINK_DRAIN_TIMEOUT)


async def handshakes(
    delays: Sequence[float] = (0, 25, 50),
    repeats: int = 10,
    *,
    modes: Sequence[str] = _SETUP_MODES,
    target: Any = None,
    max_datagram_size: int = LINK_DATAGRAM_SIZE,
    warmup: bool = True,
    seed: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Measure connection setup, full vs resumed handshake, under emulated one-way delays.

    For each delay a :class:`~qsftp.netem.LinkEmulator` (``delay_ms`` both ways, so the RTT
    is twice it) runs in front of the server (an embedded one in a child process unless
    ``target`` is given, as in :func:`sweep`). Each measurement opens a connection, asks one
    STAT of the root and closes; "full" offers no ticket, "resumed" offers the ticket of the
    previous "resumed" connection through the same link. One warm-up per delay and mode
    (flagged, not dropped) goes first, which also fetches the first ticket; then every
    (delay, mode, repeat) runs in a shuffled order whose seed is stored in ``df.attrs``.
    Returns one row per connection (:data:`HANDSHAKE_COLUMNS`, docs/MEASUREMENT.md).
    """
    if repeats < 1:
        raise UsageError("repeats must be at least 1")
    modes = list(dict.fromkeys(modes))
    if not modes or any(mode not in _SETUP_MODES for mode in modes):
        raise UsageError(f"modes must be among {_SETUP_MODES}, not {modes!r}")
    delay_list = [float(d) for d in _as_list(delays)]
    profiles = [LinkProfile(delay_ms=d) for d in delay_list]  # UsageError on a bad delay
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    order = [
        (index, mode, repeat)
        for index in range(len(delay_list))
        for mode in modes
        for repeat in range(repeats)
    ]
    random.Random(seed).shuffle(order)
    plan = [(i, m, -1, True) for i in range(len(delay_list)) for m in modes] if warmup else []
    plan += [(i, m, r, False) for i, m, r in order]
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    rows: list[dict[str, Any]] = []
    tickets = TicketCache()
    with tempfile.TemporaryDirectory(prefix="qsftp-handshakes-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            if target is None:
                server, _pid = await stack.enter_async_context(
                    _embedded_server(
                        Path(tmp),
                        max_datagram_size=max_datagram_size,
                        congestion_control=None,
                    )
                )
            else:
                server = _target(target)
            emulators = [
                await stack.enter_async_context(
                    LinkEmulator(
                        (server.host, server.port),
                        uplink=profile,
                        downlink=profile,
                        seed=random.Random(f"qsftp-link-{seed}-{index}").randrange(1 << 31),
                    )
                )
                for index, profile in enumerate(profiles)
            ]
            with _progress_bar(len(plan), enabled=progress) as bar:
                for index, mode, repeat, is_warmup in plan:
                    row: dict[str, Any] = dict.fromkeys(HANDSHAKE_COLUMNS)
                    row.update(
                        run_id=run_id,
                        delay_ms=delay_list[index],
                        rtt_ms=2 * delay_list[index],
                        mode=mode,
                        repeat=repeat,
                        warmup=is_warmup,
                        session_resumed=False,
                        error="",
                    )
                    await _one_setup(
                        emulators[index],
                        server,
                        mode=mode,
                        tickets=tickets,
                        max_datagram_size=max_datagram_size,
                        row=row,
                    )
                    rows.append(row)
                    bar.update(1)
    frame = pd.DataFrame(rows, columns=HANDSHAKE_COLUMNS)
    frame.attrs.update(collect_metadata())
    frame.attrs.update(
        run_id=run_id,
        shuffle_seed=seed,
        repeats=repeats,
        warmup=warmup,
        delays_ms=delay_list,
        modes=modes,
        max_datagram_size=max_datagram_size,
        target="embedded" if target is None else f"{server.host}:{server.port}",
    )
    return frame


def summarize_handshakes(df: pd.DataFrame) -> pd.DataFrame:
    """Medians per (delay, mode) of a :func:`handshakes` frame, measured rows only, with
    ``n`` and the share of connections that resumed."""
    rows = df[~df["warmup"].astype(bool) & (df["error"].fillna("") == "")]
    grouped = rows.groupby(["delay_ms", "rtt_ms", "mode"])
    summary = grouped.agg(
        n=("handshake_ms", "count"),
        resumed=("session_resumed", "mean"),
        handshake_ms=("handshake_ms", "median"),
        session_ms=("session_ms", "median"),
        setup_ms=("setup_ms", "median"),
        first_reply_ms=("first_reply_ms", "median"),
        client_cpu_ms=("client_cpu_ms", "median"),
        bytes_down=("bytes_down", "median"),
        bytes_up=("bytes_up", "median"),
    )
    return summary.reset_index()


# --- saving and loading ---------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _read_meta(path: Path) -> dict[str, Any]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional until Parquet is asked for

        raw = pq.read_schema(path).metadata or {}
        text = raw.get(b"qsftp", b"{}")
        return dict(json.loads(text))
    sidecar = _sidecar(path)
    return dict(json.loads(sidecar.read_text())) if sidecar.exists() else {}


def _merge_attrs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """attrs for a file holding several runs: the newest run's facts, plus every run's."""
    runs = list(old.get("runs", [])) or ([_plain(old)] if old else [])
    runs.append(_plain(new))
    merged = dict(new)
    merged["runs"] = runs
    return merged


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k != "runs"}


def save_results(df: pd.DataFrame, path: str | os.PathLike[str], *, append: bool = False) -> Path:
    """Write ``df`` to CSV (metadata in ``<path>.meta.json``) or Parquet (metadata inside).

    With ``append`` the rows are added to an existing file and every run's metadata is kept
    under ``attrs["runs"]``.
    """
    out = Path(path)
    if out.suffix not in (".csv", ".parquet"):
        raise UsageError(f"save as .csv or .parquet, not {out.suffix or 'no suffix'}")
    attrs = dict(df.attrs)
    if append and out.exists():
        old = load_results(out)
        attrs = _merge_attrs(dict(old.attrs), attrs)
        df = pd.concat([old, df], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(attrs, default=str, sort_keys=True)
    if out.suffix == ".parquet":
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        table = pa.Table.from_pandas(df, preserve_index=False)
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[b"qsftp"] = meta.encode()
        pq.write_table(table.replace_schema_metadata(schema_meta), out)
    else:
        df.to_csv(out, index=False)
        _sidecar(out).write_text(meta + "\n")
    return out


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read what :func:`save_results` wrote; ``attrs`` come back too."""
    src = Path(path)
    if src.suffix == ".parquet":
        frame = pd.read_parquet(src)
    else:
        # Text columns stay text even when every cell is empty (an all-failed run's sha256).
        text = {
            "sha256": str,
            "error": str,
            **dict.fromkeys(_TEXT_COLUMNS, str),
            **dict.fromkeys(_LINK_TEXT_COLUMNS, str),
        }
        frame = pd.read_csv(src, keep_default_na=False, na_values=[""], dtype=text)
        # Files saved before a column existed (or by handshakes()) lack some of these.
        for column in ("error", "sha256", *_TEXT_COLUMNS):
            if column in frame.columns:
                frame[column] = frame[column].fillna("").astype(str)
        for column in ("verified", "warmup", "cpu_bound", "session_resumed"):
            if column in frame.columns:
                frame[column] = frame[column].astype(str).str.lower().eq("true")
    frame.attrs.update(_read_meta(src))
    return frame


# --- summaries ------------------------------------------------------------------------------

_CONFIG_COLUMNS = [
    "direction",
    "transport",
    "link",
    "link_mode",
    "handshake",
    "file_size_bytes",
    "chunk_size_bytes",
    "max_datagram_size",
    "congestion_control",
    "receive_window_bytes",
    "engine",
]


def measured(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that count: not warm-ups, no error."""
    return df[~df["warmup"].astype(bool) & (df["error"].fillna("") == "")]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Median and interquartile range of throughput per configuration (Mbit/s)."""
    rows = measured(df)
    # Keys come from every non-warm-up row, so a run in which everything failed still has them.
    planned = df[~df["warmup"].astype(bool)]
    keys = [c for c in _CONFIG_COLUMNS if c in planned.columns and planned[c].notna().any()]
    grouped = rows.groupby(keys, dropna=False)["throughput_mbps"]
    summary = grouped.agg(
        n="count",
        median_mbps="median",
        q1_mbps=lambda s: s.quantile(0.25),
        q3_mbps=lambda s: s.quantile(0.75),
    ).reset_index()
    summary["iqr_mbps"] = summary["q3_mbps"] - summary["q1_mbps"]
    errors = planned.groupby(keys, dropna=False)["error"]
    failed = errors.agg(lambda s: int((s.fillna("") != "").sum())).rename("failed")
    summary = summary.merge(failed.reset_index(), on=keys, how="outer")
    summary["n"] = summary["n"].fillna(0).astype(int)
    return summary.sort_values(keys).reset_index(drop=True)


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.experiment",
        description="Measure QSFTP throughput across file and chunk sizes; save data + figure.",
    )
    parser.add_argument("--quick", action="store_true", help="a small sweep (under a minute)")
    parser.add_argument("--sizes", nargs="+", help="file sizes, e.g. 64KB 1MB 16MB")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, help="DATA chunk sizes, bytes")
    parser.add_argument("--repeats", type=int, help="transfers per configuration")
    parser.add_argument("--direction", choices=["upload", "download", "both"], default="both")
    parser.add_argument("--host", help="measure this server instead of an embedded one")
    parser.add_argument("--port", type=int, default=5000, help="port of --host")
    parser.add_argument("--token", help="token for --host (default: $QSFTP_TOKEN)")
    parser.add_argument("--pin", help="certificate fingerprint of --host")
    parser.add_argument("--cafile", help="CA file for --host")
    parser.add_argument("--max-datagram-size", type=int, nargs="+", help="QUIC datagram sizes")
    parser.add_argument(
        "--transport",
        nargs="+",
        choices=["quic", "tcp"],
        default=["quic"],
        help="quic, tcp (TLS over TCP) or both: a dimension (default quic)",
    )
    parser.add_argument(
        "--receive-window", type=int, nargs="+", help="flow-control windows per stream, bytes"
    )
    parser.add_argument("--engine", nargs="+", choices=ENGINES, help="QUIC libraries (aioquic)")
    link = parser.add_argument_group(
        "emulated link", "any of these adds one emulated link (both directions) next to direct"
    )
    link.add_argument("--delay-ms", type=float, help="one-way delay, ms")
    link.add_argument("--loss", type=float, help="random loss probability, e.g. 0.01")
    link.add_argument("--rate-mbps", type=float, help="bottleneck rate, Mbit/s")
    link.add_argument(
        "--link-mode",
        choices=["relay", "packet"],
        default="relay",
        help="relay: UDP LinkEmulator (default); packet: PacketLink (Linux, root)",
    )
    parser.add_argument(
        "--handshake",
        nargs="+",
        choices=HANDSHAKE_MODES,
        help="how connections are set up: fresh (default), resumed, reused",
    )
    parser.add_argument("--qlog-dir", help="keep a qlog trace of every transfer's connection")
    parser.add_argument(
        "--handshakes",
        action="store_true",
        help="measure connection setup instead (full vs resumed; see --delays)",
    )
    parser.add_argument(
        "--delays",
        type=float,
        nargs="+",
        default=[0.0, 25.0, 50.0],
        help="one-way delays for --handshakes, ms (default: 0 25 50)",
    )
    parser.add_argument("--seed", type=int, help="shuffle seed (default: random, recorded)")
    parser.add_argument("--out", default="data", help="output directory (default: data/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _main_handshakes(args: argparse.Namespace) -> int:
    """``--handshakes``: measure connection setup, print the medians, save the rows."""
    try:
        df = asyncio.run(
            handshakes(
                delays=args.delays,
                repeats=args.repeats or 20,
                seed=args.seed,
                progress=not args.no_progress,
            )
        )
    except QsftpError as exc:
        print(f"qsftp-experiment: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    csv = save_results(df, Path(args.out) / "handshakes.csv")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summarize_handshakes(df).to_string(index=False, float_format=lambda v: f"{v:.1f}"))  # noqa: T201
    failed = int((df["error"] != "").sum())
    print(  # noqa: T201
        f"\n{len(df)} connections ({failed} failed), run {df.attrs['run_id']}, "
        f"shuffle seed {df.attrs['shuffle_seed']}\nwrote {csv}"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qsftp.experiment``."""
    from .plots import plot_overview, save_figure  # noqa: PLC0415 - matplotlib only here

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.handshakes:
        return _main_handshakes(args)
    if args.quick:
        sizes = args.sizes or ["64KB", "1MB", "8MB"]
        chunks = args.chunk_sizes or [1024, 16384, 65536]
        repeats = args.repeats or 3
    else:
        sizes = args.sizes or ["64KB", "1MB", "16MB", "64MB"]
        chunks = args.chunk_sizes or [1024, 4096, 16384, 65536, 262144]
        repeats = args.repeats or 5
    target = None
    if args.host:
        options = {
            "token": args.token or os.environ.get("QSFTP_TOKEN"),
            "pin": args.pin,
            "cafile": args.cafile,
        }
        target = (args.host, args.port, {k: v for k, v in options.items() if v})
    links: list[LinkProfile | None] | None = None
    fields = {"delay_ms": args.delay_ms, "loss": args.loss, "rate_mbps": args.rate_mbps}
    if any(value is not None for value in fields.values()):
        try:
            profile = LinkProfile(**{k: v for k, v in fields.items() if v is not None})
        except UsageError as exc:
            print(f"qsftp-experiment: error: {exc}", file=sys.stderr)  # noqa: T201
            return 2
        links = [None, profile]
    try:
        df = asyncio.run(
            sweep(
                sizes=sizes,
                chunk_sizes=chunks,
                repeats=repeats,
                direction=args.direction,
                target=target,
                max_datagram_size=args.max_datagram_size,
                receive_window=args.receive_window,
                engine=args.engine,
                links=links,
                link_mode=args.link_mode,
                handshake=args.handshake or "fresh",
                qlog_dir=args.qlog_dir,
                transport=args.transport,
                seed=args.seed,
                progress=not args.no_progress,
            )
        )
    except QsftpError as exc:
        print(f"qsftp-experiment: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    out = Path(args.out)
    stem = "quick" if args.quick else "sweep"
    csv = save_results(df, out / f"{stem}.csv")
    parquet = save_results(df, out / f"{stem}.parquet")
    figure = plot_overview(df)
    png = save_figure(figure, out / f"{stem}.png")
    summary = summarize(df)
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.1f}"))  # noqa: T201
    failed = int((df["error"] != "").sum())
    print(  # noqa: T201
        f"\n{len(df)} transfers ({failed} failed), run {df.attrs['run_id']}, "
        f"shuffle seed {df.attrs['shuffle_seed']}\nwrote {csv}, {parquet}, {png}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
