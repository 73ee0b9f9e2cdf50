"""The procfs files both sides read: ``mountinfo`` and ``/proc/PID/cgroup``, each parsed once.

``mountinfo`` (proc(5))::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)   (4)   (5)      (6)       (7)  (8) (9)    (10)        (11)

The kernel escapes space, tab, newline and backslash in paths as a backslash
and three octal digits (``\\040``, ``\\011``, ``\\012``, ``\\134``);
:func:`unescape` undoes every such escape.  Bytes that are not UTF-8 survive
as surrogates (``surrogateescape``), as ``os`` functions return them.

``/proc/PID/cgroup``: ``hierarchy-id:controllers:path`` per line; a cgroup v2
(unified) line is ``0::/path``; v1 controllers may be co-mounted
(``4:cpu,cpuacct:/x``) or named (``1:name=systemd:/x``).

Light (``start`` and ``delete`` use it): no :mod:`re`, no :mod:`typing` at
run time.  Malformed lines are skipped, never raised on.
"""

from __future__ import annotations


class Mount:
    """One ``mountinfo`` line, its paths unescaped."""

    __slots__ = ("fstype", "mount_point", "optional", "root", "source", "super_options")

    def __init__(self, *, root: str, mount_point: str, fstype: str, source: str,
                 super_options: str, optional: tuple[str, ...] = ()) -> None:
        self.root = root
        self.mount_point = mount_point
        #: The optional fields (7): propagation, ``shared:N``, ``master:N``...
        self.optional = optional
        self.fstype = fstype
        self.source = source
        self.super_options = super_options

    def __repr__(self) -> str:
        return (f"Mount(root={self.root!r}, mount_point={self.mount_point!r}, "
                f"fstype={self.fstype!r}, source={self.source!r}, "
                f"super_options={self.super_options!r})")


_OCTAL = "01234567"


def unescape(field: str) -> str:
    """A mountinfo field with every ``\\ooo`` octal escape replaced by its character."""
    if "\\" not in field:
        return field
    out = []
    i, n = 0, len(field)
    while i < n:
        c = field[i]
        if c == "\\" and i + 4 <= n and all(d in _OCTAL for d in field[i + 1:i + 4]):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed line of a ``mountinfo`` text, in order."""
    mounts = []
    for line in text.split("\n"):
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        fields, tail = before.split(" "), after.split(" ")
        if len(fields) < 6 or len(tail) < 3:
            continue
        mounts.append(Mount(root=unescape(fields[3]), mount_point=unescape(fields[4]),
                            fstype=tail[0], source=unescape(tail[1]), super_options=tail[2],
                            optional=tuple(fields[6:])))
    return mounts


def escape(path: str) -> str:
    """``path`` as mountinfo writes it (the inverse of :func:`unescape`)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def mounted(path: str) -> bool:
    """Whether a mount's mount point is exactly ``path`` (absolute, symlinks resolved),
    in this process's ``mountinfo``; OSError if unreadable.

    Parses only when the escaped path occurs in the text between spaces, as a mount
    point field would: for a path that is no mount point (``delete``'s usual case)
    one search of the text, not a parse of every line.
    """
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    if f" {escape(path)} " not in text:
        return False
    return any(m.mount_point == path for m in parse_mountinfo(text))


def read_mountinfo(pid: int | str = "self") -> list[Mount]:
    """``/proc/<pid>/mountinfo`` parsed (OSError if unreadable)."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def cgroup_mounts(mounts: list[Mount]) -> list[tuple[set[str], str, str]]:
    """(controllers, mount root, mount point) of every cgroup hierarchy.

    A v1 hierarchy's controllers are its super options (``cpu``, ``cpuacct``,
    ``name=systemd``, and ``rw`` & co., which match no controller); cgroup v2's
    set is empty.
    """
    out = []
    for m in mounts:
        if m.fstype == "cgroup":
            out.append((set(m.super_options.split(",")), m.root, m.mount_point))
        elif m.fstype == "cgroup2":
            out.append((set(), m.root, m.mount_point))
    return out


def parse_cgroup(text: str) -> list[tuple[str, str, str]]:
    """(hierarchy id, controllers, path) of each well-formed ``/proc/PID/cgroup`` line."""
    entries = []
    for line in text.split("\n"):
        parts = line.split(":", 2)
        if len(parts) == 3:
            entries.append((parts[0], parts[1], parts[2]))
    return entries


def cgroup_groups(text: str) -> tuple[dict[str, str], str | None]:
    """(v1 controller -> group path, unified group path or None) of a ``/proc/PID/cgroup`` text.

    Co-mounted controllers (``4:cpu,cpuacct:/x``) each get the group.
    """
    controllers: dict[str, str] = {}
    unified: str | None = None
    for hierarchy, names, group in parse_cgroup(text):
        if names == "":
            if hierarchy == "0":
                unified = group
            continue
        for name in names.split(","):
            if name:
                controllers[name] = group
    return controllers, unified
