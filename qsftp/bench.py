"""``python -m qsftp.bench``: QSFTP against bare aioquic, TCP + TLS, scp and sftp, one command.

Every case runs on the same generated file, once per repeat, in a fixed interleaved order
(A B C … A B C …) so drift on the machine hits all cases alike. Each client is a fresh worker
process (``python -m qsftp.bench _worker KIND …``) that prints one JSON line with its own
timer, CPU and peak RSS; each server is a long-lived child process whose CPU (``/proc/PID/stat``)
and peak RSS (``VmHWM``, reset through ``/proc/PID/clear_refs`` before each measurement) the
parent reads around every measurement. All traffic stays on 127.0.0.1; every child is started
and ended here, by its PID, and every wait is bounded. docs/PERFORMANCE.md says exactly what
each timer covers.

The cases:

- ``qsftp-up`` / ``qsftp-down``: :func:`qsftp.upload` / :func:`qsftp.download` against a
  ``qsftp.server`` process (its root on disk: the receiver writes, fsyncs and hashes).
- ``bare``: one stream on a bare aioquic connection with the same QUIC settings, the server
  discarding (:mod:`qsftp._bench_bare`): aioquic's own asyncio layer as shipped, on asyncio's
  default loop, the reference the QSFTP figures are compared with; ``bare-uvloop`` is the same
  code on uvloop (when the bench runs on uvloop).
- ``tcp-tls``: asyncio TCP + TLS 1.3 with the same certificate, the server discarding.
- ``scp``, ``scp-aes128gcm``, ``sftp``: OpenSSH against a private ``sshd`` on a free port
  (skipped when sshd is not installed); an ``ssh-setup`` row times ``sftp -b`` with an empty
  batch (connect, authenticate, start the sftp subsystem, quit), which both timers include.
- ``small-files``: N files of 4 KiB over one QSFTP connection (concurrent streams), over one
  QSFTP connection per file, and with ``sftp -b`` (when sshd is available).
- ``handshake``: QSFTP's time to first byte (handshake + session) and a bare aioquic handshake.
- ``scaling``: the QSFTP upload striped over N connections (``qsftp.upload(connections=N)``,
  one client process) to a server of W processes sharing one port (``python -m qsftp.server
  --workers W``, SO_REUSEPORT), for every N of ``--connections`` and W of ``--workers``; rows
  ``scaling-<N>c-<W>w``. The server's CPU is summed over its processes, each of which is read
  from ``/proc/PID/stat`` while it still runs; the CPU and peak RSS of each worker process are
  kept per measurement, so the table shows how the kernel spread the connections. With
  ``--engine … qh3`` the case runs on each engine (qh3's rows end in ``-qh3``).

``--engine aioquic qh3`` runs every QUIC case (QSFTP, bare, small files, handshakes) once per
engine, both ends on that engine: aioquic's rows keep their names, qh3's carry a ``-qh3``
suffix (``qsftp-up-qh3``, ``bare-qh3`` …, the bare one on qh3's own asyncio layer). A datagram
size above an engine's ceiling (aioquic: 16414) runs only on the engines that carry it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import functools
import importlib
import importlib.util
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import qsftp
from qsftp.engine import ENGINES, get_engine

__all__ = ["CASES", "SCHEMA_VERSION", "Measurement", "Summary", "main"]

# Bumped whenever a CSV column or a meta field changes meaning (2: the engine column; 3: the
# connections, workers, worker_cpu_s and worker_rss_bytes columns of the scaling case).
SCHEMA_VERSION = 3
# The cases --cases chooses from, in the order each repeat runs them.
CASES = (
    "qsftp-up",
    "qsftp-down",
    "bare",
    "tcp-tls",
    "scp",
    "scp-aes128gcm",
    "sftp",
    "small-files",
    "handshake",
    "scaling",
)
SSH_CASES = ("scp", "scp-aes128gcm", "sftp")

DEFAULT_SIZE = "256MiB"
DEFAULT_REPEATS = 3
# The largest datagram a 1500-byte MTU carries over IPv6 (and IPv4): a real network's ceiling.
DEFAULT_DATAGRAM_SIZE = 1452
# QUIC's minimum, and aioquic's maximum: it writes a STREAM frame's length as a 2-byte varint,
# so larger datagrams fail with FRAME_ENCODING_ERROR (docs/PERFORMANCE.md). qh3's ceiling is
# what loopback carries (qsftp.engine); sizes above aioquic's run on qh3 only.
MIN_DATAGRAM_SIZE = 1200
MAX_DATAGRAM_SIZE = 16414
DEFAULT_ENGINES = ("aioquic",)
DEFAULT_SMALL_FILES = 1000
SMALL_FILE_SIZE = 4096
# Uploads in flight at once on the one-connection small-files case: well below aioquic's 128
# concurrent streams, enough to keep the connection busy while each file's DONE comes back.
SMALL_FILES_CONCURRENCY = 32
# Handshakes per repeat for the handshake figures (their median is robust to the first,
# slower connection of a fresh process, which is kept, not dropped).
DEFAULT_HANDSHAKES = 20
# --quick: small enough for a smoke test in seconds.
QUICK_SIZE = "4MiB"
QUICK_SMALL_FILES = 50
QUICK_HANDSHAKES = 5
# The scaling case's grid: connections one upload is striped over, and server processes.
DEFAULT_CONNECTIONS = (1, 2, 4)
DEFAULT_WORKERS = (1, 2)
# Unmeasured connections per server process made when a scaling server starts: each new
# connection comes from a new client port, so with this many every process very likely served
# one (and paid for its lazy set-up) before the first measurement.
WARM_UP_CONNECTIONS_PER_WORKER = 4
# A server process counts as busy in a measurement when it used at least this share of the
# server's CPU: an idle one only runs timers (~0%); one range of N costs about 1/N.
BUSY_WORKER_SHARE = 0.1
# The test files' seeds (qsftp.experiment caches generated files by size and seed).
FILE_SEED = 0
SMALL_FILES_SEED = 1
# Bounds on every wait. A transfer gets BASE_TIMEOUT plus its size at SLOWEST_RATE; nothing
# measured here is that slow unless something is broken.
BASE_TIMEOUT = 60.0
SLOWEST_RATE = 1e6  # bytes/s
# Per small file, per handshake: the same idea.
PER_FILE_TIMEOUT = 0.5
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# sshd's per-connection processes exit just after the client: how long to wait for them.
CHILDREN_EXIT_TIMEOUT = 5.0
# How often the descendants of a forking server (sshd) are sampled for their peak RSS.
SAMPLE_INTERVAL = 0.05
# Lines of a failing child's stderr quoted in the error.
_ERROR_TAIL_LINES = 5

_REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_READY_QSFTP = re.compile(
    r"qsftp server ready on (?P<host>\S+):(?P<port>\d+), .*certificate sha256:(?P<fp>[0-9a-f]{64})"
)
_READY_BARE = re.compile(r"^ready (?P<host>\S+) (?P<port>\d+)$")
_SSH_OPTIONS = [
    "-F",
    "/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "IdentitiesOnly=yes",
]
_AES_CIPHER = "aes128-gcm@openssh.com"


class BenchError(Exception):
    """A measurement, or a server it needs, failed."""


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    """One timed operation: a transfer, a batch of small files, or one handshake."""

    run_id: str
    "Identifies the bench run."
    series: str
    "Row of the table: a case, or one of its variants (small-qsftp-1conn, handshake-bare...)."
    max_datagram_size: int | None
    "QUIC max_datagram_size, bytes; None for TCP and SSH."
    engine: str | None
    "QUIC library of both ends (``aioquic`` or ``qh3``); None for TCP and SSH."
    repeat: int
    "Round of the interleaved order, from 0."
    index: int
    "Sample within the round (handshakes); 0 otherwise."
    started_at: str
    "Wall-clock start, ISO 8601 UTC (ordering only; durations use perf_counter)."
    value: float | None
    "The figure: MB/s (10^6 bytes), files/s, or ms; None when it failed."
    unit: str
    "``MB/s``, ``files/s`` or ``ms``."
    seconds: float | None
    "What the case's timer measured, seconds."
    size_bytes: int
    "Bytes transferred (all files together for small files)."
    files: int
    "Files transferred."
    client_cpu_s: float | None
    "Client CPU seconds (docs/PERFORMANCE.md says over which window)."
    server_cpu_s: float | None
    "Server CPU seconds around the worker's whole run."
    client_rss_bytes: int | None
    "Peak RSS of the client worker (largest child process for ssh tools)."
    server_rss_bytes: int | None
    "Peak RSS of the server during the measurement (largest process for sshd)."
    other_cpu_s: float | None
    "CPU seconds the rest of the machine used meanwhile (/proc/stat user+nice+system, less "
    "this bench's own processes): high values mean another workload competed for the CPUs."
    udp_drops: int | None
    "UDP datagrams dropped for a full receive buffer meanwhile (RcvbufErrors, machine-wide)."
    error: str
    "Why it failed; empty when it did not."
    connections: int | None = None
    "QUIC connections the upload was striped over (scaling case); None elsewhere."
    workers: int | None = None
    "Server processes sharing the port (scaling case); None elsewhere."
    worker_cpu_s: str = ""
    "CPU seconds of each server process meanwhile, space-separated, in the order the server "
    "started them (scaling case; its sum, plus the supervisor's, is server_cpu_s)."
    worker_rss_bytes: str = ""
    "Peak RSS of each server process meanwhile, bytes, space-separated, same order."


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """One row of the table: a series at one datagram size, over its repeats."""

    series: str
    "As in :class:`Measurement`."
    max_datagram_size: int | None
    "As in :class:`Measurement`."
    unit: str
    "Unit of median/low/high."
    n: int
    "Successful measurements."
    failed: int
    "Failed measurements."
    median: float | None
    "Median value."
    low: float | None
    "Smallest value."
    high: float | None
    "Largest value."
    median_seconds: float | None
    "Median of the timer, seconds."
    client_cpu_s: float | None
    "Median client CPU seconds."
    server_cpu_s: float | None
    "Median server CPU seconds."
    client_rss_bytes: int | None
    "Largest client peak RSS."
    server_rss_bytes: int | None
    "Largest server peak RSS."
    other_cpu_s: float | None
    "Median CPU seconds used by other processes during a measurement."
    udp_drops: float | None
    "Median UDP receive-buffer drops during a measurement (machine-wide)."
    note: str = ""
    "Why the row is empty (skipped), or the last error."
    workers: int | None = None
    "Server processes (scaling case)."
    worker_cpu_rounds: str = ""
    "Per round, the CPU seconds of each server process, busiest first (``2.01+1.95``), rounds "
    "separated by ``, ``: how the kernel spread the connections (scaling case)."
    busy_workers: str = ""
    "Per round, the server processes that used ≥ 10% of the server's CPU (scaling case)."
    worker_rss_bytes: str = ""
    "Largest peak RSS of each server process over the rounds, bytes, space-separated."


@dataclass(frozen=True, slots=True, kw_only=True)
class Ratio:
    """One comparison line."""

    label: str
    "What is divided by what."
    max_datagram_size: int | None
    "The QUIC datagram size of the QSFTP figure."
    value: float | None
    "The ratio of medians; None when a side is missing."
    better: str
    "``higher`` or ``lower``: which way favours QSFTP."
    note: str = ""
    "Why value is missing."


# --- /proc ------------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid``, seconds (children count once reaped)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return float(sum(int(fields[i]) for i in (11, 12, 13, 14))) / _CLK_TCK


def _proc_hwm(pid: int) -> int:
    """Peak RSS (VmHWM) of ``pid``, bytes; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _machine_cpu() -> float:
    """CPU seconds every process on the machine has used (user + nice + system)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    return sum(int(v) for v in fields[1:4]) / _CLK_TCK


def _udp_drops() -> int:
    """Datagrams the kernel dropped for want of socket buffer space, machine-wide (v4 + v6)."""
    total = 0
    with contextlib.suppress(OSError, ValueError):
        names, values = [
            line.split()
            for line in Path("/proc/net/snmp").read_text().splitlines()
            if line.startswith("Udp:")
        ]
        total += int(values[names.index("RcvbufErrors")])
        for line in Path("/proc/net/snmp6").read_text().splitlines():
            if line.startswith("Udp6RcvbufErrors"):
                total += int(line.split()[1])
    return total


def _own_cpu() -> float:
    """CPU seconds of this process and its reaped children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _reset_hwm(pid: int) -> None:
    """Start a new VmHWM period for ``pid`` (Linux ≥ 4.0; harmless where unsupported)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


# --- child processes --------------------------------------------------------------------------


def _snapshot_sources(workdir: Path) -> tuple[Path, str]:
    """Copy the qsftp package into ``workdir/src``; return that path and a digest of it.

    Every child imports this copy, so a whole run measures one version of the code even while
    the checkout is being edited.
    """
    import hashlib  # noqa: PLC0415

    package = Path(__file__).resolve().parent
    target = workdir / "src" / package.name
    target.mkdir(parents=True)
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        data = source.read_bytes()
        digest.update(source.name.encode() + b"\0" + data)
        (target / source.name).write_bytes(data)
    return target.parent, digest.hexdigest()


def _git_state() -> str:
    """Commit and modified files of the checkout (read-only git: no optional index writes)."""
    git = ["git", "--no-optional-locks", "-C", str(_REPO)]
    with contextlib.suppress(OSError, BenchError):
        code, head, _ = _run_child([*git, "rev-parse", "--short", "HEAD"], timeout=10)
        if code == 0:
            _, status, _ = _run_child(
                [*git, "status", "--porcelain", "--untracked-files=all", "--", "qsftp"],
                timeout=10,
            )
            changed = sorted(line[3:] for line in status.splitlines() if line.strip())
            dirty = f" + uncommitted changes in {', '.join(changed)}" if changed else ""
            return f"commit {head.strip()}{dirty}"
    return "not a git checkout"


def _child_env(workdir: Path, src: Path, loop: str) -> dict[str, str]:
    """Environment of every child: the source snapshot importable, no default location touched."""
    env = dict(os.environ)
    paths = [str(src), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["QSFTP_STATE_DIR"] = str(workdir / "state")
    env["QSFTP_CONFIG_DIR"] = str(workdir / "config")
    env["QSFTP_KNOWN_HOSTS"] = str(workdir / "known_hosts")
    env["QSFTP_LOOP"] = loop  # read by the qsftp CLIs (python -m qsftp.server)
    env.pop("QSFTP_TOKEN", None)
    return env


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-_ERROR_TAIL_LINES:])


def _kill_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a child started with start_new_session, and whatever it started, by its id."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _run_child(
    command: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run a child to completion; on timeout (or interruption) kill its process group."""
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(command)}") from None
    except BaseException:
        _kill_group(process)
        process.communicate()
        raise
    return process.returncode, out, err


