"""The qsftp/1 codec (qsftp.wire): round trips, streaming DATA, limits, and the fuzzing invariant.

Every decoder input is fed whole, byte-at-a-time and followed by the next message's bytes
(h11 ``tests/test_io.py``); hypothesis feeds arbitrary bytes in arbitrary splits and checks that
the decoder raises nothing but :class:`RemoteProtocolError` (h11 ``fuzz/afl-server.py``).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsftp.errors import ErrorCode, RemoteProtocolError
from qsftp.wire import (
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
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

VARINT_MAX = 2**62 - 1
DIGEST = bytes(range(32))


def varint(value: int) -> bytes:
    """QUIC variable-length integer (RFC 9000 section 16), written independently of wire.py."""
    for width, prefix in ((1, 0x00), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * width - 2):
            return ((prefix << (8 * width - 8)) | value).to_bytes(width, "big")
    raise ValueError(value)


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return varint(len(raw)) + raw


def frame(kind: int, payload: bytes) -> bytes:
    return bytes((kind,)) + varint(len(payload)) + payload


def decode(*chunks: bytes) -> list[Message]:
    """Feed ``chunks`` one by one, pulling every message out after each."""
    decoder = Decoder()
    out: list[Message] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def coalesce(messages: list[Message]) -> list[Message]:
    """Join adjacent Data messages: a DATA frame fed in pieces comes out in pieces."""
    out: list[Message] = []
    for msg in messages:
        if isinstance(msg, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(data=out[-1].data + msg.data)
        else:
            out.append(msg)
    return out


UID = bytes(range(16))

# One instance of each message, with unicode, empty strings and every varint width.
SAMPLES: list[Message] = [
    ConnRequest(version=1, token="s3cret-token", client="qsftp/0.1 (тест)"),
    ConnRequest(version=VARINT_MAX),
    ConnAck(version=1, server="qsftp-server ✓"),
    ConnAck(version=1),
    Error(code=ErrorCode.NOT_FOUND, message="no such file: données/été.txt"),
    Error(code=ErrorCode.INTERNAL),
    ConnTerminate(),
    Put(name="dir/файл.bin", size=VARINT_MAX),
    Put(name="", size=0),
    Get(name="日本語/ファイル", chunk_size=16383),
    Get(name="a"),
    List(path="", recursive=True),
    List(path="sub/dir"),
    Stat(path="😀/emoji"),
    Stat(path=""),
    PutRange(name="big/файл.iso", total_size=VARINT_MAX, offset=2**30, length=2**20, upload_id=UID),
    PutRange(name="f", total_size=0, offset=0, length=0, upload_id=UID),
    PutBlock(name="blk", total_size=10, offset=2, length=8, upload_id=UID),
    Commit(name="big/файл.iso", total_size=2**40, upload_id=UID, sha256=DIGEST),
    Abort(name="f", upload_id=UID),
    Probe(name="dir/f", upload_id=UID),
    GetFrom(name="日本語/ファイル", chunk_size=0, offset=VARINT_MAX, sha256=DIGEST),
    GetFrom(name="a", chunk_size=65536, offset=0, sha256=DIGEST),
    Data(data=b""),
    Data(data=b"\x00\xff" * 600),
    End(sha256=DIGEST),
    FileInfo(size=63, mtime_ns=1_700_000_000_123_456_789),
    FileInfo(size=64, mtime_ns=2**30),
    FileFrom(size=VARINT_MAX, mtime_ns=1_700_000_000_123_456_789, offset=2**40),
    FileFrom(size=0, mtime_ns=0, offset=0),
    EntryInfo(name="a/b", kind=EntryKind.DIR, size=0, mtime_ns=16384),
    EntryInfo(name="ü.txt", kind=EntryKind.FILE, size=2**30 - 1, mtime_ns=VARINT_MAX),
    Done(size=16384, sha256=DIGEST, server_cpu_us=2**30 - 1),
    Done(size=0),
]
SAMPLE_IDS = [f"{i}-{type(m).__name__}" for i, m in enumerate(SAMPLES)]
TRAILER = Stat(path="next")


def test_samples_cover_every_message_type() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MessageType)


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_message_round_trips_fed_whole(msg: Message) -> None:
    assert decode(encode(msg)) == [msg]


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_message_round_trips_fed_byte_at_a_time(msg: Message) -> None:
    assert coalesce(decode(*bytewise(encode(msg)))) == [msg]


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_message_followed_by_the_next_message_decodes_both(msg: Message) -> None:
    data = encode(msg) + encode(TRAILER)
    assert coalesce(decode(data)) == [msg, TRAILER]
    assert coalesce(decode(*bytewise(data))) == [msg, TRAILER]


@pytest.mark.parametrize(
    ("value", "width"),
    [
        (0, 1),
        (63, 1),
        (64, 2),
        (16383, 2),
        (16384, 4),
        (2**30 - 1, 4),
        (2**30, 8),
        (VARINT_MAX, 8),
    ],
)
def test_varints_use_the_shortest_of_the_four_widths_and_round_trip(value: int, width: int) -> None:
    msg = FileInfo(size=value, mtime_ns=0)
    data = encode(msg)
    assert data == frame(MessageType.FILE, varint(value) + varint(0))
    assert len(data) == 2 + width + 1
    assert decode(data) == [msg]


def test_non_minimal_varints_are_accepted() -> None:
    """RFC 9000 lets a sender use a longer encoding than needed; the decoder must too."""
    payload = (0x4000 | 5).to_bytes(2, "big") + bytes((0x80, 0, 0, 7))
    assert decode(frame(MessageType.FILE, payload)) == [FileInfo(size=5, mtime_ns=7)]


@pytest.mark.parametrize(
    "msg",
    [
        Put(name="a", size=VARINT_MAX + 1),
        FileInfo(size=-1, mtime_ns=0),
        Stat(path="x" * MAX_CONTROL_PAYLOAD),
        Data(data=bytes(MAX_DATA_PAYLOAD + 1)),
    ],
    ids=["varint-too-big", "negative", "control-too-long", "data-too-long"],
)
def test_encoder_refuses_what_the_decoder_would_reject(msg: Message) -> None:
    with pytest.raises(ValueError):
        encode(msg)


def test_control_message_of_exactly_the_limit_round_trips() -> None:
    msg = Stat(path="p" * (MAX_CONTROL_PAYLOAD - 4))  # 4-byte length prefix
    data = encode(msg)
    assert len(data) == 1 + 4 + MAX_CONTROL_PAYLOAD
    assert decode(data) == [msg]


def test_encode_data_header_refuses_oversized_payloads() -> None:
    header = encode_data_header(MAX_DATA_PAYLOAD)
    assert header == bytes((MessageType.DATA,)) + varint(MAX_DATA_PAYLOAD)
    with pytest.raises(ValueError):
        encode_data_header(MAX_DATA_PAYLOAD + 1)


# --- streamed DATA --------------------------------------------------------------------------


def test_data_payload_is_handed_out_as_it_arrives_without_buffering() -> None:
    payload = bytes(range(256)) * 40
    data = encode_data_header(len(payload)) + payload
    decoder = Decoder()
    pieces: list[bytes] = []
    for start in range(0, len(data), 1000):
        chunk = data[start : start + 1000]
        decoder.feed(chunk)
        while (msg := decoder.next_message()) is not None:
            assert isinstance(msg, Data)
            assert 0 < len(msg.data) <= len(chunk)
            pieces.append(msg.data)
        assert decoder.buffered == 0
    assert b"".join(pieces) == payload
    assert decoder.at_boundary


def test_data_frame_header_and_payload_written_separately_decode_like_encode() -> None:
    payload = b"hello world"
    assert coalesce(decode(encode_data_header(len(payload)), payload)) == [Data(data=payload)]
    assert encode_data_header(len(payload)) + payload == encode(Data(data=payload))


def test_data_frame_pieces_stop_at_the_frame_end() -> None:
    data = encode(Data(data=b"abc")) + encode(Data(data=b"de")) + encode(TRAILER)
    assert decode(data) == [Data(data=b"abc"), Data(data=b"de"), TRAILER]


def test_non_empty_data_frame_fed_byte_at_a_time_yields_no_empty_pieces() -> None:
    messages = decode(*bytewise(encode(Data(data=b"xyz"))))
    assert messages == [Data(data=b"x"), Data(data=b"y"), Data(data=b"z")]


# --- at_boundary ----------------------------------------------------------------------------


def test_at_boundary_only_between_frames() -> None:
    decoder = Decoder()
    assert decoder.at_boundary
    stat = encode(Stat(path="abc"))
    decoder.feed(stat[:1])
    assert not decoder.at_boundary  # half a header
    assert decoder.next_message() is None
    decoder.feed(stat[1:])
    assert not decoder.at_boundary  # a whole message, not yet taken
    assert decoder.next_message() == Stat(path="abc")
    assert decoder.at_boundary


def test_at_boundary_is_false_inside_a_data_payload_even_with_nothing_buffered() -> None:
    decoder = Decoder()
    decoder.feed(encode_data_header(4) + b"ab")
    assert decoder.next_message() == Data(data=b"ab")
    assert decoder.next_message() is None
    assert decoder.buffered == 0
    assert not decoder.at_boundary
    decoder.feed(b"cd")
    assert decoder.next_message() == Data(data=b"cd")
    assert decoder.at_boundary


def test_empty_data_frame_leaves_the_decoder_at_a_boundary() -> None:
    decoder = Decoder()
    decoder.feed(encode(Data(data=b"")))
    assert decoder.next_message() == Data(data=b"")
    assert decoder.at_boundary


# --- limits and malformed input -------------------------------------------------------------


def test_oversized_control_message_is_refused_from_its_header() -> None:
    decoder = Decoder()
    decoder.feed(bytes((MessageType.PUT,)) + varint(MAX_CONTROL_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_oversized_data_frame_is_refused_from_its_header() -> None:
    decoder = Decoder()
    decoder.feed(bytes((MessageType.DATA,)) + varint(MAX_DATA_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


_T = MessageType
MALFORMED = {
    "truncated-integer": frame(_T.PUT, text("name")),
    "truncated-integer-bytes": frame(_T.FILE, b"\x40"),
    "string-longer-than-payload": frame(_T.STAT, b"\x05ab"),
    "trailing-bytes": frame(_T.STAT, text("a") + b"\x00"),
    "trailing-bytes-terminate": frame(_T.CONN_TERMINATE, b"\x00"),
    "invalid-utf8": frame(_T.STAT, text(b"\xff\xfe")),
    "invalid-utf8-surrogate": frame(_T.PUT, text(b"\xed\xa0\x80") + varint(1)),
    "unknown-type": b"\x7f\x00",
    "unknown-type-zero": b"\x00\x00",
    "end-short-digest": frame(_T.END, bytes(31)),
    "end-long-digest": frame(_T.END, bytes(33)),
    "end-empty": frame(_T.END, b""),
    "done-short-digest": frame(_T.DONE, varint(1) + text(bytes(31)) + varint(0)),
    "done-long-digest": frame(_T.DONE, varint(1) + text(bytes(33)) + varint(0)),
    "flag-of-2": frame(_T.LIST, text("") + varint(2)),
    "entry-kind-0": frame(_T.ENTRY, text("a") + varint(0) + varint(0) + varint(0)),
    "entry-kind-3": frame(_T.ENTRY, text("a") + varint(3) + varint(0) + varint(0)),
    "get-from-short-digest": frame(
        _T.GET_FROM, text("a") + varint(0) + varint(5) + text(bytes(31))
    ),
    "get-from-no-digest": frame(_T.GET_FROM, text("a") + varint(0) + varint(0) + text(b"")),
    "file-from-beyond-the-end": frame(_T.FILE_FROM, varint(5) + varint(0) + varint(6)),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_raises_remote_protocol_error_whole(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(data)


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_raises_remote_protocol_error_byte_at_a_time(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(*bytewise(data))


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_after_a_good_one_still_raises(data: bytes) -> None:
    decoder = Decoder()
    decoder.feed(encode(TRAILER) + data)
    assert decoder.next_message() == TRAILER
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


# --- repr -----------------------------------------------------------------------------------


def test_conn_request_repr_never_shows_the_token() -> None:
    msg = ConnRequest(version=1, token="hunter2-very-secret", client="c")
    assert "hunter2" not in repr(msg)
    assert "hunter2" not in str(msg)
    assert "***" in repr(msg)


def test_data_repr_is_truncated() -> None:
    msg = Data(data=b"A" * 10_000)
    assert len(repr(msg)) < 100
    assert "len=10000" in repr(msg)
    assert repr(Data(data=b"hi")) == "Data(len=2, data=b'hi')"


# --- hypothesis -----------------------------------------------------------------------------

varints = st.integers(min_value=0, max_value=VARINT_MAX)
texts = st.text(max_size=40)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(ConnRequest, version=varints, token=texts, client=texts),
    st.builds(ConnAck, version=varints, server=texts),
    st.builds(Error, code=varints, message=texts),
    st.just(ConnTerminate()),
    st.builds(Put, name=texts, size=varints),
    st.builds(Get, name=texts, chunk_size=varints),
    st.builds(List, path=texts, recursive=st.booleans()),
    st.builds(Stat, path=texts),
    st.builds(Data, data=st.binary(max_size=200)),
    st.builds(End, sha256=st.binary(min_size=32, max_size=32)),
    st.builds(FileInfo, size=varints, mtime_ns=varints),
    st.builds(
        GetFrom,
        name=texts,
        chunk_size=varints,
        offset=varints,
        sha256=st.binary(min_size=32, max_size=32),
    ),
    st.builds(
        FileFrom,
        size=st.just(VARINT_MAX),
        mtime_ns=varints,
        offset=varints,
    ),
    st.builds(
        EntryInfo, name=texts, kind=st.sampled_from(EntryKind), size=varints, mtime_ns=varints
    ),
    st.builds(
        Done,
        size=varints,
        sha256=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
        server_cpu_us=varints,
    ),
)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_generated_messages_round_trip_in_any_split(
    msgs: list[Message], data: st.DataObject
) -> None:
    wire = b"".join(encode(m) for m in msgs)
    chunks = data.draw(split(wire))
    # coalescing merges adjacent DATA frames, so compare against the coalesced originals
    assert coalesce(decode(*chunks)) == coalesce(msgs)


# Arbitrary bytes, with whole valid frames mixed in so that the fuzzer gets past the header.
fuzz_input = st.lists(st.one_of(st.binary(max_size=40), messages.map(encode)), max_size=6).map(
    b"".join
)


@given(fuzz_input, st.data())
def test_decoder_raises_only_remote_protocol_error_on_any_input(
    raw: bytes, data: st.DataObject
) -> None:
    decoder = Decoder()
    fed = 0
    taken = 0
    try:
        for chunk in data.draw(split(raw)):
            decoder.feed(chunk)
            fed += len(chunk)
            while (msg := decoder.next_message()) is not None:
                assert isinstance(msg, Message)
                taken += len(msg.data) if isinstance(msg, Data) else 0
            assert decoder.buffered <= fed - taken
    except RemoteProtocolError:
        pass
