"""Drive a real, private containerd for the integration tests, the demo and scripts.

Which containerd: the system's (1.6) by default; ``$SUPERVISOR_TEST_CONTAINERD`` names
another series (``1.7``, ``2.1``), fetched (once, cached under /tmp/peer-suite) by
``../shared/conformance/fetch-containerd.sh`` and put first on the PATH the harness finds
``containerd`` and ``ctr`` on (see :func:`containerd_series`, :func:`containerd_bin_dir`).

Everything here is plain, blocking Python (subprocess + psutil) so that it can be used from
pytest fixtures, from async tests (via ``Containerd.actr`` or ``trio.to_thread``) and from
scripts such as ``scripts/demo.py``.

A :class:`Containerd` owns one temporary directory (``/tmp/sv-ctd-XXXXXXXX`` by default,
short on purpose: unix socket paths are limited to 108 bytes) that holds its config, root,
state, sockets and log. It never touches the system's ``/run/containerd/containerd.sock``
or ``/var/lib/containerd``. Two things are shared with every other containerd on the
machine, because runc and the Go shim hard-code them:

* runc's state root ``/run/containerd/runc/<namespace>``: each instance therefore uses its
  own unique namespace (``t<8 hex digits>``);
* the Go shim's sockets ``/run/containerd/s/<sha256(address/ns/id)>``: unique per address.

:meth:`Containerd.cleanup` removes what this instance left there, and only that.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psutil

from supervisor import codesnap
from supervisor.launch import forkclient, procfs

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNTIME = "io.containerd.supervisor.v2"
GO_RUNTIME = "io.containerd.runc.v2"
RUNTIME_ENV = "SUPERVISOR_TEST_RUNTIME"
SERIES_ENV = "SUPERVISOR_TEST_CONTAINERD"
SYSTEM_SERIES = "1.6"
FETCH_SCRIPT = REPO_ROOT.parent / "shared" / "conformance" / "fetch-containerd.sh"
RUNC_STATE_ROOT = Path("/run/containerd/runc")
GO_SHIM_SOCKET_DIR = Path("/run/containerd/s")
CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_IMAGE_REF = "supervisor.test/busybox:latest"

# Plugins a shim test never needs: CRI (slow, wants CNI), snapshotters that
# only probe and fail, and "opt" (it creates /opt/containerd on the host).
DISABLED_PLUGINS: tuple[str, ...] = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class HarnessError(RuntimeError):
    """The harness could not do what it was asked (daemon did not start, ...)."""


class CtrError(subprocess.CalledProcessError):
    """A ``ctr`` command failed; ``str()`` includes its stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
            f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}"
        )


# --------------------------------------------------------------------------- helpers


def default_runtime() -> str:
    """The runtime under test: ``$SUPERVISOR_TEST_RUNTIME`` or io.containerd.supervisor.v2."""
    return os.environ.get(RUNTIME_ENV) or DEFAULT_RUNTIME


def containerd_series() -> str:
    """The containerd series under test: ``$SUPERVISOR_TEST_CONTAINERD`` or the system's.

    A test whose contract differs by series asks this (e.g. ``series_at_least("1.7")``).
    """
    return os.environ.get(SERIES_ENV) or SYSTEM_SERIES


def series_at_least(version: str) -> bool:
    """Whether the series under test is ``version`` or later (``"1.7"``, ``"2.1"``)."""

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    return key(containerd_series()) >= key(version)


def daemon_log_level() -> str:
    """containerd's log level: tests read its ``event forwarded`` lines (topic, ns), which
    1.6 logs at debug and 1.7 and later only at trace."""
    return "trace" if series_at_least("1.7") else "debug"


_BIN_DIRS: dict[str, Path | None] = {}


