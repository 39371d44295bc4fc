"""REST conversations, history, read points, unread counts, ICE servers, ping."""

from __future__ import annotations

import secrets

from tests.harness import Client, Target
from tests.protocol.conftest import create_conversation


def _users(n: int) -> list[str]:
    tag = secrets.token_hex(3)
    return [f"user{i}-{tag}" for i in range(n)]


async def test_direct_conversation_is_reused(target: Target) -> None:
    a, b = _users(2)
    first = await create_conversation(target, "acme", a, [b], kind="direct")
    again = await create_conversation(target, "acme", b, [a], kind="direct")
    assert first["created"] is True and again["created"] is False
    assert again["conv_id"] == first["conv_id"]
    async with target.rest("acme", a) as http:
        bad = await http.post(
            "/v1/im/conversations", json={"type": "direct", "member_ids": [b, "third"]}
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_payload"
        add = await http.post(
            f"/v1/im/conversations/{first['conv_id']}/members", json={"user_ids": ["third"]}
        )
        assert add.status_code == 403 and add.json()["error"]["code"] == "forbidden"


async def test_group_membership_rules(target: Target) -> None:
    owner, member, newcomer = _users(3)
    conv = await create_conversation(target, "acme", owner, [member])
    conv_id = conv["conv_id"]
    async with target.rest("acme", member) as http:
        resp = await http.post(
            f"/v1/im/conversations/{conv_id}/members", json={"user_ids": [newcomer]}
        )
        assert resp.status_code == 200 and resp.json()["added"] == [newcomer]
        # A plain member cannot remove others...
        resp = await http.delete(f"/v1/im/conversations/{conv_id}/members/{owner}")
        assert resp.status_code == 403
    # ...the owner can, and anyone can leave.
    async with target.rest("acme", owner) as http:
        resp = await http.delete(f"/v1/im/conversations/{conv_id}/members/{newcomer}")
        assert resp.status_code == 200
    async with target.rest("acme", member) as http:
        assert (
            await http.delete(f"/v1/im/conversations/{conv_id}/members/{member}")
        ).status_code == 200
        assert (await http.get(f"/v1/im/conversations/{conv_id}")).status_code == 404
    async with target.rest("acme", owner) as http:
        conv = (await http.get(f"/v1/im/conversations/{conv_id}")).json()
    assert [m["user_id"] for m in conv["members"]] == [owner]

    # The removed member's sends are refused.
    client = await Client.connect(target.ws(), target.token("acme", member))
    ack = await client.send_text(conv_id, "am I still in?")
    assert ack["success"] is False and ack["error"]["code"] == "not_found"
    await client.close()

    # When the owner leaves, the longest-standing member becomes the owner.
    async with target.rest("acme", owner) as http:
        await http.post(f"/v1/im/conversations/{conv_id}/members", json={"user_ids": [member]})
        assert (
            await http.delete(f"/v1/im/conversations/{conv_id}/members/{owner}")
        ).status_code == 200
    async with target.rest("acme", member) as http:
        conv = (await http.get(f"/v1/im/conversations/{conv_id}")).json()
    assert [(m["user_id"], m["role"]) for m in conv["members"]] == [(member, "owner")]


async def test_history_paging_and_gap_sync(target: Target) -> None:
    a, b = _users(2)
    conv = await create_conversation(target, "acme", a, [b])
    client = await Client.connect(target.ws(), target.token("acme", a))
    for n in range(12):
        assert (await client.send_text(conv["conv_id"], f"m{n}"))["success"]
    await client.close()
    async with target.rest("acme", b) as http:
        latest = (
            await http.get("/v1/im/messages", params={"conv_id": conv["conv_id"], "limit": 5})
        ).json()
        older = (
            await http.get(
                "/v1/im/messages", params={"conv_id": conv["conv_id"], "before_seq": 8, "limit": 5}
            )
        ).json()
        gap = (
            await http.get("/v1/im/messages", params={"conv_id": conv["conv_id"], "after_seq": 9})
        ).json()
        bad = await http.get(
            "/v1/im/messages", params={"conv_id": conv["conv_id"], "limit": 100000}
        )
    assert [m["seq"] for m in latest["items"]] == [8, 9, 10, 11, 12]
    assert [m["seq"] for m in older["items"]] == [3, 4, 5, 6, 7]
    assert [m["seq"] for m in gap["items"]] == [10, 11, 12]
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_payload"


async def test_read_points_receipts_and_unread(target: Target) -> None:
    a, b, c = _users(3)
    conv = await create_conversation(target, "acme", a, [b, c])
    conv_id = conv["conv_id"]
    ca = await Client.connect(target.ws(0), target.token("acme", a))
    cb = await Client.connect(target.ws(1), target.token("acme", b))
    try:
        for n in range(4):
            assert (await ca.send_text(conv_id, f"hello {n}"))["success"]
        await cb.collect("message_created", 4)

        async def unread(user: str) -> tuple[int, int]:
            async with target.rest("acme", user) as http:
                items = (await http.get("/v1/im/conversations")).json()["items"]
            mine = next(i for i in items if i["conv_id"] == conv_id)
            assert mine["last_message"]["content"] == {"text": "hello 3"}
            return mine["unread_count"], mine["last_read_seq"]

        # The sender's own messages never count as unread; sending moved its read point.
        assert await unread(a) == (0, 4)
        assert await unread(b) == (4, 0)

        ack = await cb.request("mark_read", {"conv_id": conv_id, "last_read_seq": 3})
        assert ack["success"] and ack["data"]["last_read_seq"] == 3
        receipt = (await ca.next_event("receipt_updated"))["payload"]
        assert receipt == {"conv_id": conv_id, "user_id": b, "last_read_seq": 3}
        assert await unread(b) == (1, 3)

        # Never backwards, and never beyond the last message.
        back = await cb.request("mark_read", {"conv_id": conv_id, "last_read_seq": 1})
        assert back["success"] and back["data"]["last_read_seq"] == 3
        ahead = await cb.request("mark_read", {"conv_id": conv_id, "last_read_seq": 999})
        assert ahead["data"]["last_read_seq"] == 4
        assert await unread(b) == (0, 4)
        assert await unread(c) == (4, 0)

        # b replies: a's unread counts it, b's own does not.
        assert (await cb.send_text(conv_id, "reply"))["success"]
        assert await unread_after_reply(target, a, conv_id) == 1
    finally:
        await ca.close()
        await cb.close()


async def unread_after_reply(target: Target, user: str, conv_id: str) -> int:
    async with target.rest("acme", user) as http:
        doc = (await http.get(f"/v1/im/conversations/{conv_id}")).json()
    return int(doc["unread_count"])


async def test_conversation_list_pages_newest_first(target: Target) -> None:
    me, peer = _users(2)
    convs = [await create_conversation(target, "acme", me, [peer], name=f"g{n}") for n in range(5)]
    client = await Client.connect(target.ws(), target.token("acme", me))
    # Activity reorders the list: the oldest group gets the newest message.
    assert (await client.send_text(convs[0]["conv_id"], "bump"))["success"]
    await client.close()
    seen: list[str] = []
    cursor = None
    async with target.rest("acme", me) as http:
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await http.get("/v1/im/conversations", params=params)).json()
            seen += [c["conv_id"] for c in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        bad = await http.get("/v1/im/conversations", params={"cursor": "!!!"})
    expected = [convs[0]["conv_id"]] + [c["conv_id"] for c in reversed(convs[1:])]
    assert seen == expected
    assert bad.status_code == 422


async def test_ice_servers_and_ping(target: Target) -> None:
    async with target.rest("acme", "ice-user") as http:
        doc = (await http.get("/v1/im/rtc/ice-servers")).json()
        anon = await http.get("/v1/im/rtc/ice-servers", headers={"Authorization": ""})
    assert doc["ice_servers"][0]["urls"]
    assert anon.status_code == 401
    client = await Client.connect(target.ws(), target.token("acme", "pinger"))
    ack = await client.request("ping", {})
    assert ack["success"]
    assert (await client.next_event("pong"))["payload"] == {}
    await client.close()
