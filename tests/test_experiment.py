"""Sweeps, test files, saved results and ``python -m qsftp.experiment``, on tiny real transfers.

One small sweep over loopback (embedded server in a child process, both directions) is shared
by the module; failures are produced against a port where nothing listens, which fails at once
(ICMP port unreachable) or, for a silent socket, after a short connect timeout. Every default
location (state, config, test-file cache) points into pytest's tmp dirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import qsftp
from qsftp.errors import UsageError
from qsftp.experiment import (
    COLUMNS,
    LINK_COLUMNS,
    LINK_DATAGRAM_SIZE,
    SCHEMA_VERSION,
    load_results,
    measured,
    parse_size,
    save_results,
    summarize,
    sweep,
    test_file,
)
from qsftp.netem import DirectionStats, LinkProfile

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["10KB", "100KB"]
CHUNKS = [4096, 65536]
REPEATS = 2
SEED = 1234
# Bounds only: a tiny sweep takes a few seconds, the CLI run about ten.
SWEEP_TIMEOUT = 60.0
CLI_TIMEOUT = 120.0
METADATA_KEYS = {
    "qsftp_version",
    "aioquic_version",
    "python_version",
    "hostname",
    "cpu_model",
    "cpu_count",
    "os",
    "schema_version",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env(base: Path) -> dict[str, str]:
    return {
        "QSFTP_STATE_DIR": str(base / "state"),
        "QSFTP_CONFIG_DIR": str(base / "config"),
        "QSFTP_CACHE_DIR": str(base / "cache"),
    }


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Certificates, known hosts and test files go to the test's own directory, never to ~."""
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)
    monkeypatch.delenv("QSFTP_TOKEN", raising=False)


