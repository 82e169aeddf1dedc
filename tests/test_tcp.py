"""qsftp/1 over TLS 1.3 on TCP: the same operations and verification as over QUIC, one
multiplexed TCP connection, per-stream flow control, and the server's limits."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    decode_all,
    isolated_home,  # noqa: F401 (an autouse fixture)
    make_file,
    partials,
    run,
    sha256,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import ServerFactory, isolated_env, run_client

import qsftp
from qsftp import fs, tcp, trust, wire
from qsftp.errors import (
    AuthFailed,
    Busy,
    ErrorCode,
    RemoteProtocolError,
    TransportError,
    TrustError,
    UsageError,
)
from qsftp.netem import LinkProfile, StreamRelay
from qsftp.server import Limits
from qsftp.tcp import Frame, FrameDecoder, FrameKind, encode_frame

# --- the frame codec (no sockets) -------------------------------------------------------------

_FRAMES = [
    Frame(FrameKind.DATA, 0, b"hello"),
    Frame(FrameKind.DATA_FIN, 4, b""),
    Frame(FrameKind.RESET, 8, struct.pack("!Q", 9)),
    Frame(FrameKind.STOP_SENDING, 8, struct.pack("!Q", 9)),
    Frame(FrameKind.CREDIT, 12, struct.pack("!Q", 1 << 40)),
    Frame(FrameKind.CLOSE, 0, struct.pack("!Q", 1) + b"bye"),
]
_WIRE = b"".join(encode_frame(f.kind, f.stream_id, f.payload) for f in _FRAMES)


def test_decoder_returns_the_frames_whole_and_byte_at_a_time() -> None:
    assert FrameDecoder().feed(_WIRE) == _FRAMES
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(_WIRE)):
        frames += decoder.feed(_WIRE[i : i + 1])
    assert frames == _FRAMES
    assert frames[4].code == 1 << 40


def test_decoder_keeps_trailing_bytes_for_the_next_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(_WIRE + _WIRE[:7]) == _FRAMES
    assert decoder.feed(_WIRE[7:]) == _FRAMES


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!BQI", 6, 0, 0),  # unknown kind
        struct.pack("!BQI", FrameKind.DATA, 4, tcp.MAX_FRAME_PAYLOAD + 1),  # oversize
        struct.pack("!BQI", FrameKind.CREDIT, 4, 7) + bytes(7),  # wrong fixed length
        struct.pack("!BQI", FrameKind.CLOSE, 0, 2) + bytes(2),  # CLOSE without a code
    ],
)
def test_decoder_rejects_bad_headers_before_buffering_payload(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_raises_only_remote_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        FrameDecoder().feed(data)


# --- operations over a live TCP connection ---------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk_size"), [(0, 65536), ((1 << 20) + 17, 65536), (100_003, 999)]
)
def test_upload_download_list_and_stat_over_tcp_are_verified_and_identical(
    tmp_path: Path, size: int, chunk_size: int
) -> None:
    src = make_file(tmp_path / "src.bin", size)
    root = tmp_path / "root"
    back = tmp_path / "back.bin"

    async def body() -> None:
        async with (
            qsftp.serve(root, transport="tcp") as server,
            qsftp.connect(
                server.host, server.port, pin=server.fingerprint, transport="tcp"
            ) as conn,
        ):
            assert server.transports == ("tcp",)
            assert conn.transport == "tcp"
            up = await conn.upload(src, "dir/f.bin", chunk_size=chunk_size)
            down = await conn.download("dir/f.bin", back, chunk_size=chunk_size)
            entries = await conn.listdir("dir")
            entry = await conn.stat("dir/f.bin")
            stats = conn.stats()
        assert up.transport == down.transport == "tcp"
        assert up.verified and down.verified
        assert up.sha256 == down.sha256 == sha256(src)
        assert [(e.name, e.size) for e in entries] == [("dir/f.bin", size)]
        assert (entry.kind, entry.size) == ("file", size)
        assert up.packets_sent > 0 and stats.packets_sent > 0 and stats.congestion_window > 0
        assert conn.max_datagram_size > 0  # the TCP MSS

    run(body)
    assert (root / "dir" / "f.bin").read_bytes() == src.read_bytes()
    assert back.read_bytes() == src.read_bytes()
    assert partials(root) == []


def test_both_transports_share_one_port_number(tmp_path: Path) -> None:
    src = make_file(tmp_path / "src.bin", 300_000)

    async def body() -> list[qsftp.TransferResult]:
        async with qsftp.serve(tmp_path / "root", transport="both") as server:
            assert server.transports == ("quic", "tcp")
            return [
                await qsftp.upload(
                    src, server.host, server.port, remote_name=f"{t}.bin", transport=t
                )
                for t in ("quic", "tcp")
            ]

    quic, tcp_result = run(body)
    assert (quic.transport, tcp_result.transport) == ("quic", "tcp")
    assert (tmp_path / "root" / "tcp.bin").read_bytes() == src.read_bytes()


def test_a_quic_only_server_refuses_a_tcp_client_clearly(tmp_path: Path) -> None:
    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            with pytest.raises(TransportError, match="refused"):
                async with qsftp.connect(server.host, server.port, transport="tcp", timeout=5):
                    pass

    run(body)


def test_quic_only_options_and_unknown_transports_are_usage_errors(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(UsageError):
            async with qsftp.connect("127.0.0.1", 1, transport="tcp", qlog_dir=tmp_path):
                pass
        with pytest.raises(UsageError):
            async with qsftp.connect("127.0.0.1", 1, transport="sctp"):
                pass
        with pytest.raises(UsageError):
            async with qsftp.serve(tmp_path / "root", transport="udp"):
                pass

    run(body)


# --- trust and authentication -------------------------------------------------------------------


def test_a_wrong_pin_is_refused_before_the_token_is_sent(tmp_path: Path) -> None:
    src = make_file(tmp_path / "src.bin", 1000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", transport="tcp", token="t") as server:
            with pytest.raises(TrustError, match="does not match the pin"):
                await qsftp.upload(
                    src, server.host, server.port, token="t", pin="00" * 32, transport="tcp"
                )

    run(body)
    assert not (tmp_path / "root" / "src.bin").exists()


def test_known_hosts_records_the_server_on_first_use_then_knows_it(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"

    async def body() -> list[str]:
        hows = []
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            for _ in range(2):
                async with qsftp.connect(
                    server.host, server.port, known_hosts=known, transport="tcp"
                ) as conn:
                    hows.append(conn.trust.how)
                    assert conn.fingerprint == server.fingerprint
        return hows

    assert run(body) == ["first-use", "known-host"]
    assert known.read_text().count("127.0.0.1") == 1


def test_a_cafile_holding_the_certificate_is_trusted_and_another_is_not(tmp_path: Path) -> None:
    other, _ = trust.ensure_self_signed(tmp_path / "other-state")

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            async with qsftp.connect(
                server.host, server.port, cafile=server.certfile, transport="tcp"
            ) as conn:
                assert conn.trust.how == "cafile"
                assert await conn.listdir() == []
            with pytest.raises(TrustError, match="not trusted"):
                async with qsftp.connect(server.host, server.port, cafile=other, transport="tcp"):
                    pass

    run(body)


def test_a_wrong_token_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", transport="tcp", token="right") as server:
            with pytest.raises(AuthFailed):
                async with qsftp.connect(
                    server.host, server.port, token="wrong", insecure=True, transport="tcp"
                ):
                    pass
            async with qsftp.connect(
                server.host, server.port, token="right", insecure=True, transport="tcp"
            ) as conn:
                assert await conn.listdir() == []

    run(body)


# --- concurrency, flow control, limits ----------------------------------------------------------


def test_concurrent_operations_share_one_connection(tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"f{i}.bin", 50_000 + 9_973 * i, seed=i) for i in range(16)]

    async def body() -> list[qsftp.TransferResult]:
        async with (
            qsftp.serve(tmp_path / "root", transport="tcp") as server,
            qsftp.connect(server.host, server.port, insecure=True, transport="tcp") as conn,
        ):
            return await asyncio.gather(*(conn.upload(f) for f in files))

    results = run(body)
    assert all(r.verified for r in results)
    for f in files:
        assert (tmp_path / "root" / f.name).read_bytes() == f.read_bytes()


def test_a_stalled_download_does_not_block_other_operations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download whose disk writes hang holds its own stream only: an upload and a listing
    on the same connection complete meanwhile; released, the download ends verified."""
    big = make_file(tmp_path / "root" / "big.bin", 8 << 20)
    small = make_file(tmp_path / "small.bin", 200_000)
    release = threading.Event()
    first_write = threading.Event()
    open_writer = fs.open_local_writer

    def stalling_writer(*args: Any, **kwargs: Any) -> Any:
        writer = open_writer(*args, **kwargs)
        write = writer.write

        def slow_write(data: bytes) -> None:  # runs in a worker thread
            first_write.set()
            assert release.wait(30)
            write(data)

        writer.write = slow_write
        return writer

    monkeypatch.setattr(fs, "open_local_writer", stalling_writer)

    async def body() -> tuple[qsftp.TransferResult, int]:
        async with (
            qsftp.serve(tmp_path / "root", transport="tcp") as server,
            qsftp.connect(server.host, server.port, insecure=True, transport="tcp") as conn,
        ):
            download = asyncio.create_task(conn.download("big.bin", tmp_path / "big.back"))
            try:
                await asyncio.to_thread(first_write.wait, 30)
                upload = await conn.upload(small)
                names = [e.name for e in await conn.listdir()]
                assert not download.done()
                assert upload.verified and "small.bin" in names
            finally:
                release.set()
            result = await download
            return result, server.port

    result, _ = run(body)
    assert result.verified
    assert (tmp_path / "big.back").read_bytes() == big.read_bytes()


