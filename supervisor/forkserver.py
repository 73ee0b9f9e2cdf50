"""``supervisor-forkserver``: shim daemons forked from a pre-imported parent (the server).

Why
---
A cold shim daemon is a new interpreter importing trio, protobuf and our
modules: ~190 ms before it answers containerd and ~20 MB of private memory
each.  The fork server imports all of that once, warms it up, keeps it
shared (:func:`supervisor.cow.keep_shared`: every object immortal, so no shim
writes a reference count into the server's pages; its free small blocks
filled; ``gc.freeze()``, so the collector never writes to them either) and
forks one shim per request.
A forked shim answers in a few milliseconds and shares the imported code and
objects copy-on-write.
``start`` asks the fork server, falls back to the cold start on any failure,
and spawns one when none serves (on demand: nothing to install); its side
of the protocol, and what both sides share (the
:class:`~supervisor.launch.forkclient.Request` schema, fd passing, the one
codec :mod:`supervisor.launch._msgpack`), is
:mod:`supervisor.launch.forkclient`.  This module is the server alone: it
runs beside the daemon and imports it.

Life
----
Started by the first ``start`` that finds none serving
(:func:`~supervisor.launch.forkclient.spawn_server`, which passes it the
socket's lock, already taken, as ``--lock-fd``), or by systemd or by hand
(then it takes the lock itself, waiting while another server holds it).  It
holds the lock for its whole life and writes its pid in the lock file.  It
ends on SIGTERM or SIGINT, or by retiring (:meth:`ForkServer.retire`) when a
client of other code asks it for a shim; either way it removes its socket
only while the file is still the inode it bound.

Protocol
--------
One ``SOCK_SEQPACKET`` connection per shim on a 0600 unix socket
(:data:`~supervisor.launch.forkclient.DEFAULT_SOCKET`, or
``$SUPERVISOR_FORKSERVER``; empty disables it)::

    client -> server   msgpack map (see Request, with the client's code
                       identity) + SCM_RIGHTS: the shim's bound, listening socket
    server -> client   {"pid": N} + SCM_RIGHTS: write end of the shim's go pipe
                       | {"error": "why"} (no fd)
                       | {"error": "why", "retired": true}: other code; it has
                         released its socket and lock and ends
    client -> shim     one byte "g" on the go pipe: only now does it serve

    client -> server   {"op": "status"}
    server -> client   {"pid", "version", "code", "protocol", "started",
                        "served", "socket", "spare": pid of the parked spare or nil,
                        "zygote": pid of the zygote or nil}

The server forks an intermediate child that forks the shim and exits at once
(the server reaps it), so the shim is nobody's child, like a cold shim whose
``start`` has exited -- or, usually, hands the request to its spare (below),
forked the same way ahead of time.  The shim starts a new session, moves to the bundle,
takes the client's environment, umask, rlimits, nice value and CPU affinity,
gets /dev/null on 0-2, the listener on fd 3 and nothing else, has every signal
disposition and the mask as a fresh interpreter has them, shows the cold
command line and its environment in ``/proc/PID/cmdline`` and ``environ``
(``PR_SET_MM_MAP``), reports its pid (or why it failed) on
a status pipe and waits for the go byte before running the same code as a
cold daemon (:func:`supervisor.daemon.action_serve`).

The spare
---------
A fork of this ~30 MB process and the child's first steps cost a ``start``
~1.5 ms of its ~11 (measured: docs/benchmarks.md).  So the server keeps one
shim forked ahead (unless ``--no-spare``): the *spare*, forked as a shim is,
which does at once what a shim does before it knows its request (a session
of its own, signals as a fresh interpreter's), keeps no fd but 0-2 on
/dev/null and its end of a ``SOCK_SEQPACKET`` socketpair with the server
(:func:`_park`), shows as ``supervisor-forkserver spare`` in ``ps``, tells the
server ``R<pid>`` and blocks on that socket::

    server -> spare    the packed Request (checked) + SCM_RIGHTS: the shim's
                       listener, the status pipe's write end, the go pipe's read end

after which it runs the same code as a freshly forked shim (:func:`_assume`)
and reports on the status pipe; the server answers the client as for a fork.
A request takes the spare only once it is parked and alive (a killed one: the
request is served by a fresh fork, as is one whose spare died before its
report); each spare serves at most one request.  The next spare is forked
between connections, once the last client served a shim has exited (or
:data:`SPARE_HOLD` passed) and no connection waits (:meth:`ForkServer.quiet`):
never while a ``start`` still runs on a machine of few cores.  A spare is
killed, never handed out, when the server retires or stops; when the server
dies it reads end of file and exits.  It is an idle process of ours that costs
memory (``bench/compare`` reports it with the server's); ``supervisor ls``
shows its pid (the status answer's ``spare``).

The zygote
----------
A spare keeps as its own every page its parent writes after forking it (the
old copy is mapped by nobody else), and the server writes ~95 pages serving
each request (its code's counters, its allocations, the interpreter's own
state): ~0.37 MiB more private memory per shim (measured, docs/benchmarks.md).
So, with a spare, the server forks once, right after its preload, a *zygote*
(:func:`_zygote`) that does nothing but fork the spares: the server sends it
each spare's end of the control socketpair (``fork_spare``), it forks the
spare via an intermediate it reaps, and writes only what that read and fork
need (~44 pages).  It holds no fd of the server's (0-2 on /dev/null, its
control socket), shows as ``supervisor-forkserver zygote``, tells the server
``Z<pid>`` (the status answer's ``zygote``) and exits at end of file: when
the server ends, retires or dies.  A zygote that is gone is dropped; the
server then forks the spares itself, as it does before the zygote reports.

Invariants
----------
* At most one daemon serves a listener: the client's write of the go byte is
  the single commit point.  A client that times out closes its connection
  and never got or wrote the go pipe; a server that dies closes its copy; in
  both cases the shim reads EOF and exits without serving, so the client's
  cold fallback can never race a late forked shim.  A failed write (EPIPE)
  means that shim is gone, so the fallback is again safe.
* A forked shim is refused unless it would equal a cold one where the
  client's own process cannot fix it afterwards: same uid (SO_PEERCRED), same
  namespaces (and those its children would be born in), root directory,
  credentials, capabilities, no_new_privs, seccomp and LSM label as the
  client.  The client's side of that comparison is what the kernel says about
  the connected process, every thread of it (:func:`peer_identity`), never
  what the client says;
  a refusal names what differs, never a value of the server's.  Anything else
  is copied from the client (see above), which the same credentials let it set
  itself; cgroups and the OOM score are set by ``start`` on the returned pid.
* It never forks a shim for a request of another code identity or protocol
  version: a client that passes the peer checks makes it retire, one that
  does not is refused (its files are not necessarily this server's).  Every
  check is made per request, before the spare is handed anything; the spare
  is this server's code (a retiring server kills it).
* A shim that was the spare equals one forked for its request: everything a
  shim takes from its request is set after the request arrives, and the
  spare holds no fd of the server's (the shim has 0-2, the listener on 3 and,
  until it serves, the go pipe on 5).
* The server runs trio only in its preload's :func:`warm_up` (which also
  rehearses an idle shim's daemon, :mod:`supervisor.rehearsal`), which ends
  before the first fork and leaves no thread behind; it starts no threads
  (fork safety), handles one
  connection at a time with every read and write of it bounded by
  :data:`REQUEST_TIMEOUT` (the shim's report by :data:`SETUP_TIMEOUT`, a
  spare still parking by :data:`SPARE_WAIT`, the stale-socket probe at start-up by
  :data:`~supervisor.launch.sockfile.PROBE_TIMEOUT`), answers a bad request
  with an error and keeps serving, and outlives a failed ``accept`` (out of
  fds, a reset connection).  No child ever
  returns into the server's code: every child path ends in ``os._exit``.
* Both sides speak one codec, :mod:`supervisor.launch._msgpack` (it reads
  all it writes); the msgpack package is not used.
* The client's whole exchange (connect, send, answer, go) is bounded by one
  deadline (:data:`~supervisor.launch.forkclient.CLIENT_TIMEOUT`).
"""

