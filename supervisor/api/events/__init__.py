"""containerd task events and the ttrpc Events service shims publish to."""
