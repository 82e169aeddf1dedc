"""The command-line tools as a user runs them: real subprocesses over loopback UDP.

``python -m qsftp.server`` and ``python -m qsftp.client`` run as child processes with every
default location (state dir, config dir, known hosts, HOME) pointed into pytest's tmp dirs, so
nothing touches the real home directory. Each wait is bounded, and every server started here
is terminated through its Popen object by a fixture finalizer.

Most tests share one anonymous loopback server and one token-protected server (module
scope); each test gets its own known_hosts file and uses remote names no other test uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qsftp import trust

REPO = Path(__file__).resolve().parent.parent
# A server prints its ready line within ~0.5 s (imports + certificate); a client run takes
# ~0.5 s. These bounds only keep a broken build from hanging the suite.
READY_TIMEOUT = 20.0
CLIENT_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
# A refused connection must fail on the ICMP error, far below the client's 10 s timeout.
FAIL_FAST_SECONDS = 5.0

EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_TRUST = 4
EXIT_AUTH = 5
EXIT_LOCAL_FILE = 6
EXIT_BAD_PATH = 7
EXIT_NOT_FOUND = 8

TOKEN = "s3cret"
READY = re.compile(
    r"^qsftp server ready on (?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+), "
    r"transport (?P<transport>\S+), root (?P<root>.+), certificate sha256:(?P<fp>[0-9a-f]{64})$"
)
# Python's warning when `-m pkg.mod` runs a module the package __init__ already imported.
RUNPY_WARNING = "found in sys.modules after import of package"


# --- helpers ----------------------------------------------------------------------------------


def isolated_env(base: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process whose default locations all live under ``base``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(
        PYTHONPATH=str(REPO),
        HOME=str(base / "home"),
        QSFTP_STATE_DIR=str(base / "state"),
        QSFTP_CONFIG_DIR=str(base / "config"),
        QSFTP_KNOWN_HOSTS=str(base / "known_hosts"),
    )
    env.update(extra)
    return env


@dataclass
class Server:
    """A running ``python -m qsftp.server`` and what its ready line said."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    root: Path
    fingerprint: str
    state_dir: Path
    leftover: bytes = b""
    transport: str = "quic"


def read_line(proc: subprocess.Popen[bytes], buffer: bytearray, deadline: float) -> bytes:
    """One line of ``proc``'s stdout, waiting no later than ``deadline`` (perf_counter)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while b"\n" not in buffer:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise AssertionError(f"no complete line within the deadline; got {bytes(buffer)!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(
                    f"stdout closed (exit {proc.poll()}) before a line; got {bytes(buffer)!r}"
                )
            buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (ours) and reap it; kill it if SIGTERM is ignored."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class ServerFactory:
    """Starts servers and remembers them so the fixture finalizer can stop them all."""

    base: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __call__(self, *args: str, name: str = "server", state_dir: Path | None = None) -> Server:
        work = self.base / name
        work.mkdir(parents=True, exist_ok=True)
        state = state_dir if state_dir is not None else work / "state"
        env = isolated_env(work, QSFTP_STATE_DIR=str(state))
        argv = [sys.executable, "-m", "qsftp.server", "--port", "0", "--root", str(work / "root")]
        with open(work / "stderr.txt", "ab") as stderr:
            proc = subprocess.Popen(
                [*argv, *args], stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=work
            )
        self.started.append(proc)
        buffer = bytearray()
        line = read_line(proc, buffer, time.perf_counter() + READY_TIMEOUT).decode()
        match = READY.match(line)
        assert match, f"unexpected ready line {line!r}"
        return Server(
            proc=proc,
            host=match["host"],
            port=int(match["port"]),
            root=Path(match["root"]),
            fingerprint=match["fp"],
            state_dir=state,
            leftover=bytes(buffer),
            transport=match["transport"],
        )

    def stop_all(self) -> None:
        for proc in self.started:
            stop(proc)


def run_client(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = CLIENT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qsftp.client", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    """Exit ``status``, exactly one ``qsftp: error:`` line, no traceback; return that line."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("qsftp: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def free_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    """One anonymous loopback server shared by the tests that do not care."""
    return module_servers(name="open")


