"""Embedded media: upload tokens, signed local URLs and what they refuse.

Runs a real ``imhub serve`` (local media store, no S3) and talks REST to it
with httpx, the way a tenant app does: ask for an upload token, PUT the bytes
to the signed URL, ask for a download URL, GET the bytes back. Every change
to a signed URL, an expired URL, a body over the declared size, another
content type and a second use of an upload URL are refused with a JSON error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from imhub.runtime.adapters.media import LocalMediaStore
from tests.harness import EmbeddedServer, make_tenants

MAX_UPLOAD = 4096
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # 1032 bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    tenants = make_tenants(
        "pics", "other", max_upload_bytes=MAX_UPLOAD, rate_per_second=200, rate_burst=400
    )
    srv = EmbeddedServer(Path(tmp_path_factory.mktemp("media")), tenants)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
async def conv_id(server: EmbeddedServer) -> str:
    async with server.rest("pics", "alice") as http:
        response = await http.post(
            "/v1/im/conversations",
            json={"type": "group", "member_ids": ["bob"], "name": "photos"},
        )
    assert response.status_code == 200, response.text
    conv: str = response.json()["conv_id"]
    return conv


@pytest.fixture
async def http(server: EmbeddedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http(), timeout=10) as client:
        yield client


def auth(server: EmbeddedServer, tenant_id: str, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(tenant_id, user_id)}"}


async def upload_token(
    http: httpx.AsyncClient,
    server: EmbeddedServer,
    conv_id: str,
    *,
    user: str = "alice",
    tenant: str = "pics",
    content_type: str = "image/png",
    size: int = len(PNG),
    file_name: str = "holiday photo.png",
) -> httpx.Response:
    return await http.post(
        "/v1/im/media/upload-token",
        json={
            "conv_id": conv_id,
            "file_name": file_name,
            "content_type": content_type,
            "size": size,
        },
        headers=auth(server, tenant, user),
    )


async def ticket(http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str) -> dict[str, Any]:
    response = await upload_token(http, server, conv_id)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def download_url(
    http: httpx.AsyncClient,
    server: EmbeddedServer,
    key: str,
    *,
    user: str = "bob",
    tenant: str = "pics",
) -> httpx.Response:
    return await http.get(
        "/v1/im/media/download-url", params={"key": key}, headers=auth(server, tenant, user)
    )


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def flip_last_hex(value: str) -> str:
    return value[:-1] + ("0" if value[-1] != "0" else "1")


def signer(server: EmbeddedServer) -> LocalMediaStore:
    """The server's own signing key (its data dir), to make validly signed URLs."""
    secret = (server.data_dir / "media.key").read_bytes()
    return LocalMediaStore(server.data_dir / "media", secret=secret, public_url=server.http())


# -- the round trip -------------------------------------------------------------------


async def test_upload_then_download_returns_the_same_bytes(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)
    assert t["method"] == "PUT" and t["fields"] == {}
    assert t["headers"] == {"Content-Type": "image/png"}
    assert t["max_size"] == len(PNG)
    assert t["key"].startswith(f"pics/{conv_id}/") and t["key"].endswith("/holiday_photo.png")
    assert t["url"].startswith(server.http() + "/v1/media/local/")

    put = await http.put(t["url"], content=PNG, headers=t["headers"])
    assert put.status_code == 200, put.text
    assert put.json() == {"key": t["key"], "size": len(PNG)}

    # Any member may fetch it: bob did not upload it.
    response = await download_url(http, server, t["key"], user="bob")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["key"] == t["key"] and doc["content_type"] == "image/png"
    got = await http.get(doc["url"])
    assert got.status_code == 200
    assert got.content == PNG
    assert got.headers["content-type"] == "image/png"


async def test_upload_may_be_smaller_than_declared(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)
    put = await http.put(t["url"], content=PNG[:10], headers=t["headers"])
    assert put.status_code == 200 and put.json()["size"] == 10


# -- tampered and expired URLs ----------------------------------------------------------


@pytest.mark.parametrize("change", ["key", "exp", "sig", "ct", "max"])
async def test_changed_upload_url_is_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str, change: str
) -> None:
    t = await ticket(http, server, conv_id)
    url, headers = t["url"], dict(t["headers"])
    query = dict(parse_qsl(urlsplit(url).query))
    if change == "key":
        url = url.replace(quote(t["key"]), quote(t["key"] + ".exe"))
    elif change == "exp":
        url = with_query(url, exp=str(int(query["exp"]) + 3600))
    elif change == "sig":
        url = with_query(url, sig=flip_last_hex(query["sig"]))
    elif change == "ct":
        url = with_query(url, ct="text/html")
        headers["Content-Type"] = "text/html"
    else:
        url = with_query(url, max=str(10 * MAX_UPLOAD))
    assert url != t["url"]
    assert_error(await http.put(url, content=PNG, headers=headers), 403, "forbidden")
    # Nothing was stored under the real key either: the genuine URL still works once.
    assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200


