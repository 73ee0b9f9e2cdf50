"""ttrpc client and server state machines paired in memory: no sockets, no trio."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.ttrpc import Code, LocalProtocolError, ProtocolError, RemoteProtocolError
from supervisor.ttrpc._frame import MAX_MESSAGE_SIZE, MessageType, encode_frame, encode_header
from supervisor.ttrpc._protocol import (
    ClientConnection,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    ServerConnection,
    ServerEvent,
)
from supervisor.ttrpc._server import _RECEIVE_SIZE
from supervisor.ttrpc._wire import Request, Response, Status, encode_request, encode_response


def request_frame(stream_id: int, service: str = "s", method: str = "m") -> bytes:
    return encode_frame(stream_id, MessageType.REQUEST, encode_request(Request(service, method)))


def test_round_trip_and_out_of_order_answers() -> None:
    client, server = ClientConnection(), ServerConnection()
    ids = []
    wire = b""
    for n in range(3):
        sid, data = client.send_request(
            "svc", f"M{n}", b"p%d" % n, timeout_nano=10**9, metadata=[("k", "a"), ("k", "b")]
        )
        ids.append(sid)
        wire += data
    assert ids == [1, 3, 5]
    events = server.receive_data(wire)
    assert events == [
        RequestReceived(sid, Request("svc", f"M{n}", b"p%d" % n, 10**9, (("k", "a"), ("k", "b"))))
        for n, sid in enumerate(ids)
    ]
    assert server.outstanding == 3
    # Answer in reverse order; the client matches by stream id.
    replies = server.send_response(5, b"five") + server.send_response(
        1, code=Code.NOT_FOUND, message="gone"
    )
    assert client.receive_data(replies) == [
        ResponseReceived(5, Response(Status(0, "", ()), b"five")),
        ResponseReceived(1, Response(Status(int(Code.NOT_FOUND), "gone", ()), b"")),
    ]
    assert client.outstanding == 1
    assert client.receive_data(server.send_response(3)) == [
        ResponseReceived(3, Response(Status(), b""))
    ]
    assert server.outstanding == 0


def test_request_frame_bytes_match_go_layout() -> None:
    client = ClientConnection()
    _, data = client.send_request("a", "b")
    body = b"\x0a\x01a\x12\x01b"
    assert data == b"\x00\x00\x00\x06\x00\x00\x00\x01\x01\x00" + body


def test_response_not_owed_is_local_error() -> None:
    server = ServerConnection()
    with pytest.raises(LocalProtocolError):
        server.send_response(1)
    server.receive_data(request_frame(1))
    server.send_response(1)
    with pytest.raises(LocalProtocolError):
        server.send_response(1)


def test_too_large_response_stays_owed() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1))
    with pytest.raises(LocalProtocolError):
        server.send_response(1, bytes(MAX_MESSAGE_SIZE))
    assert server.outstanding == 1
    server.send_response(1, code=Code.RESOURCE_EXHAUSTED, message="too big")
    assert server.outstanding == 0


def test_stream_id_rules_are_per_stream_errors() -> None:
    server = ServerConnection()
    events = server.receive_data(
        request_frame(2)  # even
        + request_frame(5)
        + request_frame(3)  # not increasing
        + request_frame(5)  # reused
        + request_frame(7)
    )
    kinds = [(type(e).__name__, e.stream_id) for e in events]
    assert kinds == [
        ("RequestRejected", 2),
        ("RequestReceived", 5),
        ("RequestRejected", 3),
        ("RequestRejected", 5),
        ("RequestReceived", 7),
    ]
    assert all(e.code is Code.INVALID_ARGUMENT for e in events if isinstance(e, RequestRejected))
    # Every event owes one answer, even a rejected duplicate of an active stream.
    assert server.outstanding == 5
    server.send_response(5)
    server.send_response(5)


def test_undecodable_request_body_is_invalid_argument() -> None:
    server = ServerConnection()
    events = server.receive_data(encode_frame(1, MessageType.REQUEST, b"\x0a\x09abc"))
    assert len(events) == 1
    assert isinstance(events[0], RequestRejected)
    assert events[0].code is Code.INVALID_ARGUMENT
    assert "unmarshal request error" in events[0].message
    # The connection carries on.
    assert isinstance(server.receive_data(request_frame(3))[0], RequestReceived)


def test_oversized_request_gets_resource_exhausted_and_connection_survives() -> None:
    server = ServerConnection(max_message_size=16)
    events = server.receive_data(
        encode_header(17, 1, MessageType.REQUEST) + bytes(17) + request_frame(3)
    )
    assert isinstance(events[0], RequestRejected)
    assert events[0].code is Code.RESOURCE_EXHAUSTED
    assert "exceeds the maximum message size of 16" in events[0].message
    assert isinstance(events[1], RequestReceived)


def test_response_frame_from_client_is_fatal_and_sticky() -> None:
    server = ServerConnection()
    with pytest.raises(RemoteProtocolError, match="clients may only send requests"):
        server.receive_data(encode_frame(1, MessageType.RESPONSE, b""))
    assert server.failed
    with pytest.raises(RemoteProtocolError, match="already failed"):
        server.receive_data(request_frame(3))


def test_eof_handling() -> None:
    server = ServerConnection()
    assert server.receive_data(b"") == []
    assert server.peer_closed
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    partial = ServerConnection()
    partial.receive_data(request_frame(1)[:-1])
    with pytest.raises(RemoteProtocolError, match="middle of"):
        partial.receive_data(b"")


def test_client_refuses_oversized_request_without_using_an_id() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send_request("s", "m", bytes(MAX_MESSAGE_SIZE))
    assert client.send_request("s", "m")[0] == 1


def test_client_stream_id_exhaustion() -> None:
    client = ClientConnection()
    client._next_stream_id = 0xFFFFFFFF
    assert client.send_request("s", "m")[0] == 0xFFFFFFFF
    with pytest.raises(LocalProtocolError, match="exhausted"):
        client.send_request("s", "m")


def test_client_abandoned_late_response_is_dropped() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, data = client.send_request("s", "m")
    server.receive_data(data)
    client.abandon(sid)
    assert client.receive_data(server.send_response(sid, b"late")) == []
    # A second answer on the same stream is no longer expected: fatal.
    with pytest.raises(RemoteProtocolError, match="no call waiting"):
        client.receive_data(encode_frame(sid, MessageType.RESPONSE, b""))


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (encode_frame(1, MessageType.RESPONSE, b""), "no call waiting"),  # nothing sent
        (encode_frame(2, MessageType.RESPONSE, b""), "no call waiting"),
        (request_frame(1), "servers may only send responses"),
        (encode_frame(1, MessageType.RESPONSE, b"\x0a\x05"), "undecodable response"),
    ],
)
def test_client_fatal_inputs(frame: bytes, match: str) -> None:
    client = ClientConnection()
    if b"\x0a\x05" in frame:
        client.send_request("s", "m")
    with pytest.raises(RemoteProtocolError, match=match):
        client.receive_data(frame)
    with pytest.raises(LocalProtocolError):
        client.send_request("s", "m")


def test_client_oversized_response_becomes_resource_exhausted() -> None:
    client = ClientConnection(max_message_size=8)
    sid, _ = client.send_request("s", "m")
    [event] = client.receive_data(encode_header(9, sid, MessageType.RESPONSE) + bytes(9))
    assert event.stream_id == sid
    assert event.response.status is not None
    assert event.response.status.code == Code.RESOURCE_EXHAUSTED


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_server_random_bytes_raise_only_protocol_error(chunks: list[bytes]) -> None:
    server = ServerConnection(max_message_size=32)
    try:
        for chunk in [*chunks, b""]:
            for event in server.receive_data(chunk):
                assert isinstance(event, RequestReceived | RequestRejected)
                server.send_response(event.stream_id)
    except ProtocolError:
        pass  # the only acceptable failure


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_client_random_bytes_raise_only_protocol_error(chunks: list[bytes]) -> None:
    client = ClientConnection(max_message_size=32)
    for _ in range(4):
        client.send_request("s", "m")
    try:
        for chunk in [*chunks, b""]:
            for event in client.receive_data(chunk):
                assert isinstance(event, ResponseReceived)
    except ProtocolError:
        pass  # the only acceptable failure


@given(
    st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=20), st.integers(0, 3)), max_size=6),
    st.data(),
)
def test_server_truncated_valid_stream(
    calls: list[tuple[str, bytes, int]], data: st.DataObject
) -> None:
    client = ClientConnection()
    wire = b"".join(client.send_request("svc", m, p, timeout_nano=t)[1] for m, p, t in calls)
    cut = data.draw(st.integers(0, len(wire)))
    split = data.draw(st.integers(0, cut))
    server = ServerConnection()
    got = []
    try:
        for chunk in (wire[:split], wire[split:cut]):
            if chunk:  # b"" would mean end of stream
                got += server.receive_data(chunk)
        got += server.receive_data(b"")
    except RemoteProtocolError:
        assert cut < len(wire)
    assert all(isinstance(e, RequestReceived) for e in got)
    assert [e.request.method for e in got if isinstance(e, RequestReceived)] == [
        m for m, _, _ in calls
    ][: len(got)]


def test_response_bytes_from_go_server_decode() -> None:
    # What Go's ttrpc server sends for an OK reply carrying payload b"x":
    # Response{Status: &Status{}, Payload: "x"}.
    client = ClientConnection()
    sid, _ = client.send_request("s", "m")
    body = b"\x0a\x00\x12\x01x"
    assert encode_response(Response(Status(), b"x")) == body
    [event] = client.receive_data(encode_header(len(body), sid, 2) + body)
    assert event.response.payload == b"x"


# -- flow control: a peer's load is bounded by backpressure (issue 15 item 7) ------

READ_SIZE = _RECEIVE_SIZE  # what the trio server reads at a time


def parked_requests(count: int, size: int) -> bytes:
    client = ClientConnection()
    return b"".join(client.send_request("s", "Park", bytes(size))[1] for _ in range(count))


def feed_while_allowed(
    server: ServerConnection, wire: memoryview
) -> tuple[list[ServerEvent], memoryview]:
    """Act as the transport: read READ_SIZE chunks only while ``can_receive``."""
    events: list[ServerEvent] = []
    while wire and server.can_receive:
        events += server.receive_data(wire[:READ_SIZE])
        wire = wire[READ_SIZE:]
    return events, wire


def test_parked_large_requests_stop_reading_instead_of_buffering() -> None:
    # The shape of the report (64 parked 4 MiB requests), scaled down.
    limit = 1 << 20
    server = ServerConnection(max_buffered_bytes=limit)
    bound = max(limit, 10 + MAX_MESSAGE_SIZE) + READ_SIZE
    wire = memoryview(parked_requests(16, limit))
    events, rest = feed_while_allowed(server, wire)
    assert not server.can_receive  # backpressure: the rest stays with the peer
    assert len(events) == 1
    assert server.buffered_bytes <= 2 * limit
    assert len(rest) > 14 * limit
    # Each answer lets (about) one more in; none is refused.
    answered = 0
    while events or rest:
        for event in events:
            assert isinstance(event, RequestReceived)
            data = server.send_response(event.stream_id)
            assert server.buffered_bytes <= bound
            server.response_written(len(data))
            answered += 1
        events = server.events()
        more, rest = feed_while_allowed(server, rest)
        events += more
        assert server.buffered_bytes <= bound
        assert server.outstanding <= 2
    assert answered == 16
    assert server.buffered_bytes == 0


def test_call_limit_holds_frames_back_until_a_call_is_answered() -> None:
    server = ServerConnection(max_calls=3)
    wire = parked_requests(5, 1) + encode_frame(2, MessageType.REQUEST, b"")  # even id
    first = server.receive_data(wire)
    assert [e.stream_id for e in first] == [1, 3, 5]
    assert not server.can_receive
    assert server.events() == []  # still at the limit
    server.response_written(len(server.send_response(3)))
    assert not server.can_receive  # held-back frames come out of events() first
    [fourth] = server.events()
    assert fourth.stream_id == 7
    server.send_response(1)
    assert server.events() == [RequestReceived(9, Request("s", "Park", b"\0"))]
    server.send_response(5)
    [rejected] = server.events()  # rejected requests count as calls too
    assert isinstance(rejected, RequestRejected)
    assert rejected.code is Code.INVALID_ARGUMENT
    assert server.outstanding == 3
    assert not server.can_receive  # back at the limit of 3
    server.send_response(2, code=Code.INVALID_ARGUMENT, message="even")
    assert server.events() == []
    assert server.can_receive  # nothing held back now


def test_a_message_above_the_byte_limit_still_gets_through() -> None:
    server = ServerConnection(max_buffered_bytes=100)
    wire = memoryview(parked_requests(2, 5000))
    events: list[ServerEvent] = []
    while wire and server.can_receive:
        events += server.receive_data(wire[:1000])
        wire = wire[1000:]
    assert [e.stream_id for e in events] == [1]
    assert not server.can_receive  # the first is in flight and over the limit
    server.response_written(len(server.send_response(1)))
    while wire and server.can_receive:
        events += server.receive_data(wire[:1000])
        wire = wire[1000:]
    assert [e.stream_id for e in events] == [1, 3]


def test_unwritten_responses_count_until_reported() -> None:
    server = ServerConnection(max_buffered_bytes=1000)
    [event] = server.receive_data(request_frame(1))
    held = server.buffered_bytes
    assert held == len(request_frame(1))
    data = server.send_response(event.stream_id, bytes(2000))
    assert server.buffered_bytes == len(data)
    assert not server.can_receive  # a slow reader stops us reading too
    server.response_written(100)
    assert server.buffered_bytes == len(data) - 100
    with pytest.raises(LocalProtocolError):
        server.response_written(len(data))
    server.response_written(len(data) - 100)
    assert server.buffered_bytes == 0
    assert server.can_receive


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ServerConnection(max_calls=0)
    with pytest.raises(ValueError, match="must be positive"):
        ServerConnection(max_buffered_bytes=0)


def test_oversized_request_charges_only_its_header() -> None:
    server = ServerConnection(max_message_size=100)
    header = encode_header(1000, 1, MessageType.REQUEST)
    [event] = server.receive_data(header + bytes(1000))
    assert isinstance(event, RequestRejected)
    assert server.buffered_bytes == len(header)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=30),
    max_calls=st.integers(1, 6),
    limit=st.integers(1, 8000),
    read=st.integers(1, 4000),
    order=st.randoms(use_true_random=False),
)
# Found by hypothesis: answering an oversized request (charged its 10-byte header) with a
# 12-byte error grows what is held past the peer's bound; the bound is on the peer's bytes.
@example(sizes=[2040, 128, 128, 128, 1588], max_calls=5, limit=2058, read=1,
         order=random.Random(2))
def test_flow_control_bounds_hold_and_every_request_gets_through(
    sizes: list[int], max_calls: int, limit: int, read: int, order: random.Random
) -> None:
    server = ServerConnection(max_message_size=2048, max_calls=max_calls, max_buffered_bytes=limit)
    client = ClientConnection(max_message_size=1 << 20)
    wire = memoryview(b"".join(client.send_request("s", "m", bytes(n))[1] for n in sizes))
    bound = max(limit, 10 + 2048) + read
    pending: list[int] = []
    seen: list[int] = []
    unwritten: list[int] = []
    while wire or pending or unwritten:
        if wire and server.can_receive:
            new = server.receive_data(wire[:read])
            wire = wire[read:]
        else:
            # Stuck for input: answer a call or report a write, in random order.
            assert pending or unwritten, "flow control deadlocked"
            if unwritten and (not pending or order.random() < 0.5):
                server.response_written(unwritten.pop(order.randrange(len(unwritten))))
            else:
                sid = pending.pop(order.randrange(len(pending)))
                unwritten.append(len(server.send_response(sid)))
            new = server.events()
        for event in new:
            pending.append(event.stream_id)
            seen.append(event.stream_id)
        assert server.outstanding <= max_calls
        # The peer's bytes; an unwritten error response may outgrow its request's charge.
        assert server.peer_bytes <= bound
    assert seen == [1 + 2 * n for n in range(len(sizes))]
    assert server.buffered_bytes == 0
