"""The shim binary's ``start`` and ``delete`` alone, ours next to the Go shim's, in one loop.

    .venv/bin/python bench/launch_time.py [--runs 30] [--variant NAME=ARGV ...]

No containerd: each sample runs a binary the way containerd 1.6 does (bundle as working
directory, ``TTRPC_ADDRESS`` set, stdin empty) against a fresh bundle, alternating the
variants (ours, Go, ...) after one unrecorded warm-up round so that machine noise hits them
alike.  ``start`` is timed until it exits (containerd waits for exactly that); the daemon it
started is then killed and its socket removed (neither is timed).  ``delete`` runs in a
bundle as a clean exit leaves it (``config.json``, ``address``, ``init.pid``, the Go shim's
``runtime``; no runtime state, nothing mounted): the common case.

For each (action, variant): the median and minimum wall time and the median CPU time (user +
system of the binary and its children that it waited for, from ``wait4``; robust on a busy
machine, where wall time is not).  Our shim is measured cold (``$SUPERVISOR_FORKSERVER``
empty): what these numbers cut is the interpreter and our work, not the fork server's.
With ``--forkserver`` a ``supervisor-forkserver`` of the venv is started first on a private
socket (``$SUPERVISOR_FORKSERVER`` for every variant; the Go shim ignores it), so that our
``start`` is measured as it runs once a fork server serves; it is stopped by pid at the end.
``--no-spare`` starts it with ``--no-spare`` (each shim forked on request, as before the spare).
``--pause MS`` sleeps that long before each sample (untimed): containerd's starts of one
container after another are tens of milliseconds apart, not back to back.
``--options cri`` (or ``runc``) writes runtime options on ``start``'s stdin, as the CRI
plugin always does: a ``runtimeoptions.v1.Options`` without ``config_path`` (or a
``containerd.runc.v1.Options`` naming ``runc``), hand-encoded (:data:`OPTIONS`).

Variants default to the venv's shim binary (``ours``: the entry script ``make venv`` writes,
:mod:`supervisor.launch.launcher`) and the Go shim (``go``); ``--variant NAME=ARGV`` adds one
(ARGV split on spaces), e.g. ``"ours -m=.venv/bin/python -m supervisor.shim"``; an empty
ARGV drops one (``--variant go=`` with ``--options cri``, which containerd 1.6's Go shim
refuses: it sends the Go shim runc's options).
Needs root (``/run/containerd/s``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from supervisor.launch import forkclient
from supervisor.launch._pbwire import field_bytes
from supervisor.launch.address import is_abstract, socket_path
from supervisor.launch.info import encode_any

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = REPO_ROOT / ".venv" / "bin"
NAMESPACE = "launchbench"
#: ``start``'s stdin for ``--options``: a serialized ``Any`` (field 6 of runc's Options:
#: binary_name).
OPTIONS = {
    "none": b"",
    "cri": encode_any("runtimeoptions.v1.Options", b""),
    "runc": encode_any("containerd.runc.v1.Options", field_bytes(6, b"runc")),
}


def default_variants() -> dict[str, list[str]]:
    return {
        "ours": [str(BIN / "containerd-shim-supervisor-v2")],
        "go": [shutil.which("containerd-shim-runc-v2") or "containerd-shim-runc-v2"],
    }


def pids_with(token: str) -> list[int]:
    """Processes whose command line holds ``token`` (the daemons a start left)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline.split(b"\0"):
                found.append(int(entry))
    return found


