"""Cgroup metrics for the shim's ``Stats`` call, read the way containerd's runc shim does.

Design
------
``Stats`` answers ``StatsResponse{stats: Any}``.  containerd's own runc shim (1.6)
loads the container's cgroup from its init pid once and, on each ``Stats``,
returns

* ``io.containerd.cgroups.v2.Metrics`` when the host is *unified* (cgroup2 mounted
  at ``/sys/fs/cgroup``), read from the process's ``0::`` group;
* ``io.containerd.cgroups.v1.Metrics`` otherwise (legacy *and* hybrid hosts), read
  from one directory per v1 controller, ``/sys/fs/cgroup/<controller>/<group>``.

This module does the same with plain, synchronous file reads (a dozen small
files in pseudo file systems; nothing here blocks for long):

* :func:`cgroup_mode` decides the mode like ``cgroups.Mode()``: ``statfs`` of the
  root and of ``<root>/unified`` compared with ``CGROUP2_SUPER_MAGIC``.
* :func:`cgroup_paths` parses ``/proc/<pid>/cgroup`` into a :class:`CgroupPaths`
  (v1 controller -> directory, plus the unified directory), localising v1 groups
  against the mount roots in ``/proc/self/mountinfo`` as the Go library does for
  nested cgroup namespaces.
* :func:`collect_v1` / :func:`collect_v2` read a cgroup into the generated
  messages; :func:`stats_for_paths` / :func:`stats_for_pid` choose by mode and
  pack the result with :func:`supervisor.api.typeurls.pack`.

A shim should call :func:`cgroup_paths` once, when the init process starts, and
keep the result: like the Go shim it can then still report metrics after the
init process has exited (the cgroup lives until ``runc delete``).

Invariants
----------
* Fields mean what the Go library's fields mean: the same source file and key
  for every field, the same units (v1 CPU times in nanoseconds, converted from
  ``USER_HZ`` ticks for ``cpuacct.stat``; v2 in microseconds), the same
  conventions for ``max`` (v1 ``pids.max`` -> 0; v2 ``pids.max``, ``memory.max``,
  ``memory.swap.max``, ``hugetlb.*.max`` -> 2**64-1; rdma ``max`` -> 2**32-1) and
  negative values read as 0.
* Sub-messages that ``ctr task metrics`` dereferences are always present when
  their parent is: v1 ``cpu`` with ``usage`` and ``throttling`` always; v1
  ``memory`` (present iff ``memory.stat`` was readable) always carries ``usage``,
  ``swap``, ``kernel`` and ``kernel_tcp``.  v2 ``pids``, ``cpu``, ``memory``,
  ``io`` and ``rdma`` are always present; ``memory_events`` only when
  ``memory.events`` had entries.
* Missing controllers, files and keys are skipped, never errors (the Go shim
  passes ``IgnoreNotExist``); unparsable lines or values are skipped too, where
  Go would fail the whole call.  Unlike Go, one missing file (say the
  ``memsw`` files when swap accounting is off) does not hide the rest of its
  controller, and v2 ``cpu.stat`` is read even when ``cpu`` is not in
  ``cgroup.controllers`` (its usage counters exist in every group).
* Errors: :class:`ProcessLookupError` when the process is gone (its
  ``/proc/<pid>/cgroup`` cannot be read); :class:`CgroupNotFoundError` when there
  is no cgroup to read (deleted, no usable controller, or no cgroup file system).
  A ``Stats`` handler should answer both with containerd's NotFound.
* No state is kept between calls: every function reads the file system afresh.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias, TypeVar

from google.protobuf import any_pb2

from supervisor.api import typeurls
from supervisor.api.cgroups.v1 import metrics_pb2 as v1
from supervisor.api.cgroups.v2 import metrics_pb2 as v2
from supervisor.launch import procfs
from supervisor.launch.defaults import CGROUP_ROOT

__all__ = [
    "CGROUP2_SUPER_MAGIC",
    "CGROUP_ROOT",
    "CgroupMode",
    "CgroupNotFoundError",
    "CgroupPaths",
    "cgroup_mode",
    "cgroup_paths",
    "collect_v1",
    "collect_v2",
    "statfs_magic",
    "stats_for_paths",
    "stats_for_pid",
]

StrPath: TypeAlias = str | os.PathLike[str]
CgroupMode: TypeAlias = Literal["unavailable", "v1", "hybrid", "v2"]
_Rdma = TypeVar("_Rdma", v1.RdmaEntry, v2.RdmaEntry)

#: ``statfs.f_type`` of a cgroup2 file system.
CGROUP2_SUPER_MAGIC = 0x63677270

_U64_MAX = 2**64 - 1
_U32_MAX = 2**32 - 1
_NS_PER_SECOND = 1_000_000_000
# Controllers whose files collect_v1 reads; a v1 cgroup with none of them is
# "not found" (the Go library also counts freezer, devices, ... but those carry
# no metrics).
_V1_STAT_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "hugetlb", "rdma")
_HUGETLB_V1 = re.compile(r"^hugetlb\.([^.]+)\.usage_in_bytes$")
_HUGETLB_V2 = re.compile(r"^hugetlb\.([^.]+)\.(current|max)$")
_DECIMAL = re.compile(r"-?[0-9]+")
_PAGE_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)B$")


class CgroupNotFoundError(LookupError):
    """There is no cgroup to read metrics from (deleted, or no cgroup file system)."""


# --------------------------------------------------------------------------- mode


def statfs_magic(path: StrPath) -> int | None:
    """``statfs(path).f_type``, or None if ``statfs`` fails (e.g. no such path)."""
    # CDLL(None): the symbols already loaded (libc among them).  Not find_library,
    # which runs ldconfig/gcc in a child process: the shim reaps all children itself.
    statfs = ctypes.CDLL(None, use_errno=True).statfs
    buf = ctypes.create_string_buffer(256)  # larger than any arch's struct statfs
    if statfs(os.fsencode(path), buf) != 0:
        return None
    # f_type is the first member: a machine word everywhere but s390x (unsigned int).
    if platform.machine() == "s390x":
        return ctypes.c_uint.from_buffer(buf).value
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def cgroup_mode(
    root: StrPath = CGROUP_ROOT,
    *,
    fs_magic: Callable[[str], int | None] = statfs_magic,
) -> CgroupMode:
    """The host's cgroup mode, decided like containerd's ``cgroups.Mode()``.

    ``"v2"`` if ``root`` is a cgroup2 mount; else ``"hybrid"`` if
    ``<root>/unified`` is; else ``"v1"``; ``"unavailable"`` if ``root`` cannot
    be ``statfs``-ed.  ``fs_magic`` is injectable for tests.
    """
    magic = fs_magic(os.fspath(root))
    if magic is None:
        return "unavailable"
    if magic == CGROUP2_SUPER_MAGIC:
        return "v2"
    if fs_magic(os.path.join(os.fspath(root), "unified")) == CGROUP2_SUPER_MAGIC:
        return "hybrid"
    return "v1"


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class CgroupPaths:
    """Where one process's cgroups are.

    ``v1`` maps a v1 controller name (``"memory"``, ``"cpuacct"``, ...,
    ``"name=systemd"``) to its directory; ``unified`` is the directory of the
    ``0::`` group resolved against the same root (meaningful on v2 hosts), or
    None if the process has no ``0::`` line.
    """

    v1: Mapping[str, Path] = field(default_factory=dict)
    unified: Path | None = None


def _cgroup_mount_roots(mountinfo: str) -> dict[str, str]:
    """v1 controller (or ``name=...``) -> root of its cgroup mount, from mountinfo text."""
    roots: dict[str, str] = {}
    for controllers, root, _ in procfs.cgroup_mounts(procfs.parse_mountinfo(mountinfo)):
        for option in sorted(controllers):
            roots.setdefault(option, root)
    return roots


def _localise(group: str, mount_root: str | None) -> str:
    """A v1 group path relative to the root of the mount that shows it."""
    if mount_root is None or mount_root == "/":
        return os.path.normpath("/" + group)
    rel = os.path.relpath(os.path.normpath("/" + group), mount_root)
    return os.path.normpath("/" + ("" if rel == "." else rel))


def _join(root: StrPath, group: str) -> Path:
    return Path(root).joinpath(group.lstrip("/")) if group.strip("/") else Path(root)


def cgroup_paths(pid: int, *, root: StrPath = CGROUP_ROOT, proc: StrPath = "/proc") -> CgroupPaths:
    """The cgroup directories of process ``pid``.

    v1 controller ``c`` in group ``g`` is at ``<root>/<c>/<g>`` (``name=x``
    hierarchies at ``<root>/x``), with ``g`` made relative to its mount's root
    (``<proc>/self/mountinfo``, when readable); the unified group at
    ``<root>/<g>``.  Raises ProcessLookupError if the process is gone.
    """
    try:
        text = Path(proc, str(pid), "cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} not found") from exc
    groups, unified = procfs.cgroup_groups(text)
    try:
        mount_roots = _cgroup_mount_roots(Path(proc, "self", "mountinfo").read_text())
    except OSError:
        mount_roots = {}  # no mountinfo (fake trees): groups are taken as they are
    v1_dirs: dict[str, Path] = {}
    for name, group in groups.items():
        directory = name.removeprefix("name=")
        v1_dirs[name] = _join(Path(root, directory), _localise(group, mount_roots.get(name)))
    return CgroupPaths(
        v1=v1_dirs,
        unified=None if unified is None else _join(root, os.path.normpath("/" + unified)),
    )


# --------------------------------------------------------------------------- parsing helpers


def _parse_uint(text: str, bits: int = 64) -> int | None:
    """An unsigned decimal as Go's cgroups ``parseUint``: negatives are 0, junk is None."""
    text = text.strip()
    if _DECIMAL.fullmatch(text) is None:  # int() also takes "+1", "1_0", non-ASCII digits
        return None
    value = int(text)
    if value < 0:
        return 0
    return value if value < 2**bits else None


