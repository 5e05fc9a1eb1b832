"""Client.logs once a job's pods are gone, on the real API server and SeaweedFS: the copy each node's launcher
uploads is read instead, the latest stored attempt by default, and a clear error when neither exists."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_client import Client, LogNotFound
from finetune_client.schema import GROUP, PLURAL, VERSION
from localcluster.controlplane import ControlPlane
from localcluster.seaweedfs import SeaweedFS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The API server with the CRD and no operator or kubelet: no job here ever has a pod."""
    with ControlPlane(tmp_path_factory.mktemp("logs") / "control-plane", scheduler=False) as started:
        started.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "finetune.dev_finetunejobs.yaml"))
        started.wait_for_crds("finetunejobs.finetune.dev")
        yield started


@pytest.fixture
def client(plane: ControlPlane, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> Client:
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    return Client(kubeconfig=plane.admin_kubeconfig)


def job_with_stored_logs(client: Client, seaweedfs: SeaweedFS, bucket: str, name: str,
                         status: dict[str, Any], stored: dict[int, str]) -> None:
    """A job whose status says ``status`` and whose launchers stored node 0's log of each attempt in ``stored``."""
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"]["output"]["uri"] = f"s3://{bucket}/{name}"
    client.create(manifest)
    client.custom.patch_namespaced_custom_object_status(GROUP, VERSION, client.namespace, PLURAL, name,
                                                        {"status": status})
    for attempt, text in stored.items():
        seaweedfs.client().put_object(Bucket=bucket, Key=f"{name}/logs/attempt-{attempt}/node-0.log",
                                      Body=text.encode())


def test_a_finished_jobs_log_is_read_from_storage_with_or_without_follow(
    client: Client, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    job_with_stored_logs(client, seaweedfs, s3_bucket, "done", {"phase": "Succeeded", "attempt": 1},
                         {0: "first try\ncrashed\n", 1: "second try\nfinetune-launch: exit 0\n"})
    assert list(client.logs("done")) == ["second try", "finetune-launch: exit 0"]
    assert list(client.logs("done", follow=True)) == ["second try", "finetune-launch: exit 0"]
    assert list(client.logs("done", attempt=0)) == ["first try", "crashed"]


def test_between_attempts_the_latest_stored_log_is_shown_and_an_earlier_one_can_be_followed(
    client: Client, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    # Restarting: attempt 2's pods do not exist yet and have stored nothing.
    job_with_stored_logs(client, seaweedfs, s3_bucket, "between", {"phase": "Restarting", "attempt": 2},
                         {0: "attempt zero\n", 1: "attempt one\n"})
    assert list(client.logs("between")) == ["attempt one"]
    # Following an attempt whose pods are gone while the job goes on: its stored log, then the end.
    assert list(client.logs("between", attempt=0, follow=True)) == ["attempt zero"]


def test_no_pod_and_nothing_stored_is_one_line_naming_both(
    client: Client, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    job_with_stored_logs(client, seaweedfs, s3_bucket, "lost", {"phase": "Failed", "attempt": 0}, {})
    with pytest.raises(LogNotFound) as raised:
        list(client.logs("lost", rank=1))
    assert str(raised.value) == (
        "no log of node 1 of FineTuneJob default/lost (Failed), attempt 0: pod lost-a0-n1 does not exist and "
        f"nothing is stored at s3://{s3_bucket}/lost/logs/attempt-0/node-1.log")
