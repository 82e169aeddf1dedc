"""Exhaustion and stalled peers, against a server in its own process whose peak RSS (VmHWM in
/proc/PID/status) must stay under RSS_BOUND_MB (docs/SECURITY.md): thousands of streams from
one client, many connections, clients that never send their request, a 10 MB header, a client
that stops reading a large download, and a server whose disk stalls under an upload (then the
uploading client's RSS is bounded too). After each attack a well-behaved client is served.

The files are sparse (a truncate, no disk blocks), so a sender that ignored backpressure would
read gigabytes into memory in a fraction of a second and fail the bound by far.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect as quic_connect
from helpers import make_file, partials, run
from test_hostile import _config, _open_session, _Raw

import qsftp
from qsftp import wire

ROOT = Path(__file__).resolve().parents[1]
# Peak RSS a server (or an uploading client) may reach in any of these tests. Measured peaks
# on this machine are in docs/SECURITY.md; the bound leaves a wide margin above them, and an
# unbounded buffer (a whole sparse file read into memory) would exceed it many times over.
RSS_BOUND_MB = 150
SPARSE_SIZE = 1 << 30
STREAMS = 2000
_READY = re.compile(r"ready on [^,]*:(\d+),.* root .*, certificate sha256:([0-9a-f]{64})")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSFTP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        QSFTP_STATE_DIR=str(tmp_path / "pstate"),
        QSFTP_CONFIG_DIR=str(tmp_path / "pconfig"),
        HOME=str(tmp_path),
    )
    return env


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    pin: str
    root: Path

    @property
    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)


def _sparse(path: Path, size: int = SPARSE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def _start(tmp_path: Path, *args: str, wrapper: list[str] | None = None) -> ServerProcess:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    command = wrapper or [sys.executable, "-m", "qsftp.server"]
    process = subprocess.Popen(
        [*command, "--port", "0", "--root", str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(tmp_path),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = _READY.search(line)
    if match is None:
        process.kill()
        pytest.fail(f"server did not start: {line!r}")
    return ServerProcess(process, int(match.group(1)), match.group(2), root)


@contextlib.contextmanager
def _server(
    tmp_path: Path, *args: str, wrapper: list[str] | None = None
) -> Iterator[ServerProcess]:
    """A server process for the ``with`` block; it must survive and then stop cleanly."""
    proc = _start(tmp_path, *args, wrapper=wrapper)
    try:
        yield proc
    finally:
        proc.process.terminate()
        proc.process.wait(20)
    assert proc.process.returncode == 0, "the server must survive and stop cleanly"


async def _served(server: ServerProcess, tmp_path: Path, tag: str) -> None:
    """A well-behaved client uploads and downloads a file, both verified."""
    src = make_file(tmp_path / f"ok-{tag}.bin", 300_000, seed=7)
    async with qsftp.connect("127.0.0.1", server.port, pin=server.pin) as conn:
        assert (await conn.upload(src)).verified
        back = await conn.download(src.name, tmp_path / f"back-{tag}.bin")
        assert back.verified


def _check_bound(server: ServerProcess, what: str) -> float:
    peak = server.peak_rss_mb
    print(f"\n{what}: server peak RSS {peak:.1f} MB (bound {RSS_BOUND_MB} MB)")
    assert peak < RSS_BOUND_MB, f"{what}: server peak RSS {peak:.1f} MB"
    return peak


# --- attacks ---------------------------------------------------------------------------------


def test_thousands_of_streams_from_one_client_keep_server_memory_bounded(tmp_path: Path) -> None:
    """2000 PUTs of 10 MB on one connection, each sending 1 KiB and then nothing more: QUIC
    admits 128 streams at a time, the server runs 64 operations and answers the rest BUSY."""

    async def body() -> None:
        await _served(server, tmp_path, "before")
        async with quic_connect(
            "127.0.0.1", server.port, configuration=_config(), create_protocol=_Raw
        ) as raw:
            assert isinstance(raw, _Raw)
            await _open_session(raw)
            chunk = wire.encode(wire.Data(data=bytes(1024)))
            for i in range(STREAMS):
                sid = raw._quic.get_next_available_stream_id()
                put = wire.encode(wire.Put(name=f"slow/{i}.bin", size=10_000_000))
                raw._quic.send_stream_data(sid, put + chunk)
            raw.transmit()
            for _ in range(200):  # until the server has answered all but the 64 it runs
                await asyncio.sleep(0.1)
                if len(raw.ended) >= STREAMS - 64:
                    break
            assert len(raw.ended) == STREAMS - 64
            await _served(server, tmp_path, "during")

    with _server(tmp_path) as server:
        run(body)
        _check_bound(server, f"{STREAMS} streams")


def test_many_connections_keep_server_memory_bounded(tmp_path: Path) -> None:
    """150 connections at once: 100 open a session (the limit), 50 are refused BUSY."""

    async def body() -> None:
        async def one() -> object:
            try:
                conn = qsftp.connect("127.0.0.1", server.port, pin=server.pin)
                return await stack.enter_async_context(conn)
            except qsftp.Busy as exc:
                return exc

        async with contextlib.AsyncExitStack() as stack:
            results = await asyncio.gather(*(one() for _ in range(150)))
            busy = [r for r in results if isinstance(r, qsftp.Busy)]
            assert len(busy) == 50, len(busy)
        await _served(server, tmp_path, "after")

    with _server(tmp_path, "--max-connections", "100") as server:
        run(body)
        _check_bound(server, "150 connections")


def test_clients_that_never_send_their_request_are_closed_and_others_served(
    tmp_path: Path,
) -> None:
    """40 connections complete the handshake and send nothing (or half a CONN_REQUEST): the
    server closes them at the session deadline; meanwhile and afterwards others are served.
    On an open session, 100 operation streams that send one byte of a request hold only that."""

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            silent = []
            for i in range(40):
                raw = await stack.enter_async_context(
                    quic_connect(
                        "127.0.0.1", server.port, configuration=_config(), create_protocol=_Raw
                    )
                )
                if i % 2:
                    request = wire.encode(wire.ConnRequest(version=1, token="x" * 100))
                    raw._quic.send_stream_data(0, request[:20])
                    raw.transmit()
                silent.append(raw)
            opened = await stack.enter_async_context(
                quic_connect(
                    "127.0.0.1", server.port, configuration=_config(), create_protocol=_Raw
                )
            )
            assert isinstance(opened, _Raw)
            await _open_session(opened)
            for _ in range(100):
                sid = opened._quic.get_next_available_stream_id()
                opened._quic.send_stream_data(sid, bytes([wire.MessageType.PUT]))
            opened.transmit()
            await _served(server, tmp_path, "during")
            async with asyncio.timeout(10):
                await asyncio.gather(*(raw.wait_closed() for raw in silent))
        await _served(server, tmp_path, "after")

    with _server(tmp_path, "--session-deadline", "1") as server:
        run(body)
        _check_bound(server, "silent clients")


def test_a_10_mb_header_is_refused_before_it_is_buffered(tmp_path: Path) -> None:
    """A PUT whose header announces 10 MB, and 10 MB actually sent, on an operation stream
    (ERROR BAD_REQUEST, the rest discarded), and a 10 MB CONN_REQUEST on the control stream
    (the connection is closed)."""
    huge = 10 * 1024 * 1024

    async def body() -> None:
        async with quic_connect(
            "127.0.0.1", server.port, configuration=_config(), create_protocol=_Raw
        ) as raw:
            assert isinstance(raw, _Raw)
            await _open_session(raw)
            header = bytes([wire.MessageType.PUT]) + (huge | 0x80000000).to_bytes(4, "big")
            raw._quic.send_stream_data(4, header + bytes(huge), end_stream=True)
            raw.transmit()
            await raw.wait_ended(4, timeout=30)
            answer = wire.Decoder()
            answer.feed(bytes(raw.received[4]))
            reply = answer.next_message()
            assert isinstance(reply, wire.Error) and reply.code == qsftp.ErrorCode.BAD_REQUEST
        async with quic_connect(
            "127.0.0.1", server.port, configuration=_config(), create_protocol=_Raw
        ) as raw:
            header = bytes([wire.MessageType.CONN_REQUEST]) + (huge | 0x80000000).to_bytes(4, "big")
            raw._quic.send_stream_data(0, header + bytes(huge))
            raw.transmit()
            await asyncio.wait_for(raw.wait_closed(), 30)
        await _served(server, tmp_path, "after")

    with _server(tmp_path) as server:
        run(body)
        _check_bound(server, "10 MB headers")


# --- stalled peers ---------------------------------------------------------------------------

# A client whose disk never completes a write: it stops consuming what it downloads, so the
# server's sends meet flow control. (Run as `python -c STALLED_CLIENT qsftp-client-args...`.)
STALLED_CLIENT = """
import sys, time
from qsftp import fs, client
def never(self, data):
    while True:
        time.sleep(1)
