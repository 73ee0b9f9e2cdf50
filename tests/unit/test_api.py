"""Wire-compatibility tests for our .proto files against containerd 1.6's schema.

Expected names and numbers below are written out from containerd 1.6.20's and
containerd/cgroups 1.0.4's .proto files; the byte strings are encoded by hand
with the tiny encoder in this module, independently of the protobuf library.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from supervisor.api import runtimeoptions_pb2, typeurls
from supervisor.api.cgroups.v1 import metrics_pb2 as cg1
from supervisor.api.cgroups.v2 import metrics_pb2 as cg2
from supervisor.api.events import task_pb2 as events
from supervisor.api.events import ttrpc_pb2 as events_ttrpc
from supervisor.api.runc import options_pb2 as runc_options
from supervisor.api.runc import runctypes_pb2 as runctypes
from supervisor.api.task.v2 import shim_pb2 as shim
from supervisor.api.types import mount_pb2, task_pb2

if TYPE_CHECKING:
    # Message.DESCRIPTOR is typed as either the pure-Python or the upb descriptor.
    from google._upb._message import FieldDescriptor as _UpbFieldDescriptor

    _Field = FieldDescriptor | _UpbFieldDescriptor

# --------------------------------------------------------------------------
# A hand encoder for the protobuf wire format (just what the tests need).


def _varint(n: int) -> bytes:
    assert n >= 0
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _vi(num: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return _varint(num << 3) + _varint(value)


def _ld(num: int, payload: bytes | str) -> bytes:
    """A length-delimited field (wire type 2)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint((num << 3) | 2) + _varint(len(data)) + data


def _ts(seconds: int, nanos: int) -> bytes:
    return _vi(1, seconds) + _vi(2, nanos)


def _check(msg: Message, wire: bytes) -> None:
    """msg encodes to exactly ``wire`` and ``wire`` decodes back to msg."""
    assert msg.SerializeToString(deterministic=True) == wire
    assert type(msg).FromString(wire) == msg


# --------------------------------------------------------------------------
# Names: packages and message full names as containerd declares them.

MODULES: dict[ModuleType, tuple[str, list[str]]] = {
    mount_pb2: ("containerd.types", ["Mount"]),
    task_pb2: ("containerd.v1.types", ["Process", "ProcessInfo"]),
    shim: (
        "containerd.task.v2",
        [
            "CreateTaskRequest", "CreateTaskResponse", "DeleteRequest", "DeleteResponse",
            "ExecProcessRequest", "ExecProcessResponse", "ResizePtyRequest", "StateRequest",
            "StateResponse", "KillRequest", "CloseIORequest", "PidsRequest", "PidsResponse",
            "CheckpointTaskRequest", "UpdateTaskRequest", "StartRequest", "StartResponse",
            "WaitRequest", "WaitResponse", "StatsRequest", "StatsResponse", "ConnectRequest",
            "ConnectResponse", "ShutdownRequest", "PauseRequest", "ResumeRequest",
        ],
    ),
    events: (
        "containerd.events",
        [
            "TaskCreate", "TaskStart", "TaskDelete", "TaskIO", "TaskExit", "TaskOOM",
            "TaskExecAdded", "TaskExecStarted", "TaskPaused", "TaskResumed", "TaskCheckpointed",
        ],
    ),
    events_ttrpc: ("containerd.services.events.ttrpc.v1", ["ForwardRequest", "Envelope"]),
    runc_options: ("containerd.runc.v1", ["Options", "CheckpointOptions", "ProcessDetails"]),
    runctypes: (
        "containerd.linux.runc",
        ["RuncOptions", "CreateOptions", "CheckpointOptions", "ProcessDetails"],
    ),
    runtimeoptions_pb2: ("runtimeoptions.v1", ["Options"]),
    cg1: (
        "io.containerd.cgroups.v1",
        [
            "Metrics", "HugetlbStat", "PidsStat", "CPUStat", "CPUUsage", "Throttle",
            "MemoryStat", "MemoryEntry", "MemoryOomControl", "BlkIOStat", "BlkIOEntry",
            "RdmaStat", "RdmaEntry", "NetworkStat", "CgroupStats",
        ],
    ),
    cg2: (
        "io.containerd.cgroups.v2",
        [
            "Metrics", "PidsStat", "CPUStat", "MemoryStat", "MemoryEvents", "RdmaStat",
            "RdmaEntry", "IOStat", "IOEntry", "HugeTlbStat",
        ],
    ),
}


