"""RewardScoring and SyntheticDataGeneration over HTTP, on a tiny random policy and a tiny
random LlamaForSequenceClassification reward model: scores in request order match
transformers; bad input is a 4xx naming the field; the loop end to end (generate, filter,
save as a dataset, fine-tune on it) completes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import torch

from llama_engine.synthetic_data import reply_token_ids
from tests.conftest import make_tiny_llama
from tests.server_process import ServerProcess, running_server
from tests.test_post_training_jobs import sft_request, wait_for

TIMEOUT_S = 120
TOLERANCE = 1e-4
SYSTEM = {"role": "system", "content": "You answer in one short sentence, and you are always "
          "polite to the person asking the question."}
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Name a colour of the rainbow."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return (make_tiny_llama(str(tmp_path_factory.mktemp("policy")), seed=0),
            make_tiny_llama(str(tmp_path_factory.mktemp("reward")), seed=1, reward_model=True))


@pytest.fixture(scope="module")
def server(folders: tuple[str, str]) -> Iterator[ServerProcess]:
    policy, reward = folders
    # float32: the scores are compared with transformers' float32 ones within 1e-4 (the
    # bfloat16 default on AMX CPUs is held to transformers in tests/test_reward_model.py)
    with running_server("--model", f"tiny={policy}", "--reward-model", f"rm={reward}",
                        "--reward-dtype", "float32") as s:
        yield s


@pytest.mark.parametrize("argv, on_native_bf16, elsewhere", [
    ([], "bfloat16", None),  # None: the engine's default (float32 on the CPU)
    (["--reward-dtype", "float32"], "float32", "float32"),
    (["--dtype", "float32"], "float32", "float32"),
    (["--reward-dtype", "bfloat16", "--dtype", "float32"], "bfloat16", "bfloat16")])
def test_the_reward_model_runs_bfloat16_by_default_where_the_cpu_multiplies_it(
        argv: list[str], on_native_bf16: str, elsewhere: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bfloat16 on a CPU with native bfloat16 unless --dtype says otherwise, --dtype's
    choice elsewhere; an explicit --reward-dtype wins."""
    import argparse
    from llama_engine import kernels
    from server.cli import add_serve_arguments, reward_dtype
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--device", "cpu", *argv])
    for fast, expected in ((True, on_native_bf16), (False, elsewhere)):
        monkeypatch.setattr(kernels, "bf16_matmul_is_fast", lambda: fast)
        assert reward_dtype(args) == expected


def test_a_bfloat16_reward_model_loads_beside_lora_adapters(folders: tuple[str, str]) -> None:
    """--enable-lora / --lora are the served models': the bfloat16 reward model (which
    takes no adapters) still loads, and the served model keeps its adapters."""
    import argparse
    from server.cli import add_serve_arguments, load_model
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--enable-lora"])
    reward, _ = load_model(args, "rm", folders[1], dtype="bfloat16")
    assert reward.is_reward_model
    policy, _ = load_model(args, "tiny", folders[0])
    assert policy.engine.engine.lora_manager is not None


