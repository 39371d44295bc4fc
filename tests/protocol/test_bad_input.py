"""Bad input gets a clear error, and the connection and process stay usable."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.harness import Client, Target
from tests.protocol.conftest import create_conversation


async def _alive(client: Client, conv_id: str) -> None:
    """The connection still works after the bad frame."""
    ack = await client.send_text(conv_id, "still here")
    assert ack["success"], ack


@pytest.fixture
async def session(target: Target) -> tuple[Client, str]:
    user = f"u-{secrets.token_hex(4)}"
    conv = await create_conversation(target, "acme", user, [f"peer-{secrets.token_hex(3)}"])
    client = await Client.connect(target.ws(), target.token("acme", user))
    yield client, conv["conv_id"]  # type: ignore[misc]
    await client.close()


def _err(ack: dict[str, object]) -> str:
    assert ack["success"] is False, ack
    error = ack["error"]
    assert isinstance(error, dict) and error["message"], ack
    return str(error["code"])


async def test_malformed_json(session: tuple[Client, str]) -> None:
    client, conv_id = session
    await client.send_raw('{"event": "send_message", "payload": ')
    await asyncio.sleep(0.3)
    assert client.orphan_acks and client.orphan_acks[-1]["error"]["code"] == "invalid_payload"
    await _alive(client, conv_id)


async def test_binary_frame(session: tuple[Client, str]) -> None:
    client, conv_id = session
    await client.send_raw(b"\x00\x01binary")
    await asyncio.sleep(0.3)
    assert client.orphan_acks[-1]["error"]["code"] == "invalid_payload"
    await _alive(client, conv_id)


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("no_such_event", {}),
        ("send_message", {}),
        ("send_message", {"conv_id": "x", "client_msg_id": "y", "type": "text"}),
        (
            "send_message",
            {"conv_id": 5, "client_msg_id": "y", "type": "text", "content": {"text": "hi"}},
        ),
        (
            "send_message",
            {"conv_id": "x", "client_msg_id": "y", "type": "sticker", "content": {"text": "hi"}},
        ),
        (
            "send_message",
            {"conv_id": "x", "client_msg_id": "y", "type": "text", "content": {"text": 7}},
        ),
        (
            "send_message",
            {"conv_id": "x", "client_msg_id": "y", "type": "image", "content": {"width": 3}},
        ),
        (
            "send_message",
            {"conv_id": "x", "client_msg_id": "y" * 65, "type": "text", "content": {"text": "hi"}},
        ),
        ("mark_read", {"conv_id": "x", "last_read_seq": "3"}),
        ("mark_read", {"conv_id": "x", "last_read_seq": -1}),
        ("rtc_signal", {"conv_id": "x", "to_user_id": "y", "type": "dance"}),
    ],
)
async def test_missing_or_wrong_fields(
    session: tuple[Client, str], event: str, payload: dict[str, object]
) -> None:
    client, conv_id = session
    assert _err(await client.request(event, payload)) == "invalid_payload"
    await _alive(client, conv_id)


async def test_system_messages_are_server_only(session: tuple[Client, str]) -> None:
    client, conv_id = session
    ack = await client.request(
        "send_message",
        {"conv_id": conv_id, "client_msg_id": "s1", "type": "system", "content": {"event": "x"}},
    )
    assert _err(ack) == "forbidden"


async def test_oversized_content(session: tuple[Client, str]) -> None:
    client, conv_id = session
    ack = await client.send_text(conv_id, "x" * 5000)  # tenant limit is 4096 bytes
    assert _err(ack) == "too_large"
    await _alive(client, conv_id)


async def test_oversized_frame_closes_with_1009(
    target: Target, session: tuple[Client, str]
) -> None:
    client, _conv_id = session
    await client.send_raw(json.dumps({"event": "ping", "payload": {"pad": "x" * 70000}}))
    code, _ = await client.wait_closed()
    assert code == 1009
    # The server itself is unharmed.
    other = await Client.connect(target.ws(), target.token("acme", "someone-else"))
    assert (await other.request("ping", {}))["success"]
    await other.close()


async def test_send_before_authorize(target: Target) -> None:
    client = await Client.connect(target.ws())
    try:
        ack = await client.request(
            "send_message",
            {"conv_id": "x", "client_msg_id": "y", "type": "text", "content": {"text": "hi"}},
        )
        assert _err(ack) == "unauthorized"
        # Still allowed to authorize afterwards.
        ok = await client.request("authorize", {"token": target.token("acme", "late")})
        assert ok["success"] and ok["data"]["user_id"] == "late"
    finally:
        await client.close()


async def test_no_authorize_within_timeout(target: Target) -> None:
    client = await Client.connect(target.ws())
    started = time.monotonic()
    code, _ = await client.wait_closed(timeout=10)
    assert code == 4002
    assert time.monotonic() - started < 8


def _b64(doc: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def _bad_tokens(target: Target) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "mallory", "tenant_id": "acme", "iat": now, "exp": now + 600}
    key = target.tenants["acme"]["keys"][0]
    other = target.tenants["globex"]["keys"][0]
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    header = {"alg": "HS256", "typ": "JWT", "kid": key["kid"]}
    signing_input = f"{_b64(header)}.{_b64(claims)}".encode()
    confused = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    return {
        "expired": target.token("acme", "mallory", ttl=-120),
        "not_yet_valid": jwt.encode(
            {**claims, "nbf": now + 3600},
            key["secret"],
            algorithm="HS256",
            headers={"kid": key["kid"]},
        ),
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "alg_confusion": signing_input.decode()
        + "."
        + base64.urlsafe_b64encode(confused).decode().rstrip("="),
        "rs256_unknown_key": jwt.encode(
            claims, rsa_key, algorithm="RS256", headers={"kid": key["kid"]}
        ),
        "other_tenants_key": jwt.encode(
            claims, other["secret"], algorithm="HS256", headers={"kid": other["kid"]}
        ),
        "missing_exp": jwt.encode(
            {"sub": "mallory", "tenant_id": "acme"},
            key["secret"],
            algorithm="HS256",
            headers={"kid": key["kid"]},
        ),
        "unknown_kid": jwt.encode(
            claims, key["secret"], algorithm="HS256", headers={"kid": "nope"}
        ),
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize(
    "kind",
    [
        "expired",
        "not_yet_valid",
        "alg_none",
        "alg_confusion",
        "rs256_unknown_key",
        "other_tenants_key",
        "missing_exp",
        "unknown_kid",
        "garbage",
    ],
)
async def test_bad_tokens_are_refused(target: Target, kind: str) -> None:
    token = _bad_tokens(target)[kind]
    client = await Client.connect(target.ws())
    try:
        ack = await client.request("authorize", {"token": token})
        assert _err(ack) == "unauthorized"
        code, _ = await client.wait_closed()
        assert code == 4001
    finally:
        await client.close()
    async with target.rest("acme", "x") as http:
        resp = await http.get("/v1/im/conversations", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"


async def test_rate_limit(session: tuple[Client, str]) -> None:
    client, conv_id = session
    acks = await asyncio.gather(*(client.request("ping", {}) for _ in range(160)))
    codes = [a["error"]["code"] for a in acks if not a["success"]]
    assert codes and set(codes) == {"rate_limited"}
    assert sum(a["success"] for a in acks) >= 100  # the burst went through
    await asyncio.sleep(1.5)  # the bucket refills
    await _alive(client, conv_id)


async def test_connection_limit_is_refused_before_authorize_succeeds(target: Target) -> None:
    user = f"multi-{secrets.token_hex(3)}"
    token = target.token("acme", user)
    clients = [await Client.connect(target.ws(), token) for _ in range(10)]  # the default limit
    try:
        extra = await Client.connect(target.ws())
        ack = await extra.request("authorize", {"token": token})
        assert ack["success"] is False and ack["error"]["code"] == "rate_limited"
        code, _ = await extra.wait_closed()
        assert code == 4003
    finally:
        for client in clients:
            await client.close()


async def test_flooding_before_authorize_is_cut_off(target: Target) -> None:
    client = await Client.connect(target.ws())
    for _ in range(30):
        try:
            await client.send_raw('{"event": "ping", "payload": {}}')
        except Exception:  # noqa: BLE001 - closed mid-flood
            break
    code, _ = await client.wait_closed()
    assert code == 4008


async def test_huge_numbers_keep_their_ack_id(session: tuple[Client, str]) -> None:
    client, conv_id = session
    ack = await client.request("mark_read", {"conv_id": conv_id, "last_read_seq": 10**40})
    assert _err(ack) == "invalid_payload"
    await _alive(client, conv_id)
