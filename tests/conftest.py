"""Shared fixtures: real backend servers (session-wide) and an embedded server target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realservices import ServiceSet


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run soak/load tests")
    parser.addoption(
        "--no-services",
        action="store_true",
        help="skip tests that need the real backend servers or the cluster",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    skip_services = pytest.mark.skip(reason="--no-services given")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if config.getoption("--no-services") and (
            "services" in item.keywords or "cluster" in item.keywords
        ):
            item.add_marker(skip_services)


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceSet]:
    """Real backends, each started on first use: ``services.get("postgres")``."""
    base = Path(os.environ.get("IMHUB_TEST_SERVICES_DIR") or tempfile.mkdtemp(prefix="imhub-svc-"))
    svc = ServiceSet(base)
    try:
        yield svc
    finally:
        svc.stop_all()
