"""The shim's settings for one container: the one schema of the bundle's settings file.

The daemon decodes containerd's runtime options into a :class:`Settings`
(:mod:`supervisor.options`) and :meth:`Settings.save`\\ s it in the bundle
(:data:`~supervisor.launch.defaults.SETTINGS_FILE`); ``delete``, which
containerd runs after the shim is gone, reads it back with
:meth:`Settings.load` -- the same class, so a field renamed on one side is
renamed on both (``tests/unit/test_delete.py`` checks ``delete``'s runtime
command line against a saved file).

Light on purpose (``delete`` loads it on every task): a plain class, not a
dataclass, and the file is read through the C JSON scanner alone
(:func:`parse_json`); :mod:`json` is imported only to write it (the daemon).
"""

from __future__ import annotations

import os

from supervisor.launch.defaults import SETTINGS_FILE


class Settings:
    """What the shim needs to know to run the OCI runtime (every field has a default)."""

    __slots__ = ("binary_name", "config_path", "criu_path", "io_gid", "io_uid", "log_level",
                 "no_new_keyring", "no_pivot_root", "root", "shim_cgroup", "shim_group",
                 "shim_group_size", "systemd_cgroup")

    def __init__(
        self,
        *,
        binary_name: str = "",
        root: str = "",
        systemd_cgroup: bool = False,
        criu_path: str = "",
        no_pivot_root: bool = False,
        no_new_keyring: bool = False,
        shim_cgroup: str = "",
        io_uid: int = 0,
        io_gid: int = 0,
        log_level: str = "",
        config_path: str = "",
        shim_group: str = "",
        shim_group_size: int = 0,
    ) -> None:
        self.binary_name = binary_name
        self.root = root
        self.systemd_cgroup = systemd_cgroup
        self.criu_path = criu_path
        self.no_pivot_root = no_pivot_root
        self.no_new_keyring = no_new_keyring
        self.shim_cgroup = shim_cgroup
        self.io_uid = io_uid
        self.io_gid = io_gid
        self.log_level = log_level
        self.config_path = config_path
        #: Which shim serves the container (read by ``start``): "" or "container" (one
        #: each, as the Go shim), or "namespace" (shared, see :mod:`supervisor.launch.start`).
        self.shim_group = shim_group
        #: How many containers one shared shim serves at most (0: the default).
        self.shim_group_size = shim_group_size

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Settings({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}

    def to_json(self) -> str:
        import json  # the daemon's side only: `delete` never writes

        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """The settings in ``text``; unknown keys and values of the wrong type are ignored
        (their defaults stand); ValueError if ``text`` is not a JSON object."""
        data = parse_json(text)
        if not isinstance(data, dict):
            raise ValueError("the settings file is not a JSON object")  # noqa: TRY004
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Settings:
        """The settings in ``data`` (what :meth:`to_dict` gives, or a settings file
        parsed); unknown keys and values of the wrong type are ignored."""
        settings = cls()
        for key in cls.__slots__:
            value = data.get(key)
            kind = type(getattr(settings, key))
            if type(value) is kind:  # exact: a bool is not an int here, nor the reverse
                setattr(settings, key, value)
        return settings

    def save(self, bundle: str) -> None:
        """Keep the settings in the bundle, for ``delete`` after the shim is gone."""
        path = os.path.join(bundle, SETTINGS_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, bundle: str) -> Settings:
        """The settings saved in ``bundle``; the defaults if none (or unreadable) are."""
        try:
            with open(os.path.join(bundle, SETTINGS_FILE), encoding="utf-8") as f:
                return cls.from_json(f.read())
        except (OSError, ValueError):
            return cls()


class _ScanContext:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``, plain defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def parse_json(text: str) -> object:
    """``json.loads`` through the C scanner alone: importing :mod:`json` (``re``, ``enum``)
    would cost ``delete`` ~6 ms on every task, for one small file of our own."""
    try:
        import _json
        scanner = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # duck-typed
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other Pythons
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip())
    try:
        value, end = scanner(text, start)
    except StopIteration:
        raise ValueError("not JSON") from None
    if text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return value
