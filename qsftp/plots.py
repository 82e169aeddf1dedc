"""Figures from sweep frames. Each function takes the frame and ``ax=None`` and returns the Axes
(or the Figure for multi-panel plots); none calls ``plt.show()``. Warm-ups and failed transfers
are left out; medians are drawn with the interquartile range of the repeats.

Uploads and downloads are never pooled: where both are in the frame they are drawn apart
(upload solid with circles, download dashed with squares), and the heatmap shows one of them.
Sizes are labelled the way they were chosen: 64000 as "64 kB", 65536 as "64 KiB".
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from . import qlog
from .errors import UsageError
from .experiment import measured
from .session import RECEIVE_WINDOW

__all__ = [
    "plot_chunk_size",
    "plot_distribution",
    "plot_heatmap",
    "plot_overview",
    "plot_qlog",
    "plot_sizes",
    "plot_vs_link",
    "save_figure",
]

_Y_LABEL = "throughput (Mbit/s)"
_DIRECTIONS = ("upload", "download")
_SHORT = {"upload": "up", "download": "down"}
_STYLE: dict[str, dict[str, Any]] = {
    "upload": {"linestyle": "-", "marker": "o"},
    "download": {"linestyle": "--", "marker": "s"},
}
# Uploads and downloads at the same chunk size are nudged apart by this factor on the log2
# axis, so their error bars do not hide each other.
_DODGE = 2**0.05
_PREFIXES = (("kB", "KiB"), ("MB", "MiB"), ("GB", "GiB"), ("TB", "TiB"))


def _size_label(value: float) -> str:
    """A byte count as it was probably chosen: "64 kB" for 64000 (a whole multiple of 1000^k),
    "64 KiB" for 65536 (of 1024^k), otherwise plain bytes ("1500 B"). The largest unit that
    divides wins; SI before binary when both do (256000 is "256 kB", not "250 KiB")."""
    number = int(value)
    if number != value or number <= 0:
        return f"{value:g} B"
    for power, (si, binary) in reversed(list(enumerate(_PREFIXES, start=1))):
        for base, unit in ((1000**power, si), (1024**power, binary)):
            if number % base == 0:
                return f"{number // base} {unit}"
    return f"{number} B"


def _axes(ax: Axes | None, size: tuple[float, float] = (6.4, 4.4)) -> Axes:
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size, layout="constrained")
    return new


def _select(df: pd.DataFrame, direction: str | None) -> pd.DataFrame:
    if direction is None:
        return df
    if direction not in _DIRECTIONS:
        raise UsageError(f"direction must be upload or download, not {direction!r}")
    return df[df["direction"] == direction]


def _directions(df: pd.DataFrame) -> list[str]:
    present = set(df["direction"])
    return [d for d in _DIRECTIONS if d in present]


def _stats(df: pd.DataFrame, by: list[str], y: str = "throughput_mbps") -> pd.DataFrame:
    grouped = measured(df).groupby(by)[y]
    return grouped.agg(
        median="median",
        q1=lambda s: s.quantile(0.25),
        q3=lambda s: s.quantile(0.75),
        n="count",
    ).reset_index()


def _colours(values: Sequence[Any], palette: str = "tab10") -> dict[Any, Any]:
    """One colour per distinct value, in sorted order, so every figure of a frame agrees."""
    ordered = sorted(set(values))
    if palette == "tab10":
        return {value: f"C{i % 10}" for i, value in enumerate(ordered)}
    cmap = plt.get_cmap(palette)
    return {
        value: cmap(x)
        for value, x in zip(ordered, np.linspace(0.0, 0.8, len(ordered)), strict=True)
    }


def _title(what: str, directions: list[str]) -> str:
    return f"{what} — {directions[0]}" if len(directions) == 1 else what


def _log_ticks(ax: Axes, values: Sequence[int], base: int) -> None:
    """Log x axis with a labelled tick at every measured value and no other labels."""
    ax.set_xscale("log", base=base)
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [_size_label(v) for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _legend(ax: Axes, title: str, colours: dict[Any, Any], directions: list[str]) -> None:
    handles = [
        Line2D([], [], color=c, linewidth=2, label=_size_label(v)) for v, c in colours.items()
    ]
    if len(directions) > 1:
        handles += [Line2D([], [], color="0.3", label=d, **_STYLE[d]) for d in directions]
    ax.legend(
        handles=handles, title=title, fontsize="small", title_fontsize="small", handlelength=3
    )


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no successful transfers", ha="center", va="center", transform=ax.transAxes)


def _finish(ax: Axes) -> None:
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def plot_sizes(df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None) -> Axes:
    """Throughput vs file size (log x), one line per chunk size and direction: median and IQR
    band. ``direction`` keeps only "upload" or "download"."""
    ax = _axes(ax)
    data = _select(df, direction)
    stats = _stats(data, ["direction", "chunk_size_bytes", "file_size_bytes"])
    colours = _colours(list(measured(df)["chunk_size_bytes"]))
    directions = _directions(stats)
    for (way, chunk), unsorted in stats.groupby(["direction", "chunk_size_bytes"]):
        group = unsorted.sort_values("file_size_bytes")
        x = group["file_size_bytes"]
        colour = colours[chunk]
        ax.plot(x, group["median"], color=colour, **_STYLE[str(way)])
        ax.fill_between(x, group["q1"], group["q3"], color=colour, alpha=0.15, linewidth=0)
    if stats.empty:
        _no_data(ax)
    else:
        _log_ticks(ax, list(stats["file_size_bytes"]), 10)
        used = {c: colours[c] for c in sorted(set(stats["chunk_size_bytes"]))}
        _legend(ax, "chunk size (median, IQR)", used, directions)
    ax.set_xlabel("file size (bytes, log scale)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(_title("Throughput vs file size", directions))
    _finish(ax)
    return ax


def plot_chunk_size(
    df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None
) -> Axes:
    """Throughput vs chunk size (log₂ x), one line per file size and direction: median and
    IQR error bars. ``direction`` keeps only "upload" or "download"."""
    ax = _axes(ax)
    data = _select(df, direction)
    stats = _stats(data, ["direction", "file_size_bytes", "chunk_size_bytes"])
    colours = _colours(list(measured(df)["file_size_bytes"]), palette="plasma")
    directions = _directions(stats)
    for (way, size), unsorted in stats.groupby(["direction", "file_size_bytes"]):
        group = unsorted.sort_values("chunk_size_bytes")
        x = group["chunk_size_bytes"].astype(float)
        if len(directions) > 1:
            x = x * (_DODGE if way == "download" else 1 / _DODGE)
        error = np.vstack([group["median"] - group["q1"], group["q3"] - group["median"]])
        ax.errorbar(
            x, group["median"], yerr=error, color=colours[size], capsize=3, **_STYLE[str(way)]
        )
    if stats.empty:
        _no_data(ax)
    else:
        _log_ticks(ax, list(stats["chunk_size_bytes"]), 2)
        used = {s: colours[s] for s in sorted(set(stats["file_size_bytes"]))}
        _legend(ax, "file size (median, IQR)", used, directions)
    ax.set_xlabel("chunk size (bytes, log scale)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(_title("Throughput vs chunk size", directions))
    _finish(ax)
    return ax


def plot_heatmap(df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None) -> Axes:
    """Median throughput (Mbit/s) over file size × chunk size for one direction (default:
    upload if the frame has uploads), the value written in each cell."""
    ax = _axes(ax, (6.4, 4.8))
    present = _directions(measured(df))
    chosen = direction or (present[0] if present else "upload")
    stats = _stats(_select(df, chosen), ["file_size_bytes", "chunk_size_bytes"])
    ax.set_title(f"Median throughput (Mbit/s) — {chosen}")
    ax.set_xlabel("chunk size (bytes)")
    ax.set_ylabel("file size (bytes)")
    if stats.empty:
        _no_data(ax)
        return ax
    grid = stats.pivot(index="file_size_bytes", columns="chunk_size_bytes", values="median")
    values = grid.to_numpy(dtype=float)
    ax.imshow(values, cmap="viridis", aspect="auto", origin="lower", vmin=0)
    ax.set_xticks(range(len(grid.columns)), [_size_label(c) for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [_size_label(s) for s in grid.index])
    peak = float(np.nanmax(values))
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            # dark text on the light (high) end of viridis, light text on the dark end
            colour = "black" if value > 0.5 * peak else "white"
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", color=colour)
    return ax


def plot_distribution(
    df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None
) -> Axes:
    """Every repeat of every configuration: a box plot with the individual transfers over it
    (marker = direction, colour = chunk size, as in :func:`plot_sizes`)."""
    data = measured(_select(df, direction))
    keys = ["direction", "file_size_bytes", "chunk_size_bytes"]
    configs = data[keys].drop_duplicates()
    ax = _axes(ax, (max(6.4, 0.45 * len(configs) + 2.0), 4.8))
    rank = {d: i for i, d in enumerate(_DIRECTIONS)}
    ordered = sorted(data.groupby(keys), key=lambda item: (rank[item[0][0]], *item[0][1:]))
    colours = _colours(list(measured(df)["chunk_size_bytes"]))
    values = [group["throughput_mbps"].to_numpy() for _, group in ordered]
    labels = [f"{_SHORT[d]} {_size_label(s)} / {_size_label(c)}" for (d, s, c), _ in ordered]
    if values:
        ax.boxplot(
            values,
            showfliers=False,
            widths=0.6,
            medianprops={"color": "black", "linewidth": 1.5},
            boxprops={"color": "0.4"},
            whiskerprops={"color": "0.4"},
            capprops={"color": "0.4"},
        )
        rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
        for position, ((way, _, chunk), group) in enumerate(ordered, start=1):
            points = group["throughput_mbps"].to_numpy()
            jitter = rng.uniform(-0.15, 0.15, size=len(points))
            ax.scatter(
                position + jitter,
                points,
                s=16,
                alpha=0.8,
                zorder=3,
                color=colours[chunk],
                marker=_STYLE[way]["marker"],
            )
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right")
        ax.tick_params(axis="x", labelsize="small")
        ways = [key[0] for key, _ in ordered]
        for position in range(1, len(ways)):
            if ways[position] != ways[position - 1]:
                ax.axvline(position + 0.5, color="0.5", linewidth=1, linestyle=":")
    else:
        _no_data(ax)
    ax.set_xlabel("configuration (direction, file size / chunk size)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(_title("Throughput of every transfer", _directions(data)))
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def plot_overview(df: pd.DataFrame, *, direction: str | None = None) -> Figure:
    """Four panels: sizes, chunk sizes and the heatmap (upload, if present) on top, every
    transfer across the bottom; the run's versions and machine in the title."""
    figure, axes = plt.subplot_mosaic(
        [["sizes", "chunks", "heatmap"], ["spread", "spread", "spread"]],
        figsize=(18, 10),
        layout="constrained",
        height_ratios=[1, 1.1],
    )
    plot_sizes(df, axes["sizes"], direction=direction)
    plot_chunk_size(df, axes["chunks"], direction=direction)
    plot_heatmap(df, axes["heatmap"], direction=direction)
    plot_distribution(df, axes["spread"], direction=direction)
    figure.suptitle(_run_title(df), fontsize="large")
    return figure


