"""Core modules without I/O: naming, protocol parsing, content rules, limits, tenants."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imhub.runtime import errors, protocol, tenancy, tenants, turn
from imhub.runtime.gateway import limits


def test_names_come_from_one_place() -> None:
    n = tenancy.names_for("acme-co")
    assert n.db_schema == "t_acme_co" and n.db_role == "imhub_t_acme_co"
    assert n.topics == (
        "imhub.acme-co.im-messages",
        "imhub.acme-co.im-signaling",
        "imhub.acme-co.im-events",
    )
    assert n.bucket == "imhub-acme-co" and n.object_prefix == "acme-co/"
    assert n.k8s_secret == "imhub-acme-co-credentials"
    assert n.turn_username("bob", 123) == "123:acme-co:bob"


@pytest.mark.parametrize("bad", ["", "A", "ab", "1abc", "abc-", "a" * 33, "a_b", "ab.c", "é-ab"])
def test_bad_tenant_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid tenant id"):
        tenancy.names_for(bad)


def test_parse_frame_salvages_ack_id() -> None:
    frame, ack_id, err = protocol.parse_frame('{"event": 5, "ack_id": "x1"}')
    assert frame is None and ack_id == "x1" and isinstance(err, errors.InvalidPayload)
    frame, ack_id, err = protocol.parse_frame("[1, 2]")
    assert frame is None and ack_id is None and err is not None
    frame, ack_id, err = protocol.parse_frame('{"event": "ping", "payload": {}, "ack_id": "z"}')
    assert frame is not None and ack_id == "z" and err is None


@pytest.mark.parametrize(
    ("msg_type", "content", "code"),
    [
        ("text", {"text": ""}, "invalid_payload"),
        ("text", {"text": "x", "extra": 1}, "invalid_payload"),
        ("image", {"url": "https://x/y.png", "key": "k"}, "invalid_payload"),
        ("image", {"url": "javascript:alert(1)"}, "invalid_payload"),
        ("file", {"key": "k", "fileName": "a.pdf"}, "invalid_payload"),
        ("text", {"text": "x" * 300}, "too_large"),
        ("system", {"event": "call_started"}, "forbidden"),
    ],
)
def test_content_rules(msg_type: str, content: dict[str, object], code: str) -> None:
    with pytest.raises(errors.ImhubError) as info:
        protocol.validate_content(msg_type, content, max_bytes=256)
    assert info.value.code == code


def test_valid_content() -> None:
    protocol.validate_content(
        "image", {"key": "k", "width": 3, "height": 4, "size": 9}, max_bytes=256
    )
    protocol.validate_content(
        "file", {"url": "https://x/a.pdf", "fileName": "a.pdf", "size": 1}, max_bytes=256
    )
    protocol.validate_content(
        "system", {"event": "call_ended", "duration": 3}, max_bytes=256, server_made=True
    )


def test_token_bucket() -> None:
    bucket = limits.TokenBucket(rate=10, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.strikes == 1
    time.sleep(0.12)
    assert bucket.take() and bucket.strikes == 0


def test_tenant_config_validation() -> None:
    with pytest.raises(ValueError, match="HS256 needs"):
        tenants.SigningKey(kid="a", alg="HS256")
    with pytest.raises(ValueError, match="public_key"):
        tenants.SigningKey(kid="a", alg="RS256")
    with pytest.raises(ValueError):
        tenants.SigningKey(kid="a", alg="HS256", secret="short")
    registry = tenants.load_tenants(
        environ={"IMHUB_TENANT_ID": "solo", "IMHUB_TENANT_JWT_SECRET": "s" * 40}
    )
    assert registry.ids() == ["solo"]
    with pytest.raises(ValueError, match="defined twice"):
        tenants.TenantRegistry([registry.get("solo"), registry.get("solo")])  # type: ignore[list-item]


def test_content_types() -> None:
    lim = tenants.TenantLimits(allowed_content_types=("image/*", "application/pdf"))
    assert lim.content_type_allowed("image/png") and lim.content_type_allowed("application/pdf")
    assert not lim.content_type_allowed("text/html") and not lim.content_type_allowed("imagex/png")


def test_turn_credentials_match_coturn_rules() -> None:
    import base64
    import hashlib
    import hmac

    user, password, expiry = turn.turn_credentials("s3cret", "acme", "bob", ttl=60, now=1000)
    assert user == "1060:acme:bob" and expiry == 1060
    expected = base64.b64encode(hmac.new(b"s3cret", user.encode(), hashlib.sha1).digest()).decode()
    assert password == expected
    doc = turn.ice_servers(
        tenant_id="acme",
        user_id="bob",
        stun_urls=["stun:x"],
        turn_urls=["turn:y"],
        turn_secret=None,
        ttl=60,
    )
    assert doc["ice_servers"] == [{"urls": ["stun:x"]}]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad_pem = tmp_path / "t.yaml"
    bad_pem.write_text(
        "tenants:\n- tenant_id: abc\n  keys: [{kid: a, alg: RS256, public_key: x}]\n"
    )
    cases = [
        ["serve", "--tenants", str(tmp_path)],
        ["serve", "--log-level", "NOPE", "--demo", "--data-dir", str(tmp_path / "d")],
        ["serve", "--database-url", "nope://", "--demo", "--data-dir", str(tmp_path / "d")],
        ["serve", "--tenants", str(bad_pem)],
        ["token", "--tenant", "nope", "--user", "a", "--data-dir", str(tmp_path / "empty")],
    ]
    for args in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "imhub", *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("imhub: "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
