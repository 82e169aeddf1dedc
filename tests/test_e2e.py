"""End to end over loopback UDP: a real server and real clients through the public API."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    isolated_home,  # noqa: F401 (an autouse fixture)
    make_file,
    partials,
    run,
    sha256,
)

import qsftp
from qsftp import fs, trust
from qsftp.server import Limits
from qsftp.session import INLINE_READ_MAX


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [
        (0, 65536),
        (1, 65536),
        (1 << 20, 65536),
        ((1 << 20) + 17, 65536),
        (100_003, 1000),
        (INLINE_READ_MAX, 1000),  # read and hashed on the loop, sent in 66 DATA frames
        (INLINE_READ_MAX + 1, 65536),  # the smallest body read in a worker thread
    ],
)
def test_upload_then_download_round_trips_bytes_and_sha256(
    tmp_path: Path, size: int, chunk_size: int
) -> None:
    src = make_file(tmp_path / "src.bin", size)
    root = tmp_path / "root"

    async def body() -> None:
        async with qsftp.serve(root) as server:
            up = await qsftp.upload(
                src, server.host, server.port, remote_name="dir/f.bin", chunk_size=chunk_size
            )
            back = tmp_path / "back.bin"
            down = await qsftp.download(
                "dir/f.bin", back, server.host, server.port, chunk_size=chunk_size
            )
        assert up.verified and down.verified
        assert up.size == down.size == size
        assert up.sha256 == down.sha256 == sha256(src)
        assert (root / "dir" / "f.bin").read_bytes() == src.read_bytes()
        assert back.read_bytes() == src.read_bytes()
        assert up.chunk_size == chunk_size
        assert up.seconds > 0 and up.packets_sent > 0 and up.handshake_ms > 0

    run(body)
    assert partials(root) == []


def test_transfer_result_as_dict_has_the_promised_fields(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 5000)

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(tmp_path / "root") as server:
            return await qsftp.upload(src, server.host, server.port)

    result = run(body)
    record = result.as_dict()
    for key in (
        "op",
        "name",
        "size",
        "seconds",
        "throughput_mb_s",
        "sha256",
        "verified",
        "chunk_size",
        "handshake_ms",
        "smoothed_rtt_ms",
        "packets_sent",
        "packets_lost",
        "server_cpu_s",
        "client_cpu_s",
    ):
        assert key in record
    assert record["op"] == "upload" and record["name"] == "a.bin"
    assert record["throughput_mb_s"] == pytest.approx(5000 / result.seconds / 1e6)


def test_concurrent_uploads_share_one_connection(tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"in/{i}.bin", 20_000 + i * 997, seed=i) for i in range(12)]
    root = tmp_path / "root"

    async def body() -> list[qsftp.TransferResult]:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            return await asyncio.gather(*(conn.upload(f, f"many/{f.name}") for f in files))

    results = run(body)
    assert len(results) == len(files)
    for src in files:
        assert (root / "many" / src.name).read_bytes() == src.read_bytes()


def test_list_and_stat_describe_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_file(root / "a.txt", 3)
    make_file(root / "sub" / "b.txt", 5)

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            top = await conn.listdir()
            assert [(e.name, e.kind, e.size) for e in top] == [
                ("a.txt", "file", 3),
                ("sub", "dir", 0),
            ]
            deep = await conn.listdir(recursive=True)
            assert "sub/b.txt" in [e.name for e in deep]
            assert [e.name for e in await conn.listdir("sub")] == ["sub/b.txt"]
            entry = await conn.stat("sub/b.txt")
            assert (entry.kind, entry.size) == ("file", 5)
            assert (await conn.stat("")).kind == "dir"
            with pytest.raises(qsftp.NotFound):
                await conn.stat("missing")
            with pytest.raises(qsftp.NotFound):
                await conn.listdir("missing")

    run(body)


def test_download_of_missing_file_raises_not_found_and_writes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            with pytest.raises(qsftp.NotFound):
                await qsftp.download("nope.bin", tmp_path / "out.bin", server.host, server.port)

    run(body)
    assert not (tmp_path / "out.bin").exists()
    assert list(tmp_path.glob("*.qsftp-part")) == []


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil", "a\\..\\evil", "‥/x"])
def test_server_refuses_names_outside_the_root(tmp_path: Path, name: str) -> None:
    """The server checks names itself: a client that skips its own check gains nothing."""
    root = tmp_path / "srv" / "root"

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            protocol = conn._protocol
            channel = conn._open()
            protocol.qsftp.send_put(channel.stream_id, name, 4)
            protocol.qsftp.send_data(channel.stream_id, b"evil")
            protocol.qsftp.send_end(channel.stream_id, hashlib.sha256(b"evil").digest())
            protocol.flush()
            event = await channel.next_event()
            with pytest.raises(qsftp.BadPath):
                raise qsftp.session.event_error(event)
            # The server still serves this connection normally afterwards.
            ok = make_file(tmp_path / "ok.bin", 10)
            assert (await conn.upload(ok)).verified

    run(body)
    outside = [p for p in (tmp_path / "srv").rglob("*") if "evil" in p.name]
    assert outside == []


def test_client_refuses_bad_names_before_sending(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 10)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            with pytest.raises(qsftp.BadPath):
                await qsftp.upload(src, server.host, server.port, remote_name="../x")

    run(body)


def test_symlink_inside_root_is_not_followed_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret = make_file(tmp_path / "secret.txt", 10)
    (root / "link.txt").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path)

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            with pytest.raises(qsftp.BadPath):
                await conn.download("link.txt", tmp_path / "got.txt")
            with pytest.raises(qsftp.BadPath):
                await conn.download("linkdir/secret.txt", tmp_path / "got.txt")
            with pytest.raises(qsftp.BadPath):
                await conn.upload(secret, "linkdir/planted.txt")
            with pytest.raises(qsftp.BadPath):
                await conn.stat("linkdir")
            assert [e.name for e in await conn.listdir()] == []

    run(body)
    assert not (tmp_path / "got.txt").exists()
    assert not (tmp_path / "planted.txt").exists()


def test_oversized_upload_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    src = make_file(tmp_path / "big.bin", 300_000)
    root = tmp_path / "root"

    async def body() -> None:
        async with qsftp.serve(root, limits=Limits(max_file_size=100_000)) as server:
            with pytest.raises(qsftp.TooLarge):
                await qsftp.upload(src, server.host, server.port)
            small = make_file(tmp_path / "small.bin", 1000)
            assert (await qsftp.upload(small, server.host, server.port)).verified

    run(body)
    assert not (root / "big.bin").exists()
    assert partials(root) == []


def test_upload_onto_a_directory_fails_mid_stream_and_connection_survives(tmp_path: Path) -> None:
    src = make_file(tmp_path / "x.bin", 3 << 20)
    root = tmp_path / "root"
    (root / "x.bin").mkdir(parents=True)

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            with pytest.raises(qsftp.BadPath):
                await conn.upload(src)
            assert (await conn.upload(src, "y.bin")).verified

    run(body)
    assert (root / "x.bin").is_dir()
    assert partials(root) == []


def test_cancelled_upload_leaves_no_file_under_its_name(tmp_path: Path) -> None:
    src = make_file(tmp_path / "big.bin", 8 << 20)
    root = tmp_path / "root"

    async def body() -> None:
        async with qsftp.serve(root) as server:
            started = asyncio.Event()

            def progress(_: int) -> None:
                started.set()

            async with qsftp.connect(server.host, server.port) as conn:
                task = asyncio.create_task(conn.upload(src, progress=progress))
                await started.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            for _ in range(100):  # the server cleans up when it sees the reset
                if not partials(root):
                    break
                await asyncio.sleep(0.05)

    run(body)
    assert not (root / "big.bin").exists()
    assert partials(root) == []


def test_token_is_required_when_the_server_has_one(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 10)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", token="s3cret") as server:
            with pytest.raises(qsftp.AuthFailed, match="requires a token"):
                await qsftp.upload(src, server.host, server.port)
            with pytest.raises(qsftp.AuthFailed, match="invalid token"):
                await qsftp.upload(src, server.host, server.port, token="wrong")
            assert (await qsftp.upload(src, server.host, server.port, token="s3cret")).verified

    run(body)


def test_serving_a_public_address_without_token_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(qsftp.UsageError, match="without a token"):
            async with qsftp.serve(tmp_path / "root", host="0.0.0.0"):
                pass

    run(body)


def test_trust_on_first_use_records_then_detects_a_changed_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_file(tmp_path / "a.bin", 10)
    known = tmp_path / "known_hosts"

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", state_dir=tmp_path / "s1") as server:
            port = server.port
            with caplog.at_level(logging.WARNING):
                first = await qsftp.upload(src, server.host, port, known_hosts=known)
            assert "trusting new server" in caplog.text
            assert trust.KnownHosts(known).lookup("127.0.0.1", port) == server.fingerprint
            assert first.verified
            async with qsftp.connect(server.host, port, known_hosts=known) as conn:
                assert conn.trust.how == "known-host"
        # Same port, another certificate: the client must refuse.
        async with qsftp.serve(tmp_path / "root", port=port, state_dir=tmp_path / "s2") as other:
            with pytest.raises(qsftp.TrustError, match="known_hosts"):
                await qsftp.upload(src, other.host, other.port, known_hosts=known)

    run(body)


def test_pin_accepts_the_right_fingerprint_and_refuses_another(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 10)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            good = trust.format_fingerprint(server.fingerprint)
            assert (await qsftp.upload(src, server.host, server.port, pin=good)).verified
            with pytest.raises(qsftp.TrustError):
                await qsftp.upload(src, server.host, server.port, pin="00" * 32)

    run(body)


def test_cafile_must_have_issued_the_server_certificate(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 10)
    other_cert, _ = trust.ensure_self_signed(tmp_path / "other")

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            assert (
                await qsftp.upload(src, "localhost", server.port, cafile=server.certfile)
            ).verified
            with pytest.raises(qsftp.TrustError, match="not trusted"):
                await qsftp.upload(src, "localhost", server.port, cafile=other_cert)

    run(body)


def test_insecure_skips_verification_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_file(tmp_path / "a.bin", 10)
    known = tmp_path / "known_hosts"

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            with caplog.at_level(logging.WARNING):
                result = await qsftp.upload(
                    src, server.host, server.port, insecure=True, known_hosts=known
                )
            assert result.verified

    run(body)
    assert "insecure" in caplog.text.lower()
    assert not known.exists()


def test_ipv6_loopback_works(tmp_path: Path) -> None:
    if not __import__("socket").has_ipv6:
        pytest.skip("no IPv6")
    src = make_file(tmp_path / "a.bin", 50_000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", host="::1") as server:
            assert server.address.startswith("[::1]:")
            assert (await qsftp.upload(src, "::1", server.port)).verified

    run(body)


def test_connecting_to_a_closed_port_fails_fast(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def body() -> None:
        with pytest.raises(qsftp.TransportError, match="refused"):
            await qsftp.listdir("127.0.0.1", port, timeout=10)

    started = time.monotonic()
    run(body)
    assert time.monotonic() - started < 5


def test_running_inside_an_existing_loop_like_jupyter(tmp_path: Path) -> None:
    """The API never calls asyncio.run itself: it works from a task on a running loop."""
    src = make_file(tmp_path / "a.bin", 1000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            task = asyncio.get_running_loop().create_task(
                qsftp.upload(src, server.host, server.port)
            )
            assert (await task).verified

    run(body)


def test_download_does_not_replace_the_destination_on_checksum_mismatch(tmp_path: Path) -> None:
    """A server that lies about the digest must not get a file installed under the name."""
    root = tmp_path / "root"
    make_file(root / "f.bin", 10_000)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"original")

    async def body() -> None:
        async with qsftp.serve(root) as server:
            original_send_done = qsftp.protocol.QsftpConnection.send_done

            def lying_send_done(self: Any, stream_id: int, **kw: Any) -> None:
                if kw.get("sha256"):
                    kw["sha256"] = bytes(32)
                original_send_done(self, stream_id, **kw)

            qsftp.protocol.QsftpConnection.send_done = lying_send_done  # type: ignore[method-assign]
            try:
                with pytest.raises(qsftp.ChecksumMismatch):
                    await qsftp.download("f.bin", dest, server.host, server.port)
            finally:
                qsftp.protocol.QsftpConnection.send_done = original_send_done  # type: ignore[method-assign]

    run(body)
    assert dest.read_bytes() == b"original"
    assert list(tmp_path.glob(f"*{fs.PARTIAL_SUFFIX}")) == []


def test_importing_the_core_loads_no_pandas_or_matplotlib() -> None:
    import subprocess
    import sys

    code = (
        "import sys, qsftp.server, qsftp.client; "
        "bad = [m for m in ('pandas', 'matplotlib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_listing_larger_than_the_initial_flow_control_window_completes(tmp_path: Path) -> None:
    """Credit is granted for every byte of a stream, not only for DATA payloads."""
    root = tmp_path / "root"
    many = root / "many"
    many.mkdir(parents=True)
    count = 15_000
    for i in range(count):
        (many / f"{i:06d}-{'x' * 70}.txt").touch()

    async def body() -> list[fs.Entry]:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            return await conn.listdir("many")

    entries = run(body)
    assert len(entries) == count  # ~1.4 MB of ENTRY messages: more than the 1 MiB initial window


def test_many_clients_at_once_are_all_served(tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"c{i}.bin", 200_000 + i, seed=i) for i in range(6)]
    root = tmp_path / "root"

    async def body() -> list[qsftp.TransferResult]:
        async with qsftp.serve(root) as server:
            return await asyncio.gather(
                *(
                    qsftp.upload(f, server.host, server.port, remote_name=f"c/{f.name}")
                    for f in files
                )
            )

    results = run(body)
    assert all(r.verified for r in results)
    for src in files:
        assert (root / "c" / src.name).read_bytes() == src.read_bytes()


@pytest.mark.parametrize(("size", "connections"), [(0, 2), (1, 3), ((3 << 20) + 12345, 3)])
def test_striped_upload_assembles_one_verified_file(
    tmp_path: Path, size: int, connections: int
) -> None:
    src = make_file(tmp_path / "s.bin", size)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.upload(
                src, server.host, server.port, remote_name="d/s.bin", connections=connections
            )

    result = run(body)
    assert result.verified and result.connections == connections
    assert result.sha256 == sha256(src)
    assert (root / "d" / "s.bin").read_bytes() == src.read_bytes()
    assert partials(root) == []


def test_striped_upload_deals_blocks_out_and_commit_reads_nothing_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Blocks go to the connections as they are ready; the server's running hash has the whole
    file by the time COMMIT comes, so COMMIT does not read it again."""
    monkeypatch.setattr(qsftp.client, "STRIPE_BLOCK", 1 << 20)
    src = make_file(tmp_path / "s.bin", (5 << 20) + 777)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.upload(src, server.host, server.port, connections=2)

    with caplog.at_level("DEBUG", logger="qsftp.fs"):
        result = run(body)
    assert result.verified and result.connections == 2 and result.sha256 == sha256(src)
    assert (root / "s.bin").read_bytes() == src.read_bytes()
    committed = [r.getMessage() for r in caplog.records if "committed striped" in r.getMessage()]
    assert committed == [
        f"committed striped upload 's.bin': {src.stat().st_size} bytes, 0 of them read at commit"
    ]


