"""qsftp/1 state machines: sans-I/O, one object per QUIC connection.

:class:`QsftpConnection` takes the bytes QUIC delivered on each stream and returns events; its
``send_*`` methods only queue bytes, which the glue collects with :meth:`data_to_send` and hands
to QUIC. It knows nothing of sockets, clocks, files or asyncio.

Streams (client-initiated bidirectional QUIC streams only):

- stream 0 is the control stream: CONN_REQUEST → CONN_ACK | ERROR, later CONN_TERMINATE;
- every other stream carries exactly one operation (PUT, GET, LIST, STAT, …).

Everything that affects a transition lives in this file: the three tables below
(``_CONTROL``, ``_REQUEST``, ``_RESPONSE``), which docs/PROTOCOL.md draws. An input that is not
in its table is a protocol error: on the control stream it is fatal for the connection (the
receive call raises :class:`RemoteProtocolError`); on an operation stream the stream fails
alone (a server answers ERROR BAD_REQUEST; both sides get a :class:`ProtocolViolation` event).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .wire import (
    PROTOCOL_VERSION,
    Abort,
    Commit,
    ConnAck,
    ConnRequest,
    ConnTerminate,
    Data,
    Decoder,
    Done,
    End,
    EntryInfo,
    EntryKind,
    Error,
    FileFrom,
    FileInfo,
    Get,
    GetFrom,
    List,
    Message,
    MessageType,
    Probe,
    Put,
    PutBlock,
    PutRange,
    Stat,
    encode,
    encode_data_header,
)

__all__ = [
    "CONTROL_STREAM_ID",
    "AbortRequested",
    "CommitRequested",
    "ProbeRequested",
    "PutRangeRequested",
    "ControlState",
    "DataReceived",
    "EntryReceived",
    "Event",
    "FileStarted",
    "GetFromRequested",
    "GetRequested",
    "ListRequested",
    "OperationDone",
    "OperationFailed",
    "ProtocolViolation",
    "PutRequested",
    "QsftpConnection",
    "RequestState",
    "ResponseState",
    "Role",
    "SessionAccepted",
    "SessionRejected",
    "SessionRequested",
    "StatRequested",
    "StreamAborted",
    "TerminateReceived",
    "UploadEnded",
]

logger = logging.getLogger(__name__)

CONTROL_STREAM_ID = 0
_FIN = "FIN"  # the end of the stream, an input like a message type
_SHA256_LEN = 32


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of protocol events."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRequested(Event):
    """Server: the client asked to open the session."""

    version: int
    "Protocol version the client speaks."
    token: str
    "The token the client presented (empty for none)."
    client: str
    "Client software name."

    def __repr__(self) -> str:
        return f"SessionRequested(version={self.version}, client={self.client!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionAccepted(Event):
    """Client: the server opened the session."""

    version: int
    "Protocol version of the server."
    server: str
    "Server software name."


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRejected(Event):
    """Client: the server refused or ended the session with an error."""

    code: int
    "Error code."
    message: str
    "Human-readable reason."


@dataclass(frozen=True, slots=True, kw_only=True)
class TerminateReceived(Event):
    """The peer sent CONN_TERMINATE."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PutRequested(Event):
    """Server: an upload starts."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Remote name as sent (untrusted)."
    size: int
    "Declared size in bytes."


@dataclass(frozen=True, slots=True, kw_only=True)
class GetRequested(Event):
    """Server: a download is asked for."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Remote name as sent (untrusted)."
    chunk_size: int
    "Largest DATA payload the client wants; 0 lets the server choose."


@dataclass(frozen=True, slots=True, kw_only=True)
class GetFromRequested(Event):
    """Server: the rest of a download is asked for (a resumed download)."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Remote name as sent (untrusted)."
    chunk_size: int
    "Largest DATA payload the client wants; 0 lets the server choose."
    offset: int
    "Bytes the client holds already."
    sha256: bytes
    "SHA-256 of those bytes: the server resumes only if its first ``offset`` bytes match."


@dataclass(frozen=True, slots=True, kw_only=True)
class ListRequested(Event):
    """Server: a listing is asked for."""

    stream_id: int
    "Stream of the operation."
    path: str
    "Directory as sent (untrusted); empty for the root."
    recursive: bool
    "Whether the whole subtree is wanted."


@dataclass(frozen=True, slots=True, kw_only=True)
class StatRequested(Event):
    """Server: one entry's description is asked for."""

    stream_id: int
    "Stream of the operation."
    path: str
    "Entry as sent (untrusted)."


