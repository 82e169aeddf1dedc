"""qsftp.fs: the name policy, confinement without following links, atomic writes, listings."""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qsftp.fs
from qsftp.errors import (
    BadPath,
    ChecksumMismatch,
    LocalFileError,
    NoSpace,
    NotFound,
    TooLarge,
    UsageError,
)
from qsftp.fs import (
    MAX_COMPONENT_BYTES,
    MAX_DEPTH,
    PARTIAL_SUFFIX,
    Entry,
    Root,
    normalize_name,
    open_local_writer,
    sha256_file,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path: pathlib.Path) -> Iterator[Root]:
    with Root(tmp_path / "root") as r:
        yield r


def names(entries: list[Entry]) -> list[str]:
    return [e.name for e in entries]


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- name policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", "a.txt"),
        ("dir/sub/file.bin", "dir/sub/file.bin"),
        (".hidden", ".hidden"),
        ("...", "..."),
        ("a..b", "a..b"),
        ("größe/文件.txt", "größe/文件.txt"),
        ("cafe\u0301", "caf\u00e9"),  # NFD in, NFC out
        ("x" * MAX_COMPONENT_BYTES, "x" * MAX_COMPONENT_BYTES),
        ("/".join(["d"] * MAX_DEPTH), "/".join(["d"] * MAX_DEPTH)),
    ],
)
def test_normalize_name_accepts_relative_names_and_returns_nfc(name: str, expected: str) -> None:
    assert normalize_name(name) == expected


def test_normalize_name_empty_means_root_only_when_allowed() -> None:
    assert normalize_name("", allow_empty=True) == ""
    with pytest.raises(BadPath, match="empty"):
        normalize_name("")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty name"),
        ("/abs", "absolute"),
        ("a/../b", "'..' component"),
        ("..", "'..' component"),
        (".", "'.' component"),
        ("a//b", "empty component"),
        ("a/", "empty component"),
        ("a\\b", "backslash"),
        ("C:x", "drive prefix"),
        ("a\x00b", "control character"),
        ("\x1f", "control character"),
        ("a\x7fb", "control character"),
        ("\u2025/x", "looks like '..'"),
        ("\uff0e\uff0e/x", "looks like '..'"),
        ("a/\uff0e/b", "looks like '.'"),
        ("a\uff0fb", "looks like 'a/b'"),
        ("x" * 300, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),  # 128 characters, 256 bytes
        ("/".join(["d"] * (MAX_DEPTH + 1)), "deeper than 64"),
        ("/".join(["x" * 250] * 17), "longer than 4096 bytes"),
        ("x.qsftp-part", "reserved"),
        ("d/.x.0123abcd.qsftp-part", "reserved"),
        ("bad\udcff", "not valid UTF-8"),
    ],
)
def test_normalize_name_refuses_unsafe_names_saying_why(name: str, reason: str) -> None:
    with pytest.raises(BadPath) as info:
        normalize_name(name)
    assert reason in str(info.value)


@given(st.text(max_size=40))
def test_normalize_name_raises_only_bad_path_and_accepted_names_are_stable(name: str) -> None:
    try:
        normalized = normalize_name(name)
    except BadPath:
        return
    assert normalize_name(normalized) == normalized
    for part in normalized.split("/"):
        assert unicodedata.normalize("NFKC", part) not in ("", ".", "..")


# --- confinement: links are never followed -------------------------------------------------


