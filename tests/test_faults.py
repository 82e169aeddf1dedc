"""Faults through the emulated link: every transfer ends verified with identical bytes, or with
a clear error and no file under its name — never a wrong file."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from helpers import make_file, partials, run

import qsftp
from qsftp.netem import LinkEmulator, LinkProfile, StreamRelay

SIZE = 400_000


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSFTP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)


def _check(root: Path, name: str, src: Path, outcome: object) -> None:
    final = root / name
    if isinstance(outcome, qsftp.TransferResult):
        assert outcome.verified
        assert final.read_bytes() == src.read_bytes()
    else:
        assert isinstance(outcome, qsftp.QsftpError), outcome
        assert not final.exists() or final.read_bytes() == src.read_bytes()
    assert partials(root) == []


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param(LinkProfile(loss=0.01), id="loss-1%"),
        pytest.param(LinkProfile(loss=0.05), id="loss-5%"),
        pytest.param(LinkProfile(loss=0.10), id="loss-10%"),
        pytest.param(LinkProfile(delay_ms=5, reorder=0.10, duplicate=0.05), id="reorder-dup"),
        pytest.param(LinkProfile(corrupt=0.05), id="corrupt-5%"),
        pytest.param(LinkProfile.bursty(loss=0.03, burst=4), id="bursty-loss"),
    ],
)
def test_impaired_link_transfers_end_verified(tmp_path: Path, profile: LinkProfile) -> None:
    src = make_file(tmp_path / "f.bin", SIZE)
    root = tmp_path / "root"
    back = tmp_path / "back.bin"

    async def body() -> tuple[object, object]:
        async with (
            qsftp.serve(root) as server,
            LinkEmulator((server.host, server.port), profile=profile, seed=3) as link,
        ):
            options = {"pin": server.fingerprint, "max_datagram_size": 1200}
            up = await qsftp.upload(src, link.host, link.port, **options)
            down = await qsftp.download("f.bin", back, link.host, link.port, **options)
            return up, down

    up, down = run(body)
    _check(root, "f.bin", src, up)
    assert isinstance(down, qsftp.TransferResult) and back.read_bytes() == src.read_bytes()


async def _upload_disturbed(
    src: Path, root: Path, disturb: Callable[[LinkEmulator], Awaitable[None]]
) -> object:
    """Upload ``src`` through a 20 Mbit/s link and run ``disturb`` once bytes are moving."""
    async with qsftp.serve(root) as server:
        slow = LinkProfile(rate_mbps=20)
        async with LinkEmulator((server.host, server.port), profile=slow, seed=1) as link:
            started = asyncio.Event()

            def progress(_: int) -> None:
                started.set()

            async with qsftp.connect(
                link.host, link.port, pin=server.fingerprint, max_datagram_size=1200
            ) as conn:
                task = asyncio.ensure_future(conn.upload(src, progress=progress))
                await started.wait()
                await asyncio.sleep(0.2)
                await disturb(link)
                return await task


def test_a_blackout_of_two_seconds_mid_transfer_is_survived(tmp_path: Path) -> None:
    src = make_file(tmp_path / "f.bin", 2_000_000)
    root = tmp_path / "root"

    async def blackout(link: LinkEmulator) -> None:
        before = link.uplink
        link.uplink = link.downlink = LinkProfile(loss=1.0)
        await asyncio.sleep(2.0)
        link.uplink = link.downlink = before

    result = run(lambda: _upload_disturbed(src, root, blackout))
    _check(root, "f.bin", src, result)
    assert isinstance(result, qsftp.TransferResult)


def test_a_port_rebinding_mid_transfer_is_survived(tmp_path: Path) -> None:
    """The server sees the client arrive from a new source port (a NAT rebinding): QUIC
    validates the new path and the transfer goes on."""
    src = make_file(tmp_path / "f.bin", 2_000_000)
    root = tmp_path / "root"

    async def rebind(link: LinkEmulator) -> None:
        assert link.rebind() == 1

    result = run(lambda: _upload_disturbed(src, root, rebind))
    _check(root, "f.bin", src, result)
    assert isinstance(result, qsftp.TransferResult)


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_a_receive_window_smaller_than_a_round_trip_of_data_does_not_stall(
    tmp_path: Path, transport: str
) -> None:
    """With a 16 KiB window over a 25 ms link, one disk write holds most of the window: the
    receiver must return that credit when the write completes, not when more data arrives
    (none can; the transfer would wait for its idle timeout)."""
    src = make_file(tmp_path / "f.bin", 300_000)
    root = tmp_path / "root"
    back = tmp_path / "back.bin"
    window = 16 * 1024

    async def body() -> tuple[object, object]:
        async with qsftp.serve(root, receive_window=window, transport=transport) as server:
            if transport == "quic":
                relay = LinkEmulator((server.host, server.port), delay_ms=25)
            else:
                relay = StreamRelay((server.host, server.port), delay_ms=25)
            async with relay as link:
                options = {
                    "pin": server.fingerprint,
                    "receive_window": window,
                    "transport": transport,
                    "timeout": 10,
                }
                async with asyncio.timeout(20):  # a stalled stream would wait 60 s
                    up = await qsftp.upload(src, link.host, link.port, **options)
                    down = await qsftp.download("f.bin", back, link.host, link.port, **options)
                return up, down

    up, down = run(body)
    _check(root, "f.bin", src, up)
    assert isinstance(down, qsftp.TransferResult) and back.read_bytes() == src.read_bytes()
