"""Chat users that behave like real clients while parts of the stack crash.

A :class:`Member` keeps one WebSocket connection, reconnects to any gateway
when it drops, syncs the gap with ``GET /v1/im/messages?after_seq=`` after a
reconnect or when a live message skips seqs, and retries a send with the same
``client_msg_id`` until it is acknowledged. :class:`Load` runs steady streams
of sends in several conversations, and :func:`verify` checks the outcome
against the rows in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import websockets
from sqlalchemy.ext.asyncio import create_async_engine

from imhub.runtime import tenancy
from tests.harness import Client, Target

__all__ = ["Load", "Member", "verify"]

logger = logging.getLogger(__name__)

_RETRYABLE = {"unavailable", "internal"}
_ids = itertools.count(1)


class Member:
    """One user with one connection (reconnecting) and everything it has seen."""

    def __init__(self, target: Target, tenant_id: str, user_id: str, gateway: int) -> None:
        self.target = target
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.gateway = gateway
        self.convs: set[str] = set()
        self.seen: dict[str, dict[int, str]] = defaultdict(dict)  # conv -> seq -> msg_id
        self.live: dict[str, set[int]] = defaultdict(set)
        self.cursor: dict[str, int] = defaultdict(int)  # synced (or seen) up to here
        self.reconnects = 0
        self.client: Client | None = None
        self._connected = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._syncing: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._background: set[asyncio.Task[None]] = set()

    # -- connection -------------------------------------------------------------------

    async def start(self) -> None:
        await self._connect(self.gateway, deadline=time.monotonic() + 30)
        self._pump = asyncio.create_task(self._run())

    async def _connect(self, first: int, *, deadline: float) -> None:
        n = len(self.target.gateway_urls)
        attempt = 0
        while True:
            index = (first + attempt) % n
            try:
                client = await Client.connect(
                    self.target.ws(index), self.target.token(self.tenant_id, self.user_id)
                )
            except (OSError, websockets.WebSocketException, AssertionError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.user_id}: cannot connect: {exc!r}") from exc
                attempt += 1
                await asyncio.sleep(0.2)
                continue
            self.client = client
            self.gateway = index
            self._connected.set()
            return

    async def _run(self) -> None:
        while not self._closing:
            client = self.client
            assert client is not None
            getter = asyncio.create_task(client.events.get())
            done, _ = await asyncio.wait(
                {getter, client.closed}, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                self._on_frame(getter.result())
                continue
            getter.cancel()
            # Drain what was received before the close.
            while not client.events.empty():
                self._on_frame(client.events.get_nowait())
            if self._closing:
                return
            self._connected.clear()
            self.reconnects += 1
            # The gateway went away: connect to the next one and sync the gap.
            await self._connect(self.gateway + 1, deadline=time.monotonic() + 60)
            for conv_id in list(self.convs):
                await self.sync(conv_id)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if frame.get("event") != "message_created":
            return
        msg = frame["payload"]
        conv_id, seq = msg["conv_id"], int(msg["seq"])
        self.live[conv_id].add(seq)
        known = self.seen[conv_id].setdefault(seq, msg["msg_id"])
        assert known == msg["msg_id"], f"{self.user_id}: seq {seq} changed its message"
        if seq == self.cursor[conv_id] + 1:
            self.cursor[conv_id] = seq
        elif seq > self.cursor[conv_id] + 1:
            # A gap: something was missed (or is a hole); ask the server.
            task = asyncio.create_task(self.sync(conv_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def sync(self, conv_id: str, *, deadline: float | None = None) -> None:
        """Fetch everything above the cursor (retrying while the stack recovers)."""
        deadline = deadline or time.monotonic() + 90
        async with self._syncing[conv_id]:
            while True:
                try:
                    await self._sync_once(conv_id)
                    return
                except (OSError, AssertionError, ValueError) as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{self.user_id}: sync failed: {exc!r}") from exc
                    await asyncio.sleep(0.3)
                except Exception as exc:  # httpx errors while a gateway restarts
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{self.user_id}: sync failed: {exc!r}") from exc
                    await asyncio.sleep(0.3)

    async def _sync_once(self, conv_id: str) -> None:
        n = len(self.target.gateway_urls)
        async with self.target.rest(self.tenant_id, self.user_id, self.gateway % n) as http:
            after = self.cursor[conv_id]
            while True:
                resp = await http.get(
                    "/v1/im/messages",
                    params={"conv_id": conv_id, "after_seq": after, "limit": 200},
                )
                if resp.status_code != 200:
                    raise AssertionError(f"history: {resp.status_code} {resp.text[:200]}")
                items = resp.json()["items"]
                for msg in items:
                    known = self.seen[conv_id].setdefault(int(msg["seq"]), msg["msg_id"])
                    assert known == msg["msg_id"], f"seq {msg['seq']} changed its message"
                if items:
                    after = int(items[-1]["seq"])
                if len(items) < 200:
                    break
            self.cursor[conv_id] = max(self.cursor[conv_id], after)

    async def close(self) -> None:
        self._closing = True
        for task in [self._pump, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.client is not None:
            await self.client.close()

    # -- sending ----------------------------------------------------------------------

    async def send(
        self, conv_id: str, text: str, client_msg_id: str, *, deadline: float
    ) -> list[dict[str, Any]]:
        """Send until acknowledged; return every ack payload received (the last one
        is the success). Retries reuse ``client_msg_id``, as clients must."""
        acks: list[dict[str, Any]] = []
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.user_id}: {client_msg_id} never acknowledged: {acks}")
            try:
                await asyncio.wait_for(
                    self._connected.wait(), max(0.1, deadline - time.monotonic())
                )
            except TimeoutError:
                continue
            client = self.client
            assert client is not None
            ack = await _request(
                client,
                "send_message",
                {
                    "conv_id": conv_id,
                    "client_msg_id": client_msg_id,
                    "type": "text",
                    "content": {"text": text},
                },
                timeout=15,
            )
            if ack is None:  # connection dropped or no answer: try again
                await asyncio.sleep(0.2)
                continue
            acks.append(ack)
            if ack["success"]:
                return acks
            code = ack["error"]["code"]
            if code not in _RETRYABLE:
                raise AssertionError(f"{self.user_id}: send refused: {ack}")
            await asyncio.sleep(0.3)


async def _request(
    client: Client, event: str, payload: dict[str, Any], *, timeout: float
) -> dict[str, Any] | None:
    """An ack, or None when the connection closed or nothing came in time."""
    ack_id = f"L{next(_ids)}"
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    client.acks[ack_id] = fut
    try:
        await client.ws.send(json.dumps({"event": event, "payload": payload, "ack_id": ack_id}))
    except websockets.WebSocketException:
        return None
    done, _ = await asyncio.wait(
        {fut, client.closed}, timeout=timeout, return_when="FIRST_COMPLETED"
    )
    if fut in done:
        return fut.result()
    return None


@dataclasses.dataclass
class Sent:
    conv_id: str
    sender_id: str
    client_msg_id: str
    started: float
    acked: float = 0.0
    acks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def data(self) -> dict[str, Any]:
        return self.acks[-1]["data"]


class Load:
    """Steady streams of sends: each sender sends one message at a time per conversation."""

    def __init__(
        self,
        members: Sequence[Member],
        streams: Sequence[tuple[Member, str]],
        *,
        interval: float = 0.05,
    ) -> None:
        self.members = list(members)
        self.streams = list(streams)
        self.interval = interval
        self.sent: list[Sent] = []
        self.unfinished: list[Sent] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for member, conv_id in self.streams:
            self._tasks.append(asyncio.create_task(self._stream(member, conv_id)))

    async def _stream(self, member: Member, conv_id: str) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            sent = Sent(
                conv_id, member.user_id, f"{member.user_id}.{conv_id[-8:]}.{i}", time.monotonic()
            )
            self.unfinished.append(sent)
            sent.acks = await member.send(
                conv_id, f"message {i}", sent.client_msg_id, deadline=time.monotonic() + 120
            )
            sent.acked = time.monotonic()
            self.unfinished.remove(sent)
            self.sent.append(sent)
            await asyncio.sleep(self.interval)

    def count(self) -> int:
        return len(self.sent)

    async def wait_for(self, more: int, timeout: float) -> None:
        """Until ``more`` further sends were acknowledged."""
        goal = len(self.sent) + more
        deadline = time.monotonic() + timeout
        while len(self.sent) < goal:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.sent)} of {goal} sends acknowledged in time")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 150) -> None:
        """Stop sending and wait until every send in flight is acknowledged."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)


