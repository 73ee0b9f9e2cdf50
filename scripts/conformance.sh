#!/usr/bin/env bash
# make conformance: containerd's own test suites against io.containerd.supervisor.v2.
#
#   scripts/conformance.sh [all|client|cri|stress] [TEST_REGEX | @LISTFILE]
#
# Runs as root. Installs nothing of ours beyond `make venv` if the venv or the shim is
# missing (the shim lands in .venv/bin),
# runs ../shared/conformance/setup.sh (idempotent: Go toolchain, test binaries, offline
# images; see its README.md), then its suites with runtime io.containerd.supervisor.v2,
# CRI handler `supervisor` and PEER_SHIM_DIR=<repo>/.venv/bin:
#   all    (default) run-all.sh: client shim subset + CRI subset + stress 30s --exec (~3 min)
#   client run-client-suite.sh, @client-shim-subset.txt unless a regex/@list is given
#   cri    run-cri-suite.sh, @cri-subset.txt unless a regex/@list is given
#   stress run-stress.sh for $CONFORMANCE_STRESS_DURATION (30s), 2 workers, --exec
# Logs go to $CONFORMANCE_LOGDIR (/tmp/peer-suite/logs/supervisor). The summary is printed
# next to the Go shim's baseline from the README. Exit status: the suites'.
# SERIES=1.7|2.1 (make conformance SERIES=2.1) runs the client suite and stress against that
# containerd, fetched by ../shared/conformance/fetch-containerd.sh (PEER_CONTAINERD); the CRI
# suite always runs on the system's 1.6 (the suite scripts' own rule).
# Overrides: CONFORMANCE_DIR (the suite scripts), CONFORMANCE_RUNTIME, CONFORMANCE_HANDLER,
# CONFORMANCE_SHIM_DIR (e.g. /tmp/peer-suite/alias for the README's plumbing check),
# CONFORMANCE_SKIP_SETUP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PART=${1:-all}
SELECT=${2:-}
RUNTIME=${CONFORMANCE_RUNTIME:-io.containerd.supervisor.v2}
HANDLER=${CONFORMANCE_HANDLER:-supervisor}
SHIM_DIR=${CONFORMANCE_SHIM_DIR:-$REPO/.venv/bin}
LOGDIR=${CONFORMANCE_LOGDIR:-/tmp/peer-suite/logs/supervisor}
DURATION=${CONFORMANCE_STRESS_DURATION:-30s}
CONF=${CONFORMANCE_DIR:-$REPO/../shared/conformance}

log() { echo "[conformance $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

case $PART in all | client | cri | stress) ;; *) sed -n 2,19p "$0"; exit 2 ;; esac
[ "$(id -u)" = 0 ] || die "run as root"
[ -f "$CONF/README.md" ] && [ -x "$CONF/run-all.sh" ] || die "no conformance scripts in $CONF"
CONF=$(cd "$CONF" && pwd)

# The venv (and with it the shim, pip install -e .) only when it is missing: an existing
# venv is left alone, as `make test` keeps it up to date.
if [ "$SHIM_DIR" = "$REPO/.venv/bin" ] && { [ ! -x .venv/bin/python ] ||
	[ ! -x .venv/bin/containerd-shim-supervisor-v2 ]; }; then
	log "setting up the venv (make venv)"
	make venv
fi
case $RUNTIME in
io.containerd.*.*)
	name=${RUNTIME#io.containerd.}
	SHIM="containerd-shim-${name%.*}-${name##*.}"
	;;
*) SHIM="" ;;
esac
if [ -n "$SHIM" ] && [ ! -x "$SHIM_DIR/$SHIM" ]; then
	die "$SHIM_DIR/$SHIM missing (pip install -e . / make venv should install it)"
fi

T0=$(date +%s)
if [ "${CONFORMANCE_SKIP_SETUP:-0}" != 1 ]; then
	log "setup.sh (idempotent; first run on a fresh machine: a few minutes)"
	"$CONF/setup.sh" || die "setup.sh failed"
fi
T1=$(date +%s)