@pytest.fixture
def linked(tmp_path: pathlib.Path, root: Root) -> Root:
    """A root holding links out of it (out, secret) and links inside it (inlink, infile)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (root.path / "real").mkdir()
    (root.path / "real" / "inner.txt").write_bytes(b"inner")
    (root.path / "out").symlink_to(outside)
    (root.path / "secret").symlink_to(outside / "secret.txt")
    (root.path / "inlink").symlink_to("real")
    (root.path / "infile").symlink_to("real/inner.txt")
    return root


OPERATIONS: dict[str, Callable[[Root, str], object]] = {
    "open_read": lambda r, n: r.open_read(n),
    "stat": lambda r, n: r.stat(n),
    "listdir": lambda r, n: r.listdir(n),
    "create_writer": lambda r, n: r.create_writer(n),
    "store": lambda r, n: r.store(n, b"x"),
}


@pytest.mark.parametrize(
    ("operation", "name"),
    [
        ("open_read", "secret"),
        ("open_read", "out/secret.txt"),
        ("stat", "secret"),
        ("stat", "out"),
        ("stat", "out/secret.txt"),
        ("listdir", "out"),
        ("create_writer", "out/new.txt"),
        ("create_writer", "out/deeper/new.txt"),
        ("create_writer", "secret"),
        ("store", "out/new.txt"),
        ("store", "secret"),
    ],
)
def test_symlink_out_of_root_is_refused(
    tmp_path: pathlib.Path, linked: Root, operation: str, name: str
) -> None:
    with pytest.raises(BadPath, match="is a symbolic link"):
        OPERATIONS[operation](linked, name)
    assert leftovers(tmp_path / "outside") == ["secret.txt"]
    assert (tmp_path / "outside" / "secret.txt").read_bytes() == b"secret"


@pytest.mark.parametrize(
    ("operation", "name"),
    [
        ("open_read", "infile"),
        ("open_read", "inlink/inner.txt"),
        ("stat", "inlink"),
        ("stat", "infile"),
        ("listdir", "inlink"),
        ("create_writer", "inlink/new.txt"),
        ("store", "inlink/new.txt"),
    ],
)
def test_symlink_inside_root_is_refused_too(linked: Root, operation: str, name: str) -> None:
    with pytest.raises(BadPath, match="is a symbolic link"):
        OPERATIONS[operation](linked, name)
    assert leftovers(linked.path / "real") == ["inner.txt"]


def test_file_in_the_middle_of_a_name_is_not_a_directory(root: Root) -> None:
    (root.path / "f").write_bytes(b"")
    for operation in OPERATIONS.values():
        with pytest.raises(BadPath, match="'f' is not a directory"):
            operation(root, "f/x")


# --- reads, stat, listings -----------------------------------------------------------------


def test_open_read_returns_content_and_entry(root: Root) -> None:
    (root.path / "d").mkdir()
    (root.path / "d" / "f.bin").write_bytes(b"hello")
    file, entry = root.open_read("d/f.bin")
    with file:
        assert file.read() == b"hello"
    assert entry.name == "d/f.bin"
    assert entry.kind == "file"
    assert entry.size == 5
    assert entry.mtime_ns == (root.path / "d" / "f.bin").stat().st_mtime_ns


def test_open_read_refuses_directories_and_fifos_without_blocking(root: Root) -> None:
    (root.path / "d").mkdir()
    os.mkfifo(root.path / "fifo")
    with pytest.raises(BadPath, match="is a directory"):
        root.open_read("d")
    with pytest.raises(BadPath, match="is not a regular file"):
        root.open_read("fifo")


def test_missing_names_are_not_found(root: Root) -> None:
    with pytest.raises(NotFound):
        root.stat("missing")
    with pytest.raises(NotFound):
        root.stat("missing/deeper")
    with pytest.raises(NotFound):
        root.open_read("missing")
    with pytest.raises(NotFound):
        root.listdir("missing")


def test_stat_describes_files_dirs_and_the_root(root: Root) -> None:
    (root.path / "d").mkdir()
    (root.path / "d" / "f").write_bytes(b"abc")
    assert root.stat("").kind == "dir"
    assert root.stat("").name == ""
    assert root.stat("d") == Entry(
        name="d", kind="dir", size=0, mtime_ns=(root.path / "d").stat().st_mtime_ns
    )
    assert root.stat("d/f").size == 3
    assert root.stat("d/f").kind == "file"


def test_listdir_is_sorted_and_hides_partials_links_and_special_files(root: Root) -> None:
    for name in ("b", "a", "C", ".dot"):
        (root.path / name).write_bytes(b"x")
    (root.path / "sub").mkdir()
    (root.path / f".a.1234abcd{PARTIAL_SUFFIX}").write_bytes(b"partial")
    (root.path / f"plain{PARTIAL_SUFFIX}").write_bytes(b"partial")
    (root.path / "link").symlink_to("a")
    (root.path / "dirlink").symlink_to("sub")
    os.mkfifo(root.path / "fifo")
    (root.path / "back\\slash").write_bytes(b"x")  # a name no client could ask for
    os.mkdir(os.fsencode(root.path) + b"/\xff")  # not UTF-8
    entries = root.listdir()
    assert names(entries) == [".dot", "C", "a", "b", "sub"]
    assert [e.kind for e in entries] == ["file", "file", "file", "file", "dir"]
    assert entries[-1].size == 0


def test_listdir_recursive_walks_the_subtree_without_following_links(root: Root) -> None:
    (root.path / "d" / "e").mkdir(parents=True)
    (root.path / "d" / "e" / "deep.txt").write_bytes(b"12")
    (root.path / "d" / "f.txt").write_bytes(b"1")
    (root.path / "d" / "loop").symlink_to("..")
    (root.path / "top.txt").write_bytes(b"")
    assert names(root.listdir(recursive=True)) == [
        "d",
        "d/e",
        "d/e/deep.txt",
        "d/f.txt",
        "top.txt",
    ]
    assert names(root.listdir("d", recursive=True)) == ["d/e", "d/e/deep.txt", "d/f.txt"]
    assert names(root.listdir("d")) == ["d/e", "d/f.txt"]


def test_listdir_recursive_stops_at_max_depth(root: Root) -> None:
    deepest = root.path.joinpath(*["d"] * (MAX_DEPTH + 1))
    deepest.mkdir(parents=True)
    listed = names(root.listdir(recursive=True))
    assert len(listed) == MAX_DEPTH
    assert listed[-1] == "/".join(["d"] * MAX_DEPTH)


def test_listdir_of_a_file_is_bad_path(root: Root) -> None:
    (root.path / "f").write_bytes(b"")
    with pytest.raises(BadPath, match="not a directory"):
        root.listdir("f")


def test_closed_root_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    r = Root(tmp_path / "r")
    r.close()
    r.close()
    with pytest.raises(UsageError):
        r.stat("")


def test_root_must_exist_when_not_created(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LocalFileError):
        Root(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


# --- atomic writes -------------------------------------------------------------------------


def test_commit_makes_the_final_file_with_content_and_hash(root: Root) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    with root.create_writer("new/dir/f.bin", size=len(data)) as writer:
        writer.write(data[:1000])
        writer.write(memoryview(data)[1000:])
        assert writer.bytes_written == len(data)
        assert not (root.path / "new/dir/f.bin").exists()
        digest = writer.commit(expected_sha256=hashlib.sha256(data).hexdigest().upper())
    assert writer.committed
    assert writer.closed
    assert digest == hashlib.sha256(data).hexdigest() == writer.hexdigest()
    assert (root.path / "new/dir/f.bin").read_bytes() == data
    assert leftovers(root.path / "new/dir") == ["f.bin"]
    assert sha256_file(root.path / "new/dir/f.bin") == digest


def test_final_name_appears_only_on_commit_and_temp_is_hidden(root: Root) -> None:
    writer = root.create_writer("f")
    writer.write(b"data")
    (temp,) = leftovers(root.path)
    assert temp.startswith(".f.")
    assert temp.endswith(PARTIAL_SUFFIX)
    assert root.listdir() == []
    writer.commit()
    assert leftovers(root.path) == ["f"]


def test_commit_replaces_an_existing_file(root: Root) -> None:
    (root.path / "f").write_bytes(b"old")
    with root.create_writer("f") as writer:
        writer.write(b"new")
        assert (root.path / "f").read_bytes() == b"old"
        writer.commit()
    assert (root.path / "f").read_bytes() == b"new"


def test_longest_component_still_gets_a_temp_file(root: Root) -> None:
    name = "é" * (MAX_COMPONENT_BYTES // 2)
    with root.create_writer(name) as writer:
        writer.write(b"x")
        writer.commit()
    assert leftovers(root.path) == [name]


def test_abort_leaves_nothing_and_is_idempotent(root: Root) -> None:
    writer = root.create_writer("f")
    writer.write(b"data")
    writer.abort()
    writer.abort()
    assert writer.closed
    assert not writer.committed
    assert leftovers(root.path) == []
    with pytest.raises(UsageError):
        writer.write(b"more")
    with pytest.raises(UsageError):
        writer.commit()


def test_exception_in_with_leaves_nothing(root: Root) -> None:
    with pytest.raises(RuntimeError), root.create_writer("f") as writer:
        writer.write(b"data")
        raise RuntimeError
    assert leftovers(root.path) == []


def test_abort_after_commit_keeps_the_file(root: Root) -> None:
    writer = root.create_writer("f")
    writer.write(b"data")
    writer.commit()
    writer.abort()
    assert (root.path / "f").read_bytes() == b"data"


def test_checksum_mismatch_raises_and_leaves_nothing(root: Root) -> None:
    (root.path / "f").write_bytes(b"old")
    writer = root.create_writer("f")
    writer.write(b"data")
    with pytest.raises(ChecksumMismatch, match="SHA-256"):
        writer.commit(expected_sha256="0" * 64)
    assert writer.closed
    assert leftovers(root.path) == ["f"]
    assert (root.path / "f").read_bytes() == b"old"


def test_fewer_bytes_than_declared_is_a_checksum_mismatch(root: Root) -> None:
    writer = root.create_writer("f", size=10)
    writer.write(b"12345")
    with pytest.raises(ChecksumMismatch, match="size 5 != declared 10"):
        writer.commit()
    assert leftovers(root.path) == []


def test_more_bytes_than_declared_is_too_large_at_once(root: Root) -> None:
    writer = root.create_writer("f", size=4)
    writer.write(b"123")
    with pytest.raises(TooLarge):
        writer.write(b"45")
    assert writer.closed
    assert leftovers(root.path) == []


def test_negative_size_is_a_usage_error(root: Root) -> None:
    with pytest.raises(UsageError):
        root.create_writer("d/f", size=-1)
    assert leftovers(root.path) == []


def test_writing_over_a_directory_is_bad_path(root: Root) -> None:
    (root.path / "d").mkdir()
    with pytest.raises(BadPath, match="is a directory"):
        root.create_writer("d")


def test_directory_appearing_before_commit_is_bad_path(root: Root) -> None:
    writer = root.create_writer("d")
    writer.write(b"x")
    (root.path / "d").mkdir()
    with pytest.raises(BadPath, match="is a directory"):
        writer.commit()
    assert leftovers(root.path) == ["d"]


# --- store: a whole file from memory in one call (a server's small uploads) -----------------


def test_store_makes_the_final_file_with_content_and_hash(root: Root) -> None:
    data = os.urandom(4096)
    (root.path / "d").mkdir()
    (root.path / "d" / "f").write_bytes(b"old")
    digest = root.store("d/f", data, expected_sha256=hashlib.sha256(data).hexdigest().upper())
    assert digest == hashlib.sha256(data).hexdigest()
    assert (root.path / "d" / "f").read_bytes() == data
    assert leftovers(root.path / "d") == ["f"]
    assert root.store("new/dir/empty", b"") == hashlib.sha256(b"").hexdigest()
    assert (root.path / "new" / "dir" / "empty").read_bytes() == b""


def test_store_with_a_wrong_sha256_leaves_the_old_file_and_no_temp(root: Root) -> None:
    (root.path / "f").write_bytes(b"old")
    with pytest.raises(ChecksumMismatch, match="SHA-256"):
        root.store("f", b"data", expected_sha256="0" * 64)
    assert leftovers(root.path) == ["f"]
    assert (root.path / "f").read_bytes() == b"old"


def test_store_of_more_than_the_declared_size_is_too_large_and_leaves_nothing(root: Root) -> None:
    with pytest.raises(TooLarge, match="more than the declared 3 bytes"):
        root.store("f", b"1234", size=3)
    assert leftovers(root.path) == []


def test_store_of_less_than_the_declared_size_is_a_mismatch_and_leaves_nothing(root: Root) -> None:
    with pytest.raises(ChecksumMismatch, match="size 2 != declared 3"):
        root.store("f", b"12", size=3)
    assert leftovers(root.path) == []


def test_store_over_a_directory_is_bad_path_and_leaves_it(root: Root) -> None:
    (root.path / "d").mkdir()
    with pytest.raises(BadPath, match="is a directory"):
        root.store("d", b"x")
    assert leftovers(root.path) == ["d"]
    assert leftovers(root.path / "d") == []


def test_store_failing_in_fsync_is_nospace_and_removes_the_temp(
    monkeypatch: pytest.MonkeyPatch, root: Root
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(NoSpace):
        root.store("f", b"data")
    assert leftovers(root.path) == []


def test_file_mode_follows_the_umask(root: Root) -> None:
    old = os.umask(0o027)
    try:
        with root.create_writer("sub/f") as writer:
            writer.commit()
    finally:
        os.umask(old)
    assert (root.path / "sub" / "f").stat().st_mode & 0o777 == 0o640
    assert (root.path / "sub").stat().st_mode & 0o777 == 0o750


class FailingFile:
    """Wraps the writer's file so one step fails with a chosen errno."""

    def __init__(self, file: Any, where: str, err: int) -> None:
        self.file, self.where, self.err = file, where, err

    def fail(self, where: str) -> None:
        if where == self.where:
            raise OSError(self.err, os.strerror(self.err))

    def write(self, data: bytes) -> int:
        self.fail("write")
        return int(self.file.write(data))

    def flush(self) -> None:
        self.fail("flush")
        self.file.flush()

    def fileno(self) -> int:
        return int(self.file.fileno())

    def close(self) -> None:
        self.file.close()
        self.fail("close")


