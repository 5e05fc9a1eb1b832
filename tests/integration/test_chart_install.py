"""The Helm chart applied to the real API server with kubectl, and the operator run with the chart's settings and
its ServiceAccount's token: namespace-scoped RBAC is enough, and a namespace it does not list is left alone."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from localcluster.controlplane import ControlPlane
from localcluster.operator_process import OperatorProcess
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
HELM = ROOT / ".cache" / "tools" / "helm"
RELEASE = "ftj"
SYSTEM_NS = "finetune-system"
TEAM_NS = "team-a"


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        subprocess.run([str(ROOT / "scripts" / "install-helm"), str(HELM.parent)], check=True)
    return HELM


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    # No scheduler and no kubelet: the test checks what the operator creates, not what runs.
    with ControlPlane(tmp_path / "control-plane", scheduler=False) as control_plane:
        yield control_plane


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "kc-cache"), *args],
        input=input, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_chart_applies_and_its_operator_settings_reconcile_a_job(helm: Path, plane: ControlPlane,
                                                                  tmp_path: Path) -> None:
    kubeconfig = plane.admin_kubeconfig
    for ns in (SYSTEM_NS, TEAM_NS):
        kubectl(kubeconfig, "create", "namespace", ns)
    wait_until(lambda: kubectl(kubeconfig, "get", "serviceaccount", "default", "-n", TEAM_NS, "--ignore-not-found"))
    rendered = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--include-crds",
         "--set", f"watchNamespaces={{{TEAM_NS}}}", "--set", "rbac.scope=namespace"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    applied = kubectl(kubeconfig, "apply", "-f", "-", input=rendered)
    assert "customresourcedefinition.apiextensions.k8s.io/finetunejobs.finetune.dev created" in applied
    assert "deployment.apps/ftj-finetune-operator created" in applied, applied
    assert "serviceaccount/ftj-finetune-operator created" in applied
    assert "role.rbac.authorization.k8s.io/" in applied and "rolebinding.rbac.authorization.k8s.io/" in applied

    # Run the operator exactly as the chart's Deployment would: its command, args, environment and ServiceAccount.
    token = kubectl(kubeconfig, "create", "token", "ftj-finetune-operator", "-n", SYSTEM_NS).strip()
    operator_kubeconfig = plane.token_kubeconfig(tmp_path / "operator.kubeconfig", token)
    deployment = json.loads(kubectl(kubeconfig, "get", "deployment", "-n", SYSTEM_NS, "-o", "json",
                                    "ftj-finetune-operator"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    chart_env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    assert chart_env["FINETUNE_NAMESPACES"] == TEAM_NS
    operator = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log", args=container.get("args", []),
                               env=chart_env)
    operator.start()
    try:
        job = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
        job["metadata"]["namespace"] = TEAM_NS
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(job))
        pods = wait_until(lambda: json.loads(kubectl(kubeconfig, "get", "pods", "-n", TEAM_NS, "-o", "json"))["items"])
        assert [p["metadata"]["name"] for p in pods] == ["tiny-cpu-a0-n0"]
        image = pods[0]["spec"]["containers"][0]["image"]
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        assert image.startswith(values["trainer"]["image"]["repository"])
        # A job in a namespace the chart does not list is left alone.
        other = {**job, "metadata": {"name": "elsewhere", "namespace": "default"}}
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(other))
        # A job applied after it in the watched namespace gets its pods: the operator has handled what came later.
        later = {**job, "metadata": {"name": "later", "namespace": TEAM_NS}}
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(later))
        wait_until(lambda: kubectl(kubeconfig, "get", "pod", "later-a0-n0", "-n", TEAM_NS, "--ignore-not-found"),
                   what="the later job's pod")
        assert json.loads(kubectl(kubeconfig, "get", "pods", "-n", "default", "-o", "json"))["items"] == []
    finally:
        operator.stop()
