"""The resync's peering check answers as kopf pauses: a live peer with a higher or the same priority wins."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from finetune_operator.api import ApiError
from finetune_operator.peering import PeeringCheck, peers_let_us_work

NOW = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float = 1, lifetime: int = 60) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - datetime.timedelta(seconds=seconds_ago)).isoformat()}


def test_the_highest_live_priority_works() -> None:
    assert peers_let_us_work({"me": peer(500), "other": peer(100)}, "me", 500, NOW)
    assert not peers_let_us_work({"me": peer(500), "other": peer(900)}, "me", 500, NOW)


def test_a_shared_priority_pauses_everyone_as_kopf_does() -> None:
    assert not peers_let_us_work({"me": peer(500), "other": peer(500)}, "me", 500, NOW)


def test_dead_peers_and_our_own_entry_do_not_count() -> None:
    assert peers_let_us_work({"me": peer(500), "gone": peer(900, seconds_ago=61)}, "me", 500, NOW)
    assert peers_let_us_work({"gone": peer(900, seconds_ago=5, lifetime=0)}, "me", 500, NOW)
    assert peers_let_us_work({}, "me", 500, NOW)


class Peerings:
    def __init__(self, bodies: dict[str | None, dict[str, Any] | None]) -> None:
        self.bodies = bodies
        self.read: list[tuple[str | None, str]] = []
        self.fail = False

    async def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        self.read.append((namespace, name))
        if self.fail:
            raise ApiError("get", 0, "unreachable")
        return self.bodies.get(namespace)


def fresh(priority: int) -> dict[str, Any]:
    return {"priority": priority, "lifetime": 60, "lastseen": datetime.datetime.now(datetime.UTC).isoformat()}


def test_cluster_wide_check_reads_the_cluster_peering() -> None:
    api = Peerings({None: {"status": {"me": fresh(7), "other": fresh(3)}}})
    check = PeeringCheck(api, "ftj", (), "me", 7)
    assert asyncio.run(check())
    assert api.read == [(None, "ftj")]
    api.bodies[None] = {"status": {"me": fresh(7), "other": fresh(8)}}
    assert not asyncio.run(check())


def test_namespaced_check_needs_every_namespace_and_a_missing_object_pauses() -> None:
    api = Peerings({"a": {"status": {"me": fresh(7)}}, "b": None})
    check = PeeringCheck(api, "ftj", ("a", "b"), "me", 7)
    assert not asyncio.run(check())
    api.bodies["b"] = {"status": {}}
    assert asyncio.run(check())
    assert api.read[-2:] == [("a", "ftj"), ("b", "ftj")]


def test_an_unreadable_peering_keeps_the_last_answer() -> None:
    api = Peerings({None: {"status": {}}})
    check = PeeringCheck(api, "ftj", (), "me", 7)
    assert asyncio.run(check())
    api.fail = True
    assert asyncio.run(check())
