"""Data-parallel method training: one run's minibatch split over the ranks of a torch.distributed group.

Every rank draws the same whole minibatch from the same seeded generators, so every rank's generator
state (and the checkpoint rank 0 writes) is the same at any world size and a checkpoint resumes at any
other. Each rank backpropagates only its contiguous share of the examples, weighted by their share of
the whole minibatch exactly as micro-batches are; the gradients are then summed over the ranks before
clipping and the optimiser step: the training of one process, up to the order of floating-point sums.

An explicit all-reduce, not DistributedDataParallel: methods train through ``training_loss``, not the
``forward`` DDP wraps; the frozen base inside a method has no gradients; and the sum belongs after the
last micro-batch of a rank's share. One flattened all-reduce of the gradients per step does exactly that.

The process group is set up by :mod:`benchmark.run.ddp`; without one this is one process, and nothing
here is called or changes a number.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of ranks); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shares(n: int, world_size: int) -> list[range]:
    """The contiguous examples of a minibatch of ``n`` each rank backpropagates (the first ``n % world_size``
    ranks one more); a share is weighted by its size, so uneven shares train like even ones."""
    if world_size > 1 and n < world_size:
        raise ValueError(f"a minibatch of {n} examples (training.batch_size, or the training subjects if fewer) "
                         f"cannot be split over {world_size} ranks, each needs one; use at most {n} ranks")
    bounds = [rank * n // world_size for rank in range(world_size + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world_size)]


def describe(n: int, world_size: int) -> dict:
    """What a record says of a data-parallel run (a one-process record says nothing)."""
    return {"world_size": world_size, "per_rank_batch": [len(s) for s in shares(n, world_size)]}


class RankLost(RuntimeError):
    """This rank's collective failed because another rank stopped: that rank's own error names the cause."""


@contextlib.contextmanager
def _collective(what: str):
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError too
        raise RankLost(f"rank {rank_and_size()[0]} lost the other ranks during {what} ({err}); "
                       "the rank that stopped first names the cause") from err


def sum_over_ranks(params: list[torch.Tensor], loss: float) -> float:
    """Sum the parameters' gradients and the share-weighted loss over the ranks; returns the whole
    minibatch's loss. A parameter keeps no gradient (``None``, as AdamW then skips it) only where no
    rank gave it one, as in one process."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    loss_and_given = torch.tensor([loss] + [p.grad is not None for p in params], dtype=torch.float64,
                                  device=flat.device)
    with _collective("the gradient all-reduce"):
        dist.all_reduce(flat)
        dist.all_reduce(loss_and_given)
    for p, grad, given in zip(params, _unflatten_dense_tensors(flat, grads), loss_and_given[1:].tolist()):
        p.grad = grad if given else None
    return float(loss_and_given[0])


# Rank 0 tells the others, once per process, whether to train: they wait (``wait_for_lead``) until
# it has built what they read (the base model, the data and latent caches), so no rank writes a cache.
_lead_spoke = False


def tell_followers(train: bool) -> None:
    """Rank 0: start the other ranks' training (``True``, from ``train_method``), or let them go when the
    run ends without training (``False``; a no-op once they were told)."""
    global _lead_spoke
    rank, size = rank_and_size()
    if rank == 0 and size > 1 and not _lead_spoke:
        _lead_spoke = True
        dist.broadcast_object_list([train], src=0)


def wait_for_lead() -> bool:
    """A rank other than 0: wait for rank 0's word; True when the run trains."""
    message = [None]
    with _collective("the wait for rank 0"):
        dist.broadcast_object_list(message, src=0)
    return bool(message[0])