@pytest.mark.parametrize("module", list(MODULES), ids=lambda m: m.__name__)
def test_package_and_message_names(module: ModuleType) -> None:
    package, names = MODULES[module]
    assert module.DESCRIPTOR.package == package
    assert sorted(module.DESCRIPTOR.message_types_by_name) == sorted(names)
    for name in names:
        assert getattr(module, name).DESCRIPTOR.full_name == f"{package}.{name}"


def test_status_enum() -> None:
    status = task_pb2.DESCRIPTOR.enum_types_by_name["Status"]
    assert status.full_name == "containerd.v1.types.Status"
    assert dict(task_pb2.Status.items()) == {
        "UNKNOWN": 0, "CREATED": 1, "RUNNING": 2, "STOPPED": 3, "PAUSED": 4, "PAUSING": 5,
    }


# --------------------------------------------------------------------------
# Services.

TASK_RPCS = [
    ("State", "StateRequest", "StateResponse"),
    ("Create", "CreateTaskRequest", "CreateTaskResponse"),
    ("Start", "StartRequest", "StartResponse"),
    ("Delete", "DeleteRequest", "DeleteResponse"),
    ("Pids", "PidsRequest", "PidsResponse"),
    ("Pause", "PauseRequest", "google.protobuf.Empty"),
    ("Resume", "ResumeRequest", "google.protobuf.Empty"),
    ("Checkpoint", "CheckpointTaskRequest", "google.protobuf.Empty"),
    ("Kill", "KillRequest", "google.protobuf.Empty"),
    ("Exec", "ExecProcessRequest", "google.protobuf.Empty"),
    ("ResizePty", "ResizePtyRequest", "google.protobuf.Empty"),
    ("CloseIO", "CloseIORequest", "google.protobuf.Empty"),
    ("Update", "UpdateTaskRequest", "google.protobuf.Empty"),
    ("Wait", "WaitRequest", "WaitResponse"),
    ("Stats", "StatsRequest", "StatsResponse"),
    ("Connect", "ConnectRequest", "ConnectResponse"),
    ("Shutdown", "ShutdownRequest", "google.protobuf.Empty"),
]


def _qualify(name: str) -> str:
    return name if name.startswith("google.") else f"containerd.task.v2.{name}"


def test_task_service_has_every_rpc_of_containerd_1_6() -> None:
    service = shim.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    got = [(m.name, m.input_type.full_name, m.output_type.full_name) for m in service.methods]
    want = [(n, _qualify(i), _qualify(o)) for n, i, o in TASK_RPCS]
    assert got == want
    for method in service.methods:
        assert not method.client_streaming
        assert not method.server_streaming


def test_events_service_forward() -> None:
    service = events_ttrpc.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    [forward] = service.methods
    assert forward.name == "Forward"
    assert forward.input_type is events_ttrpc.ForwardRequest.DESCRIPTOR
    assert forward.output_type is empty_pb2.Empty.DESCRIPTOR


# --------------------------------------------------------------------------
# Hand-encoded bytes, from the field numbers in containerd's .proto files.


def test_task_exit_bytes() -> None:
    msg = events.TaskExit(
        container_id="c1", id="e1", pid=42, exit_status=137,
        exited_at=timestamp_pb2.Timestamp(seconds=5, nanos=6),
    )
    _check(msg, _ld(1, "c1") + _ld(2, "e1") + _vi(3, 42) + _vi(4, 137) + _ld(5, _ts(5, 6)))


