"""Suite-wide: ``--long`` runs the long chaos and soak forms; each test's phase reports are
kept on the item, so fixtures can tell whether their test failed (:func:`test_failed`);
the header names the containerd series the real-containerd tests run on
(``$SUPERVISOR_TEST_CONTAINERD``, see tests/integration/harness.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

INTEGRATION = Path(__file__).resolve().parent / "integration"

REPORT_ATTR = "_sv_rep_"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, REPORT_ATTR + rep.when, rep)
    return rep


@pytest.fixture(autouse=True, scope="session")
def _private_code_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Shims the tests start keep the copy of their code (in-place upgrades) in the run's
    own directory, never the machine's ``/run/containerd/supervisor/code`` (harness
    containerds name their own; this covers shims started any other way)."""
    from supervisor.codesnap import DIR_ENV  # noqa: PLC0415 - the package under test

    os.environ.setdefault(DIR_ENV, str(tmp_path_factory.mktemp("code")))


def pytest_report_header(config: pytest.Config) -> str:
    if str(INTEGRATION) not in sys.path:
        sys.path.insert(0, str(INTEGRATION))
    import harness  # noqa: PLC0415 - tests/integration is not importable before this

    return harness.series_header()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long chaos/soak forms (many rounds, outages > 30 s)")
    parser.addoption("--upgrade-base", default=None, metavar="COMMIT",
                     help="the commit tests/integration/test_upgrade.py upgrades from "
                          "(default $SUPERVISOR_TEST_UPGRADE_BASE, else the newest commit "
                          "before HEAD that has supervisor/upgrade.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long form: run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
