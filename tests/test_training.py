"""Training pieces against references: DPO and Bradley-Terry losses against hand-computed
values and TRL's formulas, the lr schedule against transformers', assistant-only labels, and
three full-SFT optimizer steps on our model against transformers + torch.optim."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_engine.training.losses import IGNORE_INDEX, bradley_terry_loss, dpo_loss, sft_loss
from llama_engine.training.optim import build_optimizer, lr_factor

BETA = 0.1


@pytest.mark.parametrize("h, expected", [(0.0, 0.6931), (10.0, 0.3133), (20.0, 0.1269)])
def test_dpo_loss_hand_computed(h: float, expected: float) -> None:
    zero = torch.zeros(1)
    out = dpo_loss(torch.tensor([h]), zero, zero, zero, beta=BETA)
    assert out.loss.item() == pytest.approx(expected, abs=1e-4)


def trl_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing):
    """TRL DPOTrainer, loss_type="sigmoid" (written from its documented formula)."""
    logits = (pc - pr) - (rc - rr)
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing).mean()


def test_dpo_loss_matches_trl_and_policy_equal_reference_is_ln2() -> None:
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 20 for _ in range(4))
    for smoothing in (0.0, 0.1, 0.3):
        ours = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=smoothing).loss
        assert ours.item() == pytest.approx(trl_sigmoid_loss(pc, pr, rc, rr, BETA, smoothing).item(), abs=1e-6)
    same = dpo_loss(pc, pr, pc, pr, beta=BETA, label_smoothing=0.2)
    assert same.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_reward_clip_and_gamma() -> None:
    zero = torch.zeros(1)
    # chosen reward 0.1 * 100 = 10, clipped to 2; rejected 0: margin 2
    clipped = dpo_loss(torch.tensor([100.0]), zero, zero, zero, beta=BETA, reward_clip=2.0)
    assert clipped.loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    assert clipped.chosen_rewards.item() == pytest.approx(2.0)
    # a target margin gamma = 1 on a reward margin of 1: the loss is back at ln 2
    margin = dpo_loss(torch.tensor([10.0]), zero, zero, zero, beta=BETA, gamma=1.0)
    assert margin.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_bradley_terry_loss() -> None:
    chosen, rejected = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.5, 3.0])
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip([1.0, 0.5, 2.0], [0.0, 0.5, 3.0])) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)


def test_sft_loss_ignores_unlabelled_tokens() -> None:
    logits = torch.randn(5, 7)
    labels = torch.tensor([3, IGNORE_INDEX, 1, IGNORE_INDEX, 6])
    expected = -(torch.log_softmax(logits, -1)[[0, 2, 4], [3, 1, 6]]).mean()
    assert sft_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(seed: int) -> None:
    """The chunked loss and its gradients (hidden and head weight) against autograd through
    F.cross_entropy of the whole logits, on random shapes, chunks and ignored labels."""
    from llama_engine.training.losses import linear_cross_entropy
    g = torch.Generator().manual_seed(seed)
    tokens, hidden_size, vocab = (int(torch.randint(lo, hi, (), generator=g))
                                  for lo, hi in ((1, 40), (1, 24), (2, 300)))
    chunk = int(torch.randint(1, tokens + 3, (), generator=g))
    hidden = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.3] = IGNORE_INDEX
    labels[0] = 1  # at least one label token
    upstream = float(torch.rand((), generator=g)) + 0.5  # the loss scaled downstream
    (linear_cross_entropy(hidden, weight, labels, chunk) * upstream).backward()
    h_ref = hidden.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(h_ref @ w_ref.t(), labels, ignore_index=IGNORE_INDEX)
    (expected * upstream).backward()
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, labels, chunk).item() == pytest.approx(
            expected.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-4, atol=1e-6)


def test_lr_schedule_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    lr, lr_min, warmup, total = 1e-3, 1e-4, 5, 40
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    reference = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=total, min_lr=lr_min)
    for step in range(total):
        assert lr * lr_factor(step, warmup, total, lr_min / lr) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        optimizer.step()
        reference.step()


def test_optimizers() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(params, "adam", 1e-3, 0.0), torch.optim.Adam)
    assert isinstance(build_optimizer(params, "adamw", 1e-3, 0.1), torch.optim.AdamW)
    assert isinstance(build_optimizer(params, "sgd", 1e-3, 0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer_type"):
        build_optimizer(params, "lion", 1e-3, 0.0)


DIALOG = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]


@pytest.fixture(scope="module")
def tokenizer():
    from llama_engine.loader import default_model_path
    from llama_engine.tokenizer import Tokenizer
    return Tokenizer.from_gguf(default_model_path())


def test_dialog_labels_cover_assistant_turns_only(tokenizer) -> None:
    from llama_engine.training.tokenization import dialog_tokens, preference_pair, sft_example
    ids, trainable = dialog_tokens(tokenizer, DIALOG)
    assert ids == tokenizer.apply_chat_template(DIALOG, add_generation_prompt=False)
    trained = tokenizer.decode([i for i, t in zip(ids, trainable) if t], skip_special_tokens=False)
    assert trained == "4<|im_end|>\n6<|im_end|>\n"
    example = sft_example(tokenizer, {"dialog": DIALOG})
    labelled = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled, skip_special_tokens=False) == trained
    pair = preference_pair(tokenizer, {"prompt": DIALOG[:3], "chosen": "6", "rejected": "7"})
    chosen = [label for label in pair.chosen.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(chosen, skip_special_tokens=False) == "6<|im_end|>\n"
    text = sft_example(tokenizer, {"text": "plain text"})
    assert text.labels[:-1] == text.input_ids[1:] and text.input_ids[-1] == tokenizer.eos_token_id


SFT_ROWS = [{"dialog": DIALOG}, {"text": "The quick brown fox jumps over the lazy dog."},
            {"dialog": DIALOG[:2]}, {"text": "Lorem ipsum dolor sit amet."},
            {"dialog": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi!"}]},
            {"text": "One more line of plain text for the third step."}]
# Adam's first steps move every weight with a non-negligible gradient by about lr, so 3e-4
# of movement is checked to 1e-5; at 1e-3 the update g / (|g| + eps) amplifies float32
# rounding in near-eps lm_head gradients past 1e-5 on both sides alike.
LR, WEIGHT_DECAY, BATCH, STEPS = 1e-4, 0.01, 2, 3


def _hf_batch(examples, pad_id: int):
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, 1:n] = torch.tensor(e.labels[:-1])  # HF shifts inside the model
    return ids, mask, labels


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.conftest import make_tiny_llama
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def test_three_full_sft_steps_match_transformers_and_torch_optim(tiny_model: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from llama_engine.training.full import FullFineTune, hf_state_dict
    from llama_engine.training.loop import SFT, Trainer, TrainingOptions
    from llama_engine.training.tokenization import sft_example

    ours = FullFineTune(tiny_model)
    start_up_proj = hf_state_dict(ours.model)["model.layers.0.mlp.up_proj.weight"].detach().clone()
    examples = [sft_example(ours.tokenizer, row) for row in SFT_ROWS]
    options = TrainingOptions(objective=SFT, n_epochs=1, batch_size=BATCH, shuffle=False,
                              n_iters=STEPS, optimizer_type="adamw", lr=LR, lr_min=LR,
                              weight_decay=WEIGHT_DECAY, warmup_steps=0)
    result = Trainer(ours, options, tmp_path / "out").train(examples)

    reference = transformers.LlamaForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation="eager")
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    reference_losses = []
    for step in range(STEPS):
        ids, mask, labels = _hf_batch(examples[step * BATCH:(step + 1) * BATCH], pad_id=0)
        loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())

    assert [r["loss"] for r in result.records] == pytest.approx(reference_losses, abs=1e-5)
    expected = reference.state_dict()
    moved = (expected["model.layers.0.mlp.up_proj.weight"] - start_up_proj).abs().max().item()
    assert moved > 2e-4  # the steps did move the weights far beyond the tolerance
    for name, tensor in hf_state_dict(ours.model).items():
        torch.testing.assert_close(tensor.detach(), expected[name], atol=1e-5, rtol=0, msg=name)
    # the final checkpoint is an HF folder transformers loads, with the trained weights
    (step, folder), = result.checkpoints
    assert step == STEPS
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.testing.assert_close(loaded.state_dict()["model.layers.1.mlp.down_proj.weight"],
                               expected["model.layers.1.mlp.down_proj.weight"], atol=1e-5, rtol=0)


PAIRS = [{"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.",
          "rejected": "Berlin."},
         {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}]


def test_dpo_first_step_is_ln2_and_reward_model_loads_in_transformers(tiny_model: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from llama_engine.training.batching import pack
    from llama_engine.training.full import FullFineTune
    from llama_engine.training.loop import DPO, REWARD, DPOParams, Trainer, TrainingOptions
    from llama_engine.training.tokenization import preference_pair

    dpo_model = FullFineTune(tiny_model, keep_reference=True, activation_checkpointing=True)
    pairs = [preference_pair(dpo_model.tokenizer, row) for row in PAIRS]
    options = TrainingOptions(objective=DPO, n_epochs=2, batch_size=3, shuffle=False, lr=1e-4,
                              dpo=DPOParams(beta=BETA))
    records = Trainer(dpo_model, options, tmp_path / "dpo").train(pairs).records
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(records[1])

    reward_model = FullFineTune(tiny_model)
    trainer = Trainer(reward_model, TrainingOptions(objective=REWARD, batch_size=3, n_iters=1,
                                                    lr=1e-4), tmp_path / "reward")
    (_, folder), = trainer.train(pairs).checkpoints
    with torch.no_grad():
        ours = trainer.reward_scores(pack([pairs[1].chosen]))
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([pairs[1].chosen.input_ids])
    with torch.no_grad():
        theirs = scorer(input_ids=ids).logits[0, 0]
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)


class _Interrupt(Exception):
    pass


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_model: str, tmp_path: Path) -> None:
    from llama_engine.training.checkpoint import TRAINING_STATE_FILE
    from llama_engine.training.full import FullFineTune, hf_state_dict
    from llama_engine.training.loop import SFT, Trainer, TrainingOptions
    from llama_engine.training.tokenization import sft_example

    options = TrainingOptions(objective=SFT, n_epochs=3, batch_size=2, shuffle=True, lr=1e-3,
                              lr_min=1e-4, warmup_steps=2, checkpoint_every_n_steps=2)
    straight = FullFineTune(tiny_model)
    examples = [sft_example(straight.tokenizer, row) for row in SFT_ROWS[:4]]
    Trainer(straight, options, tmp_path / "straight").train(examples)

    def stop_after_step_5(record: dict) -> None:
        if record.get("step") == 5:
            raise _Interrupt()

    with pytest.raises(_Interrupt):  # killed after step 5: the last checkpoint is step 4
        Trainer(FullFineTune(tiny_model), options, tmp_path / "resumed", stop_after_step_5).train(examples)
    assert not (tmp_path / "resumed" / "step-2" / TRAINING_STATE_FILE).exists()  # only the newest
    resumed = FullFineTune(tiny_model)
    result = Trainer(resumed, options, tmp_path / "resumed").train(examples)
    assert [r["step"] for r in result.records if "loss" in r] == [5, 6]
    expected = hf_state_dict(straight.model)
    for name, tensor in hf_state_dict(resumed.model).items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def test_activation_checkpointing_gives_the_same_gradients(tiny_model: str) -> None:
    from llama_engine.training.batching import pack
    from llama_engine.training.full import FullFineTune
    from llama_engine.training.tokenization import sft_example

    grads = []
    for checkpointing in (False, True):
        model = FullFineTune(tiny_model, activation_checkpointing=checkpointing)
        batch = pack([sft_example(model.tokenizer, row) for row in SFT_ROWS[:3]])
        sft_loss(model.compute_logits(model.hidden_states(batch)), batch.labels).backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qlora_dpo_first_step_is_ln2(tiny_model: str, tmp_path: Path, dtype) -> None:
    """DPO over an NF4 base: the reference pass (adapters off, no gradient) runs like the
    policy's (it once crashed in the fused inference layer, which has no training KV)."""
    from llama_engine.training.lora import AdapterFineTune, LoRASpec
    from llama_engine.training.loop import DPO, DPOParams, Trainer, TrainingOptions
    from llama_engine.training.tokenization import preference_pair

    model = AdapterFineTune(tiny_model, LoRASpec(("q_proj", "v_proj"), 4, 8),
                            quantize_base=True, base_dtype=dtype)
    pairs = [preference_pair(model.tokenizer, row) for row in PAIRS]
    options = TrainingOptions(objective=DPO, n_epochs=1, batch_size=3, shuffle=False, lr=1e-3,
                              dpo=DPOParams(beta=BETA))
    records = Trainer(model, options, tmp_path / "dpo").train(pairs).records
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy == reference
