"""The protocol suite runs against every deployment shape, so they cannot drift apart.

``embedded``: one ``imhub serve`` process. ``stack``: two gateways, the message
service and the RTC service over Kafka, PostgreSQL, Redis and S3 (see
``tests/harness_stack.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import EmbeddedServer, Target, make_tenants

TENANTS = ("acme", "globex")


@pytest.fixture(scope="session", params=["embedded", "stack"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tenants = make_tenants(*TENANTS, rate_per_second=50, rate_burst=100,
                           max_content_bytes=4096, max_upload_bytes=1024 * 1024)
    if request.param == "embedded":
        server = EmbeddedServer(tmp_path_factory.mktemp("embedded"), tenants,
                                auth_timeout_seconds=2, max_frame_bytes=65536)
        server.start()
        try:
            yield server
        finally:
            server.stop()
        return
    if request.config.getoption("--no-services"):
        pytest.skip("--no-services given")
    from tests import harness_stack

    services: Any = request.getfixturevalue("services")
    stack = harness_stack.StackTarget(Path(tmp_path_factory.mktemp("stack")), services, tenants,
                                      auth_timeout_seconds=2, max_frame_bytes=65536)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
