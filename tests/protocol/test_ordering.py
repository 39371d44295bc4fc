"""Ordered delivery: per-conversation seq, acks that match deliveries, dedupe, restart."""

from __future__ import annotations

import asyncio
import secrets

from tests.harness import Client, Target
from tests.protocol.conftest import create_conversation, history

SENDERS = 20
PER_SENDER = 10


async def test_concurrent_senders_see_one_gapless_order(target: Target) -> None:
    users = [f"u{i:02d}-{secrets.token_hex(3)}" for i in range(SENDERS)]
    listeners = [f"l{i}-{secrets.token_hex(3)}" for i in range(2)]
    conv = await create_conversation(target, "acme", users[0], users + listeners)
    conv_id = conv["conv_id"]

    clients = [
        await Client.connect(target.ws(i), target.token("acme", u))
        for i, u in enumerate(users + listeners)
    ]
    try:
        senders = clients[:SENDERS]

        async def burst(client: Client, index: int) -> list[dict[str, object]]:
            acks = []
            for n in range(PER_SENDER):
                ack = await client.send_text(conv_id, f"{index}:{n}", f"m-{index}-{n}")
                assert ack["success"], ack
                acks.append(ack["data"])
            return acks

        results = await asyncio.gather(*(burst(c, i) for i, c in enumerate(senders)))
        total = SENDERS * PER_SENDER
        acked = {d["msg_id"]: d["seq"] for acks in results for d in acks}
        assert len(acked) == total

        # Every member (senders included) receives every message, in one gapless order.
        orders = []
        for client in clients:
            got = await client.collect("message_created", total, timeout=30)
            seqs = [m["seq"] for m in got]
            assert seqs == list(range(1, total + 1)), "gapless, ascending, no duplicates"
            assert {m["msg_id"]: m["seq"] for m in got} == acked
            orders.append([m["msg_id"] for m in got])
        assert all(order == orders[0] for order in orders)

        # Each sender's own messages keep their send order.
        for index in range(SENDERS):
            mine = [m for m in orders[0] if m in {d["msg_id"] for d in results[index]}]
            assert mine == [d["msg_id"] for d in results[index]]
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_resend_with_same_client_msg_id_is_idempotent(target: Target) -> None:
    alice, bob = f"alice-{secrets.token_hex(3)}", f"bob-{secrets.token_hex(3)}"
    conv = await create_conversation(target, "acme", alice, [bob], kind="direct")
    a = await Client.connect(target.ws(0), target.token("acme", alice))
    b = await Client.connect(target.ws(1), target.token("acme", bob))
    try:
        first = await a.send_text(conv["conv_id"], "once", "retry-me")
        again = await a.send_text(conv["conv_id"], "once (retried)", "retry-me")
        assert first["success"] and again["success"]
        assert again["data"]["msg_id"] == first["data"]["msg_id"]
        assert again["data"]["seq"] == first["data"]["seq"]

        # The same id from another sender is a different message.
        other = await b.send_text(conv["conv_id"], "mine", "retry-me")
        assert other["data"]["msg_id"] != first["data"]["msg_id"]

        rows = await history(target, "acme", alice, conv["conv_id"])
        assert [(r["sender_id"], r["client_msg_id"]) for r in rows] == [
            (alice, "retry-me"),
            (bob, "retry-me"),
        ]
        assert rows[0]["content"] == {"text": "once"}
    finally:
        await a.close()
        await b.close()


async def test_restart_keeps_history_and_seq_continues(target: Target) -> None:
    alice, bob = f"alice-{secrets.token_hex(3)}", f"bob-{secrets.token_hex(3)}"
    conv = await create_conversation(target, "acme", alice, [bob])
    a = await Client.connect(target.ws(0), target.token("acme", alice))
    for n in range(5):
        assert (await a.send_text(conv["conv_id"], f"before {n}"))["success"]
    await a.close()
    before = await history(target, "acme", bob, conv["conv_id"])
    assert [m["seq"] for m in before] == [1, 2, 3, 4, 5]

    await target.restart()

    after_restart = await history(target, "acme", bob, conv["conv_id"])
    assert after_restart == before
    a = await Client.connect(target.ws(0), target.token("acme", alice))
    try:
        ack = await a.send_text(conv["conv_id"], "after")
        assert ack["success"] and ack["data"]["seq"] == 6
        # A retry of a message stored before the restart is still recognised.
        dup = await a.request(
            "send_message",
            {
                "conv_id": conv["conv_id"],
                "client_msg_id": before[0]["client_msg_id"],
                "type": "text",
                "content": {"text": "dup"},
            },
        )
        assert dup["data"]["seq"] == 1
    finally:
        await a.close()
    assert [m["seq"] for m in await history(target, "acme", bob, conv["conv_id"])] == list(
        range(1, 7)
    )
