"""``supervisor``: look inside running shims, straight from their sockets.

::

    supervisor ls      [--state-dir DIR] [--namespace NS] [--json] [--timeout S]
                       [--forkserver SOCKET]
    supervisor inspect TARGET [--state-dir DIR] [--namespace NS] [--json] [--timeout S]
    supervisor events  TARGET [--state-dir DIR] [--namespace NS] [--json] [--timeout S]
    supervisor upgrade TARGET... | --all [--state-dir DIR] [--namespace NS] [--json]
                       [--timeout S] [--wait S] [--quiesce-timeout S] [--parallel N]
                       [--forkserver SOCKET]

TARGET is a container id (looked up in the state dir), a socket path or a
``unix://`` address.

Design
------
Shims are found without containerd: containerd keeps one bundle per task
under ``<state-dir>/io.containerd.runtime.v2.task/<namespace>/<id>/`` and the
shim's ``start`` writes its socket address into the bundle's ``address``
file.  Several bundles may name one socket (a shim serving a group of
containers); each socket is asked once.  Every shim is asked over its own
connection, concurrently, through the ``supervisor.introspect.v1.Introspect``
service (:mod:`supervisor.introspect`), which answers from memory -- so this
works while containerd is down.  ``ls`` also asks the fork server
(:mod:`supervisor.forkserver`) on its socket for its status (pid, version,
uptime, shims forked): a line under the table when one answers or its socket
is there but does not, ``forkserver`` in the JSON (null when there is none).

``upgrade`` (issue 17) asks each shim, once per socket and at most
``--parallel`` at a time, to re-exec itself with the installed code: it calls
``supervisor.upgrade.v1.Upgrade/Upgrade``, which the shim answers *before* it
quiesces and execs, then polls ``Introspect/Shim`` -- dialling again when the
connection ends or a call times out, as the exec window or a fallback may
make it -- until ``upgrade_attempts`` rose (:func:`await_attempt`).  The
verdict (:func:`judge`) is the shim's own account: upgraded when the same pid
answers with a higher ``upgrades``, else its ``last_upgrade_error``.
``--all`` also retires the fork server if it runs other code than the
installed one (:func:`renew_forkserver`).  "Installed" is
:func:`~supervisor.launch.forkclient.code_identity` as this command computes
it; ``ls`` marks the shims whose ``code`` differs from it (SHIM-CODE).

Invariants
----------
* Every connect and every call is bounded by ``--timeout`` (default
  :data:`DEFAULT_TIMEOUT` s); a shim that does not answer in time, refuses
  the connection, has no socket or no introspection service is *reported*
  (with that reason), never a traceback.
* JSON output has stable keys (documented in ``docs/inspect-json.md``);
  absent values are ``null``, never missing keys.
* Exit status: 0 everything answered, 1 something was not found or not
  reachable (``upgrade``: or a shim did not upgrade), 2 usage error.
* ``upgrade`` never reports a shim upgraded on the strength of the call's
  answer: only the shim's later Introspect answer counts, and each shim's
  whole upgrade is bounded by ``--wait``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio
from google.protobuf.message import DecodeError, Message

from supervisor import __version__, ttrpc
from supervisor.api.introspect import introspect_pb2 as pb
from supervisor.api.upgrade import upgrade_pb2 as upgrade_pb
from supervisor.introspect import SERVICE
from supervisor.launch import forkclient
from supervisor.launch.address import canonical, socket_path

DEFAULT_STATE_DIR = "/run/containerd"
TASK_DIR = "io.containerd.runtime.v2.task"
DEFAULT_TIMEOUT = 2.0
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line asks for something impossible (exit status 2)."""


class Failed(Exception):
    """Not found or not reachable (exit status 1)."""


# --- finding shims ---------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """One task bundle in containerd's state dir and the shim address it names."""

    namespace: str
    id: str
    path: str
    address: str  # "" when the bundle has no readable address file
    error: str = ""


def discover(state_dir: str, namespace: str | None = None) -> list[Bundle]:
    """Every task bundle under ``state_dir`` (one namespace or all), sorted."""
    top = os.path.join(state_dir, TASK_DIR)
    if not os.path.isdir(state_dir):
        raise Failed(f"state dir {state_dir} does not exist")
    try:
        namespaces = sorted(os.listdir(top)) if namespace is None else [namespace]
    except FileNotFoundError:
        return []
    found: list[Bundle] = []
    for ns in namespaces:
        ns_dir = os.path.join(top, ns)
        try:
            ids = sorted(os.listdir(ns_dir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for cid in ids:
            path = os.path.join(ns_dir, cid)
            if not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, "address"), encoding="utf-8") as f:
                    address = f.read().strip()
            except FileNotFoundError:
                found.append(Bundle(ns, cid, path, "", "no address file (shim not started)"))
                continue
            except OSError as e:
                found.append(Bundle(ns, cid, path, "", f"address file: {e.strerror or e}"))
                continue
            try:
                found.append(Bundle(ns, cid, path, canonical(address)))
            except ValueError as e:
                found.append(Bundle(ns, cid, path, "", f"address file: {e}"))
    return found


def looks_like_address(target: str) -> bool:
    # containerd ids never hold "/" (its identifiers are [A-Za-z0-9._-]).
    return target.startswith(("unix://", "@")) or "/" in target


# --- asking a shim ---------------------------------------------------------------


