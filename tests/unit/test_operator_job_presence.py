"""The forget-after-a-watch-gap decision: a remembered job missing from a later consistent list is gone."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.job_presence import JobKey, RememberedJob, jobs_gone, remembered_body

LISTED_FROM = 100.0


def listed(*jobs: tuple[str, str, str]) -> list[dict[str, Any]]:
    """Metadata items as a PartialObjectMetadataList holds them: (namespace, name, uid)."""
    return [{"metadata": {"namespace": ns, "name": name, "uid": uid}} for ns, name, uid in jobs]


@pytest.mark.parametrize(
    ("remembered", "items", "gone"),
    [
        pytest.param({("a", "j"): RememberedJob("u1", 50.0)}, listed(("a", "j", "u1")), [], id="still there"),
        pytest.param({("a", "j"): RememberedJob("u1", 50.0)}, listed(), [("a", "j")],
                     id="deleted during the gap"),
        pytest.param({("a", "j"): RememberedJob("u1", 50.0)}, listed(("b", "j", "u1")), [("a", "j")],
                     id="a job of that name in another namespace is another job"),
        pytest.param({("a", "j"): RememberedJob("u1", 50.0)}, listed(("a", "j", "u2")), [("a", "j")],
                     id="deleted and created again: the old one is gone"),
        pytest.param({("a", "j"): RememberedJob("u1", 100.0)}, listed(), [],
                     id="seen when the list was asked for: may be newer than the list"),
        pytest.param({("a", "j"): RememberedJob("u1", 150.0)}, listed(), [], id="seen after the list was asked for"),
        pytest.param({("a", "j"): RememberedJob(None, 50.0)}, listed(("a", "j", "u1")), [],
                     id="uid not read yet, the name exists"),
        pytest.param({("a", "j"): RememberedJob(None, 50.0)}, listed(), [("a", "j")],
                     id="uid not read yet, the name is gone"),
        pytest.param({("a", "x"): RememberedJob("u1", 1.0), ("a", "y"): RememberedJob("u2", 1.0),
                      ("a", "z"): RememberedJob("u3", 1.0)}, listed(("a", "y", "u2")), [("a", "x"), ("a", "z")],
                     id="only the missing ones"),
    ],
)
def test_jobs_gone(remembered: dict[JobKey, RememberedJob], items: list[dict[str, Any]], gone: list[JobKey]) -> None:
    assert jobs_gone(remembered, items, LISTED_FROM) == gone


APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@pytest.mark.parametrize(
    ("metadata", "kept"),
    [
        pytest.param({"name": "j", "uid": "u", "generation": 2}, {"name": "j", "uid": "u", "generation": 2},
                     id="nothing to leave out"),
        pytest.param({"name": "j", "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
                     {"name": "j"}, id="field ownership left out"),
        pytest.param({"name": "j", "labels": {"team": "a"}, "annotations": {APPLIED: "{...}", "note": "x"}},
                     {"name": "j", "labels": {"team": "a"}, "annotations": {"note": "x"}},
                     id="kubectl's applied copy left out, other annotations kept"),
        pytest.param({"name": "j", "annotations": {APPLIED: "{...}"}}, {"name": "j", "annotations": {}},
                     id="only the applied copy"),
        pytest.param({"name": "j", "deletionTimestamp": "2025-01-01T00:00:00Z", "ownerReferences": []},
                     {"name": "j", "deletionTimestamp": "2025-01-01T00:00:00Z", "ownerReferences": []},
                     id="what reconciles read is kept"),
    ],
)
def test_remembered_body_leaves_out_unread_metadata(metadata: dict[str, Any], kept: dict[str, Any]) -> None:
    spec, status = {"distributed": {"nodes": 2}}, {"phase": "Running"}
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": metadata, "spec": spec,
            "status": status}
    lean = remembered_body(body)
    assert lean == {**body, "metadata": kept}
    assert lean["spec"] is spec and lean["status"] is status  # shared with the event's body, not copied


def test_remembered_body_without_metadata_is_a_copy() -> None:
    body = {"kind": "FineTuneJob"}
    assert remembered_body(body) == body and remembered_body(body) is not body
