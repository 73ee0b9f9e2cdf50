"""Constants both sides of the shim need: the light actions and the daemon (no imports).

Each fact is here once; the daemon side imports it from here, never the reverse.
"""

#: The OCI runtime when the options name none (looked up on PATH).
DEFAULT_BINARY = "runc"
#: Its state root; the namespace is appended, as containerd's runc shim does.
DEFAULT_ROOT = "/run/containerd/runc"
#: The shim's settings, kept in the bundle for ``delete`` after the shim is gone
#: (written and read by :class:`supervisor.launch.settings.Settings` alone).
SETTINGS_FILE = "supervisor-options.json"
#: The values of ``shim_group`` ("" is the default: one shim per container).
SHIM_GROUPS = ("", "container", "namespace")
#: Where a shim daemon finds its listening socket, cold-started or forked.
LISTEN_FD = 3
#: Where ``start`` binds shim sockets (as containerd's own shims do).
SOCKET_DIR = "/run/containerd/s"
#: Where the cgroup hierarchies are mounted (v2 unified, or one directory per v1 hierarchy).
CGROUP_ROOT = "/sys/fs/cgroup"
