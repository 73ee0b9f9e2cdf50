"""``python -m supervisor.upgrade``: the new code's side of an in-place shim upgrade.

Two ways to run it (issue 17; the old code's side is :class:`supervisor.daemon.Upgrader`):

``--check``
    The pre-flight check the shim runs, as a child, before it quiesces:
    import everything the daemon needs, then print one JSON line,
    ``{"code": <code identity>, "formats": [<state formats it loads>],
    "version": <version>}``.  Any failure is a non-zero exit and a traceback
    on stderr (which the shim reports).

``--adopt STATE_FD --fallback SNAPSHOT_FD [--error MESSAGE] [-- CMDLINE...]``
    What the shim execs into: load the state (:mod:`supervisor.handover`),
    rebuild the shim from it and serve (:func:`supervisor.daemon.serve_adopted`).
    Anything that goes wrong before it serves -- an unloadable state, an
    import that fails, a bug -- execs the old code back from its snapshot
    (:mod:`supervisor.codesnap`) with the same state and ``--error`` saying
    why; the old code adopts the state it wrote and records the error.  Only
    the standard library is imported before the ``try`` that guards this, so
    even an ImportError of the new code falls back.  With ``--error`` (the
    old code, adopting its own state) there is nothing left to fall back to.

``$SUPERVISOR_UPGRADE_FAIL`` makes the new code fail, for tests of the fallback
(never set in production): ``adopt`` refuses every state; ``serve`` fails with
everything rebuilt, just before serving.
"""

from __future__ import annotations

import gc
import os
import sys

FAIL_ENV = "SUPERVISOR_UPGRADE_FAIL"
USAGE = ("usage: python -m supervisor.upgrade --check\n"
         "       python -m supervisor.upgrade --adopt STATE_FD --fallback SNAPSHOT_FD "
         "[--error MESSAGE]")


def check() -> int:
    """Import what the daemon needs and say which code this is and what it loads."""
    import json

    import supervisor.daemon  # noqa: F401  (everything the daemon imports)
    from supervisor import __version__
    from supervisor.handover import FORMATS
    from supervisor.launch.forkclient import code_identity

    print(json.dumps({"code": code_identity(), "formats": list(FORMATS),
                      "version": __version__}), flush=True)
    return 0


def fallback_argv(state_fd: int, snapshot_fd: int, error: str,
                  cmdline: list[str]) -> list[str]:
    """The old code, from its snapshot (:mod:`supervisor.codesnap`), adopting the state
    it wrote, told why the new code did not (``cmdline`` as in
    :func:`supervisor.handover.adopt_argv`).  Here, not in :mod:`supervisor.handover`,
    so that it is at hand even when importing that failed."""
    return [sys.executable, "-I", f"/proc/self/fd/{snapshot_fd}", "--adopt", str(state_fd),
            "--fallback", str(snapshot_fd), "--error", error[:2000], "--", *cmdline]


def _fallback(state_fd: int, snapshot_fd: int, error: str, cmdline: list[str],
              spares: dict[int, int] | None = None) -> None:
    """Exec the old code from its snapshot with the same state; returns only if that fails.

    ``spares``: fd -> a duplicate made before adopting began; each is put back on
    its number first, so whatever the failed adoption closed (an object dropped
    half-built closes its socket) the old code finds as it left it.
    """
    # A half-built object in a reference cycle closes its fd when collected: no
    # collection may run once the fds are put back (nothing below makes garbage that
    # refcounting alone would not free).
    gc.disable()
    argv = fallback_argv(state_fd, snapshot_fd, error, cmdline)
    fds: list[int] = []
    try:
        from supervisor.handover import read

        doc = read(state_fd)
        named = doc.get("fds", []) if isinstance(doc, dict) else []
        fds = [fd for fd in named if isinstance(fd, int)] if isinstance(named, list) else []
    except BaseException as e:  # even the reader failed to import: the fds stay as they are
        print(f"supervisor.upgrade: reading the state for the fallback: {e!r}", file=sys.stderr)
    # Last, each on its own (one bad fd must not leave the others behind): the fds back
    # on their numbers, and everything the old code needs made to survive the exec.
    for fd, spare in (spares or {}).items():
        try:
            os.dup2(spare, fd)
        except OSError as e:
            print(f"supervisor.upgrade: restoring fd {fd}: {e!r}", file=sys.stderr)
    for fd in (state_fd, snapshot_fd, *fds, *(spares or {})):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass  # not open: the old code's check names it
    sys.stderr.flush()
    os.execv(argv[0], argv)


def adopt(state_fd: int, snapshot_fd: int, error: str, cmdline: list[str]) -> int:
    """Adopt the state in ``state_fd`` and serve; on failure before serving, fall back."""
    try:
        if os.environ.get(FAIL_ENV) == "adopt" and not error:
            raise RuntimeError(f"${FAIL_ENV}=adopt: refusing the state (a test)")
        from supervisor import daemon
        from supervisor.handover import load

        state = load(state_fd)
        spares = {fd: os.dup(fd) for fd in state["fds"]}  # close-on-exec copies
    except BaseException as e:
        if error:
            raise  # the old code cannot adopt its own state: nothing left to run
        _fallback(state_fd, snapshot_fd, f"the new code could not load the state: "
                                         f"{type(e).__name__}: {e}", cmdline)
        raise

    def fail(exc: BaseException) -> None:
        if not error:
            _fallback(state_fd, snapshot_fd,
                      f"the new code could not adopt: {type(exc).__name__}: {exc}", cmdline,
                      spares)

    def served() -> None:
        if os.environ.get(FAIL_ENV) == "serve" and not error:
            raise RuntimeError(f"${FAIL_ENV}=serve: failing before serving (a test)")
        for spare in spares.values():
            os.close(spare)

    return daemon.serve_adopted(state, state_fd=state_fd, snapshot_fd=snapshot_fd,
                                error=error, fail=fail, served=served)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        return check()
    options: dict[str, str] = {}
    rest = list(args)
    cmdline: list[str] = []
    if "--" in rest:  # the shim's first command line, shown by ps: carried, not read
        cut = rest.index("--")
        rest, cmdline = rest[:cut], rest[cut + 1:]
    while rest:
        key = rest.pop(0)
        if key not in ("--adopt", "--fallback", "--error") or not rest or key in options:
            print(USAGE, file=sys.stderr)
            return 2
        options[key] = rest.pop(0)
    try:
        state_fd, snapshot_fd = int(options["--adopt"]), int(options["--fallback"])
    except (KeyError, ValueError):
        print(USAGE, file=sys.stderr)
        return 2
    return adopt(state_fd, snapshot_fd, options.get("--error", ""), cmdline)


if __name__ == "__main__":
    sys.exit(main())