mkdir -p "$LOGDIR"
export PEER_SHIM_DIR=$SHIM_DIR
# The shims' on-demand fork server: a private socket for the suites' containerds, stopped
# (by the pid in its lock file) when the suites end -- never the machine's default one.
FORKSERVER_DIR=$(mktemp -d /tmp/supervisor-conformance-fs.XXXXXX)
export SUPERVISOR_FORKSERVER=$FORKSERVER_DIR/forkserver.sock
# ... and the shims' copies of their code (in-place upgrades) beside it, removed with it.
export SUPERVISOR_CODE_DIR=$FORKSERVER_DIR/code
stop_forkserver() {
	local pid
	pid=$(cat "$FORKSERVER_DIR/forkserver.lock" 2>/dev/null || true)
	if [ -n "$pid" ] && grep -q supervisor.forkserver "/proc/$pid/cmdline" 2>/dev/null; then
		kill "$pid" 2>/dev/null || true
	fi
	rm -rf "$FORKSERVER_DIR"
}
trap stop_forkserver EXIT
SERIES=${SERIES:-1.6}
case $SERIES in
1.6) unset PEER_CONTAINERD ;;
1.7 | 2.1) export PEER_CONTAINERD=$SERIES ;;
*) die "SERIES=$SERIES: 1.6, 1.7 or 2.1" ;;
esac
log "containerd series $SERIES (client suite and stress; CRI on the system's 1.6)"
log "runtime $RUNTIME (handler $HANDLER), shim from $SHIM_DIR, logs in $LOGDIR"
rc=0
case $PART in
all)
	"$CONF/run-all.sh" "$RUNTIME" "$HANDLER" "$LOGDIR" "$DURATION" >"$LOGDIR/run-all.out" 2>&1 || rc=$?
	;;
client)
	"$CONF/run-client-suite.sh" "$RUNTIME" "$LOGDIR/client" "${SELECT:-@client-shim-subset.txt}" \
		>"$LOGDIR/client.out" 2>&1 || rc=$?
	;;
cri)
	"$CONF/run-cri-suite.sh" "$HANDLER" "$LOGDIR/cri" "${SELECT:-@cri-subset.txt}" \
		>"$LOGDIR/cri.out" 2>&1 || rc=$?
	;;
stress)
	"$CONF/run-stress.sh" "$RUNTIME" "$DURATION" 2 --exec "$LOGDIR/stress" \
		>"$LOGDIR/stress.out" 2>&1 || rc=$?
	;;
esac
T2=$(date +%s)

parts=(client cri stress)
[ "$PART" = all ] || parts=("$PART")
echo
echo "===== conformance: $RUNTIME (setup $((T1 - T0)) s, suites $((T2 - T1)) s, rc=$rc) ====="
for p in "${parts[@]}"; do
	if [ -s "$LOGDIR/$p/summary.txt" ]; then
		cat "$LOGDIR/$p/summary.txt"
	else
		out=$LOGDIR/$p.out
		[ -s "$out" ] || out=$LOGDIR/run-all.out
		echo "== $p: no result; last lines of $out:"
		tail -3 "$out" 2>/dev/null || true
	fi
done
if [ -n "$SELECT" ]; then
	echo "(only the tests matching $SELECT: the baselines below are for the whole subsets)"
fi
cat <<'EOF'

----- baselines (../shared/conformance/README.md, 2 cores, cgroup v1; containerd 1.6) -----
With SERIES=1.7 the client subset is 49/0/0 for either shim; with SERIES=2.1 it is 46/3/0 for
any runtime not named io.containerd.runc.*: the 1.6 test client sends the legacy
containerd.linux.runc.CreateOptions, which a 2.x daemon no longer knows, and the daemon fails
TestShimInCgroup, TestUserNamespaces and TestShimOOMScore before it asks the shim.
                       io.containerd.runc.v2        Go shim renamed io.containerd.supervisor.v2
client shim subset     49 pass / 0 fail / 0 skip    46 / 3 / 0 (the 3 [opts] tests)
CRI subset             32 pass / 0 fail / 1 skip    32 / 0 / 1
stress 30s 2 --exec    395 containers, 1502 execs,  312 containers, 1241 execs,
                       0 failures (+-25 % per run)  0 failures
A shim that decodes containerd.linux.runc.CreateOptions too can pass the [opts] tests.
EOF
echo "logs: $LOGDIR"
exit "$rc"
