"""Data-parallel training over torch.distributed with FSDP2 (``fully_shard``): gloo on the
CPU, NCCL on the GPU, one process per rank started by torch's own launcher
(``torch.distributed.run``, i.e. ``torchrun``), which sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous address in each worker's environment.

Each rank takes every world_size-th item of each global batch (DistributedSampler's split),
and the gradients are summed across ranks with each rank's loss scaled by its share of the
batch's loss terms, so the global batch, its gradient and the loss curve are those of one
process training on the whole batch."""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

# A rank that dies or stalls must fail the job, never leave the others waiting forever in a
# collective: each collective gives up after this long (gloo raises; NCCL aborts).
PROCESS_GROUP_TIMEOUT_S = 300
LAUNCHER = "torch.distributed.run"
DEFAULT_CPU_RANKS = 2  # ranks of an FSDP job on a machine without GPUs
# what the launcher sends the ranks still running once one has failed
LAUNCHER_STOP_SIGNAL = signal.SIGTERM
Item = TypeVar("Item")


@dataclass(frozen=True)
class FSDPOptions:
    """The spec's memory_efficient_fsdp_wrap (shard parameters, gradients and optimizer state
    per decoder layer) and fsdp_cpu_offload (keep the shards in host memory; CPUOffloadPolicy)."""
    cpu_offload: bool = False


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks. The default is one process alone."""
    rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"
    mesh: Any = field(default=None, compare=False)  # torch DeviceMesh over all ranks

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints, logs and reports; the others only compute."""
        return self.rank == 0

    def share(self, batch: Sequence[Item]) -> list[Item]:
        """This rank's items of a global batch: items rank, rank + world_size, ... (may be
        empty when the batch has fewer items than ranks)."""
        return list(batch[self.rank::self.world_size])

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``values`` over all ranks (a collective: every rank calls it)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist
        # NCCL reduces GPU tensors only; gloo any
        device = torch.device("cuda", torch.cuda.current_device()) \
            if self.device_type == "cuda" else values.device
        summed = values.to(device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(values.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()


SINGLE_PROCESS = DataParallel()


def default_nproc_per_node() -> int:
    """One rank per GPU, or DEFAULT_CPU_RANKS on the CPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else DEFAULT_CPU_RANKS


def nproc_per_node_arg(text: str) -> int:
    """argparse type of a --nproc-per-node / --fsdp-nproc-per-node flag: an int >= 1."""
    import argparse
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torch.distributed.run`` launch."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def init_data_parallel(device_type: str) -> DataParallel:
    """Join the process group torch's launcher set up in the environment (gloo on the CPU,
    NCCL on CUDA, the GPU LOCAL_RANK for this rank) and build the 1-D device mesh FSDP shards
    over. Without a launcher, a group of one (FSDP still shards, over one rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # a lone process (no launcher): a group of one on a loopback port of its own
        lone = {} if launched_by_torchrun() else {
            "init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S), **lone)
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world_size,))
    return DataParallel(dist.get_rank(), world_size, device_type, mesh)


def close_data_parallel() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_llama(model: nn.Module, group: DataParallel, options: FSDPOptions) -> list[nn.Module]:
    """Apply FSDP2 to a ``model.llama.Llama``: one unit per decoder layer (with whatever the
    layer holds, e.g. its adapters), then the root (embedding, final norm, head). Gradients
    are summed across ranks, not averaged: the loop scales each rank's loss by its share.
    Returns the FSDP modules, root last."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    policy = (CPUOffloadPolicy(pin_memory=group.device_type == "cuda") if options.cpu_offload
              else OffloadPolicy())
    units = list(model.layers) + [model]
    for unit in units:
        if unit is not model:
            # the fused CPU kernel keeps the weight tensors it was built on; FSDP swaps them
            unit._fused, unit._fused_checked = None, True
        fully_shard(unit, mesh=group.mesh, offload_policy=policy)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no AVG; SUM on every backend
        unit.set_gradient_divide_factor(1.0)
    return units


@contextlib.contextmanager
def full_parameters(units: Sequence[nn.Module]) -> Iterator[None]:
    """Inside, every FSDP unit's parameters are whole (all-gathered; a collective: every rank
    enters). Reading only: writes to them are not kept."""
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with whole tensors (keyed by parameter name), on the CPU; complete
    on rank 0. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Shard a state ``full_optimizer_state`` wrote into the optimizer (every rank reads the
    same file). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class ShardableModel:
    """What a TrainableModel over a ``Llama`` needs for FSDP: the units ``shard_llama``
    made (none until sharded) and a view of the whole weights for saving."""
    fsdp_units: list[nn.Module] = []

    @property
    def fsdp_root(self) -> nn.Module | None:
        """The FSDP root module (the Llama being trained), None when not sharded."""
        return self.fsdp_units[-1] if self.fsdp_units else None

    def full_weights(self) -> contextlib.AbstractContextManager[None]:
        """Inside, the model's parameters are whole on every rank (see ``full_parameters``);
        nothing to do when not sharded."""
        return full_parameters(self.fsdp_units)


def launcher_args(nproc_per_node: int, module: str, args: Sequence[str]) -> list[str]:
    """``torch.distributed.run``'s arguments: ``--standalone --nproc-per-node N -m MODULE ARGS``,
    torch's launcher on this machine (a local rendezvous on a free port), no restarts (a
    failed rank fails the run; the launcher stops the other ranks)."""
    return ["--standalone", f"--nproc-per-node={nproc_per_node}", "--max-restarts=0",
            "-m", module, *args]


def run_launcher(nproc_per_node: int, module: str, args: Sequence[str]) -> str | None:
    """Run torch's launcher (``launcher_args``) in this process until every rank has ended.
    Returns None when all succeeded, else why the run failed (``failure_reason``)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    try:
        run(parse_args(launcher_args(nproc_per_node, module, args)))
    except ChildFailedError as e:
        return failure_reason(e.failures)
    return None


