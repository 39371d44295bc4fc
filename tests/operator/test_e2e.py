"""End to end: the operator against a real kube-apiserver and real backends.

The control plane comes from ``scripts/cluster`` (no kubelet), the backends
from ``scripts/services``. The CRD is installed with the cluster's kubectl, the
chart with its helm (RBAC bound to the unprivileged ``imhub-operator`` user as
well), and ``imhub operator`` runs as a subprocess with that user's
credentials, so every call it makes passes the chart's RBAC.

Then the test checks what the operator made, for real, in each backend, plays
the kubelet for one tenant (starts ``imhub gateway`` and ``imhub
message-service`` with the environment of the rendered Deployments, resolved
from the provisioned Secret) and round-trips a message, and walks through
spec changes, drift, a database outage, refused specs and both deletion
policies. The tests in this module run in order and share one operator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import boto3
import httpx
import jwt
import pytest
from botocore.config import Config
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from imhub import cli
from tests.harness import Client, free_port, wait_http
from tests.operator.conftest import Cluster, Kubectl
from tests.realservices import REPO, ServiceSet

# Generous: the first test may wait for a cold build of kube-apiserver (minutes);
# every wait inside the tests is bounded on its own.
pytestmark = [pytest.mark.cluster, pytest.mark.services, pytest.mark.timeout(1800)]

NS = "imhub-tenants"
OPERATOR_NS = "imhub-system"
EXAMPLES = REPO / "crds" / "examples"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy (bounded in time)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # noqa: BLE001 - a probe may fail until the state is there
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Env:
    """Everything the tests share: cluster, backends, operator process."""

    def __init__(self, cluster: Cluster, services: ServiceSet, base: Path) -> None:
        self.cluster = cluster
        self.kubectl: Kubectl = cluster.kubectl
        self.services = services
        self.base = base
        self.pg = services.get("postgres")
        self.kafka = services.get("kafka")
        self.s3 = services.get("s3")
        self.turn = services.get("coturn")
        self.redis = services.get("redis")
        self.operator: subprocess.Popen[bytes] | None = None
        self.liveness_port = 0
        self.log_path = base / "operator.log"

    # -- the operator process ---------------------------------------------------------

    def operator_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMHUB_")}
        env.update(
            KUBECONFIG=self.cluster.operator_kubeconfig(),
            IMHUB_OPERATOR_DATABASE_URL=self.pg["DATABASE_URL"],
            IMHUB_OPERATOR_KAFKA_BOOTSTRAP=self.kafka["KAFKA_BOOTSTRAP"],
            IMHUB_OPERATOR_REDIS_URL=self.redis["REDIS_URL"],
            IMHUB_OPERATOR_S3_ENDPOINT=self.s3["S3_ENDPOINT"],
            IMHUB_OPERATOR_S3_ACCESS_KEY=self.s3["S3_ACCESS_KEY"],
            IMHUB_OPERATOR_S3_SECRET_KEY=self.s3["S3_SECRET_KEY"],
            IMHUB_OPERATOR_S3_REGION=self.s3["S3_REGION"],
            IMHUB_OPERATOR_TURN_DB=self.turn["TURN_DB"],
            IMHUB_OPERATOR_TURN_REALM=self.turn["TURN_REALM"],
            IMHUB_OPERATOR_TURN_URLS=json.dumps([self.turn["TURN_URL"]]),
            IMHUB_OPERATOR_STUN_URLS="[]",
            IMHUB_OPERATOR_DRIFT_INTERVAL="3",
            IMHUB_OPERATOR_DRIFT_INITIAL_DELAY="1",
            IMHUB_OPERATOR_RETRY_DELAY="1",
            IMHUB_OPERATOR_BACKEND_TIMEOUT="3",
            IMHUB_OPERATOR_DELETE_ATTEMPTS="2",
            IMHUB_OPERATOR_IMAGE="ghcr.io/imhub/imhub:e2e",
            IMHUB_OPERATOR_LIVENESS_ENDPOINT=f"http://127.0.0.1:{self.liveness_port}/healthz",
        )
        return env

    def start_operator(self) -> None:
        self.liveness_port = free_port()
        log = self.log_path.open("ab")
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "imhub", "operator"],
            stdout=log,
            stderr=log,
            env=self.operator_env(),
            cwd=str(self.base),
        )
        wait_http(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=60, proc=self.operator)

    def stop_operator(self) -> None:
        if self.operator is None:
            return
        if self.operator.poll() is None:
            self.operator.send_signal(signal.SIGINT)
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(5)
        self.operator = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- Kubernetes views -------------------------------------------------------------

    def tenant(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.kubectl.get("imtenant", name, NS)
        return result

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        obj = self.tenant(name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return None

    def wait_ready(self, name: str, timeout: float = 90) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            obj = self.tenant(name) or {}
            conditions = (obj.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return obj
            return None

        try:
            return wait_for(f"ImTenant {name} Ready", ready, timeout)
        except AssertionError:
            print(self.log()[-4000:])
            print(json.dumps((self.tenant(name) or {}).get("status"), indent=1))
            raise

    def secret(self, tenant_id: str) -> dict[str, str]:
        obj = self.kubectl.get("secret", f"imhub-{tenant_id}-credentials", NS)
        assert obj is not None
        return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}

    # -- backends ---------------------------------------------------------------------

    def sql(self, query: str, *args: Any, dsn: str | None = None) -> list[Any]:
        async def run() -> list[Any]:
            conn = await asyncpg.connect(dsn or self.pg["DATABASE_URL"], timeout=5)
            try:
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def admin(self) -> Any:
        return AdminClient({"bootstrap.servers": self.kafka["KAFKA_BOOTSTRAP"]})

    def partitions(self, tenant_id: str) -> dict[str, int]:
        topics = self.admin().list_topics(timeout=5).topics
        prefix = f"imhub.{tenant_id}."
        return {name: len(t.partitions) for name, t in topics.items() if name.startswith(prefix)}

    def s3_client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.s3["S3_ENDPOINT"],
            aws_access_key_id=self.s3["S3_ACCESS_KEY"],
            aws_secret_access_key=self.s3["S3_SECRET_KEY"],
            region_name=self.s3["S3_REGION"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self.s3_client().head_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001 - any error means "not there for us"
            return False
        return True

    def turn_secrets(self) -> set[str]:
        with contextlib.closing(sqlite3.connect(self.turn["TURN_DB"], timeout=5)) as db:
            rows = db.execute(
                "SELECT value FROM turn_secret WHERE realm = ?", (self.turn["TURN_REALM"],)
            ).fetchall()
        return {r[0] for r in rows}


@pytest.fixture(scope="module")
def env(
    cluster: Cluster, services: ServiceSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    e = Env(cluster, services, tmp_path_factory.mktemp("operator-e2e"))
    k = e.kubectl
    # The CRD with kubectl, as a platform team would; the chart without it.
    k.run("apply", "-f", str(REPO / "crds" / "imtenant.yaml"))
    k.run("wait", "--for=condition=Established", "crd/imtenants.imhub.io", "--timeout=60s")
    e.cluster.helm(
        "install",
        "imhub-operator",
        str(REPO / "charts" / "imhub-operator"),
        "--namespace",
        OPERATOR_NS,
        "--create-namespace",
        "--skip-crds",
        "--set",
        "rbac.extraSubjects[0].kind=User",
        "--set",
        "rbac.extraSubjects[0].name=imhub-operator",
        "--set",
        "backends.kafka.bootstrap=" + e.kafka["KAFKA_BOOTSTRAP"],
    )
    k.run("create", "namespace", NS)
    e.start_operator()
    try:
        yield e
    finally:
        e.stop_operator()
        print("---- operator log (tail) ----")
        print(e.log()[-3000:])


# -- install and provision ------------------------------------------------------------


def test_chart_installed_the_operator_objects(env: Env) -> None:
    deployment = env.kubectl.get("deployment", "imhub-operator", OPERATOR_NS)
    assert deployment is not None
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert cli.build_parser().parse_args(args).command == "operator"
    # The unprivileged user runs with exactly the chart's permissions.
    can = env.kubectl.run(
        "auth",
        "can-i",
        "patch",
        "imtenants.imhub.io/status",
        "--as",
        "imhub-operator",
        "-n",
        NS,
        check=False,
    )
    assert can.stdout.strip() == "yes"
    cannot = env.kubectl.run(
        "auth", "can-i", "list", "secrets", "--as", "imhub-operator", "-n", NS, check=False
    )
    assert cannot.stdout.strip() == "no"


def test_example_tenants_become_ready(env: Env) -> None:
    for name in ("acme", "globex"):
        env.kubectl.run("apply", "-n", NS, "-f", str(EXAMPLES / f"{name}.yaml"))
    for name in ("acme", "globex"):
        obj = env.wait_ready(name)
        status = obj["status"]
        assert status["phase"] == "Ready"
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        types = {c["type"]: c["status"] for c in status["conditions"]}
        assert types == {
            "Credentials": "True",
            "Database": "True",
            "Topics": "True",
            "Storage": "True",
            "Turn": "True",
            "Workloads": "True",
            "Ready": "True",
        }
        for cond in status["conditions"]:
            assert cond["reason"] and cond["lastTransitionTime"]
        assert status["endpoints"]["gateway"] == (
            f"http://imhub-{name}-gateway.{NS}.svc.cluster.local:8080"
        )
        assert status["resources"]["databaseSchema"] == f"t_{name}"
        assert status["resources"]["bucket"] == f"imhub-{name}"

    table = env.kubectl.run("get", "imt", "-n", NS).stdout
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    header = table.splitlines()[0].split()
    assert header[:5] == ["NAME", "TENANT", "PHASE", "READY", "GATEWAY"]
    assert lines["acme"][2:5] == [
        "Ready",
        "True",
        f"http://imhub-acme-gateway.{NS}.svc.cluster.local:8080",
    ]


def test_events_tell_the_story(env: Env) -> None:
    events = env.kubectl.json(
        "get", "events", "-n", NS, "--field-selector", "involvedObject.name=acme"
    )["items"]
    reasons = {e["reason"] for e in events}
    assert {
        "SecretCreated",
        "SchemaMigrated",
        "TopicsCreated",
        "BucketProvisioned",
        "TurnSecretAdded",
        "WorkloadsApplied",
        "Ready",
    } <= reasons


def test_database_schema_and_role(env: Env) -> None:
    acme, globex = env.secret("acme"), env.secret("globex")
    rows = env.sql(
        "SELECT nspname FROM pg_namespace WHERE nspname IN ('t_acme', 't_globex') ORDER BY 1"
    )
    assert [r["nspname"] for r in rows] == ["t_acme", "t_globex"]
    tables = env.sql("SELECT tablename FROM pg_tables WHERE schemaname = 't_acme'")
    assert {"conversations", "members", "messages", "alembic_version"} <= {
        r["tablename"] for r in tables
    }

    dsn = acme["database-url"].replace("postgresql+asyncpg://", "postgresql://")
    assert env.sql("SELECT current_user AS u", dsn=dsn)[0]["u"] == "imhub_t_acme"
    assert env.sql("SELECT count(*) AS n FROM t_acme.conversations", dsn=dsn)[0]["n"] == 0
    # Another tenant's schema, the public schema, the migration bookkeeping: refused.
    for forbidden in (
        "SELECT * FROM t_globex.conversations",
        "CREATE TABLE public.sneaky (x int)",
        "CREATE TABLE t_acme.planted (x int)",
        "UPDATE t_acme.alembic_version SET version_num = 'x'",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            env.sql(forbidden, dsn=dsn)
    other = globex["database-url"].replace("postgresql+asyncpg://", "postgresql://")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        env.sql("SELECT * FROM t_acme.messages", dsn=other)


def test_topics_have_the_requested_partitions(env: Env) -> None:
    assert env.partitions("acme") == {
        "imhub.acme.im-messages": 3,
        "imhub.acme.im-signaling": 3,
        "imhub.acme.im-events": 3,
    }
    assert set(env.partitions("globex").values()) == {2}
    admin = env.admin()  # keep it alive until the future resolves
    configs = admin.describe_configs([ConfigResource("topic", "imhub.acme.im-events")])
    (future,) = configs.values()
    assert future.result(10)["retention.ms"].value == str(72 * 3_600_000)


def test_bucket_policy_and_cors(env: Env) -> None:
    s3 = env.s3_client()
    for tenant_id, origins in (("acme", ["https://chat.acme.example"]), ("globex", ["*"])):
        bucket = f"imhub-{tenant_id}"
        policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow"
            assert statement["Principal"] == {"AWS": [env.s3["S3_ACCESS_KEY"]]}
            for resource in statement["Resource"]:
                assert resource.startswith(f"arn:aws:s3:::{bucket}")
        (rule,) = s3.get_bucket_cors(Bucket=bucket)["CORSRules"]
        assert rule["AllowedOrigins"] == origins
        assert {"PUT", "GET"} <= set(rule["AllowedMethods"])


def test_turn_secrets_are_in_coturns_database(env: Env) -> None:
    installed = env.turn_secrets()
    assert env.secret("acme")["turn-secret"] in installed
    assert env.secret("globex")["turn-secret"] in installed


def test_secret_deployments_and_service_are_owned(env: Env) -> None:
    tenant = env.tenant("acme")
    assert tenant is not None
    uid = tenant["metadata"]["uid"]
    objects = [
        ("secret", "imhub-acme-credentials"),
        ("service", "imhub-acme-gateway"),
        ("deployment", "imhub-acme-gateway"),
        ("deployment", "imhub-acme-message"),
        ("deployment", "imhub-acme-rtc"),
    ]
    for kind, name in objects:
        obj = env.kubectl.get(kind, name, NS)
        assert obj is not None, f"{kind}/{name}"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "ImTenant",
            "acme",
            uid,
            True,
        )
    secret = env.secret("acme")
    assert {"jwt-secret", "api-key", "database-url", "turn-secret", "tenants.yaml"} <= set(secret)
    gateway = env.kubectl.get("deployment", "imhub-acme-gateway", NS)
    assert gateway is not None and gateway["spec"]["replicas"] == 2
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert cli.build_parser().parse_args(container["args"]).command == "gateway"


# -- playing the kubelet --------------------------------------------------------------


class Pod:
    """One container of a rendered Deployment, run locally as a kubelet would."""

    def __init__(self, env: Env, deployment: str, base: Path) -> None:
        obj = env.kubectl.get("deployment", deployment, NS)
        assert obj is not None
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        secrets = {
            name: env.secret(name.removeprefix("imhub-").removesuffix("-credentials"))
            for name in {
                v["valueFrom"]["secretKeyRef"]["name"]
                for v in container["env"]
                if "secretKeyRef" in v.get("valueFrom", {})
            }
        }
        self.port = free_port()
        variables = {k: v for k, v in os.environ.items() if not k.startswith("IMHUB_")}
        for var in container["env"]:
            if "value" in var:
                variables[var["name"]] = var["value"]
            elif "secretKeyRef" in var["valueFrom"]:
                ref = var["valueFrom"]["secretKeyRef"]
                variables[var["name"]] = secrets[ref["name"]][ref["key"]]
            else:
                variables[var["name"]] = f"{deployment}-local"
        # Loopback only, and a data dir of our own instead of the pod's /tmp.
        variables["IMHUB_DATA_DIR"] = str(base / deployment)
        args = list(container["args"])
        args[args.index("--host") + 1] = "127.0.0.1"
        args[args.index("--port") + 1] = str(self.port)
        assert cli.build_parser().parse_args(args).command == args[0]
        self.log = (base / f"{deployment}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imhub", *args],
            env=variables,
            stdout=self.log,
            stderr=self.log,
            cwd=str(base),
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


async def allocate(env: Env, username: str, password: str) -> tuple[str, int]:
    """A TURN Allocate against the session's coturn (loopback)."""
    from aioice import turn

    transport, _ = await turn.create_turn_endpoint(
        asyncio.DatagramProtocol,
        server_addr=("127.0.0.1", int(env.turn["TURN_PORT"])),
        username=username,
        password=password,
    )
    try:
        address: tuple[str, int] = transport.get_extra_info("sockname")
        return address
    finally:
        transport.close()


