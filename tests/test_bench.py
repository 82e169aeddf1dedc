"""``python -m qsftp.bench`` as a user runs it: a real subprocess, real servers on loopback.

Nothing here asserts a speed: the benchmark is where speed lives. These tests check that the
command runs every selected case, reports what it could not run as skipped (not failed),
prints the ratios, and writes its CSV and Markdown. Every default location of the children
points into pytest's tmp dirs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from qsftp import bench

REPO = Path(__file__).resolve().parent.parent
# The quick run takes ~10 s here; the bound only keeps a broken build from hanging the suite.
RUN_TIMEOUT = 120.0
EXIT_USAGE = 2
QUICK = ["--quick", "--size", "1MiB", "--repeats", "1", "--small-files", "20"]
MEASURED_ROWS = (
    "qsftp-up",
    "qsftp-down",
    "bare",
    "tcp-tls",
    "small-qsftp-1conn",
    "small-qsftp-per-file",
    "handshake-qsftp",
    "handshake-bare",
)
SSH_ROWS = ("scp", "sftp", "small-sftp")
NUMBER = r"\d+(?:\.\d+)?"


@dataclass
class Run:
    """A finished bench run: its exit status, output and files."""

    returncode: int
    stdout: str
    stderr: str
    csv: Path
    markdown: Path


def bench_env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(
        PYTHONPATH=str(REPO),
        HOME=str(base / "home"),
        QSFTP_STATE_DIR=str(base / "state"),
        QSFTP_CONFIG_DIR=str(base / "config"),
        QSFTP_CACHE_DIR=str(base / "cache"),
    )
    return env


def run_bench(base: Path, *args: str) -> Run:
    out_csv, out_md = base / "out" / "bench.csv", base / "out" / "bench.md"
    command = [sys.executable, "-m", "qsftp.bench", *args]
    command += ["--csv", str(out_csv), "--markdown", str(out_md)]
    proc = subprocess.run(
        command,
        env=bench_env(base),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, out_csv, out_md)


def table_row(stdout: str, series: str) -> str:
    """The table line of ``series`` (the first column is the series name)."""
    for line in stdout.splitlines():
        if line.split()[:1] == [series]:
            return line
    raise AssertionError(f"no row {series!r} in:\n{stdout}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One quick run of every non-SSH case, with SSH cases asked for but no sshd to be found."""
    base = tmp_path_factory.mktemp("bench")
    cases = ["qsftp-up", "qsftp-down", "bare", "tcp-tls", "scp", "sftp"]
    cases += ["small-files", "handshake"]
    return run_bench(base, *QUICK, "--cases", *cases, "--sshd", str(base / "no-such-sshd"))


def test_quick_run_exits_zero_and_measures_every_selected_case(quick_run: Run) -> None:
    assert quick_run.returncode == 0, quick_run.stderr
    for series in MEASURED_ROWS:
        row = table_row(quick_run.stdout, series)
        assert re.search(rf"\s{NUMBER}\s+{NUMBER}–{NUMBER}\s", row), row
        assert "FAILED" not in row


def test_missing_sshd_reports_ssh_cases_as_skipped_not_failed(quick_run: Run) -> None:
    for series in SSH_ROWS:
        assert "skipped" in table_row(quick_run.stdout, series)
    assert re.search(r"scp: skipped: sshd not found", quick_run.stdout)
    assert re.search(r"qsftp-up / scp @1452: n/a \(scp skipped\)", quick_run.stdout)


def test_report_has_header_and_ratio_lines(quick_run: Run) -> None:
    out = quick_run.stdout
    for key in ("command:", "date:", "machine:", "software:", "event loop:", "datagram size:"):
        assert key in out
    for ratio in (
        "qsftp-up / bare",
        "qsftp-down / bare",
        "qsftp-up / tcp-tls",
        "small-qsftp-1conn / small-qsftp-per-file",
        "handshake-qsftp / handshake-bare",
    ):
        assert re.search(rf"{re.escape(ratio)} @1452: {NUMBER} ", out), ratio


