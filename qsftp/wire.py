"""The qsftp/1 wire codec: pure encode/decode, no I/O.

Every message on a stream is a frame::

    type (1 byte) | length (QUIC variable-length integer) | payload (length bytes)

Payload fields are QUIC varints, byte strings (varint length + bytes) and UTF-8 text (a byte
string that must decode). docs/PROTOCOL.md lists every message and its fields.

:class:`Decoder` is incremental: feed it bytes as they arrive, in pieces of any size, and pull
messages out. DATA payloads are streamed: the decoder hands out the bytes of a DATA frame as
they arrive (several :class:`Data` messages may come from one frame) so that no frame is ever
buffered whole. On any input the decoder raises only :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from .errors import RemoteProtocolError

__all__ = [
    "ALPN",
    "UPLOAD_ID_LEN",
    "Abort",
    "Commit",
    "Probe",
    "PutBlock",
    "PutRange",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_PAYLOAD",
    "PROTOCOL_VERSION",
    "ConnAck",
    "ConnRequest",
    "ConnTerminate",
    "Data",
    "Decoder",
    "Done",
    "End",
    "EntryInfo",
    "Error",
    "FileInfo",
    "FileFrom",
    "Get",
    "GetFrom",
    "List",
    "Message",
    "MessageType",
    "Put",
    "Stat",
    "encode",
    "encode_data_header",
]

ALPN = "qsftp/1"
PROTOCOL_VERSION = 1

# A control message holds at most a path (4 KiB), a token and a few integers; 64 KiB leaves room
# for tokens and a long error message while bounding what a hostile peer can make us buffer.
MAX_CONTROL_PAYLOAD = 64 * 1024
# DATA payloads are streamed, never buffered whole, so this only guards against nonsense lengths.
# 16 MiB is far above any useful chunk size (aioquic datagrams carry at most ~16 KiB).
MAX_DATA_PAYLOAD = 16 * 1024 * 1024
_VARINT_MAX = (1 << 62) - 1
# Striped uploads are named by 16 random bytes: collisions between clients are out of reach.
UPLOAD_ID_LEN = 16
_SHA256_LEN = 32


class MessageType(enum.IntEnum):
    CONN_REQUEST = 0x01
    CONN_ACK = 0x02
    ERROR = 0x03
    CONN_TERMINATE = 0x04
    PUT = 0x10
    GET = 0x11
    LIST = 0x12
    STAT = 0x13
    PUT_RANGE = 0x14
    COMMIT = 0x15
    ABORT = 0x16
    PROBE = 0x17
    GET_FROM = 0x18
    PUT_BLOCK = 0x19
    DATA = 0x20
    END = 0x21
    FILE = 0x30
    ENTRY = 0x31
    DONE = 0x32
    FILE_FROM = 0x33


class EntryKind(enum.IntEnum):
    FILE = 1
    DIR = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base class of every qsftp/1 message."""

    TYPE: ClassVar[MessageType]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnRequest(Message):
    """Client → server, first message on the control stream."""

    TYPE = MessageType.CONN_REQUEST
    version: int
    "Protocol version the client speaks."
    token: str = ""
    "Authentication token; empty for none."
    client: str = ""
    "Free-form client software name."

    def __repr__(self) -> str:  # never show the token
        return f"ConnRequest(version={self.version}, token={'***' if self.token else ''!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnAck(Message):
    """Server → client: the session is open."""

    TYPE = MessageType.CONN_ACK
    version: int
    "Protocol version the server speaks."
    server: str = ""
    "Free-form server software name."


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """Server → client: the session or operation failed."""

    TYPE = MessageType.ERROR
    code: int
    "Stable error code (qsftp.errors.ErrorCode)."
    message: str = ""
    "Human-readable explanation."


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnTerminate(Message):
    """Either side: end the session gracefully."""

    TYPE = MessageType.CONN_TERMINATE


