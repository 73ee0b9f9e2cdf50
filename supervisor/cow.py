"""Keeping a fork server's memory shared with the shims it forks (copy-on-write).

A forked shim shares every page of the fork server until one of them writes to
it; the first write copies the page, and from then on it is the shim's own
(``Private_Dirty``).  ``gc.freeze()`` already keeps the collector from writing
into the imported objects.  Measured per page (a forked shim against its
server, ``/proc/PID/pagemap`` and the changed words, 2026-11-30), what was left
to copy an idle shim's ~7.4 MiB was, in order:

1. **Reference counts.**  Every use of a function, class, module dict or
   constant increments and decrements its count, so a shim copies each page it
   merely reads an object from.  CPython 3.12 made some objects *immortal*
   (PEP 683): their count is never written.  :func:`immortalize` makes every
   object the server holds immortal, so nothing it shares is written for being
   used.  That is a write of the reference count field itself, the layout
   PEP 683 fixes for 3.12 and 3.13 (``_Py_IMMORTAL_REFCNT``, all of the low 32
   bits set); it is checked on a probe first and skipped on any other
   interpreter.  The price: those objects are never freed, in the server
   (where they live for its whole life anyway) or in a shim (which drops
   little of them: modules, classes, functions, constants).
2. **Free small blocks.**  pymalloc hands a new object the free block of a
   partly used pool first, and the server's pools have a few thousand such
   holes spread over hundreds of pages; each new object of a shim landed in one
   and copied its page.  :func:`plug_small_block_holes` fills them with inert
   objects the server keeps, so a shim's new objects go to fresh pools, packed.
3. **Specialised bytecode**: the adaptive interpreter writes its caches into
   the code objects a shim runs.  The fork server runs trio and a ttrpc round
   trip, and rehearses an idle shim's daemon (:mod:`supervisor.rehearsal`),
   a few times before it forks (:func:`supervisor.forkserver.warm_up`); the
   code only a shim runs (a container's Create and stdio, the fork's child
   side) is most of what a shim still copies besides its own new objects
   (docs/benchmarks.md).
4. **Type version tags.**  A class gets its version tag at its first attribute
   lookup; one the server never looked anything up on got it in each shim,
   which copied the page of its type object.  :func:`tag_types` gives every
   class its tag in the server.
5. **Free C heap chunks.**  The same as step 2 for glibc's heap, where CPython
   puts what is larger than pymalloc's blocks (most code objects, dict and list
   tables): a shim's ``malloc`` took the free chunks among the server's data
   first.  :func:`plug_heap_holes` fills them (``malloc_info`` tells their
   sizes; a few passes, as taking a larger chunk leaves a smaller one).

Steps 4, 1, 2 and 5, in this order, and the ``gc.collect()`` before and ``gc.freeze()``
after them, are :func:`keep_shared`: the fork server runs it once, after its
imports and warm-up, before its first fork (:func:`supervisor.forkserver.preload`).
Never call any of it in a process that expects its objects to be freed: the
tests run it in a child process.  ``$SUPERVISOR_FORKSERVER_IMMORTAL=0`` turns
step 1 off (for measuring it, or on an interpreter that misbehaves with it).

What immortality changes for a forked shim, besides its memory: nothing it
inherited is ever finalized.  The server's root log handler, which a shim
replaces, is not closed when dropped (``logging.shutdown`` flushes it at exit:
its stream is ``/dev/null`` by then); the server's listening socket object,
which a shim detaches, never closes a reused fd number.  An extension module
built against headers older than 3.12 (an ``abi3`` wheel) increments an
immortal count like any other, which makes that object mortal again: safe
(PEP 683 allows it), only its page is copied again.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
import sysconfig
import types
from collections.abc import Iterable

#: Environment: "0" keeps the fork server's objects mortal (see the module docstring).
IMMORTAL_ENV = "SUPERVISOR_FORKSERVER_IMMORTAL"
#: The reference count that makes an object immortal in CPython 3.12 and 3.13
#: (``_Py_IMMORTAL_REFCNT`` on 64-bit builds: UINT_MAX).
IMMORTAL_REFCNT = 0xFFFFFFFF
#: Interpreters whose immortality is that count (checked on a probe as well).
IMMORTAL_VERSIONS = ((3, 12), (3, 13))
#: pymalloc's size classes are filled, by block size, with ``bytes`` objects of
#: ``size - BYTES_OVERHEAD`` bytes (the header and the trailing NUL)...
BYTES_OVERHEAD = sys.getsizeof(b"")
#: ...and one-digit ``int`` objects in the block size just above theirs.
INT_BLOCK = (sys.getsizeof(1_000_000) + 15) // 16 * 16
#: ``sys._debugmallocstats()``: "class size num_pools blocks_in_use avail_blocks".
_SIZE_CLASS_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.M)

#: An attribute no class has: looking it up gives a class its version tag.
_NO_SUCH_ATTRIBUTE = "__supervisor_cow_version_tag__"

_plugs: list[object] = []  # the fillers: kept for the server's life


def immortal_supported() -> str | None:
    """None if :func:`immortalize` can work here, else why not."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in IMMORTAL_VERSIONS:
        return f"not CPython {' or '.join(f'{a}.{b}' for a, b in IMMORTAL_VERSIONS)}"
    if ctypes.sizeof(ctypes.c_ssize_t) != 8:
        return "not a 64-bit build"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "a free-threaded build"  # another object header, even with the GIL enabled
    if hasattr(sys, "getobjects"):
        return "a Py_TRACE_REFS build"  # another object header
    return _probe()


