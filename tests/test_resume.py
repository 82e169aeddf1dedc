"""Resumable uploads: an interrupted upload continues where the server's copy stops, a copy
that does not match the local file is started over, and killed clients and servers (real
processes) end in a verified file."""

from __future__ import annotations

import asyncio
import os
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
from qsftp.client import resumable_upload_id


def test_resumable_upload_of_a_fresh_file_is_verified_and_leaves_no_partial(
    tmp_path: Path,
) -> None:
    src = make_file(tmp_path / "a.bin", 300_001)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.upload(src, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == 0
    assert (root / "a.bin").read_bytes() == src.read_bytes()
    assert partials(root) == []


@pytest.mark.parametrize("size", [0, 1000])
def test_resumable_upload_of_small_files(tmp_path: Path, size: int) -> None:
    src = make_file(tmp_path / "s.bin", size)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.upload(src, server.host, server.port, resume=True)

    assert run(body).verified
    assert (root / "s.bin").read_bytes() == src.read_bytes()


def test_an_interrupted_upload_continues_from_what_the_server_holds(tmp_path: Path) -> None:
    src = make_file(tmp_path / "big.bin", 3_000_000)
    root = tmp_path / "root"
    half = 1_200_000

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            async with qsftp.connect(server.host, server.port) as conn:
                # The first attempt got this far before it was cut.
                await conn._upload_range(
                    src,
                    name="big.bin",
                    total_size=3_000_000,
                    offset=0,
                    length=half,
                    upload_id=resumable_upload_id("big.bin", 3_000_000),
                    chunk_size=65536,
                    progress=None,
                )
            assert not (root / "big.bin").exists()
            assert len(partials(root)) == 1
            return await qsftp.upload(src, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == half
    assert (root / "big.bin").read_bytes() == src.read_bytes()
    assert partials(root) == []


def test_a_partial_that_does_not_match_the_local_file_is_started_over(tmp_path: Path) -> None:
    src = make_file(tmp_path / "f.bin", 2_000_000, seed=1)
    other = make_file(tmp_path / "other.bin", 2_000_000, seed=2)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            async with qsftp.connect(server.host, server.port) as conn:
                await conn._upload_range(
                    other,
                    name="f.bin",
                    total_size=2_000_000,
                    offset=0,
                    length=700_000,
                    upload_id=resumable_upload_id("f.bin", 2_000_000),
                    chunk_size=65536,
                    progress=None,
                )
            return await qsftp.upload(src, server.host, server.port, resume=True)

    result = run(body)
    assert result.verified and result.resumed_bytes == 0
    assert (root / "f.bin").read_bytes() == src.read_bytes()
    assert partials(root) == []


def _wait_for_partial(root: Path, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in partials(root)]
        if sizes and max(sizes) >= at_least:
            return
        time.sleep(0.01)
    pytest.fail("the upload never got far enough")


def _client(tmp_path: Path, src: Path, port: int) -> list[str]:
    return resumable_client(port, str(src))


def test_a_killed_client_leaves_no_final_file_and_a_rerun_resumes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    src = make_file(tmp_path / "big.bin", 24_000_000)
    port = free_udp_port()
    server = start_server(tmp_path, port, root)
    try:
        client = subprocess.Popen(
            _client(tmp_path, src, port),
            env=subprocess_env(tmp_path),
            stdout=subprocess.PIPE,
            text=True,
        )
        _wait_for_partial(root, 4_000_000)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        assert not (root / "big.bin").exists()
        held = max(p.stat().st_size for p in partials(root))
        record = client_record(tmp_path, _client(tmp_path, src, port))
        assert record["verified"] and record["resumed_bytes"] >= min(held, 4_000_000) - 1
        assert (root / "big.bin").read_bytes() == src.read_bytes()
        assert partials(root) == []
    finally:
        server.terminate()
        server.wait(20)


def test_a_killed_and_restarted_server_is_reconnected_and_the_upload_resumes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    src = make_file(tmp_path / "big.bin", 24_000_000)
    port = free_udp_port()
    server = start_server(tmp_path, port, root)
    client = start_client(tmp_path, _client(tmp_path, src, port))
    try:
        _wait_for_partial(root, 4_000_000)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert not (root / "big.bin").exists()
        server = start_server(tmp_path, port, root)
        record, err = client_finished(client)
        assert record["verified"] and record["resumed_bytes"] > 0
        assert "retrying" in err
        assert (root / "big.bin").read_bytes() == src.read_bytes()
    finally:
        stop_processes(client, server)


def test_the_server_expires_stale_partials(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    stale = root / f".x.{'ab' * 16}{qsftp.fs.PARTIAL_SUFFIX}"
    stale.write_bytes(b"x")
    os.utime(stale, (1_000_000, 1_000_000))

    async def body() -> None:
        async with qsftp.serve(root):
            for _ in range(100):
                if not stale.exists():
                    break
                await asyncio.sleep(0.02)

    run(body)
    assert not stale.exists()
