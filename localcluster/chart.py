"""The operator's Helm chart installed on the local control plane as a platform team would, and its identity.

``helm template … | kubectl apply`` installs the CRDs (through the real apiextensions server), the ServiceAccount
and the RBAC. The chart's Deployment is rendered at zero replicas: this machine has no container runtime, so the
operator runs as a local process instead, with a token of the chart's ServiceAccount (TokenRequest), so it has
exactly the chart's permissions and never the admin's.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from localcluster.controlplane import ControlPlane, ControlPlaneError

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "finetune-operator"
HELM = REPO / ".cache" / "tools" / "helm"
RELEASE = "ftj"
OPERATOR_NAMESPACE = "finetune-system"
# "<release>-finetune-operator", the chart's fullname.
OPERATOR_SERVICE_ACCOUNT = f"{RELEASE}-finetune-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"


def helm_binary() -> str:
    if HELM.exists():
        return str(HELM)
    found = shutil.which("helm")
    if found is None:
        raise ControlPlaneError(f"helm is not installed: run `scripts/install-helm {HELM.parent}` (make does)")
    return found


def render_chart(values: Sequence[str] = (), api_versions: Sequence[str] = ()) -> str:
    """The chart's manifests (CRDs included) with ``--set`` values, its Deployment at zero replicas, for a cluster
    that serves ``api_versions`` besides the built-in ones (``kueue.x-k8s.io/v1beta2`` where Kueue is installed)."""
    rendered = subprocess.run(
        [helm_binary(), "template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--include-crds",
         "--set", "replicaCount=0", *[arg for value in values for arg in ("--set", value)],
         *[arg for version in api_versions for arg in ("--api-versions", version)]],
        capture_output=True, text=True, timeout=120,
    )
    if rendered.returncode != 0:
        raise ControlPlaneError(f"helm template failed: {rendered.stderr.strip()}")
    return rendered.stdout


def install_chart(plane: ControlPlane, kubeconfig: Path, values: Sequence[str] = (),
                  namespace: str = "default", api_versions: Sequence[str] = ()) -> Path:
    """Apply the chart as admin, wait for the CRD, and write ``kubeconfig`` for the operator's ServiceAccount
    (its default namespace ``namespace``)."""
    plane.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    plane.kubectl("apply", "--server-side", "-f", "-", input=render_chart(values, api_versions))
    plane.wait_for_crds("finetunejobs.finetune.dev")
    token = plane.kubectl("create", "token", OPERATOR_SERVICE_ACCOUNT, "-n", OPERATOR_NAMESPACE,
                          "--duration=24h").strip()
    return plane.token_kubeconfig(kubeconfig, token, namespace=namespace)
