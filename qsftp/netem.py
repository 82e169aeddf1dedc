"""An emulated network link in user space: ``async with LinkEmulator(target, delay_ms=25) as link``.

This kernel has no netem, and most users (macOS, Windows, no root) could not use it anyway, so
QSFTP carries its own: an asyncio UDP relay. Clients send to ``link.host, link.port``; the relay
forwards every datagram to ``target`` from one upstream socket per client address (so the server
sees distinct 4-tuples and its replies find their way back), and every datagram, in each
direction, goes through that direction's impairments, in this order::

    loss (random or Gilbert-Elliott)
      → bottleneck: FIFO queue of queue_packets / queue_bytes drained at rate_mbps (tail drop)
        → propagation delay ± jitter (FIFO: jitter never reorders)
          → reorder (hold a packet back by reorder_delay_ms, so later ones overtake it)
            → duplicate (a second copy, same release time)
              → corrupt (each copy: one random bit flipped)

The impairments live in :class:`LinkModel`, which knows no I/O: ``submit(data, now, dest)``
takes a packet, ``deliver_due(now, send)`` hands out those whose time has come, and
``next_release()`` says when to look again. :class:`LinkEmulator` is the thin asyncio glue
(sockets, one timer per direction); a packet-level mode (TUN devices) can drive the same model.

Every random choice comes from its own ``random.Random`` stream, seeded from ``seed``, the
direction and the impairment's name: the same packet sequence meets the same fate in every run,
and changing one impairment (say ``reorder``) leaves the others' draws (say the loss pattern)
unchanged. docs/NETWORK-LAB.md has examples, the counters, and the accuracy measured here.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import heapq
import json
import logging
import math
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from .errors import TransportError, UsageError
from .udp import DatagramEndpoint

__all__ = [
    "DEFAULT_QUEUE_PACKETS",
    "DEFAULT_REORDER_DELAY_MS",
    "MAX_CLIENTS",
    "MAX_PENDING_BYTES",
    "MAX_PENDING_PACKETS",
    "MAX_QUEUE_PACKETS",
    "MAX_STREAM_CONNECTIONS",
    "STREAM_PACKET_BYTES",
    "STREAM_SEGMENT",
    "DirectionStats",
    "LinkEmulator",
    "LinkModel",
    "LinkProfile",
    "LinkStats",
    "StreamRelay",
    "calibrate",
    "main",
    "stream_relay_problems",
]

logger = logging.getLogger(__name__)

# Bottleneck queue when none is given: Linux's default txqueuelen and netem's default limit,
# so figures compare with netem's. At 20 Mbit/s and 1200-byte datagrams that is ~0.5 s of
# queue (a bufferbloated link); pass queue_packets or queue_bytes for a shallow buffer.
DEFAULT_QUEUE_PACKETS = 1000
# Largest queue a profile may ask for: beyond that the "link" is a memory sink, not a queue.
MAX_QUEUE_PACKETS = 100_000
# How long a reordered packet is held back, when not given: a few packets' worth at the rates
# QSFTP reaches, past QUIC's packet threshold (3) on a busy link, and short next to its
# time threshold (9/8 RTT) on a delayed one.
DEFAULT_REORDER_DELAY_MS = 10.0
# Packets and bytes one direction may hold in flight (queued, delayed or held back) before
# it drops new ones (``overflow_packets``): a delay line at 1 Gbit/s × 0.5 s is 62 MB.
MAX_PENDING_PACKETS = 200_000
MAX_PENDING_BYTES = 64 * 1024 * 1024
# Client addresses with their own upstream socket; beyond that the least recently active one
# is closed (one file descriptor each, and a port scan must not exhaust them).
MAX_CLIENTS = 256
# Event-loop timers fire late: the default loop waits in epoll in whole milliseconds, rounded
# up (measured here: 0.9 ms late on average, bimodal at +0.3 and +1.2 ms; uvloop 0.2 ms).
# A pump arms its timer this much before a packet is due and sends what is due within this
# much of "now", so delays are right on average instead of all ~1 ms long. Measured with
# these values: delivery -0.4 … +0.55 ms from due (5th-95th percentile), mean +0.05 ms;
# uvloop -0.25 … +0.7 ms, mean 0.0 ms.
_TIMER_SLACK = 0.0005
_TIMER_SLACK_UVLOOP = 0.00025

_LOSS_MODELS = ("random", "gilbert")
# The Gilbert-Elliott parameters and their defaults (which the random model requires).
_GILBERT_DEFAULTS = {
    "p_good_to_bad": 0.0,
    "p_bad_to_good": 1.0,
    "loss_in_bad": 1.0,
    "loss_in_good": 0.0,
}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_probability(name: str, value: float) -> None:
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise UsageError(f"{name} must be a probability between 0 and 1, not {value!r}")


def _check_duration(name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be a finite number of milliseconds >= 0, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """The impairments of one direction of a link. The defaults are a perfect link."""

    delay_ms: float = 0.0
    "One-way propagation delay added to every packet, ms."
    jitter_ms: float = 0.0
    "Each packet's delay varies uniformly in ±jitter_ms (clipped at 0); delivery stays FIFO."
    loss: float = 0.0
    'Probability that a packet is dropped (loss_model="random").'
    loss_model: str = "random"
    'Either "random" (independent losses) or "gilbert" (Gilbert-Elliott, bursty).'
    p_good_to_bad: float = 0.0
    "Gilbert-Elliott: per packet, probability of moving from the good to the bad state."
    p_bad_to_good: float = 1.0
    "Gilbert-Elliott: per packet, probability of leaving the bad state (mean stay 1/p)."
    loss_in_bad: float = 1.0
    "Gilbert-Elliott: loss probability in the bad state."
    loss_in_good: float = 0.0
    "Gilbert-Elliott: loss probability in the good state."
    rate_mbps: float | None = None
    "Bottleneck rate, Mbit/s of datagram payload; None for no bottleneck."
    queue_packets: int = DEFAULT_QUEUE_PACKETS
    "Bottleneck queue size in packets (with rate_mbps): a packet finding it full is dropped."
    queue_bytes: int | None = None
    "Bottleneck queue size in bytes as well, when given: whichever limit is hit first drops."
    reorder: float = 0.0
    "Probability that a packet is held back by reorder_delay_ms, so later packets overtake it."
    reorder_delay_ms: float = DEFAULT_REORDER_DELAY_MS
    "How long a reordered packet is held back, ms."
    duplicate: float = 0.0
    "Probability that a packet is delivered twice."
    corrupt: float = 0.0
    "Probability that a delivered copy has one random bit flipped."

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms", "reorder_delay_ms"):
            _check_duration(name, getattr(self, name))
        for name in ("loss", "reorder", "duplicate", "corrupt", *_GILBERT_DEFAULTS):
            _check_probability(name, getattr(self, name))
        if self.loss_model not in _LOSS_MODELS:
            raise UsageError(f"loss_model must be 'random' or 'gilbert', not {self.loss_model!r}")
        if self.loss_model == "gilbert" and self.loss:
            raise UsageError(
                "loss is the random model's parameter; the gilbert model takes p_good_to_bad, "
                "p_bad_to_good, loss_in_bad, loss_in_good (or use LinkProfile.bursty)"
            )
        if self.loss_model == "random":
            for name, default in _GILBERT_DEFAULTS.items():
                if getattr(self, name) != default:
                    raise UsageError(f'{name} needs loss_model="gilbert"')
        if self.rate_mbps is not None and not (
            _is_number(self.rate_mbps) and math.isfinite(self.rate_mbps) and self.rate_mbps > 0
        ):
            raise UsageError(f"rate_mbps must be a positive number or None, not {self.rate_mbps!r}")
        if not (_is_count(self.queue_packets) and 1 <= self.queue_packets <= MAX_QUEUE_PACKETS):
            raise UsageError(
                f"queue_packets must be an integer from 1 to {MAX_QUEUE_PACKETS}, "
                f"not {self.queue_packets!r}"
            )
        if self.queue_bytes is not None and not (
            _is_count(self.queue_bytes) and 1 <= self.queue_bytes <= MAX_PENDING_BYTES
        ):
            raise UsageError(
                f"queue_bytes must be an integer from 1 to {MAX_PENDING_BYTES}, "
                f"not {self.queue_bytes!r}"
            )

    @classmethod
    def bursty(cls, *, loss: float, burst: float, **fields: Any) -> LinkProfile:
        """Gilbert-Elliott loss with long-run rate ``loss`` in bursts of ``burst`` packets (mean).

        Every packet in the bad state is lost and none in the good state, so a burst lasts
        1/p_bad_to_good packets on average and the bad state's share of time is ``loss``.
        """
        if not (_is_number(burst) and burst >= 1):
            raise UsageError(f"burst must be a mean length of at least 1 packet, not {burst!r}")
        _check_probability("loss", loss)
        leave = 1.0 / burst
        if loss >= 1 or loss * leave / (1 - loss) > 1:
            raise UsageError(f"loss={loss} is unreachable with bursts of {burst} packets")
        return cls(
            loss_model="gilbert",
            p_good_to_bad=loss * leave / (1 - loss),
            p_bad_to_good=leave,
            **fields,
        )

    @property
    def expected_loss(self) -> float:
        """The long-run fraction of packets the loss stage drops (before the queue)."""
        if self.loss_model == "random":
            return self.loss
        enter, leave = self.p_good_to_bad, self.p_bad_to_good
        if enter + leave == 0:
            return self.loss_in_good
        bad = enter / (enter + leave)
        return bad * self.loss_in_bad + (1 - bad) * self.loss_in_good

    def as_dict(self, prefix: str = "link_") -> dict[str, Any]:
        """Flat ``{prefix + field: value}``, plus ``expected_loss``: columns of a result row."""
        record = {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record[prefix + "expected_loss"] = self.expected_loss
        return record

    def label(self) -> str:
        """A short human description, e.g. ``25 ms, 1% loss, 20 Mbit/s`` (for plots)."""
        parts: list[str] = []
        if self.delay_ms:
            parts.append(f"{self.delay_ms:g} ms")
        if self.jitter_ms:
            parts.append(f"±{self.jitter_ms:g} ms")
        if self.expected_loss:
            kind = " bursty" if self.loss_model == "gilbert" else ""
            parts.append(f"{self.expected_loss * 100:.3g}%{kind} loss")
        if self.rate_mbps is not None:
            parts.append(f"{self.rate_mbps:g} Mbit/s")
        for name in ("reorder", "duplicate", "corrupt"):
            value = getattr(self, name)
            if value:
                parts.append(f"{value * 100:.3g}% {name}")
        return ", ".join(parts) or "perfect"


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectionStats:
    """Counters of one direction, as a snapshot. Packets are datagrams; bytes are payload."""

    received_packets: int = 0
    "Datagrams that entered this direction."
    received_bytes: int = 0
    "Their bytes."
    forwarded_packets: int = 0
    "Datagrams handed to the outgoing socket, duplicates included."
    forwarded_bytes: int = 0
    "Their bytes."
    lost_packets: int = 0
    "Dropped by the loss model."
    lost_bytes: int = 0
    "Their bytes."
    queue_dropped_packets: int = 0
    "Dropped because the bottleneck queue was full (tail drop)."
    queue_dropped_bytes: int = 0
    "Their bytes."
    overflow_packets: int = 0
    "Dropped because the direction already held MAX_PENDING_PACKETS / _BYTES in flight."
    duplicated_packets: int = 0
    "Extra copies made (each also counts in forwarded_packets when delivered)."
    reordered_packets: int = 0
    "Packets held back by reorder_delay_ms."
    corrupted_packets: int = 0
    "Delivered copies with a bit flipped (still forwarded: the receiver must reject them)."
    host_dropped_packets: int = 0
    "Lost by the relay's own host, not the emulated link: socket send buffer full, closed flow."
    pending_packets: int = 0
    "In flight at the time of the snapshot (queued, delayed or held back)."
    peak_queue_packets: int = 0
    "Most packets ever in the bottleneck queue at once."
    queue_delay_s: float = 0.0
    "Total time packets spent in the bottleneck (waiting + serialization), seconds."

    @property
    def dropped_packets(self) -> int:
        """Every packet the emulated link dropped: loss + tail drop + overflow."""
        return self.lost_packets + self.queue_dropped_packets + self.overflow_packets

    @property
    def mean_queue_delay_ms(self) -> float:
        """Mean time in the bottleneck per packet that went through it, ms (0 without one)."""
        through = self.received_packets - self.lost_packets - self.queue_dropped_packets
        through -= self.overflow_packets
        return self.queue_delay_s * 1000.0 / through if through > 0 else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """Flat ``{prefix + counter: value}``, derived figures included."""
        record = {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record[prefix + "dropped_packets"] = self.dropped_packets
        record[prefix + "mean_queue_delay_ms"] = self.mean_queue_delay_ms
        return record


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStats:
    """A snapshot of both directions' counters."""

    uplink: DirectionStats
    "Client → server (towards ``target``)."
    downlink: DirectionStats
    "Server → client."
    clients: int
    "Client addresses with an upstream socket at the time of the snapshot."

    def as_dict(self, prefix: str = "link_") -> dict[str, Any]:
        """Flat: ``link_up_<counter>``, ``link_down_<counter>``, ``link_clients``."""
        return {
            **self.uplink.as_dict(prefix + "up_"),
            **self.downlink.as_dict(prefix + "down_"),
            prefix + "clients": self.clients,
        }


