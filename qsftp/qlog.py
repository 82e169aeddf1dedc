"""Read the qlog traces that ``qlog_dir=`` makes aioquic write, as pandas frames.

A trace is one side's view of one QUIC connection, a qlog 0.3 JSON file named
``<ODCID>.qlog`` (:class:`aioquic.quic.logger.QuicFileLogger`). :func:`load` turns the
congestion-control and packet events into a time series, one row per event:

========================  ===============================================================
``time_ms``               ms since the trace's first event
``event``                 qlog event name (the four kinds below)
``cwnd``                  congestion window, bytes
``bytes_in_flight``       bytes sent and not yet acknowledged or declared lost
``ssthresh``              slow-start threshold, bytes (NaN until the first congestion event)
``smoothed_rtt_ms``       smoothed RTT, ms (NaN until the first RTT sample)
``latest_rtt_ms``         latest RTT sample, ms
``min_rtt_ms``            minimum RTT seen, ms
``packets_sent``          packets sent so far (cumulative)
``packets_received``      packets received so far (cumulative)
``packets_lost``          packets declared lost so far (cumulative)
========================  ===============================================================

The metrics come from ``recovery:metrics_updated`` and are carried forward to the rows in
between (each holds the last value logged); the counters count ``transport:packet_sent``,
``transport:packet_received`` and ``recovery:packet_lost``. ``frame.attrs`` holds the
trace's ``odcid``, ``vantage_point`` (``client`` or ``server``), ``path`` and
``duration_ms`` (first to last event of any kind).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["COLUMNS", "load", "summary"]

METRICS_UPDATED = "recovery:metrics_updated"
PACKET_SENT = "transport:packet_sent"
PACKET_RECEIVED = "transport:packet_received"
PACKET_LOST = "recovery:packet_lost"
_COUNTERS = {
    PACKET_SENT: "packets_sent",
    PACKET_RECEIVED: "packets_received",
    PACKET_LOST: "packets_lost",
}
# qlog metric name -> column. aioquic logs RTTs in ms already (QuicLoggerTrace.encode_time).
_METRICS = {
    "cwnd": "cwnd",
    "bytes_in_flight": "bytes_in_flight",
    "ssthresh": "ssthresh",
    "smoothed_rtt": "smoothed_rtt_ms",
    "latest_rtt": "latest_rtt_ms",
    "min_rtt": "min_rtt_ms",
}
COLUMNS = ["time_ms", "event", *_METRICS.values(), *_COUNTERS.values()]
"The columns of :func:`load`'s frame, in order."


def _trace(path: str | os.PathLike[str], index: int) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        try:
            document = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a qlog JSON file: {exc}") from exc
    traces = document.get("traces") if isinstance(document, dict) else None
    if not isinstance(traces, list) or not traces:
        raise ValueError(f"{path} holds no qlog traces")
    trace: dict[str, Any] = traces[index]
    return trace


def _raw(path: str | os.PathLike[str], trace_index: int) -> pd.DataFrame:
    """The rows of :func:`load` before the metrics are carried forward."""
    trace = _trace(path, trace_index)
    events = trace.get("events", [])
    start = float(events[0]["time"]) if events else 0.0
    counts = dict.fromkeys(_COUNTERS.values(), 0)
    rows: list[dict[str, Any]] = []
    for event in events:
        name = event.get("name")
        if name != METRICS_UPDATED and name not in _COUNTERS:
            continue
        row: dict[str, Any] = {"time_ms": float(event["time"]) - start, "event": name}
        if name == METRICS_UPDATED:
            data = event.get("data", {})
            for key, column in _METRICS.items():
                if data.get(key) is not None:
                    row[column] = float(data[key])
        else:
            counts[_COUNTERS[name]] += 1
        row.update(counts)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.astype({column: "float64" for column in _METRICS.values()})
    frame = frame.astype({column: "int64" for column in _COUNTERS.values()})
    frame.attrs.update(
        odcid=trace.get("common_fields", {}).get("ODCID"),
        vantage_point=trace.get("vantage_point", {}).get("type"),
        path=str(Path(path)),
        duration_ms=float(events[-1]["time"]) - start if events else 0.0,
    )
    return frame


def load(path: str | os.PathLike[str], *, trace: int = 0) -> pd.DataFrame:
    """One qlog file as a time series (module docstring: the columns); ``trace`` picks one
    of several traces in a file (aioquic's QuicFileLogger writes one per file)."""
    frame = _raw(path, trace)
    metrics = list(_METRICS.values())
    frame[metrics] = frame[metrics].ffill()
    return frame


def summary(path: str | os.PathLike[str], *, trace: int = 0) -> dict[str, Any]:
    """Headline figures of one trace: duration, packet counts, loss, cwnd and RTT.

    RTT statistics are over the RTT samples logged (not over the carried-forward rows);
    ``loss_rate`` is packets lost / packets sent (0 when nothing was sent).
    """
    frame = _raw(path, trace)
    last = frame.iloc[-1] if len(frame) else None
    sent = int(last["packets_sent"]) if last is not None else 0
    lost = int(last["packets_lost"]) if last is not None else 0
    rtt = frame["smoothed_rtt_ms"].dropna()
    return {
        "path": frame.attrs["path"],
        "odcid": frame.attrs["odcid"],
        "vantage_point": frame.attrs["vantage_point"],
        "duration_ms": frame.attrs["duration_ms"],
        "packets_sent": sent,
        "packets_received": int(last["packets_received"]) if last is not None else 0,
        "packets_lost": lost,
        "loss_rate": lost / sent if sent else 0.0,
        "max_cwnd": float(frame["cwnd"].max()) if frame["cwnd"].notna().any() else None,
        "min_smoothed_rtt_ms": float(rtt.min()) if len(rtt) else None,
        "median_smoothed_rtt_ms": float(rtt.median()) if len(rtt) else None,
    }
