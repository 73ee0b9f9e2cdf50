"""The OCI runtime's command line (runc, crun, or any runtime that speaks it).

Design
------
:class:`OCIRuntime` turns each operation into one run of the runtime binary:
``<binary> --root R --log L --log-format json [--systemd-cgroup] <command> ...``
(the global flags from :mod:`supervisor.launch.runcmd`, which ``delete`` uses
too).  Every run is started with :func:`supervisor.reaper.spawn` under a reaper
subscription opened *before* the spawn, and its exit comes from the reaper
(nothing here waits for a child any other way).

When a run fails, the runtime's own words reach the user: the last ``error``
records of its JSON log (``--log``), else what it printed on stderr, go into
:class:`OCIRuntimeError`'s message (``runc create failed: ...``), which the
Task service returns to containerd as is.

Invariants
----------
* The runtime's state root is per namespace (``<root>/<namespace>``,
  :func:`supervisor.launch.runcmd.state_root`), as containerd's runc shim
  does, so ``runc --root`` by hand finds our containers.
* Only :meth:`OCIRuntime.create` and :meth:`OCIRuntime.exec` hand the runtime
  the container's stdio; every other command's stdout and stderr are captured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from supervisor.launch import runcmd
from supervisor.launch.defaults import DEFAULT_BINARY, DEFAULT_ROOT
from supervisor.reaper import Reaper, spawn

__all__ = ["DEFAULT_BINARY", "DEFAULT_ROOT", "OCIRuntime", "OCIRuntimeError", "read_pid_file"]

log = logging.getLogger("supervisor.runtime")



class OCIRuntimeError(Exception):
    """The runtime binary failed: it could not be run, or it said no."""

    def __init__(self, command: str, message: str, status: int | None = None) -> None:
        self.command = command
        self.status = status
        self.runtime_message = message
        super().__init__(message)

    @property
    def not_found(self) -> bool:
        text = self.runtime_message.lower()
        return "does not exist" in text or "not found" in text or "no such" in text


@dataclass(frozen=True)
class Result:
    status: int
    stdout: bytes
    stderr: bytes


def _read_json_log_errors(path: str, offset: int) -> str:
    """The ``error``/``fatal`` messages the runtime logged past ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    messages: list[str] = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            text = line.decode(errors="replace").strip()
            if text:
                messages.append(text)
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "fatal"):
            msg = record.get("msg")
            if isinstance(msg, str) and msg:
                messages.append(msg)
    return "; ".join(messages)


async def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