def run_sweep(**kwargs: Any) -> pd.DataFrame:
    kwargs.setdefault("progress", False)
    return asyncio.run(asyncio.wait_for(sweep(**kwargs), SWEEP_TIMEOUT))


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, files_dir: Path) -> pd.DataFrame:
    """2 sizes × 2 chunk sizes × 2 directions × 2 repeats against an embedded server."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _env(tmp_path_factory.mktemp("sweep")).items():
            patch.setenv(key, value)
        return run_sweep(
            sizes=SIZES,
            chunk_sizes=CHUNKS,
            repeats=REPEATS,
            direction="both",
            seed=SEED,
            files_dir=files_dir,
        )


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A bound UDP socket that never answers: the handshake can only time out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def refused_sweep(seed: int, files_dir: Path, **kwargs: Any) -> pd.DataFrame:
    """A sweep against a port where nothing listens: every transfer fails at once."""
    target = ("127.0.0.1", free_udp_port(), {"timeout": 2.0})
    return run_sweep(
        sizes=SIZES,
        chunk_sizes=CHUNKS,
        repeats=REPEATS,
        target=target,
        seed=seed,
        files_dir=files_dir,
        **kwargs,
    )


def config_order(df: pd.DataFrame) -> list[tuple[Any, ...]]:
    rows = df[~df["warmup"]]
    keys = ["direction", "file_size_bytes", "chunk_size_bytes", "repeat"]
    return [tuple(row) for row in rows[keys].itertuples(index=False)]


# --- the sweep --------------------------------------------------------------------------------


def test_sweep_returns_exactly_the_columns_and_one_row_per_transfer(both: pd.DataFrame) -> None:
    configs = len(SIZES) * len(CHUNKS) * 2  # two directions
    assert list(both.columns) == COLUMNS
    assert len(both) == configs * REPEATS + 1
    assert both["warmup"].tolist() == [True] + [False] * (configs * REPEATS)
    assert both.loc[0, "repeat"] == -1
    counts = both[~both["warmup"]].groupby(["direction", "file_size_bytes", "chunk_size_bytes"])
    assert counts["repeat"].apply(sorted).tolist() == [list(range(REPEATS))] * configs


def test_every_measured_row_is_verified_against_the_cached_test_file(
    both: pd.DataFrame, files_dir: Path
) -> None:
    expected = {
        parse_size(size): hashlib.sha256(
            test_file(parse_size(size), directory=files_dir).read_bytes()
        ).hexdigest()
        for size in SIZES
    }
    rows = measured(both)
    assert len(rows) == len(both) - 1
    assert rows["verified"].all()
    assert (rows["error"] == "").all()
    assert rows["sha256"].tolist() == [expected[s] for s in rows["file_size_bytes"]]


def test_timings_and_counters_are_filled_and_consistent(both: pd.DataFrame) -> None:
    rows = measured(both)
    assert (rows["seconds"] > 0).all()
    assert (rows["handshake_ms"] > 0).all()
    assert (rows["packets_sent"] > 0).all()
    assert (rows["packets_lost"] >= 0).all()
    assert (rows["client_cpu_s"] >= 0).all() and (rows["server_cpu_s"] >= 0).all()
    throughput = 8 * rows["file_size_bytes"] / rows["seconds"] / 1e6
    assert rows["throughput_mbps"].tolist() == pytest.approx(throughput.tolist())
    assert set(rows["connection"]) == {"new"}
    assert rows["max_datagram_size"].notna().all()


def test_direction_both_measures_uploads_and_downloads(both: pd.DataFrame) -> None:
    rows = measured(both)
    per_direction = rows.groupby("direction")[["file_size_bytes", "chunk_size_bytes"]]
    configs = {way: set(map(tuple, group.to_numpy())) for way, group in per_direction}
    assert set(configs) == {"upload", "download"}
    assert configs["upload"] == configs["download"]


def test_attrs_carry_the_metadata_and_the_shuffle_seed(both: pd.DataFrame) -> None:
    attrs = both.attrs
    assert attrs.keys() >= METADATA_KEYS
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["qsftp_version"] == qsftp.__version__
    assert attrs["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert attrs["cpu_count"] == os.cpu_count()
    assert attrs["shuffle_seed"] == SEED
    assert attrs["run_id"] == both.loc[0, "run_id"] and both["run_id"].nunique() == 1
    assert attrs["repeats"] == REPEATS and attrs["target"] == "embedded"
    assert attrs["server_software"].startswith(f"qsftp/{qsftp.__version__}")


def test_the_same_seed_gives_the_same_order(files_dir: Path) -> None:
    first = refused_sweep(7, files_dir)
    again = refused_sweep(7, files_dir)
    other = refused_sweep(8, files_dir)
    assert first.attrs["shuffle_seed"] == again.attrs["shuffle_seed"] == 7
    assert config_order(first) == config_order(again)
    assert config_order(first) != config_order(other)
    assert sorted(config_order(first)) == sorted(config_order(other))


def test_without_a_seed_a_random_one_is_recorded(files_dir: Path) -> None:
    df = refused_sweep(None, files_dir)  # type: ignore[arg-type]
    seed = df.attrs["shuffle_seed"]
    assert isinstance(seed, int)
    assert config_order(refused_sweep(seed, files_dir)) == config_order(df)


def test_a_refused_transfer_becomes_a_row_and_the_sweep_goes_on(files_dir: Path) -> None:
    df = refused_sweep(3, files_dir)
    assert list(df.columns) == COLUMNS
    assert len(df) == len(SIZES) * len(CHUNKS) * REPEATS + 1
    assert df["error"].str.len().gt(0).all()
    assert df["error"].str.contains("TransportError").all()
    assert not df["verified"].any()
    assert df["seconds"].isna().all()
    assert measured(df).empty


def test_a_connect_timeout_becomes_a_row_with_its_error(silent_port: int, files_dir: Path) -> None:
    """The target's options reach connect(): ``timeout`` bounds each handshake."""
    df = run_sweep(
        sizes=["10KB"],
        chunk_sizes=[4096],
        repeats=1,
        target=("127.0.0.1", silent_port, {"timeout": 0.3}),
        files_dir=files_dir,
    )
    assert len(df) == 2
    assert df["error"].str.startswith("ConnectTimeout").all()
    assert not df["verified"].any()


def test_bad_sweep_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        run_sweep(direction="sideways")
    with pytest.raises(UsageError):
        run_sweep(repeats=0)
    with pytest.raises(UsageError):
        run_sweep(sizes=["ten kilobytes"])


