"""The figures: what each plot function draws, labels and leaves out, on hand-built frames and
on one real tiny sweep. Rendering uses the Agg backend; every figure is closed after its test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: no display, no plt.show()

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qsftp.errors import UsageError
from qsftp.experiment import COLUMNS, LINK_COLUMNS, summarize, sweep
from qsftp.plots import (
    plot_chunk_size,
    plot_distribution,
    plot_heatmap,
    plot_overview,
    plot_sizes,
    plot_vs_link,
    save_figure,
)

SIZES = [64_000, 1_000_000]
CHUNKS = [1024, 65536]
REPEATS = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ATTRS = {"qsftp_version": "9.9.9", "aioquic_version": "1.7.2", "run_id": "test-run"}


def row(
    direction: str, size: int, chunk: int, repeat: int, mbps: float, **extra: Any
) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    values.update(
        run_id="test-run",
        direction=direction,
        file_size_bytes=size,
        chunk_size_bytes=chunk,
        max_datagram_size=1200,
        congestion_control="reno",
        connection="new",
        repeat=repeat,
        warmup=False,
        seconds=8 * size / mbps / 1e6,
        throughput_mbps=mbps,
        verified=True,
        cpu_bound=False,
        error="",
    )
    values.update(extra)
    return values


def expected_mbps(direction: str, size: int, chunk: int, repeat: int) -> float:
    """Distinct, predictable values: downloads slower, bigger sizes and chunks faster."""
    base = 10 + SIZES.index(size) * 20 + CHUNKS.index(chunk) * 5
    return base * (0.5 if direction == "download" else 1.0) + repeat


def frame(
    directions: tuple[str, ...] = ("upload", "download"),
    sizes: list[int] = SIZES,
    chunks: list[int] = CHUNKS,
) -> pd.DataFrame:
    """Every configuration ``REPEATS`` times, plus a fast warm-up and a failed row that the
    figures must leave out."""
    rows = [
        row(d, s, c, r, expected_mbps(d, s, c, r) if s in SIZES and c in CHUNKS else 10.0 + r)
        for d, s, c, r in itertools.product(directions, sizes, chunks, range(REPEATS))
    ]
    first = directions[0]
    rows.append(row(first, sizes[0], chunks[0], -1, 1e6, warmup=True))
    rows.append(row(first, sizes[0], chunks[0], 0, 1e6, verified=False, error="TransportError: x"))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs.update(ATTRS)
    return df


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


@pytest.fixture(autouse=True)
def _no_show(monkeypatch: pytest.MonkeyPatch) -> None:
    def show(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a plot function called plt.show()")

    monkeypatch.setattr(plt, "show", show)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """One real tiny sweep (both directions, one repeat) against an embedded server."""
    base = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("STATE", "CONFIG", "CACHE"):
            patch.setenv(f"QSFTP_{name}_DIR", str(base / name.lower()))
        coro = sweep(
            sizes=["10KB", "100KB"],
            chunk_sizes=[4096, 65536],
            repeats=1,
            direction="both",
            progress=False,
        )
        return asyncio.run(asyncio.wait_for(coro, 60))


def tick_labels(labels: list[Any]) -> list[str]:
    return [label.get_text() for label in labels]


def assert_labelled(ax: Axes, x_unit: str) -> None:
    assert x_unit in ax.get_xlabel()
    assert "Mbit/s" in ax.get_ylabel() or "Mbit/s" in ax.get_title()
    assert ax.get_title()


# --- plot_sizes -------------------------------------------------------------------------------


def test_plot_sizes_draws_one_line_per_chunk_size_and_direction() -> None:
    ax = plot_sizes(frame())
    assert isinstance(ax, Axes)
    assert_labelled(ax, "bytes")
    assert "Mbit/s" in ax.get_ylabel()
    assert ax.get_xscale() == "log"
    lines = ax.get_lines()
    assert len(lines) == len(CHUNKS) * 2
    assert sorted(line.get_linestyle() for line in lines) == ["-", "-", "--", "--"]
    assert len(ax.collections) == len(CHUNKS) * 2  # one IQR band per line
    assert tick_labels(ax.get_xticklabels()) == ["64 kB", "1 MB"]


def test_plot_sizes_draws_medians_without_warmups_or_failures() -> None:
    ax = plot_sizes(frame(), direction="upload")
    assert len(ax.get_lines()) == len(CHUNKS)
    assert "upload" in ax.get_title()
    first = next(line for line in ax.get_lines() if line.get_color() == "C0")  # chunk 1 KiB
    median = expected_mbps("upload", SIZES[0], CHUNKS[0], 1)
    assert list(first.get_ydata()) == [median, expected_mbps("upload", SIZES[1], CHUNKS[0], 1)]


def test_plot_sizes_uses_the_given_axes() -> None:
    _, ax = plt.subplots()
    assert plot_sizes(frame(), ax) is ax


# --- plot_chunk_size --------------------------------------------------------------------------


def test_plot_chunk_size_draws_error_bars_per_file_size_and_direction() -> None:
    ax = plot_chunk_size(frame())
    assert_labelled(ax, "bytes")
    assert ax.get_xscale() == "log"
    assert len(ax.containers) == len(SIZES) * 2
    styles = sorted(c.lines[0].get_linestyle() for c in ax.containers)  # type: ignore[attr-defined]
    assert styles == ["-", "-", "--", "--"]
    assert tick_labels(ax.get_xticklabels()) == ["1 KiB", "64 KiB"]


def test_plot_chunk_size_one_direction() -> None:
    ax = plot_chunk_size(frame(), direction="download")
    assert len(ax.containers) == len(SIZES)
    assert "download" in ax.get_title()


# --- plot_heatmap -----------------------------------------------------------------------------


def test_plot_heatmap_writes_one_value_per_cell_for_uploads_by_default() -> None:
    df = frame()
    ax = plot_heatmap(df)
    assert_labelled(ax, "bytes")
    assert "bytes" in ax.get_ylabel()
    assert "upload" in ax.get_title()
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == len(SIZES) * len(CHUNKS)
    summary = summarize(df)
    medians = summary[summary["direction"] == "upload"]["median_mbps"]
    assert sorted(texts) == sorted(f"{m:.0f}" for m in medians)
    assert tick_labels(ax.get_xticklabels()) == ["1 KiB", "64 KiB"]
    assert tick_labels(ax.get_yticklabels()) == ["64 kB", "1 MB"]


def test_plot_heatmap_shows_the_direction_it_is_given() -> None:
    up = sorted(t.get_text() for t in plot_heatmap(frame()).texts)
    ax = plot_heatmap(frame(), direction="download")
    assert "download" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) != up


def test_plot_heatmap_of_downloads_only_says_download() -> None:
    ax = plot_heatmap(frame(directions=("download",)))
    assert "download" in ax.get_title()
    assert len(ax.texts) == len(SIZES) * len(CHUNKS)


def test_plot_heatmap_rejects_an_unknown_direction() -> None:
    with pytest.raises(UsageError):
        plot_heatmap(frame(), direction="both")


@pytest.mark.parametrize(
    ("size", "label"),
    [
        (1000, "1 kB"),
        (1024, "1 KiB"),
        (1500, "1500 B"),
        (256_000, "256 kB"),  # also 250 KiB: SI wins
        (1_024_000, "1024 kB"),
        (64_000, "64 kB"),
        (65_536, "64 KiB"),
        (1_000_000, "1 MB"),
        (1 << 20, "1 MiB"),
        (16_000_000, "16 MB"),
        (3 << 30, "3 GiB"),
        (10**9, "1 GB"),
    ],
)
def test_sizes_are_labelled_in_the_units_they_were_chosen_in(size: int, label: str) -> None:
    ax = plot_heatmap(frame(directions=("upload",), sizes=[size], chunks=[size]))
    assert tick_labels(ax.get_yticklabels()) == [label]
    assert tick_labels(ax.get_xticklabels()) == [label]


# --- plot_distribution ------------------------------------------------------------------------


def test_plot_distribution_has_one_box_and_one_point_cloud_per_configuration() -> None:
    ax = plot_distribution(frame())
    configs = len(SIZES) * len(CHUNKS) * 2
    assert_labelled(ax, "configuration")
    labels = tick_labels(ax.get_xticklabels())
    assert len(labels) == configs
    assert labels[0] == "up 64 kB / 1 KiB" and labels[-1] == "down 1 MB / 64 KiB"
    assert len(ax.collections) == configs
    assert sum(len(c.get_offsets()) for c in ax.collections) == configs * REPEATS
    assert {label.get_rotation() for label in ax.get_xticklabels()} == {45.0}


def test_plot_distribution_widens_its_figure_for_many_configurations() -> None:
    few = plot_distribution(frame(directions=("upload",), sizes=[64_000], chunks=[1024]))
    many = plot_distribution(
        frame(sizes=[64_000, 1_000_000, 16_000_000], chunks=[1024, 16384, 65536])
    )
    assert len(many.get_xticklabels()) == 18
    assert many.figure.get_figwidth() > few.figure.get_figwidth()


# --- edge cases, overview, saving -------------------------------------------------------------


@pytest.mark.parametrize("plot", [plot_sizes, plot_chunk_size, plot_heatmap, plot_distribution])
def test_a_frame_without_successful_transfers_gives_an_explained_empty_plot(plot: Any) -> None:
    df = frame()
    df["error"] = "TransportError: refused"
    ax = plot(df)
    assert isinstance(ax, Axes)
    assert any("no successful transfers" in t.get_text() for t in ax.texts)
    assert ax.get_xlabel() and ax.get_ylabel()


def test_plot_overview_is_a_figure_with_four_panels_and_the_run_in_its_title() -> None:
    figure = plot_overview(frame())
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 4
    title = figure.get_suptitle()
    assert "9.9.9" in title and "1.7.2" in title and "test-run" in title
    assert "loopback" in title and "1200-byte datagrams" in title


def test_plot_overview_names_a_remote_target() -> None:
    df = frame()
    df.attrs["target"] = "files.example.org"
    assert "files.example.org" in plot_overview(df).get_suptitle()


def test_save_figure_writes_a_png(tmp_path: Path) -> None:
    path = save_figure(plot_overview(frame()), tmp_path / "sub" / "overview.png")
    assert path == tmp_path / "sub" / "overview.png"
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("plot", [plot_sizes, plot_chunk_size, plot_heatmap, plot_distribution])
def test_every_plot_draws_a_real_sweep(real: pd.DataFrame, plot: Any) -> None:
    ax = plot(real)
    assert ax.get_xlabel() and "Mbit/s" in ax.get_ylabel() + ax.get_title()
    assert not any("no successful transfers" in t.get_text() for t in ax.texts)


def test_overview_of_a_real_sweep_saves(real: pd.DataFrame, tmp_path: Path) -> None:
    figure = plot_overview(real)
    assert len(figure.axes) == 4
    assert real.attrs["run_id"] in figure.get_suptitle()
    assert save_figure(figure, tmp_path / "real.png").read_bytes().startswith(PNG_MAGIC)


# --- plot_vs_link -----------------------------------------------------------------------------

LOSSES = [0.0, 0.01, 0.05]


def link_row(
    direction: str,
    loss: float,
    cc: str,
    repeat: int,
    mbps: float,
    *,
    up_delay_ms: float = 10.0,
    down_delay_ms: float = 10.0,
    **extra: Any,
) -> dict[str, Any]:
    """A row of a ``sweep(links=...)`` frame: 10 ms, ``loss``, 50 Mbit/s each way."""
    values: dict[str, Any] = dict.fromkeys(COLUMNS + LINK_COLUMNS)
    values.update(row(direction, 2_000_000, 65536, repeat, mbps, congestion_control=cc))
    values.update(link="lossy", link_mode="udp-relay", receive_window_bytes=2 * 1024 * 1024)
    for side, delay in (("up", up_delay_ms), ("down", down_delay_ms)):
        values.update({f"link_{side}_delay_ms": delay, f"link_{side}_rate_mbps": 50.0})
        values[f"link_{side}_loss"] = loss
    values.update(extra)
    return values


def link_mbps(direction: str, loss: float, cc: str, repeat: int) -> float:
    """Distinct values: more loss slower, cubic faster than reno, downloads slower."""
    base = 40.0 - 500 * loss + (5 if cc == "cubic" else 0)
    return base * (0.5 if direction == "download" else 1.0) + repeat


def link_frame(directions: tuple[str, ...] = ("upload",)) -> pd.DataFrame:
    """Every loss × congestion control ``REPEATS`` times, plus a warm-up, a failed row and a
    direct row (no link columns), which the figure must leave out."""
    rows = [
        link_row(d, loss, cc, r, link_mbps(d, loss, cc, r))
        for d, loss, cc, r in itertools.product(
            directions, LOSSES, ["reno", "cubic"], range(REPEATS)
        )
    ]
    rows.append(link_row(directions[0], 0.0, "reno", -1, 1e6, warmup=True))
    rows.append(link_row(directions[0], 0.0, "reno", 0, 1e6, error="TransportError: x"))
    direct = dict.fromkeys(COLUMNS + LINK_COLUMNS)
    direct.update(row(directions[0], 2_000_000, 65536, 0, 1e6), link="direct")
    rows.append(direct)
    df = pd.DataFrame(rows, columns=COLUMNS + LINK_COLUMNS)
    df.attrs.update(ATTRS)
    return df


def caption(ax: Axes) -> str:
    """The title's lines after the first, joined (the caption is wrapped to the figure)."""
    return " ".join(ax.get_title().split("\n")[1:])


