"""A private containerd WITH its CRI plugin, for the Kubernetes-path tests.

:class:`CriContainerd` reuses tests/integration/harness.py's :class:`Containerd` (its own
``/tmp/sv-ctd-*`` dir for root, state, sockets and log; start/kill9/stop; cleanup) and only
replaces the config: the CRI plugin is enabled, with

* runtime handler ``supervisor`` -> ``runtime_type = "io.containerd.supervisor.v2"`` and
  ``options.ConfigPath`` -> ``<dir>/supervisor.toml`` (CRI sends it to the shim as
  ``runtimeoptions.v1.Options.config_path``); the default handler stays ``runc`` (the Go
  shim), so a test that ends up on our shim proves the handler was honoured.
  ``SUPERVISOR_TEST_RUNTIME=io.containerd.runc.v2`` points the handler at the Go shim
  instead (options ``Root`` directly, since CRI sends it runc's own options type), to
  compare the two;
* ``sandbox_image`` = a pause image built from busybox (see :func:`build_images`);
* no CNI network (an empty conf dir): the tests' pods use the host network;
* ``disable_apparmor``, ``restrict_oom_score_adj`` (as ../shared/conformance does), and a
  stream server on 127.0.0.1 with an ephemeral port (no clash with another CRI daemon).

Isolation: CRI always uses the containerd namespace ``k8s.io``, shared with every other CRI
containerd on the machine (the conformance suite's too). So the shim's settings file gives
runc a private state root (``Root = <dir>/runc``) and every pod gets a cgroup parent unique
to this instance (``/sv-cri-<hex>``); cleanup force-deletes the runc containers in that
root, kills what is left in those cgroups and removes them, then lets the harness do the
rest (shims, mounts, the directory).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cri_v1_pb2 as pb
from cri_client import CriClient, container_config, pod_config, state_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import (
    DISABLED_PLUGINS,
    GO_RUNTIME,
    Containerd,
    OciImageTar,
    build_oci_image_tar,
    cgroup_mountpoints,
    default_runtime,
    kill_cgroup_processes,
    remove_empty_cgroups,
    wait_for,
)

CRI_NAMESPACE = "k8s.io"
HANDLER = "supervisor"
BUSYBOX_REF = "supervisor.test/busybox:1.0"
PAUSE_REF = "supervisor.test/pause:3.6"
PLUGIN = "io.containerd.grpc.v1.cri"


class CriContainerd(Containerd):
    """A private containerd with the CRI plugin and the ``supervisor`` runtime handler."""

    def __init__(self, *, shim_settings: str = "", sandbox_image: str = PAUSE_REF,
                 start_timeout: float = 30.0) -> None:
        # Set before Containerd.__init__, which renders the config via _config_text().
        self.sandbox_image = sandbox_image
        self.cgroup_tag = "sv-cri-" + secrets.token_hex(4)
        super().__init__(runtime=default_runtime(), namespace=CRI_NAMESPACE,
                         start_timeout=start_timeout)
        self.runc_root: Path = self.dir / "runc"
        self.shim_config: Path = self.dir / "supervisor.toml"
        self.log_root: Path = self.dir / "logs"
        self.volumes: Path = self.dir / "vol"
        for d in (self.runc_root, self.log_root, self.volumes, self.dir / "cni"):
            d.mkdir(exist_ok=True)
        settings = f"Root = {json.dumps(str(self.runc_root))}\n{shim_settings}"
        self.shim_config.write_text(settings, encoding="utf-8")

    @property
    def cgroup_parent(self) -> str:
        """The cgroup parent every pod of this instance must use (cleanup relies on it)."""
        return "/" + self.cgroup_tag

    def _config_text(self, extra: str) -> str:
        disabled = ", ".join(json.dumps(p) for p in DISABLED_PLUGINS if p != PLUGIN)
        cri = f'plugins."{PLUGIN}"'
        runtimes = f"{cri}.containerd.runtimes"
        q = json.dumps
        if self.runtime == GO_RUNTIME:  # CRI decodes the table as runc's Options
            options = f"Root = {q(str(self.dir / 'runc'))}"
        else:  # ... as runtimeoptions.v1.Options: the shim reads the TOML file
            options = f"ConfigPath = {q(str(self.dir / 'supervisor.toml'))}"
        return f"""version = 2
root = {q(str(self.root))}
state = {q(str(self.state))}
oom_score = 0
disabled_plugins = [{disabled}]

