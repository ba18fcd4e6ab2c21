"""Reward models: a tiny random LlamaForSequenceClassification scored by the engine (batched,
with the prefix cache sharing each dialog's tokens, and alone) against transformers; a
reward head in a separate file on a causal-LM checkpoint; a reward head trained by our
post-training on a toy preference set ranks held-out pairs."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from llama_engine import LLM, SamplingParams
from llama_engine.errors import RequestValidationError
from llama_engine.loader import ModelLoadError
from llama_engine.synthetic_data import reply_token_ids
from tests.conftest import make_tiny_llama

TOLERANCE = 1e-4
SYSTEM = ("You are a careful assistant. You answer questions about arithmetic, geography and "
          "cooking in one short sentence, and say so when you do not know.")


def dialogs() -> list[tuple[list[dict], list[str]]]:
    """4 dialogs x 4 replies: 16 scored sequences, each dialog's replies sharing its prefix."""
    out = []
    for d in range(4):
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Question {d}: what is {d} plus {d + 3}?"}]
        out.append((messages, [f"It is {2 * d + 3}.", "I do not know.",
                               f"{d} plus {d + 3} makes {2 * d + 3}, of course.", "Paris."]))
    return out


def hf_scores(model, sequences: list[list[int]]) -> list[float]:
    """transformers' score of each sequence alone (no padding: the last token's logit)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("reward")), seed=3, reward_model=True)


def sequences_for(tokenizer) -> list[list[int]]:
    return [reply_token_ids(tokenizer, messages, reply)
            for messages, replies in dialogs() for reply in replies]


def test_scores_match_transformers_batched_and_alone(reward_folder: str) -> None:
    import transformers
    reference = transformers.LlamaForSequenceClassification.from_pretrained(
        reward_folder, dtype=torch.float32).eval()
    batched_llm = LLM(model=reward_folder, enable_prefix_caching=True)
    sequences = sequences_for(batched_llm.get_tokenizer())
    expected = hf_scores(reference, sequences)

    batched = batched_llm.reward(sequences)
    assert [o.score for o in batched] == pytest.approx(expected, abs=TOLERANCE)
    # The replies to one dialog, submitted together, found the dialog's blocks cached.
    assert sum(o.num_cached_tokens for o in batched) >= 12 * 16

    alone_llm = LLM(model=reward_folder, enable_prefix_caching=False)
    alone = [alone_llm.reward(ids)[0].score for ids in sequences]
    assert alone == pytest.approx(expected, abs=TOLERANCE)


def concordant_fraction(a: list[float], b: list[float]) -> float:
    """Of all pairs (i, j), the fraction that a and b order alike (Kendall's concordance)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    return sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) / len(pairs)


def test_bfloat16_matmul_scores_are_near_transformers_float32_and_rank_alike(
        reward_folder: str) -> None:
    """dtype=bfloat16 on the CPU (bfloat16 projections, float32 everything else): no farther
    from transformers' float32 scores than transformers' own bfloat16 model is, every
    dialog's replies in the same order (what the SDG filters read), and nearly every pair of
    all 16 ordered alike."""
    import transformers
    llm = LLM(model=reward_folder, dtype="bfloat16")
    sequences = sequences_for(llm.get_tokenizer())
    expected, peer_bf16 = (hf_scores(transformers.LlamaForSequenceClassification.from_pretrained(
        reward_folder, dtype=dtype).eval(), sequences) for dtype in (torch.float32, torch.bfloat16))
    scores = [o.score for o in llm.reward(sequences)]
    error = max(abs(s - e) for s, e in zip(scores, expected))
    peer_error = max(abs(s - e) for s, e in zip(peer_bf16, expected))
    assert 0 < error <= peer_error, (error, peer_error)
    replies = len(dialogs()[0][1])
    for start in range(0, len(scores), replies):
        group = slice(start, start + replies)
        assert sorted(range(replies), key=scores[group].__getitem__) == \
            sorted(range(replies), key=expected[group].__getitem__)
    assert concordant_fraction(scores, expected) >= 0.9


def test_a_reward_model_scores_and_does_not_generate(reward_folder: str) -> None:
    llm = LLM(model=reward_folder)
    with pytest.raises(RequestValidationError) as refused:
        llm.generate("Hello", SamplingParams(max_tokens=4))
    assert refused.value.field == "model"
    out = llm.reward("Hello there")[0]
    assert out.outputs[0].token_ids == [] and isinstance(out.score, float)


def test_a_head_file_turns_a_causal_lm_into_a_reward_model(tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import save_file
    folder = make_tiny_llama(str(tmp_path / "base"), seed=4)
    head = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    save_file({"score.weight": head}, str(tmp_path / "head.safetensors"))
    reference = transformers.LlamaForSequenceClassification.from_pretrained(
        folder, num_labels=1, dtype=torch.float32).eval()
    with torch.no_grad():
        reference.score.weight.copy_(head)
    llm = LLM(model=folder, score_head=str(tmp_path / "head.safetensors"))
    sequences = sequences_for(llm.get_tokenizer())[:6]
    assert [o.score for o in llm.reward(sequences)] == pytest.approx(
        hf_scores(reference, sequences), abs=TOLERANCE)

    save_file({"score.weight": torch.zeros(2, 64)}, str(tmp_path / "two_labels.safetensors"))
    save_file({"classifier.weight": head}, str(tmp_path / "other_name.safetensors"))
    (tmp_path / "not_safetensors.bin").write_bytes(b"\x00" * 64)
    for bad, message in (("two_labels.safetensors", r"shape \(2, 64\)"),
                         ("other_name.safetensors", "no 'score.weight'"),
                         ("not_safetensors.bin", "cannot read safetensors"),
                         ("missing.safetensors", "does not exist")):
        with pytest.raises(ModelLoadError, match=message):
            LLM(model=folder, score_head=str(tmp_path / bad))


THINGS = ["apple", "book", "chair", "coin", "cup", "dog", "egg", "fish", "hat", "key", "lamp",
          "pen", "ring", "shoe", "star", "tree", "bird", "boat", "cake", "door"]
VAGUE = ["There are some {t}s.", "I cannot say how many {t}s.", "Quite a few {t}s, I think.",
         "Nobody knows how many {t}s."]
NUMBERED = ["There are {n} {t}s.", "I count {n} {t}s.", "Exactly {n} {t}s.", "{n} {t}s, I think."]


def preference_rows(things: list[str], offset: int) -> list[dict]:
    """Answers that give a number are preferred over answers that do not."""
    rows = []
    for i, thing in enumerate(things):
        for j in range(2):
            k = i + j + offset
            rows.append({"prompt": [{"role": "user", "content": f"How many {thing}s are in the box?"}],
                         "chosen": NUMBERED[k % 4].format(n=3 + (7 * k) % 40, t=thing),
                         "rejected": VAGUE[(k + 1) % 4].format(t=thing)})
    return rows


def test_a_reward_head_trained_by_post_training_ranks_held_out_pairs(tmp_path: Path) -> None:
    from llama_engine.training.loop import REWARD, TrainingOptions
    from llama_engine.training.recipe import DataSource, Recipe, run
    base = make_tiny_llama(str(tmp_path / "base"), seed=5)
    train_rows, held_out = preference_rows(THINGS[:14], 0), preference_rows(THINGS[14:], 1)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    options = TrainingOptions(objective=REWARD, n_epochs=4, batch_size=4, lr=2e-3,
                              warmup_steps=2, seed=0)
    recipe = Recipe(objective=REWARD, model_path=base, output_dir=str(tmp_path / "run"),
                    train=DataSource(str(data), {"prompt": "dialog", "chosen": "text",
                                                 "rejected": "text"}), options=options)
    checkpoint = run(recipe).checkpoints[-1][1]

    llm = LLM(model=str(checkpoint))
    tokenizer = llm.get_tokenizer()
    chosen = llm.reward([reply_token_ids(tokenizer, r["prompt"], r["chosen"]) for r in held_out])
    rejected = llm.reward([reply_token_ids(tokenizer, r["prompt"], r["rejected"]) for r in held_out])
    correct = sum(c.score > r.score for c, r in zip(chosen, rejected))
    assert correct >= 0.8 * len(held_out), f"{correct} of {len(held_out)} held-out pairs ranked right"


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_peft_reward_adapter_loads_merged_into_its_base(tmp_path: Path, use_dora: bool) -> None:
    import peft
    import transformers
    base = make_tiny_llama(str(tmp_path / "base"), seed=6)
    model = transformers.LlamaForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32)
    reference = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=use_dora,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: B and the head away from their initial values
        for name, p in reference.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    reference.save_pretrained(str(tmp_path / "adapter"))
    llm = LLM(model=str(tmp_path / "adapter"))
    sequences = sequences_for(llm.get_tokenizer())[:6]
    with torch.no_grad():
        expected = [reference(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]
    assert [o.score for o in llm.reward(sequences)] == pytest.approx(expected, abs=TOLERANCE)
