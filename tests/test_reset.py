"""Stateless reset: a restarted server tells a client at once that its connection is gone."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run

import qsftp
from qsftp import trust
from qsftp.errors import TransportError
from qsftp.reset import (
    MIN_RESET_SIZE,
    RESETS_PER_SECOND,
    TOKEN_SIZE,
    StatelessReset,
    is_stateless_reset,
)

ROOT = Path(__file__).resolve().parents[1]
CID = bytes(range(8))


def _short_packet(size: int, cid: bytes = CID) -> bytes:
    return bytes([0x41]) + cid + os.urandom(size - 1 - len(cid))


def test_tokens_depend_on_the_key_and_the_connection_id_only() -> None:
    one, same, other = StatelessReset(b"key"), StatelessReset(b"key"), StatelessReset(b"other")
    assert one.token(CID) == same.token(CID)  # a restarted server computes the same token
    assert len(one.token(CID)) == TOKEN_SIZE
    assert one.token(CID) != other.token(CID)
    assert one.token(CID) != one.token(CID[::-1])


def test_a_reset_is_a_smaller_short_header_packet_ending_with_the_token() -> None:
    reset = StatelessReset(b"key")
    trigger = _short_packet(1200)
    packet = reset.packet_for(trigger, len(CID))
    assert packet is not None
    assert MIN_RESET_SIZE <= len(packet) < len(trigger)
    assert packet[0] & 0xC0 == 0x40
    assert packet.endswith(reset.token(CID))
    assert is_stateless_reset(packet, [None, reset.token(CID)])
    assert not is_stateless_reset(packet, [StatelessReset(b"other").token(CID)])


def test_no_reset_for_long_headers_tiny_packets_or_beyond_the_rate_limit() -> None:
    reset = StatelessReset(b"key")
    assert reset.packet_for(b"\xc0" + os.urandom(1199), len(CID)) is None  # long header
    assert reset.packet_for(_short_packet(MIN_RESET_SIZE), len(CID)) is None  # cannot shrink
    answered = sum(
        reset.packet_for(_short_packet(100), len(CID)) is not None
        for _ in range(RESETS_PER_SECOND * 3)
    )
    # At most one second's allowance, plus the next second's if the clock ticked meanwhile.
    assert RESETS_PER_SECOND <= answered <= 2 * RESETS_PER_SECOND


# qh3 is an optional extra: its client is checked when it is installed.
CLIENT_ENGINES = ["aioquic"] + (["qh3"] if importlib.util.find_spec("qh3") else [])


def _server(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qsftp.server",
            "--port",
            str(port),
            "--root",
            str(tmp_path / "root"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    assert "ready" in process.stdout.readline()
    return process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("client_engine", CLIENT_ENGINES)
@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "same-server"])
def test_a_client_of_a_restarted_server_learns_at_its_next_packet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restart: bool, client_engine: str
) -> None:
    """Both client engines recognise the (aioquic) server's reset: aioquic by the token of
    the connection ID in use, qh3 by the one in the server's transport parameters."""
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(tmp_path / "config"))
    port = _free_port()
    servers = [_server(tmp_path, port)]

    async def body() -> str:
        certificate = trust.load_certificate(tmp_path / "state" / "server-cert.pem")
        async with qsftp.connect(
            "127.0.0.1", port, pin=trust.fingerprint(certificate), engine=client_engine
        ) as conn:
            await conn.stat("")
            if restart:  # before the client sends anything more: no ICMP error to notice
                servers[0].send_signal(signal.SIGKILL)
                servers[0].wait(10)
                servers.append(_server(tmp_path, port))
            try:
                # Without the reset this waits for the 60 s idle timeout.
                async with asyncio.timeout(20):
                    entry = await conn.stat("")
            except TransportError as exc:
                return str(exc)
            return f"served {entry.kind}"

    try:
        outcome = run(body)
    finally:
        for server in servers:
            server.terminate()
            server.wait(20)
    if restart:
        assert "stateless reset" in outcome
    else:  # the reset check never mistakes the live server's packets for one
        assert outcome.startswith("served")
