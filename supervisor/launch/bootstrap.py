"""``start``'s stdin: a bare ``Any`` (containerd up to 2.2) or a ``BootstrapParams`` (2.3).

Up to 2.2, containerd writes the runtime options on ``start``'s stdin as a
serialized ``google.protobuf.Any`` (maybe nothing at all).  containerd 2.3
writes a ``containerd.runtime.bootstrap.v1.BootstrapParams`` instead (its
``pkg/shim/util.go``; our copy of the schema is
``supervisor/api/runtime/bootstrap/v1/bootstrap.proto``)::

    BootstrapParams{instance_id=1, namespace=2, log_level=3 (int32 enum),
                    containerd_version=4, containerd_ttrpc_address=5,
                    containerd_grpc_address=6, containerd_binary=7,
                    extensions=8 (repeated Extension{value=1 Any}),
                    socket_dir=9 (optional)}

with the runtime options as one of the ``extensions``, unchanged.  It still
passes the same command line (``-id``, ``-namespace``, ``-address``,
``-debug``) and environment (``TTRPC_ADDRESS``).

Telling them apart
------------------
Both are protobuf, and an ``Any``'s fields (``type_url=1``, ``value=2``) are
both length-delimited, like ``instance_id`` and ``namespace``: any
``BootstrapParams`` made of those two fields alone parses as an ``Any`` and
vice versa.  So, as containerd's own Go shims do (``pkg/shim/compat.go``),
stdin is a ``BootstrapParams`` exactly when its field 1 equals ``-id`` and
its field 2 equals ``-namespace``: an ``Any`` would need a type URL equal to
the container id and a payload equal to the namespace's bytes.  Bytes that
match neither -- fields an ``Any`` does not have (3 to 9) without the
matching identity, or no protobuf at all -- are a :class:`BootstrapError`
naming what was found, not a confusing "unsupported options type".

What ``start`` takes from a ``BootstrapParams``: the runtime options (the
first extension whose message is one of :data:`OPTION_TYPES`, else the first
extension, so an unknown one is reported by the options decoder as on 2.2),
``socket_dir`` (where to bind, :attr:`Flags.socket_dir`), ``log_level``
(debug or more verbose turns on ``-debug``) and the containerd addresses when
the command line lacks them.  ``start`` answers every version the same way,
with a plain address: 2.3 first tries its stdout as a ``BootstrapResult``
protobuf, which ``unix://...`` never parses as (its sixth byte, ``/``, has
wire type 7), then reads it as the plain address of a version-2 (ttrpc) shim.
Version 3 (Task API v3, the Sandbox API) is not claimed.

Standard library only (:mod:`supervisor.launch`'s rule), decoded with
:mod:`~supervisor.launch._pbwire`.
"""

from __future__ import annotations

import os

from supervisor.launch._pbwire import WireError, fields
from supervisor.launch.runopts import MESSAGES

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from supervisor.launch.flags import Flags

#: Full names of the runtime options messages the shim decodes
#: (:data:`supervisor.launch.runopts.MESSAGES`'s; ``tests/unit/test_bootstrap.py``
#: checks each is decodable).
OPTION_TYPES = tuple(MESSAGES)
#: ``LogLevel.LOG_LEVEL_DEBUG``: this or more verbose (more negative) means ``-debug``.
LOG_LEVEL_DEBUG = -4

_STRING_FIELDS = {1: "instance_id", 2: "namespace", 4: "containerd_version",
                  5: "containerd_ttrpc_address", 6: "containerd_grpc_address",
                  7: "containerd_binary", 9: "socket_dir"}


class BootstrapError(ValueError):
    """``start``'s stdin is neither runtime options nor this container's BootstrapParams."""