def _run_title(df: pd.DataFrame) -> str:
    attrs: dict[str, Any] = dict(df.attrs)
    target = attrs.get("target", "embedded")
    where = "loopback (embedded server)" if target == "embedded" else str(target)
    datagrams = sorted({int(d) for d in measured(df)["max_datagram_size"].dropna()})
    sizes = "/".join(str(d) for d in datagrams)
    return (
        f"QSFTP throughput, {where}"
        + (f", {sizes}-byte datagrams" if datagrams else "")
        + f" — qsftp {attrs.get('qsftp_version', '?')}, aioquic {attrs.get('aioquic_version', '?')}"
        + f", Python {attrs.get('python_version', '?')}, {attrs.get('cpu_count', '?')} CPUs"
        + f"; run {attrs.get('run_id', '?')}"
    )


# --- one measure against one link (or other) parameter --------------------------------------

# Link profile fields plot_vs_link can name: field -> (name, unit, display factor).
_LINK_FIELDS: dict[str, tuple[str, str, float]] = {
    "loss": ("packet loss", "%", 100.0),
    "expected_loss": ("packet loss", "%", 100.0),
    "delay_ms": ("one-way delay", "ms", 1.0),
    "jitter_ms": ("jitter", "ms", 1.0),
    "rate_mbps": ("bottleneck rate", "Mbit/s", 1.0),
    "queue_packets": ("bottleneck queue", "packets", 1.0),
    "reorder": ("reordering", "%", 100.0),
    "duplicate": ("duplication", "%", 100.0),
    "corrupt": ("corruption", "%", 100.0),
}
# Axis and legend labels of other columns.
_COLUMN_LABELS = {
    "throughput_mbps": "throughput (Mbit/s)",
    "seconds": "completion time (s)",
    "handshake_ms": "handshake (ms)",
    "session_ms": "session setup (ms)",
    "smoothed_rtt_ms": "smoothed RTT at the end (ms)",
    "packets_sent": "packets sent by the client",
    "packets_lost": "client packets declared lost",
    "client_cpu_s": "client CPU (s)",
    "server_cpu_s": "server CPU (s)",
    "file_size_bytes": "file size (bytes)",
    "chunk_size_bytes": "chunk size (bytes)",
    "max_datagram_size": "datagram size (bytes)",
    "receive_window_bytes": "receive window (bytes)",
    "congestion_control": "congestion control",
}
# The series of one figure are nudged apart by this share of the x range, so their error
# bars do not hide each other.
_VS_DODGE = 0.012
# Characters per line of a title's caption: what fits above a 6.4-inch figure.
_CAPTION_WIDTH = 72