def containerd_bin_dir() -> Path | None:
    """The fetched bin dir (containerd, ctr, containerd-shim-runc-v2) of the series under
    test, or None for the system's. Fetched once per process by the fetch script (which
    itself caches); a failure raises :class:`HarnessError`, never a silent skip."""
    series = containerd_series()
    if series == SYSTEM_SERIES:
        return None
    if series not in _BIN_DIRS:
        if not FETCH_SCRIPT.exists():
            raise HarnessError(f"{SERIES_ENV}={series}: no {FETCH_SCRIPT}")
        r = subprocess.run(["bash", str(FETCH_SCRIPT), series], capture_output=True,
                           text=True, check=False, timeout=600)
        lines = r.stdout.split()
        found = Path(lines[-1]) if r.returncode == 0 and lines else None
        if found is None or not (found / "containerd").is_file():
            raise HarnessError(f"{SERIES_ENV}={series}: {FETCH_SCRIPT} failed "
                               f"({r.returncode}):\n{r.stderr[-2000:]}")
        _BIN_DIRS[series] = found
    return _BIN_DIRS[series]


def series_header() -> str:
    """One line for pytest's header: the series, its containerd binary and version."""
    try:
        binary = _which("containerd")
    except HarnessError as e:
        return f"containerd series {containerd_series()}: {e}"
    r = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return f"containerd series {containerd_series()}: {binary}: {r.stdout.strip()}"


def shim_bin_dirs() -> list[Path]:
    """Directories to put first on containerd's PATH so it finds our shim.

    The running interpreter's bin dir (the venv when run from it) and the repo's .venv/bin.
    """
    dirs: list[Path] = []
    for d in (Path(sys.executable).parent, REPO_ROOT / ".venv" / "bin"):
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return dirs


def missing_requirements() -> list[str]:
    """Why the real-containerd tests cannot run here (empty list: they can)."""
    why = []
    if os.geteuid() != 0:
        why.append("not root")
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool, path=_search_path()) is None:
            why.append(f"{tool} not installed")
    return why


def mark_real_containerd_tests(items: Iterable[Any], here: Path) -> None:
    """In a conftest's collection hook: the tests below ``here`` are ``integration`` and are
    skipped, with the reason, where the real containerd cannot run."""
    import pytest  # noqa: PLC0415 - harness.py is also used outside pytest

    containerd_bin_dir()  # a series that cannot be fetched is an error, not a skip
    why = missing_requirements()
    for item in items:
        if not Path(item.path).resolve().is_relative_to(here):
            continue
        item.add_marker(pytest.mark.integration)
        if why:
            item.add_marker(pytest.mark.skip(reason="real containerd: " + ", ".join(why)))


def test_failed(node: Any) -> bool:
    """Whether a test's setup or call failed (reports kept by tests/conftest.py)."""
    return any(getattr(getattr(node, "_sv_rep_" + when, None), "failed", False)
               for when in ("setup", "call"))


test_failed.__test__ = False  # type: ignore[attr-defined]  # not a test: pytest, keep off


def _search_path() -> str:
    """Where ``containerd``, ``ctr`` and ``runc`` are looked for: the series' bin dir first."""
    fetched = containerd_bin_dir()
    first = [str(fetched)] if fetched is not None else []
    return os.pathsep.join([*first, os.environ.get("PATH", ""), DEFAULT_PATH])


