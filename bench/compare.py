"""Benchmark our shim side by side with containerd's Go shim, in one private containerd.

    bench/compare [--runs N] [--quick] [--only LIST] [--markdown-out FILE]
                  [--runtime-ours R] [--runtime-go R] [--cpu-seconds S] [--forkserver] ...

One containerd is started with the integration harness (``tests/integration/harness.py``;
its own root, state, namespace and log below /tmp, never the system's containerd), a busybox
rootfs is built, and each metric is measured for both runtimes in the same run.  Latency
samples alternate (ours, Go, ours, Go, ...) so that machine noise hits both alike; each
metric starts with ``--warmup`` unrecorded runs per runtime.  Metrics (``--only`` names):

``run``         ``ctr run --rm`` of ``/bin/true`` on the rootfs: wall time of the ctr process.
``runbusy``     ``run`` while one idle container per runtime runs in the namespace (with
                ``--shared`` our ``start`` joins its shim instead of starting a new one).
``exec``        ``ctr task exec`` of ``true`` into a running (``sleep``) container; and the
                CPU its shim spent on each (its threads' ``se.sum_exec_runtime``, read
                before and after the exec; a thread that ends in between is lost).
``events``      time from spawning ``ctr run --rm`` until ``/tasks/create``, ``/tasks/start``,
                ``/tasks/exit`` and ``/tasks/delete`` for that container arrive on one
                ``ctr events`` stream that runs for the whole metric.
``coldstart``   the shim binary alone, as containerd runs it: ``SHIM ... start`` in a bundle
                dir (with a ``log`` FIFO we read), then a ttrpc ``Task.Connect`` on the
                address it printed; reports the ``start`` command's wall time and the time
                until Connect is answered, then ends the shim with ``Shutdown``.
``memory``      10 then 50 idle ``sleep`` containers per runtime (``--memory-counts``);
                ``Pss`` and ``Private_Dirty`` of the shim processes only (``smaps_rollup``), per
                container: each container counts its shim's figure divided by the number of
                containers that shim serves (1 but with ``--shared``), reported as the
                median over the containers; also how many shim processes there are.
``throughput``  a container writes 200 MiB (``head -c 209715200 /dev/zero``) through
                ``ctr run --rm`` into a pipe this script reads and discards; MiB/s from spawn
                to EOF, and from first byte to EOF (streaming only).
``cpu``         one shim with one idle container per runtime, measured at the same time:
                utime+stime delta from ``/proc/PID/stat`` over ``--cpu-seconds`` (60), the
                precise ``se.sum_exec_runtime`` and the context switches of the threads
                alive at the end (a thread that exits meanwhile is not counted).

Without ``--forkserver`` nothing is started by hand, as for a new user: the first ``start``
spawns a fork server on demand (on the harness's private socket, ``$SUPERVISOR_FORKSERVER``
in containerd's environment, never the default path) and goes on cold, later ones fork from
it; the harness's cleanup stops it by pid.  ``--cold`` disables it (``$SUPERVISOR_FORKSERVER``
empty): every shim starts cold.
With ``--forkserver`` a ``supervisor-forkserver`` is started first (its socket in the
containerd's directory, passed to our shims as ``$SUPERVISOR_FORKSERVER`` through containerd's
environment), so our shims are forked from it instead of started cold; its own memory is
reported with the facts (it is shared by all the shims it forked), and it is stopped by pid.
With ``--ksm`` the host's kernel samepage merging runs during ``memory`` (our shims opt their
memory in; the Go shim's is not offered): each count is measured once ``ksmd`` has settled
(two full scans with no change in merged pages, at most 180 s), and ``ksmd``'s own CPU time
over that metric is reported; KSM is switched back off (pages unmerged) if it was off.
With ``--shared`` our shims run with ``shim_group = "namespace"`` (``$SUPERVISOR_SHIM_GROUP``
in containerd's environment; ``--shared-size`` sets ``$SUPERVISOR_SHIM_GROUP_SIZE``), so up
to that many containers share one shim daemon; the Go shim is unchanged.

The table shows medians, ``ours/Go`` ratios and the direction that is better.  Machine facts
(nproc, kernel, load, containerd/runc/shim versions) and the exact command line are printed
with it, and also written to ``--markdown-out`` when given.  Everything (containers, shims,
mounts, sockets, cgroups, the ``ctr events`` reader) is cleaned up on exit, after errors and
after Ctrl-C or SIGTERM.  ``--quick`` shrinks every count and duration for a smoke run.

Needs root, containerd 1.6, ctr, runc, busybox and both shims on PATH (the harness puts the
venv's bin dir first on containerd's PATH).  Speed is only ever reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))
import harness  # noqa: E402

from supervisor.launch import forkclient, procfs  # noqa: E402

OURS_RUNTIME = "io.containerd.supervisor.v2"
GO_RUNTIME = "io.containerd.runc.v2"
METRICS = ("run", "runbusy", "exec", "events", "coldstart", "memory", "throughput", "cpu")
THROUGHPUT_BYTES = 209715200
MIB = 1 << 20
TASK_SERVICE = "containerd.task.v2.Task"
FORKSERVER_ENV = "SUPERVISOR_FORKSERVER"
GROUP_ENV = "SUPERVISOR_SHIM_GROUP"
GROUP_SIZE_ENV = "SUPERVISOR_SHIM_GROUP_SIZE"
EVENT_TOPICS = ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete")


class BenchError(RuntimeError):
    """A step of the benchmark failed (the message says which and why)."""


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: a metric measured for both runtimes."""

    metric: str
    unit: str
    better: str  # "lower" or "higher"
    ours: list[float] = field(default_factory=list)
    go: list[float] = field(default_factory=list)

    def median(self, which: str) -> float | None:
        values = self.ours if which == "ours" else self.go
        return statistics.median(values) if values else None

    def ratio(self) -> str:
        ours, go = self.median("ours"), self.median("go")
        if ours is None or go is None:
            return "n/a"
        if go == 0:
            return "n/a (Go 0)" if ours else "1.00"
        return f"{ours / go:.2f}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return ""
    return f" ({_fmt(min(values))}-{_fmt(max(values))})"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| metric | unit | better | ours: median (min-max) | Go: median (min-max) "
        "| ours/Go | n ours/Go |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.metric} | {r.unit} | {r.better} "
            f"| {_fmt(r.median('ours'))}{_spread(r.ours)} "
            f"| {_fmt(r.median('go'))}{_spread(r.go)} "
            f"| {r.ratio()} | {len(r.ours)}/{len(r.go)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- /proc readers


