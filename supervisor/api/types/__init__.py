"""containerd 1.6 core types: Mount, task Status and ProcessInfo."""
