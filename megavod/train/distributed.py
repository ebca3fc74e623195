"""Multi-process training helpers for ``torchrun --nproc_per_node N -m megavod train ...``.

* :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``) and starts a process group: NCCL on CUDA, gloo on CPU. Without
  those variables it is a plain single process.
* :func:`wrap_ddp` wraps a model in ``DistributedDataParallel`` with ``broadcast_buffers=False`` (the
  authors' setting: every BN is frozen, there is nothing to broadcast) when there is more than one
  process, as the authors do (so a single-process model has no ``module.`` prefix either way).
* :class:`IterationSampler` is the iteration-based distributed sampler: the sample each rank sees at
  each iteration is a pure function of (seed, iteration, rank), which is what makes resuming exact.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megavod.data.sampling import SampleKey


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Start (or join) the process group torchrun describes; return this process's place in it.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). Each process uses GPU
    ``LOCAL_RANK``.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    # Under torchrun a process group is made even for one process, so that a 1-process run takes the
    # same path (NCCL on a GPU) as a many-process one; a plain `megavod train` makes none.
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ
    if (world_size > 1 or launched_by_torchrun) and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one item without a process group)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (all ranks must call it together)."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar values over ranks, for logging (all ranks must call it together)."""
    if get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DDP with ``broadcast_buffers=False`` when several processes train; the model itself otherwise."""
    if not info.distributed:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=device_ids,
        broadcast_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# Sampling


def mix_seed(*words: int) -> int:
    """A well-mixed 63-bit integer from a few integers (numpy's ``SeedSequence``)."""
    state = np.random.SeedSequence([w % 2**64 for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


_PERMUTATION_STREAM = 0x5045524D  # keeps the epoch permutations apart from the per-sample seeds


def sample_seed(seed: int, iteration: int, rank: int, slot: int = 0) -> int:
    """The seed of the item loaded by ``rank`` in image slot ``slot`` of ``iteration``."""
    return mix_seed(seed, iteration, rank, slot)


class IterationSampler:
    """Batch sampler over iterations ``start_iter..max_iter-1`` for one rank.

    The whole run reads one endless stream of indices: epoch ``e`` is a permutation of the dataset
    seeded by (seed, e), and iteration ``i`` takes the ``world_size * images_per_process`` positions
    starting at ``i * world_size * images_per_process``, rank ``r`` the ``r``-th slice. So, as with
    ``DistributedSampler`` + ``IterationBasedBatchSampler`` (docs/departures.md#training-order-and-exact-resume),
    the ranks see disjoint samples, every item is seen once per epoch, and the data are shuffled uniformly
    over the concatenated DET + VID lists; unlike the authors' sampler (which reseeds with the start iteration)
    the order depends on (seed, iteration) only, so a resumed run reads what the uninterrupted one
    would have read.
    """

    def __init__(
        self,
        dataset_size: int,
        max_iter: int,
        *,
        start_iter: int = 0,
        images_per_process: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("IterationSampler: empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.n = dataset_size
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.ipp = images_per_process
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _PERMUTATION_STREAM))
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, iteration: int) -> list[SampleKey]:
        """This rank's sample keys at ``iteration``."""
        per_iter = self.world_size * self.ipp
        keys = []
        for slot in range(self.ipp):
            position = iteration * per_iter + self.rank * self.ipp + slot
            epoch, offset = divmod(position, self.n)
            index = self._permutation(epoch)[offset]
            keys.append(SampleKey(index, sample_seed(self.seed, iteration, self.rank, slot)))
        return keys

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for iteration in range(self.start_iter, self.max_iter):
            yield self.batch(iteration)

    def __len__(self) -> int:
        return max(self.max_iter - self.start_iter, 0)
