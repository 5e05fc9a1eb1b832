"""The real operator across broken watches on the real control plane: jobs deleted or edited while its connections
were down, and history compacted away meanwhile (410 Gone, so kopf relists).

The operator reaches the API server through a proxy the tests cut. The API server runs without a watch cache, so a
watch resumed from a revision that etcd compacted is refused with 410 at once, as a long disconnection in a busy
cluster would be.
"""

from __future__ import annotations

import json
import pathlib
import re
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from test_operator import Client, phase_is, pods_are, settled

from localcluster.chart import install_chart
from localcluster.controlplane import ControlPlane
from localcluster.operator_process import OperatorProcess
from localcluster.pytest_plugin import wait_until
from localcluster.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

Plane = tuple[ControlPlane, TcpProxy, pathlib.Path]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """A control plane without watch cache or scheduler, the chart installed, and the operator's kubeconfig naming
    the proxy in front of the API server."""
    work = tmp_path_factory.mktemp("watch-gaps")
    with ControlPlane(work / "control-plane", scheduler=False, watch_cache=False) as control_plane, \
            TcpProxy(control_plane.port) as proxy:
        kubeconfig = install_chart(control_plane, work / "operator.kubeconfig")
        config = yaml.safe_load(kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        kubeconfig.write_text(yaml.safe_dump(config))
        yield control_plane, proxy, kubeconfig


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: Plane) -> pathlib.Path:
    return plane[2]


@pytest.fixture
def client(plane: Plane, operator: OperatorProcess) -> Iterator[Client]:
    yield Client(plane[0])
    plane[1].restore()
    if not operator.running:
        pytest.fail(f"the operator died:\n{operator.log_tail()}")


def jobs_in_phase(operator: OperatorProcess, phase: str) -> int:
    """The operator's ``finetune_operator_jobs`` gauge for one phase: the jobs it remembers in that phase."""
    found = re.search(rf'^finetune_operator_jobs{{phase="{phase}"}} (\S+)$', operator.metrics(), re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def pods_added_since(plane: ControlPlane, ns: str, resource_version: int) -> list[str]:
    """The names of pods created in a namespace after a resourceVersion: a watch from it replays etcd's history
    (kept since the compaction) and the server ends it after two seconds."""
    url = f"{plane.url}/api/v1/namespaces/{ns}/pods?watch=1&resourceVersion={resource_version}&timeoutSeconds=2"
    with urllib.request.urlopen(url, timeout=30, context=plane.admin_tls) as response:
        events = [json.loads(line) for line in response if line.strip()]
    return [event["object"]["metadata"]["name"] for event in events if event["type"] == "ADDED"]


def test_a_job_deleted_while_the_watch_was_broken_is_forgotten_and_gets_no_children(
    client: Client, plane: Plane, operator: OperatorProcess
) -> None:
    control_plane, proxy, _ = plane
    ns = client.create_namespace()
    for name in ("kept", "doomed", "done"):
        client.create_job(ns, name)
    wait_until(lambda: len(client.pod_names(ns)) == 6, what="three gangs")
    client.run_pod(ns, "done-a0-n0")
    client.run_pod(ns, "done-a0-n1")
    client.end_pod(ns, "done-a0-n0", 0)
    wait_until(phase_is(client, ns, "done", "Succeeded"), what="done to succeed")
    wait_until(phase_is(client, ns, "doomed", "Pending"))
    pending = wait_until(lambda: jobs_in_phase(operator, "Pending"), what="the jobs gauge")
    succeeded = jobs_in_phase(operator, "Succeeded")
    assert succeeded >= 1

    proxy.cut()
    client.delete_job(ns, "doomed")
    client.delete_job(ns, "done")
    # The garbage collector removes doomed's gang: a reconcile from memory would see it missing and recreate it.
    wait_until(pods_are(client, ns, ["kept-a0-n0", "kept-a0-n1"]), what="the deleted jobs' pods to go")
    revision = control_plane.compact_etcd()
    proxy.restore()
    wait_until(lambda: "Restarting the watch-stream for finetunejobs" in operator.log.read_text(), timeout=60,
               what="kopf to be told 410 Gone and relist the jobs")
    wait_until(lambda: (jobs_in_phase(operator, "Pending"), jobs_in_phase(operator, "Succeeded"))
               == (pending - 1, succeeded - 1), timeout=30, what="both deleted jobs forgotten, metrics too")
    settled(operator, ns, "kept")
    client.create_job(ns, "after")
    wait_until(pods_are(client, ns, ["after-a0-n0", "after-a0-n1", "kept-a0-n0", "kept-a0-n1"]),
               what="the next job's gang: the operator works on")
    added = pods_added_since(control_plane, ns, revision)
    # The two ranks' pods are created concurrently, so in either order.
    assert sorted(added) == ["after-a0-n0", "after-a0-n1"], "no pod for the deleted job, ever, since its deletion"
    assert client.pod_names(ns) == ["after-a0-n0", "after-a0-n1", "kept-a0-n0", "kept-a0-n1"]
    assert operator.healthy()


def test_an_edit_made_while_the_connections_were_down_is_acted_on_when_they_return(
    client: Client, plane: Plane
) -> None:
    _, proxy, _ = plane
    ns = client.create_namespace()
    client.create_job(ns, "paused")
    wait_until(pods_are(client, ns, ["paused-a0-n0", "paused-a0-n1"]), what="the gang")
    proxy.cut()
    client.patch_job(ns, "paused", {"spec": {"suspend": True}})
    proxy.restore()
    wait_until(phase_is(client, ns, "paused", "Suspended"), timeout=60, what="Suspended after the reconnection")
    wait_until(pods_are(client, ns, []), what="the gang deleted")
