"""Defaults shared by the daemon and the light ``start``/``delete`` actions (no imports)."""

#: The OCI runtime when the options name none (looked up on PATH).
DEFAULT_BINARY = "runc"
#: Its state root; the namespace is appended, as containerd's runc shim does.
DEFAULT_ROOT = "/run/containerd/runc"
#: The shim's settings, kept in the bundle for ``delete`` after the shim is gone.
SETTINGS_FILE = "supervisor-options.json"
#: The values of ``shim_group`` ("" is the default: one shim per container).
SHIM_GROUPS = ("", "container", "namespace")