def _read(path: Path) -> str | None:
    """A file's text, or None if it cannot be read (missing, cgroup removed, ...)."""
    try:
        return path.read_text()
    except OSError:
        return None


def _read_uint(path: Path) -> int | None:
    text = _read(path)
    return None if text is None else _parse_uint(text)


def _read_limit(path: Path) -> int:
    """A v2 single-value file where ``max`` means unlimited (2**64-1); missing is 0."""
    text = _read(path)
    if text is None:
        return 0
    if text.strip() == "max":
        return _U64_MAX
    return _parse_uint(text) or 0


def _parse_kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, ...) -> {key: value}; bad lines skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and (value := _parse_uint(parts[1])) is not None:
            out[parts[0]] = value
    return out


def _read_kv(path: Path) -> dict[str, int] | None:
    text = _read(path)
    return None if text is None else _parse_kv(text)


def _rdma_entries(text: str, message: type[_Rdma]) -> list[_Rdma]:
    """``mlx4_0 hca_handle=2 hca_object=max`` lines -> RdmaEntry messages."""
    entries: list[_Rdma] = []
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) != 3:
            continue
        entry = message(device=parts[0])
        for kv in parts[1:]:
            key, sep, raw = kv.partition("=")
            if not sep:
                continue
            value = _U32_MAX if raw == "max" else _parse_uint(raw, 32)
            if value is None:
                continue
            if key == "hca_handle":
                entry.hca_handles = value
            elif key == "hca_object":
                entry.hca_objects = value
        entries.append(entry)
    return entries


