"""Where the time of one ``ctr run --rm /bin/true`` goes, for our shim and for the Go shim.

    .venv/bin/python bench/profile_shim.py [--runs 5] [--imports 12]

1. Import cost of the three interpreters our shim starts per container (``start``, the
   daemon, ``delete``), from ``python -X importtime``: total and the heaviest top-level
   packages; plus the bare interpreter's start-up for reference.
2. A timeline of ``ctr run --rm`` for both runtimes in one private containerd (harness)
   whose PATH starts with a ``runc`` wrapper that logs each invocation's start and end:
   containerd's debug log (``/containers/create``, shim events, ``shim disconnected``,
   ``/containers/delete``) and the wrapper's records are merged per run, and the median
   duration of each phase is printed for both runtimes (ms).  The wrapper costs the
   same couple of ms per runc call to both shims.

Needs root; cleans up its containerd and the wrapper dir on exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))
import harness  # noqa: E402

PY = str(REPO_ROOT / ".venv" / "bin" / "python")
SHIM = str(REPO_ROOT / ".venv" / "bin" / "containerd-shim-supervisor-v2")
RUNTIMES = {"ours": "io.containerd.supervisor.v2", "go": "io.containerd.runc.v2"}

IMPORT_SETS = {
    "start (shim.py + launch.start + _spawn)": (
        "import supervisor.shim, supervisor.launch.start, supervisor.launch._spawn"
    ),
    "daemon (shim.py + daemon.py)": "import supervisor.shim, supervisor.daemon",
    "delete (shim.py + launch.delete, with subprocess and unmount)": (
        "import supervisor.shim, supervisor.launch.delete, subprocess, "
        "supervisor.launch.unmount"
    ),
}

WRAPPER = """#!/bin/sh
s=$(date +%s.%N)
{runc} "$@"
rc=$?
echo "$s $(date +%s.%N) $rc $*" >> {log}
exit $rc
"""


def import_profile(code: str, top: int) -> tuple[float, list[tuple[float, str]]]:
    """(total ms, [(self ms, top-level package)]) from ``-X importtime``.

    Self times summed per top-level package, so ``trio`` counts everything trio's modules
    spend themselves, whoever imported them.
    """
    r = subprocess.run([PY, "-X", "importtime", "-c", code], capture_output=True, text=True,
                       check=True)  # fmt: skip
    per_pkg: dict[str, float] = {}
    total = 0.0
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        if len(m.group(3)) == 1:  # top level: one space of indent
            total += int(m.group(2)) / 1000
        pkg = m.group(4).split(".")[0]
        per_pkg[pkg] = per_pkg.get(pkg, 0.0) + int(m.group(1)) / 1000
    ranked = sorted(((ms, pkg) for pkg, ms in per_pkg.items()), reverse=True)
    return total, ranked[:top]


def wall_ms(argv: list[str], n: int = 5) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def parse_log_time(text: str) -> float:
    """containerd's ``2026-11-27T11:58:13.168966344Z`` as epoch seconds."""
    base, _, frac = text.rstrip("Z").partition(".")
    stamp = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    return stamp.timestamp() + float("0." + (frac or "0"))


def containerd_marks(log: str) -> list[tuple[float, str]]:
    marks = []
    for line in log.splitlines():
        m = re.match(r'time="(\d{4}-\d\d-\d\dT[^"]+Z)".*msg="([^"]+)"(.*)', line)
        if not m:
            continue
        when, msg, rest = parse_log_time(m.group(1)), m.group(2), m.group(3)
        topic = re.search(r"topic=(\S+)", rest)
        if msg in ("event published", "event forwarded") and topic:
            marks.append((when, topic.group(1)))
        elif msg == "shim disconnected":
            marks.append((when, "shim disconnected"))
    return marks