async def test_runtime_runs_on_what_the_operator_provisioned(env: Env) -> None:
    base = env.base / "pods"
    base.mkdir(exist_ok=True)
    pods = [
        Pod(env, "imhub-acme-message", base),
        Pod(env, "imhub-acme-gateway", base),
    ]
    try:
        for pod in pods:
            await asyncio.to_thread(wait_http, pod.url + "/readyz", 60, pod.proc)
        gateway = pods[1].url
        secret = env.secret("acme")

        def token(user: str) -> str:
            now = int(time.time())
            return jwt.encode(
                {"sub": user, "tenant_id": "acme", "iat": now, "exp": now + 600},
                secret["jwt-secret"],
                algorithm="HS256",
                headers={"kid": "k1"},
            )

        async with httpx.AsyncClient(
            base_url=gateway, headers={"Authorization": f"Bearer {token('alice')}"}, timeout=10
        ) as http:
            created = await http.post(
                "/v1/im/conversations", json={"type": "direct", "member_ids": ["alice", "bob"]}
            )
            assert created.status_code in (200, 201), created.text
            conv_id = created.json()["conv_id"]
            ice = await http.get("/v1/im/rtc/ice-servers")
            assert ice.status_code == 200, ice.text

        # globex's credentials open nothing on acme's gateway.
        globex = env.secret("globex")
        now = int(time.time())
        for claims_tenant in ("globex", "acme"):
            foreign = jwt.encode(
                {"sub": "mallory", "tenant_id": claims_tenant, "iat": now, "exp": now + 600},
                globex["jwt-secret"],
                algorithm="HS256",
                headers={"kid": "k1"},
            )
            async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
                refused = await http.get(
                    "/v1/im/conversations", headers={"Authorization": f"Bearer {foreign}"}
                )
            assert refused.status_code == 401, refused.text

        ws = gateway.replace("http://", "ws://") + "/v1/im/ws"
        alice = await Client.connect(ws, token("alice"))
        bob = await Client.connect(ws, token("bob"))
        try:
            ack = await alice.send_text(conv_id, "hello from a provisioned tenant")
            assert ack["success"], ack
            event = await bob.next_event("message_created", timeout=20)
            assert event["payload"]["content"] == {"text": "hello from a provisioned tenant"}
            assert event["payload"]["seq"] == ack["data"]["seq"]
        finally:
            await alice.close()
            await bob.close()

        # The message is in acme's schema and nowhere else.
        rows = await asyncio.to_thread(
            env.sql, "SELECT count(*) AS n FROM t_acme.messages WHERE conv_id = $1", conv_id
        )
        assert rows[0]["n"] == 1
        other = await asyncio.to_thread(env.sql, "SELECT count(*) AS n FROM t_globex.messages")
        assert other[0]["n"] == 0
        # The TURN credentials the gateway hands out are made with acme's secret,
        # and coturn accepts them: the operator put that secret in its database.
        (turn_entry,) = [s for s in ice.json()["ice_servers"] if "username" in s]
        assert turn_entry["username"].endswith(":acme:alice")
        relayed = await allocate(env, turn_entry["username"], turn_entry["credential"])
        assert relayed[0] == "127.0.0.1"
    finally:
        for pod in pods:
            pod.stop()


