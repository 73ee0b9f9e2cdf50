"""The Task service driven directly over ttrpc, as containerd drives it (real shim, runc)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from harness import Containerd, wait_for
from shim_driver import ShimDriver, make_bundle

from supervisor.api import typeurls
from supervisor.api.introspect import introspect_pb2 as ipb
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.api.types import task_pb2 as types
from supervisor.ttrpc import Code, RPCError


@pytest.fixture
def shim(containerd: Containerd, busybox_rootfs_template: Path, tmp_path: Path
         ) -> Iterator[ShimDriver]:
    bundle = make_bundle(tmp_path / "b1", busybox_rootfs_template, ["sleep", "1000"])
    driver = ShimDriver(containerd, "c1", bundle)
    try:
        yield driver
    finally:
        driver.cleanup()


def fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


async def expect_code(code: Code, coro: object, *needles: str) -> RPCError:
    with pytest.raises(RPCError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code is code, info.value
    for needle in needles:
        assert needle in info.value.message, info.value.message
    return info.value


async def test_kill_before_start_wait_returns_137(shim: ShimDriver) -> None:
    shim.start()
    await shim.connect()
    created = await shim.create()
    assert created.pid > 0
    results: list[api.WaitResponse] = []

    async def wait() -> None:
        results.append(await shim.call("Wait", api.WaitRequest(id="c1"), api.WaitResponse))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(0.2)
        await shim.call("Kill", api.KillRequest(id="c1", signal=9), Empty)
        with trio.fail_after(10):
            while not results:
                await trio.sleep(0.05)
    assert results[0].exit_status == 137
    state = await shim.call("State", api.StateRequest(id="c1"), api.StateResponse)
    assert state.status == types.STOPPED and state.exit_status == 137
    deleted = await shim.call("Delete", api.DeleteRequest(id="c1"), api.DeleteResponse)
    assert (deleted.pid, deleted.exit_status) == (created.pid, 137)
    pid = shim.pid()
    await shim.call("Shutdown", api.ShutdownRequest(id="c1"), Empty)
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, message="shim exit")
    assert not os.path.exists(shim.socket)


async def test_errors_map_to_codes(shim: ShimDriver, tmp_path: Path) -> None:
    shim.start()
    await shim.connect()
    await expect_code(Code.NOT_FOUND, shim.call("State", api.StateRequest(id="nope"),
                                                api.StateResponse), "nope")
    await expect_code(Code.INVALID_ARGUMENT, shim.call(
        "Create", api.CreateTaskRequest(id="c1", bundle=str(tmp_path / "missing")),
        api.CreateTaskResponse), "does not exist")
    bad_opts = api.CreateTaskRequest(id="c1", bundle=str(shim.bundle))
    bad_opts.options.type_url = "example.com/Unknown"
    await expect_code(Code.INVALID_ARGUMENT, shim.call("Create", bad_opts, api.CreateTaskResponse),
                      "unsupported runtime options type")
    await shim.create()
    await expect_code(Code.ALREADY_EXISTS, shim.create())
    await shim.call("Start", api.StartRequest(id="c1"), api.StartResponse)
    await expect_code(Code.FAILED_PRECONDITION,
                      shim.call("Start", api.StartRequest(id="c1"), api.StartResponse), "running")
    await expect_code(Code.FAILED_PRECONDITION,
                      shim.call("Delete", api.DeleteRequest(id="c1"), api.DeleteResponse),
                      "cannot delete", "running")
    await shim.call("Pause", api.PauseRequest(id="c1"), Empty)
    await expect_code(Code.FAILED_PRECONDITION,
                      shim.call("Pause", api.PauseRequest(id="c1"), Empty), "paused")
    await shim.call("Resume", api.ResumeRequest(id="c1"), Empty)

    spec = typeurls.pack(api.StartRequest())  # any Any; replaced below
    spec.type_url = typeurls.OCI_PROCESS
    spec.value = b'{"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}'
    await shim.call("Exec", api.ExecProcessRequest(id="c1", exec_id="e1", spec=spec), Empty)
    await expect_code(Code.ALREADY_EXISTS, shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="e1", spec=spec), Empty), "e1")
    await expect_code(Code.INVALID_ARGUMENT, shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="", spec=spec), Empty))
    await expect_code(Code.NOT_FOUND, shim.call(
        "Start", api.StartRequest(id="c1", exec_id="nope"), api.StartResponse), "nope")
    # The Shutdown containerd sends while a container lives changes nothing.
    await shim.call("Shutdown", api.ShutdownRequest(id="c1"), Empty)
    await trio.sleep(0.3)
    assert shim.pid() > 0
    state = await shim.call("State", api.StateRequest(id="c1"), api.StateResponse)
    assert state.status == types.RUNNING


async def test_terminal_exec_and_resize(shim: ShimDriver, tmp_path: Path) -> None:
    shim.start()
    await shim.connect()
    await shim.create()
    await shim.call("Start", api.StartRequest(id="c1"), api.StartResponse)
    out = fifo(tmp_path / "out")
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    spec = typeurls.pack(api.StartRequest())
    spec.type_url = typeurls.OCI_PROCESS
    spec.value = (b'{"args": ["sh", "-c", "sleep 0.5; tty; stty size"], "cwd": "/",'
                  b' "env": ["PATH=/bin"]}')
    await shim.call("Exec", api.ExecProcessRequest(id="c1", exec_id="t1", terminal=True,
                                                   stdout=out, spec=spec), Empty)
    await shim.call("Start", api.StartRequest(id="c1", exec_id="t1"), api.StartResponse)
    await shim.call("ResizePty", api.ResizePtyRequest(id="c1", exec_id="t1", width=100,
                                                      height=30), Empty)
    waited = await shim.call("Wait", api.WaitRequest(id="c1", exec_id="t1"), api.WaitResponse)
    assert waited.exit_status == 0
    data = b""
    with trio.fail_after(10):
        while b"30 100" not in data:
            try:
                chunk = os.read(reader, 4096)
            except BlockingIOError:
                await trio.sleep(0.05)
                continue
            data += chunk
    os.close(reader)
    assert b"/dev/pts/" in data


async def test_terminal_takes_every_log_uri_and_refuses_a_bad_one(shim: ShimDriver,
                                                                   tmp_path: Path) -> None:
    """A terminal exec's output goes to a ``binary://`` logger as a piped one's does (one
    opener); a stdin URI it cannot serve is INVALID_ARGUMENT, before runc runs."""
    shim.start()
    await shim.connect()
    await shim.create()
    await shim.call("Start", api.StartRequest(id="c1"), api.StartResponse)
    out = tmp_path / "out"
    logger = tmp_path / "logger.sh"
    logger.write_text("#!/bin/sh\nexec 5>&-\n"
                      'cat <&4 > "$2.err"\ncat <&3 > "$2.tmp"\nmv "$2.tmp" "$2"\n')
    logger.chmod(0o755)
    spec = typeurls.pack(api.StartRequest())
    spec.type_url = typeurls.OCI_PROCESS
    spec.value = b'{"args": ["sh", "-c", "tty"], "cwd": "/", "env": ["PATH=/bin"]}'
    await shim.call("Exec", api.ExecProcessRequest(
        id="c1", exec_id="t1", terminal=True, stdout=f"binary://{logger}?out={out}",
        spec=spec), Empty)
    await shim.call("Start", api.StartRequest(id="c1", exec_id="t1"), api.StartResponse)
    waited = await shim.call("Wait", api.WaitRequest(id="c1", exec_id="t1"), api.WaitResponse)
    assert waited.exit_status == 0
    with trio.fail_after(10):
        while not out.exists():
            await trio.sleep(0.05)
    assert out.read_bytes().startswith(b"/dev/pts/")
    assert (tmp_path / "out.err").read_bytes() == b""

    await shim.call("Exec", api.ExecProcessRequest(
        id="c1", exec_id="t2", terminal=True, stdin="tcp://x", spec=spec), Empty)
    await expect_code(Code.INVALID_ARGUMENT, shim.call(
        "Start", api.StartRequest(id="c1", exec_id="t2"), api.StartResponse), "stdin")
    state = await shim.call("State", api.StateRequest(id="c1"), api.StateResponse)
    assert state.status == types.RUNNING


async def test_exec_exit_published_before_init_exit(shim: ShimDriver,
                                                    containerd: Containerd) -> None:
    out = containerd.dir / "events.txt"
    with open(out, "wb") as f:
        watcher = subprocess.Popen(containerd.ctr_argv("events"), stdout=f,
                                   stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        shim.start()
        await shim.connect()
        await shim.create()
        await shim.call("Start", api.StartRequest(id="c1"), api.StartResponse)
        spec = typeurls.pack(api.StartRequest())
        spec.type_url = typeurls.OCI_PROCESS
        spec.value = b'{"args": ["sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"]}'
        for i in range(5):
            await shim.call("Exec", api.ExecProcessRequest(id="c1", exec_id=f"e{i}", spec=spec),
                            Empty)
            await shim.call("Start", api.StartRequest(id="c1", exec_id=f"e{i}"),
                            api.StartResponse)
        await shim.call("Kill", api.KillRequest(id="c1", signal=9), Empty)
        init = await shim.call("Wait", api.WaitRequest(id="c1"), api.WaitResponse)
        assert init.exit_status == 137

        def exits() -> list[str]:
            return [ln for ln in out.read_text().splitlines() if "/tasks/exit" in ln]

        wait_for(lambda: len(exits()) == 6, 10, message="six exits")
    finally:
        watcher.kill()
        watcher.wait()
    lines = exits()
    assert all('"id":"e' in ln.replace(" ", "") for ln in lines[:5]), lines
    assert '"id":"c1"' in lines[5].replace(" ", ""), lines


async def test_delete_action_after_shim_sigkill(shim: ShimDriver) -> None:
    shim.start()
    await shim.connect()
    created = await shim.create()
    await shim.call("Start", api.StartRequest(id="c1"), api.StartResponse)
    pid = shim.pid()
    os.kill(pid, 9)
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, message="shim gone")
    response = shim.delete_action()
    assert response.pid == created.pid
    assert response.exit_status == 137
    assert response.exited_at.seconds > 0
    wait_for(lambda: not psutil.pid_exists(created.pid)
             or psutil.Process(created.pid).status() == psutil.STATUS_ZOMBIE, 10,
             message="the container's process to be gone")
    assert not os.path.exists(shim.socket)
    runc_state = Path("/run/containerd/runc") / shim.containerd.namespace / "c1"
    assert not runc_state.exists()


async def test_output_never_blocks_without_a_reader(shim: ShimDriver, tmp_path: Path) -> None:
    """Nobody reads the stdout FIFO (containerd is down): the process still runs to the end,
    and a reader that comes back later gets every line, in order."""
    out = fifo(tmp_path / "out")
    script = ('i=0; while [ $i -lt 200000 ]; do i=$((i+1)); echo "line $i"; done')
    bundle = make_bundle(tmp_path / "b2", Path(shim.bundle / "rootfs"), ["sh", "-c", script])
    talker = ShimDriver(shim.containerd, "talker", bundle)
    try:
        talker.start()
        await talker.connect()
        await talker.create(stdout=out)
        await talker.call("Start", api.StartRequest(id="talker"), api.StartResponse)
        with trio.fail_after(60):
            waited = await talker.call("Wait", api.WaitRequest(id="talker"), api.WaitResponse)
        assert waited.exit_status == 0
        # The shim holds what nobody read yet, and says so.
        assert talker.client is not None
        raw = await talker.client.call("supervisor.introspect.v1.Introspect", "Containers",
                                       ipb.ContainersRequest(id="talker").SerializeToString(),
                                       timeout=5)
        io = ipb.ContainersResponse.FromString(raw).containers[0].init.io
        assert io.stdout_backlog_bytes > 0
        assert io.stdout_dropped_bytes == 0
        reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        data = bytearray()
        with trio.fail_after(30):
            while not data.endswith(b"line 200000\n"):
                try:
                    chunk = os.read(reader, 1 << 20)
                except BlockingIOError:
                    await trio.sleep(0.01)
                    continue
                data += chunk
        os.close(reader)
        lines = bytes(data).decode().splitlines()
        assert lines == [f"line {i}" for i in range(1, 200001)]
    finally:
        talker.cleanup()


async def test_garbage_on_the_socket_costs_only_that_connection(shim: ShimDriver) -> None:
    shim.start()
    await shim.connect()
    await shim.create()
    for junk in (b"\xff" * 64, b"\x00\x00\x00\x05\x00\x00\x00\x01\x01", b"GET / HTTP/1.1\r\n\r\n"):
        raw = await trio.open_unix_socket(shim.socket)
        await raw.send_all(junk)
        with trio.move_on_after(2):
            await raw.receive_some(1024)  # the shim closes it (or answers an error)
        await raw.aclose()
    state = await shim.call("State", api.StateRequest(id="c1"), api.StateResponse)
    assert state.status == types.CREATED
    assert shim.pid() > 0


async def test_a_delete_past_its_deadline_is_finished_by_the_next(shim: ShimDriver,
                                                                  tmp_path: Path) -> None:
    """Issue 15 item 2, as shown: nobody reads the output, so Delete waits for it to drain
    (DRAIN_TIMEOUT, 2 s) and a 0.5 s deadline cancels it.  The next Delete finishes the job
    and Shutdown then ends the shim."""
    out = fifo(tmp_path / "out")
    script = 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); echo "line $i"; done'
    bundle = make_bundle(tmp_path / "b2", Path(shim.bundle / "rootfs"), ["sh", "-c", script])
    talker = ShimDriver(shim.containerd, "talker", bundle)
    try:
        talker.start()
        await talker.connect()
        created = await talker.create(stdout=out)
        await talker.call("Start", api.StartRequest(id="talker"), api.StartResponse)
        waited = await talker.call("Wait", api.WaitRequest(id="talker"), api.WaitResponse)
        assert waited.exit_status == 0
        with pytest.raises(RPCError) as info:
            await talker.call("Delete", api.DeleteRequest(id="talker"), api.DeleteResponse,
                              timeout=0.5)
        assert info.value.code is Code.DEADLINE_EXCEEDED, info.value
        deleted = await talker.call("Delete", api.DeleteRequest(id="talker"),
                                    api.DeleteResponse)
        assert (deleted.pid, deleted.exit_status) == (created.pid, 0)
        await expect_code(Code.NOT_FOUND, talker.call("State", api.StateRequest(id="talker"),
                                                      api.StateResponse))
        pid = talker.pid()
        await talker.call("Shutdown", api.ShutdownRequest(id="talker"), Empty)
        wait_for(lambda: not psutil.pid_exists(pid)
                 or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
                 message="shim exit")
    finally:
        talker.cleanup()


async def test_bad_ids_are_invalid_arguments(shim: ShimDriver) -> None:
    """Issue 15 item 9, through the real server: nothing reaches the bundle."""
    shim.start()
    await shim.connect()
    def files() -> list[str]:
        return sorted(p.name for p in shim.bundle.iterdir())

    before = files()
    await expect_code(Code.INVALID_ARGUMENT, shim.call(
        "Create", api.CreateTaskRequest(id="../x", bundle=str(shim.bundle)),
        api.CreateTaskResponse), "'../x'")
    assert files() == before
    await shim.create()
    before = files()
    spec = typeurls.pack(api.StartRequest())
    spec.type_url = typeurls.OCI_PROCESS
    spec.value = b'{"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}'
    for bad in ("../x", "a/b", "x" * 77, "\u00e9"):
        await expect_code(Code.INVALID_ARGUMENT, shim.call(
            "Exec", api.ExecProcessRequest(id="c1", exec_id=bad, spec=spec), Empty), repr(bad))
    assert files() == before
    assert not (shim.bundle.parent / "x.process.json").exists()
