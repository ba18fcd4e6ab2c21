"""FSDP over torch.distributed (gloo, two ranks started by torch's launcher) on a tiny model:
the loss curve and the checkpoint equal the one-process run's (full SFT, LoRA SFT with CPU
offload, full DPO with its frozen reference sharded too), with a global batch the ranks split
unevenly (the last batch of 7 rows in 3s has one item: one rank computes nothing); a run
resumed from a sharded run's checkpoint (weights and Adam state) ends where one process does. Through
the HTTP API: a memory_efficient_fsdp_wrap job runs two ranks and gives the plain job's
curve; cancel stops every rank; a rank killed mid-run fails the job (and the CLI run), the
reason naming the rank and the signal that killed it rather than the other rank's broken
collective."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from tests.server_process import running_server
from tests.test_post_training_jobs import log_records, post, sft_request, status, wait_for

LOSS_TOLERANCE = 1e-4  # the bar for the 2-rank curve against the 1-rank one
WEIGHT_TOLERANCE = 1e-5
PROCESS_EXIT_WAIT_S = 30
PROCESS_GROUP_FAILURE_WAIT_S = 120  # the launcher notices a dead rank and stops the other
ROWS = [{"dialog": [{"role": "user", "content": f"What is the code word number {i}?"},
                    {"role": "assistant", "content": f"The code word number {i} is zebra-{i}."}]}
        for i in range(7)]
PAIRS = [{"prompt": [{"role": "user", "content": f"Code word {i}?"}], "chosen": f"zebra-{i}",
          "rejected": f"lion-{i}"} for i in range(7)]
# FSDP trains in float32: the one-process reference runs pin it too (a one-process adapter
# run would hold its base in bfloat16 by default on a CPU that multiplies it natively)
LORA_FLAGS = ["--algorithm", "lora", "--rank", "4", "--alpha", "8", "--lora-mlp", "--dtype", "fp32"]
KILLED_RANK_1 = "rank 1 was killed by signal SIGKILL (9)"
FIRST_STEP_WAIT_S = 300


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.conftest import make_tiny_llama
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_args(objective: str, model: str, data: Path, output: Path, extra: list[str]) -> list[str]:
    return ["train", objective, "--model", model, "--dataset", str(data), "--output", str(output),
            "--batch-size", "3", "--n-iters", "3", "--lr", "1e-3", "--warmup-steps", "1",
            "--max-grad-norm", "1.0", "--checkpoint-every", "2", *extra]


def _steps(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective, rows, extra, weights", [
    ("sft", ROWS, [], "model.safetensors"),
    ("sft", ROWS, LORA_FLAGS + ["--fsdp-cpu-offload"], "adapter_model.safetensors"),
    ("dpo", PAIRS, ["--beta", "0.1"], "model.safetensors"),
], ids=["full-sft", "lora-sft-cpu-offload", "full-dpo"])
def test_two_ranks_give_the_one_process_curve_and_checkpoint(tiny_model, tmp_path, objective,
                                                              rows, extra, weights) -> None:
    from llama_engine.cli import main
    data = _jsonl(tmp_path / "data.jsonl", rows)
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    plain = [flag for flag in extra if flag != "--fsdp-cpu-offload"]  # an option of FSDP
    main(_train_args(objective, tiny_model, data, single, plain))  # one process, no FSDP
    done = subprocess.run([sys.executable, "-m", "llama_engine.cli",
                           *_train_args(objective, tiny_model, data, sharded, extra),
                           "--nproc-per-node", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    expected, got = _steps(single), _steps(sharded)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for mine, reference in zip(got, expected):
        assert mine["num_tokens"] == reference["num_tokens"]  # the whole global batch
        for key in ("loss", "grad_norm") + (("rewards/margins",) if objective == "dpo" else ()):
            assert mine[key] == pytest.approx(reference[key], abs=LOSS_TOLERANCE), (key, mine)
    for step in ("step-2", "step-3"):
        reference, mine = load_file(single / step / weights), load_file(sharded / step / weights)
        assert mine.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(mine[name], tensor, atol=WEIGHT_TOLERANCE, rtol=0, msg=name)
    config = "adapter_config.json" if weights.startswith("adapter") else "config.json"
    assert (sharded / "step-3" / config).read_text() == (single / "step-3" / config).read_text()
    assert (sharded / "loss_curve.png").exists()


def test_two_ranks_resume_from_a_sharded_checkpoint(tiny_model, tmp_path) -> None:
    """Epoch 1 on two ranks, then a second run on the same folder goes on to epoch 2 from the
    saved (gathered) weights and Adam state: the end equals two straight epochs in one
    process. A constant lr keeps the schedule independent of the planned number of steps."""
    from llama_engine.cli import main
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    constant = ["--lr-min", "1e-3", "--warmup-steps", "0", "--checkpoint-every", "3", "--n-iters", "6"]
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    main(_train_args("sft", tiny_model, data, single, LORA_FLAGS + constant + ["--epochs", "2"]))
    for epochs in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "llama_engine.cli", *_train_args(
            "sft", tiny_model, data, sharded, LORA_FLAGS + constant + ["--epochs", epochs]),
            "--nproc-per-node", "2"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    assert [r["step"] for r in _steps(sharded)] == [1, 2, 3, 4, 5, 6]  # the second run: 4..6
    reference = load_file(single / "step-6" / "adapter_model.safetensors")
    mine = load_file(sharded / "step-6" / "adapter_model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(mine[name], tensor, atol=WEIGHT_TOLERANCE, rtol=0, msg=name)


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes torch's launcher (process `launcher`) started."""
    children = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    ranks = {}
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = pid
    return ranks