def medians(ax: Axes) -> list[list[float]]:
    return sorted(list(c.lines[0].get_ydata()) for c in ax.containers)  # type: ignore[attr-defined]


def test_plot_vs_link_draws_one_line_per_congestion_control_at_each_loss() -> None:
    ax = plot_vs_link(link_frame())
    assert len(ax.containers) == 2  # reno, cubic: the direct row, warm-up and failure left out
    expected = sorted(
        [link_mbps("upload", loss, cc, 1) for loss in LOSSES] for cc in ("reno", "cubic")
    )
    assert medians(ax) == expected
    assert tick_labels(ax.get_xticklabels()) == ["0", "1", "5"]  # loss in %
    assert ax.get_xlabel() == "packet loss, each direction (%)"
    assert ax.get_ylabel() == "throughput (Mbit/s)"
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["cubic", "reno"]
    assert "congestion control" in legend.get_title().get_text()


def test_plot_vs_link_titles_the_shared_link_and_the_repeats() -> None:
    ax = plot_vs_link(link_frame())
    assert ax.get_title().startswith("Throughput vs packet loss — upload\n")
    text = caption(ax)
    for part in ("10 ms one way", "50 Mbit/s", "2 MB transfers", "1200-byte datagrams"):
        assert part in text
    assert "3 transfers per point" in text
    assert "loss" not in text  # loss is the x axis, not a shared setting
    assert "receive window" not in text  # the default window is not worth a mention


