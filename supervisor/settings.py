"""The shim's settings for one container, and where they are kept.

Free of protobuf and trio on purpose: the ``delete`` action, which containerd
runs on its critical path after a shim is gone, needs only this and ``json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from supervisor.defaults import DEFAULT_BINARY, DEFAULT_ROOT, SETTINGS_FILE, SHIM_GROUPS

__all__ = ["DEFAULT_BINARY", "DEFAULT_ROOT", "SETTINGS_FILE", "SHIM_GROUPS", "Settings"]



@dataclass
class Settings:
    """What the shim needs to know to run the OCI runtime."""

    binary_name: str = ""
    root: str = ""
    systemd_cgroup: bool = False
    criu_path: str = ""
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    log_level: str = ""
    config_path: str = ""
    #: Which shim serves the container (read by ``start``): "" or "container" (one each,
    #: as the Go shim), or "namespace" (shared, see :mod:`supervisor.shim`).
    shim_group: str = ""
    #: How many containers one shared shim serves at most (0: the default).
    shim_group_size: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, bundle: str) -> None:
        """Keep the settings in the bundle, for ``delete`` after the shim is gone."""
        path = os.path.join(bundle, SETTINGS_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, bundle: str) -> Settings:
        try:
            with open(os.path.join(bundle, SETTINGS_FILE), encoding="utf-8") as f:
                return cls.from_json(f.read())
        except (OSError, ValueError, TypeError):
            return cls()