@pytest.fixture(scope="module")
def reference(folders: tuple[str, str]):
    """transformers' score of (messages, reply), tokenized as reward training tokenizes it."""
    import transformers
    from llama_engine.tokenizer import Tokenizer
    model = transformers.LlamaForSequenceClassification.from_pretrained(
        folders[1], dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(folders[1])

    def score(messages: list[dict], reply: str) -> float:
        ids = reply_token_ids(tokenizer, messages, reply)
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    return score


def post(server: ServerProcess, path: str, body: Any) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_scores_come_in_request_order_and_match_transformers(server, reference) -> None:
    prompt_generations = [
        {"dialog": {"message": user(q), "message_history": [SYSTEM]},
         "k_generations": [assistant(f"Answer {j} to {q}") for j in range(3 + i)]}
        for i, q in enumerate(QUESTIONS)]
    for model in ("llama3_405b_reward", "rm"):
        response = post(server, "/reward_scoring/score",
                        {"model": model, "prompt_generations": prompt_generations})
        assert response.status_code == 200, response.text
        scored = response.json()["scored_generations"]
        assert len(scored) == len(QUESTIONS)
        for pg, result in zip(prompt_generations, scored):
            assert result["prompt"]["content"] == pg["dialog"]["message"]["content"]
            got = result["k_scored_generations"]
            assert [g["message"]["content"] for g in got] == [
                g["content"] for g in pg["k_generations"]]
            messages = [SYSTEM, pg["dialog"]["message"]]
            assert [g["score"] for g in got] == pytest.approx(
                [reference(messages, g["content"]) for g in pg["k_generations"]], abs=TOLERANCE)


def sdg_body(**fields: Any) -> dict:
    body = {"prompts": [user(q) for q in QUESTIONS], "filtering_function": "none", "k": 2,
            "max_tokens": 6, "sampling_params": {"seed": 1}}
    body.update(fields)
    return body


SCORE_BODY = {"model": "rm", "prompt_generations": [
    {"dialog": {"message": user("Hi")}, "k_generations": [assistant("Hello")]}]}


@pytest.mark.parametrize("path, body, status, param", [
    ("/reward_scoring/score", {**SCORE_BODY, "model": "nope"}, 404, "model"),
    ("/reward_scoring/score", {**SCORE_BODY, "model": "tiny"}, 400, "model"),
    ("/reward_scoring/score", {**SCORE_BODY, "prompt_generations": []}, 400, "prompt_generations"),
    ("/synthetic_data_generation/generate", sdg_body(prompts=[]), 400, "prompts"),
    ("/synthetic_data_generation/generate", sdg_body(k=0), 400, "k"),
    ("/synthetic_data_generation/generate", sdg_body(k=65), 400, "k"),
    ("/synthetic_data_generation/generate", sdg_body(filtering_params={"p": 0.0}), 400,
     "filtering_params.p"),
    ("/synthetic_data_generation/generate", sdg_body(filtering_params={"p": 1.5}), 400,
     "filtering_params.p"),
    ("/synthetic_data_generation/generate", sdg_body(reward_model="nope"), 404, "reward_model"),
    ("/synthetic_data_generation/generate", sdg_body(reward_scoring={"model": "tiny"}), 400,
     "reward_scoring.model"),
    ("/synthetic_data_generation/generate", sdg_body(model="rm"), 400, "model"),
    ("/synthetic_data_generation/generate", sdg_body(filtering_function="best"), 400,
     "filtering_function"),
    # a dpo dataset pairs two kept generations of a prompt: refused before generating when
    # the request keeps at most one (top_k's filtering_params.k defaults to 1)
    ("/synthetic_data_generation/generate", sdg_body(k=1, save_as_dataset="never-dpo",
                                                     dataset_type="dpo"), 400, "k"),
    ("/synthetic_data_generation/generate", sdg_body(k=3, filtering_function="top_k",
                                                     save_as_dataset="never-dpo",
                                                     dataset_type="dpo"), 400,
     "filtering_params.k"),
    # a reward model is no base to fine-tune: it has no LM head
    ("/post_training/supervised_fine_tune/", sft_request("sft-on-rm", Path("/unused.jsonl"),
                                                         model="rm"), 400, "model"),
])
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, param) -> None:
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error


