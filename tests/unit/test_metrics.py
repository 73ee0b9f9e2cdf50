"""supervisor.metrics: fake cgroup v1/v2 trees, the wire format, and a live cgroup.

* Fake trees in tmp_path with realistic file contents check every parsed field.
* The wire format is checked against containerd's cgroups Go source: the field
  numbers and types of our .proto against theirs, and (when ``go`` is installed)
  a Go program built from that source decodes our bytes into the Go structs
  ``ctr task metrics`` prints.
* A live test runs ``sleep`` in a cgroup it creates (v1 or v2, as the host is).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import metrics
from supervisor.api import typeurls
from supervisor.api.cgroups.v1 import metrics_pb2 as v1
from supervisor.api.cgroups.v2 import metrics_pb2 as v2
from supervisor.metrics import CgroupNotFoundError, CgroupPaths

U64_MAX = 2**64 - 1
PID = 4242
GO_CGROUPS = Path("/usr/share/gocode/src/github.com/containerd/cgroups")

# --------------------------------------------------------------------------- fake trees

V1_MEMORY_STAT = """\
cache 84197376
rss 13160448
rss_huge 2097152
shmem 0
mapped_file 258048
dirty 188416
writeback 4096
swap 0
pgpgin 172338
pgpgout 152063
pgfault 245057
pgmajfault 85
inactive_anon 13053952
active_anon 12288
inactive_file 42455040
active_file 41742336
unevictable 7
hierarchical_memory_limit 536870912
hierarchical_memsw_limit 9223372036854771712
total_cache 84197377
total_rss 13160449
total_rss_huge 2097153
total_shmem 0
total_mapped_file 258049
total_dirty 188417
total_writeback 4097
total_swap 0
total_pgpgin 172339
total_pgpgout 152064
total_pgfault 245058
total_pgmajfault 86
total_inactive_anon 13053953
total_active_anon 12289
total_inactive_file 42455041
total_active_file 41742337
total_unevictable 8
"""

PARTITIONS = """\
major minor  #blocks  name

   8        0  268435456 sda
   8        1  268434432 sda1
 254        0  268435456 vda