@pytest.mark.parametrize("change", ["key", "exp", "sig"])
async def test_changed_download_url_is_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str, change: str
) -> None:
    first, second = await ticket(http, server, conv_id), await ticket(http, server, conv_id)
    for t in (first, second):
        assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200
    url = (await download_url(http, server, first["key"])).json()["url"]
    query = dict(parse_qsl(urlsplit(url).query))
    if change == "key":
        # A signed URL for one object does not open another, even in the same conversation.
        url = url.replace(quote(first["key"]), quote(second["key"]))
    elif change == "exp":
        url = with_query(url, exp=str(int(query["exp"]) + 3600))
    else:
        url = with_query(url, sig=flip_last_hex(query["sig"]))
    response = await http.get(url)
    assert_error(response, 403, "forbidden")
    assert PNG not in response.content


async def test_expired_urls_are_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)
    key = t["key"]
    local = signer(server)
    past = int(time.time()) - 5
    future = int(time.time()) + 60

    def upload_url(expires: int) -> str:
        sig = local.sign("put", key, expires, "image/png", len(PNG))
        query = urlencode({"exp": expires, "ct": "image/png", "max": len(PNG), "sig": sig})
        return f"{server.http()}/v1/media/local/{quote(key)}?{query}"

    def get_url(expires: int) -> str:
        query = urlencode({"exp": expires, "sig": local.sign("get", key, expires)})
        return f"{server.http()}/v1/media/local/{quote(key)}?{query}"

    # Correctly signed but past its expiry: refused.
    expired_put = await http.put(upload_url(past), content=PNG, headers=t["headers"])
    assert_error(expired_put, 403, "forbidden")
    # The same signing with a future expiry is accepted, so only the expiry was at fault.
    assert (
        await http.put(upload_url(future), content=PNG, headers=t["headers"])
    ).status_code == 200
    assert_error(await http.get(get_url(past)), 403, "forbidden")
    assert (await http.get(get_url(future))).content == PNG


# -- limits enforced at upload ------------------------------------------------------------


async def test_body_over_the_declared_size_is_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)
    response = await http.put(t["url"], content=PNG + b"!", headers=t["headers"])
    assert_error(response, 413, "too_large")
    # Nothing was stored: the URL still accepts a correct upload.
    assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200


async def test_streamed_body_over_the_declared_size_is_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    """Without Content-Length (chunked) the server counts while it reads."""
    t = await ticket(http, server, conv_id)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield PNG[:600]

    response = await http.put(t["url"], content=chunks(), headers=t["headers"])
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "too_large")
    assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200


@pytest.mark.parametrize("sent", ["text/html", "image/jpeg", None])
async def test_other_content_type_is_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str, sent: str | None
) -> None:
    t = await ticket(http, server, conv_id)
    headers = {"Content-Type": sent} if sent else {}
    assert_error(await http.put(t["url"], content=PNG, headers=headers), 403, "forbidden")


async def test_upload_url_works_once(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)
    assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200
    again = await http.put(t["url"], content=b"replaced", headers=t["headers"])
    assert_error(again, 409, "conflict")
    url = (await download_url(http, server, t["key"])).json()["url"]
    assert (await http.get(url)).content == PNG


async def test_concurrent_uses_of_one_upload_url_store_one_object(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)

    async def slow(tag: bytes) -> AsyncIterator[bytes]:
        for _ in range(8):  # 8 x 0.05 s: both requests are inside the handler at once
            yield tag * 100
            await asyncio.sleep(0.05)

    first, second = await asyncio.gather(
        http.put(t["url"], content=slow(b"A"), headers=t["headers"]),
        http.put(t["url"], content=slow(b"B"), headers=t["headers"]),
    )
    statuses = sorted([first.status_code, second.status_code])
    winner = b"A" if first.status_code == 200 else b"B"
    url = (await download_url(http, server, t["key"])).json()["url"]
    stored = (await http.get(url)).content
    assert statuses == [200, 409]
    assert stored == winner * 800


# -- limits enforced at upload-token ---------------------------------------------------------