@pytest.fixture(scope="module")
def token_server(module_servers: ServerFactory) -> Server:
    return module_servers("--token", TOKEN, name="token")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Servers a test starts (and may stop) itself; whatever still runs is terminated."""
    factory = ServerFactory(tmp_path / "servers")
    yield factory
    factory.stop_all()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A client environment with this test's own known_hosts file."""
    return isolated_env(tmp_path)


@pytest.fixture
def client(
    server: Server, env: dict[str, str], tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``client(*args)``: the CLI against the shared server, run in tmp_path."""

    def run(*args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
        the_port = server.port if port is None else port
        return run_client(
            "--host", server.host, "--port", str(the_port), *args, env=env, cwd=tmp_path
        )

    return run


# --- the server -------------------------------------------------------------------------------


def test_server_ready_line_gives_address_absolute_root_and_fingerprint(server: Server) -> None:
    assert server.host == "127.0.0.1"
    assert 0 < server.port < 65536
    assert server.root.is_absolute()
    assert server.root.is_dir()
    cert = trust.load_certificate(server.state_dir / trust.CERT_FILENAME)
    assert server.fingerprint == trust.fingerprint(cert)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_stops_cleanly_on_signal(start_server: ServerFactory, signum: int) -> None:
    running = start_server()
    started = time.perf_counter()
    running.proc.send_signal(signum)
    out, _ = running.proc.communicate(timeout=STOP_TIMEOUT)
    elapsed = time.perf_counter() - started
    assert running.proc.returncode == 0
    assert "qsftp server stopped" in (running.leftover + out).decode()
    assert elapsed < 3.0
    stderr = (start_server.base / "server" / "stderr.txt").read_text()
    assert "Traceback" not in stderr


def test_server_reuses_its_generated_certificate(start_server: ServerFactory) -> None:
    state = start_server.base / "shared-state"
    first = start_server(name="first", state_dir=state)
    stop(first.proc)
    second = start_server(name="second", state_dir=state)
    assert second.fingerprint == first.fingerprint


def test_server_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qsftp.server", "--host", "0.0.0.0", "--port", "0"],
        env=isolated_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("qsftp-server: error:")
    ]
    assert len(errors) == 1, result.stderr
    assert "token" in errors[0]
    assert "--allow-anonymous" in errors[0]
    assert result.stdout == ""


def test_server_serves_non_loopback_with_allow_anonymous(start_server: ServerFactory) -> None:
    running = start_server("--host", "0.0.0.0", "--allow-anonymous")
    assert running.host == "0.0.0.0"
    assert running.proc.poll() is None


# --- uploads ----------------------------------------------------------------------------------


def test_upload_trusts_new_server_on_first_use_and_stores_identical_bytes(
    client: Callable[..., subprocess.CompletedProcess[str]],
    server: Server,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    local = write(tmp_path / "first-use.bin", os.urandom(300_000))
    result = client(str(local))
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert "trusting new server" in result.stderr
    assert env["QSFTP_KNOWN_HOSTS"] in result.stderr
    assert (server.root / "first-use.bin").read_bytes() == local.read_bytes()
    assert server.fingerprint in Path(env["QSFTP_KNOWN_HOSTS"]).read_text()
    assert not list(server.root.rglob("*.qsftp-part"))


def test_upload_json_prints_one_object_per_transfer(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    first = write(tmp_path / "json-a.bin", os.urandom(5000))
    second = write(tmp_path / "json-b.bin", b"")
    result = client("--json", str(first), str(second))
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(records) == {"json-a.bin", "json-b.bin"}
    for path in (first, second):
        record = records[path.name]
        assert {"name", "size", "seconds", "mb_s", "sha256", "verified"} <= record.keys()
        assert record["verified"] is True
        assert record["size"] == path.stat().st_size
        assert record["sha256"] == sha256(path)
        assert record["seconds"] >= 0


def test_upload_many_files_and_a_tree_keeps_relative_paths(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server, tmp_path: Path
) -> None:
    loose = write(tmp_path / "many-loose.txt", b"loose\n")
    tree = tmp_path / "many-tree"
    files = {
        "top.txt": b"top\n",
        "sub/inner.bin": os.urandom(70_000),
        "sub/deeper/leaf.txt": b"leaf\n",
    }
    for rel, data in files.items():
        write(tree / rel, data)
    result = client("--json", str(loose), str(tree))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + len(files)
    assert (server.root / "many-loose.txt").read_bytes() == b"loose\n"
    for rel, data in files.items():
        assert (server.root / "many-tree" / rel).read_bytes() == data


def test_upload_as_renames_one_file(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server, tmp_path: Path
) -> None:
    local = write(tmp_path / "local-name.txt", b"renamed\n")
    result = client("--as", "renamed/remote-name.txt", str(local))
    assert result.returncode == 0, result.stderr
    assert (server.root / "renamed" / "remote-name.txt").read_bytes() == b"renamed\n"
    assert not (server.root / "local-name.txt").exists()


# --- downloads and listings -------------------------------------------------------------------


def test_get_downloads_a_file_identical_to_the_servers(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    write(server.root / "get-one.bin", data)
    dest = tmp_path / "downloaded.bin"
    result = client("--get", "get-one.bin", "-o", str(dest))
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert dest.read_bytes() == data
    assert not list(tmp_path.rglob("*.qsftp-part"))


def test_get_directory_downloads_the_tree(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server, tmp_path: Path
) -> None:
    files = {"a.txt": b"a\n", "sub/b.bin": os.urandom(10_000), "sub/c/d.txt": b"d\n"}
    for rel, data in files.items():
        write(server.root / "get-tree" / rel, data)
    dest = tmp_path / "out"
    dest.mkdir()
    result = client("--get", "get-tree", "-o", str(dest))
    assert result.returncode == 0, result.stderr
    for rel, data in files.items():
        assert (dest / "get-tree" / rel).read_bytes() == data


def test_list_prints_root_and_directory_entries(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server
) -> None:
    write(server.root / "list-dir" / "entry.txt", b"12345")
    write(server.root / "list-dir" / "nested" / "x.txt", b"x")

    top = client("--list")
    assert top.returncode == 0, top.stderr
    assert any(line.endswith("list-dir/") for line in top.stdout.splitlines())

    inside = client("--list", "list-dir")
    assert inside.returncode == 0, inside.stderr
    lines = inside.stdout.splitlines()
    entry = next(line for line in lines if line.endswith("entry.txt"))
    assert entry.split()[0] == "5"
    assert any(line.endswith("nested/") for line in lines)
    assert not any(line.endswith("list-dir/") for line in lines)


# --- trust ------------------------------------------------------------------------------------


def test_wrong_pin_is_a_trust_failure(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    local = write(tmp_path / "pin-wrong.txt", b"x")
    result = client("--pin", "0" * 64, str(local))
    assert "pin" in assert_one_error(result, EXIT_TRUST)


def test_right_pin_from_the_ready_line_is_trusted(
    client: Callable[..., subprocess.CompletedProcess[str]],
    server: Server,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    local = write(tmp_path / "pin-right.txt", b"x")
    result = client("--pin", f"sha256:{server.fingerprint}", str(local))
    assert result.returncode == 0, result.stderr
    assert not Path(env["QSFTP_KNOWN_HOSTS"]).exists()  # a pin bypasses known hosts


def test_cafile_of_another_certificate_is_a_trust_failure(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    other_cert, _ = trust.ensure_self_signed(tmp_path / "other")
    local = write(tmp_path / "ca-wrong.txt", b"x")
    result = client("--cafile", str(other_cert), str(local))
    assert_one_error(result, EXIT_TRUST)


def test_cafile_of_the_servers_certificate_is_trusted(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server, tmp_path: Path
) -> None:
    local = write(tmp_path / "ca-right.txt", b"x")
    result = client("--cafile", str(server.state_dir / trust.CERT_FILENAME), str(local))
    assert result.returncode == 0, result.stderr
    assert (server.root / "ca-right.txt").read_bytes() == b"x"


def test_known_hosts_mismatch_is_a_trust_failure_naming_the_file(
    client: Callable[..., subprocess.CompletedProcess[str]],
    server: Server,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    known_hosts = Path(env["QSFTP_KNOWN_HOSTS"])
    known_hosts.write_text(f"127.0.0.1:{server.port} {'ab' * 32}\n")
    local = write(tmp_path / "kh-mismatch.txt", b"x")
    result = client(str(local))
    assert str(known_hosts) in assert_one_error(result, EXIT_TRUST)
    assert not (server.root / "kh-mismatch.txt").exists()
    assert known_hosts.read_text() == f"127.0.0.1:{server.port} {'ab' * 32}\n"


def test_insecure_connects_with_a_warning(
    client: Callable[..., subprocess.CompletedProcess[str]],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    local = write(tmp_path / "insecure.txt", b"x")
    result = client("--insecure", str(local))
    assert result.returncode == 0, result.stderr
    assert "insecure" in result.stderr
    assert not Path(env["QSFTP_KNOWN_HOSTS"]).exists()


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "extra_env", "status"),
    [
        ((), {}, EXIT_AUTH),
        (("--token", "wrong"), {}, EXIT_AUTH),
        (("--token", TOKEN), {}, 0),
        ((), {"QSFTP_TOKEN": TOKEN}, 0),
    ],
    ids=["missing", "wrong", "right", "right-from-env"],
)
def test_token_server_admits_only_the_right_token(
    token_server: Server,
    tmp_path: Path,
    args: tuple[str, ...],
    extra_env: dict[str, str],
    status: int,
) -> None:
    local = write(tmp_path / f"token-{os.urandom(4).hex()}.txt", b"t")
    argv = ["--port", str(token_server.port), *args, str(local)]
    result = run_client(*argv, env=isolated_env(tmp_path, **extra_env), cwd=tmp_path)
    if status:
        assert "token" in assert_one_error(result, status)
        assert not (token_server.root / local.name).exists()
    else:
        assert result.returncode == 0, result.stderr
        assert (token_server.root / local.name).read_bytes() == b"t"


# --- exit statuses of failures ----------------------------------------------------------------


def test_connection_refused_fails_fast(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    local = write(tmp_path / "refused.txt", b"x")
    started = time.perf_counter()
    result = client(str(local), port=free_udp_port())
    elapsed = time.perf_counter() - started
    assert "refused" in assert_one_error(result, EXIT_CONNECT)
    assert elapsed < FAIL_FAST_SECONDS


def test_silent_port_times_out(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    local = write(tmp_path / "silent.txt", b"x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.perf_counter()
        result = client("--timeout", "1", str(local), port=silent.getsockname()[1])
        elapsed = time.perf_counter() - started
    assert "no answer" in assert_one_error(result, EXIT_CONNECT)
    assert elapsed < FAIL_FAST_SECONDS


def test_missing_local_file_is_a_local_file_error(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    result = client(str(tmp_path / "does-not-exist.txt"))
    assert "does-not-exist.txt" in assert_one_error(result, EXIT_LOCAL_FILE)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_unsafe_remote_name_is_a_bad_path_and_writes_nothing(
    client: Callable[..., subprocess.CompletedProcess[str]],
    server: Server,
    tmp_path: Path,
    kind: str,
) -> None:
    local = write(tmp_path / f"unsafe-{kind}.txt", b"escape")
    target = tmp_path / "escaped.txt"
    remote = "../escaped.txt" if kind == "dotdot" else str(target)
    before = sorted(server.root.parent.rglob("*"))
    result = client("--as", remote, str(local))
    assert_one_error(result, EXIT_BAD_PATH)
    assert not target.exists()
    assert not (server.root.parent / "escaped.txt").exists()
    assert sorted(server.root.parent.rglob("*")) == before


@pytest.mark.parametrize("mode", ["--get", "--list"])
def test_missing_remote_name_is_not_found(
    client: Callable[..., subprocess.CompletedProcess[str]], mode: str
) -> None:
    """The server's ERROR reaches the client even though it stops the stream right after."""
    result = client(mode, "nothing-here")
    assert "nothing-here" in assert_one_error(result, EXIT_NOT_FOUND)


def test_upload_through_a_symlink_out_of_the_root_is_refused_by_the_server(
    client: Callable[..., subprocess.CompletedProcess[str]], server: Server, tmp_path: Path
) -> None:
    """The client cannot see the link, so this is the server's check, answered mid-upload."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (server.root / "escape-link").symlink_to(outside, target_is_directory=True)
    local = write(tmp_path / "via-link.bin", os.urandom(500_000))
    result = client("--as", "escape-link/via-link.bin", str(local))
    assert_one_error(result, EXIT_BAD_PATH)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [(), ("--as", "x", "a", "b"), ("a", "--get", "b"), ("--pin", "0" * 64, "--insecure", "a")],
    ids=["no-mode", "as-with-two-files", "two-modes", "two-trust-modes"],
)
def test_usage_errors_exit_2(tmp_path: Path, env: dict[str, str], args: tuple[str, ...]) -> None:
    result = run_client(*args, env=env, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --- stderr hygiene ---------------------------------------------------------------------------


def test_cli_modules_run_without_runpy_warning(
    client: Callable[..., subprocess.CompletedProcess[str]], module_servers: ServerFactory
) -> None:
    """``python -m qsftp.client`` must not be imported by the package before it runs."""
    result = client("--list")
    assert result.returncode == 0, result.stderr
    assert RUNPY_WARNING not in result.stderr
    assert RUNPY_WARNING not in (module_servers.base / "open" / "stderr.txt").read_text()


@pytest.mark.parametrize("case", ["refused", "timeout", "wrong-pin"])
def test_failed_connection_leaves_no_asyncio_noise(
    client: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, case: str
) -> None:
    """A failed connect prints its one error line, not asyncio's "Future exception was never
    retrieved" report of a future the client abandoned."""
    local = write(tmp_path / f"noise-{case}.txt", b"x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        if case == "refused":
            result = client(str(local), port=free_udp_port())
        elif case == "timeout":
            result = client("--timeout", "0.5", str(local), port=silent.getsockname()[1])
        else:
            result = client("--pin", "0" * 64, str(local))
    assert result.returncode in (EXIT_CONNECT, EXIT_TRUST), result.stderr
    assert "never retrieved" not in result.stderr


def test_no_partial_files_left_in_the_shared_root(server: Server) -> None:
    """Runs last in this module: every upload above committed or cleaned up."""
    assert server.proc.poll() is None
    assert not list(server.root.rglob("*.qsftp-part"))


def test_server_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    """--workers N runs N processes on one port (SO_REUSEPORT); a striped upload through
    them assembles one verified file; SIGTERM stops every worker."""
    env = _worker_env(tmp_path)
    root = tmp_path / "wroot"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qsftp.server",
            "--port",
            "0",
            "--root",
            str(root),
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        ready = _read_line(server.stdout, 30)
        assert "2 workers" in ready, ready
        port = int(re.search(r":(\d+),", ready).group(1))  # type: ignore[union-attr]
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom((9 << 20) + 3))
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "qsftp.client",
                str(src),
                "--port",
                str(port),
                "--connections",
                "2",
                "--json",
                "--insecure",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert (root / "big.bin").read_bytes() == src.read_bytes()
        children = _children(server.pid)
        assert len(children) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0
    assert "stopped" in out
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def _worker_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(
        PYTHONPATH=str(REPO),
        QSFTP_STATE_DIR=str(tmp_path / "wstate"),
        QSFTP_CONFIG_DIR=str(tmp_path / "wconfig"),
        QSFTP_KNOWN_HOSTS=str(tmp_path / "wknown"),
        HOME=str(tmp_path),
    )
    return env


def _read_line(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no ready line in time"
    return str(stream.readline())


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]
