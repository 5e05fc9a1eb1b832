"""Rendering the Helm chart for its tests: helm template with a value set, parsed, and pickers for the objects."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
TOOLS = ROOT / ".cache" / "tools"
RELEASE = "ftj"
NAMESPACE = "ml-platform"
FULLNAME = "ftj-finetune-operator"
# The oldest Kubernetes the chart is validated against; kubernetes-validate carries schemas for 1.28 and later.
KUBE_VERSION = "1.30"
# Kinds defined by CRDs (Prometheus Operator, kopf): kubernetes-validate has no schema for them.
CRD_API_GROUPS = {"monitoring.coreos.com", "kopf.dev"}

TRAINER_METRICS = {
    "finetune_train_loss",
    "finetune_eval_loss",
    "finetune_tokens_per_second",
    "finetune_step",
    "finetune_total_steps",
    "finetune_learning_rate",
}
OPERATOR_METRICS = {
    "finetune_operator_jobs",
    "finetune_operator_jobs_restarted_total",
    "finetune_operator_jobs_failed_total",
    "finetune_operator_reconcile_seconds",
}

Doc = dict[str, Any]

# Value sets the chart must render into valid objects (the "when X is set" of each test below).
SCENARIOS: dict[str, list[str]] = {
    "defaults": [],
    "namespace-scoped RBAC": ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}"],
    "cluster RBAC watching all namespaces": ["--set", "rbac.scope=cluster"],
    "cluster RBAC watching listed namespaces": ["--set", "watchNamespaces={team-a}"],
    "replicas 3": ["--set", "replicaCount=3"],
    "replicas 3 namespace-scoped": ["--set", "replicaCount=3", "--set", "rbac.scope=namespace"],
    "monitoring on": [
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "podMonitor.enabled=true",
        "--set", "prometheusRule.enabled=true",
    ],
    "networkPolicy on": ["--set", "networkPolicy.enabled=true"],
    "networkPolicy on, listed namespaces": [
        "--set", "networkPolicy.enabled=true", "--set", "watchNamespaces={team-a,team-b}",
        "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
    ],
    "everything on": [
        "--set", "replicaCount=2",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "podMonitor.enabled=true",
        "--set", "prometheusRule.enabled=true",
        "--set", "networkPolicy.enabled=true",
        "--set", "priorityClassName=system-cluster-critical",
        "--set", "imagePullSecrets[0].name=regcred",
        "--set", "nodeSelector.kubernetes\\.io/os=linux",
        "--set", "tolerations[0].key=dedicated,tolerations[0].operator=Equal,tolerations[0].value=system",
        "--set", "tolerations[0].effect=NoSchedule",
        "--set", "podAnnotations.example\\.com/team=ml",
        "--set", "podLabels.team=ml",
    ],
}


@functools.cache
def template(helm: Path, args: tuple[str, ...]) -> tuple[int, str, str]:
    proc = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", f"{KUBE_VERSION}.0",
         *args],
        capture_output=True, text=True, timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


def render(helm: Path, *args: str) -> list[Doc]:
    """helm template with these arguments, parsed; a failed render fails the test with helm's message."""
    rc, out, err = template(helm, tuple(args))
    assert rc == 0, err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [doc for doc in of_kind(docs, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_container(docs: list[Doc]) -> Doc:
    deployment = one(docs, "Deployment")
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def env_of(docs: list[Doc]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in operator_container(docs)["env"]}
