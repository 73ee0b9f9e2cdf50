"""runc shim option messages (containerd.runc.v1 and containerd.linux.runc)."""
