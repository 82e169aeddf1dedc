"""The qsftp/1 state machines (qsftp.protocol), without sockets.

A client and a server :class:`QsftpConnection` are wired by :func:`transfer`, which moves one
side's queued writes into the other's ``receive``, whole or split into single bytes (aioquic
``tests/test_connection.py`` ``client_and_server``, ``tests/test_h3.py`` ``FakeQuicConnection``).
The table tests check every (state, input) pair of ``_REQUEST`` and ``_RESPONSE`` through real
messages, in the spirit of h2 ``tests/test_state_machines.py``: the tables are the only source
of allowed transitions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsftp.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from qsftp.protocol import (
    _REQUEST,
    _RESPONSE,
    CONTROL_STREAM_ID,
    ControlState,
    DataReceived,
    EntryReceived,
    Event,
    FileStarted,
    GetFromRequested,
    GetRequested,
    ListRequested,
    OperationDone,
    OperationFailed,
    ProtocolViolation,
    PutRequested,
    QsftpConnection,
    RequestState,
    ResponseState,
    Role,
    SessionAccepted,
    SessionRejected,
    SessionRequested,
    StatRequested,
    StreamAborted,
    TerminateReceived,
    UploadEnded,
)
from qsftp.wire import (
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
)

FIN = "FIN"
INPUTS: list[MessageType | str] = [*MessageType, FIN]


def input_id(kind: MessageType | str) -> str:
    return kind.name if isinstance(kind, MessageType) else kind


DIGEST = bytes(range(32))


# --- the in-memory link ---------------------------------------------------------------------


def transfer(sender: QsftpConnection, receiver: QsftpConnection, *, bytewise: bool) -> list[Event]:
    """Deliver ``sender``'s queued writes to ``receiver``; optionally one byte per call."""
    events: list[Event] = []
    for stream_id, data, end in sender.data_to_send():
        pieces = [data[i : i + 1] for i in range(len(data))] if bytewise and data else [data]
        for i, piece in enumerate(pieces):
            events += receiver.receive(stream_id, piece, end and i == len(pieces) - 1)
    return events


@dataclass
class Link:
    client: QsftpConnection
    server: QsftpConnection
    bytewise: bool = False

    def to_server(self) -> list[Event]:
        return transfer(self.client, self.server, bytewise=self.bytewise)

    def to_client(self) -> list[Event]:
        return transfer(self.server, self.client, bytewise=self.bytewise)


def open_session(*, bytewise: bool = False) -> Link:
    link = Link(QsftpConnection(Role.CLIENT), QsftpConnection(Role.SERVER), bytewise)
    link.client.request_session(token="tok")
    link.to_server()
    link.server.accept_session()
    link.to_client()
    assert link.client.session_open and link.server.session_open
    return link


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def link(request: pytest.FixtureRequest) -> Link:
    return open_session(bytewise=request.param)


def received(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


def without_data(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, DataReceived)]


def decode_all(data: bytes) -> list[Message]:
    decoder = Decoder()
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def error_reply(conn: QsftpConnection, stream_id: int) -> Error:
    """The one write ``conn`` queued: an ERROR with FIN on ``stream_id``."""
    [(sid, data, end)] = conn.data_to_send()
    assert (sid, end) == (stream_id, True)
    [msg] = decode_all(data)
    assert isinstance(msg, Error)
    return msg


def upload(link: Link, stream_id: int, payload: bytes) -> None:
    """A complete PUT that must succeed."""
    link.client.send_put(stream_id, "up.bin", len(payload))
    link.client.send_data(stream_id, payload)
    link.client.send_end(stream_id, hashlib.sha256(payload).digest())
    events = link.to_server()
    assert received(events) == payload
    assert isinstance(events[-1], UploadEnded)
    link.server.send_done(stream_id, size=len(payload))
    assert without_data(link.to_client()) == [
        OperationDone(stream_id=stream_id, size=len(payload), sha256=b"", server_cpu_us=0)
    ]


# --- session ---------------------------------------------------------------------------------


def test_session_request_shows_the_token_to_the_server_and_ack_opens_both_sides() -> None:
    link = Link(QsftpConnection(Role.CLIENT), QsftpConnection(Role.SERVER))
    link.client.request_session(token="s3cret", client="cli/1")
    assert link.to_server() == [SessionRequested(version=1, token="s3cret", client="cli/1")]
    assert not link.server.session_open
    link.server.accept_session(server="srv/1")
    assert link.to_client() == [SessionAccepted(version=1, server="srv/1")]
    assert link.client.session_open and link.server.session_open


def test_session_requested_repr_hides_the_token() -> None:
    assert "s3cret" not in repr(SessionRequested(version=1, token="s3cret", client="c"))


def test_reject_session_reports_the_code_and_closes_the_control_stream() -> None:
    link = Link(QsftpConnection(Role.CLIENT), QsftpConnection(Role.SERVER))
    link.client.request_session(token="wrong")
    link.to_server()
    link.server.reject_session(ErrorCode.AUTH_FAILED, "bad token")
    [(stream_id, data, end)] = link.server.data_to_send()
    assert (stream_id, end) == (CONTROL_STREAM_ID, True)
    events = link.client.receive(stream_id, data, end)
    assert events == [SessionRejected(code=ErrorCode.AUTH_FAILED, message="bad token")]
    assert link.client.control_state is ControlState.CLOSED
    assert not link.client.session_open and not link.server.session_open