@dataclass(frozen=True, slots=True, kw_only=True)
class PutRangeRequested(Event):
    """Server: one range of a striped upload starts."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Final remote name as sent (untrusted)."
    total_size: int
    "Size of the whole file."
    offset: int
    "Where the range starts."
    length: int
    "Bytes in the range."
    upload_id: bytes
    "The upload's id."
    checked: bool = True
    "False for PUT_BLOCK: no SHA-256 of the range itself (END carries zeros, DONE none)."


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitRequested(Event):
    """Server: a striped upload is complete; verify and rename."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Final remote name as sent (untrusted)."
    total_size: int
    "Size of the whole file."
    upload_id: bytes
    "The upload's id."
    sha256: bytes
    "SHA-256 the client computed over the whole file."


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortRequested(Event):
    """Server: forget a striped upload."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Final remote name as sent (untrusted)."
    upload_id: bytes
    "The upload's id."


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRequested(Event):
    """Server: how much of an upload's partial file is held (to resume it)."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Final remote name as sent (untrusted)."
    upload_id: bytes
    "The upload's id."


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived(Event):
    """File bytes arrived (server: of an upload; client: of a download)."""

    stream_id: int
    "Stream of the operation."
    data: bytes
    "The bytes."

    def __repr__(self) -> str:
        head = self.data[:20]
        more = "..." if len(self.data) > 20 else ""
        return f"DataReceived(stream_id={self.stream_id}, len={len(self.data)}, {head!r}{more})"


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadEnded(Event):
    """Server: the whole upload arrived (END and the end of the stream)."""

    stream_id: int
    "Stream of the operation."
    sha256: bytes
    "SHA-256 the client computed over what it sent."


@dataclass(frozen=True, slots=True, kw_only=True)
class FileStarted(Event):
    """Client: a download's bytes follow."""

    stream_id: int
    "Stream of the operation."
    size: int
    "Exact size in bytes."
    mtime_ns: int
    "Modification time on the server."
    offset: int = 0
    "Where the bytes that follow start in the file (a resumed download; else 0)."


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryReceived(Event):
    """Client: one entry of a LIST or STAT answer."""

    stream_id: int
    "Stream of the operation."
    name: str
    "Path relative to the server root (untrusted)."
    kind: EntryKind
    "File or directory."
    size: int
    "Size in bytes."
    mtime_ns: int
    "Modification time, ns since the epoch."


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationDone(Event):
    """Client: the server reported success (DONE and the end of the stream)."""

    stream_id: int
    "Stream of the operation."
    size: int
    "Bytes stored/sent, or entries listed."
    sha256: bytes
    "SHA-256 of the bytes as stored on the server (PUT, GET)."
    server_cpu_us: int
    "Server CPU time used during the operation, µs."


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationFailed(Event):
    """Client: the server answered the operation with ERROR."""

    stream_id: int
    "Stream of the operation."
    code: int
    "Error code."
    message: str
    "Human-readable reason."


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamAborted(Event):
    """The peer reset an operation stream."""

    stream_id: int
    "Stream of the operation."
    error_code: int
    "QUIC application error code of the reset."


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolViolation(Event):
    """The peer broke qsftp/1 on an operation stream; the stream is dead."""

    stream_id: int
    "Stream of the operation."
    message: str
    "What was wrong."


# --- state tables -----------------------------------------------------------------------------


class ControlState(enum.Enum):
    IDLE = "idle"
    AWAIT_ACK = "await-ack"
    OPEN = "open"
    CLIENT_CLOSING = "client-closing"
    SERVER_CLOSING = "server-closing"
    CLOSED = "closed"


class RequestState(enum.Enum):
    """The client → server half of an operation stream."""

    IDLE = "idle"
    BODY = "body"  # PUT: DATA until END
    ENDED = "ended"  # request complete, FIN next
    CLOSED = "closed"
    DISCARD = "discard"  # the response ended first; whatever still comes is dropped


class ResponseState(enum.Enum):
    """The server → client half of an operation stream."""

    WAITING = "waiting"  # no request yet
    PUT_RESULT = "put-result"
    GET_HEADER = "get-header"
    GET_FROM_HEADER = "get-from-header"
    GET_BODY = "get-body"
    LIST_ENTRIES = "list-entries"
    STAT_ENTRY = "stat-entry"
    STAT_DONE = "stat-done"
    FINAL = "final"  # DONE or ERROR sent, FIN next
    CLOSED = "closed"


_C, _S = Role.CLIENT, Role.SERVER
_T = MessageType
_CS = ControlState

