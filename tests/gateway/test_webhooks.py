"""Offline push: a real HTTP receiver on loopback gets signed webhook calls."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Client, EmbeddedServer, make_tenants

SECRET = "webhook-secret-0123456789"


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, queue.Queue[tuple[dict[str, str], bytes]]]]:
    got: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
    state = {"fail_first": 1}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state["fail_first"]:
                state["fail_first"] -= 1
                self.send_response(503)  # the sender must retry
                self.end_headers()
                return
            got.put((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    receiver: tuple[str, queue.Queue[tuple[dict[str, str], bytes]]],
) -> Iterator[EmbeddedServer]:
    tenants = make_tenants("pushy")
    tenants[0]["webhook_url"] = receiver[0]
    tenants[0]["webhook_secret"] = SECRET
    srv = EmbeddedServer(Path(tmp_path_factory.mktemp("webhooks")), tenants)
    srv.start()
    yield srv
    srv.stop()


async def test_offline_members_are_pushed(
    server: EmbeddedServer, receiver: tuple[str, queue.Queue[tuple[dict[str, str], bytes]]]
) -> None:
    _, got = receiver
    token = server.token("pushy", "alice")
    async with httpx.AsyncClient(
        base_url=server.http(), headers={"Authorization": f"Bearer {token}"}
    ) as http:
        conv = (
            await http.post(
                "/v1/im/conversations", json={"type": "group", "member_ids": ["bob", "carol"]}
            )
        ).json()
    alice = await Client.connect(server.ws(), token)
    carol = await Client.connect(server.ws(), server.token("pushy", "carol"))  # online
    try:
        ack = await alice.send_text(conv["conv_id"], "are you there?")
        assert ack["success"]
        headers, body = got.get(timeout=15)  # the first attempt got a 503, this is the retry
    finally:
        await alice.close()
        await carol.close()
    event = json.loads(body)
    assert event["event"] == "message.offline" and event["recipients"] == ["bob"]
    assert event["msg_id"] == ack["data"]["msg_id"] and "content" not in event
    stamp, sig = (part.split("=", 1)[1] for part in headers["X-Imhub-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig, expected)
