"""The demo page in a real browser against a real ``imhub serve --demo``.

Two users in separate browser contexts chat through the page: live delivery,
read marks, image upload and display, escaping, ack errors, reconnect with
gap sync and the narrow layout. Every assertion reads the page's DOM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import struct
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import IDLE_TIMEOUT_SECONDS, DemoServer, UserPage
from tests.harness import Client

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]

expect: Any
try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture reports it
    expect = None

OpenPage = Callable[..., UserPage]
GROUP = "Demo group"


# -- helpers ------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def png_bytes(width: int, height: int) -> bytes:
    """A small valid RGB PNG: a diagonal gradient, so it is visible in screenshots."""
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")
        for x in range(width):
            row += bytes((40 + 180 * x // width, 110 + 100 * y // height, 200 - 120 * x // width))
        rows.append(bytes(row))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def conversation(up: UserPage, name: str) -> Any:
    return up.page.locator(f'[data-testid="conversation-item"][data-conv-name="{name}"]')


def open_conversation(up: UserPage, name: str) -> None:
    conversation(up, name).click()
    expect(up.page.get_by_test_id("chat-title")).to_have_text(name)
    expect(conversation(up, name)).to_have_attribute("aria-current", "true")


def send(up: UserPage, text: str) -> None:
    up.page.get_by_test_id("composer-input").fill(text)
    up.page.get_by_test_id("send-button").click()


def message(up: UserPage, text: str) -> Any:
    """The message item whose text is exactly ``text``."""
    exact = re.compile(f"^{re.escape(text)}$")
    return up.page.get_by_test_id("message").filter(
        has=up.page.get_by_test_id("message-text").filter(has_text=exact)
    )


def sent_events(up: UserPage, event: str) -> list[dict[str, Any]]:
    frames = []
    for raw in up.sent_frames:
        try:
            frame = json.loads(raw)
        except ValueError:
            continue
        if frame.get("event") == event:
            frames.append(frame)
    return frames


def screenshot(up: UserPage, path: Path) -> Path:
    """Save what the user sees, once every image on the page has loaded."""
    up.page.wait_for_function(
        "() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    )
    up.page.screenshot(path=str(path), full_page=False)
    print(f"screenshot: {path}")
    return path


# -- tests --------------------------------------------------------------------


def test_live_message_and_read_marks(open_page: OpenPage, tmp_path: Path) -> None:
    alice = open_page("alice")
    bob = open_page("bob")

    # Both see their conversations: the group and the direct chat with each other.
    expect(conversation(alice, GROUP)).to_be_visible()
    expect(conversation(alice, "bob")).to_be_visible()
    expect(conversation(bob, "alice")).to_be_visible()

    open_conversation(alice, GROUP)
    open_conversation(bob, GROUP)
    expect(alice.page.get_by_test_id("chat-members")).to_have_text("3 members · you, bob, carol")
    history_loads = sum("/v1/im/messages" in url for url in bob.requests)

    # Group message: bob, already viewing, gets it live and reads it.
    hello = unique("Hello team")
    send(alice, hello)
    mine = message(alice, hello)
    expect(mine).to_have_attribute("data-status", "sent")
    expect(mine).to_have_attribute("data-seq", re.compile(r"^\d+$"))
    seq = int(mine.get_attribute("data-seq"))

    theirs = message(bob, hello)
    expect(theirs).to_have_attribute("data-seq", str(seq))
    expect(theirs).to_have_attribute("data-sender", "alice")
    expect(theirs.get_by_test_id("message-sender")).to_have_text("alice")
    assert sum("/v1/im/messages" in url for url in bob.requests) == history_loads, (
        "bob's copy should come over the WebSocket, not from a history reload"
    )
    assert any(
        f["payload"] == {"conv_id": f["payload"]["conv_id"], "last_read_seq": seq}
        for f in sent_events(bob, "mark_read")
    ), "bob's page should mark the new message read while viewing it"
    expect(mine.get_by_test_id("read-mark")).to_have_text("Read by bob")

    # Direct message while bob looks elsewhere: unread badge and preview, then a read mark.
    open_conversation(alice, "bob")
    direct = unique("Just for you")
    send(alice, direct)
    expect(message(alice, direct)).to_have_attribute("data-status", "sent")
    item = conversation(bob, "alice")
    expect(item.get_by_test_id("conversation-preview")).to_have_text(direct)
    expect(item.get_by_test_id("unread-badge")).to_have_text("1")
    expect(message(alice, direct).get_by_test_id("read-mark")).to_be_hidden()

    open_conversation(bob, "alice")
    expect(message(bob, direct)).to_be_visible()
    expect(item.get_by_test_id("unread-badge")).to_have_count(0)
    expect(message(alice, direct).get_by_test_id("read-mark")).to_have_text("Read by bob")

    # bob answers: alice sees it live in the open direct chat.
    reply = unique("Thanks alice!")
    send(bob, reply)
    expect(message(alice, reply)).to_have_attribute("data-sender", "bob")
    expect(message(bob, reply)).to_have_attribute("data-status", "sent")

    # Pings keep both sockets open past the server's idle timeout.
    alice.page.wait_for_timeout((IDLE_TIMEOUT_SECONDS + 1) * 1000)
    for up in (alice, bob):
        expect(up.page.get_by_test_id("conn-status")).to_have_attribute("data-state", "online")
        assert len(up.sockets) == 1, f"{up.user}'s page reconnected: {len(up.sockets)} sockets"
        assert sent_events(up, "ping"), f"{up.user}'s page never sent a ping"
        assert not up.console_errors, up.console_errors

    screenshot(alice, tmp_path / "alice-direct.png")
    screenshot(bob, tmp_path / "bob-direct.png")
    open_conversation(alice, GROUP)
    screenshot(alice, tmp_path / "alice-group.png")


def test_image_upload_and_display(
    open_page: OpenPage, demo_server: DemoServer, tmp_path: Path
) -> None:
    alice = open_page("alice")
    bob = open_page("bob")
    open_conversation(alice, GROUP)
    open_conversation(bob, GROUP)

    png = png_bytes(48, 32)
    alice.page.get_by_test_id("file-input").set_input_files(
        files=[{"name": "gradient.png", "mimeType": "image/png", "buffer": png}]
    )
    sent = (
        alice.page.get_by_test_id("message")
        .filter(has=alice.page.get_by_test_id("message-image"))
        .last
    )
    expect(sent).to_have_attribute("data-status", "sent")
    seq = sent.get_attribute("data-seq")
    assert seq and seq.isdigit()
    assert any("/v1/im/media/upload-token" in url for url in alice.requests), (
        "the page should ask for an upload URL"
    )

    got = bob.page.locator(f'[data-testid="message"][data-seq="{seq}"]')
    expect(got).to_have_attribute("data-sender", "alice")
    image = got.get_by_test_id("message-image")
    expect(image).to_have_attribute(
        "src", re.compile("^" + re.escape(demo_server.url + "/v1/media/local/"))
    )
    bob.page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
    )
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [48, 32]
    src = image.get_attribute("src")
    assert src is not None
    assert httpx.get(src, timeout=5).content == png

    # The sent message names the stored object, with the picture's size.
    frame = sent_events(alice, "send_message")[-1]["payload"]
    assert frame["type"] == "image"
    assert frame["content"]["width"] == 48 and frame["content"]["height"] == 32
    assert frame["content"]["size"] == len(png)
    assert frame["content"]["key"] in src
    expect(conversation(bob, GROUP).get_by_test_id("conversation-preview")).to_have_text(
        "alice: Photo"
    )
    screenshot(bob, tmp_path / "bob-image.png")


def test_user_content_is_text_and_errors_are_shown(open_page: OpenPage) -> None:
    alice = open_page("alice")
    bob = open_page("bob")
    open_conversation(alice, GROUP)
    open_conversation(bob, GROUP)

    tag = uuid.uuid4().hex[:6]
    nasty = f'<img src=x onerror="window.__pwned=1"><b>bold {tag}</b> & <script>x()</script>'
    send(alice, nasty)
    got = message(bob, nasty)
    expect(got.get_by_test_id("message-text")).to_have_text(nasty)
    assert got.locator("img, b, script").count() == 0
    assert bob.page.evaluate("window.__pwned") is None
    expect(conversation(bob, GROUP).get_by_test_id("conversation-preview")).to_have_text(
        f"alice: {nasty}"
    )

    # Over the tenant's content limit: the ack refuses it and the page says so.
    huge = "x" * 17_000
    send(alice, huge)
    failed = message(alice, huge)
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.get_by_test_id("message-error")).to_contain_text("too_large")
    expect(failed.get_by_test_id("retry-button")).to_be_visible()
    expect(alice.page.get_by_test_id("toast").last).to_contain_text("not sent")
    expect(message(bob, huge)).to_have_count(0)


def test_reconnect_syncs_the_gap_and_sends_queued(open_page: OpenPage, tmp_path: Path) -> None:
    state: dict[str, Any] = {"block": False, "live": None}

    def route(ws: Any) -> None:
        if state["block"]:
            ws.close(code=1012, reason="test: server unreachable")
            return
        ws.connect_to_server()
        state["live"] = ws

    alice = open_page("alice", setup=lambda page: page.route_web_socket("**/v1/im/ws", route))
    bob = open_page("bob")
    open_conversation(alice, GROUP)
    open_conversation(bob, GROUP)

    before = unique("Before the drop")
    send(bob, before)
    expect(message(alice, before)).to_be_visible()

    # The connection drops and every reconnect attempt fails for now.
    state["block"] = True
    state["live"].close(code=1012, reason="test: dropped")
    status = alice.page.get_by_test_id("conn-status")
    expect(status).to_have_attribute("data-state", re.compile("offline|connecting"))
    expect(alice.page.get_by_test_id("conn-banner")).to_be_visible()
    expect(alice.page.get_by_test_id("conn-banner")).to_contain_text("Reconnecting")

    missed = unique("While you were away")
    send(bob, missed)
    expect(message(bob, missed)).to_have_attribute("data-status", "sent")
    missed_seq = message(bob, missed).get_attribute("data-seq")

    queued = unique("Written offline")
    send(alice, queued)
    expect(message(alice, queued)).to_have_attribute("data-status", "pending")
    screenshot(alice, tmp_path / "alice-offline.png")
    expect(message(alice, missed)).to_have_count(0)

    # Back online: the page syncs with after_seq and sends what was queued.
    state["block"] = False
    # The page may already be retrying on its own; the button skips the wait if not.
    alice.page.get_by_test_id("reconnect-now").dispatch_event("click")
    expect(status).to_have_attribute("data-state", "online")
    expect(message(alice, missed)).to_have_attribute("data-seq", missed_seq)
    assert any("after_seq=" in url for url in alice.requests), "no after_seq gap sync"
    expect(message(alice, queued)).to_have_attribute("data-status", "sent")
    expect(message(bob, queued)).to_have_attribute("data-sender", "alice")
    expect(alice.page.get_by_test_id("conn-banner")).to_be_hidden()
    # Everything in order, once.
    seqs = [
        int(s)
        for s in alice.page.get_by_test_id("message").evaluate_all(
            "els => els.map(e => e.dataset.seq).filter(Boolean)"
        )
    ]
    assert seqs == sorted(set(seqs)), seqs


def test_narrow_screen_shows_one_pane(open_page: OpenPage, tmp_path: Path) -> None:
    bob = open_page("bob", viewport={"width": 390, "height": 760})
    page = bob.page
    expect(page.get_by_test_id("conversation-list")).to_be_visible()
    expect(page.get_by_test_id("composer-input")).to_be_hidden()
    screenshot(bob, tmp_path / "narrow-list.png")

    open_conversation(bob, GROUP)
    expect(page.get_by_test_id("conversation-list")).to_be_hidden()
    expect(page.get_by_test_id("composer-input")).to_be_visible()
    screenshot(bob, tmp_path / "narrow-chat.png")
    page.get_by_test_id("back-button").click()
    expect(page.get_by_test_id("conversation-list")).to_be_visible()

    # Switching user goes back to the picker and signs in someone else.
    page.get_by_test_id("switch-user").click()
    expect(page.get_by_test_id("user-picker")).to_be_visible()
    screenshot(bob, tmp_path / "narrow-picker.png")
    page.get_by_test_id("user-pick-carol").click()
    expect(page.get_by_test_id("current-user")).to_have_text("carol")
    expect(conversation(bob, GROUP)).to_be_visible()
    expect(conversation(bob, "alice")).to_have_count(0)


def test_new_conversation_appears_and_older_history_loads(
    open_page: OpenPage, demo_server: DemoServer
) -> None:
    bob = open_page("bob")
    name = unique("Book club <b>&</b>")
    with demo_server.rest("alice") as rest:
        created = rest.post(
            "/v1/im/conversations", json={"type": "group", "member_ids": ["bob"], "name": name}
        )
        assert created.status_code == 200, created.text
        conv_id = created.json()["conv_id"]
        token = rest.headers["Authorization"].removeprefix("Bearer ")

    count = 55  # more than the page's first history page (50)

    async def chatter() -> None:
        ws_url = demo_server.url.replace("http://", "ws://") + "/v1/im/ws"
        client = await Client.connect(ws_url, token)
        try:
            for i in range(1, count + 1):
                ack = await client.send_text(conv_id, f"note {i}")
                assert ack["success"], ack
                await asyncio.sleep(0.03)  # stay under the tenant's frame rate
        finally:
            await client.close()

    # Sync playwright owns this thread's event loop: the WS client runs in its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, chatter()).result(timeout=30)

    # The conversation was unknown to bob's page: it fetches it on the first message.
    item = conversation(bob, name)
    expect(item.get_by_test_id("conversation-name")).to_have_text(name)
    expect(item.get_by_test_id("conversation-preview")).to_have_text(f"alice: note {count}")
    expect(item.get_by_test_id("unread-badge")).to_have_text(str(count))

    # Opening shows the newest page (plus what came live), in order, ending at the last.
    open_conversation(bob, name)
    items = bob.page.get_by_test_id("message")
    expect(items.last).to_have_attribute("data-seq", str(count))
    expect(item.get_by_test_id("unread-badge")).to_have_count(0)
    seqs = [int(x) for x in items.evaluate_all("els => els.map(e => e.dataset.seq)")]
    assert 50 <= len(seqs) < count, seqs
    assert seqs == list(range(count - len(seqs) + 1, count + 1)), seqs
    bob.page.get_by_test_id("load-older").click()
    expect(items).to_have_count(count)
    expect(items.first.get_by_test_id("message-text")).to_have_text("note 1")
    expect(bob.page.get_by_test_id("load-older")).to_be_hidden()
