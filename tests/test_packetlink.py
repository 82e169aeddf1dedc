"""Packet-level mode: two network namespaces joined by the emulated link, every IP packet
through it. Accuracy (added RTT, drop fraction, rate) with small UDP programs in the
namespaces, then a QSFTP upload and a kernel TCP stream across lossy links, a packet-mode
sweep, and teardown. Everything but the availability checks needs Linux and root, and skips
with the reason otherwise."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    isolated_home,  # noqa: F401 (an autouse fixture)
    run,
)

from qsftp import netem, packetlink
from qsftp.errors import PacketLinkUnavailable, UsageError
from qsftp.experiment import LINK_COLUMNS, measured, sweep
from qsftp.netem import LinkProfile
from qsftp.packetlink import PacketLink, VethLink, lab_server, lab_transfer

REASON = packetlink.unavailable_reason()


@pytest.fixture
def needs_packet_link() -> None:
    if REASON is not None:
        pytest.skip(REASON)


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}


def within_sigmas(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# Small programs run inside the namespaces (bounded in count and time by their arguments).
ECHO = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 0))
print(sock.getsockname()[1], flush=True)
sock.settimeout(30)
while True:
    data, addr = sock.recvfrom(65535)
    sock.sendto(data, addr)
"""
PING = r"""
import json, socket, statistics, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(2)
rtts = []
for i in range(count):
    start = time.perf_counter()
    sock.sendto(b"%d" % i, (host, port))
    sock.recv(100)
    rtts.append(time.perf_counter() - start)
print(json.dumps(statistics.median(rtts) * 1000))
"""
# Sends `count` datagrams of `size` bytes at `pps` per second.
BLAST = r"""
import socket, sys, time
host, port, size, pps, count = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:6])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(int(size))
start = time.monotonic()
sent = 0
while sent < count:
    while sent < count and sent < (time.monotonic() - start) * pps:
        sock.sendto(payload, (host, port))
        sent += 1
    time.sleep(0.0005)
print(sent)
"""
TCP_SINK = r"""
import hashlib, json, socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
server.settimeout(30)
conn, _ = server.accept()
conn.settimeout(30)
digest, size = hashlib.sha256(), 0
while data := conn.recv(65536):
    digest.update(data)
    size += len(data)
print(json.dumps({"size": size, "sha256": digest.hexdigest()}))
"""
TCP_SOURCE = r"""
import random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[3]))
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as sock:
    sock.sendall(data)
"""


async def start_program(
    link: PacketLink, side: str, code: str, *args: str
) -> tuple[asyncio.subprocess.Process, int]:
    """A program in a namespace that prints its port first; returns it and the port."""
    process = await link.spawn(
        side, sys.executable, "-c", code, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    async with asyncio.timeout(10):
        port = int(await process.stdout.readline())
    return process, port


async def start_sink(link: PacketLink, idle: float) -> tuple[asyncio.subprocess.Process, int]:
    """netem's calibration receiver on the server side: it counts datagrams until ``idle``
    seconds pass without one (after the first), then prints count, bytes and seconds."""
    arg = json.dumps([link.server_addr, 30.0, idle])
    process = await link.spawn(
        "server",
        sys.executable,
        "-c",
        netem._RECEIVER,
        arg,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(10):
        port = int(json.loads(await process.stdout.readline())["port"])
    return process, port


async def output_of(process: asyncio.subprocess.Process) -> Any:
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return json.loads(out)


# --- availability (runs everywhere) -----------------------------------------------------------


def test_without_root_the_link_refuses_to_start_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packetlink.os, "geteuid", lambda: 1000)
    reason = packetlink.unavailable_reason()
    assert reason is not None and "root" in reason
    assert not PacketLink.available()

    async def body() -> None:
        async with PacketLink(delay_ms=5):
            raise AssertionError("started without root")

    with pytest.raises(PacketLinkUnavailable, match="root"):
        run(body)
    assert issubclass(PacketLinkUnavailable, UsageError)


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="not a LinkProfile field"):
        PacketLink(delay=5)
    with pytest.raises(UsageError, match="mtu"):
        PacketLink(mtu=600)
    with pytest.raises(UsageError, match="transport"):
        run(lambda: lab_transfer(PacketLink(), __file__, transport="sctp"))