"""

CFQ_SERVICED = """\
8:0 Read 120
8:0 Write 30
8:0 Sync 100
8:0 Async 50
8:0 Discard 0
8:0 Total 150
Total 150
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def v1_tree(tmp_path: Path, *, cfq: bool = True) -> tuple[Path, Path]:
    """A v1 hierarchy root and a /proc for process PID in group /ctr (cpu,cpuacct co-mounted)."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    write(
        proc,
        {
            f"{PID}/cgroup": (
                "12:hugetlb:/ctr\n11:rdma:/ctr\n9:name=systemd:/ctr\n8:pids:/ctr\n"
                "7:blkio:/ctr\n4:memory:/ctr\n3:cpu,cpuacct:/ctr\n0::/ctr\n"
            ),
            "partitions": PARTITIONS,
        },
    )
    mem = {
        "memory.stat": V1_MEMORY_STAT,
        "memory.oom_control": "oom_kill_disable 1\nunder_oom 0\noom_kill 3\n",
    }
    for module, base in (("", 1000), ("memsw.", 2000), ("kmem.", 3000), ("kmem.tcp.", 4000)):
        mem[f"memory.{module}usage_in_bytes"] = f"{base + 1}\n"
        mem[f"memory.{module}max_usage_in_bytes"] = f"{base + 2}\n"
        mem[f"memory.{module}failcnt"] = f"{base + 3}\n"
        mem[f"memory.{module}limit_in_bytes"] = f"{base + 4}\n"
    write(root / "memory" / "ctr", mem)
    write(
        root / "cpu" / "ctr",
        {
            "cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\n",
            "cpu.shares": "1024\n",
        },
    )
    write(
        root / "cpuacct" / "ctr",
        {
            "cpuacct.usage": "123456789\n",
            "cpuacct.stat": "user 250\nsystem 150\n",
            "cpuacct.usage_percpu": "100000000 23456789 \n",
        },
    )
    write(root / "pids" / "ctr", {"pids.current": "3\n", "pids.max": "max\n"})
    blkio = {
        "blkio.throttle.io_serviced": "8:0 Read 7\n8:0 Write 8\n8:0 Total 15\nTotal 15\n",
        "blkio.throttle.io_service_bytes": "254:0 Read 4096\n254:0 Write 8192\nTotal 12288\n",
    }
    if cfq:
        blkio |= {
            "blkio.io_serviced_recursive": CFQ_SERVICED,
            "blkio.io_service_bytes_recursive": "8:0 Read 491520\n8:0 Write 122880\nTotal 614400\n",
            "blkio.sectors_recursive": "8:0 1200\n",
            "blkio.time_recursive": "8:0 33\n",
            "blkio.io_queued_recursive": "Total 0\n",
        }
    else:  # CFQ files present but empty: the kernel has CFQ, the devices use another scheduler
        blkio |= {"blkio.io_serviced_recursive": "Total 0\n"}
    write(root / "blkio" / "ctr", blkio)
    write(
        root / "hugetlb" / "ctr",
        {
            "hugetlb.2MB.usage_in_bytes": "4194304\n",
            "hugetlb.2MB.max_usage_in_bytes": "6291456\n",
            "hugetlb.2MB.failcnt": "1\n",
            "hugetlb.2MB.limit_in_bytes": "9223372036854771712\n",
            "hugetlb.2MB.rsvd.usage_in_bytes": "0\n",
            "hugetlb.1GB.usage_in_bytes": "0\n",
            "hugetlb.1GB.max_usage_in_bytes": "0\n",
            "hugetlb.1GB.failcnt": "0\n",
        },
    )
    write(
        root / "rdma" / "ctr",
        {
            "rdma.current": "mlx4_0 hca_handle=2 hca_object=2000\n",
            "rdma.max": "mlx4_0 hca_handle=max hca_object=4000\n",
        },
    )
    # cpu,cpuacct co-mounted: the Go library, and we, go through /sys/fs/cgroup/<name>.
    return root, proc


def v2_tree(tmp_path: Path) -> tuple[Path, Path]:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    write(proc, {f"{PID}/cgroup": "0::/system.slice/ctr\n"})
    memory_stat = "\n".join(
        f"{key} {value}"
        for key, value in (
            ("anon", 1_048_576),
            ("file", 2_097_152),
            ("kernel", 999),  # not in the message: ignored
            ("kernel_stack", 16_384),
            ("pagetables", 4096),
            ("slab", 40_960),
            ("sock", 1),
            ("shmem", 2),
            ("file_mapped", 3),
            ("file_dirty", 4),
            ("file_writeback", 5),
            ("anon_thp", 6),
            ("inactive_anon", 7),
            ("active_anon", 8),
            ("inactive_file", 9),
            ("active_file", 10),
            ("unevictable", 11),
            ("slab_reclaimable", 12),
            ("slab_unreclaimable", 13),
            ("pgfault", 14),
            ("pgmajfault", 15),
            ("workingset_refault", 16),
            ("workingset_activate", 17),
            ("workingset_nodereclaim", 18),
            ("pgrefill", 19),
            ("pgscan", 20),
            ("pgsteal", 21),
            ("pgactivate", 22),
            ("pgdeactivate", 23),
            ("pglazyfree", 24),
            ("pglazyfreed", 25),
            ("thp_fault_alloc", 26),
            ("thp_collapse_alloc", 27),
        )
    )
    write(
        root / "system.slice" / "ctr",
        {
            "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma\n",
            "cgroup.procs": f"{PID}\n",
            "cpu.stat": (
                "usage_usec 78000\nuser_usec 50000\nsystem_usec 28000\n"
                "core_sched.force_idle_usec 0\nnr_periods 40\nnr_throttled 3\n"
                "throttled_usec 1200\nnr_bursts 0\nburst_usec 0\n"
            ),
            "memory.stat": memory_stat + "\n",
            "memory.current": "3407872\n",
            "memory.max": "max\n",
            "memory.swap.current": "0\n",
            "memory.swap.max": "1073741824\n",
            "memory.events": "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 0\n",
            "pids.current": "2\n",
            "pids.max": "max\n",
            "io.stat": (
                "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
                "8:0 rbytes=90430464 wbytes=299008000 rios=8950 wios=1252"
                " dbytes=50331648 dios=3021\n"
            ),
            "rdma.current": "mlx4_0 hca_handle=1 hca_object=20\n",
            "rdma.max": "mlx4_0 hca_handle=max hca_object=max\n",
            "hugetlb.2MB.current": "2097152\n",
            "hugetlb.2MB.max": "max\n",
            "hugetlb.2MB.events": "max 0\n",
            "hugetlb.2MB.rsvd.current": "0\n",
            "hugetlb.1GB.current": "0\n",
            "hugetlb.1GB.max": "0\n",
        },
    )
    return root, proc


# --------------------------------------------------------------------------- mode and paths


@pytest.mark.parametrize(
    ("magics", "expected"),
    [
        ({"/r": 0x63677270}, "v2"),
        ({"/r": 0x01021994, "/r/unified": 0x63677270}, "hybrid"),
        ({"/r": 0x01021994, "/r/unified": 0x01021994}, "v1"),
        ({"/r": 0x01021994}, "v1"),
        ({}, "unavailable"),
    ],
)
def test_cgroup_mode_decides_like_containerd(magics: dict[str, int], expected: str) -> None:
    assert metrics.cgroup_mode("/r", fs_magic=magics.get) == expected


def test_cgroup_mode_of_this_host_matches_mounts() -> None:
    mounts = {
        line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
    }
    mode = metrics.cgroup_mode()
    if mounts.get("/sys/fs/cgroup") == "cgroup2":
        assert mode == "v2"
    elif mounts.get("/sys/fs/cgroup/unified") == "cgroup2":
        assert mode == "hybrid"
    else:
        assert mode in ("v1", "unavailable")
    assert metrics.statfs_magic("/nonexistent/path") is None


def test_cgroup_paths_v1_and_unified(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path)
    paths = metrics.cgroup_paths(PID, root=root, proc=proc)
    assert paths.v1["memory"] == root / "memory" / "ctr"
    assert paths.v1["cpu"] == root / "cpu" / "ctr"
    assert paths.v1["cpuacct"] == root / "cpuacct" / "ctr"
    assert paths.v1["name=systemd"] == root / "systemd" / "ctr"
    assert paths.unified == root / "ctr"


def test_cgroup_paths_localised_to_mount_root(tmp_path: Path) -> None:
    """A shim in a cgroup namespace: mount roots (mountinfo) are stripped, as Go's existingPath."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    write(
        proc,
        {
            f"{PID}/cgroup": "4:memory:/docker/abc/ctr\n8:pids:/docker/abc\n7:blkio:/other\n0::/\n",
            "self/mountinfo": (
                "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
                "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,nosuid shared:9"
                " - cgroup cgroup rw,memory\n"
                "39 31 0:36 /docker/abc /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids\n"
                "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
            ),
        },
    )
    paths = metrics.cgroup_paths(PID, root=root, proc=proc)
    assert paths.v1 == {
        "memory": root / "memory" / "ctr",
        "pids": root / "pids",
        "blkio": root / "blkio" / "other",
    }
    assert paths.unified == root