from __future__ import annotations

import _socket
import argparse
import ctypes
import errno
import fcntl
import functools
import importlib
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from supervisor import __version__, _ksm, cow, rehearsal, ttrpc
from supervisor.daemon import OwnSocket, action_serve
from supervisor.launch import _msgpack, sockfile
from supervisor.launch.defaults import LISTEN_FD
from supervisor.launch.flags import Flags
from supervisor.launch.forkclient import (
    DEFAULT_SOCKET,
    MAX_MESSAGE,
    PROTOCOL,
    SOCKET_ENV,
    ForkServerError,
    Request,
    code_identity,
    open_beside,
    open_folder,
    recv_fds,
    send_fds,
    sibling,
    write_pid,
)

_T = TypeVar("_T")

REQUEST_TIMEOUT = 2.0  # server: each read and write of one connection
SETUP_TIMEOUT = 5.0  # server: fork until the shim reports its pid
SPARE_WAIT = 0.5  # server: a request waits this long for a spare still parking
SPARE_HOLD = 0.05  # server: after an answer, the next spare waits this long for its client's exit
STATUS_FD = 4  # transient in the shim: its report to the server
GO_FD = 5  # transient in the shim: the go pipe
# Modules a daemon uses beyond this module's own imports; loading them before
# gc.freeze() is the point of the fork server.
PRELOAD = ("supervisor.shimlog", "supervisor.options", "encodings.ascii")
EXIT_SETUP_FAILED = 121
#: errnos of a failed ``accept`` the server outlives (see :meth:`ForkServer.serve_forever`).
ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                              errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
ACCEPT_PAUSE = 0.1  # seconds before accepting again after a transient failure


# --------------------------------------------------------------------------- identity


#: Namespaces a forked shim would share with the server, not with its client; the
#: ``*_for_children`` ones are where a cold start's daemon would be born.
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "time",
              "pid_for_children", "time_for_children")
#: Lines of /proc/PID/status a forked shim takes from the server, not from its client.
STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                 "NoNewPrivs", "Seccomp", "Seccomp_filters")
#: getsockopt: a pidfd of the peer that connected (Linux 6.5); <asm-generic/socket.h>.
SO_PEERPIDFD = getattr(_socket, "SO_PEERPIDFD", 77)
#: Errors that mean "this kernel has no such file" (the same for server and client);
#: any other error reading the client's identity refuses it.
_ABSENT = (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP)


#: The value of a key on which the threads of one process differ (never a thread's value).
THREADS_DIFFER = "differs between threads"


def identity(proc: str = "/proc/self") -> dict[str, object]:
    """What a forked shim cannot take from its client, of the process at ``proc``.

    Namespaces, root directory, credentials, capabilities, no_new_privs,
    seccomp and the LSM label; each key's value, or None where this kernel has
    no such thing.  All of these are per thread (``setns``, ``unshare``, raw
    ``setresuid``/``capset``, ``PR_SET_NO_NEW_PRIVS`` and seccomp act on the
    calling thread), and which thread of the client connected is unknown: so
    every thread's (``proc/task/*``) is read, and a key on which they differ
    gets :data:`THREADS_DIFFER`, which equals no process's value.  A thread
    that ends while it is read is left out (its creator was read, or is
    itself gone).  OSError (other than "absent") propagates: the caller
    refuses.
    """
    found: dict[str, object] | None = None
    for tid in os.listdir(f"{proc}/task"):
        task = f"{proc}/task/{tid}"
        try:
            one = _thread_identity(task)
        except FileNotFoundError:
            continue  # ended meanwhile
        if not os.path.exists(task):
            continue  # ended while read: its "absent" files may be None
        if found is None:
            found = one
        else:
            for key, value in one.items():
                if found[key] != value:
                    found[key] = THREADS_DIFFER
    if found is None:
        raise ProcessLookupError(errno.ESRCH, "no thread left", proc)
    return found


