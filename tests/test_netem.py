"""The link emulator: the impairment model without sockets, then its accuracy over real UDP
on loopback (delay, loss, rate, reordering, duplication, corruption), then QSFTP through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, cast

import pytest
from helpers import (
    ROOT,
    isolated_home,  # noqa: F401 (an autouse fixture)
    run,
)

import qsftp
from qsftp import netem
from qsftp.errors import UsageError
from qsftp.netem import LinkEmulator, LinkModel, LinkProfile


def within_sigmas(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """``count`` successes in ``n`` trials is within ``sigmas`` binomial standard deviations."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --- the model, sans I/O ------------------------------------------------------------------------


class Collect:
    """A ``send`` for LinkModel.deliver_due that records (time, dest, data)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.out: list[tuple[float, Any, bytes]] = []

    def __call__(self, dest: Any, data: bytes) -> None:
        self.out.append((self.now, dest, data))


def drive(
    model: LinkModel,
    arrivals: list[tuple[float, bytes]],
    step: float = 1e-4,
    *,
    then: tuple[int, LinkProfile] | None = None,
) -> Collect:
    """Submit packets at their arrival times and deliver in steps of ``step`` seconds;
    ``then=(index, profile)`` switches to ``profile`` from packet ``index`` on."""
    sink = Collect()
    index = 0
    now = 0.0
    while index < len(arrivals) or model.next_release() is not None:
        while index < len(arrivals) and arrivals[index][0] <= now:
            if then is not None and index == then[0]:
                model.profile = then[1]
            model.submit(arrivals[index][1], arrivals[index][0], index)
            index += 1
        sink.now = now
        model.deliver_due(now, sink)
        now += step
    return sink


def test_a_perfect_link_forwards_everything_at_once_in_order() -> None:
    model = LinkModel()
    sink = Collect()
    for i in range(100):
        model.submit(b"%d" % i, 0.0, i)
    assert model.deliver_due(0.0, sink) == 100
    assert [dest for _, dest, _ in sink.out] == list(range(100))
    stats = model.stats()
    assert stats.received_packets == stats.forwarded_packets == 100
    assert stats.dropped_packets == stats.pending_packets == 0


def test_random_loss_rate_is_within_four_sigma() -> None:
    n, p = 100_000, 0.1
    model = LinkModel(LinkProfile(loss=p), seed=3)
    for _ in range(n):
        model.submit(b"x", 0.0, None)
    assert within_sigmas(model.stats().lost_packets, n, p)
    assert model.stats().lost_packets + model.pending_packets == n


def test_gilbert_elliott_loss_comes_in_bursts_of_the_asked_mean_length() -> None:
    n = 200_000
    profile = LinkProfile.bursty(loss=0.05, burst=4)
    assert profile.expected_loss == pytest.approx(0.05)
    model = LinkModel(profile, seed=5)
    fates = []
    for _ in range(n):
        before = model.lost_packets
        model.submit(b"x", 0.0, None)
        fates.append(model.lost_packets > before)
    bursts = [len(run) for run in "".join("L" if f else "." for f in fates).split(".") if run]
    assert sum(fates) / n == pytest.approx(0.05, rel=0.1)
    assert statistics.mean(bursts) == pytest.approx(4, rel=0.1)
    random_model = LinkModel(LinkProfile(loss=0.05), seed=5)
    random_fates = []
    for _ in range(n):
        before = random_model.lost_packets
        random_model.submit(b"x", 0.0, None)
        random_fates.append(random_model.lost_packets > before)
    random_bursts = "".join("L" if f else "." for f in random_fates).split(".")
    assert statistics.mean(len(b) for b in random_bursts if b) < 1.1


def test_the_bottleneck_serializes_at_the_rate_and_tail_drops_when_full() -> None:
    """10 packets of 1250 bytes arrive at once on a 1 Mbit/s link with a 4-packet queue."""
    model = LinkModel(LinkProfile(rate_mbps=1, queue_packets=4, delay_ms=5))
    for i in range(10):
        model.submit(bytes(1250), 0.0, i)
    stats = model.stats()
    assert stats.queue_dropped_packets == 6 and stats.queue_dropped_bytes == 6 * 1250
    assert stats.peak_queue_packets == 4
    # 1250 bytes at 1 Mbit/s take 10 ms: departures at 10, 20, 30, 40 ms, then 5 ms of delay.
    releases = []
    while (due := model.next_release()) is not None:
        releases.append(due)
        model.deliver_due(due, lambda dest, data: None)
    assert releases == pytest.approx([0.015, 0.025, 0.035, 0.045])
    # Time in the bottleneck (waiting + serialization): 10 + 20 + 30 + 40 ms over 4 packets.
    assert model.stats().mean_queue_delay_ms == pytest.approx(25.0)
    # Once the queue has drained, a packet goes straight through again.
    model.submit(bytes(1250), 1.0, "late")
    assert model.next_release() == pytest.approx(1.015)


def test_the_queue_byte_limit_drops_whatever_does_not_fit() -> None:
    model = LinkModel(LinkProfile(rate_mbps=1, queue_bytes=3000))
    for size in (1000, 1000, 1500, 900):
        model.submit(bytes(size), 0.0, size)
    assert model.stats().queue_dropped_bytes == 1500
    assert model.pending_packets == 3


def test_jitter_varies_delay_but_never_reorders() -> None:
    model = LinkModel(LinkProfile(delay_ms=20, jitter_ms=10), seed=2)
    arrivals = [(i * 0.0005, b"%d" % i) for i in range(2000)]
    sink = drive(model, arrivals)
    order = [dest for _, dest, _ in sink.out]
    assert order == sorted(order)
    delays = [t - arrivals[dest][0] for t, dest, _ in sink.out]
    assert min(delays) >= 0.010 - 1e-9
    assert max(delays) > 0.028  # jitter did reach its top
    # With packets 0.5 ms apart and ±10 ms of jitter, FIFO makes most wait for a slower one.
    assert statistics.mean(delays) > 0.020


def test_reordered_packets_are_overtaken_by_the_ones_behind_them() -> None:
    model = LinkModel(LinkProfile(delay_ms=5, reorder=0.1, reorder_delay_ms=3), seed=4)
    # 20 packets without reordering at the end, so that every held one has some behind it.
    arrivals = [(i * 0.0005, b"") for i in range(3020)]
    sink = drive(model, arrivals, then=(3000, LinkProfile(delay_ms=5)))
    order = [dest for _, dest, _ in sink.out]
    highest = -1
    late = 0
    for seq in order:
        late += seq < highest
        highest = max(highest, seq)
    assert model.stats().reordered_packets == late
    assert within_sigmas(late, 3000, 0.1)
    assert sorted(order) == list(range(3020))


def test_duplicates_are_extra_copies_and_corruption_flips_exactly_one_bit() -> None:
    model = LinkModel(LinkProfile(duplicate=0.1, corrupt=0.1), seed=6)
    payloads = [bytes([i % 256]) * 64 for i in range(5000)]
    sink = Collect()
    for i, data in enumerate(payloads):
        model.submit(data, 0.0, i)
    model.deliver_due(0.0, sink)
    stats = model.stats()
    assert len(sink.out) == stats.forwarded_packets == 5000 + stats.duplicated_packets
    assert within_sigmas(stats.duplicated_packets, 5000, 0.1)
    flipped = 0
    for _, seq, data in sink.out:
        distance = sum(bin(a ^ b).count("1") for a, b in zip(data, payloads[seq], strict=True))
        assert distance in (0, 1)
        flipped += distance
    assert flipped == stats.corrupted_packets
    assert within_sigmas(flipped, len(sink.out), 0.1)


def test_the_same_seed_gives_the_same_fates_and_impairments_draw_independently() -> None:
    def fates(profile: LinkProfile, seed: int) -> list[int]:
        model = LinkModel(profile, seed=seed)
        lost = []
        for i in range(2000):
            before = model.lost_packets
            model.submit(b"x", 0.0, i)
            if model.lost_packets > before:
                lost.append(i)
        return lost

    base = fates(LinkProfile(loss=0.05), seed=9)
    assert base == fates(LinkProfile(loss=0.05), seed=9)
    assert base != fates(LinkProfile(loss=0.05), seed=10)
    # Adding reordering and duplication leaves the loss pattern as it was.
    assert base == fates(LinkProfile(loss=0.05, reorder=0.2, duplicate=0.2), seed=9)


def test_the_in_flight_bound_drops_rather_than_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netem, "MAX_PENDING_PACKETS", 100)
    model = LinkModel(LinkProfile(delay_ms=1000))
    for i in range(150):
        model.submit(b"x", 0.0, i)
    assert model.pending_packets == 100
    assert model.stats().overflow_packets == 50


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss": 1.5}, "loss must be a probability"),
        ({"duplicate": -0.1}, "duplicate must be a probability"),
        ({"delay_ms": -1}, "delay_ms must be"),
        ({"delay_ms": math.inf}, "delay_ms must be"),
        ({"rate_mbps": 0}, "rate_mbps must be"),
        ({"queue_packets": 0}, "queue_packets must be"),
        ({"loss_model": "burst"}, "loss_model must be"),
        ({"loss_model": "gilbert", "loss": 0.1}, "gilbert model takes"),
        ({"p_good_to_bad": 0.1}, 'needs loss_model="gilbert"'),
        ({"loss_in_bad": 0.5}, 'needs loss_model="gilbert"'),
        ({"corrupt": True}, "corrupt must be a probability"),
        ({"queue_packets": 10.5}, "queue_packets must be"),
    ],
)
def test_a_profile_refuses_impossible_values(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        LinkProfile(**fields)


def test_profile_columns_and_label() -> None:
    profile = LinkProfile(delay_ms=25, loss=0.01, rate_mbps=20)
    record = profile.as_dict()
    assert record["link_delay_ms"] == 25 and record["link_rate_mbps"] == 20
    assert record["link_loss_model"] == "random" and record["link_expected_loss"] == 0.01
    assert all(key.startswith("link_") for key in record)
    assert profile.label() == "25 ms, 1% loss, 20 Mbit/s"
    assert LinkProfile().label() == "perfect"
    assert "bursty" in LinkProfile.bursty(loss=0.02, burst=3).label()


def test_the_emulator_refuses_ambiguous_or_unknown_options() -> None:
    with pytest.raises(UsageError, match="not both"):
        LinkEmulator(("127.0.0.1", 1), profile=LinkProfile(), delay_ms=5)
    with pytest.raises(UsageError, match="not a LinkProfile field: delay"):
        LinkEmulator(("127.0.0.1", 1), delay=5)
    link = LinkEmulator(("127.0.0.1", 1), delay_ms=5, downlink=LinkProfile(loss=0.1))
    assert link.uplink == LinkProfile(delay_ms=5)
    assert link.downlink == LinkProfile(loss=0.1)
    assert link.as_dict()["link_up_delay_ms"] == 5 and link.as_dict()["link_down_loss"] == 0.1


# --- over real UDP on loopback ------------------------------------------------------------------


class Receiver(asyncio.DatagramProtocol):
    """Records every datagram with its arrival time; echoes it back when ``echo``."""

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        self.arrivals: list[tuple[float, bytes]] = []
        self.sources: set[Any] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.arrivals.append((time.perf_counter(), data))
        self.sources.add(addr)
        self.arrived.set()
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)


async def listen(*, echo: bool = False) -> tuple[Receiver, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(
        lambda: Receiver(echo=echo), local_addr=("127.0.0.1", 0)
    )
    return receiver, transport.get_extra_info("sockname")


async def wait_for_count(receiver: Receiver, count: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while len(receiver.arrivals) < count:
                receiver.arrived.clear()
                await receiver.arrived.wait()


async def round_trips(address: tuple[str, int], count: int) -> list[float]:
    """``count`` sequential request/response times through ``address``, seconds."""
    receiver, _ = await listen()
    assert receiver.transport is not None
    times = []
    try:
        for i in range(count):
            started = time.perf_counter()
            receiver.transport.sendto(b"ping %d" % i, address)
            await wait_for_count(receiver, i + 1, timeout=5)
            assert len(receiver.arrivals) == i + 1, "a ping went unanswered"
            times.append(receiver.arrivals[-1][0] - started)
            await asyncio.sleep(0.002)
    finally:
        receiver.transport.close()
    return times


def packet(seq: int, size: int = 100) -> bytes:
    """A datagram that says its sequence number and lets the receiver detect any bit flip."""
    body = struct.pack("!I", seq) + bytes(size - 8)
    return body + struct.pack("!I", zlib.crc32(body))


def sequence(data: bytes) -> int | None:
    """The packet's sequence number, or None when it arrived corrupted."""
    body, crc = data[:-4], struct.unpack("!I", data[-4:])[0]
    return struct.unpack("!I", body[:4])[0] if zlib.crc32(body) == crc else None