def test_cgroup_paths_of_a_gone_process(tmp_path: Path) -> None:
    with pytest.raises(ProcessLookupError, match="process 99 not found"):
        metrics.cgroup_paths(99, root=tmp_path, proc=tmp_path)
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        metrics.stats_for_pid(child.pid)


def test_cgroup_paths_of_this_process() -> None:
    if metrics.cgroup_mode() == "unavailable":
        pytest.skip("no cgroup file system")
    paths = metrics.cgroup_paths(os.getpid())
    assert paths.v1 or paths.unified is not None
    for path in paths.v1.values():
        assert str(path).startswith("/sys/fs/cgroup/")


# --------------------------------------------------------------------------- v1


def test_collect_v1_full_tree(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path)
    m = metrics.collect_v1(metrics.cgroup_paths(PID, root=root, proc=proc).v1, proc=proc)

    mem = m.memory
    assert (mem.cache, mem.rss, mem.rss_huge, mem.mapped_file) == (
        84197376,
        13160448,
        2097152,
        258048,
    )
    assert (mem.dirty, mem.writeback, mem.unevictable) == (188416, 4096, 7)
    assert (mem.pg_pg_in, mem.pg_pg_out, mem.pg_fault, mem.pg_maj_fault) == (
        172338,
        152063,
        245057,
        85,
    )
    assert (mem.inactive_anon, mem.active_anon) == (13053952, 12288)
    assert (mem.inactive_file, mem.active_file) == (42455040, 41742336)
    assert mem.hierarchical_memory_limit == 536870912
    assert mem.hierarchical_swap_limit == 9223372036854771712
    assert (mem.total_cache, mem.total_rss, mem.total_rss_huge) == (84197377, 13160449, 2097153)
    assert (mem.total_mapped_file, mem.total_dirty, mem.total_writeback) == (258049, 188417, 4097)
    assert (mem.total_pg_pg_in, mem.total_pg_pg_out) == (172339, 152064)
    assert (mem.total_pg_fault, mem.total_pg_maj_fault) == (245058, 86)
    assert (mem.total_inactive_anon, mem.total_active_anon) == (13053953, 12289)
    assert (mem.total_inactive_file, mem.total_active_file, mem.total_unevictable) == (
        42455041,
        41742337,
        8,
    )
    for entry, base in (
        (mem.usage, 1000),
        (mem.swap, 2000),
        (mem.kernel, 3000),
        (mem.kernel_tcp, 4000),
    ):
        assert (entry.usage, entry.max, entry.failcnt, entry.limit) == (
            base + 1,
            base + 2,
            base + 3,
            base + 4,
        )
    oom = m.memory_oom_control
    assert (oom.oom_kill_disable, oom.under_oom, oom.oom_kill) == (1, 0, 3)

    ticks = os.sysconf("SC_CLK_TCK")
    usage = m.cpu.usage
    assert usage.total == 123456789
    assert usage.user == 250 * 1_000_000_000 // ticks
    assert usage.kernel == 150 * 1_000_000_000 // ticks
    assert list(usage.per_cpu) == [100000000, 23456789]
    throttling = m.cpu.throttling
    assert (throttling.periods, throttling.throttled_periods, throttling.throttled_time) == (
        10,
        2,
        5000,
    )

    assert (m.pids.current, m.pids.limit) == (3, 0)  # v1: "max" is reported as 0

    serviced = [(e.op, e.device, e.major, e.minor, e.value) for e in m.blkio.io_serviced_recursive]
    assert serviced == [
        ("Read", "/dev/sda", 8, 0, 120),
        ("Write", "/dev/sda", 8, 0, 30),
        ("Sync", "/dev/sda", 8, 0, 100),
        ("Async", "/dev/sda", 8, 0, 50),
        ("Discard", "/dev/sda", 8, 0, 0),
        ("Total", "/dev/sda", 8, 0, 150),
    ]
    assert [(e.op, e.value) for e in m.blkio.io_service_bytes_recursive] == [
        ("Read", 491520),
        ("Write", 122880),
    ]
    assert [(e.op, e.device, e.value) for e in m.blkio.sectors_recursive] == [
        ("", "/dev/sda", 1200)
    ]
    assert [e.value for e in m.blkio.io_time_recursive] == [33]
    assert len(m.blkio.io_queued_recursive) == 0

    assert [(h.pagesize, h.usage, h.max, h.failcnt) for h in m.hugetlb] == [
        ("2MB", 4194304, 6291456, 1),
        ("1GB", 0, 0, 0),
    ]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.current] == [
        ("mlx4_0", 2, 2000)
    ]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.limit] == [
        ("mlx4_0", 2**32 - 1, 4000)
    ]
    # Never filled by the Go library either.
    assert len(m.network) == 0
    assert not m.HasField("cgroup_stats")


