"""What containerd runs as a short-lived binary, and the small facts both sides need.

containerd waits for ``start`` and ``delete`` on its critical path, so this
package is kept light: every module here imports only the standard library and
other modules of this package -- never trio, protobuf, msgpack, :mod:`typing`
at run time, :mod:`logging`, :mod:`dataclasses` or :mod:`re` -- and the daemon
side imports from here, never the reverse (``tests/unit/test_layering.py``
checks both in a fresh interpreter, and that no import cycle exists).

* :mod:`~supervisor.launch.flags` -- the shim binary's command line.
* :mod:`~supervisor.launch.start` -- the ``start`` action: group, socket, daemon.
* :mod:`~supervisor.launch.delete` -- the ``delete`` action; it reports a killed
  shim's init exit from the event spool (:mod:`~supervisor.launch.spool`, the
  spool's file format, which the daemon's :mod:`supervisor.events` writes).
* :mod:`~supervisor.launch.info` -- ``-info`` (containerd 2.x): a ``RuntimeInfo``.
* :mod:`~supervisor.launch.bootstrap` -- ``start``'s stdin from containerd 2.3
  (``BootstrapParams``) told apart from the bare options ``Any``.
* :mod:`~supervisor.launch.runopts` -- the runtime options ``Any`` (every form,
  and the CRI plugin's TOML file) -> settings: the one decoder, the daemon's too.
* :mod:`~supervisor.launch.forkclient` -- ``start``'s side of the fork server
  (the server is :mod:`supervisor.forkserver`, beside the daemon).
* :mod:`~supervisor.launch._join` -- ``start``'s side of ``Group/Join``.
* :mod:`~supervisor.launch._pbwire`, :mod:`~supervisor.launch._msgpack` -- the
  hand codecs for those few messages (and the options).
* :mod:`~supervisor.launch._spawn` -- starting a child nobody registers.
* :mod:`~supervisor.launch.launcher` -- writes the shim binary as a ``python -IS``
  script (no ``site`` until something needs site-packages: ``full_site``).
* The facts, once each: :mod:`~supervisor.launch.settings` (the settings file's
  one schema), :mod:`~supervisor.launch.address` (socket addresses),
  :mod:`~supervisor.launch.procfs` (mountinfo, ``/proc/PID/cgroup``),
  :mod:`~supervisor.launch.runcmd` (the OCI runtime's global flags),
  :mod:`~supervisor.launch.unmount` (``umount2`` of a rootfs stack),
  :mod:`~supervisor.launch.defaults` (constants).
"""