_COUNTERS = tuple(
    f.name
    for f in dataclasses.fields(DirectionStats)
    if f.name not in ("pending_packets", "host_dropped_packets")
)


class LinkModel:
    """One direction of an emulated link, sans I/O: packets go in with a time, come out when due.

    ``dest`` is opaque (the glue's "where to send it"); it travels with the packet. Time is any
    monotonic clock in seconds, the same for ``submit`` and ``deliver_due``.
    """

    # The counters are plain attributes: incrementing one is the cheapest thing Python does.
    received_packets: int
    received_bytes: int
    forwarded_packets: int
    forwarded_bytes: int
    lost_packets: int
    lost_bytes: int
    queue_dropped_packets: int
    queue_dropped_bytes: int
    overflow_packets: int
    duplicated_packets: int
    reordered_packets: int
    corrupted_packets: int
    peak_queue_packets: int
    queue_delay_s: float

    def __init__(
        self, profile: LinkProfile | None = None, *, seed: int = 1, name: str = ""
    ) -> None:
        def stream(what: str) -> random.Random:
            return random.Random(f"qsftp-netem:{seed}:{name}:{what}")

        self._rng_loss = stream("loss")
        self._rng_jitter = stream("jitter")
        self._rng_reorder = stream("reorder")
        self._rng_duplicate = stream("duplicate")
        self._rng_corrupt = stream("corrupt")
        # FIFO part of the delay line: release times never decrease (see submit).
        self._line: collections.deque[tuple[float, Any, bytes]] = collections.deque()
        # Held-back (reordered) packets, a heap by release time, then arrival order.
        self._held: list[tuple[float, int, Any, bytes]] = []
        self._held_seq = 0
        self._last_release = -math.inf
        # The bottleneck: departure time and size of each packet still in it.
        self._queue: collections.deque[tuple[float, int]] = collections.deque()
        self._queue_size = 0
        self._busy_until = -math.inf
        self._bad = False  # Gilbert-Elliott state
        self._pending_bytes = 0
        self.reset_counters()
        self.profile = profile if profile is not None else LinkProfile()

    @property
    def profile(self) -> LinkProfile:
        """The impairments; assigning a new profile applies to packets submitted from then on."""
        return self._profile

    @profile.setter
    def profile(self, profile: LinkProfile) -> None:
        self._profile = profile
        # Cached in plain attributes: submit() runs once per datagram.
        self._loss = profile.loss if profile.loss_model == "random" else 0.0
        self._gilbert = profile.loss_model == "gilbert"
        self._delay = profile.delay_ms / 1000.0
        self._jitter = profile.jitter_ms / 1000.0
        self._seconds_per_byte = 8.0 / (profile.rate_mbps * 1e6) if profile.rate_mbps else 0.0
        self._queue_packets = profile.queue_packets
        self._queue_bytes = profile.queue_bytes or MAX_PENDING_BYTES
        self._reorder = profile.reorder
        self._reorder_delay = profile.reorder_delay_ms / 1000.0
        self._duplicate = profile.duplicate
        self._corrupt = profile.corrupt

    def reset_counters(self) -> None:
        """Zero every counter (packets in flight stay in flight)."""
        for name in _COUNTERS:
            setattr(self, name, 0)
        self.queue_delay_s = 0.0

    @property
    def pending_packets(self) -> int:
        """Packets submitted and not yet delivered."""
        return len(self._line) + len(self._held)

    def stats(self, *, host_dropped: int = 0) -> DirectionStats:
        """A snapshot of the counters (``host_dropped`` is the glue's to count)."""
        return DirectionStats(
            **{name: getattr(self, name) for name in _COUNTERS},
            pending_packets=self.pending_packets,
            host_dropped_packets=host_dropped,
        )

    def submit(self, data: bytes, now: float, dest: Any) -> None:
        """Take one packet arriving at ``now``: drop it, or schedule it (and any copy)."""
        size = len(data)
        self.received_packets += 1
        self.received_bytes += size
        # 1. Loss, before the queue: a lost packet takes no bottleneck capacity.
        if self._gilbert:
            profile = self._profile
            rng = self._rng_loss
            if self._bad:
                if rng.random() < profile.p_bad_to_good:
                    self._bad = False
            elif rng.random() < profile.p_good_to_bad:
                self._bad = True
            lose = profile.loss_in_bad if self._bad else profile.loss_in_good
            if lose and rng.random() < lose:
                self.lost_packets += 1
                self.lost_bytes += size
                return
        elif self._loss and self._rng_loss.random() < self._loss:
            self.lost_packets += 1
            self.lost_bytes += size
            return
        if (
            len(self._line) + len(self._held) >= MAX_PENDING_PACKETS
            or self._pending_bytes + size > MAX_PENDING_BYTES
        ):
            self.overflow_packets += 1
            return
        # 2. Bottleneck: a FIFO drained at the link rate. Departure times are computed, not
        # waited for: a packet leaves when the ones before it have been serialized.
        if self._seconds_per_byte:
            queue = self._queue
            while queue and queue[0][0] <= now:
                self._queue_size -= queue.popleft()[1]
            if len(queue) >= self._queue_packets or self._queue_size + size > self._queue_bytes:
                self.queue_dropped_packets += 1
                self.queue_dropped_bytes += size
                return
            depart = max(now, self._busy_until) + size * self._seconds_per_byte
            self._busy_until = depart
            queue.append((depart, size))
            self._queue_size += size
            self.peak_queue_packets = max(self.peak_queue_packets, len(queue))
            self.queue_delay_s += depart - now
        else:
            depart = now
        # 3. Propagation delay ± jitter. Never before an earlier packet: jitter alone does not
        # reorder (a real path's delay varies, its packet order mostly does not).
        release = depart + self._delay
        if self._jitter:
            release = max(depart, release + self._rng_jitter.uniform(-self._jitter, self._jitter))
        release = max(release, self._last_release)
        # 4.-6. Reorder, duplicate, corrupt.
        held = bool(self._reorder) and self._rng_reorder.random() < self._reorder
        copies = 2 if self._duplicate and self._rng_duplicate.random() < self._duplicate else 1
        if copies == 2:
            self.duplicated_packets += 1
        if held:
            self.reordered_packets += 1
            release += self._reorder_delay
        else:
            self._last_release = release
        for _ in range(copies):
            copy = data
            if self._corrupt and size and self._rng_corrupt.random() < self._corrupt:
                bit = self._rng_corrupt.randrange(size * 8)
                flipped = bytearray(data)
                flipped[bit >> 3] ^= 1 << (bit & 7)
                copy = bytes(flipped)
                self.corrupted_packets += 1
            self._pending_bytes += size
            if held:
                self._held_seq += 1
                heapq.heappush(self._held, (release, self._held_seq, dest, copy))
            else:
                self._line.append((release, dest, copy))

    def next_release(self) -> float | None:
        """When the next packet is due, or None when nothing is in flight."""
        line, held = self._line, self._held
        if line:
            return min(line[0][0], held[0][0]) if held else line[0][0]
        return held[0][0] if held else None

    def deliver_due(self, now: float, send: Callable[[Any, bytes], None]) -> int:
        """Call ``send(dest, data)`` for every packet due at ``now``, in order; return how many."""
        line, held = self._line, self._held
        count = size = 0
        while True:
            if line and line[0][0] <= now and not (held and held[0][0] < line[0][0]):
                _, dest, data = line.popleft()
            elif held and held[0][0] <= now:
                _, _, dest, data = heapq.heappop(held)
            else:
                break
            count += 1
            size += len(data)
            send(dest, data)
        self.forwarded_packets += count
        self.forwarded_bytes += size
        self._pending_bytes -= size
        return count

    def clear(self) -> int:
        """Drop every packet in flight (closing the link); return how many there were."""
        dropped = self.pending_packets
        self._line.clear()
        self._held.clear()
        self._queue.clear()
        self._queue_size = self._pending_bytes = 0
        return dropped