def test_collect_v1_blkio_falls_back_to_throttle(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, cfq=False)
    m = metrics.collect_v1({"blkio": root / "blkio" / "ctr"}, proc=proc)
    assert [(e.op, e.device, e.value) for e in m.blkio.io_serviced_recursive] == [
        ("Read", "/dev/sda", 7),
        ("Write", "/dev/sda", 8),
        ("Total", "/dev/sda", 15),
    ]
    assert [(e.op, e.device, e.value) for e in m.blkio.io_service_bytes_recursive] == [
        ("Read", "/dev/vda", 4096),
        ("Write", "/dev/vda", 8192),
    ]
    assert len(m.blkio.sectors_recursive) == 0
    # Devices not in /proc/partitions keep an empty name.
    m = metrics.collect_v1({"blkio": root / "blkio" / "ctr"}, proc=tmp_path / "nowhere")
    assert {e.device for e in m.blkio.io_serviced_recursive} == {""}


def test_collect_v1_skips_missing_controllers_and_files(tmp_path: Path) -> None:
    root, _ = v1_tree(tmp_path)
    for name in (
        "memory.memsw.usage_in_bytes",
        "memory.memsw.limit_in_bytes",
        "memory.oom_control",
    ):
        (root / "memory" / "ctr" / name).unlink()
    m = metrics.collect_v1({"memory": root / "memory" / "ctr", "pids": root / "pids" / "gone"})
    assert m.memory.usage.usage == 1001
    assert (m.memory.swap.usage, m.memory.swap.limit, m.memory.swap.max) == (0, 0, 2002)
    assert m.memory.kernel.usage == 3001  # a missing memsw file does not hide kmem
    assert not m.HasField("memory_oom_control")
    assert not m.HasField("pids")
    assert not m.HasField("blkio")
    assert not m.HasField("rdma")
    # ctr dereferences cpu.usage unconditionally: it is always there.
    assert m.HasField("cpu") and m.cpu.HasField("usage") and m.cpu.HasField("throttling")

    m = metrics.collect_v1({"cpuacct": root / "cpuacct" / "ctr", "memory": root / "nothing"})
    assert m.cpu.usage.total == 123456789
    assert not m.HasField("memory")


