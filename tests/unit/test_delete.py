"""The delete action: its hand-encoded DeleteResponse, and the settings it reads.

``delete`` reads the settings file through the class the daemon writes it with
(:class:`~supervisor.launch.settings.Settings`): a field renamed on one side
only fails these tests.  (Its lightness is checked in ``test_layering.py``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from supervisor.api.task.v2 import shim_pb2
from supervisor.launch import delete
from supervisor.launch.defaults import SETTINGS_FILE
from supervisor.launch.delete import encode_delete_response
from supervisor.launch.settings import Settings, parse_json


@pytest.mark.parametrize(
    ("pid", "status", "ns"),
    [(0, 0, 0), (1, 137, 1_795_000_000_123_456_789), (4_000_000, 255, 5), (70000, 1, 10**18)],
)
def test_matches_protobuf(pid: int, status: int, ns: int) -> None:
    ours = encode_delete_response(pid, status, ns)
    parsed = shim_pb2.DeleteResponse.FromString(ours)
    assert (parsed.pid, parsed.exit_status, parsed.exited_at.ToNanoseconds()) == (pid, status, ns)
    want = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    want.exited_at.FromNanoseconds(ns)
    assert ours == want.SerializeToString()


@pytest.mark.parametrize("text", [
    '{"binary_name": "crun", "root": "/run/x \\u00e9\\n", "systemd_cgroup": true, "io_uid": 7,'
    ' "x": null, "l": [1, 2.5]}',
    '  {}  ', '[]', '"s"',
])
def test_parse_json_matches_json(text: str) -> None:
    assert parse_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "nope"])
def test_parse_json_rejects_what_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_json(text)


def _runtime_argv(monkeypatch: pytest.MonkeyPatch, bundle: Path, namespace: str = "ns"
                  ) -> list[str]:
    """The runtime command line ``delete`` runs for container "c1" in ``bundle``."""
    calls: list[list[str]] = []
    monkeypatch.setattr(delete, "_force_delete", lambda argv, cid: calls.append([*argv, cid]))
    monkeypatch.setattr(delete, "_mounted", lambda path: False)
    delete.cleanup(namespace, "c1", str(bundle))
    assert len(calls) == 1
    return calls[0]


def test_delete_runs_the_runtime_the_daemon_saved(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "state"
    (root / "ns" / "c1").mkdir(parents=True)  # the runtime's state: there is work to do
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    Settings(binary_name="/opt/crun", root=str(root), systemd_cgroup=True).save(str(bundle))
    assert _runtime_argv(monkeypatch, bundle) == [
        "/opt/crun", "--root", str(root / "ns"), "--log", str(bundle / "log.json"),
        "--log-format", "json", "--systemd-cgroup", "c1"]


def test_delete_without_settings_uses_the_defaults(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    monkeypatch.setattr(os.path, "exists", lambda path: True)  # pretend the state exists
    argv = _runtime_argv(monkeypatch, tmp_path, namespace="k8s.io")
    assert argv[:3] == ["runc", "--root", "/run/containerd/runc/k8s.io"]
    assert "--systemd-cgroup" not in argv


def test_settings_round_trip_every_field(tmp_path: Path) -> None:
    values: dict[str, object] = {}
    for n, name in enumerate(Settings.__slots__):
        default = getattr(Settings(), name)
        values[name] = (not default if isinstance(default, bool)
                        else n + 1 if isinstance(default, int) else f"v{n}")
    saved = Settings(**values)  # type: ignore[arg-type]
    saved.save(str(tmp_path))
    assert Settings.load(str(tmp_path)) == saved
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == values
    assert Settings.load(str(tmp_path / "missing")) == Settings()


def test_settings_ignore_unknown_keys_and_wrong_types() -> None:
    got = Settings.from_json('{"root": "/r", "io_uid": true, "systemd_cgroup": 1, "x": 1}')
    assert got == Settings(root="/r")
    with pytest.raises(ValueError):
        Settings.from_json("[]")
