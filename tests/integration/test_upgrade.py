"""Issue 17's "Must show": ``supervisor upgrade --all`` re-execs running shims of a real
containerd (the system's 1.6, or ``$SUPERVISOR_TEST_CONTAINERD``) in place.

What every test here checks, through the command a user runs:

* the shim pids stay, ``shim.upgrades`` rises (``supervisor inspect --json``);
* numbered output lines arrive complete and in order -- to a FIFO (``ctr run`` in the
  foreground, read here), to a file (``--log-uri file://``) and from a terminal exec
  (``ctr task exec -t`` under ``script``: a pty) -- and kept flowing across the upgrade;
* every exit reaches containerd once (``ctr events``, or containerd's own "event
  forwarded" lines across an outage);
* containerd's log never says a shim disconnected (up to the first delete: containerd
  logs the same lines for every task deleted);
* the containers stay drivable afterwards (exec, kill, delete).

Not every test shows every stream: the first shows them all with containerd up (and a
shared shim, execs started all through); the outage tests (frozen: the Forward in flight
is handed over and answered once; down) a file and an exit meanwhile; the failure test
new code refused by the pre-flight check, then new code that fails once exec'd; the last
an older commit's package replaced by this one, the fork server retired and replaced.

Processes end when the test creates a stop file in the rootfs (``/stop-NAME``), never
after a time, so every exit falls where the test puts it.  Tests that change the installed
code use a private venv (tests/integration/installs.py); the others use the worktree's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import IMAGE_PATH_ENV, Containerd, pid_alive, shims_for, wait_for
from installs import BASE_ENV, PrivateInstall, previous_commit, use_install

from supervisor.launch import forkclient

#: What containerd (1.6 to 2.1) logs when a shim's connection drops and it cleans up.
DISCONNECTED = ("shim disconnected", "dead shim")
GROUP_SETTINGS = 'ShimGroup = "namespace"\nShimGroupSize = 2\n'


# --------------------------------------------------------------------------- helpers


def loop(name: str, code: int) -> list[str]:
    """A process printing ``NAME 1``, ``NAME 2``, ... until ``/stop-NAME`` exists, then
    ``NAME end``, exiting ``code``."""
    return ["sh", "-c", f"i=0; while [ ! -e /stop-{name} ]; do i=$((i+1)); echo {name} $i; "
                        f"sleep 0.1; done; echo {name} end; exit {code}"]


def stop(rootfs: Path, *names: str) -> None:
    for name in names:
        (rootfs / f"stop-{name}").touch()


def numbered(text: str, name: str) -> int:
    """How many of ``name``'s lines there are; each one whole, none lost or reordered."""
    numbers = [int(n) for n in re.findall(rf"^{name} (\d+)\r*$", text, re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1)), f"{name}: a line lost or reordered"
    return len(numbers)


def ended(text: str, name: str) -> bool:
    return text.rstrip().endswith(f"{name} end")


def cli(c: Containerd, *argv: str, python: str = sys.executable, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "supervisor.cli", *argv, "--state-dir", str(c.state),
                           "--namespace", c.namespace],
                          capture_output=True, text=True, timeout=timeout, check=False)


