"""Embedded-server behaviour that needs its own settings: keys, timeouts, logs, metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.harness import Client, EmbeddedServer, make_tenants


def _pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    tenants = make_tenants("keyed", rate_per_second=5, rate_burst=5)
    tenants[0]["keys"] += [
        {"kid": "rsa-2026", "alg": "RS256", "public_key": _pem(RSA_KEY)},
        {"kid": "ec-2026", "alg": "ES256", "public_key": _pem(EC_KEY)},
    ]
    srv = EmbeddedServer(
        Path(tmp_path_factory.mktemp("behaviour")),
        tenants,
        idle_timeout_seconds=1.5,
        auth_timeout_seconds=1,
    )
    srv.start()
    yield srv
    srv.stop()


def _claims(user: str = "u1", **extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": user, "tenant_id": "keyed", "iat": now, "exp": now + 300, **extra}


async def _authorize(server: EmbeddedServer, token: str) -> dict[str, object]:
    client = await Client.connect(server.ws())
    try:
        return await client.request("authorize", {"token": token})
    finally:
        await client.close()


async def test_asymmetric_keys_and_kid_rotation(server: EmbeddedServer) -> None:
    rs = jwt.encode(_claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-2026"})
    es = jwt.encode(_claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-2026"})
    hs = server.token("keyed", "u1")
    for token in (rs, es, hs):
        assert (await _authorize(server, token))["success"]
    # A key only verifies its own algorithm, and the kid must match the key.
    wrong_kid = jwt.encode(_claims(), RSA_KEY, algorithm="RS256", headers={"kid": "ec-2026"})
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(), other_rsa, algorithm="RS256", headers={"kid": "rsa-2026"})
    for token in (wrong_kid, forged):
        ack = await _authorize(server, token)
        assert ack["success"] is False and ack["error"]["code"] == "unauthorized"  # type: ignore[index]


async def test_idle_timeout_closes_quiet_connections(server: EmbeddedServer) -> None:
    client = await Client.connect(server.ws(), server.token("keyed", "idle"))
    started = time.monotonic()
    code, reason = await client.wait_closed(timeout=10)
    assert code == 4000 and "idle" in reason
    assert 1.0 < time.monotonic() - started < 6


async def test_pings_keep_a_connection_alive(server: EmbeddedServer) -> None:
    client = await Client.connect(server.ws(), server.token("keyed", "busy"))
    for _ in range(4):
        await asyncio.sleep(0.7)
        assert (await client.request("ping", {}))["success"]
    assert not client.closed.done()
    await client.close()


async def test_persistent_rate_abuse_is_disconnected(server: EmbeddedServer) -> None:
    client = await Client.connect(server.ws(), server.token("keyed", "flooder"))
    frame = json.dumps({"event": "ping", "payload": {}})
    for _ in range(400):
        try:
            await client.send_raw(frame)
        except Exception:  # noqa: BLE001 - closed mid-flood
            break
    code, _ = await client.wait_closed(timeout=10)
    assert code == 4008
    # The server is fine and the next connection of that user works.
    again = await Client.connect(server.ws(), server.token("keyed", "flooder"))
    assert (await again.request("ping", {}))["success"]
    await again.close()


async def test_metrics_and_health(server: EmbeddedServer) -> None:
    async with httpx.AsyncClient(base_url=server.http()) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        ready = (await http.get("/readyz")).json()
        assert ready["ready"] is True and ready["checks"]["database"] is True
        metrics = (await http.get("/metrics")).text
        docs = await http.get("/docs")
        openapi = (await http.get("/openapi.json")).json()
        missing = await http.get("/v1/im/nope")
    for name in (
        "imhub_ws_connections",
        "imhub_messages_total",
        "imhub_acks_total",
        "imhub_errors_total",
        "imhub_send_deliver_seconds",
    ):
        assert name in metrics
    assert docs.status_code == 200
    assert "/v1/im/conversations" in openapi["paths"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_logs_are_json_without_secrets_or_bodies(server: EmbeddedServer) -> None:
    secret_text = f"body-{secrets.token_hex(8)}"
    token = server.token("keyed", "logger")
    async with httpx.AsyncClient(
        base_url=server.http(), headers={"Authorization": f"Bearer {token}"}
    ) as http:
        conv = (
            await http.post("/v1/im/conversations", json={"type": "group", "member_ids": ["x"]})
        ).json()
    client = await Client.connect(server.ws(), token)
    assert (await client.send_text(conv["conv_id"], secret_text))["success"]
    await client.close()
    await asyncio.sleep(0.3)
    log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all("level" in line and "message" in line for line in lines)
    requests = [line for line in lines if line["message"] == "request"]
    create = next(r for r in requests if r["path"] == "/v1/im/conversations")
    assert create["tenant_id"] == "keyed" and create["status"] == 200 and create["request_id"]
    ws_lines = [line for line in lines if line["message"] in ("ws connected", "ws closed")]
    assert ws_lines and all(line["tenant_id"] == "keyed" and line["conn_id"] for line in ws_lines)
    assert secret_text not in log
    assert token not in log
    assert server.tenants["keyed"]["keys"][0]["secret"] not in log


async def test_cors_and_media_urls_follow_the_host_used(server: EmbeddedServer) -> None:
    token = server.token("keyed", "cors-user")
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.http()) as http:
        pre = await http.options(
            "/v1/im/conversations",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        conv = (
            await http.post(
                "/v1/im/conversations", headers=auth, json={"type": "group", "member_ids": ["x"]}
            )
        ).json()
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] in ("*", "https://app.example")
    localhost = server.http().replace("127.0.0.1", "localhost")
    async with httpx.AsyncClient(base_url=localhost) as http:
        ticket = (
            await http.post(
                "/v1/im/media/upload-token",
                headers=auth,
                json={
                    "conv_id": conv["conv_id"],
                    "file_name": "a.txt",
                    "content_type": "text/plain",
                    "size": 5,
                },
            )
        ).json()
        assert ticket["url"].startswith(f"{localhost}/v1/media/local/")
        put = await http.put(ticket["url"], content=b"hello", headers=ticket["headers"])
        assert put.status_code == 200
