"""How sweeps set up connections (``handshake=``), their qlog traces, and ``handshakes()``.

Small real sweeps against an embedded server in a child process; no timing assertions, only
what each row must say about its connection and where its trace is.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from qsftp import qlog
from qsftp.errors import UsageError
from qsftp.experiment import (
    COLUMNS,
    HANDSHAKE_COLUMNS,
    handshakes,
    load_results,
    save_results,
    summarize,
    summarize_handshakes,
    sweep,
)
from qsftp.netem import LinkProfile

# Bounds only: these sweeps take a few seconds.
SWEEP_TIMEOUT = 90.0


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STATE", "CONFIG", "CACHE"):
        monkeypatch.setenv(f"QSFTP_{name}_DIR", str(tmp_path / name.lower()))
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)


def _run(**kwargs: Any) -> pd.DataFrame:
    async def go() -> pd.DataFrame:
        return await asyncio.wait_for(sweep(progress=False, **kwargs), SWEEP_TIMEOUT)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """One sweep over the three handshake modes, both directions, with qlog traces."""
    base = tmp_path_factory.mktemp("traced")
    monkey = pytest.MonkeyPatch()
    for name in ("STATE", "CONFIG", "CACHE"):
        monkey.setenv(f"QSFTP_{name}_DIR", str(base / name.lower()))
    try:
        frame = _run(
            sizes=["20KB"],
            chunk_sizes=[4096, 65536],
            repeats=2,
            direction="both",
            handshake=["fresh", "resumed", "reused"],
            qlog_dir=base / "qlog",
            seed=7,
        )
    finally:
        monkey.undo()
    return frame, base / "qlog"


def test_rows_record_the_handshake_mode_and_every_transfer_is_verified(
    traced: tuple[pd.DataFrame, Path],
) -> None:
    frame, _ = traced
    assert list(frame.columns) == COLUMNS
    assert set(frame["handshake"]) == {"fresh", "resumed", "reused"}
    assert (frame["error"] == "").all(), frame["error"].tolist()
    assert frame["verified"].all()
    assert frame.attrs["handshake"] == ["fresh", "resumed", "reused"]


def test_resumed_rows_resume_and_fresh_rows_do_not(traced: tuple[pd.DataFrame, Path]) -> None:
    frame, _ = traced
    assert frame.loc[frame["handshake"] == "resumed", "session_resumed"].all()
    assert not frame.loc[frame["handshake"] == "fresh", "session_resumed"].any()
    assert (frame.loc[frame["handshake"] != "reused", "connection"] == "new").all()


def test_reused_rows_share_one_connection_per_configuration(
    traced: tuple[pd.DataFrame, Path],
) -> None:
    frame, _ = traced
    reused = frame[(frame["handshake"] == "reused") & ~frame["warmup"]]
    for _, group in reused.groupby(["direction", "chunk_size_bytes"]):
        assert group["qlog_path"].nunique() == 1, "one connection, one trace"
        assert group["handshake_ms"].nunique() == 1
        assert (group["connection"] == "reused").sum() >= len(group) - 1
    fresh = frame[frame["handshake"] == "fresh"]
    assert fresh["qlog_path"].nunique() == len(fresh), "a trace per fresh connection"


def test_every_row_points_to_qlog_traces_that_parse(traced: tuple[pd.DataFrame, Path]) -> None:
    frame, qlog_dir = traced
    for column, vantage in (("qlog_path", "client"), ("server_qlog_path", "server")):
        for path in frame[column]:
            assert Path(path).is_absolute() and Path(path).parent == qlog_dir.resolve() / vantage
            trace = qlog.load(path)
            assert trace.attrs["vantage_point"] == vantage
            assert trace["packets_sent"].iloc[-1] > 0


def test_handshake_columns_survive_saving(
    traced: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    frame, _ = traced
    for suffix in (".csv", ".parquet"):
        back = load_results(save_results(frame, tmp_path / f"r{suffix}"))
        assert back["handshake"].tolist() == frame["handshake"].tolist()
        assert back["session_resumed"].tolist() == frame["session_resumed"].tolist()
        assert back["qlog_path"].tolist() == frame["qlog_path"].tolist()


def test_summary_groups_by_handshake_mode(traced: tuple[pd.DataFrame, Path]) -> None:
    summary = summarize(traced[0])
    assert set(summary["handshake"]) == {"fresh", "resumed", "reused"}


def test_resumed_sweep_through_an_emulated_link_resumes() -> None:
    frame = _run(
        sizes=["20KB"],
        repeats=2,
        handshake="resumed",
        links=[LinkProfile(delay_ms=2)],
        seed=3,
    )
    assert (frame["error"] == "").all(), frame["error"].tolist()
    assert frame["session_resumed"].all()
    assert (frame["link_mode"] == "relay").all()


def test_unknown_handshake_mode_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="handshake"):
        _run(sizes=["1KB"], handshake="zero-rtt")


def test_handshakes_compare_full_and_resumed_under_delay() -> None:
    async def go() -> pd.DataFrame:
        return await asyncio.wait_for(handshakes(delays=[0, 5], repeats=2, seed=1), 60)

    frame = asyncio.run(go())
    assert list(frame.columns) == HANDSHAKE_COLUMNS
    assert (frame["error"] == "").all(), frame["error"].tolist()
    measured = frame[~frame["warmup"]]
    assert len(measured) == 2 * 2 * 2
    assert measured.loc[measured["mode"] == "resumed", "session_resumed"].all()
    assert not measured.loc[measured["mode"] == "full", "session_resumed"].any()
    assert (measured["rtt_ms"] == 2 * measured["delay_ms"]).all()
    assert (measured["setup_ms"] >= measured["handshake_ms"]).all()
    assert (measured["first_reply_ms"] >= measured["setup_ms"]).all()
    assert (measured["bytes_down"] > 0).all() and (measured["packets_up"] > 0).all()
    summary = summarize_handshakes(frame)
    assert set(summary["mode"]) == {"full", "resumed"}
    assert (summary["n"] == 2).all()
    assert summary.loc[summary["mode"] == "resumed", "resumed"].eq(1.0).all()


def test_handshakes_command_prints_medians_and_saves_rows(tmp_path: Path) -> None:
    env = {**os.environ}
    for name in ("STATE", "CONFIG", "CACHE"):
        env[f"QSFTP_{name}_DIR"] = str(tmp_path / name.lower())
    command = [sys.executable, "-m", "qsftp.experiment", "--handshakes", "--delays", "0"]
    command += ["--repeats", "2", "--seed", "5", "--no-progress", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout and "full" in done.stdout
    frame = load_results(tmp_path / "out" / "handshakes.csv")
    assert list(frame.columns) == HANDSHAKE_COLUMNS
    assert frame.attrs["shuffle_seed"] == 5
    assert frame.loc[~frame["warmup"] & (frame["mode"] == "resumed"), "session_resumed"].all()