@pytest.mark.parametrize("where", ["write", "flush", "fsync", "close"])
@pytest.mark.parametrize(
    ("err", "error"),
    [
        (errno.ENOSPC, NoSpace),
        (errno.EDQUOT, NoSpace),
        (errno.EFBIG, NoSpace),
        (errno.EIO, LocalFileError),
    ],
)
def test_write_errors_map_to_nospace_or_local_error_and_remove_the_temp(
    monkeypatch: pytest.MonkeyPatch, root: Root, where: str, err: int, error: type[Exception]
) -> None:
    real_fdopen, real_fsync = os.fdopen, os.fsync
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FailingFile(real_fdopen(*a, **k), where, err))
    synced: list[int] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        if where == "fsync" and len(synced) == 1:
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = root.create_writer("f")
    with pytest.raises(error):
        writer.write(b"data")
        writer.commit()
    assert writer.closed
    assert not writer.committed
    assert leftovers(root.path) == []


FILL_DISK = """
import os, sys
from qsftp.errors import NoSpace
from qsftp.fs import Root
with Root(sys.argv[1]) as root:
    try:
        with root.create_writer("big") as writer:
            for _ in range(32):
                writer.write(b"x" * 65536)
            writer.commit()
    except NoSpace as exc:
        print("NoSpace", os.listdir(sys.argv[1]), exc)
"""


