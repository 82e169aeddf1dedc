"""The one exception hierarchy of QSFTP, and the stable wire error codes.

Every failure QSFTP raises is a :class:`QsftpError`::

    QsftpError
    ├── UsageError              local misuse of the API or CLI (bad argument)
    │   ├── LocalProtocolError  this side tried to send what qsftp/1 forbids now
    │   └── PacketLinkUnavailable   packet-level mode cannot run here (not root, ...)
    ├── LocalFileError          a local file is missing, unreadable or unwritable
    ├── TransportError          the connection could not be made or was lost
    │   └── ConnectTimeout      no answer from the server in time
    ├── TrustError              the server's certificate failed verification
    │                           (CA, pin or known-hosts mismatch)
    └── OperationError          an operation failed with a wire error code
        ├── BadRequest          malformed or unexpected message (protocol error)
        │   └── RemoteProtocolError   the peer sent bytes that break qsftp/1
        ├── AuthFailed          missing or wrong token
        ├── BadPath             the name is not a safe relative path in the root
        ├── NotFound            no such file or directory
        ├── TooLarge            the declared file size exceeds the server's limit
        ├── ChecksumMismatch    SHA-256 of what was stored differs from what was sent
        ├── NoSpace             the disk is full or a size limit was hit while writing
        ├── Busy                the server refuses more work now (limits)
        ├── Cancelled           the operation was abandoned by the peer
        └── InternalError       an unexpected failure on the other side

An :class:`OperationError` carries its wire ``error_code`` as a class attribute, and the
server sends exactly that code in an ERROR message; the client turns a received code back
into the same class with :func:`error_for_code`. Local misuse (:class:`UsageError`) and remote
misbehaviour (:class:`RemoteProtocolError`) are different classes.
"""

from __future__ import annotations

import enum

__all__ = [
    "AuthFailed",
    "BadPath",
    "BadRequest",
    "Busy",
    "Cancelled",
    "ChecksumMismatch",
    "ConnectTimeout",
    "ErrorCode",
    "InternalError",
    "LocalFileError",
    "LocalProtocolError",
    "NoSpace",
    "NotFound",
    "OperationError",
    "PacketLinkUnavailable",
    "QsftpError",
    "RemoteProtocolError",
    "TooLarge",
    "TransportError",
    "TrustError",
    "UsageError",
    "error_for_code",
]


class ErrorCode(enum.IntEnum):
    """Stable numeric error codes carried by ERROR messages (docs/PROTOCOL.md)."""

    BAD_REQUEST = 1
    AUTH_FAILED = 2
    BAD_PATH = 3
    NOT_FOUND = 4
    TOO_LARGE = 5
    CHECKSUM_MISMATCH = 6
    NO_SPACE = 7
    BUSY = 8
    CANCELLED = 9
    INTERNAL = 99


class QsftpError(Exception):
    """Base class of every error QSFTP raises."""


class UsageError(QsftpError):
    """The caller asked for something impossible (bad argument, bad option combination)."""


class LocalProtocolError(UsageError):
    """This side tried to send a message that qsftp/1 does not allow in the stream's state."""


class PacketLinkUnavailable(UsageError):
    """Packet-level mode (qsftp.packetlink) cannot run here; the message says why (not root,
    no /dev/net/tun, no ``ip`` command, a namespace or TUN device could not be created)."""


class LocalFileError(QsftpError):
    """A local file is missing, unreadable, or cannot be written."""


class TransportError(QsftpError):
    """The QUIC connection could not be established, or it was lost."""


class ConnectTimeout(TransportError):
    """The server did not answer in time."""


class TrustError(QsftpError):
    """The server's certificate was not trusted: CA check, pin or known-hosts mismatch."""


class OperationError(QsftpError):
    """An operation failed with a wire error code; ``error_code`` says which."""

    error_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__


class BadRequest(OperationError):
    """A message was malformed or not allowed in the current state."""

    error_code = ErrorCode.BAD_REQUEST


class RemoteProtocolError(BadRequest):
    """The peer sent bytes that violate qsftp/1. The only error the decoder raises."""


class AuthFailed(OperationError):
    """The token was missing or wrong."""

    error_code = ErrorCode.AUTH_FAILED


class BadPath(OperationError):
    """The name is not a safe relative path confined to the root."""

    error_code = ErrorCode.BAD_PATH


class NotFound(OperationError):
    """No such file or directory."""

    error_code = ErrorCode.NOT_FOUND


class TooLarge(OperationError):
    """The declared file size exceeds the server's limit."""

    error_code = ErrorCode.TOO_LARGE


class ChecksumMismatch(OperationError):
    """The SHA-256 of the bytes stored differs from the SHA-256 of the bytes sent."""

    error_code = ErrorCode.CHECKSUM_MISMATCH


class NoSpace(OperationError):
    """The destination ran out of space (ENOSPC, EDQUOT, EFBIG)."""

    error_code = ErrorCode.NO_SPACE


class Busy(OperationError):
    """The server refuses more work right now (a connection or operation limit)."""

    error_code = ErrorCode.BUSY


class Cancelled(OperationError):
    """The peer abandoned the operation (stream reset)."""

    error_code = ErrorCode.CANCELLED


class InternalError(OperationError):
    """An unexpected failure on the other side."""

    error_code = ErrorCode.INTERNAL


_BY_CODE: dict[int, type[OperationError]] = {
    cls.error_code: cls
    for cls in (
        BadRequest,
        AuthFailed,
        BadPath,
        NotFound,
        TooLarge,
        ChecksumMismatch,
        NoSpace,
        Busy,
        Cancelled,
        InternalError,
    )
}


def error_for_code(code: int, message: str) -> OperationError:
    """Build the exception for a wire error code; unknown codes become InternalError."""
    cls = _BY_CODE.get(code, InternalError)
    if cls is InternalError and code != ErrorCode.INTERNAL:
        message = f"error code {code}: {message}"
    return cls(message)
