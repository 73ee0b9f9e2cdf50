"""The hand decoder of runtime options against protobuf: the same fields, the same reading.

:data:`runopts.MESSAGES` is checked against the classes generated from our
``.proto`` files, and every decode against :func:`via_protobuf` -- the
protobuf-based decoder ``supervisor.options`` had before, kept here as the
oracle: the same bytes must give the same :class:`Settings`, or fail in both.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2, descriptor
from google.protobuf.message import DecodeError, Message

from supervisor import options
from supervisor.api import runtimeoptions_pb2, typeurls
from supervisor.api.runc import options_pb2, runctypes_pb2
from supervisor.errors import InvalidArgument
from supervisor.launch import _pbwire, runopts
from supervisor.launch.runopts import OptionsError
from supervisor.launch.settings import Settings

FD = descriptor.FieldDescriptor
PROTO_TYPES = {runopts.BOOL: FD.TYPE_BOOL, runopts.STRING: FD.TYPE_STRING,
               runopts.UINT32: FD.TYPE_UINT32, runopts.REPEATED_STRING: FD.TYPE_STRING}
CLASSES: list[type[Message]] = [options_pb2.Options, runctypes_pb2.CreateOptions,
                                runctypes_pb2.RuncOptions, runtimeoptions_pb2.Options]


def via_protobuf(value: any_pb2.Any) -> Settings:
    """The decoder this module's replaced (protobuf's parser); DecodeError as it raised it."""
    if not value.type_url:
        return Settings()
    message: Any = typeurls.unpack(value)
    if isinstance(message, options_pb2.Options):
        return Settings(
            binary_name=message.binary_name, root=message.root,
            systemd_cgroup=message.systemd_cgroup, criu_path=message.criu_path,
            no_pivot_root=message.no_pivot_root, no_new_keyring=message.no_new_keyring,
            shim_cgroup=message.shim_cgroup, io_uid=message.io_uid, io_gid=message.io_gid)
    if isinstance(message, runctypes_pb2.CreateOptions):
        return Settings(
            no_pivot_root=message.no_pivot_root, no_new_keyring=message.no_new_keyring,
            shim_cgroup=message.shim_cgroup, io_uid=message.io_uid, io_gid=message.io_gid)
    if isinstance(message, runctypes_pb2.RuncOptions):
        return Settings(binary_name=message.runtime, root=message.runtime_root,
                        criu_path=message.criu_path, systemd_cgroup=message.systemd_cgroup)
    assert isinstance(message, runtimeoptions_pb2.Options)
    return runopts.load_toml(message.config_path) if message.config_path else Settings()


def agree(type_url: str, payload: bytes) -> Settings | None:
    """Decode ``payload`` both ways (bare and as a serialized ``Any``): the same settings, or
    both malformed, or both naming a settings file that is not there (then None)."""
    value = any_pb2.Any(type_url=type_url, value=payload)
    try:
        want = via_protobuf(value)
    except DecodeError:
        text = re.escape(f"malformed runtime options of type '{type_url}'")
        with pytest.raises(OptionsError, match=text):
            runopts.decode(type_url, payload)
        with pytest.raises(OptionsError, match="malformed"):
            runopts.decode_bytes(value.SerializeToString())
        return None
    except OptionsError as e:  # the settings file it names (both read it with load_toml)
        with pytest.raises(OptionsError) as ours:
            runopts.decode(type_url, payload)
        assert str(ours.value) == str(e)
        return None
    assert runopts.decode(type_url, payload) == want
    assert runopts.decode_bytes(value.SerializeToString()) == want
    return want


def full_message(cls: type[Message], config: Path) -> Message:
    """A ``cls`` with every field set to a value other than its default."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.name == "config_path":
            setattr(message, field.name, str(config))
        elif field.is_repeated:
            getattr(message, field.name).extend(["a", "b\u00e9"])
        elif field.type == FD.TYPE_BOOL:
            setattr(message, field.name, True)
        elif field.type == FD.TYPE_UINT32:
            setattr(message, field.name, 4_000_000_000 + field.number)
        else:
            setattr(message, field.name, f"/{field.name}/\u00e9")
    return message


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "shim.toml"
    path.write_text('BinaryName = "crun"\nshim_group = "namespace"\nShimGroupSize = 3\n')
    return path