# -- changes, drift, outages ----------------------------------------------------------


def test_partitions_grow_and_observed_generation_follows(env: Env) -> None:
    env.kubectl.run(
        "patch",
        "imt",
        "acme",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        '{"spec":{"kafka":{"partitions":5}}}',
    )
    wait_for("6 partitions", lambda: set(env.partitions("acme").values()) == {5}, 60)

    def followed() -> bool:
        obj = env.tenant("acme") or {}
        status = obj.get("status") or {}
        return bool(
            status.get("observedGeneration") == obj["metadata"]["generation"]
            and status.get("resources", {}).get("topicPartitions") == 5
            and status.get("phase") == "Ready"
        )

    wait_for("observedGeneration to follow", followed, 60)
    gateway = env.kubectl.get("deployment", "imhub-acme-gateway", NS)
    assert gateway is not None
    env_vars = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_vars["IMHUB_BUS_PARTITIONS"]["value"] == "5"


def test_topic_deleted_by_hand_is_recreated(env: Env) -> None:
    admin = env.admin()
    for future in admin.delete_topics(["imhub.acme.im-events"], request_timeout=10).values():
        future.result(15)
    wait_for(
        "the deleted topic to come back",
        lambda: env.partitions("acme").get("imhub.acme.im-events") == 5,
        90,
    )
    events = env.kubectl.json(
        "get", "events", "-n", NS, "--field-selector", "involvedObject.name=acme"
    )["items"]
    assert any(
        e["reason"] == "TopicsCreated"
        and "imhub.acme.im-events" in e["message"]
        and e["message"].count("imhub.acme") == 1
        for e in events
    )