@pytest.mark.parametrize("first", [Role.CLIENT, Role.SERVER])
def test_terminate_is_answered_and_closes_both_sides(first: Role) -> None:
    link = open_session()
    a, b = (link.client, link.server) if first is Role.CLIENT else (link.server, link.client)
    a.terminate()
    assert transfer(a, b, bytewise=False) == [TerminateReceived()]
    closing = ControlState.CLIENT_CLOSING if first is Role.CLIENT else ControlState.SERVER_CLOSING
    assert a.control_state is closing and b.control_state is closing
    assert not a.session_open
    b.terminate()
    assert transfer(b, a, bytewise=False) == [TerminateReceived()]
    assert a.control_state is ControlState.CLOSED and b.control_state is ControlState.CLOSED


def test_client_cannot_start_an_operation_before_the_session_opens() -> None:
    client = QsftpConnection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send_put(4, "f", 1)
    client.request_session()
    client.data_to_send()
    with pytest.raises(LocalProtocolError):
        client.send_get(4, "f")
    assert client.data_to_send() == []


@pytest.mark.parametrize("fin_with_request", [False, True])
def test_server_without_session_answers_auth_failed_and_ignores_the_rest(
    fin_with_request: bool,
) -> None:
    server = QsftpConnection(Role.SERVER)
    put = encode(Put(name="f", size=3)) + encode(Data(data=b"abc"))
    assert server.receive(4, put, fin_with_request) == []
    assert error_reply(server, 4).code == ErrorCode.AUTH_FAILED == 2
    if not fin_with_request:
        assert server.receive(4, encode(End(sha256=DIGEST)), False) == []
        assert server.receive(4, b"", True) == []
        assert server.data_to_send() == []
    assert server.open_streams == 0


# --- happy paths -------------------------------------------------------------------------------


def test_put_delivers_the_bytes_and_digest_and_done_reaches_the_client(link: Link) -> None:
    payload = bytes(range(256)) * 5
    digest = hashlib.sha256(payload).digest()
    link.client.send_put(4, "dir/ünï.bin", len(payload))
    for start in range(0, len(payload), 500):
        link.client.send_data(4, memoryview(payload)[start : start + 500])
    link.client.send_end(4, digest)
    events = link.to_server()
    assert received(events) == payload
    assert without_data(events) == [
        PutRequested(stream_id=4, name="dir/ünï.bin", size=len(payload)),
        UploadEnded(stream_id=4, sha256=digest),
    ]
    link.server.send_done(4, size=len(payload), sha256=digest, server_cpu_us=42)
    assert link.to_client() == [
        OperationDone(stream_id=4, size=len(payload), sha256=digest, server_cpu_us=42)
    ]
    assert link.client.open_streams == 0 and link.server.open_streams == 0


def test_empty_put_needs_no_data(link: Link) -> None:
    upload(link, 4, b"")


def test_get_passes_chunk_size_and_delivers_the_file(link: Link) -> None:
    content = b"0123456789" * 250
    link.client.send_get(4, "big.bin", chunk_size=1000)
    [request] = link.to_server()
    assert request == GetRequested(stream_id=4, name="big.bin", chunk_size=1000)
    link.server.send_file_info(4, size=len(content), mtime_ns=123)
    for start in range(0, len(content), request.chunk_size):
        link.server.send_data(4, content[start : start + request.chunk_size])
    link.server.send_done(4, size=len(content), sha256=DIGEST, server_cpu_us=5)
    events = link.to_client()
    assert received(events) == content
    assert without_data(events) == [
        FileStarted(stream_id=4, size=len(content), mtime_ns=123),
        OperationDone(stream_id=4, size=len(content), sha256=DIGEST, server_cpu_us=5),
    ]
    assert link.client.open_streams == 0 and link.server.open_streams == 0


@pytest.mark.parametrize("matched", [True, False], ids=["prefix-matched", "started-over"])
def test_get_from_delivers_the_rest_or_the_whole_file(link: Link, matched: bool) -> None:
    content = b"0123456789" * 250
    link.client.send_get_from(4, "big.bin", chunk_size=1000, offset=700, sha256=DIGEST)
    [request] = link.to_server()
    assert request == GetFromRequested(
        stream_id=4, name="big.bin", chunk_size=1000, offset=700, sha256=DIGEST
    )
    offset = 700 if matched else 0
    link.server.send_file_from(4, size=len(content), mtime_ns=123, offset=offset)
    link.server.send_data(4, content[offset:])
    link.server.send_done(4, size=len(content), sha256=DIGEST, server_cpu_us=5)
    events = link.to_client()
    assert received(events) == content[offset:]
    assert without_data(events) == [
        FileStarted(stream_id=4, size=len(content), mtime_ns=123, offset=offset),
        OperationDone(stream_id=4, size=len(content), sha256=DIGEST, server_cpu_us=5),
    ]
    assert link.client.open_streams == 0 and link.server.open_streams == 0