def _link_field(column: str) -> tuple[str, str] | None:
    """("up" | "down", field) for a link profile column such as ``link_up_loss``."""
    for side in ("up", "down"):
        prefix = f"link_{side}_"
        if column.startswith(prefix) and column[len(prefix) :] in _LINK_FIELDS:
            return side, column[len(prefix) :]
    return None


def _column_label(column: str, rows: pd.DataFrame) -> str:
    link = _link_field(column)
    if link is None:
        return _COLUMN_LABELS.get(column, column)
    side, field = link
    name, unit, _ = _LINK_FIELDS[field]
    up, down = rows.get(f"link_up_{field}"), rows.get(f"link_down_{field}")
    if up is not None and down is not None and up.fillna(-1.0).eq(down.fillna(-1.0)).all():
        where = "each direction"
    else:
        where = "client → server" if side == "up" else "server → client"
    return f"{name}, {where} ({unit})"


def _display(column: str, value: Any) -> str:
    """A value as a legend shows it: sizes in their units, shares in %."""
    link = _link_field(column)
    if link is not None:
        _, unit, factor = _LINK_FIELDS[link[1]]
        return f"{float(value) * factor:g} {unit}"
    if column.endswith("_bytes"):
        return _size_label(float(value))
    return str(value)


def _caption(rows: pd.DataFrame, varying: set[str]) -> str:
    """The settings every row shares, e.g. ``10 ms one way, 50 Mbit/s, 2 MB upload, reno``."""

    def constant(column: str) -> Any:
        if column in varying or column not in rows or rows[column].isna().any():
            return None
        values = rows[column].unique()
        return values[0] if len(values) == 1 else None

    parts: list[str] = []
    for field, template, factor in (
        ("delay_ms", "{:g} ms one way", 1.0),
        ("loss", "{:g}% loss", 100.0),
        ("rate_mbps", "{:g} Mbit/s", 1.0),
    ):
        up, down = constant(f"link_up_{field}"), constant(f"link_down_{field}")
        if up is None or down is None:
            continue
        text = template.format(float(up) * factor)
        if down != up:
            text = f"{text} up / {template.format(float(down) * factor)} down"
        parts.append("no loss" if field == "loss" and up == down == 0 else text)
    size, direction = constant("file_size_bytes"), constant("direction")
    if size is not None:
        parts.append(f"{_size_label(float(size))} {direction or 'transfer'}s")
    elif direction is not None:
        parts.append(f"{direction}s")
    if (datagram := constant("max_datagram_size")) is not None:
        parts.append(f"{int(datagram)}-byte datagrams")
    for column in ("congestion_control", "transport"):
        if (value := constant(column)) is not None:
            parts.append(str(value))
    window = constant("receive_window_bytes")
    if window is not None and window != RECEIVE_WINDOW:
        parts.append(f"{_size_label(float(window))} receive window")
    return ", ".join(parts)