class _Pump:
    """Delivers one direction's due packets and keeps one timer armed for the next."""

    __slots__ = ("_loop", "_on_idle", "_send", "_slack", "_timer", "_timer_at", "model")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        model: LinkModel,
        send: Callable[[Any, bytes], None],
        on_idle: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.model = model
        self._send = send
        self._on_idle = on_idle
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        uvloop = type(loop).__module__.startswith("uvloop")
        self._slack = _TIMER_SLACK_UVLOOP if uvloop else _TIMER_SLACK

    def run(self) -> None:
        model = self.model
        now = time.monotonic()
        model.deliver_due(now + self._slack, self._send)
        due = model.next_release()
        if due is None:
            self.cancel()
            self._on_idle()
            return
        at = due - self._slack
        if self._timer is not None and self._timer_at <= at:
            return  # armed early enough; it re-runs and re-arms
        self.cancel()
        # The model's clock is time.monotonic(); uvloop's loop.time() is another (cached,
        # millisecond) clock, so timers are set by delay, not with loop.call_at.
        self._timer_at = at
        self._timer = self._loop.call_later(at - now, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.run()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf


class _Flow:
    """One client address and the upstream socket that speaks for it."""

    __slots__ = ("addr", "endpoint")

    def __init__(self, addr: Any, endpoint: DatagramEndpoint) -> None:
        self.addr = addr
        self.endpoint = endpoint


def _address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _direction_profiles(
    profile: LinkProfile | None,
    uplink: LinkProfile | None,
    downlink: LinkProfile | None,
    shorthand: dict[str, Any],
) -> tuple[LinkProfile, LinkProfile]:
    """The (uplink, downlink) profiles a relay's keywords ask for: the profile fields given as
    keywords, or ``profile``, for both directions; ``uplink=`` / ``downlink=`` override one."""
    if shorthand and profile is not None:
        raise UsageError("give either profile= or profile fields as keywords, not both")
    if shorthand:
        try:
            profile = LinkProfile(**shorthand)
        except TypeError:
            known = {f.name for f in dataclasses.fields(LinkProfile)}
            unknown = ", ".join(sorted(set(shorthand) - known))
            raise UsageError(f"not a LinkProfile field: {unknown}") from None
    base = profile if profile is not None else LinkProfile()
    return (
        uplink if uplink is not None else base,
        downlink if downlink is not None else base,
    )


class _TwoWayProfiles(abc.ABC):
    """A link with one :class:`LinkProfile` per direction, whose label, columns and counters
    read the same way: the relays here and :class:`qsftp.packetlink.PacketLink`. A subclass
    gives the profiles and the counters."""

    seed: int

    @property
    @abc.abstractmethod
    def uplink(self) -> LinkProfile:
        """The client → server profile."""

    @property
    @abc.abstractmethod
    def downlink(self) -> LinkProfile:
        """The server → client profile."""

    @abc.abstractmethod
    def stats(self) -> LinkStats:
        """A snapshot of both directions' counters."""

    def label(self) -> str:
        """The profile's label, or ``up: …; down: …`` when the directions differ."""
        if self.uplink == self.downlink:
            return self.uplink.label()
        return f"up: {self.uplink.label()}; down: {self.downlink.label()}"

    def as_dict(self, prefix: str = "link_") -> dict[str, Any]:
        """Both profiles as flat columns: ``link_up_delay_ms``, ``link_down_delay_ms``, ..."""
        return {
            **self.uplink.as_dict(prefix + "up_"),
            **self.downlink.as_dict(prefix + "down_"),
            prefix + "seed": self.seed,
        }

    def stats_dict(self, prefix: str = "link_") -> dict[str, Any]:
        """:meth:`stats` flattened for a DataFrame row (``link_up_lost_packets``, ...)."""
        return self.stats().as_dict(prefix)


class _Lifecycle(abc.ABC):
    """``start()`` and ``close()``, and ``async with`` calling them: the relays here and the
    packet links of :mod:`qsftp.packetlink`."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Bring the link up (open its sockets)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Take the link down and release what it holds."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _TwoWayLink(_TwoWayProfiles, _Lifecycle):
    """What :class:`LinkEmulator` and :class:`StreamRelay` share: a relay with one
    :class:`LinkProfile` per direction, used with ``async with``. A subclass gives the
    profiles, the counters and the lifecycle."""


class _ModelledLink(_TwoWayProfiles):
    """A link whose directions are :class:`LinkModel` s (``_up``, ``_down``) pumped in this
    process: :class:`LinkEmulator` and :class:`qsftp.packetlink.PacketLink`. The subclass
    sets ``_up``, ``_down``, ``_host_dropped`` ([0, 0]), ``_drained`` ([]) and ``_closed``,
    and calls :meth:`_wake_drained` when a direction goes idle and when it closes."""

    _up: LinkModel
    _down: LinkModel
    _host_dropped: list[int]
    _drained: list[asyncio.Future[None]]
    _closed: bool

    # --- configuration --------------------------------------------------------------------

    @property
    def uplink(self) -> LinkProfile:
        """The client → server profile (assignable; applies to packets from then on)."""
        return self._up.profile

    @uplink.setter
    def uplink(self, profile: LinkProfile) -> None:
        self._up.profile = profile

    @property
    def downlink(self) -> LinkProfile:
        """The server → client profile (assignable; applies to packets from then on)."""
        return self._down.profile

    @downlink.setter
    def downlink(self, profile: LinkProfile) -> None:
        self._down.profile = profile

    def reset_stats(self) -> None:
        """Zero the counters; packets in flight stay in flight."""
        self._up.reset_counters()
        self._down.reset_counters()
        self._host_dropped = [0, 0]

    async def wait_drained(self, timeout: float = 10.0) -> None:
        """Wait until no packet is in flight in either direction (or the link is closed)."""
        if self._closed or not (self._up.pending_packets or self._down.pending_packets):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drained.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._drained.remove(waiter)

    def _wake_drained(self) -> None:
        if self._drained and (
            self._closed or not (self._up.pending_packets or self._down.pending_packets)
        ):
            for waiter in self._drained:
                if not waiter.done():
                    waiter.set_result(None)


class LinkEmulator(_ModelledLink, _TwoWayLink):
    """A UDP relay to ``target`` that impairs each direction as its :class:`LinkProfile` says.

    ``LinkEmulator(target, delay_ms=25, loss=0.01)`` applies the keyword profile fields to both
    directions; ``profile=`` does the same with a :class:`LinkProfile`; ``uplink=`` (client →
    server) and ``downlink=`` (server → client) override one direction each. Clients send to
    ``host, port`` (``port=0``: a free one, read it after start). Use ``async with``, or
    ``await start()`` and ``await close()``.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        profile: LinkProfile | None = None,
        uplink: LinkProfile | None = None,
        downlink: LinkProfile | None = None,
        seed: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        max_clients: int = MAX_CLIENTS,
        **shorthand: Any,
    ) -> None:
        up, down = _direction_profiles(profile, uplink, downlink, shorthand)
        if not (_is_count(max_clients) and max_clients >= 1):
            raise UsageError(f"max_clients must be a positive integer, not {max_clients!r}")
        self.target = (str(target[0]), int(target[1]))
        "Where datagrams from clients go: (host, port)."
        self.seed = seed
        "The seed of every random choice; the same seed gives the same fates."
        self.host = host
        "Where clients send to (the listening address)."
        self.port = port
        "The listening port (the real one once started)."
        self.max_clients = max_clients
        self._up = LinkModel(up, seed=seed, name="uplink")
        self._down = LinkModel(down, seed=seed, name="downlink")
        self._flows: collections.OrderedDict[Any, _Flow] = collections.OrderedDict()
        self._listener: DatagramEndpoint | None = None
        self._pumps: list[_Pump] = []
        self._target_addr: Any = None
        self._target_family = socket.AF_INET
        # Host drops of the uplink, downlink not visible on a live endpoint: evicted clients'
        # sockets (and packets still in flight for them), clients no socket could be opened for.
        self._host_dropped = [0, 0]
        self._drained: list[asyncio.Future[None]] = []
        self._started = self._closed = False

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._started else "not started"
        return f"<LinkEmulator {where} → {self.target[0]}:{self.target[1]} {self.label()}>"

    # --- counters ---------------------------------------------------------------------------

    def stats(self) -> LinkStats:
        """A snapshot of both directions' counters."""
        up_host = self._host_dropped[0] + sum(f.endpoint.dropped for f in self._flows.values())
        down_host = self._host_dropped[1] + (self._listener.dropped if self._listener else 0)
        return LinkStats(
            uplink=self._up.stats(host_dropped=up_host),
            downlink=self._down.stats(host_dropped=down_host),
            clients=len(self._flows),
        )

    def rebind(self) -> int:
        """Give every client a new upstream socket, so the server sees it arrive from a new
        source port mid-connection, as after a NAT rebinding; returns how many moved. Packets
        still queued for the old sockets are lost (counted as host drops)."""
        moved = 0
        for addr, flow in list(self._flows.items()):
            self._host_dropped[0] += flow.endpoint.dropped
            flow.endpoint.close()
            del self._flows[addr]
            if self._open_flow(addr) is not None:
                moved += 1
        return moved

    def reset_stats(self) -> None:
        """Zero the counters (e.g. between the transfers of a sweep); in-flight packets stay."""
        super().reset_stats()
        for flow in self._flows.values():
            flow.endpoint.dropped = 0
        if self._listener is not None:
            self._listener.dropped = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the target and open the listening socket."""
        if self._started:
            raise UsageError("this LinkEmulator was already started")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(*self.target, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise TransportError(f"cannot resolve {self.target[0]}: {exc.strerror}") from exc
        self._target_family, _, _, _, self._target_addr = infos[0]
        sock = socket.socket(_address_family(self.host), socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._listener = DatagramEndpoint(
            sock, receive=self._from_client, after_batch=self._flush, error=self._socket_error
        )
        self.host, self.port = sock.getsockname()[:2]
        listener = self._listener
        self._pumps = [
            _Pump(loop, self._up, self._send_up, self._wake_drained),
            _Pump(
                loop, self._down, lambda addr, data: listener.sendto(data, addr), self._wake_drained
            ),
        ]
        self._started = True
        logger.info(
            "link emulator on %s:%s → %s:%s: %s", self.host, self.port, *self.target, self.label()
        )

    async def close(self) -> None:
        """Stop: cancel every timer, drop the packets in flight, close every socket."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()
        self._up.clear()
        self._down.clear()
        for flow in self._flows.values():
            flow.endpoint.close()
        self._flows.clear()
        if self._listener is not None:
            self._listener.close()
        self._wake_drained()

    # --- datagrams ---------------------------------------------------------------------------

    def _from_client(self, data: bytes, addr: Any) -> None:
        flows = self._flows
        flow = flows.get(addr)
        if flow is None:
            flow = self._open_flow(addr)
            if flow is None:
                self._host_dropped[0] += 1
                return
        else:
            flows.move_to_end(addr)
        self._up.submit(data, time.monotonic(), flow)

    def _from_server(self, addr: Any, data: bytes, _source: Any) -> None:
        self._down.submit(data, time.monotonic(), addr)

    def _send_up(self, flow: _Flow, data: bytes) -> None:
        endpoint = flow.endpoint
        if endpoint.is_closing():  # the client was evicted while this packet was in flight
            self._host_dropped[0] += 1
            return
        endpoint.sendto(data)

    def _flush(self) -> None:
        for pump in self._pumps:
            pump.run()

    def _open_flow(self, addr: Any) -> _Flow | None:
        flows = self._flows
        while len(flows) >= self.max_clients:
            _, evicted = flows.popitem(last=False)
            self._host_dropped[0] += evicted.endpoint.dropped
            evicted.endpoint.close()
            logger.debug("link emulator: evicted the idlest client %s", evicted.addr)
        sock = socket.socket(self._target_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self._target_addr)
            endpoint = DatagramEndpoint(
                sock,
                receive=functools.partial(self._from_server, addr),
                after_batch=self._flush,
                error=self._socket_error,
            )
        except OSError as exc:
            sock.close()
            logger.warning("link emulator: no upstream socket for %s: %s", addr, exc)
            return None
        flow = flows[addr] = _Flow(addr, endpoint)
        return flow

    def _socket_error(self, exc: OSError) -> None:
        # ICMP errors (e.g. the server has gone) arrive for a datagram already forwarded.
        logger.debug("link emulator socket error: %s", exc)