def test_a_killed_rank_fails_the_cli_run_naming_the_rank_and_signal(tiny_model, tmp_path) -> None:
    """`llama-engine train --nproc-per-node 2`, rank 1 killed (SIGKILL) mid-run: the run
    exits 1 with one error line naming rank 1 and the signal, and no rank is left."""
    data = _jsonl(tmp_path / "sft.jsonl", ROWS)
    output = tmp_path / "run"
    endless = ["--epochs", "100000", "--n-iters", "100000", "--checkpoint-every", "100000"]
    run = subprocess.Popen([sys.executable, "-m", "llama_engine.cli",
                            *_train_args("sft", tiny_model, data, output, endless),
                            "--nproc-per-node", "2"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + FIRST_STEP_WAIT_S
        metrics = output / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):  # both ranks train
            assert run.poll() is None and time.monotonic() < deadline, "no step was logged"
            time.sleep(0.2)
        ranks = _rank_pids(run.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], 9)
        _, stderr = run.communicate(timeout=PROCESS_GROUP_FAILURE_WAIT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, stderr[-4000:]
    assert stderr.strip().splitlines()[-1].startswith(f"llama-engine: error: {KILLED_RANK_1}"), \
        stderr[-4000:]
    _wait_gone(list(ranks.values()))


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + PROCESS_EXIT_WAIT_S
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]


def test_fsdp_jobs_through_the_http_api(tiny_model, tmp_path) -> None:
    data = _jsonl(tmp_path / "sft.jsonl", ROWS)
    with running_server("--model", f"tiny={tiny_model}", "--state-dir", str(tmp_path / "state"),
                        "--fsdp-nproc-per-node", "2") as server:
        refused = post(server, "/post_training/supervised_fine_tune/", sft_request(
            "offload-alone", data, **{"training_config.fsdp_cpu_offload": True}))
        assert (refused.status_code, refused.json()["error"]["param"]) == \
            (400, "training_config.fsdp_cpu_offload")

        plain = sft_request("plain", data, n_iters=3, **{"training_config.batch_size": 3})
        sharded = {**plain, "job_uuid": "fsdp",
                   "training_config": {**plain["training_config"], "memory_efficient_fsdp_wrap": True}}
        for body in (plain, sharded):
            assert post(server, "/post_training/supervised_fine_tune/", body).status_code == 200
        curves = {}
        for job in ("plain", "fsdp"):
            records = list(log_records(server, job))
            assert records[-1] == {"event": "completed"}, records[-3:]
            curves[job] = [r["loss"] for r in records if "loss" in r]
        assert curves["fsdp"] == pytest.approx(curves["plain"], abs=LOSS_TOLERANCE)
        resources = status(server, "fsdp")["resources_allocated"]
        assert resources["processes"] == 2 and len(set(resources["pids"])) == 2
        assert resources["launcher"] == "torch.distributed.run"
        checkpoint = status(server, "fsdp")["checkpoints"][-1]["path"].removeprefix("file://")
        reference = status(server, "plain")["checkpoints"][-1]["path"].removeprefix("file://")
        mine, expected = (load_file(Path(p, "model.safetensors")) for p in (checkpoint, reference))
        for name, tensor in expected.items():
            torch.testing.assert_close(mine[name], tensor, atol=WEIGHT_TOLERANCE, rtol=0, msg=name)

        long = {**sharded, "job_uuid": "long",
                "training_config": {**sharded["training_config"], "n_iters": 100_000},
                "logger_config": {"checkpoint_every_n_steps": 100_000}}
        for job_uuid, stop in (("long", "cancel"), ("crash", "kill a rank")):
            assert post(server, "/post_training/supervised_fine_tune/",
                        {**long, "job_uuid": job_uuid}).status_code == 200
            records = log_records(server, job_uuid)
            next(r for r in records if "loss" in r)  # both ranks train
            pids = status(server, job_uuid)["resources_allocated"]["pids"]
            assert len(pids) == 2
            if stop == "cancel":
                assert post(server, "/post_training/job/cancel", job_uuid=job_uuid).status_code == 200
            else:
                os.kill(pids[1], 9)  # rank 1 dies; rank 0 must not wait for it forever
            failed = next(r for r in records if r.get("event") == "failed")
            if stop == "cancel":
                assert failed["reason"] == "cancelled by the user"
            else:  # the killed rank and its signal, not rank 0's broken collective
                assert failed["reason"].startswith(KILLED_RANK_1), failed
            assert wait_for(server, job_uuid, lambda s: s["status"] == "failed", "failed")
            _wait_gone(pids)
        assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200
