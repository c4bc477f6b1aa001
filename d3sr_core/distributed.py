"""``d3sr upscale`` as several processes: ``accelerate launch`` or ``torchrun``.

The launchers start one process per device and describe the group in environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
Rank 0 plans the batch and sends the plan to every rank; each rank upscales its share on
its own device (``cuda:LOCAL_RANK``); at the end the per-rank summaries are gathered to
rank 0, which prints one. The few messages go through the launcher's key-value store
(``torch.distributed.TCPStore``, reached by the ``env://`` rendezvous), not a collective
process group: no GPU memory, NCCL or gloo threads are involved (a gloo group's teardown
can abort a rank that exits while its peer is still closing, pytorch/gloo#155), and no
tensor ever crosses processes: outputs are exactly those of a single-process run on the
same kind of device.

A rank that dies takes nothing else with it: every output is written to a temporary
name and renamed, so files are either complete or absent, and ``--skip-existing`` resumes.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# Ranks finish their shares at different times; the final gather waits for the slowest.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass
class Processes:
    """This process's place in the group (``world == 1``: an ordinary single run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _store: Any = None  # torch.distributed.Store shared by the group; None for a single run
    _messages: int = 0  # messages exchanged so far: every rank makes the same calls in order

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _next_key(self) -> str:
        self._messages += 1
        return f"message{self._messages}"

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every rank."""
        if self._store is None:
            return value
        key = self._next_key()
        if self.main:
            self._store.set(key, pickle.dumps(value))
            return value
        return pickle.loads(self._store.get(key))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self._store is None:
            return [value]
        key = self._next_key()
        self._store.set(f"{key}/{self.rank}", pickle.dumps(value))
        return [pickle.loads(self._store.get(f"{key}/{r}")) for r in range(self.world)]

    def close(self) -> None:
        """Leave the group. Rank 0 may host the store, so it leaves last."""
        if self._store is None:
            return
        key = self._next_key()
        self._store.set(f"{key}/{self.rank}", b"")
        if self.main:
            self._store.wait([f"{key}/{r}" for r in range(self.world)], GATHER_TIMEOUT)
        self._store = None


# torchrun / accelerate (--multi_gpu), then MPI launchers (accelerate --cpu with a hostfile).
WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARS = (
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise RuntimeError(f"{name}={value!r} is not an integer") from None
    return default


def launched_processes() -> Processes:
    """The group the launcher set up (from its environment), joined; single run otherwise.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 without the rendezvous variables a launcher sets.
    """
    world = _env_int(WORLD_VARS, 1)
    if world <= 1:
        return Processes()
    rank = _env_int(RANK_VARS, 0)
    local_rank = _env_int(LOCAL_RANK_VARS, rank)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes "
            "with `accelerate launch -m d3sr_core upscale ...` or `torchrun -m d3sr_core upscale ...`"
        )
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=GATHER_TIMEOUT))
    # torchrun's agent store outlives a restarted worker group: keys are per attempt
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Processes(rank, world, local_rank, dist.PrefixStore(f"d3sr_upscale/{attempt}", store))


def process_device(requested: str, processes: Processes) -> str:
    """The device name for this process: ``--device`` as given, with one GPU per local rank.

    ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) makes ``auto`` mean the CPU.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and (
        requested == "auto"
    ):
        return "cpu"
    if processes.world > 1 and requested in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            index = processes.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            return f"cuda:{index}"
    return requested