fs.AtomicWriter.write = never
sys.exit(client.main(sys.argv[1:]))
"""

# A server whose disk stalls, for files named *stalled*, while the flag file exists.
STALLED_SERVER = """
import os, sys, time
from qsftp import fs, server
flag = sys.argv[1]
write = fs.AtomicWriter.write
def slow(self, data):
    while "stalled" in self.name and os.path.exists(flag):
        time.sleep(0.02)
    write(self, data)
fs.AtomicWriter.write = slow
sys.exit(server.main(sys.argv[2:]))
"""


def _to(server: ServerProcess) -> list[str]:
    """CLI options that reach ``server`` quietly."""
    return ["--port", str(server.port), "--pin", server.pin, "-q"]


def _wait_until(condition: object, timeout: float = 20) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


def test_a_client_that_stops_reading_large_downloads_leaves_server_memory_bounded(
    tmp_path: Path,
) -> None:
    """16 downloads of 1 GiB each, on one connection, by a client that never consumes a byte:
    the server sends what flow control allows and waits; its memory stays bounded and other
    clients are served."""
    with _server(tmp_path) as server:
        _stalled_reader(server, tmp_path)


def _stalled_reader(server: ServerProcess, tmp_path: Path) -> None:
    for i in range(16):
        _sparse(server.root / "big" / f"f{i}.bin")
    out = tmp_path / "stalled-out"
    out.mkdir()
    client = subprocess.Popen(
        [sys.executable, "-c", STALLED_CLIENT, "--get", "big", "-o", str(out), *_to(server)],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Every download has its temporary file once its FILE arrived; then let them stall.
        _wait_until(lambda: len(partials(out)) >= 16)
        time.sleep(2)
        assert client.poll() is None, "the stalled client must still be waiting"
        run(lambda: _served(server, tmp_path, "during"))
        client_rss = peak_rss_mb(client.pid)
    finally:
        client.kill()
        client.wait(10)
    print(f"\nstalled reader: client peak RSS {client_rss:.1f} MB")
    _check_bound(server, "16 stalled downloads of 1 GiB")
    run(lambda: _served(server, tmp_path, "after"))


def test_a_stalled_server_disk_bounds_the_uploading_client_and_the_server(tmp_path: Path) -> None:
    """The server's disk stops (an emulated stall) under a 1 GiB upload: the server grants
    credit only as it writes, so the client's send buffer and the server's receive buffer both
    stay bounded; another client is served meanwhile; once the disk is back the server goes on."""
    flag = tmp_path / "disk-stalled"
    flag.touch()
    wrapper = [sys.executable, "-c", STALLED_SERVER, str(flag)]
    src = _sparse(tmp_path / "stalled.bin")
    with _server(
        tmp_path, "--idle-timeout", "3", "--free-space-reserve", "0", wrapper=wrapper
    ) as server:
        client = subprocess.Popen(
            [sys.executable, "-m", "qsftp.client", str(src), *_to(server)],
            env=_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until(lambda: partials(server.root) != [])
            time.sleep(2)
            assert client.poll() is None, "the upload must be waiting for the disk"
            run(lambda: _served(server, tmp_path, "during"))
            client_rss = peak_rss_mb(client.pid)
        finally:
            client.kill()
            client.wait(10)
        print(f"\nstalled disk: uploading client peak RSS {client_rss:.1f} MB")
        assert client_rss < RSS_BOUND_MB
        _check_bound(server, "stalled disk under a 1 GiB upload")
        flag.unlink()
        # The killed client's upload is abandoned (idle timeout) and its temporary file removed.
        _wait_until(lambda: partials(server.root) == [], timeout=20)
        run(lambda: _served(server, tmp_path, "after"))
        assert not (server.root / "stalled.bin").exists()