@dataclass
class ServerProcess:
    """A long-lived server child and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    host: str = ""
    port: int = 0
    pin: str = ""
    root: Path | None = None
    forks: bool = False
    "True when connections run in child processes (sshd): CPU and RSS include them."
    workers: list[int] = field(default_factory=list)
    "PIDs of the processes that serve connections, metered one by one (the scaling case's "
    "servers: the process itself, or the W processes of ``qsftp.server --workers W``)."

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; always by this process's PID."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


def _read_line(process: subprocess.Popen[bytes], deadline: float) -> bytes:
    """One line of the child's stdout, or b"" at EOF or the deadline (never blocks longer)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b""
        byte = os.read(fd, 1)
        if not byte:
            return line
        line += byte
    return line


def _start_server(
    name: str, command: list[str], *, pattern: re.Pattern[str], workdir: Path, env: dict[str, str]
) -> tuple[ServerProcess, re.Match[str]]:
    log = workdir / f"{name}.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    server = ServerProcess(name=name, process=process, log=log)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        line = _read_line(process, deadline).decode(errors="replace").strip()
        match = pattern.search(line)
        if match is not None:
            server.host, server.port = match.group("host"), int(match.group("port"))
            return server, match
        if not line:
            server.stop()
            raise BenchError(f"{name} did not start: {_tail(log.read_text(errors='replace'))}")


