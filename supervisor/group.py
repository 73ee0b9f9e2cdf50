"""The places a shared shim keeps for coming containers, and whether it may end.

Design
------
One shim may serve many containers (a pod, a labelled group, a shared
namespace shim: see :mod:`supervisor.launch.start`).  ``start`` reserves a place with
``Join`` (``supervisor.group.v1.Group``, served by
:class:`~supervisor.task.TaskService`) before it hands this shim's address to
containerd.  :class:`Group` keeps those reservations and decides, for the
Task service's ``Shutdown`` and for a lapse, whether the shim may end.  It
reads the containers the shim serves (a live view of their ids owned by the
Task service), never a copy of them.

A reservation ends with the container's ``Create`` (:meth:`Group.release`), a
``Delete`` or ``Shutdown`` naming that id (containerd giving up on it), or
after :data:`RESERVATION_TTL`; a shim whose last reservation lapses with no
container to serve ends by itself.

Invariants
----------
* ``Shutdown`` does not end the shim while a container or a live reservation
  remains (unless containerd says *now*); the shim's first container is
  reserved from the start.
* Once the shim has decided to end (:attr:`Group.closing`) it refuses every
  ``Join`` (UNAVAILABLE), so a container is never handed to a shim on its way
  out; ``end`` is called once.
* A reservation is never an id the shim serves: ``Create`` releases its id
  before it adds the container, and ``Join`` reserves only ids it does not
  serve.
* An in-place upgrade carries each reservation with the time it has left
  (:meth:`Group.export`, :meth:`Group.restore`); a closing shim is never upgraded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import trio

from supervisor import errors, identifiers

if TYPE_CHECKING:
    from supervisor.handover import GroupState

log = logging.getLogger("supervisor.group")

#: How long a ``Join`` keeps a place for a container whose ``Create`` has not come.
RESERVATION_TTL = 120.0


class Group:
    """The reservations of one shim (see the module docstring)."""

    def __init__(self, *, served: Collection[str], end: Callable[[], None],
                 nursery: trio.Nursery, first: str = "", ttl: float = RESERVATION_TTL) -> None:
        """``served``: the ids of the containers the shim serves (a live view).
        ``end``: asks the shim to end.  ``first``: the container whose ``start``
        started this shim (reserved)."""
        self._served = served
        self._end = end
        self._nursery = nursery
        self._ttl = ttl
        #: Container id -> trio deadline: places ``Join`` reserved for a coming ``Create``.
        self._reserved: dict[str, float] = {}
        self._closing = False
        self._expiring = False
        if first:
            self._reserve(first)

    @property
    def reserved(self) -> Mapping[str, float]:
        """Container id -> the trio time its reservation lapses."""
        return self._reserved

    @property
    def closing(self) -> bool:
        """Whether the shim has decided to end (``Join`` is refused from then on)."""
        return self._closing

    def join(self, container_id: str, limit: int = 0) -> int:
        """Reserve a place for ``container_id`` (idempotent); the containers served or
        reserved, this one included.  ``limit`` (0: none) bounds that count."""
        identifiers.check(container_id, "container id")
        if self._closing:
            raise errors.Unavailable("the shim is shutting down")
        self._prune()
        count = len(self._served) + len(self._reserved)
        if container_id not in self._served and container_id not in self._reserved:
            if limit and count >= limit:
                raise errors.ResourceExhausted(
                    f"the shim serves {count} containers (limit {limit})")
            count += 1
        if container_id not in self._served:
            self._reserve(container_id)
        log.debug("%s joins: %d containers served or reserved", container_id, count)
        return count

    def release(self, container_id: str) -> None:
        """The reservation ends: its ``Create`` came, or containerd gave up on it."""
        self._reserved.pop(container_id, None)

    def shutdown(self, container_id: str, *, now: bool = False) -> bool:
        """containerd's ``Shutdown`` naming ``container_id``: whether the shim ends
        (it then is closing, and ``end`` was called)."""
        self.release(container_id)  # containerd is done with it
        self._prune()
        if not now and (self._served or self._reserved):
            return False
        self._close()
        return True

    def export(self) -> GroupState:
        """The reservations, each with the seconds it has left (for an in-place upgrade)."""
        now = trio.current_time()
        return {"reserved": {c: max(0.0, d - now) for c, d in self._reserved.items()}}

    def restore(self, state: GroupState) -> None:
        """Keep the reservations :meth:`export` described (the new code's Group)."""
        for container_id, left in state["reserved"].items():
            if container_id not in self._served:
                self._reserve(container_id, left)

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self._end()

    def _reserve(self, container_id: str, ttl: float | None = None) -> None:
        self._reserved[container_id] = trio.current_time() + (self._ttl if ttl is None else ttl)
        if not self._expiring:
            self._expiring = True
            self._nursery.start_soon(self._expire)

    async def _expire(self) -> None:
        """Drop lapsed reservations; end a shim left with nothing to serve.

        Without this, a shim whose reservation lapsed (its ``start`` gave up
        after Join, or containerd died before ``Create``) would refuse every
        ``Shutdown`` until then and get none after: an empty shim forever.
        """
        try:
            while self._reserved and not self._closing:
                await trio.sleep_until(min(self._reserved.values()))
                self._prune()
            if not self._served and not self._closing:
                log.info("no container came for the reserved places: ending")
                self._close()
        finally:
            self._expiring = False

    def _prune(self) -> None:
        """Drop the reservations that lapsed."""
        now = trio.current_time()
        for cid in [c for c, deadline in self._reserved.items() if deadline <= now]:
            log.warning("reservation for %s lapsed: no Create within %g s", cid, self._ttl)
            del self._reserved[cid]
