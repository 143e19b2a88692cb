"""Data-parallel training under torchrun: process group, sharding, DDP, rank-0-only output.

`torchrun --nproc_per_node N -m training.cli train ...` starts N processes and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed()` reads them (env://)
and joins the group: gloo on CPU, nccl where CUDA is present. Multi-node runs use torchrun's
usual rendezvous flags; nothing here changes. Each rank trains on its own shard of every epoch
(DistributedSampler, seeded), DDP averages the gradients, and only rank 0 evaluates, logs and
writes files.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from training.sync_bn import convert_to_sync_batchnorm

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. world_size 1 with no backend: one process, no group
    (the sharded data order of a 1-replica run, used as the reference for N replicas)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_group(self) -> bool:
        return self.backend is not None and dist.is_initialized()

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the ranks (float64)."""
        if not self.has_group:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """rank 0's obj, on every rank (pickled; for summaries and checkpoints)."""
        if not self.has_group:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, device=self.device)
        return holder[0]

    def barrier(self) -> None:
        if self.has_group:
            dist.barrier()


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def choose_backend(requested: str = "auto") -> str:
    """'auto': nccl when CUDA is present, gloo otherwise."""
    if requested not in BACKENDS:
        raise ValueError(
            f"Invalid backend {requested!r}. Only {', '.join(BACKENDS)} are supported."
        )
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend nccl needs CUDA, and none is present: use gloo (or auto)")
    return requested


def init_distributed(backend: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment; one process otherwise."""
    if not launched_by_torchrun():
        return DistContext()
    ctx = DistContext(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
        backend=choose_backend(backend),
    )
    if ctx.backend == "nccl":
        # cuBLAS needs this before CUDA starts to honour use_deterministic_algorithms.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(ctx.backend, init_method="env://")
    if not ctx.is_main:
        quiet()
    return ctx


def quiet() -> None:
    """Ranks other than 0 only report errors: rank 0 speaks for the job."""
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_loader(
    dataset: Dataset, batch_size: int, seed: int, ctx: DistContext
) -> tuple[DataLoader, DistributedSampler]:
    """This rank's shard: every epoch one seeded permutation, rank r takes every N-th index.

    Call `sampler.set_epoch(epoch)` each epoch. Step i of all ranks together covers positions
    [i*N*B, (i+1)*N*B) of the permutation: the batch one process with batch N*B would see.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    # drop_last avoids a final batch of 1, where BatchNorm's batch variance is undefined.
    drop_last = len(sampler) > batch_size
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return loader, sampler


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Augmentation RNG for (seed, epoch, rank): ranks differ, and a resumed run needs no state."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def prepare_model(model: nn.Module, ctx: DistContext, sync_bn: bool) -> nn.Module:
    """Synchronized BN (if asked and there is more than one replica), on this rank's device."""
    if sync_bn and ctx.world_size > 1:
        model = convert_to_sync_batchnorm(model, ctx.device.type)
    return model.to(ctx.device)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel over the group; a single replica needs no wrapper."""
    if ctx.world_size == 1:
        return model
    if not ctx.has_group:
        raise RuntimeError(
            f"world_size {ctx.world_size} needs a process group: use init_distributed() under "
            "torchrun"
        )
    # A conv with one input channel has a size-1 dimension whose stride is arbitrary; DDP
    # warns that the gradient's stride differs from its bucket's: same values, one small copy.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