# --- a byte-stream relay for TCP --------------------------------------------------------------

# Bytes read from a socket at a time: the grain at which the stream relay paces and delays
# (a 16 KiB burst is 6.5 ms at 20 Mbit/s, 0.13 ms at 1 Gbit/s).
STREAM_SEGMENT = 16 * 1024
# Backlog of a stream relay's bottleneck, bytes per queued packet, when the profile gives
# queue_packets only: a 1500-byte MTU packet.
STREAM_PACKET_BYTES = 1500
# Connections a StreamRelay carries at once; more are refused (closed at once).
MAX_STREAM_CONNECTIONS = 256
# The fields a byte stream cannot honour: they act on packets, which a TCP relay never sees.
_PACKET_ONLY = ("jitter_ms", "reorder", "duplicate", "corrupt")


def stream_relay_problems(profile: LinkProfile) -> list[str]:
    """What of ``profile`` a :class:`StreamRelay` cannot apply (empty: it can apply all)."""
    problems = [name for name in _PACKET_ONLY if getattr(profile, name)]
    if profile.expected_loss:
        problems.insert(0, "loss")
    return problems


class _Segment:
    __slots__ = ("data", "due")

    def __init__(self, due: float, data: bytes) -> None:
        self.due = due
        self.data = data


class _StreamDirection:
    """One direction of a StreamRelay: its profile and counters (bytes; reads as packets)."""

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        self.rate = profile.rate_mbps * 1e6 / 8 if profile.rate_mbps is not None else None
        self.backlog = (
            profile.queue_bytes
            if profile.queue_bytes is not None
            else profile.queue_packets * STREAM_PACKET_BYTES
        )
        self.delay = profile.delay_ms / 1000.0
        self.pending = 0  # bytes read and not yet written on
        self.reset()

    def reset(self) -> None:
        self.received_packets = self.received_bytes = 0
        self.forwarded_packets = self.forwarded_bytes = 0
        self.queue_delay_s = 0.0
        self.peak_backlog = 0

    def stats(self) -> DirectionStats:
        return DirectionStats(
            received_packets=self.received_packets,
            received_bytes=self.received_bytes,
            forwarded_packets=self.forwarded_packets,
            forwarded_bytes=self.forwarded_bytes,
            pending_packets=1 if self.pending else 0,
            peak_queue_packets=-(-self.peak_backlog // STREAM_PACKET_BYTES),
            queue_delay_s=self.queue_delay_s,
        )


class StreamRelay(_TwoWayLink):
    """A TCP relay to ``target`` that applies each direction's delay and rate to the byte
    stream: the counterpart of :class:`LinkEmulator` for qsftp/1 over TCP.

    Every accepted connection gets its own connection to ``target``. In each direction the
    bytes go through a bottleneck drained at ``rate_mbps`` whose backlog is bounded by the
    profile's queue (``queue_bytes``, else ``queue_packets`` × 1500 bytes): when it is full
    the relay stops reading, so the sender's TCP is held back by flow control (the
    socket-level backlog) instead of losing packets; then each byte waits ``delay_ms``. The
    first bytes from a client also wait one round trip, standing in for the TCP handshake the
    client completes with the relay at once.

    A byte stream has no packets to lose, reorder, duplicate, corrupt or jitter: a profile
    asking for any of these is a UsageError (use :class:`LinkEmulator` for QUIC, or the
    packet-level mode, where TCP meets the same packet impairments). And since the sender's
    TCP connection ends at the relay, its congestion control sees the relay, not the emulated
    bottleneck: what this measures is qsftp/1 over TLS/TCP paced by a link's rate and delayed
    by its latency (docs/NETWORK-LAB.md).
    """

    link_mode = "stream-relay"
    "The ``link_mode`` of sweep rows measured through it."

    def __init__(
        self,
        target: tuple[str, int],
        *,
        profile: LinkProfile | None = None,
        uplink: LinkProfile | None = None,
        downlink: LinkProfile | None = None,
        seed: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        **shorthand: Any,
    ) -> None:
        up, down = _direction_profiles(profile, uplink, downlink, shorthand)
        for name, direction in (("uplink", up), ("downlink", down)):
            problems = stream_relay_problems(direction)
            if problems:
                raise UsageError(
                    f"a byte-stream relay (TCP) can apply delay and rate only, not "
                    f"{', '.join(problems)} ({name}: {direction.label()}); use LinkEmulator "
                    "(QUIC over UDP) or the packet-level mode for packet impairments"
                )
        self.target = (str(target[0]), int(target[1]))
        "Where connections go: (host, port)."
        self.seed = seed
        "Recorded with the link's columns; nothing here is random."
        self.host = host
        "Where clients connect to."
        self.port = port
        "The listening port (the real one once started)."
        self._up = _StreamDirection(up)
        self._down = _StreamDirection(down)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<StreamRelay {self.host}:{self.port} → {self.target[0]}:{self.target[1]} " + (
            f"{self.label()}>"
        )

    @property
    def uplink(self) -> LinkProfile:
        """The client → server profile."""
        return self._up.profile

    @property
    def downlink(self) -> LinkProfile:
        """The server → client profile."""
        return self._down.profile

    def stats(self) -> LinkStats:
        """Counters in LinkEmulator's shape: "packets" are the relay's reads (at most
        STREAM_SEGMENT bytes); nothing is ever dropped; ``pending_packets`` is 1 while bytes
        are in flight; ``peak_queue_packets`` is the peak backlog in 1500-byte units."""
        return LinkStats(
            uplink=self._up.stats(), downlink=self._down.stats(), clients=len(self._tasks)
        )

    def reset_stats(self) -> None:
        """Zero the counters (bytes in flight stay)."""
        self._up.reset()
        self._down.reset()

    async def start(self) -> None:
        """Open the listening socket."""
        if self._server is not None:
            raise UsageError("this StreamRelay was already started")
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port)
        except OSError as exc:
            raise TransportError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        logger.info(
            "stream relay on %s:%s → %s:%s: %s", self.host, self.port, *self.target, self.label()
        )

    async def close(self) -> None:
        """Stop listening and drop every connection (bytes in flight are lost)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_drained(self, timeout: float = 10.0) -> None:
        """Wait until no byte is in flight in either direction."""
        async with asyncio.timeout(timeout):
            while self._up.pending or self._down.pending:
                self._changed.clear()
                await self._changed.wait()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= MAX_STREAM_CONNECTIONS:
            writer.close()
            return
        # Our own task (not asyncio's callback task), so that close() can cancel it quietly.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        # The client's TCP handshake ended at the relay at once; the emulated one would have
        # taken a round trip before the client could send.
        handshake = loop.time() + self._up.delay + self._down.delay
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._carry(reader, upstream, self._up, handshake))
                tasks.create_task(self._carry(up_reader, writer, self._down, 0.0))
        except* (OSError, EOFError) as group:
            logger.debug("stream relay connection ended: %s", group.exceptions[0])
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.close()

    async def _carry(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: _StreamDirection,
        not_before: float,
    ) -> None:
        """Read, pace through the bottleneck, delay, write: one direction of one connection."""
        loop = asyncio.get_running_loop()
        segments: asyncio.Queue[_Segment | None] = asyncio.Queue()
        busy_until = 0.0  # when the bottleneck finishes the bytes accepted so far

        async def deliver() -> None:
            while (segment := await segments.get()) is not None:
                wait = segment.due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(segment.data)
                await writer.drain()
                direction.pending -= len(segment.data)
                direction.forwarded_packets += 1
                direction.forwarded_bytes += len(segment.data)
                self._changed.set()
            if writer.can_write_eof():
                writer.write_eof()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(deliver())
            try:
                while True:
                    now = loop.time()
                    rate = direction.rate
                    if rate is not None:
                        # A full bottleneck: stop reading until it has room (flow control).
                        backlog = (busy_until - now) * rate
                        if backlog > direction.backlog:
                            await asyncio.sleep((backlog - direction.backlog) / rate)
                    while direction.pending > MAX_PENDING_BYTES:
                        self._changed.clear()
                        await self._changed.wait()
                    data = await reader.read(STREAM_SEGMENT)
                    if not data:
                        break
                    now = loop.time()
                    start = max(now, busy_until)
                    busy_until = start + len(data) / rate if rate is not None else now
                    if rate is not None:
                        direction.peak_backlog = max(
                            direction.peak_backlog, round((busy_until - now) * rate)
                        )
                    direction.queue_delay_s += busy_until - now
                    direction.received_packets += 1
                    direction.received_bytes += len(data)
                    direction.pending += len(data)
                    segments.put_nowait(
                        _Segment(max(busy_until, not_before) + direction.delay, data)
                    )
            finally:
                segments.put_nowait(None)


# --- calibration: how accurate is the emulator on this machine? ---------------------------------

# The traffic generator and the receiver of a calibration run are child processes, so the
# emulator (in this process) is measured alone, as it runs beside a client in a notebook.
_SENDER = r"""
import json, socket, struct, sys, time
host, port, size, pps, seconds = json.loads(sys.argv[1])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
pad = bytes(size - 16)
start = time.monotonic()
sent = 0
while (elapsed := time.monotonic() - start) < seconds:
    while sent < elapsed * pps:
        sock.sendto(struct.pack("!Qd", sent, time.monotonic()) + pad, (host, port))
        sent += 1
    time.sleep(0.0005)