def _page_size_key(size: str) -> float:
    """Sort key for hugetlb page-size names such as ``2MB`` / ``1GB``."""
    match = _PAGE_SIZE.match(size)
    if match is None:
        return float("inf")
    shift = 10 * " KMGTP".index(match.group(2) or " ")
    return float(match.group(1)) * (1 << shift)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# --------------------------------------------------------------------------- v1


# MemoryStat field -> memory.stat key (v1).  Where the names differ it is the
# Go field naming (pg_pg_in for pgpgin, hierarchical_swap_limit for
# hierarchical_memsw_limit); each total_* field mirrors its local one.
_V1_MEMORY_LOCAL = (
    ("cache", "cache"), ("rss", "rss"), ("rss_huge", "rss_huge"),
    ("mapped_file", "mapped_file"), ("dirty", "dirty"), ("writeback", "writeback"),
    ("pg_pg_in", "pgpgin"), ("pg_pg_out", "pgpgout"), ("pg_fault", "pgfault"),
    ("pg_maj_fault", "pgmajfault"), ("inactive_anon", "inactive_anon"),
    ("active_anon", "active_anon"), ("inactive_file", "inactive_file"),
    ("active_file", "active_file"), ("unevictable", "unevictable"),
)  # fmt: skip
_V1_MEMORY_STAT_KEYS = (
    *_V1_MEMORY_LOCAL,
    ("hierarchical_memory_limit", "hierarchical_memory_limit"),
    ("hierarchical_swap_limit", "hierarchical_memsw_limit"),
    *((f"total_{attr}", f"total_{key}") for attr, key in _V1_MEMORY_LOCAL),
)