def test_file_from_may_start_only_where_asked_or_at_zero(link: Link) -> None:
    link.client.send_get_from(4, "f", offset=10, sha256=DIGEST)
    link.to_server()
    with pytest.raises(LocalProtocolError):
        link.server.send_file_from(4, size=100, mtime_ns=0, offset=5)
    assert link.server.data_to_send() == []
    # A server that does it anyway breaks the stream on the client.
    events = link.client.receive(4, encode(FileFrom(size=100, mtime_ns=0, offset=5)), False)
    assert isinstance(events[-1], ProtocolViolation)
    assert link.client.open_streams == 0


def test_a_resumed_body_must_be_exactly_the_rest_of_the_file(link: Link) -> None:
    link.client.send_get_from(4, "f", offset=10, sha256=DIGEST)
    link.to_server()
    link.server.send_file_from(4, size=15, mtime_ns=0, offset=10)
    with pytest.raises(LocalProtocolError):
        link.server.send_data(4, b"x" * 6)
    link.server.send_data(4, b"x" * 4)
    with pytest.raises(LocalProtocolError):
        link.server.send_done(4, size=15)


def test_list_delivers_every_entry_then_done(link: Link) -> None:
    link.client.send_list(4, "docs", recursive=True)
    assert link.to_server() == [ListRequested(stream_id=4, path="docs", recursive=True)]
    entries = [
        ("docs/a.txt", EntryKind.FILE, 10, 1),
        ("docs/sub", EntryKind.DIR, 0, 2),
        ("docs/sub/ß.md", EntryKind.FILE, 2**40, 3),
    ]
    for name, kind, size, mtime in entries:
        link.server.send_entry(4, name=name, kind=kind, size=size, mtime_ns=mtime)
    link.server.send_done(4, size=len(entries))
    assert link.to_client() == [
        *(EntryReceived(stream_id=4, name=n, kind=k, size=s, mtime_ns=m) for n, k, s, m in entries),
        OperationDone(stream_id=4, size=3, sha256=b"", server_cpu_us=0),
    ]
    assert link.client.open_streams == 0 and link.server.open_streams == 0


def test_stat_delivers_one_entry_then_done(link: Link) -> None:
    link.client.send_stat(4, "a.txt")
    assert link.to_server() == [StatRequested(stream_id=4, path="a.txt")]
    link.server.send_entry(4, name="a.txt", kind=EntryKind.FILE, size=7, mtime_ns=9)
    link.server.send_done(4, size=1)
    assert link.to_client() == [
        EntryReceived(stream_id=4, name="a.txt", kind=EntryKind.FILE, size=7, mtime_ns=9),
        OperationDone(stream_id=4, size=1, sha256=b"", server_cpu_us=0),
    ]


def test_operations_on_different_streams_proceed_independently(link: Link) -> None:
    link.client.send_put(4, "up", 4)
    link.client.send_get(8, "down")
    link.client.send_data(4, b"ab")
    events = link.to_server()
    assert GetRequested(stream_id=8, name="down", chunk_size=0) in events
    link.server.send_file_info(8, size=2, mtime_ns=0)
    link.server.send_data(8, b"xy")
    link.server.send_done(8, size=2)
    link.client.send_data(4, b"cd")
    link.client.send_end(4, DIGEST)
    assert received(link.to_client()) == b"xy"
    assert UploadEnded(stream_id=4, sha256=DIGEST) in link.to_server()
    assert link.client.open_streams == 1  # the PUT awaits its DONE


# --- failures --------------------------------------------------------------------------------


def test_server_error_mid_put_fails_the_client_and_late_bytes_are_dropped(link: Link) -> None:
    link.client.send_put(4, "f", 10)
    link.client.send_data(4, b"abcd")
    events = link.to_server()
    assert received(events) == b"abcd"
    link.server.send_error(4, ErrorCode.NO_SPACE, "disk full")
    assert link.to_client() == [
        OperationFailed(stream_id=4, code=ErrorCode.NO_SPACE, message="disk full")
    ]
    with pytest.raises(LocalProtocolError):
        link.client.send_data(4, b"e")
    assert link.client.data_to_send() == []
    # Bytes the client had already sent arrive late: no events, no second ERROR.
    assert link.server.receive(4, encode(Data(data=b"efghij")), False) == []
    assert link.server.receive(4, encode(End(sha256=DIGEST)), False) == []
    assert link.server.data_to_send() == []
    assert link.server.open_streams == 1  # kept until the FIN, so late bytes stay late
    assert link.server.receive(4, b"", True) == []
    assert link.server.open_streams == 0


def test_server_error_is_sent_once(link: Link) -> None:
    link.client.send_get(4, "missing")
    link.to_server()
    link.server.send_error(4, ErrorCode.NOT_FOUND, "no")
    link.server.send_error(4, ErrorCode.INTERNAL, "again")
    assert link.to_client() == [
        OperationFailed(stream_id=4, code=ErrorCode.NOT_FOUND, message="no")
    ]