async def _raw_tls(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([wire.ALPN])
    return await asyncio.open_connection("127.0.0.1", port, ssl=context)


async def _read_frames(
    reader: asyncio.StreamReader,
    until: Any,
    *,
    decoder: FrameDecoder | None = None,
    frames: list[Frame] | None = None,
    timeout: float = 10,
) -> list[Frame]:
    """Frames read (appended to ``frames``) until ``until(frames)`` is true or the server
    closes."""
    decoder = decoder or FrameDecoder()
    frames = [] if frames is None else frames
    async with asyncio.timeout(timeout):
        while not until(frames):
            data = await reader.read(65536)
            if not data:
                break
            frames += decoder.feed(data)
    return frames


def _session_bytes() -> bytes:
    request = wire.encode(wire.ConnRequest(version=wire.PROTOCOL_VERSION))
    return encode_frame(FrameKind.DATA, 0, request)


def test_a_reader_that_grants_no_credit_gets_only_the_initial_credit(tmp_path: Path) -> None:
    """The server sends a GET's bytes only as far as the client's credit, while another
    operation on the same connection is answered in full; more credit lets the rest through."""
    make_file(tmp_path / "root" / "big.bin", 4 << 20)
    make_file(tmp_path / "root" / "small.bin", 1000)

    def stream_bytes(frames: list[Frame], stream_id: int) -> int:
        return sum(len(f.payload) for f in frames if f.stream_id == stream_id and f.kind <= 1)

    def ended(frames: list[Frame], stream_id: int) -> bool:
        return any(f.stream_id == stream_id and f.kind == FrameKind.DATA_FIN for f in frames)

    async def body() -> tuple[int, int]:
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            reader, writer = await _raw_tls(server.port)
            writer.write(_session_bytes())
            for stream_id, name in ((4, "big.bin"), (8, "small.bin")):
                request = wire.encode(wire.Get(name=name))
                writer.write(encode_frame(FrameKind.DATA_FIN, stream_id, request))
            decoder, frames = FrameDecoder(), []
            await _read_frames(reader, lambda fs: ended(fs, 8), decoder=decoder, frames=frames)
            # Give the big GET every chance to overrun its credit; then a STAT, answered
            # after whatever the server had sent on stream 4 by then.
            await asyncio.sleep(0.5)
            writer.write(encode_frame(FrameKind.DATA_FIN, 12, wire.encode(wire.Stat(path=""))))
            await _read_frames(reader, lambda fs: ended(fs, 12), decoder=decoder, frames=frames)
            stalled = stream_bytes(frames, 4)
            writer.write(encode_frame(FrameKind.CREDIT, 4, struct.pack("!Q", 1 << 40)))
            await _read_frames(reader, lambda fs: ended(fs, 4), decoder=decoder, frames=frames)
            writer.close()
            return stalled, stream_bytes(frames, 4)

    stalled, total = run(body)
    assert 65536 < stalled <= tcp.INITIAL_CREDIT
    assert total > 4 << 20  # the whole file plus FILE and DONE


# --- hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4,  # not frames at all
        struct.pack("!BQI", FrameKind.DATA, 4, tcp.MAX_FRAME_PAYLOAD + 1),  # oversize frame
        encode_frame(FrameKind.DATA, 5, b"x"),  # a stream id no client may use
        encode_frame(FrameKind.DATA, 4, bytes(tcp.INITIAL_CREDIT + 1)),  # beyond the credit
    ],
    ids=["garbage", "oversize-frame", "bad-stream-id", "credit-overrun"],
)
def test_hostile_frames_close_that_connection_and_the_server_keeps_serving(
    tmp_path: Path, attack: bytes
) -> None:
    src = make_file(tmp_path / "src.bin", 70_000)

    async def body() -> list[Frame]:
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            reader, writer = await _raw_tls(server.port)
            writer.write(_session_bytes() + attack)
            frames = await _read_frames(reader, lambda fs: False)
            writer.close()
            result = await qsftp.upload(
                src, server.host, server.port, insecure=True, transport="tcp"
            )
            assert result.verified
            return frames

    frames = run(body)
    assert frames[-1].kind == FrameKind.CLOSE
    assert frames[-1].code == ErrorCode.BAD_REQUEST