class OCIRuntime:
    """One OCI runtime binary and its state root for one namespace."""

    def __init__(
        self,
        reaper: Reaper,
        *,
        binary: str = DEFAULT_BINARY,
        root: str = DEFAULT_ROOT,
        namespace: str,
        log_path: str,
        systemd_cgroup: bool = False,
        debug: bool = False,
    ) -> None:
        self.reaper = reaper
        self.binary = binary or DEFAULT_BINARY
        self.root = runcmd.state_root(root, namespace)
        self.log_path = log_path
        self.systemd_cgroup = systemd_cgroup
        self.debug = debug

    @property
    def name(self) -> str:
        return os.path.basename(self.binary)

    def _argv(self, args: Sequence[str]) -> list[str]:
        return [*runcmd.global_argv(self.binary, self.root, self.log_path,
                                    systemd_cgroup=self.systemd_cgroup, debug=self.debug), *args]

    async def run(
        self,
        args: Sequence[str],
        *,
        stdio: Mapping[int, int] | None = None,
        stdin_data: bytes | None = None,
        check: bool = True,
    ) -> Result:
        """Run ``<binary> <global flags> args``; raise OCIRuntimeError if it fails.

        ``stdio`` hands the child particular fds (create/exec); otherwise its
        stdout and stderr are captured and its stdin is ``stdin_data`` or empty.
        """
        command = args[0]
        try:
            log_offset = os.stat(self.log_path).st_size
        except OSError:
            log_offset = 0
        fds: dict[int, int] = dict(stdio or {})
        ours: list[int] = []
        out_r = err_r = in_w = -1
        try:
            if 1 not in fds:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                ours += [out_r, out_w]
                fds[1] = out_w
            if 2 not in fds:
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                ours += [err_r, err_w]
                fds[2] = err_w
            if 0 not in fds and stdin_data is not None:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                ours += [in_r, in_w]
                fds[0] = in_r
            with self.reaper.subscribe() as sub:
                argv = self._argv(args)
                log.debug("run %s", " ".join(argv))
                try:
                    pid = spawn(argv, fds=fds)
                except OSError as e:
                    raise OCIRuntimeError(
                        command, f"{self.name} {command} failed: {self.binary}: {e.strerror}"
                    ) from e
                finally:
                    # The child holds its ends now; keep only ours.
                    for fd in fds.values():
                        if fd in ours:
                            ours.remove(fd)
                            os.close(fd)
                out = err = b""
                async with trio.open_nursery() as nursery:

                    async def collect(fd: int, which: str) -> None:
                        nonlocal out, err
                        ours.remove(fd)
                        data = await _read_all(fd)
                        if which == "out":
                            out = data
                        else:
                            err = data

                    if out_r >= 0:
                        nursery.start_soon(collect, out_r, "out")
                    if err_r >= 0:
                        nursery.start_soon(collect, err_r, "err")
                    if in_w >= 0:
                        ours.remove(in_w)
                        async with trio.lowlevel.FdStream(in_w) as stream:
                            with contextlib.suppress(trio.BrokenResourceError):
                                await stream.send_all(stdin_data or b"")
                    exit_ = await sub.wait_for(pid)
        finally:
            for fd in ours:
                os.close(fd)
        if check and exit_.status != 0:
            message = _read_json_log_errors(self.log_path, log_offset)
            if not message:
                message = (err.decode(errors="replace").strip()
                           or out.decode(errors="replace").strip())
            if not message:
                message = f"exit status {exit_.status}"
            raise OCIRuntimeError(
                command, f"{self.name} {command} failed: {message}", exit_.status
            )
        return Result(exit_.status, out, err)

    # --- the operations -------------------------------------------------

    async def create(
        self,
        container_id: str,
        bundle: str,
        *,
        pid_file: str,
        stdio: Mapping[int, int],
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self.run([*args, container_id], stdio=stdio)

    async def start(self, container_id: str) -> None:
        await self.run(["start", container_id])

    async def exec(
        self,
        container_id: str,
        process_json: str,
        *,
        pid_file: str,
        stdio: Mapping[int, int],
        console_socket: str | None = None,
    ) -> None:
        args = ["exec", "--detach", "--process", process_json, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run([*args, container_id], stdio=stdio)

    async def kill(self, container_id: str, signal: int, *, all: bool = False) -> None:
        args = ["kill"]
        if all:
            args.append("--all")
        await self.run([*args, container_id, str(signal)])

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        args = ["delete"]
        if force:
            args.append("--force")
        await self.run([*args, container_id])

    async def pause(self, container_id: str) -> None:
        await self.run(["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self.run(["resume", container_id])

    async def update(self, container_id: str, resources: Mapping[str, Any]) -> None:
        data = json.dumps(resources).encode()
        await self.run(["update", "--resources", "-", container_id], stdin_data=data)

    async def ps(self, container_id: str) -> list[int]:
        result = await self.run(["ps", "--format", "json", container_id])
        pids = json.loads(result.stdout or b"[]")
        return [int(p) for p in pids or []]

    async def state(self, container_id: str) -> dict[str, Any]:
        result = await self.run(["state", container_id])
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    async def version(self) -> str:
        result = await self.run(["--version"], check=False)
        first = result.stdout.decode(errors="replace").splitlines()
        return first[0] if first else ""


def read_pid_file(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())
