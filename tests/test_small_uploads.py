"""Small uploads (at most SMALL_UPLOAD_MAX bytes): the server gathers the body in memory and
stores it with one Root.store call on its own threads. Same guarantees as the streaming path:
the exact bytes or an error, never a partial file under the final name, never a temp file left."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    isolated_home,  # noqa: F401 (an autouse fixture)
    make_file,
    partials,
    run,
)
from test_hostile import raw_operation

import qsftp
from qsftp import fs, wire
from qsftp.errors import ErrorCode
from qsftp.server import SMALL_UPLOAD_MAX


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every Root.store call from now on, as (name, name of the thread that ran it)."""
    calls: list[tuple[str, str]] = []
    real = fs.Root.store

    def store(self: fs.Root, name: str, *args: Any, **kwargs: Any) -> str:
        calls.append((name, threading.current_thread().name))
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(fs.Root, "store", store)
    return calls


@pytest.mark.parametrize("size", [0, 1, 4096, SMALL_UPLOAD_MAX])
def test_a_small_upload_is_stored_whole_by_one_store_on_the_server_threads(
    tmp_path: Path, stores: list[tuple[str, str]], size: int
) -> None:
    src = make_file(tmp_path / "src.bin", size, seed=size)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.upload(src, server.host, server.port, remote_name="d/f.bin")

    result = run(body)
    assert result.verified and result.size == size
    assert result.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (root / "d" / "f.bin").read_bytes() == src.read_bytes()
    assert partials(root) == []
    (call,) = stores
    assert call[0] == "d/f.bin"
    assert call[1].startswith("qsftp-fs"), "file work runs on the server's pool"


def test_an_upload_above_the_small_limit_streams_to_disk_instead(
    tmp_path: Path, stores: list[tuple[str, str]]
) -> None:
    src = make_file(tmp_path / "src.bin", SMALL_UPLOAD_MAX + 1)
    root = tmp_path / "root"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(root) as server:
            return await qsftp.upload(src, server.host, server.port)

    assert run(body).verified
    assert (root / "src.bin").read_bytes() == src.read_bytes()
    assert stores == []


def _put(name: str, declared: int, body: bytes, sha256: bytes | None = None) -> bytes:
    digest = hashlib.sha256(body).digest() if sha256 is None else sha256
    return b"".join(
        [
            wire.encode(wire.Put(name=name, size=declared)),
            wire.encode(wire.Data(data=body[: len(body) // 2])),
            wire.encode(wire.Data(data=body[len(body) // 2 :])),
            wire.encode(wire.End(sha256=digest)),
        ]
    )


@pytest.mark.parametrize(
    ("declared", "sent"),
    [pytest.param(1000, 1500, id="longer"), pytest.param(1000, 600, id="shorter")],
)
def test_a_small_body_of_another_length_than_declared_is_refused_and_leaves_nothing(
    tmp_path: Path, declared: int, sent: int
) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"old")
    answer = run(lambda: raw_operation(root, _put("d/f", declared, bytes(sent))))
    assert isinstance(answer[-1], wire.Error)
    assert answer[-1].code == ErrorCode.BAD_REQUEST
    assert (root / "d" / "f").read_bytes() == b"old"
    assert partials(root) == []


def test_a_small_upload_with_a_wrong_sha256_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "kept").parent.mkdir(parents=True)
    (root / "kept").write_bytes(b"old")
    body = b"x" * 4096
    for name in ("new", "kept"):
        answer = run(lambda name=name: raw_operation(root, _put(name, len(body), body, bytes(32))))
        assert isinstance(answer[-1], wire.Error)
        assert answer[-1].code == ErrorCode.CHECKSUM_MISMATCH
        assert "SHA-256" in answer[-1].message
    assert not (root / "new").exists()
    assert (root / "kept").read_bytes() == b"old"
    assert partials(root) == []


@pytest.mark.parametrize("name", ["taken", "file/below"])
def test_a_small_upload_onto_a_directory_or_below_a_file_is_bad_path_and_the_connection_serves_on(
    tmp_path: Path, name: str
) -> None:
    src = make_file(tmp_path / "x.bin", 4096)
    root = tmp_path / "root"
    (root / "taken").mkdir(parents=True)
    (root / "file").write_bytes(b"a file")

    async def body() -> None:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            with pytest.raises(qsftp.BadPath):
                await conn.upload(src, name)
            assert (await conn.upload(src, "ok.bin")).verified

    run(body)
    assert (root / "taken").is_dir() and list((root / "taken").iterdir()) == []
    assert (root / "file").read_bytes() == b"a file"
    assert (root / "ok.bin").read_bytes() == src.read_bytes()
    assert partials(root) == []


def test_concurrent_small_uploads_to_one_directory_all_land_whole(tmp_path: Path) -> None:
    """Many small uploads at once on one connection into one directory (their directory
    fsyncs are grouped), some of them to the same name: every file is one sender's bytes."""
    sources = [make_file(tmp_path / "src" / f"{i:03d}", 4096 + i, seed=i) for i in range(150)]
    rivals = [make_file(tmp_path / "rival" / f"{i}", 3000 + i, seed=1000 + i) for i in range(8)]
    root = tmp_path / "root"

    async def body() -> list[qsftp.TransferResult]:
        async with qsftp.serve(root) as server, qsftp.connect(server.host, server.port) as conn:
            limit = asyncio.Semaphore(32)  # below the server's max_operations

            async def one(path: Path, name: str) -> qsftp.TransferResult:
                async with limit:
                    return await conn.upload(path, name)

            jobs = [one(p, f"d/{p.name}") for p in sources]
            jobs += [one(p, "d/same") for p in rivals]
            return await asyncio.gather(*jobs)

    results = run(body)
    assert all(r.verified for r in results)
    for path in sources:
        assert (root / "d" / path.name).read_bytes() == path.read_bytes()
    assert (root / "d" / "same").read_bytes() in {p.read_bytes() for p in rivals}
    assert len(list((root / "d").iterdir())) == len(sources) + 1
    assert partials(root) == []


def test_the_server_pool_is_shut_down_when_the_server_closes(tmp_path: Path) -> None:
    src = make_file(tmp_path / "x.bin", 4096)

    async def body() -> qsftp.QsftpServer:
        async with qsftp.serve(tmp_path / "root") as server:
            assert (await qsftp.upload(src, server.host, server.port)).verified
            assert [t for t in threading.enumerate() if t.name.startswith("qsftp-fs")]
        return server

    server = run(body)
    with pytest.raises(RuntimeError):
        server.fs_pool.submit(print)
    assert not [t for t in threading.enumerate() if t.name.startswith("qsftp-fs")]