PUT5 = encode(Put(name="f", size=5))
SERVER_VIOLATIONS: dict[str, tuple[bytes, bool]] = {
    "data-before-put": (encode(Data(data=b"abc")), False),
    "more-bytes-than-declared": (PUT5 + encode(Data(data=b"abcdef")), False),
    "end-with-fewer-bytes": (PUT5 + encode(Data(data=b"ab")) + encode(End(sha256=DIGEST)), False),
    "fin-without-end": (PUT5 + encode(Data(data=b"abcde")), True),
    "fin-inside-a-message": (PUT5[:-1], True),
    "fin-before-any-request": (b"", True),
    "response-type-from-client": (encode(Done(size=0)), False),
    "control-message-on-operation-stream": (encode(ConnRequest(version=1)), False),
    "second-request-on-a-stream": (encode(Get(name="a")) + encode(Get(name="b")), False),
    "unknown-message-type": (b"\x7f\x00", False),
    "malformed-request": (encode(Stat(path="abc"))[:-1] + b"\xff", False),
}


@pytest.mark.parametrize(("data", "fin"), SERVER_VIOLATIONS.values(), ids=SERVER_VIOLATIONS.keys())
def test_operation_stream_violation_is_answered_bad_request_and_spares_other_streams(
    data: bytes, fin: bool
) -> None:
    link = open_session()
    events = link.server.receive(4, data, fin)
    assert isinstance(events[-1], ProtocolViolation)
    assert events[-1].stream_id == 4
    assert sum(isinstance(e, ProtocolViolation) for e in events) == 1
    assert error_reply(link.server, 4).code == ErrorCode.BAD_REQUEST
    assert link.server.session_open
    if not fin:  # whatever else comes on the dead stream is dropped until its FIN
        assert link.server.receive(4, b"more junk", True) == []
        assert link.server.data_to_send() == []
    assert link.server.open_streams == 0
    upload(link, 8, b"still fine")


GET4 = Get(name="f")
CLIENT_VIOLATIONS: dict[str, tuple[Message, bytes, bool]] = {
    "data-before-file": (GET4, encode(Data(data=b"x")), False),
    "more-bytes-than-file-size": (
        GET4,
        encode(FileInfo(size=1, mtime_ns=0)) + encode(Data(data=b"xy")),
        False,
    ),
    "done-before-all-bytes": (
        GET4,
        encode(FileInfo(size=2, mtime_ns=0)) + encode(Data(data=b"x")) + encode(Done(size=2)),
        False,
    ),
    "fin-without-done": (GET4, encode(FileInfo(size=0, mtime_ns=0)), True),
    "request-type-from-server": (GET4, encode(Put(name="x", size=0)), False),
    "entry-for-a-get": (
        GET4,
        encode(EntryInfo(name="x", kind=EntryKind.FILE, size=0, mtime_ns=0)),
        False,
    ),
    "done-for-stat-without-entry": (Stat(path="x"), encode(Done(size=0)), False),
    "unknown-message-type": (GET4, b"\x7f\x00", False),
}


@pytest.mark.parametrize(
    ("request_", "data", "fin"), CLIENT_VIOLATIONS.values(), ids=CLIENT_VIOLATIONS.keys()
)
def test_client_reports_a_server_violation_and_forgets_the_stream(
    request_: Message, data: bytes, fin: bool
) -> None:
    link = open_session()
    if isinstance(request_, Get):
        link.client.send_get(4, request_.name)
    else:
        assert isinstance(request_, Stat)
        link.client.send_stat(4, request_.path)
    link.client.data_to_send()
    events = link.client.receive(4, data, fin)
    assert isinstance(events[-1], ProtocolViolation)
    assert link.client.open_streams == 0
    assert link.client.data_to_send() == []  # a client never answers
    assert link.client.receive(4, b"late", True) == []
    upload(link, 8, b"still fine")


# --- local misuse ----------------------------------------------------------------------------


def _put(size: int) -> Callable[[Link], None]:
    def start(link: Link) -> None:
        link.client.send_put(4, "f", size)

    return start


def _get_with_file(size: int) -> Callable[[Link], None]:
    def start(link: Link) -> None:
        link.client.send_get(4, "f")
        link.to_server()
        link.server.send_file_info(4, size=size, mtime_ns=0)

    return start


def _served(op: Callable[[QsftpConnection], None]) -> Callable[[Link], None]:
    def start(link: Link) -> None:
        op(link.client)
        link.to_server()

    return start


def _list_answered(link: Link) -> None:
    link.client.send_list(4)
    link.to_server()
    link.server.send_done(4, size=0)