def test_task_create_and_delete_bytes() -> None:
    create = events.TaskCreate(
        container_id="c", bundle="/b", rootfs=[mount_pb2.Mount(type="bind")],
        io=events.TaskIO(stdin="i", terminal=True), checkpoint="k", pid=9,
    )
    _check(
        create,
        _ld(1, "c") + _ld(2, "/b") + _ld(3, _ld(1, "bind"))
        + _ld(4, _ld(1, "i") + _vi(4, 1)) + _ld(5, "k") + _vi(6, 9),
    )
    delete = events.TaskDelete(container_id="c", pid=3, exit_status=1, id="x")
    _check(delete, _ld(1, "c") + _vi(2, 3) + _vi(3, 1) + _ld(5, "x"))


def test_create_task_request_rootfs_and_options_bytes() -> None:
    opts = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x08\x01")
    msg = shim.CreateTaskRequest(
        id="t", bundle="/run/b",
        rootfs=[mount_pb2.Mount(type="overlay", source="overlay", target="", options=["ro", "x"])],
        terminal=True, stdin="/in", checkpoint="cp", parent_checkpoint="pcp", options=opts,
    )
    mount = _ld(1, "overlay") + _ld(2, "overlay") + _ld(4, "ro") + _ld(4, "x")
    wire = (
        _ld(1, "t") + _ld(2, "/run/b") + _ld(3, mount) + _vi(4, 1) + _ld(5, "/in")
        + _ld(8, "cp") + _ld(9, "pcp")
        + _ld(10, _ld(1, "containerd.runc.v1.Options") + _ld(2, b"\x08\x01"))
    )
    _check(msg, wire)


def test_state_response_bytes() -> None:
    msg = shim.StateResponse(
        id="c", bundle="/b", pid=100, status=task_pb2.STOPPED, stdout="/o", terminal=True,
        exit_status=255, exited_at=timestamp_pb2.Timestamp(seconds=1), exec_id="e",
    )
    wire = (
        _ld(1, "c") + _ld(2, "/b") + _vi(3, 100) + _vi(4, 3) + _ld(6, "/o") + _vi(8, 1)
        + _vi(9, 255) + _ld(10, _vi(1, 1)) + _ld(11, "e")
    )
    _check(msg, wire)


def test_small_shim_messages_bytes() -> None:
    _check(shim.KillRequest(id="c", exec_id="e", signal=9, all=True),
           _ld(1, "c") + _ld(2, "e") + _vi(3, 9) + _vi(4, 1))
    _check(shim.ResizePtyRequest(id="c", exec_id="e", width=80, height=24),
           _ld(1, "c") + _ld(2, "e") + _vi(3, 80) + _vi(4, 24))
    _check(shim.CloseIORequest(id="c", exec_id="e", stdin=True),
           _ld(1, "c") + _ld(2, "e") + _vi(3, 1))
    _check(shim.ConnectResponse(shim_pid=1, task_pid=2, version="3"),
           _vi(1, 1) + _vi(2, 2) + _ld(3, "3"))
    _check(shim.ShutdownRequest(id="c", now=True), _ld(1, "c") + _vi(2, 1))
    _check(shim.WaitResponse(exit_status=7, exited_at=timestamp_pb2.Timestamp(nanos=1)),
           _vi(1, 7) + _ld(2, _vi(2, 1)))
    _check(shim.DeleteResponse(pid=5, exit_status=6, exited_at=timestamp_pb2.Timestamp()),
           _vi(1, 5) + _vi(2, 6) + _ld(3, b""))
    _check(shim.ExecProcessRequest(id="c", exec_id="e", terminal=True, stderr="/err",
                                   spec=any_pb2.Any(type_url=typeurls.OCI_PROCESS, value=b"{}")),
           _ld(1, "c") + _ld(2, "e") + _vi(3, 1) + _ld(6, "/err")
           + _ld(7, _ld(1, typeurls.OCI_PROCESS) + _ld(2, b"{}")))
    _check(shim.CheckpointTaskRequest(id="c", path="/p", options=any_pb2.Any(type_url="x")),
           _ld(1, "c") + _ld(2, "/p") + _ld(3, _ld(1, "x")))


