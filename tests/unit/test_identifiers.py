"""Ids are containerd identifiers or refused (issue 15 item 9).

An exec id becomes part of a file name in the bundle, so ``../x`` must be
refused before anything is written: with INVALID_ARGUMENT naming the id, as
containerd itself would refuse it.  One validator (:mod:`supervisor.identifiers`)
serves the Task service, the container and the event spool.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from google.protobuf.message import Message
from test_task_exits import ScriptedReaper, _spec

from supervisor import errors, identifiers, task
from supervisor.api.group import group_pb2
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.container import Container
from supervisor.events import Outbox
from supervisor.io import Stdio
from supervisor.options import Settings
from supervisor.ttrpc import CallContext, Code, RPCError

SUPERVISOR = Path(identifiers.__file__).parent

GOOD = ["c1", "0", "a.b-c_d", "ABC123", "x" * 76, "sha256.0123abcd", "a-b-c"]
BAD = [
    "../x", "a/b", "", "x" * 77, "é", "caf\u00e9", "\uff41",  # fullwidth a
    ".", "..", "a..b", "-a", "a-", "_", "a b", "a\n", "\na", "a\x00b", "a:b", "a/../b",
]


@pytest.mark.parametrize("value", GOOD)
def test_containerd_identifiers_are_accepted(value: str) -> None:
    assert identifiers.is_valid(value)
    assert identifiers.check(value) == value


@pytest.mark.parametrize("value", BAD)
def test_anything_else_is_refused_naming_it(value: str) -> None:
    assert not identifiers.is_valid(value)
    with pytest.raises(errors.InvalidArgument) as info:
        identifiers.check(value, "exec id")
    assert info.value.args[0].startswith("exec id ")
    if value:
        assert repr(value) in str(info.value)


def test_a_huge_id_is_not_echoed_whole() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        identifiers.check("a" * 100_000)
    assert len(str(info.value)) < 400


def test_one_copy_of_the_rule() -> None:
    """The events spool checks namespaces and topics with the same validator: no copy."""
    rule = re.compile(r"A-Za-z0-9\]\+\(\?:\[\._-\]")
    holders = sorted(p.name for p in SUPERVISOR.rglob("*.py") if rule.search(p.read_text()))
    assert holders == ["identifiers.py"]


def test_importable_without_trio_or_protobuf() -> None:
    code = ("import sys, supervisor.identifiers; "
            "print(sorted(m for m in sys.modules if m == 'trio' or m.startswith('google')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"


# --- through the Task service, the real Container, a real bundle ----------------


def _bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    return bundle


def _files(where: Path) -> list[str]:
    return sorted(str(p.relative_to(where)) for p in where.rglob("*"))


@pytest.fixture
async def service() -> AsyncIterator[task.TaskService]:
    async def nowhere(event: object) -> None:
        raise ConnectionError("no containerd in this test")

    async with trio.open_nursery() as nursery:
        yield task.TaskService(reaper=ScriptedReaper(), outbox=Outbox(nowhere, "ns"),
                               nursery=nursery, namespace="ns", request_shutdown=lambda: None)
        nursery.cancel_scope.cancel()


async def _call(service: task.TaskService, method: str, request: Message) -> RPCError:
    """The status the rpc answers (through the service's handler table, as served)."""
    handlers = {**service.handlers(), **service.group_handlers()}
    context = CallContext(task.SERVICE, method, {}, None, 1)
    # A refused id never reaches runc; one that did would wait for an exit this
    # test's reaper never reaps: bounded, so that is a failure and not a hang.
    with pytest.raises(RPCError) as info, trio.fail_after(10):
        await handlers[method](context, request.SerializeToString())
    return info.value


@pytest.mark.parametrize("bad", BAD)
async def test_create_refuses_a_bad_container_id(service: task.TaskService, tmp_path: Path,
                                                 bad: str) -> None:
    bundle = _bundle(tmp_path)
    before = _files(tmp_path)
    status = await _call(service, "Create", api.CreateTaskRequest(id=bad, bundle=str(bundle)))
    assert status.code is Code.INVALID_ARGUMENT
    assert "container id" in status.message and (not bad or repr(bad) in status.message)
    assert _files(tmp_path) == before  # nothing created on disk
    assert not service.containers


@pytest.mark.parametrize("method", ["State", "Start", "Delete", "Kill", "Wait", "Exec"])
async def test_rpcs_naming_a_container_refuse_a_bad_id(service: task.TaskService,
                                                       method: str) -> None:
    cls = {"State": api.StateRequest, "Start": api.StartRequest, "Delete": api.DeleteRequest,
           "Kill": api.KillRequest, "Wait": api.WaitRequest,
           "Exec": api.ExecProcessRequest}[method]
    status = await _call(service, method, cls(id="../c1"))
    assert status.code is Code.INVALID_ARGUMENT and "'../c1'" in status.message


async def test_join_refuses_a_bad_container_id(service: task.TaskService) -> None:
    status = await _call(service, "Join", group_pb2.JoinRequest(id="a/b"))
    assert status.code is Code.INVALID_ARGUMENT and "'a/b'" in status.message
    assert not service.group.reserved


@pytest.mark.parametrize("bad", BAD)
async def test_exec_refuses_a_bad_exec_id(tmp_path: Path, bad: str) -> None:
    """Exec and every rpc naming the exec; its files would be named after the id."""
    bundle = _bundle(tmp_path)
    before = _files(tmp_path)
    container = Container("c1", str(bundle), namespace="ns", settings=Settings(),
                          reaper=ScriptedReaper(), rootfs=[], stdio=Stdio("", "", "", False))
    with pytest.raises(errors.InvalidArgument) as info:
        container.add_exec(bad, Stdio("", "", "", False), _spec().value)
    assert "exec id" in str(info.value) and (not bad or repr(bad) in str(info.value))
    if bad:  # "" names the init
        with pytest.raises(errors.InvalidArgument):
            container.process(bad)
    assert not container.execs
    assert _files(tmp_path) == before
