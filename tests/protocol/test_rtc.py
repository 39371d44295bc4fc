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
