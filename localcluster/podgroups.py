"""The gang schedulers' PodGroup CRDs (Volcano's and scheduler-plugins' coscheduling) on the local control plane.

Only the CRDs (and Volcano's Queue, which its PodGroups wait in): no Volcano or scheduler-plugins scheduler runs
here. ``scripts/fetch-podgroup-crds`` takes them from the schedulers' Go modules into ``.cache/podgroup-crds/<key>/``
once (Volcano's generated from its API types).

    with ControlPlane(work) as plane:
        install_podgroup_crds(plane)
"""

from __future__ import annotations

import json
import subprocess
import time
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
    deadline = time.monotonic() + ESTABLISH_TIMEOUT_S
    for crd in CRDS:
        # `kubectl wait` fails outright on a CRD whose status the API server has not written yet.
        while not _established(plane, crd):
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {crd} was not established in {ESTABLISH_TIMEOUT_S:.0f} s")
            time.sleep(0.2)


def _established(plane: ControlPlane, crd: str) -> bool:
    found = json.loads(plane.kubectl("get", f"crd/{crd}", "-o", "json"))
    conditions = (found.get("status") or {}).get("conditions") or []
    return any(item.get("type") == "Established" and item.get("status") == "True" for item in conditions)
