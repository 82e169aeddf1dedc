"""qlog traces: ``qlog_dir=`` on both sides writes one file per side per connection, and
:mod:`qsftp.qlog` / :func:`qsftp.plot_qlog` read and draw them. Real transfers over loopback UDP."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: no display, no plt.show()

import matplotlib.pyplot as plt
import pytest
from helpers import make_file, run

import qsftp
import qsftp.qlog
from qsftp.netem import LinkEmulator

REPO = Path(__file__).resolve().parent.parent
CLIENT_TIMEOUT = 30.0
LOSSY_FILE_SIZE = 1_000_000  # ~850 packets of 1200 bytes: at 5 % loss, dozens are lost
LOSSY_DATAGRAM_SIZE = 1200


@dataclass
class Traced:
    result: qsftp.TransferResult
    client_dir: Path
    server_dir: Path


def _isolate(monkeypatch: pytest.MonkeyPatch, base: Path) -> None:
    monkeypatch.setenv("QSFTP_STATE_DIR", str(base / "state"))
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(base / "config"))
    monkeypatch.setenv("QSFTP_CACHE_DIR", str(base / "cache"))
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)
    monkeypatch.delenv("QSFTP_TOKEN", raising=False)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate(monkeypatch, tmp_path)


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def _upload(base: Path, *, size: int, loss: float = 0.0) -> Traced:
    source = make_file(base / "source.bin", size)
    client_dir, server_dir = base / "qlog-client", base / "qlog-server"

    async def body() -> qsftp.TransferResult:
        async with qsftp.serve(base / "root", qlog_dir=server_dir) as server:
            if not loss:
                return await qsftp.upload(source, server.host, server.port, qlog_dir=client_dir)
            async with LinkEmulator((server.host, server.port), loss=loss, seed=1) as link:
                return await qsftp.upload(
                    source,
                    link.host,
                    link.port,
                    qlog_dir=client_dir,
                    max_datagram_size=LOSSY_DATAGRAM_SIZE,
                )

    return Traced(run(body), client_dir, server_dir)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """One lossless 256 KiB upload with qlog on both sides."""
    base = tmp_path_factory.mktemp("qlog")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, base)
        yield _upload(base, size=256 * 1024)


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """A 1 MB upload through a link that drops 5 % of datagrams each way."""
    base = tmp_path_factory.mktemp("qlog-lossy")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, base)
        yield _upload(base, size=LOSSY_FILE_SIZE, loss=0.05)


def test_each_side_writes_one_qlog_file_per_connection_named_by_odcid(traced: Traced) -> None:
    client_files = sorted(traced.client_dir.glob("*.qlog"))
    server_files = sorted(traced.server_dir.glob("*.qlog"))
    assert len(client_files) == 1 and len(server_files) == 1
    # Both sides name the trace by the connection's original destination connection ID.
    assert client_files[0].name == server_files[0].name
    for path, side in ((client_files[0], "client"), (server_files[0], "server")):
        document = json.loads(path.read_text())
        assert document["qlog_version"] == "0.3"
        (trace,) = document["traces"]
        assert trace["vantage_point"]["type"] == side
        assert path.stem == trace["common_fields"]["ODCID"]


def test_transfer_result_names_the_client_qlog_file(traced: Traced) -> None:
    assert traced.result.qlog_path is not None
    path = Path(traced.result.qlog_path)
    assert path.parent == traced.client_dir and path.is_file()
    assert traced.result.as_dict()["qlog_path"] == traced.result.qlog_path


def test_client_trace_is_written_although_the_client_skips_the_closing_period(
    traced: Traced,
) -> None:
    """The client drops its socket at once, so aioquic never ends the trace itself: the
    client's close path must, and the trace must run to the CONNECTION_CLOSE it sent."""
    document = json.loads(Path(traced.result.qlog_path or "").read_text())
    frames = [
        frame["frame_type"]
        for event in document["traces"][0]["events"]
        if event["name"] == "transport:packet_sent"
        for frame in event["data"]["frames"]
    ]
    assert frames[-1] == "connection_close"


def test_no_qlog_without_qlog_dir(tmp_path: Path) -> None:
    source = make_file(tmp_path / "f.bin", 1000)

    async def body() -> tuple[qsftp.TransferResult, str | None]:
        async with (
            qsftp.serve(tmp_path / "root") as server,
            qsftp.connect(server.host, server.port) as conn,
        ):
            return await conn.upload(source), conn.qlog_path

    result, path = run(body)
    assert result.qlog_path is None and path is None


