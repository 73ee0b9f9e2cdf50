"""Runtime options: every form containerd sends, decoded to one :class:`Settings`.

containerd hands the shim its options as a protobuf ``Any`` (on ``start``'s
stdin and in ``Create``), and which message it holds depends on the client:

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

An unknown type, a missing or malformed settings file, or an unknown key is an
:class:`~supervisor.errors.InvalidArgument` naming it -- never a crash.
"""

from __future__ import annotations

import tomllib
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from supervisor.api import runtimeoptions_pb2, typeurls
from supervisor.api.runc import options_pb2, runctypes_pb2
from supervisor.errors import InvalidArgument
from supervisor.launch.defaults import SETTINGS_FILE, SHIM_GROUPS
from supervisor.launch.settings import Settings

__all__ = ["SETTINGS_FILE", "Settings", "decode", "decode_bytes", "load_toml"]

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


def load_toml(path: str) -> Settings:
    """Read a TOML settings file (see the module docstring for its keys)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(f"shim settings file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"shim settings file {path}: {e}") from e
    # Accept a file whose settings sit under an [options] table, as in containerd's config.
    if isinstance(data.get("options"), dict):
        data = data["options"]
    settings = Settings(config_path=path)
    for key, value in data.items():
        if key not in _TOML_KEYS:
            raise InvalidArgument(f"shim settings file {path}: unknown key {key!r}")
        name, kind = _TOML_KEYS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidArgument(
                f"shim settings file {path}: {key} must be a {kind.__name__}, not {value!r}"
            )
        setattr(settings, name, value)
    if settings.shim_group not in SHIM_GROUPS:
        raise InvalidArgument(f"shim settings file {path}: shim_group must be one of "
                              f"{', '.join(repr(g) for g in SHIM_GROUPS if g)}, "
                              f"not {settings.shim_group!r}")
    if settings.shim_group_size < 0:
        raise InvalidArgument(f"shim settings file {path}: shim_group_size must not be negative")
    return settings


def decode(value: any_pb2.Any | None) -> Settings:
    """Decode containerd's runtime options in any of their forms."""
    if value is None or not value.type_url:
        return Settings()
    try:
        message: Any = typeurls.unpack(value)
    except typeurls.UnknownTypeError as e:
        raise InvalidArgument(f"unsupported runtime options type {value.type_url!r}") from e
    except DecodeError as e:
        raise InvalidArgument(f"malformed runtime options of type {value.type_url!r}") from e
    if isinstance(message, options_pb2.Options):
        return Settings(
            binary_name=message.binary_name,
            root=message.root,
            systemd_cgroup=message.systemd_cgroup,
            criu_path=message.criu_path,
            no_pivot_root=message.no_pivot_root,
            no_new_keyring=message.no_new_keyring,
            shim_cgroup=message.shim_cgroup,
            io_uid=message.io_uid,
            io_gid=message.io_gid,
        )
    if isinstance(message, runctypes_pb2.CreateOptions):
        return Settings(
            no_pivot_root=message.no_pivot_root,
            no_new_keyring=message.no_new_keyring,
            shim_cgroup=message.shim_cgroup,
            io_uid=message.io_uid,
            io_gid=message.io_gid,
        )
    if isinstance(message, runctypes_pb2.RuncOptions):
        return Settings(
            binary_name=message.runtime,
            root=message.runtime_root,
            criu_path=message.criu_path,
            systemd_cgroup=message.systemd_cgroup,
        )
    if isinstance(message, runtimeoptions_pb2.Options):
        if not message.config_path:
            return Settings()
        return load_toml(message.config_path)
    raise InvalidArgument(f"unsupported runtime options type {value.type_url!r}")


def decode_bytes(data: bytes) -> Settings:
    """Decode a serialized ``Any`` (as ``start`` reads it from stdin)."""
    if not data:
        return Settings()
    value = any_pb2.Any()
    try:
        value.ParseFromString(data)
    except DecodeError as e:
        raise InvalidArgument("malformed runtime options on stdin") from e
    return decode(value)