[grpc]
  address = {q(self.address)}

[debug]
  level = "debug"

[{cri}]
  sandbox_image = {q(self.sandbox_image)}
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
  [{runtimes}.runc]
    runtime_type = "io.containerd.runc.v2"
  [{runtimes}.{HANDLER}]
    runtime_type = {q(self.runtime)}
  [{runtimes}.{HANDLER}.options]
    {options}
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {q(str(self.dir / "cni"))}
    max_conf_num = 1

{extra}
"""

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start containerd and wait until its CRI plugin answers (it recovers first)."""
        super().start()
        with CriClient(self.address) as c:
            c.wait_ready(self.start_timeout)

    def client(self) -> CriClient:
        return CriClient(self.address)

    def import_image(self, tar: OciImageTar) -> None:
        self.ctr("images", "import", str(tar.path), timeout=120)

    def _runc_cleanup(self) -> None:
        # Called by Containerd.cleanup() after containerd is stopped, before the shims are
        # killed and the directory removed: our private runc root lives in that directory.
        super()._runc_cleanup()
        runc = shutil.which("runc")
        root = self.runc_root / CRI_NAMESPACE
        if runc is not None and root.is_dir():
            r = subprocess.run([runc, "--root", str(root), "list", "--format", "json"],
                               capture_output=True, text=True, timeout=20, check=False)
            with contextlib.suppress(json.JSONDecodeError):
                for c in json.loads(r.stdout or "null") or []:
                    subprocess.run([runc, "--root", str(root), "delete", "-f", c["id"]],
                                   capture_output=True, timeout=20, check=False)
        kill_cgroup_processes(self.cgroup_tag)

    def cleanup(self) -> None:
        if self._cleaned:
            return
        if self.is_running():
            with contextlib.suppress(Exception), self.client() as c:
                c.timeout = 10.0
                c.remove_all()
        super().cleanup()
        remove_empty_cgroups(self.cgroup_tag)

    def leftovers(self) -> list[str]:
        found = super().leftovers()
        found.extend(f"cgroup {mp / self.cgroup_tag}" for mp in cgroup_mountpoints()
                     if (mp / self.cgroup_tag).exists())
        return found


def build_images(dest: Path, rootfs: Path) -> tuple[OciImageTar, OciImageTar]:
    """(busybox, pause) OCI image tarballs from one busybox rootfs (same layer blob).

    The pause image's entrypoint sleeps forever (``/bin/sleep 2147483647``); CRI stops a
    sandbox with SIGKILL, so it needs no signal handling.
    """
    busybox = build_oci_image_tar(dest / "busybox.tar", BUSYBOX_REF, rootfs=rootfs,
                                  entrypoint=(), cmd=("sh",))
    pause = build_oci_image_tar(dest / "pause.tar", PAUSE_REF, rootfs=rootfs,
                                entrypoint=("/bin/sleep",), cmd=("2147483647",))
    return busybox, pause


@dataclass
class Pod:
    id: str
    config: pb.PodSandboxConfig
    log_dir: Path


class CriEnv:
    """A started :class:`CriContainerd` with its images imported, a client and helpers."""

    def __init__(self, daemon: CriContainerd) -> None:
        self.daemon = daemon
        self.client = daemon.client()

    def run_pod(self, name: str) -> Pod:
        """A host-network pod with handler ``supervisor`` and this instance's cgroup parent."""
        log_dir = self.daemon.log_root / name
        log_dir.mkdir(parents=True, exist_ok=True)
        config = pod_config(name, log_directory=str(log_dir),
                            cgroup_parent=self.daemon.cgroup_parent)
        return Pod(self.client.run_pod(config, HANDLER), config, log_dir)

    def run_container(self, pod: Pod, name: str, command: Sequence[str],
                      **kwargs: Any) -> str:
        """Create and start a busybox container in ``pod`` (kwargs: container_config's)."""
        config = container_config(name, BUSYBOX_REF, command, **kwargs)
        return self.client.run_container(pod.id, config, pod.config)

    def volume(self, name: str) -> Path:
        """A host directory to mount into containers (removed with the instance)."""
        path = self.daemon.volumes / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def state(self, container_id: str) -> str:
        return state_name(self.client.container_status(container_id).status.state)

    def wait_state(self, container_id: str, state: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self.state(container_id) == state, timeout,
                 message=f"container {container_id[:12]} to be {state}")

    def close(self) -> None:
        self.client.close()