@dataclass
class Report:
    """What one shim said (each part None when not asked or not answered)."""

    address: str
    shim: pb.ShimResponse | None = None
    containers: pb.ContainersResponse | None = None
    events: pb.EventsResponse | None = None
    error: str = ""

    @property
    def reachable(self) -> bool:
        return not self.error


#: The reason for a socket file with nothing listening on it (a killed shim's or fork
#: server's): ``renew_forkserver`` tells such a fork server from one that answered badly.
REFUSED = "connection refused"


def reason(exc: BaseException, timeout: float) -> str:
    """A short, human reason a shim could not be asked."""
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, (trio.TooSlowError, TimeoutError)):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, ttrpc.RPCError):
        if exc.code is ttrpc.Code.DEADLINE_EXCEEDED:
            return f"timeout after {timeout:g}s"
        if exc.code is ttrpc.Code.UNIMPLEMENTED:
            return "no introspection service (not a supervisor shim, or an older one)"
        return f"{exc.code.name.lower()}: {exc.message}"
    if isinstance(exc, ttrpc.ConnectionEnded):
        return "connection closed by the shim"
    if isinstance(exc, DecodeError):
        return f"bad answer: {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


async def ask(
    address: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    shim: bool = True,
    containers: bool = True,
    events: bool = True,
    container_id: str = "",
    event_limit: int = 0,
) -> Report:
    """Ask the shim at ``address`` (concurrently, each call bounded by ``timeout``)."""
    report = Report(address)
    try:
        with trio.fail_after(timeout):
            client = await ttrpc.connect_unix(socket_path(address))
    except (OSError, trio.TooSlowError) as e:
        report.error = reason(e, timeout)
        return report
    errors: list[BaseException] = []

    async def call(method: str, request: Message, reply: type[Message],
                   store: Callable[[Any], None]) -> None:
        try:
            data = await client.call(SERVICE, method, request.SerializeToString(),
                                     timeout=timeout)
            store(reply.FromString(data))
        except (ttrpc.RPCError, ttrpc.ConnectionEnded, OSError, DecodeError) as e:
            errors.append(e)

    def set_shim(m: pb.ShimResponse) -> None:
        report.shim = m

    def set_containers(m: pb.ContainersResponse) -> None:
        report.containers = m

    def set_events(m: pb.EventsResponse) -> None:
        report.events = m

    async with client, trio.open_nursery() as nursery:
        if shim:
            nursery.start_soon(call, "Shim", pb.ShimRequest(), pb.ShimResponse, set_shim)
        if containers:
            nursery.start_soon(call, "Containers", pb.ContainersRequest(id=container_id),
                               pb.ContainersResponse, set_containers)
        if events:
            nursery.start_soon(call, "Events", pb.EventsRequest(limit=event_limit),
                               pb.EventsResponse, set_events)
    if errors:
        report.error = reason(errors[0], timeout)
    return report


async def ask_all(addresses: Sequence[str], timeout: float) -> dict[str, Report]:
    reports: dict[str, Report] = {}

    async def one(address: str) -> None:
        reports[address] = await ask(address, timeout=timeout)

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(one, address)
    return reports


# --- JSON (stable keys: docs/inspect-json.md) -------------------------------------


def _time(ts: Any, present: bool = True) -> str | None:
    """RFC 3339 UTC with nanoseconds, or None for an unset Timestamp."""
    if not present or (ts.seconds == 0 and ts.nanos == 0):
        return None
    base = datetime.datetime.fromtimestamp(ts.seconds, tz=datetime.UTC)
    return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts.nanos:09d}Z"


def shim_json(m: pb.ShimResponse) -> dict[str, Any]:
    return {
        "pid": m.pid,
        "version": m.version,
        "namespace": m.namespace,
        "address": m.address,
        "started_at": _time(m.started_at),
        "uptime_seconds": round(m.uptime_seconds, 3),
        "memory_rss_bytes": m.memory_rss_bytes,
        "memory_pss_bytes": m.memory_pss_bytes or None,
        "open_fds": m.open_fds,
        "runtime_binary": m.runtime_binary,
        "runtime_version": m.runtime_version or None,
        "runtime_version_error": m.runtime_version_error or None,
        "container_count": m.container_count,
        "python_version": m.python_version,
        "reserved": list(m.reserved),
        "closing": m.closing,
        "code": m.code or None,
        "upgrades": m.upgrades,
        "upgrade_attempts": m.upgrade_attempts,
        "last_upgrade_error": m.last_upgrade_error or None,
        "upgraded_at": _time(m.upgraded_at, m.HasField("upgraded_at")),
    }


def other_code(m: pb.ShimResponse | None, installed: str) -> bool | None:
    """Whether the shim runs other code than ``installed`` (the CLI's
    :func:`~supervisor.launch.forkclient.code_identity`); None when it did not answer.
    A shim that reports no code predates in-place upgrades: other code."""
    return None if m is None else m.code != installed