def test_generate_filter_save_and_fine_tune_end_to_end(server, reference, tmp_path: Path) -> None:
    response = post(server, "/synthetic_data_generation/generate", sdg_body(
        k=3, filtering_function="top_k", filtering_params={"k": 2}, save_as_dataset="sdg-sft"))
    assert response.status_code == 200, response.text
    result = response.json()
    stats = result["statistics"]
    assert (stats["num_prompts"], stats["num_generated"], stats["num_kept"]) == (3, 9, 6)
    assert stats["tokens_generated"] > 0 and stats["generation_tokens_per_s"] > 0
    assert stats["prefix_cache_hit_rate"] > 0  # a prompt's 3 replies share its blocks
    assert stats["dataset_saved"] and stats["dataset_id"] == "sdg-sft" and stats["dataset_rows"] == 6
    for question, data in zip(QUESTIONS, result["synthetic_data"]):
        assert data["prompt"]["content"] == question
        kept = data["k_scored_generations"]
        assert len(kept) == 2
        for g in kept:
            assert g["message"]["role"] == "assistant"
            assert g["score"] == pytest.approx(reference([user(question)], g["message"]["content"]),
                                               abs=TOLERANCE)
            assert stats["score_min"] - TOLERANCE <= g["score"] <= stats["score_max"] + TOLERANCE

    dataset = requests.get(f"{server.base_url}/datasets/get", params={"dataset_id": "sdg-sft"},
                           timeout=TIMEOUT_S)
    assert dataset.status_code == 200, dataset.text
    assert dataset.json()["columns"] == {"dialog": "dialog"}
    assert post(server, "/synthetic_data_generation/generate",
                sdg_body(save_as_dataset="sdg-sft")).status_code == 409

    registered = {"columns": {"dialog": "dialog"}, "content_url": dataset.json()["content_url"],
                  "metadata": {"dataset_id": "sdg-sft"}}
    body = sft_request("sdg-sft-job", tmp_path / "unused.jsonl", n_iters=2, model="tiny",
                       dataset=registered, validation_dataset=registered, algorithm="lora")
    job = post(server, "/post_training/supervised_fine_tune/", body)
    assert job.status_code == 200, job.text
    done = wait_for(server, "sdg-sft-job", lambda s: s["status"] in ("completed", "failed"),
                    "finished")
    assert done["status"] == "completed", server.log()[-3000:]
    assert done["checkpoints"]


def test_save_as_a_dpo_dataset_pairs_the_best_and_worst_of_each_prompt(server, reference) -> None:
    response = post(server, "/synthetic_data_generation/generate", sdg_body(
        k=3, save_as_dataset="sdg-dpo", dataset_type="dpo"))
    assert response.status_code == 200, response.text
    data = response.json()["synthetic_data"]
    dataset = requests.get(f"{server.base_url}/datasets/get", params={"dataset_id": "sdg-dpo"},
                           timeout=TIMEOUT_S).json()
    assert dataset["columns"] == {"prompt": "dialog", "chosen": "text", "rejected": "text"}
    from llama_engine.datasets import fetch_content, parse_rows
    rows = parse_rows(fetch_content(dataset["content_url"]), dataset["columns"])
    expected = []
    for question, d in zip(QUESTIONS, data):
        ranked = sorted(d["k_scored_generations"], key=lambda g: -g["score"])
        if ranked[0]["score"] > ranked[-1]["score"]:
            expected.append({"prompt": [user(question)], "chosen": ranked[0]["message"]["content"],
                             "rejected": ranked[-1]["message"]["content"]})
    assert rows == expected and rows


def test_saving_when_the_filter_keeps_nothing_returns_the_statistics_and_saves_nothing(server) -> None:
    """sigmoid far above every score keeps nothing: a 200 with empty synthetic_data, the
    statistics of every generation and why no dataset was saved; no dataset exists."""
    response = post(server, "/synthetic_data_generation/generate", sdg_body(
        filtering_function="sigmoid", filtering_params={"threshold": 1e6, "seed": 0},
        save_as_dataset="sdg-nothing-kept"))
    assert response.status_code == 200, response.text
    result = response.json()
    assert [d["k_scored_generations"] for d in result["synthetic_data"]] == [[]] * len(QUESTIONS)
    stats = result["statistics"]
    assert (stats["num_generated"], stats["num_kept"]) == (2 * len(QUESTIONS), 0)
    assert stats["dataset_saved"] is False and stats["dataset_rows"] == 0
    assert "sigmoid" in stats["dataset_not_saved_reason"] and "dataset_id" not in stats
    missing = requests.get(f"{server.base_url}/datasets/get",
                           params={"dataset_id": "sdg-nothing-kept"}, timeout=TIMEOUT_S)
    assert missing.status_code == 404, missing.text
