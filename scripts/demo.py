"""The `make demo` walk-through (run by scripts/demo.sh, as root).

Starts a private containerd (its own root, state, sockets and namespace below a temp dir),
builds a busybox rootfs and drives one runtime through a container's life with ctr:
run --rm, run -d, task ls, pause, resume, ps, kill, delete. Everything is removed on exit,
also after a failure, Ctrl-C or SIGTERM.

    python scripts/demo.py [--runtime NAME] [--base-dir DIR]
    python scripts/demo.py --cleanup DIR      # undo what a killed demo left in DIR
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from harness import (
    Containerd,
    build_busybox_rootfs,
    cleanup_dir,
    default_runtime,
    shims_for,
    wait_for,
)

CID = "demo"


class Demo:
    def __init__(self, c: Containerd) -> None:
        self.c = c
        self.n = 0

    def step(self, title: str) -> None:
        self.n += 1
        print(f"\n==> {self.n}. {title}", flush=True)

    def ctr(self, *args: str, show: bool = True) -> str:
        print(f"$ ctr {shlex.join(args)}", flush=True)
        out = self.c.ctr(*args).stdout
        if show and out.strip():
            print(out.rstrip(), flush=True)
        return out

    def status(self) -> str:
        return self.c.tasks().get(CID, (0, "MISSING"))[1]


def demo(c: Containerd) -> None:
    d = Demo(c)
    rt = c.runtime
    d.step(f"start a private containerd for runtime {rt}")
    t0 = time.monotonic()
    c.start()
    print(f"containerd pid {c.pid} up in {time.monotonic() - t0:.2f}s")
    print(f"  address   {c.address}\n  root      {c.root}\n  state     {c.state}")
    print(f"  namespace {c.namespace}\n  log       {c.log_path}")
    print(f"(below, `ctr` means: ctr --address {c.address} --namespace {c.namespace})")

    d.step("build a busybox rootfs")
    rootfs = build_busybox_rootfs(c.dir / "rootfs")
    print(f"{rootfs}: {sorted(p.name for p in rootfs.iterdir())}")

    path = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
    common = ["--runtime", rt, "--fifo-dir", str(c.fifo_dir), "--env", path]
    d.step("ctr run --rm: run a command, print its output, remove the container")
    d.ctr(
        "run", "--rm", *common, "--rootfs", str(rootfs), "hello",
        "sh", "-c", 'echo "hello from $(hostname), pid $$, uid $(id -u)"',
    )  # fmt: skip

    d.step("ctr run -d: a detached container")
    script = "trap 'echo bye; exit 0' TERM; while :; do sleep 1; done"
    d.ctr("run", "-d", *common, "--rootfs", str(rootfs), CID, "sh", "-c", script)
    d.ctr("task", "ls")
    shim = shims_for(c)
    print(f"(shim pid {shim}, runtime {rt})")

    d.step("pause")
    d.ctr("task", "pause", CID)
    d.ctr("task", "ls")
    assert d.status() == "PAUSED", d.status()

    d.step("resume")
    d.ctr("task", "resume", CID)
    d.ctr("task", "ls")
    assert d.status() == "RUNNING", d.status()

    d.step("ps: the processes in the container")
    d.ctr("task", "ps", CID)

    d.step("kill (SIGTERM; the container's trap exits 0)")
    d.ctr("task", "kill", CID)
    wait_for(lambda: d.status() == "STOPPED", 15, message="the task to stop")
    d.ctr("task", "ls")

    d.step("delete the task and the container")
    d.ctr("task", "delete", CID)
    d.ctr("containers", "delete", CID)
    d.ctr("containers", "ls")
    wait_for(lambda: not shims_for(c), 10, message="the shim to exit")
    print("no shim left")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", default=os.environ.get("DEMO_RUNTIME") or default_runtime())
    ap.add_argument("--base-dir", default=None, help="parent of the containerd's temp dir")
    ap.add_argument("--cleanup", metavar="DIR", help="only clean up leftovers in DIR")
    args = ap.parse_args()
    if args.cleanup:
        for d in cleanup_dir(args.cleanup):
            print(f"demo: cleaned up {d}")
        return 0
    if os.geteuid() != 0:
        print("demo: must run as root", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    c = Containerd(runtime=args.runtime, base_dir=args.base_dir)
    try:
        demo(c)
    except Exception as e:
        print(f"\ndemo FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"--- containerd log (tail) ---\n{c.log_tail(40)}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        print("\n==> clean up: tasks, containers, shims, mounts, directories", flush=True)
        c.cleanup()
        left = c.leftovers()
        print("left behind: " + (", ".join(left) if left else "nothing"))
    print(f"\ndemo OK with runtime {args.runtime}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
