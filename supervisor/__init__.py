"""supervisor: a containerd shim v2 (``io.containerd.supervisor.v2``) written in Python.

Layout.  Two sides: what containerd runs as a short-lived binary, and the
daemon.  The daemon side imports from :mod:`supervisor.launch`, never the
reverse, and no modules import each other in a cycle
(``tests/unit/test_layering.py`` checks both):

* :mod:`supervisor.shim` -- the binary containerd runs: parses the command line
  and dispatches ``start`` and ``delete`` to :mod:`supervisor.launch`, the
  daemon to :func:`supervisor.daemon.action_serve`.
* :mod:`supervisor.launch` -- the light side, standard library only: ``start``
  (joins a live shim of the container's group through ``Group/Join``, or asks
  the fork server for a pre-imported shim, or starts one cold), ``delete``,
  the fork server's client, the hand codecs, and the facts both sides share
  once each: the settings file's schema, socket addresses, procfs parsing, the
  OCI runtime's command line, constants.
* :mod:`supervisor.forkserver` -- the fork server: preloads the daemon, forks
  shims.  :mod:`supervisor._ksm` offers a daemon's memory to the kernel's
  samepage merging.
* :mod:`supervisor.daemon` -- one nursery tree: reaper, event outbox, Task and
  Introspect services, the ttrpc server.
* :mod:`supervisor.task` -- the Task service; maps errors to ttrpc codes (the
  one boundary, with :mod:`supervisor.introspect` for its own service).
* :mod:`supervisor.exits` -- the order of exit events containerd relies on, as
  one object with no I/O that the Task service asks.
* :mod:`supervisor.group` -- a shared shim's reservations, and whether
  ``Shutdown`` may end it.
* :mod:`supervisor.container`, :mod:`supervisor.process` -- a container's work
  and one Process type whose lifecycle is a table.
* :mod:`supervisor.identifiers` -- containerd's identifier rule for the ids a
  client names.
* :mod:`supervisor.reaper`, :mod:`supervisor.runtime`, :mod:`supervisor.io`,
  :mod:`supervisor.console`, :mod:`supervisor.mount`, :mod:`supervisor.metrics`,
  :mod:`supervisor.oom` -- children, the OCI runtime, stdio, terminals, rootfs,
  cgroup statistics, OOM kills.
* :mod:`supervisor.events` -- the ordered, durable outbox to containerd.
* :mod:`supervisor.options` -- runtime options, decoded into
  :class:`supervisor.launch.settings.Settings` (by :mod:`supervisor.launch.runopts`,
  which ``start`` uses alone).
* :mod:`supervisor.ttrpc` -- containerd's ttrpc protocol: a sans-IO core and a
  thin trio transport.  Imports nothing else of ours.
* :mod:`supervisor.api` -- our own ``.proto`` files for containerd's messages and
  the modules generated from them.
* :mod:`supervisor.cli` -- ``supervisor ls|inspect|events`` for people.
"""

__version__ = "0.1.0"