def plot_vs_link(
    df: pd.DataFrame,
    x: str = "link_up_loss",
    *,
    y: str = "throughput_mbps",
    hue: str | None = "congestion_control",
    ax: Axes | None = None,
    direction: str | None = None,
) -> Axes:
    """``y`` (median, IQR error bars) against a link parameter ``x``, one line per value of
    ``hue`` and per direction.

    ``x`` is a numeric column, typically a link profile column of a ``sweep(links=...)``
    frame (``link_up_loss``, ``link_up_delay_ms``, ``link_up_rate_mbps``, …; shares such as
    loss are drawn in %); rows without a value there (direct rows) are left out. ``y`` is
    ``throughput_mbps`` or another measured column (``seconds`` for the completion time).
    ``hue`` is the column the lines are split by (``congestion_control``, ``transport``,
    ``receive_window_bytes``, …) or None. The title's second line names the settings all
    plotted rows share (delay, loss and rate of the link, file size and direction, datagram
    size, congestion control, a receive window other than the default) and how many
    transfers each point summarises.
    """
    for column in (x, y, hue):
        if column is not None and column not in df.columns:
            raise UsageError(f"the frame has no column {column!r}")
    ax = _axes(ax, (6.4, 4.6))
    data = _select(df, direction)
    data = data[data[x].notna()]
    link = _link_field(x)
    factor = _LINK_FIELDS[link[1]][2] if link else 1.0
    keys = ["direction", hue] if hue and hue != "direction" else ["direction"]
    stats = _stats(data, [*keys, x], y)
    directions = _directions(stats)
    colours = _colours(list(stats[hue])) if hue else {}
    rank = {value: i for i, value in enumerate(colours)}
    series = sorted(
        stats.groupby(keys),
        key=lambda item: (_DIRECTIONS.index(str(item[0][0])), rank.get(item[0][-1], 0)),
    )
    positions = sorted(set(stats[x].astype(float) * factor))
    span = positions[-1] - positions[0] if len(positions) > 1 else 1.0
    for index, (key, unsorted) in enumerate(series):
        group = unsorted.sort_values(x)
        offset = (index - (len(series) - 1) / 2) * _VS_DODGE * span
        error = np.vstack([group["median"] - group["q1"], group["q3"] - group["median"]])
        ax.errorbar(
            group[x].astype(float) * factor + offset,
            group["median"],
            yerr=error,
            color=colours[key[-1]] if hue else "C0",
            capsize=3,
            **_STYLE[str(key[0])],
        )
    if stats.empty:
        _no_data(ax)
    else:
        ax.set_xticks(positions, [f"{value:g}" for value in positions])
        ax.xaxis.set_minor_locator(NullLocator())
        handles = [
            Line2D([], [], color=colour, linewidth=2, label=_display(str(hue), value))
            for value, colour in colours.items()
        ]
        if len(directions) > 1:
            handles += [Line2D([], [], color="0.3", label=d, **_STYLE[d]) for d in directions]
        if handles:
            name = _COLUMN_LABELS.get(str(hue), str(hue)).split(" (")[0]
            ax.legend(
                handles=handles,
                title=f"{name} (median, IQR)" if hue else None,
                fontsize="small",
                title_fontsize="small",
            )
    x_label, y_label = _column_label(x, data), _COLUMN_LABELS.get(y, y)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    what, against = y_label.split(" (")[0], x_label.split(",")[0].split(" (")[0]
    title = _title(f"{what[:1].upper()}{what[1:]} vs {against}", directions)
    varying = {x, *keys}
    if link is not None:
        varying |= {f"link_up_{link[1]}", f"link_down_{link[1]}"}
    parts = [_caption(measured(data), varying)] if not stats.empty else []
    counts = sorted(set(stats["n"]))
    if counts:
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        parts.append(f"{n} transfer{'s' if counts[-1] > 1 else ''} per point")
    caption = textwrap.fill("; ".join(p for p in parts if p), _CAPTION_WIDTH)
    ax.set_title(f"{title}\n{caption}" if caption else title, fontsize="medium")
    _finish(ax)
    return ax