def process_json(m: pb.Process) -> dict[str, Any]:
    return {
        "exec_id": m.exec_id or None,
        "pid": m.pid or None,
        "status": m.status,
        "exited": m.exited,
        "exit_status": m.exit_status if m.exited else None,
        "exited_at": _time(m.exited_at, m.exited),
        "stdio": {
            "stdin": m.stdio.stdin or None,
            "stdout": m.stdio.stdout or None,
            "stderr": m.stdio.stderr or None,
            "terminal": m.stdio.terminal,
        },
        "io": {
            "kind": m.io.kind,
            "stdin_bytes": m.io.stdin_bytes,
            "stdout_bytes": m.io.stdout_bytes,
            "stderr_bytes": m.io.stderr_bytes,
            "stdout_backlog_bytes": m.io.stdout_backlog_bytes,
            "stderr_backlog_bytes": m.io.stderr_backlog_bytes,
            "stdout_dropped_bytes": m.io.stdout_dropped_bytes,
            "stderr_dropped_bytes": m.io.stderr_dropped_bytes,
        },
    }


def container_json(m: pb.Container) -> dict[str, Any]:
    return {
        "id": m.id,
        "namespace": m.namespace,
        "bundle": m.bundle,
        "runtime_binary": m.runtime_binary,
        "created": m.created,
        "init": process_json(m.init),
        "execs": [process_json(e) for e in m.execs],
    }


def event_json(m: pb.Event) -> dict[str, Any]:
    return {
        "seq": m.seq,
        "topic": m.topic,
        "timestamp": _time(m.timestamp),
        "namespace": m.namespace,
        "container_id": m.container_id or None,
        "process_id": m.process_id or None,
        "type_url": m.type_url,
        "attempts": m.attempts,
        "first_error": m.first_error or None,
    }


def events_json(m: pb.EventsResponse) -> dict[str, Any]:
    return {
        "published": m.published,
        "delivered": m.delivered,
        "replayed": m.replayed,
        "pending_count": m.pending_count,
        "oldest_pending_age_seconds": round(m.oldest_pending_age_seconds, 3),
        "last_error": m.last_error or None,
        "last_error_at": _time(m.last_error_at),
        "spool_error": m.spool_error or None,
        "spool_skipped": m.spool_skipped,
        "pending": [event_json(e) for e in m.pending],
        "recent": [event_json(e) for e in m.recent],
    }


def report_json(r: Report) -> dict[str, Any]:
    return {
        "address": r.address,
        "reachable": r.reachable,
        "error": r.error or None,
        "shim": shim_json(r.shim) if r.shim is not None else None,
        "containers": (
            [container_json(c) for c in r.containers.containers]
            if r.containers is not None else None
        ),
        "events": events_json(r.events) if r.events is not None else None,
    }


# --- ls ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of ``supervisor ls``."""

    namespace: str
    id: str
    address: str
    reachable: bool
    error: str = ""
    container: pb.Container | None = None
    shim_pid: int | None = None
    pending_events: int | None = None
    other_code: bool | None = None

    def json(self) -> dict[str, Any]:
        init = self.container.init if self.container is not None else None
        exited = init is not None and init.exited
        return {
            "namespace": self.namespace,
            "id": self.id,
            "pid": (init.pid or None) if init is not None else None,
            "status": init.status if init is not None else ("unknown" if self.reachable
                                                             else "unreachable"),
            "exit_status": init.exit_status if init is not None and exited else None,
            "exited_at": _time(init.exited_at, exited) if init is not None else None,
            "execs": len(self.container.execs) if self.container is not None else None,
            "shim_pid": self.shim_pid,
            "pending_events": self.pending_events,
            "other_code": self.other_code,
            "address": self.address or None,
            "reachable": self.reachable,
            "error": self.error or None,
        }


def build_rows(bundles: Sequence[Bundle], reports: dict[str, Report],
               installed: str) -> list[Row]:
    """``ls``'s rows; ``installed`` is the code identity shims are compared with."""
    rows: list[Row] = []
    seen: set[tuple[str, str, str]] = set()
    for b in bundles:
        if not b.address:
            rows.append(Row(b.namespace, b.id, "", False, b.error))
            continue
        report = reports[b.address]
        row = Row(b.namespace, b.id, b.address, report.reachable, report.error)
        if report.shim is not None:
            row.shim_pid = report.shim.pid
            row.other_code = other_code(report.shim, installed)
        if report.events is not None:
            row.pending_events = report.events.pending_count
        if report.containers is not None:
            for c in report.containers.containers:
                if c.id == b.id and c.namespace in ("", b.namespace):
                    row.container = c
            if row.container is None and report.reachable:
                row.error = "the shim does not know this container"
        rows.append(row)
        seen.add((b.namespace, b.id, b.address))
    # Containers a shim serves that have no bundle (should not happen; show them anyway).
    for address, report in reports.items():
        for c in report.containers.containers if report.containers is not None else ():
            if (c.namespace, c.id, address) not in seen:
                rows.append(Row(
                    c.namespace, c.id, address, True, "no bundle in the state dir", c,
                    report.shim.pid if report.shim is not None else None,
                    report.events.pending_count if report.events is not None else None,
                    other_code(report.shim, installed),
                ))
    rows.sort(key=lambda r: (r.namespace, r.id))
    return rows


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Columns separated by at least two spaces; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append(indent + "  ".join(cells).rstrip() + "\n")
    return "".join(lines)


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


LS_HEADERS = ("NAMESPACE", "ID", "PID", "STATUS", "EXIT", "EXECS", "SHIM-PID",
              "PENDING-EVENTS", "SHIM-CODE", "NOTE")
#: ``ls``'s SHIM-CODE column: the shim runs the installed code, or other code
#: (``supervisor upgrade`` replaces it); "-" when the shim did not answer.
CODE_MARK = {False: "installed", True: "OTHER", None: "-"}


