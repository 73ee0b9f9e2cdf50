"""Prototype of issue 16's split design, measured side by side with the Go shim.

    .venv/bin/python bench/split_prototype.py [--counts 10,50] [--child runc|sleep]
                                              [--no-today] [--markdown-out FILE]

The design: the process each container gets (the *holder*, ``bench/split_holder.py``)
holds only what must outlive everything: it is the child subreaper of the container, holds
its stdout/stderr pipes and copies them out (plain ``poll`` loop), writes the exit record
and answers a tiny control socket; it imports no trio and no protobuf.  The rest would be a
shared *manager*, one per namespace, speaking ttrpc to containerd and driving the holders.
The decision and the failure story are in docs/benchmarks.md, "The split design,
prototyped"; this script is the evidence, not product code.

What runs (root; one private containerd from ``tests/integration/harness.py`` through
``bench/compare``'s ``Bench``, which builds the busybox rootfs and cleans up):

* Go: ``--counts`` idle ``sleep`` containers through ``ctr run -d`` with
  containerd-shim-runc-v2, as ``bench/compare``'s memory metric starts them.
* today (unless ``--no-today``): as many through our shim, a shim per container, forked
  from the fork server that the first ``start`` spawns on demand (what a new user gets);
  the fork server's Pss is shared out over the containers.
* split, forked: holders forked by a *zygote* (``split_holder.py zygote``: a
  ``python -I -S`` that imported the holder module, ``gc.freeze()``, double fork and new
  session per holder, as ``supervisor-forkserver`` forks shims), attached to one manager.
* split, cold: holders started as ``python -I -S`` each (minimal imports), attached to a
  second manager.
* Each holder runs its container with runc itself (``--child runc``, the default:
  ``runc create`` with the holder's pipes as stdio, then ``runc start``; the init is
  re-parented to the holder, its subreaper), or a plain ``sleep`` child (``--child sleep``:
  enough for memory, since a holder's memory does not depend on its child).
* The manager (``split_prototype.py manager``) is a cold interpreter that imports
  ``supervisor.daemon`` (trio, protobuf, the Task service: what a shim daemon carries),
  serves a ttrpc server (one demo method) whose connections it hands to a holder to keep,
  and holds connections to each holder, a task waiting for the holder's end.  It does no
  real containerd work: its memory is a floor.

``split_prototype.py reattach DIR`` (no root, no containerd) shows the failure story's
claim: a ttrpc client's connection outlives a SIGKILL of the manager, because the holder
keeps a duplicate of it, and a new manager that re-attaches answers the next call on it
(:func:`reattach_demo`, run by tests/unit/test_bench_split_holder.py).

Memory is ``bench/compare``'s measure (``smaps_rollup_kib``: ``Pss`` and ``Private_Dirty``
of each process), per container: a holder's figure, plus its manager's divided by the
containers it serves, plus (forked) the zygote's likewise; for today's layout the shim's
figure plus the fork server's share.  Also the time from asking for a holder to its control
socket's first answer, forked and cold.  Speed is only reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import marshal
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOLDER_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); import split_holder; "
               "split_holder.main(sys.argv[2:])")  # fmt: skip
MIB = 1024.0
TODAY = "today: forked shim + fork server's share"
SPLIT_ALONE = {"forked": "split forked: holder alone", "cold": "split cold: holder alone"}
SPLIT_SHARED = {"forked": "split forked: holder + manager's + zygote's shares",
                "cold": "split cold: holder + manager's share"}


def ask(path: str | Path, request: str, timeout: float = 10.0) -> str:
    """One request, one answer on a ``SOCK_SEQPACKET`` control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.send(request.encode())
        return s.recv(4096).decode()


def wait_answer(path: Path, request: str, ok: Callable[[str], bool], limit: float = 30.0) -> str:
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(OSError):
            answer = ask(path, request)
            if ok(answer):
                return answer
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no answer to {request!r} in {limit} s")
        time.sleep(0.005)


# --------------------------------------------------------------------------- the manager


