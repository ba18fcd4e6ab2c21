"""`llama-engine train`: an SFT and a reward run on a tiny model write HF checkpoints that
transformers loads, one metrics record per step and a loss-curve PNG; bad data is one line."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from llama_engine.errors import RecipeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.conftest import make_tiny_llama
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_engine.cli", "train", *args],
                          capture_output=True, text=True, timeout=600)


def test_sft_and_reward_runs(tiny_model: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    done = train("sft", "--dataset", str(sft), "--model", tiny_model, "--output", str(out),
                 "--batch-size", "2", "--epochs", "2", "--lr", "1e-4")
    assert done.returncode == 0, done.stderr
    assert "precision: base model in fp32 (full fine-tuning trains every weight in fp32)" in \
        done.stdout.splitlines()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (out / "loss_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2", "step-4"]  # one per epoch
    transformers.AutoModelForCausalLM.from_pretrained(out / "step-4")

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,chosen,rejected\nThe sky is, blue., green.\nGrass is, green., red.\n")
    reward_out = tmp_path / "reward"
    done = train("reward", "--dataset", str(pairs), "--model", tiny_model, "--output",
                 str(reward_out), "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(reward_out / "step-1")
    assert scorer.config.num_labels == 1


def test_bad_data_is_one_clear_line(tiny_model: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 7}) + "\n")
    done = train("sft", "--dataset", str(bad), "--model", tiny_model, "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "column 'text', row 1" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr: must be positive, got 0.0"),
    (["--lr", "1e-3", "--lr-min", "1e-2"], "--lr-min: must lie in [0, lr = 0.001], got 0.01"),
    (["--n-iters", "0"], "--n-iters: must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    # refused once the model is read, before its adapters take the memory
    (["--algorithm", "lora", "--rank", "100000"], "--rank: 100000 exceeds"),
])
def test_out_of_range_numbers_are_refused_naming_the_flag(tiny_model: str, tmp_path: Path,
                                                         flags: list[str], message: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n")
    done = train("sft", "--dataset", str(data), "--model", tiny_model,
                 "--output", str(tmp_path / "o"), *flags)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()  # a refused run leaves no empty output folder


def test_examples_cut_before_any_label_are_refused_not_trained_to_nan(tiny_model: str,
                                                                     tmp_path: Path) -> None:
    # one token per example leaves no next token to predict: the loss would be 0 / 0
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    done = train("sft", "--dataset", str(data), "--model", tiny_model, "--output", str(out),
                 "--max-seq-len", "1")
    assert done.returncode != 0
    assert "error: --max-seq-len: 1 tokens" in done.stderr
    assert not (out / "step-1").exists()


def test_fsdp_cpu_offload_alone_is_refused_as_the_http_api_refuses_it(tiny_model: str,
                                                                       tmp_path: Path) -> None:
    """--fsdp-cpu-offload is an option of FSDP (the HTTP API's fsdp_cpu_offload needs
    memory_efficient_fsdp_wrap): alone it is one line naming both flags, and nothing runs."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"text": "one line"}) + "\n")
    out = tmp_path / "out"
    done = train("sft", "--dataset", str(data), "--model", tiny_model, "--output", str(out),
                 "--fsdp-cpu-offload")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()
    assert error == ["llama-engine: error: --fsdp-cpu-offload: keeps FSDP's shards in host "
                     "memory: it needs FSDP (--fsdp / --nproc-per-node)"], error
    assert not out.exists()


@pytest.mark.parametrize("flags, field", [
    (["--algorithm", "lora", "--dtype", "bf16"], "--dtype"),   # a bf16 base under FSDP
    (["--algorithm", "lora", "--rank", "0"], "--rank"),        # the adapter config
    (["--label-smoothing", "0.5"], "--label-smoothing"),       # the DPO options
])
def test_a_refused_fsdp_run_is_refused_before_any_rank_starts(tiny_model: str, tmp_path: Path,
                                                              flags: list[str], field: str) -> None:
    """--nproc-per-node 2 starts torch's launcher; a recipe it would refuse is one line from
    this process, naming the flag, before the launcher starts a rank (whose failure would
    read "rank N: ...")."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}) + "\n")
    out = tmp_path / "out"
    done = train("dpo", "--dataset", str(data), "--model", tiny_model, "--output", str(out),
                 "--nproc-per-node", "2", *flags)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"llama-engine: error: {field}: "), error
    assert not out.exists()


def test_reward_training_under_fsdp_is_refused_before_any_rank_starts(tiny_model: str,
                                                                      tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}) + "\n")
    done = train("reward", "--dataset", str(data), "--model", tiny_model, "--output",
                 str(tmp_path / "out"), "--nproc-per-node", "2")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()
    assert error == ["llama-engine: error: --fsdp / --nproc-per-node: reward-model training "
                     "does not run under FSDP (its score head sits outside the model); train it "
                     "in one process"], error


def test_a_bf16_base_under_fsdp_names_the_flags() -> None:
    from llama_engine.training.command import cli_flag
    from llama_engine.training.recipe import DataSource, Recipe
    with pytest.raises(RecipeError) as refused:
        Recipe("sft", "m", DataSource("d.jsonl", {}), "out", algorithm="lora", dtype="bf16",
               fsdp=True)
    assert refused.value.render(cli_flag) == \
        "--dtype: bf16 is not offered under FSDP (--fsdp / --nproc-per-node); use fp32"
    assert str(refused.value) == "dtype: bf16 is not offered under FSDP (fsdp); use fp32"


def test_every_recipe_option_the_cli_sets_is_named_by_a_flag_it_has() -> None:
    """cli_flag names the flag a refused option came from: for every option of the recipe,
    its training options, its DPO options and its adapter config that a flag sets, that
    flag must exist."""
    from llama_engine.training.command import _algorithm_config, add_train_arguments, cli_flag
    from llama_engine.training.loop import DPOParams, TrainingOptions
    from llama_engine.training.recipe import Recipe
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    args = parser.parse_args(["sft", "--dataset", "d", "--output", "o", "--algorithm", "lora"])
    containers = {"options", "dpo", "algorithm_config"}
    not_flags = {"objective",     # the positional argument
                 "adapter_path"}  # the HTTP API's finetuned_model; no flag
    options = ([f.name for cls in (Recipe, TrainingOptions, DPOParams) for f in fields(cls)]
               + list(_algorithm_config(args)))
    named = [o for o in options if o not in containers | not_flags]
    assert len(named) > 30
    for option in named:
        for flag in cli_flag(option).split(" / "):
            assert flag in flags, (option, flag)