def test_update_task_request_annotations_map() -> None:
    msg = shim.UpdateTaskRequest(id="c", annotations={"k": "v"})
    _check(msg, _ld(1, "c") + _ld(3, _ld(1, "k") + _ld(2, "v")))


def test_pids_response_process_info_bytes() -> None:
    details = runc_options.ProcessDetails(exec_id="e")
    msg = shim.PidsResponse(processes=[task_pb2.ProcessInfo(pid=7, info=typeurls.pack(details))])
    info = _ld(1, "containerd.runc.v1.ProcessDetails") + _ld(2, _ld(1, "e"))
    _check(msg, _ld(1, _vi(1, 7) + _ld(2, info)))


def test_pids_are_uint32() -> None:
    _check(shim.CreateTaskResponse(pid=0xFFFFFFFF), b"\x08\xff\xff\xff\xff\x0f")
    with pytest.raises(ValueError):
        shim.CreateTaskResponse(pid=-1)
    with pytest.raises(ValueError):
        shim.CreateTaskResponse(pid=1 << 32)


def test_forward_request_bytes() -> None:
    event = typeurls.pack(events.TaskOOM(container_id="c"))
    msg = events_ttrpc.ForwardRequest(envelope=events_ttrpc.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=2), namespace="default",
        topic="/tasks/oom", event=event,
    ))
    any_wire = _ld(1, "containerd.events.TaskOOM") + _ld(2, _ld(1, "c"))
    _check(msg, _ld(1, _ld(1, _vi(1, 2)) + _ld(2, "default") + _ld(3, "/tasks/oom")
                    + _ld(4, any_wire)))


def test_runc_v1_options_bytes() -> None:
    msg = runc_options.Options(
        no_pivot_root=True, shim_cgroup="/s", io_uid=1000, io_gid=1001,
        binary_name="/usr/bin/runc", root="/run/r", criu_path="/c", systemd_cgroup=True,
        criu_image_path="/img", criu_work_path="/work",
    )
    wire = (
        _vi(1, 1) + _ld(3, "/s") + _vi(4, 1000) + _vi(5, 1001) + _ld(6, "/usr/bin/runc")
        + _ld(7, "/run/r") + _ld(8, "/c") + _vi(9, 1) + _ld(10, "/img") + _ld(11, "/work")
    )
    _check(msg, wire)
    ckpt = runc_options.CheckpointOptions(
        exit=True, empty_namespaces=["network"], cgroups_mode="soft",
        image_path="/img", work_path="/work",
    )
    _check(ckpt, _vi(1, 1) + _ld(6, "network") + _ld(7, "soft") + _ld(8, "/img") + _ld(9, "/work"))


def test_runctypes_bytes() -> None:
    create = runctypes.CreateOptions(
        no_pivot_root=True, no_new_keyring=True, shim_cgroup="/s", io_uid=1000, io_gid=1001,
        criu_work_path="/work", criu_image_path="/img",
    )
    wire = (
        _vi(1, 1) + _vi(8, 1) + _ld(9, "/s") + _vi(10, 1000) + _vi(11, 1001)
        + _ld(12, "/work") + _ld(13, "/img")
    )
    _check(create, wire)
    _check(runctypes.RuncOptions(runtime="runc", runtime_root="/r", criu_path="/c",
                                 systemd_cgroup=True),
           _ld(1, "runc") + _ld(2, "/r") + _ld(3, "/c") + _vi(4, 1))
    # Here work_path comes before image_path, unlike containerd.runc.v1.CheckpointOptions.
    _check(runctypes.CheckpointOptions(work_path="/work", image_path="/img"),
           _ld(8, "/work") + _ld(9, "/img"))


def test_runtimeoptions_bytes() -> None:
    _check(runtimeoptions_pb2.Options(type_url="t", config_path="/etc/x.toml"),
           _ld(1, "t") + _ld(2, "/etc/x.toml"))