def shim_of(c: Containerd, cid: str) -> dict[str, Any]:
    r = cli(c, "inspect", cid, "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    shim: dict[str, Any] = json.loads(r.stdout)["shim"]
    return shim


def upgrade_all(c: Containerd, install: PrivateInstall | None = None
                ) -> tuple[int, dict[str, Any]]:
    """``supervisor upgrade --all --json`` (the install's own CLI for a private install)."""
    argv = ("upgrade", "--all", "--json", "--forkserver", c.forkserver_socket)
    r = install.supervisor(c, *argv) if install is not None else cli(c, *argv)
    assert "Traceback" not in r.stderr, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return r.returncode, doc


def no_disconnects(c: Containerd, since: int, until: int) -> None:
    """Between the log offsets ``since`` and ``until``: containerd logs the same lines for
    every task deleted (its connection for that task closes), so the window ends before
    the first delete."""
    text = c.log_text(since)[:until - since]
    said = [ln for ln in text.splitlines() if any(d in ln for d in DISCONNECTED)]
    assert said == [], said


def forwarded_exits(c: Containerd, since: int) -> int:
    """/tasks/exit events containerd accepted from this namespace's shims (its log)."""
    return sum(1 for ln in c.log_text(since).splitlines()
               if 'msg="event forwarded"' in ln and f"ns={c.namespace}" in ln
               and "topic=/tasks/exit" in ln)


def wait_gone(pid: int) -> None:
    wait_for(lambda: not pid_alive(pid), 20, message=f"process {pid} to exit")


class Reader(threading.Thread):
    """Everything a pipe says, kept as it arrives."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.data = bytearray()

    def run(self) -> None:
        while chunk := self.stream.read1(65536):
            self.data += chunk

    def text(self) -> str:
        return self.data.decode(errors="replace")


class Events:
    """``ctr events``, collected; the /tasks/exit ones counted per (container, process)."""

    def __init__(self, c: Containerd) -> None:
        self.proc = subprocess.Popen(c.ctr_argv("events"), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = Reader(self.proc.stdout)
        self.reader.start()

    def exits(self) -> Counter[tuple[str, str]]:
        found: Counter[tuple[str, str]] = Counter()
        for line in self.reader.text().splitlines():
            if " /tasks/exit " in line and "{" in line:
                body = json.loads(line[line.index("{"):])
                found[(body["container_id"], body["id"])] += 1
        return found

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Execs(threading.Thread):
    """``ctr task exec`` after ``ctr task exec`` into ``cid`` until stopped: each prints its
    id and exits with its number mod 5."""

    def __init__(self, c: Containerd, cid: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.c, self.cid, self.prefix = c, cid, prefix
        self.done: list[tuple[str, int, int, str, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            i += 1
            eid = f"{self.prefix}{i}"
            r = self.c.ctr("task", "exec", "--exec-id", eid, self.cid, "sh", "-c",
                           f"echo {eid}; exit {i % 5}", check=False, timeout=120)
            self.done.append((eid, i % 5, r.returncode, r.stdout, r.stderr))

    def finish(self, upgrade: tuple[int, int] = (0, 0)) -> list[tuple[str, str]]:
        """Stop, check every exec's output and status; the (container, exec id) of each.
        ``upgrade``: how many had ended when the upgrade began and when it ended."""
        self.halt.set()
        self.join(180)
        assert not self.is_alive()
        # The status must be right.  The output, as ctr shows it, may be missing: under
        # load a short exec now and then prints nothing through ctr -- reproduced with
        # main's code and no upgrade at all, so not this test's subject.  What it prints
        # must be whole.
        bad = [d for d in self.done if d[2] != d[1] or d[3] not in (f"{d[0]}\n", "")]
        assert bad == [], (bad, "upgrade between", upgrade)
        assert any(d[3] for d in self.done)
        return [(self.cid, d[0]) for d in self.done]


@pytest.fixture
def events_of() -> Iterator[Callable[[Containerd], Events]]:
    made: list[Events] = []

    def make(c: Containerd) -> Events:
        made.append(Events(c))
        return made[-1]

    yield make
    for e in made:
        e.stop()


@contextlib.contextmanager
def popen(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` with its output on a pipe; its stdin a pipe that stays open and silent
    (``script`` would type an end of file into the terminal -- echoed as ``^D`` -- at
    the end of a /dev/null)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


def check_upgraded(doc: dict[str, Any], shims: int) -> None:
    assert len(doc["shims"]) == shims, doc
    not_upgraded = [(s["containers"], s["error"]) for s in doc["shims"] if not s["upgraded"]]
    assert not_upgraded == [], not_upgraded


# --------------------------------------------------------------------------- tests


def test_upgrade_all_keeps_streams_execs_exits_and_a_shared_shim(
        make_containerd: Callable[..., Containerd], busybox_rootfs: Path, tmp_path: Path,
        events_of: Callable[[Containerd], Events]) -> None:
    c = make_containerd(start=False)
    use_install(c, None)
    c.start()
    since = c.log_offset()
    events = events_of(c)
    rootfs = busybox_rootfs
    log = tmp_path / "file.log"
    settings = tmp_path / "group.toml"
    settings.write_text(GROUP_SETTINGS)
    group = ["--runtime-config-path", str(settings)]
    fifo_argv = c.ctr_argv("run", "--runtime", c.runtime, "--fifo-dir", str(c.fifo_dir),
                           "--env", IMAGE_PATH_ENV, "--rootfs", str(rootfs), "fifo",
                           *loop("fifo", 3))
    tty_argv = c.ctr_argv("task", "exec", "-t", "--exec-id", "tty", "file", *loop("tty", 6))
    with popen(fifo_argv) as fifo_run:
        fifo = Reader(fifo_run.stdout)
        fifo.start()
        c.run("file", *loop("file", 4), rootfs=rootfs, detach=True,
              options=["--log-uri", f"file://{log}"])
        c.run("g1", *loop("g1", 5), rootfs=rootfs, detach=True, options=group)
        c.run("g2", "sleep", "1000", rootfs=rootfs, detach=True, options=group)
        with popen(["script", "-qfec", shlex.join(tty_argv), "/dev/null"]) as tty_run:
            tty = Reader(tty_run.stdout)
            tty.start()
            wait_for(lambda: numbered(fifo.text(), "fifo") >= 2
                     and numbered(tty.text(), "tty") >= 2
                     and log.exists() and numbered(log.read_text(), "file") >= 2, 30,
                     message="output from the FIFO, the file and the terminal")
            ids = ("fifo", "file", "g1", "g2")
            before = {cid: shim_of(c, cid) for cid in ids}
            assert before["g1"]["pid"] == before["g2"]["pid"]  # one shim, two containers
            pids = sorted(shims_for(c))
            assert len(pids) == 3 and sorted({s["pid"] for s in before.values()}) == pids
            wait_for(lambda: os.path.exists(c.forkserver_socket), 30, message="a fork server")
            execs = [Execs(c, "g2", "e"), Execs(c, "file", "f")]
            for x in execs:
                x.start()
            wait_for(lambda: all(x.done for x in execs), 60, message="execs running")
            seen = {"fifo": numbered(fifo.text(), "fifo"), "tty": numbered(tty.text(), "tty"),
                    "file": numbered(log.read_text(), "file")}

            began = [len(x.done) for x in execs]
            code, doc = upgrade_all(c)

            check_upgraded(doc, 3)
            assert code == 0, doc
            assert sorted(s["containers"] for s in doc["shims"]) == sorted(
                [[f"{c.namespace}/fifo"], [f"{c.namespace}/file"],
                 [f"{c.namespace}/g1", f"{c.namespace}/g2"]])
            # The fork server runs the installed code: kept.
            assert doc["forkserver"] is not None and doc["forkserver"]["action"] == "kept"
            assert sorted(shims_for(c)) == pids
            for cid in ids:
                after = shim_of(c, cid)
                assert after["pid"] == before[cid]["pid"]
                assert after["upgrades"] == before[cid]["upgrades"] + 1
                assert after["upgrade_attempts"] == before[cid]["upgrade_attempts"] + 1
                assert after["last_upgrade_error"] is None and after["upgraded_at"]
            # Execs go on being started and output goes on flowing, then everything ends.
            done = [len(x.done) for x in execs]
            between = {x.prefix: (b, n) for x, b, n in zip(execs, began, done, strict=True)}
            wait_for(lambda: all(len(x.done) > n for x, n in zip(execs, done, strict=True)),
                     60, message="execs after the upgrade")
            for name, text in (("fifo", fifo.text), ("tty", tty.text), ("file", log.read_text)):
                wait_for(lambda name=name, text=text: numbered(text(), name) > seen[name], 30,
                         message=f"{name}'s output after the upgrade (it had {seen[name]} "
                                 f"lines then; now ends {text()[-120:]!r})")
            exec_ids = [key for x in execs for key in x.finish(between[x.prefix])]
            stop(rootfs, "tty")  # before its container's init: that one's end kills it
            assert tty_run.wait(60) == 6
            tty.join(30)
            quiet = c.log_offset()  # ctr run deletes its task once it ends
            stop(rootfs, "fifo", "file", "g1")
        assert fifo_run.wait(60) == 3
        fifo.join(30)
    for name, text in (("fifo", fifo.text()), ("tty", tty.text())):
        numbered(text, name)
        assert ended(text, name), text[-200:]
    wait_for(lambda: ended(log.read_text(), "file"), 30, message="the file's last line")
    numbered(log.read_text(), "file")

    # Still drivable: exec, kill, delete.
    for cid in ("file", "g1"):
        wait_for(lambda cid=cid: c.tasks()[cid][1] == "STOPPED", 30, message=f"{cid} STOPPED")
    r = c.ctr("task", "exec", "--exec-id", "last", "g2", "sh", "-c", "echo last; exit 2",
              check=False)
    assert (r.returncode, r.stdout) == (2, "last\n")
    c.ctr("task", "kill", "-s", "SIGKILL", "g2")
    wait_for(lambda: c.tasks()["g2"][1] == "STOPPED", 30, message="g2 STOPPED")
    expected = {(cid, cid) for cid in ids} | {("file", "tty"), ("g2", "last")} | set(exec_ids)
    wait_for(lambda: set(events.exits()) >= expected, 30, message="every exit in ctr events")
    for cid in ("file", "g1", "g2"):  # ctr run in the foreground deleted its own
        c.ctr("task", "delete", cid)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, message="the shims to exit")
    exits = events.exits()
    assert set(exits) == expected and set(exits.values()) == {1}, exits
    no_disconnects(c, since, quiet)


def outage_setup(c: Containerd, rootfs: Path, log: Path, leaving: str, code: int
                 ) -> tuple[dict[str, tuple[int, str]], dict[str, dict[str, Any]], list[int]]:
    """``keep`` (output to ``log``) and ``leaving`` (ends with ``code`` when told), each in a
    shim of its own: the tasks, their shims' inspect answers, the shim pids."""
    c.run("keep", *loop("keep", 0), rootfs=rootfs, detach=True,
          options=["--log-uri", f"file://{log}"])
    c.run(leaving, *loop(leaving, code), rootfs=rootfs, detach=True)
    return (c.tasks(), {cid: shim_of(c, cid) for cid in ("keep", leaving)},
            sorted(shims_for(c)))


def outage_after(c: Containerd, rootfs: Path, log: Path, leaving: str,
                 before: dict[str, dict[str, Any]], pids: list[int], since: int) -> None:
    """Once containerd is back: same shims, one more upgrade, drivable, output whole,
    no disconnect; each of the three exits (``leaving``, an exec, ``keep``) forwarded once."""
    wait_for(lambda: c.tasks()[leaving][1] == "STOPPED", 30, message=f"{leaving} STOPPED")
    assert sorted(shims_for(c)) == pids
    for cid in ("keep", leaving):
        after = shim_of(c, cid)
        assert (after["pid"], after["upgrades"]) == (before[cid]["pid"],
                                                      before[cid]["upgrades"] + 1)
    r = c.ctr("task", "exec", "--exec-id", "x", "keep", "sh", "-c", "echo x; exit 1",
              check=False)
    assert (r.returncode, r.stdout) == (1, "x\n")
    stop(rootfs, "keep")
    wait_for(lambda: c.tasks()["keep"][1] == "STOPPED", 30, message="keep STOPPED")
    quiet = c.log_offset()
    for cid in (leaving, "keep"):
        c.ctr("task", "delete", cid)  # ctr warns of a non-zero code, exits 0
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, message="the shims to exit")
    numbered(log.read_text(), "keep")
    assert ended(log.read_text(), "keep")
    no_disconnects(c, since, quiet)
    assert forwarded_exits(c, since) == 3


