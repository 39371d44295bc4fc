"""``imhub bench``: a load generator that prints throughput, latency and memory.

It either starts its own ``imhub serve`` (embedded default, in a temporary
directory) or targets running gateways (``--url``, with ``--tenants`` to mint
tokens). It opens ``--clients`` WebSocket clients spread over ``--convs``
group conversations, sends at ``--rate`` messages/s in total for
``--duration`` seconds, and measures, from the client side:

* send -> ack: until the sender's ack (the message is durable);
* send -> deliver: until another member receives ``message_created``.

With ``--idle N`` it then opens N more authorized, silent connections and
reports the server's resident memory growth per connection. The last line is
a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets
import yaml

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway base URL(s), comma-separated; default: start a server")
    p.add_argument("--tenants", type=Path, help="tenants file to mint tokens (with --url)")
    p.add_argument("--tenant", default=None, help="tenant id (default: the first in the file)")
    p.add_argument("--server-pid", type=int, help="pid of the server to measure memory of")
    p.add_argument("--clients", type=int, default=100, help="sending clients (100)")
    p.add_argument("--convs", type=int, default=50, help="group conversations (50)")
    p.add_argument("--rate", type=float, default=2000, help="messages/s in total (2000)")
    p.add_argument("--duration", type=float, default=10, help="seconds of sending (10)")
    p.add_argument("--idle", type=int, default=0, help="idle connections for memory (0)")
    p.add_argument("--data-dir", type=Path, help="data dir of the started server (temp)")
    p.add_argument(
        "--pipeline",
        type=int,
        metavar="N",
        help="instead of WebSocket clients: put N send commands straight on Kafka "
        "(--kafka-bootstrap) and time until the message service has stored them all",
    )
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers (with --pipeline)")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # noqa: BLE001 - memory is optional output
        return None


@dataclass
class _Stats:
    sent_at: dict[str, float] = field(default_factory=dict)
    ack: list[float] = field(default_factory=list)
    deliver: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    delivered: int = 0


class _Server:
    """An ``imhub serve`` started for the benchmark."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        with socket_port() as port:
            self.port = port
        self.tenant = {
            "tenant_id": "bench",
            "keys": [{"kid": "k1", "alg": "HS256", "secret": secrets.token_urlsafe(32)}],
            "limits": {"rate_per_second": 1000, "rate_burst": 2000, "max_connections_per_user": 10},
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        self.tenants_file = data_dir / "tenants.yaml"
        self.tenants_file.write_text(yaml.safe_dump({"tenants": [self.tenant]}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "IMHUB_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imhub",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--tenants",
                str(self.tenants_file),
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir / "server.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit("bench: the server did not start; see " + str(self.data_dir))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextlib.contextmanager
def socket_port() -> Any:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _minter(tenant: dict[str, Any]) -> Any:
    import jwt

    key = tenant["keys"][0]

    def mint(user: str) -> str:
        now = int(time.time())
        return jwt.encode(
            {"sub": user, "tenant_id": tenant["tenant_id"], "iat": now, "exp": now + 3600},
            key["secret"],
            algorithm="HS256",
            headers={"kid": key["kid"]},
        )

    return mint


async def _connect(url: str, token: str) -> Any:
    ws = await websockets.connect(url, max_size=None, ping_interval=None, compression=None)
    await ws.send(
        orjson.dumps({"event": "authorize", "payload": {"token": token}, "ack_id": "auth"}).decode()
    )
    reply = orjson.loads(await ws.recv())
    if not reply["payload"].get("success"):
        raise RuntimeError(f"authorize failed: {reply}")
    return ws


async def _reader(ws: Any, stats: _Stats, me: str) -> None:
    loads = orjson.loads
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            now = time.perf_counter()
            frame = loads(raw)
            event = frame["event"]
            payload = frame["payload"]
            if event == "ack":
                started = stats.sent_at.get(payload["for_ack_id"])
                if payload["success"]:
                    if started is not None:
                        stats.ack.append(now - started)
                else:
                    code = payload["error"]["code"]
                    stats.errors[code] = stats.errors.get(code, 0) + 1
            elif event == "message_created" and payload["sender_id"] != me:
                stats.delivered += 1
                started = stats.sent_at.get(payload["client_msg_id"])
                if started is not None:
                    stats.deliver.append(now - started)


async def _run(
    args: argparse.Namespace, urls: list[str], tenant: dict[str, Any], server_pid: int | None
) -> int:
    mint = _minter(tenant)
    ws_urls = [u.replace("http://", "ws://", 1).rstrip("/") + "/v1/im/ws" for u in urls]
    run_id = secrets.token_hex(3)
    users = [f"bench-{run_id}-{i}" for i in range(args.clients)]

    # Conversations: clients spread round-robin, every conversation has >= 2 members.
    convs: list[str] = []
    members: list[list[str]] = [[] for _ in range(args.convs)]
    for i, user in enumerate(users):
        members[i % args.convs].append(user)
    async with httpx.AsyncClient(base_url=urls[0], timeout=30) as http:
        for group in members:
            if not group:
                continue
            creator = group[0]
            others = group[1:] or [f"bench-{run_id}-listener"]
            resp = await http.post(
                "/v1/im/conversations",
                json={"type": "group", "member_ids": others, "name": "bench"},
                headers={"Authorization": f"Bearer {mint(creator)}"},
            )
            resp.raise_for_status()
            convs.append(resp.json()["conv_id"])
    conv_of = {u: convs[i % len(convs)] for i, u in enumerate(users)}

    stats = _Stats()
    sockets = []
    for i in range(0, len(users), 100):
        chunk = users[i : i + 100]
        sockets += await asyncio.gather(
            *(_connect(ws_urls[(i + j) % len(ws_urls)], mint(u)) for j, u in enumerate(chunk))
        )
    readers = [
        asyncio.create_task(_reader(ws, stats, u)) for ws, u in zip(sockets, users, strict=True)
    ]
    print(
        f"bench: {len(sockets)} clients in {len(convs)} conversations on "
        f"{len(urls)} gateway(s); {args.rate:g} msg/s for {args.duration:g}s",
        flush=True,
    )

    # Pace sends in 5 ms ticks, round-robin over the clients.
    tick = 0.005
    per_tick = args.rate * tick
    budget = 0.0
    sent = 0
    start = time.perf_counter()
    next_tick = start
    index = 0
    dumps = orjson.dumps
    while time.perf_counter() - start < args.duration:
        budget += per_tick
        while budget >= 1:
            budget -= 1
            user = users[index % len(users)]
            ws = sockets[index % len(sockets)]
            index += 1
            cid = f"{run_id}-{sent}"
            stats.sent_at[cid] = time.perf_counter()
            await ws.send(
                dumps(
                    {
                        "event": "send_message",
                        "ack_id": cid,
                        "payload": {
                            "conv_id": conv_of[user],
                            "client_msg_id": cid,
                            "type": "text",
                            "content": {"text": "benchmark message payload of modest size"},
                        },
                    }
                ).decode()
            )
            sent += 1
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    elapsed = time.perf_counter() - start
    # Let in-flight messages land.
    deadline = time.perf_counter() + 10
    while len(stats.ack) + sum(stats.errors.values()) < sent and time.perf_counter() < deadline:  # noqa: ASYNC110 - a bounded poll of counters
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)

    acked = len(stats.ack)
    print(f"sent            {sent} in {elapsed:.1f}s ({sent / elapsed:.0f} msg/s offered)")
    print(f"acked           {acked} ({acked / elapsed:.0f} msg/s), errors {stats.errors or 0}")
    print(f"delivered       {stats.delivered} frames to other members")
    print(
        f"send->ack       p50 {_pct(stats.ack, 0.5):.1f} ms  p95 {_pct(stats.ack, 0.95):.1f} ms"
        f"  p99 {_pct(stats.ack, 0.99):.1f} ms"
    )
    print(
        f"send->deliver   p50 {_pct(stats.deliver, 0.5):.1f} ms  p95 "
        f"{_pct(stats.deliver, 0.95):.1f} ms  p99 {_pct(stats.deliver, 0.99):.1f} ms"
    )

    per_conn = None
    if args.idle:
        await asyncio.sleep(1)
        before = _rss(server_pid)
        idle: list[Any] = []
        for i in range(0, args.idle, 200):
            n = min(200, args.idle - i)
            idle += await asyncio.gather(
                *(
                    _connect(ws_urls[(i + j) % len(ws_urls)], mint(f"idle-{run_id}-{i + j}"))
                    for j in range(n)
                )
            )
        await asyncio.sleep(2)
        after = _rss(server_pid)
        if before is not None and after is not None:
            per_conn = (after - before) / len(idle)
            print(
                f"idle conns      {len(idle)}: server RSS {before / 2**20:.0f} -> "
                f"{after / 2**20:.0f} MiB, {per_conn / 1024:.1f} KiB per connection"
            )
        else:
            print(f"idle conns      {len(idle)} open (pass --server-pid to measure memory)")
        await asyncio.gather(*(ws.close() for ws in idle), return_exceptions=True)

    for ws in sockets:
        await ws.close()
    for task in readers:
        task.cancel()
    summary = (
        f"SUMMARY msgs/s={acked / elapsed:.0f} ack_p50_ms={_pct(stats.ack, 0.5):.1f} "
        f"ack_p99_ms={_pct(stats.ack, 0.99):.1f} "
        f"deliver_p50_ms={_pct(stats.deliver, 0.5):.1f} "
        f"deliver_p95_ms={_pct(stats.deliver, 0.95):.1f} "
        f"deliver_p99_ms={_pct(stats.deliver, 0.99):.1f} "
        f"errors={sum(stats.errors.values())}"
    )
    if per_conn is not None:
        summary += f" idle_kib_per_conn={per_conn / 1024:.1f}"
    print(summary, flush=True)
    _ = statistics  # keep the import for readers adding means
    return 0 if acked else 1


async def _pipeline(args: argparse.Namespace, url: str, tenant: dict[str, Any]) -> int:
    """Persisted msgs/s through Kafka and the database, without WebSocket clients.

    Produces ``--pipeline`` send commands to the tenant's ``im-messages`` topic as
    a gateway would, and counts the ``message_created`` events the message
    service emits after each batch is committed to the database.
    """
    from imhub.runtime import envelopes, tenancy
    from imhub.runtime.adapters import kafka

    mint = _minter(tenant)
    names = tenancy.names_for(tenant["tenant_id"])
    run_id = secrets.token_hex(3)
    convs = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for i in range(args.convs):
            resp = await http.post(
                "/v1/im/conversations",
                json={"type": "group", "member_ids": [f"p-{run_id}-{i}-b"], "name": "pipe"},
                headers={"Authorization": f"Bearer {mint(f'p-{run_id}-{i}-a')}"},
            )
            resp.raise_for_status()
            convs.append((resp.json()["conv_id"], f"p-{run_id}-{i}-a"))

    bus = kafka.KafkaBus(args.kafka_bootstrap, client_id=f"imhub-bench-{run_id}")
    await bus.start()
    events = bus.consumer([names.topic_events], f"imhub-bench-{run_id}", from_latest=True)
    await events.poll(1, 1.0)  # fixes the starting positions before producing
    total = args.pipeline
    seen = 0
    done = asyncio.Event()

    async def count() -> None:
        nonlocal seen
        while seen < total:
            for rec in await events.poll(5000, 0.5):
                ev = envelopes.decode(rec.value)
                if ev.get("op") == "message_created" and str(
                    ev["message"]["client_msg_id"]
                ).startswith(run_id):
                    seen += 1
        done.set()

    counter = asyncio.create_task(count())
    start = time.perf_counter()
    for i in range(0, total, 2000):
        await asyncio.gather(
            *(
                bus.produce(
                    names.topic_messages,
                    convs[n % len(convs)][0],
                    envelopes.encode(
                        {
                            "op": "send",
                            "tenant_id": tenant["tenant_id"],
                            "conv_id": convs[n % len(convs)][0],
                            "sender_id": convs[n % len(convs)][1],
                            "client_msg_id": f"{run_id}-{n}",
                            "type": "text",
                            "content": {"text": "pipeline benchmark message"},
                            "sent_at": time.time(),
                        }
                    ),
                )
                for n in range(i, min(total, i + 2000))
            )
        )
    produced = time.perf_counter() - start
    try:
        await asyncio.wait_for(done.wait(), 120)
    except TimeoutError:
        counter.cancel()
    elapsed = time.perf_counter() - start
    await events.close()
    await bus.close()
    print(f"produced        {total} commands in {produced:.1f}s")
    print(f"stored          {seen} messages in {elapsed:.1f}s across {len(convs)} conversations")
    print(f"SUMMARY pipeline_msgs/s={seen / elapsed:.0f} stored={seen} of={total}", flush=True)
    return 0 if seen == total else 1


def _tenant(args: argparse.Namespace) -> dict[str, Any]:
    """The tenant to mint tokens for, from ``--tenants`` (and ``--tenant``)."""
    doc = yaml.safe_load(args.tenants.read_text())
    tenants = doc["tenants"] if isinstance(doc, dict) else doc
    tenant = next((t for t in tenants if args.tenant in (None, t["tenant_id"])), None)
    if tenant is None:
        raise SystemExit(f"bench: tenant {args.tenant!r} not in {args.tenants}")
    if not any(k.get("alg", "HS256") == "HS256" for k in tenant["keys"]):
        raise SystemExit(f"bench: tenant {tenant['tenant_id']!r} has no HS256 key to sign with")
    tenant = {**tenant, "keys": [k for k in tenant["keys"] if k.get("alg", "HS256") == "HS256"]}
    return dict(tenant)


def main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    if args.pipeline:
        if not (args.url and args.tenants and args.kafka_bootstrap):
            raise SystemExit("bench: --pipeline needs --url, --tenants and --kafka-bootstrap")
        return asyncio.run(_pipeline(args, args.url.split(",")[0], _tenant(args)))
    if args.url:
        if not args.tenants:
            raise SystemExit("bench: --url needs --tenants FILE to mint tokens")
        return asyncio.run(_run(args, args.url.split(","), _tenant(args), args.server_pid))

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="imhub-bench-"))
    server = _Server(data_dir)
    server.start()
    try:
        pid = server.proc.pid if server.proc else None
        return asyncio.run(_run(args, [f"http://127.0.0.1:{server.port}"], server.tenant, pid))
    finally:
        server.stop()
