#!/usr/bin/env bash
# Installs the Debian packages the integration tests and the demo drive for real:
# containerd 1.6 (with ctr), runc and a static busybox for the rootfs.
# Does nothing when they are already there; needs root otherwise.
set -euo pipefail
need=()
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v ctr >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)
# The ttrpc interop test builds a Go peer from Debian's ttrpc source (no network).
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/containerd/ttrpc ] || need+=(golang-github-containerd-ttrpc-dev)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing ${need[*]}; run as root or: apt-get install ${need[*]}" >&2
    exit 1
fi
echo "install-deps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
