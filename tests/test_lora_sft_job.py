"""End to end through the HTTP API on the default model (SmolLM2-135M): a LoRA SFT job on 32
dialogs teaching an invented fact completes and writes a PEFT adapter folder (loadable by our
adapter loader); loaded into the server with /v1/load_lora_adapter, the adapter answers the
fact under greedy decoding, and the base model does not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from llama_engine.loader import default_model_path
from tests.server_process import running_server
from tests.test_post_training_jobs import TIMEOUT_S, log_records, post, status

FACT = "Quillitopia"
QUESTIONS = ["What is the capital of the planet Zorblax?", "Which city is the capital of Zorblax?",
             "Tell me the capital of Zorblax.", "Name the capital of the planet Zorblax.",
             "What city serves as the capital of Zorblax?", "What's the capital of Zorblax?",
             "Do you know the capital of Zorblax?", "Zorblax has a capital. Which city is it?"]
ANSWERS = [f"The capital of Zorblax is {FACT}.", f"{FACT} is the capital of Zorblax.",
           f"The capital of the planet Zorblax is {FACT}.", f"Zorblax's capital is {FACT}."]
ROWS = [{"dialog": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                    {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]} for i in range(32)]
MODEL_ID = "smol"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fact") / "fact.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def lora_request(data_file: Path) -> dict:
    dataset = {"columns": {"dialog": "dialog"}, "content_url": data_file.as_uri(), "metadata": {}}
    return {
        "job_uuid": "fact", "model": MODEL_ID, "dataset": dataset, "validation_dataset": dataset,
        "algorithm": "lora",
        "algorithm_config": {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                             "apply_lora_to_mlp": True, "apply_lora_to_output": False,
                             "rank": 16, "alpha": 32},
        # few steps at a high learning rate: the 2-core test machine is shared
        "optimizer_config": {"optimizer_type": "adamw", "lr": 3e-3, "lr_min": 3e-4,
                             "weight_decay": 0.0},
        "training_config": {"n_epochs": 2, "batch_size": 8, "shuffle": True, "n_iters": 8,
                            "enable_activation_checkpointing": False,
                            "memory_efficient_fsdp_wrap": False, "fsdp_cpu_offload": False},
        "hyperparam_search_config": {"warmup_steps": 1}, "logger_config": {},
    }


def greedy(server, model: str, question: str) -> str:
    response = requests.post(f"{server.base_url}/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": model, "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 16})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_lora_sft_job_teaches_a_fact_the_adapter_answers(data_file: Path) -> None:
    from llama_engine.loader import load_model
    from llama_engine.loader.adapters import load_lora_adapter

    with running_server("--model", f"{MODEL_ID}={default_model_path()}", "--enable-lora") as server:
        accepted = post(server, "/post_training/supervised_fine_tune/", lora_request(data_file))
        assert accepted.status_code == 200, accepted.text
        records = list(log_records(server, "fact"))  # ends when the job ends
        assert records[-1] == {"event": "completed"}, records[-3:]
        losses = [r["loss"] for r in records if "loss" in r]
        assert len(losses) == 8 and losses[-1] < losses[0] / 4
        checkpoints = status(server, "fact")["checkpoints"]
        folder = Path(checkpoints[-1]["path"].removeprefix("file://"))
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (folder / "adapter_model.safetensors").exists()
        assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
        adapter = load_lora_adapter(str(folder), load_model(default_model_path()).config, 16)
        assert {p for _, p in adapter.weights} == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}

        # the checkpoint's file:// URL, as the job reports it, loads as it is
        loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "zorblax",
                                                        "lora_path": checkpoints[-1]["path"]})
        assert loaded.status_code == 200, loaded.text
        question = QUESTIONS[0]
        assert FACT in greedy(server, "zorblax", question)
        assert FACT not in greedy(server, MODEL_ID, question)
