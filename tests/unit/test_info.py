"""``SHIM -info``: the hand-encoded ``RuntimeInfo`` as containerd 2.x reads it.

The bytes are checked against the class generated from our copy of
containerd's ``api/types/introspection.proto``; the runtime is a fake script
(its ``features`` output is what we echo), so no runc is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from supervisor import __version__
from supervisor.api.runc import options_pb2
from supervisor.api.types import introspection_pb2
from supervisor.launch import info
from supervisor.launch.flags import parse_flags
from supervisor.options import decode_bytes
from supervisor.shim import REVISION

FEATURES = {"ociVersionMin": "1.0.0", "ociVersionMax": "1.1.0", "hooks": ["prestart"]}


def fake_runtime(tmp_path: Path, name: str, features: str | None) -> Path:
    """An executable ``name`` whose ``features`` prints ``features`` (or fails if None)."""
    path = tmp_path / name
    body = f"cat <<'X'\n{features}\nX" if features is not None else "exit 1"
    path.write_text(f'#!/bin/sh\n[ "$1" = features ] || exit 2\n{body}\n')
    path.chmod(0o755)
    return path


def runc_options(binary_name: str) -> bytes:
    value = any_pb2.Any(type_url="containerd.runc.v1.Options",
                        value=options_pb2.Options(binary_name=binary_name).SerializeToString())
    return value.SerializeToString()


@pytest.mark.parametrize("options", [b"", b"\n\x05x.y.Z\x12\x03abc"])
@pytest.mark.parametrize("features", [None, b'{"a":1}'])
def test_encoding_matches_protobuf(options: bytes, features: bytes | None) -> None:
    annotations = {"k2": "v2", "k1": "v\u00e9"}
    ours = info.encode_runtime_info(name="n.v2", version="1.2.3", revision="r", options=options,
                                    features=features, annotations=annotations)
    want = introspection_pb2.RuntimeInfo(name="n.v2", annotations=annotations)
    want.version.version, want.version.revision = "1.2.3", "r"
    if options:
        want.options.ParseFromString(options)
    if features is not None:
        want.features.type_url = info.FEATURES_TYPE_URL
        want.features.value = features
    parsed = introspection_pb2.RuntimeInfo.FromString(ours)
    assert parsed == want
    assert ours == want.SerializeToString(deterministic=True)


def test_info_of_the_configured_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = fake_runtime(tmp_path, "myrt", json.dumps(FEATURES, indent=2))
    options = runc_options(str(runtime))
    got = introspection_pb2.RuntimeInfo.FromString(
        info.runtime_info(options, decode_bytes, version=__version__, revision=REVISION))
    assert got.name == "io.containerd.supervisor.v2"
    assert (got.version.version, got.version.revision) == (__version__, REVISION)
    assert got.options.SerializeToString() == options  # echoed as it came
    assert got.features.type_url == (
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features")
    assert json.loads(got.features.value) == FEATURES
    assert dict(got.annotations) == {info.RUNTIME_ANNOTATION: str(runtime)}


def test_default_runtime_looked_up_on_path(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runtime(tmp_path, "runc", json.dumps(FEATURES))
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    got = introspection_pb2.RuntimeInfo.FromString(
        info.runtime_info(b"", decode_bytes, version="v", revision="r"))
    assert not got.HasField("options")
    assert json.loads(got.features.value) == FEATURES
    assert got.annotations[info.RUNTIME_ANNOTATION] == str(tmp_path / "runc")


@pytest.mark.parametrize("output", [None, "not json", "[1, 2]"])
def test_runtime_without_features_leaves_them_out(tmp_path: Path, output: str | None) -> None:
    runtime = fake_runtime(tmp_path, "old", output)
    got = introspection_pb2.RuntimeInfo.FromString(
        info.runtime_info(runc_options(str(runtime)), decode_bytes, version="v", revision="r"))
    assert not got.HasField("features")
    assert got.name == info.RUNTIME_NAME


def test_missing_runtime_and_bad_options_are_errors(tmp_path: Path) -> None:
    with pytest.raises(info.InfoError, match="look up the path of"):
        info.runtime_info(runc_options(str(tmp_path / "nope")), decode_bytes, version="v",
                          revision="r")
    with pytest.raises(info.InfoError, match="unsupported runtime options type"):
        info.runtime_info(b"\n\x07nope.Xy", decode_bytes, version="v", revision="r")


def test_info_flag() -> None:
    assert parse_flags(["-info"]).info
    assert not parse_flags(["-id", "x", "start"]).info


def test_binary_prints_runtime_info(tmp_path: Path) -> None:
    """The binary as containerd runs it: ``SHIM -info``, options on stdin, protobuf out."""
    runtime = fake_runtime(tmp_path, "myrt", json.dumps(FEATURES))
    options = runc_options(str(runtime))
    done = subprocess.run([sys.executable, "-m", "supervisor.shim", "-info"], input=options,
                          capture_output=True, check=False, env={**os.environ})
    assert done.returncode == 0, done.stderr
    got = introspection_pb2.RuntimeInfo.FromString(done.stdout)
    assert got.name == info.RUNTIME_NAME
    assert got.options.SerializeToString() == options
    bad = subprocess.run([sys.executable, "-m", "supervisor.shim", "-info"],
                         input=b"\n\x07nope.Xy", capture_output=True, check=False)
    assert bad.returncode == 1
    assert b"unsupported runtime options type" in bad.stderr
    assert bad.stdout == b""