def test_messages_are_our_protos() -> None:
    """Every field of each message, by number: name, type, repeated -- as generated."""
    assert set(runopts.MESSAGES) == {cls.DESCRIPTOR.full_name for cls in CLASSES}
    for cls in CLASSES:
        table = runopts.MESSAGES[cls.DESCRIPTOR.full_name]
        got = {n: (name, PROTO_TYPES[t], t == runopts.REPEATED_STRING)
               for n, (name, t, _) in table.items()}
        want = {f.number: (f.name, f.type, f.is_repeated) for f in cls.DESCRIPTOR.fields}
        assert got == want, cls.DESCRIPTOR.full_name
        assert typeurls.message_class(cls.DESCRIPTOR.full_name) is cls
        for _, type_, attr in table.values():  # each setting gets a value of its own type
            if attr is not None:
                kind = {runopts.BOOL: bool, runopts.UINT32: int}.get(type_, str)
                assert type(getattr(Settings(), attr)) is kind


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.DESCRIPTOR.name)
@pytest.mark.parametrize("prefix", ["", "type.googleapis.com/"])
def test_every_field_set_and_defaults(cls: type[Message], prefix: str, config: Path) -> None:
    url = prefix + cls.DESCRIPTOR.full_name
    full = agree(url, full_message(cls, config).SerializeToString())
    assert full is not None
    assert full != Settings()  # every message sets something
    assert agree(url, b"") == Settings()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.DESCRIPTOR.name)
def test_unknown_fields_of_every_wire_type_are_skipped(cls: type[Message], config: Path
                                                       ) -> None:
    unknown = (_pbwire.field_varint(99, 5) + _pbwire.field_bytes(100, b"xyz")
               + b"\xa5\x06\x01\x02\x03\x04"  # 100, fixed32
               + b"\xa1\x06" + bytes(8)  # 100, fixed64
               + b"\xa3\x06\x08\x01\xab\x06\xac\x06\xa4\x06")  # 100, a group (nested)
    payload = full_message(cls, config).SerializeToString()
    assert agree(cls.DESCRIPTOR.full_name, unknown + payload + unknown) == agree(
        cls.DESCRIPTOR.full_name, payload)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.DESCRIPTOR.name)
def test_known_fields_of_another_wire_type_are_skipped(cls: type[Message]) -> None:
    """protobuf keeps such a field as an unknown one: the field keeps its default."""
    for field in cls.DESCRIPTOR.fields:
        key = field.number << 3
        for payload in (_pbwire.varint(key | _pbwire.VARINT) + b"\x01",
                        _pbwire.varint(key | _pbwire.LENGTH) + b"\x01x",
                        _pbwire.varint(key | _pbwire.FIXED32) + b"\x01\x00\x00\x00",
                        _pbwire.varint(key | _pbwire.FIXED64) + bytes(8)):
            agree(cls.DESCRIPTOR.full_name, payload)


@pytest.mark.parametrize("payload", [
    b"\x08\x02",  # a bool is any non-zero varint
    b"\x08" + b"\x80" * 9 + b"\x02",  # ... of 64 bits: 2**64 is 0
    b"\x08" + b"\x80" * 9 + b"\x01",  # 2**63
    b"\x20\x85\x80\x80\x80\x20",  # uint32: the low 32 bits
    b"\x20" + b"\xff" * 9 + b"\x01",
    b"\x32\x01a\x32\x01b\x08\x01\x08\x00",  # the last occurrence wins
    b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number
])
def test_varints_and_repeats_read_as_protobuf_reads_them(payload: bytes) -> None:
    assert agree("containerd.runc.v1.Options", payload) is not None