def format_ls(rows: Sequence[Row], out: TextIO) -> None:
    cells: list[list[str]] = []
    for row in rows:
        j = row.json()
        note = j["error"] or ""
        if not row.reachable and row.address:
            note = f"{note} ({row.address})"
        cells.append([
            row.namespace, row.id, _dash(j["pid"]), j["status"].upper(),
            _dash(j["exit_status"]), _dash(j["execs"]), _dash(j["shim_pid"]),
            _dash(j["pending_events"]), CODE_MARK[row.other_code], note,
        ])
    out.write(table(LS_HEADERS, cells))


def shim_summary(report: Report, bundles: Sequence[Bundle], installed: str
                 ) -> dict[str, Any]:
    """One entry of ``ls --json``'s ``shims``."""
    shim, events = report.shim, report.events
    return {
        "address": report.address,
        "reachable": report.reachable,
        "error": report.error or None,
        "pid": shim.pid if shim is not None else None,
        "namespaces": sorted({b.namespace for b in bundles}),
        "containers": sorted({b.id for b in bundles}),
        "pending_events": events.pending_count if events is not None else None,
        "code": (shim.code or None) if shim is not None else None,
        "upgrades": shim.upgrades if shim is not None else None,
        "other_code": other_code(shim, installed),
    }


def forkserver_status(path: str, timeout: float) -> dict[str, Any] | None:
    """``ls --json``'s ``forkserver``: its status; only ``socket`` and ``error`` when its
    socket is there but it does not answer well; None when nothing is there."""
    if not path:
        return None
    found: dict[str, Any] = {"socket": path, "pid": None, "version": None, "code": None,
                             "started": None, "shims_forked": None, "spare": None, "error": None}
    try:
        status = forkclient.status(path, timeout)
    except forkclient.NoServer:
        if not os.path.exists(path):
            return None
        found["error"] = REFUSED
        return found
    except (forkclient.ForkServerError, OSError) as e:
        found["error"] = str(e) or type(e).__name__
        return found
    found.update(pid=status.get("pid"), version=status.get("version"), code=status.get("code"),
                 started=status.get("started"), shims_forked=status.get("served"),
                 spare=status.get("spare"), zygote=status.get("zygote"))
    return found


def format_forkserver(status: dict[str, Any], out: TextIO, now: float) -> None:
    if status["error"]:
        out.write(f"\nfork server {status['socket']}: {status['error']}\n")
        return
    started = status["started"]
    up = _ago(now - started) if isinstance(started, int) else "?"
    spare = f", spare shim pid {status['spare']}" if status["spare"] else ""
    if status.get("zygote"):
        spare += f", zygote pid {status['zygote']}"
    out.write(f"\nfork server pid {status['pid']} ({status['socket']}): version "
              f"{status['version']}, up {up}, {status['shims_forked']} shims forked{spare}\n")


async def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    bundles = discover(args.state_dir, args.namespace)
    addresses = sorted({b.address for b in bundles if b.address})
    reports = await ask_all(addresses, args.timeout)
    installed = forkclient.code_identity()
    rows = build_rows(bundles, reports, installed)
    fork_server = await trio.to_thread.run_sync(forkserver_status, args.forkserver, args.timeout)
    if args.json:
        shims = [shim_summary(reports[a], [b for b in bundles if b.address == a], installed)
                 for a in addresses]
        json.dump({"containers": [r.json() for r in rows], "shims": shims,
                   "forkserver": fork_server}, out, indent=2)
        out.write("\n")
    else:
        format_ls(rows, out)
        if fork_server is not None:
            format_forkserver(fork_server, out, time.time())
    return EXIT_OK if all(r.reachable for r in rows) else EXIT_FAILED


# --- inspect / events ------------------------------------------------------------------


@dataclass
class Target:
    address: str
    container_id: str = ""  # "" = every container of that shim
    namespace: str = ""
    bundles: list[Bundle] = field(default_factory=list)


def resolve(target: str, state_dir: str, namespace: str | None) -> Target:
    """A container id (found in the state dir) or a socket address -> where to ask."""
    if looks_like_address(target):
        try:
            return Target(canonical(target))
        except ValueError as e:
            raise UsageError(str(e)) from None
    matches = [b for b in discover(state_dir, namespace) if b.id == target]
    if not matches:
        where = f"namespace {namespace}" if namespace else "any namespace"
        raise Failed(f"no container {target!r} in {where} under {state_dir}")
    spaces = sorted({b.namespace for b in matches})
    if len(spaces) > 1:
        raise UsageError(f"container {target!r} exists in namespaces {', '.join(spaces)}: "
                         "pick one with --namespace")
    bundle = matches[0]
    if not bundle.address:
        raise Failed(f"container {target!r}: {bundle.error}")
    return Target(bundle.address, bundle.id, bundle.namespace, matches)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _short(ts: str | None) -> str:
    """An RFC 3339 time from :func:`_time`, to the millisecond (for tables)."""
    return "-" if ts is None else ts[:23] + "Z"


def _age_of(ts: str | None, now: float) -> str:
    if ts is None:
        return "-"
    when = datetime.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.UTC).timestamp() + int(ts[20:29]) / 1e9
    return _ago(now - when)


