"""Whether this replica is the one kopf's peering lets work, so the operator's own resync pauses with kopf.

kopf pauses its watch streams (and so every handler) while a live peer has a higher or the same priority, and while
the peering object is missing. The resync loop is the operator's own task, not a kopf handler, so it asks the same
question of the same peering objects before each round.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from finetune_operator.api import ApiError
from finetune_operator.spec import parse_time

log = logging.getLogger(__name__)

# kopf's default lifetime of a peer's keep-alive, used when an entry has none.
DEFAULT_PEER_LIFETIME_SECONDS = 60


class PeeringReader(Protocol):
    async def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None: ...


def peers_let_us_work(
    status: Mapping[str, Any], identity: str, priority: int, now: datetime.datetime
) -> bool:
    """kopf's rule on one peering object's status: no other live peer has a priority as high as ours, or higher."""
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        lastseen = parse_time(info.get("lastseen"))
        lifetime = datetime.timedelta(seconds=int(info.get("lifetime", DEFAULT_PEER_LIFETIME_SECONDS)))
        alive = lastseen is None or lastseen + lifetime > now
        if alive and int(info.get("priority", 0)) >= priority:
            return False
    return True


class PeeringCheck:
    """``await check()``: True while kopf lets this replica work (every peering object agrees), else False."""

    def __init__(
        self, api: PeeringReader, name: str, namespaces: Sequence[str], identity: str, priority: int
    ) -> None:
        self.api = api
        self.name = name
        # None: the ClusterKopfPeering of a cluster-wide operator; else one KopfPeering per watched namespace.
        self.namespaces: tuple[str | None, ...] = tuple(namespaces) or (None,)
        self.identity = identity
        self.priority = priority
        self.active = False

    async def __call__(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        active = True
        for namespace in self.namespaces:
            try:
                body = await self.api.get_peering(namespace, self.name)
            except ApiError as error:
                log.warning("peering %s: cannot read it, keeping the last answer: %s", self.name, error)
                return self.active
            # kopf stays paused while its peering object is missing (the chart creates it).
            if body is None or not peers_let_us_work(body.get("status") or {}, self.identity, self.priority, now):
                active = False
                break
        if active != self.active:
            log.info("peering %s: this replica (priority %d) %s", self.name, self.priority,
                     "works" if active else "pauses its resync, another replica works")
        self.active = active
        return active