def test_an_oversize_request_header_fails_that_operation_only(tmp_path: Path) -> None:
    async def body() -> list[Frame]:
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            reader, writer = await _raw_tls(server.port)
            header = bytes([wire.MessageType.PUT]) + b"\x80\x10\x00\x00"  # 1 MiB payload
            writer.write(_session_bytes() + encode_frame(FrameKind.DATA, 4, header))
            writer.write(encode_frame(FrameKind.DATA_FIN, 8, wire.encode(wire.List(path=""))))
            frames = await _read_frames(
                reader,
                lambda fs: {4, 8} <= {f.stream_id for f in fs if f.kind == FrameKind.DATA_FIN},
            )
            writer.close()
            return frames

    frames = run(body)
    answer = b"".join(f.payload for f in frames if f.stream_id == 4 and f.kind <= 1)
    (error,) = [m for m in decode_all(answer) if isinstance(m, wire.Error)]
    assert error.code == ErrorCode.BAD_REQUEST
    listing = b"".join(f.payload for f in frames if f.stream_id == 8 and f.kind <= 1)
    assert isinstance(decode_all(listing)[-1], wire.Done)


def test_limits_apply_over_tcp(tmp_path: Path) -> None:
    """max_connections refuses a second session with BUSY; session_deadline closes a
    connection that asks for no session; idle_timeout closes a quiet one."""
    limits = Limits(max_connections=1, session_deadline=0.5, idle_timeout=1.0)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", transport="tcp", limits=limits) as server:
            async with qsftp.connect(server.host, server.port, insecure=True, transport="tcp"):
                with pytest.raises(Busy):
                    async with qsftp.connect(
                        server.host, server.port, insecure=True, transport="tcp"
                    ):
                        pass
            reader, writer = await _raw_tls(server.port)  # silent: no CONN_REQUEST
            frames = await _read_frames(reader, lambda fs: False)
            writer.close()
            assert frames[-1].kind == FrameKind.CLOSE
            assert frames[-1].code == ErrorCode.AUTH_FAILED
            async with qsftp.connect(
                server.host, server.port, insecure=True, transport="tcp"
            ) as conn:
                await asyncio.sleep(1.5)
                with pytest.raises(TransportError):
                    await conn.listdir()

    run(body)


