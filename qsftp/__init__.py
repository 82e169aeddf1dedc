"""QSFTP: secure, fast file transfer over QUIC, and a lab to measure it.

The names below are the public API; ``python -m qsftp.server`` and ``python -m qsftp.client``
are the command-line tools.
"""

__version__ = "0.1.0"

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
    QsftpError,
    RemoteProtocolError,
    TooLarge,
    TransportError,
    TrustError,
    UsageError,
)
from .fs import Entry
from .server import QsftpServer, serve

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
    "LocalFileError",
    "LocalProtocolError",
    "NoSpace",
    "NotFound",
    "OperationError",
    "QsftpError",
    "QsftpServer",
    "RemoteProtocolError",
    "TooLarge",
    "TransferResult",
    "TransportError",
    "TrustError",
    "UsageError",
    "__version__",
    "connect",
    "download",
    "listdir",
    "serve",
    "upload",
]