def format_shim(m: pb.ShimResponse, out: TextIO) -> None:
    j = shim_json(m)
    runtime = j["runtime_binary"]
    if j["runtime_version"]:
        runtime += f" ({j['runtime_version']})"
    elif j["runtime_version_error"]:
        runtime += f" (version unknown: {j['runtime_version_error']})"
    memory = f"RSS {_mib(m.memory_rss_bytes)}"
    if m.memory_pss_bytes:
        memory += f", PSS {_mib(m.memory_pss_bytes)}"
    containers = str(j["container_count"])
    if j["reserved"]:
        containers += f", {len(j['reserved'])} reserved ({', '.join(j['reserved'])})"
    if j["closing"]:
        containers += " (ending: takes no more)"
    code = j["code"] or "? (a shim older than in-place upgrades)"
    if j["upgrade_attempts"]:
        code += f" ({j['upgrades']} upgrades in {j['upgrade_attempts']} attempts"
        code += f", last at {_short(j['upgraded_at'])})" if j["upgraded_at"] else ")"
    out.write("Shim\n")
    for key, value in (
        ("Address", j["address"]),
        ("PID", str(j["pid"])),
        ("Version", f"{j['version']} (Python {j['python_version']})"),
        ("Code", code),
        ("Namespace", j["namespace"]),
        ("Started", f"{_short(j['started_at'])} (up {_ago(m.uptime_seconds)})"),
        ("Memory", memory),
        ("Open fds", str(j["open_fds"])),
        ("Runtime", runtime),
        ("Containers", containers),
    ):
        out.write(f"  {key + ':':<12}{value}\n")
    if j["last_upgrade_error"]:
        out.write(f"  {'Upgrade:':<12}the last attempt failed: {j['last_upgrade_error']}\n")


def format_container(m: pb.Container, out: TextIO) -> None:
    out.write(f"\nContainer {m.id}\n")
    out.write(f"  {'Namespace:':<12}{m.namespace}\n")
    out.write(f"  {'Bundle:':<12}{m.bundle}\n")
    out.write(f"  {'Runtime:':<12}{m.runtime_binary}\n")
    if not m.created:
        out.write(f"  {'Note:':<12}Create is still running\n")
    rows: list[list[str]] = []
    streams: list[tuple[str, pb.Process]] = []
    for p in [m.init, *m.execs]:
        j = process_json(p)
        name = p.exec_id or "(init)"
        rows.append([name, _dash(j["pid"]), p.status.upper(), _dash(j["exit_status"]),
                     _short(j["exited_at"]), "yes" if p.stdio.terminal else "no", p.io.kind])
        streams.append((name, p))
    out.write("  Processes:\n")
    out.write(table(("PROCESS", "PID", "STATUS", "EXIT", "EXITED-AT", "TTY", "IO"), rows,
                    indent="    "))
    out.write("  Stdio (bytes copied):\n")
    for name, p in streams:
        for stream, path, count in (("stdin", p.stdio.stdin, p.io.stdin_bytes),
                                    ("stdout", p.stdio.stdout, p.io.stdout_bytes),
                                    ("stderr", p.stdio.stderr, p.io.stderr_bytes)):
            if path or count:
                out.write(f"    {name} {stream}: {path or '-'} ({count} B)\n")


def format_events(m: pb.EventsResponse, out: TextIO, now: float) -> None:
    j = events_json(m)
    out.write("\nEvents\n")
    pending = f"{j['pending_count']}"
    if j["pending_count"]:
        pending += f" (oldest {_ago(j['oldest_pending_age_seconds'])} old)"
    out.write(f"  {'Published:':<12}{j['published']}\n")
    out.write(f"  {'Delivered:':<12}{j['delivered']}\n")
    if j["replayed"]:
        out.write(f"  {'Replayed:':<12}{j['replayed']}\n")
    out.write(f"  {'Pending:':<12}{pending}\n")
    if j["last_error"]:
        out.write(f"  {'Last error:':<12}{j['last_error']} "
                  f"(at {_short(j['last_error_at'])}, {_age_of(j['last_error_at'], now)} ago)\n")
    if j["spool_error"]:
        out.write(f"  {'Spool:':<12}{j['spool_error']}\n")
    if j["spool_skipped"]:
        out.write(f"  {'Skipped:':<12}{j['spool_skipped']} damaged or invalid spool records at "
                  "start (the shim's log says which and why)\n")
    for title, events in (("Queue (oldest first)", j["pending"]),
                          ("Recently delivered", j["recent"])):
        out.write(f"  {title}:\n")
        if not events:
            out.write("    (none)\n")
            continue
        out.write(table(
            ("SEQ", "TOPIC", "CONTAINER", "PROCESS", "TIMESTAMP", "AGE", "ATTEMPTS",
             "FIRST-ERROR"),
            [[str(e["seq"]), e["topic"], _dash(e["container_id"]), _dash(e["process_id"]),
              _short(e["timestamp"]), _age_of(e["timestamp"], now), str(e["attempts"]),
              _dash(e["first_error"])] for e in events],
            indent="    ",
        ))


async def _ask_target(args: argparse.Namespace, *, containers: bool) -> tuple[Target, Report]:
    target = resolve(args.target, args.state_dir, args.namespace)
    report = await ask(target.address, timeout=args.timeout, containers=containers,
                       container_id=target.container_id, event_limit=args.limit)
    return target, report


def _check(target: Target, report: Report, label: str) -> None:
    if not report.reachable:
        raise Failed(f"{label}: shim at {report.address} unreachable: {report.error}")
    if target.container_id and report.containers is not None and not any(
        c.id == target.container_id for c in report.containers.containers
    ):
        raise Failed(f"{label}: the shim at {report.address} does not know this container")