class Params:
    """The parts of a ``BootstrapParams`` the shim uses.  A plain class (``start`` stays light)."""

    __slots__ = ("containerd_binary", "containerd_grpc_address", "containerd_ttrpc_address",
                 "containerd_version", "extensions", "instance_id", "log_level", "namespace",
                 "socket_dir")

    def __init__(self) -> None:
        self.instance_id = ""
        self.namespace = ""
        self.log_level = 0
        self.containerd_version = ""
        self.containerd_ttrpc_address = ""
        self.containerd_grpc_address = ""
        self.containerd_binary = ""
        #: Each extension's ``Any``, serialized as it came.
        self.extensions: list[bytes] = []
        self.socket_dir = ""

    def options(self) -> bytes:
        """The runtime options: a serialized ``Any``, or b"" when there is none."""
        for extension in self.extensions:
            if type_name(extension) in OPTION_TYPES:
                return extension
        return self.extensions[0] if self.extensions else b""


def type_name(any_bytes: bytes) -> str:
    """The full message name an ``Any``'s type URL names ("" if it cannot be read)."""
    try:
        for number, value in fields(any_bytes):
            if number == 1 and isinstance(value, bytes):
                return value.decode("utf-8", "replace").rsplit("/", 1)[-1]
    except WireError:
        pass
    return ""


def _int32(value: int) -> int:
    """A varint read as protobuf's int32 (negative ones are 10-byte two's complement)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def parse_params(data: bytes) -> Params:
    """Decode a ``BootstrapParams``; :class:`BootstrapError` for malformed bytes."""
    params = Params()
    try:
        for number, value in fields(data):
            if number in _STRING_FIELDS:
                if not isinstance(value, bytes):
                    raise BootstrapError(f"BootstrapParams field {number} is not a string")
                setattr(params, _STRING_FIELDS[number], value.decode("utf-8"))
            elif number == 3:
                if not isinstance(value, int):
                    raise BootstrapError("BootstrapParams log_level is not a varint")
                params.log_level = _int32(value)
            elif number == 8:
                if not isinstance(value, bytes):
                    raise BootstrapError("BootstrapParams extension is not a message")
                wrapped = b""
                for inner, any_bytes in fields(value):
                    if inner == 1 and isinstance(any_bytes, bytes):
                        wrapped = any_bytes
                params.extensions.append(wrapped)
            # unknown fields are skipped, as protobuf does
    except (WireError, UnicodeDecodeError) as e:
        raise BootstrapError(f"malformed BootstrapParams on stdin: {e}") from None
    return params


def _identity(data: bytes) -> tuple[bytes | None, bytes | None, bool]:
    """(field 1, field 2, whether a field an ``Any`` lacks is present); WireError if no protobuf."""
    first = second = None
    foreign = False
    for number, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            first = value
        elif number == 2 and isinstance(value, bytes):
            second = value
        else:
            foreign = True
    return first, second, foreign


def read_stdin(data: bytes, container_id: str, namespace: str) -> tuple[bytes, Params | None]:
    """(runtime options as a serialized ``Any`` or b"", the BootstrapParams if that is what came).

    See the module docstring for how the two are told apart.
    """
    if not data:
        return b"", None
    try:
        first, second, foreign = _identity(data)
    except WireError:
        return data, None  # not protobuf at all: the options decoder says so
    if first == container_id.encode() and second == namespace.encode():
        params = parse_params(data)
        return params.options(), params
    if foreign:
        shown = (first or b"").decode("utf-8", "replace")[:80]
        raise BootstrapError(
            f"stdin holds neither runtime options (an Any) nor the BootstrapParams of "
            f"container {container_id!r} in namespace {namespace!r} (field 1 is {shown!r})")
    return data, None


def apply(params: Params, flags: Flags) -> None:
    """Take from ``params`` what the command line and environment do not say: the socket
    directory, debug, and containerd's addresses."""
    if params.socket_dir:
        flags.socket_dir = params.socket_dir
    if params.log_level <= LOG_LEVEL_DEBUG:
        flags.debug = True
    if not flags.address and params.containerd_grpc_address:
        flags.address = params.containerd_grpc_address
    if not os.environ.get("TTRPC_ADDRESS") and params.containerd_ttrpc_address:
        os.environ["TTRPC_ADDRESS"] = params.containerd_ttrpc_address  # the daemon's events