def test_plot_vs_link_plots_completion_time_against_delay() -> None:
    df = link_frame()
    df["link_up_delay_ms"] = df["link_down_delay_ms"] = df["link_up_loss"] * 1000
    df["link_up_loss"] = df["link_down_loss"] = 0.0
    ax = plot_vs_link(df, x="link_up_delay_ms", y="seconds", hue=None)
    assert "no loss, 50 Mbit/s" in caption(ax)
    assert ax.get_xlabel() == "one-way delay, each direction (ms)"
    assert ax.get_ylabel() == "completion time (s)"
    assert tick_labels(ax.get_xticklabels()) == ["0", "10", "50"]
    assert len(ax.containers) == 1  # no hue: reno and cubic pooled
    assert "6 transfers per point" in caption(ax)
    assert ax.get_legend() is None


def test_plot_vs_link_keeps_directions_apart() -> None:
    ax = plot_vs_link(link_frame(("upload", "download")))
    assert len(ax.containers) == 4
    styles = sorted(c.lines[0].get_linestyle() for c in ax.containers)  # type: ignore[attr-defined]
    assert styles == ["-", "-", "--", "--"]
    assert "upload" in [t.get_text() for t in ax.get_legend().get_texts()]
    one = plot_vs_link(link_frame(("upload", "download")), direction="upload")
    assert len(one.containers) == 2
    assert "upload" in one.get_title()