def test_load_gives_a_time_series_with_the_promised_columns(traced: Traced) -> None:
    frame = qsftp.qlog.load(traced.result.qlog_path or "")
    assert list(frame.columns) == qsftp.qlog.COLUMNS
    assert {
        "time_ms",
        "event",
        "cwnd",
        "bytes_in_flight",
        "smoothed_rtt_ms",
        "latest_rtt_ms",
        "min_rtt_ms",
        "ssthresh",
        "packets_sent",
        "packets_received",
        "packets_lost",
    } <= set(frame.columns)
    assert len(frame) > 0
    assert frame["time_ms"].is_monotonic_increasing and frame["time_ms"].iloc[0] >= 0
    assert (frame["cwnd"].dropna() > 0).all() and frame["cwnd"].notna().any()
    assert frame["smoothed_rtt_ms"].dropna().between(0, 1000).all()
    for counter in ("packets_sent", "packets_received", "packets_lost"):
        assert frame[counter].is_monotonic_increasing
    assert frame["packets_sent"].iloc[-1] > 0 and frame["packets_received"].iloc[-1] > 0
    assert frame.attrs["vantage_point"] == "client"


def test_summary_agrees_with_the_frame(traced: Traced) -> None:
    path = traced.result.qlog_path or ""
    frame = qsftp.qlog.load(path)
    summary = qsftp.qlog.summary(path)
    assert summary["packets_sent"] == frame["packets_sent"].iloc[-1]
    assert summary["packets_lost"] == frame["packets_lost"].iloc[-1]
    assert summary["max_cwnd"] == frame["cwnd"].max()
    assert 0 < summary["min_smoothed_rtt_ms"] <= summary["median_smoothed_rtt_ms"]
    assert summary["duration_ms"] >= frame["time_ms"].iloc[-1]


def test_load_rejects_a_file_that_is_not_qlog(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qlog"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a qlog"):
        qsftp.qlog.load(bad)


def test_losses_on_the_link_show_in_the_senders_trace(lossy: Traced) -> None:
    frame = qsftp.qlog.load(lossy.result.qlog_path or "")
    lost = frame["packets_lost"].iloc[-1]
    assert lost > 0
    assert (frame["event"] == qsftp.qlog.PACKET_LOST).sum() == lost
    # A loss halves the window: ssthresh appears once congestion avoidance has begun.
    assert frame["ssthresh"].notna().any()


def test_plot_qlog_draws_labelled_axes_and_loss_marks(lossy: Traced) -> None:
    ax = qsftp.plot_qlog(lossy.result.qlog_path or "")
    assert "(s)" in ax.get_xlabel() and "(kB)" in ax.get_ylabel()
    (twin,) = [other for other in ax.figure.axes if other is not ax]
    assert "RTT (ms)" in twin.get_ylabel()
    assert ax.collections, "loss events are drawn"
    _, given = plt.subplots()
    assert qsftp.plot_qlog(qsftp.qlog.load(lossy.result.qlog_path or ""), ax=given) is given


def test_cli_qlog_dir_writes_the_clients_trace(tmp_path: Path) -> None:
    source = make_file(tmp_path / "f.bin", 50_000)
    qlog_dir = tmp_path / "client-qlog"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSFTP_", "XDG_"))}
    env.update(
        PYTHONPATH=str(REPO),
        HOME=str(tmp_path / "home"),
        QSFTP_STATE_DIR=str(tmp_path / "client-state"),
        QSFTP_CONFIG_DIR=str(tmp_path / "client-config"),
    )

    async def body() -> tuple[int, bytes]:
        async with qsftp.serve(tmp_path / "root") as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "qsftp.client",
                "--host",
                server.host,
                "--port",
                str(server.port),
                "--insecure",
                "--quiet",
                "--qlog-dir",
                str(qlog_dir),
                str(source),
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(CLIENT_TIMEOUT):
                _, stderr = await proc.communicate()
            return proc.returncode or 0, stderr

    status, stderr = run(body)
    assert status == 0, stderr.decode()
    (path,) = qlog_dir.glob("*.qlog")
    assert qsftp.qlog.summary(path)["packets_sent"] > 0
