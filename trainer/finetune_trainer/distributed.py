"""This rank's place in the gang (torchrun's environment, a gloo group for control messages) and its SIGTERM.

SIGTERM (``Preemption``): before training starts the handler raises ``Preempted`` (nothing to save yet). Once
training runs it only sets a flag: the step in progress (forward, backward, optimizer step, and any evaluation or
save that step triggers) finishes normally, because a rank interrupted inside a collective would hang the others.
The checkpoint protocol reads the flag at its next exchange with the other ranks and saves an emergency checkpoint
(see ``checkpoint_protocol``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist


class Preempted(BaseException):
    """SIGTERM arrived; raised where there is nothing to checkpoint yet (before training starts).

    A BaseException, like KeyboardInterrupt: the ``except Exception`` around storage and download code must not
    mistake it for a failed request."""


@dataclass
class DistContext:
    """This rank's place in the gang (torchrun's environment) and a gloo group for small control messages."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    group: Any = None

    @classmethod
    def from_env(cls) -> DistContext:
        env = os.environ
        rank = int(env.get("RANK", "0"))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
        return cls(
            rank=rank,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_world_size=local_world_size,
            node_rank=int(env.get("GROUP_RANK", str(rank // max(local_world_size, 1)))),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)

    @property
    def is_node_leader(self) -> bool:
        return self.local_rank == 0

    def open_control_group(self) -> None:
        """A gloo group of its own: no CUDA synchronisation, and never interleaved with DeepSpeed's traffic."""
        if self.distributed and self.group is None:
            self.group = dist.new_group(backend="gloo")

    def all_reduce_max(self, values: list[int]) -> list[int]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in tensor.tolist()]

    def all_gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast(self, value: Any) -> Any:
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def node_leaders(self, gathered: list[Any]) -> list[Any]:
        """From an all_gather, the values of each node's local rank 0, by node."""
        by_node: dict[int, Any] = {}
        for value in gathered:
            if isinstance(value, dict) and "node" in value:
                by_node[int(value["node"])] = value
        return [by_node.get(node) for node in range(self.num_nodes)]


class Preemption:
    """SIGTERM handling on one rank: raise before training, set a flag during it (see the module docstring)."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.armed = False
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        if not self.armed:
            raise Preempted("SIGTERM before training started")
