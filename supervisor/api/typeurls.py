"""Map containerd's ``Any`` type URLs to our generated message classes and back.

containerd 1.6 marshals protobuf messages with ``github.com/containerd/typeurl``,
which names a (gogo) message by its bare full proto name: no
``type.googleapis.com/`` prefix, e.g. ``containerd.events.TaskExit``. When it
decodes, it looks that exact string up, so :func:`pack` must produce the bare
name. :func:`unpack` is more lenient and also accepts ``anything/<full name>``.

The OCI runtime-spec values containerd sends (the exec ``spec`` and the update
``resources``) are JSON, not protobuf; their type URLs are exported below as
constants so callers can recognise them, but they are not in the registry.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message

from supervisor.api import runtimeoptions_pb2 as runtimeoptions
from supervisor.api.cgroups.v1 import metrics_pb2 as cgroups_v1
from supervisor.api.cgroups.v2 import metrics_pb2 as cgroups_v2
from supervisor.api.events import task_pb2 as events
from supervisor.api.runc import options_pb2 as runc_options
from supervisor.api.runc import runctypes_pb2 as runctypes

__all__ = [
    "OCI_LINUX_RESOURCES",
    "OCI_PROCESS",
    "OCI_SPEC",
    "OCI_WINDOWS_RESOURCES",
    "UnknownTypeError",
    "is_type",
    "message_class",
    "pack",
    "registered",
    "type_url",
    "unpack",
    "unpack_as",
]

_OCI_PREFIX = "types.containerd.io/opencontainers/runtime-spec/1/"
#: JSON-encoded OCI runtime spec (``specs.Spec``).
OCI_SPEC = _OCI_PREFIX + "Spec"
#: JSON-encoded OCI process, as sent in ``ExecProcessRequest.spec``.
OCI_PROCESS = _OCI_PREFIX + "Process"
#: JSON-encoded OCI Linux resources, as sent in ``UpdateTaskRequest.resources``.
OCI_LINUX_RESOURCES = _OCI_PREFIX + "LinuxResources"
#: JSON-encoded OCI Windows resources.
OCI_WINDOWS_RESOURCES = _OCI_PREFIX + "WindowsResources"

M = TypeVar("M", bound=Message)


class UnknownTypeError(ValueError):
    """An ``Any`` carried a type URL that is not in the registry."""

    def __init__(self, type_url: str) -> None:
        super().__init__(f"unknown Any type URL {type_url!r}")
        self.type_url = type_url


_CLASSES: tuple[type[Message], ...] = (
    events.TaskCreate,
    events.TaskStart,
    events.TaskDelete,
    events.TaskIO,
    events.TaskExit,
    events.TaskOOM,
    events.TaskExecAdded,
    events.TaskExecStarted,
    events.TaskPaused,
    events.TaskResumed,
    events.TaskCheckpointed,
    runc_options.Options,
    runc_options.CheckpointOptions,
    runc_options.ProcessDetails,
    runctypes.RuncOptions,
    runctypes.CreateOptions,
    runctypes.CheckpointOptions,
    runctypes.ProcessDetails,
    runtimeoptions.Options,
    cgroups_v1.Metrics,
    cgroups_v2.Metrics,
)

_REGISTRY: dict[str, type[Message]] = {cls.DESCRIPTOR.full_name: cls for cls in _CLASSES}


def registered() -> dict[str, type[Message]]:
    """Return a copy of the registry: type URL -> message class."""
    return dict(_REGISTRY)


def type_url(message: Message | type[Message]) -> str:
    """The type URL containerd uses for ``message`` (an instance or a class)."""
    return message.DESCRIPTOR.full_name


def _name_of(url: str) -> str:
    """Strip an optional ``prefix/`` from a type URL, leaving the full name."""
    return url.rsplit("/", 1)[-1]


def message_class(url: str) -> type[Message]:
    """The registered class for ``url`` (bare or prefixed); UnknownTypeError if none."""
    cls = _REGISTRY.get(url) or _REGISTRY.get(_name_of(url))
    if cls is None:
        raise UnknownTypeError(url)
    return cls


def pack(message: Message) -> any_pb2.Any:
    """Wrap ``message`` in an Any named the way containerd's typeurl names it.

    Any message can be packed (as in Go, where unregistered protobuf types fall
    back to their proto name); an Any is returned unchanged.
    """
    if isinstance(message, any_pb2.Any):
        return message
    return any_pb2.Any(type_url=type_url(message), value=message.SerializeToString())


def unpack(value: any_pb2.Any) -> Message:
    """Decode a registered message out of ``value``.

    Raises UnknownTypeError for an unregistered type URL and
    ``google.protobuf.message.DecodeError`` for malformed bytes.
    """
    message = message_class(value.type_url)()
    message.ParseFromString(value.value)
    return message


def is_type(value: any_pb2.Any, cls: type[Message]) -> bool:
    """Whether ``value`` holds a ``cls`` (bare or prefixed type URL)."""
    return _name_of(value.type_url) == cls.DESCRIPTOR.full_name


def unpack_as(value: any_pb2.Any, cls: type[M]) -> M:
    """Decode ``value`` as ``cls``, which need not be registered.

    Raises UnknownTypeError if the type URL names a different message.
    """
    if not is_type(value, cls):
        raise UnknownTypeError(value.type_url)
    message = cls()
    message.ParseFromString(value.value)
    return message