def _v1_memory(path: Path, metrics: v1.Metrics) -> None:
    raw = _read_kv(path / "memory.stat")
    if raw is None:
        return
    mem = metrics.memory
    for attr, key in _V1_MEMORY_STAT_KEYS:
        setattr(mem, attr, raw.get(key, 0))
    for entry, module in (
        (mem.usage, "memory"),
        (mem.swap, "memory.memsw"),
        (mem.kernel, "memory.kmem"),
        (mem.kernel_tcp, "memory.kmem.tcp"),
    ):
        entry.SetInParent()
        for attr, suffix in (
            ("usage", "usage_in_bytes"),
            ("max", "max_usage_in_bytes"),
            ("failcnt", "failcnt"),
            ("limit", "limit_in_bytes"),
        ):
            value = _read_uint(path / f"{module}.{suffix}")
            if value is not None:
                setattr(entry, attr, value)
    oom = _read_kv(path / "memory.oom_control")
    if oom is not None:
        control = metrics.memory_oom_control
        control.SetInParent()
        control.oom_kill_disable = oom.get("oom_kill_disable", 0)
        control.under_oom = oom.get("under_oom", 0)
        control.oom_kill = oom.get("oom_kill", 0)


def _v1_cpu(path: Path, metrics: v1.Metrics) -> None:
    raw = _read_kv(path / "cpu.stat")
    if raw is None:
        return
    throttling = metrics.cpu.throttling
    throttling.periods = raw.get("nr_periods", 0)
    throttling.throttled_periods = raw.get("nr_throttled", 0)
    throttling.throttled_time = raw.get("throttled_time", 0)


def _v1_cpuacct(path: Path, metrics: v1.Metrics) -> None:
    usage = metrics.cpu.usage
    total = _read_uint(path / "cpuacct.usage")
    if total is not None:
        usage.total = total
    stat = _read_kv(path / "cpuacct.stat")
    if stat is not None:
        ticks = os.sysconf("SC_CLK_TCK") or 100  # cpuacct.stat counts USER_HZ ticks
        usage.user = stat.get("user", 0) * _NS_PER_SECOND // ticks
        usage.kernel = stat.get("system", 0) * _NS_PER_SECOND // ticks
    percpu = _read(path / "cpuacct.usage_percpu")
    if percpu is not None:
        values = [_parse_uint(v) for v in percpu.split()]
        if all(v is not None for v in values):
            usage.per_cpu[:] = [v for v in values if v is not None]


