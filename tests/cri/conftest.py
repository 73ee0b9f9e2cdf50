"""Fixtures for the Kubernetes-path tests: containerd's real CRI plugin, runc, our shim.

Every test here gets the ``integration`` marker and is skipped (with the reason) when not
root or when containerd, ctr or runc are missing.

* ``cri_images`` (session) -> (busybox, pause) OCI tarballs built from busybox-static.
* ``cri`` -> :class:`cri_harness.CriEnv`: a private containerd with the CRI plugin started
  (see cri_harness.py for its config), both images imported into ``k8s.io``, a CRI client.
  ``@pytest.mark.parametrize("cri", ["TOML lines"], indirect=True)`` appends those lines
  to the shim's settings file (supervisor.toml) for one test.
  On failure the containerd log tail (which holds the shim's log too) is printed and the
  whole log kept under ``<pytest basetemp>/containerd-logs/``. Teardown stops and removes
  every pod through CRI, then cleans up like the integration harness, and fails the test
  if a shim, mount, directory or cgroup of the instance is left.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import (
    OciImageTar,
    build_busybox_rootfs,
    mark_real_containerd_tests,
    test_failed,
    wait_for,
)

from cri_harness import (
    BUSYBOX_REF,
    PAUSE_REF,
    CriContainerd,
    CriEnv,
    build_images,
)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_real_containerd_tests(items, HERE)


@pytest.fixture(scope="session")
def cri_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[OciImageTar, OciImageTar]:
    tmp = tmp_path_factory.mktemp("cri-images")
    return build_images(tmp, build_busybox_rootfs(tmp / "rootfs"))


@pytest.fixture
def cri(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    cri_images: tuple[OciImageTar, OciImageTar],
) -> Iterator[CriEnv]:
    daemon = CriContainerd(shim_settings=getattr(request, "param", ""))
    env: CriEnv | None = None
    try:
        daemon.start()
        for tar in cri_images:
            daemon.import_image(tar)
        env = CriEnv(daemon)
        # The CRI plugin learns about imported images from containerd's events.
        client = env.client
        wait_for(lambda: all(client.image_status(r) for r in (BUSYBOX_REF, PAUSE_REF)), 10,
                 message="CRI to see the imported images")
        yield env
    finally:
        if test_failed(request.node):
            keep = tmp_path_factory.getbasetemp() / "containerd-logs"
            keep.mkdir(exist_ok=True)
            dest = keep / (re.sub(r"[^\w.-]+", "_", request.node.nodeid)[-150:] + ".log")
            if daemon.log_path.exists():
                shutil.copyfile(daemon.log_path, dest)
            print(f"--- CRI containerd {daemon.address} log tail (whole log: {dest}) ---")
            print(daemon.log_tail(80))
        if env is not None:
            env.close()
        daemon.cleanup()
    left = daemon.leftovers()
    assert not left, f"left behind: {left}"
