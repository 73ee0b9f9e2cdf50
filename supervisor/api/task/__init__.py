"""containerd shim v2 task API."""