@dataclass(frozen=True, slots=True, kw_only=True)
class Put(Message):
    """Client → server: upload; DATA frames and END follow."""

    TYPE = MessageType.PUT
    name: str
    "Remote name, a relative path."
    size: int
    "Exact number of bytes that follow."


@dataclass(frozen=True, slots=True, kw_only=True)
class Get(Message):
    """Client → server: download a file."""

    TYPE = MessageType.GET
    name: str
    "Remote name, a relative path."
    chunk_size: int = 0
    "Largest DATA payload the client wants; 0 lets the server choose."


@dataclass(frozen=True, slots=True, kw_only=True)
class List(Message):
    """Client → server: list a directory."""

    TYPE = MessageType.LIST
    path: str
    "Directory, relative to the root; empty for the root."
    recursive: bool = False
    "List the whole subtree."


@dataclass(frozen=True, slots=True, kw_only=True)
class Stat(Message):
    """Client → server: describe one entry."""

    TYPE = MessageType.STAT
    path: str
    "Entry, relative to the root; empty for the root."


@dataclass(frozen=True, slots=True, kw_only=True)
class PutRange(Message):
    """Client → server: one byte range of a striped upload; DATA frames and END follow.

    Ranges with the same ``upload_id`` are written in place into one hidden partial file next
    to ``name``; COMMIT verifies the whole file and gives it its name.
    """

    TYPE = MessageType.PUT_RANGE
    name: str
    "Final remote name."
    total_size: int
    "Size of the whole file."
    offset: int
    "Where this range starts."
    length: int
    "Bytes in this range (the DATA that follows)."
    upload_id: bytes
    "16 random bytes naming the upload."


@dataclass(frozen=True, slots=True, kw_only=True)
class PutBlock(PutRange):
    """Client → server: a PUT_RANGE whose bytes are not hashed on their own.

    The same fields and body; END carries 32 zero bytes and DONE no digest. The COMMIT's
    whole-file SHA-256 is the only check, so neither side spends a hash pass per block.
    """

    TYPE = MessageType.PUT_BLOCK


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit(Message):
    """Client → server: every range of a striped upload is stored; verify and rename."""

    TYPE = MessageType.COMMIT
    name: str
    "Final remote name."
    total_size: int
    "Size of the whole file."
    upload_id: bytes
    "The upload's id."
    sha256: bytes
    "SHA-256 of the whole file (32 bytes)."


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort(Message):
    """Client → server: forget a striped upload's partial file."""

    TYPE = MessageType.ABORT
    name: str
    "Final remote name."
    upload_id: bytes
    "The upload's id."


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe(Message):
    """Client → server: how much of upload ``upload_id`` do you hold? (to resume it)"""

    TYPE = MessageType.PROBE
    name: str
    "Final remote name."
    upload_id: bytes
    "The upload's id."


@dataclass(frozen=True, slots=True, kw_only=True)
class GetFrom(Message):
    """Client → server: the rest of a file from ``offset``, if the server's first ``offset``
    bytes are the ones the client holds (their SHA-256); else the whole file."""

    TYPE = MessageType.GET_FROM
    name: str
    "Remote name, a relative path."
    chunk_size: int
    "Largest DATA payload the client wants; 0 lets the server choose."
    offset: int
    "Bytes the client already holds (the length of its partial file)."
    sha256: bytes
    "SHA-256 of those ``offset`` bytes (32 bytes)."


@dataclass(frozen=True, slots=True, kw_only=True)
class Data(Message):
    """Either direction: file bytes."""

    TYPE = MessageType.DATA
    data: bytes
    "The bytes."

    def __repr__(self) -> str:
        head = self.data[:20]
        more = "..." if len(self.data) > 20 else ""
        return f"Data(len={len(self.data)}, data={head!r}{more})"


@dataclass(frozen=True, slots=True, kw_only=True)
class End(Message):
    """Client → server: the upload's bytes are all sent; their SHA-256."""

    TYPE = MessageType.END
    sha256: bytes
    "SHA-256 of the bytes the client sent (32 bytes)."