MISUSE: dict[str, tuple[Callable[[Link], None], Callable[[Link], None]]] = {
    "send-data-beyond-declared-size": (_put(3), lambda k: k.client.send_data(4, b"abcd")),
    "send-end-early": (_put(3), lambda k: k.client.send_end(4, DIGEST)),
    "two-requests-on-one-stream": (
        lambda k: k.client.send_get(4, "a"),
        lambda k: k.client.send_stat(4, "b"),
    ),
    "client-send-data-on-a-get": (
        lambda k: k.client.send_get(4, "a"),
        lambda k: k.client.send_data(4, b"x"),
    ),
    "send-on-unknown-stream": (lambda k: None, lambda k: k.client.send_data(12, b"x")),
    "operation-on-control-stream": (lambda k: None, lambda k: k.client.send_get(0, "a")),
    "operation-on-server-stream": (lambda k: None, lambda k: k.client.send_get(1, "a")),
    "server-send-put": (lambda k: None, lambda k: k.server.send_put(4, "f", 1)),
    "server-send-end": (
        _served(lambda c: c.send_put(4, "f", 0)),
        lambda k: k.server.send_end(4, DIGEST),
    ),
    "client-send-done": (_put(0), lambda k: k.client.send_done(4, size=0)),
    "client-send-error": (_put(0), lambda k: k.client.send_error(4, 1, "x")),
    "client-send-file-info": (
        lambda k: k.client.send_get(4, "a"),
        lambda k: k.client.send_file_info(4, size=0, mtime_ns=0),
    ),
    "client-send-entry": (
        lambda k: k.client.send_stat(4, "a"),
        lambda k: k.client.send_entry(4, name="a", kind=EntryKind.FILE, size=0, mtime_ns=0),
    ),
    "server-data-before-file": (
        _served(lambda c: c.send_get(4, "a")),
        lambda k: k.server.send_data(4, b"x"),
    ),
    "server-data-beyond-file-size": (_get_with_file(1), lambda k: k.server.send_data(4, b"xy")),
    "send-done-on-get-before-all-bytes": (
        _get_with_file(2),
        lambda k: k.server.send_done(4, size=2),
    ),
    "send-done-on-stat-before-entry": (
        _served(lambda c: c.send_stat(4, "a")),
        lambda k: k.server.send_done(4, size=0),
    ),
    "send-done-twice": (_list_answered, lambda k: k.server.send_done(4, size=0)),
    "server-request-session": (lambda k: None, lambda k: k.server.request_session()),
    "client-accept-session": (lambda k: None, lambda k: k.client.accept_session()),
    "client-reject-session": (lambda k: None, lambda k: k.client.reject_session(1, "x")),
    "terminate-twice": (lambda k: k.client.terminate(), lambda k: k.client.terminate()),
}


@pytest.mark.parametrize(("setup", "misuse"), MISUSE.values(), ids=MISUSE.keys())
def test_local_misuse_raises_local_protocol_error_and_queues_nothing(
    setup: Callable[[Link], None], misuse: Callable[[Link], None]
) -> None:
    link = open_session()
    setup(link)
    link.client.data_to_send()
    link.server.data_to_send()
    with pytest.raises(LocalProtocolError):
        misuse(link)
    assert link.client.data_to_send() == [] and link.server.data_to_send() == []


def test_refused_send_data_leaves_the_upload_usable(link: Link) -> None:
    link.client.send_put(4, "f", 3)
    with pytest.raises(LocalProtocolError):
        link.client.send_data(4, b"abcd")
    link.client.send_data(4, b"abc")
    link.client.send_end(4, DIGEST)
    events = link.to_server()
    assert received(events) == b"abc"
    assert events[-1] == UploadEnded(stream_id=4, sha256=DIGEST)


# --- connection-level violations ---------------------------------------------------------------


CONTROL_VIOLATIONS: dict[str, tuple[Role, int, bytes, bool]] = {
    "conn-ack-from-client": (Role.SERVER, 0, encode(ConnAck(version=1)), False),
    "conn-request-from-server": (Role.CLIENT, 0, encode(ConnRequest(version=1)), False),
    "operation-on-control-stream": (Role.SERVER, 0, encode(Put(name="f", size=0)), False),
    "data-on-control-stream": (Role.SERVER, 0, encode(Data(data=b"x")), False),
    "terminate-before-session": (Role.SERVER, 0, encode(ConnTerminate()), False),
    "control-ends-inside-a-message": (Role.SERVER, 0, encode(ConnRequest(version=1))[:-1], True),
    "control-fin-before-session": (Role.SERVER, 0, b"", True),
    "malformed-control-message": (Role.SERVER, 0, b"\x7f\x00", False),
    "server-initiated-stream": (Role.SERVER, 1, encode(Get(name="f")), False),
    "client-unidirectional-stream": (Role.SERVER, 2, encode(Get(name="f")), False),
    "server-unidirectional-stream": (Role.CLIENT, 3, b"x", False),
    "server-bidirectional-to-client": (Role.CLIENT, 5, b"x", False),
}


@pytest.mark.parametrize(
    ("role", "stream_id", "data", "fin"), CONTROL_VIOLATIONS.values(), ids=CONTROL_VIOLATIONS.keys()
)
def test_control_violations_raise_remote_protocol_error_from_receive(
    role: Role, stream_id: int, data: bytes, fin: bool
) -> None:
    conn = QsftpConnection(role)
    with pytest.raises(RemoteProtocolError):
        conn.receive(stream_id, data, fin)


