"""Fixtures for the tests that drive a real, private containerd (see harness.py).

Every test under tests/integration gets the ``integration`` marker, and is skipped (with
the reason) when not root or when containerd, ctr or runc are missing.

Fixtures:

* ``containerd_runtime`` -> str: runtime name for ``ctr run --runtime``;
  ``$SUPERVISOR_TEST_RUNTIME`` or io.containerd.supervisor.v2. Override it in a module
  (define a fixture of the same name) to run a whole module with another runtime.
* ``containerd`` -> Containerd: a started private containerd, cleaned up after the test.
  Per test: ``@pytest.mark.parametrize("containerd", ["io.containerd.runc.v2"],
  indirect=True)`` picks the runtime. On failure its log tail is printed and the whole log
  is kept under ``<pytest basetemp>/containerd-logs/``.
* ``make_containerd`` -> callable(runtime=None, start=True, **kwargs) -> Containerd: more
  daemons in one test; all cleaned up.
* ``busybox_rootfs_template`` (session) -> Path: the pristine rootfs; treat as read-only.
* ``busybox_rootfs`` -> Path: the test's own writable copy (deleted after the test).
* ``oci_image_tar`` (session) -> OciImageTar(path, ref): a busybox OCI image tarball.
* ``busybox_image`` -> str: ``oci_image_tar`` imported into ``containerd``; its ref.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Containerd,
    OciImageTar,
    build_busybox_rootfs,
    build_oci_image_tar,
    copy_rootfs,
    default_runtime,
    find_busybox,
    mark_real_containerd_tests,
    test_failed,
)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_real_containerd_tests(items, HERE)


def _keep_log(
    request: pytest.FixtureRequest, factory: pytest.TempPathFactory, c: Containerd
) -> None:
    if not test_failed(request.node):
        return
    keep = factory.getbasetemp() / "containerd-logs"
    keep.mkdir(exist_ok=True)
    dest = keep / (re.sub(r"[^\w.-]+", "_", request.node.nodeid)[-150:] + f"-{c.namespace}.log")
    if c.log_path.exists():
        shutil.copyfile(c.log_path, dest)
    print(f"--- containerd {c.address} log tail (whole log: {dest}) ---")
    print(c.log_tail(60))


@pytest.fixture
def containerd_runtime() -> str:
    return default_runtime()


@pytest.fixture
def containerd(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    containerd_runtime: str,
) -> Iterator[Containerd]:
    runtime = getattr(request, "param", None) or containerd_runtime
    c = Containerd(runtime=runtime)
    try:
        c.start()
        yield c
    finally:
        try:
            _keep_log(request, tmp_path_factory, c)
        finally:
            c.cleanup()


@pytest.fixture
def make_containerd(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    containerd_runtime: str,
) -> Iterator[Callable[..., Containerd]]:
    made: list[Containerd] = []

    def make(runtime: str | None = None, start: bool = True, **kwargs: Any) -> Containerd:
        c = Containerd(runtime=runtime or containerd_runtime, **kwargs)
        made.append(c)
        if start:
            c.start()
        return c

    yield make
    for c in made:
        try:
            _keep_log(request, tmp_path_factory, c)
        finally:
            c.cleanup()


@pytest.fixture(scope="session")
def busybox_rootfs_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        find_busybox()
    except RuntimeError as e:
        pytest.skip(str(e))
    return build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def busybox_rootfs(busybox_rootfs_template: Path, tmp_path: Path) -> Iterator[Path]:
    # Each test gets its own copy: runc and the tests may write to it (--rootfs is rw).
    dest = copy_rootfs(busybox_rootfs_template, tmp_path / "rootfs")
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


@pytest.fixture(scope="session")
def oci_image_tar(
    tmp_path_factory: pytest.TempPathFactory, busybox_rootfs_template: Path
) -> OciImageTar:
    out = tmp_path_factory.mktemp("oci") / "busybox-oci.tar"
    return build_oci_image_tar(out, rootfs=busybox_rootfs_template)


@pytest.fixture
def busybox_image(containerd: Containerd, oci_image_tar: OciImageTar) -> str:
    containerd.ctr("images", "import", str(oci_image_tar.path), timeout=120)
    return oci_image_tar.ref