@dataclass(frozen=True, slots=True, kw_only=True)
class FileInfo(Message):
    """Server → client: a download starts; DATA frames and DONE follow."""

    TYPE = MessageType.FILE
    size: int
    "Exact number of bytes that follow."
    mtime_ns: int
    "Modification time on the server, nanoseconds since the epoch."


@dataclass(frozen=True, slots=True, kw_only=True)
class FileFrom(Message):
    """Server → client: a resumed download starts at ``offset``; DATA frames and DONE follow."""

    TYPE = MessageType.FILE_FROM
    size: int
    "Size of the whole file."
    mtime_ns: int
    "Modification time on the server, nanoseconds since the epoch."
    offset: int
    "Where the DATA starts: GET_FROM's offset when the prefix matched, else 0."


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryInfo(Message):
    """Server → client: one directory entry (LIST, STAT)."""

    TYPE = MessageType.ENTRY
    name: str
    "Path relative to the root."
    kind: EntryKind
    "File or directory."
    size: int
    "Size in bytes (0 for directories)."
    mtime_ns: int
    "Modification time, nanoseconds since the epoch."


@dataclass(frozen=True, slots=True, kw_only=True)
class Done(Message):
    """Server → client: the operation succeeded."""

    TYPE = MessageType.DONE
    size: int
    "Bytes stored or sent (PUT, GET), or entries listed (LIST, STAT)."
    sha256: bytes = b""
    "SHA-256 of the bytes as stored on the server (PUT, GET); empty otherwise."
    server_cpu_us: int = 0
    "CPU time the server process used during the operation, microseconds."


# --- primitive encoders -----------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0 or value > _VARINT_MAX:
        raise ValueError(f"varint out of range: {value}")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x40000000:
        return (value | 0x80000000).to_bytes(4, "big")
    return (value | 0xC000000000000000).to_bytes(8, "big")


def _blob(value: bytes) -> bytes:
    return _varint(len(value)) + value


def _text(value: str) -> bytes:
    return _blob(value.encode("utf-8"))


def _payload(msg: Message) -> bytes:
    match msg:
        case ConnRequest():
            return _varint(msg.version) + _text(msg.token) + _text(msg.client)
        case ConnAck():
            return _varint(msg.version) + _text(msg.server)
        case Error():
            return _varint(msg.code) + _text(msg.message)
        case ConnTerminate():
            return b""
        case Put():
            return _text(msg.name) + _varint(msg.size)
        case Get():
            return _text(msg.name) + _varint(msg.chunk_size)
        case GetFrom():
            return (
                _text(msg.name) + _varint(msg.chunk_size) + _varint(msg.offset) + _blob(msg.sha256)
            )
        case List():
            return _text(msg.path) + _varint(int(msg.recursive))
        case Stat():
            return _text(msg.path)
        case PutRange():
            return (
                _text(msg.name)
                + _varint(msg.total_size)
                + _varint(msg.offset)
                + _varint(msg.length)
                + _blob(msg.upload_id)
            )
        case Commit():
            return (
                _text(msg.name) + _varint(msg.total_size) + _blob(msg.upload_id) + _blob(msg.sha256)
            )
        case Abort() | Probe():
            return _text(msg.name) + _blob(msg.upload_id)
        case Data():
            return msg.data
        case End():
            return msg.sha256
        case FileInfo():
            return _varint(msg.size) + _varint(msg.mtime_ns)
        case FileFrom():
            return _varint(msg.size) + _varint(msg.mtime_ns) + _varint(msg.offset)
        case EntryInfo():
            return _text(msg.name) + _varint(msg.kind) + _varint(msg.size) + _varint(msg.mtime_ns)
        case Done():
            return _varint(msg.size) + _blob(msg.sha256) + _varint(msg.server_cpu_us)
    raise TypeError(f"not a qsftp message: {msg!r}")


