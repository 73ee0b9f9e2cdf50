"""ttrpc framing and the hand-written protobuf codec, with no sockets.

The codec is cross-checked against the google.protobuf runtime, using
equivalent messages built at run time from a FileDescriptorProto.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.ttrpc import MAX_MESSAGE_SIZE, ProtocolError, RemoteProtocolError
from supervisor.ttrpc._errors import LocalProtocolError
from supervisor.ttrpc._frame import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    decode_header,
    encode_frame,
    encode_header,
)
from supervisor.ttrpc._wire import (
    Request,
    Response,
    Status,
    decode_request,
    decode_response,
    decode_varint,
    encode_request,
    encode_response,
    encode_varint,
)

# -- reference messages built with the protobuf runtime -----------------------


def _reference_classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    fdp = descriptor_pb2.FileDescriptorProto(
        name="ttrpc_reference.proto",
        package="ref",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    f = descriptor_pb2.FieldDescriptorProto
    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name

    message("KeyValue", ("key", 1, f.TYPE_STRING, opt, ""), ("value", 2, f.TYPE_STRING, opt, ""))
    message(
        "Request",
        ("service", 1, f.TYPE_STRING, opt, ""),
        ("method", 2, f.TYPE_STRING, opt, ""),
        ("payload", 3, f.TYPE_BYTES, opt, ""),
        ("timeout_nano", 4, f.TYPE_INT64, opt, ""),
        ("metadata", 5, f.TYPE_MESSAGE, rep, ".ref.KeyValue"),
    )
    message(
        "Status",
        ("code", 1, f.TYPE_INT32, opt, ""),
        ("message", 2, f.TYPE_STRING, opt, ""),
        ("details", 3, f.TYPE_MESSAGE, rep, ".google.protobuf.Any"),
    )
    message(
        "Response",
        ("status", 1, f.TYPE_MESSAGE, opt, ".ref.Status"),
        ("payload", 2, f.TYPE_BYTES, opt, ""),
    )
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ref.{name}"))
        for name in ("Request", "Response")
    }


REF = _reference_classes()


def ref_request(r: Request) -> Any:
    msg = REF["Request"](
        service=r.service, method=r.method, payload=r.payload, timeout_nano=r.timeout_nano
    )
    for key, value in r.metadata:
        msg.metadata.add(key=key, value=value)
    return msg


def ref_response(r: Response) -> Any:
    msg = REF["Response"](payload=r.payload)
    if r.status is not None:
        msg.status.SetInParent()
        msg.status.code = r.status.code
        msg.status.message = r.status.message
        for type_url, value in r.status.details:
            msg.status.details.add(type_url=type_url, value=value)
    return msg


def from_ref_request(msg: Any) -> Request:
    return Request(
        msg.service,
        msg.method,
        msg.payload,
        msg.timeout_nano,
        tuple((kv.key, kv.value) for kv in msg.metadata),
    )


def from_ref_response(msg: Any) -> Response:
    status = None
    if msg.HasField("status"):
        status = Status(
            msg.status.code,
            msg.status.message,
            tuple((d.type_url, d.value) for d in msg.status.details),
        )
    return Response(status, msg.payload)


text = st.text(max_size=20)
requests = st.builds(
    Request,
    text,
    text,
    st.binary(max_size=64),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.lists(st.tuples(text, text), max_size=4).map(tuple),
)
statuses = st.builds(
    Status,
    st.integers(-(1 << 31), (1 << 31) - 1),
    text,
    st.lists(st.tuples(text, st.binary(max_size=16)), max_size=3).map(tuple),
)
responses = st.builds(Response, st.none() | statuses, st.binary(max_size=64))


# -- wire codec ---------------------------------------------------------------


def test_request_bytes_hand_computed() -> None:
    req = Request("svc", "M", b"\x01", 5, (("k", "v"),))
    assert encode_request(req) == (
        b"\x0a\x03svc\x12\x01M\x1a\x01\x01\x20\x05\x2a\x06\x0a\x01k\x12\x01v"
    )
    # Negative int64 is a 10-byte two's complement varint.
    assert encode_request(Request("", "", timeout_nano=-1)) == b"\x20" + b"\xff" * 9 + b"\x01"


def test_ok_response_always_carries_status_like_go() -> None:
    assert encode_response(Response(Status(), b"")) == b"\x0a\x00"
    assert decode_response(b"\x0a\x00") == Response(Status(0, "", ()), b"")
    assert decode_response(b"") == Response(None, b"")


@given(requests)
def test_request_matches_protobuf_runtime(req: Request) -> None:
    ours = encode_request(req)
    theirs = ref_request(req).SerializeToString(deterministic=True)
    assert ours == theirs
    assert decode_request(theirs) == req


@given(responses)
def test_response_matches_protobuf_runtime(resp: Response) -> None:
    ours = encode_response(resp)
    assert ours == ref_response(resp).SerializeToString(deterministic=True)
    assert decode_response(ours) == resp


@given(requests, st.data())
def test_unknown_fields_are_skipped(req: Request, data: st.DataObject) -> None:
    extra = data.draw(
        st.sampled_from(
            [
                b"\x30\x96\x01",  # field 6 varint
                b"\x39" + bytes(8),  # field 7 fixed64
                b"\x45" + bytes(4),  # field 8 fixed32
                b"\x4a\x02hi",  # field 9 length-delimited
                b"\xf8\xff\xff\xff\x0f\x00",  # field 2**29-1 varint
            ]
        )
    )
    assert decode_request(extra + encode_request(req) + extra) == req


def test_repeated_status_occurrences_merge() -> None:
    first = b"\x0a\x02\x08\x05"  # status{code: 5}
    second = b"\x0a\x04\x12\x02hi"  # status{message: "hi"}
    assert decode_response(first + second) == Response(Status(5, "hi", ()), b"")
    assert from_ref_response(REF["Response"].FromString(first + second)) == Response(
        Status(5, "hi", ()), b""
    )


@pytest.mark.parametrize(
    "bad",
    [
        b"\x0a\x05ab",  # truncated string
        b"\x20\xff",  # truncated varint
        b"\x20" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
        b"\x20" + b"\xff" * 9 + b"\x7f",  # varint above 2**64
        b"\x00\x01",  # field number 0
        b"\x0b\x0c",  # group wire type
        b"\x0e",  # invalid wire type 6
        b"\x08\x01",  # service (field 1) sent as varint
        b"\x0a\x02\xc3\x28",  # service not UTF-8
        b"\x2a\x03\x0a\x05a",  # truncated KeyValue inside metadata
        b"\x39\x00",  # truncated fixed64
    ],
)
def test_malformed_request_rejected(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(bad)


@given(st.binary(max_size=64))
def test_random_bytes_decode_like_protobuf_or_raise_protocol_error(blob: bytes) -> None:
    for ours, ref, convert in (
        (decode_request, REF["Request"], from_ref_request),
        (decode_response, REF["Response"], from_ref_response),
    ):
        try:
            mine = ours(blob)
        except ProtocolError:
            continue
        # Whatever we accept, the reference runtime accepts with the same meaning.
        assert convert(ref.FromString(blob)) == mine


@given(requests, st.data())
def test_truncated_request_agrees_with_protobuf(req: Request, data: st.DataObject) -> None:
    blob = encode_request(req)
    cut = blob[: data.draw(st.integers(0, max(0, len(blob) - 1)))]
    try:
        theirs: Request | None = from_ref_request(REF["Request"].FromString(cut))
    except DecodeError:
        theirs = None
    try:
        mine: Request | None = decode_request(cut)
    except RemoteProtocolError:
        mine = None
    assert mine == theirs


@given(st.integers(0, (1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0, len(encoded)) == (value, len(encoded))


# -- frames -------------------------------------------------------------------


def test_header_layout() -> None:
    assert encode_header(5, 1, MessageType.REQUEST) == b"\x00\x00\x00\x05\x00\x00\x00\x01\x01\x00"
    header = decode_header(b"\x00\x40\x00\x00\xff\xff\xff\xff\x02\x07")
    assert (header.length, header.stream_id, header.type, header.flags) == (
        4 << 20,
        0xFFFFFFFF,
        2,
        7,
    )
    assert MAX_MESSAGE_SIZE == 4 << 20


def test_encode_frame_refuses_oversize_locally() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(1, MessageType.REQUEST, bytes(MAX_MESSAGE_SIZE + 1))
    assert len(encode_frame(1, MessageType.REQUEST, bytes(MAX_MESSAGE_SIZE))) == (
        HEADER_SIZE + MAX_MESSAGE_SIZE
    )


def test_decoder_byte_by_byte() -> None:
    stream = encode_frame(1, MessageType.REQUEST, b"abc") + encode_frame(
        3, MessageType.RESPONSE, b"", flags=9
    )
    decoder = FrameDecoder()
    out: list[Frame | OversizedFrame] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(decoder)
    assert out == [
        Frame(1, MessageType.REQUEST, 0, b"abc"),
        Frame(3, MessageType.RESPONSE, 9, b""),
    ]
    assert decoder.at_boundary
    decoder.feed_eof()
    assert list(decoder) == []


def test_decoder_skips_oversized_without_buffering() -> None:
    length = MAX_MESSAGE_SIZE + 100
    decoder = FrameDecoder()
    decoder.feed(encode_header(length, 7, MessageType.REQUEST) + b"x" * 1000)
    assert list(decoder) == []
    chunk = bytes(65536)
    remaining = length - 1000
    while remaining > 0:
        n = min(remaining, len(chunk))
        decoder.feed(chunk[:n])
        remaining -= n
        assert decoder.buffered == 0
        if remaining:
            assert list(decoder) == []
    follow = encode_frame(9, MessageType.REQUEST, b"next")
    decoder.feed(follow)
    assert list(decoder) == [
        OversizedFrame(7, MessageType.REQUEST, 0, length),
        Frame(9, MessageType.REQUEST, 0, b"next"),
    ]


def test_decoder_oversized_then_frame_in_one_chunk() -> None:
    decoder = FrameDecoder(max_message_size=4)
    data = (
        encode_header(6, 1, MessageType.REQUEST)
        + b"123456"
        + encode_header(2, 3, MessageType.REQUEST)
        + b"ok"
    )
    decoder.feed(data)
    assert list(decoder) == [
        OversizedFrame(1, MessageType.REQUEST, 0, 6),
        Frame(3, MessageType.REQUEST, 0, b"ok"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # partial header
        encode_header(5, 1, MessageType.REQUEST) + b"ab",  # partial payload
        encode_header(MAX_MESSAGE_SIZE + 1, 1, MessageType.REQUEST) + b"ab",  # mid-skip
    ],
)
def test_eof_mid_frame_is_remote_error(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    assert list(decoder) == []
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError, match="middle of"):
        list(decoder)


def test_unknown_type_is_fatal() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_header(0, 1, 3))
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        list(decoder)


def test_feed_after_eof_is_local_error() -> None:
    decoder = FrameDecoder()
    decoder.feed_eof()
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"x")


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=8), st.booleans())
def test_random_bytes_raise_only_protocol_error(chunks: list[bytes], eof: bool) -> None:
    decoder = FrameDecoder(max_message_size=64)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for frame in decoder:
                assert isinstance(frame, Frame | OversizedFrame)
        if eof:
            decoder.feed_eof()
            list(decoder)
    except ProtocolError:
        pass  # the only acceptable failure
    assert decoder.buffered <= HEADER_SIZE + 64 + max((len(c) for c in chunks), default=0)


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=30)), max_size=5),
    st.data(),
)
def test_truncated_valid_stream(frames: list[tuple[int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(sid, MessageType.RESPONSE, p) for sid, p in frames)
    cut = data.draw(st.integers(0, len(stream)))
    decoder = FrameDecoder()
    decoder.feed(stream[:cut])
    got = list(decoder)
    decoder.feed_eof()
    boundaries = {0}
    pos = 0
    for _, payload in frames:
        pos += HEADER_SIZE + len(payload)
        boundaries.add(pos)
    if cut in boundaries:
        assert list(decoder) == []
    else:
        with pytest.raises(RemoteProtocolError):
            list(decoder)
    assert [(f.stream_id, f.payload) for f in got if isinstance(f, Frame)] == frames[: len(got)]
