"""Every runtime-options form containerd sends decodes to the same Settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from supervisor.api import runtimeoptions_pb2, typeurls
from supervisor.api.runc import options_pb2, runctypes_pb2
from supervisor.errors import InvalidArgument
from supervisor.launch import runopts
from supervisor.options import Settings, decode, decode_bytes, load_toml
from supervisor.task import LogLevel


def test_none_and_empty() -> None:
    assert decode(None) == Settings()
    assert decode(any_pb2.Any()) == Settings()
    assert decode_bytes(b"") == Settings()


def test_runc_v1_options() -> None:
    opts = options_pb2.Options(
        binary_name="crun", root="/run/crun", systemd_cgroup=True, no_pivot_root=True,
        shim_cgroup="/shim", io_uid=1000, io_gid=1001, criu_path="/criu",
    )
    s = decode(typeurls.pack(opts))
    assert (s.binary_name, s.root, s.systemd_cgroup, s.no_pivot_root) == (
        "crun", "/run/crun", True, True)
    assert (s.shim_cgroup, s.io_uid, s.io_gid, s.criu_path) == ("/shim", 1000, 1001, "/criu")


def test_legacy_create_options_as_start_stdin() -> None:
    opts = runctypes_pb2.CreateOptions(no_pivot_root=True, shim_cgroup="/x", io_uid=7, io_gid=8)
    s = decode_bytes(typeurls.pack(opts).SerializeToString())
    assert s.no_pivot_root and s.shim_cgroup == "/x" and (s.io_uid, s.io_gid) == (7, 8)
    assert s.binary_name == ""


def test_legacy_runc_options() -> None:
    opts = runctypes_pb2.RuncOptions(runtime="crun", runtime_root="/r", systemd_cgroup=True)
    s = decode(typeurls.pack(opts))
    assert (s.binary_name, s.root, s.systemd_cgroup) == ("crun", "/r", True)


def test_prefixed_type_url() -> None:
    value = typeurls.pack(options_pb2.Options(binary_name="crun"))
    value.type_url = "type.googleapis.com/" + value.type_url
    assert decode(value).binary_name == "crun"


def test_runtimeoptions_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "shim.toml"
    cfg.write_text('BinaryName = "crun"\nroot = "/run/x"\nSystemdCgroup = true\n'
                   'log_level = "debug"\n')
    s = decode(typeurls.pack(runtimeoptions_pb2.Options(config_path=str(cfg))))
    assert (s.binary_name, s.root, s.systemd_cgroup, s.log_level) == (
        "crun", "/run/x", True, "debug")
    assert s.config_path == str(cfg)


def test_toml_under_options_table(tmp_path: Path) -> None:
    cfg = tmp_path / "shim.toml"
    cfg.write_text('[options]\nBinaryName = "runc"\n')
    assert load_toml(str(cfg)).binary_name == "runc"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("Nope = 1\n", "unknown key"),
        ('SystemdCgroup = "yes"\n', "must be a bool"),
        ("IoUid = true\n", "must be a int"),
        ("this is not toml", "shim settings file"),
    ],
)
def test_bad_toml_is_invalid_argument(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "shim.toml"
    cfg.write_text(text)
    with pytest.raises(InvalidArgument, match=needle):
        load_toml(str(cfg))


def test_missing_toml_file() -> None:
    with pytest.raises(InvalidArgument, match="No such file"):
        decode(typeurls.pack(runtimeoptions_pb2.Options(config_path="/no/such.toml")))


def test_unknown_type_is_clear() -> None:
    with pytest.raises(InvalidArgument, match=r"unsupported runtime options type 'foo\.Bar'"):
        decode(any_pb2.Any(type_url="foo.Bar", value=b""))


def test_malformed_bytes() -> None:
    with pytest.raises(InvalidArgument):
        decode_bytes(b"\xff\xff\xff")
    value = typeurls.pack(options_pb2.Options())
    value.value = b"\x0a\xff"
    with pytest.raises(InvalidArgument, match="malformed"):
        decode(value)


def test_settings_round_trip_through_bundle(tmp_path: Path) -> None:
    s = Settings(binary_name="crun", root="/r", systemd_cgroup=True)
    s.save(str(tmp_path))
    assert Settings.load(str(tmp_path)) == s
    assert Settings.load(str(tmp_path / "missing")) == Settings()


def test_log_level_names() -> None:
    logger = logging.getLogger("test_options.names")
    LogLevel(logger).ask("Warn")
    assert logger.level == logging.WARNING
    LogLevel(logger).ask("debug")
    assert logger.level == logging.DEBUG
    with pytest.raises(InvalidArgument, match="unknown LogLevel 'loud'"):
        LogLevel(logger).ask("loud")


def test_log_level_is_the_most_verbose_any_container_asked_for() -> None:
    """A shared shim: one container's Create must not quiet what another asked to see."""
    logger = logging.getLogger("test_options.shared")
    logger.setLevel(logging.INFO)  # the shim's default (containerd without -debug)
    level = LogLevel(logger)
    level.ask("error")  # the first container's choice is the shim's
    assert logger.level == logging.ERROR
    level.ask("debug")  # a second container wants more: everyone gets more
    assert logger.level == logging.DEBUG
    level.ask("warn")  # a third asks for less: no change
    level.ask("info")
    assert logger.level == logging.DEBUG
    with pytest.raises(InvalidArgument):
        level.ask("loud")
    assert logger.level == logging.DEBUG


def test_every_toml_key_names_a_settings_field() -> None:
    # One schema: a TOML key for a field Settings no longer has would fail at load time.
    assert {name for name, _ in runopts._TOML_KEYS.values()} <= set(Settings.__slots__)
    for name, kind in runopts._TOML_KEYS.values():
        assert type(getattr(Settings(), name)) is kind
