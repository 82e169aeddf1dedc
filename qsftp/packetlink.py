"""Packet-level mode: two hosts on one machine, ``async with PacketLink(delay_ms=25) as link``.

Where the user is root on Linux, a server and a client can run in two network namespaces
(``link.server_ns``, ``link.client_ns``) whose only interface is a TUN device each. The IP
packets one side sends come out of its TUN device into this process, go through the same
impairment engine as the UDP relay (:class:`qsftp.netem.LinkModel`: loss, bottleneck queue,
delay ± jitter, reordering, duplication, corruption), one model per direction, and are
written into the other side's TUN device::

    client namespace                  this process                    server namespace
    10.199.0.2 ── qsftp0 (TUN) ──► uplink LinkModel ──► qsftp0 (TUN) ── 10.199.0.1
                              ◄── downlink LinkModel ◄──

So QUIC and TCP meet exactly the same link and go through the real kernel network stack
(TCP's own retransmission, the kernel's UDP checksums, IP fragmentation above the MTU).
Only private addresses inside the two namespaces are used; nothing is routed anywhere else.

:class:`VethLink` is the rate-only variant without a bridge: client and server namespaces
joined through a third, a router's, by veth pairs, with ``tc tbf`` on the router's way out in
each direction (the kernel's token bucket: rate and a tail-drop queue, nothing else).

The glue is asyncio, as in :class:`qsftp.netem.LinkEmulator`: a reader per TUN descriptor
(non-blocking, ``loop.add_reader``), and one timer per direction (the relay's own pump).
Helpers run commands in a namespace (``ip netns exec``); :func:`lab_server` and
:func:`lab_transfer` run the real ``python -m qsftp.server`` and ``python -m qsftp.client``
CLIs there. Namespaces are named ``qsftp-<pid>-<n>-srv`` / ``-cli`` (``-rtr``);
``close()`` deletes them
(also on error or cancellation, and at interpreter exit), and every start first deletes those
left behind by processes that no longer exist (:func:`cleanup_stale`).

docs/NETWORK-LAB.md ("Packet-level mode") has the usage, requirements and the accuracy
measured here (``python -m qsftp.packetlink calibrate``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import PacketLinkUnavailable, TransportError, UsageError

# The relay's timer glue and calibration traffic, shared so both modes behave and are measured
# alike (private to netem; not part of its public API).
from .netem import (
    _CALIBRATION_IDLE,
    _RECEIVER,
    _SENDER,
    DirectionStats,
    LinkModel,
    LinkProfile,
    LinkStats,
    _add_profile_options,
    _calibration_rows,
    _child_result,
    _cli,
    _direction_profiles,
    _Lifecycle,
    _ModelledLink,
    _numbers,
    _out,
    _profiles_from_args,
    _Pump,
    _run_columns,
    _run_until_signal,
    _table,
)

__all__ = [
    "CLIENT_ADDR",
    "DEFAULT_MTU",
    "NETNS_PREFIX",
    "SERVER_ADDR",
    "DEFAULT_TBF_QUEUE_MS",
    "TRANSPORTS",
    "VETH_CLIENT_ADDR",
    "VETH_SERVER_ADDR",
    "LabServer",
    "PacketLink",
    "VethLink",
    "available",
    "calibrate",
    "cleanup_stale",
    "lab_server",
    "lab_transfer",
    "main",
    "netns_exec",
    "unavailable_reason",
]

logger = logging.getLogger(__name__)

# Namespaces are named NETNS_PREFIX + "<pid>-<n>-srv|cli|rtr": the PID says whose they are, so a
# later run can delete those of a process that died without cleaning up.
NETNS_PREFIX = "qsftp-"
_STALE_RE = re.compile(rf"^{re.escape(NETNS_PREFIX)}(\d+)-\d+-(?:srv|cli|rtr)$")
# The two ends of the link: one /30, private (RFC 1918), existing only inside the namespaces.
SERVER_ADDR = "10.199.0.1"
CLIENT_ADDR = "10.199.0.2"
_PREFIX_LEN = 30
# The TUN device's name inside each namespace (the namespaces keep equal names apart).
_TUN_NAME = "qsftp0"
# An Ethernet-sized MTU: QUIC's 1200-byte datagrams fit, TCP segments are 1448 bytes, and
# anything larger is fragmented by the kernel (each fragment meets the link on its own).
DEFAULT_MTU = 1500
# Packets the kernel queues on a TUN device for this process to read (Linux's default is 500).
# When the bridge is descheduled for a moment (2 cores shared with the sender and receiver),
# a burst waits here instead of being dropped before it reaches the emulated link: the
# relay's socket receive buffer plays the same part.
_TXQUEUELEN = 5000
# VethLink: client 10.199.0.2 — 10.199.0.1 router 10.199.0.5 — 10.199.0.6 server, two /30s.
VETH_CLIENT_ADDR = "10.199.0.2"
VETH_SERVER_ADDR = "10.199.0.6"
_CLIENT_GATEWAY = "10.199.0.1"
_SERVER_GATEWAY = "10.199.0.5"
_ROUTER_TO_CLIENT = "qsftp-c"
_ROUTER_TO_SERVER = "qsftp-s"
# VethLink: the Ethernet header tc counts on a veth device, the least a tbf bucket holds (in
# full-size frames), the default queue, and how often wait_drained() asks tc.
_ETHERNET_HEADER = 14
_TBF_MIN_BURST_PACKETS = 4
DEFAULT_TBF_QUEUE_MS = 50.0
_DRAIN_POLL = 0.02
# IPv6's minimum MTU: QUIC needs 1200 + 48 bytes of headers to pass unfragmented.
_MIN_MTU = 1280
_MAX_MTU = 65535
# The transports the lab CLIs speak; "quic" is the CLIs' default, passed as no flag at all.
TRANSPORTS = ("quic", "tcp")
# What a lab server may listen with: one transport, or both (python -m qsftp.server).
SERVER_TRANSPORTS = (*TRANSPORTS, "both")
# Packets read from one TUN device per wake-up before the other gets its turn (a read is one
# packet: TUN has no batch read).
_READ_BATCH = 256
# Every `ip` invocation returns within milliseconds; this only bounds a wedged one.
_IP_TIMEOUT = 10.0
# How long processes started in a namespace get to exit after SIGTERM before SIGKILL.
_STOP_TIMEOUT = 5.0
# The lab server prints its ready line within ~1 s (imports, certificate); generous for a
# loaded machine.
_SERVER_START_TIMEOUT = 30.0
# How long a transfer waits for the link to carry its last packets before reading counters.
_DRAIN_TIMEOUT = 5.0

# Linux ABI constants (linux/sched.h, linux/if_tun.h).
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000

_counter = itertools.count()
_T = TypeVar("_T")


# --- availability ---------------------------------------------------------------------------


def _libc_setns() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.setns
    except (OSError, AttributeError):
        return None


def unavailable_reason() -> str | None:
    """Why packet-level mode cannot run here, or None when it can."""
    if sys.platform != "linux":
        return "packet-level mode needs Linux (network namespaces and TUN devices)"
    if os.geteuid() != 0:
        return (
            "packet-level mode needs root (it creates network namespaces and TUN devices); "
            "use the UDP relay (qsftp.netem.LinkEmulator, link_mode='relay') instead"
        )
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (load the tun kernel module: modprobe tun)"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "/dev/net/tun is not readable and writable"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    if _libc_setns() is None:
        return "the C library has no setns()"
    return None


def available() -> bool:
    """True when packet-level mode can run here (:func:`unavailable_reason` says why not)."""
    return unavailable_reason() is None


# --- namespaces and TUN devices -------------------------------------------------------------


def netns_exec(namespace: str, *argv: str) -> list[str]:
    """The command line that runs ``argv`` in network namespace ``namespace``."""
    return ["ip", "netns", "exec", namespace, *argv]


def _ip(
    *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            ["ip", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PacketLinkUnavailable(f"`ip {' '.join(args)}` failed: {exc}") from exc
    if check and result.returncode != 0:
        raise PacketLinkUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    """The names in ``ip netns list`` (each line is ``name`` or ``name (id: n)``)."""
    listing = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL what still runs in one of our namespaces (started there by this link's user)."""
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_namespaces(names: list[str]) -> None:
    for name in names:
        _kill_namespace_processes(name)
        result = _ip("netns", "del", name, check=False)
        if result.returncode != 0 and name in _namespaces():
            logger.warning("could not delete network namespace %s: %s", name, result.stderr)
    names.clear()