def test_max_operations_answers_busy_over_tcp(tmp_path: Path) -> None:
    """A GET held up by its credit keeps its operation open; with max_operations=1 the next
    request on that connection is answered BUSY."""
    make_file(tmp_path / "root" / "big.bin", 2 << 20)
    limits = Limits(max_operations=1)

    def answer(frames: list[Frame], stream_id: int) -> list[wire.Message]:
        data = (f.payload for f in frames if f.stream_id == stream_id and f.kind <= 1)
        return decode_all(b"".join(data))

    async def body() -> list[Frame]:
        async with qsftp.serve(tmp_path / "root", transport="tcp", limits=limits) as server:
            reader, writer = await _raw_tls(server.port)
            get = wire.encode(wire.Get(name="big.bin"))
            writer.write(_session_bytes() + encode_frame(FrameKind.DATA_FIN, 4, get))
            frames: list[Frame] = []
            # FILE arrives: the GET runs (and soon waits for credit).
            await _read_frames(reader, lambda fs: len(answer(fs, 4)) >= 1, frames=frames)
            listing = wire.encode(wire.List(path=""))
            writer.write(encode_frame(FrameKind.DATA_FIN, 8, listing))
            await _read_frames(
                reader,
                lambda fs: any(f.stream_id == 8 and f.kind == FrameKind.DATA_FIN for f in fs),
                frames=frames,
            )
            writer.close()
            return frames

    (error,) = answer(run(body), 8)
    assert isinstance(error, wire.Error) and error.code == ErrorCode.BUSY