# --- accuracy -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("needs_packet_link")
def test_added_round_trip_time_is_twice_the_delay_within_ten_percent() -> None:
    async def body() -> tuple[float, float]:
        async with PacketLink() as link:
            echo, port = await start_program(link, "server", ECHO, link.server_addr)
            ping = [sys.executable, "-c", PING, link.server_addr, str(port), "30"]
            base = json.loads((await link.run("client", *ping)).stdout)
            link.uplink = link.downlink = LinkProfile(delay_ms=25)
            delayed = json.loads((await link.run("client", *ping)).stdout)
            # Nothing but the two runs' pings crossed (no IPv6 chatter, no ARP on TUN).
            assert link.stats().uplink.forwarded_packets == 60
            echo.kill()
            return base, delayed

    base, delayed = run(body)
    assert delayed - base == pytest.approx(50, rel=0.1)


@pytest.mark.usefixtures("needs_packet_link")
def test_drop_fraction_matches_the_loss_and_the_counters_match_the_receiver() -> None:
    n, p = 3000, 0.1

    async def body() -> tuple[dict[str, Any], Any]:
        async with PacketLink(uplink=LinkProfile(loss=p), seed=11) as link:
            sink, port = await start_sink(link, 1.0)
            blast = [sys.executable, "-c", BLAST, link.server_addr, str(port), "200", "5000"]
            result = await link.run("client", *blast, str(n))
            assert int(result.stdout) == n
            received = await output_of(sink)
            return received, link.stats().uplink

    received, stats = run(body)
    assert within_sigmas(stats.lost_packets, n, p)
    assert stats.received_packets == n  # nothing lost before the link
    assert received["count"] == n - stats.lost_packets == stats.forwarded_packets


@pytest.mark.usefixtures("needs_packet_link")
def test_delivered_rate_under_saturation_is_within_ten_percent() -> None:
    rate, size = 20.0, 1200  # Mbit/s of IP packets; UDP payload bytes
    packet = size + 28
    pps = 1.5 * rate * 1e6 / 8 / packet
    count = int(pps * 1.5)

    async def body() -> tuple[dict[str, Any], Any]:
        profile = LinkProfile(rate_mbps=rate, queue_packets=50)
        async with PacketLink(uplink=profile) as link:
            sink, port = await start_sink(link, 0.5)
            blast = [sys.executable, "-c", BLAST, link.server_addr, str(port), str(size)]
            await link.run("client", *blast, str(pps), str(count))
            return await output_of(sink), link.stats().uplink

    received, stats = run(body)
    delivered = received["bytes_after_first"] * packet / size * 8 / received["seconds"] / 1e6
    assert delivered == pytest.approx(rate, rel=0.1)
    assert stats.queue_dropped_packets > 0  # it was saturated
    assert received["count"] == stats.forwarded_packets


# --- real traffic -------------------------------------------------------------------------------


