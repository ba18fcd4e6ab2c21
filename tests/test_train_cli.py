"""`llama-engine train`: an SFT and a reward run on a tiny model write HF checkpoints that
transformers loads, one metrics record per step and a loss-curve PNG; bad data is one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_examples_cut_before_any_label_are_refused_not_trained_to_nan(tiny_model: str,
                                                                     tmp_path: Path) -> None:
    # one token per example leaves no next token to predict: the loss would be 0 / 0
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    done = train("sft", "--dataset", str(data), "--model", tiny_model, "--output", str(out),
                 "--max-seq-len", "1")
    assert done.returncode != 0
    assert "max_seq_len" in done.stderr
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
    assert len(error) == 1 and "--fsdp-cpu-offload" in error[0] and "--fsdp," in error[0], error
    assert not out.exists()


@pytest.mark.parametrize("flags, field", [
    (["--algorithm", "lora", "--dtype", "bf16"], "dtype"),   # a bf16 base under FSDP
    (["--algorithm", "lora", "--rank", "0"], "rank"),        # the adapter config
    (["--label-smoothing", "0.5"], "label_smoothing"),       # the DPO options
])
def test_a_refused_fsdp_run_is_refused_before_any_rank_starts(tiny_model: str, tmp_path: Path,
                                                              flags: list[str], field: str) -> None:
    """--nproc-per-node 2 starts torch's launcher; a recipe it would refuse is one line from
    this process, naming the field, before the launcher starts a rank (whose failure would
    read "rank N: ...")."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}) + "\n")
    out = tmp_path / "out"
    done = train("dpo", "--dataset", str(data), "--model", tiny_model, "--output", str(out),
                 "--nproc-per-node", "2", *flags)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and "rank 0" not in error[0] and field in error[0], error
    assert not out.exists()


def test_reward_training_under_fsdp_is_refused_before_any_rank_starts(tiny_model: str,
                                                                      tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}) + "\n")
    done = train("reward", "--dataset", str(data), "--model", tiny_model, "--output",
                 str(tmp_path / "out"), "--nproc-per-node", "2")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and "reward-model training does not run under FSDP" in error[0], error