def _thread_identity(task: str) -> dict[str, object]:
    """:func:`identity`'s keys of one thread, ``/proc/PID/task/TID``."""
    found: dict[str, object] = {}

    def absent(e: OSError) -> None:
        if e.errno not in _ABSENT:
            raise e

    for name in NAMESPACES:
        try:
            st = os.stat(f"{task}/ns/{name}")
            found[f"{name} namespace"] = (st.st_dev, st.st_ino)
        except OSError as e:
            absent(e)
            found[f"{name} namespace"] = None
    root = os.stat(f"{task}/root")
    found["root directory"] = (root.st_dev, root.st_ino)
    status = dict.fromkeys(STATUS_FIELDS)
    with open(f"{task}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in status:
                status[key] = " ".join(value.split())
    found.update(status)
    try:
        with open(f"{task}/attr/current", "rb") as label:
            found["LSM label"] = label.read().rstrip(b"\0\n")
    except OSError as e:
        absent(e)
        found["LSM label"] = None
    return found


def identity_mismatch(ours: Mapping[str, object], theirs: Mapping[str, object]) -> str | None:
    """The first of ``ours``' keys whose value ``theirs`` does not share, or None.

    Only the key's name: the answer goes to the client, which must not learn the
    server's values (nor, by trying, its capabilities one refusal at a time).
    """
    for key in ours:
        if key not in theirs or theirs[key] != ours[key]:
            return key
    return None


def peer_identity(conn: _socket.socket) -> dict[str, object]:
    """The identity of the process at the other end of ``conn``, as the kernel tells it.

    The peer is the process that called ``connect``: a pidfd of it comes from
    ``SO_PEERPIDFD`` (Linux 6.5), else from ``pidfd_open`` of the
    ``SO_PEERCRED`` pid.  Its /proc files are read by pid, then the pidfd must
    show the process still running: a pid is reused only after its process is
    gone, so what was read was that process's.  (The fallback's pidfd is only as
    good as the pid: a client that exits while its connection waits in the
    backlog and whose pid a new process gets meanwhile would be mistaken for
    that process; kernels with ``SO_PEERPIDFD`` close that window.)
    ForkServerError if the peer cannot be identified.
    """
    try:
        pidfd = conn.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise ForkServerError(f"cannot identify the client: {e.strerror}") from None
        pid = struct.unpack("3i", conn.getsockopt(
            _socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        try:
            pidfd = os.pidfd_open(pid) if pid > 0 else -1
        except OSError:
            pidfd = -1
        if pidfd < 0:
            raise ForkServerError("cannot identify the client: it is gone") from None
    try:
        pid = _pidfd_pid(pidfd)
        if pid <= 0:  # -1: exited; 0: in a pid namespace this server cannot see into
            raise ForkServerError("cannot identify the client: it is gone or out of sight")
        try:
            found = identity(f"/proc/{pid}")
        except OSError as e:
            raise ForkServerError(f"cannot read the client's identity: {e.strerror}") from None
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if poller.poll(0):  # readable: the process exited, its pid may be another's now
            raise ForkServerError("cannot identify the client: it exited")
        return found
    finally:
        os.close(pidfd)


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, in this server's pid namespace (fdinfo's ``Pid:``)."""
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Pid":
                return int(value)
    raise ForkServerError("cannot identify the client: no pid for its pidfd")


# --------------------------------------------------------------------------- the shim side


def _reset_signals() -> None:
    """Dispositions and mask as a fresh interpreter has them (the server blocked all)."""
    fresh: dict[int, Any] = {signal.SIGINT: signal.default_int_handler,
                             signal.SIGPIPE: signal.SIG_IGN,
                             signal.SIGXFSZ: signal.SIG_IGN}  # what Python sets up at its start
    for sig in signal.valid_signals():
        want = fresh.get(sig, signal.SIG_DFL)
        try:
            if signal.getsignal(sig) != want:
                signal.signal(sig, want)
        except (OSError, ValueError):
            continue  # SIGKILL, SIGSTOP and the signals libc reserves cannot be set
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _arrange_fds(listener_fd: int, status_fd: int, go_fd: int) -> None:
    """0-2 /dev/null, the listener on 3, status on 4, go on 5; every other fd closed."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    # Lift every source above every target so that no dup2 clobbers another source.
    lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16)
              for fd in (devnull, listener_fd, status_fd, go_fd)]
    for target in (0, 1, 2):
        os.dup2(lifted[0], target)
    os.dup2(lifted[1], LISTEN_FD)  # inheritable, as posix_spawn's dup2 leaves it cold
    os.dup2(lifted[2], STATUS_FD, inheritable=False)
    os.dup2(lifted[3], GO_FD, inheritable=False)
    _close_fds_but({LISTEN_FD, STATUS_FD, GO_FD})