def _v1_pids(path: Path, metrics: v1.Metrics) -> None:
    current = _read_uint(path / "pids.current")
    limit = _read(path / "pids.max")
    if current is None or limit is None:
        return
    metrics.pids.current = current
    # v1 convention (Go cgroups.pidsController): "max" (no limit) is reported as 0.
    metrics.pids.limit = 0 if limit.strip() == "max" else (_parse_uint(limit) or 0)


def _block_devices(proc: Path) -> dict[tuple[int, int], str]:
    """(major, minor) -> /dev/<name>, from /proc/partitions; first occurrence wins."""
    devices: dict[tuple[int, int], str] = {}
    text = _read(proc / "partitions") or ""
    for line in text.splitlines()[2:]:
        parts = line.split()
        if len(parts) < 4 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        devices.setdefault((int(parts[0]), int(parts[1])), "/dev/" + parts[3])
    return devices


def _blkio_entries(text: str, devices: Mapping[tuple[int, int], str]) -> list[v1.BlkIOEntry]:
    """``8:0 Read 4096`` / ``8:0 4096`` lines -> BlkIOEntry; ``Total`` and junk skipped."""
    entries: list[v1.BlkIOEntry] = []
    for line in text.splitlines():
        fields = [f for f in re.split(r"[ :]", line) if f]
        if len(fields) < 3:
            continue
        major, minor = _parse_uint(fields[0]), _parse_uint(fields[1])
        op, raw = (fields[2], fields[3]) if len(fields) >= 4 else ("", fields[2])
        value = _parse_uint(raw)
        if major is None or minor is None or value is None:
            continue
        entries.append(
            v1.BlkIOEntry(
                op=op,
                device=devices.get((major, minor), ""),
                major=major,
                minor=minor,
                value=value,
            )
        )
    return entries


# (blkio file suffix, BlkIOStat field): the CFQ statistics, then the throttle
# counters that every blkio cgroup has.
_BLKIO_CFQ = (
    ("sectors_recursive", "sectors_recursive"),
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("time_recursive", "io_time_recursive"),
)
_BLKIO_THROTTLE = (
    ("throttle.io_serviced", "io_serviced_recursive"),
    ("throttle.io_service_bytes", "io_service_bytes_recursive"),
)


def _v1_blkio(path: Path, metrics: v1.Metrics, proc: Path) -> None:
    if not path.is_dir():
        return
    metrics.blkio.SetInParent()
    devices = _block_devices(proc)

    def read(table: Iterable[tuple[str, str]]) -> dict[str, list[v1.BlkIOEntry]]:
        out: dict[str, list[v1.BlkIOEntry]] = {}
        for suffix, attr in table:
            text = _read(path / f"blkio.{suffix}")
            if text is not None:
                out[attr] = _blkio_entries(text, devices)
        return out

    # The CFQ statistics when the kernel has them and they say something, else
    # the throttle counters (a cgroup whose devices use another scheduler).
    found: dict[str, list[v1.BlkIOEntry]] = {}
    if (path / "blkio.io_serviced_recursive").exists():
        found = read(_BLKIO_CFQ)
    if not any(found.values()):
        found = read(_BLKIO_THROTTLE)
    for attr, entries in found.items():
        getattr(metrics.blkio, attr).extend(entries)


def _v1_hugetlb(path: Path, metrics: v1.Metrics) -> None:
    sizes = [m.group(1) for name in _listdir(path) if (m := _HUGETLB_V1.match(name))]
    for size in sorted(sizes, key=_page_size_key):
        stat = v1.HugetlbStat(pagesize=size)
        for attr, suffix in (
            ("usage", "usage_in_bytes"),
            ("max", "max_usage_in_bytes"),
            ("failcnt", "failcnt"),
        ):
            value = _read_uint(path / f"hugetlb.{size}.{suffix}")
            if value is not None:
                setattr(stat, attr, value)
        metrics.hugetlb.append(stat)


