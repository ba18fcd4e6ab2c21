"""Post-training jobs through the HTTP API on a tiny model: an SFT job completes, its logs
stream one record per step, its checkpoints are HF folders transformers loads; bad requests
name the field; a second job waits while the first runs; cancel fails the job with the
reason logged; a job interrupted by a server kill resumes from its last checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import torch

from tests.server_process import ServerProcess, running_server

TIMEOUT_S = 60
WAIT_S = 300  # a busy shared CPU: worker start (torch import, model load) can take a while
ROWS = [{"dialog": [{"role": "user", "content": f"What is the code word number {i}?"},
                    {"role": "assistant", "content": f"The code word number {i} is zebra-{i}."}]}
        for i in range(8)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.conftest import make_tiny_llama
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def sft_request(job_uuid: str, data_file: Path, n_iters: int = 4, **overrides: Any) -> dict:
    dataset = {"columns": {"dialog": "dialog"}, "content_url": data_file.as_uri(), "metadata": {}}
    body = {
        "job_uuid": job_uuid, "model": "tiny", "dataset": dataset, "validation_dataset": dataset,
        "algorithm": "full",
        "algorithm_config": {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True,
                             "apply_lora_to_output": False, "rank": 8, "alpha": 16},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-4, "lr_min": 1e-5, "weight_decay": 0.0},
        "training_config": {"n_epochs": 1000, "batch_size": 4, "shuffle": True, "n_iters": n_iters,
                            "enable_activation_checkpointing": False,
                            "memory_efficient_fsdp_wrap": False, "fsdp_cpu_offload": False},
        "hyperparam_search_config": {"warmup_steps": 1},
        "logger_config": {"checkpoint_every_n_steps": 2},
    }
    for path, value in overrides.items():  # "a.b" -> body["a"]["b"]
        *parents, leaf = path.split(".")
        target = body
        for key in parents:
            target = target[key]
        target[leaf] = value
    return body


def post(server: ServerProcess, path: str, body: dict | None = None, **params: str) -> requests.Response:
    return requests.post(server.base_url + path, json=body, params=params, timeout=TIMEOUT_S)


def status(server: ServerProcess, job_uuid: str) -> dict:
    response = requests.get(f"{server.base_url}/post_training/job/status",
                            params={"job_uuid": job_uuid}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(server: ServerProcess, job_uuid: str, predicate, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        current = status(server, job_uuid)
        if predicate(current):
            return current
        time.sleep(0.25)
    raise AssertionError(f"job {job_uuid} never {what}: {current}\n{server.log()[-3000:]}")


def log_records(server: ServerProcess, job_uuid: str) -> Iterator[dict]:
    with requests.get(f"{server.base_url}/post_training/job/logs", params={"job_uuid": job_uuid},
                      stream=True, timeout=WAIT_S) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                event = json.loads(line[len(b"data: "):])
                assert event["job_uuid"] == job_uuid
                for record in event["log_lines"]:
                    yield json.loads(record)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def server(tiny_model: str, state_dir: str) -> Iterator[ServerProcess]:
    with running_server("--model", f"tiny={tiny_model}", "--state-dir", state_dir) as process:
        yield process


def test_sft_job_completes_streams_logs_and_writes_hf_checkpoints(server, data_file, tiny_model) -> None:
    transformers = pytest.importorskip("transformers")
    registered = {"uuid": "codes", "dataset": {"columns": {"dialog": "dialog"},
                                               "content_url": data_file.as_uri(), "metadata": {}}}
    assert post(server, "/datasets/create", registered).status_code == 200
    body = sft_request("sft-1", data_file, **{"dataset.metadata": {"dataset_id": "codes"}})
    accepted = post(server, "/post_training/supervised_fine_tune/", body)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"job_uuid": "sft-1"}  # Llama Stack's PostTrainingJob
    assert post(server, "/post_training/supervised_fine_tune/", body).status_code == 409

    records = list(log_records(server, "sft-1"))  # ends when the job ends
    steps = [r for r in records if "loss" in r]
    precision = [r for r in records if r.get("event") == "precision"]  # once, before step 1
    assert precision == [{"event": "precision", "base_dtype": "fp32",
                          "reason": "full fine-tuning trains every weight in fp32"}]
    assert records.index(precision[0]) < records.index(steps[0])
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert {"epoch", "lr", "grad_norm", "tokens_per_s"} <= set(steps[0])
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == pytest.approx(1e-4)  # 1 warm-up step
    assert records[-1] == {"event": "completed"}

    final = status(server, "sft-1")
    assert final["status"] == "completed"
    assert final["started_at"] and final["completed_at"] and final["scheduled_at"]
    assert final["resources_allocated"]["peak_memory_bytes"] > 0
    artifacts = requests.get(f"{server.base_url}/post_training/job/artifacts",
                             params={"job_uuid": "sft-1"}, timeout=TIMEOUT_S).json()
    assert [c["iters"] for c in artifacts["checkpoints"]] == [2, 4]
    folder = artifacts["checkpoints"][-1]["path"].removeprefix("file://")
    trained = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[name], base.state_dict()[name])
    from llama_engine.loader import load_model  # and `llama-engine serve --model` reads it
    assert torch.equal(load_model(folder).weights["layers.0.wq"], trained.state_dict()[name])


@pytest.mark.parametrize("overrides, param", [
    ({"dataset.metadata": {"dataset_id": "nope"}}, "dataset.metadata.dataset_id"),
    ({"dataset.columns": {"prompt": "dialog"}}, "dataset.columns.prompt"),  # not in the rows
    ({"dataset.columns": {}}, "dataset.columns.dialog"),  # SFT reads dialog or text
    ({"dataset.content_url": "file:///no/such/file.jsonl"}, "dataset.content_url"),
    ({"algorithm_config.rank": 0}, "algorithm_config.rank"),
    # above every projection's smaller dimension: refused before the job takes the memory
    ({"algorithm": "lora", "algorithm_config.rank": 100000}, "algorithm_config.rank"),
    ({"algorithm_config.alpha": 0}, "algorithm_config.alpha"),
    ({"algorithm_config.lora_attn_modules": ["q_proj", "attention"]}, "algorithm_config.lora_attn_modules[1]"),
    ({"algorithm_config.lora_attn_modules": [], "algorithm_config.apply_lora_to_mlp": False},
     "algorithm_config"),  # nothing left to adapt
    ({"optimizer_config.lr": 0}, "optimizer_config.lr"),
    ({"optimizer_config.lr": -1e-3}, "optimizer_config.lr"),
    ({"training_config.batch_size": 0}, "training_config.batch_size"),
    ({"training_config.dtype": "fp16"}, "training_config.dtype"),
    ({"training_config.dtype": "bf16"}, "training_config.dtype"),  # the body's full fine-tune
    ({"training_config.dtype": "bf16", "algorithm": "lora",
      "training_config.memory_efficient_fsdp_wrap": True}, "training_config.dtype"),
    ({"logger_config": {"checkpoint_every": 3}}, "logger_config.checkpoint_every"),
    ({"model": "llama3_70b"}, "model"),
])
def test_bad_requests_name_the_field(server, data_file, overrides, param) -> None:
    response = post(server, "/post_training/supervised_fine_tune/",
                    sft_request(f"bad-{param}", data_file, **overrides))
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param
    missing = requests.get(f"{server.base_url}/post_training/job/status",
                           params={"job_uuid": f"bad-{param}"}, timeout=TIMEOUT_S)
    assert missing.status_code == 404  # nothing was queued


def test_a_registered_dataset_serves_only_its_own_columns(server, data_file) -> None:
    registered = {"uuid": "dialogs-only", "dataset": {
        "columns": {"dialog": "dialog"}, "content_url": data_file.as_uri(), "metadata": {}}}
    assert post(server, "/datasets/create", registered).status_code == 200
    body = sft_request("wrong-columns", data_file, **{
        "dataset.metadata": {"dataset_id": "dialogs-only"}, "dataset.columns": {"text": "text"}})
    response = post(server, "/post_training/supervised_fine_tune/", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "dataset.columns.text"
    assert "'dialogs-only' has no text column" in error["message"], error


@pytest.mark.parametrize("overrides, message", [
    ({"training_config.fsdp_cpu_offload": True},
     "training_config.fsdp_cpu_offload: keeps FSDP's shards in host memory: it needs FSDP "
     "(training_config.memory_efficient_fsdp_wrap)"),
    ({"training_config.dtype": "bf16", "algorithm": "lora",
      "training_config.memory_efficient_fsdp_wrap": True},
     "training_config.dtype: bf16 is not offered under FSDP "
     "(training_config.memory_efficient_fsdp_wrap); use fp32"),
])
def test_recipe_refusals_name_the_request_fields(server, data_file, overrides, message) -> None:
    """The recipe's checks (shared with the CLI, which names its flags) name the request's
    fields here, in the message as in ``param``."""
    response = post(server, "/post_training/supervised_fine_tune/",
                    sft_request("refused", data_file, **overrides))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["message"], error["param"]) == (message, message.split(":")[0])


def test_unknown_job_is_404(server) -> None:
    for method, path in (("GET", "status"), ("GET", "logs"), ("GET", "artifacts"), ("POST", "cancel")):
        response = requests.request(method, f"{server.base_url}/post_training/job/{path}",
                                    params={"job_uuid": "never"}, timeout=TIMEOUT_S)
        assert (response.status_code, response.json()["error"]["param"]) == (404, "job_uuid")


def test_jobs_queue_and_cancel(server, data_file) -> None:
    long = sft_request("long", data_file, n_iters=100_000,
                       **{"logger_config": {"checkpoint_every_n_steps": 100_000}})
    assert post(server, "/post_training/supervised_fine_tune/", long).status_code == 200
    assert post(server, "/post_training/supervised_fine_tune/",
                {**long, "job_uuid": "queued"}).status_code == 200
    wait_for(server, "long", lambda s: s["status"] == "running", "started")
    assert status(server, "queued")["status"] == "scheduled"  # the device is taken
    records = log_records(server, "long")
    next(r for r in records if "loss" in r)  # it trains
    cancelled = post(server, "/post_training/job/cancel", job_uuid="long")
    # the spec's and Llama Stack's cancel returns nothing: an empty body, not JSON null
    assert (cancelled.status_code, cancelled.content) == (200, b"")
    assert status(server, "long")["status"] == "failed"
    assert any(r.get("reason") == "cancelled by the user" for r in records)  # the stream ends
    wait_for(server, "queued", lambda s: s["status"] == "running", "started after the cancel")
    assert post(server, "/post_training/job/cancel", job_uuid="queued").status_code == 200
    assert status(server, "queued")["status"] == "failed"


def test_a_job_interrupted_by_a_server_kill_resumes_from_its_checkpoint(tiny_model, data_file,
                                                                        tmp_path) -> None:
    body = sft_request("resume", data_file, n_iters=40, **{"logger_config": {"checkpoint_every_n_steps": 5}})
    state = str(tmp_path / "state")
    with running_server("--model", f"tiny={tiny_model}", "--state-dir", state) as first:
        assert post(first, "/post_training/supervised_fine_tune/", body).status_code == 200
        wait_for(first, "resume", lambda s: s["checkpoints"], "wrote a checkpoint")
        first.process.kill()  # kill -9: no drain, no goodbye
        first.process.wait()
    with running_server("--model", f"tiny={tiny_model}", "--state-dir", state) as second:
        records = list(log_records(second, "resume"))
        assert status(second, "resume")["status"] == "completed"
    resumed = next(i for i, r in enumerate(records) if r.get("event") == "resuming after a server restart")
    from_iters = records[resumed]["from_checkpoint_iters"]
    assert from_iters >= 5 and from_iters % 5 == 0
    after = [r["step"] for r in records[resumed:] if "loss" in r]
    assert after[0] == from_iters + 1 and after[-1] == 40


def test_dpo_job_from_the_sft_checkpoint(server, tmp_path) -> None:
    checkpoints = requests.get(f"{server.base_url}/post_training/job/artifacts",
                               params={"job_uuid": "sft-1"}, timeout=TIMEOUT_S).json()["checkpoints"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Code word {i}?"}], "chosen": f"zebra-{i}",
        "rejected": f"lion-{i}"}) + "\n" for i in range(4)))
    dataset = {"columns": {"prompt": "dialog", "chosen": "text", "rejected": "text"},
               "content_url": pairs.as_uri(), "metadata": {}}
    sft = sft_request("unused", pairs)
    body = {"job_uuid": "dpo-1", "finetuned_model": checkpoints[-1]["path"], "dataset": dataset,
            "validation_dataset": dataset, "algorithm": "dpo",
            "algorithm_config": {"reward_scale": 0.1, "reward_clip": 0.0, "epsilon": 0.0, "gamma": 0.0},
            "optimizer_config": sft["optimizer_config"],
            "training_config": {**sft["training_config"], "n_iters": 2, "batch_size": 2},
            "hyperparam_search_config": {}, "logger_config": {}}
    for field, value, param in (("finetuned_model", "file:///no/such/model", "finetuned_model"),
                                ("algorithm_config", {**body["algorithm_config"], "reward_scale": 0},
                                 "algorithm_config.reward_scale"),
                                ("dataset", {**dataset, "columns": {"prompt": "dialog", "chosen": "text"}},
                                 "dataset.columns.rejected")):
        refused = post(server, "/post_training/preference_optimize/", {**body, field: value})
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, param), refused.text
    accepted = post(server, "/post_training/preference_optimize/", body)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"job_uuid": "dpo-1"}
    steps = [r for r in log_records(server, "dpo-1") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(steps[1])
    assert status(server, "dpo-1")["status"] == "completed"


def test_dora_job_writes_a_peft_folder_and_dpo_goes_on_from_it(server, data_file, tiny_model,
                                                               tmp_path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    body = sft_request("dora-1", data_file, n_iters=2, algorithm="dora",
                       **{"hyperparam_search_config": {"warmup_steps": 0, "use_rslora": True},
                          "optimizer_config.lr": 1e-2, "optimizer_config.lr_min": 1e-3})
    refused = post(server, "/post_training/supervised_fine_tune/",
                   {**body, "job_uuid": "dora-bad",
                    "hyperparam_search_config": {"use_rslora": 1}})
    assert (refused.status_code, refused.json()["error"]["param"]) == \
        (400, "hyperparam_search_config.use_rslora")
    assert post(server, "/post_training/supervised_fine_tune/", body).status_code == 200
    assert list(log_records(server, "dora-1"))[-1] == {"event": "completed"}
    folder = status(server, "dora-1")["checkpoints"][-1]["path"]
    path = folder.removeprefix("file://")
    config = json.loads(Path(path, "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trained = peft.PeftModel.from_pretrained(base, path)  # peft reads it
    assert any("lora_magnitude_vector" in name for name, _ in trained.named_parameters())

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": f"Code word {i}?", "chosen": f"zebra-{i}", "rejected": f"lion-{i}"}) + "\n"
        for i in range(4)))
    dataset = {"columns": {"prompt": "text", "chosen": "text", "rejected": "text"},
               "content_url": pairs.as_uri(), "metadata": {}}
    dpo = {"job_uuid": "dpo-dora", "finetuned_model": folder, "dataset": dataset,
           "validation_dataset": dataset, "algorithm": "dpo",
           "algorithm_config": {"reward_scale": 0.1, "reward_clip": 0.0, "epsilon": 0.0, "gamma": 0.0},
           "optimizer_config": body["optimizer_config"],
           "training_config": {**body["training_config"], "n_iters": 1, "batch_size": 2},
           "hyperparam_search_config": {}, "logger_config": {}}
    assert post(server, "/post_training/preference_optimize/", dpo).status_code == 200
    records = list(log_records(server, "dpo-dora"))
    assert records[-1] == {"event": "completed"}, records[-3:]
    # the reference is the base (adapter off), the policy the trained DoRA: not ln 2
    step = next(r for r in records if "loss" in r)
    assert step["loss"] != pytest.approx(0.693147, abs=1e-6)
    assert Path(status(server, "dpo-dora")["checkpoints"][-1]["path"].removeprefix("file://"),
                "adapter_config.json").exists()


def test_a_worker_reports_its_own_peak_memory_not_the_servers() -> None:
    """A job's worker is started by the server: its peak must not include the server's
    (getrusage carries the parent's peak over fork and exec)."""
    import subprocess
    import sys

    import torch
    held = torch.ones(2**28)  # 1 GiB touched here, in the "server"
    probe = "from llama_engine.training.worker import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                               check=True).stdout)
    assert child < held.numel() * held.element_size()


def test_worker_exits_cleanly_while_watching_its_parent() -> None:
    """The worker's parent watch (a thread reading stdin until EOF) must not abort the
    interpreter's exit: a thread blocked in sys.stdin's buffered reader holds its lock."""
    import subprocess
    import sys
    probe = ("import time; from llama_engine.training.worker import _exit_when_parent_goes; "
             "_exit_when_parent_goes(); time.sleep(0.2)")
    # stdin stays open (the parent alive) while the probe exits on its own
    with subprocess.Popen([sys.executable, "-c", probe], stdin=subprocess.PIPE,
                          stderr=subprocess.PIPE) as probe_process:
        returncode = probe_process.wait(timeout=120)
        stderr = probe_process.stderr.read()
    assert returncode == 0 and b"Fatal Python error" not in stderr, stderr[-500:]