def spare_facts(status: dict[str, object]) -> str:
    """The fork server's idle spare shim (its status's ``spare``) and the zygote that forks
    the spares (``zygote``), and their memory: processes of ours that cost whether or not
    a container comes (not in the per-container figures, which count shims serving
    containers)."""
    facts = ""
    for key, what in (("spare", "idle spare shim"), ("zygote", "zygote")):
        pid = status.get(key)
        if not isinstance(pid, int):
            facts += f"; no {what} at the end"
            continue
        try:
            roll = smaps_rollup_kib(pid)
        except OSError:
            facts += f"; its {what} {pid} ended while read"
            continue
        facts += (f"; plus its {what}, pid {pid}: Pss {roll['Pss'] / 1024:.1f} MiB, "
                  f"Private_Dirty {roll['Private_Dirty'] / 1024:.1f} MiB")
    return facts


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` as {field: KiB} (this process only, not its children)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


@dataclass(frozen=True)
class CpuSample:
    ticks: int  # utime + stime, in clock ticks (whole process, dead threads included)
    exec_ms: dict[int, float]  # tid -> se.sum_exec_runtime (ms), live threads only
    switches: dict[int, int]  # tid -> voluntary + involuntary context switches


def cpu_sample(pid: int) -> CpuSample:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # Fields after the ")" that closes comm: state is field 3, utime 14, stime 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    exec_ms: dict[int, float] = {}
    switches: dict[int, int] = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/sched", encoding="ascii") as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        exec_ms[tid] = float(line.split(":")[1])
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                n = 0
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split(":")[1])
                switches[tid] = n
    return CpuSample(ticks, exec_ms, switches)


def thread_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """Growth summed over the threads alive at the end (new threads count from zero).

    Threads that exited in between are lost: their last moments are not counted.
    """
    return sum(v - before.get(tid, 0.0) for tid, v in after.items())


# --------------------------------------------------------------------------- the bench


def _fstype(path: Path) -> str:
    """The file system ``path`` is on: of the mounts ``/proc/self/mountinfo`` lists at it
    or above it, the deepest (for the facts line only: overmounts are not told apart)."""
    where = str(path.resolve())
    best = max((m for m in procfs.read_mountinfo()
                if where == m.mount_point or where.startswith(m.mount_point.rstrip("/") + "/")),
               key=lambda m: len(m.mount_point), default=None)
    return best.fstype if best else "?"


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def _first_line(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"
    text = (r.stdout or r.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


class EventStream:
    """``ctr events`` in the background; every line is kept with its arrival time."""

    _LINE = re.compile(r"\s(/[a-z]+/[a-z-]+)\s+(\{.*\})\s*$")

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[tuple[float, str, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            m = self._LINE.search(line)
            if m is None:
                continue
            cid = ""
            with contextlib.suppress(ValueError):
                body = json.loads(m.group(2))
                cid = str(body.get("container_id") or body.get("id") or "")
            self.lines.put((now, m.group(1), cid))

    def wait_for(
        self, container_id: str, topics: Sequence[str], timeout: float
    ) -> dict[str, float]:
        """Arrival times of ``topics`` for ``container_id``, waiting until the last one came."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while topics[-1] not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no {topics[-1]} event for {container_id} in {timeout:.0f}s")
            try:
                when, topic, cid = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if cid == container_id and topic in topics and topic not in seen:
                seen[topic] = when
        return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.thread.join(5)


class Bench:
    """The private containerd, the rootfs and the helpers every metric uses."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runtimes: dict[str, str] = {"ours": args.runtime_ours, "go": args.runtime_go}
        self.c = harness.Containerd(runtime=args.runtime_ours, log_level=args.log_level,
                                    base_dir=args.base_dir or None)
        self.rootfs = Path()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self._seq = 0
        self._streams: list[EventStream] = []
        self.load_at_start = _loadavg()
        self.forkserver: subprocess.Popen[bytes] | None = None
        self.ksm_facts = "not run by the benchmark (--ksm not given)"
        self.ksm_was = ""
        self.ksmd: psutil.Process | None = None
        self.ksmd_cpu0 = 0.0
        self.ksm_t0 = 0.0

    # -- setup / teardown ---------------------------------------------------------

    def start(self) -> None:
        # As `make bytecode`: a shim whose .pyc files are stale (edited sources, and
        # PYTHONDONTWRITEBYTECODE set) compiles its modules at every start (~15 ms).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "supervisor")],
                       check=True, stdout=subprocess.DEVNULL)
        if self.args.forkserver:
            self.start_forkserver()
        elif self.args.cold:
            self.c.extra_env[FORKSERVER_ENV] = ""  # cold, even if the machine runs one
        # else: on demand, on the harness's private socket; self.c.cleanup() stops it
        self.c.extra_env[GROUP_ENV] = "namespace" if self.args.shared else "container"
        if self.args.shared_size:
            self.c.extra_env[GROUP_SIZE_ENV] = str(self.args.shared_size)
        self.c.start()
        self.rootfs = harness.build_busybox_rootfs(self.c.dir / "rootfs")

    def start_forkserver(self) -> None:
        """``supervisor-forkserver`` on a socket in our directory; containerd's shims use it."""
        binary = shutil.which("supervisor-forkserver",
                              path=os.pathsep.join(map(str, harness.shim_bin_dirs())))
        if binary is None:
            raise BenchError("no supervisor-forkserver next to our shim (pip install -e .)")
        sock = self.c.dir / "forkserver.sock"
        with open(self.c.dir / "forkserver.log", "ab") as log:
            self.forkserver = subprocess.Popen(
                [binary, "--socket", str(sock)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        proc = self.forkserver

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"supervisor-forkserver exited with {proc.returncode}")
            return sock.is_socket()

        harness.wait_for(ready, 20, 0.02, message="supervisor-forkserver to listen")
        self.c.extra_env[FORKSERVER_ENV] = str(sock)

    def forkserver_facts(self) -> str:
        proc = self.forkserver
        if proc is None and self.args.cold:
            return f"cold start (${FORKSERVER_ENV} empty: no fork server)"
        if proc is None:
            try:
                status = forkclient.status(self.c.forkserver_socket)
                roll = smaps_rollup_kib(status["pid"])
            except (forkclient.ForkServerError, OSError) as e:
                return f"fork server on demand (none answering at the end: {e})"
            return (f"fork server on demand, spawned by the first `start` (nothing started by "
                    f"hand: what a new user gets; pid {status['pid']}, {status['served']} "
                    f"shims forked; its own Pss {roll['Pss'] / 1024:.1f} MiB, Private_Dirty "
                    f"{roll['Private_Dirty'] / 1024:.1f} MiB at the end{spare_facts(status)})")
        if proc.poll() is not None:
            return f"fork server (exited with {proc.returncode} before the end!)"
        roll = smaps_rollup_kib(proc.pid)
        try:
            spare = spare_facts(forkclient.status(self.c.extra_env[FORKSERVER_ENV]))
        except (forkclient.ForkServerError, OSError):
            spare = ""
        return (f"fork server `supervisor-forkserver` (pid {proc.pid}; its own Pss "
                f"{roll['Pss'] / 1024:.1f} MiB, Private_Dirty {roll['Private_Dirty'] / 1024:.1f}"
                f" MiB at the end, shared copy-on-write with the shims it forked{spare})")

    def sharing_facts(self) -> str:
        if not self.args.shared:
            return "no, one shim per container (the default, as the Go shim)"
        size = self.args.shared_size or "16 (default)"
        return f"yes, shim_group = namespace, up to {size} containers per shim"

    def cleanup(self) -> None:
        for s in self._streams:
            with contextlib.suppress(Exception):
                s.close()
        try:
            self.c.cleanup()
        finally:
            proc, self.forkserver = self.forkserver, None
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    # -- helpers ------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def new_id(self, which: str, metric: str) -> str:
        self._seq += 1
        return f"{which}-{metric}-{self._seq}"

    def order(self) -> tuple[str, str]:
        return ("ours", "go")

    def run_argv(
        self, which: str, cid: str, *cmd: str, rm: bool = False, detach: bool = False
    ) -> list[str]:
        args = ["run", "--runtime", self.runtimes[which], "--fifo-dir", str(self.c.fifo_dir)]
        if rm:
            args.append("--rm")
        if detach:
            args.append("-d")
        args += ["--env", harness.IMAGE_PATH_ENV, "--rootfs", str(self.rootfs), cid, *cmd]
        return self.c.ctr_argv(*args)

    def timed(self, argv: Sequence[str], what: str, timeout: float = 120.0) -> float:
        """Run ``argv`` (stdin /dev/null, output captured); its wall time in ms."""
        t0 = time.perf_counter()
        r = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout, check=False)  # fmt: skip
        elapsed = (time.perf_counter() - t0) * 1000
        if r.returncode != 0:
            raise BenchError(f"{what} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        return elapsed

    def start_idle(self, which: str, cid: str) -> None:
        self.timed(self.run_argv(which, cid, "sleep", "1000000", detach=True), f"run -d {cid}")

    def remove(self, cid: str) -> None:
        """Kill and delete a container's task, then the container (errors ignored)."""
        self.c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        for _ in range(100):
            r = self.c.ctr("task", "delete", cid, check=False, timeout=30)
            if r.returncode == 0 or "not found" in r.stderr:
                break
            time.sleep(0.05)
        self.c.ctr("containers", "delete", cid, check=False, timeout=30)

    def parallel(self, fn: Callable[[str], None], items: Iterable[str], workers: int) -> None:
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for f in [pool.submit(fn, item) for item in items]:
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def shim_pids(self) -> dict[str, int]:
        """{container id: pid} of the long-running shims serving them.

        A shim's command line names the container it was started for; the others it
        serves (shared shims) are found by the socket address in their bundles."""
        by_address: dict[str, int] = {}
        out: dict[str, int] = {}
        tasks = self.c.state / "io.containerd.runtime.v2.task" / self.c.namespace
        for pid in harness.shims_for(self.c):
            with contextlib.suppress(psutil.Error, OSError):
                cmd = psutil.Process(pid).cmdline()
                if "-id" in cmd and cmd[-1] not in ("start", "delete"):
                    first = cmd[cmd.index("-id") + 1]
                    out[first] = pid
                    by_address[(tasks / first / "address").read_text()] = pid
        with contextlib.suppress(OSError):
            for bundle in tasks.iterdir():
                with contextlib.suppress(OSError):
                    pid = by_address.get((bundle / "address").read_text(), 0)
                    if pid:
                        out.setdefault(bundle.name, pid)
        return out

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def alternate(self, runs: int, fn: Callable[[str, bool], None]) -> None:
        """``fn(which, record)``: ``--warmup`` unrecorded rounds, then ``runs`` recorded ones,
        each round ours then Go."""
        for _ in range(self.args.warmup):
            for which in self.order():
                fn(which, False)
        for i in range(runs):
            for which in self.order():
                fn(which, True)
            if (i + 1) % 5 == 0 or i + 1 == runs:
                self.log(f"  {i + 1}/{runs}")

    # -- metrics --------------------------------------------------------------------

    def _time_run_rm(self, row: Row, tag: str) -> None:
        """``row``: ``ctr run --rm`` of ``true``, alternating runtimes (``alternate``)."""

        def one(which: str, record: bool) -> None:
            cid = self.new_id(which, tag)
            ms = self.timed(self.run_argv(which, cid, "true", rm=True), f"ctr run --rm {cid}")
            if record:
                getattr(row, which).append(ms)

        self.alternate(self.args.runs, one)
        self.add(row)

    def m_run(self) -> None:
        self._time_run_rm(Row("`ctr run --rm` /bin/true", "ms", "lower"), "run")

    def m_runbusy(self) -> None:
        """``run``, while another container of the runtime runs in the namespace (with
        ``--shared``, our ``start`` then joins that container's shim instead of starting one)."""
        keeper = {w: self.new_id(w, "keeper") for w in self.order()}
        for which, cid in keeper.items():
            self.start_idle(which, cid)
        try:
            self._time_run_rm(
                Row("`ctr run --rm` /bin/true, another container running", "ms", "lower"),
                "runbusy")
        finally:
            self.parallel(self.remove, keeper.values(), 2)

    def m_exec(self) -> None:
        row = Row("`ctr task exec` true", "ms", "lower")
        cpu = Row("shim CPU per `ctr task exec` (threads' sum_exec_runtime)", "ms", "lower")
        target = {w: self.new_id(w, "exec-target") for w in self.order()}
        for which, cid in target.items():
            self.start_idle(which, cid)
        counter = {"n": 0}
        try:
            pids = self.shim_pids()

            def one(which: str, record: bool) -> None:
                counter["n"] += 1
                argv = self.c.ctr_argv("task", "exec", "--exec-id", f"e{counter['n']}",
                                       "--fifo-dir", str(self.c.fifo_dir), target[which], "true")
                pid = pids.get(target[which], 0)  # not found: no CPU row, the latency still
                before = cpu_sample(pid).exec_ms if pid else {}
                ms = self.timed(argv, f"exec into {target[which]}")
                if record:
                    getattr(row, which).append(ms)
                    if pid:
                        getattr(cpu, which).append(thread_delta(before, cpu_sample(pid).exec_ms))

            self.alternate(self.args.runs, one)
        finally:
            self.parallel(self.remove, target.values(), 2)
        self.add(row)
        self.add(cpu)

    def m_events(self) -> None:
        rows = {t: Row(f"`ctr run --rm` spawn → `{t}` event", "ms", "lower")
                for t in EVENT_TOPICS}  # fmt: skip
        stream = EventStream(self.c.ctr_argv("events"))
        self._streams.append(stream)
        time.sleep(0.5)  # let ctr subscribe before the first container

        def one(which: str, record: bool) -> None:
            cid = self.new_id(which, "ev")
            argv = self.run_argv(which, cid, "true", rm=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)  # fmt: skip
            try:
                seen = stream.wait_for(cid, EVENT_TOPICS, timeout=60)
            finally:
                _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise BenchError(f"ctr run --rm {cid}: {err.decode(errors='replace')[-500:]}")
            if record:
                for topic, when in seen.items():
                    getattr(rows[topic], which).append((when - t0) * 1000)

        try:
            self.alternate(self.args.runs, one)
        finally:
            stream.close()
            self._streams.remove(stream)
        for t in EVENT_TOPICS:
            self.add(rows[t])

    def m_coldstart(self) -> None:
        start_row = Row("shim `start` command (containerd waits for it)", "ms", "lower")
        ready_row = Row("shim `start` spawn → Task.Connect answered", "ms", "lower")
        binaries = {
            "ours": shutil.which("containerd-shim-supervisor-v2",
                                 path=os.pathsep.join(map(str, harness.shim_bin_dirs()))),
            "go": shutil.which("containerd-shim-runc-v2", path=self.c.env()["PATH"]),
        }  # fmt: skip
        for which, path in binaries.items():
            if path is None:
                raise BenchError(f"no shim binary for {which}")

        def one(which: str, record: bool) -> None:
            cid = self.new_id(which, "cold")
            start_ms, ready_ms = self.cold_start_once(str(binaries[which]), cid)
            if record:
                getattr(start_row, which).append(start_ms)
                getattr(ready_row, which).append(ready_ms)

        self.alternate(self.args.runs, one)
        self.add(start_row)
        self.add(ready_row)

    def cold_start_once(self, binary: str, cid: str) -> tuple[float, float]:
        """Run ``binary ... start`` like containerd, Connect, Shutdown; (start ms, ready ms)."""
        import trio  # noqa: PLC0415 - only this metric needs trio and the shim's ttrpc

        from supervisor import ttrpc  # noqa: PLC0415
        from supervisor.api.task.v2 import shim_pb2  # noqa: PLC0415
        from supervisor.launch import address as addresses  # noqa: PLC0415

        ns = self.c.namespace
        bundle = self.c.dir / "coldstart" / cid
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text("{}", encoding="utf-8")
        os.mkfifo(bundle / "log", 0o600)
        # containerd reads the shim's log FIFO; a reader must exist or the Go shim blocks.
        log_fd = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        env = self.c.env()
        env.update({"TTRPC_ADDRESS": self.c.ttrpc_address, "GOMAXPROCS": "2"})
        argv = [binary, "-namespace", ns, "-address", self.c.address,
                "-publish-binary", shutil.which("containerd") or "containerd",
                "-id", cid, "start"]  # fmt: skip
        socket_path = harness.go_shim_socket(self.c.address, ns, cid)
        shim_pid = 0
        try:
            t0 = time.perf_counter()
            r = subprocess.run(argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
            t_start = time.perf_counter()
            if r.returncode != 0:
                raise BenchError(f"{binary} start: {r.stderr.strip()[-500:]}")
            address = r.stdout.strip()

            async def connect() -> tuple[float, int]:
                client = await ttrpc.connect_unix(addresses.socket_path(address))
                async with client:
                    md = {ttrpc.NAMESPACE_KEY: ns}
                    raw = await client.call(
                        TASK_SERVICE, "Connect",
                        shim_pb2.ConnectRequest(id=cid).SerializeToString(),
                        timeout=30, metadata=md,
                    )  # fmt: skip
                    t_ready = time.perf_counter()
                    resp = shim_pb2.ConnectResponse()
                    resp.ParseFromString(raw)
                    with contextlib.suppress(ttrpc.ConnectionEnded, ttrpc.RPCError):
                        await client.call(
                            TASK_SERVICE, "Shutdown",
                            shim_pb2.ShutdownRequest(id=cid).SerializeToString(),
                            timeout=10, metadata=md,
                        )  # fmt: skip
                    return t_ready, resp.shim_pid

            t_ready, shim_pid = trio.run(connect)
            return (t_start - t0) * 1000, (t_ready - t0) * 1000
        finally:
            if shim_pid:
                with contextlib.suppress(TimeoutError):
                    harness.wait_for(lambda: not harness.pid_alive(shim_pid), 10, 0.02)
                harness.kill_pids([shim_pid])
            with contextlib.suppress(OSError):
                if socket_path.is_socket():
                    socket_path.unlink()
            os.close(log_fd)
            shutil.rmtree(bundle, ignore_errors=True)

    # -- KSM (--ksm) --------------------------------------------------------------------

    KSM = Path("/sys/kernel/mm/ksm")

    def ksm_read(self, name: str) -> int:
        return int((self.KSM / name).read_text().strip())

    def ksm_start(self) -> None:
        self.ksm_was = (self.KSM / "run").read_text().strip()
        ksmd = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "ksmd"]
        self.ksmd = ksmd[0] if ksmd else None
        self.ksmd_cpu0 = sum(self.ksmd.cpu_times()[:2]) if self.ksmd else 0.0
        self.ksm_t0 = time.monotonic()
        (self.KSM / "run").write_text("1")

    def ksm_settle(self, limit: float = 180.0) -> None:
        """Wait until two full scans pass without a change in merged pages."""
        deadline = time.monotonic() + limit
        scans, sharing = self.ksm_read("full_scans"), self.ksm_read("pages_sharing")
        stable = 0
        while time.monotonic() < deadline and stable < 2:
            time.sleep(1)
            now_scans = self.ksm_read("full_scans")
            if now_scans == scans:
                continue
            now_sharing = self.ksm_read("pages_sharing")
            stable = stable + 1 if abs(now_sharing - sharing) <= sharing // 100 else 0
            scans, sharing = now_scans, now_sharing
        self.log(f"  KSM: {sharing} pages sharing after {scans} full scans"
                 + ("" if stable >= 2 else f" (not settled within {limit:g} s)"))

    def ksm_stop(self) -> None:
        elapsed = time.monotonic() - self.ksm_t0
        cpu = (sum(self.ksmd.cpu_times()[:2]) - self.ksmd_cpu0) if self.ksmd else float("nan")
        self.ksm_facts = (f"on during the memory metric (pages_to_scan "
                          f"{self.ksm_read('pages_to_scan')}, sleep_millisecs "
                          f"{self.ksm_read('sleep_millisecs')}); ksmd used {cpu:.1f} s CPU "
                          f"over {elapsed:.0f} s")
        if self.ksm_was == "0":
            (self.KSM / "run").write_text("2")  # unmerge everything, then off as before
            (self.KSM / "run").write_text("0")

    def m_memory(self) -> None:
        if self.args.ksm:
            self.ksm_start()
        try:
            self._memory()
        finally:
            if self.args.ksm:
                self.ksm_stop()

    def _memory(self) -> None:
        counts = self.args.memory_counts
        ids: dict[str, list[str]] = {"ours": [], "go": []}
        try:
            for count in counts:
                todo: list[tuple[str, str]] = []
                while len(ids["ours"]) < count:
                    for which in self.order():  # interleaved: ours, Go, ours, Go...
                        cid = self.new_id(which, "idle")
                        ids[which].append(cid)
                        todo.append((which, cid))
                self.log(f"  starting {len(todo)} idle containers (to {count} per runtime)")
                self.parallel(lambda key: self.start_idle(*key.split("|")),
                              [f"{w}|{c}" for w, c in todo], 4)  # fmt: skip
                time.sleep(3 if not self.args.quick else 1)  # let the shims settle
                if self.args.ksm:
                    self.ksm_settle()
                pids = self.shim_pids()
                for which in self.order():
                    pss = Row(f"idle shim Pss per container, {count} containers/runtime",
                              "MiB", "lower")
                    dirty = Row(f"idle shim Private_Dirty per container, {count} "
                                "containers/runtime", "MiB", "lower")
                    shims = Row(f"shim processes for {count} containers", "count", "lower")
                    served: dict[int, int] = {}
                    for cid in ids[which]:
                        if cid not in pids:
                            raise BenchError(f"no shim process found for {cid}")
                        served[pids[cid]] = served.get(pids[cid], 0) + 1
                    rolls = {pid: smaps_rollup_kib(pid) for pid in served}
                    for cid in ids[which]:
                        pid = pids[cid]
                        getattr(pss, which).append(rolls[pid]["Pss"] / 1024 / served[pid])
                        getattr(dirty, which).append(
                            rolls[pid]["Private_Dirty"] / 1024 / served[pid])
                    getattr(shims, which).append(float(len(served)))
                    self._merge(pss)
                    self._merge(dirty)
                    self._merge(shims)
        finally:
            self.log("  removing the idle containers")
            self.parallel(self.remove, ids["ours"] + ids["go"], 4)

    def _merge(self, row: Row) -> None:
        for r in self.rows:
            if r.metric == row.metric:
                r.ours += row.ours
                r.go += row.go
                return
        self.rows.append(row)

    def m_throughput(self) -> None:
        total = Row("stdout 200 MiB via `ctr run --rm`, spawn → EOF", "MiB/s", "higher")
        stream = Row("stdout 200 MiB, first byte → EOF", "MiB/s", "higher")

        def one(which: str, record: bool) -> None:
            cid = self.new_id(which, "tput")
            argv = self.run_argv(which, cid, "head", "-c", str(THROUGHPUT_BYTES), "/dev/zero",
                                 rm=True)  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)  # fmt: skip
            assert proc.stdout is not None
            got = 0
            first = 0.0
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, MIB):
                if not got:
                    first = time.perf_counter()
                got += len(chunk)
            t_eof = time.perf_counter()
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0 or got != THROUGHPUT_BYTES:
                raise BenchError(f"throughput {cid}: rc {proc.returncode}, {got} bytes, "
                                 f"{err.decode(errors='replace')[-300:]}")  # fmt: skip
            if record:
                getattr(total, which).append(THROUGHPUT_BYTES / MIB / (t_eof - t0))
                getattr(stream, which).append(THROUGHPUT_BYTES / MIB / (t_eof - first))

        self.alternate(self.args.throughput_runs, one)
        self.add(total)
        self.add(stream)

    def m_cpu(self) -> None:
        seconds = self.args.cpu_seconds
        cpu = Row(f"idle shim CPU (utime+stime) over {seconds:g} s", "ms", "lower")
        exact = Row(f"idle shim CPU (threads' sum_exec_runtime) over {seconds:g} s", "ms", "lower")
        switches = Row(f"idle shim context switches over {seconds:g} s", "count", "lower")
        ids = {w: self.new_id(w, "cpu") for w in self.order()}
        try:
            for which, cid in ids.items():
                self.start_idle(which, cid)
            time.sleep(1 if self.args.quick else 5)  # past the start-up work
            pids = self.shim_pids()
            before = {w: cpu_sample(pids[cid]) for w, cid in ids.items()}
            self.log(f"  sampling for {seconds:g} s")
            time.sleep(seconds)
            after = {w: cpu_sample(pids[cid]) for w, cid in ids.items()}
            tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
            for which in self.order():
                getattr(cpu, which).append((after[which].ticks - before[which].ticks) * tick_ms)
                getattr(exact, which).append(
                    thread_delta(before[which].exec_ms, after[which].exec_ms))
                getattr(switches, which).append(thread_delta(
                    {t: float(n) for t, n in before[which].switches.items()},
                    {t: float(n) for t, n in after[which].switches.items()}))
        finally:
            self.parallel(self.remove, ids.values(), 2)
        for r in (cpu, exact, switches):
            self.add(r)

    # -- facts ------------------------------------------------------------------------

    def facts(self, command: str, started: float) -> list[str]:
        go_shim = shutil.which("containerd-shim-runc-v2", path=self.c.env()["PATH"]) or "?"
        ours = shutil.which("containerd-shim-supervisor-v2",
                            path=os.pathsep.join(map(str, harness.shim_bin_dirs()))) or "?"
        mem = psutil.virtual_memory().total / (1 << 30)
        return [
            f"- command: `{command}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
            f"duration {time.monotonic() - started:.0f} s",
            f"- machine: nproc {os.cpu_count()}, {mem:.1f} GiB RAM, kernel "
            f"{platform.release()} ({platform.machine()}), load average at end {_loadavg()} "
            f"(at start {self.load_at_start})",
            f"- containerd: {_first_line(['containerd', '--version'])}, log level "
            f"{self.args.log_level}, its directory in {self.c.dir.parent} "
            f"({_fstype(self.c.dir)})",
            f"- runc: {_first_line(['runc', '--version'])}",
            f"- ours: {self.runtimes['ours']} = {ours} "
            f"({_first_line([sys.executable, '--version'])}{_light_python(ours)}); "
            f"Go: {self.runtimes['go']} = {go_shim}",
            f"- ours started by: {self.forkserver_facts()}",
            f"- ours shared: {self.sharing_facts()}",
            f"- KSM: {self.ksm_facts}",
            f"- runs: {self.args.runs} per runtime (+{self.args.warmup} warm-up), "
            f"throughput {self.args.throughput_runs}, idle CPU {self.args.cpu_seconds:g} s",
        ]


