"""``python -m llama_engine.training.worker --state-dir DIR --job-uuid ID``: run one
post-training job in this process, reporting steps, checkpoints and the outcome to the job
store. Exits when its parent (the server) goes away: its stdin is the parent's pipe.

An FSDP job (``--nproc-per-node N``) runs torch's launcher (``torch.distributed.run``) in
this process, which runs this module once per rank; rank 0 reports steps, every rank dies
with the launcher, and when a rank fails the launcher's process fails the job with the
reason naming the rank: its signal when it was killed (rather than the broken collective
another rank saw), else its exception."""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import sys
import threading
import traceback

import torch

from llama_engine.training.distributed import (LAUNCHER, launched_by_torchrun,
                                               nproc_per_node_arg, record_rank_error,
                                               run_launcher)
from llama_engine.training.jobs import COMPLETED, FAILED, RUNNING, WORKER_MODULE, JobStore
from llama_engine.training.recipe import BasePrecision, Recipe, default_device, run

EXIT_PARENT_GONE = 3
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_when_parent_goes() -> None:
    def watch() -> None:
        # the parent never writes; EOF means it is gone. os.read, not sys.stdin: a thread
        # blocked inside the buffered reader holds its lock, and the interpreter's exit
        # aborts ("could not acquire lock ... at interpreter shutdown") on it
        while os.read(sys.stdin.fileno(), 1):
            pass
        os._exit(EXIT_PARENT_GONE)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _die_with_the_launcher() -> None:
    """A rank is killed when the launcher that started it dies, however it dies (a cancel
    that had to SIGKILL it included): the launcher starts each rank in a session of its own,
    out of reach of a signal to the launcher's process group."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was already gone before prctl
        os._exit(EXIT_PARENT_GONE)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's ``VmHWM`` belongs to the process's own
    address space; ``getrusage``'s ru_maxrss also keeps the peak of the server the worker
    was forked from (carried over fork and exec), so every job would report the server's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB elsewhere


def run_job(store: JobStore, job_uuid: str) -> None:
    job = store.get(job_uuid)
    if job.status != RUNNING:  # cancelled between being claimed and this start
        return
    recipe = Recipe.from_json(job.spec["recipe"])
    writer = _rank() == 0
    resources = {"device": default_device(), "processes": 1, "pids": [os.getpid()],
                 "peak_memory_bytes": peak_rss_bytes()}
    if writer:
        store.set_resources(job_uuid, resources)

    def on_start(trainer, total_steps: int, precision: BasePrecision) -> None:
        group = trainer.group  # every rank: the pids add up over the ranks
        pids = torch.zeros(group.world_size, dtype=torch.int64)
        pids[group.rank] = os.getpid()
        resources.update(processes=group.world_size, pids=group.all_reduce_sum(pids).tolist(),
                         fsdp=recipe.fsdp,
                         fsdp_cpu_offload=recipe.fsdp_cpu_offload)
        if group.world_size > 1:
            resources["launcher"] = LAUNCHER
        if writer:
            store.set_resources(job_uuid, resources)
            store.append_log(job_uuid, precision.record())

    def on_log(record: dict) -> None:  # rank 0 only
        store.append_log(job_uuid, record)
        resources["peak_memory_bytes"] = peak_rss_bytes()  # rank 0's (each rank holds a shard)
        store.set_resources(job_uuid, resources)

    run(recipe, on_log, lambda step, path: store.add_checkpoint(job_uuid, step, path), on_start)
    if writer:
        store.set_status(job_uuid, COMPLETED, {"event": COMPLETED}, only_from=RUNNING)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--job-uuid", required=True)
    parser.add_argument("--nproc-per-node", type=nproc_per_node_arg, default=None, metavar="N",
                        help="an FSDP job: run torch's launcher here, starting N ranks")
    args = parser.parse_args(argv)
    _exit_when_parent_goes()
    distributed = launched_by_torchrun()
    if distributed:
        _die_with_the_launcher()
    elif args.nproc_per_node is not None:
        reason = run_launcher(args.nproc_per_node, WORKER_MODULE,
                              ["--state-dir", args.state_dir, "--job-uuid", args.job_uuid])
        if reason is not None:  # a cancel came first: the job reads "cancelled" still
            JobStore(args.state_dir).set_status(
                args.job_uuid, FAILED, {"event": FAILED, "reason": reason}, only_from=RUNNING)
            sys.exit(1)
        return
    store = JobStore(args.state_dir)
    try:
        run_job(store, args.job_uuid)
    except Exception as e:  # the job failed, not the worker: say why in its logs
        traceback.print_exc()
        if distributed:  # the launcher names the failed rank and why (failure_reason)
            record_rank_error(e)
        else:
            store.set_status(args.job_uuid, FAILED,
                             {"event": FAILED, "reason": f"{type(e).__name__}: {e}"},
                             only_from=RUNNING)
        sys.exit(1)


if __name__ == "__main__":
    main()