def test_csv_has_one_row_per_measurement_and_a_metadata_sidecar(quick_run: Run) -> None:
    with open(quick_run.csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and set(rows[0]) == set(bench.Measurement.__dataclass_fields__)
    series = {row["series"] for row in rows}
    assert set(MEASURED_ROWS) <= series
    assert all(row["error"] == "" for row in rows)
    handshakes = [row for row in rows if row["series"] == "handshake-bare"]
    assert len(handshakes) == 5  # --quick: 5 handshakes, one row each
    meta = json.loads(quick_run.csv.with_name("bench.csv.meta.json").read_text())
    assert meta["bench_schema_version"] == bench.SCHEMA_VERSION
    assert meta["skipped"].keys() == {"scp", "sftp", "small-sftp"}
    assert {r["label"] for r in meta["ratios"]} >= {"qsftp-up / bare", "qsftp-up / scp"}


def test_markdown_holds_the_same_table(quick_run: Run) -> None:
    text = quick_run.markdown.read_text()
    assert "| case | datagram | unit | median |" in text
    for series in (*MEASURED_ROWS, *SSH_ROWS):
        assert f"| {series} |" in text


def test_datagram_sizes_aioquic_cannot_carry_are_refused(tmp_path: Path) -> None:
    run = run_bench(tmp_path, "--quick", "--datagram-size", "16415")
    assert run.returncode == EXIT_USAGE
    assert "16414" in run.stderr


def _sshd_available() -> bool:
    return any(p and Path(p).is_file() for p in (shutil.which("sshd"), "/usr/sbin/sshd")) and all(
        shutil.which(tool) for tool in ("ssh", "scp", "sftp", "ssh-keygen")
    )


@pytest.mark.skipif(not _sshd_available(), reason="openssh-server is not installed")
def test_ssh_cases_run_against_a_private_sshd_that_is_stopped_afterwards(tmp_path: Path) -> None:
    run = run_bench(tmp_path, *QUICK, "--cases", "scp", "sftp")
    assert run.returncode == 0, run.stderr
    for series in ("scp", "sftp", "ssh-setup"):
        assert re.search(rf"\s{NUMBER}\s+{NUMBER}–{NUMBER}\s", table_row(run.stdout, series))
    port = int(re.search(r"private sshd on 127\.0\.0\.1:(\d+)", run.stdout).group(1))  # type: ignore[union-attr]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more


def test_worker_modules_load_neither_pandas_nor_matplotlib() -> None:
    """Workers report their own peak RSS: the analysis stack must not inflate it."""
    code = (
        "import sys, qsftp.bench, qsftp._bench_bare; "
        "print([m for m in ('pandas', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=bench_env(REPO / ".no-such-dir"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    assert out.stdout.strip() == "[]"


SCALING_ROWS = ("scaling-1c-1w", "scaling-2c-1w", "scaling-1c-2w", "scaling-2c-2w")


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One quick run of the scaling case: 1 and 2 connections against 1 and 2 server processes."""
    base = tmp_path_factory.mktemp("scaling")
    return run_bench(
        base, *QUICK, "--cases", "scaling", "--connections", "1", "2", "--workers", "1", "2"
    )


def test_scaling_case_measures_every_connections_and_workers_pair(scaling_run: Run) -> None:
    assert scaling_run.returncode == 0, scaling_run.stderr
    for series in SCALING_ROWS:
        row = table_row(scaling_run.stdout, series)
        assert re.search(rf"\s{NUMBER}\s+{NUMBER}–{NUMBER}\s", row), row
    for series in SCALING_ROWS[1:]:
        assert re.search(rf"{series} / scaling-1c-1w @1452: {NUMBER} ", scaling_run.stdout)
    assert re.search(r"scaling-2c-2w @1452: processes 2, busy [12]; CPU s ", scaling_run.stdout)
    text = scaling_run.markdown.read_text()
    assert "| case | datagram | server processes | busy per round |" in text
    assert "| scaling-2c-2w | 1452 | 2 |" in text


def test_scaling_server_cpu_is_summed_over_running_worker_processes(scaling_run: Run) -> None:
    """A worker that is still running is not in its supervisor's cutime: each is read itself."""
    with open(scaling_run.csv, newline="") as file:
        rows = {row["series"]: row for row in csv.DictReader(file)}
    assert set(rows) == set(SCALING_ROWS)
    for series, row in rows.items():
        connections, workers = (int(n) for n in re.findall(r"\d+", series))
        assert (int(row["connections"]), int(row["workers"])) == (connections, workers)
        assert float(row["value"]) > 0 and row["error"] == ""
        worker_cpu = [float(v) for v in row["worker_cpu_s"].split()]
        worker_rss = [int(v) for v in row["worker_rss_bytes"].split()]
        assert len(worker_cpu) == len(worker_rss) == workers
        assert all(rss > 0 for rss in worker_rss)
        assert sum(worker_cpu) > 0
        # The supervisor adds its own (tiny) share; the workers' CPU is all there.
        assert float(row["server_cpu_s"]) >= sum(worker_cpu) - 1e-6
        assert int(row["server_rss_bytes"]) >= max(worker_rss)
