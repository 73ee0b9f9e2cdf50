"""Runtime options for the daemon: :mod:`supervisor.launch.runopts`, raising InvalidArgument.

There is one decoder of containerd's runtime options, the light hand-written
:mod:`supervisor.launch.runopts` (``start`` uses it without protobuf); its
docstring lists the forms and the TOML settings file's keys.  This module is
the daemon side's face of it: ``Create`` hands it the ``Any`` protobuf already
parsed out of the request, and an :class:`~supervisor.launch.runopts.OptionsError`
comes out as :class:`~supervisor.errors.InvalidArgument` with the same text (the
Task service maps that to containerd's ``InvalidArgument``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.errors import InvalidArgument
from supervisor.launch import runopts
from supervisor.launch.defaults import SETTINGS_FILE
from supervisor.launch.settings import Settings

if TYPE_CHECKING:
    from google.protobuf import any_pb2

__all__ = ["SETTINGS_FILE", "Settings", "decode", "decode_bytes", "load_toml"]


def decode(value: any_pb2.Any | None) -> Settings:
    """Decode containerd's runtime options (an ``Any``, or None) in any of their forms."""
    if value is None:
        return Settings()
    try:
        return runopts.decode(value.type_url, value.value)
    except runopts.OptionsError as e:
        raise InvalidArgument(str(e)) from e


def decode_bytes(data: bytes) -> Settings:
    """Decode a serialized ``Any`` (as ``start`` reads it from stdin)."""
    try:
        return runopts.decode_bytes(data)
    except runopts.OptionsError as e:
        raise InvalidArgument(str(e)) from e


def load_toml(path: str) -> Settings:
    """Read a TOML settings file (its keys: :mod:`supervisor.launch.runopts`)."""
    try:
        return runopts.load_toml(path)
    except runopts.OptionsError as e:
        raise InvalidArgument(str(e)) from e