def manager_main(ctl_path: str, ttrpc_path: str) -> None:
    """One per namespace: a ttrpc server for containerd and a connection per holder it
    drives.  On ``ctl_path``: ``attach DIR`` attaches a holder (answers its status) and
    takes back the containerd connections it kept for a dead manager; ``count`` answers
    how many holders are attached.  Each connection accepted on ``ttrpc_path`` is handed
    (a duplicate fd) to the last attached holder, which keeps it open; the ttrpc server
    has one service, ``split.Demo`` with ``Pid`` (answers this manager's pid)."""
    import trio  # noqa: PLC0415 (only the manager carries these)

    import supervisor.daemon  # noqa: F401, PLC0415 (its whole import weight, as a shim daemon)
    from supervisor import ttrpc  # noqa: PLC0415

    holders: dict[str, trio.socket.SocketType] = {}
    keeper: list[trio.socket.SocketType] = []  # the holder that keeps new connections
    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS)

    async def pid(ctx: ttrpc.CallContext, payload: bytes) -> bytes:
        return str(os.getpid()).encode()

    async def watch(state_dir: str, conn: trio.socket.SocketType) -> None:
        with conn:
            while await conn.recv(256):
                pass
        holders.pop(state_dir, None)  # the holder is gone: a real manager reports the exit

    async def call(h: trio.socket.SocketType, request: bytes) -> tuple[str, list[int]]:
        await h.send(request)
        data, ancdata, _, _ = await h.recvmsg(256, socket.CMSG_SPACE(4 * 64))
        fds = [int.from_bytes(d[i:i + 4], sys.byteorder, signed=True)
               for level, kind, d in ancdata if (level, kind) == rights
               for i in range(0, len(d) - 3, 4)]  # fmt: skip
        return data.decode(), fds

    async def attach(state_dir: str, nursery: trio.Nursery, server: ttrpc.Server) -> str:
        h = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await h.connect(os.path.join(state_dir, "ctl"))
        status, _ = await call(h, b"status")
        _, fds = await call(h, b"give")  # connections kept for a dead manager
        for fd in fds:
            sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
            nursery.start_soon(server.serve_stream, trio.SocketStream(sock))
        holders[state_dir] = h
        keeper[:] = [h]
        # A second connection for the watch: the first one stays for requests.
        w = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await w.connect(os.path.join(state_dir, "ctl"))
        nursery.start_soon(watch, state_dir, w)
        return f"{status} kept {len(fds)}"

    async def accept_loop(listener: trio.SocketListener, server: ttrpc.Server,
                          nursery: trio.Nursery) -> None:  # fmt: skip
        while True:
            stream = await listener.accept()
            if keeper:
                fd = stream.socket.fileno().to_bytes(4, sys.byteorder, signed=True)
                await keeper[0].sendmsg([b"keep"], [(*rights, fd)])
                await keeper[0].recv(256)
            nursery.start_soon(server.serve_stream, stream)

    async def main() -> None:
        server = ttrpc.Server()
        server.register("split.Demo", {"Pid": pid})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ttrpc_path)  # a dead manager's
        listener = await ttrpc.open_unix_listener(ttrpc_path)
        ctl = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await ctl.bind(ctl_path)
        ctl.listen(64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, listener, server, nursery)
            while True:
                conn, _ = await ctl.accept()
                with conn:
                    words = (await conn.recv(4096)).decode().split(" ", 1)
                    if words[0] == "attach" and len(words) == 2:
                        answer = await attach(words[1], nursery, server)
                    elif words[0] == "count":
                        answer = str(len(holders))
                    else:
                        answer = "error bad request"
                    await conn.send(answer.encode())

    trio.run(main)


