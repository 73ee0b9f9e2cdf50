"""supervisor.cow: what keeps a fork server's pages shared with the shims it forks.

Each check runs in a child interpreter: immortalizing the test process's own objects
would keep them from ever being freed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from supervisor import cow

needs_immortal = pytest.mark.skipif(cow.immortal_supported() is not None,
                                    reason=f"no immortal objects here: {cow.immortal_supported()}")


def run_child(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` (which sets ``result``) in a fresh interpreter; its ``result``."""
    script = textwrap.dedent(code) + "\nimport json, sys\nsys.stdout.write(json.dumps(result))\n"
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded: dict[str, object] = json.loads(out.stdout)
    return loaded


SAMPLE_STATS = """\
Small block threshold = 512, in 32 size classes.

class   size   num pools   blocks in use  avail blocks
-----   ----   ---------   -------------  ------------
    0     16           1             296           725
    1     32          12            5724           396
   31    512           7             193            24

# arenas allocated total           =                   15
14 arenas * 1048576 bytes/arena    =           14,680,064
"""


def test_the_free_blocks_per_size_are_read_from_the_interpreters_table() -> None:
    assert cow.parse_mallocstats(SAMPLE_STATS) == {16: 725, 32: 396, 512: 24}
    assert cow.parse_mallocstats("") == {}
    stats = cow.parse_mallocstats(cow.mallocstats())
    # pymalloc in use: some of its 32 classes, 16 bytes apart (a class with no pool is
    # not listed)
    assert len(stats) > 8 and set(stats) <= set(range(16, 513, 16))


@needs_immortal
def test_immortal_objects_pages_stay_shared_with_a_forked_child() -> None:
    # Each object below is one 1 MiB bytes (mmap'd on its own): the page of its header
    # holds its reference count and nothing else.  The child uses both the way a shim
    # uses what it shares with its fork server; only the mortal one's page is copied.
    result = run_child("""
        import os, struct, sys
        from supervisor import cow
        PAGE = os.sysconf("SC_PAGE_SIZE")

        def frame(obj):
            with open("/proc/self/pagemap", "rb") as f:
                f.seek(id(obj) // PAGE * 8)
                return struct.unpack("Q", f.read(8))[0] & ((1 << 55) - 1)

        shared = bytes(1 << 20)
        made = cow.immortalize()
        mortal = bytes(1 << 20)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            held = [shared, mortal] * 100
            os.write(w, struct.pack("QQ", frame(shared), frame(mortal)))
            os._exit(0)
        child = struct.unpack("QQ", os.read(r, 16))
        os.waitpid(pid, 0)
        result = {"made": made, "parent": [frame(shared), frame(mortal)], "child": child,
                  "immortal": sys.getrefcount(shared) == cow.IMMORTAL_REFCNT,
                  "mortal": sys.getrefcount(mortal) != cow.IMMORTAL_REFCNT}
    """)
    assert result["made"] and result["immortal"] and result["mortal"]
    parent, child = result["parent"], result["child"]
    assert isinstance(parent, list) and isinstance(child, list)
    if not any(parent):  # pagemap hides frame numbers from an unprivileged reader
        pytest.skip("page frame numbers not readable here")
    assert child[0] == parent[0], "the immortal object's page was copied"
    assert child[1] != parent[1], "the control's page was not copied: the check proves nothing"


@needs_immortal
def test_immortalize_reaches_functions_code_and_constants_not_what_comes_after() -> None:
    result = run_child("""
        import sys
        from supervisor import cow

        def used():
            return "a constant only this code holds, " + str(len(sys.argv))

        made = cow.immortalize()
        later = ["made after"]
        mortal_later = sys.getrefcount(later) != cow.IMMORTAL_REFCNT
        code = used.__code__
        result = {
            "made": made,
            "again": cow.immortalize() < made // 10,
            "immortal": [sys.getrefcount(o) == cow.IMMORTAL_REFCNT
                         for o in (used, code, code.co_consts[1], code.co_names, cow,
                                   cow.immortalize, sys.modules)],
            "later": mortal_later,
            "works": used().startswith("a constant"),
        }
    """)
    assert result["made"] and result["again"] and result["later"] and result["works"]
    assert result["immortal"] == [True] * 7


