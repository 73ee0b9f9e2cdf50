"""The chaos suite drives the integration harness (tests/integration/harness.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import Containerd, build_busybox_rootfs, missing_requirements


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = missing_requirements()
    for item in items:
        item.add_marker(pytest.mark.integration)
        if missing:
            item.add_marker(pytest.mark.skip(reason="needs " + ", ".join(missing)))


@pytest.fixture
def chaos_containerd() -> Iterator[Containerd]:
    c = Containerd(runtime=os.environ.get("SUPERVISOR_TEST_RUNTIME") or None)
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="session")
def chaos_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("chaos") / "rootfs")