def _which(tool: str) -> str:
    found = shutil.which(tool, path=_search_path())
    if found is None:
        raise HarnessError(f"{tool} not found on PATH")
    return found


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Raises ``TimeoutError`` (with ``message`` or the predicate's name) after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def zombies_of(parent_pid: int) -> list[int]:
    """Pids of zombie processes anywhere on the machine whose parent is ``parent_pid``."""
    out = []
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["ppid"] == parent_pid and p.info["status"] == psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return sorted(out)


def children_of(parent_pid: int) -> list[int]:
    """Pids of the live (non-zombie) direct children of ``parent_pid``."""
    out = []
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["ppid"] == parent_pid and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return sorted(out)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_with_arg(value: str, exclude: Iterable[int] = ()) -> list[int]:
    """Pids whose command line has ``value`` as an argument (or ``--flag=value``).

    ``ctr`` clients are left out: they are not shims.
    """
    skip = set(exclude) | {os.getpid()}
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.pid in skip or not cmd or os.path.basename(cmd[0]) == "ctr":
            continue
        if any(a == value or a.endswith("=" + value) for a in cmd[1:]):
            out.append(p.pid)
    return sorted(out)


def shims_for(containerd: Containerd) -> list[int]:
    """Pids of the shims of this containerd (their command line holds its address)."""
    return processes_with_arg(containerd.address, exclude=containerd.pids_started)


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
    """Send ``sig`` to exactly these pids and wait (up to ``timeout``) until they are dead.

    A zombie counts as dead: processes that are not our children are reaped by init (or a
    subreaper) whenever it gets to it.
    """
    sent = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            sent.append(pid)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(pid_alive(p) for p in sent), timeout, interval=0.01)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace, deepest first."""
    base = os.path.realpath(path)
    found = []
    for m in procfs.read_mountinfo():
        mp = m.mount_point
        if mp == base or mp.startswith(base.rstrip("/") + "/"):
            found.append(mp)
    return sorted(found, key=lambda m: (m.count("/"), m), reverse=True)


def unmount_below(path: Path) -> list[str]:
    """Unmount everything at or below ``path`` (deepest first; lazily if busy)."""
    done = []
    for _ in range(3):
        mps = mounts_below(path)
        if not mps:
            break
        for mp in mps:
            r = subprocess.run(["umount", mp], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
            done.append(mp)
    return done


def cgroup_mountpoints() -> list[Path]:
    """Mount points of the cgroup (v1) and cgroup2 hierarchies."""
    return [Path(point) for _, _, point in procfs.cgroup_mounts(procfs.read_mountinfo())]


def cgroup_dirs(namespace: str) -> list[Path]:
    """Every cgroup dir at or below ``/<namespace>`` in every hierarchy, deepest first.

    ctr gives each container the cgroup path ``/<namespace>/<id>``.
    """
    out: list[Path] = []
    for mp in cgroup_mountpoints():
        top = mp / namespace
        if top.is_dir():
            out.extend(Path(d) for d, _dirs, _files in os.walk(top, topdown=False))
    return out


def kill_cgroup_processes(namespace: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in the ``/<namespace>`` cgroups (thawing frozen ones first).

    The last resort for containers nobody else knows about any more (shim and runc state
    gone). Only ever used on namespaces the harness generated, so it cannot hit others.
    """
    dirs = cgroup_dirs(namespace)
    for d in dirs:
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            if (d / name).exists():
                with contextlib.suppress(OSError):
                    (d / name).write_text(value)
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    pids.discard(os.getpid())
    kill_pids(sorted(pids), timeout=timeout)
    return sorted(pids)


def remove_empty_cgroups(namespace: str) -> None:
    """rmdir the (empty) ``/<namespace>`` cgroups that runc made for ``ctr`` containers."""
    for mp in cgroup_mountpoints():
        top = mp / namespace
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def go_shim_socket(address: str, namespace: str, container_id: str) -> Path:
    """Where the Go shim (containerd's shim library) puts its socket for a container."""
    digest = hashlib.sha256(os.path.join(address, namespace, container_id).encode()).hexdigest()
    return GO_SHIM_SOCKET_DIR / digest


# --------------------------------------------------------------------------- containerd

_LIVE: set[Containerd] = set()