def _v1_rdma(path: Path, metrics: v1.Metrics) -> None:
    current = _read(path / "rdma.current")
    limit = _read(path / "rdma.max")
    # A device that came or went between the two reads: report nothing (as Go).
    if current is None or limit is None or current.count("\n") != limit.count("\n"):
        return
    metrics.rdma.SetInParent()
    metrics.rdma.current.extend(_rdma_entries(current, v1.RdmaEntry))
    metrics.rdma.limit.extend(_rdma_entries(limit, v1.RdmaEntry))


def collect_v1(paths: Mapping[str, StrPath], *, proc: StrPath = "/proc") -> v1.Metrics:
    """Read a cgroup v1 group into ``io.containerd.cgroups.v1.Metrics``.

    ``paths`` maps controller names to directories (:attr:`CgroupPaths.v1`);
    ``proc`` is where ``partitions`` (block device names) is read.  Raises
    CgroupNotFoundError if none of the metric controllers' directories exists.
    """
    dirs = {name: Path(p) for name, p in paths.items() if name in _V1_STAT_CONTROLLERS}
    if not any(d.is_dir() for d in dirs.values()):
        raise CgroupNotFoundError(f"no cgroup v1 controller directory exists: {dict(paths)}")
    metrics = v1.Metrics()
    metrics.cpu.usage.SetInParent()
    metrics.cpu.throttling.SetInParent()
    if (d := dirs.get("hugetlb")) is not None:
        _v1_hugetlb(d, metrics)
    if (d := dirs.get("pids")) is not None:
        _v1_pids(d, metrics)
    if (d := dirs.get("cpu")) is not None:
        _v1_cpu(d, metrics)
    if (d := dirs.get("cpuacct")) is not None:
        _v1_cpuacct(d, metrics)
    if (d := dirs.get("memory")) is not None:
        _v1_memory(d, metrics)
    if (d := dirs.get("blkio")) is not None:
        _v1_blkio(d, metrics, Path(proc))
    if (d := dirs.get("rdma")) is not None:
        _v1_rdma(d, metrics)
    return metrics


# --------------------------------------------------------------------------- v2

# memory.stat keys copied into v2 MemoryStat (same names on both sides).
_V2_MEMORY_KEYS = (
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file",
    "active_file", "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault",
    "pgmajfault", "workingset_refault", "workingset_activate", "workingset_nodereclaim",
    "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
    "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc",
)  # fmt: skip
_V2_CPU_KEYS = (
    "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec",
)  # fmt: skip
_V2_EVENT_KEYS = ("low", "high", "max", "oom", "oom_kill")


def _io_entries(text: str) -> list[v2.IOEntry]:
    """io.stat lines (``8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0``)."""
    entries: list[v2.IOEntry] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        major_s, sep, minor_s = parts[0].partition(":")
        major, minor = _parse_uint(major_s), _parse_uint(minor_s)
        if not sep or major is None or minor is None:
            continue
        entry = v2.IOEntry(major=major, minor=minor)
        for kv in parts[1:]:
            key, sep, raw = kv.partition("=")
            value = _parse_uint(raw) if sep else None
            if value is not None and key in ("rbytes", "wbytes", "rios", "wios"):
                setattr(entry, key, value)
        entries.append(entry)
    return entries


def _v2_hugetlb(path: Path) -> list[v2.HugeTlbStat]:
    stats: dict[str, v2.HugeTlbStat] = {}
    for name in _listdir(path):
        match = _HUGETLB_V2.match(name)
        if match is None:
            continue
        size, kind = match.groups()
        text = _read(path / name)
        if text is None:
            continue
        value = _U64_MAX if text.strip() == "max" else _parse_uint(text)
        if value is None:
            continue
        stat = stats.setdefault(size, v2.HugeTlbStat(pagesize=size))
        setattr(stat, kind, value)
    return [stats[size] for size in sorted(stats, key=_page_size_key)]


