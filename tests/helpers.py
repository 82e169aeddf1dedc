"""Shared helpers for the tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qsftp import fs, wire

# The checkout: child processes import qsftp from here.
ROOT = Path(__file__).resolve().parents[1]

# Every asyncio test body is bounded: a hang fails instead of stalling CI.
TIMEOUT = 60


def run(body: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path.write_bytes(rng.randbytes(size))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(fs.PARTIAL_SUFFIX)]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Certificates, known hosts, tickets and generated test files go to the test's own
    directory, never to ~; no token from the caller's environment. A test module uses it by
    importing it."""
    monkeypatch.setenv("QSFTP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("QSFTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)
    monkeypatch.delenv("QSFTP_TOKEN", raising=False)


def decode_all(data: bytes) -> list[wire.Message]:
    """Every whole message in ``data``."""
    decoder = wire.Decoder()
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


# --- real processes ---------------------------------------------------------------------------


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a child process (server or client) whose state lives in ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        QSFTP_STATE_DIR=str(tmp_path / "pstate"),
        QSFTP_CONFIG_DIR=str(tmp_path / "pconfig"),
        HOME=str(tmp_path),
    )
    return env


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (for a server restarted on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(tmp_path: Path, port: int, root: Path, *options: str) -> subprocess.Popen[str]:
    """``python -m qsftp.server`` on ``port`` serving ``root``, once it says it is ready."""
    server = subprocess.Popen(
        [sys.executable, "-m", "qsftp.server", "--port", str(port), "--root", str(root), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(tmp_path),
    )
    assert server.stdout is not None
    assert "ready" in server.stdout.readline()
    return server


def resumable_client(port: int, *args: str) -> list[str]:
    """The command line of ``python -m qsftp.client ARGS`` with ``--resume --json`` to the
    server on ``port``, in 1200-byte datagrams and 1024-byte chunks (slow enough to be cut
    mid-transfer); its last output line is the JSON record."""
    return [
        sys.executable,
        "-m",
        "qsftp.client",
        *args,
        "--port",
        str(port),
        "--resume",
        "--json",
        "--insecure",
        "--max-datagram-size",
        "1200",
        "--chunk-size",
        "1024",
    ]


def client_record(tmp_path: Path, command: list[str]) -> dict[str, Any]:
    """Run a ``--json`` client command to its end (at most 120 s), check that it succeeded, and
    return its record (the last line it printed)."""
    done = subprocess.run(
        command,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return record


def start_client(tmp_path: Path, command: list[str]) -> subprocess.Popen[str]:
    """A ``--json`` client command started in the background, its output and errors piped:
    finish it with :func:`client_finished`, clean up with :func:`stop_processes`."""
    return subprocess.Popen(
        command,
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def client_finished(client: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """Wait (at most 120 s) for a client from :func:`start_client`, check that it succeeded,
    and return its record (the last line it printed) and what it wrote to stderr."""
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err
    record: dict[str, Any] = json.loads(out.splitlines()[-1])
    return record, err


def stop_processes(client: subprocess.Popen[str], server: subprocess.Popen[str]) -> None:
    """Kill ``client`` if it is still running, and terminate ``server``."""
    if client.poll() is None:
        client.kill()
        client.wait(10)
    server.terminate()
    server.wait(20)
