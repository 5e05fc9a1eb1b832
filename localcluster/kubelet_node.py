"""The Node a process kubelet registers, and the heartbeats that keep it Ready: its Lease in ``kube-node-lease``
(every 10 s; the node-lifecycle controller taints and evicts a node whose Lease runs out) and its status (every
60 s: capacity, conditions, addresses, the kubelet's endpoint for logs)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from localcluster.kubelet_api import APIStatusError, KubeAPI
from localcluster.kubelet_pods import GPU_RESOURCE, Resources, format_quantity, now_iso

logger = logging.getLogger(__name__)

LEASE_DURATION_S = 40
LEASE_RENEW_S = 10.0
NODE_STATUS_S = 60.0
NODE_LEASE_NAMESPACE = "kube-node-lease"


class NodeAgent:
    """One Node of the API server, as its kubelet keeps it: registered, leased, reported."""

    def __init__(
        self,
        api: KubeAPI,
        name: str,
        *,
        labels: Mapping[str, str],
        taints: Sequence[Mapping[str, Any]],
        capacity: Resources,
        gpus: int,
        version: str,
        work_dir: Path,
        kubelet_port: Callable[[], int],
    ) -> None:
        self.api = api
        self.name = name
        self.labels = dict(labels)
        self.taints = [dict(taint) for taint in taints]
        self.capacity = capacity
        self.gpus = gpus
        self.version = version
        self.work_dir = work_dir
        self.kubelet_port = kubelet_port
        self._conditions: list[dict[str, Any]] = []
        self._uid = ""

    def status(self) -> dict[str, Any]:
        now = now_iso()
        quantities = {
            "cpu": format_quantity("cpu", self.capacity["cpu"]),
            "memory": f"{int(self.capacity['memory'] / 1024)}Ki",
            GPU_RESOURCE: str(self.gpus),
            "pods": "250",
            "ephemeral-storage": f"{shutil.disk_usage(self.work_dir).total // 1024}Ki",
        }
        previous = {c["type"]: c for c in self._conditions}
        conditions = []
        for kind, status, reason, message in (
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ):
            same = previous.get(kind, {}).get("status") == status
            transition = previous[kind]["lastTransitionTime"] if same else now
            conditions.append({"type": kind, "status": status, "reason": reason, "message": message,
                               "lastHeartbeatTime": now, "lastTransitionTime": transition})
        self._conditions = conditions
        return {
            "capacity": quantities,
            "allocatable": quantities,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.name}],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": self.version,
                "containerRuntimeVersion": "local-process://1", "kernelVersion": os.uname().release,
                "osImage": "local processes", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                "bootID": "",
            },
            # Where the API server reaches this kubelet for logs.
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port()}},
        }

    async def register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {"taints": self.taints} if self.taints else {},
        }
        path = f"/api/v1/nodes/{self.name}"
        try:
            created = await self.api.create("/api/v1/nodes", node)
        except APIStatusError as error:
            if error.status != 409:
                raise
            # Registered before (a restarted kubelet): NodeRestriction lets a node change its labels, not taints.
            created = await self.api.merge_patch(path, {"metadata": {"labels": self.labels}}) or {}
        self._uid = str(created.get("metadata", {}).get("uid", ""))
        await self.api.merge_patch(path + "/status", {"status": self.status()})
        await self.renew_lease()

    async def renew_lease(self) -> None:
        """Create or renew the node's Lease: the heartbeat the node-lifecycle controller reads."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": now}
        if await self.api.merge_patch(f"{path}/{self.name}", {"spec": spec}) is not None:
            return
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self._uid}
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.name, "namespace": NODE_LEASE_NAMESPACE, "ownerReferences": [owner]},
                 "spec": spec}
        with contextlib.suppress(APIStatusError):  # a 409 means another renewal won the race, which is as good
            await self.api.create(path, lease)

    async def renew_lease_forever(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self.renew_lease()
            except Exception as error:  # the next renewal tries again, well inside the lease's duration
                logger.warning("node lease not renewed: %r", error)

    async def report_status_forever(self) -> None:
        while True:
            await asyncio.sleep(NODE_STATUS_S)
            try:
                await self.api.merge_patch(f"/api/v1/nodes/{self.name}/status",
                                            {"status": self.status()})
            except Exception as error:  # the next report tries again
                logger.warning("node status not reported: %r", error)