def _light_python(script: str) -> str:
    """", start and delete in PYTHON (VERSION)" when the entry script's shebang names an
    interpreter other than this one (supervisor.launch.launcher's light interpreter)."""
    try:
        with open(script, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return ""
    python = first[2:].split()[0] if first.startswith("#!") and first[2:].split() else ""
    if not python or os.path.realpath(python) == os.path.realpath(sys.executable):
        return ""
    return f", start and delete in {python} ({_first_line([python, '--version'])})"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="bench/compare",
        description=doc.split("\n\n", 2)[2] if doc.count("\n\n") >= 2 else doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=None,
                   help="samples per runtime for run/exec/events/coldstart (default 20)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unrecorded runs per runtime before each latency metric (default 1)")
    p.add_argument("--throughput-runs", type=int, default=None,
                   help="200 MiB transfers per runtime (default 5)")
    p.add_argument("--cpu-seconds", type=float, default=None,
                   help="idle CPU sampling window in seconds (default 60)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 runs, 1 transfer, 3/6 idle containers, 5 s CPU window")
    p.add_argument("--only", default=",".join(METRICS),
                   help=f"comma-separated metrics to run (default all: {','.join(METRICS)})")
    p.add_argument("--memory-counts", default=None,
                   help="idle containers per runtime for memory, rising, comma-separated "
                        "(default 10,50; --quick 3,6)")
    p.add_argument("--venv", type=Path, default=None,
                   help="measure the shim of this venv (default the repo's .venv): "
                        "bench/compare runs this script with its python, e.g. one made with "
                        "`make venv PYTHON=python3.12 VENV=.venv-3.12`")
    p.add_argument("--markdown-out", type=Path, help="also write facts and table to this file")
    p.add_argument("--base-dir", default=None,
                   help="where containerd's whole directory goes (root, state, sockets, "
                        "FIFOs; default the harness's: $SUPERVISOR_TEST_TMP or /tmp).  A host "
                        "keeps the state on a tmpfs (/run) but the root on a disk, and our "
                        "shim's event spool is in the root: /dev/shm here is not a host")
    p.add_argument("--log-level", default="info",
                   choices=("trace", "debug", "info", "warn", "error", "fatal", "panic"),
                   help="containerd's log level (default info, containerd's own default: what a "
                        "new user runs; at debug both shims log every request, ours also every "
                        "event; runs before 2026-11-30 00:36 used debug)")
    p.add_argument("--runtime-ours", default=OURS_RUNTIME, help=f"default {OURS_RUNTIME}")
    p.add_argument("--runtime-go", default=GO_RUNTIME, help=f"default {GO_RUNTIME}")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--forkserver", action="store_true",
                        help="start a supervisor-forkserver and have our shims forked from it "
                             f"(${FORKSERVER_ENV} in containerd's environment); default: the "
                             "first start spawns one on demand, as for a new user")
    layout.add_argument("--cold", action="store_true",
                        help=f"no fork server at all (${FORKSERVER_ENV} empty): every shim "
                             "starts cold")
    p.add_argument("--ksm", action="store_true",
                   help="run the host's KSM (/sys/kernel/mm/ksm/run=1) during the memory "
                        "metric and measure once it has settled; restored afterwards")
    p.add_argument("--shared", action="store_true",
                   help=f"our shims shared per namespace (${GROUP_ENV}=namespace)")
    p.add_argument("--shared-size", type=int, default=0,
                   help=f"containers per shared shim (${GROUP_SIZE_ENV}; default the shim's, 16)")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 20
    if args.throughput_runs is None:
        args.throughput_runs = 1 if args.quick else 5
    if args.cpu_seconds is None:
        args.cpu_seconds = 5.0 if args.quick else 60.0
    try:
        args.memory_counts = [int(n) for n in
                              (args.memory_counts or ("3,6" if args.quick else "10,50")).split(",")]
    except ValueError:
        p.error(f"--memory-counts {args.memory_counts!r}: comma-separated numbers")
    if not args.memory_counts or args.memory_counts != sorted(set(args.memory_counts)) \
            or args.memory_counts[0] < 1:
        p.error("--memory-counts must rise and be >= 1")
    if args.venv is not None and Path(sys.prefix).resolve() != args.venv.resolve():
        p.error(f"--venv {args.venv}: this is {sys.prefix}'s python; run bench/compare "
                f"--venv, or {args.venv}/bin/python bench/compare.py")
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in only if m not in METRICS]
    if unknown:
        p.error(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    args.only = [m for m in METRICS if m in only]
    if args.runs < 1 or args.throughput_runs < 1 or args.warmup < 0:
        p.error("--runs and --throughput-runs must be >= 1, --warmup >= 0")
    return args


class _Terminated(BaseException):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = harness.missing_requirements()
    if missing:
        print(f"bench/compare: cannot run: {', '.join(missing)}", file=sys.stderr)
        return 2
    invoked = os.environ.get("COMPARE_ARGV0") or sys.argv[0]
    command = shlex.join([invoked, *(sys.argv[1:] if argv is None else argv)])
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    started = time.monotonic()
    bench = Bench(args)
    status = 0
    try:
        bench.log(f"containerd in {bench.c.dir}, namespace {bench.c.namespace}")
        bench.start()
        for name in args.only:
            bench.log(f"{name} ...")
            getattr(bench, f"m_{name}")()
    except (KeyboardInterrupt, _Terminated) as e:
        bench.log(f"interrupted ({type(e).__name__} {e}); partial results follow")
        status = 130
    except (BenchError, harness.HarnessError, subprocess.SubprocessError, OSError) as e:
        bench.log(f"error: {e}; partial results follow")
        status = 1
    finally:
        with _signals_ignored():
            bench.log("cleaning up")
            facts = bench.facts(command, started)
            bench.cleanup()
            left = bench.c.leftovers()
            if left:
                bench.log(f"leftovers: {left}")
    text = "\n".join([
        "## supervisor vs Go shim (containerd-shim-runc-v2)", "", *facts, "",
        markdown_table(bench.rows), "",
        "Medians; ratio = ours/Go on the medians (for MiB/s, < 1 means we are slower).", "",
    ])  # fmt: skip
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text, encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