print(json.dumps({"sent": sent}))
"""
_RECEIVER = r"""
import json, socket, struct, sys, time
host, deadline, idle = json.loads(sys.argv[1])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind((host, 0))
print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
sock.settimeout(idle)
count = size = 0
first = last = None
delays = []
end = time.monotonic() + deadline
while time.monotonic() < end:
    try:
        data = sock.recv(65535)
    except TimeoutError:
        if count:
            break
        continue
    now = time.monotonic()
    if first is None:
        first = now
    else:
        size += len(data)  # bytes after the first arrival, over the time since it
    last = now
    count += 1
    delays.append(now - struct.unpack("!Qd", data[:16])[1])
delays.sort()
pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] * 1000 if delays else None
print(json.dumps({
    "count": count, "bytes_after_first": size,
    "seconds": (last - first) if count > 1 else None,
    "one_way_p50_ms": pick(0.5), "one_way_p99_ms": pick(0.99),
}))
"""
# The bottleneck queue of a calibration rate run, in milliseconds of the link's rate.
_CALIBRATION_QUEUE_MS = 50.0
# A calibration receiver stops after this long without a datagram (the run is over).
_CALIBRATION_IDLE = 0.5


async def _child(code: str, arg: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        json.dumps(arg),
        stdout=subprocess.PIPE,
    )


async def _child_result(process: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            line = await process.stdout.readline()
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TransportError("a calibration helper process did not finish in time") from None
    result: dict[str, Any] = json.loads(line)
    return result


async def _calibration_run(
    profile: LinkProfile, *, size: int, packets_per_second: float, seconds: float
) -> dict[str, Any]:
    host = "127.0.0.1"
    receiver = await _child(_RECEIVER, [host, seconds + 30.0, _CALIBRATION_IDLE])
    try:
        assert receiver.stdout is not None
        async with asyncio.timeout(10):
            port = json.loads(await receiver.stdout.readline())["port"]
        async with LinkEmulator((host, port), profile=profile) as link:
            cpu, wall = time.process_time(), time.perf_counter()
            sender = await _child(_SENDER, [host, link.port, size, packets_per_second, seconds])
            sent = (await _child_result(sender, seconds + 30.0))["sent"]
            await link.wait_drained(timeout=30.0)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            stats = link.stats().uplink
        received = await _child_result(receiver, 30.0)
    finally:
        if receiver.returncode is None:
            receiver.kill()
            await receiver.wait()
    return {
        "datagram_size": size,
        **_run_columns(
            size=size,
            packet=size,
            packets_per_second=packets_per_second,
            sent=sent,
            stats=stats,
            received=received,
        ),
        "emulator_cpu_share": cpu / wall,
    }


def _run_columns(
    *,
    size: int,
    packet: int,
    packets_per_second: float,
    sent: int,
    stats: DirectionStats,
    received: dict[str, Any],
) -> dict[str, Any]:
    """A calibration run's columns from ``offered_pps`` to ``one_way_p99_ms`` (also the
    packet link's): rates count ``packet`` bytes on the link per datagram of ``size``."""
    delivered = (
        received["bytes_after_first"] * packet / size * 8 / received["seconds"] / 1e6
        if received["seconds"]
        else 0.0
    )
    return {
        "offered_pps": packets_per_second,
        "offered_mbps": packets_per_second * packet * 8 / 1e6,
        "sent": sent,
        "link_received": stats.received_packets,
        "lost_before_link": sent - stats.received_packets,
        "queue_dropped": stats.queue_dropped_packets,
        "host_dropped": stats.host_dropped_packets,
        "forwarded": stats.forwarded_packets,
        "receiver_count": received["count"],
        "delivered_mbps": delivered,
        "one_way_p50_ms": received["one_way_p50_ms"],
        "one_way_p99_ms": received["one_way_p99_ms"],
    }