def test_upgrade_while_containerd_is_frozen(
        make_containerd: Callable[..., Containerd], busybox_rootfs: Path, tmp_path: Path
) -> None:
    """containerd stopped (SIGSTOP): its connections stay open and unread while an exit
    happens and the shims upgrade."""
    c = make_containerd(start=False)
    use_install(c, None)
    c.start()
    since = c.log_offset()
    log = tmp_path / "keep.log"
    tasks, before, pids = outage_setup(c, busybox_rootfs, log, "froze", 7)
    assert c.pid is not None
    os.kill(c.pid, signal.SIGSTOP)
    try:
        stop(busybox_rootfs, "froze")
        wait_gone(tasks["froze"][0])
        code, doc = upgrade_all(c)
    finally:
        os.kill(c.pid, signal.SIGCONT)
    check_upgraded(doc, 2)
    assert code == 0, doc
    outage_after(c, busybox_rootfs, log, "froze", before, pids, since)


def test_upgrade_while_containerd_is_down(
        make_containerd: Callable[..., Containerd], busybox_rootfs: Path, tmp_path: Path
) -> None:
    """containerd killed: no connection at all while an exit happens and the shims
    upgrade; then it comes back."""
    c = make_containerd(start=False)
    use_install(c, None)
    c.start()
    since = c.log_offset()
    log = tmp_path / "keep.log"
    tasks, before, pids = outage_setup(c, busybox_rootfs, log, "down", 9)
    c.kill9()
    stop(busybox_rootfs, "down")
    wait_gone(tasks["down"][0])
    code, doc = upgrade_all(c)
    check_upgraded(doc, 2)
    assert code == 0, doc
    c.start()
    outage_after(c, busybox_rootfs, log, "down", before, pids, since)


