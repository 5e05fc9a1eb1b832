"""The forget-after-a-watch-gap decision: a remembered job missing from a later consistent list is gone."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.job_presence import JobKey, RememberedJob, jobs_gone

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
