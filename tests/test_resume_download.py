"""Resumable downloads: an interrupted download continues from the hidden partial file next to
its destination once the server has checked that it is a prefix of its file; a partial that
is not (the server's file changed, or it is longer) starts over; the final name appears only
complete and verified. Interruptions are real: a cut link (the emulated relay), a task
cancelled mid-body, and killed client and server processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    client_finished,
    client_record,
    free_udp_port,
    isolated_home,  # noqa: F401 (an autouse fixture)
    make_file,
    partials,
    resumable_client,
    run,
    start_client,
    start_server,
    stop_processes,
    subprocess_env,
)

import qsftp
from qsftp import fs
from qsftp.netem import LinkEmulator, LinkProfile
from qsftp.server import Limits


def _exists(path: Path) -> bool:
    return path.exists()


def _partial_size(dest: Path) -> int:
    try:
        return fs.partial_download_path(dest).stat().st_size
    except FileNotFoundError:
        return 0


async def _wait_for_partial(dest: Path, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (size := _partial_size(dest)) >= at_least:
            return size
        await asyncio.sleep(0.01)
    pytest.fail("the download never got far enough")


async def _interrupted(server: qsftp.QsftpServer, name: str, dest: Path, at_least: int) -> int:
    """Start a resumable download through a 20 Mbit/s link and cancel it once the partial
    file holds ``at_least`` bytes; return what it holds then."""
    async with LinkEmulator(
        (server.host, server.port), profile=LinkProfile(rate_mbps=20), seed=1
    ) as link:
        task = asyncio.ensure_future(
            qsftp.download(name, dest, link.host, link.port, resume=True, pin=server.fingerprint)
        )
        try:
            await _wait_for_partial(dest, at_least)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert not _exists(dest)
    return _partial_size(dest)


@pytest.mark.parametrize("size", [0, 1000, 300_001])
def test_a_resumable_download_is_verified_and_leaves_no_partial(tmp_path: Path, size: int) -> None:
    root = tmp_path / "root"
    src = make_file(root / "f.bin", size)
    dest = tmp_path / "out" / "f.bin"
    dest.parent.mkdir()

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.download("f.bin", dest, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == 0 and result.size == size
    assert dest.read_bytes() == src.read_bytes()
    assert partials(dest.parent) == []


def test_a_cancelled_download_keeps_its_partial_and_the_next_attempt_fetches_only_the_rest(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    src = make_file(root / "big.bin", 4_000_000)
    dest = tmp_path / "big.bin"

    async def body() -> tuple[int, qsftp.TransferResult]:
        async with qsftp.serve(root) as server:
            held = await _interrupted(server, "big.bin", dest, 1_500_000)
            result = await qsftp.download("big.bin", dest, server.host, server.port, resume=True)
            return held, result

    held, result = run(body)
    assert 1_500_000 <= held < 4_000_000
    assert result.verified and result.resumed_bytes == held
    assert dest.read_bytes() == src.read_bytes()
    assert partials(tmp_path) == []


def test_a_download_cut_by_a_link_blackout_reconnects_and_resumes(tmp_path: Path) -> None:
    """The link goes dark for longer than the idle timeout at ~50 %: the connection dies, the
    client reconnects with backoff once the link is back, and continues from its partial."""
    root = tmp_path / "root"
    src = make_file(root / "big.bin", 4_000_000)
    dest = tmp_path / "big.bin"

    async def body() -> qsftp.TransferResult:
        async with (
            qsftp.serve(root, limits=Limits(idle_timeout=1.0)) as server,
            LinkEmulator(
                (server.host, server.port), profile=LinkProfile(rate_mbps=20), seed=2
            ) as link,
        ):
            task = asyncio.ensure_future(
                qsftp.download(
                    "big.bin",
                    dest,
                    link.host,
                    link.port,
                    resume=True,
                    retries=6,
                    pin=server.fingerprint,
                    max_datagram_size=1200,
                )
            )
            await _wait_for_partial(dest, 2_000_000)
            before = link.uplink, link.downlink
            link.uplink = link.downlink = LinkProfile(loss=1.0)
            # Well past the idle timeout, which aioquic stretches to at least three PTOs.
            await asyncio.sleep(4.0)
            assert not dest.exists()
            link.uplink, link.downlink = before
            return await task

    result = run(body)
    assert result.verified and result.resumed_bytes >= 2_000_000
    assert dest.read_bytes() == src.read_bytes()
    assert partials(tmp_path) == []


def test_a_changed_server_file_starts_the_download_over(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_file(root / "big.bin", 4_000_000, seed=1)
    dest = tmp_path / "big.bin"

    async def body() -> tuple[int, qsftp.TransferResult]:
        async with qsftp.serve(root) as server:
            held = await _interrupted(server, "big.bin", dest, 1_000_000)
            make_file(root / "big.bin", 4_000_000, seed=2)  # same size, other bytes
            result = await qsftp.download("big.bin", dest, server.host, server.port, resume=True)
            return held, result

    held, result = run(body)
    assert held >= 1_000_000
    assert result.verified and result.resumed_bytes == 0
    assert dest.read_bytes() == (root / "big.bin").read_bytes()
    assert partials(tmp_path) == []


def test_a_grown_server_file_whose_start_is_unchanged_is_resumed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    src = make_file(root / "log.bin", 1_000_000)
    dest = tmp_path / "log.bin"
    fs.partial_download_path(dest).write_bytes(src.read_bytes()[:600_000])
    with open(src, "ab") as grow:
        grow.write(b"appended" * 1000)

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.download("log.bin", dest, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == 600_000
    assert dest.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(lambda data: data + b"more", id="longer-than-the-remote-file"),
        pytest.param(lambda data: b"X" + data[1:500_000], id="first-byte-differs"),
        pytest.param(lambda data: data[:499_999] + b"X", id="last-byte-differs"),
    ],
)
def test_a_partial_that_is_not_a_prefix_of_the_remote_file_starts_over(
    tmp_path: Path, partial: object
) -> None:
    root = tmp_path / "root"
    src = make_file(root / "f.bin", 1_000_000)
    dest = tmp_path / "f.bin"
    assert callable(partial)
    fs.partial_download_path(dest).write_bytes(partial(src.read_bytes()))

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.download("f.bin", dest, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == 0
    assert dest.read_bytes() == src.read_bytes()
    assert partials(tmp_path) == []


def test_a_complete_partial_is_verified_and_renamed_without_fetching_a_byte(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    src = make_file(root / "f.bin", 500_000)
    dest = tmp_path / "f.bin"
    fs.partial_download_path(dest).write_bytes(src.read_bytes())

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.download("f.bin", dest, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == result.size == 500_000
    assert dest.read_bytes() == src.read_bytes()
    assert partials(tmp_path) == []


def test_a_failed_resumable_download_that_received_nothing_leaves_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with qsftp.serve(tmp_path / "root") as server:
            with pytest.raises(qsftp.NotFound):
                await qsftp.download(
                    "missing.bin", tmp_path / "m.bin", server.host, server.port, resume=True
                )

    run(body)
    assert partials(tmp_path) == []
    assert not (tmp_path / "m.bin").exists()


def test_two_downloads_never_write_one_partial_file_at_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_file(root / "f.bin", 1000)
    dest = tmp_path / "f.bin"

    async def body() -> None:
        async with qsftp.serve(root) as server:
            with (
                fs.PartialDownload(dest),  # another download holds it
                pytest.raises(qsftp.LocalFileError, match="another download"),
            ):
                await qsftp.download("f.bin", dest, server.host, server.port, resume=True)
            assert (
                await qsftp.download("f.bin", dest, server.host, server.port, resume=True)
            ).verified

    run(body)


def test_a_partial_whose_whole_file_digest_differs_is_removed_not_renamed(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    with fs.PartialDownload(dest) as partial:
        partial.prefix_sha256()
        partial.write(b"hello")
        with pytest.raises(qsftp.ChecksumMismatch):
            partial.commit(size=5, expected_sha256="00" * 32)
    assert not dest.exists()
    assert not fs.partial_download_path(dest).exists()


# --- real processes -------------------------------------------------------------------------


# A killed client's connection is given up quickly, as a restarted client would find it.
_SERVER_OPTIONS = ("--idle-timeout", "2")


def _get(port: int, dest: Path) -> list[str]:
    return resumable_client(port, "--get", "big.bin", "-o", str(dest))


def _wait_for_partial_of(dest: Path, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _partial_size(dest) >= at_least:
            return
        time.sleep(0.01)
    pytest.fail("the download never got far enough")


SIZE = 12_000_000


def test_a_killed_download_client_leaves_no_final_file_and_a_rerun_resumes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    src = make_file(root / "big.bin", SIZE)
    dest = tmp_path / "out.bin"
    port = free_udp_port()
    server = start_server(tmp_path, port, root, *_SERVER_OPTIONS)
    try:
        client = subprocess.Popen(
            _get(port, dest), env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, text=True
        )
        _wait_for_partial_of(dest, SIZE // 2)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        assert not dest.exists()
        held = _partial_size(dest)
        assert held >= SIZE // 2
        record = client_record(tmp_path, _get(port, dest))
        assert record["verified"] and record["op"] == "download"
        assert record["resumed_bytes"] == held
        assert dest.read_bytes() == src.read_bytes()
        assert partials(tmp_path) == []
    finally:
        server.terminate()
        server.wait(20)


def test_a_killed_and_restarted_server_is_reconnected_and_the_download_resumes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    src = make_file(root / "big.bin", SIZE)
    dest = tmp_path / "out.bin"
    port = free_udp_port()
    server = start_server(tmp_path, port, root, *_SERVER_OPTIONS)
    client = start_client(tmp_path, _get(port, dest))
    try:
        _wait_for_partial_of(dest, SIZE // 2)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert not dest.exists()
        server = start_server(tmp_path, port, root, *_SERVER_OPTIONS)
        record, err = client_finished(client)
        assert record["verified"] and record["resumed_bytes"] >= SIZE // 2
        assert "retrying" in err
        assert dest.read_bytes() == src.read_bytes()
        assert partials(tmp_path) == []
    finally:
        stop_processes(client, server)