class Containerd:
    """A private containerd with its own root, state, sockets, namespace and log.

    ``Containerd(runtime=...)`` only prepares; call :meth:`start` (or use it as a context
    manager). :meth:`cleanup` undoes everything; it is also registered with ``atexit``.
    """

    def __init__(
        self,
        runtime: str | None = None,
        *,
        namespace: str | None = None,
        base_dir: str | Path | None = None,
        extra_config: str = "",
        env: dict[str, str] | None = None,
        start_timeout: float = 20.0,
        adopt_dir: str | Path | None = None,
        log_level: str | None = None,
    ) -> None:
        """Prepare (not start) a containerd in a new ``sv-ctd-*`` dir below ``base_dir``
        (``$SUPERVISOR_TEST_TMP`` or /tmp).

        ``extra_config``: TOML tables appended to config.toml (it follows the ``[debug]``
        table, so top-level keys do not work there). ``env``: added to containerd's
        environment (its shims inherit it). ``namespace``: a fixed namespace instead of a
        generated one; cleanup then never kills by cgroup nor removes runc's dir for it.
        ``adopt_dir``: take over the directory of an instance a crashed process left
        behind, only to :meth:`cleanup` it (see :func:`cleanup_dir`). ``log_level``:
        containerd's ``[debug] level`` (default :func:`daemon_log_level`, what the tests
        read; benchmarks pass containerd's own default, ``info``).
        """
        meta: dict[str, object] = {}
        if adopt_dir is not None:
            self.dir: Path = Path(adopt_dir).resolve()
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((self.dir / "harness.json").read_text(encoding="utf-8"))
        else:
            parent = base_dir or os.environ.get("SUPERVISOR_TEST_TMP") or "/tmp"
            Path(parent).mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="sv-ctd-", dir=parent))
        self.runtime: str = runtime or str(meta.get("runtime") or "") or default_runtime()
        self.namespace: str = (
            namespace or str(meta.get("namespace") or "") or "t" + secrets.token_hex(4)
        )
        self.root: Path = self.dir / "root"
        self.state: Path = self.dir / "state"
        self.address: str = str(self.dir / "containerd.sock")
        # containerd 1.6 derives the ttrpc socket as "<grpc address>.ttrpc" when unset.
        self.ttrpc_address: str = self.address + ".ttrpc"
        if len(self.ttrpc_address) > 107:
            raise HarnessError(f"socket path too long for AF_UNIX: {self.ttrpc_address}")
        self.config_path: Path = self.dir / "config.toml"
        self.log_path: Path = self.dir / "containerd.log"
        # The shims' fork server (spawned on demand by the first start): private to this
        # containerd, never the default path a real one may use; stopped by cleanup().
        self.forkserver_socket: str = str(self.dir / "fs.sock")
        # ctr's default FIFO dir is the shared /run/containerd/fifo; run() uses this one.
        self.fifo_dir: Path = self.dir / "fifo"
        self.start_timeout = start_timeout
        self.log_level = log_level or daemon_log_level()
        self.extra_env: dict[str, str] = dict(env or {})
        self.namespaces_used: set[str] = {self.namespace, *_strs(meta.get("namespaces_used"))}
        # Namespaces the harness generated (random, so nobody else uses them): only for these
        # does cleanup kill by cgroup and remove runc's root dir and the cgroups.
        self.owned_namespaces: set[str] = set(_strs(meta.get("owned_namespaces")))
        if namespace is None and not meta:
            self.owned_namespaces.add(self.namespace)
        self.pids_started: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._cleaned = False
        if adopt_dir is None:
            self.config_path.write_text(self._config_text(extra_config), encoding="utf-8")
            self._save_meta()
        _LIVE.add(self)

    def _save_meta(self) -> None:
        # Enough for cleanup_dir() to undo this instance from another process.
        meta = {
            "runtime": self.runtime,
            "namespace": self.namespace,
            "namespaces_used": sorted(self.namespaces_used),
            "owned_namespaces": sorted(self.owned_namespaces),
        }
        with contextlib.suppress(OSError):
            (self.dir / "harness.json").write_text(json.dumps(meta), encoding="utf-8")

    def __repr__(self) -> str:
        return f"<Containerd {self.address} ns={self.namespace} pid={self.pid}>"

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ---------------------------------------------------------------- config / env
    def _config_text(self, extra: str) -> str:
        disabled = ", ".join(json.dumps(p) for p in DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f"root = {json.dumps(str(self.root))}\n"
            f"state = {json.dumps(str(self.state))}\n"
            f"disabled_plugins = [{disabled}]\n"
            "\n[grpc]\n"
            f"  address = {json.dumps(self.address)}\n"
            "\n[debug]\n"
            f"  level = {json.dumps(self.log_level)}\n"
            f"\n{extra}\n"
        )

    def env(self) -> dict[str, str]:
        """Environment for containerd (and so for the shims it starts)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        # Our shim first; then the series' own bin dir (its containerd-shim-runc-v2).
        path = [str(d) for d in shim_bin_dirs()] + [_search_path()]
        env["PATH"] = os.pathsep.join(p for p in path if p)
        env[forkclient.SOCKET_ENV] = self.forkserver_socket
        env[codesnap.DIR_ENV] = str(self.dir / "code")  # the shims' copies of their code
        env.update(self.extra_env)
        return env

    def forkservers(self) -> list[int]:
        """Pids of the fork servers of this containerd: on its fork-server socket (their
        command line names it; spawned by its shims' ``start`` or by a test), or spawned
        by its shims on any path (they inherit its shims' ``TTRPC_ADDRESS``)."""
        path = self.env()[forkclient.SOCKET_ENV]
        found = set(processes_with_arg(path)) if path else set()
        for p in psutil.process_iter(["cmdline"]):
            if "supervisor.forkserver" in (p.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    if p.environ().get("TTRPC_ADDRESS") == self.ttrpc_address:
                        found.add(p.pid)
        return sorted(found)

    # ---------------------------------------------------------------- lifecycle
    @property
    def pid(self) -> int | None:
        """Pid of the running containerd, or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start containerd and wait until ``ctr version`` answers."""
        if self.is_running():
            raise HarnessError("containerd already running")
        for d in (self.root, self.state, self.fifo_dir):
            d.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== harness: starting containerd at {time.ctime()}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [_which("containerd"), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                cwd=self.dir,
            )
        self.pids_started.append(self._proc.pid)
        self._procs.append(self._proc)

        def ready() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise HarnessError(f"containerd exited at start:\n{self.log_tail()}")
            if not os.path.exists(self.address):
                return False
            r = self.ctr("version", check=False, timeout=5)
            return r.returncode == 0

        try:
            wait_for(ready, self.start_timeout, interval=0.02, message="containerd to answer")
        except TimeoutError as e:
            raise HarnessError(f"{e}\n{self.log_tail()}") from None
        if not os.path.exists(self.ttrpc_address):
            raise HarnessError(f"no ttrpc socket at {self.ttrpc_address}")

    def _signal_and_wait(self, sig: int, timeout: float) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill9(self) -> None:
        """SIGKILL containerd (its shims keep running) and reap it."""
        self._signal_and_wait(signal.SIGKILL, 10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM containerd, SIGKILL it after ``timeout`` s. Shims keep running."""
        if not self._signal_and_wait(signal.SIGTERM, timeout):
            self.kill9()

    def restart(self) -> None:
        self.stop()
        self.start()

    # ---------------------------------------------------------------- ctr
    def new_namespace(self) -> str:
        """A fresh unique namespace that this instance owns (and cleans up)."""
        ns = "t" + secrets.token_hex(4)
        self.owned_namespaces.add(ns)
        self.namespaces_used.add(ns)
        self._save_meta()
        return ns

    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        ns = namespace or self.namespace
        if ns not in self.namespaces_used:
            self.namespaces_used.add(ns)
            self._save_meta()
        return [_which("ctr"), "--address", self.address, "--namespace", ns, *map(str, args)]

    def ctr(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address A --namespace NS ARGS`` and capture its output (text).

        stdin is ``input`` or /dev/null. Raises :class:`CtrError` when ``check`` and it
        fails, ``subprocess.TimeoutExpired`` (after killing ctr) on timeout.
        """
        argv = self.ctr_argv(*args, namespace=namespace)
        r = subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")},
        )
        if check and r.returncode != 0:
            raise CtrError(r.returncode, argv, r.stdout, r.stderr)
        return r

    async def actr(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """:meth:`ctr` in a worker thread, for trio tests."""
        import trio  # noqa: PLC0415 - only async callers need trio

        def call() -> subprocess.CompletedProcess[str]:
            return self.ctr(*args, input=input, check=check, timeout=timeout, namespace=namespace)

        return await trio.to_thread.run_sync(call)

    def run(
        self,
        container_id: str,
        *command: str,
        rootfs: str | Path | None = None,
        image: str | None = None,
        rm: bool = False,
        detach: bool = False,
        options: Sequence[str] = (),
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --runtime R --fifo-dir F [--rm] [-d] OPTIONS (--rootfs DIR id | IMAGE id)``.

        With ``rootfs``, ``--env PATH=...`` is added first: ctr's spec for ``--rootfs`` has
        no PATH at all, so runc could not find a bare ``echo`` (an image brings its own).
        """
        args = ["run", "--runtime", self.runtime, "--fifo-dir", str(self.fifo_dir)]
        if rm:
            args.append("--rm")
        if detach:
            args.append("-d")
        if rootfs is not None:
            args += ["--env", IMAGE_PATH_ENV]
        args.extend(options)
        if rootfs is not None:
            args += ["--rootfs", str(rootfs), container_id]
        elif image is not None:
            args += [image, container_id]
        else:
            raise ValueError("need rootfs or image")
        return self.ctr(*args, *command, check=check, timeout=timeout)

    def tasks(self, namespace: str | None = None) -> dict[str, tuple[int, str]]:
        """``ctr task ls`` as {container id: (pid, status)}."""
        out = self.ctr("task", "ls", namespace=namespace, timeout=20).stdout
        res: dict[str, tuple[int, str]] = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                res[parts[0]] = (int(parts[1]), parts[2])
        return res

    def containers(self, namespace: str | None = None) -> list[str]:
        out = self.ctr("containers", "ls", "-q", namespace=namespace, timeout=20).stdout
        return out.split()

    # ---------------------------------------------------------------- logs
    def log_text(self, since: int = 0) -> str:
        """containerd's log (all starts appended), from byte offset ``since``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Current size of the log, to pass to :meth:`log_text` later."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---------------------------------------------------------------- teardown
    def bundles(self) -> list[tuple[str, str]]:
        """(namespace, id) of every task bundle in the state dir."""
        top = self.state / "io.containerd.runtime.v2.task"
        out: list[tuple[str, str]] = []
        if top.is_dir():
            for ns_dir in top.iterdir():
                if ns_dir.is_dir():
                    out.extend((ns_dir.name, b.name) for b in ns_dir.iterdir())
        return out

    def known_containers(self) -> set[tuple[str, str]]:
        """(namespace, id) of every container this daemon ever had a bundle for.

        From the state dir and from the bundle paths in the log (which survive the bundle).
        """
        found = set(self.bundles())
        task_dir = re.escape(str(self.state / "io.containerd.runtime.v2.task"))
        for m in re.finditer(task_dir + r"/([^/\s\"]+)/([^/\s\"]+)", self.log_text()):
            found.add((m.group(1), m.group(2)))
        return found

    def _ctr_cleanup(self, budget: float = 30.0) -> None:
        deadline = time.monotonic() + budget

        def left() -> float:
            return max(1.0, min(10.0, deadline - time.monotonic()))

        r = self.ctr("namespaces", "ls", "-q", check=False, timeout=left())
        namespaces = set(r.stdout.split()) if r.returncode == 0 else set()
        for ns in sorted(namespaces | self.namespaces_used):
            if time.monotonic() > deadline:
                return
            r = self.ctr("task", "ls", namespace=ns, check=False, timeout=left())
            rows = [ln.split() for ln in r.stdout.splitlines()[1:]] if r.returncode == 0 else []
            for row in rows:
                if len(row) >= 3 and row[2] in ("PAUSED", "PAUSING"):
                    # A frozen task cannot die: SIGKILL would wait for the thaw.
                    self.ctr("task", "resume", row[0], namespace=ns, check=False, timeout=left())
            for row in rows:
                self.ctr("task", "delete", "-f", row[0], namespace=ns, check=False, timeout=left())
            r = self.ctr("containers", "ls", "-q", namespace=ns, check=False, timeout=left())
            ids = r.stdout.split() if r.returncode == 0 else []
            if ids:
                self.ctr("containers", "rm", *ids, namespace=ns, check=False, timeout=left())

    def _runc_cleanup(self) -> None:
        runc = shutil.which("runc", path=_search_path())
        if runc is None:
            return
        state = os.path.realpath(self.state) + "/"
        for ns in self.namespaces_used:
            root = RUNC_STATE_ROOT / ns
            if not root.is_dir():
                continue
            r = subprocess.run(
                [runc, "--root", str(root), "list", "--format", "json"],
                capture_output=True, text=True, timeout=20, check=False,
            )  # fmt: skip
            try:
                listed = json.loads(r.stdout or "null") or []
            except json.JSONDecodeError:
                listed = []
            for c in listed:
                bundle = os.path.realpath(c.get("bundle", "")) + "/"
                # Only containers whose bundle is ours: the namespace may be shared.
                if bundle.startswith(state):
                    subprocess.run(
                        [runc, "--root", str(root), "delete", "-f", c["id"]],
                        capture_output=True, timeout=20, check=False,
                    )  # fmt: skip

    def cleanup(self) -> None:
        """Undo everything, even after failures. Idempotent.

        1. via ctr, when the daemon answers: resume paused tasks, force-delete tasks,
           delete containers (each ctr call <= 10 s, 30 s in all);
        2. stop containerd (SIGTERM, then SIGKILL after 5 s), and any daemon running on
           our config file;
        3. ``runc delete -f`` leftover containers whose bundle is in our state dir;
        4. SIGKILL the shims whose command line holds our address, and the fork servers
           on our fork-server socket;
        5. SIGKILL what is left in our generated namespaces' cgroups (thawed first);
        6. remove the Go shim's sockets for our containers, unmount everything below our
           directory, remove it, our runc root dirs (if empty) and our empty cgroups.
        """
        if self._cleaned:
            return
        try:
            if self.is_running():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self._ctr_cleanup()
            self.stop(timeout=5)
            # Only processes not yet reaped: a reaped pid may belong to someone else now.
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
            # A daemon on our config that we did not start (cleanup_dir after a crash).
            kill_pids(processes_with_arg(str(self.config_path)))
            self._runc_cleanup()
            kill_pids(shims_for(self))
            kill_pids(self.forkservers())
            for ns in self.owned_namespaces:
                kill_cgroup_processes(ns)  # containers that runc no longer knows about
            for ns, cid in self.known_containers():
                sock = go_shim_socket(self.address, ns, cid)
                with contextlib.suppress(OSError):
                    if sock.is_socket():
                        sock.unlink()
            unmount_below(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            # Per-namespace leftovers only for namespaces nobody else can be using.
            for ns in self.owned_namespaces:
                with contextlib.suppress(OSError):
                    (RUNC_STATE_ROOT / ns).rmdir()  # only if empty
                remove_empty_cgroups(ns)
        finally:
            self._cleaned = True
            _LIVE.discard(self)

    def leftovers(self) -> list[str]:
        """What of this containerd still exists (for tests of the cleanup itself)."""
        found = []
        if any(proc.poll() is None for proc in self._procs):
            found.append(f"containerd pids {self.pids_started}")
        servers = self.forkservers()
        if servers:
            found.append(f"fork servers {servers}")
        shims = shims_for(self)
        if shims:
            found.append(f"shims {shims}")
        mps = mounts_below(self.dir)
        if mps:
            found.append(f"mounts {mps}")
        if self.dir.exists():
            found.append(f"dir {self.dir}")
        for ns in self.owned_namespaces:
            if (RUNC_STATE_ROOT / ns).exists():
                found.append(f"runc root {RUNC_STATE_ROOT / ns}")
            found.extend(f"cgroup {mp / ns}" for mp in cgroup_mountpoints() if (mp / ns).exists())
        return found


def _strs(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def cleanup_dir(path: str | Path) -> list[str]:
    """Clean up every ``sv-ctd-*`` instance dir at ``path`` or directly below it.

    For scripts whose process may have died before its own cleanup (the demo's trap).
    Returns the directories it cleaned.
    """
    top = Path(path)
    dirs = [top] if (top / "config.toml").exists() else sorted(top.glob("sv-ctd-*"))
    for d in dirs:
        Containerd(adopt_dir=d).cleanup()
    return [str(d) for d in dirs]


@atexit.register
def _cleanup_all() -> None:
    for c in list(_LIVE):
        with contextlib.suppress(Exception):
            c.cleanup()


# --------------------------------------------------------------------------- rootfs / image


def find_busybox() -> Path:
    """The static busybox binary (Debian's busybox-static: /bin/busybox)."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(cand, os.X_OK):
            return Path(cand)
    found = shutil.which("busybox")
    if found is None:
        raise HarnessError("busybox not installed (apt-get install busybox-static)")
    return Path(found)


PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\ntty:x:5:\nnogroup:x:65534:\n"


def build_busybox_rootfs(dest: str | Path, busybox: str | Path | None = None) -> Path:
    """Create a busybox rootfs in ``dest`` (must not exist or be empty) and return it.

    bin/busybox (copied from the static binary), relative symlinks for every applet
    (``busybox --list-full``), /etc/passwd, /etc/group, /etc/hostname, and the mount points
    ``ctr``'s default spec needs (/proc /dev /sys /run) plus /tmp /root /var.
    """
    src = Path(busybox) if busybox else find_busybox()
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "dev", "sys", "run",
              "root", "var", "home"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    shutil.copy2(src, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    listed = subprocess.run(
        [str(src), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in listed:
        link = root / rel
        if link.exists() or link.is_symlink() or rel == "bin/busybox":
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin" / "busybox", link.parent))
    (root / "etc" / "passwd").write_text(PASSWD, encoding="utf-8")
    (root / "etc" / "group").write_text(GROUP, encoding="utf-8")
    (root / "etc" / "hostname").write_text("busybox\n", encoding="utf-8")
    return root


def copy_rootfs(src: str | Path, dest: str | Path) -> Path:
    """A private, writable copy of a rootfs (symlinks kept as symlinks)."""
    shutil.copytree(src, dest, symlinks=True)
    return Path(dest)


def go_arch() -> str:
    """The machine's architecture in OCI/Go spelling (amd64, arm64, ...)."""
    m = platform.machine().lower()
    return {
        "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
        "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
        "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
    }.get(m, m)  # fmt: skip


def _tar_of_dir(root: Path) -> bytes:
    """Deterministic tar of a directory: sorted, uid/gid 0, mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
        for p in entries:
            info = tar.gettarinfo(str(p), arcname=p.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isreg():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


class OciImageTar(NamedTuple):
    path: Path
    ref: str


def build_oci_image_tar(
    path: str | Path,
    ref: str = DEFAULT_IMAGE_REF,
    *,
    rootfs: str | Path | None = None,
    entrypoint: Sequence[str] = ("/bin/busybox",),
    cmd: Sequence[str] = ("echo", "hello from image"),
    arch: str | None = None,
) -> OciImageTar:
    """Write a minimal OCI image layout tarball that ``ctr images import`` accepts.

    One gzip layer (the busybox rootfs, built in a temp dir unless ``rootfs`` is given),
    a config with ``entrypoint`` + ``cmd`` and ``PATH``, a manifest, ``oci-layout`` and
    ``index.json`` naming it ``ref`` (``org.opencontainers.image.ref.name`` and
    ``io.containerd.image.name``). With the default entrypoint ``/bin/busybox``,
    ``ctr run REF id`` prints "hello from image" and ``ctr run REF id sleep 60`` runs the
    applet, because ctr replaces the image's cmd with the given args.
    """
    with tempfile.TemporaryDirectory(prefix="sv-img-") as tmp:
        layer_root = Path(rootfs) if rootfs else build_busybox_rootfs(Path(tmp) / "rootfs")
        layer_tar = _tar_of_dir(layer_root)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    layer_gz = gzip.compress(layer_tar, mtime=0)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    arch = arch or go_arch()
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [IMAGE_PATH_ENV],
            "Entrypoint": list(entrypoint),
            "Cmd": list(cmd),
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "supervisor tests: busybox rootfs"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(_json(config), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(layer_gz, "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    mdesc = blob(_json(manifest), "application/vnd.oci.image.manifest.v1+json")
    mdesc["platform"] = {"architecture": arch, "os": "linux"}
    mdesc["annotations"] = {
        "org.opencontainers.image.ref.name": ref,
        "io.containerd.image.name": ref,
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [mdesc],
    }
    out = Path(path)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add_bytes(tar, "index.json", _json(index))
        for digest, data in sorted(blobs.items()):
            _add_bytes(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    return OciImageTar(out, ref)


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
