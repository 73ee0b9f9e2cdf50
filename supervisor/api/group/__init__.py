"""supervisor.group.v1: how ``start`` joins a container to a shim that serves others."""
