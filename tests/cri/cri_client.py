"""A tiny synchronous client for the CRI v1 API (RuntimeService, ImageService) over gRPC.

Built on our own subset of the Kubernetes CRI proto (``cri_v1.proto``, package
``runtime.v1``); only what the tests in this directory use. Every call has a deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence

import grpc

import cri_v1_pb2 as pb
import cri_v1_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 30.0

# Reconnect quickly after a containerd restart (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class CriClient:
    """One gRPC channel to a containerd's socket, with the CRI runtime and image stubs."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix://" + socket_path, options=CHANNEL_OPTIONS)
        self.runtime = pb_grpc.RuntimeServiceStub(self._channel)
        self.images = pb_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ runtime
    def version(self, timeout: float | None = None) -> pb.VersionResponse:
        return self.runtime.Version(pb.VersionRequest(version="v1"),
                                    timeout=timeout or self.timeout)

    def wait_ready(self, timeout: float = 30.0) -> pb.VersionResponse:
        """Call Version until the CRI plugin answers (it refuses calls while it recovers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.version(timeout=2.0)
            except grpc.RpcError as e:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"CRI at {self.socket_path} not ready: {e}") from e
                time.sleep(0.1)

    def run_pod(self, config: pb.PodSandboxConfig, handler: str) -> str:
        req = pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return str(self.runtime.RunPodSandbox(req, timeout=self.timeout).pod_sandbox_id)

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.timeout)

    def pod_status(self, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
        req = pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self.runtime.PodSandboxStatus(req, timeout=self.timeout)

    def list_pods(self) -> list[pb.PodSandbox]:
        resp = self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=self.timeout)
        return list(resp.items)

    def create_container(self, pod_id: str, config: pb.ContainerConfig,
                         sandbox_config: pb.PodSandboxConfig) -> str:
        req = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                        sandbox_config=sandbox_config)
        return str(self.runtime.CreateContainer(req, timeout=self.timeout).container_id)

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id),
                                    timeout=self.timeout)

    def run_container(self, pod_id: str, config: pb.ContainerConfig,
                      sandbox_config: pb.PodSandboxConfig) -> str:
        """CreateContainer + StartContainer; the container's id."""
        cid = self.create_container(pod_id, config, sandbox_config)
        self.start_container(cid)
        return cid

    def stop_container(self, container_id: str, grace: int = 0) -> None:
        """StopContainer; ``grace`` 0 means SIGKILL at once."""
        req = pb.StopContainerRequest(container_id=container_id, timeout=grace)
        self.runtime.StopContainer(req, timeout=self.timeout + grace)

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id),
                                     timeout=self.timeout)

    def container_status(self, container_id: str,
                         verbose: bool = False) -> pb.ContainerStatusResponse:
        req = pb.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self.runtime.ContainerStatus(req, timeout=self.timeout)

    def list_containers(self, pod_id: str = "") -> list[pb.Container]:
        req = pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.runtime.ListContainers(req, timeout=self.timeout).containers)

    def exec_sync(self, container_id: str, cmd: Sequence[str],
                  timeout: int = 10) -> pb.ExecSyncResponse:
        req = pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        return self.runtime.ExecSync(req, timeout=self.timeout + timeout)

    # ------------------------------------------------------------ images
    def image_status(self, ref: str) -> pb.Image | None:
        req = pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))
        resp = self.images.ImageStatus(req, timeout=self.timeout)
        return resp.image if resp.HasField("image") else None

    def list_images(self) -> list[pb.Image]:
        return list(self.images.ListImages(pb.ListImagesRequest(), timeout=self.timeout).images)

    # ------------------------------------------------------------ verbose info
    def container_pid(self, container_id: str) -> int:
        """The init pid of a container's task, from ContainerStatus's verbose info."""
        info = self.container_status(container_id, verbose=True).info
        return int(json.loads(info["info"])["pid"])

    def pod_pid(self, pod_id: str) -> int:
        """The pid of the pod's sandbox (pause) container, from PodSandboxStatus's info."""
        info = self.pod_status(pod_id, verbose=True).info
        return int(json.loads(info["info"])["pid"])

    def remove_all(self) -> list[str]:
        """Stop and remove every pod (and so every container); errors collected, not raised."""
        errors: list[str] = []
        for pod in self.list_pods():
            for call in (self.stop_pod, self.remove_pod):
                try:
                    call(pod.id)
                except grpc.RpcError as e:
                    errors.append(f"{call.__name__}({pod.id[:12]}): {e}")
        return errors


# ---------------------------------------------------------------- config builders


def pod_config(
    name: str,
    *,
    log_directory: str,
    cgroup_parent: str,
    uid: str | None = None,
    namespace: str = "default",
    host_network: bool = True,
    labels: Mapping[str, str] | None = None,
) -> pb.PodSandboxConfig:
    """A pod sandbox config; host network by default (no CNI needed)."""
    ns = pb.NamespaceOption(network=pb.NODE if host_network else pb.POD)
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid or f"uid-{name}",
                                       namespace=namespace, attempt=0),
        # runc cannot set a hostname in the host's UTS namespace: kubelet leaves it empty
        # for host-network pods too.
        hostname="" if host_network else name,
        log_directory=log_directory,
        labels=dict(labels or {}),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns),
        ),
    )


def container_config(
    name: str,
    image: str,
    command: Sequence[str] = (),
    args: Sequence[str] = (),
    *,
    log_path: str | None = None,
    mounts: Iterable[tuple[str, str]] = (),
    envs: Mapping[str, str] | None = None,
    memory_limit: int = 0,
    host_network: bool = True,
) -> pb.ContainerConfig:
    """A container config: ``mounts`` are (host path, container path) pairs, read-write.

    ``log_path`` is relative to the pod's log directory (default ``<name>.log``).
    """
    ns = pb.NamespaceOption(network=pb.NODE if host_network else pb.POD)
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        envs=[pb.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        mounts=[pb.Mount(host_path=h, container_path=c) for h, c in mounts],
        log_path=log_path if log_path is not None else f"{name}.log",
        linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
            security_context=pb.LinuxContainerSecurityContext(namespace_options=ns),
        ),
    )


def state_name(state: int) -> str:
    """CONTAINER_RUNNING etc. for a ContainerState value."""
    return str(pb.ContainerState.Name(state))  # type: ignore[arg-type]


def parse_cri_log(text: str) -> list[tuple[str, str]]:
    """A CRI log file (``<time> <stream> <P|F> <content>`` lines) as (stream, line) pairs.

    Partial (``P``) chunks are joined with the rest of their line.
    """
    out: list[tuple[str, str]] = []
    pending: dict[str, str] = {}
    for raw in text.split("\n"):
        if not raw:
            continue
        parts = raw.split(" ", 3)
        if len(parts) < 3:
            raise ValueError(f"not a CRI log line: {raw!r}")
        stream, tag = parts[1], parts[2]
        content = parts[3] if len(parts) > 3 else ""
        pending[stream] = pending.get(stream, "") + content
        if tag == "F":
            out.append((stream, pending.pop(stream)))
    return out