def reattach_demo(work: Path) -> dict[str, int]:
    """A ttrpc client (ours, standing in for containerd) keeps its connection through a
    SIGKILL of the manager and is answered by a new one that re-attached to the holder.

    Returns the pids: ``first`` and ``second`` manager, and who answered ``before`` and
    ``after`` the kill on the one connection.  No root, no containerd (a ``sleep`` holder).
    """
    import trio  # noqa: PLC0415

    from supervisor import ttrpc  # noqa: PLC0415

    state = work / "holder"
    state.mkdir(parents=True)
    with open(state / "spec", "wb") as f:
        marshal.dump({"argv": ["sleep", "1000000"], "stdout": str(state / "out"),
                      "stderr": str(state / "err")}, f)  # fmt: skip
    ctl, address = work / "manager.sock", work / "manager.ttrpc"
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        return procs[-1]

    def manager() -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            ctl.unlink()
        p = start([sys.executable, str(Path(__file__).resolve()), "manager", str(ctl),
                   str(address)])  # fmt: skip
        wait_answer(ctl, "count", lambda a: True)
        if not ask(ctl, f"attach {state}").startswith("running "):
            raise RuntimeError("the manager could not attach the holder")
        return p

    start([sys.executable, "-I", "-S", "-c", HOLDER_BOOT, str(HERE), "holder", str(state)])
    out: dict[str, int] = {}
    try:
        wait_answer(state / "ctl", "status", lambda a: a.startswith("running "))
        first = manager()
        out["first"] = first.pid

        async def client_side() -> None:
            client = await ttrpc.connect_unix(address)
            out["before"] = int(await client.call("split.Demo", "Pid", b"", timeout=10))
            first.kill()
            first.wait()
            out["second"] = (await trio.to_thread.run_sync(manager)).pid
            out["after"] = int(await client.call("split.Demo", "Pid", b"", timeout=10))
            await client.aclose()

        trio.run(client_side)
        out["holder_running"] = int(ask(state / "ctl", "status").startswith("running "))
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            ask(state / "ctl", "kill 9")  # the holder's sleep
            wait_answer(state / "ctl", "status", lambda a: a.startswith("exited "), 10)
        for p in procs:
            p.kill()
            p.wait()
    return out


# --------------------------------------------------------------------------- measurement


