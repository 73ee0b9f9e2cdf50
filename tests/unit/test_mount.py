"""supervisor.mount: option parsing (pure) and real mounts inside tmp_path (root)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import mount as m
from supervisor.launch import procfs
from supervisor.mount import MountSpec

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="real mounts need root")


def _filesystems() -> str:
    with open("/proc/filesystems", encoding="ascii") as f:
        return f.read()


needs_overlay = pytest.mark.skipif("\toverlay\n" not in _filesystems(),
                                   reason="kernel has no overlay filesystem")


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, one per stacked mount."""
    real = os.path.realpath(path)
    return [m.mount_point for m in procfs.read_mountinfo()
            if m.mount_point == real or m.mount_point.startswith(real + "/")]


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, with anything our test left mounted in it detached afterwards."""
    yield tmp_path
    if os.geteuid() == 0:
        for point in reversed(_mounts_under(tmp_path)):
            m.unmount_all(point, detach=True)
    assert _mounts_under(tmp_path) == []


# --- parse_options ------------------------------------------------------------

@pytest.mark.parametrize(
    ("options", "flags", "propagation", "data"),
    [
        ((), 0, 0, ""),
        (("rbind", "ro"), m.MS_BIND | m.MS_REC | m.MS_RDONLY, 0, ""),
        (("bind", "rw"), m.MS_BIND, 0, ""),
        (("ro", "rw"), 0, 0, ""),
        (("rw", "ro"), m.MS_RDONLY, 0, ""),
        (("nosuid", "nodev", "noexec"), m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC, 0, ""),
        (("nosuid", "suid", "dev", "exec"), 0, 0, ""),
        (("noatime", "atime", "relatime", "norelatime", "strictatime"),
         m.MS_STRICTATIME, 0, ""),
        (("sync", "async", "dirsync", "mand", "nomand"), m.MS_DIRSYNC, 0, ""),
        (("remount", "ro"), m.MS_REMOUNT | m.MS_RDONLY, 0, ""),
        (("defaults",), 0, 0, ""),
        (("rbind", "rprivate"), m.MS_BIND | m.MS_REC, m.MS_PRIVATE | m.MS_REC, ""),
        (("bind", "shared"), m.MS_BIND, m.MS_SHARED, ""),
        (("rslave",), 0, m.MS_SLAVE | m.MS_REC, ""),
        (("runbindable", "private"), 0, m.MS_PRIVATE, ""),
        (("unbindable",), 0, m.MS_UNBINDABLE, ""),
        (("index=off", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"), 0, 0,
         "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w"),
        (("nosuid", "size=65536k", "mode=755", "ro"), m.MS_NOSUID | m.MS_RDONLY, 0,
         "size=65536k,mode=755"),
    ],
)
def test_parse_options(options: tuple[str, ...], flags: int, propagation: int,
                       data: str) -> None:
    assert m.parse_options(options) == (flags, propagation, data)


@pytest.mark.parametrize(
    ("options", "chdir", "compacted"),
    [
        (("lowerdir=/s/snapshots/12/fs:/s/snapshots/3/fs", "upperdir=/s/u"),
         "/s/snapshots", ("lowerdir=12/fs:3/fs", "upperdir=/s/u")),
        (("lowerdir=/s/a/fs:/s/a/fs/x",), "/s/a", ("lowerdir=fs:fs/x",)),
        (("lowerdir=/x/1:/x/2::/x/3",), "/x", ("lowerdir=1:2::3",)),
        (("lowerdir=/x/1",), "", ("lowerdir=/x/1",)),
        (("lowerdir=/x/1:/y/2",), "", ("lowerdir=/x/1:/y/2",)),
        (("lowerdir=x/1:x/2",), "", ("lowerdir=x/1:x/2",)),
        (("lowerdir=/x/1:/x/2", "workdir=w"), "", ("lowerdir=/x/1:/x/2", "workdir=w")),
        (("lowerdir=/x/a\\:b:/x/2",), "", ("lowerdir=/x/a\\:b:/x/2",)),
        (("upperdir=/u",), "", ("upperdir=/u",)),
    ],
)
def test_compact_lowerdir(options: tuple[str, ...], chdir: str,
                          compacted: tuple[str, ...]) -> None:
    assert m.compact_lowerdir(options) == (chdir, compacted)


def test_unsupported_options_are_refused(tmp: Path) -> None:
    with pytest.raises(OSError) as e:
        m.mount(MountSpec("ext4", "/img", options=("loop",)), str(tmp))
    assert e.value.errno == errno.EOPNOTSUPP and e.value.filename == str(tmp)
    with pytest.raises(OSError) as e:
        m.mount_all([MountSpec("tmpfs", "t", target="/sub")], str(tmp))
    assert e.value.errno == errno.EOPNOTSUPP


def test_too_long_data_is_refused_before_mounting(tmp: Path) -> None:
    spec = MountSpec("tmpfs", "t", options=("x" * os.sysconf("SC_PAGE_SIZE"),))
    with pytest.raises(OSError) as e:
        m.mount(spec, str(tmp))
    assert e.value.errno == errno.E2BIG and str(tmp) in str(e.value)


def test_unmount_all_of_missing_or_empty_target_is_noop(tmp: Path) -> None:
    m.unmount_all("")
    m.unmount_all(str(tmp / "missing"))
    assert not m.is_mountpoint(str(tmp / "missing"))


# --- real mounts ---------------------------------------------------------------

@needs_root
def test_tmpfs(tmp: Path) -> None:
    target = tmp / "rootfs"
    target.mkdir()
    assert not m.is_mountpoint(str(target))
    m.mount(MountSpec("tmpfs", "tmpfs", options=("nosuid", "size=1m", "mode=700")),
            str(target))
    assert m.is_mountpoint(str(target))
    assert target.stat().st_mode & 0o777 == 0o700
    assert os.statvfs(target).f_flag & os.ST_NOSUID
    (target / "f").write_text("x")
    m.unmount_all(str(target))
    assert not m.is_mountpoint(str(target))
    assert not (target / "f").exists()


@needs_root
def test_bind(tmp: Path) -> None:
    src, target = tmp / "src", tmp / "rootfs"
    src.mkdir()
    target.mkdir()
    (src / "hello").write_text("hi")
    m.mount_all([MountSpec("bind", str(src), options=("bind",))], str(target))
    assert (target / "hello").read_text() == "hi"
    (target / "new").write_text("w")
    assert (src / "new").read_text() == "w"
    m.unmount_all(str(target))
    assert not (target / "hello").exists()


@needs_root
def test_rbind_ro_is_read_only_and_keeps_source_restrictions(tmp: Path) -> None:
    src, target = tmp / "src", tmp / "rootfs"
    src.mkdir()
    target.mkdir()
    # A nosuid source: the ro remount must not drop the nosuid the bind inherited.
    m.mount(MountSpec("tmpfs", "tmpfs", options=("nosuid",)), str(src))
    (src / "sub").mkdir()
    m.mount(MountSpec("tmpfs", "tmpfs"), str(src / "sub"))
    (src / "file").write_text("data")
    m.mount(MountSpec("bind", str(src), options=("rbind", "ro")), str(target))
    assert (target / "file").read_text() == "data"
    with pytest.raises(OSError) as e:
        (target / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    flags = os.statvfs(target).f_flag
    assert flags & os.ST_RDONLY and flags & os.ST_NOSUID
    assert m.is_mountpoint(str(target / "sub"))  # rbind brought the submount
    (src / "still-writable").write_text("y")
    # The submount makes a plain unmount EBUSY; detach takes the whole tree.
    m.unmount_all(str(target), detach=True)
    assert not m.is_mountpoint(str(target))
    assert m.is_mountpoint(str(src / "sub"))  # the source's submount is untouched


@needs_root
def test_bind_with_propagation(tmp: Path) -> None:
    src, target = tmp / "src", tmp / "rootfs"
    src.mkdir()
    target.mkdir()
    m.mount(MountSpec("bind", str(src), options=("rbind", "rprivate")), str(target))
    real = os.path.realpath(target)
    [mounted] = [mp for mp in procfs.read_mountinfo() if mp.mount_point == real]
    assert not any(o.startswith(("shared:", "master:")) for o in mounted.optional)
    m.unmount_all(str(target))


def _overlay_dirs(tmp: Path, lowers: list[Path]) -> tuple[Path, Path, Path]:
    upper, work, target = tmp / "upper", tmp / "work", tmp / "rootfs"
    for d in (*lowers, upper, work, target):
        d.mkdir(parents=True)
    return upper, work, target


@needs_root
@needs_overlay
def test_overlay(tmp: Path) -> None:
    lower1, lower2 = tmp / "lower1", tmp / "lower2"
    upper, work, target = _overlay_dirs(tmp, [lower1, lower2])
    (lower1 / "a").write_text("from lower1")
    (lower2 / "b").write_text("from lower2")
    (lower2 / "a").write_text("hidden by lower1")
    spec = MountSpec("overlay", "overlay", options=(
        "index=off", f"lowerdir={lower1}:{lower2}", f"upperdir={upper}", f"workdir={work}"))
    m.mount_all([spec], str(target))
    assert (target / "a").read_text() == "from lower1"
    assert (target / "b").read_text() == "from lower2"
    (target / "c").write_text("written")
    assert (upper / "c").read_text() == "written"
    assert not (lower1 / "c").exists() and not (lower2 / "c").exists()
    m.unmount_all(str(target))
    assert not m.is_mountpoint(str(target))


@needs_root
@needs_overlay
def test_overlay_with_more_lowerdirs_than_a_page_holds(tmp: Path) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    snapshots = tmp / ("snapshots-" + "s" * 60)
    count = page // len(f"{snapshots}/100/fs:") + 10
    lowers = [snapshots / str(i) / "fs" for i in range(1, count + 1)]
    upper, work, target = _overlay_dirs(tmp, lowers)
    for i, lower in enumerate(lowers, 1):
        (lower / f"layer{i}").write_text(str(i))
    options = (f"lowerdir={':'.join(map(str, lowers))}", f"upperdir={upper}",
               f"workdir={work}")
    assert len(",".join(options)) > page
    cwd = os.getcwd()
    m.mount(MountSpec("overlay", "overlay", options=options), str(target))
    assert os.getcwd() == cwd  # the chdir stayed in the helper thread
    assert (target / "layer1").read_text() == "1"
    assert (target / f"layer{count}").read_text() == str(count)
    m.unmount_all(str(target))


@needs_root
def test_stacked_mounts_are_all_unmounted(tmp: Path) -> None:
    target = tmp / "rootfs"
    target.mkdir()
    for i in range(3):
        m.mount(MountSpec("tmpfs", f"layer{i}"), str(target))
        (target / f"f{i}").write_text(str(i))
    assert len(_mounts_under(target)) == 3
    assert [p.name for p in target.iterdir()] == ["f2"]
    m.unmount_all(str(target))
    assert _mounts_under(target) == []


@needs_root
def test_unmount_all_of_a_non_mountpoint_is_noop(tmp: Path) -> None:
    target = tmp / "rootfs"
    target.mkdir()
    (target / "keep").write_text("k")
    m.unmount_all(str(target))
    m.unmount_all(str(target), detach=True)
    assert (target / "keep").read_text() == "k"


@needs_root
def test_bad_type_names_target(tmp: Path) -> None:
    target = tmp / "rootfs"
    target.mkdir()
    with pytest.raises(OSError) as e:
        m.mount(MountSpec("no-such-fs", "src"), str(target))
    assert e.value.errno == errno.ENODEV
    assert e.value.filename == str(target)
    assert str(target) in str(e.value) and "no-such-fs" in str(e.value)


@needs_root
def test_mount_all_undoes_earlier_mounts_on_failure(tmp: Path) -> None:
    target = tmp / "rootfs"
    target.mkdir()
    specs = [MountSpec("tmpfs", "one"), MountSpec("tmpfs", "two"),
             MountSpec("no-such-fs", "three")]
    with pytest.raises(OSError) as e:
        m.mount_all(specs, str(target))
    assert e.value.errno == errno.ENODEV
    assert _mounts_under(target) == []


@needs_root
def test_failed_remount_leaves_nothing_behind(tmp: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, target = tmp / "src", tmp / "rootfs"
    src.mkdir()
    target.mkdir()
    real = m._sys_mount
    calls: list[int] = []

    def fail_remount(source: str, tgt: str, fstype: str, flags: int, data: str) -> int:
        calls.append(flags)
        return errno.EPERM if flags & m.MS_REMOUNT else real(source, tgt, fstype, flags, data)

    monkeypatch.setattr(m, "_sys_mount", fail_remount)
    with pytest.raises(OSError) as e:
        m.mount(MountSpec("bind", str(src), options=("rbind", "ro")), str(target))
    assert e.value.errno == errno.EPERM and "remount" in str(e.value)
    assert len(calls) == 2
    assert _mounts_under(target) == []