def _close_fds_but(keep: set[int]) -> None:
    """Close every fd above 2 not in ``keep`` (what the server held stays out of a shim)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue  # the directory listing's own fd, closed already


class Native:
    """libc through ctypes, prepared once in the server; a shim only calls it."""
    PR_SET_NAME = 15
    PR_SET_MM = 35
    PR_SET_MM_MAP = 14

    def __init__(self) -> None:
        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.sbrk.restype = ctypes.c_void_p
        self.libc.sbrk.argtypes = [ctypes.c_long]
        self.libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                                    ctypes.c_ulong, ctypes.c_ulong]

        class MmMap(ctypes.Structure):  # struct prctl_mm_map, <linux/prctl.h>
            _fields_ = [(n, ctypes.c_uint64) for n in (
                "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
                ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]

        self.mm_map = MmMap

    @staticmethod
    def replace_environ(env: Mapping[str, str]) -> None:
        """``os.environ`` (and so the C environment) becomes ``env``, changing only what differs.

        The server never sets variables behind ``os.environ``'s back, so the two agree.
        """
        current = os.environ
        for key in [k for k in current if k not in env]:
            del current[key]
        for key, value in env.items():
            if current.get(key) != value:
                current[key] = value

    def show_as(self, argv: Sequence[str], env: Mapping[str, str]) -> object | None:
        """Make ``/proc/self/{cmdline,environ,comm}`` show ``argv`` and ``env``, as if exec'd.

        ``PR_SET_MM_MAP`` (CONFIG_CHECKPOINT_RESTORE, no capability needed)
        points the kernel at new buffers, which must live as long as the
        process: the caller keeps the returned object.  None if refused (the
        fork server's command line and environment then show instead).
        """
        ctypes = self.ctypes
        comm = ctypes.create_string_buffer(os.fsencode(os.path.basename(argv[0]))[:15])
        self.libc.prctl(self.PR_SET_NAME, ctypes.addressof(comm), None, 0, 0)
        args = b"".join(os.fsencode(a) + b"\0" for a in argv)
        envs = b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items())
        buf = ctypes.create_string_buffer(args + envs, len(args) + len(envs))
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        field = [0, 0, 0, 0, *map(int, stat[stat.rindex(")") + 2 :].split()[1:])]  # 1-based
        arg_start = ctypes.addressof(buf)
        env_start = arg_start + len(args)
        mm = self.mm_map(field[26], field[27], field[45], field[46], field[47],
                         self.libc.sbrk(0) or 0, field[28], arg_start, env_start,
                         env_start, env_start + len(envs), 0, 0, 0xFFFFFFFF)
        if self.libc.prctl(self.PR_SET_MM, self.PR_SET_MM_MAP, ctypes.addressof(mm),
                           ctypes.sizeof(mm), 0) != 0:
            return None
        kept: object = buf
        return kept


def _report_error(fd: int, e: BaseException) -> None:
    try:
        os.write(fd, b"E" + f"{type(e).__name__}: {e}".encode(errors="replace")[:4000])
    except OSError:
        pass  # the server went away; it reports the shim as failed either way


def _become_shim(request: Request, listener_fd: int, status_fd: int, go_fd: int, *,
                 server_sockets: Sequence[_socket.socket], native: Native) -> None:
    """The grandchild: set up like a cold shim, report, wait for go, serve, exit."""
    try:
        _leave_server(server_sockets)
    except BaseException as e:
        _report_error(status_fd, e)
        os._exit(EXIT_SETUP_FAILED)
    _assume(request, listener_fd, status_fd, go_fd, native)


def _leave_server(server_sockets: Sequence[_socket.socket]) -> None:
    """What a forked child does before it knows its request: no server socket objects
    (their fds are closed later), signals as a fresh interpreter's, a session of its own."""
    for s in server_sockets:
        s.detach()  # their fds are closed later; the objects must not close reused ones
    _reset_signals()
    os.setsid()


def _assume(request: Request, listener_fd: int, status_fd: int, go_fd: int,
            native: Native) -> None:
    """Become the shim of ``request`` (after :func:`_leave_server`): the rest of a cold
    shim's setup, report, wait for go, serve, exit.  Never returns."""
    report = status_fd
    try:
        os.chdir(request.cwd)
        native.replace_environ(request.env)
        _arrange_fds(listener_fd, status_fd, go_fd)
        report = STATUS_FD
        os.umask(request.umask)
        for which, soft, hard in request.rlimits:
            if resource.getrlimit(which) != (soft, hard):
                resource.setrlimit(which, (soft, hard))
        if os.getpriority(os.PRIO_PROCESS, 0) != request.nice:
            os.setpriority(os.PRIO_PROCESS, 0, request.nice)
        if sorted(os.sched_getaffinity(0)) != request.affinity:
            os.sched_setaffinity(0, request.affinity)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        keep = [native.show_as(request.argv, request.env)]  # referenced until os._exit
        sys.argv = request.argv[1:] or request.argv
        os.write(STATUS_FD, b"P%d" % os.getpid())
        os.close(STATUS_FD)
        report = -1
        go = os.read(GO_FD, 1)
        os.close(GO_FD)
        if go != b"g":
            os._exit(0)  # nobody committed to this shim: vanish without serving
        flags = Flags(namespace=request.namespace, id=request.id, address=request.address,
                      debug=request.debug)
        rc = action_serve(flags, code=request.code)
        logging.shutdown()
        keep.clear()
        os._exit(rc)
    except BaseException as e:
        if report >= 0:
            _report_error(report, e)
        os._exit(EXIT_SETUP_FAILED)


# --------------------------------------------------------------------------- the spare

#: How a parked spare shows in ``ps`` (``/proc/PID/cmdline``) until it becomes a shim.
SPARE_TITLE = ("supervisor-forkserver", "spare")


def _alone(control: int, server_sockets: Sequence[_socket.socket], native: Native,
           title: Sequence[str], tag: bytes) -> tuple[_socket.socket, object]:
    """What a spare and the zygote do first: leave the server (:func:`_leave_server`),
    put 0-2 on /dev/null, close every fd but ``control`` (moved to 16 or above), show
    as ``title`` and tell the server ``<tag><pid>`` on ``control``.  Returns the control
    socket, and what must stay referenced for as long as the title shows."""
    _leave_server(server_sockets)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    lifted = fcntl.fcntl(control, fcntl.F_DUPFD_CLOEXEC, 16)
    _close_fds_but({lifted})
    title_kept = native.show_as(title, os.environ)
    sock = _socket.socket(fileno=lifted)
    sock.send(tag + b"%d" % os.getpid())
    return sock, title_kept


def _park(control: int, server_sockets: Sequence[_socket.socket], native: Native) -> None:
    """The spare: a grandchild forked ahead of time that waits on ``control`` for its request.

    It does at once what a forked shim does before it knows its request
    (:func:`_leave_server`), holds nothing of the server's (0-2 on
    /dev/null, every fd but ``control`` closed: not the server's listener,
    lock or log), tells the server ``R<pid>`` and blocks on one message: a
    packed :class:`Request` with three fds (the shim's listener, the status
    pipe's write end, the go pipe's read end), after which it runs the same
    :func:`_assume` as a freshly forked shim.  End of file (the server
    retired, stopped or died, or killed its spare) or anything else: it
    exits without serving.  Never returns.
    """
    try:
        sock, _title = _alone(control, server_sockets, native, SPARE_TITLE, b"R")  # kept
        data, fds, flags, _ = recv_fds(sock, MAX_MESSAGE, 3)
        sock.detach()  # control is closed by _arrange_fds: no object may close a reused fd
        if not data or len(fds) != 3 or flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
            os._exit(0)  # no request: the server let it go
        request = Request.from_wire(_msgpack.unpackb(data))
    except BaseException:
        os._exit(EXIT_SETUP_FAILED)  # the server finds it gone and forks afresh
    _assume(request, fds[0], fds[1], fds[2], native)


#: How the zygote shows in ``ps`` (``/proc/PID/cmdline``).
ZYGOTE_TITLE = ("supervisor-forkserver", "zygote")


def _zygote(control: int, server_sockets: Sequence[_socket.socket], native: Native) -> None:
    """The zygote: a grandchild forked once, right after the preload, that forks the spares.

    Why: a spare keeps, as its own, every page its parent writes after forking
    it (it is the only other process that still maps the old copy).  The
    server writes ~95 pages in each request it serves (measured: its code's
    counters, its allocations, the interpreter's state); the zygote writes
    only what a read and a fork need.  It does what a spare does first
    (:func:`_alone`: out of the server's state, 0-2 on /dev/null, every fd but
    ``control`` closed), shows as ``supervisor-forkserver zygote``, tells the server ``Z<pid>``
    and then, for each message from the server with one fd (a spare's end of
    its control socketpair), forks a spare (:func:`_park`) via an intermediate
    it reaps.  End of file (the server ended or let it go) or anything else:
    it exits.  Never returns.
    """
    try:
        sock, _title = _alone(control, server_sockets, native, ZYGOTE_TITLE, b"Z")  # kept
        while True:
            data, fds, flags, _ = recv_fds(sock, 16, 1)
            if not data or len(fds) != 1 or flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
                break
            spare_control = fds[0]
            try:
                intermediate = _fork_detached(
                    functools.partial(_park, spare_control, [sock], native))
            except OSError:  # EAGAIN under pids.max, ENOMEM: no spare this time
                continue  # the server finds the spare's socket closed and forks one itself
            finally:
                os.close(spare_control)
            os.waitpid(intermediate, 0)
    except BaseException:
        pass
    os._exit(0)


class Spare:
    """The server's handle on its spare: the control socket, and its pid once parked."""

    def __init__(self, control: _socket.socket) -> None:
        self.control = control
        self.pid = 0  # known from its "R<pid>" message

    def ready(self, timeout: float) -> bool:
        """Whether it is parked and alive: waits up to ``timeout`` for its ``R<pid>``."""
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        if not self.pid:
            if not poller.poll(timeout * 1000):
                return False
            try:
                message = self.control.recv(64)
            except OSError:
                return False
            if not (message.startswith(b"R") and message[1:].isdigit()):
                return False  # b"": it ended
            self.pid = int(message[1:])
        return not poller.poll(0)  # no hang-up (it died), nothing unexpected to read

    def assign(self, request: Request, listener_fd: int) -> tuple[int, int]:
        """Hand it ``request``: (status pipe's read end, go pipe's write end), as
        :meth:`ForkServer.fork_shim` gives; OSError if it is gone."""
        status_r, go_w, _ = _shim_pipes(lambda status_w, go_r: send_fds(
            self.control, [_msgpack.packb(request.to_wire())], [listener_fd, status_w, go_r]))
        return status_r, go_w

    def kill(self) -> None:
        """SIGKILL it if it is parked and alive (its pid is then still its own)."""
        if not self.pid:
            return  # not parked yet: it finds its control socket closed and exits
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            return  # gone
        try:
            if self.ready(0):  # alive after the pidfd was taken: the pidfd is the spare's
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)

    def close(self) -> None:
        """Let it go: it reads end of file and exits (a handed-out one has its request)."""
        self.control.close()