async def verify(target: Target, database_url: str, tenant_id: str, load: Load) -> dict[str, Any]:
    """Check the stored rows against what clients were told; return a few figures.

    - every acknowledged message is stored exactly once, with the msg_id and seq
      of its ack (retries included);
    - nothing is stored that no client sent;
    - seq is strictly increasing, and a message sent after another was
      acknowledged has a higher seq (also across a cache flush);
    - every member ends up with every message of its conversations, live or
      by gap sync.
    """
    convs = sorted({conv for _, conv in load.streams})
    schema = tenancy.names_for(tenant_id).db_schema
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT conv_id, seq, msg_id, sender_id, client_msg_id "
                        f'FROM "{schema}".messages '
                        "WHERE conv_id = ANY(:convs) ORDER BY conv_id, seq"
                    ),
                    {"convs": convs},
                )
            ).all()
    finally:
        await engine.dispose()

    stored: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    by_conv: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        stored[(row.conv_id, row.sender_id, row.client_msg_id)].append(row)
        by_conv[row.conv_id].append(row)
    duplicates = {k: v for k, v in stored.items() if len(v) > 1}
    assert not duplicates, f"stored more than once: {list(duplicates)[:5]}"
    for conv_id, conv_rows in by_conv.items():
        seqs = [r.seq for r in conv_rows]
        assert seqs == sorted(set(seqs)), f"{conv_id}: seq not strictly increasing"

    attempted = {(s.conv_id, s.sender_id, s.client_msg_id) for s in [*load.sent, *load.unfinished]}
    unknown = set(stored) - attempted
    assert not unknown, f"stored but never sent: {sorted(unknown)[:5]}"
    assert not load.unfinished, f"sends never acknowledged: {load.unfinished[:3]}"

    for sent in load.sent:
        key = (sent.conv_id, sent.sender_id, sent.client_msg_id)
        assert key in stored, f"acknowledged but not stored: {key}"
        row = stored[key][0]
        for ack in sent.acks:
            if ack["success"]:
                assert (ack["data"]["msg_id"], ack["data"]["seq"]) == (row.msg_id, row.seq), (
                    f"{key}: ack {ack['data']} does not match the stored row"
                )

    # Causality: acknowledged before B was sent => lower seq than B.
    per_conv: dict[str, list[Sent]] = defaultdict(list)
    for sent in load.sent:
        per_conv[sent.conv_id].append(sent)
    for conv_id, items in per_conv.items():
        items.sort(key=lambda s: s.acked)
        acked_at = [s.acked for s in items]
        prefix_max: list[int] = []
        top = 0
        for s in items:
            top = max(top, int(s.data["seq"]))
            prefix_max.append(top)
        for s in items:
            before = bisect.bisect_left(acked_at, s.started)
            if before:
                assert prefix_max[before - 1] < int(s.data["seq"]), (
                    f"{conv_id}: {s.client_msg_id} got seq {s.data['seq']} although "
                    f"seq {prefix_max[before - 1]} was acknowledged before it was sent"
                )

    # Every member has everything: what came live plus what it synced, after
    # one last sync as an app does when it comes to the foreground.
    live = total = 0
    for member in load.members:
        for conv_id in sorted(member.convs):
            await member.sync(conv_id)
            expected = {r.seq: r.msg_id for r in by_conv.get(conv_id, [])}
            missing = sorted(set(expected) - set(member.seen[conv_id]))
            assert not missing, f"{member.user_id} misses seqs {missing[:10]} of {conv_id}"
            for seq, msg_id in expected.items():
                assert member.seen[conv_id][seq] == msg_id
            live += len(member.live[conv_id] & set(expected))
            total += len(expected)
    return {
        "stored": len(rows),
        "acknowledged": len(load.sent),
        "retried": sum(1 for s in load.sent if len(s.acks) > 1),
        "live_ratio": round(live / total, 3) if total else 1.0,
        "reconnects": sum(m.reconnects for m in load.members),
    }