async def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    target, report = await _ask_target(args, containers=True)
    if args.json:
        json.dump(report_json(report), out, indent=2)
        out.write("\n")
        _check(target, report, args.target)
        return EXIT_OK
    _check(target, report, args.target)
    if report.shim is not None:
        format_shim(report.shim, out)
    if report.containers is not None:
        for c in report.containers.containers:
            format_container(c, out)
    if report.events is not None:
        format_events(report.events, out, time.time())
    return EXIT_OK


async def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    # Containers is asked only to check that the shim knows the id.
    target, report = await _ask_target(args, containers=not looks_like_address(args.target))
    if args.json:
        json.dump({
            "address": report.address,
            "reachable": report.reachable,
            "error": report.error or None,
            "shim_pid": report.shim.pid if report.shim is not None else None,
            "namespace": report.shim.namespace if report.shim is not None else None,
            "events": events_json(report.events) if report.events is not None else None,
        }, out, indent=2)
        out.write("\n")
        _check(target, report, args.target)
        return EXIT_OK
    _check(target, report, args.target)
    if report.shim is not None:
        out.write(f"Shim {report.shim.pid} at {report.shim.address} "
                  f"(namespace {report.shim.namespace})\n")
    if report.events is not None:
        format_events(report.events, out, time.time())
    return EXIT_OK


# --- upgrade ------------------------------------------------------------------------

#: ``supervisor.upgrade.v1.Upgrade``, as the .proto names it.
UPGRADE_SERVICE: str = upgrade_pb.DESCRIPTOR.services_by_name["Upgrade"].full_name
#: Bounds one shim's whole upgrade: the call (the shim's pre-flight runs the
#: installed code once), the quiesce, the exec and the new code's start.
DEFAULT_UPGRADE_WAIT = 60.0
#: Shims upgraded at once (each runs a pre-flight interpreter and then execs one).
DEFAULT_PARALLEL = 4
#: How often a shim is asked whether its attempt is over.
POLL_INTERVAL = 0.1


@dataclass
class Outcome:
    """What became of one shim's upgrade (``supervisor upgrade``'s line and JSON)."""

    address: str
    containers: list[str]  # "namespace/id", from the state dir's bundles
    upgraded: bool = False
    pid: int | None = None
    from_code: str | None = None
    to_code: str | None = None
    code: str | None = None  # what it runs once the attempt is over
    upgrades: int | None = None
    upgrade_attempts: int | None = None
    error: str = ""  # why it did not upgrade

    def json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "containers": self.containers,
            "upgraded": self.upgraded,
            "pid": self.pid,
            "from_code": self.from_code,
            "to_code": self.to_code,
            "code": self.code,
            "upgrades": self.upgrades,
            "upgrade_attempts": self.upgrade_attempts,
            "error": self.error or None,
        }


def refusal(exc: BaseException, timeout: float) -> str:
    """Why the shim did not take the Upgrade call (the proto's refusal statuses)."""
    if isinstance(exc, ttrpc.RPCError):
        if exc.code is ttrpc.Code.UNIMPLEMENTED:
            return "no upgrade service (a shim older than in-place upgrades)"
        if exc.code is ttrpc.Code.FAILED_PRECONDITION:
            return f"refused: {exc.message}"
        if exc.code is ttrpc.Code.UNAVAILABLE:
            return f"refused, the installed code cannot run: {exc.message}"
    return reason(exc, timeout)


class ShimLine:
    """Introspect/Shim on one shim's socket, reconnecting when the connection ends.

    The shim keeps its connections across a successful exec, but a fallback
    or a slow new process may end ours or let a call time out: every failure
    closes the connection, and the next :meth:`shim` dials again.
    """

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.client: ttrpc.Client | None = None

    async def shim(self) -> pb.ShimResponse:
        try:
            if self.client is None or self.client.closed:
                with trio.fail_after(self.timeout):
                    self.client = await ttrpc.connect_unix(socket_path(self.address))
            data = await self.client.call(SERVICE, "Shim", pb.ShimRequest().SerializeToString(),
                                          timeout=self.timeout)
            return pb.ShimResponse.FromString(data)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()


#: What polling a shim may meet and retry: the exec window, a fallback, a slow start.
RETRYABLE = (ttrpc.RPCError, ttrpc.ConnectionEnded, OSError, DecodeError, trio.TooSlowError)


async def await_attempt(poll: Callable[[], Awaitable[pb.ShimResponse]], attempts_before: int,
                        deadline: float, interval: float = POLL_INTERVAL
                        ) -> tuple[pb.ShimResponse | None, BaseException | None]:
    """Poll until ``upgrade_attempts`` rose above ``attempts_before``: (that answer, None).

    A failed poll (:data:`RETRYABLE`) is retried after ``interval``, like an
    answer that shows the attempt still under way.  At ``deadline`` (trio's
    clock): ``(None, the last poll's failure or None if it answered)``.
    """
    last: BaseException | None = None
    with trio.move_on_at(deadline):
        while True:
            try:
                m = await poll()
            except RETRYABLE as e:
                last = e
            else:
                if m.upgrade_attempts > attempts_before:
                    return m, None
                last = None
            await trio.sleep(interval)
    return None, last


