"""The crash tests' stack: its own tenant and processes on the session's backends."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import make_tenants
from tests.harness_stack import BACKENDS, RUNTIME_PARTS, StackTarget


@pytest.fixture(scope="module")
def crash_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackTarget]:
    if request.config.getoption("--no-services"):
        pytest.skip("--no-services given")
    services: Any = request.getfixturevalue("services")
    tenants = make_tenants(f"e2e{secrets.token_hex(3)}", rate_per_second=500, rate_burst=1000)
    stack = StackTarget(Path(tmp_path_factory.mktemp("crash-stack")), services, tenants)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def stack(crash_stack: StackTarget) -> Iterator[StackTarget]:
    """The crash stack, with every part running again after the test."""
    try:
        yield crash_stack
    finally:
        for name in (*BACKENDS, *RUNTIME_PARTS):
            if not crash_stack.running(name):
                crash_stack.start_part(name)


@pytest.fixture
def tenant_id(crash_stack: StackTarget) -> str:
    return next(iter(crash_stack.tenants))