def runc_marks(path: Path, since: float, cid: str) -> list[tuple[float, float, str]]:
    """(start, end, "create"/"delete --force"/...) of the wrapper's records since ``since``."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            start, end, _rc, *args = line.split()
            if float(start) >= since:
                skip = ("--root", "--log", "--log-format", "json", "--bundle", "--pid-file", cid)
                cmd = [a for a in args if not a.startswith("/") and a not in skip]
                out.append((float(start), float(end), " ".join(cmd[:2])))
    return out


def timeline(c: harness.Containerd, rootfs: Path, which: str, cid: str, runc_log: Path
             ) -> dict[str, float]:
    off = c.log_offset()
    argv = c.ctr_argv("run", "--rm", "--runtime", RUNTIMES[which], "--fifo-dir",
                      str(c.fifo_dir), "--env", harness.IMAGE_PATH_ENV, "--rootfs",
                      str(rootfs), cid, "true")  # fmt: skip
    t0 = time.time()
    subprocess.run(argv, capture_output=True, check=True, timeout=60)
    t_end = time.time()
    time.sleep(0.3)  # the log lags a little
    marks = dict((name, when) for when, name in reversed(containerd_marks(c.log_text(off))))
    runs = runc_marks(runc_log, t0, cid)
    phases: dict[str, float] = {}
    seq: list[tuple[str, float]] = [("ctr spawned", t0)]
    seq.append(("/containers/create published", marks["/containers/create"]))
    for start, end, cmd in runs:
        seq.append((f"runc {cmd} begins", start))
        seq.append((f"runc {cmd} ends", end))
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete",
                  "shim disconnected", "/containers/delete"):  # fmt: skip
        if topic in marks:
            seq.append((topic, marks[topic]))
    seq.append(("ctr exited", t_end))
    seq.sort(key=lambda x: x[1])
    for (a, ta), (b, tb) in itertools.pairwise(seq):
        phases[f"{a} → {b}"] = (tb - ta) * 1000
    phases["TOTAL ctr run --rm"] = (t_end - t0) * 1000
    phases["runc invocations"] = len(runs)
    phases["runc time (sum)"] = sum(e - s for s, e, _ in runs) * 1000
    return phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="ctr run --rm per runtime (5)")
    p.add_argument("--imports", type=int, default=12, help="packages listed per set (12)")
    args = p.parse_args()

    print("## Interpreter and import cost (our shim)\n")
    print(f"- `python -c pass`: {wall_ms([PY, '-c', 'pass']):.1f} ms; "
          f"`python -I -S -c pass`: {wall_ms([PY, '-I', '-S', '-c', 'pass']):.1f} ms; "
          f"`{os.path.basename(SHIM)} -v`: {wall_ms([SHIM, '-v']):.1f} ms")
    for name, code in IMPORT_SETS.items():
        total, ranked = import_profile(code, args.imports)
        heavy = ", ".join(f"{pkg} {ms:.1f}" for ms, pkg in ranked)
        print(f"- {name}: imports {total:.0f} ms (wall {wall_ms([PY, '-c', code]):.0f} ms); "
              f"self time by top-level package (ms): {heavy}")

    tmp = Path(tempfile.mkdtemp(prefix="sv-prof-"))
    runc_log = tmp / "runc.log"
    wrapper = tmp / "runc"
    real_runc = shutil.which("runc", path=harness.DEFAULT_PATH)
    wrapper.write_text(WRAPPER.format(runc=real_runc, log=runc_log))
    wrapper.chmod(0o755)
    c = harness.Containerd()
    c.extra_env["PATH"] = f"{tmp}:{c.env()['PATH']}"
    try:
        c.start()
        rootfs = harness.build_busybox_rootfs(c.dir / "rootfs")
        results: dict[str, list[dict[str, float]]] = {"ours": [], "go": []}
        for i in range(args.runs + 1):
            for which in ("ours", "go"):
                ph = timeline(c, rootfs, which, f"{which}-{i}", runc_log)
                if i:  # the first round warms caches
                    results[which].append(ph)
        print(f"\n## `ctr run --rm /bin/true` timeline, median of {args.runs} (ms)\n")
        for which, runs in results.items():
            print(f"### {which} ({RUNTIMES[which]})\n")
            keys: list[str] = []
            for ph in runs:
                keys.extend(k for k in ph if k not in keys)
            for k in keys:
                vals = [ph[k] for ph in runs if k in ph]
                print(f"- {k}: {statistics.median(vals):.1f}"
                      + ("" if len(vals) == len(runs) else f" (in {len(vals)} runs)"))
            print()
    finally:
        c.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
