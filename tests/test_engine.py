"""The qh3 engine next to aioquic: every pairing interoperates, trust works, limits are said.

Real servers and clients over loopback UDP; the CLI test runs real subprocesses. Tests that
need qh3 skip (with the reason) when it is not importable; the engine selection rules are
tested either way.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import make_file, sha256, subprocess_env

import qsftp
from qsftp.engine import AIOQUIC, ENGINES, get_engine
from qsftp.errors import TrustError, UsageError
from qsftp.trust import ensure_self_signed

REPO = Path(__file__).resolve().parent.parent
HAVE_QH3 = importlib.util.find_spec("qh3") is not None
needs_qh3 = pytest.mark.skipif(not HAVE_QH3, reason="qh3 is not installed (pip install qsftp[qh3])")
PAIRS = [(server, client) for server in ENGINES for client in ENGINES]
# Bounds that only keep a broken build from hanging the suite.
TIMEOUT = 60.0
READY_TIMEOUT = 20.0
CLIENT_TIMEOUT = 30.0
READY = re.compile(r"ready on (?P<host>\S+):(?P<port>\d+), .*sha256:(?P<fp>[0-9a-f]{64})")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("STATE", "CONFIG", "CACHE"):
        monkeypatch.setenv(f"QSFTP_{name}_DIR", str(tmp_path / name.lower()))


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(body(), TIMEOUT)

    return asyncio.run(bounded())


# --- engine selection (no qh3 needed) ----------------------------------------------------------


def test_default_engine_is_aioquic() -> None:
    assert get_engine() is AIOQUIC
    assert get_engine("aioquic") is AIOQUIC


def test_unknown_engine_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown engine 'quiche'"):
        get_engine("quiche")


def test_missing_qh3_says_which_extra_to_install() -> None:
    """A process that cannot import qh3 gets a UsageError naming the extra, not an
    ImportError; simulated in a child process by blocking the import."""
    code = (
        "import sys; sys.modules['qh3'] = None\n"
        "from qsftp.engine import get_engine\n"
        "from qsftp.errors import UsageError\n"
        "try:\n"
        "    get_engine('qh3')\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "engine qh3 needs `pip install qsftp[qh3]`" in proc.stdout


# --- all four pairings ---------------------------------------------------------------------


@needs_qh3
@pytest.mark.parametrize(("server_engine", "client_engine"), PAIRS)
def test_every_engine_pairing_uploads_downloads_and_lists_identical_bytes(
    tmp_path: Path, server_engine: str, client_engine: str
) -> None:
    src = make_file(tmp_path / "src" / "data.bin", 3 * 1024 * 1024 + 17, seed=7)
    back = tmp_path / "back.bin"

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", engine=server_engine) as server:
            assert server.engine == server_engine
            async with qsftp.connect(
                server.host, server.port, pin=server.fingerprint, engine=client_engine
            ) as conn:
                assert conn.trust.how == "pin"
                assert conn.engine == client_engine
                assert conn.server.endswith(f", {server_engine})")  # the server says so
                up = await conn.upload(src, "dir/data.bin")
                down = await conn.download("dir/data.bin", back)
                entries = await conn.listdir("dir")
        assert up.verified and down.verified
        assert up.engine == down.engine == client_engine
        assert up.sha256 == down.sha256 == sha256(src)
        assert (tmp_path / "root" / "dir" / "data.bin").read_bytes() == src.read_bytes()
        assert back.read_bytes() == src.read_bytes()
        assert [(e.name, e.kind, e.size) for e in entries] == [
            ("dir/data.bin", "file", src.stat().st_size)
        ]

    run(body)


@needs_qh3
@pytest.mark.parametrize(("server_engine", "client_engine"), PAIRS)
def test_session_tickets_resume_in_every_engine_pairing(
    tmp_path: Path, server_engine: str, client_engine: str
) -> None:
    """A ticket from the first connection resumes the second (no certificate), the trust
    decision comes from the identity stored with it, and the upload stays verified; a ticket
    received with one engine also resumes on the other (one ticket form in the cache)."""
    src = make_file(tmp_path / "f.bin", 100_000, seed=3)

    async def body() -> list[tuple[bool, str, str]]:
        cache = qsftp.TicketCache()
        seen = []
        async with qsftp.serve(tmp_path / "root", engine=server_engine) as server:
            for engine in (client_engine, client_engine, _other(client_engine)):
                async with qsftp.connect(
                    server.host, server.port, pin=server.fingerprint, tickets=cache, engine=engine
                ) as conn:
                    result = await conn.upload(src, "f.bin")
                    assert result.verified and result.sha256 == sha256(src)
                    seen.append((conn.session_resumed, conn.trust.how, conn.fingerprint))
            assert server.tickets is not None and server.tickets.resumed == 2
            assert {fp for _, _, fp in seen} == {server.fingerprint}
        return seen

    seen = run(body)
    assert [resumed for resumed, _, _ in seen] == [False, True, True]
    assert [how for _, how, _ in seen] == ["pin", "pin", "pin"]


def _other(engine: str) -> str:
    return next(name for name in ENGINES if name != engine)


def test_an_engine_with_transport_tcp_is_a_usage_error(tmp_path: Path) -> None:
    """The engine is the QUIC library: TCP has none, so naming one there is a mistake."""

    async def body() -> None:
        with pytest.raises(UsageError, match="engine"):
            async with qsftp.serve(tmp_path / "root", transport="tcp", engine="qh3"):
                pass
        async with qsftp.serve(tmp_path / "root", transport="tcp") as server:
            with pytest.raises(UsageError, match="engine"):
                async with qsftp.connect(
                    server.host, server.port, transport="tcp", engine="aioquic"
                ):
                    pass
            async with qsftp.connect(server.host, server.port, transport="tcp") as conn:
                assert conn.engine == ""
                assert conn.server.endswith(", tcp)")

    run(body)


@needs_qh3
@pytest.mark.parametrize("server_engine", ENGINES)
def test_wrong_pin_is_refused_by_a_qh3_client(tmp_path: Path, server_engine: str) -> None:
    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", engine=server_engine) as server:
            wrong = "0" * 64
            assert server.fingerprint != wrong
            with pytest.raises(TrustError, match="does not match the pin"):
                async with qsftp.connect(server.host, server.port, pin=wrong, engine="qh3"):
                    pass

    run(body)


@needs_qh3
@pytest.mark.parametrize("server_engine", ENGINES)
def test_a_freshly_generated_certificate_is_a_qh3_clients_cafile(
    tmp_path: Path, server_engine: str
) -> None:
    """qh3 takes a self-issued certificate as a trust anchor only without a TLS EKU, which
    ensure_self_signed therefore leaves out (docs/QH3-ENGINE.md)."""
    state = tmp_path / "fresh-state"

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", state_dir=state, engine=server_engine) as server:
            assert server.certfile.parent == state  # generated by this test
            async with qsftp.connect(
                "localhost", server.port, cafile=server.certfile, engine="qh3"
            ) as conn:
                assert conn.trust.how == "cafile"
                assert conn.fingerprint == server.fingerprint
                assert await conn.listdir() == []

    run(body)


@needs_qh3
def test_a_qh3_client_refuses_a_certificate_its_cafile_does_not_vouch_for(
    tmp_path: Path,
) -> None:
    other, _ = ensure_self_signed(tmp_path / "other")

    async def body() -> None:
        async with qsftp.serve(tmp_path / "root", engine="qh3") as server:
            with pytest.raises(TrustError, match="not trusted by"):
                async with qsftp.connect("localhost", server.port, cafile=other, engine="qh3"):
                    pass

    run(body)


@needs_qh3
def test_reno_is_refused_on_qh3_which_only_runs_cubic(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(UsageError, match="engine qh3 offers congestion control cubic"):
            async with qsftp.serve(tmp_path / "r1", engine="qh3", congestion_control="reno"):
                pass
        async with qsftp.serve(tmp_path / "r2", engine="aioquic") as server:
            with pytest.raises(UsageError, match="not 'reno'"):
                async with qsftp.connect(
                    server.host,
                    server.port,
                    pin=server.fingerprint,
                    engine="qh3",
                    congestion_control="reno",
                ):
                    pass
            async with qsftp.connect(
                server.host, server.port, pin=server.fingerprint, engine="qh3"
            ) as conn:
                assert conn.congestion_control == "cubic"

    run(body)


@needs_qh3
def test_a_qh3_client_fails_fast_on_a_refused_port(tmp_path: Path) -> None:
    """qh3's first flight is two datagrams; the ICMP error for the first can arrive before
    the client waits for the handshake, and must still end it at once."""

    async def body() -> float:
        async with qsftp.serve(tmp_path / "root", engine="qh3") as server:
            port = server.port
        started = time.perf_counter()
        with pytest.raises(qsftp.TransportError, match="refused"):
            async with qsftp.connect("127.0.0.1", port, insecure=True, engine="qh3", timeout=30):
                pass
        return time.perf_counter() - started

    elapsed = run(body)
    assert elapsed < 30  # the connect timeout was not what ended it


@needs_qh3
def test_a_qh3_client_does_not_cap_the_datagrams_a_server_may_send_it() -> None:
    """qh3 2.1 hard-codes max_udp_payload_size=1472 in a client's transport parameters; the
    engine leaves the parameter out (as aioquic does) while servers keep theirs."""
    get_engine("qh3")
    from qh3._hazmat import Buffer
    from qh3.quic import tls_bridge
    from qh3.quic.packet import QuicTransportParameters, pull_quic_transport_parameters

    def round_trip(parameters: QuicTransportParameters) -> QuicTransportParameters:
        buf = Buffer(capacity=4096)
        tls_bridge.push_quic_transport_parameters(buf, parameters)
        return pull_quic_transport_parameters(Buffer(data=buf.data))

    client = round_trip(QuicTransportParameters(max_udp_payload_size=1472))
    server = round_trip(
        QuicTransportParameters(max_udp_payload_size=1472, original_destination_connection_id=b"x")
    )
    assert client.max_udp_payload_size is None
    assert server.max_udp_payload_size == 1472


@needs_qh3
def test_qlog_files_are_written_for_qh3_connections(tmp_path: Path) -> None:
    async def body() -> str | None:
        async with qsftp.serve(tmp_path / "root", engine="qh3", qlog_dir=tmp_path / "sq") as srv:
            conn = qsftp.connect(
                srv.host, srv.port, pin=srv.fingerprint, engine="qh3", qlog_dir=tmp_path / "cq"
            )
            async with conn as connection:
                await connection.listdir()
                return connection.qlog_path

    path = run(body)
    assert path is not None and Path(path).exists()
    assert list((tmp_path / "sq").glob("*.qlog"))


# --- command line -----------------------------------------------------------------------------


def _ready_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    deadline = time.perf_counter() + READY_TIMEOUT
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.perf_counter()
        assert remaining > 0, f"no ready line in time; got {buffer!r}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"server exited ({proc.poll()}) before its ready line"
            buffer += chunk
    return buffer.decode().splitlines()[0]


@pytest.fixture
def qh3_server(tmp_path: Path) -> Iterator[tuple[str, int, str, Path]]:
    if not HAVE_QH3:
        pytest.skip("qh3 is not installed (pip install qsftp[qh3])")
    root = tmp_path / "served"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsftp.server", "--engine", "qh3", "--port=0", f"--root={root}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(tmp_path / "server"),
        cwd=tmp_path,
    )
    try:
        match = READY.search(_ready_line(proc))
        assert match is not None
        yield match["host"], int(match["port"]), match["fp"], root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _client(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qsftp.client", *args],
        env=subprocess_env(tmp_path / "client"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )


def test_cli_engine_qh3_uploads_and_an_aioquic_cli_downloads_it_back(
    tmp_path: Path, qh3_server: tuple[str, int, str, Path]
) -> None:
    host, port, fp, root = qh3_server
    src = make_file(tmp_path / "cli.bin", 600_000, seed=3)
    where = ["--host", host, "--port", str(port), "--pin", fp]
    up = _client(tmp_path, str(src), *where, "--engine", "qh3", "--json")
    assert up.returncode == 0, up.stderr
    assert '"verified": true' in up.stdout
    assert (root / "cli.bin").read_bytes() == src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    down = _client(tmp_path, "--get", "cli.bin", "-o", str(out), *where, "--engine", "aioquic")
    assert down.returncode == 0, down.stderr
    assert (out / "cli.bin").read_bytes() == src.read_bytes()


def test_cli_rejects_an_unknown_engine(tmp_path: Path) -> None:
    proc = _client(tmp_path, "--list", "--engine", "quiche")
    assert proc.returncode == 2
    assert "invalid choice: 'quiche'" in proc.stderr


# --- sweeps -----------------------------------------------------------------------------------


@needs_qh3
def test_a_sweep_over_engines_has_an_engine_column(tmp_path: Path) -> None:
    from qsftp.experiment import sweep

    async def body() -> Any:
        return await sweep(
            sizes=["200KB"],
            repeats=1,
            direction="both",
            engine=["aioquic", "qh3"],
            warmup=False,
            seed=5,
            progress=False,
            files_dir=tmp_path / "files",
        )

    df = run(body)
    assert (df["error"] == "").all(), df["error"].tolist()
    assert df["verified"].all()
    assert sorted(df["engine"]) == ["aioquic", "aioquic", "qh3", "qh3"]
    cubic = df[df["engine"] == "qh3"]["congestion_control"]
    assert (cubic == "cubic").all()
    assert "qh3" in df.attrs["server_software"] and "aioquic" in df.attrs["server_software"]


@needs_qh3
def test_engines_transports_and_handshakes_are_dimensions_together(tmp_path: Path) -> None:
    """QUIC rows multiply by engine and handshake mode; TCP rows have no engine and are not
    multiplied by it; resumed rows resume on both engines."""
    from qsftp.experiment import sweep

    async def body() -> tuple[Any, Any]:
        mixed = await sweep(
            sizes=["100KB"],
            repeats=1,
            engine=["aioquic", "qh3"],
            transport=["quic", "tcp"],
            handshake=["fresh", "reused"],
            warmup=False,
            seed=3,
            progress=False,
            files_dir=tmp_path / "files",
        )
        resumed = await sweep(
            sizes=["100KB"],
            repeats=2,
            engine=["aioquic", "qh3"],
            handshake="resumed",
            warmup=False,
            seed=4,
            progress=False,
            files_dir=tmp_path / "files",
        )
        return mixed, resumed

    mixed, resumed = run(body)
    assert (mixed["error"] == "").all(), mixed["error"].tolist()
    assert mixed["verified"].all()
    combos = sorted(zip(mixed["transport"], mixed["engine"], mixed["handshake"], strict=True))
    assert combos == [
        ("quic", "aioquic", "fresh"),
        ("quic", "aioquic", "reused"),
        ("quic", "qh3", "fresh"),
        ("quic", "qh3", "reused"),
        ("tcp", "", "fresh"),
        ("tcp", "", "reused"),
    ]
    assert (resumed["error"] == "").all(), resumed["error"].tolist()
    assert sorted(resumed["engine"]) == ["aioquic", "aioquic", "qh3", "qh3"]
    assert resumed["session_resumed"].all()