@pytest.mark.parametrize("payload", [
    b"\x32\x05ab",  # truncated string
    b"\x32\x01\xff",  # not UTF-8
    b"\x00\x01",  # field number 0
    b"\xf8\xff\xff\xff\x1f\x01",  # field number beyond 2**29 - 1
    b"\x20" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x20\xff",  # truncated varint
    b"\x0e", b"\x0f",  # wire types 6, 7
    b"\x0c",  # the end of a group never started
    b"\x63\x08\x01",  # a group never ended
    b"\x63\x6c",  # ... ended as another
    b"\x0d\x01\x00",  # truncated fixed32
])
def test_malformed_bytes_are_malformed_for_both(payload: bytes) -> None:
    assert agree("containerd.runc.v1.Options", payload) is None


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.DESCRIPTOR.name)
def test_every_truncation_agrees(cls: type[Message], config: Path) -> None:
    payload = full_message(cls, config).SerializeToString()
    outcomes = [agree(cls.DESCRIPTOR.full_name, payload[:n]) for n in range(len(payload) + 1)]
    assert outcomes[0] == Settings()
    assert None in outcomes  # some cut is malformed ...
    assert outcomes[-1] not in (None, Settings())  # ... the whole is not


def test_the_any_itself() -> None:
    runc = options_pb2.Options(binary_name="crun").SerializeToString()
    url = b"containerd.runc.v1.Options"
    assert runopts.decode_bytes(b"") == Settings()
    assert runopts.decode_bytes(b"\x12\x01x") == Settings()  # a value without a type URL
    # unknown fields and fields of another wire type in the Any are skipped
    data = (b"\x18\x05\x0a" + bytes([len(url)]) + url + b"\x0d\x00\x00\x00\x00"
            + b"\x12" + bytes([len(runc)]) + runc)
    value = any_pb2.Any.FromString(data)
    assert runopts.decode_bytes(data) == via_protobuf(value)
    assert runopts.decode_bytes(data).binary_name == "crun"
    for bad in (b"\xff\xff\xff", b"\x0a\x01\xff", b"\x0a\x05ab"):
        with pytest.raises(DecodeError):
            any_pb2.Any.FromString(bad)
        with pytest.raises(OptionsError, match=r"^malformed runtime options on stdin$"):
            runopts.decode_bytes(bad)


@pytest.mark.parametrize("url", ["foo.Bar", "containerd.events.TaskExit",
                                 "containerd.runc.v1.CheckpointOptions", "x/y/foo.Bar"])
def test_unsupported_types_are_named(url: str) -> None:
    value = any_pb2.Any(type_url=url, value=b"")
    text = "^" + re.escape(f"unsupported runtime options type '{url}'") + "$"
    with pytest.raises(OptionsError, match=text):
        runopts.decode_bytes(value.SerializeToString())
    with pytest.raises(InvalidArgument, match=text):
        options.decode(value)


def test_the_daemon_side_raises_the_same_text_as_invalid_argument(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    cases = [
        (options.decode_bytes, runopts.decode_bytes, b"\xff"),
        (options.decode_bytes, runopts.decode_bytes, typeurls.pack(
            runtimeoptions_pb2.Options(config_path=missing)).SerializeToString()),
        (options.load_toml, runopts.load_toml, missing),
    ]
    for daemon_side, light, arg in cases:
        with pytest.raises(OptionsError) as light_error:
            light(arg)
        with pytest.raises(InvalidArgument) as daemon_error:
            daemon_side(arg)
        assert str(daemon_error.value) == str(light_error.value)


def test_one_decoder_for_create_and_start(config: Path) -> None:
    """:func:`supervisor.options.decode` (``Create``'s ``Any``) is the hand decoder."""
    for cls, empty in itertools.product(CLASSES, (False, True)):
        message = cls() if empty else full_message(cls, config)
        value = typeurls.pack(message)
        assert options.decode(value) == runopts.decode_bytes(value.SerializeToString())
    assert options.decode(None) == options.decode(any_pb2.Any()) == Settings()