def judge(outcome: Outcome, before: pb.ShimResponse, after: pb.ShimResponse) -> None:
    """Fill ``outcome`` from the shim's answers before the call and once the attempt is over."""
    outcome.code = after.code or None
    outcome.upgrades = after.upgrades
    outcome.upgrade_attempts = after.upgrade_attempts
    if after.pid != before.pid:
        outcome.error = (f"another process answers on the socket now (pid {before.pid} -> "
                         f"{after.pid})")
    elif after.upgrades > before.upgrades:
        outcome.upgraded = True
    else:
        outcome.error = after.last_upgrade_error or "the attempt ended without an upgrade " \
                                                     "(the shim gave no reason)"


async def upgrade_shim(address: str, containers: list[str], *, timeout: float, wait: float,
                       quiesce: float = 0.0, interval: float = POLL_INTERVAL) -> Outcome:
    """Upgrade the shim at ``address``; never raises for the shim's sake (the outcome says).

    Asks Introspect/Shim (the counts before), calls Upgrade/Upgrade (answered
    before the shim quiesces: it only says the shim took the request), then
    polls Introspect/Shim until ``upgrade_attempts`` rose.  Connects and
    Introspect calls are bounded by ``timeout``; the whole by ``wait``.
    """
    outcome = Outcome(address, containers)
    deadline = trio.current_time() + wait
    line = ShimLine(address, timeout)
    try:
        try:
            with trio.fail_after(timeout):
                before = await line.shim()
        except RETRYABLE as e:
            outcome.error = reason(e, timeout)
            return outcome
        outcome.pid = before.pid
        outcome.from_code = before.code or None
        outcome.upgrades, outcome.upgrade_attempts = before.upgrades, before.upgrade_attempts
        request = upgrade_pb.UpgradeRequest(quiesce_timeout_seconds=quiesce)
        try:
            assert line.client is not None
            with trio.fail_at(deadline):
                data = await line.client.call(UPGRADE_SERVICE, "Upgrade",
                                              request.SerializeToString())
            answer = upgrade_pb.UpgradeResponse.FromString(data)
        except RETRYABLE as e:
            outcome.error = refusal(e, wait)
            return outcome
        outcome.from_code = answer.from_code or outcome.from_code
        outcome.to_code = answer.to_code or None
        after, last = await await_attempt(line.shim, answer.upgrade_attempts, deadline, interval)
        if after is None:
            outcome.error = f"no outcome within {wait:g}s"
            if last is not None:
                outcome.error += f" (last: {reason(last, timeout)})"
            return outcome
        judge(outcome, before, after)
        return outcome
    finally:
        await line.aclose()


def upgrade_targets(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[Bundle]]:
    """The shims to upgrade, once each: {address: ["namespace/id", ...]}, and the
    bundles of ``--all`` that name no shim (not started yet: nothing to upgrade).

    ``--all``: every shim ``ls`` finds (``--namespace``: of that namespace);
    else each ID (resolved as ``inspect`` does) or socket.  A shim serving
    several containers is one entry listing all its bundles in the state dir.
    """
    if args.all == bool(args.targets):
        raise UsageError("name the shims to upgrade (container ids or sockets) or --all, "
                         "not both")
    if args.all:
        bundles = discover(args.state_dir, args.namespace)
        addresses = [b.address for b in bundles if b.address]
        skipped = [b for b in bundles if not b.address]
    else:
        addresses = [resolve(t, args.state_dir, args.namespace).address for t in args.targets]
        bundles = discover(args.state_dir) if os.path.isdir(args.state_dir) else []
        skipped = []
    shims: dict[str, list[str]] = {a: [] for a in sorted(set(addresses))}
    for b in bundles:
        if b.address in shims:
            shims[b.address].append(f"{b.namespace}/{b.id}")
    return shims, skipped


def renew_forkserver(path: str, installed: str, timeout: float) -> dict[str, Any] | None:
    """``upgrade --all``'s fork server step: retire it if it runs other code than
    ``installed``.  None when none serves ``path``.

    A new one is *not* spawned here: the next shim ``start`` spawns it on
    demand (:func:`supervisor.launch.forkclient.spawn_server`), from
    containerd's context -- one spawned from this command's shell could differ
    from containerd's (LSM label, namespaces, seccomp) and would then refuse
    every ``start``.
    """
    found = forkserver_status(path, timeout)
    if found is None or found["error"] == REFUSED:
        return None  # nothing serves it (a killed server's file): the next start spawns one
    result: dict[str, Any] = {"socket": path, "pid": found["pid"], "code": found["code"],
                              "installed_code": installed, "action": "failed",
                              "error": found["error"]}
    if found["error"]:
        return result
    if found["code"] == installed:
        result["action"] = "kept"
        return result
    try:
        forkclient.retire(path, installed, timeout)
    except forkclient.NoServer:
        result["action"] = "gone"  # ended between the two questions
    except (forkclient.ForkServerError, OSError) as e:
        result["error"] = str(e) or type(e).__name__
    else:
        result["action"] = "retired"
    return result


