"""Cgroup metrics messages from github.com/containerd/cgroups."""