def plot_qlog(frame_or_path: pd.DataFrame | str | os.PathLike[str], ax: Axes | None = None) -> Axes:
    """One qlog trace over time: congestion window and bytes in flight (kB, left axis),
    smoothed RTT (ms, a twin right axis) and a red tick at the top for each packet declared
    lost. Takes :func:`qsftp.qlog.load`'s frame or a qlog file; returns the left Axes (the
    RTT axis is its twin, in ``ax.figure.axes``)."""
    frame = frame_or_path if isinstance(frame_or_path, pd.DataFrame) else qlog.load(frame_or_path)
    ax = _axes(ax, size=(7.5, 4.4))
    seconds = frame["time_ms"] / 1000.0
    handles = [
        ax.step(seconds, frame["cwnd"] / 1e3, where="post", color="C0", label="cwnd")[0],
        ax.step(
            seconds,
            frame["bytes_in_flight"] / 1e3,
            where="post",
            color="C0",
            alpha=0.35,
            linewidth=0.8,
            label="bytes in flight",
        )[0],
    ]
    ax.set_xlabel("time since connection start (s)")
    ax.set_ylabel("congestion window, bytes in flight (kB)")
    _finish(ax)
    rtt_ax = ax.twinx()
    handles += rtt_ax.plot(
        seconds, frame["smoothed_rtt_ms"], color="C1", linewidth=1.2, label="smoothed RTT"
    )
    rtt_ax.set_ylabel("smoothed RTT (ms)")
    rtt_ax.set_ylim(bottom=0)
    losses = seconds[frame["event"] == qlog.PACKET_LOST]
    if len(losses):
        # Ticks along the top edge: x in data units, y in axes units, one collection for all.
        ax.vlines(losses, 0.93, 1.0, transform=ax.get_xaxis_transform(), color="C3", linewidth=1)
        handles.append(Line2D([], [], color="C3", label=f"packet lost ({len(losses)})"))
    # On the twin, which is drawn last, so no line runs over the legend; below the loss ticks.
    rtt_ax.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, 0.92), fontsize="small")
    side = frame.attrs.get("vantage_point") or "?"
    ax.set_title(f"qlog: {side} side of connection {frame.attrs.get('odcid') or '?'}")
    return ax


def save_figure(figure: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Save ``figure`` (PNG, SVG or PDF by suffix) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    return out
