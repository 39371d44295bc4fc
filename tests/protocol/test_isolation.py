"""Tenant isolation and membership: other tenants and non-members learn nothing."""

from __future__ import annotations

import secrets

import httpx
import pytest

from tests.harness import Client, Target
from tests.protocol.conftest import create_conversation


@pytest.fixture
async def acme_world(target: Target) -> dict[str, str]:
    """A tenant-acme group with a message and a media key, owned by alice."""
    alice, bob = f"alice-{secrets.token_hex(3)}", f"bob-{secrets.token_hex(3)}"
    conv = await create_conversation(target, "acme", alice, [bob])
    client = await Client.connect(target.ws(), target.token("acme", alice))
    assert (await client.send_text(conv["conv_id"], "secret plans"))["success"]
    await client.close()
    async with target.rest("acme", alice) as http:
        resp = await http.post(
            "/v1/im/media/upload-token",
            json={
                "conv_id": conv["conv_id"],
                "file_name": "a.png",
                "content_type": "image/png",
                "size": 10,
            },
        )
        assert resp.status_code == 200, resp.text
        key = resp.json()["key"]
    return {"conv_id": conv["conv_id"], "alice": alice, "bob": bob, "key": key}


# (tenant, user) of the intruders: the same user id in another tenant, and an
# outsider of the same tenant.
def _intruders(world: dict[str, str]) -> list[tuple[str, str]]:
    return [("globex", world["alice"]), ("globex", "eve"), ("acme", f"eve-{secrets.token_hex(2)}")]


async def test_rest_routes_hide_other_tenants_and_non_members(
    target: Target, acme_world: dict[str, str]
) -> None:
    conv_id, key = acme_world["conv_id"], acme_world["key"]
    for tenant, user in _intruders(acme_world):
        async with target.rest(tenant, user) as http:
            calls = [
                await http.get(f"/v1/im/conversations/{conv_id}"),
                await http.get("/v1/im/messages", params={"conv_id": conv_id}),
                await http.get("/v1/im/messages", params={"conv_id": conv_id, "after_seq": 0}),
                await http.post(
                    f"/v1/im/conversations/{conv_id}/members", json={"user_ids": [user]}
                ),
                await http.delete(f"/v1/im/conversations/{conv_id}/members/{acme_world['bob']}"),
                await http.post(
                    "/v1/im/media/upload-token",
                    json={
                        "conv_id": conv_id,
                        "file_name": "x.png",
                        "content_type": "image/png",
                        "size": 10,
                    },
                ),
                await http.get("/v1/im/media/download-url", params={"key": key}),
            ]
            listed = await http.get("/v1/im/conversations")
        for resp in calls:
            assert resp.status_code == 404, (tenant, user, resp.request.url, resp.text)
            body = resp.json()
            assert body["error"]["code"] == "not_found"
            assert "secret plans" not in resp.text and acme_world["bob"] not in resp.text
        assert listed.status_code == 200
        assert conv_id not in listed.text

    # Nothing changed for the real members.
    async with target.rest("acme", acme_world["alice"]) as http:
        conv = (await http.get(f"/v1/im/conversations/{conv_id}")).json()
    assert sorted(m["user_id"] for m in conv["members"]) == sorted(
        [acme_world["alice"], acme_world["bob"]]
    )


async def test_ws_events_hide_other_tenants_and_non_members(
    target: Target, acme_world: dict[str, str]
) -> None:
    conv_id = acme_world["conv_id"]
    watcher = await Client.connect(target.ws(), target.token("acme", acme_world["bob"]))
    try:
        for tenant, user in _intruders(acme_world):
            client = await Client.connect(target.ws(1), target.token(tenant, user))
            try:
                send = await client.send_text(conv_id, "let me in")
                read = await client.request("mark_read", {"conv_id": conv_id, "last_read_seq": 1})
                signal = await client.request(
                    "rtc_signal",
                    {
                        "conv_id": conv_id,
                        "to_user_id": acme_world["bob"],
                        "type": "offer",
                        "sdp": "v=0",
                    },
                )
                for ack in (send, read, signal):
                    assert ack["success"] is False
                    assert ack["error"]["code"] == "not_found", ack
            finally:
                await client.close()
        # The member saw none of it.
        with pytest.raises(TimeoutError):
            await watcher.next_event(timeout=1.0)
    finally:
        await watcher.close()

    async with target.rest("acme", acme_world["alice"]) as http:
        items = (await http.get("/v1/im/messages", params={"conv_id": conv_id})).json()["items"]
    assert [m["content"]["text"] for m in items] == ["secret plans"]


async def test_same_conv_id_in_two_tenants_stays_apart(
    target: Target, acme_world: dict[str, str]
) -> None:
    # globex creates its own conversations; none of acme's data appears there.
    g = await create_conversation(target, "globex", acme_world["alice"], [acme_world["bob"]])
    assert g["conv_id"] != acme_world["conv_id"]
    async with target.rest("globex", acme_world["bob"]) as http:
        listed = (await http.get("/v1/im/conversations")).json()
    assert [c["conv_id"] for c in listed["items"]] == [g["conv_id"]]


async def test_api_key_endpoint(target: Target) -> None:
    acme = target.tenants["acme"]
    async with httpx.AsyncClient(base_url=target.http()) as http:
        ok = await http.post(
            "/v1/auth/token",
            json={"tenant_id": "acme", "user_id": "zed"},
            headers={"X-API-Key": acme["api_key"]},
        )
        assert ok.status_code == 200, ok.text
        token = ok.json()["token"]
        wrong_key = await http.post(
            "/v1/auth/token",
            json={"tenant_id": "globex", "user_id": "zed"},
            headers={"X-API-Key": acme["api_key"]},
        )
        missing = await http.post("/v1/auth/token", json={"tenant_id": "acme", "user_id": "zed"})
        unknown = await http.post(
            "/v1/auth/token",
            json={"tenant_id": "nope", "user_id": "zed"},
            headers={"X-API-Key": acme["api_key"]},
        )
    for resp in (wrong_key, missing, unknown):
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    client = await Client.connect(target.ws(), token)
    assert (await client.request("ping", {}))["success"]
    await client.close()


async def test_media_keys_of_other_conversations_are_refused(
    target: Target, acme_world: dict[str, str]
) -> None:
    # bob is a member of acme_world's conversation but sends its key into another one.
    other = await create_conversation(target, "acme", acme_world["bob"], ["someone"])
    client = await Client.connect(target.ws(), target.token("acme", acme_world["bob"]))
    try:
        for key in (acme_world["key"], "other/../../etc/passwd"):
            ack = await client.request(
                "send_message",
                {
                    "conv_id": other["conv_id"],
                    "client_msg_id": secrets.token_hex(4),
                    "type": "image",
                    "content": {"key": key, "width": 1, "height": 1},
                },
            )
            assert ack["success"] is False and ack["error"]["code"] == "invalid_payload"
    finally:
        await client.close()


async def test_api_key_guessing_is_throttled(target: Target) -> None:
    async with httpx.AsyncClient(base_url=target.http()) as http:
        codes = [
            (
                await http.post(
                    "/v1/auth/token",
                    json={"tenant_id": "acme", "user_id": "z"},
                    headers={"X-API-Key": f"guess-{n}"},
                )
            ).status_code
            for n in range(40)
        ]
    assert codes[:10] == [401] * 10 and 429 in codes