# (state, sender, input) -> new state, for stream 0.
_CONTROL: dict[tuple[ControlState, Role, MessageType | str], ControlState] = {
    (_CS.IDLE, _C, _T.CONN_REQUEST): _CS.AWAIT_ACK,
    (_CS.AWAIT_ACK, _S, _T.CONN_ACK): _CS.OPEN,
    (_CS.AWAIT_ACK, _S, _T.ERROR): _CS.CLOSED,
    (_CS.OPEN, _S, _T.ERROR): _CS.CLOSED,
    (_CS.OPEN, _C, _T.CONN_TERMINATE): _CS.CLIENT_CLOSING,
    (_CS.OPEN, _S, _T.CONN_TERMINATE): _CS.SERVER_CLOSING,
    (_CS.CLIENT_CLOSING, _S, _T.CONN_TERMINATE): _CS.CLOSED,
    (_CS.CLIENT_CLOSING, _S, _T.ERROR): _CS.CLOSED,
    (_CS.SERVER_CLOSING, _C, _T.CONN_TERMINATE): _CS.CLOSED,
    (_CS.CLIENT_CLOSING, _C, _FIN): _CS.CLIENT_CLOSING,
    (_CS.SERVER_CLOSING, _S, _FIN): _CS.SERVER_CLOSING,
    (_CS.CLOSED, _C, _FIN): _CS.CLOSED,
    (_CS.CLOSED, _S, _FIN): _CS.CLOSED,
}

_RQ = RequestState
# (state, input) -> new state, for what the client sends on an operation stream.
_REQUEST: dict[tuple[RequestState, MessageType | str], RequestState] = {
    (_RQ.IDLE, _T.PUT): _RQ.BODY,
    (_RQ.IDLE, _T.GET): _RQ.ENDED,
    (_RQ.IDLE, _T.LIST): _RQ.ENDED,
    (_RQ.IDLE, _T.STAT): _RQ.ENDED,
    (_RQ.IDLE, _T.PUT_RANGE): _RQ.BODY,
    (_RQ.IDLE, _T.PUT_BLOCK): _RQ.BODY,
    (_RQ.IDLE, _T.COMMIT): _RQ.ENDED,
    (_RQ.IDLE, _T.ABORT): _RQ.ENDED,
    (_RQ.IDLE, _T.PROBE): _RQ.ENDED,
    (_RQ.IDLE, _T.GET_FROM): _RQ.ENDED,
    (_RQ.BODY, _T.DATA): _RQ.BODY,
    (_RQ.BODY, _T.END): _RQ.ENDED,
    (_RQ.ENDED, _FIN): _RQ.CLOSED,
}

_RS = ResponseState
# (state, input) -> new state, for what the server sends on an operation stream.
_RESPONSE: dict[tuple[ResponseState, MessageType | str], ResponseState] = {
    (_RS.WAITING, _T.ERROR): _RS.FINAL,
    (_RS.PUT_RESULT, _T.DONE): _RS.FINAL,
    (_RS.PUT_RESULT, _T.ERROR): _RS.FINAL,
    (_RS.GET_HEADER, _T.FILE): _RS.GET_BODY,
    (_RS.GET_HEADER, _T.ERROR): _RS.FINAL,
    (_RS.GET_FROM_HEADER, _T.FILE_FROM): _RS.GET_BODY,
    (_RS.GET_FROM_HEADER, _T.ERROR): _RS.FINAL,
    (_RS.GET_BODY, _T.DATA): _RS.GET_BODY,
    (_RS.GET_BODY, _T.DONE): _RS.FINAL,
    (_RS.GET_BODY, _T.ERROR): _RS.FINAL,
    (_RS.LIST_ENTRIES, _T.ENTRY): _RS.LIST_ENTRIES,
    (_RS.LIST_ENTRIES, _T.DONE): _RS.FINAL,
    (_RS.LIST_ENTRIES, _T.ERROR): _RS.FINAL,
    (_RS.STAT_ENTRY, _T.ENTRY): _RS.STAT_DONE,
    (_RS.STAT_ENTRY, _T.ERROR): _RS.FINAL,
    (_RS.STAT_DONE, _T.DONE): _RS.FINAL,
    (_RS.STAT_DONE, _T.ERROR): _RS.FINAL,
    (_RS.FINAL, _FIN): _RS.CLOSED,
}

# A request fixes what its response may look like.
_RESPONSE_FOR: dict[MessageType, ResponseState] = {
    _T.PUT: _RS.PUT_RESULT,
    _T.GET: _RS.GET_HEADER,
    _T.LIST: _RS.LIST_ENTRIES,
    _T.STAT: _RS.STAT_ENTRY,
    _T.PUT_RANGE: _RS.PUT_RESULT,
    _T.PUT_BLOCK: _RS.PUT_RESULT,
    _T.COMMIT: _RS.PUT_RESULT,
    _T.ABORT: _RS.PUT_RESULT,
    _T.PROBE: _RS.PUT_RESULT,
    _T.GET_FROM: _RS.GET_FROM_HEADER,
}

