from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class UpgradeRequest(_message.Message):
    __slots__ = ("quiesce_timeout_seconds",)
    QUIESCE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    quiesce_timeout_seconds: float
    def __init__(self, quiesce_timeout_seconds: _Optional[float] = ...) -> None: ...

class UpgradeResponse(_message.Message):
    __slots__ = ("pid", "upgrade_attempts", "from_code", "to_code")
    PID_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FROM_CODE_FIELD_NUMBER: _ClassVar[int]
    TO_CODE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    upgrade_attempts: int
    from_code: str
    to_code: str
    def __init__(self, pid: _Optional[int] = ..., upgrade_attempts: _Optional[int] = ..., from_code: _Optional[str] = ..., to_code: _Optional[str] = ...) -> None: ...
