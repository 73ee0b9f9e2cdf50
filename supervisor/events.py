"""The event outbox: every task event, in order, to containerd, whatever happens to it.

Design
------
:meth:`Outbox.publish` is synchronous: it stamps the event (time, namespace,
topic), appends it to the queue and returns.  Callers publish in the order the
things happened (TaskStart before TaskExit, an exec's exit before its init's)
and that order is the order of delivery.  One forwarder task
(:meth:`Outbox.run`) sends the head of the queue through the ``send``
coroutine it was given (the shim wires it to containerd's
``Events/Forward`` over ttrpc) and removes it only once containerd accepted
it.  A failure (containerd down, restarting, slow) is retried with capped
exponential backoff for as long as the shim lives: there is no retry limit,
so an event is never dropped, and never overtaken by a later one.

Delivery is at-least-once: an event whose acknowledgement was lost is sent
again.

Durability
----------
With a :class:`Spool`, every event is written to a file (msgpack records,
each framed with its length and a checksum) before ``publish`` returns, so
it survives the shim being killed: the kernel holds what was written,
whatever happens to the process.  The file is never fsync'd, on purpose: it
only has to outlive the shim, not the machine.  After a power loss or a
reboot the containers are gone, and so is containerd's state directory
(``/run``, a tmpfs); containerd then removes every work directory, spool and
all, whose bundle is gone, before it reads anything from it (1.6's
``cleanupWorkDirs``).  An fsync per event (from a worker thread, to keep the
event loop free) cost ~0.3-0.7 ms of CPU per exec and a thread's memory in
every shim, for nothing anyone could read back.  An ``ack`` record is
appended once containerd accepted an event; when nothing is pending the file
is truncated.  A shim that starts in a bundle whose spool holds
unacknowledged events (the previous shim was killed, or replaced by an
upgrade) forwards those first, in their original order and with their
original timestamps; a damaged or invalid record in it is skipped, logged
and counted (``stats.spool_skipped``), and never costs a record after it.
If the spool cannot be written (full disk, read-only file system) the outbox
logs a warning once and goes on in memory: nothing is dropped, only
durability is lost.

In-place upgrade
----------------
:meth:`Outbox.pause` stops forwarding (the send under way, if any, is
cancelled); :meth:`Outbox.export` describes the queue's position
(sequence counter, counters, the pending events) and the new code's
:meth:`Outbox.adopt` goes on from the spool as a restarted shim does, each
event delivered once more at most (at-least-once, as ever), with the
counters carried over rather than counted as replayed.

Invariants
----------
* The queue is FIFO and the forwarder is the only consumer.
* ``delivered + pending == published + replayed`` at all times.
* An event is in the spool before it is in the queue.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import trio
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from supervisor import identifiers
from supervisor.api import typeurls
from supervisor.api.events import task_pb2 as ev
from supervisor.handover import b64, unb64
from supervisor.launch import spool as spoolfile

if TYPE_CHECKING:
    from supervisor.handover import EventState, OutboxState

log = logging.getLogger("supervisor.events")

TOPICS: dict[type[Message], str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskOOM: "/tasks/oom",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
    ev.TaskCheckpointed: "/tasks/checkpointed",
}

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 0.5


@dataclass
class Event:
    """One stamped event, ready to forward."""

    seq: int
    timestamp_ns: int
    namespace: str
    topic: str
    type_url: str
    payload: bytes
    attempts: int = 0
    first_error: str = ""


def describe(event: Event) -> str:
    """The event's fields on one line (for logs and people)."""
    try:
        message = typeurls.message_class(event.type_url).FromString(event.payload)
    except (ValueError, DecodeError):
        return f"<{len(event.payload)} bytes of {event.type_url}>"
    return text_format.MessageToString(message, as_one_line=True)


# (event) -> None on acceptance; raise on any failure.
Sender = Callable[[Event], Awaitable[None]]


@dataclass
class OutboxStats:
    published: int = 0
    replayed: int = 0
    delivered: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    spool_error: str = ""
    spool_skipped: int = 0  # damaged or invalid spool records skipped at start
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=64))


_ADD, _ACK = spoolfile.ADD, spoolfile.ACK
_MAX_INT = 2**63 - 1
# The previous release wrote bare msgpack arrays: [1, ...] (7 fields) or [2, seq].
_V1_FIRST_BYTES = (0x97, 0x92)
_LOGGED_SKIPS = 20


class _Bad(Exception):
    """A record that is framed well but is not an event or an ack (the message says why)."""


def _frame(record: list[object]) -> bytes:
    return spoolfile.frame(msgpack.packb(record, use_bin_type=True))