# Messages that may appear on operation streams at all; anything else there is a violation.
_REQUEST_TYPES = frozenset(t for (_, t) in _REQUEST if isinstance(t, MessageType))
_RESPONSE_TYPES = frozenset(t for (_, t) in _RESPONSE if isinstance(t, MessageType))


class _StreamFailure(Exception):
    """Internal: an operation stream broke the rules."""


@dataclass(slots=True)
class _OpStream:
    stream_id: int
    decoder: Decoder
    request: RequestState = RequestState.IDLE
    response: ResponseState = ResponseState.WAITING
    body_expected: int = 0  # bytes announced by PUT or FILE
    body_seen: int = 0  # DATA bytes seen so far in the body
    resume_offset: int = 0  # GET_FROM's offset: FILE_FROM may start there or at 0
    end_sha256: bytes = b""  # client's END digest, until FIN arrives


def _is_client_bidi(stream_id: int) -> bool:
    return stream_id % 4 == 0


class QsftpConnection:
    """The qsftp/1 protocol for one QUIC connection, as client or server."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.control_state = ControlState.IDLE
        self._control_decoder = Decoder()
        self._streams: dict[int, _OpStream] = {}
        self._pending: list[tuple[int, bytes, bool]] = []

    # --- queries ----------------------------------------------------------------------------

    @property
    def session_open(self) -> bool:
        """True once CONN_ACK has been sent or received and until the session closes."""
        return self.control_state == ControlState.OPEN

    def request_state(self, stream_id: int) -> RequestState:
        """State of the client → server half of ``stream_id`` (CLOSED once forgotten)."""
        stream = self._streams.get(stream_id)
        return stream.request if stream else RequestState.CLOSED

    def response_state(self, stream_id: int) -> ResponseState:
        """State of the server → client half of ``stream_id`` (CLOSED once forgotten)."""
        stream = self._streams.get(stream_id)
        return stream.response if stream else ResponseState.CLOSED

    @property
    def open_streams(self) -> int:
        """Operation streams whose state is still kept."""
        return len(self._streams)

    def data_to_send(self) -> list[tuple[int, bytes, bool]]:
        """Take the queued ``(stream_id, data, end_stream)`` writes, in order."""
        pending, self._pending = self._pending, []
        return pending

    # --- sending: control -------------------------------------------------------------------

    def request_session(self, *, token: str = "", client: str = "") -> None:
        """Client: send CONN_REQUEST on the control stream."""
        msg = ConnRequest(version=PROTOCOL_VERSION, token=token, client=client)
        self._send_control(msg)

    def accept_session(self, *, server: str = "") -> None:
        """Server: answer CONN_ACK."""
        self._send_control(ConnAck(version=PROTOCOL_VERSION, server=server))

    def reject_session(self, code: int, message: str) -> None:
        """Server: answer ERROR on the control stream; the session is over."""
        self._send_control(Error(code=code, message=message), fin=True)

    def terminate(self) -> None:
        """Either side: send CONN_TERMINATE (a second one answers the peer's)."""
        closing = self.control_state in (ControlState.CLIENT_CLOSING, ControlState.SERVER_CLOSING)
        self._send_control(ConnTerminate(), fin=closing)

    def _send_control(self, msg: Message, *, fin: bool = False) -> None:
        self.control_state = self._control_step(self.role, msg.TYPE, local=True)
        self._pending.append((CONTROL_STREAM_ID, encode(msg), fin))

    # --- sending: operations ----------------------------------------------------------------

    def send_put(self, stream_id: int, name: str, size: int) -> None:
        """Client: start an upload of ``size`` bytes on a new stream."""
        stream = self._new_local_stream(stream_id)
        self._request_step(stream, _T.PUT, local=True)
        stream.response = _RESPONSE_FOR[_T.PUT]
        stream.body_expected = size
        self._pending.append((stream_id, encode(Put(name=name, size=size)), False))

    def send_put_range(
        self,
        stream_id: int,
        *,
        name: str,
        total_size: int,
        offset: int,
        length: int,
        upload_id: bytes,
        checked: bool = True,
    ) -> None:
        """Client: start one range of a striped upload on a new stream: PUT_RANGE, or with
        ``checked`` False PUT_BLOCK (END then carries 32 zero bytes)."""
        kind = PutRange if checked else PutBlock
        stream = self._new_local_stream(stream_id)
        self._request_step(stream, kind.TYPE, local=True)
        stream.response = _RESPONSE_FOR[kind.TYPE]
        stream.body_expected = length
        msg = kind(
            name=name, total_size=total_size, offset=offset, length=length, upload_id=upload_id
        )
        self._pending.append((stream_id, encode(msg), False))

    def send_commit(
        self, stream_id: int, *, name: str, total_size: int, upload_id: bytes, sha256: bytes
    ) -> None:
        """Client: every range is stored; ask the server to verify and rename."""
        msg = Commit(name=name, total_size=total_size, upload_id=upload_id, sha256=sha256)
        self._send_simple_request(stream_id, msg)

    def send_abort(self, stream_id: int, *, name: str, upload_id: bytes) -> None:
        """Client: forget a striped upload."""
        self._send_simple_request(stream_id, Abort(name=name, upload_id=upload_id))

    def send_probe(self, stream_id: int, *, name: str, upload_id: bytes) -> None:
        """Client: ask how much of a resumable upload the server holds."""
        self._send_simple_request(stream_id, Probe(name=name, upload_id=upload_id))

    def send_get(self, stream_id: int, name: str, *, chunk_size: int = 0) -> None:
        """Client: ask for a file on a new stream."""
        self._send_simple_request(stream_id, Get(name=name, chunk_size=chunk_size))

    def send_get_from(
        self, stream_id: int, name: str, *, chunk_size: int = 0, offset: int, sha256: bytes
    ) -> None:
        """Client: ask for the rest of a file from ``offset``, given the SHA-256 of the
        ``offset`` bytes held; the server starts over from 0 when its prefix differs."""
        msg = GetFrom(name=name, chunk_size=chunk_size, offset=offset, sha256=sha256)
        self._send_simple_request(stream_id, msg)
        self._streams[stream_id].resume_offset = offset

    def send_list(self, stream_id: int, path: str = "", *, recursive: bool = False) -> None:
        """Client: ask for a directory listing on a new stream."""
        self._send_simple_request(stream_id, List(path=path, recursive=recursive))

    def send_stat(self, stream_id: int, path: str) -> None:
        """Client: ask for one entry on a new stream."""
        self._send_simple_request(stream_id, Stat(path=path))

    def _send_simple_request(self, stream_id: int, msg: Message) -> None:
        stream = self._new_local_stream(stream_id)
        self._request_step(stream, msg.TYPE, local=True)
        self._request_step(stream, _FIN, local=True)
        stream.response = _RESPONSE_FOR[msg.TYPE]
        self._pending.append((stream_id, encode(msg), True))

    def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        """Either side: file bytes of the current PUT (client) or GET (server)."""
        stream = self._local_stream(stream_id)
        if self.role is Role.CLIENT:
            self._request_step(stream, _T.DATA, local=True)
        else:
            self._response_step(stream, _T.DATA, local=True)
        if stream.body_seen + len(data) > stream.body_expected:
            raise LocalProtocolError(
                f"stream {stream_id}: {stream.body_seen + len(data)} bytes exceed the "
                f"announced {stream.body_expected}"
            )
        stream.body_seen += len(data)
        self._pending.append((stream_id, encode_data_header(len(data)), False))
        self._pending.append((stream_id, bytes(data), False))

    def send_end(self, stream_id: int, sha256: bytes) -> None:
        """Client: the upload's bytes are all sent; END with their SHA-256, then FIN."""
        self._require_role(Role.CLIENT, "send END")
        stream = self._local_stream(stream_id)
        if stream.body_seen != stream.body_expected:
            raise LocalProtocolError(
                f"stream {stream_id}: sent {stream.body_seen} of {stream.body_expected} bytes"
            )
        self._request_step(stream, _T.END, local=True)
        self._request_step(stream, _FIN, local=True)
        self._pending.append((stream_id, encode(End(sha256=sha256)), True))
        self._maybe_forget(stream)

    def send_file_info(self, stream_id: int, size: int, mtime_ns: int) -> None:
        """Server: a download's bytes follow."""
        self._require_role(Role.SERVER, "send FILE")
        stream = self._local_stream(stream_id)
        self._response_step(stream, _T.FILE, local=True)
        stream.body_expected = size
        stream.body_seen = 0
        self._pending.append((stream_id, encode(FileInfo(size=size, mtime_ns=mtime_ns)), False))

    def send_file_from(self, stream_id: int, size: int, mtime_ns: int, offset: int) -> None:
        """Server: a resumed download's bytes follow, from ``offset`` (GET_FROM's, or 0)."""
        self._require_role(Role.SERVER, "send FILE_FROM")
        stream = self._local_stream(stream_id)
        if offset not in (0, stream.resume_offset) or offset > size:
            raise LocalProtocolError(f"stream {stream_id}: FILE_FROM cannot start at {offset}")
        self._response_step(stream, _T.FILE_FROM, local=True)
        stream.body_expected = size - offset
        stream.body_seen = 0
        msg = FileFrom(size=size, mtime_ns=mtime_ns, offset=offset)
        self._pending.append((stream_id, encode(msg), False))

    def send_entry(
        self, stream_id: int, *, name: str, kind: EntryKind, size: int, mtime_ns: int
    ) -> None:
        """Server: one entry of a LIST or STAT answer."""
        self._require_role(Role.SERVER, "send ENTRY")
        stream = self._local_stream(stream_id)
        self._response_step(stream, _T.ENTRY, local=True)
        msg = EntryInfo(name=name, kind=kind, size=size, mtime_ns=mtime_ns)
        self._pending.append((stream_id, encode(msg), False))

    def send_done(
        self, stream_id: int, *, size: int, sha256: bytes = b"", server_cpu_us: int = 0
    ) -> None:
        """Server: the operation succeeded; DONE then FIN."""
        self._require_role(Role.SERVER, "send DONE")
        stream = self._local_stream(stream_id)
        if stream.response == _RS.GET_BODY and stream.body_seen != stream.body_expected:
            raise LocalProtocolError(
                f"stream {stream_id}: sent {stream.body_seen} of {stream.body_expected} bytes"
            )
        self._finish_response(stream, Done(size=size, sha256=sha256, server_cpu_us=server_cpu_us))

    def send_error(self, stream_id: int, code: int, message: str) -> None:
        """Server: the operation failed; ERROR then FIN. Later request bytes are dropped."""
        self._require_role(Role.SERVER, "send ERROR on an operation stream")
        stream = self._streams.get(stream_id)
        if stream is None or stream.response in (_RS.FINAL, _RS.CLOSED):
            return  # already answered (or reset): nothing more to say
        self._finish_response(stream, Error(code=code, message=message))

    def _finish_response(self, stream: _OpStream, msg: Message) -> None:
        self._response_step(stream, msg.TYPE, local=True)
        self._response_step(stream, _FIN, local=True)
        self._pending.append((stream.stream_id, encode(msg), True))
        if stream.request is not _RQ.CLOSED:
            stream.request = _RQ.DISCARD
        self._maybe_forget(stream)

    def reset_stream(self, stream_id: int) -> None:
        """Forget an operation stream that this side aborted (the glue resets it in QUIC)."""
        self._streams.pop(stream_id, None)

    # --- receiving --------------------------------------------------------------------------

    def receive(self, stream_id: int, data: bytes, end_stream: bool) -> list[Event]:
        """Feed bytes QUIC delivered on ``stream_id``; return the events they complete.

        Raises RemoteProtocolError for violations that doom the whole connection.
        """
        if not _is_client_bidi(stream_id):
            raise RemoteProtocolError(f"stream {stream_id} is not a client bidirectional stream")
        if stream_id == CONTROL_STREAM_ID:
            return self._receive_control(data, end_stream)
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.role is Role.CLIENT:
                return []  # a stream we already finished or reset: late bytes
            stream = self._streams[stream_id] = _OpStream(stream_id, Decoder())
        events: list[Event] = []
        try:
            self._receive_op(stream, data, end_stream, events)
        except (_StreamFailure, RemoteProtocolError) as exc:
            events.append(self._fail_stream(stream, str(exc)))
            if end_stream:  # the peer's half is over too: no late bytes to recognise
                self._streams.pop(stream_id, None)
        return events

    def stream_reset(self, stream_id: int, error_code: int) -> list[Event]:
        """The peer reset ``stream_id`` (RESET_STREAM, or STOP_SENDING for our half)."""
        if stream_id == CONTROL_STREAM_ID:
            raise RemoteProtocolError("the control stream was reset")
        if self._streams.pop(stream_id, None) is None:
            return []
        return [StreamAborted(stream_id=stream_id, error_code=error_code)]

    def _receive_control(self, data: bytes, end_stream: bool) -> list[Event]:
        peer = _S if self.role is Role.CLIENT else _C
        decoder = self._control_decoder
        decoder.feed(data)
        events: list[Event] = []
        while (msg := decoder.next_message()) is not None:
            self.control_state = self._control_step(peer, msg.TYPE, local=False)
            match msg:
                case ConnRequest():
                    events.append(
                        SessionRequested(version=msg.version, token=msg.token, client=msg.client)
                    )
                case ConnAck():
                    events.append(SessionAccepted(version=msg.version, server=msg.server))
                case Error():
                    events.append(SessionRejected(code=msg.code, message=msg.message))
                case ConnTerminate():
                    events.append(TerminateReceived())
        if end_stream:
            if not decoder.at_boundary:
                raise RemoteProtocolError("control stream ended inside a message")
            self.control_state = self._control_step(peer, _FIN, local=False)
        return events

    def _receive_op(
        self, stream: _OpStream, data: bytes, end_stream: bool, events: list[Event]
    ) -> None:
        if self.role is Role.SERVER and stream.request is _RQ.IDLE and not self.session_open:
            # Operations need an open session: answer, then drop whatever else comes.
            self._finish_response(stream, Error(code=ErrorCode.AUTH_FAILED, message="no session"))
        if self.role is Role.SERVER and stream.request is _RQ.DISCARD:
            if end_stream:
                self._streams.pop(stream.stream_id, None)
            return
        stream.decoder.feed(data)
        sid = stream.stream_id
        while (msg := stream.decoder.next_message()) is not None:
            if self.role is Role.SERVER:
                self._server_message(stream, msg, events)
                if stream.request is _RQ.DISCARD:
                    return
            else:
                self._client_message(stream, msg, events)
        if end_stream:
            if not stream.decoder.at_boundary:
                raise _StreamFailure("stream ended inside a message")
            if self.role is Role.SERVER:
                self._request_step(stream, _FIN, local=False)
                if stream.end_sha256:
                    events.append(UploadEnded(stream_id=sid, sha256=stream.end_sha256))
            else:
                self._response_step(stream, _FIN, local=False)
            self._maybe_forget(stream)

    def _server_message(self, stream: _OpStream, msg: Message, events: list[Event]) -> None:
        if msg.TYPE not in _REQUEST_TYPES:
            raise _StreamFailure(f"{msg.TYPE.name} is not a request message")
        self._request_step(stream, msg.TYPE, local=False)
        if msg.TYPE in _RESPONSE_FOR:  # a request fixes what its response may look like
            stream.response = _RESPONSE_FOR[msg.TYPE]
        sid = stream.stream_id
        match msg:
            case Put():
                stream.body_expected = msg.size
                events.append(PutRequested(stream_id=sid, name=msg.name, size=msg.size))
            case Get():
                events.append(GetRequested(stream_id=sid, name=msg.name, chunk_size=msg.chunk_size))
            case GetFrom():
                stream.resume_offset = msg.offset
                events.append(
                    GetFromRequested(
                        stream_id=sid,
                        name=msg.name,
                        chunk_size=msg.chunk_size,
                        offset=msg.offset,
                        sha256=msg.sha256,
                    )
                )
            case List():
                events.append(ListRequested(stream_id=sid, path=msg.path, recursive=msg.recursive))
            case Stat():
                events.append(StatRequested(stream_id=sid, path=msg.path))
            case PutRange():
                stream.body_expected = msg.length
                events.append(
                    PutRangeRequested(
                        stream_id=sid,
                        name=msg.name,
                        total_size=msg.total_size,
                        offset=msg.offset,
                        length=msg.length,
                        upload_id=msg.upload_id,
                        checked=not isinstance(msg, PutBlock),
                    )
                )
            case Commit():
                events.append(
                    CommitRequested(
                        stream_id=sid,
                        name=msg.name,
                        total_size=msg.total_size,
                        upload_id=msg.upload_id,
                        sha256=msg.sha256,
                    )
                )
            case Abort():
                events.append(AbortRequested(stream_id=sid, name=msg.name, upload_id=msg.upload_id))
            case Probe():
                events.append(ProbeRequested(stream_id=sid, name=msg.name, upload_id=msg.upload_id))
            case Data():
                self._count_body(stream, len(msg.data))
                if msg.data:
                    events.append(DataReceived(stream_id=sid, data=msg.data))
            case End():
                if stream.body_seen != stream.body_expected:
                    raise _StreamFailure(
                        f"upload ended after {stream.body_seen} of {stream.body_expected} bytes"
                    )
                stream.end_sha256 = msg.sha256

    def _client_message(self, stream: _OpStream, msg: Message, events: list[Event]) -> None:
        if msg.TYPE not in _RESPONSE_TYPES:
            raise _StreamFailure(f"{msg.TYPE.name} is not a response message")
        before = stream.response
        self._response_step(stream, msg.TYPE, local=False)
        sid = stream.stream_id
        match msg:
            case FileInfo():
                stream.body_expected = msg.size
                stream.body_seen = 0
                events.append(FileStarted(stream_id=sid, size=msg.size, mtime_ns=msg.mtime_ns))
            case FileFrom():
                if msg.offset not in (0, stream.resume_offset):
                    raise _StreamFailure(
                        f"FILE_FROM starts at {msg.offset}, asked for {stream.resume_offset} or 0"
                    )
                stream.body_expected = msg.size - msg.offset
                stream.body_seen = 0
                events.append(
                    FileStarted(
                        stream_id=sid, size=msg.size, mtime_ns=msg.mtime_ns, offset=msg.offset
                    )
                )
            case Data():
                self._count_body(stream, len(msg.data))
                if msg.data:
                    events.append(DataReceived(stream_id=sid, data=msg.data))
            case EntryInfo():
                events.append(
                    EntryReceived(
                        stream_id=sid,
                        name=msg.name,
                        kind=msg.kind,
                        size=msg.size,
                        mtime_ns=msg.mtime_ns,
                    )
                )
            case Done():
                if before is _RS.GET_BODY and stream.body_seen != stream.body_expected:
                    raise _StreamFailure(
                        f"download ended after {stream.body_seen} of {stream.body_expected} bytes"
                    )
                events.append(
                    OperationDone(
                        stream_id=sid,
                        size=msg.size,
                        sha256=msg.sha256,
                        server_cpu_us=msg.server_cpu_us,
                    )
                )
                if stream.request is not _RQ.CLOSED:
                    stream.request = _RQ.DISCARD
            case Error():
                events.append(OperationFailed(stream_id=sid, code=msg.code, message=msg.message))
                if stream.request is not _RQ.CLOSED:
                    stream.request = _RQ.DISCARD

    # --- transitions ------------------------------------------------------------------------

    def _control_step(self, sender: Role, kind: MessageType | str, *, local: bool) -> ControlState:
        new = _CONTROL.get((self.control_state, sender, kind))
        if new is None:
            what = kind.name if isinstance(kind, MessageType) else kind
            text = f"{what} from the {sender.value} in control state {self.control_state.value}"
            raise LocalProtocolError(text) if local else RemoteProtocolError(text)
        return new

    def _request_step(self, stream: _OpStream, kind: MessageType | str, *, local: bool) -> None:
        new = _REQUEST.get((stream.request, kind))
        if new is None:
            what = kind.name if isinstance(kind, MessageType) else kind
            text = f"stream {stream.stream_id}: {what} in request state {stream.request.value}"
            if local:
                raise LocalProtocolError(text)
            raise _StreamFailure(text)
        stream.request = new

    def _response_step(self, stream: _OpStream, kind: MessageType | str, *, local: bool) -> None:
        new = _RESPONSE.get((stream.response, kind))
        if new is None:
            what = kind.name if isinstance(kind, MessageType) else kind
            text = f"stream {stream.stream_id}: {what} in response state {stream.response.value}"
            if local:
                raise LocalProtocolError(text)
            raise _StreamFailure(text)
        stream.response = new

    def _count_body(self, stream: _OpStream, count: int) -> None:
        stream.body_seen += count
        if stream.body_seen > stream.body_expected:
            raise _StreamFailure(f"more than the announced {stream.body_expected} bytes")

    def _fail_stream(self, stream: _OpStream, message: str) -> ProtocolViolation:
        logger.debug("stream %d: protocol violation: %s", stream.stream_id, message)
        if self.role is Role.SERVER:
            self.send_error(stream.stream_id, ErrorCode.BAD_REQUEST, message)
            stream.request = _RQ.DISCARD  # kept until the client's FIN or reset
        else:
            self._streams.pop(stream.stream_id, None)
        return ProtocolViolation(stream_id=stream.stream_id, message=message)

    # --- stream bookkeeping -----------------------------------------------------------------

    def _new_local_stream(self, stream_id: int) -> _OpStream:
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client starts operations")
        if stream_id == CONTROL_STREAM_ID or not _is_client_bidi(stream_id):
            raise LocalProtocolError(f"stream {stream_id} cannot carry an operation")
        if not self.session_open:
            raise LocalProtocolError("the session is not open")
        if stream_id in self._streams:
            raise LocalProtocolError(f"stream {stream_id} already carries an operation")
        stream = self._streams[stream_id] = _OpStream(stream_id, Decoder())
        return stream

    def _require_role(self, role: Role, action: str) -> None:
        # The request and response tables do not name the sender, so this check keeps each
        # side to its own half of an operation stream.
        if self.role is not role:
            raise LocalProtocolError(f"only the {role.value} may {action}")

    def _local_stream(self, stream_id: int) -> _OpStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} carries no operation")
        return stream

    def _maybe_forget(self, stream: _OpStream) -> None:
        # A server keeps a discarding stream until the client's FIN or reset, so that late
        # bytes are recognised as late rather than taken for a new operation.
        if stream.response is not _RS.CLOSED:
            return
        if stream.request is _RQ.CLOSED or (
            stream.request is _RQ.DISCARD and self.role is Role.CLIENT
        ):
            self._streams.pop(stream.stream_id, None)