def collect_v2(path: StrPath) -> v2.Metrics:
    """Read a unified (cgroup v2) group into ``io.containerd.cgroups.v2.Metrics``.

    Raises CgroupNotFoundError if the group's directory does not exist.
    """
    group = Path(path)
    if not group.is_dir():
        raise CgroupNotFoundError(f"cgroup v2 group {group} does not exist")
    metrics = v2.Metrics()

    pids_current = _read(group / "pids.current")
    pids_max = _read(group / "pids.max")
    metrics.pids.SetInParent()
    metrics.pids.current = (_parse_uint(pids_current) or 0) if pids_current else 0
    if pids_max is not None:
        metrics.pids.limit = _U64_MAX if pids_max.strip() == "max" else (_parse_uint(pids_max) or 0)

    cpu = _read_kv(group / "cpu.stat") or {}
    metrics.cpu.SetInParent()
    for key in _V2_CPU_KEYS:
        setattr(metrics.cpu, key, cpu.get(key, 0))

    memory = _read_kv(group / "memory.stat") or {}
    mem = metrics.memory
    mem.SetInParent()
    for key in _V2_MEMORY_KEYS:
        setattr(mem, key, memory.get(key, 0))
    mem.usage = _read_limit(group / "memory.current")
    mem.usage_limit = _read_limit(group / "memory.max")
    mem.swap_usage = _read_limit(group / "memory.swap.current")
    mem.swap_limit = _read_limit(group / "memory.swap.max")

    events = _read_kv(group / "memory.events")
    if events:
        for key in _V2_EVENT_KEYS:
            setattr(metrics.memory_events, key, events.get(key, 0))
        metrics.memory_events.SetInParent()

    metrics.io.SetInParent()
    metrics.io.usage.extend(_io_entries(_read(group / "io.stat") or ""))
    metrics.rdma.SetInParent()
    metrics.rdma.current.extend(_rdma_entries(_read(group / "rdma.current") or "", v2.RdmaEntry))
    metrics.rdma.limit.extend(_rdma_entries(_read(group / "rdma.max") or "", v2.RdmaEntry))
    metrics.hugetlb.extend(_v2_hugetlb(group))
    return metrics


# --------------------------------------------------------------------------- Stats


def stats_for_paths(
    paths: CgroupPaths,
    *,
    mode: CgroupMode | None = None,
    proc: StrPath = "/proc",
) -> any_pb2.Any:
    """The ``StatsResponse.stats`` payload for a process's cgroups, as the Go shim builds it.

    v2 Metrics on a unified host, v1 Metrics on v1 and hybrid hosts.  ``mode``
    defaults to :func:`cgroup_mode` of the real host.  Raises CgroupNotFoundError
    if there is nothing to read.
    """
    mode = cgroup_mode() if mode is None else mode
    if mode == "v2":
        if paths.unified is None:
            raise CgroupNotFoundError("process has no cgroup v2 group")
        return typeurls.pack(collect_v2(paths.unified))
    if mode in ("v1", "hybrid"):
        return typeurls.pack(collect_v1(paths.v1, proc=proc))
    raise CgroupNotFoundError("no cgroup file system is mounted")


def stats_for_pid(
    pid: int,
    *,
    root: StrPath = CGROUP_ROOT,
    proc: StrPath = "/proc",
    mode: CgroupMode | None = None,
) -> any_pb2.Any:
    """:func:`stats_for_paths` of :func:`cgroup_paths` ``(pid)``.

    Raises ProcessLookupError if ``pid`` is gone, CgroupNotFoundError if its
    cgroup is.
    """
    if mode is None:
        mode = cgroup_mode(root)
    return stats_for_paths(cgroup_paths(pid, root=root, proc=proc), mode=mode, proc=proc)
