"""Data-parallel training over several processes, as ``torchrun`` starts them (``hybrid.training.loop``).

``torchrun --nproc_per_node=N -m hybrid train RECIPE`` starts N copies of ``hybrid train``; each
finds its place in the launch in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). ``process_group`` joins them into one
``torch.distributed`` group for the run (gloo on CPU, NCCL on CUDA, one GPU per process:
``cuda:LOCAL_RANK``) and leaves it at the end, also after an error. A process started without
torchrun is a group of one: every helper here then does nothing and returns its input, so the
single-process path is the plain one.

``wrap`` applies the run's ``parallel`` setting:

- ``ddp``: ``DistributedDataParallel``, a full copy of the model, its gradients and optimizer state
  in every process; the gradients are averaged across processes during the backward pass.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, which runs on CPU with gloo as well as on
  CUDA): each block's weights, gradients and optimizer moments are split across the processes, and a
  block's full weights exist only while it computes. For models whose training state does not fit
  one device.

Every process trains on its own ``batch_size / world_size`` rows of the global batch
(``hybrid.training.data.PackedBatches(rank=, world_size=)``); DDP and FSDP average the gradients, so an
optimizer step is that of the global batch, as in one process up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from blocks.errors import InputError

PARALLEL_MODES = ("ddp", "fsdp", "none")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(InputError):
    """A launch this process cannot take part in (environment, device, settings); the message says the fix."""


def launch_size() -> int:
    """How many processes the launch this process belongs to has (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in the group (0 without one); before the group exists, torchrun's ``RANK``."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that prints, writes metrics and checkpoints (rank 0), and without a group."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device this process trains on: ``device``, except that several processes on CUDA each take
    the GPU of their ``LOCAL_RANK`` (an explicit ``cuda:N`` would put them all on one GPU)."""
    if device.type != "cuda" or launch_size() == 1:
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.index is not None and device.index != local:
        raise DistributedError(f"train.device {device} with {launch_size()} processes: each process uses the "
                               f"GPU of its LOCAL_RANK (this one cuda:{local}); set train.device to auto or cuda "
                               "(choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if local >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} GPUs: start at most "
                               "that many processes per machine (torchrun --nproc_per_node)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's launch for the duration of the block: gloo for CPU training, NCCL for CUDA
    (with ``device`` from ``local_device``); the group is destroyed on the way out, errors included.
    Nothing happens in a single process, or when the caller has set up a group already (it keeps it)."""
    if launch_size() == 1 or dist.is_initialized():
        yield
        return
    missing = [name for name in LAUNCH_VARIABLES + ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE is {launch_size()} but {', '.join(missing)} is not set: start several "
                               "processes with torchrun (see hybrid/training/distributed.py), not by hand")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the model

def wrap(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """``model`` (already on ``device``) made data-parallel as ``parallel`` says; itself in one process.

    FSDP shards each block separately and the rest (embedding, final norm, head) with the root, except
    a block whose value projection the model calls from outside the block (the first layer of a
    value-residual group, ``HybridLM._value_groups``): its weights must be whole at the root's level."""
    if world_size() == 1:
        return model
    if parallel == "none":
        raise DistributedError(f"train.parallel is none but {world_size()} processes were started: they would "
                               "train separate copies; use ddp or fsdp, or start one process")
    if parallel == "ddp":
        # no buffer broadcast before each forward: the model's buffers are constants (rotary frequencies)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard

    # FSDP warns about outputs that are views: here the recurrent state a forward returns (token-shift
    # tails, KVM window caches), which the loss never reads, so no backward hook on them is needed
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Block|HybridLM)\) returned a view",
                            category=UserWarning)
    called_from_root = {first for first in getattr(model, "_value_groups", {}).values() if first > 0}
    for index, block in enumerate(model.blocks):
        if index not in called_from_root:
            fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself: DDP's inner module (FSDP2 shards the model in place, keeping its names)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True for a model whose parameters FSDP has split across the processes."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def gradient_sync(model: nn.Module, enabled: bool):
    """A context for one micro-batch's forward and backward: with ``enabled`` False, DDP keeps the
    gradients local (``no_sync``) so that only the last micro-batch of a step all-reduces them. FSDP
    reduce-scatters every micro-batch (unsharded gradients would cost the memory FSDP saves)."""
    if not enabled and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def full_tensor(tensor: Tensor) -> Tensor:
    """A sharded tensor gathered whole (a collective: every process must call it, in the same order);
    any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """This process's part of ``full`` (a tensor of ``param``'s shape, e.g. an optimizer moment read from
    a checkpoint) split as the sharded ``param`` is; ``full`` itself for an unsharded one. Every process
    holds ``full``, so nothing is sent."""
    if not isinstance(param, DTensor) or full.shape != param.shape:
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The model's state dict with every sharded tensor gathered whole, as CPU tensors, in the main
    process; None in the others. Gathered one tensor at a time, so no process holds more than one
    full tensor beyond the main process's copy. A collective: every process calls it."""
    state = {}
    for name, value in unwrap(model).state_dict().items():
        value = full_tensor(value)
        if is_main():
            state[name] = value.detach().cpu()
    return state if is_main() else None


# ----------------------------------------------------------------------------- agreeing on values

def mean(values: Sequence[float]) -> list[float]:
    """The mean of each value over the processes (the values as they are in one process). Used for the
    logged loss and the NaN check, so that every process sees the same numbers and decides alike."""
    if world_size() == 1:
        return list(values)
    return [v / world_size() for v in _all_reduce(values, dist.ReduceOp.SUM)]


def total(values: Sequence[float]) -> list[float]:
    """The sum of each value over the processes (the values as they are in one process)."""
    return list(values) if world_size() == 1 else _all_reduce(values, dist.ReduceOp.SUM)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True in any process (e.g. one reached the time limit): all stop together."""
    return flag if world_size() == 1 else _all_reduce([float(flag)], dist.ReduceOp.MAX)[0] > 0


def _all_reduce(values: Sequence[float], op) -> list[float]:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def from_main(value: Any) -> Any:
    """The main process's ``value`` (any picklable object), in every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process gets here (nothing in one process)."""
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block in the main process first, then in the others: the main process builds a shared
    cache (the token file) that the others then open instead of building it too."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def rank_seed(seed: int, step: int) -> int:
    """A seed for this process's random numbers from ``step`` on: a distinct stream per process
    (dropout masks must differ across the ranks' rows), reproducible from (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank()]).generate_state(1)[0])