# --- test files -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) + 3])
def test_test_file_has_exactly_the_size(tmp_path: Path, size: int) -> None:
    assert test_file(size, directory=tmp_path).stat().st_size == size


def test_test_files_are_deterministic_per_size_and_seed(tmp_path: Path) -> None:
    one = test_file(5000, seed=1, directory=tmp_path / "a").read_bytes()
    same = test_file(5000, seed=1, directory=tmp_path / "b").read_bytes()
    other_seed = test_file(5000, seed=2, directory=tmp_path / "a").read_bytes()
    assert one == same
    assert one != other_seed
    assert len(set(one)) > 200  # pseudo-random bytes, not a constant fill


def test_test_file_is_cached_not_rewritten(tmp_path: Path) -> None:
    path = test_file(4096, directory=tmp_path)
    old = 1_000_000_000_000_000_000  # 2001: a rewrite would move it to now
    os.utime(path, ns=(old, old))
    assert test_file(4096, directory=tmp_path) == path
    assert path.stat().st_mtime_ns == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_truncated_test_file_is_regenerated(tmp_path: Path) -> None:
    path = test_file(10_000, directory=tmp_path)
    original = path.read_bytes()
    with open(path, "r+b") as file:
        file.truncate(1234)
    assert test_file(10_000, directory=tmp_path).read_bytes() == original


def test_test_files_go_to_qsftp_cache_dir(tmp_path: Path) -> None:
    path = test_file(10)
    assert path.parent == tmp_path / "cache"


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (65536, 65536),
        ("100", 100),
        ("100B", 100),
        ("64KB", 64_000),
        ("64kb", 64_000),
        ("64 KB", 64_000),
        ("64KiB", 65_536),
        ("1.5MB", 1_500_000),
        ("1MiB", 1 << 20),
        ("2GB", 2 * 10**9),
        ("2GiB", 2 << 30),
        ("16M", 16_000_000),
    ],
)
def test_parse_size_reads_si_and_binary_units(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "KB", "abc", "-1", "-1KB", "64XB", "1.2.3MB", "64 KB B", -1])
def test_parse_size_rejects_what_it_cannot_read(bad: int | str) -> None:
    with pytest.raises(UsageError):
        parse_size(bad)


# --- saving and loading -----------------------------------------------------------------------


def _json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(attrs, default=str)))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_save_and_load_round_trip_values_and_attrs(
    both: pd.DataFrame, tmp_path: Path, suffix: str
) -> None:
    path = save_results(both, tmp_path / f"run{suffix}")
    back = load_results(path)
    pd.testing.assert_frame_equal(back, both, check_dtype=False)
    assert back["verified"].dtype == bool and back["warmup"].dtype == bool
    assert back.attrs == _json_attrs(both.attrs)
    if suffix == ".csv":
        assert path.with_name("run.csv.meta.json").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_append_keeps_both_runs_rows_and_metadata(
    both: pd.DataFrame, files_dir: Path, tmp_path: Path, suffix: str
) -> None:
    failed = refused_sweep(5, files_dir)
    path = tmp_path / f"runs{suffix}"
    save_results(both, path)
    save_results(failed, path, append=True)
    back = load_results(path)
    assert len(back) == len(both) + len(failed)
    assert back["run_id"].tolist() == both["run_id"].tolist() + failed["run_id"].tolist()
    runs = back.attrs["runs"]
    assert [run["run_id"] for run in runs] == [both.attrs["run_id"], failed.attrs["run_id"]]
    assert all(run.keys() >= METADATA_KEYS for run in runs)
    assert back.attrs["run_id"] == failed.attrs["run_id"]  # the newest run's facts on top
    third = refused_sweep(6, files_dir)
    save_results(third, path, append=True)
    assert len(load_results(path).attrs["runs"]) == 3


