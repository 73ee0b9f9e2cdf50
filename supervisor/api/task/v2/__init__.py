"""containerd.task.v2: the Task service a shim serves, and its messages."""
