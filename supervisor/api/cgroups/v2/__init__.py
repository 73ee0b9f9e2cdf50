"""Cgroup v2 metrics (io.containerd.cgroups.v2)."""
