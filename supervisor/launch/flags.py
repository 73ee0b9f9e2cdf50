"""The shim binary's command line, parsed as Go's ``flag`` package does.

containerd 1.6 runs the shim binary three ways (facts from containerd's
``runtime/v2/shim``), always with the bundle as working directory and
``TTRPC_ADDRESS`` in the environment::

    SHIM -namespace NS -address A -publish-binary B -id ID start
    SHIM -namespace NS -address A -publish-binary B -id ID -bundle DIR delete
    SHIM -namespace NS -id ID -address A [-debug]         (the daemon)

containerd 2.x also runs ``SHIM -info`` (options ``Any`` on stdin, a
``RuntimeInfo`` expected on stdout: :mod:`supervisor.launch.info`); 2.3 keeps
these command lines and adds a ``BootstrapParams`` on ``start``'s stdin
(:mod:`supervisor.launch.bootstrap`), whose ``socket_dir`` lands in
:attr:`Flags.socket_dir` (no command-line flag sets it).

A plain class and no :mod:`argparse`: ``start`` and ``delete`` must stay light.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class Flags:
    """The parsed command line.  A plain class: ``dataclasses`` costs ``start`` ~5 ms."""

    __slots__ = ("action", "address", "bundle", "debug", "id", "info", "namespace",
                 "publish_binary", "socket", "socket_dir", "version")

    def __init__(self, *, namespace: str = "", id: str = "", address: str = "",
                 publish_binary: str = "", bundle: str = "", socket: str = "",
                 debug: bool = False, version: bool = False, info: bool = False,
                 socket_dir: str = "", action: str = "") -> None:
        self.namespace = namespace
        self.id = id
        self.address = address
        self.publish_binary = publish_binary
        self.bundle = bundle
        self.socket = socket
        self.debug = debug
        self.version = version
        self.info = info
        #: Where ``start`` binds sockets ("" for the default); containerd 2.3 sends it.
        self.socket_dir = socket_dir
        self.action = action

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Flags({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Flags):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces


_VALUE_FLAGS = {
    "namespace": "namespace",
    "id": "id",
    "address": "address",
    "publish-binary": "publish_binary",
    "bundle": "bundle",
    "socket": "socket",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "version": "version", "info": "info"}


def parse_flags(argv: list[str]) -> Flags:
    """Parse Go ``flag``-style arguments: ``-name value``, ``-name=value``, ``--name``."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
            setattr(flags, _BOOL_FLAGS[name], not eq or value.lower() in ("true", "1"))
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, _VALUE_FLAGS[name], value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    flags.action = rest[0] if rest else ""
    return flags

