"""Runtime options: every form containerd sends, decoded by hand to one :class:`Settings`.

containerd hands the shim its options as a protobuf ``Any`` (on ``start``'s
and ``-info``'s stdin, and in ``Create``), and which message it holds depends
on the client:

* ``containerd.runc.v1.Options`` -- runc v2 style, sent by containerd's Go
  client for runtimes named ``io.containerd.runc.*`` and by the CRI plugin for
  a runc runtime type;
* ``containerd.linux.runc.CreateOptions`` / ``RuncOptions`` -- the legacy
  forms the Go client sends for every other runtime name (ours included);
* ``runtimeoptions.v1.Options`` -- what the CRI plugin sends for a non-runc
  runtime type; its ``config_path`` names a TOML file of shim settings.

The TOML settings file (documented in the README) takes these keys, in
snake_case or containerd's CamelCase: ``binary_name``/``BinaryName``,
``root``/``Root``, ``systemd_cgroup``/``SystemdCgroup``,
``no_pivot_root``/``NoPivotRoot``, ``no_new_keyring``/``NoNewKeyring``,
``shim_cgroup``/``ShimCgroup``, ``io_uid``/``IoUid``, ``io_gid``/``IoGid``,
``criu_path``/``CriuPath``, ``log_level``/``LogLevel``,
``shim_group``/``ShimGroup`` (``"container"`` or ``"namespace"``) and
``shim_group_size``/``ShimGroupSize`` (a positive number).

An unknown type, malformed bytes, a missing or malformed settings file, or an
unknown key is an :class:`OptionsError` naming it -- never a crash; the daemon
side (:mod:`supervisor.options`) raises the same text as
:class:`~supervisor.errors.InvalidArgument`.

Design
------
``start`` is on containerd's critical path, and the CRI plugin always sends
options: importing the protobuf runtime and our generated modules to read a
few fields cost it ~25 ms, and needed site-packages.  So the messages are read
with :mod:`~supervisor.launch._pbwire`, and this module is the ONE decoder of
these bytes: :mod:`supervisor.options` (the daemon's ``Create``) calls it too.
:mod:`tomllib` (which loads :mod:`re`) is imported only when a ``config_path``
names a file.

Invariants
----------
* :data:`MESSAGES` copies our ``.proto`` files under ``supervisor/api`` (every
  field's number, name and type); ``tests/unit/test_runopts.py`` checks it
  against the generated classes and this decoder against protobuf's parser.
* Read as protobuf reads: unknown fields (groups too), and known fields of
  another wire type, are skipped; the last occurrence of a field wins; a varint
  keeps 64 bits, a ``uint32`` the low 32 of them; what protobuf's parser
  rejects is malformed (a truncated field, a string that is not UTF-8, field
  number 0, wire type 6 or 7, a group never ended).
* Standard library and :mod:`supervisor.launch` only (``tests/unit/test_layering.py``).
"""

from __future__ import annotations

from supervisor.launch._pbwire import LENGTH, VARINT, WireError, wire_fields
from supervisor.launch.defaults import SHIM_GROUPS
from supervisor.launch.settings import Settings

BOOL, STRING, UINT32, REPEATED_STRING = "bool", "string", "uint32", "repeated string"

#: The messages decoded, by full proto name (what a type URL names, maybe after a
#: ``prefix/``): field number -> (the field's name, its type, the :class:`Settings`
#: attribute it sets or None).  ``runtimeoptions.v1.Options``'s ``config_path``
#: is not a setting of its own: it names the TOML file the settings come from.
MESSAGES: dict[str, dict[int, tuple[str, str, str | None]]] = {
    "containerd.runc.v1.Options": {
        1: ("no_pivot_root", BOOL, "no_pivot_root"),
        2: ("no_new_keyring", BOOL, "no_new_keyring"),
        3: ("shim_cgroup", STRING, "shim_cgroup"),
        4: ("io_uid", UINT32, "io_uid"),
        5: ("io_gid", UINT32, "io_gid"),
        6: ("binary_name", STRING, "binary_name"),
        7: ("root", STRING, "root"),
        8: ("criu_path", STRING, "criu_path"),
        9: ("systemd_cgroup", BOOL, "systemd_cgroup"),
        10: ("criu_image_path", STRING, None),
        11: ("criu_work_path", STRING, None),
    },
    "containerd.linux.runc.CreateOptions": {
        1: ("no_pivot_root", BOOL, "no_pivot_root"),
        2: ("open_tcp", BOOL, None),
        3: ("external_unix_sockets", BOOL, None),
        4: ("terminal", BOOL, None),
        5: ("file_locks", BOOL, None),
        6: ("empty_namespaces", REPEATED_STRING, None),
        7: ("cgroups_mode", STRING, None),
        8: ("no_new_keyring", BOOL, "no_new_keyring"),
        9: ("shim_cgroup", STRING, "shim_cgroup"),
        10: ("io_uid", UINT32, "io_uid"),
        11: ("io_gid", UINT32, "io_gid"),
        12: ("criu_work_path", STRING, None),
        13: ("criu_image_path", STRING, None),
    },
    "containerd.linux.runc.RuncOptions": {
        1: ("runtime", STRING, "binary_name"),
        2: ("runtime_root", STRING, "root"),
        3: ("criu_path", STRING, "criu_path"),
        4: ("systemd_cgroup", BOOL, "systemd_cgroup"),
    },
    "runtimeoptions.v1.Options": {
        1: ("type_url", STRING, None),
        2: ("config_path", STRING, "config_path"),
    },
}
_CONFIG_MESSAGE = "runtimeoptions.v1.Options"

