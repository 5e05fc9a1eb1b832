"""spec.queueName and spec.gang where Kueue or a gang scheduler cannot be used, on the real control plane with the
real operator and the chart's RBAC rendered for a cluster without either.

First no Workload or PodGroup CRD at all: the authorizer refuses the operator's request (403) before the API server
looks for the resource, and discovery says the API is not served, so the job fails naming the missing CRD; with
kueue.enabled the request is allowed and answered 404 without naming a Workload, with the same outcome. Then
Kueue's CRDs installed after the chart (which granted nothing on them): a plain 403, and the message names the
chart value. Either way the job fails at once with a reason of its own, creates no pod, and the operator runs on.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import Client, events_are, phase_is

from localcluster.chart import install_chart, render_chart
from localcluster.controlplane import ControlPlane, ControlPlaneError
from localcluster.kueue import Kueue
from localcluster.operator_process import OperatorProcess
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, pathlib.Path, pathlib.Path]]:
    """The control plane without Kueue and the chart rendered for it (no Kueue rules)."""
    work = tmp_path_factory.mktemp("nokueue")
    with ControlPlane(work / "control-plane", scheduler=False) as control_plane:
        yield control_plane, install_chart(control_plane, work / "operator.kubeconfig"), work


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: tuple[ControlPlane, pathlib.Path, pathlib.Path]) -> pathlib.Path:
    return plane[1]


@pytest.fixture
def client(plane: tuple[ControlPlane, pathlib.Path, pathlib.Path], operator: OperatorProcess) -> Iterator[Client]:
    yield Client(plane[0])
    if not operator.running:
        pytest.fail(f"the operator died:\n{operator.log_tail()}")


def failed_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(item for item in status["conditions"] if item["type"] == "Failed")


def test_without_the_workload_crd_a_queued_job_fails_naming_it_and_creates_no_pod(client: Client) -> None:
    ns = client.create_namespace()
    client.create_job(ns, "llm", queueName="team")
    status = wait_until(phase_is(client, ns, "llm", "Failed"), what="Failed")
    assert failed_condition(status)["reason"] == "WorkloadAPIUnavailable"
    assert "the CRD workloads.kueue.x-k8s.io is not installed" in status["message"], status["message"]
    assert client.pod_names(ns) == []
    events_are(client, ns, "llm", ["WorkloadAPIUnavailable"])


def test_without_pod_group_crds_or_their_switch_a_gang_job_fails_naming_the_crd(client: Client) -> None:
    """The chart without gangScheduling.volcano: the API server refuses the PodGroup list (403) before it looks
    for the resource; the message still says that the CRD is missing, from discovery."""
    ns = client.create_namespace()
    client.create_job(ns, "llm", gang={"scheduler": "volcano"})
    status = wait_until(phase_is(client, ns, "llm", "Failed"), what="Failed")
    assert failed_condition(status)["reason"] == "PodGroupAPIUnavailable"
    assert "the CRD podgroups.scheduling.volcano.sh is not installed" in status["message"], status["message"]
    assert client.pod_names(ns) == []


def operator_answer(plane: tuple[ControlPlane, pathlib.Path, pathlib.Path], path: str) -> str:
    """What the API server answers the operator's ServiceAccount for a GET of ``path``."""
    try:
        return plane[0].kubectl("get", "--raw", path, kubeconfig=plane[1])
    except ControlPlaneError as error:
        return str(error)


def grant_kueue(plane: ControlPlane, enabled: bool) -> None:
    """The chart applied again, with or without kueue.enabled (its ClusterRole's rules are replaced whole)."""
    plane.kubectl("apply", "--server-side", "-f", "-", input=render_chart((f"kueue.enabled={str(enabled).lower()}",)))


def test_with_the_kueue_rules_but_no_crd_the_api_server_answers_404_and_the_job_names_the_crd(
    client: Client, plane: tuple[ControlPlane, pathlib.Path, pathlib.Path]
) -> None:
    grant_kueue(plane[0], True)
    ns = client.create_namespace()
    path = f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads/finetunejob-llm"
    answer = wait_until(lambda: "(NotFound)" in (text := operator_answer(plane, path)) and text,
                        what="the operator's request allowed and answered 404")
    assert "the server could not find the requested resource" in answer, answer
    client.create_job(ns, "llm", queueName="team")
    status = wait_until(phase_is(client, ns, "llm", "Failed"), what="Failed")
    assert failed_condition(status)["reason"] == "WorkloadAPIUnavailable"
    assert "the CRD workloads.kueue.x-k8s.io is not installed" in status["message"], status["message"]
    assert client.pod_names(ns) == []


def test_with_kueue_installed_after_the_chart_a_queued_job_fails_naming_the_chart_value(
    client: Client, plane: tuple[ControlPlane, pathlib.Path, pathlib.Path]
) -> None:
    """Last in this module: it installs Kueue's CRDs (no manager) on the shared control plane."""
    grant_kueue(plane[0], False)
    Kueue(plane[0], plane[2] / "kueue").install_crds()
    ns = client.create_namespace()
    client.create_job(ns, "llm", queueName="team")
    status = wait_until(phase_is(client, ns, "llm", "Failed"), what="Failed")
    assert failed_condition(status)["reason"] == "WorkloadAPIUnavailable"
    assert "may not use workloads.kueue.x-k8s.io (HTTP 403)" in status["message"], status["message"]
    assert "kueue.enabled=true" in status["message"]
    assert client.pod_names(ns) == []
    events_are(client, ns, "llm", ["WorkloadAPIUnavailable"])