def test_striped_blocks_go_as_put_block_and_only_commit_checks_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Striped blocks carry no digest of their own (PUT_BLOCK); bytes that are not the file's
    are still caught, by the whole-file digest at COMMIT."""
    sent: list[bool] = []
    original = qsftp.protocol.QsftpConnection.send_put_range

    def spy(self: qsftp.protocol.QsftpConnection, *args: Any, **kwargs: Any) -> None:
        sent.append(kwargs.get("checked", True))
        original(self, *args, **kwargs)

    monkeypatch.setattr(qsftp.protocol.QsftpConnection, "send_put_range", spy)
    src = make_file(tmp_path / "s.bin", 3 << 20)
    other = make_file(tmp_path / "o.bin", 3 << 20, seed=7)
    root = tmp_path / "root"

    async def body() -> None:
        async with qsftp.serve(root) as server:
            result = await qsftp.upload(src, server.host, server.port, connections=2)
            assert result.verified and result.sha256 == sha256(src)
            async with qsftp.connect(server.host, server.port) as conn:
                upload_id = bytes(range(16))
                await conn._upload_range(
                    other,
                    name="x.bin",
                    total_size=3 << 20,
                    offset=0,
                    length=3 << 20,
                    upload_id=upload_id,
                    chunk_size=65536,
                    progress=None,
                    checked=False,
                )
                with pytest.raises(qsftp.ChecksumMismatch):
                    await conn._finish_striped(
                        name="x.bin",
                        total_size=3 << 20,
                        upload_id=upload_id,
                        sha256=bytes.fromhex(sha256(src)),
                    )

    run(body)
    assert sent and not any(sent)
    assert (root / "s.bin").read_bytes() == src.read_bytes()
    assert not (root / "x.bin").exists()
    assert partials(root) == []


def test_put_block_whose_end_carries_a_digest_is_refused(tmp_path: Path) -> None:
    """END of a PUT_BLOCK must carry 32 zero bytes: anything else is a confused client."""
    root = tmp_path / "root"

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            protocol = conn._protocol
            channel = conn._open()
            protocol.qsftp.send_put_range(
                channel.stream_id,
                name="b.bin",
                total_size=4,
                offset=0,
                length=4,
                upload_id=bytes(16),
                checked=False,
            )
            protocol.qsftp.send_data(channel.stream_id, b"data")
            protocol.qsftp.send_end(channel.stream_id, hashlib.sha256(b"data").digest())
            protocol.flush()
            event = await channel.next_event()
            with pytest.raises(qsftp.BadRequest, match="32 zero bytes"):
                raise qsftp.session.event_error(event)

    run(body)
    assert not (root / "b.bin").exists()


def test_failed_striped_upload_leaves_no_partial_and_no_final(tmp_path: Path) -> None:
    src = make_file(tmp_path / "s.bin", 3 << 20)
    root = tmp_path / "root"
    (root / "taken").mkdir(parents=True)

    async def body() -> None:
        async with qsftp.serve(root) as server:
            with pytest.raises(qsftp.BadPath):
                await qsftp.upload(
                    src, server.host, server.port, remote_name="taken", connections=2
                )

    run(body)
    assert (root / "taken").is_dir()
    assert partials(root) == []


def test_commit_of_ranges_with_the_wrong_digest_is_refused(tmp_path: Path) -> None:
    """The server hashes the assembled file itself: a wrong whole-file digest fails."""
    root = tmp_path / "root"

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            upload_id = bytes(range(16))
            src = make_file(tmp_path / "r.bin", 1000)
            await conn._upload_range(
                src,
                name="r.bin",
                total_size=1000,
                offset=0,
                length=1000,
                upload_id=upload_id,
                chunk_size=300,
                progress=None,
            )
            with pytest.raises(qsftp.ChecksumMismatch):
                await conn._finish_striped(
                    name="r.bin", total_size=1000, upload_id=upload_id, sha256=bytes(32)
                )

    run(body)
    assert not (root / "r.bin").exists()
    assert partials(root) == []


def test_datagram_size_defaults_to_large_on_loopback_and_is_recorded(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 100_000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            async with qsftp.connect(server.host, server.port) as conn:
                assert conn.max_datagram_size == qsftp.session.LOOPBACK_DATAGRAM_SIZE
                assert (await conn.upload(src)).max_datagram_size == conn.max_datagram_size
            async with qsftp.connect(server.host, server.port, max_datagram_size=1452) as conn:
                assert (await conn.upload(src)).max_datagram_size == 1452

    run(body)
    assert qsftp.session.datagram_size_for("192.0.2.1", None) == 1200
    assert qsftp.session.datagram_size_for("::ffff:127.0.0.1", None) == 16384