def test_second_conn_request_is_a_connection_error() -> None:
    link = open_session()
    with pytest.raises(RemoteProtocolError):
        link.server.receive(0, encode(ConnRequest(version=1)), False)


@pytest.mark.parametrize("role", list(Role))
def test_reset_of_the_control_stream_is_a_connection_error(role: Role) -> None:
    with pytest.raises(RemoteProtocolError):
        QsftpConnection(role).stream_reset(CONTROL_STREAM_ID, 0)


# --- resets --------------------------------------------------------------------------------


def test_stream_reset_reports_once_then_forgets_the_stream(link: Link) -> None:
    link.client.send_put(4, "f", 10)
    link.client.send_get(8, "g")
    link.to_server()
    assert link.server.open_streams == 2
    assert link.server.stream_reset(4, 0x10) == [StreamAborted(stream_id=4, error_code=0x10)]
    assert link.server.open_streams == 1
    assert link.server.stream_reset(4, 0x10) == []
    assert link.client.stream_reset(4, 7) == [StreamAborted(stream_id=4, error_code=7)]
    assert link.client.open_streams == 1
    with pytest.raises(LocalProtocolError):
        link.client.send_data(4, b"x")


def test_reset_stream_forgets_a_locally_aborted_stream_silently(link: Link) -> None:
    link.client.send_put(4, "f", 10)
    link.client.reset_stream(4)
    assert link.client.open_streams == 0
    assert link.client.stream_reset(4, 0) == []


# --- the tables, pair by pair --------------------------------------------------------------

_T = MessageType
SAMPLE: dict[MessageType, Message] = {
    _T.CONN_REQUEST: ConnRequest(version=1),
    _T.CONN_ACK: ConnAck(version=1),
    _T.ERROR: Error(code=ErrorCode.INTERNAL, message="x"),
    _T.CONN_TERMINATE: ConnTerminate(),
    _T.PUT: Put(name="f", size=0),
    _T.GET: Get(name="f"),
    _T.LIST: List(path=""),
    _T.STAT: Stat(path="f"),
    _T.PUT_RANGE: PutRange(name="f", total_size=0, offset=0, length=0, upload_id=bytes(16)),
    _T.PUT_BLOCK: PutBlock(name="f", total_size=0, offset=0, length=0, upload_id=bytes(16)),
    _T.COMMIT: Commit(name="f", total_size=0, upload_id=bytes(16), sha256=DIGEST),
    _T.ABORT: Abort(name="f", upload_id=bytes(16)),
    _T.PROBE: Probe(name="f", upload_id=bytes(16)),
    _T.GET_FROM: GetFrom(name="f", chunk_size=0, offset=0, sha256=DIGEST),
    _T.DATA: Data(data=b"x"),
    _T.END: End(sha256=DIGEST),
    _T.FILE: FileInfo(size=0, mtime_ns=0),
    _T.FILE_FROM: FileFrom(size=0, mtime_ns=0, offset=0),
    _T.ENTRY: EntryInfo(name="f", kind=EntryKind.FILE, size=0, mtime_ns=0),
    _T.DONE: Done(size=0),
}


def wire_input(kind: MessageType | str) -> tuple[bytes, bool]:
    """The bytes and end-of-stream flag that deliver one table input."""
    return (b"", True) if kind == FIN else (encode(SAMPLE[MessageType(kind)]), False)


def test_sample_inputs_cover_every_message_type() -> None:
    assert set(SAMPLE) == set(MessageType)


def server_in(state: RequestState, kind: MessageType | str) -> Link:
    """A server whose stream 4 is in request ``state``, set up so ``kind`` passes byte counts."""
    link = open_session()
    put = Put(name="f", size=1 if kind == _T.DATA else 0)
    setup = {
        RequestState.IDLE: b"",
        RequestState.BODY: encode(put),
        RequestState.ENDED: encode(Put(name="f", size=0)) + encode(End(sha256=DIGEST)),
        RequestState.CLOSED: encode(Get(name="f")),
        RequestState.DISCARD: encode(Get(name="f")),
    }[state]
    link.server.receive(4, setup, state is RequestState.CLOSED)
    if state is RequestState.DISCARD:
        link.server.send_error(4, ErrorCode.NOT_FOUND, "answered")
    link.server.data_to_send()
    assert link.server.request_state(4) is state
    return link


@pytest.mark.parametrize("kind", INPUTS, ids=input_id)
@pytest.mark.parametrize("state", list(RequestState), ids=lambda s: s.name)
def test_request_table_alone_decides_what_a_server_accepts(
    state: RequestState, kind: MessageType | str
) -> None:
    link = server_in(state, kind)
    events = link.server.receive(4, *wire_input(kind))
    if state is RequestState.DISCARD:  # answered already: everything is dropped
        assert events == []
        assert link.server.data_to_send() == []
    elif (state, kind) in _REQUEST:
        assert not any(isinstance(e, ProtocolViolation) for e in events)
        assert link.server.request_state(4) is _REQUEST[state, kind]
        assert link.server.data_to_send() == []
    else:
        assert isinstance(events[-1], ProtocolViolation)
        assert error_reply(link.server, 4).code == ErrorCode.BAD_REQUEST


