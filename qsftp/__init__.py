"""QSFTP: secure, fast file transfer over QUIC, and a lab to measure it.

The names below are the public API; ``python -m qsftp.server`` and ``python -m qsftp.client``
are the command-line tools. Names load lazily, so ``import qsftp.wire`` (the sans-I/O codec)
does not drag in asyncio, aioquic or pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .client import Connection, TransferResult, connect, download, listdir, upload
    from .errors import (
        AuthFailed,
        BadPath,
        BadRequest,
        Busy,
        Cancelled,
        ChecksumMismatch,
        ConnectTimeout,
        ErrorCode,
        InternalError,
        LocalFileError,
        LocalProtocolError,
        NoSpace,
        NotFound,
        OperationError,
        PacketLinkUnavailable,
        QsftpError,
        RemoteProtocolError,
        TooLarge,
        TransportError,
        TrustError,
        UsageError,
    )
    from .experiment import load_results, save_results, summarize, sweep
    from .fs import Entry
    from .netem import LinkEmulator, LinkProfile, LinkStats, StreamRelay
    from .packetlink import PacketLink
    from .plots import (
        plot_chunk_size,
        plot_distribution,
        plot_heatmap,
        plot_overview,
        plot_qlog,
        plot_sizes,
        plot_vs_link,
        save_figure,
    )
    from .server import Limits, QsftpServer, serve
    from .tickets import Ticket, TicketCache

__all__ = [
    "AuthFailed",
    "BadPath",
    "BadRequest",
    "Busy",
    "Cancelled",
    "ChecksumMismatch",
    "ConnectTimeout",
    "Connection",
    "Entry",
    "ErrorCode",
    "InternalError",
    "Limits",
    "LinkEmulator",
    "LinkProfile",
    "LinkStats",
    "LocalFileError",
    "LocalProtocolError",
    "NoSpace",
    "NotFound",
    "OperationError",
    "PacketLink",
    "PacketLinkUnavailable",
    "QsftpError",
    "QsftpServer",
    "RemoteProtocolError",
    "StreamRelay",
    "Ticket",
    "TicketCache",
    "TooLarge",
    "TransferResult",
    "TransportError",
    "TrustError",
    "UsageError",
    "__version__",
    "connect",
    "download",
    "listdir",
    "load_results",
    "plot_chunk_size",
    "plot_distribution",
    "plot_heatmap",
    "plot_overview",
    "plot_qlog",
    "plot_sizes",
    "plot_vs_link",
    "save_figure",
    "save_results",
    "serve",
    "summarize",
    "sweep",
    "upload",
]

# public name -> module that defines it (tests check it matches __all__)
_EXPORTS: dict[str, str] = {
    "Connection": "client",
    "TransferResult": "client",
    "connect": "client",
    "download": "client",
    "listdir": "client",
    "upload": "client",
    "AuthFailed": "errors",
    "BadPath": "errors",
    "BadRequest": "errors",
    "Busy": "errors",
    "Cancelled": "errors",
    "ChecksumMismatch": "errors",
    "ConnectTimeout": "errors",
    "ErrorCode": "errors",
    "InternalError": "errors",
    "LocalFileError": "errors",
    "LocalProtocolError": "errors",
    "NoSpace": "errors",
    "NotFound": "errors",
    "OperationError": "errors",
    "PacketLinkUnavailable": "errors",
    "QsftpError": "errors",
    "RemoteProtocolError": "errors",
    "TooLarge": "errors",
    "TransportError": "errors",
    "TrustError": "errors",
    "UsageError": "errors",
    "Entry": "fs",
    "QsftpServer": "server",
    "Limits": "server",
    "LinkEmulator": "netem",
    "LinkProfile": "netem",
    "LinkStats": "netem",
    "PacketLink": "packetlink",
    "StreamRelay": "netem",
    "serve": "server",
    "Ticket": "tickets",
    "TicketCache": "tickets",
    "load_results": "experiment",
    "save_results": "experiment",
    "summarize": "experiment",
    "sweep": "experiment",
    "plot_chunk_size": "plots",
    "plot_distribution": "plots",
    "plot_heatmap": "plots",
    "plot_overview": "plots",
    "plot_qlog": "plots",
    "plot_sizes": "plots",
    "plot_vs_link": "plots",
    "save_figure": "plots",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsftp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
