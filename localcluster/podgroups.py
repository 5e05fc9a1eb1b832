"""The gang schedulers' PodGroup CRDs (Volcano's and scheduler-plugins' coscheduling) on the local control plane.

Only the CRDs (and Volcano's Queue, which its PodGroups wait in): no Volcano or scheduler-plugins scheduler runs
here. ``scripts/fetch-podgroup-crds`` takes them from the schedulers' Go modules into ``.cache/podgroup-crds/<key>/``
once (Volcano's generated from its API types).

    with ControlPlane(work) as plane:
        install_podgroup_crds(plane)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from localcluster.controlplane import ControlPlane, ControlPlaneError

REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch-podgroup-crds"
CRDS = ("podgroups.scheduling.volcano.sh", "queues.scheduling.volcano.sh", "podgroups.scheduling.x-k8s.io")
ESTABLISH_TIMEOUT_S = 60.0


def podgroup_crds() -> Path:
    """The folder holding both PodGroup CRDs, fetched now if this checkout never fetched them."""
    result = subprocess.run([str(FETCH_SCRIPT)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{FETCH_SCRIPT} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return REPO / result.stdout.strip().splitlines()[-1]


def install_podgroup_crds(plane: ControlPlane) -> None:
    """Both PodGroup CRDs and Volcano's Queue CRD applied and established."""
    plane.kubectl("apply", "--server-side", "-f", str(podgroup_crds()))
    plane.wait_for_crds(*CRDS, timeout=ESTABLISH_TIMEOUT_S)
