"""containerd's ttrpc (v1.1, unary calls) for trio: a sans-IO core and a thin transport.

Layers, each importing only the ones above it (and nothing else of ours):

* ``_errors``/``_status`` -- :class:`ProtocolError` (local or remote),
  :class:`ConnectionClosed` (we closed it) / :class:`ConnectionBroken` (the peer
  did), the gRPC :class:`Code` enum and :class:`RPCError`.
* ``_wire`` -- a hand-written protobuf codec for ttrpc's envelope messages
  (``Request``, ``Response``, ``google.rpc.Status``); no generated code.
* ``_frame`` -- the 10-byte header (u32 length, u32 stream id, u8 type, u8
  flags, big-endian) and an incremental decoder; messages above
  :data:`MAX_MESSAGE_SIZE` are skipped without buffering and reported.
* ``_limits`` -- :class:`Limits`: what one peer may make the server hold
  (bytes and calls per connection, connections, the first-request timeout).
* ``_protocol`` -- ``ServerConnection``/``ClientConnection``: pure state
  machines, bytes in -> events, calls -> bytes out.  No I/O, no clocks.  The
  server side also does the per-connection flow control.
* ``_server``/``_client`` -- trio: :class:`Server` runs each request as a task
  and answers out of order; :class:`Client` multiplexes concurrent calls over
  one stream without a background task.

Invariants shared by all layers: malformed input raises only
:class:`ProtocolError`; per-call trouble (unknown method, deadline, oversized
message, a failing handler) is answered with a status and never costs the
connection; a broken connection never disturbs another; every error says
whether we or the peer are to blame.
"""

from ._client import Client, ClientHandover, Metadata, PendingCall, connect_unix
from ._errors import (
    ConnectionBroken,
    ConnectionClosed,
    ConnectionEnded,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from ._frame import MAX_MESSAGE_SIZE
from ._limits import Limits
from ._protocol import ClientSnapshot
from ._server import (
    NAMESPACE_KEY,
    CallContext,
    HandedOver,
    Handler,
    PeerCheck,
    PeerCredentials,
    Server,
    open_unix_listener,
    peer_credentials,
    require_same_uid,
    require_uid,
)
from ._status import Code, RPCError

__all__ = [
    "MAX_MESSAGE_SIZE",
    "NAMESPACE_KEY",
    "CallContext",
    "Client",
    "ClientHandover",
    "ClientSnapshot",
    "Code",
    "ConnectionBroken",
    "ConnectionClosed",
    "ConnectionEnded",
    "HandedOver",
    "Handler",
    "Limits",
    "LocalProtocolError",
    "Metadata",
    "PeerCheck",
    "PeerCredentials",
    "PendingCall",
    "ProtocolError",
    "RPCError",
    "RemoteProtocolError",
    "Server",
    "connect_unix",
    "open_unix_listener",
    "peer_credentials",
    "require_same_uid",
    "require_uid",
]