def test_cgroups_v1_metrics_bytes() -> None:
    msg = cg1.Metrics(
        hugetlb=[cg1.HugetlbStat(usage=1, pagesize="2MB")],
        cpu=cg1.CPUStat(usage=cg1.CPUUsage(total=10, per_cpu=[1, 2])),
        memory=cg1.MemoryStat(rss=3, kernel_tcp=cg1.MemoryEntry(usage=4)),
        memory_oom_control=cg1.MemoryOomControl(oom_kill=5),
    )
    # proto3 packs repeated scalars; gogo's generated Go code does too.
    cpu = _ld(1, _vi(1, 10) + _ld(4, b"\x01\x02"))
    memory = _vi(2, 3) + _ld(36, _vi(2, 4))
    wire = (
        _ld(1, _vi(1, 1) + _ld(4, "2MB")) + _ld(3, cpu) + _ld(4, memory)
        + _ld(9, _vi(3, 5))
    )
    _check(msg, wire)


def test_cgroups_v2_metrics_bytes() -> None:
    msg = cg2.Metrics(
        pids=cg2.PidsStat(current=1, limit=2),
        cpu=cg2.CPUStat(usage_usec=3, throttled_usec=4),
        memory=cg2.MemoryStat(usage=5, swap_limit=6),
        io=cg2.IOStat(usage=[cg2.IOEntry(major=8, rbytes=7)]),
        hugetlb=[cg2.HugeTlbStat(current=9, pagesize="1GB")],
        memory_events=cg2.MemoryEvents(oom_kill=10),
    )
    wire = (
        _ld(1, _vi(1, 1) + _vi(2, 2)) + _ld(2, _vi(1, 3) + _vi(6, 4))
        + _ld(4, _vi(32, 5) + _vi(35, 6)) + _ld(6, _ld(1, _vi(1, 8) + _vi(3, 7)))
        + _ld(7, _vi(1, 9) + _ld(3, "1GB")) + _ld(8, _vi(5, 10))
    )
    _check(msg, wire)
    # Field 3 of Metrics is unused upstream.
    assert 3 not in cg2.Metrics.DESCRIPTOR.fields_by_number


# --------------------------------------------------------------------------
# Round trip of every message, with every field set.