def encode(msg: Message) -> bytes:
    """Encode one message as a frame. For large DATA, prefer :func:`encode_data_header`."""
    payload = _payload(msg)
    limit = MAX_DATA_PAYLOAD if msg.TYPE == MessageType.DATA else MAX_CONTROL_PAYLOAD
    if len(payload) > limit:
        raise ValueError(f"{msg.TYPE.name} payload of {len(payload)} bytes exceeds {limit}")
    return bytes((msg.TYPE,)) + _varint(len(payload)) + payload


def encode_data_header(length: int) -> bytes:
    """The frame header of a DATA frame whose ``length`` payload bytes are written separately."""
    if length > MAX_DATA_PAYLOAD:
        raise ValueError(f"DATA payload of {length} bytes exceeds {MAX_DATA_PAYLOAD}")
    return bytes((MessageType.DATA,)) + _varint(length)


# --- decoding ---------------------------------------------------------------------------------


class _Reader:
    """Reads fields from one complete control payload; any shortfall is a protocol error."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def varint(self) -> int:
        value, self._pos = _parse_varint(self._data, self._pos)
        if value is None:
            raise RemoteProtocolError("truncated integer in message")
        return value

    def blob(self, limit: int = MAX_CONTROL_PAYLOAD) -> bytes:
        length = self.varint()
        if length > limit or self._pos + length > len(self._data):
            raise RemoteProtocolError("string length exceeds message")
        value = self._data[self._pos : self._pos + length]
        self._pos += length
        return value

    def text(self) -> str:
        raw = self.blob()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("text field is not valid UTF-8") from None

    def flag(self) -> bool:
        value = self.varint()
        if value > 1:
            raise RemoteProtocolError(f"boolean field holds {value}")
        return bool(value)

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError("trailing bytes in message")


def _parse_varint(data: bytes | bytearray, pos: int) -> tuple[int | None, int]:
    """Parse a varint at ``pos``; (None, pos) when ``data`` ends first."""
    if pos >= len(data):
        return None, pos
    first = data[pos]
    length = 1 << (first >> 6)
    if pos + length > len(data):
        return None, pos
    value = first & 0x3F
    for i in range(1, length):
        value = (value << 8) | data[pos + i]
    return value, pos + length


def _upload_id(r: _Reader) -> bytes:
    value = r.blob(limit=UPLOAD_ID_LEN)
    if len(value) != UPLOAD_ID_LEN:
        raise RemoteProtocolError(f"upload id must be {UPLOAD_ID_LEN} bytes")
    return value


def _decode_control(kind: MessageType, payload: bytes) -> Message:
    r = _Reader(payload)
    msg: Message
    match kind:
        case MessageType.CONN_REQUEST:
            msg = ConnRequest(version=r.varint(), token=r.text(), client=r.text())
        case MessageType.CONN_ACK:
            msg = ConnAck(version=r.varint(), server=r.text())
        case MessageType.ERROR:
            msg = Error(code=r.varint(), message=r.text())
        case MessageType.CONN_TERMINATE:
            msg = ConnTerminate()
        case MessageType.PUT:
            msg = Put(name=r.text(), size=r.varint())
        case MessageType.GET:
            msg = Get(name=r.text(), chunk_size=r.varint())
        case MessageType.LIST:
            msg = List(path=r.text(), recursive=r.flag())
        case MessageType.STAT:
            msg = Stat(path=r.text())
        case MessageType.PUT_RANGE | MessageType.PUT_BLOCK:
            name, total, offset, length = r.text(), r.varint(), r.varint(), r.varint()
            upload_id = _upload_id(r)
            if offset + length > total:
                raise RemoteProtocolError("range ends beyond the file")
            cls = PutRange if kind == MessageType.PUT_RANGE else PutBlock
            msg = cls(
                name=name, total_size=total, offset=offset, length=length, upload_id=upload_id
            )
        case MessageType.COMMIT:
            name, total, upload_id = r.text(), r.varint(), _upload_id(r)
            digest = r.blob(limit=_SHA256_LEN)
            if len(digest) != _SHA256_LEN:
                raise RemoteProtocolError("COMMIT must carry a 32-byte SHA-256")
            msg = Commit(name=name, total_size=total, upload_id=upload_id, sha256=digest)
        case MessageType.ABORT:
            msg = Abort(name=r.text(), upload_id=_upload_id(r))
        case MessageType.PROBE:
            msg = Probe(name=r.text(), upload_id=_upload_id(r))
        case MessageType.GET_FROM:
            name, chunk_size, offset = r.text(), r.varint(), r.varint()
            digest = r.blob(limit=_SHA256_LEN)
            if len(digest) != _SHA256_LEN:
                raise RemoteProtocolError("GET_FROM must carry a 32-byte SHA-256")
            msg = GetFrom(name=name, chunk_size=chunk_size, offset=offset, sha256=digest)
        case MessageType.END:
            if len(payload) != _SHA256_LEN:
                raise RemoteProtocolError("END must carry a 32-byte SHA-256")
            return End(sha256=payload)
        case MessageType.FILE:
            msg = FileInfo(size=r.varint(), mtime_ns=r.varint())
        case MessageType.FILE_FROM:
            size, mtime_ns, offset = r.varint(), r.varint(), r.varint()
            if offset > size:
                raise RemoteProtocolError("FILE_FROM starts beyond the end of the file")
            msg = FileFrom(size=size, mtime_ns=mtime_ns, offset=offset)
        case MessageType.ENTRY:
            name = r.text()
            raw_kind = r.varint()
            if raw_kind not in EntryKind._value2member_map_:
                raise RemoteProtocolError(f"unknown entry kind {raw_kind}")
            kind_ = EntryKind(raw_kind)
            msg = EntryInfo(name=name, kind=kind_, size=r.varint(), mtime_ns=r.varint())
        case MessageType.DONE:
            size = r.varint()
            digest = r.blob(limit=_SHA256_LEN)
            if len(digest) not in (0, _SHA256_LEN):
                raise RemoteProtocolError("DONE carries a SHA-256 of the wrong length")
            msg = Done(size=size, sha256=digest, server_cpu_us=r.varint())
        case _:  # pragma: no cover - DATA never reaches here
            raise RemoteProtocolError(f"unexpected message type {kind!r}")
    r.finish()
    return msg


class Decoder:
    """Incremental frame decoder for one stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data_left = 0  # bytes still to come of the DATA frame being streamed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into messages."""
        return len(self._buffer)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (the stream may end here)."""
        return not self._buffer and not self._data_left

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        buf = self._buffer
        if self._data_left:
            if not buf:
                return None
            take = min(self._data_left, len(buf))
            chunk = bytes(buf[:take])
            del buf[:take]
            self._data_left -= take
            return Data(data=chunk)
        if not buf:
            return None
        raw_type = buf[0]
        if raw_type not in MessageType._value2member_map_:
            raise RemoteProtocolError(f"unknown message type 0x{raw_type:02x}")
        kind = MessageType(raw_type)
        length, pos = _parse_varint(buf, 1)
        if length is None:
            return None
        if kind == MessageType.DATA:
            if length > MAX_DATA_PAYLOAD:
                raise RemoteProtocolError(f"DATA frame of {length} bytes exceeds the limit")
            del buf[:pos]
            self._data_left = length
            if length == 0:
                return Data(data=b"")
            return self.next_message()
        if length > MAX_CONTROL_PAYLOAD:
            raise RemoteProtocolError(f"{kind.name} message of {length} bytes exceeds the limit")
        if pos + length > len(buf):
            return None
        payload = bytes(buf[pos : pos + length])
        del buf[: pos + length]
        return _decode_control(kind, payload)
