"""Hostile input over a live connection: the server answers garbage with an error or a closed
stream, never crashes, and serves a normal upload afterwards."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived, StreamReset
from helpers import decode_all, make_file, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsftp
from qsftp import wire
from qsftp.errors import ErrorCode


class _Raw(QuicConnectionProtocol):
    """A bare QUIC client that records what comes back on each stream."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.received: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Event] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.ended.setdefault(event.stream_id, asyncio.Event()).set()
        elif isinstance(event, StreamReset):
            self.ended.setdefault(event.stream_id, asyncio.Event()).set()

    async def wait_ended(self, stream_id: int, timeout: float = 10) -> None:
        event = self.ended.setdefault(stream_id, asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout)


async def _open_session(raw: _Raw) -> None:
    request = wire.encode(wire.ConnRequest(version=wire.PROTOCOL_VERSION))
    raw._quic.send_stream_data(0, request)
    raw.transmit()
    for _ in range(100):
        if raw.received.get(0):
            break
        await asyncio.sleep(0.02)
    assert isinstance(decode_all(bytes(raw.received[0]))[0], wire.ConnAck)


def _config() -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=[wire.ALPN], verify_mode=ssl.CERT_NONE)


HOSTILE = [
    pytest.param(b"\xff\x00", id="unknown-type"),
    pytest.param(bytes([wire.MessageType.PUT]) + b"\x80\x01\x00\x00", id="put-length-lies"),
    pytest.param(bytes([wire.MessageType.PUT, 0xBF, 0xFF, 0xFF, 0xFF]), id="10MB-header"),
    pytest.param(wire.encode(wire.Data(data=b"x" * 100)), id="data-before-request"),
    pytest.param(
        wire.encode(wire.Put(name="a", size=3)) + wire.encode(wire.Data(data=b"toolong")),
        id="more-than-declared",
    ),
    pytest.param(
        wire.encode(wire.Put(name="a", size=30)) + wire.encode(wire.End(sha256=bytes(32))),
        id="end-too-early",
    ),
    pytest.param(wire.encode(wire.Done(size=0)), id="response-from-client"),
    pytest.param(wire.encode(wire.Get(name="x"))[:3], id="truncated"),
]


async def raw_operation(root: Path, payload: bytes) -> list[wire.Message]:
    """Send one operation stream of raw bytes to a server on ``root``; return its answer,
    after checking that the server still stores a normal upload afterwards."""
    async with qsftp.serve(root) as server:
        async with quic_connect(
            server.host, server.port, configuration=_config(), create_protocol=_Raw
        ) as raw:
            assert isinstance(raw, _Raw)
            await _open_session(raw)
            raw._quic.send_stream_data(4, payload, end_stream=True)
            raw.transmit()
            await raw.wait_ended(4)
            answer = decode_all(bytes(raw.received.get(4, b"")))
        probe = make_file(root.parent / "probe.bin", 50_000)
        assert (await qsftp.upload(probe, server.host, server.port)).verified
    return answer


@pytest.mark.parametrize("payload", HOSTILE)
def test_bad_bytes_on_an_operation_stream_get_bad_request_and_the_server_serves_on(
    tmp_path: Path, payload: bytes
) -> None:
    answer = run(lambda: raw_operation(tmp_path / "root", payload))
    assert answer, "the server must answer, not just drop the stream"
    assert isinstance(answer[-1], wire.Error)
    assert answer[-1].code == ErrorCode.BAD_REQUEST


def test_garbage_on_the_control_stream_closes_only_that_connection(tmp_path: Path) -> None:
    src = make_file(tmp_path / "ok.bin", 50_000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            async with quic_connect(
                server.host, server.port, configuration=_config(), create_protocol=_Raw
            ) as raw:
                raw._quic.send_stream_data(0, b"\x99garbage")
                raw.transmit()
                await asyncio.wait_for(raw.wait_closed(), 10)
            assert (await qsftp.upload(src, server.host, server.port)).verified

    run(body)


def test_thousands_of_streams_from_one_client_leave_the_server_serving(tmp_path: Path) -> None:
    """QUIC caps concurrent streams at 128; the server caps operations at 64 (BUSY); streams
    that never finish their request hold only what flow control allows."""
    src = make_file(tmp_path / "ok.bin", 50_000)

    async def body() -> None:
        async with (
            qsftp.serve(tmp_path / "root") as server,
            quic_connect(
                server.host, server.port, configuration=_config(), create_protocol=_Raw
            ) as raw,
        ):
            await _open_session(raw)
            put = wire.encode(wire.Put(name="slow.bin", size=10**9))
            for _ in range(2000):
                sid = raw._quic.get_next_available_stream_id()
                raw._quic.send_stream_data(sid, put)  # a PUT that never sends its data
            raw.transmit()
            await asyncio.sleep(1)
            assert (await qsftp.upload(src, server.host, server.port)).verified

    run(body)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_never_crash_the_server(tmp_path: Path, payload: bytes) -> None:
    src = make_file(tmp_path / "ok.bin", 10_000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            async with quic_connect(
                server.host, server.port, configuration=_config(), create_protocol=_Raw
            ) as raw:
                await _open_session(raw)
                raw._quic.send_stream_data(4, payload, end_stream=True)
                raw.transmit()
                await raw.wait_ended(4)
            assert (await qsftp.upload(src, server.host, server.port)).verified

    run(body)