def snapshot_made(c: Containerd) -> bool:
    """Whether a shim has made the copy of its code it falls back to (issue 17's codesnap)."""
    return any((c.dir / "code").glob("*.pyz"))


def test_new_code_that_fails_to_start_leaves_the_shim_on_its_old_code(
        make_containerd: Callable[..., Containerd], busybox_rootfs: Path, tmp_path: Path
) -> None:
    install = PrivateInstall(tmp_path / "venv")
    install.install_worktree()
    c = make_containerd(start=False)
    use_install(c, install)
    c.start()
    since = c.log_offset()
    rootfs = busybox_rootfs
    log = tmp_path / "f.log"
    c.run("f1", *loop("f1", 0), rootfs=rootfs, detach=True,
          options=["--log-uri", f"file://{log}"])
    before = shim_of(c, "f1")
    assert before["code"] == install.code_identity()
    wait_for(lambda: snapshot_made(c), 30, message="the shim's copy of its code")

    # A release that cannot even be imported: the shim's pre-flight refuses it.
    install.append("supervisor/daemon.py", "raise ImportError('injected: a broken release')\n")
    code, doc = upgrade_all(c, install)
    assert code == 1
    [shim] = doc["shims"]
    assert not shim["upgraded"] and "injected: a broken release" in shim["error"], shim
    after = shim_of(c, "f1")
    assert (after["pid"], after["upgrades"], after["code"]) == (
        before["pid"], before["upgrades"], before["code"])

    # A release that imports but fails once exec'd: the shim execs its old code back.
    attempts = after["upgrade_attempts"]
    install.install_worktree()
    install.append("supervisor/daemon.py",
                   "import sys as _sv_sys\n"
                   "if '--adopt' in _sv_sys.argv:\n"
                   "    raise RuntimeError('injected: the new code fails to start')\n")
    code, doc = upgrade_all(c, install)
    assert code == 1
    [shim] = doc["shims"]
    assert not shim["upgraded"] and "injected: the new code fails to start" in shim["error"]
    after = shim_of(c, "f1")
    assert (after["pid"], after["upgrades"], after["code"]) == (
        before["pid"], before["upgrades"], before["code"])
    assert after["upgrade_attempts"] == attempts + 1
    assert "injected: the new code fails to start" in after["last_upgrade_error"]
    r = c.ctr("task", "exec", "--exec-id", "x", "f1", "echo", "alive")
    assert r.stdout == "alive\n"

    # A good release then upgrades it.
    install.install_worktree()
    code, doc = upgrade_all(c, install)
    assert code == 0, doc
    after = shim_of(c, "f1")
    assert (after["pid"], after["upgrades"]) == (before["pid"], before["upgrades"] + 1)
    assert after["last_upgrade_error"] is None

    stop(rootfs, "f1")
    wait_for(lambda: c.tasks()["f1"][1] == "STOPPED", 30, message="f1 STOPPED")
    quiet = c.log_offset()
    c.ctr("task", "delete", "f1")
    numbered(log.read_text(), "f1")
    assert ended(log.read_text(), "f1")
    wait_for(lambda: not pid_alive(before["pid"]), 30, message="the shim to exit")
    no_disconnects(c, since, quiet)


