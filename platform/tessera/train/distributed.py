"""The process group a PyTorchJob (or torchrun, or the deepspeed launcher) sets up through env vars.

The Training Operator gives each pod `MASTER_ADDR`, `MASTER_PORT`, `RANK` and `WORLD_SIZE`;
torchrun adds `LOCAL_RANK` and `LOCAL_WORLD_SIZE`. One process with none of them is a
world of one and needs no process group at all.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tessera.errors import TesseraError


class DistributedEnvError(TesseraError):
    """The launcher's environment variables are inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise DistributedEnvError(f"environment variable {name}={raw!r} is not an integer") from None

        world_size = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        local_rank = number("LOCAL_RANK", 0)
        local_world_size = number("LOCAL_WORLD_SIZE", 1 if world_size == 1 else 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DistributedEnvError(f"RANK={rank} does not fit WORLD_SIZE={world_size}")
        if world_size > 1 and not env.get("MASTER_ADDR"):
            raise DistributedEnvError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun or as a PyTorchJob"
            )
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            # A PyTorchJob pod without torchrun runs one process per pod.
            local_world_size=local_world_size or 1,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=number("MASTER_PORT", 29500),
        )


class Collective:
    """The few collectives the trainer needs, which are no-ops in a world of one."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (one all-reduce for the whole list)."""
        if not self.env.distributed:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.env.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather_files(self, files: dict[str, bytes]) -> dict[str, bytes] | None:
        """Every rank's files on rank 0 (None elsewhere). Names must not clash across ranks.

        Checkpoint shards are written to each rank's local disk; a pod has no disk shared with
        the others, so rank 0 collects them before publishing one checkpoint to the store.
        """
        if not self.env.distributed:
            return files
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(pickle.dumps(files), gathered, dst=0)
        if gathered is None:
            return None
        merged: dict[str, bytes] = {}
        for blob in gathered:
            merged.update(pickle.loads(blob))  # noqa: S301 - produced by our own ranks just now
        return merged

    def _device(self) -> Any:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