def _scalar(field: _Field) -> object:
    """A non-default value for a scalar or enum field (full range for unsigned)."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-é"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xff"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return (1 << 64) - field.number
    if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return (1 << 32) - field.number
    return field.number


def _fill(msg: Message, depth: int = 0) -> Message:
    """Set every field of msg (two entries in repeated ones), recursively."""
    if depth > 3:
        return msg
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value["key"] = "value"
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.is_repeated:
            for _ in range(2):
                _fill(value.add(), depth + 1)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            value.SetInParent()
            _fill(value, depth + 1)
        elif field.is_repeated:
            value.extend([_scalar(field), _scalar(field)])
        else:
            setattr(msg, field.name, _scalar(field))
    return msg


ALL_MESSAGES = [
    getattr(module, name) for module, (_, names) in MODULES.items() for name in names
]


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_round_trip_every_message(cls: type[Message]) -> None:
    msg = _fill(cls())
    assert isinstance(msg, cls)
    for field in cls.DESCRIPTOR.fields:
        if field.is_repeated:
            assert len(getattr(msg, field.name)) > 0, field.name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            assert msg.HasField(field.name), field.name
    wire = msg.SerializeToString()
    assert cls.FromString(wire) == msg
    assert cls.FromString(b"") == cls()


@given(
    container_id=st.text(),
    exec_id=st.text(),
    pid=st.integers(0, 2**32 - 1),
    exit_status=st.integers(0, 2**32 - 1),
    seconds=st.integers(-62135596800, 253402300799),
    nanos=st.integers(0, 999_999_999),
)
def test_task_exit_round_trip_through_any(
    *,
    container_id: str, exec_id: str, pid: int, exit_status: int, seconds: int, nanos: int,
) -> None:
    msg = events.TaskExit(
        container_id=container_id, id=exec_id, pid=pid, exit_status=exit_status,
        exited_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
    )
    assert typeurls.unpack(typeurls.pack(msg)) == msg


# --------------------------------------------------------------------------
# typeurls.

REGISTERED = {
    "containerd.events.TaskCreate", "containerd.events.TaskStart",
    "containerd.events.TaskDelete", "containerd.events.TaskIO", "containerd.events.TaskExit",
    "containerd.events.TaskOOM", "containerd.events.TaskExecAdded",
    "containerd.events.TaskExecStarted", "containerd.events.TaskPaused",
    "containerd.events.TaskResumed", "containerd.events.TaskCheckpointed",
    "containerd.runc.v1.Options", "containerd.runc.v1.CheckpointOptions",
    "containerd.runc.v1.ProcessDetails", "containerd.linux.runc.RuncOptions",
    "containerd.linux.runc.CreateOptions", "containerd.linux.runc.CheckpointOptions",
    "containerd.linux.runc.ProcessDetails", "runtimeoptions.v1.Options",
    "io.containerd.cgroups.v1.Metrics", "io.containerd.cgroups.v2.Metrics",
}


def test_registry_contents() -> None:
    registry = typeurls.registered()
    assert set(registry) == REGISTERED
    for url, cls in registry.items():
        assert cls.DESCRIPTOR.full_name == url


def test_pack_uses_bare_full_name() -> None:
    packed = typeurls.pack(events.TaskExit(container_id="c", pid=1))
    assert packed.type_url == "containerd.events.TaskExit"
    assert packed.value == _ld(1, "c") + _vi(3, 1)
    assert typeurls.pack(runc_options.Options()).type_url == "containerd.runc.v1.Options"
    assert typeurls.pack(cg2.Metrics()).type_url == "io.containerd.cgroups.v2.Metrics"
    assert typeurls.type_url(runctypes.CreateOptions) == "containerd.linux.runc.CreateOptions"


def test_pack_passes_any_through_and_packs_unregistered() -> None:
    already = any_pb2.Any(type_url="x.Y", value=b"z")
    assert typeurls.pack(already) is already
    assert typeurls.pack(shim.StartRequest(id="a")).type_url == "containerd.task.v2.StartRequest"


@pytest.mark.parametrize("prefix", ["", "type.googleapis.com/", "types.containerd.io/a/b/"])
def test_unpack_bare_and_prefixed(prefix: str) -> None:
    msg = runctypes.CreateOptions(io_uid=1000, shim_cgroup="/s")
    wire = _ld(9, "/s") + _vi(10, 1000)
    out = typeurls.unpack(any_pb2.Any(type_url=prefix + "containerd.linux.runc.CreateOptions",
                                      value=wire))
    assert isinstance(out, runctypes.CreateOptions)
    assert out == msg


@pytest.mark.parametrize(
    "url", ["", "containerd.events.Nope", "type.googleapis.com/x.Y", typeurls.OCI_PROCESS],
)
def test_unpack_unknown(url: str) -> None:
    with pytest.raises(typeurls.UnknownTypeError) as info:
        typeurls.unpack(any_pb2.Any(type_url=url, value=b""))
    assert info.value.type_url == url
    assert isinstance(info.value, ValueError)
    assert repr(url) in str(info.value)


def test_is_type_and_unpack_as() -> None:
    packed = typeurls.pack(events.TaskStart(container_id="c", pid=2))
    assert typeurls.is_type(packed, events.TaskStart)
    assert not typeurls.is_type(packed, events.TaskExit)
    start: events.TaskStart = typeurls.unpack_as(packed, events.TaskStart)
    assert start.pid == 2
    with pytest.raises(typeurls.UnknownTypeError):
        typeurls.unpack_as(packed, events.TaskExit)
    # unpack_as works for messages outside the registry too.
    req = typeurls.unpack_as(typeurls.pack(shim.StateRequest(id="a")), shim.StateRequest)
    assert req.id == "a"


def test_oci_type_urls() -> None:
    assert typeurls.OCI_PROCESS == "types.containerd.io/opencontainers/runtime-spec/1/Process"
    assert typeurls.OCI_LINUX_RESOURCES == (
        "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    )
    assert typeurls.OCI_SPEC == "types.containerd.io/opencontainers/runtime-spec/1/Spec"