def cleanup_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose process no longer exists; return their names.

    Only names of the form ``qsftp-<pid>-<n>-srv|cli`` are touched, and only when no process
    ``<pid>`` is alive.
    """
    stale = [
        name
        for name in _namespaces()
        if (match := _STALE_RE.match(name)) and not _pid_alive(int(match.group(1)))
    ]
    if stale:
        logger.info("deleting stale network namespaces: %s", ", ".join(stale))
        _delete_namespaces(list(stale))
    return stale


def _in_namespace(namespace: str, action: Callable[[], _T], what: str) -> _T:
    """``action()`` run by a thread inside network namespace ``namespace``.

    setns() moves only the calling thread, so a short-lived thread enters the namespace, acts
    and exits; /proc/sys/net, sockets and devices it creates are the namespace's. Failures
    become :class:`~qsftp.errors.PacketLinkUnavailable` saying ``what`` failed.
    """
    outcome: dict[str, Any] = {}

    def enter_and_act() -> None:
        try:
            ns_fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc_setns()(ns_fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
            finally:
                os.close(ns_fd)
            outcome["result"] = action()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_act, name=f"qsftp-netns-{namespace}")
    thread.start()
    thread.join()
    if "error" in outcome:
        error = outcome["error"]
        raise PacketLinkUnavailable(f"cannot {what} in {namespace}: {error}") from error
    result: _T = outcome["result"]
    return result


def _disable_ipv6(device: str) -> None:
    """Switch IPv6 off on ``device`` (or on devices created later, for "default"), so the
    kernel's router solicitations and MLD reports do not cross the link. Run it inside the
    namespace: /proc/sys/net is the calling thread's namespace's."""
    with open(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6", "w") as knob:
        knob.write("1")


def _open_tun(namespace: str, name: str) -> int:
    """A non-blocking descriptor of a new TUN device ``name`` created inside ``namespace``
    (a device belongs to the namespace its creator is in; the descriptor then works from
    any thread), with IPv6 off."""
    import fcntl  # noqa: PLC0415 - POSIX only: importing this module must work everywhere

    def create() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            request = struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, request)
            _disable_ipv6(name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    return _in_namespace(namespace, create, "create a TUN device")


def _release(namespaces: list[str], fds: dict[str, int]) -> None:
    """Close the TUN devices and delete the namespaces (idempotent; also runs at exit)."""
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    _delete_namespaces(namespaces)


# --- two hosts ------------------------------------------------------------------------------

_SIDES = ("server", "client")


class _Hosts(_Lifecycle):
    """Two network namespaces, a server's and a client's, joined somehow (the subclass's
    ``_connect``), and the processes this object started in them."""

    link_mode = ""
    "What the ``link_mode`` column of a row through this link says."

    def __init__(self, *, mtu: int) -> None:
        if not (isinstance(mtu, int) and _MIN_MTU <= mtu <= _MAX_MTU):
            raise UsageError(f"mtu must be an integer from {_MIN_MTU} to {_MAX_MTU}, not {mtu!r}")
        self.mtu = mtu
        "MTU of both ends, bytes."
        stem = f"{NETNS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.server_ns = f"{stem}-srv"
        "Name of the server's network namespace (``ip netns exec <name> ...``)."
        self.client_ns = f"{stem}-cli"
        "Name of the client's network namespace."
        self.server_addr = SERVER_ADDR
        "The server side's IPv4 address (inside ``server_ns``)."
        self.client_addr = CLIENT_ADDR
        "The client side's IPv4 address (inside ``client_ns``)."
        self._namespaces: list[str] = []
        self._fds: dict[str, int] = {}
        # Runs once: at close(), or when this object is collected, or at interpreter exit.
        self._release = weakref.finalize(self, _release, self._namespaces, self._fds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._processes: list[asyncio.subprocess.Process] = []
        self._started = self._closed = False

    def __repr__(self) -> str:
        state = "running" if self._started and not self._closed else "not running"
        name = type(self).__name__
        return f"<{name} {self.client_ns} ⇄ {self.server_ns} {state}: {self.label()}>"

    def label(self) -> str:
        raise NotImplementedError

    @staticmethod
    def available() -> bool:
        """True when packet-level mode can run here."""
        return available()

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why packet-level mode cannot run here, or None."""
        return unavailable_reason()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the namespaces and join them (~0.05 s of `ip` commands, blocking)."""
        if self._started:
            raise UsageError(f"this {type(self).__name__} was already started")
        reason = unavailable_reason()
        if reason is not None:
            raise PacketLinkUnavailable(reason)
        self._started = True
        loop = self._loop = asyncio.get_running_loop()
        try:
            cleanup_stale()
            for name in (self.server_ns, self.client_ns):
                _ip("netns", "add", name)
                self._namespaces.append(name)
            self._connect(loop)
        except BaseException:
            self._teardown()
            raise
        logger.info(
            "%s %s ⇄ %s: %s", type(self).__name__, self.client_ns, self.server_ns, self.label()
        )

    def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Join the two (existing, empty) namespaces."""
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Stop whatever ``_connect`` started in this process (the namespaces go after)."""

    async def close(self) -> None:
        """Stop what runs in the namespaces, disconnect them, delete them."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_processes()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        """Synchronous, so it completes even when the task is being cancelled."""
        self._closed = True
        self._disconnect()
        self._release()

    async def _stop_processes(self) -> None:
        running = [p for p in self._processes if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=_STOP_TIMEOUT
            )
            for process in running:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            for waiter in late:
                waiter.cancel()
        self._processes.clear()

    # --- commands in the namespaces -------------------------------------------------------

    def namespace(self, side: str) -> str:
        """``"server"`` or ``"client"`` → that side's namespace name."""
        if side not in _SIDES:
            raise UsageError(f"side must be 'server' or 'client', not {side!r}")
        return self.server_ns if side == "server" else self.client_ns

    def command(self, side: str, *argv: str) -> list[str]:
        """The command line running ``argv`` on ``side`` ("server" or "client")."""
        return netns_exec(self.namespace(side), *argv)

    async def spawn(self, side: str, *argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        """Start ``argv`` on ``side`` (``asyncio.create_subprocess_exec`` keywords apply).

        The process is this link's: :meth:`close` ends it (SIGTERM, then SIGKILL) if it is
        still running, before the namespaces go.
        """
        if not self._started or self._closed:
            raise UsageError("the PacketLink is not running")
        self._processes = [p for p in self._processes if p.returncode is None]
        process = await asyncio.create_subprocess_exec(*self.command(side, *argv), **kwargs)
        self._processes.append(process)
        return process

    async def run(
        self,
        side: str,
        *argv: str,
        input: bytes | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on ``side`` to completion and return its exit status and output.

        Raises :class:`~qsftp.errors.TransportError` (after killing it) when it takes
        longer than ``timeout`` seconds.
        """
        process = await self.spawn(
            side,
            *argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await process.communicate(input)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TransportError(
                f"{argv[0] if argv else 'command'} in {self.namespace(side)} did not finish "
                f"in {timeout:g} s"
            ) from None
        assert process.returncode is not None
        return subprocess.CompletedProcess(list(argv), process.returncode, out, err)


class PacketLink(_ModelledLink, _Hosts):
    """Two network namespaces joined by an emulated link that impairs every IP packet.

    The profile vocabulary is :class:`qsftp.netem.LinkEmulator`'s: keyword fields of a
    :class:`~qsftp.netem.LinkProfile` (both directions), ``profile=``, or ``uplink=`` (client →
    server) / ``downlink=`` (server → client). Counters and rates count whole IP packets
    (headers included). ``mtu`` is both TUN devices' MTU. Use ``async with`` (or
    ``await start()`` / ``await close()``); then run commands in ``server_ns`` / ``client_ns``
    with :meth:`spawn`, :meth:`run` or :meth:`command`; the server listens on ``server_addr``.
    Starting raises :class:`~qsftp.errors.PacketLinkUnavailable` where it cannot work.
    """

    link_mode = "packet"

    def __init__(
        self,
        profile: LinkProfile | None = None,
        *,
        uplink: LinkProfile | None = None,
        downlink: LinkProfile | None = None,
        seed: int = 1,
        mtu: int = DEFAULT_MTU,
        **shorthand: Any,
    ) -> None:
        up, down = _direction_profiles(profile, uplink, downlink, shorthand)
        super().__init__(mtu=mtu)
        self.seed = seed
        "The seed of every random choice; the same seed gives the same fates."
        self._up = LinkModel(up, seed=seed, name="uplink")
        self._down = LinkModel(down, seed=seed, name="downlink")
        self._pumps: list[_Pump] = []
        self._host_dropped = [0, 0]  # writes into a TUN device that failed: up, down
        self._drained: list[asyncio.Future[None]] = []

    # --- counters ---------------------------------------------------------------------------

    def stats(self) -> LinkStats:
        """A snapshot of both directions' counters (``clients`` is 1: one client host)."""
        return LinkStats(
            uplink=self._up.stats(host_dropped=self._host_dropped[0]),
            downlink=self._down.stats(host_dropped=self._host_dropped[1]),
            clients=1,
        )

    # --- the bridge -------------------------------------------------------------------------

    def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        for side, name, address in (
            ("server", self.server_ns, self.server_addr),
            ("client", self.client_ns, self.client_addr),
        ):
            self._fds[side] = _open_tun(name, _TUN_NAME)
            script = (
                f"link set lo up\n"
                f"addr add {address}/{_PREFIX_LEN} dev {_TUN_NAME}\n"
                f"link set {_TUN_NAME} mtu {self.mtu} txqueuelen {_TXQUEUELEN} up\n"
            )
            _ip("-n", name, "-batch", "-", stdin=script)
        server_fd, client_fd = self._fds["server"], self._fds["client"]
        self._pumps = [
            _Pump(loop, self._up, self._writer(server_fd, 0), self._wake_drained),
            _Pump(loop, self._down, self._writer(client_fd, 1), self._wake_drained),
        ]
        loop.add_reader(client_fd, self._read, client_fd, self._up)
        loop.add_reader(server_fd, self._read, server_fd, self._down)

    def _disconnect(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._fds.values():
                self._loop.remove_reader(fd)
        for pump in self._pumps:
            pump.cancel()
        self._up.clear()
        self._down.clear()
        self._wake_drained()

    def _read(self, fd: int, model: LinkModel) -> None:
        read, submit, clock = os.read, model.submit, time.monotonic
        for _ in range(_READ_BATCH):
            try:
                packet = read(fd, _MAX_MTU)
            except BlockingIOError:
                break
            except OSError as exc:
                logger.warning("packet link: reading a TUN device failed: %s", exc)
                break
            submit(packet, clock(), None)
        for pump in self._pumps:
            pump.run()

    def _writer(self, fd: int, direction: int) -> Any:
        def write(_dest: Any, packet: bytes) -> None:
            try:
                os.write(fd, packet)
            except OSError:
                # A full socket buffer cannot happen here (the kernel takes the packet at
                # once); what fails is a packet the kernel refuses, e.g. one whose IP header
                # a corruption broke.
                self._host_dropped[direction] += 1

        return write


class VethLink(_Hosts):
    """The rate-only variant: a veth pair between the two namespaces, ``tc tbf`` on each end.

    The kernel carries and queues the packets: no bridge in this process, so it costs no
    Python CPU and holds its rate wherever the machine can carry it, but a token bucket
    filter can only limit the rate (a byte-limited FIFO drained at ``rate``, tail drop): no
    delay, loss, reordering, duplication or corruption. ``rate_mbps`` applies to both
    directions, ``uplink_mbps`` (client → server) / ``downlink_mbps`` override one each
    (None: no limit); the queue holds ``queue_ms`` of the rate. Rates and counters are in
    bytes as tc sees them: IP packets plus the 14-byte Ethernet header. The namespaces,
    addresses, commands and teardown are :class:`PacketLink`'s, so :func:`lab_server` and
    :func:`lab_transfer` work with it too.
    """

    link_mode = "veth-tbf"

    def __init__(
        self,
        rate_mbps: float | None = None,
        *,
        uplink_mbps: float | None = None,
        downlink_mbps: float | None = None,
        queue_ms: float = DEFAULT_TBF_QUEUE_MS,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        super().__init__(mtu=mtu)
        up = uplink_mbps if uplink_mbps is not None else rate_mbps
        down = downlink_mbps if downlink_mbps is not None else rate_mbps
        for name, value in (("rate_mbps", up), ("rate_mbps", down), ("queue_ms", queue_ms)):
            if value is not None and not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise UsageError(f"{name} must be a positive number, not {value!r}")
        self.uplink_mbps = up
        "Client → server rate limit, Mbit/s (None: none)."
        self.downlink_mbps = down
        "Server → client rate limit, Mbit/s (None: none)."
        self.queue_ms = queue_ms
        "Each tbf queue holds this many milliseconds of its rate, in bytes."
        self.router_ns = self.server_ns[: -len("srv")] + "rtr"
        "Name of the router's namespace, between the two, where the tbf queues are."
        self.server_addr = VETH_SERVER_ADDR
        self.client_addr = VETH_CLIENT_ADDR
        self._baseline = (_TbfCounters(), _TbfCounters())

    def label(self) -> str:
        """``tbf 20 Mbit/s``, or ``tbf up 5 Mbit/s, down 50 Mbit/s``."""

        def rate(value: float | None) -> str:
            return f"{value:g} Mbit/s" if value is not None else "unlimited"

        if self.uplink_mbps == self.downlink_mbps:
            return f"tbf {rate(self.uplink_mbps)}"
        return f"tbf up {rate(self.uplink_mbps)}, down {rate(self.downlink_mbps)}"

    def as_dict(self, prefix: str = "link_") -> dict[str, Any]:
        """The settings as columns: ``link_up_rate_mbps``, ``link_up_queue_bytes``, ..."""
        record: dict[str, Any] = {}
        for direction, rate in (("up", self.uplink_mbps), ("down", self.downlink_mbps)):
            record[f"{prefix}{direction}_rate_mbps"] = rate
            record[f"{prefix}{direction}_queue_bytes"] = (
                self._tbf(rate)[1] if rate is not None else None
            )
        return record

    def _tbf(self, rate_mbps: float) -> tuple[int, int]:
        """(burst, limit) in bytes for a rate: the bucket holds 1 ms of the rate but at least
        _TBF_MIN_BURST_PACKETS full packets (tbf needs room for one; a little more lets a
        packet train through at line rate, as a switch port would); the queue ``queue_ms``."""
        per_second = rate_mbps * 1e6 / 8
        frame = self.mtu + _ETHERNET_HEADER
        burst = max(_TBF_MIN_BURST_PACKETS * frame, int(per_second / 1000))
        limit = max(2 * frame, int(per_second * self.queue_ms / 1000))
        return burst, limit

    def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        router = self.router_ns
        _ip("netns", "add", router)
        self._namespaces.append(router)
        for name in (self.server_ns, self.client_ns, router):
            _in_namespace(name, lambda: _disable_ipv6("default"), "switch IPv6 off")
        _in_namespace(router, _enable_forwarding, "switch IPv4 forwarding on")
        # Every end is created inside its namespace: nothing appears in this one.
        for host, router_end in (
            (self.client_ns, _ROUTER_TO_CLIENT),
            (self.server_ns, _ROUTER_TO_SERVER),
        ):
            _ip(
                "link",
                "add",
                _TUN_NAME,
                "netns",
                host,
                "type",
                "veth",
                "peer",
                "name",
                router_end,
                "netns",
                router,
            )
        for name, script in (
            (self.client_ns, _host_script(self.client_addr, _CLIENT_GATEWAY, self.mtu)),
            (self.server_ns, _host_script(self.server_addr, _SERVER_GATEWAY, self.mtu)),
            (
                router,
                "link set lo up\n"
                f"addr add {_CLIENT_GATEWAY}/{_PREFIX_LEN} dev {_ROUTER_TO_CLIENT}\n"
                f"addr add {_SERVER_GATEWAY}/{_PREFIX_LEN} dev {_ROUTER_TO_SERVER}\n"
                f"link set {_ROUTER_TO_CLIENT} mtu {self.mtu} up\n"
                f"link set {_ROUTER_TO_SERVER} mtu {self.mtu} up\n",
            ),
        ):
            _ip("-n", name, "-batch", "-", stdin=script)
        # The bottleneck of each direction is the router's way out towards the receiver.
        for device, rate in (
            (_ROUTER_TO_SERVER, self.uplink_mbps),
            (_ROUTER_TO_CLIENT, self.downlink_mbps),
        ):
            if rate is not None:
                burst, limit = self._tbf(rate)
                _tc(
                    "-n",
                    router,
                    "qdisc",
                    "replace",
                    "dev",
                    device,
                    "root",
                    "tbf",
                    "rate",
                    f"{round(rate * 1e6)}bit",
                    "burst",
                    str(burst),
                    "limit",
                    str(limit),
                )

    # --- counters ---------------------------------------------------------------------------

    def _counters(self) -> tuple[_TbfCounters, _TbfCounters]:
        """(uplink, downlink): the router's interface and root qdisc counters on its way out
        towards the server, and towards the client."""
        return (
            _tbf_counters(self.router_ns, _ROUTER_TO_SERVER),
            _tbf_counters(self.router_ns, _ROUTER_TO_CLIENT),
        )

    def stats(self) -> LinkStats:
        """Counters since start or :meth:`reset_stats` (tc's, so bytes include Ethernet
        headers): ``forwarded`` is what left the sending end, ``queue_dropped`` what tbf
        dropped, ``pending`` what it still queues."""
        directions = []
        for now, then in zip(self._counters(), self._baseline, strict=True):
            forwarded = now.tx_packets - then.tx_packets
            dropped = now.drops - then.drops
            directions.append(
                DirectionStats(
                    received_packets=forwarded + dropped + now.qlen,
                    forwarded_packets=forwarded,
                    forwarded_bytes=now.tx_bytes - then.tx_bytes,
                    queue_dropped_packets=dropped,
                    pending_packets=now.qlen,
                )
            )
        return LinkStats(uplink=directions[0], downlink=directions[1], clients=1)

    def stats_dict(self, prefix: str = "link_") -> dict[str, Any]:
        """:meth:`stats` flattened for a row (``link_up_forwarded_packets``, ...)."""
        return self.stats().as_dict(prefix)

    def reset_stats(self) -> None:
        """Count from now on."""
        self._baseline = self._counters()

    async def wait_drained(self, timeout: float = 10.0) -> None:
        """Wait until both tbf queues are empty."""
        async with asyncio.timeout(timeout):
            # The queue lives in the kernel: nothing to wait on but tc's answer.
            while any(c.qlen for c in self._counters()):  # noqa: ASYNC110
                await asyncio.sleep(_DRAIN_POLL)


@dataclass(frozen=True, slots=True)
class _TbfCounters:
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: int = 0
    qlen: int = 0


def _tc(*args: str) -> None:
    try:
        result = subprocess.run(
            ["tc", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PacketLinkUnavailable(f"`tc {' '.join(args)}` failed: {exc}") from exc
    if result.returncode != 0:
        raise PacketLinkUnavailable(f"`tc {' '.join(args)}` failed: {result.stderr.strip()}")


def _enable_forwarding() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as knob:
        knob.write("1")


def _host_script(address: str, gateway: str, mtu: int) -> str:
    """`ip -batch` lines for an end host of a VethLink: its address and a default route."""
    return (
        "link set lo up\n"
        f"addr add {address}/{_PREFIX_LEN} dev {_TUN_NAME}\n"
        f"link set {_TUN_NAME} mtu {mtu} up\n"
        f"route add default via {gateway}\n"
    )


def _tbf_counters(namespace: str, device: str) -> _TbfCounters:
    link = json.loads(_ip("-n", namespace, "-s", "-j", "link", "show", "dev", device).stdout)
    tx = link[0]["stats64"]["tx"]
    try:
        qdiscs = subprocess.run(
            ["tc", "-n", namespace, "-s", "-j", "qdisc", "show", "dev", device],
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
            check=True,
        )
        root = next(q for q in json.loads(qdiscs.stdout) if q.get("root"))
    except (OSError, subprocess.SubprocessError, ValueError, StopIteration):
        root = {}
    return _TbfCounters(
        tx_packets=int(tx["packets"]),
        tx_bytes=int(tx["bytes"]),
        drops=int(root.get("drops", 0)),
        qlen=int(root.get("qlen", 0)),
    )


# --- the real CLIs in the lab ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LabServer:
    """A ``python -m qsftp.server`` running in a :class:`PacketLink`'s server namespace."""

    host: str
    "Its address (the link's ``server_addr``)."
    port: int
    "Its port."
    fingerprint: str
    "SHA-256 of its certificate (clients pin it)."
    transport: str
    '"quic" or "tcp": what both CLIs speak.'
    root: Path
    "The directory it serves (readable from this process: namespaces share the file system)."
    env: Mapping[str, str]
    "Environment for its clients: its token and private state and config directories."
    pid: int
    "Its process ID."


def _check_transport(transport: str, allowed: tuple[str, ...] = TRANSPORTS) -> list[str]:
    """The CLI flags for ``transport``: none for QUIC (the default), so CLIs without the
    option still work."""
    if transport not in allowed:
        raise UsageError(f"transport must be one of {', '.join(allowed)}, not {transport!r}")
    return [] if transport == "quic" else ["--transport", transport]


_READY_RE = re.compile(r"ready on (\S+):(\d+),.*sha256:([0-9a-f]{64})")


@contextlib.asynccontextmanager
async def lab_server(
    link: PacketLink | VethLink,
    root: str | os.PathLike[str],
    *,
    transport: str = "quic",
    max_datagram_size: int | None = None,
    congestion_control: str | None = None,
    receive_window: int | None = None,
    extra_args: Sequence[str] = (),
) -> AsyncIterator[LabServer]:
    """Run ``python -m qsftp.server`` in ``link``'s server namespace, serving ``root``.

    It listens on ``link.server_addr`` (port chosen by the kernel) with a fresh token and its
    own state directory; yields a :class:`LabServer` and stops it (SIGTERM) on exit.
    """
    flags = _check_transport(transport, SERVER_TRANSPORTS)
    with tempfile.TemporaryDirectory(prefix="qsftp-lab-") as tmp:
        state = Path(tmp)
        env = {
            **os.environ,
            "QSFTP_TOKEN": secrets.token_hex(16),
            "QSFTP_STATE_DIR": str(state / "state"),
            "QSFTP_CONFIG_DIR": str(state / "config"),
            "QSFTP_KNOWN_HOSTS": str(state / "known_hosts"),
        }
        argv = [sys.executable, "-m", "qsftp.server", "--host", link.server_addr, "--port", "0"]
        argv += ["--root", str(root), "--state-dir", str(state / "state"), *flags]
        for option, value in (
            ("--max-datagram-size", max_datagram_size),
            ("--congestion-control", congestion_control),
            ("--receive-window", receive_window),
        ):
            if value is not None:
                argv += [option, str(value)]
        argv += list(extra_args)
        log_path = state / "server.log"
        # The server's log goes to a file: a pipe nobody reads would fill and stall it.
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            process = await link.spawn(
                "server",
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        finally:
            os.close(log)
        try:
            assert process.stdout is not None
            try:
                line = await asyncio.wait_for(process.stdout.readline(), _SERVER_START_TIMEOUT)
            except TimeoutError:
                line = b""
            match = _READY_RE.search(line.decode(errors="replace"))
            if match is None:
                detail = log_path.read_text(errors="replace").strip()[-2000:]
                raise TransportError(f"the lab server did not start: {detail or line!r}")
            yield LabServer(
                host=match.group(1),
                port=int(match.group(2)),
                fingerprint=match.group(3),
                transport=transport,
                root=Path(os.path.abspath(root)),  # noqa: ASYNC240 - no I/O
                env=env,
                pid=process.pid,
            )
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _last_error(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1].strip()


async def lab_transfer(
    link: PacketLink | VethLink,
    local: str | os.PathLike[str],
    *,
    server: LabServer | None = None,
    direction: str = "upload",
    remote: str | None = None,
    transport: str | None = None,
    chunk_size: int | None = None,
    max_datagram_size: int | None = None,
    engine: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """One transfer by ``python -m qsftp.client --json`` in the client namespace; a row.

    ``direction="upload"`` sends ``local`` as ``remote`` (default: its file name);
    ``"download"`` fetches ``remote`` and checks it, then deletes the copy (``local`` names
    the original, for its size). Without ``server`` a :func:`lab_server` is started for this
    transfer alone (``transport`` then chooses its transport; with ``server`` it must match).
    The link's counters are reset before and read after the link has drained, so the row's
    ``link_*`` columns are this transfer's. ``error`` is "" on success, else the client's
    error line; ``seconds`` is the client's own timer (request sent → verified).
    """
    from .session import datagram_size_for  # noqa: PLC0415 - aioquic only when a transfer runs

    if direction not in ("upload", "download"):
        raise UsageError(f"direction must be upload or download, not {direction!r}")
    local_path = Path(local)
    name = remote if remote is not None else local_path.name
    if server is None:
        with tempfile.TemporaryDirectory(prefix="qsftp-lab-root-") as root:
            if direction == "download":
                target = Path(root) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_path, target)
            async with lab_server(
                link,
                root,
                transport=transport or "quic",
                max_datagram_size=max_datagram_size,
            ) as started:
                return await lab_transfer(
                    link,
                    local_path,
                    server=started,
                    direction=direction,
                    remote=name,
                    chunk_size=chunk_size,
                    max_datagram_size=max_datagram_size,
                    timeout=timeout,
                )
    if transport is None:
        transport = "quic" if server.transport == "both" else server.transport
    if server.transport not in (transport, "both"):
        raise UsageError(f"the server speaks {server.transport}, not {transport}")
    flags = _check_transport(transport)
    argv = [sys.executable, "-m", "qsftp.client", "--host", server.host, "--port"]
    argv += [str(server.port), "--pin", server.fingerprint, "--json", *flags]
    if chunk_size is not None:
        argv += ["--chunk-size", str(chunk_size)]
    if max_datagram_size is not None:
        argv += ["--max-datagram-size", str(max_datagram_size)]
    if engine is not None:  # the client's QUIC engine (the server's is its own option)
        argv += ["--engine", engine]
    row: dict[str, Any] = {
        "timestamp": _now_iso(),
        "link_mode": link.link_mode,
        "transport": transport,
        "direction": direction,
        "name": name,
        "file_size_bytes": os.path.getsize(local_path),  # noqa: ASYNC240 - one stat
        "max_datagram_size": datagram_size_for(server.host, max_datagram_size),
        "seconds": None,
        "throughput_mbps": None,
        "sha256": "",
        "verified": False,
        "error": "",
    }
    with tempfile.TemporaryDirectory(prefix="qsftp-lab-get-") as downloads:
        if direction == "upload":
            argv += [str(local_path), "--as", name]
        else:
            argv += ["--get", name, "-o", downloads]
        link.reset_stats()
        try:
            result = await link.run("client", *argv, timeout=timeout, env=server.env)
        except TransportError as exc:
            result = None
            row["error"] = f"TransportError: {exc}"
    with contextlib.suppress(TimeoutError):
        await link.wait_drained(_DRAIN_TIMEOUT)
    if result is not None:
        records = [
            line for line in result.stdout.decode(errors="replace").splitlines() if line[:1] == "{"
        ]
        if result.returncode != 0 or not records:
            row["error"] = _last_error(result.stderr) or f"exit status {result.returncode}"
        else:
            record = json.loads(records[-1])
            seconds = float(record["seconds"])
            row.update(
                seconds=seconds,
                throughput_mbps=record["size"] * 8 / seconds / 1e6 if seconds > 0 else None,
                sha256=record["sha256"],
                verified=bool(record["verified"]),
            )
    row.update(link=link.label(), **link.as_dict(), **link.stats_dict())
    return row


# --- calibration: how accurate is the packet link on this machine? --------------------------

# IPv4 + UDP headers: a UDP payload of n bytes is an IP packet of n + 28 on the link.
_UDP_OVERHEAD = 28


async def _calibration_run(
    profile: LinkProfile, *, size: int, packets_per_second: float, seconds: float
) -> dict[str, Any]:
    """UDP datagrams of ``size`` payload bytes from the client namespace to the server's."""
    async with PacketLink(profile=profile) as link:
        receiver = await link.spawn(
            "server",
            sys.executable,
            "-c",
            _RECEIVER,
            json.dumps([link.server_addr, seconds + 30.0, _CALIBRATION_IDLE]),
            stdout=subprocess.PIPE,
        )
        assert receiver.stdout is not None
        async with asyncio.timeout(10):
            port = json.loads(await receiver.stdout.readline())["port"]
        cpu, wall = time.process_time(), time.perf_counter()
        sender = await link.spawn(
            "client",
            sys.executable,
            "-c",
            _SENDER,
            json.dumps([link.server_addr, port, size, packets_per_second, seconds]),
            stdout=subprocess.PIPE,
        )
        sent = (await _child_result(sender, seconds + 30.0))["sent"]
        await link.wait_drained(timeout=30.0)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stats = link.stats().uplink
        received = await _child_result(receiver, 30.0)
    packet = size + _UDP_OVERHEAD
    return {
        "datagram_size": size,
        "ip_packet_size": packet,
        **_run_columns(
            size=size,
            packet=packet,
            packets_per_second=packets_per_second,
            sent=sent,
            stats=stats,
            received=received,
        ),
        "bridge_cpu_share": cpu / wall,
    }


async def calibrate(
    *,
    rates_mbps: Sequence[float] = (10, 50, 100, 200),
    sizes: Sequence[int] = (1200,),
    packet_rates: Sequence[float] = (1000, 5000, 10000, 20000),
    seconds: float = 2.0,
    delay_ms: float = 10.0,
    overload: float = 1.5,
) -> list[dict[str, Any]]:
    """Measure this machine's packet-link accuracy; one dict per run (a DataFrame row).

    As :func:`qsftp.netem.calibrate`, with sender and receiver in the two namespaces and
    rates counted in IP bytes (``delivered_mbps`` includes the 28 bytes of IPv4 + UDP header
    per datagram). Rate runs offer ``overload`` × each rate to a link with that rate,
    ``delay_ms`` and a 50 ms queue; delay runs send 1200-byte datagrams at each packet rate
    through ``delay_ms`` alone. ``bridge_cpu_share`` is this process's CPU over the run.
    """
    return await _calibration_rows(
        _calibration_run,
        rates_mbps=rates_mbps,
        sizes=sizes,
        packet_rates=packet_rates,
        seconds=seconds,
        delay_ms=delay_ms,
        overload=overload,
        overhead=_UDP_OVERHEAD,
    )


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.packetlink",
        description="Packet-level link: two network namespaces joined by an emulated link.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="bring a link up until SIGINT/SIGTERM")
    up.add_argument("--seed", type=int, default=1)
    up.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    _add_profile_options(up)
    calibration = commands.add_parser("calibrate", help="measure the link's accuracy here")
    calibration.add_argument("--seconds", type=float, default=2.0, help="per run (default 2)")
    calibration.add_argument(
        "--rates",
        type=_numbers,
        default=(10, 50, 100, 200),
        metavar="MBIT,...",
        help="link rates of the rate runs (default 10,50,100,200)",
    )
    calibration.add_argument(
        "--sizes",
        type=_numbers,
        default=(1200,),
        metavar="BYTES,...",
        help="UDP payload sizes of the rate runs (default 1200)",
    )
    calibration.add_argument(
        "--packet-rates",
        type=_numbers,
        default=(1000, 5000, 10000, 20000),
        metavar="PPS,...",
        help="packets/s of the delay runs (default 1000,5000,10000,20000)",
    )
    calibration.add_argument("--json", action="store_true", help="one JSON object per line")
    commands.add_parser("cleanup", help="delete namespaces left by processes that died")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    return parser


async def _up(args: argparse.Namespace) -> None:
    profile, uplink, downlink = _profiles_from_args(args)
    link = PacketLink(profile, uplink=uplink, downlink=downlink, seed=args.seed, mtu=args.mtu)
    await _run_until_signal(
        link,
        lambda: (
            f"qsftp packet link up: client {link.client_addr} in {link.client_ns}, "
            f"server {link.server_addr} in {link.server_ns}: {link.label()}"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m qsftp.packetlink up|calibrate|cleanup``."""
    return _cli(_parser().parse_args(argv), _command)


def _command(args: argparse.Namespace) -> None:
    if args.command == "up":
        asyncio.run(_up(args))
    elif args.command == "cleanup":
        reason = unavailable_reason()
        if reason is not None:
            raise PacketLinkUnavailable(reason)
        removed = cleanup_stale()
        _out(f"deleted {len(removed)} stale namespace(s)" + "".join(f"\n{n}" for n in removed))
    else:
        rows = asyncio.run(
            calibrate(
                rates_mbps=args.rates,
                sizes=[int(size) for size in args.sizes],
                packet_rates=args.packet_rates,
                seconds=args.seconds,
            )
        )
        if args.json:
            _out("\n".join(json.dumps(row) for row in rows))
        else:
            _out(
                _table(
                    rows,
                    size_column="ip_packet_size",
                    rate_size="B packets",
                    cpu_column="bridge_cpu_share",
                )
            )


if __name__ == "__main__":
    sys.exit(main())
