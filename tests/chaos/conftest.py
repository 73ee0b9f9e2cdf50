"""The chaos suite drives the integration harness (tests/integration/harness.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import Containerd, build_busybox_rootfs, mark_real_containerd_tests


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_real_containerd_tests(items, Path(__file__).resolve().parent)


@pytest.fixture
def chaos_containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """A private containerd; ``indirect`` parametrization passes its environment."""
    env = getattr(request, "param", None) or {}
    c = Containerd(runtime=os.environ.get("SUPERVISOR_TEST_RUNTIME") or None, env=env)
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="session")
def chaos_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("chaos") / "rootfs")
