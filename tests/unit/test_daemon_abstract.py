"""A daemon on an abstract socket (hand-run shims, tests): serves, and says where."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVE = """
import socket, sys
from supervisor import daemon
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1].replace("@", "\\0", 1))
s.listen(8)
sys.exit(daemon.serve(s, namespace="unit", container_id="c1", ttrpc_address="",
                      bundle=sys.argv[2]))
"""


def test_a_daemon_serves_an_abstract_socket(tmp_path: Path) -> None:
    # getsockname() of an abstract socket is bytes: the daemon once crashed on it.
    address = f"@supervisor-unit-{os.getpid()}"
    daemon = subprocess.Popen([sys.executable, "-c", SERVE, address, str(tmp_path)],
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert daemon.poll() is None, daemon.communicate()[1].decode()[-2000:]
            shown = subprocess.run([sys.executable, "-m", "supervisor.cli", "inspect", "--json",
                                    address], capture_output=True, text=True, check=False)
            if shown.returncode == 0:
                break
            assert time.monotonic() < deadline, shown.stderr
            time.sleep(0.1)
        assert json.loads(shown.stdout)["shim"]["address"] == address
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
