"""Figures from sweep frames. Each function takes the frame and ``ax=None`` and returns the Axes
(or the Figure for multi-panel plots); none calls ``plt.show()``. Warm-ups and failed transfers
are left out; medians are drawn with the interquartile range of the repeats."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .experiment import measured

__all__ = [
    "plot_chunk_size",
    "plot_distribution",
    "plot_heatmap",
    "plot_overview",
    "plot_sizes",
    "save_figure",
]

_Y_LABEL = "throughput (Mbit/s)"


def _axes(ax: Axes | None, size: tuple[float, float] = (6.4, 4.2)) -> Axes:
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size, layout="constrained")
    return new


def _human_bytes(value: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            number = value / scale
            return f"{number:.0f} {unit}" if number == int(number) else f"{number:.1f} {unit}"
    return f"{value:.0f} B"


def _stats(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    grouped = measured(df).groupby(by)["throughput_mbps"]
    return grouped.agg(
        median="median", q1=lambda s: s.quantile(0.25), q3=lambda s: s.quantile(0.75)
    ).reset_index()


def _direction_title(df: pd.DataFrame, what: str) -> str:
    directions = sorted(set(measured(df)["direction"]))
    return f"{what} ({', '.join(directions)})" if directions else what


def plot_sizes(df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None) -> Axes:
    """Throughput vs file size (log x), one line per chunk size: median and IQR band."""
    ax = _axes(ax)
    data = df if direction is None else df[df["direction"] == direction]
    stats = _stats(data, ["chunk_size_bytes", "file_size_bytes"])
    for chunk, unsorted in stats.groupby("chunk_size_bytes"):
        group = unsorted.sort_values("file_size_bytes")
        x = group["file_size_bytes"]
        (line,) = ax.plot(x, group["median"], marker="o", label=f"chunk {_human_bytes(chunk)}")
        ax.fill_between(x, group["q1"], group["q3"], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("file size (bytes, log scale)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(_direction_title(data, "Throughput vs file size"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="median, IQR band", fontsize="small")
    return ax


def plot_chunk_size(
    df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None
) -> Axes:
    """Throughput vs chunk size (log x), one line per file size: median and IQR error bars."""
    ax = _axes(ax)
    data = df if direction is None else df[df["direction"] == direction]
    stats = _stats(data, ["file_size_bytes", "chunk_size_bytes"])
    for size, unsorted in stats.groupby("file_size_bytes"):
        group = unsorted.sort_values("chunk_size_bytes")
        error = np.vstack([group["median"] - group["q1"], group["q3"] - group["median"]])
        ax.errorbar(
            group["chunk_size_bytes"],
            group["median"],
            yerr=error,
            marker="o",
            capsize=3,
            label=f"file {_human_bytes(size)}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (bytes, log scale)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(_direction_title(data, "Throughput vs chunk size"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="median, IQR", fontsize="small")
    return ax


def plot_heatmap(df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None) -> Axes:
    """Median throughput over file size × chunk size, values written in the cells."""
    ax = _axes(ax)
    data = df if direction is None else df[df["direction"] == direction]
    stats = _stats(data, ["file_size_bytes", "chunk_size_bytes"])
    grid = stats.pivot(index="file_size_bytes", columns="chunk_size_bytes", values="median")
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(grid.columns)), [_human_bytes(c) for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [_human_bytes(s) for s in grid.index])
    ax.set_xlabel("chunk size")
    ax.set_ylabel("file size")
    ax.set_title(_direction_title(data, "Median throughput (Mbit/s)"))
    finite = grid.to_numpy(dtype=float)
    threshold = np.nanmean(finite) if np.isfinite(finite).any() else 0.0
    for (row, col), value in np.ndenumerate(finite):
        if np.isfinite(value):
            colour = "black" if value > threshold else "white"
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", color=colour)
    ax.figure.colorbar(image, ax=ax, label=_Y_LABEL)
    return ax


def plot_distribution(
    df: pd.DataFrame, ax: Axes | None = None, *, direction: str | None = None
) -> Axes:
    """Every repeat of every configuration: box plot with the individual points over it."""
    ax = _axes(ax, (max(6.4, 0.5 * _config_count(df) + 2), 4.2))
    data = measured(df if direction is None else df[df["direction"] == direction])
    groups = list(data.groupby(["direction", "file_size_bytes", "chunk_size_bytes"]))
    values = [group["throughput_mbps"].to_numpy() for _, group in groups]
    labels = [f"{d[0]}\n{_human_bytes(s)}\n{_human_bytes(c)}" for (d, s, c), _ in groups]
    if values:
        ax.boxplot(values, showfliers=False)
        rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
        for position, points in enumerate(values, start=1):
            jitter = rng.uniform(-0.12, 0.12, size=len(points))
            ax.scatter(position + jitter, points, s=12, alpha=0.7, zorder=3)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize="x-small")
    ax.set_xlabel("configuration (direction / file size / chunk size)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title("Spread of repeats per configuration")
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def _config_count(df: pd.DataFrame) -> int:
    columns = ["direction", "file_size_bytes", "chunk_size_bytes"]
    return int(measured(df)[columns].drop_duplicates().shape[0])


def plot_overview(df: pd.DataFrame) -> Figure:
    """A 2 × 2 figure: sizes, chunk sizes, heatmap and spread, with the run's metadata."""
    figure, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    plot_sizes(df, axes[0][0])
    plot_chunk_size(df, axes[0][1])
    plot_heatmap(df, axes[1][0])
    plot_distribution(df, axes[1][1])
    attrs: dict[str, Any] = dict(df.attrs)
    figure.suptitle(
        "QSFTP throughput — "
        f"qsftp {attrs.get('qsftp_version', '?')}, aioquic {attrs.get('aioquic_version', '?')}, "
        f"Python {attrs.get('python_version', '?')}, {attrs.get('cpu_count', '?')} cores, "
        f"run {attrs.get('run_id', '?')}",
        fontsize="medium",
    )
    return figure


def save_figure(figure: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Save ``figure`` (PNG, SVG or PDF by suffix) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    return out
