"""Prometheus on the local cluster: it scrapes pods found through the kubelet's file_sd, static targets, pushes."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server

from localcluster.controlplane import ControlPlane
from localcluster.kubelet import Kubelet
from localcluster.prometheus import Prometheus, Pushgateway, prometheus_available, pushgateway_available
from localcluster.seaweedfs import free_ports

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not prometheus_available(), reason="Debian's prometheus binary is not installed"),
]


@pytest.fixture(scope="module")
def kubelet_and_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kubelet, client.CoreV1Api]]:
    work = tmp_path_factory.mktemp("prometheus-cluster")
    with ControlPlane(work / "control-plane") as plane:
        with Kubelet(plane.url, plane.node_credentials("localnode"), work / "node") as kubelet:
            core = client.CoreV1Api(config.new_client_from_config(str(plane.admin_kubeconfig)))
            plane.kubectl("wait", "--for=create", "serviceaccount/default", "--timeout=60s")
            yield kubelet, core


EXPORTER = """
    import os, time
    from prometheus_client import Gauge, start_http_server
    Gauge("finetune_train_loss", "training loss", ["rank"]).labels(rank="0").set(0.25)
    # A pod binds its own address: pods share the node's network namespace here.
    start_http_server(int(os.environ["PORT"]), addr=os.environ["POD_IP"])
    print("serving", flush=True)
    time.sleep(600)
"""


def test_prometheus_scrapes_a_pods_metrics_endpoint(
    kubelet_and_core: tuple[Kubelet, client.CoreV1Api], tmp_path: Path
) -> None:
    kubelet, core = kubelet_and_core
    (port,) = free_ports(1)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "trainer-n0",
            "labels": {"finetune.dev/job-name": "demo", "finetune.dev/node-rank": "0"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "trainer",
                "image": "trainer",
                "command": ["python", "-c", textwrap.dedent(EXPORTER)],
                "env": [{"name": "PORT", "value": str(port)},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            }],
        },
    }
    core.create_namespaced_pod("default", pod)
    try:
        with Prometheus(tmp_path / "prometheus", file_sd_files=[kubelet.file_sd_path]) as prometheus:
            result = prometheus.wait_for('finetune_train_loss{pod="trainer-n0"}', timeout=30)

        labels = result[0]["metric"]
        assert float(result[0]["value"][1]) == 0.25
        assert labels["namespace"] == "default"
        assert labels["finetune_dev_job_name"] == "demo"
        assert labels["finetune_dev_node_rank"] == "0"
        assert labels["instance"] == f"{kubelet.pod_ip('default', 'trainer-n0')}:{port}"
    finally:
        core.delete_namespaced_pod("trainer-n0", "default", grace_period_seconds=0)


def test_prometheus_scrapes_static_targets_like_the_operator(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Gauge("finetune_operator_jobs", "jobs by phase", ["phase"], registry=registry).labels(phase="Running").set(3)
    (port,) = free_ports(1)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with Prometheus(tmp_path / "prometheus", static_targets=[f"127.0.0.1:{port}"]) as prometheus:
            result = prometheus.wait_for('finetune_operator_jobs{phase="Running"}', timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    assert result[0]["metric"]["job"] == "finetune-operator"
    assert float(result[0]["value"][1]) == 3


@pytest.mark.skipif(not pushgateway_available(), reason="Debian's prometheus-pushgateway is not installed")
def test_pushed_final_metrics_outlive_the_pusher(tmp_path: Path) -> None:
    with Pushgateway(tmp_path / "pushgateway") as gateway, Prometheus(
        tmp_path / "prometheus", pushgateway=gateway.address
    ) as prometheus:
        registry = CollectorRegistry()
        Gauge("finetune_final_loss", "final loss", registry=registry).set(0.125)
        push_to_gateway(gateway.address, job="demo", registry=registry,
                        grouping_key={"namespace": "default", "attempt": "0"})

        result = prometheus.wait_for("finetune_final_loss", timeout=30)

    assert float(result[0]["value"][1]) == 0.125
    assert result[0]["metric"]["job"] == "demo", "honor_labels keeps the pusher's job label"
    assert result[0]["metric"]["attempt"] == "0"
