"""The processes of a run: one without a launcher, or one per device under `torchrun` (torch.distributed: nccl on
CUDA, gloo on CPU, one device per rank), with the collectives the loop needs."""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# The variables torchrun sets in every process it starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int                  # this process's index among all of the run's processes
    size: int                  # processes in the run
    device: torch.device       # the device this process runs both models on
    distributed: bool          # a process group is up (launched by torchrun, even with one process)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of `items`: rank r takes items [r*n//size, (r+1)*n//size), so the shares
        are equal when the world size divides n (a step's global batch) and differ by at most one item otherwise
        (an evaluation set); in rank order they are `items` again."""
        n = len(items)
        return items[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over every rank (fp64; NaN and inf propagate); the values themselves on one process."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def most(self, value: int) -> int:
        """The largest of every rank's `value`; the value itself on one process."""
        if not self.distributed:
            return value
        top = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return int(top.item())

    def gather(self, item: object) -> list[object] | None:
        """Every rank's `item` in rank order on rank 0 (None on the others); [item] on one process."""
        if not self.distributed:
            return [item]
        items = [None] * self.size if self.main else None
        dist.gather_object(item, items, dst=0)
        return items

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def check_batch_split(batch_size: int, micro_batches: int, processes: int) -> None:
    """ValueError naming the config key when `batch_size` prompts do not split evenly over `processes` ranks, or
    leave a rank fewer rows than `micro_batches`."""
    if batch_size % processes:
        raise ValueError(f"config optim.batch_size: {batch_size} prompts must split evenly over {processes} "
                         f"processes")
    if batch_size // processes < micro_batches:
        raise ValueError(f"config optim.micro_batches: {micro_batches} micro-batches need at least as many rows per "
                         f"process, and {batch_size} prompts over {processes} processes give "
                         f"{batch_size // processes}")


def launched() -> bool:
    """This process was started by torchrun (or another launcher setting its variables)."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def distributed() -> bool:
    """Training runs in a process group: this process was launched as a rank, or one is already initialised."""
    return launched() or dist.is_initialized()


def rank_device(device: str) -> torch.device:
    """The device of this rank: `device` itself on one process; under a launcher, cuda:LOCAL_RANK when `device` is
    a CUDA device (the index in the config is ignored: one device per rank) and the CPU otherwise."""
    chosen = torch.device(device)
    if not launched() or chosen.type == "cpu":
        return chosen
    return torch.device(chosen.type, int(os.environ["LOCAL_RANK"]))


# The rendezvous store of each launcher address, kept for the life of the process (hosted by rank 0, or by
# torchrun's agent), and how many process groups have started on it. A group that rendezvoused anew after an earlier
# one in the same processes could reach the earlier group's store (still up on rank 0, its keys still there) before
# rank 0 had taken it down: that rank took the other's stale address, finished its set-up at once and hung in its
# first collective until the timeout, while the other waited for it in its own set-up.
_STORES: dict[tuple[object, ...], dist.Store] = {}
_GROUPS_STARTED: Counter[tuple[object, ...]] = Counter()


def _fresh_namespace(timeout: timedelta) -> dist.Store:
    """The keys of the next process group: a prefix never used before on this process's one rendezvous store (every
    rank starts its runs' groups in the same order, so their prefixes agree)."""
    address = (os.getpid(), *(os.environ[name] for name in LAUNCHER_VARIABLES))  # a forked child's own
    if address not in _STORES:
        _STORES[address] = next(dist.rendezvous("env://", timeout=timeout))[0]
    _STORES[address].set_timeout(timeout)
    _GROUPS_STARTED[address] += 1
    return dist.PrefixStore(f"trd_fast/group-{_GROUPS_STARTED[address]}", _STORES[address])


@contextmanager
def run_world(device: str, *, batch_size: int, micro_batches: int, timeout_s: float) -> Iterator[World]:
    """The run's World for its lifetime. Under a launcher it starts the process group (nccl on CUDA, gloo on CPU,
    collectives failing after `timeout_s`; its keys in a fresh namespace of the process's one rendezvous store, so
    runs may follow one another in the same processes) unless one is already up, and takes it down at the end; an
    exception on this rank is printed with the rank and aborts the group, so the other ranks fail at once instead of
    waiting.
    ValueError (before any work) when the global batch does not split evenly into `micro_batches` per rank."""
    if not distributed():
        yield World(rank=0, size=1, device=torch.device(device), distributed=False)
        return
    size = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    check_batch_split(batch_size, micro_batches, size)
    target = rank_device(device)
    owned = not dist.is_initialized()
    if owned:
        if target.type == "cuda":
            torch.cuda.set_device(target)
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", store=_fresh_namespace(timeout),
                                rank=int(os.environ["RANK"]), world_size=size, timeout=timeout,
                                device_id=target if target.type == "cuda" else None)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), device=target, distributed=True)
    try:
        yield world
    except BaseException as error:
        if world.size > 1:
            print(f"rank {world.rank}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            dist.group.WORLD.abort()
            owned = False
        raise
    finally:
        if owned:
            dist.destroy_process_group()