def timed(argv: list[str], cwd: Path, env: dict[str, str], stdin: bytes = b""
          ) -> tuple[float, float, bytes]:
    """(wall ms, CPU ms, stdout) of one run of ``argv`` (``stdin`` written to it)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, env=env,
                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    if p.stdin is not None:
        p.stdin.write(stdin)  # a few bytes: the pipe holds them, start reads to EOF
        p.stdin.close()
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = (time.perf_counter() - t0) * 1000
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    if p.returncode != 0:
        raise RuntimeError(f"{argv}: exit {p.returncode}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1000, out


class Bench:
    def __init__(self, root: Path, variants: dict[str, list[str]], forkserver: str = "",
                 options: bytes = b"") -> None:
        self.root = root
        self.options = options
        self.variants = variants
        self.n = 0
        self.address = str(root / "containerd.sock")  # nothing listens: start never asks
        self.env = {**os.environ, "TTRPC_ADDRESS": self.address + ".ttrpc",
                    "SUPERVISOR_FORKSERVER": forkserver, "GOMAXPROCS": "2"}

    def bundle(self) -> tuple[str, Path]:
        self.n += 1
        cid = f"lb{os.getpid()}-{self.n}"
        bundle = self.root / cid
        bundle.mkdir()
        (bundle / "config.json").write_text("{}", encoding="utf-8")
        return cid, bundle

    def argv(self, variant: str, cid: str, *tail: str) -> list[str]:
        return [*self.variants[variant], "-namespace", NAMESPACE, "-address", self.address,
                "-publish-binary", "containerd", "-id", cid, *tail]

    def start(self, variant: str) -> tuple[float, float]:
        cid, bundle = self.bundle()
        log = bundle / "log"
        os.mkfifo(log, 0o600)
        reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)  # as containerd: someone reads
        try:
            wall, cpu, out = timed(self.argv(variant, cid, "start"), bundle, self.env,
                                   self.options)
        finally:
            for pid in pids_with(cid):
                os.kill(pid, signal.SIGKILL)
            os.close(reader)
        address = out.decode().strip()
        if address:
            path = socket_path(address)
            if not is_abstract(path):
                Path(path).unlink(missing_ok=True)
        shutil.rmtree(bundle, ignore_errors=True)
        return wall, cpu

    def delete(self, variant: str) -> tuple[float, float]:
        cid, bundle = self.bundle()
        (bundle / "address").write_text(f"unix://{self.root}/gone.sock", encoding="utf-8")
        (bundle / "init.pid").write_text("4194304", encoding="utf-8")
        (bundle / "runtime").write_text("runc", encoding="utf-8")  # the Go shim's create wrote it
        try:
            wall, cpu, _ = timed(self.argv(variant, cid, "-bundle", str(bundle), "delete"),
                                 bundle, self.env)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
        return wall, cpu


@contextlib.contextmanager
def forkserver(folder: Path | None, no_spare: bool = False) -> Iterator[str]:
    """The socket of a fork server started in ``folder`` (none: "", cold), stopped at the end."""
    if folder is None:
        yield ""
        return
    sock = folder / "fs" / "forkserver.sock"
    with open(folder / "forkserver.log", "wb") as log:
        proc = subprocess.Popen([str(BIN / "python"), "-I", "-m", "supervisor.forkserver",
                                 "--socket", str(sock), *(["--no-spare"] if no_spare else [])],
                                stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                forkclient.status(str(sock))
                break
            except (forkclient.ForkServerError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the fork server did not start: "
                                       + (folder / "forkserver.log").read_text()) from None
                time.sleep(0.02)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGV")
    parser.add_argument("--only", choices=("start", "delete"))
    parser.add_argument("--forkserver", action="store_true",
                        help="start a fork server first; our start asks it (default: cold)")
    parser.add_argument("--pause", type=float, default=0.0, metavar="MS",
                        help="sleep before each sample (default 0)")
    parser.add_argument("--no-spare", action="store_true",
                        help="with --forkserver: the server keeps no spare shim")
    parser.add_argument("--options", choices=sorted(OPTIONS), default="none",
                        help="runtime options on start's stdin (default none)")
    args = parser.parse_args()
    variants = default_variants()
    for spec in args.variant:
        name, _, argv = spec.partition("=")
        if argv:
            variants[name] = argv.split()
        else:
            variants.pop(name, None)
    actions = [args.only] if args.only else ["start", "delete"]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  nproc {os.cpu_count()}  load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  runs {args.runs}  "
          f"python {sys.version.split()[0]}")
    print(f"command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="launchbench-") as tmp, \
            forkserver(Path(tmp) if args.forkserver else None, args.no_spare) as socket:
        bench = Bench(Path(tmp), variants, socket, OPTIONS[args.options])
        results: dict[tuple[str, str], tuple[list[float], list[float]]] = {
            (a, v): ([], []) for a in actions for v in variants}
        for i in range(args.runs + 1):
            for action in actions:
                for variant in variants:
                    time.sleep(args.pause / 1000)
                    wall, cpu = getattr(bench, action)(variant)
                    if i:  # round 0 warms caches up
                        results[action, variant][0].append(wall)
                        results[action, variant][1].append(cpu)
    print("\n| action | binary | wall median ms | wall min ms | CPU median ms |")
    print("|---|---|---:|---:|---:|")
    for (action, variant), (walls, cpus) in results.items():
        print(f"| {action} | {variant} | {statistics.median(walls):.1f} | {min(walls):.1f} "
              f"| {statistics.median(cpus):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