async def _calibration_rows(
    run: Callable[..., Awaitable[dict[str, Any]]],
    *,
    rates_mbps: Sequence[float],
    sizes: Sequence[int],
    packet_rates: Sequence[float],
    seconds: float,
    delay_ms: float,
    overload: float,
    overhead: int = 0,
) -> list[dict[str, Any]]:
    """The rate runs, then the delay runs, of a calibration (also the packet link's), each
    ``await run(profile, size=, packets_per_second=, seconds=)``; a datagram of ``size``
    bytes is ``size + overhead`` on the link, the bytes its rate counts."""
    rows: list[dict[str, Any]] = []
    for rate in rates_mbps:
        for size in sizes:
            packet = size + overhead
            queue = max(2 * packet, int(rate * 1e6 / 8 * _CALIBRATION_QUEUE_MS / 1000))
            profile = LinkProfile(
                delay_ms=delay_ms,
                rate_mbps=rate,
                queue_packets=MAX_QUEUE_PACKETS,
                queue_bytes=min(queue, MAX_PENDING_BYTES),
            )
            pps = overload * rate * 1e6 / 8 / packet
            row = await run(profile, size=size, packets_per_second=pps, seconds=seconds)
            rows.append({"test": "rate", "rate_mbps": rate, "delay_ms": delay_ms, **row})
            rows[-1]["rate_error"] = row["delivered_mbps"] / rate - 1
    for pps in packet_rates:
        profile = LinkProfile(delay_ms=delay_ms)
        row = await run(profile, size=1200, packets_per_second=pps, seconds=seconds)
        rows.append({"test": "delay", "rate_mbps": None, "delay_ms": delay_ms, **row})
        rows[-1]["delay_error_ms"] = (
            row["one_way_p50_ms"] - delay_ms if row["one_way_p50_ms"] else None
        )
    return rows


