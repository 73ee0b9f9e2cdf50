"""supervisor: a containerd shim v2 (``io.containerd.supervisor.v2``) written in Python.

Layout (arrows point one way, downwards: the service uses the containers, the
containers use the reaper, io and runtime; nothing below the service knows ttrpc):

* :mod:`supervisor.shim` -- the binary containerd runs: ``start`` (light: no
  trio, no protobuf; joins a live shim of the container's group through
  :mod:`supervisor._join`, or asks :mod:`supervisor.forkserver` for a
  pre-imported shim, or starts one cold), ``delete`` (:mod:`supervisor._delete`)
  and the daemon.  :mod:`supervisor._pbwire` and :mod:`supervisor._msgpack`
  hand-encode their few messages; :mod:`supervisor._ksm` offers a daemon's
  memory to the kernel's samepage merging.
* :mod:`supervisor.daemon` -- one nursery tree: reaper, event outbox, Task and
  Introspect services, the ttrpc server.
* :mod:`supervisor.task` -- the Task service; maps errors to ttrpc codes (the
  one boundary, with :mod:`supervisor.introspect` for its own service).
* :mod:`supervisor.container`, :mod:`supervisor.process` -- a container's work
  and one Process type whose lifecycle is a table.
* :mod:`supervisor.reaper`, :mod:`supervisor.runtime`, :mod:`supervisor.io`,
  :mod:`supervisor.console`, :mod:`supervisor.mount`, :mod:`supervisor.metrics`,
  :mod:`supervisor.oom` -- children, the OCI runtime, stdio, terminals, rootfs,
  cgroup statistics, OOM kills.
* :mod:`supervisor.events` -- the ordered, durable outbox to containerd.
* :mod:`supervisor.options`, :mod:`supervisor.settings` -- runtime options.
* :mod:`supervisor.ttrpc` -- containerd's ttrpc protocol: a sans-IO core and a
  thin trio transport.  Imports nothing else of ours.
* :mod:`supervisor.api` -- our own ``.proto`` files for containerd's messages and
  the modules generated from them.
* :mod:`supervisor.cli` -- ``supervisor ls|inspect|events`` for people.
"""

__version__ = "0.1.0"