def run_fill_disk(argv: list[str], directory: pathlib.Path, **kwargs: Any) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*argv, sys.executable, "-c", FILL_DISK, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


def test_real_efbig_from_file_size_limit_is_nospace(tmp_path: pathlib.Path) -> None:
    """RLIMIT_FSIZE in a child process: Python ignores SIGXFSZ and gets EFBIG."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))

    out = run_fill_disk([], tmp_path, preexec_fn=limit)
    assert out.startswith("NoSpace [] ")
    assert leftovers(tmp_path) == []


def test_real_enospc_on_a_full_tmpfs_is_nospace(tmp_path: pathlib.Path) -> None:
    """A 1 MiB tmpfs in a private mount namespace; 2 MiB written."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare")
    namespace = [unshare, "-m", "--propagation", "private"]
    if os.geteuid() != 0:
        namespace = [unshare, "-Urm", "--propagation", "private"]
    mount = ["sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"', "sh"]
    probe = subprocess.run(
        [*namespace, *mount, str(tmp_path), "true"], check=False, capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    out = run_fill_disk([*namespace, *mount, str(tmp_path)], tmp_path)
    assert out.startswith("NoSpace [] "), out


# --- local writer, hashing, hygiene --------------------------------------------------------


def test_local_writer_commits_beside_the_target(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "down.bin"
    with open_local_writer(target, size=3) as writer:
        writer.write(b"abc")
        assert leftovers(tmp_path)[0].endswith(PARTIAL_SUFFIX)
        writer.commit(expected_sha256=hashlib.sha256(b"abc").hexdigest())
    assert writer.name == str(target)
    assert leftovers(tmp_path) == ["down.bin"]
    assert target.read_bytes() == b"abc"


def test_local_writer_needs_an_existing_parent(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LocalFileError):
        open_local_writer(tmp_path / "missing" / "f")


def test_local_writer_refuses_directories_and_existing_files_without_overwrite(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(LocalFileError, match="is a directory"):
        open_local_writer(tmp_path / "d")
    with pytest.raises(LocalFileError, match="already exists"):
        open_local_writer(tmp_path / "f", overwrite=False)
    with open_local_writer(tmp_path / "g", overwrite=False) as writer:
        (tmp_path / "g").write_bytes(b"appeared meanwhile")
        with pytest.raises(LocalFileError, match="already exists"):
            writer.commit()
    assert leftovers(tmp_path) == ["d", "f", "g"]
    assert (tmp_path / "g").read_bytes() == b"appeared meanwhile"


def test_sha256_file_matches_hashlib(tmp_path: pathlib.Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 1)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    with pytest.raises(LocalFileError):
        sha256_file(tmp_path / "missing")


def test_every_fd_is_closed_on_success_and_failure(tmp_path: pathlib.Path, linked: Root) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(3):
        file, _entry = linked.open_read("real/inner.txt")
        file.close()
        linked.listdir(recursive=True)
        linked.stat("real")
        with linked.create_writer("a/b/c") as writer:
            writer.write(b"x")
            writer.commit()
        with linked.create_writer("a/b/d"):
            pass
        for bad in ("out/secret.txt", "inlink/x", "a/b/c/x", "secret"):
            for operation in OPERATIONS.values():
                with pytest.raises(BadPath):
                    operation(linked, bad)
        with pytest.raises(NotFound):
            linked.open_read("missing/x")
        with pytest.raises(TooLarge), linked.create_writer("a/e", size=0) as writer:
            writer.write(b"x")
        with pytest.raises(LocalFileError):
            open_local_writer(tmp_path / "real" / "x")
    assert open_fds() == before


def test_fs_imports_no_asyncio_sockets_aioquic_or_pandas() -> None:
    tree = ast.parse(pathlib.Path(qsftp.fs.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"asyncio", "socket", "aioquic", "pandas", "matplotlib"}


def test_concurrent_directory_syncs_share_fsync_calls_and_each_waits_for_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: 16 threads syncing one directory need fewer than 16 fsyncs, and no call
    returns before an fsync that started after it was made."""
    import threading
    import time as time_module

    from qsftp.fs import sync_directory

    real_fsync = os.fsync
    starts: list[float] = []
    lock = threading.Lock()

    def slow_fsync(fd: int) -> None:
        with lock:
            starts.append(time_module.monotonic())
        time_module.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    called: list[float] = []
    returned: list[float] = []

    def worker() -> None:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with lock:
                called.append(time_module.monotonic())
            sync_directory(fd)
            with lock:
                returned.append(time_module.monotonic())
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(returned) == 16
    assert 1 <= len(starts) < 16
    assert max(starts) <= max(returned)
    assert min(starts) >= min(called)


def test_stale_partials_are_removed_and_fresh_ones_and_other_files_stay(
    tmp_path: pathlib.Path,
) -> None:
    from qsftp.fs import PARTIAL_SUFFIX, Root

    root_dir = tmp_path / "root"
    (root_dir / "a" / "b").mkdir(parents=True)
    old = root_dir / "a" / "b" / f".x.1234abcd{PARTIAL_SUFFIX}"
    fresh = root_dir / "a" / f".y.5678abcd{PARTIAL_SUFFIX}"
    kept = root_dir / "a" / "b" / "data.bin"
    for path in (old, fresh, kept):
        path.write_bytes(b"x")
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(kept, (1_000_000, 1_000_000))
    outside = tmp_path / f".z.99999999{PARTIAL_SUFFIX}"
    outside.write_bytes(b"x")
    os.utime(outside, (1_000_000, 1_000_000))
    (root_dir / "link").symlink_to(tmp_path)
    with Root(root_dir) as root:
        assert root.remove_stale_partials(3600) == 1
    assert not old.exists()
    assert fresh.exists() and kept.exists() and outside.exists()


# --- striped uploads: the running whole-file hash ------------------------------------------


def _pieces(size: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(size, start + step)) for start in range(0, size, step)]


def _write_ranges(
    root: Root, name: str, upload_id: str, data: bytes, pieces: list[tuple[int, int]]
) -> None:
    """Write the ``pieces`` (start, end) of ``data`` through open_range, in the order given."""
    for start, end in pieces:
        writer = root.open_range(name, upload_id, total_size=len(data))
        try:
            for at in range(start, end, 100_000):
                writer.write_at(at, data[at : min(end, at + 100_000)])
        finally:
            writer.close()


def _committed_and_read(
    root: Root, name: str, upload_id: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> int:
    """Commit, check the digest and the file, return how many bytes COMMIT read back."""
    with caplog.at_level("DEBUG", logger="qsftp.fs"):
        digest = root.commit_partial(
            name, upload_id, total_size=len(data), expected_sha256=hashlib.sha256(data).hexdigest()
        )
    assert digest == hashlib.sha256(data).hexdigest()
    assert (root.path / name).read_bytes() == data
    message = next(r.getMessage() for r in caplog.records if "committed striped" in r.getMessage())
    return int(message.rsplit(" of them", 1)[0].rsplit(", ", 1)[1])


@pytest.mark.parametrize(
    "order", [[0, 1, 2], [2, 1, 0], [1, 0, 2]], ids=["in-order", "reversed", "middle-first"]
)
def test_striped_commit_finds_the_file_hashed_whatever_the_range_order(
    root: Root, order: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(1_000_000)
    pieces = _pieces(len(data), 400_000)
    _write_ranges(root, "s.bin", "ab" * 16, data, [pieces[i] for i in order])
    assert _committed_and_read(root, "s.bin", "ab" * 16, data, caplog) == 0


def test_striped_ranges_written_from_threads_at_once_are_hashed_before_commit(
    root: Root, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    data = os.urandom(4_000_000)
    pieces = _pieces(len(data), 250_000)
    threads = [
        threading.Thread(target=_write_ranges, args=(root, "t.bin", "cd" * 16, data, pieces[i::4]))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _committed_and_read(root, "t.bin", "cd" * 16, data, caplog) == 0


def test_rewriting_hashed_bytes_makes_commit_hash_the_whole_file_again(
    root: Root, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = os.urandom(500_000), os.urandom(500_000)
    _write_ranges(root, "r.bin", "ef" * 16, old, [(0, len(old))])
    _write_ranges(root, "r.bin", "ef" * 16, new, [(0, len(new))])  # again, other bytes
    assert _committed_and_read(root, "r.bin", "ef" * 16, new, caplog) == len(new)


def test_a_partial_file_made_anew_is_not_hashed_with_the_old_ones_bytes(
    root: Root, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = os.urandom(300_000), os.urandom(300_000)
    _write_ranges(root, "n.bin", "12" * 16, first, [(0, len(first))])
    assert root.abort_partial("n.bin", "12" * 16)
    _write_ranges(root, "n.bin", "12" * 16, second, [(0, len(second))])
    assert _committed_and_read(root, "n.bin", "12" * 16, second, caplog) == 0


def test_ranges_this_process_did_not_write_are_read_at_commit(
    root: Root, caplog: pytest.LogCaptureFixture
) -> None:
    """As when another server process (--workers) wrote them: the digest is the file's."""
    data = os.urandom(600_000)
    _write_ranges(root, "w.bin", "34" * 16, data, [(0, len(data))])
    other = Root(root.path)  # a second Root keeps its own table, as another process would
    try:
        assert _committed_and_read(other, "w.bin", "34" * 16, data, caplog) == len(data)
    finally:
        other.close()


def test_many_scattered_ranges_still_give_the_files_digest(
    root: Root, caplog: pytest.LogCaptureFixture
) -> None:
    """More gaps than the hash remembers: what it forgot is read at COMMIT, still correct."""
    data = os.urandom(40_000)
    pieces = _pieces(len(data), 100)
    _write_ranges(root, "m.bin", "56" * 16, data, pieces[1::2] + pieces[0::2])
    assert _committed_and_read(root, "m.bin", "56" * 16, data, caplog) > 0


def test_a_wrong_whole_file_digest_is_refused_with_the_running_hash(root: Root) -> None:
    data = os.urandom(200_000)
    _write_ranges(root, "x.bin", "78" * 16, data, [(100_000, 200_000), (0, 100_000)])
    with pytest.raises(ChecksumMismatch):
        root.commit_partial("x.bin", "78" * 16, total_size=len(data), expected_sha256="0" * 64)
    assert not (root.path / "x.bin").exists()
