#!/usr/bin/env bash
# make demo: show the shim driving real containers through a private containerd.
#
# Run as root on Debian. Installs containerd/runc/busybox if missing
# (scripts/install-deps.sh), creates the venv if missing (make venv), then runs
# scripts/demo.py: a private containerd with its own root/state/sockets under a temp dir,
# a busybox rootfs, and with runtime ${DEMO_RUNTIME:-io.containerd.supervisor.v2}:
# ctr run --rm, run -d, task ls, pause, resume, ps, kill, delete.
# Everything is cleaned up on exit, also on failure or Ctrl-C.
#   DEMO_RUNTIME=io.containerd.runc.v2 bash scripts/demo.sh   # the same with the Go shim
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${DEMO_RUNTIME:-io.containerd.supervisor.v2}

if [ "$(id -u)" != 0 ]; then
	echo "demo: run as root (it starts containerd and runc)" >&2
	exit 1
fi
bash scripts/install-deps.sh
if [ ! -x .venv/bin/python ] || { [ "$RUNTIME" = io.containerd.supervisor.v2 ] &&
	[ ! -x .venv/bin/containerd-shim-supervisor-v2 ]; }; then
	echo "demo: setting up the venv (make venv)"
	make venv
fi

DEMO_TMP=$(mktemp -d /tmp/sv-demo.XXXXXX)
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	# demo.py cleans up after itself; this catches what a killed demo.py left behind.
	if [ -n "${DEMO_PID:-}" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
		kill -TERM "$DEMO_PID" 2>/dev/null || true
		wait "$DEMO_PID" 2>/dev/null || true
	fi
	.venv/bin/python scripts/demo.py --cleanup "$DEMO_TMP" || true
	rm -rf "$DEMO_TMP"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "demo: runtime $RUNTIME, containerd $(containerd --version | awk '{print $3}'), $(runc --version | head -1)"
# In the background so that the traps run as soon as a signal arrives.
.venv/bin/python scripts/demo.py --runtime "$RUNTIME" --base-dir "$DEMO_TMP" &
DEMO_PID=$!
wait "$DEMO_PID"