def _add_record(event: Event) -> list[object]:
    return [_ADD, event.seq, event.timestamp_ns, event.namespace, event.topic, event.type_url,
            event.payload]


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``, or cut off what was written of it and raise."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(data):
            n = os.write(fd, view[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, "write made no progress")
            done += n
    except OSError:
        if done:  # no torn record stays behind (a reader would skip it; a writer never does)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.fstat(fd).st_size - done)
        raise


def _int(name: str, value: object, low: int) -> int:
    if type(value) is not int or not low <= value <= _MAX_INT:
        raise _Bad(f"{name} is {type(value).__name__} {value!r:.40}, "
                   f"not an integer in [{low}, 2**63)")
    return value


def _name(name: str, value: object, *, topic: bool = False) -> str:
    # containerd refuses an envelope whose namespace or topic components are not
    # identifiers (events/exchange.go validateEnvelope, supervisor.identifiers): such
    # an event could never be delivered, and would block every later one.
    if type(value) is not str:
        raise _Bad(f"{name} is {type(value).__name__}, not a string")
    parts = value[1:].split("/") if topic and value.startswith("/") else [value]
    if not all(identifiers.is_valid(p) for p in parts):
        raise _Bad(f"{name} {value!r:.80} is not one containerd accepts")
    return value


def _record(value: object) -> Event | int:
    """The event an add record holds, or the seq an ack names; :class:`_Bad` otherwise."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"a {type(value).__name__}, not a record")
    kind = value[0]
    if kind == _ADD and type(kind) is int and len(value) == 7:
        _, seq, ts, ns, topic, type_url, payload = value
        if type(type_url) is not str or not type_url:
            raise _Bad("type_url is not a non-empty string")
        if type(payload) is not bytes:
            raise _Bad(f"payload is {type(payload).__name__}, not bytes")
        return Event(_int("seq", seq, 1), _int("timestamp_ns", ts, 0), _name("namespace", ns),
                     _name("topic", topic, topic=True), type_url, payload)
    if kind == _ACK and type(kind) is int and len(value) == 2:
        return _int("acked seq", value[1], 1)
    raise _Bad(f"kind {kind!r:.20} with {len(value)} fields is no record")


def _event_state(event: Event) -> EventState:
    return {"seq": event.seq, "timestamp_ns": event.timestamp_ns, "namespace": event.namespace,
            "topic": event.topic, "type_url": event.type_url, "payload": b64(event.payload),
            "attempts": event.attempts, "first_error": event.first_error}


def _event_of(state: EventState) -> Event:
    return Event(state["seq"], state["timestamp_ns"], state["namespace"], state["topic"],
                 state["type_url"], unb64(state["payload"], "outbox event payload"),
                 state["attempts"], state["first_error"])


class Spool:
    """The on-disk record of events not yet accepted by containerd.

    Format
    ------
    A sequence of framed records (the frame and the record kinds are
    :mod:`supervisor.launch.spool`'s, which ``delete`` reads the file with
    after a shim was killed): a 4-byte magic, the body's length and the
    CRC-32 of length and body (both big-endian uint32), then the body, a
    msgpack array: ``[1, seq, timestamp_ns, namespace, topic, type_url,
    payload]`` when an event is published, ``[2, seq]`` when it was accepted.
    A file that holds no verified frame and starts like a bare msgpack record
    is read as the previous release's format (the same arrays, unframed) and
    rewritten in this one before anything is appended.

    Loading never raises and no record blocks another: a damaged stretch
    (flipped bytes, a torn record, garbage) is skipped up to the next frame
    that verifies; a frame that verifies but does not hold a well-typed event
    or ack (a seq that is not a positive integer, a float timestamp, a topic
    containerd would refuse ...) is skipped too.  Each is logged with what was
    wrong and counted in :attr:`skipped`.  A file loaded with any of that, or in
    the old format, is replaced (written aside, renamed over) by its
    pending events before this spool first writes, so appends never follow
    garbage.  A write is completed when ``os.write`` is short; if it fails,
    the part written is cut off again before the spool gives up (memory only).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.error = ""
        self.skipped = 0  # damaged or invalid records skipped by load()
        self.last_seq = 0  # the highest seq any record loaded names
        self._fd = -1
        self._live = 0  # events added and not acked since the last truncate
        self._rewrite: list[Event] | None = None  # what to replace a damaged file with

    def _open(self) -> int:
        if self._fd < 0:
            if self._rewrite is not None:
                self._replace(self._rewrite)
                self._rewrite = None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        return self._fd

    def _replace(self, events: list[Event]) -> None:
        """Make the file hold exactly ``events``: written aside, renamed over."""
        aside = self.path + ".new"
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                for e in events:
                    _write_all(fd, _frame(_add_record(e)))
            finally:
                os.close(fd)
            os.rename(aside, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(aside)
            raise
        log.info("event spool %s rewritten with its %d pending events", self.path, len(events))

    def load(self) -> list[Event]:
        """Events added and never acknowledged, in order; never raises."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("event spool %s unreadable: %s", self.path, e)
            return []
        reasons: list[str] = []
        records = self._records_v2(data, reasons)
        old = not records and bool(data) and data[0] in _V1_FIRST_BYTES
        if old:
            reasons = []
            records = self._records_v1(data, reasons)
        pending: dict[int, Event] = {}
        for record in records:
            if isinstance(record, Event):
                pending[record.seq] = record
                self.last_seq = max(self.last_seq, record.seq)
            else:
                pending.pop(record, None)
                self.last_seq = max(self.last_seq, record)
        events = [pending[k] for k in sorted(pending)]
        self.skipped = len(reasons)
        for why in reasons[:_LOGGED_SKIPS]:
            log.warning("event spool %s: skipped %s", self.path, why)
        if reasons:
            log.warning("event spool %s: skipped %d damaged or invalid records%s; %d events "
                        "pending", self.path, len(reasons),
                        f" ({len(reasons) - _LOGGED_SKIPS} not shown)"
                        if len(reasons) > _LOGGED_SKIPS else "", len(events))
        if old or reasons:
            self._rewrite = events
        self._live = len(events)
        return events

    @staticmethod
    def _records_v2(data: bytes, reasons: list[str]) -> list[Event | int]:
        records: list[Event | int] = []
        for offset, body, why in spoolfile.frames(data):
            if body is None:
                reasons.append(f"at offset {offset}: {why}")
                continue
            try:
                records.append(_record(msgpack.unpackb(body, raw=False)))
            except _Bad as e:
                reasons.append(f"the record at offset {offset}: {e}")
            except Exception as e:  # a checksummed body no writer of ours made
                reasons.append(f"the record at offset {offset} does not decode: {e}")
        return records

    @staticmethod
    def _records_v1(data: bytes, reasons: list[str]) -> list[Event | int]:
        """The previous release's unframed records, up to the first undecodable byte."""
        records: list[Event | int] = []
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        offset = 0
        try:
            for value in unpacker:
                try:
                    records.append(_record(value))
                except _Bad as e:
                    reasons.append(f"the old-format record at offset {offset}: {e}")
                offset = unpacker.tell()
        except Exception as e:  # any decoding failure ends an unframed file
            reasons.append(f"{len(data) - offset} old-format bytes at offset {offset} "
                           f"(nothing after them can be found): {e}")
            return records
        if offset < len(data):
            reasons.append(f"a torn old-format record: {len(data) - offset} bytes at offset "
                           f"{offset}")
        return records

    def _fail(self, e: OSError) -> None:
        self.error = f"{self.path}: {e.strerror or e}"
        log.warning("event spool unwritable (%s); keeping events in memory only", self.error)

    def _write(self, record: list[object]) -> None:
        if self.error:
            return
        try:
            _write_all(self._open(), _frame(record))
        except OSError as e:
            self._fail(e)

    def add(self, event: Event) -> None:
        self._live += 1
        self._write(_add_record(event))

    def ack(self, seq: int) -> None:
        self._live -= 1
        if self._live <= 0 and not self.error:
            self._live = 0
            if self._rewrite is not None:
                self._rewrite = []  # nothing pending: the damaged file is replaced by nothing
            try:
                os.ftruncate(self._open(), 0)
                return
            except OSError as e:
                log.debug("could not truncate event spool: %s", e)
        # Losing an ack costs a duplicate (at-least-once), never an event.
        self._write([_ACK, seq])

    def move(self, path: str) -> None:
        """Keep the spool at ``path`` from now on (its directory is about to be deleted)."""
        os.rename(self.path, path)  # the open fd follows the file
        self.path = path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Outbox:
    """An ordered queue of task events with one forwarder that never gives up."""

    def __init__(self, send: Sender, namespace: str, *, spool: Spool | None = None) -> None:
        self._send = send
        self.namespace = namespace
        self._queue: deque[Event] = deque()
        self._wakeup = trio.Event()
        self._empty = trio.Event()
        self._empty.set()
        self.stats = OutboxStats()
        self.spool = spool
        self._next_seq = 1
        self._paused = False
        self._unpaused = trio.Event()
        self._sending: trio.Event | None = None  # set when the send under way ends
        self._send_scope = trio.CancelScope()  # the send under way (pause cancels it)
        if spool is not None:
            replay = spool.load()
            self.stats.spool_skipped = spool.skipped
            # Past every seq the file names: a new event never shares one with an old ack.
            self._next_seq = spool.last_seq + 1
            if replay:
                log.info("replaying %d undelivered events from %s", len(replay), spool.path)
                self._queue.extend(replay)
                self.stats.replayed = len(replay)
                self._empty = trio.Event()

    @property
    def pending(self) -> list[Event]:
        return list(self._queue)

    def oldest_age(self) -> float:
        if not self._queue:
            return 0.0
        return max(0.0, time.time() - self._queue[0].timestamp_ns / 1e9)

    def publish(self, event: Message, *, topic: str | None = None) -> Event:
        """Queue ``event`` for containerd (never blocks, never fails)."""
        self.stats.published += 1
        item = Event(
            seq=self._next_seq,
            timestamp_ns=time.time_ns(),
            namespace=self.namespace,
            topic=topic or TOPICS[type(event)],
            type_url=typeurls.type_url(event),
            payload=event.SerializeToString(),
        )
        self._next_seq += 1
        if self.spool is not None:
            self.spool.add(item)
            self.stats.spool_error = self.spool.error
        self._queue.append(item)
        log.debug("event queued %s seq %d", item.topic, item.seq)
        if self._empty.is_set():
            self._empty = trio.Event()
        self._wakeup.set()
        return item

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward events in order, retrying each until it is accepted."""
        task_status.started()
        backoff = INITIAL_BACKOFF
        while True:
            if self._paused:
                await self._unpaused.wait()
                continue
            if not self._queue:
                self._empty.set()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            head.attempts += 1
            sending = self._sending = trio.Event()
            try:
                with trio.CancelScope() as self._send_scope:
                    await self._send(head)
                if self._send_scope.cancelled_caught:  # by pause(): not an attempt that failed
                    head.attempts -= 1
                    continue
            except Exception as e:  # any failure: keep it and try again later
                reason = f"{type(e).__name__}: {e}"
                if head.attempts == 1 or reason != self.stats.last_error:
                    log.warning("forwarding %s (seq %d) failed, will retry: %s",
                                head.topic, head.seq, reason)
                head.first_error = head.first_error or reason
                self.stats.last_error = reason
                self.stats.last_error_at = time.time()
                self._sending = None
                sending.set()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            finally:
                self._sending = None
                sending.set()
            backoff = INITIAL_BACKOFF
            self._queue.popleft()
            if self.spool is not None:
                self.spool.ack(head.seq)
            self.stats.delivered += 1
            self.stats.recent.append(head)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event forwarded %s seq %d {%s}", head.topic, head.seq, describe(head))

    # --- an in-place upgrade ---------------------------------------------------------

    async def pause(self) -> None:
        """Stop forwarding (a send under way is cancelled, and waited for)."""
        if not self._paused:
            self._paused = True
            self._unpaused = trio.Event()
        self._wakeup.set()  # a forwarder waiting for events parks
        # A send is cancelled safely: a Forward written stays owed on its connection
        # (ContainerdEvents), which the new code adopts and waits on.
        self._send_scope.cancel()
        while self._sending is not None:
            await self._sending.wait()

    def resume(self) -> None:
        self._paused = False
        self._unpaused.set()

    def export(self) -> OutboxState:
        """Where the queue is (after :meth:`pause`), for :meth:`adopt` in the new code."""
        s = self.stats
        return {
            "spool": self.spool.path if self.spool is not None else "",
            "next_seq": self._next_seq, "published": s.published, "replayed": s.replayed,
            "delivered": s.delivered, "last_error": s.last_error,
            "last_error_at": s.last_error_at, "spool_error": s.spool_error,
            "spool_skipped": s.spool_skipped,
            "pending": [_event_state(e) for e in self._queue],
        }

    @classmethod
    def adopt(cls, send: Sender, namespace: str, state: OutboxState) -> Outbox:
        """The outbox :meth:`export` described: its spool loaded (the pending events,
        in order), or, if the old one could not write it, its events from ``state``."""
        spool = Spool(state["spool"]) if state["spool"] else None
        outbox = cls(send, namespace, spool=spool)
        pending = {e["seq"]: e for e in state["pending"]}
        if spool is None or state["spool_error"]:
            if spool is not None:
                spool.error = state["spool_error"]  # memory only, as the old outbox was
            outbox._queue = deque(_event_of(e) for e in state["pending"])
        else:
            for event in outbox._queue:
                old = pending.get(event.seq)
                if old is not None:
                    event.attempts, event.first_error = old["attempts"], old["first_error"]
        outbox._next_seq = max(outbox._next_seq, state["next_seq"])
        s = outbox.stats
        s.published, s.replayed, s.delivered = (state["published"], state["replayed"],
                                                state["delivered"])
        s.last_error, s.last_error_at = state["last_error"], state["last_error_at"]
        s.spool_error, s.spool_skipped = state["spool_error"], state["spool_skipped"]
        if outbox._queue:
            outbox._empty = trio.Event()
        else:
            outbox._empty.set()
        return outbox

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was accepted; False if ``timeout`` ran out."""
        with trio.move_on_after(timeout):
            while self._queue:
                await self._empty.wait()
            return True
        return False
