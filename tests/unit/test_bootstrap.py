"""containerd 2.3's ``BootstrapParams`` on ``start``'s stdin, told apart from a bare ``Any``.

Messages are built with the class generated from our copy of containerd's
``api/runtime/bootstrap/v1/bootstrap.proto``, as containerd 2.3's
``pkg/shim/util.go`` builds them (the runtime options as an extension, unchanged).
"""

from __future__ import annotations

import os

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from supervisor.api import runtimeoptions_pb2, typeurls
from supervisor.api.runc import options_pb2, runctypes_pb2
from supervisor.api.runtime.bootstrap.v1 import bootstrap_pb2 as bs
from supervisor.launch import bootstrap
from supervisor.launch.bootstrap import BootstrapError, read_stdin
from supervisor.launch.flags import Flags
from supervisor.launch.start import socket_address
from supervisor.options import decode_bytes

ID, NS = "c1", "default"


def runc_any(binary: str = "crun") -> any_pb2.Any:
    return any_pb2.Any(type_url="containerd.runc.v1.Options",
                       value=options_pb2.Options(binary_name=binary).SerializeToString())


def params(*extensions: any_pb2.Any, **kw: object) -> bs.BootstrapParams:
    p = bs.BootstrapParams(instance_id=kw.pop("instance_id", ID),
                           namespace=kw.pop("namespace", NS),
                           containerd_version="v2.3.0",
                           containerd_ttrpc_address="/run/containerd/containerd.sock.ttrpc",
                           containerd_grpc_address="/run/containerd/containerd.sock",
                           containerd_binary="/usr/bin/containerd", **kw)  # type: ignore[arg-type]
    for e in extensions:
        p.extensions.add().value.CopyFrom(e)
    return p


def test_bare_any_is_the_options() -> None:
    data = runc_any().SerializeToString()
    assert read_stdin(data, ID, NS) == (data, None)
    assert read_stdin(b"", ID, NS) == (b"", None)


def test_bootstrap_params_give_their_options_extension() -> None:
    options = runc_any("crun")
    data = params(options, socket_dir="/run/s2",
                  log_level=bs.LOG_LEVEL_DEBUG).SerializeToString()
    got, p = read_stdin(data, ID, NS)
    assert p is not None
    assert got == options.SerializeToString()
    assert decode_bytes(got).binary_name == "crun"
    assert (p.instance_id, p.namespace, p.socket_dir, p.log_level) == (
        ID, NS, "/run/s2", -4)
    assert p.containerd_grpc_address == "/run/containerd/containerd.sock"
    assert p.containerd_ttrpc_address == "/run/containerd/containerd.sock.ttrpc"


def test_bootstrap_params_without_options() -> None:
    got, p = read_stdin(params().SerializeToString(), ID, NS)
    assert got == b""
    assert p is not None
    assert p.socket_dir == ""


def test_options_extension_found_among_others() -> None:
    other = any_pb2.Any(type_url="containerd.io/cri.v1.PodSandboxConfig", value=b"\n\x01x")
    options = runc_any()
    got, _ = read_stdin(params(other, options).SerializeToString(), ID, NS)
    assert got == options.SerializeToString()
    # an extension of no known type alone is passed on: the options decoder names it
    got, _ = read_stdin(params(other).SerializeToString(), ID, NS)
    assert got == other.SerializeToString()


def test_option_types_are_the_decoders() -> None:
    """:data:`bootstrap.OPTION_TYPES` (light) names what :mod:`supervisor.options` decodes."""
    for cls in (options_pb2.Options, runctypes_pb2.CreateOptions, runctypes_pb2.RuncOptions,
                runtimeoptions_pb2.Options):
        assert cls.DESCRIPTOR.full_name in bootstrap.OPTION_TYPES
        value = typeurls.pack(cls())
        decode_bytes(value.SerializeToString())  # does not raise
    assert len(bootstrap.OPTION_TYPES) == 4


@pytest.mark.parametrize("level", [-8, -4, 0, 4, 12, -100])
def test_log_level_negative_varints(level: int) -> None:
    _, p = read_stdin(params(log_level=level).SerializeToString(), ID, NS)
    assert p is not None
    assert p.log_level == level


@pytest.mark.parametrize(("level", "debug"), [(-8, True), (-4, True), (0, False), (4, False)])
def test_apply(level: int, debug: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTRPC_ADDRESS", raising=False)
    _, p = read_stdin(params(log_level=level, socket_dir="/run/x").SerializeToString(), ID, NS)
    assert p is not None
    flags = Flags(namespace=NS, id=ID, address="/a.sock")
    bootstrap.apply(p, flags)
    assert (flags.debug, flags.socket_dir, flags.address) == (debug, "/run/x", "/a.sock")
    assert os.environ["TTRPC_ADDRESS"] == "/run/containerd/containerd.sock.ttrpc"


def test_socket_dir_moves_the_socket() -> None:
    default = socket_address("/a.sock", NS, ID)
    moved = socket_address("/a.sock", NS, ID, "/run/x")
    assert default.startswith("unix:///run/containerd/s/")
    assert moved == "unix:///run/x/" + default.rpartition("/")[2]


def test_params_of_another_container_are_an_error() -> None:
    with pytest.raises(BootstrapError, match="neither runtime options"):
        read_stdin(params(instance_id="other").SerializeToString(), ID, NS)
    with pytest.raises(BootstrapError, match="neither runtime options"):
        read_stdin(params(namespace="k8s.io").SerializeToString(), ID, NS)


def test_any_whose_type_url_is_the_id_stays_an_any() -> None:
    """Only field 1 == -id *and* field 2 == -namespace makes BootstrapParams."""
    data = any_pb2.Any(type_url=ID, value=b"x").SerializeToString()
    assert read_stdin(data, ID, NS) == (data, None)


def test_garbage_goes_to_the_options_decoder() -> None:
    assert read_stdin(b"\xff\xff", ID, NS) == (b"\xff\xff", None)
    with pytest.raises(BootstrapError, match="malformed"):
        bootstrap.parse_params(b"\x0a\x05ab")


def test_our_plain_answer_is_no_bootstrap_result() -> None:
    """containerd 2.3 tries stdout as a BootstrapResult first; an address must fail that."""
    for address in (socket_address("/run/containerd/containerd.sock", NS, ID),
                    socket_address("/a", NS, ID, "/x")):
        with pytest.raises(DecodeError):
            bs.BootstrapResult.FromString(address.encode())
