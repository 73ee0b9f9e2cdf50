"""The delete action's hand-encoded DeleteResponse matches the generated class."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from supervisor import _delete
from supervisor._delete import encode_delete_response
from supervisor.api.task.v2 import shim_pb2


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


def test_delete_path_imports_neither_trio_nor_protobuf() -> None:
    code = ("import sys, supervisor._delete; "
            "print('trio' in sys.modules, 'google.protobuf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("text", [
    '{"binary_name": "crun", "root": "/run/x \\u00e9\\n", "systemd_cgroup": true, "io_uid": 7,'
    ' "x": null, "l": [1, 2.5]}',
    '  {}  ', '[]', '"s"',
])
def test_parse_json_matches_json(text: str) -> None:
    assert _delete.parse_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "nope"])
def test_parse_json_rejects_what_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        _delete.parse_json(text)


def test_delete_does_not_import_json() -> None:
    code = ("import sys; from supervisor import _delete; "
            "_delete.parse_json('{}'); print('json' in sys.modules, 're' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
