"""The soak command: a short, bounded run completes with every operation verified."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run

from qsftp.errors import UsageError
from qsftp.netem import LinkProfile
from qsftp.soak import soak

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSFTP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(tmp_path / "config"))


def test_a_short_soak_through_a_lossy_link_verifies_every_operation() -> None:
    async def body() -> object:
        return await soak(
            clients=3, seconds=4, profile=LinkProfile(loss=0.02), max_size=300_000, seed=5
        )

    report = run(body)
    assert report.ok, report.failures  # type: ignore[attr-defined]
    assert report.operations >= 6  # type: ignore[attr-defined]
    assert report.bytes_moved > 0  # type: ignore[attr-defined]
    assert len(report.rss_mb) >= 2  # type: ignore[attr-defined]


def test_soak_refuses_unbounded_runs() -> None:
    async def body() -> None:
        with pytest.raises(UsageError):
            await soak(clients=1000, seconds=1)
        with pytest.raises(UsageError):
            await soak(clients=1, seconds=0)

    run(body)


def test_soak_cli_prints_its_report_and_exits_zero(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qsftp.soak",
            "--clients",
            "2",
            "--seconds",
            "3",
            "--max-size",
            "100000",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failures: 0" in proc.stdout and "wrong files: 0" in proc.stdout
    assert "server RSS MB" in proc.stdout


def test_cli_processes_pin_the_allocators_mmap_threshold() -> None:
    # In a child, so the test process keeps its allocator settings. glibc has mallopt; other
    # C libraries do not, and there the call must report that it did nothing.
    code = "from qsftp.session import limit_heap_growth; print(limit_heap_growth())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == str(platform.libc_ver()[0] == "glibc")
