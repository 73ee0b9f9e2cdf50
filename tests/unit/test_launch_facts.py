"""The facts both sides share, each parsed or built once: addresses, procfs, the runtime's argv."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

from supervisor import mount
from supervisor.launch import address, delete, procfs, runcmd

# --- socket addresses -------------------------------------------------------------


@pytest.mark.parametrize(("written", "path"), [
    ("unix:///run/containerd/s/abc", "/run/containerd/s/abc"),
    ("/run/x.sock", "/run/x.sock"),
    ("./x.sock", "./x.sock"),
    ("@name", "\0name"),
    ("\0name", "\0name"),
    ("name", "\0name"),  # older containerd address files: a bare name is abstract
])
def test_socket_path(written: str, path: str) -> None:
    assert address.socket_path(written) == path


@pytest.mark.parametrize("bad", ["", "unix://"])
def test_socket_path_refuses_empty_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="socket address"):
        address.socket_path(bad)


def test_address_of_a_bound_socket_parses_back(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        assert address.address_of(s.getsockname()) == f"unix://{path}"
        assert address.socket_path(address.address_of(s.getsockname())) == path
    name = f"\0launch-abstract-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as a:
        a.bind(name)
        assert address.address_of(a.getsockname()) == f"@launch-abstract-{os.getpid()}"
        assert address.socket_path(address.address_of(a.getsockname())) == name


def test_canonical() -> None:
    assert address.canonical("/run/x") == "unix:///run/x"
    assert address.canonical("unix:///run/x") == "unix:///run/x"
    assert address.canonical("x/y") == "unix://" + os.path.abspath("x/y")
    assert address.canonical("\0n") == address.canonical("n") == "@n"


# --- procfs -----------------------------------------------------------------------


def test_unescape_every_octal_escape() -> None:
    assert procfs.unescape(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert procfs.unescape(r"/plain") == "/plain"
    assert procfs.unescape(r"/short\04") == r"/short\04"  # not an escape: kept
    assert procfs.unescape(r"/not\08x") == r"/not\08x"


MOUNTINFO = (
    "36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n"
    "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    "26 1 0:23 /pod /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    "garbage without a separator\n"
    "27 1 0:24 / /short - tmpfs\n"
)


def test_parse_mountinfo() -> None:
    mounts = procfs.parse_mountinfo(MOUNTINFO)
    assert [(m.root, m.mount_point, m.fstype, m.source) for m in mounts] == [
        ("/mnt1", "/mnt 2", "ext3", "/dev/root"),
        ("/", "/sys/fs/cgroup", "cgroup2", "cgroup2"),
        ("/pod", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cgroup"),
    ]
    assert mounts[0].optional == ("master:1", "shared:2")
    assert mounts[1].optional == ()
    assert procfs.cgroup_mounts(mounts) == [
        (set(), "/", "/sys/fs/cgroup"),
        ({"rw", "cpu", "cpuacct"}, "/pod", "/sys/fs/cgroup/cpu,cpuacct"),
    ]


def test_mountinfo_lines_end_only_at_newlines() -> None:
    # The kernel escapes space, tab, newline and backslash in paths, not \x0c or U+2028,
    # which str.splitlines() would also split at.
    line = "36 35 98:0 / /mnt/a\x0cb\u2028c rw - ext3 /dev/root rw\n"
    assert [m.mount_point for m in procfs.parse_mountinfo(line)] == ["/mnt/a\x0cb\u2028c"]
    assert procfs.parse_cgroup("0::/a\x1cb\n") == [("0", "", "/a\x1cb")]


def test_read_mountinfo_sees_the_root() -> None:
    assert "/" in {m.mount_point for m in procfs.read_mountinfo()}


def test_cgroup_groups() -> None:
    text = "9:name=systemd:/a\n3:cpu,cpuacct:/b/c\n2::weird\nbroken\n0::/u\n"
    controllers, unified = procfs.cgroup_groups(text)
    assert controllers == {"name=systemd": "/a", "cpu": "/b/c", "cpuacct": "/b/c"}
    assert unified == "/u"
    assert procfs.cgroup_groups("4:memory:/x\n") == ({"memory": "/x"}, None)
    assert procfs.parse_cgroup("0::/u\nbroken\n") == [("0", "", "/u")]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_mount_points_with_escaped_characters(tmp_path: Path) -> None:
    """The daemon's is_mountpoint and delete's check agree on a path mountinfo escapes."""
    target = tmp_path / "a b\tc\\d"
    target.mkdir()
    assert not mount.is_mountpoint(str(target))
    assert not delete._mounted(str(target))
    mount.mount(mount.MountSpec("tmpfs", "tmpfs"), str(target))
    try:
        assert mount.is_mountpoint(str(target))
        assert delete._mounted(str(target))
    finally:
        mount.unmount_all(str(target), detach=True)
    assert not mount.is_mountpoint(str(target))


# --- the runtime's command line -----------------------------------------------------


def test_runtime_global_argv() -> None:
    assert runcmd.state_root("", "ns") == "/run/containerd/runc/ns"
    assert runcmd.state_root("/r", "ns") == "/r/ns"
    assert runcmd.log_path("/b") == "/b/log.json"
    assert runcmd.global_argv("", "/r/ns", "/b/log.json") == [
        "runc", "--root", "/r/ns", "--log", "/b/log.json", "--log-format", "json"]
    assert runcmd.global_argv("crun", "/r", "/l", systemd_cgroup=True, debug=True)[-2:] == [
        "--debug", "--systemd-cgroup"]


# --- delete's mount check and address, each read once --------------------------------


@pytest.mark.parametrize("path", ["/plain", "/a b\tc\nd\\e", "/\\040", "/ü"])
def test_escape_is_what_unescape_undoes(path: str) -> None:
    assert procfs.unescape(procfs.escape(path)) == path
    assert not any(c in procfs.escape(path) for c in " \t\n")


def test_mounted_needs_the_exact_mount_point(tmp_path: Path) -> None:
    assert procfs.mounted("/")
    assert procfs.mounted("/proc")
    assert not procfs.mounted("/pro")  # a prefix of a mount point is none
    assert not procfs.mounted(str(tmp_path))


def test_delete_reads_the_address_file_once(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "address").write_text(f"unix://{tmp_path}/gone.sock", encoding="utf-8")
    reads: list[str] = []
    real = delete.spool.shim_address
    monkeypatch.setattr(delete.spool, "shim_address", lambda b: reads.append(b) or real(b))
    monkeypatch.setattr(delete.sys, "stdout", io.TextIOWrapper(io.BytesIO()))
    assert delete.action_delete("ns", "c1", str(bundle)) == 0
    assert reads == [str(bundle)]