def _probe() -> str | None:
    probe = [None]  # an object of ours, dropped after the check
    field = ctypes.c_ssize_t.from_address(id(probe))
    before = field.value
    field.value = IMMORTAL_REFCNT
    holders = [probe] * 8
    ok = sys.getrefcount(probe) == IMMORTAL_REFCNT
    del holders
    ok = ok and field.value == IMMORTAL_REFCNT
    field.value = before
    return None if ok else "this interpreter does not keep an immortal count"


def _referents(obj: object) -> Iterable[object]:
    if type(obj) is types.CodeType:
        # Code objects are not tracked by the collector (no tp_traverse): what they
        # hold is named here, nested code objects among the constants.
        return (obj.co_consts, obj.co_names, obj.co_varnames, obj.co_freevars,
                obj.co_cellvars, obj.co_filename, obj.co_name, obj.co_qualname,
                obj.co_linetable, obj.co_exceptiontable)
    return gc.get_referents(obj)


def immortalize() -> int:
    """Make every object reachable from the collector's objects and ``sys.modules``
    immortal; return how many were not yet.  Caller: check :func:`immortal_supported`.

    An object made immortal here is thereby marked as seen, so the walk keeps no
    set of its own (a set of ~100,000 ids would leave as many free blocks behind);
    one immortal before the walk is static (None, small ints, interned strings,
    the built-in types) and holds nothing the walk needs to reach.
    """
    stack: list[object] = gc.get_objects()
    stack.append(sys.modules)
    made = 0
    while stack:
        obj = stack.pop()
        if sys.getrefcount(obj) == IMMORTAL_REFCNT:
            continue
        ctypes.c_ssize_t.from_address(id(obj)).value = IMMORTAL_REFCNT
        made += 1
        stack.extend(_referents(obj))
    return made


def tag_types() -> int:
    """Give every class the collector tracks its type version tag now; return how many
    classes were looked at.

    CPython assigns a class its version tag (``tp_version_tag``, and a flag in
    ``tp_flags``) the first time an attribute is looked up on it through the
    method cache, and the adaptive interpreter needs one to specialise any access
    through that class.  A class the server never looked anything up on would get
    its tag in each shim, which writes (and copies) the page of its type object.
    The lookup here is ``type.__getattribute__`` of a name no class has: the
    metaclass's own ``__getattr__``, if any, is not run; nothing is found, so no
    descriptor runs either.  A class whose tag a shim invalidates later (by setting
    an attribute on it) gets a new one there: only that page is copied.
    """
    looked = 0
    for obj in gc.get_objects():
        if isinstance(obj, type):
            try:
                type.__getattribute__(obj, _NO_SUCH_ATTRIBUTE)
            except AttributeError:
                pass
            looked += 1
    return looked


def parse_mallocstats(text: str) -> dict[int, int]:
    """Free blocks per block size, from ``sys._debugmallocstats()``'s table."""
    return {int(m[2]): int(m[5]) for m in _SIZE_CLASS_LINE.finditer(text)}


