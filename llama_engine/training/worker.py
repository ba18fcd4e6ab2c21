"""``python -m llama_engine.training.worker --state-dir DIR --job-uuid ID``: run one
post-training job in this process, reporting steps, checkpoints and the outcome to the job
store. Exits when its parent (the server) goes away: its stdin is the parent's pipe."""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import traceback

from llama_engine.training.jobs import COMPLETED, FAILED, RUNNING, JobStore
from llama_engine.training.recipe import Recipe, default_device, run

EXIT_PARENT_GONE = 3


def _exit_when_parent_goes() -> None:
    def watch() -> None:
        while sys.stdin.buffer.read(1):  # the parent never writes; EOF means it is gone
            pass
        os._exit(EXIT_PARENT_GONE)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_job(store: JobStore, job_uuid: str) -> None:
    job = store.get(job_uuid)
    if job.status != RUNNING:  # cancelled between being claimed and this start
        return
    recipe = Recipe.from_json(job.spec["recipe"])
    resources = {"device": default_device(), "processes": 1, "pid": os.getpid(),
                 "peak_memory_bytes": _peak_rss_bytes()}
    store.set_resources(job_uuid, resources)

    def on_log(record: dict) -> None:
        store.append_log(job_uuid, record)
        resources["peak_memory_bytes"] = _peak_rss_bytes()
        store.set_resources(job_uuid, resources)

    run(recipe, on_log, lambda step, path: store.add_checkpoint(job_uuid, step, path))
    store.set_status(job_uuid, COMPLETED, {"event": COMPLETED}, only_from=RUNNING)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--job-uuid", required=True)
    args = parser.parse_args(argv)
    _exit_when_parent_goes()
    store = JobStore(args.state_dir)
    try:
        run_job(store, args.job_uuid)
    except Exception as e:  # the job failed, not the worker: say why in its logs
        traceback.print_exc()
        store.set_status(args.job_uuid, FAILED, {"event": FAILED, "reason": f"{type(e).__name__}: {e}"},
                         only_from=RUNNING)
        sys.exit(1)


if __name__ == "__main__":
    main()
