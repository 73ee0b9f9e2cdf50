import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShimRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShimResponse(_message.Message):
    __slots__ = ("pid", "version", "namespace", "address", "started_at", "uptime_seconds", "memory_rss_bytes", "memory_pss_bytes", "open_fds", "runtime_binary", "runtime_version", "runtime_version_error", "container_count", "python_version", "reserved", "closing", "code", "upgrades", "upgrade_attempts", "last_upgrade_error", "upgraded_at")
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BINARY_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_COUNT_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    CLOSING_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    UPGRADES_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_UPGRADE_ERROR_FIELD_NUMBER: _ClassVar[int]
    UPGRADED_AT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    version: str
    namespace: str
    address: str
    started_at: _timestamp_pb2.Timestamp
    uptime_seconds: float
    memory_rss_bytes: int
    memory_pss_bytes: int
    open_fds: int
    runtime_binary: str
    runtime_version: str
    runtime_version_error: str
    container_count: int
    python_version: str
    reserved: _containers.RepeatedScalarFieldContainer[str]
    closing: bool
    code: str
    upgrades: int
    upgrade_attempts: int
    last_upgrade_error: str
    upgraded_at: _timestamp_pb2.Timestamp
    def __init__(self, pid: _Optional[int] = ..., version: _Optional[str] = ..., namespace: _Optional[str] = ..., address: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., memory_rss_bytes: _Optional[int] = ..., memory_pss_bytes: _Optional[int] = ..., open_fds: _Optional[int] = ..., runtime_binary: _Optional[str] = ..., runtime_version: _Optional[str] = ..., runtime_version_error: _Optional[str] = ..., container_count: _Optional[int] = ..., python_version: _Optional[str] = ..., reserved: _Optional[_Iterable[str]] = ..., closing: _Optional[bool] = ..., code: _Optional[str] = ..., upgrades: _Optional[int] = ..., upgrade_attempts: _Optional[int] = ..., last_upgrade_error: _Optional[str] = ..., upgraded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ContainersRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ContainersResponse(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    def __init__(self, containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "namespace", "bundle", "runtime_binary", "created", "init", "execs")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BINARY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    EXECS_FIELD_NUMBER: _ClassVar[int]
    id: str
    namespace: str
    bundle: str
    runtime_binary: str
    created: bool
    init: Process
    execs: _containers.RepeatedCompositeFieldContainer[Process]
    def __init__(self, id: _Optional[str] = ..., namespace: _Optional[str] = ..., bundle: _Optional[str] = ..., runtime_binary: _Optional[str] = ..., created: _Optional[bool] = ..., init: _Optional[_Union[Process, _Mapping]] = ..., execs: _Optional[_Iterable[_Union[Process, _Mapping]]] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("exec_id", "pid", "status", "exit_status", "exited", "exited_at", "stdio", "io")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    IO_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    pid: int
    status: str
    exit_status: int
    exited: bool
    exited_at: _timestamp_pb2.Timestamp
    stdio: Stdio
    io: IOCounters
    def __init__(self, exec_id: _Optional[str] = ..., pid: _Optional[int] = ..., status: _Optional[str] = ..., exit_status: _Optional[int] = ..., exited: _Optional[bool] = ..., exited_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stdio: _Optional[_Union[Stdio, _Mapping]] = ..., io: _Optional[_Union[IOCounters, _Mapping]] = ...) -> None: ...

class Stdio(_message.Message):
    __slots__ = ("stdin", "stdout", "stderr", "terminal")
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    def __init__(self, stdin: _Optional[str] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., terminal: _Optional[bool] = ...) -> None: ...

class IOCounters(_message.Message):
    __slots__ = ("kind", "stdin_bytes", "stdout_bytes", "stderr_bytes", "stdout_backlog_bytes", "stderr_backlog_bytes", "stdout_dropped_bytes", "stderr_dropped_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STDIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BACKLOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BACKLOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDOUT_DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    stdin_bytes: int
    stdout_bytes: int
    stderr_bytes: int
    stdout_backlog_bytes: int
    stderr_backlog_bytes: int
    stdout_dropped_bytes: int
    stderr_dropped_bytes: int
    def __init__(self, kind: _Optional[str] = ..., stdin_bytes: _Optional[int] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., stdout_backlog_bytes: _Optional[int] = ..., stderr_backlog_bytes: _Optional[int] = ..., stdout_dropped_bytes: _Optional[int] = ..., stderr_dropped_bytes: _Optional[int] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class EventsResponse(_message.Message):
    __slots__ = ("published", "delivered", "replayed", "pending_count", "oldest_pending_age_seconds", "last_error", "last_error_at", "spool_error", "pending", "recent", "spool_skipped")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    PENDING_COUNT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    SPOOL_ERROR_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    SPOOL_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    published: int
    delivered: int
    replayed: int
    pending_count: int
    oldest_pending_age_seconds: float
    last_error: str
    last_error_at: _timestamp_pb2.Timestamp
    spool_error: str
    pending: _containers.RepeatedCompositeFieldContainer[Event]
    recent: _containers.RepeatedCompositeFieldContainer[Event]
    spool_skipped: int
    def __init__(self, published: _Optional[int] = ..., delivered: _Optional[int] = ..., replayed: _Optional[int] = ..., pending_count: _Optional[int] = ..., oldest_pending_age_seconds: _Optional[float] = ..., last_error: _Optional[str] = ..., last_error_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spool_error: _Optional[str] = ..., pending: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., recent: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., spool_skipped: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "topic", "timestamp", "namespace", "type_url", "attempts", "first_error", "container_id", "process_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    topic: str
    timestamp: _timestamp_pb2.Timestamp
    namespace: str
    type_url: str
    attempts: int
    first_error: str
    container_id: str
    process_id: str
    def __init__(self, seq: _Optional[int] = ..., topic: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., namespace: _Optional[str] = ..., type_url: _Optional[str] = ..., attempts: _Optional[int] = ..., first_error: _Optional[str] = ..., container_id: _Optional[str] = ..., process_id: _Optional[str] = ...) -> None: ...