def mallocstats() -> str:
    """What ``sys._debugmallocstats()`` writes (to fd 2, from C), captured."""
    fd = os.memfd_create("mallocstats", os.MFD_CLOEXEC)
    saved = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        return os.pread(fd, size, 0).decode(errors="replace")
    finally:
        os.close(saved)
        os.close(fd)


def debug_allocator() -> bool:
    """Whether blocks carry a debug allocator's padding (a debug build, ``-X dev``, or
    ``$PYTHONMALLOC=...debug``): then no object size maps to one size class."""
    env = "" if sys.flags.ignore_environment else os.environ.get("PYTHONMALLOC", "")
    return hasattr(sys, "gettotalrefcount") or sys.flags.dev_mode or env.endswith("debug")


def plug_small_block_holes() -> int:
    """Fill the free blocks of pymalloc's partly used pools with inert objects kept for
    the process's life; return how many.  0 when pymalloc is not in use, or is wrapped
    by a debug allocator."""
    if debug_allocator():
        return 0
    made = 0
    for size, free in parse_mallocstats(mallocstats()).items():
        if size - BYTES_OVERHEAD >= 0:
            _plugs.extend(bytes(size - BYTES_OVERHEAD) for _ in range(free))
        elif size == INT_BLOCK:
            _plugs.extend(1_000_000 + i for i in range(free))
        else:
            continue
        made += free
    return made


#: ``malloc_info``'s free chunks of the main arena: "<size from=F to=T total=N count=C/>".
_FREE_CHUNKS = re.compile(r'<(?:size|unsorted) from="(\d+)" to="(\d+)" total="\d+" count="(\d+)"/>')
#: Passes of :func:`plug_heap_holes`: a chunk larger than asked for is split, and its
#: rest is a free chunk for the next pass (measured: 248, 113, 30, 16, 9 chunks left).
HEAP_PASSES = 5
_heap_plugs: list[int] = []  # addresses of the C heap's fillers: kept (never freed)


def heap_info() -> str:
    """glibc's ``malloc_info`` XML ("" when it cannot be had: another libc)."""
    libc = ctypes.CDLL(None)
    try:
        open_memstream, malloc_info = libc.open_memstream, libc.malloc_info
    except AttributeError:
        return ""
    open_memstream.restype = ctypes.c_void_p
    open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return ""
    try:
        malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        return ctypes.string_at(buf.value, size.value).decode(errors="replace") if buf.value else ""
    finally:
        libc.free(buf)


def plug_heap_holes() -> int:
    """Fill the free chunks of the C heap's main arena (glibc) with blocks kept for the
    process's life, in up to :data:`HEAP_PASSES` passes; return how many.  0 where
    ``malloc_info`` is not glibc's."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    made = 0
    for _ in range(HEAP_PASSES):
        text = heap_info()
        if '<heap nr="0">' not in text:
            break
        main = text.split('<heap nr="0">', 1)[1].split("</heap>", 1)[0]
        before = made
        for low, _high, count in _FREE_CHUNKS.findall(main):
            request = max(int(low) - 1 - 8, 8)  # a chunk of that size: its header is 8 bytes
            for _ in range(int(count)):
                address = libc.malloc(request)
                if address:
                    _heap_plugs.append(address)
                    made += 1
        if made == before:
            break
    return made


def keep_shared() -> str:
    """Steps 4, 1, 2 and 5 above, between ``gc.collect()`` and ``gc.freeze()``: what a
    process about to fork shims runs last.  Returns what it did, for the log.

    The classes are tagged first: the lookups' exceptions, freed at once, leave free
    blocks that the filling then fills."""
    gc.collect()
    tagged = tag_types()
    why_not = (f"${IMMORTAL_ENV}=0" if os.environ.get(IMMORTAL_ENV) == "0"
               else immortal_supported())
    made = immortalize() if why_not is None else 0
    plugged = plug_small_block_holes()
    chunks = plug_heap_holes()
    gc.freeze()
    return (f"{gc.get_freeze_count()} objects frozen, {tagged} classes tagged, "
            f"{made} made immortal"
            f"{f' (not: {why_not})' if why_not else ''}, {plugged} free small blocks and "
            f"{chunks} free C heap chunks filled")
