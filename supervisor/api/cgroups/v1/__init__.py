"""Cgroup v1 metrics (io.containerd.cgroups.v1)."""
