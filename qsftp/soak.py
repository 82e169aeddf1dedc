"""``python -m qsftp.soak``: many clients upload and download random files through an emulated
link for a bounded time, against a server in its own process, and report what happened.

Every operation is checked end to end (the downloaded bytes must hash to what was uploaded);
the run fails (exit 1) on any failed operation or wrong file. Loopback only; bounded in time
and in the number of clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .client import connect
from .errors import QsftpError, UsageError
from .netem import LinkEmulator, LinkProfile

__all__ = ["SoakReport", "main", "soak"]

logger = logging.getLogger(__name__)

# A soak is a load test of our own server on loopback: keep it bounded.
MAX_CLIENTS = 64
MAX_SECONDS = 24 * 3600
# How often the server's memory is sampled.
RSS_PERIOD = 5.0
_SERVER_START_TIMEOUT = 30.0
# Realistic datagrams through the emulated link (a loopback address would pick 16384).
_DATAGRAM_SIZE = 1200


@dataclass(slots=True)
class SoakReport:
    """What a soak did."""

    seconds: float = 0.0
    "Wall time of the load."
    operations: int = 0
    "Uploads and downloads that ended verified."
    failures: list[str] = field(default_factory=list)
    "One line per failed operation."
    wrong_files: int = 0
    "Downloads whose bytes differed from the upload (must stay 0)."
    bytes_moved: int = 0
    "Bytes uploaded plus downloaded."
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    "(seconds since start, server RSS in MB) samples."

    @property
    def ok(self) -> bool:
        """True when nothing failed and no file was wrong."""
        return not self.failures and self.wrong_files == 0


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def _file(rng: random.Random, directory: Path, max_size: int, index: int) -> tuple[Path, str]:
    size = int(math.exp(rng.uniform(math.log(1024), math.log(max(max_size, 1025)))))
    data = rng.randbytes(size)
    path = directory / f"soak-{index}.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def _client(
    number: int,
    *,
    link: LinkEmulator,
    pin: str,
    deadline: float,
    workdir: Path,
    max_size: int,
    seed: int,
    report: SoakReport,
) -> None:
    rng = random.Random(f"qsftp-soak-{seed}-{number}")
    mine = workdir / f"client-{number}"
    mine.mkdir()
    index = 0
    while time.monotonic() < deadline:
        index += 1
        path, digest = await asyncio.to_thread(_file, rng, mine, max_size, index)
        remote = f"soak/{number}/{index}.bin"
        back = mine / "back.bin"
        try:
            async with connect(
                link.host, link.port, pin=pin, max_datagram_size=_DATAGRAM_SIZE
            ) as conn:
                up = await conn.upload(path, remote)
                report.operations += 1
                report.bytes_moved += up.size
                down = await conn.download(remote, back)
                report.operations += 1
                report.bytes_moved += down.size
            if down.sha256 != digest or hashlib.sha256(back.read_bytes()).hexdigest() != digest:
                report.wrong_files += 1
        except QsftpError as exc:
            report.failures.append(f"client {number}, {remote}: {type(exc).__name__}: {exc}")
        finally:
            path.unlink(missing_ok=True)
            back.unlink(missing_ok=True)


async def soak(
    *,
    clients: int = 4,
    seconds: float = 60.0,
    profile: LinkProfile | None = None,
    max_size: int = 4 * 1024 * 1024,
    seed: int = 1,
) -> SoakReport:
    """Run the soak and return its report (see the module docstring)."""
    if not 1 <= clients <= MAX_CLIENTS:
        raise UsageError(f"clients must be 1..{MAX_CLIENTS}")
    if not 0 < seconds <= MAX_SECONDS:
        raise UsageError(f"seconds must be in (0, {MAX_SECONDS}]")
    report = SoakReport()
    with tempfile.TemporaryDirectory(prefix="qsftp-soak-") as tmp:
        workdir = Path(tmp)
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "qsftp.server",
            "--port",
            "0",
            "--root",
            str(workdir / "root"),
            "--state-dir",
            str(workdir / "state"),
            "--max-datagram-size",
            str(_DATAGRAM_SIZE),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert server.stdout is not None
            line = await asyncio.wait_for(server.stdout.readline(), _SERVER_START_TIMEOUT)
            match = re.search(rb"ready on (\S+):(\d+),.*sha256:([0-9a-f]{64})", line)
            if match is None:
                raise UsageError(f"the server did not start: {line!r}")
            target = (match.group(1).decode(), int(match.group(2)))
            async with LinkEmulator(target, profile=profile or LinkProfile(), seed=seed) as link:
                started = time.monotonic()
                deadline = started + seconds

                async def sample() -> None:
                    while True:
                        report.rss_mb.append((time.monotonic() - started, _rss_mb(server.pid)))
                        await asyncio.sleep(min(RSS_PERIOD, seconds / 4))

                sampler = asyncio.ensure_future(sample())
                try:
                    async with asyncio.TaskGroup() as tasks:
                        for number in range(clients):
                            tasks.create_task(
                                _client(
                                    number,
                                    link=link,
                                    pin=match.group(3).decode(),
                                    deadline=deadline,
                                    workdir=workdir,
                                    max_size=max_size,
                                    seed=seed,
                                    report=report,
                                )
                            )
                finally:
                    sampler.cancel()
                    await asyncio.gather(sampler, return_exceptions=True)
                report.seconds = time.monotonic() - started
                report.rss_mb.append((report.seconds, _rss_mb(server.pid)))
        finally:
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(server.wait(), 20)
                except TimeoutError:
                    server.kill()
                    await server.wait()
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qsftp.soak``."""
    parser = argparse.ArgumentParser(
        prog="python -m qsftp.soak",
        description="Many clients upload and download random files through an emulated link.",
    )
    parser.add_argument("--clients", type=int, default=4, help=f"1..{MAX_CLIENTS} (default 4)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the load runs")
    length.add_argument("--seconds", type=float, help="how long the load runs (default 60)")
    parser.add_argument("--loss", type=float, default=0.0, help="packet loss on the link, 0..1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay on the link")
    parser.add_argument(
        "--max-size", type=int, default=4 * 1024 * 1024, help="largest file, bytes (4 MiB)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds files and the link")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    seconds = args.minutes * 60 if args.minutes is not None else (args.seconds or 60.0)
    try:
        profile = LinkProfile(delay_ms=args.delay_ms, loss=args.loss)
        report = asyncio.run(
            soak(
                clients=args.clients,
                seconds=seconds,
                profile=profile,
                max_size=args.max_size,
                seed=args.seed,
            )
        )
    except QsftpError as exc:
        print(f"qsftp-soak: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    rss = [mb for _, mb in report.rss_mb if not math.isnan(mb)]
    lines = [
        f"soak: {args.clients} clients, {report.seconds:.0f} s, link {profile.label()}",
        f"operations verified: {report.operations}",
        f"failures: {len(report.failures)}",
        f"wrong files: {report.wrong_files}",
        f"bytes moved: {report.bytes_moved}",
        "server RSS MB: "
        + (f"first {rss[0]:.1f}, max {max(rss):.1f}, last {rss[-1]:.1f}" if rss else "n/a"),
        "server RSS over time: "
        + ", ".join(f"{t:.0f}s={mb:.1f}" for t, mb in report.rss_mb if not math.isnan(mb)),
        *report.failures[:20],
    ]
    print("\n".join(lines))  # noqa: T201
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
