"""The binary's contract with containerd: flags, socket address, exit codes.

(That ``start`` loads neither trio nor protobuf is checked in ``test_layering.py``.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from supervisor.launch.flags import UsageError, parse_flags
from supervisor.launch.start import group_of, socket_address
from supervisor.shim import main


def test_go_style_flags() -> None:
    f = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-publish-binary", "/bin/c",
                     "-id", "x", "-debug", "start"])
    assert (f.namespace, f.address, f.publish_binary, f.id, f.debug, f.action) == (
        "ns", "/a.sock", "/bin/c", "x", True, "start")
    f = parse_flags(["--namespace=ns", "-id=y", "-bundle", "/b", "delete"])
    assert (f.namespace, f.id, f.bundle, f.action) == ("ns", "y", "/b", "delete")
    assert parse_flags(["-v"]).version
    assert parse_flags(["-namespace", "n", "-id", "i", "-address", "a"]).action == ""


@pytest.mark.parametrize("argv", [["-nope"], ["-id"], ["-debug=maybe"], ["start", "extra"]])
def test_bad_flags(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_flags(argv)


def test_socket_address_matches_containerd() -> None:
    # containerd: sha256(filepath.Join(address, namespace, id)) under /run/containerd/s.
    want = hashlib.sha256(b"/run/containerd/containerd.sock/default/abc").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "default", "abc") == (
        f"unix:///run/containerd/s/{want}")


def test_group_from_annotations(tmp_path: Path) -> None:
    bundle = tmp_path
    assert group_of("c1", str(bundle)) == "c1"
    (bundle / "config.json").write_text(json.dumps(
        {"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}))
    assert group_of("c1", str(bundle)) == "pod1"


def test_version_and_usage_exit_codes() -> None:
    assert main(["-v"]) == 0
    assert main(["-bogus"]) == 2
    assert main(["start"]) == 2
