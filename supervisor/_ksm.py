"""Kernel samepage merging (KSM) for shim daemons: identical private pages, shared again.

Why
---
A forked shim shares the fork server's pages only until it writes to them, and
CPython writes to most of them (reference counts, specialised bytecode): about
8 MiB per shim turn private.  Yet shims run the same code over the same
objects, so most of those private pages are byte-identical from one shim to
the next (measured: 6.2 of 8.0 MiB, page for page).  KSM finds such pages and
maps one copy-on-write copy for all; it scans only memory a process opted in.

So every shim daemon (and the fork server) opts its whole address space in
with ``prctl(PR_SET_MEMORY_MERGE)`` (Linux 6.4 and later).  That costs nothing
until the host runs KSM (``echo 1 > /sys/kernel/mm/ksm/run``, the operator's
choice, since ``ksmd`` spends CPU scanning); ``SUPERVISOR_KSM=0`` in
containerd's environment opts the shims out.  Older kernels refuse the call,
and the shim runs as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PR_SET_MEMORY_MERGE = 67
ENV = "SUPERVISOR_KSM"


def wanted(env: Mapping[str, str]) -> bool:
    return env.get(ENV, "1").strip().lower() not in ("0", "no", "false", "off")


def apply(env: Mapping[str, str] = os.environ) -> str:
    """Opt this process's memory in (or out, per ``$SUPERVISOR_KSM``); what was done, or why not."""
    import ctypes  # noqa: PLC0415 - only the daemon and the fork server get here

    on = wanted(env)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        return f"KSM opt-{'in' if on else 'out'} unavailable: {os.strerror(err)}"
    return "memory mergeable by KSM" if on else "KSM opted out ($SUPERVISOR_KSM)"