_RS = ResponseState


def client_in(state: ResponseState, kind: MessageType | str) -> Link:
    """A client whose stream 4 is in response ``state``, set up so ``kind`` passes byte counts."""
    link = open_session()
    c = link.client
    file = FileInfo(size=1 if kind == _T.DATA else 0, mtime_ns=0)
    entry = SAMPLE[_T.ENTRY]
    steps: dict[ResponseState, tuple[Callable[[], None], bytes, bool]] = {
        _RS.PUT_RESULT: (lambda: c.send_put(4, "f", 1), b"", False),  # upload unfinished
        _RS.GET_HEADER: (lambda: c.send_get(4, "f"), b"", False),
        _RS.GET_FROM_HEADER: (lambda: c.send_get_from(4, "f", offset=0, sha256=DIGEST), b"", False),
        _RS.GET_BODY: (lambda: c.send_get(4, "f"), encode(file), False),
        _RS.LIST_ENTRIES: (lambda: c.send_list(4), b"", False),
        _RS.STAT_ENTRY: (lambda: c.send_stat(4, "f"), b"", False),
        _RS.STAT_DONE: (lambda: c.send_stat(4, "f"), encode(entry), False),
        _RS.FINAL: (lambda: c.send_list(4), encode(Done(size=0)), False),
        _RS.CLOSED: (lambda: c.send_list(4), encode(Done(size=0)), True),
    }
    send, data, fin = steps[state]
    send()
    c.data_to_send()
    c.receive(4, data, fin)
    assert c.response_state(4) is state
    return link


CLIENT_STATES = [s for s in ResponseState if s is not _RS.WAITING]


@pytest.mark.parametrize("kind", INPUTS, ids=input_id)
@pytest.mark.parametrize("state", CLIENT_STATES, ids=lambda s: s.name)
def test_response_table_alone_decides_what_a_client_accepts(
    state: ResponseState, kind: MessageType | str
) -> None:
    link = client_in(state, kind)
    events = link.client.receive(4, *wire_input(kind))
    if state is _RS.CLOSED:  # finished and forgotten: late bytes are ignored
        assert events == []
    elif (state, kind) in _RESPONSE:
        assert not any(isinstance(e, ProtocolViolation) for e in events)
        assert link.client.response_state(4) is _RESPONSE[state, kind]
    else:
        assert isinstance(events[-1], ProtocolViolation)
        assert link.client.open_streams == 0
    assert link.client.data_to_send() == []


@pytest.mark.parametrize(
    ("send", "state"),
    [
        (lambda c: c.send_put(4, "f", 1), _RS.PUT_RESULT),
        (lambda c: c.send_get(4, "f"), _RS.GET_HEADER),
        (lambda c: c.send_list(4), _RS.LIST_ENTRIES),
        (lambda c: c.send_stat(4, "f"), _RS.STAT_ENTRY),
        (lambda c: c.send_get_from(4, "f", offset=1, sha256=DIGEST), _RS.GET_FROM_HEADER),
    ],
    ids=["put", "get", "list", "stat", "get-from"],
)
def test_a_client_request_fixes_the_response_it_expects(
    send: Callable[[QsftpConnection], None], state: ResponseState
) -> None:
    """A client stream never sits in WAITING: that state is the server's, before a request."""
    client = open_session().client
    send(client)
    assert client.response_state(4) is state


SERVER_SENDS: dict[MessageType, Callable[[QsftpConnection], None]] = {
    _T.DATA: lambda s: s.send_data(4, b"x"),
    _T.FILE: lambda s: s.send_file_info(4, size=0, mtime_ns=0),
    _T.FILE_FROM: lambda s: s.send_file_from(4, size=0, mtime_ns=0, offset=0),
    _T.ENTRY: lambda s: s.send_entry(4, name="f", kind=EntryKind.FILE, size=0, mtime_ns=0),
    _T.DONE: lambda s: s.send_done(4, size=0),
    _T.ERROR: lambda s: s.send_error(4, ErrorCode.INTERNAL, "x"),
}


def server_answering(state: ResponseState, kind: MessageType) -> QsftpConnection:
    link = open_session()
    s = link.server
    request = {
        _RS.WAITING: b"",
        _RS.PUT_RESULT: encode(Put(name="f", size=0)),
        _RS.GET_HEADER: encode(Get(name="f")),
        _RS.GET_FROM_HEADER: encode(SAMPLE[_T.GET_FROM]),
        _RS.GET_BODY: encode(Get(name="f")),
        _RS.LIST_ENTRIES: encode(List(path="")),
        _RS.STAT_ENTRY: encode(Stat(path="f")),
        _RS.STAT_DONE: encode(Stat(path="f")),
    }[state]
    s.receive(4, request, False)
    if state is _RS.GET_BODY:
        s.send_file_info(4, size=1 if kind == _T.DATA else 0, mtime_ns=0)
    if state is _RS.STAT_DONE:
        SERVER_SENDS[_T.ENTRY](s)
    s.data_to_send()
    assert s.response_state(4) is state
    return s