def failure_reason(failures: Mapping[int, Any]) -> str:
    """Why a launch failed, from torch elastic's ``ProcessFailure`` of each failed global
    rank, naming the rank. The cause first: a rank killed by a signal (other than
    LAUNCHER_STOP_SIGNAL, which the launcher sends the rest), whose death breaks the others'
    collectives; else the ranks that raised (their exception, from the error file
    ``record_rank_error`` wrote), earliest first; else the rest. The other failed ranks
    follow in brackets. E.g. "rank 1 was killed by signal SIGKILL (9) (then: rank 0 exited
    with code 1)"."""
    def killed(f) -> bool:
        return f.exitcode < 0 and -f.exitcode != LAUNCHER_STOP_SIGNAL

    def raised(f) -> bool:
        return f.exitcode > 0 and os.path.isfile(f.error_file)

    def describe(rank: int, f, full: bool) -> str:
        if f.exitcode < 0:
            return f"rank {rank} was killed by signal {f.signal_name()} ({-f.exitcode})"
        if full and raised(f):
            message = f.message["message"] if isinstance(f.message, dict) else f.message
            return f"rank {rank}: {message}"
        return f"rank {rank} exited with code {f.exitcode}"

    ranks = sorted(failures, key=lambda r: (failures[r].timestamp, r))
    causes = ([r for r in ranks if killed(failures[r])] or [r for r in ranks if raised(failures[r])]
              or ranks)
    reason = "; ".join(describe(r, failures[r], True) for r in causes)
    others = [describe(r, failures[r], False) for r in ranks if r not in causes]
    return reason + (f" (then: {'; '.join(others)})" if others else "")


def record_rank_error(error: BaseException) -> None:
    """Under torch's launcher, write this rank's exception to its error file
    (TORCHELASTIC_ERROR_FILE), where ``run_launcher`` reads it for the failure reason."""
    if launched_by_torchrun():
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler
        get_error_handler().record_exception(error)