def test_plot_vs_link_labels_sizes_and_one_way_links() -> None:
    rows = [
        link_row("upload", 0.01, "reno", r, 10.0 + r, up_delay_ms=delay, down_delay_ms=5.0)
        for delay in (10.0, 50.0)
        for r in range(REPEATS)
    ]
    rows += [{**r, "receive_window_bytes": 262_144, "throughput_mbps": 1.0} for r in rows]
    df = pd.DataFrame(rows, columns=COLUMNS + LINK_COLUMNS)
    ax = plot_vs_link(df, x="link_up_delay_ms", hue="receive_window_bytes")
    assert ax.get_xlabel() == "one-way delay, client → server (ms)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["256 KiB", "2 MiB"]
    assert "1% loss" in caption(ax)


def test_plot_vs_link_refuses_a_missing_column() -> None:
    with pytest.raises(UsageError, match="no_such_column"):
        plot_vs_link(link_frame(), hue="no_such_column")
    with pytest.raises(UsageError, match="nope"):
        plot_vs_link(link_frame(), x="nope")


def test_plot_vs_link_without_successful_transfers_says_so() -> None:
    df = link_frame()
    df["error"] = "TransportError: refused"
    ax = plot_vs_link(df)
    assert any("no successful transfers" in t.get_text() for t in ax.texts)
    assert ax.get_xlabel() and ax.get_ylabel()