def test_tagging_gives_each_class_its_version_tag_before_the_fork() -> None:
    # A lookup on a class with no version tag yet writes one into its type object (a
    # page a shim would copy); after tag_types, a lookup writes nothing there.  The
    # control, made after the tagging, shows that a lookup would have written.
    result = run_child("""
        import ctypes
        from supervisor import cow

        def image(cls):
            return ctypes.string_at(id(cls), type(cls).__basicsize__)

        class Tagged:
            pass

        looked = cow.tag_types()

        class Control:
            pass

        images = {}
        for cls in (Tagged, Control):
            before = image(cls)
            getattr(cls, "some_attribute", None)
            images[cls.__name__] = before == image(cls)
        result = {"looked": looked, **images}
    """)
    assert result["Tagged"] is True
    assert result["Control"] is False
    assert isinstance(result["looked"], int) and result["looked"] > 100


def test_plugging_fills_the_free_blocks_of_partly_used_pools() -> None:
    result = run_child("""
        from supervisor import cow
        kept = [bytes(n) for n in (20, 60, 100, 200, 400) for _ in range(300)]
        del kept[::3]  # free blocks here and there, in five size classes
        before = cow.parse_mallocstats(cow.mallocstats())
        plugged = cow.plug_small_block_holes()
        after = cow.parse_mallocstats(cow.mallocstats())
        result = {"plugged": plugged, "before": before, "after": after}
    """)
    before, after = result["before"], result["after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    if not before:
        pytest.skip("pymalloc is not in use")
    filled = [s for s in before if int(s) >= 48]
    assert result["plugged"] >= sum(before[s] for s in filled)
    # The holes punched above are gone: what is free afterwards is what the check
    # itself allocated and freed, at most the rest of one new pool per size (16 KiB
    # less a 48-byte header), not holes spread over many pages.
    punched = ["64", "96", "144", "240", "448"]  # the block sizes of bytes(20), (60)...
    assert sum(before[s] for s in punched) >= 500, before
    assert all(after[s] < before[s] for s in punched), (before, after)
    assert all(after[s] <= (16384 - 48) // int(s) + 8 for s in filled), (before, after)


@pytest.mark.skipif(not cow.heap_info(), reason="no glibc malloc_info here")
def test_plugging_fills_the_free_chunks_of_the_c_heap() -> None:
    # Objects larger than pymalloc's blocks are malloc'd; every other one freed leaves
    # free chunks among the kept ones, which a forked shim's mallocs would take (and
    # copy their pages).  After filling, next to none are left.
    result = run_child("""
        from supervisor import cow

        def free_chunks():
            main = cow.heap_info().split('<heap nr="0">', 1)[1].split("</heap>", 1)[0]
            return sum(int(count) for _, _, count in cow._FREE_CHUNKS.findall(main))

        kept = [bytes(600 + 16 * (i % 40)) for i in range(4000)]
        del kept[::2]
        before = free_chunks()
        made = cow.plug_heap_holes()
        result = {"before": before, "made": made, "after": free_chunks()}
    """)
    assert isinstance(result["before"], int) and result["before"] > 100
    assert result["made"] >= result["before"]
    assert isinstance(result["after"], int) and result["after"] * 10 < result["before"]


def test_immortality_is_refused_where_the_count_is_not_pep_683s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for version in ((3, 11), (3, 14)):
        monkeypatch.setattr(sys, "version_info", (*version, 0, "final", 0))
        assert "not CPython 3.12 or 3.13" in str(cow.immortal_supported())
    monkeypatch.undo()
    monkeypatch.setattr(sys.implementation, "name", "pypy")
    assert "not CPython" in str(cow.immortal_supported())
    monkeypatch.undo()
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda name: 1 if name == "Py_GIL_DISABLED" else None)
    assert cow.immortal_supported() == "a free-threaded build"
    monkeypatch.undo()
    monkeypatch.setattr(sys, "getobjects", lambda: [], raising=False)
    assert cow.immortal_supported() == "a Py_TRACE_REFS build"


def test_plugging_is_skipped_under_a_debug_allocator() -> None:
    result = run_child("""
        from supervisor import cow
        result = {"debug": cow.debug_allocator(), "plugged": cow.plug_small_block_holes()}
    """, env={"PYTHONMALLOC": "pymalloc_debug"})
    assert result == {"debug": True, "plugged": 0}


WARM_UP_STATE = textwrap.dedent("""
    import ctypes, logging, os, signal, sys, tempfile, threading
    from supervisor import forkserver, rehearsal

    def state():
        flag = ctypes.c_int(-1)
        ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
        root = logging.getLogger()
        return {"threads": threading.active_count(),
                "fds": sorted(os.listdir("/proc/self/fd")),
                "handlers": [str(signal.getsignal(s)) for s in
                             (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)],
                "wakeup": signal.set_wakeup_fd(-1),
                "mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ())),
                "subreaper": flag.value,
                "root": [repr(h) for h in root.handlers] + [root.level],
                "cwd": os.getcwd(),
                "files": sorted(os.listdir(tempfile.gettempdir()))}

    class Warnings(logging.Handler):
        def __init__(self):
            super().__init__()
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    warnings = Warnings()
    log = logging.getLogger("t")
    log.addHandler(warnings)
    signal.signal(signal.SIGTERM, lambda *a: None)  # as the server's own handler
""")


def test_the_warm_up_leaves_no_thread_fd_handler_or_wakeup_fd_behind(tmp_path: Path) -> None:
    # With the rehearsal of an idle shim (supervisor.rehearsal): the daemon's reaper
    # made the process a subreaper, its logging swapped the root handlers, its files
    # were in a temporary directory: all undone.
    result = run_child(WARM_UP_STATE + textwrap.dedent("""
        before = state()
        forkserver.warm_up(log)
        result = {"before": before, "after": state(), "warnings": warnings.seen}
    """), env={"TMPDIR": str(tmp_path)})
    assert result["before"] == result["after"]
    assert result["warnings"] == []


def test_a_failed_rehearsal_is_only_logged_and_cleaned_up(tmp_path: Path) -> None:
    # The daemon fails after it set up (subreaper, logging, files): the warm-up logs
    # the failure, undoes what the rehearsal did and returns.
    result = run_child(WARM_UP_STATE + textwrap.dedent("""
        def broken(*args, **kwargs):
            raise RuntimeError("broken on purpose")

        from supervisor import daemon
        daemon.TaskService.connect = broken
        before = state()
        forkserver.warm_up(log)
        result = {"before": before, "after": state(), "warnings": warnings.seen}
    """), env={"TMPDIR": str(tmp_path)})
    assert result["before"] == result["after"]
    assert len(result["warnings"]) == 1 and "warm-up failed" in result["warnings"][0]


def test_a_rehearsal_serves_the_daemon_and_forwards_its_events() -> None:
    # What the rehearsal runs, counted from outside: the daemon's Task service served
    # Connect and State, the outbox's events reached the fake containerd.
    result = run_child("""
        from supervisor import daemon, rehearsal, task
        calls = {"connect": 0, "state": 0, "forward": 0}

        def counted(name, method):
            async def call(*args, **kwargs):
                calls[name] += 1
                return await method(*args, **kwargs)
            return call

        task.TaskService.connect = counted("connect", task.TaskService.connect)
        task.TaskService.state = counted("state", task.TaskService.state)
        rehearsal._forward = counted("forward", rehearsal._forward)
        rehearsal.rehearse()
        result = calls
    """)
    assert result == {"connect": 2, "state": 2, "forward": 4}


def test_the_fork_servers_preload_makes_its_objects_immortal_unless_told_not_to() -> None:
    code = """
        import logging, sys
        from supervisor import cow, forkserver
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        forkserver.preload(logging.getLogger("t"))
        result = {"immortal": sys.getrefcount(forkserver.preload) == cow.IMMORTAL_REFCNT,
                  "frozen": __import__("gc").get_freeze_count() > 0}
    """
    on = run_child(code)
    off = run_child(code, env={cow.IMMORTAL_ENV: "0"})
    assert on["frozen"] and off["frozen"]
    assert on["immortal"] is (cow.immortal_supported() is None)
    assert off["immortal"] is False
