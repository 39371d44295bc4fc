"""TURN REST credentials from ``/v1/im/rtc/ice-servers`` against a real coturn.

coturn runs with ``use-auth-secret`` and its shared secrets in its SQLite
database (``scripts/services/coturn``). Each tenant's secret is added to the
one realm; the runtime mints ``expiry:tenant:user`` usernames with
base64(HMAC-SHA1(secret, username)) passwords, and a real TURN Allocate
(aioice) shows coturn accepts them, refuses forged or expired ones, and stops
accepting a tenant's credentials as soon as its secret is removed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aioice import stun
from aioice import turn as aioice_turn

from imhub.runtime import turn
from tests.harness import EmbeddedServer, make_tenants
from tests.realservices import SCRIPTS, ServiceSet

pytestmark = pytest.mark.services

TTL = 600


def coturn_secret(services: ServiceSet, action: str, secret: str) -> None:
    """``scripts/services/coturn add-secret|remove-secret --dir D SECRET``."""
    proc = subprocess.run(
        [str(SCRIPTS / "coturn"), action, "--dir", str(services.base), secret],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


async def allocate(
    env: dict[str, str], username: str, password: str, transport: str = "udp"
) -> tuple[str, int]:
    """One TURN Allocate; returns the relayed address and releases it again."""
    relay, _ = await asyncio.wait_for(
        aioice_turn.create_turn_endpoint(
            asyncio.DatagramProtocol,
            server_addr=("127.0.0.1", int(env["TURN_PORT"])),
            username=username,
            password=password,
            lifetime=60,
            transport=transport,
        ),
        timeout=20,
    )
    try:
        host, port = relay.get_extra_info("sockname")[:2]
        return str(host), int(port)
    finally:
        relay.close()


async def refused(env: dict[str, str], username: str, password: str) -> int:
    """The STUN error code coturn answers an Allocate with (fails if it succeeds)."""
    with pytest.raises(stun.TransactionFailed) as info:
        await allocate(env, username, password)
    code: int = info.value.response.attributes["ERROR-CODE"][0]
    return code


@pytest.fixture(scope="module")
def coturn(services: ServiceSet) -> dict[str, str]:
    return services.get("coturn")


@pytest.fixture(scope="module")
def tenants(services: ServiceSet, coturn: dict[str, str]) -> Iterator[dict[str, dict[str, Any]]]:
    docs = make_tenants("rtc-a", "rtc-b", "rtc-none")
    for doc in docs:
        doc["turn_secret"] = f"{doc['tenant_id']}-{secrets.token_hex(16)}"
    del docs[2]["turn_secret"]  # a tenant without TURN gets STUN only
    added = [d["turn_secret"] for d in docs if "turn_secret" in d]
    for secret in added:
        coturn_secret(services, "add-secret", secret)
    yield {d["tenant_id"]: d for d in docs}
    for secret in added:
        coturn_secret(services, "remove-secret", secret)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    coturn: dict[str, str],
    tenants: dict[str, dict[str, Any]],
) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(
        Path(tmp_path_factory.mktemp("turn")),
        list(tenants.values()),
        # list settings are JSON in the environment
        turn_urls=json.dumps([coturn["TURN_URL"], coturn["TURN_URL"] + "?transport=tcp"]),
        stun_urls=json.dumps([f"stun:127.0.0.1:{coturn['TURN_PORT']}"]),
        turn_ttl_seconds=TTL,
    )
    srv.start()
    yield srv
    srv.stop()


async def ice_servers(server: EmbeddedServer, tenant_id: str, user_id: str) -> dict[str, Any]:
    async with server.rest(tenant_id, user_id) as http:
        response = await http.get("/v1/im/rtc/ice-servers")
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def turn_entry(doc: dict[str, Any]) -> dict[str, Any]:
    entries = [s for s in doc["ice_servers"] if "credential" in s]
    assert len(entries) == 1, doc
    entry: dict[str, Any] = entries[0]
    return entry


async def test_ice_servers_carry_credentials_coturn_accepts(
    server: EmbeddedServer, coturn: dict[str, str]
) -> None:
    before = int(time.time())
    doc = await ice_servers(server, "rtc-a", "alice")
    entry = turn_entry(doc)
    assert entry["urls"] == [coturn["TURN_URL"], coturn["TURN_URL"] + "?transport=tcp"]
    assert {"urls": [f"stun:127.0.0.1:{coturn['TURN_PORT']}"]} in doc["ice_servers"]
    expiry, tenant_id, user_id = entry["username"].split(":")
    assert (tenant_id, user_id) == ("rtc-a", "alice")
    assert before + TTL <= int(expiry) <= int(time.time()) + TTL
    assert doc["ttl"] == TTL and doc["expires_at"] == int(expiry)

    host, port = await allocate(coturn, entry["username"], entry["credential"])
    assert host == "127.0.0.1"
    assert int(coturn["TURN_MIN_PORT"]) <= port <= int(coturn["TURN_MAX_PORT"])
    # The same credentials work over TCP too.
    host, _ = await allocate(coturn, entry["username"], entry["credential"], transport="tcp")
    assert host == "127.0.0.1"


async def test_forged_credentials_are_refused(
    server: EmbeddedServer, coturn: dict[str, str]
) -> None:
    entry = turn_entry(await ice_servers(server, "rtc-a", "mallory"))
    username, credential = entry["username"], entry["credential"]
    # A wrong password, and a longer life or another user under the same password.
    wrong = base64.b64encode(hashlib.sha1(b"guess").digest()).decode()
    assert await refused(coturn, username, wrong) == 401
    expiry, tenant_id, user_id = username.split(":")
    assert await refused(coturn, f"{int(expiry) + 86400}:{tenant_id}:{user_id}", credential) == 401
    assert await refused(coturn, f"{expiry}:{tenant_id}:admin", credential) == 401
    # A secret that coturn does not know.
    made_up, made_up_password, _ = turn.turn_credentials(
        "not-a-listed-secret", "rtc-a", "mallory", ttl=600
    )
    assert await refused(coturn, made_up, made_up_password) == 401


async def test_expired_credentials_are_refused(
    coturn: dict[str, str], tenants: dict[str, dict[str, Any]]
) -> None:
    secret = tenants["rtc-a"]["turn_secret"]
    username, password, expiry = turn.turn_credentials(
        secret, "rtc-a", "alice", ttl=600, now=time.time() - 3600
    )
    assert expiry < time.time()
    assert await refused(coturn, username, password) == 401
    # The same secret with a future expiry is fine: only the expiry is at fault.
    username, password, _ = turn.turn_credentials(secret, "rtc-a", "alice", ttl=600)
    await allocate(coturn, username, password)


async def test_each_tenant_secret_works_in_the_shared_realm(
    server: EmbeddedServer, coturn: dict[str, str]
) -> None:
    a = turn_entry(await ice_servers(server, "rtc-a", "alice"))
    b = turn_entry(await ice_servers(server, "rtc-b", "bob"))
    assert a["credential"] != b["credential"]
    assert b["username"].split(":")[1:] == ["rtc-b", "bob"]
    await allocate(coturn, a["username"], a["credential"])
    await allocate(coturn, b["username"], b["credential"])


async def test_tenant_without_turn_secret_gets_stun_only(
    server: EmbeddedServer, coturn: dict[str, str]
) -> None:
    doc = await ice_servers(server, "rtc-none", "carol")
    assert doc["ice_servers"] == [{"urls": [f"stun:127.0.0.1:{coturn['TURN_PORT']}"]}]
    assert doc["ttl"] is None and doc["expires_at"] is None


async def test_ice_servers_need_a_user_token(server: EmbeddedServer) -> None:
    async with httpx.AsyncClient(base_url=server.http(), timeout=10) as http:
        response = await http.get("/v1/im/rtc/ice-servers")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        forged = server.token("rtc-a", "alice")[:-2] + "xx"
        response = await http.get(
            "/v1/im/rtc/ice-servers", headers={"Authorization": f"Bearer {forged}"}
        )
        assert response.status_code == 401


async def test_removed_secret_is_refused_at_the_next_allocate(
    services: ServiceSet,
    server: EmbeddedServer,
    coturn: dict[str, str],
    tenants: dict[str, dict[str, Any]],
) -> None:
    """Revoking one tenant's secret leaves the other tenants working."""
    a = turn_entry(await ice_servers(server, "rtc-a", "alice"))
    b = turn_entry(await ice_servers(server, "rtc-b", "bob"))
    await allocate(coturn, b["username"], b["credential"])

    secret_b = tenants["rtc-b"]["turn_secret"]
    coturn_secret(services, "remove-secret", secret_b)
    try:
        assert await refused(coturn, b["username"], b["credential"]) == 401
        await allocate(coturn, a["username"], a["credential"])
    finally:
        coturn_secret(services, "add-secret", secret_b)
    # Put back (a rotation to the same value): accepted again, no restart.
    await allocate(coturn, b["username"], b["credential"])


def test_password_is_the_turn_rest_api_hmac(tenants: dict[str, dict[str, Any]]) -> None:
    secret = tenants["rtc-a"]["turn_secret"]
    username, password, expiry = turn.turn_credentials(
        secret, "rtc-a", "alice", ttl=60, now=1_700_000_000
    )
    assert username == f"{1_700_000_060}:rtc-a:alice" and expiry == 1_700_000_060
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    assert password == base64.b64encode(digest).decode()