async def _transfer_cost(size: int, datagram_size: int, repeats: int) -> dict[str, Any]:
    """QSFTP upload throughput direct and through a perfect emulated link, same process."""
    import pathlib  # noqa: PLC0415 - only the calibration needs these
    import tempfile  # noqa: PLC0415

    from .client import upload  # noqa: PLC0415
    from .server import serve  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="qsftp-netem-") as tmp:
        src = pathlib.Path(tmp) / "src.bin"
        await asyncio.to_thread(src.write_bytes, random.Random(0).randbytes(size))
        seconds: dict[str, list[float]] = {"direct": [], "emulated": []}
        async with serve(
            f"{tmp}/root", state_dir=f"{tmp}/state", max_datagram_size=datagram_size
        ) as server:
            options: dict[str, Any] = {
                "pin": server.fingerprint,
                "max_datagram_size": datagram_size,
            }
            async with LinkEmulator((server.host, server.port)) as link:
                for _ in range(repeats):
                    for path, (host, port) in (
                        ("direct", (server.host, server.port)),
                        ("emulated", (link.host, link.port)),
                    ):
                        result = await upload(src, host, port, **options)
                        seconds[path].append(result.seconds)
    direct = size / statistics.median(seconds["direct"]) / 1e6
    emulated = size / statistics.median(seconds["emulated"]) / 1e6
    return {
        "test": "qsftp",
        "datagram_size": datagram_size,
        "transfer_bytes": size,
        "direct_mb_s": direct,
        "emulated_mb_s": emulated,
        "emulator_cost": 1 - emulated / direct,
    }


async def calibrate(
    *,
    rates_mbps: Sequence[float] = (10, 50, 100, 200, 400),
    sizes: Sequence[int] = (1200, 16384),
    packet_rates: Sequence[float] = (1000, 5000, 10000, 20000, 40000),
    seconds: float = 2.0,
    delay_ms: float = 10.0,
    overload: float = 1.5,
    transfer_bytes: int = 8_000_000,
    transfer_repeats: int = 3,
) -> list[dict[str, Any]]:
    """Measure this machine's emulator accuracy; one dict per run (a DataFrame row).

    Rate runs: a sender offers ``overload`` × each rate, for each datagram size, to a link
    with that rate, ``delay_ms`` and a 50 ms queue; ``delivered_mbps`` is what the receiver
    counted (bytes after the first arrival over the time since it). Delay runs: 1200-byte
    datagrams at each of ``packet_rates`` through ``delay_ms`` alone; ``one_way_p50_ms`` and
    ``one_way_p99_ms`` are sender-to-receiver times (they include two loopback hops).
    Sender and receiver are child processes; ``emulator_cpu_share`` is this process's CPU.
    QSFTP runs (``transfer_bytes`` > 0): the median upload throughput of ``transfer_repeats``
    uploads, direct and through a perfect emulated link, for each datagram size, with server,
    client and emulator in this process: what the emulator's CPU costs a transfer.
    """
    rows = await _calibration_rows(
        _calibration_run,
        rates_mbps=rates_mbps,
        sizes=sizes,
        packet_rates=packet_rates,
        seconds=seconds,
        delay_ms=delay_ms,
        overload=overload,
    )
    if transfer_bytes > 0:
        for size in sizes:
            rows.append(await _transfer_cost(transfer_bytes, size, transfer_repeats))
    return rows