def test_save_refuses_other_formats(both: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        save_results(both, tmp_path / "run.xlsx")


# --- summaries --------------------------------------------------------------------------------


def test_summarize_gives_median_and_iqr_per_configuration(both: pd.DataFrame) -> None:
    summary = summarize(both)
    keys = ["direction", "file_size_bytes", "chunk_size_bytes"]
    assert len(summary) == len(SIZES) * len(CHUNKS) * 2
    assert (summary["n"] == REPEATS).all() and (summary["failed"] == 0).all()
    for _, row in summary.iterrows():
        mask = (measured(both)[keys] == row[keys]).all(axis=1)
        values = measured(both)[mask]["throughput_mbps"]
        assert row["median_mbps"] == pytest.approx(values.median())
        assert row["iqr_mbps"] == pytest.approx(values.quantile(0.75) - values.quantile(0.25))


def test_summarize_leaves_out_warmups_and_failures(both: pd.DataFrame) -> None:
    before = summarize(both)
    extra = both.iloc[[0, 1]].copy()
    extra["throughput_mbps"] = 1e9  # would dominate any statistic it entered
    extra.loc[extra.index[0], "warmup"] = True
    extra.loc[extra.index[1], ["warmup", "error"]] = [False, "TransportError: gone"]
    after = summarize(pd.concat([both, extra], ignore_index=True))
    stats = ["n", "median_mbps", "iqr_mbps"]
    pd.testing.assert_frame_equal(after[stats], before[stats])
    assert after["failed"].sum() == 1


def test_summarize_counts_a_run_where_everything_failed(files_dir: Path) -> None:
    summary = summarize(refused_sweep(4, files_dir))
    assert len(summary) == len(SIZES) * len(CHUNKS)
    assert (summary["n"] == 0).all() and (summary["failed"] == REPEATS).all()


# --- command line -----------------------------------------------------------------------------


def test_cli_quick_run_writes_data_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        **_env(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
    }
    command = [
        sys.executable,
        "-m",
        "qsftp.experiment",
        "--quick",
        "--sizes",
        "10KB",
        "100KB",
        "--chunk-sizes",
        "4096",
        "65536",
        "--repeats",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(
        command,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    names = {"quick.csv", "quick.csv.meta.json", "quick.parquet", "quick.png"}
    assert names <= {p.name for p in out.iterdir()}
    assert (out / "quick.png").read_bytes().startswith(PNG_MAGIC)
    assert "median_mbps" in proc.stdout and "iqr_mbps" in proc.stdout
    transfers = 2 * 2 * 2 * 2 + 1  # sizes × chunks × directions × repeats + warm-up
    assert f"{transfers} transfers (0 failed)" in proc.stdout
    df = load_results(out / "quick.parquet")
    assert len(df) == transfers and df.attrs["schema_version"] == SCHEMA_VERSION
    assert json.loads((out / "quick.csv.meta.json").read_text())["run_id"] == df.attrs["run_id"]


def test_receive_window_is_a_sweep_dimension_recorded_per_row(files_dir: Path) -> None:
    df = asyncio.run(
        asyncio.wait_for(
            sweep(
                sizes=["50KB"],
                repeats=1,
                direction="both",
                receive_window=[256 * 1024, None],
                warmup=False,
                seed=3,
                progress=False,
                files_dir=files_dir,
            ),
            SWEEP_TIMEOUT,
        )
    )
    assert len(df) == 4 and (df["error"] == "").all() and df["verified"].all()
    windows = sorted(set(df["receive_window_bytes"]))
    assert windows == [256 * 1024, qsftp.session.RECEIVE_WINDOW]
    assert len(summarize(df)) == 4  # direction x window


# --- emulated links as a dimension ----------------------------------------------------------

LINK = LinkProfile(delay_ms=10, loss=0.02)
# A handshake needs at least one round trip through the link: 2 × 10 ms. The emulator may
# release a packet up to its timer slack (< 1 ms) early, hence the margin.
MIN_LINK_HANDSHAKE_MS = 2 * LINK.delay_ms - 2


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory, files_dir: Path) -> pd.DataFrame:
    """20 KB both ways, direct and through a 10 ms / 2 % loss emulated link."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _env(tmp_path_factory.mktemp("linked")).items():
            patch.setenv(key, value)
        return run_sweep(
            sizes=["20KB"],
            repeats=1,
            direction="both",
            links=[None, LINK],
            seed=SEED,
            files_dir=files_dir,
        )


def emulated(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["link_mode"] == "relay"]


def test_links_add_their_columns_after_the_base_ones(linked: pd.DataFrame) -> None:
    assert list(linked.columns) == COLUMNS + LINK_COLUMNS
    rows = measured(linked)
    assert len(rows) == 4  # directions × links
    assert set(zip(rows["direction"], rows["link"], strict=True)) == {
        (d, link) for d in ("upload", "download") for link in ("direct", LINK.label())
    }
    assert (linked["error"] == "").all() and linked["verified"].all()


def test_emulated_rows_carry_the_profile_and_direct_rows_leave_it_empty(
    linked: pd.DataFrame,
) -> None:
    through = emulated(linked)
    direct = linked[linked["link"] == "direct"]
    assert (through["link_up_delay_ms"] == 10).all() and (through["link_down_loss"] == 0.02).all()
    assert (direct["link_mode"] == "none").all()
    assert direct[LINK_COLUMNS[2:]].isna().all().all()
    assert through["link_seed"].nunique() == 1  # one emulator, its seed recorded


def test_a_link_delays_the_handshake_and_counts_its_packets(linked: pd.DataFrame) -> None:
    through = measured(emulated(linked))
    assert (through["handshake_ms"] >= MIN_LINK_HANDSHAKE_MS).all()
    counters = [f"link_{d}_{f.name}" for d in ("up", "down") for f in fields(DirectionStats)]
    assert (through[counters] >= 0).all().all()
    assert (through["link_up_received_packets"] > 0).all()
    assert (through["link_down_forwarded_packets"] > 0).all()
    assert (through["link_up_pending_packets"] == 0).all()  # read after the link drained


def test_through_a_link_the_datagram_size_defaults_to_a_real_paths(linked: pd.DataFrame) -> None:
    assert (emulated(linked)["max_datagram_size"] == LINK_DATAGRAM_SIZE).all()
    direct = linked[linked["link"] == "direct"]
    assert (direct["max_datagram_size"] == qsftp.session.LOOPBACK_DATAGRAM_SIZE).all()


def test_summarize_groups_by_link(linked: pd.DataFrame) -> None:
    summary = summarize(linked)
    assert "link" in summary.columns and len(summary) == 4
    assert (summary["n"] == 1).all()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_save_and_load_keep_the_link_columns(
    linked: pd.DataFrame, tmp_path: Path, suffix: str
) -> None:
    back = load_results(save_results(linked, tmp_path / f"links{suffix}"))
    pd.testing.assert_frame_equal(back, linked, check_dtype=False)
    assert back.attrs["links"] == ["direct", LINK.label()]
    pd.testing.assert_frame_equal(summarize(back), summarize(linked), check_dtype=False)


@pytest.mark.parametrize("bad", [[], "10 ms", [(LINK,)], 5, [(LINK, "slow")]])
def test_links_must_be_profiles_pairs_or_none(bad: Any) -> None:
    with pytest.raises(UsageError):
        run_sweep(sizes=["1KB"], repeats=1, links=bad)


def test_cli_link_options_add_one_emulated_link_next_to_direct(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        **_env(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
    }
    command = [sys.executable, "-m", "qsftp.experiment", "--sizes", "10KB", "--chunk-sizes"]
    command += ["4096", "--repeats", "1", "--direction", "upload", "--delay-ms", "5"]
    command += ["--loss", "0.01", "--out", str(out), "--no-progress"]
    proc = subprocess.run(
        command,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    df = load_results(out / "sweep.parquet")
    assert sorted(set(measured(df)["link"])) == ["5 ms, 1% loss", "direct"]


def test_cli_rejects_an_impossible_link(tmp_path: Path) -> None:
    env = {**os.environ, **_env(tmp_path), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "qsftp.experiment", "--loss", "2", "--out", str(tmp_path)]
    proc = subprocess.run(
        command,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 2 and "loss" in proc.stderr
