"""supervisor.introspect.v1: the shim's own read-only inspection service (not containerd's)."""
