"""WebRTC signaling between members, and calls recorded as system messages."""

from __future__ import annotations

import asyncio
import secrets

from tests.harness import Client, Target
from tests.protocol.conftest import create_conversation, history


async def test_call_signaling_and_lifecycle(target: Target) -> None:
    tag = secrets.token_hex(3)
    caller, callee, offline = f"caller-{tag}", f"callee-{tag}", f"offline-{tag}"
    conv = await create_conversation(target, "acme", caller, [callee, offline])
    conv_id = conv["conv_id"]
    a = await Client.connect(target.ws(0), target.token("acme", caller))
    b = await Client.connect(target.ws(1), target.token("acme", callee))
    try:
        offer = await a.request(
            "rtc_signal",
            {"conv_id": conv_id, "to_user_id": callee, "type": "offer", "sdp": "v=0 offer"},
        )
        assert offer["success"], offer
        got = (await b.next_event("rtc_signal"))["payload"]
        assert got["type"] == "offer" and got["sdp"] == "v=0 offer"
        assert got["from_user_id"] == caller and got["conv_id"] == conv_id
        call_id = got["call_id"]

        answer = await b.request(
            "rtc_signal",
            {
                "conv_id": conv_id,
                "to_user_id": caller,
                "type": "answer",
                "sdp": "v=0 answer",
                "call_id": call_id,
            },
        )
        assert answer["success"]
        assert (await a.next_event("rtc_signal"))["payload"]["type"] == "answer"
        ice = await a.request(
            "rtc_signal",
            {
                "conv_id": conv_id,
                "to_user_id": callee,
                "type": "ice-candidate",
                "call_id": call_id,
                "candidate": {"candidate": "candidate:1 1 udp", "sdpMid": "0"},
            },
        )
        assert ice["success"]
        assert (await b.next_event("rtc_signal"))["payload"]["candidate"]["sdpMid"] == "0"

        await asyncio.sleep(1.1)
        hang = await a.request(
            "rtc_signal",
            {"conv_id": conv_id, "to_user_id": callee, "type": "hangup", "call_id": call_id},
        )
        assert hang["success"]

        # The call is in the conversation: started, then ended with its duration.
        system = await b.collect("message_created", 2)
        assert [m["content"]["event"] for m in system] == ["call_started", "call_ended"]
        assert all(m["type"] == "system" for m in system)
        assert system[1]["content"]["duration"] >= 1.0

        # Offline callee: a clear error and nothing delivered.
        ack = await a.request(
            "rtc_signal", {"conv_id": conv_id, "to_user_id": offline, "type": "offer", "sdp": "x"}
        )
        assert ack["success"] is False and ack["error"]["code"] == "unavailable"
        # Not a member: not found.
        ack = await a.request(
            "rtc_signal",
            {"conv_id": conv_id, "to_user_id": "stranger", "type": "offer", "sdp": "x"},
        )
        assert ack["error"]["code"] == "not_found"
    finally:
        await a.close()
        await b.close()
    stored = await history(target, "acme", caller, conv_id)
    assert [m["content"]["event"] for m in stored] == ["call_started", "call_ended"]


async def test_every_call_is_recorded_and_only_its_parties_control_it(target: Target) -> None:
    tag = secrets.token_hex(3)
    a_id, b_id, c_id = f"a-{tag}", f"b-{tag}", f"c-{tag}"
    conv = await create_conversation(target, "acme", a_id, [b_id, c_id])
    conv_id = conv["conv_id"]
    a = await Client.connect(target.ws(0), target.token("acme", a_id))
    b = await Client.connect(target.ws(1), target.token("acme", b_id))
    c = await Client.connect(target.ws(0), target.token("acme", c_id))
    try:
        call_ids = []
        for _ in range(2):  # two calls in a row between the same pair
            offer = await a.request(
                "rtc_signal", {"conv_id": conv_id, "to_user_id": b_id, "type": "offer", "sdp": "o"}
            )
            call_id = offer["data"]["call_id"]
            call_ids.append(call_id)
            # A third member can neither answer nor hang up someone else's call.
            for kind in ("answer", "hangup"):
                ack = await c.request(
                    "rtc_signal",
                    {"conv_id": conv_id, "to_user_id": a_id, "type": kind, "call_id": call_id},
                )
                assert ack["success"] is False and ack["error"]["code"] == "forbidden", ack
            # The callee answers without repeating the id: the pair's current call.
            assert (
                await b.request(
                    "rtc_signal",
                    {"conv_id": conv_id, "to_user_id": a_id, "type": "answer", "sdp": "a"},
                )
            )["success"]
            assert (
                await b.request(
                    "rtc_signal", {"conv_id": conv_id, "to_user_id": a_id, "type": "hangup"}
                )
            )["success"]
        assert call_ids[0] != call_ids[1]
        unknown = await a.request(
            "rtc_signal", {"conv_id": conv_id, "to_user_id": b_id, "type": "offer", "evil": 1}
        )
        assert unknown["success"] is False and unknown["error"]["code"] == "invalid_payload"
    finally:
        for client in (a, b, c):
            await client.close()
    await asyncio.sleep(0.5)
    events = [
        (m["content"]["event"], m["content"]["call_id"])
        for m in await history(target, "acme", a_id, conv_id)
    ]
    assert events == [
        ("call_started", call_ids[0]),
        ("call_ended", call_ids[0]),
        ("call_started", call_ids[1]),
        ("call_ended", call_ids[1]),
    ]