class Split:
    """The split layout's processes for one run: zygote, managers, holders, runc state."""

    def __init__(self, work: Path, rootfs: Path, cgroup_parent: str, child: str) -> None:
        self.work = work
        self.rootfs = rootfs
        self.cgroup_parent = cgroup_parent
        self.child = child
        self.runc_root = work / "runc"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.holders: dict[str, list[Path]] = {"forked": [], "cold": []}
        self.ready_ms: dict[str, list[float]] = {"forked": [], "cold": []}
        self.runc_ids: list[str] = []
        self.template: dict[str, object] = {}

    def start(self) -> None:
        self.work.mkdir(parents=True)
        spec_dir = self.work / "spec"
        spec_dir.mkdir()
        subprocess.run(["runc", "spec"], cwd=spec_dir, check=True)
        self.template = json.loads((spec_dir / "config.json").read_text())
        self.zygote = self.work / "zygote.sock"
        self.zygote_pid = self.spawn([sys.executable, "-I", "-S", "-c", HOLDER_BOOT,
                                      str(HERE), "zygote", str(self.zygote)]).pid
        self.managers = {kind: self.work / f"manager-{kind}.sock" for kind in self.holders}
        self.manager_pids: dict[str, int] = {}
        for kind, sock in self.managers.items():
            self.manager_pids[kind] = self.spawn(
                [sys.executable, str(Path(__file__).resolve()), "manager", str(sock),
                 str(self.work / f"manager-{kind}.ttrpc")]).pid  # fmt: skip
        for sock in (self.zygote, *self.managers.values()):
            deadline = time.monotonic() + 30
            while not sock.is_socket():
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"{sock} did not appear")
                time.sleep(0.02)

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.work / "processes.log", "ab") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)  # fmt: skip
        self.procs.append(p)
        return p


    def add(self, kind: str) -> None:
        """One more holder of ``kind`` ("forked" or "cold"), running its container."""
        n = len(self.holders[kind]) + 1
        cid = f"split-{kind}-{n}"
        state = self.work / cid
        state.mkdir()
        spec: dict[str, object] = {"stdout": str(state / "stdout"),
                                   "stderr": str(state / "stderr")}  # fmt: skip
        if self.child == "runc":
            bundle = state / "bundle"
            bundle.mkdir()
            config = json.loads(json.dumps(self.template))
            config["process"]["args"] = ["sleep", "1000000"]
            config["process"]["terminal"] = False
            config["root"] = {"path": str(self.rootfs), "readonly": True}
            config["linux"]["cgroupsPath"] = f"{self.cgroup_parent}/{cid}"
            (bundle / "config.json").write_text(json.dumps(config))
            pid_file = str(state / "init.pid")
            runc = ["runc", "--root", str(self.runc_root)]
            spec |= {"argv": [*runc, "create", "--bundle", str(bundle), "--pid-file",
                              pid_file, cid],
                     "then": [*runc, "start", cid], "pid_file": pid_file}  # fmt: skip
            self.runc_ids.append(cid)
        else:
            spec["argv"] = ["sleep", "1000000"]
        with open(state / "spec", "wb") as f:
            marshal.dump(spec, f)
        self.holders[kind].append(state)
        t0 = time.perf_counter()
        if kind == "forked":
            answer = ask(self.zygote, str(state))
            if answer != "ok":
                raise RuntimeError(f"zygote: {answer}")
        else:
            self.spawn([sys.executable, "-I", "-S", "-c", HOLDER_BOOT, str(HERE), "holder",
                        str(state)])  # fmt: skip
        wait_answer(state / "ctl", "status", lambda a: True)
        self.ready_ms[kind].append((time.perf_counter() - t0) * 1000)
        wait_answer(state / "ctl", "status", lambda a: a.startswith("running "))
        answer = ask(self.managers[kind], f"attach {state}")
        if not answer.startswith("running "):
            raise RuntimeError(f"manager attach {state}: {answer}")

    def holder_pids(self, kind: str) -> list[int]:
        return [int(ask(state / "ctl", "status").split()[1]) for state in self.holders[kind]]

    def cleanup(self) -> None:
        pids = []
        for states in self.holders.values():
            for state in states:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    pids.append(int(ask(state / "ctl", "status", timeout=2).split()[1]))
                    ask(state / "ctl", "kill 9", timeout=2)  # the init, runc's or a sleep
        for cid in self.runc_ids:
            subprocess.run(["runc", "--root", str(self.runc_root), "delete", "-f", cid],
                           capture_output=True, timeout=30, check=False)  # fmt: skip
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["manager"] and len(args) == 3:
        manager_main(args[1], args[2])
        return 0
    if args[:1] == ["reattach"] and len(args) == 2:
        print(reattach_demo(Path(args[1])))
        return 0
    p = argparse.ArgumentParser(prog="bench/split_prototype.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="10,50", help="idle containers per layout, rising")
    p.add_argument("--child", choices=("runc", "sleep"), default="runc")
    p.add_argument("--no-today", action="store_true", help="leave out our shim of today")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--markdown-out", type=Path)
    opts = p.parse_args(args)
    counts = [int(n) for n in opts.counts.split(",")]
    return measure(opts, counts, shlex.join(["bench/split_prototype.py", *args]))


def measure(opts: argparse.Namespace, counts: list[int], command: str) -> int:
    sys.path.insert(0, str(HERE))
    import compare  # noqa: PLC0415 (its harness and measure; not needed by the manager)
    from compare import Row, markdown_table, smaps_rollup_kib  # noqa: PLC0415

    from supervisor.launch import forkclient  # noqa: PLC0415

    started = time.monotonic()
    bench = compare.Bench(compare.parse_args(["--only", "memory"]))
    rows: dict[str, Row] = {}
    facts: list[str] = []

    def row(metric: str, unit: str = "MiB") -> Row:
        return rows.setdefault(metric, Row(metric, unit, "lower"))

    split: Split | None = None
    ids: dict[str, list[str]] = {"ours": [], "go": []}
    try:
        bench.log(f"containerd in {bench.c.dir}, namespace {bench.c.namespace}")
        bench.start()
        split = Split(bench.c.dir / "split", bench.rootfs, f"/{bench.c.namespace}", opts.child)
        split.start()
        runtimes = ["go"] if opts.no_today else ["ours", "go"]
        for count in counts:
            todo: list[str] = []
            while len(ids["go"]) < count:
                for which in runtimes:
                    cid = bench.new_id(which, "idle")
                    ids[which].append(cid)
                    todo.append(f"{which}|{cid}")
                todo += ["split|forked", "split|cold"]
            bench.log(f"  starting {len(todo)} containers (to {count} per layout)")

            def one(key: str) -> None:
                which, name = key.split("|")
                if which == "split":
                    split.add(name)
                else:
                    bench.start_idle(which, name)

            # Holders are added one at a time per kind (their ids count up), the rest in
            # parallel as bench/compare does.
            bench.parallel(one, [k for k in todo if not k.startswith("split|")], 4)
            bench.parallel(one, [k for k in todo if k.startswith("split|")], 1)
            time.sleep(opts.settle)
            roll: Callable[[int], dict[str, int]] = smaps_rollup_kib
            pids = bench.shim_pids()
            go = [roll(pids[cid]) for cid in ids["go"]]
            for metric in ("Pss", "Private_Dirty"):
                for name in (TODAY, *SPLIT_SHARED.values(), *SPLIT_ALONE.values()):
                    if name.startswith("today") and opts.no_today:
                        continue
                    row(f"{name}, {metric}, {count} containers").go += \
                        [r[metric] / MIB for r in go]
            mgr = {kind: roll(pid) for kind, pid in split.manager_pids.items()}
            zyg = roll(split.zygote_pid)
            line = [f"- {count} containers: manager Pss {mgr['forked']['Pss'] / MIB:.1f} / "
                    f"{mgr['cold']['Pss'] / MIB:.1f} MiB (forked set / cold set), Private_Dirty"
                    f" {mgr['forked']['Private_Dirty'] / MIB:.1f} / "
                    f"{mgr['cold']['Private_Dirty'] / MIB:.1f}; zygote Pss "
                    f"{zyg['Pss'] / MIB:.2f} MiB, Private_Dirty {zyg['Private_Dirty'] / MIB:.2f}"]
            for metric in ("Pss", "Private_Dirty"):
                for kind in ("forked", "cold"):
                    share = mgr[kind][metric] / count
                    if kind == "forked":
                        share += zyg[metric] / count
                    holders = [roll(pid)[metric] for pid in split.holder_pids(kind)]
                    alone = row(f"{SPLIT_ALONE[kind]}, {metric}, {count} containers")
                    alone.ours += [h / MIB for h in holders]
                    both = row(f"{SPLIT_SHARED[kind]}, {metric}, {count} containers")
                    both.ours += [(h + share) / MIB for h in holders]
                if not opts.no_today:
                    status = forkclient.status(bench.c.forkserver_socket)
                    server = roll(status["pid"])
                    today = row(f"{TODAY}, {metric}, {count} containers")
                    today.ours += [(roll(pids[cid])[metric] + server[metric] / count) / MIB
                                   for cid in ids["ours"]]  # fmt: skip
                    if metric == "Pss":
                        line.append(f"  fork server (on demand, {status['served']} shims "
                                    f"forked; the first starts went cold) Pss "
                                    f"{server['Pss'] / MIB:.1f} MiB, Private_Dirty "
                                    f"{server['Private_Dirty'] / MIB:.1f}")
            facts += line
        for kind in ("forked", "cold"):
            row(f"split {kind}: holder ready (request → control socket answers)", "ms").ours \
                += split.ready_ms[kind]
    finally:
        bench.log("cleaning up")
        if split is not None:
            split.cleanup()
        bench.parallel(bench.remove, ids["ours"] + ids["go"], 4)
        bench.cleanup()
    order = list(rows.values())
    text = "\n".join([
        "## The split design, prototyped: idle memory per container (ours/Go)", "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, duration "
        f"{time.monotonic() - started:.0f} s, load average at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- Python {sys.version.split()[0]}; holders' child: {opts.child}", *facts, "",
        markdown_table(order), "",
        "Medians over the containers; ratio = ours/Go on the medians; the Go column is the "
        "same Go shims on every row of a count.", "",
    ])  # fmt: skip
    print(text)
    if opts.markdown_out:
        opts.markdown_out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
