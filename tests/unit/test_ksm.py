"""The shim's KSM opt-in (``prctl(PR_SET_MEMORY_MERGE)``), in a child process each time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor import _ksm

needs_ksm = pytest.mark.skipif(not os.path.exists("/proc/self/ksm_stat"),
                               reason="kernel without per-process KSM (Linux < 6.4)")


@pytest.mark.parametrize(("value", "on"), [
    (None, True), ("1", True), ("0", False), ("off", False), ("no", False), ("yes", True)])
def test_wanted(value: str | None, on: bool) -> None:
    env = {} if value is None else {_ksm.ENV: value}
    assert _ksm.wanted(env) is on


def _child(env_value: str | None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != _ksm.ENV}
    if env_value is not None:
        env[_ksm.ENV] = env_value
    code = ("from supervisor import _ksm; print(_ksm.apply()); "
            "print([l for l in open('/proc/self/ksm_stat') if 'merge_any' in l][0].strip())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out[0], out[1]


@needs_ksm
def test_apply_opts_in_by_default_and_out_on_request() -> None:
    said, stat = _child(None)
    assert (said, stat) == ("memory mergeable by KSM", "ksm_merge_any: yes")
    said, stat = _child("0")
    assert stat == "ksm_merge_any: no" and "opted out" in said