def test_collect_v1_memory_entries_present_even_if_unreadable(tmp_path: Path) -> None:
    write(tmp_path / "mem", {"memory.stat": "cache 5\nrss -1\nbogus line here\nmapped_file x\n"})
    m = metrics.collect_v1({"memory": tmp_path / "mem"})
    assert (m.memory.cache, m.memory.rss, m.memory.mapped_file) == (5, 0, 0)
    for name in ("usage", "swap", "kernel", "kernel_tcp"):
        assert m.memory.HasField(name)


def test_collect_v1_without_any_controller(tmp_path: Path) -> None:
    with pytest.raises(CgroupNotFoundError):
        metrics.collect_v1({"memory": tmp_path / "gone", "freezer": tmp_path})
    with pytest.raises(CgroupNotFoundError):
        metrics.collect_v1({})


# --------------------------------------------------------------------------- v2


def test_collect_v2_full_tree(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path)
    paths = metrics.cgroup_paths(PID, root=root, proc=proc)
    assert paths.unified == root / "system.slice" / "ctr"
    m = metrics.collect_v2(paths.unified)

    assert (m.pids.current, m.pids.limit) == (2, U64_MAX)  # v2: "max" is 2**64-1
    cpu = m.cpu
    assert (cpu.usage_usec, cpu.user_usec, cpu.system_usec) == (78000, 50000, 28000)
    assert (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec) == (40, 3, 1200)

    mem = m.memory
    assert (mem.anon, mem.file, mem.kernel_stack, mem.slab, mem.sock) == (
        1_048_576,
        2_097_152,
        16_384,
        40_960,
        1,
    )
    expected = [
        "shmem", "file_mapped", "file_dirty", "file_writeback", "anon_thp", "inactive_anon",
        "active_anon", "inactive_file", "active_file", "unevictable", "slab_reclaimable",
        "slab_unreclaimable", "pgfault", "pgmajfault", "workingset_refault",
        "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan", "pgsteal",
        "pgactivate", "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc",
        "thp_collapse_alloc",
    ]  # fmt: skip
    assert [getattr(mem, name) for name in expected] == list(range(2, 28))
    assert (mem.usage, mem.usage_limit, mem.swap_usage, mem.swap_limit) == (
        3407872,
        U64_MAX,
        0,
        1073741824,
    )

    ev = m.memory_events
    assert (ev.low, ev.high, ev.max, ev.oom, ev.oom_kill) == (1, 2, 3, 4, 5)

    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in m.io.usage] == [
        (8, 16, 1459200, 314773504, 192, 353),
        (8, 0, 90430464, 299008000, 8950, 1252),
    ]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.current] == [("mlx4_0", 1, 20)]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.limit] == [
        ("mlx4_0", 2**32 - 1, 2**32 - 1)
    ]
    assert [(h.pagesize, h.current, h.max) for h in m.hugetlb] == [
        ("2MB", 2097152, U64_MAX),
        ("1GB", 0, 0),
    ]