async def blast(
    address: tuple[str, int], count: int, *, first: int = 0, per_ms: int = 5, size: int = 100
) -> None:
    """Send ``count`` numbered datagrams, ``per_ms`` per millisecond (kernel buffers never fill)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for seq in range(first, first + count):
            sock.sendto(packet(seq, size), address)
            if seq % per_ms == per_ms - 1:
                await asyncio.sleep(0.001)


def test_added_round_trip_time_is_within_ten_percent_of_twice_the_delay() -> None:
    async def body() -> tuple[float, float]:
        echo, address = await listen(echo=True)
        baseline = statistics.median(await round_trips(address, 20))
        async with LinkEmulator(address, delay_ms=25) as link:
            through = statistics.median(await round_trips((link.host, link.port), 30))
        assert echo.transport is not None
        echo.transport.close()
        return baseline, through

    baseline, through = run(body)
    assert through - baseline == pytest.approx(0.050, rel=0.10)


def test_measured_loss_matches_the_probability_and_the_counters() -> None:
    n, p = 4000, 0.1

    async def body() -> tuple[Receiver, netem.LinkStats]:
        receiver, address = await listen()
        async with LinkEmulator(address, loss=p, seed=11) as link:
            await blast((link.host, link.port), n)
            await link.wait_drained()
            await asyncio.sleep(0.05)
            stats = link.stats()
        assert receiver.transport is not None
        receiver.transport.close()
        return receiver, stats

    receiver, stats = run(body)
    seen = {sequence(data) for _, data in receiver.arrivals}
    up = stats.uplink
    assert up.received_packets == n and up.host_dropped_packets == 0
    assert up.forwarded_packets == len(receiver.arrivals) == len(seen) == n - up.lost_packets
    assert within_sigmas(up.lost_packets, n, p)


def test_bursty_loss_is_seen_as_bursts_by_the_receiver() -> None:
    n = 5000

    async def body() -> tuple[Receiver, netem.LinkStats]:
        receiver, address = await listen()
        profile = LinkProfile.bursty(loss=0.1, burst=4)
        async with LinkEmulator(address, profile=profile, seed=12) as link:
            await blast((link.host, link.port), n, per_ms=10)
            await link.wait_drained()
            await asyncio.sleep(0.05)
            stats = link.stats()
        assert receiver.transport is not None
        receiver.transport.close()
        return receiver, stats

    receiver, stats = run(body)
    seen = sorted(s for s in (sequence(data) for _, data in receiver.arrivals) if s is not None)
    gaps = [b - a - 1 for a, b in zip([-1, *seen], [*seen, n], strict=True) if b - a > 1]
    assert sum(gaps) == stats.uplink.lost_packets
    assert sum(gaps) / n == pytest.approx(0.1, rel=0.35)
    assert 2.5 < statistics.mean(gaps) < 6  # random loss at 10% gives ~1.1


def test_delivered_rate_under_saturating_load_is_within_ten_percent_and_queue_tail_drops() -> None:
    rate_mbps, size, seconds, queue = 20, 1200, 1.5, 50

    async def body() -> tuple[Receiver, netem.LinkStats, int]:
        receiver, address = await listen()
        async with LinkEmulator(address, rate_mbps=rate_mbps, queue_packets=queue) as link:
            offered = 1.5 * rate_mbps * 1e6 / 8 / size  # packets per second, 1.5 × the rate
            sent = 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                started = time.perf_counter()
                while (elapsed := time.perf_counter() - started) < seconds:
                    while sent < elapsed * offered:
                        sock.sendto(packet(sent, size), (link.host, link.port))
                        sent += 1
                    await asyncio.sleep(0.002)
            await link.wait_drained()
            await asyncio.sleep(0.05)
            stats = link.stats()
        assert receiver.transport is not None
        receiver.transport.close()
        return receiver, stats, sent

    receiver, stats, sent = run(body)
    times = [t for t, _ in receiver.arrivals]
    delivered_mbps = (len(times) - 1) * size * 8 / (times[-1] - times[0]) / 1e6
    assert delivered_mbps == pytest.approx(rate_mbps, rel=0.10)
    up = stats.uplink
    assert up.received_packets == sent
    assert up.queue_dropped_packets > 0.2 * sent  # a third of the offered load cannot fit
    assert up.forwarded_packets == len(receiver.arrivals) == sent - up.queue_dropped_packets
    assert up.peak_queue_packets == queue


def test_jitter_keeps_order_on_the_wire() -> None:
    async def body() -> Receiver:
        receiver, address = await listen()
        async with LinkEmulator(address, delay_ms=10, jitter_ms=8, seed=3) as link:
            await blast((link.host, link.port), 500)
            await link.wait_drained()
            await asyncio.sleep(0.05)
        assert receiver.transport is not None
        receiver.transport.close()
        return receiver

    receiver = run(body)
    order = [sequence(data) for _, data in receiver.arrivals]
    assert order == list(range(500))


def test_reorder_and_duplicate_counters_match_what_the_receiver_observes() -> None:
    n = 3000

    async def body() -> tuple[Receiver, netem.LinkStats]:
        receiver, address = await listen()
        profile = LinkProfile(delay_ms=2, reorder=0.05, reorder_delay_ms=30, duplicate=0.05)
        async with LinkEmulator(address, profile=profile, seed=21) as link:
            await blast((link.host, link.port), n)
            # A tail the held-back packets are sure to be overtaken by: no reordering in it.
            link.uplink = LinkProfile(delay_ms=2)
            for i in range(10):
                await blast((link.host, link.port), 5, first=n + 5 * i)
                await asyncio.sleep(0.005)
            await link.wait_drained()
            await asyncio.sleep(0.05)
            stats = link.stats()
        assert receiver.transport is not None
        receiver.transport.close()
        return receiver, stats

    receiver, stats = run(body)
    seen: set[int] = set()
    late = duplicates = highest = 0
    for _, data in receiver.arrivals:
        seq = sequence(data)
        assert seq is not None
        if seq in seen:
            duplicates += 1
        elif seq < highest:
            late += 1
        seen.add(seq)
        highest = max(highest, seq)
    up = stats.uplink
    assert seen == set(range(n + 50))
    assert up.reordered_packets == late > 0
    assert up.duplicated_packets == duplicates > 0
    assert up.forwarded_packets == len(receiver.arrivals) == n + 50 + duplicates


def test_corrupted_counter_matches_the_datagrams_that_fail_their_checksum() -> None:
    n = 2000

    async def body() -> tuple[Receiver, netem.LinkStats]:
        receiver, address = await listen()
        async with LinkEmulator(address, corrupt=0.05, seed=31) as link:
            await blast((link.host, link.port), n)
            await link.wait_drained()
            await asyncio.sleep(0.05)
            stats = link.stats()
        assert receiver.transport is not None
        receiver.transport.close()
        return receiver, stats

    receiver, stats = run(body)
    seqs = [sequence(data) for _, data in receiver.arrivals]
    assert len(seqs) == n
    assert seqs.count(None) == stats.uplink.corrupted_packets
    assert within_sigmas(stats.uplink.corrupted_packets, n, 0.05)


def test_uplink_and_downlink_profiles_apply_to_their_own_direction_only() -> None:
    n = 400

    async def body() -> tuple[list[float], float, netem.LinkStats, int]:
        echo, address = await listen(echo=True)
        baseline = statistics.median(await round_trips(address, 10))
        link = LinkEmulator(
            address, uplink=LinkProfile(delay_ms=20), downlink=LinkProfile(loss=0.3), seed=41
        )
        async with link:
            client, _ = await listen()
            assert client.transport is not None
            for seq in range(n):
                client.transport.sendto(packet(seq), (link.host, link.port))
                if seq % 5 == 4:
                    await asyncio.sleep(0.001)
            await link.wait_drained()
            await asyncio.sleep(0.05)
            stats = link.stats()
            # Sequential pings: the uplink's 20 ms, nothing added on the way back.
            pings: list[float] = []
            while len(pings) < 10:  # a ping lost on the downlink is not counted
                with_reply = len(client.arrivals)
                started = time.perf_counter()
                client.transport.sendto(b"ping", (link.host, link.port))
                await asyncio.sleep(0.05)
                if len(client.arrivals) > with_reply:
                    pings.append(client.arrivals[-1][0] - started)
            replies = len([a for a in client.arrivals if a[1] != b"ping"])
            client.transport.close()
        assert echo.transport is not None
        echo.transport.close()
        return pings, baseline, stats, replies

    pings, baseline, stats, replies = run(body)
    assert stats.uplink.lost_packets == 0 and stats.uplink.forwarded_packets == n
    assert stats.downlink.received_packets == n
    assert within_sigmas(stats.downlink.lost_packets, n, 0.3)
    assert replies == stats.downlink.forwarded_packets == n - stats.downlink.lost_packets
    assert statistics.median(pings) - baseline == pytest.approx(0.020, rel=0.10)


def test_each_client_gets_its_own_upstream_address_and_the_idlest_is_evicted() -> None:
    async def body() -> tuple[list[int], int, int]:
        echo, address = await listen(echo=True)
        clients = [await listen() for _ in range(3)]
        async with LinkEmulator(address, max_clients=2) as link:
            for i, (client, _) in enumerate(clients):
                assert client.transport is not None
                client.transport.sendto(b"from %d" % i, (link.host, link.port))
                await wait_for_count(client, 1, timeout=5)
            got = [len(client.arrivals) for client, _ in clients]
            assert all(
                client.arrivals[0][1] == b"from %d" % i for i, (client, _) in enumerate(clients)
            )
            clients_now = link.stats().clients
        for client, _ in clients:
            assert client.transport is not None
            client.transport.close()
        assert echo.transport is not None
        echo.transport.close()
        return got, clients_now, len(echo.sources)

    got, clients_now, sources = run(body)
    assert got == [1, 1, 1]
    assert clients_now == 2
    assert sources == 3


def test_closing_drops_what_is_in_flight_and_sends_nothing_afterwards() -> None:
    async def body() -> tuple[int, netem.LinkStats]:
        receiver, address = await listen()
        link = LinkEmulator(address, delay_ms=100)
        await link.start()
        await blast((link.host, link.port), 20)
        await asyncio.sleep(0.02)
        await link.close()
        await link.close()  # idempotent
        stats = link.stats()
        await asyncio.sleep(0.2)  # past the delay: a forgotten timer would have sent them
        assert receiver.transport is not None
        receiver.transport.close()
        return len(receiver.arrivals), stats

    arrived, stats = run(body)
    assert arrived == 0
    assert stats.uplink.received_packets == 20 and stats.uplink.pending_packets == 0
    assert stats.uplink.forwarded_packets == 0


def test_stats_dict_is_flat_and_reset_zeroes_it() -> None:
    async def body() -> tuple[dict[str, Any], dict[str, Any]]:
        receiver, address = await listen()
        async with LinkEmulator(address, loss=0.5, seed=1) as link:
            await blast((link.host, link.port), 50)
            await link.wait_drained()
            before = link.stats_dict()
            link.reset_stats()
            after = link.stats_dict()
        assert receiver.transport is not None
        receiver.transport.close()
        return before, after

    before, after = run(body)
    assert before["link_up_received_packets"] == 50 and before["link_up_lost_packets"] > 0
    assert "link_down_forwarded_bytes" in before and before["link_clients"] == 1
    assert all(isinstance(v, int | float) for v in before.values())
    assert after["link_up_received_packets"] == after["link_up_lost_packets"] == 0


# --- QSFTP through the emulator -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("impairments", "size"),
    [
        (
            {"delay_ms": 10, "loss": 0.02, "reorder": 0.02, "duplicate": 0.02, "corrupt": 0.01},
            1_000_000,
        ),
        ({"delay_ms": 5, "loss": 0.05}, 1_000_000),
    ],
    ids=["mixed", "loss5"],
)
def test_qsftp_transfers_through_an_impaired_link_end_verified(
    tmp_path: Path, impairments: dict[str, Any], size: int
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(7).randbytes(size))
    root = tmp_path / "root"
    back = tmp_path / "back.bin"

    async def body() -> tuple[qsftp.TransferResult, qsftp.TransferResult, netem.LinkStats]:
        async with (
            qsftp.serve(root, max_datagram_size=1200) as server,
            LinkEmulator((server.host, server.port), seed=17, **impairments) as link,
        ):
            options: dict[str, Any] = {"pin": server.fingerprint, "max_datagram_size": 1200}
            up = await qsftp.upload(src, link.host, link.port, **options)
            down = await qsftp.download("src.bin", back, link.host, link.port, **options)
            return up, down, link.stats()

    up, down, stats = run(body)
    assert up.verified and down.verified
    assert (root / "src.bin").read_bytes() == src.read_bytes()
    assert back.read_bytes() == src.read_bytes()
    for direction in (stats.uplink, stats.downlink):
        assert direction.lost_packets > 0
        # Every packet is accounted for: dropped, forwarded (copies included) or in flight.
        assert direction.received_packets + direction.duplicated_packets == (
            direction.forwarded_packets + direction.dropped_packets + direction.pending_packets
        )
    if impairments.get("corrupt"):
        assert stats.uplink.corrupted_packets + stats.downlink.corrupted_packets > 0


# --- command line and calibration ---------------------------------------------------------------


def test_the_relay_cli_forwards_both_ways_and_prints_its_counters_when_stopped() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)
        client.settimeout(10)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qsftp.netem",
                "relay",
                "--target",
                f"127.0.0.1:{server.getsockname()[1]}",
                "--delay-ms",
                "5",
                "--downlink",
                "delay_ms=1,duplicate=1",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            match = re.search(r"ready on 127\.0\.0\.1:(\d+) ", ready)
            assert match, ready
            client.sendto(b"hello", ("127.0.0.1", int(match.group(1))))
            data, upstream = server.recvfrom(100)
            assert data == b"hello"
            server.sendto(b"world", upstream)
            assert client.recv(100) == b"world"
            assert client.recv(100) == b"world"  # the downlink duplicates everything
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    counters = json.loads(out.strip().splitlines()[-1])
    assert counters["link_up_forwarded_packets"] == 1
    assert counters["link_down_forwarded_packets"] == 2
    assert counters["link_down_duplicated_packets"] == 1
    assert proc.returncode == 0


def test_the_relay_cli_refuses_a_bad_profile() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qsftp.netem", "relay", "--target", "127.0.0.1:9", "--loss", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "loss must be a probability" in proc.stderr


def test_calibrate_reports_rate_delay_and_transfer_rows() -> None:
    rows = run(
        lambda: netem.calibrate(
            rates_mbps=[10],
            sizes=[1200],
            packet_rates=[1000],
            seconds=0.5,
            transfer_bytes=300_000,
            transfer_repeats=1,
        )
    )
    assert [row["test"] for row in rows] == ["rate", "delay", "qsftp"]
    rate, delay, transfer = rows
    assert rate["rate_error"] == pytest.approx(0, abs=0.1)
    assert rate["lost_before_link"] == 0 and rate["queue_dropped"] > 0
    assert delay["one_way_p50_ms"] == pytest.approx(10, abs=1.5)
    assert transfer["direct_mb_s"] > 0 and transfer["emulated_mb_s"] > 0