def test_workload_edited_by_hand_is_put_back(env: Env) -> None:
    env.kubectl.run("scale", "deployment", "imhub-acme-gateway", "-n", NS, "--replicas", "7")
    wait_for(
        "replicas to be reset",
        lambda: (
            (env.kubectl.get("deployment", "imhub-acme-gateway", NS) or {})
            .get("spec", {})
            .get("replicas")
            == 2
        ),
        30,
    )


def test_database_outage_is_reported_and_healed(env: Env) -> None:
    env.services.stop("postgres")
    try:
        down = wait_for(
            "Database condition False",
            lambda: (c := env.condition("acme", "Database")) and c["status"] == "False" and c,
            60,
        )
        assert down["reason"] == "DatabaseUnavailable"
        assert "PostgreSQL" in down["message"]
        ready = env.condition("acme", "Ready")
        assert ready is not None and ready["status"] == "False"
        tenant = env.tenant("acme")
        assert tenant is not None and tenant["status"]["phase"] == "Degraded"
        # The other components are still reported as they are.
        topics = env.condition("acme", "Topics")
        assert topics is not None and topics["status"] == "True"
        assert env.operator is not None and env.operator.poll() is None
    finally:
        env.services.start("postgres")
    env.wait_ready("acme", timeout=60)
    warnings = env.kubectl.json(
        "get", "events", "-n", NS, "--field-selector", "involvedObject.name=acme,type=Warning"
    )["items"]
    assert any(e["reason"] == "DatabaseUnavailable" for e in warnings)


