"""Drive our shim directly, the way containerd does: ``start`` in a bundle, then ttrpc.

For behaviour ``ctr`` cannot reach (a task killed before Start, a duplicate exec
id, a terminal exec's resize...).  The shim is the real binary, runc is real,
and events go to a real private containerd (``TTRPC_ADDRESS``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TypeVar

import psutil
from google.protobuf.message import Message
from harness import Containerd, copy_rootfs, wait_for

from supervisor import ttrpc
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.launch import forkclient
from supervisor.launch.address import socket_path

SHIM = "containerd-shim-supervisor-v2"
TASK = "containerd.task.v2.Task"
M = TypeVar("M", bound=Message)


def shim_binary() -> str:
    return str(Path(os.sys.executable).parent / SHIM)


def make_bundle(
    where: Path, rootfs_template: Path, args: list[str], *, terminal: bool = False,
    annotations: dict[str, str] | None = None,
) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["runc", "spec"], cwd=where, check=True)
    config = json.loads((where / "config.json").read_text())
    copy_rootfs(rootfs_template, where / "rootfs")
    config["process"]["terminal"] = terminal
    config["process"]["args"] = args
    config["process"]["env"] = ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "TERM=xterm"]
    config["root"] = {"path": str(where / "rootfs"), "readonly": False}
    if annotations:
        config["annotations"] = annotations
    (where / "config.json").write_text(json.dumps(config))
    return where


class ShimDriver:
    """One shim started by ``start`` for container ``id`` in ``bundle``."""

    def __init__(self, containerd: Containerd, container_id: str, bundle: Path) -> None:
        self.containerd = containerd
        self.id = container_id
        self.bundle = bundle
        self.address = ""
        self.client: ttrpc.Client | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TTRPC_ADDRESS"] = self.containerd.ttrpc_address
        # Its fork server (spawned on demand) on the containerd's private socket, never the
        # default path; the containerd's cleanup stops it.
        env[forkclient.SOCKET_ENV] = self.containerd.env()[forkclient.SOCKET_ENV]
        return env

    def argv(self, *action: str) -> list[str]:
        return [shim_binary(), "-namespace", self.containerd.namespace, "-address",
                self.containerd.address, "-publish-binary", "/usr/bin/containerd",
                "-id", self.id, *action]

    def start(self, options: bytes = b"") -> str:
        done = subprocess.run(self.argv("start"), cwd=self.bundle, env=self.env(),
                              input=options, capture_output=True, check=True, timeout=30)
        self.address = done.stdout.decode()
        return self.address

    def delete_action(self) -> api.DeleteResponse:
        done = subprocess.run(self.argv("-bundle", str(self.bundle), "delete"), cwd=self.bundle,
                              env=self.env(), capture_output=True, check=True, timeout=60)
        response = api.DeleteResponse()
        response.ParseFromString(done.stdout)
        return response

    @property
    def socket(self) -> str:
        return socket_path(self.address)

    def pid(self) -> int:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if (len(cmd) > 2 and cmd[1].endswith(SHIM) and self.id in cmd
                    and self.containerd.address in cmd and "start" not in cmd):
                return p.pid
        return 0

    async def connect(self) -> ttrpc.Client:
        self.client = await ttrpc.connect_unix(self.socket)
        return self.client

    async def call(self, method: str, request: Message, response: type[M],
                   timeout: float = 30) -> M:
        assert self.client is not None
        data = await self.client.call(TASK, method, request.SerializeToString(), timeout=timeout,
                                      metadata={ttrpc.NAMESPACE_KEY: self.containerd.namespace})
        out = response()
        out.ParseFromString(data)
        return out

    async def create(self, **fields: object) -> api.CreateTaskResponse:
        request = api.CreateTaskRequest(id=self.id, bundle=str(self.bundle), **fields)  # type: ignore[arg-type]
        return await self.call("Create", request, api.CreateTaskResponse)

    def cleanup(self) -> None:
        """Kill the shim (by pid) and whatever it left; remove the bundle."""
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not psutil.pid_exists(pid) or
                     psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
        if self.bundle.exists():
            try:
                self.delete_action()
            except subprocess.CalledProcessError:
                pass  # best effort: the bundle is removed below anyway
        if self.address and os.path.exists(self.socket):
            os.unlink(self.socket)
        shutil.rmtree(self.bundle, ignore_errors=True)