_TOML_KEYS: dict[str, tuple[str, type]] = {}
for _field, _kind, _camel in (
    ("binary_name", str, "BinaryName"),
    ("root", str, "Root"),
    ("systemd_cgroup", bool, "SystemdCgroup"),
    ("no_pivot_root", bool, "NoPivotRoot"),
    ("no_new_keyring", bool, "NoNewKeyring"),
    ("shim_cgroup", str, "ShimCgroup"),
    ("io_uid", int, "IoUid"),
    ("io_gid", int, "IoGid"),
    ("criu_path", str, "CriuPath"),
    ("log_level", str, "LogLevel"),
    ("shim_group", str, "ShimGroup"),
    ("shim_group_size", int, "ShimGroupSize"),
):
    _TOML_KEYS[_field] = (_field, _kind)
    _TOML_KEYS[_camel] = (_field, _kind)


class OptionsError(ValueError):
    """The runtime options cannot be used; the message names what and why."""


def load_toml(path: str) -> Settings:
    """Read a TOML settings file (see the module docstring for its keys)."""
    import tomllib  # ~10 ms (typing, re, datetime): only for a config_path

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise OptionsError(f"shim settings file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise OptionsError(f"shim settings file {path}: {e}") from e
    # Accept a file whose settings sit under an [options] table, as in containerd's config.
    if isinstance(data.get("options"), dict):
        data = data["options"]
    settings = Settings(config_path=path)
    for key, value in data.items():
        if key not in _TOML_KEYS:
            raise OptionsError(f"shim settings file {path}: unknown key {key!r}")
        name, kind = _TOML_KEYS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise OptionsError(
                f"shim settings file {path}: {key} must be a {kind.__name__}, not {value!r}"
            )
        setattr(settings, name, value)
    if settings.shim_group not in SHIM_GROUPS:
        raise OptionsError(f"shim settings file {path}: shim_group must be one of "
                           f"{', '.join(repr(g) for g in SHIM_GROUPS if g)}, "
                           f"not {settings.shim_group!r}")
    if settings.shim_group_size < 0:
        raise OptionsError(f"shim settings file {path}: shim_group_size must not be negative")
    return settings


def _read(message: dict[int, tuple[str, str, str | None]], data: bytes
          ) -> dict[str, bool | int | str]:
    """The settings ``data`` (one of :data:`MESSAGES`) sets: attribute -> value.
    WireError or UnicodeDecodeError if malformed."""
    found: dict[str, bool | int | str] = {}
    for number, kind, raw in wire_fields(data):
        field = message.get(number)
        if field is None:
            continue  # unknown: skipped
        _, type_, attr = field
        value: bool | int | str
        if type_ in (BOOL, UINT32):
            if kind != VARINT or not isinstance(raw, int):
                continue  # another wire type: protobuf keeps it as an unknown field
            value = bool(raw) if type_ == BOOL else raw & 0xFFFFFFFF
        else:
            if kind != LENGTH or not isinstance(raw, bytes):
                continue
            value = raw.decode("utf-8")  # proto3 strings are UTF-8 or the message is bad
        if attr is not None:
            found[attr] = value
    return found


def decode(type_url: str, value: bytes) -> Settings:
    """The settings in an ``Any``'s ``type_url`` and ``value`` (no type URL: the defaults)."""
    if not type_url:
        return Settings()
    name = type_url.rsplit("/", 1)[-1]
    message = MESSAGES.get(name)
    if message is None:
        raise OptionsError(f"unsupported runtime options type {type_url!r}")
    try:
        found = _read(message, value)
    except (WireError, UnicodeDecodeError):
        raise OptionsError(f"malformed runtime options of type {type_url!r}") from None
    if name == _CONFIG_MESSAGE:
        path = found.get("config_path")
        return load_toml(path) if isinstance(path, str) and path else Settings()
    settings = Settings()
    for attr, v in found.items():
        setattr(settings, attr, v)
    return settings


def decode_bytes(data: bytes) -> Settings:
    """The settings in a serialized ``Any`` (as ``start`` reads it from stdin; b"": defaults)."""
    type_url, value = "", b""
    try:
        for number, kind, raw in wire_fields(data):
            if number == 1 and kind == LENGTH and isinstance(raw, bytes):
                type_url = raw.decode("utf-8")
            elif number == 2 and kind == LENGTH and isinstance(raw, bytes):
                value = raw
    except (WireError, UnicodeDecodeError):
        raise OptionsError("malformed runtime options on stdin") from None
    return decode(type_url, value)