# --- command line -----------------------------------------------------------------------------


def _field_type(name: str) -> Callable[[str], Any]:
    if name == "loss_model":
        return str
    if name in ("queue_packets", "queue_bytes"):
        return int
    return float


def _profile_option(text: str) -> dict[str, Any]:
    """``delay_ms=10,loss=0.01`` → {"delay_ms": 10.0, "loss": 0.01}."""
    known = {f.name for f in dataclasses.fields(LinkProfile)}
    fields: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise argparse.ArgumentTypeError(f"not a profile field=value: {item!r}")
        try:
            fields[key] = _field_type(key)(value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value in {item!r}") from None
    return fields


def _numbers(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _add_profile_options(command: argparse.ArgumentParser) -> None:
    """A flag per LinkProfile field (both directions), then ``--uplink`` and ``--downlink``
    (also the packet link's ``up``); :func:`_profiles_from_args` reads them back."""
    impairments = command.add_argument_group("impairments, both directions (LinkProfile fields)")
    for field in dataclasses.fields(LinkProfile):
        impairments.add_argument(
            "--" + field.name.replace("_", "-"), type=_field_type(field.name), dest=field.name
        )
    for direction in ("uplink", "downlink"):
        command.add_argument(
            f"--{direction}",
            type=_profile_option,
            metavar="FIELD=VALUE,...",
            help=f"the whole {direction} profile (overrides the flags for that direction)",
        )


def _profiles_from_args(
    args: argparse.Namespace,
) -> tuple[LinkProfile, LinkProfile | None, LinkProfile | None]:
    """(profile, uplink, downlink) from the flags of :func:`_add_profile_options`."""
    fields = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(LinkProfile)
        if getattr(args, f.name) is not None
    }
    return (
        LinkProfile(**fields),
        LinkProfile(**args.uplink) if args.uplink is not None else None,
        LinkProfile(**args.downlink) if args.downlink is not None else None,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.netem", description="An emulated network link (UDP relay)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("relay", help="relay datagrams to --target through the link")
    relay.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    relay.add_argument("--listen", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT")
    relay.add_argument("--seed", type=int, default=1)
    _add_profile_options(relay)
    calibration = commands.add_parser("calibrate", help="measure the emulator's accuracy here")
    calibration.add_argument("--seconds", type=float, default=2.0, help="per run (default 2)")
    calibration.add_argument(
        "--rates",
        type=_numbers,
        default=(10, 50, 100, 200, 400),
        metavar="MBIT,...",
        help="link rates of the rate runs (default 10,50,100,200,400)",
    )
    calibration.add_argument(
        "--sizes",
        type=_numbers,
        default=(1200, 16384),
        metavar="BYTES,...",
        help="datagram sizes of the rate runs (default 1200,16384)",
    )
    calibration.add_argument(
        "--packet-rates",
        type=_numbers,
        default=(1000, 5000, 10000, 20000, 40000),
        metavar="PPS,...",
        help="packets/s of the delay runs (default 1000,...,40000)",
    )
    calibration.add_argument(
        "--transfer-bytes",
        type=int,
        default=8_000_000,
        metavar="BYTES",
        help="QSFTP upload size of the cost runs; 0 skips them (default 8000000)",
    )
    calibration.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    return parser


def _out(text: str) -> None:
    """The CLI's only way to print."""
    print(text, flush=True)  # noqa: T201


class _Running(Protocol):
    """What :func:`_run_until_signal` holds up: a link used with ``async with``."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def stats_dict(self, prefix: str = ...) -> dict[str, Any]: ...


async def _run_until_signal(link: _Running, ready: Callable[[], str]) -> None:
    """Start ``link``, print ``ready()``, and at SIGINT/SIGTERM print its counters (as JSON)
    and close it (also the packet link's ``up``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with link:
        _out(ready())
        await stop.wait()
        _out(json.dumps(link.stats_dict()))


async def _relay(args: argparse.Namespace) -> None:
    profile, uplink, downlink = _profiles_from_args(args)
    link = LinkEmulator(
        args.target,
        profile=profile,
        uplink=uplink,
        downlink=downlink,
        seed=args.seed,
        host=args.listen[0],
        port=args.listen[1],
    )
    await _run_until_signal(
        link,
        lambda: (
            f"qsftp link emulator ready on {link.host}:{link.port} → "
            f"{link.target[0]}:{link.target[1]}: {link.label()}"
        ),
    )


def _table(
    rows: Iterable[dict[str, Any]],
    *,
    size_column: str = "datagram_size",
    rate_size: str = "B",
    cpu_column: str = "emulator_cpu_share",
) -> str:
    """Calibration rows as text (also the packet link's, whose sizes are ``ip_packet_size``,
    rate runs say ``B packets`` and CPU is ``bridge_cpu_share``)."""
    lines = []
    for row in rows:
        if row["test"] == "qsftp":
            lines.append(
                f"qsftp upload {row['transfer_bytes']} B, {row['datagram_size']:>5} B datagrams: "
                f"direct {row['direct_mb_s']:.1f} MB/s, through a perfect link "
                f"{row['emulated_mb_s']:.1f} MB/s ({-row['emulator_cost'] * 100:+.0f}%)"
            )
        elif row["test"] == "rate":
            lines.append(
                f"rate  {row['rate_mbps']:>6g} Mbit/s {row[size_column]:>6} {rate_size}: "
                f"delivered {row['delivered_mbps']:8.2f} Mbit/s "
                f"({row['rate_error'] * 100:+.1f}%), "
                f"lost before the link {row['lost_before_link']}, "
                f"CPU {row[cpu_column] * 100:.0f}%"
            )
        else:
            lines.append(
                f"delay {row['offered_pps']:>6g} pkt/s {row[size_column]:>6} B: one-way p50 "
                f"{row['one_way_p50_ms']:.2f} ms, p99 {row['one_way_p99_ms']:.2f} ms "
                f"(delay {row['delay_ms']:g}), lost before the link {row['lost_before_link']}, "
                f"CPU {row[cpu_column] * 100:.0f}%"
            )
    return "\n".join(lines)


def _cli(args: argparse.Namespace, command: Callable[[argparse.Namespace], None]) -> int:
    """Run ``command(args)`` as a ``main()`` does (also the packet link's): ``-v`` sets the
    log level; a UsageError exits with 2, a TransportError with 3."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(message)s"
    )
    try:
        command(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qsftp.netem relay ...`` or ``python -m qsftp.netem calibrate``."""
    return _cli(_parser().parse_args(argv), _command)


def _command(args: argparse.Namespace) -> None:
    if args.command == "relay":
        asyncio.run(_relay(args))
    else:
        rows = asyncio.run(
            calibrate(
                rates_mbps=args.rates,
                sizes=[int(size) for size in args.sizes],
                packet_rates=args.packet_rates,
                seconds=args.seconds,
                transfer_bytes=args.transfer_bytes,
            )
        )
        _out("\n".join(json.dumps(row) for row in rows) if args.json else _table(rows))


if __name__ == "__main__":
    sys.exit(main())