def format_upgrade(outcomes: Sequence[Outcome], skipped: Sequence[Bundle],
                   fork_server: dict[str, Any] | None, out: TextIO) -> None:
    rows = []
    for o in outcomes:
        code = _dash(o.from_code)
        if o.upgraded:
            code = f"{code} -> {_dash(o.code)}"
        rows.append([_dash(o.pid), ",".join(o.containers) or o.address,
                     "upgraded" if o.upgraded else "NOT-UPGRADED", _dash(o.upgrades),
                     _dash(o.upgrade_attempts), code, o.error])
    out.write(table(("SHIM-PID", "CONTAINERS", "RESULT", "UPGRADES", "ATTEMPTS", "CODE",
                     "NOTE"), rows))
    for b in skipped:
        out.write(f"skipped {b.namespace}/{b.id}: {b.error}\n")
    if fork_server is not None:
        f = fork_server
        what = {
            "kept": "runs the installed code; kept",
            "retired": f"retired (ran {f['code']}); the next shim start spawns a new one",
            "gone": "ended meanwhile; the next shim start spawns a new one",
        }.get(f["action"], f"NOT retired: {f['error']}")
        out.write(f"fork server pid {_dash(f['pid'])} ({f['socket']}): {what}\n")
    done = sum(o.upgraded for o in outcomes)
    out.write(f"{done} of {len(outcomes)} shims upgraded\n")


async def cmd_upgrade(args: argparse.Namespace, out: TextIO) -> int:
    shims, skipped = upgrade_targets(args)
    limit = trio.CapacityLimiter(args.parallel)
    outcomes: dict[str, Outcome] = {}

    async def one(address: str) -> None:
        async with limit:
            outcomes[address] = await upgrade_shim(
                address, shims[address], timeout=args.timeout, wait=args.wait,
                quiesce=args.quiesce_timeout)

    async with trio.open_nursery() as nursery:
        for address in shims:
            nursery.start_soon(one, address)
    fork_server = None
    if args.all and args.forkserver:
        fork_server = await trio.to_thread.run_sync(
            renew_forkserver, args.forkserver, forkclient.code_identity(), args.timeout)
    ordered = [outcomes[a] for a in shims]
    if args.json:
        json.dump({"shims": [o.json() for o in ordered],
                   "skipped": [{"namespace": b.namespace, "id": b.id, "error": b.error}
                               for b in skipped],
                   "forkserver": fork_server}, out, indent=2)
        out.write("\n")
    else:
        format_upgrade(ordered, skipped, fork_server, out)
    failed = not all(o.upgraded for o in ordered) or (
        fork_server is not None and fork_server["action"] == "failed")
    return EXIT_FAILED if failed else EXIT_OK


# --- main ---------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="supervisor",
        description="Inspect io.containerd.supervisor.v2 shims through their sockets "
                    "(works while containerd is down).",
    )
    top.add_argument("--version", action="version", version=f"supervisor {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                       help=f"containerd's state dir (default {DEFAULT_STATE_DIR})")
        p.add_argument("--namespace", "-n", default=None,
                       help="only this namespace (default: all)")
        p.add_argument("--json", action="store_true", help="JSON output (docs/inspect-json.md)")
        p.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT,
                       help=f"seconds for each connect and call (default {DEFAULT_TIMEOUT:g})")

    ls = sub.add_parser("ls", help="every shim-served container, one line each, and the "
                                   "fork server")
    common(ls)
    ls.add_argument("--forkserver", metavar="SOCKET", default=forkclient.socket_path() or "",
                    help=f"the fork server's socket (default ${forkclient.SOCKET_ENV}, as "
                         f"start reads it, or {forkclient.DEFAULT_SOCKET}; empty: do not ask)")
    up = sub.add_parser("upgrade", help="re-exec running shims with the code installed now, "
                                        "keeping their containers, connections and stdio")
    up.add_argument("targets", nargs="*", metavar="ID|SOCKET",
                    help="container ids (their shims), socket paths or unix:// addresses")
    up.add_argument("--all", action="store_true",
                    help="every shim ls finds (of --namespace, if given), and retire the fork "
                         "server if it runs other code")
    common(up)
    up.add_argument("--wait", type=_positive, default=DEFAULT_UPGRADE_WAIT,
                    help="seconds for each shim's whole upgrade "
                         f"(default {DEFAULT_UPGRADE_WAIT:g})")
    up.add_argument("--quiesce-timeout", type=_positive, default=0.0, metavar="S",
                    help="seconds a shim waits for calls in flight before giving up the "
                         "attempt (default: the shim's)")
    up.add_argument("--parallel", type=_count, default=DEFAULT_PARALLEL,
                    help=f"shims upgraded at once (default {DEFAULT_PARALLEL})")
    up.add_argument("--forkserver", metavar="SOCKET", default=forkclient.socket_path() or "",
                    help="the fork server's socket, as for ls (empty: leave it alone)")
    for name, text in (("inspect", "everything about one container (or one shim)"),
                       ("events", "a shim's event outbox: pending and recently delivered")):
        p = sub.add_parser(name, help=text)
        p.add_argument("target", metavar="ID|SOCKET",
                       help="container id, socket path or unix:// address")
        common(p)
        p.add_argument("--limit", type=int, default=0,
                       help="at most this many pending events (default 256)")
    return top


def command(name: str) -> Callable[[argparse.Namespace, TextIO], Awaitable[int]]:
    if name == "ls":
        return cmd_ls
    if name == "inspect":
        return cmd_inspect
    if name == "events":
        return cmd_events
    if name == "upgrade":
        return cmd_upgrade
    raise UsageError(f"unknown command {name!r}")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return trio.run(command(args.command), args, out)
    except UsageError as e:
        err.write(f"supervisor {args.command}: {e}\n")
        return EXIT_USAGE
    except Failed as e:
        err.write(f"supervisor {args.command}: {e}\n")
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