def test_collect_v2_empty_group(tmp_path: Path) -> None:
    m = metrics.collect_v2(tmp_path)
    for name in ("pids", "cpu", "memory", "io", "rdma"):
        assert m.HasField(name), name
    assert not m.HasField("memory_events")
    assert m.memory.usage == 0 and m.memory.usage_limit == 0
    assert len(m.io.usage) == 0 and len(m.hugetlb) == 0


def test_collect_v2_missing_group(tmp_path: Path) -> None:
    with pytest.raises(CgroupNotFoundError):
        metrics.collect_v2(tmp_path / "deleted")


@settings(max_examples=60, deadline=None)
@given(
    junk=st.dictionaries(
        st.sampled_from(
            [
                "memory.stat",
                "cpu.stat",
                "io.stat",
                "pids.max",
                "memory.max",
                "rdma.max",
                "memory.events",
            ]
        ),
        st.text(st.characters(codec="ascii"), max_size=80),
    )
)
def test_collect_v2_never_fails_on_odd_contents(
    tmp_path_factory: pytest.TempPathFactory, junk: dict[str, str]
) -> None:
    group = tmp_path_factory.mktemp("junk")
    for name, text in junk.items():
        (group / name).write_text(text)
    m = metrics.collect_v2(group)
    assert m.ByteSize() >= 0


@settings(max_examples=60, deadline=None)
@given(junk=st.text(st.characters(codec="ascii"), max_size=120))
def test_collect_v1_never_fails_on_odd_contents(
    tmp_path_factory: pytest.TempPathFactory, junk: str
) -> None:
    group = tmp_path_factory.mktemp("junk")
    for name in (
        "memory.stat",
        "cpuacct.stat",
        "cpuacct.usage_percpu",
        "pids.max",
        "blkio.throttle.io_serviced",
    ):
        (group / name).write_text(junk)
    m = metrics.collect_v1(
        {"memory": group, "cpuacct": group, "pids": group, "blkio": group}, proc=group
    )
    assert m.ByteSize() >= 0


# --------------------------------------------------------------------------- Stats payload


def test_stats_for_pid_packs_by_mode(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path)
    for mode in ("v1", "hybrid"):
        packed = metrics.stats_for_pid(PID, root=root, proc=proc, mode=mode)
        assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
        decoded = typeurls.unpack(packed)
        assert isinstance(decoded, v1.Metrics) and decoded.memory.usage.usage == 1001

    root2, proc2 = v2_tree(tmp_path / "two")
    packed = metrics.stats_for_pid(PID, root=root2, proc=proc2, mode="v2")
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    decoded = typeurls.unpack(packed)
    assert isinstance(decoded, v2.Metrics) and decoded.memory.usage == 3407872

    with pytest.raises(CgroupNotFoundError):
        metrics.stats_for_pid(PID, root=root, proc=proc, mode="unavailable")
    with pytest.raises(CgroupNotFoundError):
        metrics.stats_for_paths(CgroupPaths(v1={"memory": root / "memory" / "ctr"}), mode="v2")


# ------------------------------------------------------------------- wire format vs the Go source


def go_proto_fields(path: Path) -> dict[str, set[tuple[str, int, str, bool]]]:
    """message -> {(field, number, type, repeated)} from a cgroups .proto (flat messages only)."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    out: dict[str, set[tuple[str, int, str, bool]]] = {}
    for name, body in re.findall(r"message\s+(\w+)\s*\{([^}]*)\}", text):
        out[name] = {
            (field, int(number), ftype, bool(rep))
            for rep, ftype, field, number in re.findall(
                r"(repeated\s+)?(\w+)\s+(\w+)\s*=\s*(\d+)", body
            )
        }
    return out


def our_fields(descriptor: Descriptor) -> set[tuple[str, int, str, bool]]:
    scalar = {
        FieldDescriptor.TYPE_UINT64: "uint64",
        FieldDescriptor.TYPE_UINT32: "uint32",
        FieldDescriptor.TYPE_STRING: "string",
    }
    return {
        (
            f.name,
            f.number,
            f.message_type.name if f.message_type is not None else scalar[f.type],
            f.is_repeated,
        )
        for f in descriptor.fields
    }


@pytest.mark.parametrize(
    ("module", "go_path"), [(v1, "stats/v1/metrics.proto"), (v2, "v2/stats/metrics.proto")]
)
def test_proto_matches_go_source(module: object, go_path: str) -> None:
    path = GO_CGROUPS / go_path
    if not path.exists():
        pytest.skip(f"{path} not installed")
    go = go_proto_fields(path)
    assert go, "parsed nothing"
    ours = module.DESCRIPTOR.message_types_by_name  # type: ignore[attr-defined]
    assert set(ours) == set(go)
    for name, fields in go.items():
        assert our_fields(ours[name]) == fields, name


GO_DECODER = """\
package main

