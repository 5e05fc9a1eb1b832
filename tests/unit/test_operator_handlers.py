"""The kopf registry and settings: no handler makes kopf put a finalizer on a job; peers get random priorities."""

from __future__ import annotations

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from finetune_operator import handlers
from finetune_operator.api import LIST_CHUNK
from finetune_operator.settings import Settings


def test_no_handler_needs_a_finalizer_so_deletion_never_waits_for_the_operator() -> None:
    for settings in (Settings(), Settings(peering="ftj", namespaces=("team-a",))):
        registry = handlers.build_registry(settings)
        # kopf adds its finalizer for timers and daemons (spawning handlers) and for mandatory on.delete handlers
        # (changing handlers); create/update/resume would also write progress annotations to every job.
        assert registry._spawning.get_all_handlers() == []
        assert registry._changing.get_all_handlers() == []
        assert registry._indexing.get_all_handlers() == []
        assert {h.id for h in registry._watching.get_all_handlers()} == {"job-event", "pod-event", "workload-event"}
        assert all(not getattr(h, "requires_finalizer", None) for h in registry._watching.get_all_handlers())
        assert {h.id for h in registry._activities.get_all_handlers()} == {"login", "startup", "cleanup", "watching"}


def test_standalone_operator_does_not_peer() -> None:
    kopf_settings = kopf.OperatorSettings()
    handlers.configure_kopf(kopf_settings, Settings())
    assert kopf_settings.peering.standalone is True
    assert kopf_settings.peering.priority == kopf.OperatorSettings().peering.priority


def test_each_peered_replica_gets_its_own_random_priority() -> None:
    """kopf pauses every replica when the highest priority is shared: replicas must not all get the default."""
    priorities = []
    for _ in range(20):
        kopf_settings = kopf.OperatorSettings()
        handlers.configure_kopf(kopf_settings, Settings(peering="ftj"))
        assert kopf_settings.peering.standalone is False
        assert kopf_settings.peering.name == "ftj"
        priorities.append(kopf_settings.peering.priority)
    assert all(1 <= p <= 1_000_000 for p in priorities)
    assert len(set(priorities)) > 1


def test_peering_priority_comes_from_the_system_random_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers.random.SystemRandom, "randint", lambda self, a, b: b)
    kopf_settings = kopf.OperatorSettings()
    handlers.configure_kopf(kopf_settings, Settings(peering="ftj"))
    assert kopf_settings.peering.priority == 1_000_000


def test_identities_are_unique_per_process_start() -> None:
    assert handlers.peering_identity() != handlers.peering_identity()



def test_pods_and_workloads_are_listed_and_watched_with_the_job_label_selected_by_the_server_in_pages() -> None:
    kopf_settings = kopf.OperatorSettings()
    handlers.configure_kopf(kopf_settings, Settings())
    pods = Resource("", "v1", "pods", namespaced=True)
    workloads = Resource("kueue.x-k8s.io", "v1beta2", "workloads", namespaced=True)
    jobs = Resource("finetune.dev", "v1alpha1", "finetunejobs", namespaced=True)
    # kopf puts these into the labelSelector of its LIST and WATCH requests (its handler label filters do not).
    assert kopf_settings.watching.label_selectors.collect(pods) == ["finetune.dev/job-name"]
    assert kopf_settings.watching.label_selectors.collect(workloads) == ["finetune.dev/job-name"]
    assert kopf_settings.watching.label_selectors.collect(jobs) == []
    assert kopf_settings.watching.chunk_size == LIST_CHUNK


WATCHERS = ["watcher for finetunejobs.v1alpha1.finetune.dev@None", "watcher for pods.v1@None", "resync"]


@pytest.mark.parametrize(
    ("tasks", "namespaces", "missing"),
    [
        pytest.param(WATCHERS, (), [], id="cluster-wide, both watching"),
        pytest.param(WATCHERS[1:], (), ["finetunejobs@None"], id="the jobs' watcher ended"),
        pytest.param([], (), ["finetunejobs@None", "pods@None"], id="none started (yet)"),
        pytest.param(["watcher for finetunejobs.v1alpha1.finetune.dev@a", "watcher for pods.v1@a",
                      "watcher for pods.v1@b"], ("a", "b"), ["finetunejobs@b"], id="per namespace"),
        pytest.param(["watcher for namespaces.v1@None", *WATCHERS[1:]], (), ["finetunejobs@None"],
                     id="other resources do not count"),
    ],
)
def test_missing_watches(tasks: list[str], namespaces: tuple[str, ...], missing: list[str]) -> None:
    assert handlers.missing_watches(tasks, namespaces) == missing


def test_idle_kopf_workers_let_go_of_their_last_event_sooner_than_kopfs_default() -> None:
    kopf_settings = kopf.OperatorSettings()
    handlers.configure_kopf(kopf_settings, Settings())
    assert kopf_settings.queueing.idle_timeout == handlers.IDLE_WORKER_SECONDS
    assert handlers.IDLE_WORKER_SECONDS < kopf.OperatorSettings().queueing.idle_timeout
