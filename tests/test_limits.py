"""Server limits and resource safety: connection and operation caps, the session deadline,
Retry, free-space checks and a real disk-full (tmpfs in a private mount namespace)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect as quic_connect
from aioquic.quic.configuration import QuicConfiguration
from helpers import (
    ROOT,
    isolated_home,  # noqa: F401 (an autouse fixture)
    make_file,
    partials,
    run,
)

import qsftp
from qsftp import fs
from qsftp.server import Limits
from qsftp.wire import ALPN


def test_connections_beyond_the_limit_are_refused_busy(tmp_path: Path) -> None:
    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", limits=Limits(max_connections=1)) as server:
            async with qsftp.connect(server.host, server.port):
                with pytest.raises(qsftp.Busy):
                    async with qsftp.connect(server.host, server.port):
                        pass
            # The slot is free again once the first connection is gone.
            async with qsftp.connect(server.host, server.port) as conn:
                assert await conn.listdir() == []

    run(body)


def test_operations_beyond_the_limit_get_busy_and_the_rest_succeed(tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"f{i}.bin", 2 << 20, seed=i) for i in range(6)]

    async def body() -> list[object]:
        limits = Limits(max_operations=2)
        async with (
            qsftp.serve(tmp_path / "root", limits=limits) as server,
            qsftp.connect(server.host, server.port) as conn,
        ):
            uploads = (conn.upload(f) for f in files)
            return await asyncio.gather(*uploads, return_exceptions=True)

    results = run(body)
    busy = [r for r in results if isinstance(r, qsftp.Busy)]
    done = [r for r in results if isinstance(r, qsftp.TransferResult)]
    assert busy and len(done) >= 2
    assert len(busy) + len(done) == len(files)
    assert partials(tmp_path / "root") == []


def test_a_connection_that_asks_for_no_session_is_closed_at_the_deadline(tmp_path: Path) -> None:
    async def body() -> None:
        limits = Limits(session_deadline=0.3)
        async with qsftp.serve(tmp_path / "root", limits=limits) as server:
            config = QuicConfiguration(
                is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
            )
            async with quic_connect(server.host, server.port, configuration=config) as raw:
                await asyncio.wait_for(raw.wait_closed(), 5)  # closed by the server, not us

    run(body)


def test_retry_address_validation_still_serves(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 100_000)

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", retry=True) as server:
            assert (await qsftp.upload(src, server.host, server.port)).verified

    run(body)


def test_upload_that_would_not_leave_the_reserve_free_is_refused_before_writing(
    tmp_path: Path,
) -> None:
    src = make_file(tmp_path / "a.bin", 10_000)
    root = tmp_path / "root"

    async def body() -> None:
        free = shutil.disk_usage(tmp_path).free
        async with qsftp.serve(root, limits=Limits(free_space_reserve=free)) as server:
            with pytest.raises(qsftp.NoSpace):
                await qsftp.upload(src, server.host, server.port)

    run(body)
    assert not (root / "a.bin").exists()
    assert partials(root) == []


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt",
        ],
        capture_output=True,
        check=False,
        timeout=10,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces")
def test_disk_full_mid_upload_gives_no_space_removes_the_temp_and_keeps_serving(
    tmp_path: Path,
) -> None:
    """Two 700 kB uploads pass the free-space check of a 1 MiB tmpfs together, then one hits
    ENOSPC while writing: it fails with NoSpace, leaves nothing, and the server goes on."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "QSFTP_STATE_DIR": str(tmp_path / "sstate"),
    }
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mount} && exec {sys.executable} -m qsftp.server "
        f"--port 0 --root {mount} --free-space-reserve 0"
    )
    server = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        port = int(line.split(",")[0].rsplit(":", 1)[1])
        fingerprint = line.rsplit("sha256:", 1)[1].strip()
        files = [make_file(tmp_path / f"big{i}.bin", 700_000, seed=i) for i in range(2)]

        async def body() -> None:
            async with qsftp.connect("127.0.0.1", port, pin=fingerprint) as conn:
                results = await asyncio.gather(
                    *(conn.upload(f) for f in files), return_exceptions=True
                )
                assert any(isinstance(r, qsftp.NoSpace) for r in results), results
                listing = await conn.listdir()
                names = {e.name for e in listing}
                # Whatever failed left no file and no temporary (listings hide temporaries,
                # so ask for the failed names directly).
                for f, r in zip(files, results, strict=True):
                    if isinstance(r, qsftp.NoSpace):
                        assert f.name not in names
                small = make_file(tmp_path / "small.bin", 1000)
                assert (await conn.upload(small)).verified

        run(body)
    finally:
        server.terminate()
        server.communicate(timeout=20)
    assert server.returncode == 0


def test_partial_names_are_hidden_and_reserved(tmp_path: Path) -> None:
    with pytest.raises(qsftp.BadPath):
        fs.normalize_name("x" + fs.PARTIAL_SUFFIX)