# -- refused specs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (
            {"metadata": {"name": "bad-id"}, "spec": {"tenantId": "Bad_Tenant"}},
            "spec.tenantId",
        ),
        (
            {
                "metadata": {"name": "zero"},
                "spec": {"tenantId": "zero", "kafka": {"partitions": 0}},
            },
            "spec.kafka.partitions",
        ),
        (
            {
                "metadata": {"name": "policy"},
                "spec": {"tenantId": "policy", "deletionPolicy": "Drop"},
            },
            "spec.deletionPolicy",
        ),
    ],
    ids=["bad-tenant-id", "zero-partitions", "bad-policy"],
)
def test_invalid_specs_are_refused(env: Env, manifest: dict[str, Any], expected: str) -> None:
    body = {"apiVersion": "imhub.io/v1alpha1", "kind": "ImTenant", **manifest}
    proc = env.kubectl.run("apply", "-n", NS, "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert env.tenant(manifest["metadata"]["name"]) is None


def test_changing_tenant_id_is_refused(env: Env) -> None:
    proc = env.kubectl.run(
        "patch",
        "imt",
        "acme",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        '{"spec":{"tenantId":"acme2"}}',
        check=False,
    )
    assert proc.returncode != 0
    assert "spec.tenantId is immutable" in proc.stderr
    shrink = env.kubectl.run(
        "patch",
        "imt",
        "acme",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        '{"spec":{"kafka":{"partitions":1}}}',
        check=False,
    )
    assert shrink.returncode != 0 and "can only grow" in shrink.stderr
    replication = env.kubectl.run(
        "patch",
        "imt",
        "acme",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        '{"spec":{"kafka":{"replicationFactor":3}}}',
        check=False,
    )
    assert replication.returncode != 0
    assert "kafka.replicationFactor is immutable" in replication.stderr


# -- one tenant id, one owner ---------------------------------------------------------

NS2, NS3 = "imhub-tenants-b", "imhub-tenants-c"


def tenant_manifest(namespace: str, name: str, tenant_id: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "imhub.io/v1alpha1",
            "kind": "ImTenant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"tenantId": tenant_id, **spec},
        }
    )