class _PeakSampler:
    """Largest VmHWM seen among the descendants of ``pid``, sampled every SAMPLE_INTERVAL.

    For process trees whose members come and go (sshd's per-connection processes, scp and its
    ssh): a process's last growth before it exits can be missed, never over-counted.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for child in _descendants(self.pid):
                self.peak = max(self.peak, _proc_hwm(child))
            if self._stop.wait(SAMPLE_INTERVAL):
                return

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)


class _ServerMeter:
    """CPU seconds and peak RSS of a server over one measurement.

    A server with worker processes (``server.workers``) is read process by process: a
    running child's CPU is not in its parent's cutime/cstime until it is reaped.
    """

    def __init__(self, server: ServerProcess | None) -> None:
        self.server = server
        self.cpu_s: float | None = None
        self.rss_bytes: int | None = None
        self.worker_cpu_s: list[float] = []
        "Per worker process, in server.workers order (empty without workers)."
        self.worker_rss_bytes: list[int] = []
        self._cpu_start = 0.0
        self._worker_start: list[float] = []
        self._sampler: _PeakSampler | None = None

    def __enter__(self) -> _ServerMeter:
        server = self.server
        if server is not None:
            _reset_hwm(server.pid)
            for pid in server.workers:
                _reset_hwm(pid)
            self._worker_start = [_proc_cpu(pid) for pid in server.workers]
            self._cpu_start = _proc_cpu(server.pid)
            if server.forks:
                self._sampler = _PeakSampler(server.pid).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        server = self.server
        if server is None:
            return
        peak = 0
        if self._sampler is not None:
            # Per-connection processes finish just after the client: wait until they are reaped,
            # so that their CPU has reached the listener's cutime/cstime.
            deadline = time.monotonic() + CHILDREN_EXIT_TIMEOUT
            while _descendants(server.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            self._sampler.__exit__()
            peak = self._sampler.peak
        self.cpu_s = _proc_cpu(server.pid) - self._cpu_start
        self.rss_bytes = max(peak, _proc_hwm(server.pid))
        if server.workers:
            self.worker_cpu_s = [
                _proc_cpu(pid) - start
                for pid, start in zip(server.workers, self._worker_start, strict=True)
            ]
            self.worker_rss_bytes = [_proc_hwm(pid) for pid in server.workers]
            self.cpu_s += sum(
                cpu
                for pid, cpu in zip(server.workers, self.worker_cpu_s, strict=True)
                if pid != server.pid
            )
            self.rss_bytes = max(self.rss_bytes, *self.worker_rss_bytes)


# --- sshd -------------------------------------------------------------------------------------


@dataclass
class SshSetup:
    """A private sshd and what a client needs to reach it."""

    server: ServerProcess
    key: Path
    user: str
    dest: Path
    cipher_default: str

    def target(self, remote: Path) -> str:
        return f"{self.target_host}:{remote}"

    def scp(self, local: Path, remote: Path, cipher: str | None = None) -> list[str]:
        command = ["scp", "-q", *_SSH_OPTIONS, "-i", str(self.key), "-P", str(self.server.port)]
        if cipher is not None:
            command += ["-c", cipher]
        return [*command, str(local), self.target(remote)]

    def sftp(self, batch: Path) -> list[str]:
        return [
            "sftp",
            "-q",
            *_SSH_OPTIONS,
            "-i",
            str(self.key),
            "-P",
            str(self.server.port),
            "-b",
            str(batch),
            self.target_host,
        ]

    @property
    def target_host(self) -> str:
        return f"{self.user}@127.0.0.1"


def _find_sshd(option: str | None) -> Path | None:
    if option is not None:
        path = Path(option)
        return path.resolve() if path.is_file() and os.access(path, os.X_OK) else None
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate).resolve()
    return None


def _free_tcp_port() -> int:
    import socket  # noqa: PLC0415 - only the sshd setup needs it

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _default_cipher() -> str:
    """The cipher ssh offers first with no configuration (what ``scp`` uses by default)."""
    with contextlib.suppress(OSError, BenchError):
        code, out, _ = _run_child(["ssh", "-F", "/dev/null", "-G", "127.0.0.1"], timeout=10)
        for line in out.splitlines():
            if code == 0 and line.startswith("ciphers "):
                return line.split()[1].split(",")[0]
    return "unknown"


def _start_sshd(sshd: Path, workdir: Path, env: dict[str, str]) -> SshSetup:
    """A private sshd on a free 127.0.0.1 port, keys and config in ``workdir/ssh``."""
    for tool in ("ssh-keygen", "ssh", "scp", "sftp"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found")
    home = workdir / "ssh"
    home.mkdir(mode=0o700)
    dest = workdir / "ssh-dest"
    dest.mkdir()
    host_key, user_key = home / "host_key", home / "user_key"
    for key in (host_key, user_key):
        code, _, err = _run_child(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30
        )
        if code:
            raise BenchError(f"ssh-keygen failed: {_tail(err)}")
    authorized = home / "authorized_keys"
    shutil.copyfile(home / "user_key.pub", authorized)
    if os.geteuid() == 0:
        # sshd refuses to start as root without its privilege-separation directory, which the
        # distribution's service unit normally creates at boot.
        privsep = Path("/run/sshd")
        if not privsep.exists():
            privsep.mkdir(mode=0o755)
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = _free_tcp_port()
        config = home / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    "PidFile none",
                    f"AuthorizedKeysFile {authorized}",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "Subsystem sftp internal-sftp",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        pattern = re.compile(rf"Server listening on (?P<host>127\.0\.0\.1) port (?P<port>{port})")
        process = subprocess.Popen(
            [str(sshd), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        server = ServerProcess(name="sshd", process=process, log=home / "sshd.log", forks=True)
        deadline = time.monotonic() + READY_TIMEOUT
        lines: list[str] = []
        while True:
            line = _read_line(process, deadline).decode(errors="replace").strip()
            if not line:
                break
            lines.append(line)
            if pattern.search(line):
                server.host, server.port = "127.0.0.1", port
                # sshd keeps logging to stdout: drain it to a file so the pipe never fills.
                threading.Thread(target=_drain, args=(process, server.log), daemon=True).start()
                return SshSetup(
                    server=server,
                    key=user_key,
                    user=user,
                    dest=dest,
                    cipher_default=_default_cipher(),
                )
        server.stop()
        last_error = " | ".join(lines[-_ERROR_TAIL_LINES:]) or "no output"
    raise BenchError(f"sshd did not start: {last_error}")


def _drain(process: subprocess.Popen[bytes], log: Path) -> None:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    with contextlib.suppress(OSError, ValueError), open(log, "ab") as out:
        while chunk := os.read(fd, 65536):
            out.write(chunk)


# --- worker processes (hidden subcommands) ----------------------------------------------------


def _install_loop(name: str) -> None:
    if name == "uvloop":
        uvloop = importlib.import_module("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qsftp.bench _worker")
    parser.add_argument(
        "kind",
        choices=[
            "qsftp-up",
            "qsftp-down",
            "small-1conn",
            "small-per-file",
            "handshake-qsftp",
            "probe-qsftp",
            "bare",
            "handshake-bare",
            "tcp-tls",
            "exec",
        ],
    )
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pin")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--max-datagram-size", type=int)
    parser.add_argument("--congestion-control")
    parser.add_argument("--engine", default="aioquic", choices=ENGINES)
    parser.add_argument("--file", type=Path)
    parser.add_argument("--name")
    parser.add_argument("--dest", type=Path)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--remote-dir")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=SMALL_FILES_CONCURRENCY)
    parser.add_argument("--timeout", type=float, default=BASE_TIMEOUT)
    return parser


def _qsftp_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "pin": args.pin,
        "max_datagram_size": args.max_datagram_size,
        "congestion_control": args.congestion_control,
        "engine": args.engine,
    }


async def _qsftp_worker(args: argparse.Namespace) -> dict[str, Any]:
    options = _qsftp_options(args)
    if args.kind == "qsftp-up":
        result = await qsftp.upload(
            args.file,
            args.host,
            args.port,
            remote_name=args.name,
            connections=args.connections,
            **options,
        )
    elif args.kind == "qsftp-down":
        result = await qsftp.download(args.name, args.dest, args.host, args.port, **options)
    else:
        return await _qsftp_many(args, options)
    return {
        "seconds": result.seconds,
        "bytes": result.size,
        "files": 1,
        "cpu_s": result.client_cpu_s,
        "handshake_ms": result.handshake_ms,
        "session_ms": result.session_ms,
        "packets_sent": result.packets_sent,
        "packets_lost": result.packets_lost,
    }


async def _qsftp_many(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    if args.kind == "probe-qsftp":
        server = "?"
        for _ in range(args.count):  # each connection from a new port: see the scaling case
            async with qsftp.connect(args.host, args.port, **options) as conn:
                server = conn.server
        return {"server": server}
    if args.kind == "handshake-qsftp":
        samples = []
        for _ in range(args.count):
            async with qsftp.connect(args.host, args.port, **options) as conn:
                samples.append(conn.handshake_ms + conn.session_ms)
        return {"samples_ms": samples}
    files = sorted(p for p in args.dir.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    # qsftp loads its client (and aioquic) on first use: do that before the timer, which
    # covers connect → uploads → close, as the interpreter's start is outside it too.
    qsftp.connect, qsftp.upload  # noqa: B018
    cpu_start = time.process_time()
    started = time.perf_counter()
    if args.kind == "small-1conn":
        limit = asyncio.Semaphore(args.concurrency)
        async with qsftp.connect(args.host, args.port, **options) as conn:

            async def one(path: Path) -> None:
                async with limit:
                    await conn.upload(path, f"{args.remote_dir}/{path.name}")

            async with asyncio.TaskGroup() as tasks:
                for path in files:
                    tasks.create_task(one(path))
    else:
        for path in files:
            await qsftp.upload(
                path, args.host, args.port, remote_name=f"{args.remote_dir}/{path.name}", **options
            )
    return {
        "seconds": time.perf_counter() - started,
        "bytes": size,
        "files": len(files),
        "cpu_s": time.process_time() - cpu_start,
    }


async def _reference_worker(args: argparse.Namespace) -> dict[str, Any]:
    from . import _bench_bare as ref  # noqa: PLC0415 - workers load only what they run

    if args.kind == "handshake-bare":
        samples = await ref.bare_handshakes(
            args.host,
            args.port,
            args.count,
            max_datagram_size=args.max_datagram_size,
            congestion_control=args.congestion_control,
            engine=args.engine,
        )
        return {"samples_ms": samples}
    if args.kind == "bare":
        timing = await ref.bare_upload(
            args.host,
            args.port,
            args.file,
            max_datagram_size=args.max_datagram_size,
            congestion_control=args.congestion_control,
            engine=args.engine,
        )
    else:
        timing = await ref.tcp_tls_upload(args.host, args.port, args.file, certfile=args.cert)
    return {"seconds": timing.seconds, "bytes": timing.size, "files": 1, "cpu_s": timing.cpu_s}


def _exec_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time a command; its CPU and peak RSS are those of its processes (scp and its ssh).

    The peak is sampled from /proc: ``ru_maxrss`` of children would report this worker's own
    RSS, which Linux carries across fork and exec.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with _PeakSampler(os.getpid()) as sampler:
        started = time.perf_counter()
        code, _out, err = _run_child(args.command, timeout=args.timeout)
        seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise BenchError(f"{args.command[0]} exited with {code}: {_tail(err)}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": seconds, "cpu_s": cpu, "maxrss_bytes": sampler.peak or None}


def _worker_main(argv: list[str]) -> int:
    # argparse binds an optional positional list too early; split the exec command off first.
    split = argv.index("--") if "--" in argv else len(argv)
    args = _worker_parser().parse_args(argv[:split])
    args.command = argv[split + 1 :]
    try:
        if args.kind == "exec":
            result = _exec_worker(args)
        else:
            _install_loop(args.loop)
            runner: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]
            qsftp_kinds = ("qsftp-up", "qsftp-down", "small-1conn", "small-per-file")
            if args.kind in (*qsftp_kinds, "handshake-qsftp", "probe-qsftp"):
                runner = _qsftp_worker
            else:
                runner = _reference_worker
            result = asyncio.run(asyncio.wait_for(runner(args), args.timeout))
            # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across exec.
            result["maxrss_bytes"] = _proc_hwm(os.getpid())
    except (qsftp.QsftpError, BenchError, OSError, TimeoutError, ssl.SSLError) as exc:
        print(f"{args.kind}: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    print(json.dumps(result), flush=True)  # noqa: T201 - the parent reads this line
    return 0


def _server_main(argv: list[str]) -> int:
    """``_server bare|tcp-tls --loop L …``: a reference server under the chosen event loop."""
    parser = argparse.ArgumentParser(prog="python -m qsftp.bench _server")
    parser.add_argument("kind", choices=["bare", "tcp-tls"])
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--max-datagram-size", type=int)
    parser.add_argument("--congestion-control")
    parser.add_argument("--engine", default="aioquic", choices=ENGINES)
    args = parser.parse_args(argv)
    _install_loop(args.loop)
    from . import _bench_bare as ref  # noqa: PLC0415

    if args.kind == "bare":
        coro = ref.serve_bare(
            "127.0.0.1",
            0,
            certfile=args.cert,
            keyfile=args.key,
            max_datagram_size=args.max_datagram_size,
            congestion_control=args.congestion_control,
            ready=ref.print_ready,
            engine=args.engine,
        )
    else:
        coro = ref.serve_tcp_tls(
            "127.0.0.1", 0, certfile=args.cert, keyfile=args.key, ready=ref.print_ready
        )
    asyncio.run(coro)
    return 0


# --- the run ----------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one bench invocation sets up, and what it measured."""

    args: argparse.Namespace
    run_id: str
    workdir: Path
    env: dict[str, str]
    file: Path
    size: int
    certfile: Path
    keyfile: Path
    timeout: float
    qsftp_servers: dict[tuple[int, str], ServerProcess] = field(default_factory=dict)
    "By (datagram size, engine)."
    scaling_servers: dict[tuple[int, str, int], ServerProcess] = field(default_factory=dict)
    "By (datagram size, engine, server processes)."
    bare_servers: dict[tuple[int, str, str], ServerProcess] = field(default_factory=dict)
    "By (datagram size, event loop, engine)."
    tcp_server: ServerProcess | None = None
    ssh: SshSetup | None = None
    server_says: dict[tuple[int, str], str] = field(default_factory=dict)
    "What each QSFTP server answered as its name (it includes its event loop)."
    small_dir: Path | None = None
    small_size: int = 0
    measurements: list[Measurement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def worker(
        self, kind: str, *extra: str, timeout: float | None = None, loop: str | None = None
    ) -> dict[str, Any]:
        """Run one worker process; its JSON line, or BenchError."""
        limit = timeout or self.timeout
        command = [sys.executable, "-m", "qsftp.bench", "_worker", kind]
        command += ["--loop", loop or self.args.loop]
        command += ["--timeout", f"{limit:g}", *extra]
        # The worker bounds itself; this outer bound also covers its start-up and shut-down.
        code, out, err = _run_child(command, timeout=limit + BASE_TIMEOUT, env=self.env)
        if code:
            raise BenchError(_tail(err) or f"worker exited with {code}")
        lines = out.strip().splitlines()
        if not lines:
            raise BenchError(f"worker printed nothing: {_tail(err)}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def quic_options(self, dgram: int, engine: str = "aioquic") -> list[str]:
        options = ["--max-datagram-size", str(dgram), "--engine", engine]
        # qh3 runs CUBIC only: a --congestion-control choice applies to aioquic's rows.
        if self.args.congestion_control and engine == "aioquic":
            options += ["--congestion-control", self.args.congestion_control]
        return options


def series_name(base: str, engine: str | None) -> str:
    """The table row of case ``base`` on ``engine``: aioquic's keep the case's name."""
    return base if engine in (None, "aioquic") else f"{base}-{engine}"


def _split_series(series: str) -> tuple[str, str | None]:
    """``(case, engine)`` of a table row (engine None: aioquic, or not a QUIC row)."""
    for engine in ENGINES:
        if engine != "aioquic" and series.endswith(f"-{engine}"):
            return series[: -len(engine) - 1], engine
    return series, None


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _record(
    run: _Run,
    series: str,
    dgram: int | None,
    repeat: int,
    *,
    server: ServerProcess | None,
    call: Callable[[], dict[str, Any]],
    unit: str,
    size_bytes: int,
    files: int,
    engine: str | None = None,
    connections: int | None = None,
) -> list[Measurement]:
    """Run ``call`` (one worker) while metering ``server``; one Measurement per sample."""
    started_at = _now_iso()
    base: dict[str, Any] = {
        "run_id": run.run_id,
        "series": series_name(series, engine),
        "max_datagram_size": dgram,
        "engine": engine,
        "repeat": repeat,
        "started_at": started_at,
        "unit": unit,
        "size_bytes": size_bytes,
        "files": files,
        "connections": connections,
        "workers": None if connections is None or server is None else len(server.workers) or 1,
    }
    meter = _ServerMeter(server)
    machine_start, own_start, drops_start = _machine_cpu(), _own_cpu(), _udp_drops()
    try:
        with meter:
            out = call()
        if "bytes" in out and out["bytes"] != size_bytes:
            raise BenchError(f"transferred {out['bytes']} bytes, expected {size_bytes}")
    except (BenchError, OSError, ValueError, KeyError) as exc:
        base.update(_worker_columns(meter))
        measurement = Measurement(
            **base,
            index=0,
            value=None,
            seconds=None,
            client_cpu_s=None,
            server_cpu_s=meter.cpu_s,
            client_rss_bytes=None,
            server_rss_bytes=meter.rss_bytes,
            other_cpu_s=None,
            udp_drops=None,
            error=str(exc) or type(exc).__name__,
        )
        return [measurement]
    if "samples_ms" in out:
        return [
            Measurement(
                **base,
                index=i,
                value=float(sample),
                seconds=sample / 1000.0,
                client_cpu_s=None,
                server_cpu_s=None,
                client_rss_bytes=None,
                server_rss_bytes=None,
                other_cpu_s=None,
                udp_drops=None,
                error="",
            )
            for i, sample in enumerate(out["samples_ms"])
        ]
    base.update(_worker_columns(meter))
    ours = _own_cpu() - own_start + (meter.cpu_s or 0.0)
    other = max(0.0, _machine_cpu() - machine_start - ours)
    drops = _udp_drops() - drops_start
    seconds = float(out["seconds"])
    if unit == "MB/s":
        value = size_bytes / seconds / 1e6
    elif unit == "files/s":
        value = files / seconds
    else:
        value = seconds * 1000.0
    return [
        Measurement(
            **base,
            index=0,
            value=value,
            seconds=seconds,
            client_cpu_s=out.get("cpu_s"),
            server_cpu_s=meter.cpu_s,
            client_rss_bytes=out.get("maxrss_bytes"),
            server_rss_bytes=meter.rss_bytes,
            other_cpu_s=other,
            udp_drops=drops,
            error="",
        )
    ]


def _worker_columns(meter: _ServerMeter) -> dict[str, str]:
    return {
        "worker_cpu_s": " ".join(f"{cpu:.3f}" for cpu in meter.worker_cpu_s),
        "worker_rss_bytes": " ".join(str(rss) for rss in meter.worker_rss_bytes),
    }


def _qsftp_transfer(
    run: _Run, case: str, dgram: int, engine: str, repeat: int
) -> list[Measurement]:
    server = run.qsftp_servers[dgram, engine]
    assert server.root is not None
    common = ["--host", server.host, "--port", str(server.port), "--pin", server.pin]
    common += run.quic_options(dgram, engine)
    if case == "qsftp-up":
        name = f"up-{repeat}-{uuid.uuid4().hex[:6]}.bin"
        extra = [*common, "--file", str(run.file), "--name", name]
        cleanup = server.root / name
    else:
        cleanup = run.workdir / f"down-{repeat}-{uuid.uuid4().hex[:6]}.bin"
        extra = [*common, "--name", run.file.name, "--dest", str(cleanup)]
    try:
        return _record(
            run,
            case,
            dgram,
            repeat,
            server=server,
            call=lambda: run.worker(case, *extra),
            unit="MB/s",
            size_bytes=run.size,
            files=1,
            engine=engine,
        )
    finally:
        cleanup.unlink(missing_ok=True)


def scaling_series(connections: int, workers: int) -> str:
    """The table row of the scaling case (before any engine suffix)."""
    return f"scaling-{connections}c-{workers}w"


_SCALING = re.compile(r"^scaling-(?P<connections>\d+)c-(?P<workers>\d+)w$")


def _scaling_transfer(
    run: _Run, dgram: int, engine: str, repeat: int, *, connections: int, workers: int
) -> list[Measurement]:
    server = run.scaling_servers[dgram, engine, workers]
    assert server.root is not None
    name = f"scale-{repeat}-{uuid.uuid4().hex[:6]}.bin"
    extra = ["--host", server.host, "--port", str(server.port), "--pin", server.pin]
    extra += [*run.quic_options(dgram, engine), "--file", str(run.file), "--name", name]
    extra += ["--connections", str(connections)]
    try:
        return _record(
            run,
            scaling_series(connections, workers),
            dgram,
            repeat,
            server=server,
            call=lambda: run.worker("qsftp-up", *extra),
            unit="MB/s",
            size_bytes=run.size,
            files=1,
            engine=engine,
            connections=connections,
        )
    finally:
        (server.root / name).unlink(missing_ok=True)


def _bare_transfer(run: _Run, loop: str, dgram: int, engine: str, repeat: int) -> list[Measurement]:
    server = run.bare_servers[dgram, loop, engine]
    extra = ["--host", server.host, "--port", str(server.port), "--file", str(run.file)]
    return _record(
        run,
        "bare" if loop == "asyncio" else f"bare-{loop}",
        dgram,
        repeat,
        server=server,
        call=lambda: run.worker("bare", *extra, *run.quic_options(dgram, engine), loop=loop),
        unit="MB/s",
        size_bytes=run.size,
        files=1,
        engine=engine,
    )


def _tcp_transfer(run: _Run, repeat: int) -> list[Measurement]:
    server = run.tcp_server
    assert server is not None
    extra = ["--host", server.host, "--port", str(server.port)]
    extra += ["--file", str(run.file), "--cert", str(run.certfile)]
    return _record(
        run,
        "tcp-tls",
        None,
        repeat,
        server=server,
        call=lambda: run.worker("tcp-tls", *extra),
        unit="MB/s",
        size_bytes=run.size,
        files=1,
    )


def _exec(run: _Run, command: list[str], timeout: float) -> Callable[[], dict[str, Any]]:
    return lambda: run.worker("exec", "--", *command, timeout=timeout)


def _ssh_case(run: _Run, case: str, repeat: int) -> list[Measurement]:
    ssh = run.ssh
    assert ssh is not None
    remote = ssh.dest / f"{case}-{repeat}.bin"
    if case == "sftp":
        batch = run.workdir / f"sftp-{repeat}.batch"
        batch.write_text(f"put {shlex.quote(str(run.file))} {shlex.quote(str(remote))}\n")
        command = ssh.sftp(batch)
    else:
        cipher = _AES_CIPHER if case == "scp-aes128gcm" else None
        command = ssh.scp(run.file, remote, cipher)
    try:
        return _record(
            run,
            case,
            None,
            repeat,
            server=ssh.server,
            call=_exec(run, command, run.timeout),
            unit="MB/s",
            size_bytes=run.size,
            files=1,
        )
    finally:
        remote.unlink(missing_ok=True)


def _ssh_setup(run: _Run, repeat: int) -> list[Measurement]:
    ssh = run.ssh
    assert ssh is not None
    empty = run.workdir / "empty.batch"
    empty.write_text("")
    return _record(
        run,
        "ssh-setup",
        None,
        repeat,
        server=ssh.server,
        call=_exec(run, ssh.sftp(empty), BASE_TIMEOUT),
        unit="ms",
        size_bytes=0,
        files=0,
    )


def _small_timeout(run: _Run) -> float:
    return BASE_TIMEOUT + PER_FILE_TIMEOUT * int(run.args.small_files)


def _small_qsftp(run: _Run, series: str, dgram: int, engine: str, repeat: int) -> list[Measurement]:
    server = run.qsftp_servers[dgram, engine]
    assert server.root is not None and run.small_dir is not None
    remote_dir = f"{series}-{repeat}-{uuid.uuid4().hex[:6]}"
    kind = "small-1conn" if series == "small-qsftp-1conn" else "small-per-file"
    extra = ["--host", server.host, "--port", str(server.port), "--pin", server.pin]
    extra += [*run.quic_options(dgram, engine), "--dir", str(run.small_dir)]
    extra += ["--remote-dir", remote_dir]
    extra += ["--concurrency", str(run.args.small_concurrency)]
    try:
        return _record(
            run,
            series,
            dgram,
            repeat,
            server=server,
            call=lambda: run.worker(kind, *extra, timeout=_small_timeout(run)),
            unit="files/s",
            size_bytes=run.small_size,
            files=run.args.small_files,
            engine=engine,
        )
    finally:
        shutil.rmtree(server.root / remote_dir, ignore_errors=True)


def _small_sftp(run: _Run, repeat: int) -> list[Measurement]:
    ssh = run.ssh
    assert ssh is not None and run.small_dir is not None
    remote_dir = ssh.dest / f"small-{repeat}"
    remote_dir.mkdir()
    batch = run.workdir / f"small-sftp-{repeat}.batch"
    lines = [
        f"put {shlex.quote(str(path))} {shlex.quote(str(remote_dir / path.name))}"
        for path in sorted(run.small_dir.iterdir())
    ]
    batch.write_text("\n".join(lines) + "\n")
    try:
        return _record(
            run,
            "small-sftp",
            None,
            repeat,
            server=ssh.server,
            call=_exec(run, ssh.sftp(batch), _small_timeout(run)),
            unit="files/s",
            size_bytes=run.small_size,
            files=run.args.small_files,
        )
    finally:
        shutil.rmtree(remote_dir, ignore_errors=True)


def _handshakes(run: _Run, series: str, dgram: int, engine: str, repeat: int) -> list[Measurement]:
    if series == "handshake-qsftp":
        server = run.qsftp_servers[dgram, engine]
        extra = ["--host", server.host, "--port", str(server.port), "--pin", server.pin]
    else:
        server = run.bare_servers[dgram, _bare_loops(run.args.loop, engine)[-1], engine]
        extra = ["--host", server.host, "--port", str(server.port)]
    extra += [*run.quic_options(dgram, engine), "--count", str(run.args.handshakes)]
    kind = series
    limit = BASE_TIMEOUT + PER_FILE_TIMEOUT * run.args.handshakes
    return _record(
        run,
        series,
        dgram,
        repeat,
        server=None,
        call=lambda: run.worker(kind, *extra, timeout=limit),
        unit="ms",
        size_bytes=0,
        files=0,
        engine=engine,
    )


def _plan(run: _Run) -> list[tuple[str, Callable[[int], list[Measurement]]]]:
    """One round of the interleaved order: (label, measure(repeat)) in the order they run."""
    cases = run.args.cases
    plan: list[tuple[str, Callable[[int], list[Measurement]]]] = []

    def add(label: str, fn: Callable[[int], list[Measurement]]) -> None:
        plan.append((label, fn))

    for dgram, engine in _quic_settings(run):
        for case in ("qsftp-up", "qsftp-down"):
            if case in cases:
                label = f"{series_name(case, engine)} @{dgram}"
                add(label, functools.partial(_qsftp_transfer, run, case, dgram, engine))
        if "bare" in cases:
            for loop in _bare_loops(run.args.loop, engine):
                series = series_name("bare" if loop == "asyncio" else f"bare-{loop}", engine)
                add(
                    f"{series} @{dgram}",
                    functools.partial(_bare_transfer, run, loop, dgram, engine),
                )
    if "tcp-tls" in cases:
        add("tcp-tls", functools.partial(_tcp_transfer, run))
    if run.ssh is not None:
        for case in SSH_CASES:
            if case in cases:
                add(case, functools.partial(_ssh_case, run, case))
        if any(case in cases for case in SSH_CASES):
            add("ssh-setup", functools.partial(_ssh_setup, run))
    if "small-files" in cases and run.args.small_files > 0:
        for dgram, engine in _quic_settings(run):
            for series in ("small-qsftp-1conn", "small-qsftp-per-file"):
                add(
                    f"{series_name(series, engine)} @{dgram}",
                    functools.partial(_small_qsftp, run, series, dgram, engine),
                )
        if run.ssh is not None:
            add("small-sftp", functools.partial(_small_sftp, run))
    if "handshake" in cases:
        for dgram, engine in _quic_settings(run):
            for series in ("handshake-qsftp", "handshake-bare"):
                add(
                    f"{series_name(series, engine)} @{dgram}",
                    functools.partial(_handshakes, run, series, dgram, engine),
                )
    if "scaling" in cases:
        for dgram, engine in _quic_settings(run):
            for workers in run.args.workers:
                for connections in run.args.connections:
                    series = series_name(scaling_series(connections, workers), engine)
                    add(
                        f"{series} @{dgram}",
                        functools.partial(
                            _scaling_transfer,
                            run,
                            dgram,
                            engine,
                            connections=connections,
                            workers=workers,
                        ),
                    )
    return plan


def _quic_settings(run: _Run) -> list[tuple[int, str]]:
    """Every (datagram size, engine) the QUIC cases run with: sizes an engine cannot carry
    are left out for that engine."""
    return [
        (dgram, engine)
        for dgram in run.args.datagram_size
        for engine in run.args.engine
        if dgram <= get_engine(engine).max_datagram_size
    ]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _bare_loops(loop: str, engine: str = "aioquic") -> list[str]:
    """Loops the bare case runs on: asyncio's (the engine as shipped), plus ``loop`` if other
    (aioquic only: the bare-uvloop row shows what the loop does to unmodified aioquic)."""
    return ["asyncio"] if loop == "asyncio" or engine != "aioquic" else ["asyncio", loop]


def _start_servers(run: _Run, stack: contextlib.ExitStack) -> None:
    args = run.args
    cases = set(args.cases)
    python = [sys.executable, "-m", "qsftp.bench", "_server"]
    needs_qsftp = cases & {"qsftp-up", "qsftp-down", "handshake"} or (
        "small-files" in cases and args.small_files > 0
    )
    for dgram, engine in _quic_settings(run):
        if needs_qsftp:
            server = _start_qsftp_server(
                run, stack, f"{dgram}-{engine}", run.quic_options(dgram, engine), serve=run.file
            )
            run.qsftp_servers[dgram, engine] = server
            # One unmeasured connection: the first in a fresh process pays for lazy set-up.
            _probe_qsftp_server(run, server, dgram, engine)
        if "scaling" in cases:
            for workers in args.workers:
                _start_scaling_server(run, stack, dgram, engine, workers)
        loops = set(_bare_loops(args.loop, engine)) if "bare" in cases else set()
        if "handshake" in cases:
            loops.add(_bare_loops(args.loop, engine)[-1])
        for loop in sorted(loops):
            command = [*python, "bare", "--loop", loop, "--cert", str(run.certfile)]
            command += ["--key", str(run.keyfile), *run.quic_options(dgram, engine)]
            server, _ = _start_server(
                f"bare-server-{dgram}-{loop}-{engine}",
                command,
                pattern=_READY_BARE,
                workdir=run.workdir,
                env=run.env,
            )
            stack.callback(server.stop)
            run.bare_servers[dgram, loop, engine] = server
            extra = ["--host", server.host, "--port", str(server.port), "--count", "1"]
            run.worker("handshake-bare", *extra, *run.quic_options(dgram, engine), loop=loop)
    if "tcp-tls" in cases:
        command = [*python, "tcp-tls", "--loop", args.loop, "--cert", str(run.certfile)]
        command += ["--key", str(run.keyfile)]
        server, _ = _start_server(
            "tcp-tls-server", command, pattern=_READY_BARE, workdir=run.workdir, env=run.env
        )
        stack.callback(server.stop)
        run.tcp_server = server
    wants_ssh = [c for c in SSH_CASES if c in cases]
    if "small-files" in cases and args.small_files > 0:
        wants_ssh.append("small-sftp")
    if wants_ssh:
        sshd = _find_sshd(args.sshd)
        reason = ""
        if sshd is None:
            reason = f"sshd not found ({args.sshd or 'PATH, /usr/sbin'}): install openssh-server"
        else:
            try:
                run.ssh = _start_sshd(sshd, run.workdir, run.env)
                stack.callback(run.ssh.server.stop)
            except (BenchError, OSError) as exc:
                reason = f"private sshd unavailable: {exc}"
        if reason:
            for case in wants_ssh:
                run.skipped[case] = reason


def _start_scaling_server(
    run: _Run, stack: contextlib.ExitStack, dgram: int, engine: str, workers: int
) -> None:
    """A ``qsftp.server --workers W`` (W > 1: a supervisor and W processes on one port)."""
    name = f"scaling-{dgram}-{engine}-{workers}w"
    options = [*run.quic_options(dgram, engine), "--workers", str(workers)]
    server = _start_qsftp_server(run, stack, name, options)
    # The supervisor prints its ready line once every worker has printed its own.
    server.workers = _children(server.pid) if workers > 1 else [server.pid]
    if len(server.workers) != workers:
        raise BenchError(f"{name}: expected {workers} server processes, found {server.workers}")
    run.scaling_servers[dgram, engine, workers] = server
    count = WARM_UP_CONNECTIONS_PER_WORKER * workers
    _probe_qsftp_server(run, server, dgram, engine, "--count", str(count))


def _start_qsftp_server(
    run: _Run,
    stack: contextlib.ExitStack,
    name: str,
    options: list[str],
    *,
    serve: Path | None = None,
) -> ServerProcess:
    """A ``qsftp.server`` on a fresh root ``root-<name>`` (holding ``serve`` when given),
    stopped when ``stack`` closes."""
    root = run.workdir / f"root-{name}"
    root.mkdir()
    if serve is not None:
        _link_or_copy(serve, root / serve.name)
    # The server CLI picks its event loop from QSFTP_LOOP (set in run.env).
    command = [sys.executable, "-m", "qsftp.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--root", str(root), "--state-dir", str(run.certfile.parent), *options]
    server, match = _start_server(
        f"qsftp-server-{name}",
        command,
        pattern=_READY_QSFTP,
        workdir=run.workdir,
        env=run.env,
    )
    server.pin, server.root = match.group("fp"), root
    stack.callback(server.stop)
    return server


def _probe_qsftp_server(
    run: _Run, server: ServerProcess, dgram: int, engine: str, *more: str
) -> None:
    """Unmeasured connections to ``server``; records what the server says it is."""
    extra = ["--host", server.host, "--port", str(server.port), "--pin", server.pin, *more]
    probe = run.worker("probe-qsftp", *extra, *run.quic_options(dgram, engine))
    run.server_says[dgram, engine] = str(probe.get("server", "?"))


def _make_small_files(run: _Run, test_file: Callable[..., Path]) -> None:
    count = run.args.small_files
    source = test_file(count * SMALL_FILE_SIZE, seed=SMALL_FILES_SEED)
    directory = run.workdir / "small"
    directory.mkdir()
    with open(source, "rb") as data:
        for i in range(count):
            (directory / f"f{i:05d}.bin").write_bytes(data.read(SMALL_FILE_SIZE))
    run.small_dir, run.small_size = directory, count * SMALL_FILE_SIZE


def _warm_page_cache(path: Path) -> None:
    """Read the file once, so every case starts from the page cache alike."""
    with open(path, "rb") as file:
        while file.read(1 << 20):
            pass


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201 - progress of a long run


def _measure_all(run: _Run) -> None:
    plan = _plan(run)
    repeats = run.args.repeats
    for repeat in range(repeats):
        for label, measure in plan:
            for m in measure(repeat):
                run.measurements.append(m)
            last = run.measurements[-1]
            if last.error:
                shown = f"FAILED ({last.error})"
            elif last.unit == "ms":
                values = [m.value for m in run.measurements[-run.args.handshakes :] if m.value]
                shown = f"median {_format_value(_median(values), 'ms')} ms"
                if label == "ssh-setup":
                    shown = f"{_format_value(last.value, 'ms')} ms"
            else:
                shown = (
                    f"{_format_value(last.value, last.unit)} {last.unit} in {last.seconds:.2f} s"
                )
            _progress(f"[{repeat + 1}/{repeats}] {label}: {shown}")


# --- summaries, ratios, output ----------------------------------------------------------------

# Table rows, in order.
_SERIES = (
    "qsftp-up",
    "qsftp-down",
    "bare",
    "bare-uvloop",
    "tcp-tls",
    "scp",
    "scp-aes128gcm",
    "sftp",
    "ssh-setup",
    "small-qsftp-1conn",
    "small-qsftp-per-file",
    "small-sftp",
    "handshake-qsftp",
    "handshake-bare",
)
_UNITS = {"ssh-setup": "ms", "handshake-qsftp": "ms", "handshake-bare": "ms"}


def _unit(series: str) -> str:
    series = _split_series(series)[0]
    return _UNITS.get(series, "files/s" if series.startswith("small-") else "MB/s")


def _series_order(series: str) -> tuple[int, int, int, int]:
    case, engine = _split_series(series)
    order = ENGINES.index(engine or "aioquic")
    if match := _SCALING.match(case):  # after every other row, by workers, then connections
        workers, connections = int(match["workers"]), int(match["connections"])
        return len(_SERIES), order, workers, connections
    return _SERIES.index(case), order, 0, 0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(measurements: list[Measurement], skipped: dict[str, str]) -> list[Summary]:
    """One Summary per (series, datagram size) measured, plus one per skipped series."""
    keys: list[tuple[str, int | None]] = []
    for m in measurements:
        if (m.series, m.max_datagram_size) not in keys:
            keys.append((m.series, m.max_datagram_size))
    keys.sort(key=lambda k: (*_series_order(k[0]), k[1] or 0))
    out: list[Summary] = []
    for series, dgram in keys:
        rows = [m for m in measurements if (m.series, m.max_datagram_size) == (series, dgram)]
        good = [m for m in rows if not m.error and m.value is not None]
        values = [m.value for m in good if m.value is not None]
        errors = [m.error for m in rows if m.error]

        def med(attr: str, rows: list[Measurement] = good) -> float | None:
            return _median([v for m in rows if (v := getattr(m, attr)) is not None])

        def peak(attr: str, rows: list[Measurement] = good) -> int | None:
            found = [v for m in rows if (v := getattr(m, attr)) is not None]
            return max(found) if found else None

        out.append(
            Summary(
                series=series,
                max_datagram_size=dgram,
                unit=rows[0].unit,
                n=len(values),
                failed=len(errors),
                median=_median(values),
                low=min(values) if values else None,
                high=max(values) if values else None,
                median_seconds=med("seconds"),
                client_cpu_s=med("client_cpu_s"),
                server_cpu_s=med("server_cpu_s"),
                client_rss_bytes=peak("client_rss_bytes"),
                server_rss_bytes=peak("server_rss_bytes"),
                other_cpu_s=med("other_cpu_s"),
                udp_drops=med("udp_drops"),
                note=f"failed: {errors[-1]}" if errors else "",
                **_spread(good),
            )
        )
    for series, reason in skipped.items():
        out.append(
            Summary(
                series=series,
                max_datagram_size=None,
                unit=_unit(series),
                n=0,
                failed=0,
                median=None,
                low=None,
                high=None,
                median_seconds=None,
                client_cpu_s=None,
                server_cpu_s=None,
                client_rss_bytes=None,
                server_rss_bytes=None,
                other_cpu_s=None,
                udp_drops=None,
                note=f"skipped: {reason}",
            )
        )
    return out


def _spread(rows: list[Measurement]) -> dict[str, Any]:
    """The Summary fields that say how a scaling row's connections spread over the workers."""
    if not rows or rows[0].workers is None:
        return {}
    rounds, busy, peaks = [], [], [0] * int(rows[0].workers)
    for m in rows:
        cpus = sorted((float(v) for v in m.worker_cpu_s.split()), reverse=True)
        total = sum(cpus)
        rounds.append("+".join(f"{cpu:.2f}" for cpu in cpus))
        busy.append(str(sum(1 for cpu in cpus if total and cpu >= BUSY_WORKER_SHARE * total)))
        for i, rss in enumerate(m.worker_rss_bytes.split()):
            peaks[i] = max(peaks[i], int(rss))
    return {
        "workers": rows[0].workers,
        "worker_cpu_rounds": ", ".join(rounds),
        "busy_workers": " ".join(busy),
        "worker_rss_bytes": " ".join(str(peak) for peak in peaks),
    }


def ratios(
    summaries: list[Summary], dgrams: Sequence[int], engines: Sequence[str] = DEFAULT_ENGINES
) -> list[Ratio]:
    """The comparisons issue 4 asks for, one set per datagram size (and engine)."""
    table = {(s.series, s.max_datagram_size): s for s in summaries}

    def get(series: str, dgram: int | None) -> Summary | None:
        return table.get((series, dgram)) or table.get((series, None))

    def own(case: str, engine: str) -> str:
        return series_name(case, engine)

    pairs: list[tuple[str, str, str]] = []
    for engine in engines:
        pairs += [
            (own("qsftp-up", engine), own("bare", engine), "higher"),
            (own("qsftp-down", engine), own("bare", engine), "higher"),
        ]
        if engine == "aioquic":
            pairs += [
                ("qsftp-up", "bare-uvloop", "higher"),
                ("qsftp-down", "bare-uvloop", "higher"),
            ]
        pairs += [
            (own("qsftp-up", engine), "tcp-tls", "higher"),
            (own("qsftp-down", engine), "tcp-tls", "higher"),
            (own("qsftp-up", engine), "scp", "higher"),
            (own("qsftp-down", engine), "scp", "higher"),
            (own("qsftp-up", engine), "scp-aes128gcm", "higher"),
            (own("qsftp-up", engine), "sftp", "higher"),
            (own("small-qsftp-1conn", engine), own("small-qsftp-per-file", engine), "higher"),
            (own("small-qsftp-1conn", engine), "small-sftp", "higher"),
            (own("handshake-qsftp", engine), own("handshake-bare", engine), "lower"),
        ]
    for summary in summaries:  # each scaling row against one connection, one server process
        case, on = _split_series(summary.series)
        if _SCALING.match(case) and case != scaling_series(1, 1):
            pairs.append((summary.series, series_name(scaling_series(1, 1), on), "higher"))
    pairs = list(dict.fromkeys(pairs))  # a scaling row measured at several datagram sizes
    for engine in engines:
        if engine != "aioquic" and "aioquic" in engines:  # the engines side by side
            for case in ("qsftp-up", "qsftp-down", "bare"):
                pairs.append((own(case, engine), case, "higher"))
    out: list[Ratio] = []
    for dgram in dgrams:
        for top, bottom, better in pairs:
            a, b = get(top, dgram), get(bottom, dgram)
            if a is None or b is None:
                continue  # a side was not selected with --cases
            label = f"{top} / {bottom}"
            if a.median is None or b.median is None or not b.median:
                note = ", ".join(
                    f"{name} {summary.note.split(':')[0] or 'failed'}"
                    for name, summary in ((top, a), (bottom, b))
                    if summary.median is None
                )
                out.append(
                    Ratio(
                        label=label, max_datagram_size=dgram, value=None, better=better, note=note
                    )
                )
                continue
            out.append(
                Ratio(
                    label=label,
                    max_datagram_size=dgram,
                    value=a.median / b.median,
                    better=better,
                )
            )
    return out


def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "ms":
        return f"{value:.1f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _cpu_cell(cpu: float | None, seconds: float | None) -> str:
    if cpu is None:
        return "–"
    if seconds:
        return f"{cpu:.2f} ({100 * cpu / seconds:.0f}%)"
    return f"{cpu:.2f}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.0f}"


_HEADINGS = (
    "case",
    "datagram",
    "unit",
    "median",
    "min–max",
    "n",
    "client CPU s",
    "server CPU s",
    "client RSS MB",
    "server RSS MB",
    "other CPU s",
    "UDP drops",
)


def _table_rows(summaries: list[Summary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        where = [s.series, _dgram(s.max_datagram_size), s.unit]
        if s.n == 0:
            status = "skipped" if s.note.startswith("skipped") else "FAILED"
            rows.append([*where, status, "", "0", "", "", "", "", "", ""])
            continue
        span = f"{_format_value(s.low, s.unit)}–{_format_value(s.high, s.unit)}"
        n = f"{s.n}" + (f" ({s.failed} failed)" if s.failed else "")
        rows.append(
            [
                *where,
                _format_value(s.median, s.unit),
                span,
                n,
                _cpu_cell(s.client_cpu_s, s.median_seconds),
                _cpu_cell(s.server_cpu_s, s.median_seconds),
                _mb(s.client_rss_bytes),
                _mb(s.server_rss_bytes),
                "–" if s.other_cpu_s is None else f"{s.other_cpu_s:.2f}",
                "–" if s.udp_drops is None else f"{s.udp_drops:.0f}",
            ]
        )
    return rows


def _notes(summaries: list[Summary]) -> list[str]:
    notes = []
    for s in summaries:
        if s.note:
            where = f" @{s.max_datagram_size}" if s.max_datagram_size else ""
            notes.append(f"{s.series}{where}: {s.note}")
    return notes


_SPREAD_HEADINGS = (
    "case",
    "datagram",
    "server processes",
    "busy per round",
    "CPU s per process, per round",
    "peak RSS MB per process",
)
_SPREAD_NOTE = (
    "How the kernel spread the scaling rows' connections over the server processes: each "
    "process's CPU seconds in each round, busiest first; a process is busy when it used at "
    f"least {BUSY_WORKER_SHARE:.0%} of the server's CPU."
)


def _spread_rows(summaries: list[Summary]) -> list[list[str]]:
    return [
        [
            s.series,
            _dgram(s.max_datagram_size),
            str(s.workers),
            s.busy_workers,
            s.worker_cpu_rounds,
            " ".join(_mb(int(v)) for v in s.worker_rss_bytes.split()),
        ]
        for s in summaries
        if s.workers is not None and s.n
    ]


def _dgram(value: int | None) -> str:
    return "–" if value is None else str(value)


def _ratio_text(r: Ratio) -> str:
    where = f"@{r.max_datagram_size}"
    if r.value is None:
        return f"{r.label} {where}: n/a ({r.note})"
    hint = "(>1: QSFTP faster)" if r.better == "higher" else "(<1: QSFTP faster)"
    top, _, bottom = r.label.partition(" / ")
    if top.startswith("small-qsftp-1conn") and bottom.startswith("small-qsftp-per-file"):
        hint = "(one connection vs one per file)"
    elif top.startswith("scaling-"):
        hint = "(>1: faster than one connection to one server process)"
    elif (engine := _split_series(top)[1]) is not None and _split_series(bottom) == (
        _split_series(top)[0],
        None,
    ):
        hint = f"(>1: {engine} faster than aioquic)"
    return f"{r.label} {where}: {r.value:.2f} {hint}"


def render_text(header: list[tuple[str, str]], summaries: list[Summary], rs: list[Ratio]) -> str:
    """The plain-text report: header, table, notes, ratios."""
    width = max(len(k) for k, _ in header)
    lines = [f"{k + ':':<{width + 1}} {v}" for k, v in header]
    rows = [list(_HEADINGS), *_table_rows(summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADINGS))]
    left = {0, 2}
    lines.append("")
    for row in rows:
        cells = [
            cell.ljust(widths[i]) if i in left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    if notes := _notes(summaries):
        lines += ["", "notes:", *[f"  {note}" for note in notes]]
    if spread := _spread_rows(summaries):
        lines += ["", "scaling: " + _SPREAD_NOTE]
        lines += [
            f"  {row[0]} @{row[1]}: processes {row[2]}, busy {row[3]}; CPU s {row[4]}; "
            f"peak RSS MB {row[5]}"
            for row in spread
        ]
    lines += ["", "ratios of medians:"]
    lines += [f"  {_ratio_text(r)}" for r in rs] or ["  (none: no pair of cases measured)"]
    return "\n".join(lines) + "\n"


def render_markdown(
    header: list[tuple[str, str]], summaries: list[Summary], rs: list[Ratio]
) -> str:
    """The same report as Markdown."""
    lines = [f"- **{k}**: {v}" for k, v in header]
    lines += ["", "| " + " | ".join(_HEADINGS) + " |", "|" + "---|" * len(_HEADINGS)]
    for row in _table_rows(summaries):
        lines.append("| " + " | ".join(cell or " " for cell in row) + " |")
    if notes := _notes(summaries):
        lines += ["", "Notes:", "", *[f"- {note}" for note in notes]]
    if spread := _spread_rows(summaries):
        lines += ["", _SPREAD_NOTE, ""]
        lines += ["| " + " | ".join(_SPREAD_HEADINGS) + " |", "|" + "---|" * len(_SPREAD_HEADINGS)]
        lines += ["| " + " | ".join(row) + " |" for row in spread]
    lines += ["", "Ratios of medians:", ""]
    lines += [f"- {_ratio_text(r)}" for r in rs]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, measurements: list[Measurement], meta: dict[str, Any]) -> None:
    """One row per measurement (long form); metadata in ``<path>.meta.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(Measurement.__dataclass_fields__)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for m in measurements:
            writer.writerow({k: "" if v is None else v for k, v in asdict(m).items()})
    sidecar = path.with_name(path.name + ".meta.json")
    sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def _tool_version(command: list[str]) -> str:
    with contextlib.suppress(OSError, BenchError):
        _code, out, err = _run_child(command, timeout=10)
        text = (out + err).strip().splitlines()
        return text[0] if text else "unknown"
    return "not installed"


def _mem_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB RAM"
    return "RAM unknown"


def _header(run: _Run, meta: dict[str, Any]) -> list[tuple[str, str]]:
    args = run.args
    dgrams = ", ".join(str(d) for d in args.datagram_size)
    cc = args.congestion_control or "reno (aioquic default)"
    qh3 = "qh3" in args.engine
    if qh3:
        cc += " on aioquic, cubic on qh3 (its only algorithm)"
    skipped_sizes = [
        f"{engine} skips {dgram}"
        for dgram in args.datagram_size
        for engine in args.engine
        if dgram > get_engine(engine).max_datagram_size
    ]
    loop = args.loop if args.loop == "asyncio" else f"uvloop {meta['uvloop_version']}"
    header = [
        ("command", shlex.join(["python", "-m", "qsftp.bench", *meta["argv"]])),
        ("date", meta["created"]),
        (
            "machine",
            f"{meta['hostname']}: {meta['cpu_model']}, {meta['cpu_count']} CPUs, "
            f"{meta['memory']}, {meta['os']}",
        ),
        (
            "software",
            f"Python {meta['python_version']}, aioquic {meta['aioquic_version']}, "
            f"qsftp {meta['qsftp_version']}, {meta['openssl_version']}, {meta['openssh_version']}",
        ),
        (
            "source",
            f"qsftp {meta['source_git']}; the run imported a snapshot, sha256 "
            f"{meta['source_sha256'][:16]}",
        ),
        ("event loop", f"{loop}: QSFTP clients and servers (QSFTP_LOOP), TCP+TLS, handshakes"),
        (
            "bare",
            "aioquic's asyncio layer, unmodified, on asyncio's default loop ('bare')"
            + ("" if args.loop == "asyncio" else f" and on {args.loop} ('bare-{args.loop}')")
            + (
                "; qh3's asyncio layer with its GSO/GRO transport ('bare-qh3')"
                if "qh3" in args.engine
                else ""
            ),
        ),
        (
            "engines",
            ", ".join(f"{engine} {meta.get(engine + '_version', '?')}" for engine in args.engine)
            + " (both ends of a QUIC row run one engine; qh3 rows end in -qh3)"
            + (f"; {', '.join(skipped_sizes)} (above its ceiling)" if skipped_sizes else ""),
        ),
        (
            "qsftp server",
            "python -m qsftp.server, answering "
            + ", ".join(sorted(set(run.server_says.values())) or ["–"]),
        ),
        ("datagram size", f"{dgrams} bytes; congestion control {cc}"),
        ("file", f"{run.size} bytes ({run.size / 2**20:g} MiB), seed {FILE_SEED}"),
        ("repeats", f"{args.repeats}, interleaved (each round runs every case once)"),
        (
            "load average",
            f"{_loads(meta['load_average_start'])} at start, "
            f"{_loads(meta.get('load_average_end'))} at end (1/5/15 min)",
        ),
    ]
    if "small-files" in args.cases and args.small_files > 0:
        header.append(
            (
                "small files",
                f"{args.small_files} × {SMALL_FILE_SIZE} bytes; one connection runs "
                f"{args.small_concurrency} uploads at once",
            )
        )
    if "handshake" in args.cases:
        header.append(("handshakes", f"{args.handshakes} per round, sequential, new connections"))
    if "scaling" in args.cases:
        header.append(
            (
                "scaling",
                "the upload striped over N = "
                + ", ".join(map(str, args.connections))
                + " connections (one client process, one event loop) to a server of W = "
                + ", ".join(map(str, args.workers))
                + " processes on one port (qsftp.server --workers W, SO_REUSEPORT: the kernel "
                "picks a process per connection by a hash of its addresses); rows "
                "scaling-<N>c-<W>w",
            )
        )
    if run.ssh is not None:
        header.append(
            (
                "ssh",
                f"private sshd on 127.0.0.1:{run.ssh.server.port}; scp default cipher "
                f"{run.ssh.cipher_default}",
            )
        )
    header += [("note", note) for note in run.notes]
    return header


def _loads(values: Sequence[float] | None) -> str:
    return "–" if values is None else " ".join(f"{v:.2f}" for v in values)


def _metadata(run: _Run) -> dict[str, Any]:
    from .experiment import collect_metadata  # noqa: PLC0415 - pandas stays out of the workers

    meta = collect_metadata()
    meta.update(
        bench_schema_version=SCHEMA_VERSION,
        run_id=run.run_id,
        argv=sys.argv[1:] if run.args.argv is None else run.args.argv,
        event_loop=run.args.loop,
        uvloop_version=_package_version("uvloop"),
        openssl_version=ssl.OPENSSL_VERSION,
        openssh_version=_tool_version(["ssh", "-V"]).split(",")[0],
        memory=_mem_total(),
        load_average_start=os.getloadavg(),
        datagram_sizes=run.args.datagram_size,
        engines=run.args.engine,
        congestion_control=run.args.congestion_control,
        file_size_bytes=run.size,
        file_seed=FILE_SEED,
        repeats=run.args.repeats,
        small_files=run.args.small_files,
        small_file_size=SMALL_FILE_SIZE,
        small_concurrency=run.args.small_concurrency,
        handshakes=run.args.handshakes,
        connections=run.args.connections,
        workers=run.args.workers,
        cases=run.args.cases,
    )
    return meta


def _package_version(name: str) -> str:
    import importlib.metadata  # noqa: PLC0415

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    default_loop = "asyncio"  # as the CLIs: uvloop's 1 ms timers upset aioquic's pacing
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.bench",
        description="QSFTP vs bare aioquic vs TCP+TLS vs scp/sftp on loopback, interleaved.",
    )
    parser.add_argument("--size", help=f"file size, e.g. 64MiB (default {DEFAULT_SIZE})")
    parser.add_argument("--repeats", type=int, help=f"rounds (default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--datagram-size",
        type=int,
        nargs="+",
        default=[DEFAULT_DATAGRAM_SIZE],
        metavar="BYTES",
        help=f"QUIC max_datagram_size, one or more (default {DEFAULT_DATAGRAM_SIZE})",
    )
    parser.add_argument(
        "--congestion-control",
        choices=["reno", "cubic"],
        help="default: aioquic's (reno); qh3 always runs cubic",
    )
    parser.add_argument(
        "--engine",
        nargs="+",
        choices=ENGINES,
        default=list(DEFAULT_ENGINES),
        help="QUIC libraries of the QUIC cases, one or more (default aioquic)",
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default=default_loop,
        help=f"event loop of every Python client and server (default {default_loop})",
    )
    parser.add_argument(
        "--cases", nargs="+", choices=CASES, default=list(CASES), help="subset to run"
    )
    parser.add_argument(
        "--small-files",
        type=int,
        metavar="N",
        help=f"number of 4 KiB files (default {DEFAULT_SMALL_FILES}; 0 skips)",
    )
    parser.add_argument(
        "--small-concurrency",
        type=int,
        default=SMALL_FILES_CONCURRENCY,
        help=f"uploads in flight on one connection (default {SMALL_FILES_CONCURRENCY})",
    )
    parser.add_argument(
        "--handshakes", type=int, help=f"handshakes per round (default {DEFAULT_HANDSHAKES})"
    )
    parser.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=list(DEFAULT_CONNECTIONS),
        metavar="N",
        help="scaling case: connections the upload is striped over, one or more "
        f"(default {' '.join(map(str, DEFAULT_CONNECTIONS))})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=list(DEFAULT_WORKERS),
        metavar="W",
        help="scaling case: server processes sharing the port, one or more "
        f"(default {' '.join(map(str, DEFAULT_WORKERS))})",
    )
    parser.add_argument("--sshd", help="sshd binary (default: found on PATH or in /usr/sbin)")
    parser.add_argument("--timeout", type=float, help="per-transfer bound, s (default from size)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_SIZE}, 1 round, {QUICK_SMALL_FILES} small files",
    )
    parser.add_argument("--csv", type=Path, help="write one row per measurement here")
    parser.add_argument("--markdown", type=Path, help="write the report as Markdown here")
    return parser


def _resolve(args: argparse.Namespace, parse_size: Callable[[str], int]) -> None:
    quick = args.quick
    args.size = parse_size(args.size or (QUICK_SIZE if quick else DEFAULT_SIZE))
    if args.repeats is None:
        args.repeats = 1 if quick else DEFAULT_REPEATS
    if args.small_files is None:
        args.small_files = QUICK_SMALL_FILES if quick else DEFAULT_SMALL_FILES
    if args.handshakes is None:
        args.handshakes = QUICK_HANDSHAKES if quick else DEFAULT_HANDSHAKES
    args.cases = [c for c in CASES if c in args.cases]
    if args.timeout is None:
        args.timeout = BASE_TIMEOUT + args.size / SLOWEST_RATE


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.size < 1:
        parser.error("--size must be at least 1 byte")
    if args.small_files < 0 or args.handshakes < 1 or args.small_concurrency < 1:
        parser.error("--small-files must be ≥ 0, --handshakes and --small-concurrency ≥ 1")
    if min(args.connections) < 1 or min(args.workers) < 1:
        parser.error("--connections and --workers must be at least 1")
    args.connections = sorted(set(args.connections))
    args.workers = sorted(set(args.workers))
    args.engine = list(dict.fromkeys(args.engine))
    try:
        ceiling = max(get_engine(engine).max_datagram_size for engine in args.engine)
    except qsftp.UsageError as exc:
        parser.error(f"--engine: {exc}")
    for dgram in args.datagram_size:
        if not MIN_DATAGRAM_SIZE <= dgram <= ceiling:
            names = " or ".join(args.engine)
            parser.error(f"--datagram-size {dgram}: {names} needs {MIN_DATAGRAM_SIZE}..{ceiling}")
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("--loop uvloop: uvloop is not installed")


def _run_bench(args: argparse.Namespace) -> int:
    from . import trust  # noqa: PLC0415
    from .experiment import test_file  # noqa: PLC0415

    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="qsftp-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        src, source_digest = _snapshot_sources(workdir)
        _progress(f"qsftp bench {run_id}: preparing a {args.size}-byte file")
        file = test_file(args.size, seed=FILE_SEED)
        _warm_page_cache(file)
        # One certificate for everything: the QSFTP server reuses it from its --state-dir.
        certfile, keyfile = trust.ensure_self_signed(workdir / "state")
        run = _Run(
            args=args,
            run_id=run_id,
            workdir=workdir,
            env=_child_env(workdir, src, args.loop),
            file=file,
            size=args.size,
            certfile=certfile,
            keyfile=keyfile,
            timeout=args.timeout,
        )
        if "small-files" in args.cases and args.small_files > 0:
            _make_small_files(run, test_file)
        _start_servers(run, stack)
        meta = _metadata(run)
        meta.update(source_sha256=source_digest, source_git=_git_state())
        _measure_all(run)
        meta.update(load_average_end=os.getloadavg())
    summaries = summarize(run.measurements, run.skipped)
    rs = ratios(summaries, args.datagram_size, args.engine)
    header = _header(run, meta)
    sys.stdout.write(render_text(header, summaries, rs))
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(header, summaries, rs))
    if args.csv is not None:
        meta.update(
            skipped=run.skipped,
            notes=run.notes,
            summary=[asdict(s) for s in summaries],
            ratios=[asdict(r) for r in rs],
        )
        write_csv(args.csv, run.measurements, meta)
    return 1 if any(m.error for m in run.measurements) else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qsftp.bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return _worker_main(argv[1:])
    if argv[:1] == ["_server"]:
        return _server_main(argv[1:])
    from .experiment import parse_size  # noqa: PLC0415

    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        _resolve(args, parse_size)
    except qsftp.UsageError as exc:
        parser.error(str(exc))
    _check(args, parser)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every server and worker is still ended by its PID.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        return _run_bench(args)
    except BenchError as exc:
        print(f"qsftp-bench: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        print("qsftp-bench: interrupted", file=sys.stderr)  # noqa: T201
        return 130


if __name__ == "__main__":
    sys.exit(main())
