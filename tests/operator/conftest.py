"""Fixtures for the operator tests: a real kube-apiserver and its tools.

``cluster`` runs ``scripts/cluster up --dir D`` once per session (etcd and
kube-apiserver on loopback, built from Go modules on first use) and stops it at
the end. There is no kubelet: objects are stored and validated, pods never run.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.realservices import REPO, parse_env

CLUSTER_SCRIPT = REPO / "scripts" / "cluster"


class Kubectl:
    """The cluster's own kubectl, pointed at its kubeconfig."""

    def __init__(self, binary: str, kubeconfig: str, *, context: str | None = None) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.context = context

    def run(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, "--kubeconfig", self.kubeconfig]
        if self.context:
            cmd += ["--context", self.context]
        proc = subprocess.run(
            [*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str, namespace: str) -> Any | None:
        proc = self.run("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)

    def apply(self, manifest: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", input=manifest, check=check)


class Cluster:
    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.env = env
        self.dir = directory
        self.kubeconfig = env["KUBECONFIG"]
        self.kubectl = Kubectl(env["KUBECTL"], self.kubeconfig)
        self.helm_binary = env["HELM"]

    def helm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.helm_binary, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                **os.environ,
                "HELM_CACHE_HOME": str(self.dir / "helm-cache"),
                "HELM_CONFIG_HOME": str(self.dir / "helm-config"),
                "HELM_DATA_HOME": str(self.dir / "helm-data"),
            },
        )
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def operator_kubeconfig(self) -> str:
        """A kubeconfig whose current context is the unprivileged ``imhub-operator`` user."""
        path = self.dir / "operator.kubeconfig"
        text = Path(self.kubeconfig).read_text()
        path.write_text(
            text.replace("current-context: imhub-local", "current-context: imhub-operator")
        )
        path.chmod(0o600)
        return str(path)


def _cluster_cmd(action: str, directory: Path, timeout: float) -> str:
    proc = subprocess.run(
        [str(CLUSTER_SCRIPT), action, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/cluster {action} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver for the session (builds the binaries on first use)."""
    directory = tmp_path_factory.mktemp("cluster")
    # A cold build of kube-apiserver takes minutes; later runs reuse the cache.
    env = parse_env(_cluster_cmd("up", directory, timeout=3600))
    try:
        yield Cluster(env, directory)
    finally:
        _cluster_cmd("down", directory, timeout=120)


def manifests(text: str) -> list[dict[str, Any]]:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: Sequence[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"].endswith(name_suffix):
            return doc
    raise AssertionError(f"no {kind} *{name_suffix} in {[d['kind'] for d in docs]}")