# --- striped and resumable uploads, the CLI -----------------------------------------------------


def test_striped_and_resumable_uploads_work_over_tcp(tmp_path: Path) -> None:
    src = make_file(tmp_path / "src.bin", 3 << 20)

    async def body() -> list[qsftp.TransferResult]:
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            options: dict[str, Any] = {"insecure": True, "transport": "tcp"}
            striped = await qsftp.upload(
                src, server.host, server.port, remote_name="s.bin", connections=2, **options
            )
            resumed = await qsftp.upload(
                src, server.host, server.port, remote_name="r.bin", resume=True, **options
            )
            return [striped, resumed]

    striped, resumed = run(body)
    assert striped.connections == 2 and striped.transport == "tcp"
    assert resumed.transport == "tcp"
    for name in ("s.bin", "r.bin"):
        assert (tmp_path / "root" / name).read_bytes() == src.read_bytes()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path / "servers")
    yield factory
    factory.stop_all()


def test_cli_round_trip_over_tcp(tmp_path: Path, servers: ServerFactory) -> None:
    server = servers("--transport", "tcp")
    env = isolated_env(tmp_path)
    src = make_file(tmp_path / "src.bin", 300_000)
    common = ["--host", server.host, "--port", str(server.port), "--pin", server.fingerprint]
    up = run_client(str(src), "--transport", "tcp", "--json", *common, env=env, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    out = tmp_path / "out.bin"
    down = run_client(
        "--get", "src.bin", "-o", str(out), "--transport", "tcp", *common, env=env, cwd=tmp_path
    )
    assert down.returncode == 0, down.stderr
    assert out.read_bytes() == src.read_bytes()
    quic = run_client("--list", "--timeout", "2", *common, env=env, cwd=tmp_path)
    assert quic.returncode == 3  # nothing listens on UDP: a connect failure


def test_server_ready_line_says_what_it_listens_on(servers: ServerFactory) -> None:
    for transport, expected in (("quic", "quic"), ("tcp", "tcp"), ("both", "quic+tcp")):
        assert servers("--transport", transport, name=transport).transport == expected


# --- sweeps and the stream relay ----------------------------------------------------------------


def test_a_sweep_over_both_transports_gives_a_transport_column(tmp_path: Path) -> None:
    from qsftp.experiment import COLUMNS, LINK_COLUMNS, measured

    link = LinkProfile(delay_ms=5, rate_mbps=50)

    async def body() -> Any:
        return await qsftp.sweep(
            sizes=["40KB"],
            repeats=1,
            direction="both",
            transport=["quic", "tcp"],
            links=[None, link],
            progress=False,
            files_dir=tmp_path / "files",
        )

    df = run(body)
    assert list(df.columns) == COLUMNS + LINK_COLUMNS
    assert (df["error"] == "").all() and df["verified"].all()
    rows = measured(df)
    assert set(zip(rows["transport"], rows["link_mode"], rows["direction"], strict=True)) == {
        (t, mode, d)
        for t, modes in (("quic", ("none", "relay")), ("tcp", ("none", "stream-relay")))
        for mode in modes
        for d in ("upload", "download")
    }
    tcp_rows = rows[rows["transport"] == "tcp"]
    assert (tcp_rows["max_datagram_size"] > 0).all()  # the TCP MSS
    relayed = tcp_rows[tcp_rows["link_mode"] == "stream-relay"]
    assert (relayed["link_up_received_bytes"] > 40_000).sum() == 1  # the upload's bytes
    assert (relayed["handshake_ms"] >= 4 * link.delay_ms * 0.9).all()  # TCP + TLS round trips


def test_tcp_through_a_lossy_link_is_refused_clearly(tmp_path: Path) -> None:
    async def body() -> None:
        await qsftp.sweep(
            sizes=["1KB"],
            repeats=1,
            transport="tcp",
            links=[LinkProfile(delay_ms=5, loss=0.01)],
            progress=False,
            files_dir=tmp_path / "files",
        )

    with pytest.raises(UsageError, match="cannot apply loss"):
        run(body)
    with pytest.raises(UsageError, match="reorder"):
        StreamRelay(("127.0.0.1", 1), reorder=0.1)


def test_the_stream_relay_delivers_at_its_rate_and_delays_by_its_latency(tmp_path: Path) -> None:
    """Uploads through a 20 Mbit/s relay arrive at 20 Mbit/s (±10 %); a 20 ms one-way delay
    makes the TCP + TLS handshake take two round trips (80 ms) or more."""
    src = make_file(tmp_path / "src.bin", 3_000_000)
    rate_mbps = 20

    async def body() -> tuple[qsftp.TransferResult, qsftp.TransferResult]:
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            options: dict[str, Any] = {"insecure": True, "transport": "tcp"}
            async with StreamRelay((server.host, server.port), rate_mbps=rate_mbps) as relay:
                paced = await qsftp.upload(src, relay.host, relay.port, **options)
                await relay.wait_drained()
                assert relay.stats().uplink.received_bytes > 3_000_000
            async with StreamRelay((server.host, server.port), delay_ms=20) as relay:
                delayed = await qsftp.upload(src, relay.host, relay.port, **options)
            return paced, delayed

    paced, delayed = run(body)
    assert paced.size * 8 / paced.seconds / 1e6 == pytest.approx(rate_mbps, rel=0.10)
    assert delayed.handshake_ms >= 80 * 0.95
    assert (tmp_path / "root" / "src.bin").read_bytes() == src.read_bytes()
