"""Kubernetes' path: containerd's real CRI plugin, runtime handler ``supervisor``, runc.

Each test gets its own containerd with the CRI plugin (fixture ``cri``, cri_harness.py),
talks CRI v1 over gRPC like kubelet, and checks what kubelet would see plus what ``ps``
shows on the host.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest
from harness import GO_RUNTIME, pid_alive, shims_for, wait_for

from cri_client import parse_cri_log
from cri_harness import CRI_NAMESPACE, HANDLER, CriEnv

SLEEP = ("sleep", "100000")


def runc_ids(env: CriEnv) -> set[str]:
    """Container ids in the private runc root that supervisor.toml's ``Root`` names."""
    r = subprocess.run(["runc", "--root", str(env.daemon.runc_root / CRI_NAMESPACE), "list",
                        "-q"], capture_output=True, text=True, timeout=20, check=True)
    return set(r.stdout.split())


def test_pod_and_two_containers_share_one_shim(cri: CriEnv) -> None:
    c = cri.client
    pod = cri.run_pod("one-shim")
    a = cri.run_container(pod, "a", SLEEP)
    b = cri.run_container(pod, "b", SLEEP)

    status = c.pod_status(pod.id)
    assert status.status.state == 0  # SANDBOX_READY
    assert status.status.runtime_handler == HANDLER
    info = json.loads(c.container_status(a, verbose=True).info["info"])
    assert info["runtimeType"] == cri.daemon.runtime  # io.containerd.supervisor.v2
    assert cri.state(a) == cri.state(b) == "CONTAINER_RUNNING"

    shims = shims_for(cri.daemon)
    assert len(shims) == 1, [psutil.Process(p).cmdline() for p in shims]
    shim = psutil.Process(shims[0])
    cmd = shim.cmdline()
    name, version = cri.daemon.runtime.split(".")[-2:]  # io.containerd.supervisor.v2
    assert any(Path(arg).name == f"containerd-shim-{name}-{version}" for arg in cmd[:2]), cmd
    assert cmd[cmd.index("-id") + 1] == pod.id, cmd  # the pod's shim serves its containers
    tasks = {"pause": c.pod_pid(pod.id), "a": c.container_pid(a), "b": c.container_pid(b)}
    assert {name: psutil.Process(pid).ppid() for name, pid in tasks.items()} == {
        "pause": shim.pid, "a": shim.pid, "b": shim.pid}
    # runtimeoptions.v1 ConfigPath reached the shim: runc runs with the settings file's Root.
    assert runc_ids(cri) == {pod.id, a, b}

    c.stop_pod(pod.id)
    c.remove_pod(pod.id)
    wait_for(lambda: not shims_for(cri.daemon), 15, message="the pod's shim to exit")
    assert not any(pid_alive(p) for p in tasks.values())
    assert runc_ids(cri) == set()


@pytest.mark.parametrize("cri", ["Bogus = 1\n"], indirect=True)
def test_settings_file_error_reaches_the_cri_caller(cri: CriEnv) -> None:
    if cri.daemon.runtime == GO_RUNTIME:
        pytest.skip("the Go shim gets runc's options, not the settings file")
    with pytest.raises(grpc.RpcError) as err:
        cri.run_pod("bad-settings")
    details = str(err.value.details())
    assert str(cri.daemon.shim_config) in details and "'Bogus'" in details, details
    assert cri.client.list_pods() == []
    assert shims_for(cri.daemon) == []


def test_exec_sync_output_and_exit_codes(cri: CriEnv) -> None:
    c = cri.client
    pod = cri.run_pod("exec")
    cid = cri.run_container(pod, "box", SLEEP)

    r = c.exec_sync(cid, ["echo", "hello"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"hello\n", b"", 0)
    r = c.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    r = c.exec_sync(cid, ["seq", "1", "30000"])  # ~170 KB: more than a pipe buffer
    assert r.exit_code == 0
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 30001)).encode()
    r = c.exec_sync(cid, ["sh", "-c", "kill -9 $$"])
    assert r.exit_code == 137
    # A timed-out exec is an error for the caller and its process is gone afterwards.
    with pytest.raises(grpc.RpcError) as err:
        c.exec_sync(cid, ["sh", "-c", "exec sleep 77"], timeout=1)
    assert "timeout" in str(err.value.details()), err.value
    shim = psutil.Process(shims_for(cri.daemon)[0])

    def exec_gone() -> bool:
        for p in shim.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.cmdline() == ["sleep", "77"]:
                    return False
        return True

    wait_for(exec_gone, 10, message="the timed-out exec to be killed")
    assert cri.state(cid) == "CONTAINER_RUNNING"


def test_memory_limit_oom_killed(cri: CriEnv) -> None:
    pod = cri.run_pod("oom")
    cid = cri.run_container(pod, "hog", ["tail", "/dev/zero"], memory_limit=32 << 20)
    cri.wait_state(cid, "CONTAINER_EXITED", 60)
    st = cri.client.container_status(cid).status
    assert (st.reason, st.exit_code) == ("OOMKilled", 137), st