import (
	"encoding/json"
	"fmt"
	"io/ioutil"
	"os"

	v1 "github.com/containerd/cgroups/stats/v1"
	v2 "github.com/containerd/cgroups/v2/stats"
)

type unmarshaler interface{ Unmarshal([]byte) error }

func main() {
	data, err := ioutil.ReadAll(os.Stdin)
	if err != nil {
		panic(err)
	}
	var m unmarshaler = &v1.Metrics{}
	if os.Args[1] == "v2" {
		m = &v2.Metrics{}
	}
	if err := m.Unmarshal(data); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, _ := json.Marshal(m)
	fmt.Println(string(out))
}
"""


@pytest.fixture(scope="module")
def go_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Go program, built from containerd's cgroups source, that decodes Metrics bytes to JSON."""
    go = shutil.which("go")
    gopath = Path("/usr/share/gocode")
    if (
        go is None
        or not (gopath / "src/github.com/gogo/protobuf").exists()
        or not GO_CGROUPS.exists()
    ):
        pytest.skip("go toolchain or containerd cgroups Go source not installed")
    work = tmp_path_factory.mktemp("godecode")
    (work / "main.go").write_text(GO_DECODER)
    env = os.environ | {
        "GOPATH": str(gopath),
        "GO111MODULE": "off",
        "GOCACHE": str(work / "cache"),
        "GOFLAGS": "",
    }
    subprocess.run(
        [go, "build", "-o", "decode", "."],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return work / "decode"


def populate(message: Message, counter: Iterator[int]) -> None:
    """Give every field of ``message`` (recursively) a distinct non-zero value."""
    for f in message.DESCRIPTOR.fields:
        if f.message_type is not None:
            if f.is_repeated:
                for _ in range(2):
                    populate(getattr(message, f.name).add(), counter)
            else:
                populate(getattr(message, f.name), counter)
        elif f.is_repeated:
            getattr(message, f.name).extend([next(counter), next(counter)])
        elif f.type == FieldDescriptor.TYPE_STRING:
            setattr(message, f.name, f"s{next(counter)}")
        else:
            setattr(message, f.name, next(counter))


def normalise(value: object) -> object:
    """JSON from Go and from MessageToDict on a common footing (uint64 strings -> ints)."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def go_decode(decoder: Path, message: Message, version: str) -> object:
    result = subprocess.run(
        [str(decoder), version],
        input=message.SerializeToString(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    return normalise(json.loads(result.stdout))


def as_dict(message: Message) -> object:
    return normalise(json_format.MessageToDict(message, preserving_proto_field_name=True))


@pytest.mark.parametrize("message_class", [v1.Metrics, v2.Metrics])
def test_go_decodes_every_field(go_decoder: Path, message_class: type[Message]) -> None:
    message = message_class()
    populate(message, iter(range(1, 10_000)))
    version = "v1" if message_class is v1.Metrics else "v2"
    assert go_decode(go_decoder, message, version) == as_dict(message)


def test_go_decodes_collected_metrics(go_decoder: Path, tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path)
    m1 = metrics.collect_v1(metrics.cgroup_paths(PID, root=root, proc=proc).v1, proc=proc)
    decoded = go_decode(go_decoder, m1, "v1")
    assert decoded == as_dict(m1)
    # What `ctr task metrics` prints for a v1 task.
    assert isinstance(decoded, dict)
    assert decoded["memory"]["usage"]["usage"] == 1001
    assert decoded["memory"]["usage"]["limit"] == 1004
    assert decoded["memory"]["total_cache"] == 84197377
    assert decoded["cpu"]["usage"]["total"] == 123456789
    assert decoded["cpu"]["usage"]["per_cpu"] == [100000000, 23456789]
    assert decoded["pids"] == {"current": 3}

    root2, _ = v2_tree(tmp_path / "two")
    m2 = metrics.collect_v2(root2 / "system.slice" / "ctr")
    decoded = go_decode(go_decoder, m2, "v2")
    assert decoded == as_dict(m2)
    assert isinstance(decoded, dict)
    assert decoded["pids"] == {"current": 2, "limit": U64_MAX}
    assert decoded["cpu"]["usage_usec"] == 78000
    assert decoded["memory"]["usage"] == 3407872 and decoded["memory"]["usage_limit"] == U64_MAX


# --------------------------------------------------------------------------- live


@pytest.fixture
def live_cgroup() -> Iterator[list[Path]]:
    """Fresh cgroup directories (v1: memory, cpuacct, pids; v2: one group), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    mode = metrics.cgroup_mode()
    name = f"sv-metrics-test-{secrets.token_hex(4)}"
    root = Path(metrics.CGROUP_ROOT)
    if mode in ("v1", "hybrid"):
        dirs = [root / c / name for c in ("memory", "cpuacct", "pids")]
        if not all(d.parent.is_dir() for d in dirs):
            pytest.skip("memory, cpuacct or pids v1 controller not mounted")
    elif mode == "v2":
        enabled = (root / "cgroup.subtree_control").read_text().split()
        if not {"memory", "pids"} <= set(enabled):
            pytest.skip(f"memory/pids not enabled in {root}/cgroup.subtree_control: {enabled}")
        dirs = [root / name]
    else:
        pytest.skip("no cgroup file system")
    created: list[Path] = []
    try:
        for d in dirs:
            d.mkdir()
            created.append(d)
        yield dirs
    finally:
        for d in reversed(created):
            for _ in range(50):  # EBUSY while the killed task is still leaving
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def test_live_cgroup(live_cgroup: list[Path]) -> None:
    # sh moves itself into every group, then execs sleep: sleep's memory is charged there.
    script = 'for f in "$@"; do echo $$ > "$f"; done; exec sleep 60'
    procs = [str(d / "cgroup.procs") for d in live_cgroup]
    child = subprocess.Popen(["sh", "-c", script, "sh", *procs])
    try:
        mode = metrics.cgroup_mode()
        deadline = time.monotonic() + 10
        while True:
            packed = metrics.stats_for_pid(child.pid)
            decoded = typeurls.unpack(packed)
            if isinstance(decoded, v1.Metrics):
                memory, pids, cpu = (
                    decoded.memory.usage.usage,
                    decoded.pids.current,
                    decoded.cpu.usage.total,
                )
                assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
                assert mode in ("v1", "hybrid")
            else:
                assert isinstance(decoded, v2.Metrics)
                memory, pids, cpu = (
                    decoded.memory.usage,
                    decoded.pids.current,
                    decoded.cpu.usage_usec,
                )
                assert mode == "v2"
            if memory > 0 and pids >= 1 and cpu > 0:
                break
            assert time.monotonic() < deadline, f"no usage seen: {decoded}"
            time.sleep(0.05)
        assert pids == 1
        paths = metrics.cgroup_paths(child.pid)
        assert paths.v1.get("memory", paths.unified) == live_cgroup[0]
    finally:
        child.kill()
        child.wait()
    # The process is gone; its cgroup, which we kept the paths of, still answers.
    with pytest.raises(ProcessLookupError):
        metrics.stats_for_pid(child.pid)
    after = typeurls.unpack(metrics.stats_for_paths(paths))
    assert isinstance(after, (v1.Metrics, v2.Metrics))
    assert after.pids.current == 0


def test_numbers_parse_like_go(tmp_path: Path) -> None:
    write(tmp_path, {"memory.stat": "cache +5\nrss 1_0\nrss_huge -3\ndirty 18446744073709551616\n"})
    write(tmp_path, {"memory.usage_in_bytes": " 42 \n", "memory.limit_in_bytes": "-1\n"})
    m = metrics.collect_v1({"memory": tmp_path})
    assert (m.memory.cache, m.memory.rss, m.memory.rss_huge, m.memory.dirty) == (0, 0, 0, 0)
    assert (m.memory.usage.usage, m.memory.usage.limit) == (42, 0)
