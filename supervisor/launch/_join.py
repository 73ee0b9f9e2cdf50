"""``start``'s side of the group service: ask a live shim to take one more container.

When ``start`` finds a shim already listening on the socket of a container's
group (a pod, a labelled group, a shared namespace shim), it must not just
print that address: the shim may be on its way out (its last container was
deleted and containerd's ``Shutdown`` is being answered), or already serve as
many containers as it may.  So it calls ``supervisor.group.v1.Group/Join``
(``supervisor/api/group/group.proto``) and acts on the answer:

========== ======================================================================
JOINED     the shim reserved a place: it will not exit before that container's
           ``Create`` (or the reservation lapses); print its address
FULL       it serves ``limit`` containers already: try the group's next socket
CLOSING    it is shutting down, or did not answer in time: the next socket
GONE       nothing listens (a shim that died): the socket may be replaced
========== ======================================================================

A shim too old to know the service (UNIMPLEMENTED) counts as JOINED, which is
what ``start`` did before the service existed.

Light on purpose, like the rest of ``start``: one ttrpc request and its
response framed by hand over a blocking ``_socket``, with no trio, no
protobuf runtime and no typing.
"""

from __future__ import annotations

import _socket
import errno
import struct
import time

from supervisor.launch._pbwire import WireError, field_bytes, field_varint, fields

SERVICE = "supervisor.group.v1.Group"
METHOD = "Join"

JOINED = "joined"
FULL = "full"
CLOSING = "closing"
GONE = "gone"

TIMEOUT = 2.0  # the whole exchange: a shim that takes longer is treated as closing

# ttrpc's frame: length of the payload, stream id, message type, flags (big-endian).
_HEADER = struct.Struct(">IIBB")
_REQUEST, _RESPONSE = 1, 2
_STREAM = 1  # a client's first stream id (odd)
_MAX_RESPONSE = 1 << 20

# gRPC status codes the service answers with (values from google.rpc.Code).
OK, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAVAILABLE = 0, 8, 12, 14


class JoinError(Exception):
    """The shim answered something this client does not understand."""


def encode_request(container_id: str, limit: int, timeout: float = TIMEOUT) -> bytes:
    """The framed ttrpc ``Request{service, method, payload=JoinRequest, timeout_nano}``."""
    payload = field_bytes(1, container_id.encode()) + field_varint(2, limit)
    body = (field_bytes(1, SERVICE.encode()) + field_bytes(2, METHOD.encode())
            + field_bytes(3, payload) + field_varint(4, int(timeout * 1e9)))
    return _HEADER.pack(len(body), _STREAM, _REQUEST, 0) + body


def decode_response(body: bytes) -> tuple[int, str, int]:
    """(status code, message, containers) of a ttrpc ``Response`` carrying a JoinResponse."""
    code, message, containers = OK, "", 0
    try:
        for number, value in fields(body):
            if number == 1 and isinstance(value, bytes):  # google.rpc.Status
                for n, v in fields(value):
                    if n == 1 and isinstance(v, int):
                        code = v
                    elif n == 2 and isinstance(v, bytes):
                        message = v.decode(errors="replace")
            elif number == 2 and isinstance(value, bytes):  # JoinResponse
                for n, v in fields(value):
                    if n == 1 and isinstance(v, int):
                        containers = v
    except WireError as e:
        raise JoinError(f"malformed response: {e}") from None
    return code, message, containers


def verdict(code: int, message: str = "") -> str:
    if code in (OK, UNIMPLEMENTED):
        return JOINED
    if code == RESOURCE_EXHAUSTED:
        return FULL
    if code == UNAVAILABLE:
        return CLOSING
    raise JoinError(f"the shim refused with status {code}" + (f": {message}" if message else ""))


def _recv_exactly(sock: _socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "the shim closed the connection")
        data += chunk
    return data


def join(path: str, container_id: str, limit: int, timeout: float = TIMEOUT) -> str:
    """Ask the shim on ``path`` to take ``container_id``: JOINED, FULL, CLOSING or GONE."""
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return GONE
        except OSError:
            return CLOSING  # a full backlog or a slow shim: not ours to replace
        try:
            sock.sendall(encode_request(container_id, limit, timeout))
            while True:
                length, stream, kind, _flags = _HEADER.unpack(
                    _recv_exactly(sock, _HEADER.size, deadline))
                if length > _MAX_RESPONSE:
                    raise JoinError(f"response of {length} bytes")
                body = _recv_exactly(sock, length, deadline)
                if kind == _RESPONSE and stream == _STREAM:
                    break
        except OSError:  # timed out, or the shim went away mid-call: it is leaving
            return CLOSING
        code, message, _containers = decode_response(body)
        return verdict(code, message)
    finally:
        sock.close()