@pytest.mark.parametrize("kind", list(SERVER_SENDS), ids=input_id)
@pytest.mark.parametrize("state", [s for s in ResponseState if s not in (_RS.FINAL, _RS.CLOSED)])
def test_response_table_alone_decides_what_a_server_may_send(
    state: ResponseState, kind: MessageType
) -> None:
    """FINAL and CLOSED are left out: DONE and ERROR pass through FINAL to CLOSED in one call."""
    server = server_answering(state, kind)
    if (state, kind) in _RESPONSE:
        SERVER_SENDS[kind](server)
        new = _RESPONSE[state, kind]
        if new is _RS.FINAL:
            new = _RESPONSE[new, FIN]  # DONE and ERROR carry the FIN
        assert server.response_state(4) is new
        assert server.data_to_send()
    else:
        with pytest.raises(LocalProtocolError):
            SERVER_SENDS[kind](server)
        assert server.data_to_send() == []
        assert server.response_state(4) is state


# --- hypothesis: random sequences follow the tables ----------------------------------------


@given(st.lists(st.sampled_from(INPUTS), max_size=6), st.integers(0, 3))
def test_random_request_sequences_follow_the_request_table(
    kinds: list[MessageType | str], put_size: int
) -> None:
    link = open_session()
    server = link.server
    server.receive(4, b"", False)
    state, expected, seen = RequestState.IDLE, 0, 0
    for kind in kinds:
        msg = None if kind == FIN else SAMPLE[MessageType(kind)]
        if isinstance(msg, Put):
            msg, expected = Put(name="f", size=put_size), put_size
        data, fin = (encode(msg), False) if msg else (b"", True)
        allowed = (state, kind) in _REQUEST
        if kind == _T.DATA:
            allowed = allowed and seen + 1 <= expected
            seen += 1
        if kind == _T.END:
            allowed = allowed and seen == expected
        events = server.receive(4, data, fin)
        if not allowed:
            assert isinstance(events[-1], ProtocolViolation)
            assert error_reply(server, 4).code == ErrorCode.BAD_REQUEST
            return
        assert not any(isinstance(e, ProtocolViolation) for e in events)
        state = _REQUEST[state, kind]
        assert server.request_state(4) is state
        if fin:
            return


@given(
    st.sampled_from([_T.PUT, _T.GET, _T.LIST, _T.STAT, _T.GET_FROM]),
    st.lists(st.sampled_from(INPUTS), max_size=6),
    st.integers(0, 3),
)
def test_random_response_sequences_follow_the_response_table(
    request_kind: MessageType, kinds: list[MessageType | str], file_size: int
) -> None:
    client = open_session().client
    {
        _T.PUT: lambda: client.send_put(4, "f", 1),
        _T.GET: lambda: client.send_get(4, "f"),
        _T.LIST: lambda: client.send_list(4),
        _T.STAT: lambda: client.send_stat(4, "f"),
        _T.GET_FROM: lambda: client.send_get_from(4, "f", offset=0, sha256=DIGEST),
    }[request_kind]()
    state = client.response_state(4)
    expected, seen = 0, 0
    for kind in kinds:
        msg = None if kind == FIN else SAMPLE[MessageType(kind)]
        if isinstance(msg, FileInfo):
            msg, expected = FileInfo(size=file_size, mtime_ns=0), file_size
        if isinstance(msg, FileFrom):
            msg, expected = FileFrom(size=file_size, mtime_ns=0, offset=0), file_size
        data, fin = (encode(msg), False) if msg else (b"", True)
        allowed = (state, kind) in _RESPONSE
        if kind == _T.DATA:
            allowed = allowed and seen + 1 <= expected
            seen += 1
        if kind == _T.DONE and state is _RS.GET_BODY:
            allowed = allowed and seen == expected
        events = client.receive(4, data, fin)
        if not allowed:
            assert isinstance(events[-1], ProtocolViolation)
            assert client.open_streams == 0
            return
        assert not any(isinstance(e, ProtocolViolation) for e in events)
        state = _RESPONSE[state, kind]
        assert client.response_state(4) is state
        if fin:
            return


# --- hypothesis: arbitrary bytes on an operation stream -------------------------------------

frames = st.sampled_from(list(SAMPLE.values())).map(encode)
chunks = st.lists(st.one_of(st.binary(max_size=24), frames), max_size=8)


@given(chunks, st.booleans())
def test_arbitrary_bytes_on_an_operation_stream_never_break_the_connection(
    pieces: list[bytes], fin: bool
) -> None:
    link = open_session()
    events: list[Event] = []
    for i, piece in enumerate(pieces):
        events += link.server.receive(4, piece, fin and i == len(pieces) - 1)
    violations = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(violations) <= 1
    if violations:
        assert events[-1] is violations[0]  # nothing comes out of a dead stream
    assert len(link.server.data_to_send()) == len(violations)  # one ERROR per violation
    assert link.server.session_open
    upload(link, 8, b"after the noise")