def test_containerd_killed_and_restarted_while_pod_runs(cri: CriEnv) -> None:
    c, d = cri.client, cri.daemon
    vol = cri.volume("trigger")
    pod = cri.run_pod("restart")
    runner = cri.run_container(pod, "runner", SLEEP)
    exiter = cri.run_container(
        pod, "exiter", ["sh", "-c", "while [ ! -e /vol/go ]; do usleep 20000; done; exit 7"],
        mounts=[(str(vol), "/vol")])
    pids = {"pause": c.pod_pid(pod.id), "runner": c.container_pid(runner),
            "exiter": c.container_pid(exiter)}
    shims = shims_for(d)
    assert len(shims) == 1

    d.kill9()
    killed_at = time.time_ns()
    (vol / "go").touch()  # the exiter exits while containerd is down
    wait_for(lambda: not pid_alive(pids["exiter"]), 10, message="exiter to exit")
    time.sleep(1)
    d.start()  # waits for the CRI plugin to have recovered

    assert shims_for(d) == shims  # the same shim, never restarted
    pods = {p.id: p for p in c.list_pods()}
    assert list(pods) == [pod.id]
    assert pods[pod.id].state == 0  # SANDBOX_READY
    assert {x.id: x.state for x in c.list_containers(pod.id)} == {runner: 1, exiter: 2}
    wait_for(lambda: c.container_status(exiter).status.exit_code == 7, 10,
             message="exiter's exit code")
    st = c.container_status(exiter).status
    assert (st.state, st.exit_code, st.reason) == (2, 7, "Error"), st
    assert st.finished_at >= killed_at
    assert c.pod_pid(pod.id) == pids["pause"]
    assert c.container_pid(runner) == pids["runner"]
    assert pid_alive(pids["runner"])
    # The recovered pod is fully drivable through the same shim.
    r = c.exec_sync(runner, ["sh", "-c", "echo back; exit 4"])
    assert (r.stdout, r.exit_code) == (b"back\n", 4)
    c.stop_container(runner)
    st = c.container_status(runner).status
    assert (st.state, st.exit_code) == (2, 137), st


PAD = "x" * 100
WRITER = (
    'i=0; while :; do for _ in 1 2 3 4; do i=$((i+1)); echo "$i $PAD"; done; '
    "echo $i > /vol/counter; usleep 10000; done"
)


def test_stdout_not_blocked_during_60s_outage_and_log_complete(cri: CriEnv) -> None:
    c, d = cri.client, cri.daemon
    vol = cri.volume("counter")
    pod = cri.run_pod("outage")
    cid = cri.run_container(pod, "writer", ["sh", "-c", WRITER], envs={"PAD": PAD},
                            mounts=[(str(vol), "/vol")])
    log_path = pod.log_dir / "writer.log"

    def counter() -> int:
        # `echo $i > counter` truncates before it writes: an empty read is mid-rewrite.
        for _ in range(100):
            text = (vol / "counter").read_text() if (vol / "counter").exists() else ""
            if text.strip():
                return int(text)
            time.sleep(0.005)
        return 0

    wait_for(lambda: counter() > 100, 15, message="the writer to start")
    d.kill9()
    samples = [(0.0, counter())]
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < 60:
        time.sleep(min(5.0, 60 - elapsed))
        samples.append((round(time.monotonic() - start, 1), counter()))
    outage_end = samples[-1][1]
    d.start()

    rising = [b[1] > a[1] for a, b in itertools.pairwise(samples)]
    assert all(rising), f"writer blocked during the outage: (s, counter) {samples}"
    written = sum(len(f"{i} {PAD}\n") for i in range(samples[0][1] + 1, outage_end + 1))
    assert written > 256 << 10, f"only {written} bytes written during the outage"

    def logged() -> list[tuple[str, str]]:
        return parse_cri_log(log_path.read_text(errors="replace"))

    def last_logged() -> int:
        lines = logged()
        return int(lines[-1][1].split(" ", 1)[0]) if lines else 0

    wait_for(lambda: last_logged() >= outage_end, 30,
             message=f"line {outage_end} (the last one of the outage) in the CRI log")
    c.stop_container(cid)
    # A stop that lands between the writer's truncate and its write leaves the file empty
    # for good (counter() answers 0): then only the outage's end bounds the log from below.
    final = counter()
    size = -1
    while size != log_path.stat().st_size:  # the log copier may still be finishing
        size = log_path.stat().st_size
        time.sleep(0.5)
    lines = logged()
    assert {s for s, _ in lines} == {"stdout"}
    numbers = [int(text.split(" ", 1)[0]) for _, text in lines]
    gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
    assert numbers[:1] == [1] and not gaps, (
        f"{len(numbers)} lines, first {numbers[:1]}, gaps (before, after) {gaps[:10]}; "
        f"counter at kill {samples[0][1]}, at restart {outage_end}")
    assert all(text == f"{n} {PAD}" for n, (_, text) in zip(numbers, lines, strict=True))
    if final:
        assert final <= numbers[-1] <= final + 4
    else:
        assert numbers[-1] >= outage_end
    print(f"outage samples (s, counter): {samples}; {written} bytes during the outage; "
          f"{len(numbers)} lines logged")
