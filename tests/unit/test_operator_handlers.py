"""The kopf registry and settings: no handler makes kopf put a finalizer on a job; peers get random priorities."""

from __future__ import annotations

import kopf
import pytest

from finetune_operator import handlers
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
        assert {h.id for h in registry._activities.get_all_handlers()} == {"login", "startup", "cleanup"}


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