@pytest.mark.usefixtures("needs_packet_link")
def test_a_qsftp_upload_through_a_lossy_packet_link_ends_verified(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(400_000))
    root = tmp_path / "root"

    async def body() -> dict[str, Any]:
        async with (
            PacketLink(delay_ms=5, loss=0.05, seed=3) as link,
            lab_server(link, root) as server,
        ):
            assert server.host == link.server_addr
            return await lab_transfer(link, source, server=server, remote="in/up.bin")

    row = run(body)
    assert row["error"] == "" and row["verified"]
    assert row["link_mode"] == "packet" and row["transport"] == "quic"
    assert row["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (root / "in" / "up.bin").read_bytes() == source.read_bytes()
    assert row["link_up_lost_packets"] + row["link_down_lost_packets"] > 0
    assert row["link_up_pending_packets"] == 0  # counters read after the link drained


@pytest.mark.usefixtures("needs_packet_link")
def test_a_tcp_stream_crosses_a_lossy_link_intact() -> None:
    size = 1_000_000
    expected = hashlib.sha256(random.Random(7).randbytes(size)).hexdigest()

    async def body() -> tuple[dict[str, Any], Any]:
        async with PacketLink(delay_ms=2, loss=0.03, seed=5) as link:
            sink, port = await start_program(link, "server", TCP_SINK, link.server_addr)
            source = [sys.executable, "-c", TCP_SOURCE, link.server_addr, str(port), str(size)]
            result = await link.run("client", *source)
            assert result.returncode == 0, result.stderr.decode()
            return await output_of(sink), link.stats()

    received, stats = run(body)
    assert received == {"size": size, "sha256": expected}
    assert stats.uplink.lost_packets > 0 and stats.downlink.lost_packets > 0


@pytest.mark.usefixtures("needs_packet_link")
def test_a_packet_mode_sweep_returns_rows_with_the_link_mode_and_link_columns(
    tmp_path: Path,
) -> None:
    link = LinkProfile(delay_ms=5, loss=0.02)

    async def body() -> Any:
        return await sweep(
            sizes=["30KB"],
            repeats=1,
            direction="both",
            links=[None, link],
            link_mode="packet",
            seed=1,
            progress=False,
            files_dir=tmp_path / "files",
        )

    df = run(body, timeout=120)
    assert set(LINK_COLUMNS) <= set(df.columns)
    rows = measured(df)
    assert len(rows) == 4, df["error"].tolist()
    assert rows["verified"].all()
    assert set(zip(rows["direction"], rows["link_mode"], strict=True)) == {
        (d, m) for d in ("upload", "download") for m in ("none", "packet")
    }
    through = rows[rows["link_mode"] == "packet"]
    assert (through["link"] == link.label()).all()
    assert (through["link_up_delay_ms"] == 5).all() and (through["link_down_loss"] == 0.02).all()
    assert (through["link_up_received_packets"] > 0).all()
    assert (through["max_datagram_size"] == 1200).all()
    assert df.attrs["link_mode"] == "packet"
    assert not {n for n in namespaces() if n.startswith(f"qsftp-{os.getpid()}-")}


def test_quic_and_kernel_tcp_cross_the_same_lossy_packet_link_in_one_sweep(
    tmp_path: Path,
) -> None:
    # The comparison the packet mode exists for: a TCP relay cannot drop bytes, this link
    # drops the kernel's TCP segments as it drops QUIC's datagrams.
    link = LinkProfile(delay_ms=5, loss=0.03)

    async def body() -> Any:
        return await sweep(
            sizes=["500KB"],
            repeats=1,
            direction="both",
            links=[link],
            link_mode="packet",
            transport=["quic", "tcp"],
            seed=3,
            progress=False,
            files_dir=tmp_path / "files",
        )

    df = run(body, timeout=180)
    rows = measured(df)
    assert (rows["error"] == "").all(), rows["error"].tolist()
    assert rows["verified"].all()
    assert set(zip(rows["transport"], rows["direction"], strict=True)) == {
        (t, d) for t in ("quic", "tcp") for d in ("upload", "download")
    }
    assert (rows["link_mode"] == "packet").all()
    # Both met the loss: the link dropped packets of every transfer's data direction.
    uploads = rows[rows["direction"] == "upload"]
    assert (uploads["link_up_lost_packets"] > 0).all()
    tcp = rows[rows["transport"] == "tcp"]
    assert tcp["max_datagram_size"].isna().all()  # no QUIC datagram size on TCP rows


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"target": ("127.0.0.1", 9)}, "target"),
        ({"congestion_control": "cubic"}, "congestion_control"),
        ({"handshake": "resumed"}, "fresh"),
        ({"link_mode": "tun"}, "link_mode"),
    ],
)
def test_packet_mode_refuses_what_the_clis_cannot_do(option: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        run(
            lambda: sweep(
                sizes=[1],
                links=[LinkProfile()],
                **{"link_mode": "packet", **option},
                progress=False,
            )
        )


# --- the rate-only variant: veth pairs through a router namespace, tc tbf ------------------------


@pytest.mark.usefixtures("needs_packet_link")
def test_veth_tbf_delivers_its_rate_within_ten_percent_and_tail_drops() -> None:
    rate, size = 20.0, 1200
    frame = size + 28 + 14  # tc counts the Ethernet header too
    pps = 1.5 * rate * 1e6 / 8 / frame
    count = int(pps * 1.5)

    async def body() -> tuple[dict[str, Any], Any]:
        async with VethLink(uplink_mbps=rate) as link:
            sink, port = await start_sink(link, 0.5)
            link.reset_stats()
            blast = [sys.executable, "-c", BLAST, link.server_addr, str(port), str(size)]
            await link.run("client", *blast, str(pps), str(count))
            return await output_of(sink), link.stats().uplink

    received, stats = run(body)
    delivered = received["bytes_after_first"] * frame / size * 8 / received["seconds"] / 1e6
    assert delivered == pytest.approx(rate, rel=0.1)
    # The queue is in the router, not the sender's host: the sender is not slowed down by
    # its own socket buffer, so the excess is dropped there.
    assert stats.queue_dropped_packets > 0
    # veth is Ethernet: the router's ARP request (and a late one) are counted as well.
    assert received["count"] <= stats.forwarded_packets <= received["count"] + 2


@pytest.mark.usefixtures("needs_packet_link")
def test_a_qsftp_upload_through_veth_tbf_ends_verified_and_all_three_namespaces_go(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    made: list[str] = []

    async def body() -> dict[str, Any]:
        async with VethLink(20) as link:
            made.extend([link.server_ns, link.client_ns, link.router_ns])
            assert set(made) <= namespaces()
            return await lab_transfer(link, source)

    row = run(body)
    assert row["error"] == "" and row["verified"], row["error"]
    assert row["link_mode"] == "veth-tbf" and row["link"] == "tbf 20 Mbit/s"
    assert row["link_up_forwarded_bytes"] > 300_000
    assert not set(made) & namespaces()


# --- teardown -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("needs_packet_link")
def test_namespaces_are_gone_after_close_error_and_cancellation() -> None:
    made: list[str] = []

    async def normal() -> None:
        async with PacketLink() as link:
            made.extend([link.server_ns, link.client_ns])
            assert {link.server_ns, link.client_ns} <= namespaces()
            # a process still running in the namespace is ended by close()
            await link.spawn("server", "sleep", "30")

    async def failing() -> None:
        async with PacketLink() as link:
            made.extend([link.server_ns, link.client_ns])
            raise RuntimeError("boom")

    async def cancelled() -> None:
        entered = asyncio.Event()

        async def hold() -> None:
            async with PacketLink() as link:
                made.extend([link.server_ns, link.client_ns])
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.ensure_future(hold())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(normal)
    with pytest.raises(RuntimeError, match="boom"):
        run(failing)
    run(cancelled)
    assert len(made) == 6
    assert not set(made) & namespaces()


@pytest.mark.usefixtures("needs_packet_link")
def test_stale_namespaces_of_dead_processes_are_cleaned_up() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    dead_pid = int(dead.stdout)
    stale = f"qsftp-{dead_pid}-0-srv"
    alive = f"qsftp-{os.getpid()}-999999-cli"  # ours: this process lives
    for name in (stale, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = packetlink.cleanup_stale()
        assert stale in removed and alive not in removed
        assert stale not in namespaces() and alive in namespaces()
    finally:
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