def condition_in(env: Env, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
    obj = env.kubectl.get("imtenant", name, namespace) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return None


def wait_conflict(env: Env, namespace: str, name: str) -> dict[str, Any]:
    def refused() -> dict[str, Any] | None:
        c = condition_in(env, namespace, name, "Database")
        return c if c and c["reason"] == "TenantIdConflict" else None

    return wait_for(f"{namespace}/{name} refused", refused, 60)


def retention(env: Env, topic: str) -> str:
    admin = env.admin()
    (future,) = admin.describe_configs([ConfigResource("topic", topic)]).values()
    return str(future.result(10)["retention.ms"].value)


def test_duplicate_tenant_id_touches_nothing_of_the_owner(env: Env) -> None:
    for ns in (NS2, NS3):
        env.kubectl.run("create", "namespace", ns, check=False)
    env.kubectl.apply(
        tenant_manifest(
            NS,
            "victim",
            "victim",
            deletionPolicy="Retain",
            kafka={"retentionHours": 24},
            storage={"corsAllowedOrigins": ["https://victim.example"]},
        )
    )
    env.wait_ready("victim")
    turn_secret = env.secret("victim")["turn-secret"]
    # Two duplicates at once, both policies, with other retention and CORS.
    for ns, policy in ((NS2, "Delete"), (NS3, "Retain")):
        env.kubectl.apply(
            tenant_manifest(
                ns,
                "victim",
                "victim",
                deletionPolicy=policy,
                kafka={"retentionHours": 1},
                storage={"corsAllowedOrigins": ["https://evil.example"]},
            )
        )
    for ns in (NS2, NS3):
        wait_conflict(env, ns, "victim")
    time.sleep(7)  # two drift passes of every object

    def untouched() -> None:
        assert retention(env, "imhub.victim.im-events") == str(24 * 3_600_000)
        (rule,) = env.s3_client().get_bucket_cors(Bucket="imhub-victim")["CORSRules"]
        assert rule["AllowedOrigins"] == ["https://victim.example"]
        assert turn_secret in env.turn_secrets()
        role = env.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'imhub_t_victim'")
        assert role[0]["rolcanlogin"] is True
        assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_victim'")
        assert len(env.partitions("victim")) == 3
        assert env.kubectl.get("deployment", "imhub-victim-gateway", NS) is not None
        ready = env.condition("victim", "Ready")
        assert ready is not None and ready["status"] == "True"

    untouched()
    for ns in (NS2, NS3):
        refused = condition_in(env, ns, "victim", "Database")
        assert refused is not None and f"{NS}/victim" in refused["message"]
        topics = condition_in(env, ns, "victim", "Topics")
        assert topics is not None and topics["reason"] == "TenantIdConflict"
    for ns in (NS2, NS3):
        env.kubectl.run("delete", "imt", "victim", "-n", ns, "--wait=true", "--timeout=50s")
        assert env.kubectl.get("secret", "imhub-victim-credentials", ns) is None
    untouched()
    assert env.kubectl.get("secret", "imhub-victim-credentials", NS) is not None


def test_retained_data_is_adopted_only_by_its_own_object(env: Env) -> None:
    before = env.secret("victim")
    env.kubectl.run("delete", "imt", "victim", "-n", NS, "--wait=true", "--timeout=50s")
    comment = env.sql("SELECT obj_description('t_victim'::regnamespace, 'pg_namespace') AS c")
    assert comment[0]["c"] == f"imhub-tenant:retained {NS}/victim"
    env.kubectl.apply(tenant_manifest(NS2, "thief", "victim", deletionPolicy="Delete"))
    refused = wait_conflict(env, NS2, "thief")
    assert f"{NS}/victim" in refused["message"]
    role = env.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'imhub_t_victim'")
    assert role[0]["rolcanlogin"] is False
    env.kubectl.run("delete", "imt", "thief", "-n", NS2, "--wait=true", "--timeout=50s")
    assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_victim'")
    # The same namespace/name adopts it.
    env.kubectl.apply(tenant_manifest(NS, "victim", "victim", deletionPolicy="Retain"))
    env.wait_ready("victim")
    assert env.secret("victim")["jwt-secret"] == before["jwt-secret"]
    role = env.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'imhub_t_victim'")
    assert role[0]["rolcanlogin"] is True


def test_invalid_secret_value_is_regenerated(env: Env) -> None:
    env.kubectl.run(
        "patch",
        "secret",
        "imhub-victim-credentials",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        '{"stringData":{"jwt-secret":"short"}}',
    )
    fixed = wait_for(
        "a valid jwt-secret again",
        lambda: (s := env.secret("victim")) and len(s["jwt-secret"]) >= 32 and s,
        30,
    )
    assert fixed["jwt-secret"] in fixed["tenants.yaml"]
    warnings = env.kubectl.json(
        "get", "events", "-n", NS, "--field-selector", "involvedObject.name=victim,type=Warning"
    )["items"]
    assert any(
        e["reason"] == "SecretRegenerated" and "jwt-secret" in e["message"] for e in warnings
    )
    env.wait_ready("victim")
    env.kubectl.run(
        "patch",
        "imt",
        "victim",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        '{"spec":{"deletionPolicy":"Delete"}}',
    )
    env.kubectl.run("delete", "imt", "victim", "-n", NS, "--wait=true", "--timeout=50s")
    assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_victim'") == []


# -- deletion -------------------------------------------------------------------------


def test_delete_with_delete_policy_removes_everything(env: Env) -> None:
    secret = env.secret("globex")
    env.kubectl.run("delete", "imt", "globex", "-n", NS, "--wait=true", "--timeout=90s")
    assert env.tenant("globex") is None
    assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_globex'") == []
    assert env.sql("SELECT 1 FROM pg_roles WHERE rolname = 'imhub_t_globex'") == []
    wait_for("globex topics gone", lambda: env.partitions("globex") == {}, 30)
    assert not env.bucket_exists("imhub-globex")
    assert secret["turn-secret"] not in env.turn_secrets()
    for kind, name in (
        ("secret", "imhub-globex-credentials"),
        ("deployment", "imhub-globex-gateway"),
        ("service", "imhub-globex-gateway"),
    ):
        assert env.kubectl.get(kind, name, NS) is None, f"{kind}/{name}"


def test_delete_with_retain_keeps_the_data(env: Env) -> None:
    secret = env.secret("acme")
    messages = env.sql("SELECT count(*) AS n FROM t_acme.messages")[0]["n"]
    env.kubectl.run("delete", "imt", "acme", "-n", NS, "--wait=true", "--timeout=90s")
    assert env.tenant("acme") is None

    assert env.sql("SELECT count(*) AS n FROM t_acme.messages")[0]["n"] == messages >= 1
    role = env.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'imhub_t_acme'")
    assert role and role[0]["rolcanlogin"] is False
    assert set(env.partitions("acme")) == {
        "imhub.acme.im-messages",
        "imhub.acme.im-signaling",
        "imhub.acme.im-events",
    }
    assert env.bucket_exists("imhub-acme")
    kept = env.kubectl.get("secret", "imhub-acme-credentials", NS)
    assert kept is not None and not kept["metadata"].get("ownerReferences")
    # Service stops: no workloads, no TURN credential.
    assert env.kubectl.get("deployment", "imhub-acme-gateway", NS) is None
    assert env.kubectl.get("service", "imhub-acme-gateway", NS) is None
    assert secret["turn-secret"] not in env.turn_secrets()


def test_recreated_tenant_gets_its_retained_credentials_back(env: Env) -> None:
    before = env.secret("acme")
    env.kubectl.run("apply", "-n", NS, "-f", str(EXAMPLES / "acme.yaml"))
    env.wait_ready("acme")
    after = env.secret("acme")
    for key in ("jwt-secret", "api-key", "turn-secret", "database-password"):
        assert after[key] == before[key], key
    role = env.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'imhub_t_acme'")
    assert role[0]["rolcanlogin"] is True
    assert after["turn-secret"] in env.turn_secrets()
    env.kubectl.run("delete", "imt", "acme", "-n", NS, "--wait=true", "--timeout=90s")


def test_finalizer_is_removed_even_when_a_backend_is_gone(env: Env) -> None:
    manifest = {
        "apiVersion": "imhub.io/v1alpha1",
        "kind": "ImTenant",
        "metadata": {"name": "initech"},
        "spec": {"tenantId": "initech", "deletionPolicy": "Delete"},
    }
    env.kubectl.run("apply", "-n", NS, "-f", "-", input=json.dumps(manifest))
    env.wait_ready("initech")
    env.services.stop("s3")
    try:
        env.kubectl.run("delete", "imt", "initech", "-n", NS, "--wait=true", "--timeout=90s")
        assert env.tenant("initech") is None
        warnings = env.kubectl.json(
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            "involvedObject.name=initech,type=Warning",
        )["items"]
        incomplete = [e for e in warnings if e["reason"] == "CleanupIncomplete"]
        assert incomplete and "imhub-initech" in incomplete[-1]["message"]
        # Everything reachable was still cleaned up.
        assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_initech'") == []
        assert env.kubectl.get("secret", "imhub-initech-credentials", NS) is None
    finally:
        env.services.start("s3")
    assert env.operator is not None and env.operator.poll() is None


def test_tenant_deleted_while_database_down_can_be_applied_again(env: Env) -> None:
    manifest = tenant_manifest(NS, "hooli", "hooli", deletionPolicy="Delete")
    env.kubectl.apply(manifest)
    env.wait_ready("hooli")
    env.services.stop("postgres")
    try:
        env.kubectl.run("delete", "imt", "hooli", "-n", NS, "--wait=true", "--timeout=50s")
        warnings = env.kubectl.json(
            "get", "events", "-n", NS, "--field-selector", "involvedObject.name=hooli,type=Warning"
        )["items"]
        (incomplete,) = [e for e in warnings if e["reason"] == "CleanupIncomplete"]
        assert "NOT done: drop schema t_hooli" in incomplete["message"]
        assert "dropped" not in incomplete["message"]
    finally:
        env.services.start("postgres")
    assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_hooli'")
    # The same namespace/name takes over the claim its deleted predecessor left.
    env.kubectl.apply(manifest)
    env.wait_ready("hooli")
    env.kubectl.run("delete", "imt", "hooli", "-n", NS, "--wait=true", "--timeout=50s")
    assert env.sql("SELECT 1 FROM pg_namespace WHERE nspname = 't_hooli'") == []
