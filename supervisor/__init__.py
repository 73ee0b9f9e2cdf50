"""supervisor: a containerd shim v2 (``io.containerd.supervisor.v2``) written in Python.

Layout (arrows point one way, downwards):

* :mod:`supervisor.ttrpc` -- containerd's ttrpc protocol: a sans-IO core and a
  thin trio transport.  Imports nothing else of ours.
* :mod:`supervisor.api` -- our own ``.proto`` files for containerd's messages and
  the modules generated from them.
"""

__version__ = "0.1.0"