def upgrade_base(config: pytest.Config) -> str | None:
    given = config.getoption("--upgrade-base", None) or os.environ.get(BASE_ENV)
    return str(given) if given else previous_commit()


def test_upgrade_from_the_previous_commits_installed_package(
        request: pytest.FixtureRequest, make_containerd: Callable[..., Containerd],
        busybox_rootfs: Path, tmp_path: Path) -> None:
    base = upgrade_base(request.config)
    if base is None:
        pytest.skip("no commit before HEAD has supervisor/upgrade.py: no previous package "
                    f"to upgrade from (name one with --upgrade-base or ${BASE_ENV})")
    install = PrivateInstall(tmp_path / "venv")
    install.install_commit(base, tmp_path)
    old = install.code_identity()
    c = make_containerd(start=False)
    use_install(c, install)
    c.start()
    since = c.log_offset()
    rootfs = busybox_rootfs
    log = tmp_path / "p.log"
    c.run("p1", *loop("p1", 0), rootfs=rootfs, detach=True,
          options=["--log-uri", f"file://{log}"])
    c.run("p2", "sleep", "1000", rootfs=rootfs, detach=True)
    before = {cid: shim_of(c, cid) for cid in ("p1", "p2")}
    assert {s["code"] for s in before.values()} == {old}, (base, before)
    wait_for(lambda: snapshot_made(c), 30, message="the shims' copies of their code")
    fork_server = wait_for(lambda: os.path.exists(c.forkserver_socket)
                           and forkclient.status(c.forkserver_socket), 30,
                           message="the previous package's fork server")

    install.install_worktree()
    new = install.code_identity()
    assert new != old
    r = install.supervisor(c, "ls", "--json")
    assert {row["other_code"] for row in json.loads(r.stdout)["containers"]} == {True}

    code, doc = upgrade_all(c, install)

    check_upgraded(doc, 2)
    assert code == 0, doc
    assert {(s["from_code"], s["code"]) for s in doc["shims"]} == {(old, new)}
    assert doc["forkserver"]["action"] == "retired", doc["forkserver"]
    wait_gone(fork_server["pid"])
    for cid in ("p1", "p2"):
        after = shim_of(c, cid)
        assert (after["pid"], after["code"], after["upgrades"]) == (
            before[cid]["pid"], new, before[cid]["upgrades"] + 1)
    r = install.supervisor(c, "ls", "--json")
    assert {row["other_code"] for row in json.loads(r.stdout)["containers"]} == {False}
    r = c.ctr("task", "exec", "--exec-id", "x", "p2", "echo", "new")
    assert r.stdout == "new\n"
    quiet = c.log_offset()  # p3's --rm deletes it
    # The next start spawns a fork server of the new code.
    assert c.run("p3", "echo", "p3", rootfs=rootfs, rm=True).stdout == "p3\n"
    wait_for(lambda: os.path.exists(c.forkserver_socket)
             and forkclient.status(c.forkserver_socket)["code"] == new, 30,
             message="a fork server of the new code")

    stop(rootfs, "p1")
    c.ctr("task", "kill", "-s", "SIGKILL", "p2")
    for cid in ("p1", "p2"):
        wait_for(lambda cid=cid: c.tasks()[cid][1] == "STOPPED", 30, message=f"{cid} STOPPED")
        c.ctr("task", "delete", cid)
    numbered(log.read_text(), "p1")
    assert ended(log.read_text(), "p1")
    no_disconnects(c, since, quiet)