# --------------------------------------------------------------------------- the server


def _fork_detached(child: Callable[[], object],
                   on_error: Callable[[BaseException], object] = lambda e: None) -> int:
    """Run ``child`` (which never returns) in a grandchild, with all signals blocked
    across the forks; return the intermediate's pid, which exits at once: reap it.

    The grandchild is nobody's child here (re-parented to the subreaper or init),
    so the server never reaps a shim.  ``on_error`` runs in the intermediate if
    its fork fails.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:  # the intermediate: fork, exit at once
            code = EXIT_SETUP_FAILED
            try:
                if os.fork() == 0:
                    child()  # no return
                code = 0
            except BaseException as e:
                on_error(e)
            finally:
                os._exit(code)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return pid


class ForkServer:
    """The accept loop; one connection at a time, each bounded by REQUEST_TIMEOUT.

    ``code`` is the :func:`~supervisor.launch.forkclient.code_identity` it was
    started from; a request of another (or of another protocol) from a client
    that passes the peer checks makes it :meth:`retire`.  ``lock_fd`` is the
    locked lock file, held until it ends or retires.  With ``spare`` it keeps
    one shim forked ahead (:attr:`spare`, see "The spare" in the module's
    docstring).
    """

    def __init__(self, sock: socket.socket, log: logging.Logger, *, path: str = "",
                 code: str = "", lock_fd: int = -1, own: OwnSocket | None = None,
                 spare: bool = False) -> None:
        self.sock = sock
        self.log = log
        self.identity = identity()
        self.native = Native()
        self.served = 0
        self.path = path
        self.code = code
        self.lock_fd = lock_fd
        self.started = int(time.time())  # whole seconds: the codec has no floats
        self.retired = False
        #: The socket file as bound, removed at most once and only while still ours.
        self.own = own
        self.keep_spare = spare
        #: The shim forked ahead, parked (:func:`_park`); None between its use and the next.
        self.spare: Spare | None = None
        #: A pidfd of the last client served a shim, until the next spare is forked.
        self.last_client = -1
        #: The control socket of the zygote that forks the spares (:func:`_zygote`), and
        #: its pid; None (then the server forks them) until :meth:`start_zygote`, or
        #: once it is gone.
        self.zygote: _socket.socket | None = None
        self.zygote_pid = 0

    def serve_forever(self) -> None:
        """Accept and handle one connection at a time until retired.

        A failed ``accept`` that can pass (:data:`ACCEPT_TRANSIENT`: out of
        fds or memory, a connection reset in the backlog) is logged and
        retried after :data:`ACCEPT_PAUSE`, so that the server outlives it
        without spinning; any other error ends it.  Before each ``accept``
        it forks a spare if it keeps one, has none and :meth:`quiet` says so.
        """
        while not self.retired:
            if self.keep_spare and self.spare is None and self.quiet():
                self.fork_spare()
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                if e.errno not in ACCEPT_TRANSIENT:
                    raise
                self.log.warning("accept failed: %s; retrying", e)
                time.sleep(ACCEPT_PAUSE)
                continue
            try:
                self.handle(conn)
            except Exception:
                self.log.exception("request failed")  # and keep serving
            finally:
                conn.close()

    def quiet(self) -> bool:
        """Whether to fork the spare now: no connection waits, and the last client
        served a shim has exited (or :data:`SPARE_HOLD` passed).

        A ``start`` still has work after its answer (the go byte, cgroups, the OOM
        score, its exit) on a machine of few cores; a fork of the server then
        would slow it down.  A connection that arrives meanwhile is served at once
        (by a fresh fork): the wait never holds up a client.
        """
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        client, self.last_client = self.last_client, -1
        try:
            if client >= 0:
                poller.register(client, select.POLLIN)  # readable: it exited
            events = poller.poll(SPARE_HOLD * 1000 if client >= 0 else 0)
        finally:
            if client >= 0:
                os.close(client)
        return all(fd != self.sock.fileno() for fd, _ in events)

    def status(self) -> dict[str, Any]:
        """The answer to ``{"op": "status"}`` (``supervisor ls``)."""
        return {"pid": os.getpid(), "version": __version__, "code": self.code,
                "protocol": PROTOCOL, "started": self.started, "served": self.served,
                "socket": self.path,
                "spare": self.spare.pid if self.spare and self.spare.ready(0) else None,
                "zygote": self.zygote_pid or None}

    def stale(self, wire: object) -> str | None:
        """Why a request shows this server to be of other code than its client's, or None.

        Only a well-formed claim counts: an int protocol version not ours, or
        ours with a code identity not ours; anything else is a bad request.
        """
        if not isinstance(wire, dict):
            return None
        version, code = wire.get("v"), wire.get("code")
        if isinstance(version, int) and not isinstance(version, bool) and version != PROTOCOL:
            return f"the client speaks protocol {version}, this fork server {PROTOCOL}"
        if version == PROTOCOL and isinstance(code, str) and code != self.code:
            return f"the client's code is {code}, this fork server's {self.code}"
        return None

    def retire(self, why: str) -> None:
        """Stop accepting and release the socket and the lock; :meth:`serve_forever` ends.

        The socket file is removed only while it is still this server's
        (:class:`~supervisor.daemon.OwnSocket`), then the listener is
        closed (connections waiting in its backlog are reset: their clients
        start cold) and the lock released -- all before the retiring request
        is answered, so its client's new server can take both at once.  Shims
        forked earlier are not this server's children and are left alone.
        """
        self.log.info("retiring: %s", why)
        self.retired = True
        self.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def close(self) -> None:
        """Let the socket go: the spare dropped, the file removed while it is still this
        server's (:class:`~supervisor.daemon.OwnSocket`: at most once), the listener
        closed.  Idempotent.  The lock stays held until :meth:`retire` releases it or the
        process ends."""
        self.drop_spare()
        self.drop_zygote()
        if self.own is not None:
            self.own.remove()
        self.sock.close()

    def handle(self, conn: _socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        peer_pid, peer_uid, _ = struct.unpack(
            "3i", conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i")))
        fds: list[int] = []
        intermediate = 0
        try:
            try:
                try:  # read it even to refuse it: a close with unread data resets the peer
                    data, fds, flags, _ = recv_fds(conn, MAX_MESSAGE, 1)
                except OSError as e:  # a timeout, or the client went away
                    raise ForkServerError(f"reading the request: {e or type(e).__name__}"
                                          ) from None
                if peer_uid != os.geteuid():
                    raise ForkServerError(f"uid {peer_uid} may not use this fork server")
                if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
                    raise ForkServerError("request too large or with too many fds")
                if not data:
                    raise ForkServerError("empty request")
                try:
                    wire = _msgpack.unpackb(data)
                except ValueError as e:
                    raise ForkServerError(f"undecodable request: {e}") from None
                if isinstance(wire, dict) and wire.get("op") == "status":
                    self.reply(conn, self.status())
                    return
                stale = self.stale(wire)
                why = identity_mismatch(self.identity, peer_identity(conn)) if stale else None
                if stale and not why:  # a peer it could serve: its code is what is on disk
                    self.retire(stale)
                    self.reply(conn, {"error": f"{stale}: it retires", "retired": True})
                    return
                request = Request.from_wire(wire)
                if len(fds) != 1:
                    raise ForkServerError(f"want 1 fd (the shim's listener), got {len(fds)}")
                check_listener(fds[0])
                if not stale:  # a stale request's peer was read above
                    why = identity_mismatch(self.identity, peer_identity(conn))
                if why:
                    raise ForkServerError("a forked shim would differ from a cold one: "
                                          f"the client's {why} is not the fork server's")
                pid, go_w, intermediate, spare = self.launch(request, fds[0], conn)
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                self.served += 1
                self.log.info("shim %d for %s/%s (request %d from pid %d, %s)", pid,
                              request.namespace, request.id, self.served, peer_pid,
                              "the spare" if spare else "forked")
                self.reply(conn, {"pid": pid}, go_w)
            finally:
                os.close(go_w)  # the client's copy (if it got one) is now the only one
            if self.keep_spare:
                self.watch_client(peer_pid)
        except ForkServerError as e:
            self.log.warning("refused request from pid %d: %s", peer_pid, e)
            self.reply(conn, {"error": str(e)})
        finally:
            if intermediate:
                os.waitpid(intermediate, 0)  # after the answer: its exit is not on the path

    def launch(self, request: Request, listener_fd: int, conn: _socket.socket
               ) -> tuple[int, int, int, bool]:
        """The shim of ``request``, set up and reported: (its pid, the go pipe's write
        end, an intermediate to reap after the answer or 0, whether the spare became it).

        The spare when it is parked and alive (waited for up to :data:`SPARE_WAIT`
        if it is still parking); else -- none, gone, or it died before its report
        -- a fresh fork, so a killed spare costs the request nothing but the
        time.  The spare is used once either way; :meth:`serve_forever` forks the
        next after the answer.  ForkServerError if the shim's setup failed.
        """
        spare, self.spare = self.spare, None
        if spare is not None:
            try:
                if spare.ready(SPARE_WAIT):
                    try:
                        status_r, go_w = spare.assign(request, listener_fd)
                    except OSError as e:
                        self.log.warning("spare %d is gone (%s); forking", spare.pid, e)
                    else:
                        try:
                            return self._reported(status_r, go_w), go_w, 0, True
                        except ShimDied:
                            self.log.warning("spare %d died before its report; forking",
                                             spare.pid)
                else:
                    self.log.warning("the spare is gone or not parked; forking")
            finally:
                spare.close()
        status_r, go_w, intermediate = self.fork_shim(request, listener_fd, conn)
        try:
            return self._reported(status_r, go_w), go_w, intermediate, False
        except BaseException:
            os.waitpid(intermediate, 0)
            raise

    def _reported(self, status_r: int, go_w: int) -> int:
        """:meth:`await_shim` on ``status_r``, closed either way; ``go_w`` closed too if
        there is no pid (nobody will send the go byte)."""
        try:
            return self.await_shim(status_r)
        except BaseException:
            os.close(go_w)
            raise
        finally:
            os.close(status_r)

    def fork_spare(self) -> None:
        """Fork :attr:`spare` (:func:`_park`) via an intermediate child, reaped here.

        Called between connections, never on a client's clock.  A failure is
        logged: the next request is served by a fresh fork.  With a zygote
        (:meth:`start_zygote`) the zygote forks it: the server only sends it the
        spare's end of the socketpair (a zygote that is gone is dropped, and the
        server forks this spare and the next ones itself).
        """
        if self.zygote is not None:
            try:
                ours, theirs = _socket.socketpair(
                    _socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
            except OSError as e:
                self.log.warning("no spare: %s", e)
                return
            try:
                send_fds(self.zygote, [b"S"], [theirs.fileno()])
            except OSError as e:
                ours.close()
                self.log.warning("the zygote is gone (%s); forking spares here", e)
                self.drop_zygote()
            else:
                self.spare = Spare(ours)
                return
            finally:
                theirs.close()
        control = self._fork_controlled(_park, "spare")
        if control is not None:
            self.spare = Spare(control)

    def _fork_controlled(self, body: Callable[[int, Sequence[_socket.socket], Native], None],
                         what: str) -> _socket.socket | None:
        """``body(control fd, the server's sockets, native)`` in a detached grandchild
        (via an intermediate reaped here): our end of its control socketpair, or None
        (logged as "no ``what``")."""
        try:
            ours, theirs = _socket.socketpair(_socket.AF_UNIX,
                                              _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        except OSError as e:
            self.log.warning("no %s: %s", what, e)
            return None
        try:
            child = _fork_detached(
                lambda: body(theirs.detach(), [self.sock, ours], self.native))
        except OSError as e:
            ours.close()
            self.log.warning("no %s: fork: %s", what, e)
            return None
        finally:
            theirs.close()
        os.waitpid(child, 0)
        return ours

    def start_zygote(self) -> None:
        """Fork the zygote that forks the spares from now on (:func:`_zygote`), via an
        intermediate reaped here, and wait up to :data:`SPARE_WAIT` for its ``Z<pid>``.
        A failure is logged: the server forks its spares itself."""
        ours = self._fork_controlled(_zygote, "zygote")
        if ours is None:
            return
        ours.settimeout(SPARE_WAIT)
        try:
            message = ours.recv(64)
        except OSError:
            message = b""
        if not (message.startswith(b"Z") and message[1:].isdigit()):
            ours.close()
            self.log.warning("no zygote: it did not report")
            return
        ours.settimeout(REQUEST_TIMEOUT)  # each spare's fd is sent within this
        self.zygote, self.zygote_pid = ours, int(message[1:])

    def drop_zygote(self) -> None:
        """Let the zygote go: it reads end of file and exits (its spares are the server's)."""
        zygote, self.zygote, self.zygote_pid = self.zygote, None, 0
        if zygote is not None:
            zygote.close()

    def watch_client(self, pid: int) -> None:
        """Remember a pidfd of the client ``pid`` for :meth:`quiet` (none if it is gone;
        a reused pid only moves the spare's fork in time)."""
        if self.last_client >= 0:
            os.close(self.last_client)
        try:
            self.last_client = os.pidfd_open(pid)
        except OSError:
            self.last_client = -1

    def drop_spare(self) -> None:
        """Kill the spare, if any (a retiring or stopping server: never hand it out)."""
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.kill()
            spare.close()

    def reply(self, conn: _socket.socket, answer: dict[str, Any], fd: int | None = None) -> None:
        try:
            send_fds(conn, [_msgpack.packb(answer)], [] if fd is None else [fd])
        except OSError as e:
            self.log.warning("could not answer %r: %s", answer, e)

    def fork_shim(self, request: Request, listener_fd: int, conn: _socket.socket
                  ) -> tuple[int, int, int]:
        """Fork the shim via an intermediate child: (status pipe, go pipe, intermediate pid).

        The status pipe's read end gets the shim's report; the go pipe's write
        end is for the client.  The intermediate exits at once; reap it.
        """
        def fork(status_w: int, go_r: int) -> int:
            try:
                return _fork_detached(
                    lambda: _become_shim(request, listener_fd, status_w, go_r,
                                         server_sockets=[self.sock, conn], native=self.native),
                    on_error=lambda e: _report_error(status_w, e))
            except OSError as e:
                raise ForkServerError(f"fork: {e}") from None

        return _shim_pipes(fork)

    def await_shim(self, status_r: int) -> int:
        """The shim's pid from its report on the status pipe (ForkServerError if none)."""
        poller = select.poll()
        poller.register(status_r, select.POLLIN)
        if not poller.poll(SETUP_TIMEOUT * 1000):
            raise ForkServerError(f"the shim did not report within {SETUP_TIMEOUT:g} s")
        status = os.read(status_r, 4096)
        if status.startswith(b"P") and status[1:].isdigit():
            return int(status[1:])
        if status.startswith(b"E"):
            raise ForkServerError("shim setup failed: " + status[1:].decode(errors="replace"))
        raise ShimDied("the shim died during its setup")


def _shim_pipes(hand: Callable[[int, int], _T]) -> tuple[int, int, _T]:
    """A shim's status and go pipes: ``hand(status_w, go_r)`` gives the shim its ends (a
    spare by fd passing, a fork by inheritance); returns (``status_r``, ``go_w``, what
    ``hand`` returned).  The shim's ends are closed here after ``hand`` either way, ours
    too if it raises."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        handed = hand(status_w, go_r)
    except BaseException:
        os.close(status_r)
        os.close(go_w)
        raise
    finally:
        os.close(status_w)
        os.close(go_r)
    return status_r, go_w, handed


class ShimDied(ForkServerError):
    """The shim ended before it reported its pid (killed, or a failure it could not tell)."""


def check_listener(fd: int) -> None:
    """``fd`` must be a listening unix stream socket (what ``start`` binds)."""
    copy = os.dup(fd)
    try:
        sock = _socket.socket(fileno=copy)
    except OSError as e:
        os.close(copy)
        raise ForkServerError(f"the fd is not a socket: {e}") from None
    try:
        listening = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)
        if sock.family != _socket.AF_UNIX or sock.type != _socket.SOCK_STREAM or not listening:
            raise ForkServerError("the fd is not a listening unix stream socket")
    finally:
        sock.close()


#: How many times :func:`warm_up` runs its round: the interpreter specialises an
#: instruction once it has run it a few times (its warm-up counter), so a path run
#: once would still be specialised by each shim.
WARM_UP_RUNS = 3
WARM_UP_TIMEOUT = 2.0  # seconds for each round; a round that fails is only logged


async def _warm_up_round() -> None:
    async def echo(ctx: ttrpc.CallContext, payload: bytes) -> bytes:
        return payload

    quiet = logging.getLogger("supervisor.forkserver.warm-up")
    quiet.disabled = True
    with trio.fail_after(WARM_UP_TIMEOUT):
        server = ttrpc.Server(logger=quiet)
        server.register("supervisor.WarmUp", {"Echo": echo})
        ours, theirs = trio.socket.socketpair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, trio.SocketStream(ours))
            async with ttrpc.Client(trio.SocketStream(theirs)) as client:
                for size in (16, 64, 4096) * 3:
                    await client.call("supervisor.WarmUp", "Echo", bytes(size))
                    await trio.sleep(0)
            await server.shutdown()


def warm_up(log: logging.Logger) -> None:
    """Run a little of what every shim runs, here, before the first fork: trio's
    scheduler, a ttrpc server and client talking over a socket pair, then an idle
    shim's daemon (:func:`supervisor.rehearsal.rehearse`).

    The interpreter specialises the bytecode it runs, writing into the code
    objects; done here, the shims find it done instead of each copying those
    pages (:mod:`supervisor.cow`).  Each round is a ``trio.run`` of its own
    that returns with no thread, fd, file, signal handler or wakeup fd left
    behind, the root logger's handlers as they were and the process no subreaper
    (``tests/unit/test_cow.py`` compares them).  Only an optimisation: a round
    that fails or exceeds :data:`WARM_UP_TIMEOUT` is logged and the server goes
    on.  SIGTERM and SIGINT are held meanwhile, so that a stop lands as
    :class:`_Stop` in the server's own code, not inside trio.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        for _ in range(WARM_UP_RUNS):
            trio.run(_warm_up_round)
        for _ in range(WARM_UP_RUNS):
            rehearsal.rehearse()
    except Exception as e:
        log.warning("warm-up failed (each shim copies a little more memory): %s", e)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def preload(log: logging.Logger) -> None:
    """Import what a daemon uses, warm it up, and keep it shared with the shims to come
    (:func:`supervisor.cow.keep_shared`: immortal, the free blocks filled, frozen out of
    the collector's reach)."""
    for name in PRELOAD:
        importlib.import_module(name)
    warm_up(log)
    log.debug("preloaded %d modules: %s", len(sys.modules), cow.keep_shared())


def bind(path: str) -> socket.socket:
    """The server's listening socket at ``path``, 0600; a stale socket is replaced, a live
    one is not (OSError EADDRINUSE).

    Claimed as a shim's socket is (:mod:`supervisor.launch.sockfile`, with
    ``SOCK_SEQPACKET``): bound at a private name, listening, then linked into
    place, so a client never finds the file refusing connections while a
    server starts.  The file there is replaced only when a connect to it is
    refused (a probe bounded by :data:`~supervisor.launch.sockfile.PROBE_TIMEOUT`,
    under the directory's lock): a busy server, or a socket of another kind, is
    left alone.  A missing directory is made 0700.
    """
    kind = _socket.SOCK_SEQPACKET
    try:
        raw = sockfile.listen(path, kind)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        replaced = sockfile.replace_stale(path, kind)
        if replaced is None:
            raise OSError(errno.EADDRINUSE, f"a fork server already serves {path} "
                                            "(or something else listens there)") from None
        raw = replaced
    return socket.socket(fileno=raw.detach())


class _Stop(BaseException):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def take_lock(path: str, lock_fd: int | None, log: logging.Logger) -> int:
    """The locked lock file of the socket ``path`` (see :mod:`supervisor.launch.forkclient`),
    with this process's pid in it.

    ``lock_fd``: the lock its spawning ``start`` took and passed.  Else (started
    by systemd or by hand) it is taken here, waiting while another server
    holds it: an on-demand server of the same socket serves meanwhile.
    """
    if lock_fd is None:
        folder = open_folder(path)  # PermissionError for a directory others may write
        try:
            lock_fd = open_beside(folder, path, ".lock", os.O_RDWR | os.O_CREAT)
        finally:
            os.close(folder)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the fork server holding %s to end", sibling(path, ".lock"))
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
    else:
        os.set_inheritable(lock_fd, False)  # not for the shims it forks
    write_pid(lock_fd, os.getpid())
    return lock_fd


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supervisor-forkserver",
        description="Fork pre-imported shim daemons for containerd-shim-supervisor-v2 "
                    "(its `start` uses this socket when present, and starts one like this "
                    "when none answers).")
    parser.add_argument("--socket", default=os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET,
                        help=f"unix socket to serve (default ${SOCKET_ENV} or {DEFAULT_SOCKET};"
                             " start reads the same variable)")
    parser.add_argument("--debug", action="store_true", help="log every step")
    parser.add_argument("--code-identity", default="",
                        help="the code identity to serve under (default: computed at start-up; "
                             "the spawning `start` passes the one it computed)")
    parser.add_argument("--no-spare", action="store_true",
                        help="fork each shim on request instead of keeping one forked ahead "
                             "(slower start; no idle spare process)")
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="the socket's lock file, already locked (passed by `start`)")
    args = parser.parse_args(argv)
    # Computed before the preload; the spawning `start` passes what it computed before
    # this process imported anything, so a change of the files while it starts can only
    # make it retire early, never serve old code as new.  (Started by hand or systemd,
    # this module's own imports came first: an upgrade within those ~100 ms is missed.)
    code = args.code_identity or code_identity()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor-forkserver: %(levelname)s %(message)s")
    log = logging.getLogger("supervisor.forkserver")
    os.chdir("/")  # not the bundle of the start that spawned it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        lock_fd = take_lock(args.socket, args.lock_fd, log)
    except _Stop:
        return 0
    except OSError as e:
        log.error("cannot lock %s: %s", sibling(args.socket, ".lock"), e)
        return 1
    server: ForkServer | None = None
    try:
        try:
            sock = bind(args.socket)
        except OSError as e:
            log.error("cannot serve %s: %s", args.socket, e)
            return 1
        # (A stop before the next line leaves the socket file behind: the next server
        # replaces it, as any stale one, see bind.)
        server = ForkServer(sock, log, path=args.socket, code=code, lock_fd=lock_fd,
                            own=OwnSocket(sock), spare=not args.no_spare)
        # Bound first: a start that comes meanwhile waits in the backlog for a forked
        # shim (~0.1-0.3 s) instead of starting one more cold one.  The server's own
        # objects (above) are preloaded with the rest: frozen and immortal too.
        preload(log)
        if server.keep_spare:
            server.start_zygote()
        log.info("%s", _ksm.apply())
        log.info("pid %d serving %s (version %s, code %s)", os.getpid(), args.socket,
                 __version__, code)
        server.serve_forever()
    except _Stop as e:
        log.info("stopping on signal %s", e)
    finally:
        if server is not None:
            server.close()  # a retired server has already: a no-op then
    return 0


if __name__ == "__main__":
    sys.exit(main())

