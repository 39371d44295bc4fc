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
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    tenants = make_tenants(
        *TENANTS,
        rate_per_second=50,
        rate_burst=100,
        max_content_bytes=4096,
        max_upload_bytes=1024 * 1024,
    )
    if request.param == "embedded":
        server = EmbeddedServer(
            tmp_path_factory.mktemp("embedded"),
            tenants,
            auth_timeout_seconds=2,
            max_frame_bytes=65536,
        )
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
    stack = harness_stack.StackTarget(
        Path(tmp_path_factory.mktemp("stack")),
        services,
        tenants,
        auth_timeout_seconds=2,
        max_frame_bytes=65536,
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


async def create_conversation(
    target: Target,
    tenant_id: str,
    creator: str,
    members: list[str],
    *,
    kind: str = "group",
    name: str | None = "test group",
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind, "member_ids": members}
    if kind == "group" and name:
        body["name"] = name
    async with target.rest(tenant_id, creator) as http:
        resp = await http.post("/v1/im/conversations", json=body)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def history(
    target: Target, tenant_id: str, user: str, conv_id: str, **params: Any
) -> list[dict[str, Any]]:
    """All messages of the conversation (follows after_seq pages)."""
    out: list[dict[str, Any]] = []
    after = params.pop("after_seq", 0)
    async with target.rest(tenant_id, user) as http:
        while True:
            resp = await http.get(
                "/v1/im/messages", params={"conv_id": conv_id, "after_seq": after, "limit": 200}
            )
            assert resp.status_code == 200, resp.text
            items = resp.json()["items"]
            out += items
            if len(items) < 200:
                return out
            after = items[-1]["seq"]