async def test_refused_content_type_gets_no_token(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    response = await upload_token(http, server, conv_id, content_type="text/html")
    assert_error(response, 422, "invalid_payload")
    assert "text/html" in response.json()["error"]["message"]


async def test_size_over_the_tenant_limit_gets_no_token(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    response = await upload_token(http, server, conv_id, size=MAX_UPLOAD + 1)
    assert_error(response, 413, "too_large")
    assert response.json()["error"]["details"] == {"limit": MAX_UPLOAD}
    assert (await upload_token(http, server, conv_id, size=MAX_UPLOAD)).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"size": 0},
        {"size": -1},
        {"content_type": "not a type"},
        {"file_name": ""},
        {"conv_id": "../../etc"},
        {"extra": 1},
    ],
    ids=["size-0", "size-negative", "bad-type", "empty-name", "bad-conv", "extra-field"],
)
async def test_malformed_upload_token_request_is_refused(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str, body: dict[str, Any]
) -> None:
    doc = {"conv_id": conv_id, "file_name": "a.png", "content_type": "image/png", "size": 10}
    doc.update(body)
    response = await http.post(
        "/v1/im/media/upload-token", json=doc, headers=auth(server, "pics", "alice")
    )
    assert_error(response, 422, "invalid_payload")


async def test_file_name_cannot_steer_the_key(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    response = await upload_token(http, server, conv_id, file_name="../../other/../x.png")
    assert response.status_code == 200
    key = response.json()["key"]
    assert key.startswith(f"pics/{conv_id}/") and ".." not in key.split("/")


# -- who may ask ----------------------------------------------------------------------------


async def test_non_members_and_other_tenants_get_404(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    t = await ticket(http, server, conv_id)
    assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200

    assert_error(await download_url(http, server, t["key"], user="eve"), 404, "not_found")
    # Another tenant's user, even one with the same user id as a member.
    for user in ("alice", "bob", "eve"):
        response = await download_url(http, server, t["key"], user=user, tenant="other")
        assert_error(response, 404, "not_found")
    # The same answer as for a key that never existed.
    missing = await download_url(http, server, f"pics/{conv_id}/nope/x.png")
    assert_error(missing, 404, "not_found")
    # Nor can they get upload tokens for the conversation.
    assert_error(await upload_token(http, server, conv_id, user="eve"), 404, "not_found")
    assert_error(
        await upload_token(http, server, conv_id, user="alice", tenant="other"), 404, "not_found"
    )


async def test_removed_member_loses_access(http: httpx.AsyncClient, server: EmbeddedServer) -> None:
    async with server.rest("pics", "alice") as alice:
        created = await alice.post(
            "/v1/im/conversations",
            json={"type": "group", "member_ids": ["carol"], "name": "short-lived"},
        )
        conv = created.json()["conv_id"]
        t = await ticket(http, server, conv)
        assert (await http.put(t["url"], content=PNG, headers=t["headers"])).status_code == 200
        assert (await download_url(http, server, t["key"], user="carol")).status_code == 200
        removed = await alice.delete(f"/v1/im/conversations/{conv}/members/carol")
        assert removed.status_code == 200
    assert_error(await download_url(http, server, t["key"], user="carol"), 404, "not_found")


async def test_media_routes_need_a_token(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    response = await http.post(
        "/v1/im/media/upload-token",
        json={"conv_id": conv_id, "file_name": "a.png", "content_type": "image/png", "size": 1},
    )
    assert_error(response, 401, "unauthorized")
    assert_error(
        await http.get("/v1/im/media/download-url", params={"key": "pics/x"}), 401, "unauthorized"
    )


async def test_unknown_object_with_valid_signature_is_404(
    http: httpx.AsyncClient, server: EmbeddedServer, conv_id: str
) -> None:
    """A token was issued but nothing was uploaded yet."""
    t = await ticket(http, server, conv_id)
    url = (await download_url(http, server, t["key"])).json()["url"]
    assert_error(await http.get(url), 404, "not_found")


@pytest.mark.parametrize(
    ("content_type", "body", "disposition"),
    [
        (
            "image/svg+xml",
            b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
            "attachment",
        ),
        ("IMAGE/PNG", PNG, "inline"),
    ],
)
async def test_downloads_cannot_run_as_pages(
    http: httpx.AsyncClient,
    server: EmbeddedServer,
    conv_id: str,
    content_type: str,
    body: bytes,
    disposition: str,
) -> None:
    response = await upload_token(
        http, server, conv_id, content_type=content_type, size=len(body), file_name="x"
    )
    assert response.status_code == 200, response.text
    t = response.json()
    assert t["headers"]["Content-Type"] == content_type.lower()
    assert (await http.put(t["url"], content=body, headers=t["headers"])).status_code == 200
    got = await http.get((await download_url(http, server, t["key"])).json()["url"])
    assert got.status_code == 200 and got.content == body
    assert got.headers["content-disposition"] == disposition
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]
