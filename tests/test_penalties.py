"""Sampling penalties: repetition (CTRL, as transformers applies it) on the default model, and
OpenAI's presence / frequency formula on hand-computed logits."""
from __future__ import annotations

import pytest
import torch

from llama_engine import SamplingParams
from llama_engine.engine.sampler import penalized_logits, sample
from llama_engine.engine.sequence import Sequence

REPETITION_PENALTY = 1.3
GREEDY_TOKENS = 24
PROMPT = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"


def seq_with(prompt: list[int], output: list[int], **params) -> Sequence:
    seq = Sequence("r", 0, prompt, SamplingParams(**params), 0.0)
    seq.token_ids += output
    return seq


def hf_greedy_with_repetition_penalty(model, ids: list[int], penalty: float,
                                      num_tokens: int) -> list[int]:
    """Argmax decoding with transformers' RepetitionPenaltyLogitsProcessor over the prompt
    and the tokens generated so far."""
    from transformers import RepetitionPenaltyLogitsProcessor
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(num_tokens):
            scores = model(torch.tensor([tokens])).logits[:, -1].float()
            tokens.append(int(processor(torch.tensor([tokens]), scores).argmax()))
    return tokens[len(ids):]


def test_repetition_penalty_greedy_matches_transformers(default_llm, hf_default_model):
    ids = default_llm.get_tokenizer().encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True,
                            repetition_penalty=REPETITION_PENALTY)
    got = default_llm.generate(ids, params)[0].outputs[0].token_ids
    plain = default_llm.generate(ids, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    expected = hf_greedy_with_repetition_penalty(hf_default_model, ids, REPETITION_PENALTY,
                                                 GREEDY_TOKENS)
    assert got == expected
    assert got != plain  # the penalty changed the text, so the comparison means something


def test_presence_and_frequency_follow_openai_formula():
    # OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c[j] counting
    # token j in the output only; the prompt's tokens are not penalised.
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5],
                           [1.0, 2.0, 3.0, -1.0, 0.5]])
    seqs = [seq_with([0, 4], [2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25),
            seq_with([0], [2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25,
                     repetition_penalty=2.0)]
    out = penalized_logits(logits, seqs)
    expected = torch.tensor([
        [1.0, 2.0, 3.0 - 2 * 0.25 - 0.5, -1.0 - 0.25 - 0.5, 0.5],
        # repetition first, on prompt and output tokens: positive / 2, negative * 2
        [1.0 / 2, 2.0, 3.0 / 2 - 2 * 0.25 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5]])
    torch.testing.assert_close(out, expected)
    assert logits[0, 2] == 3.0  # the caller's logits are left alone (logprobs read them)


def test_negative_presence_penalty_raises_the_logit():
    out = penalized_logits(torch.tensor([[0.0, 1.0]]),
                           [seq_with([1], [0], presence_penalty=-2.0)])
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0]]))


def test_penalty_changes_the_greedy_choice_but_logprobs_stay_raw():
    logits = torch.tensor([[0.0, 3.0, 2.5, -5.0]])
    seq = seq_with([0], [1], temperature=0, frequency_penalty=1.0, logprobs=1)
    token = sample(logits, [seq])[0]
    assert token.token_id == 2  # 3.0 - 1.0 < 2.5
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, 2]))


def test_penalty_inputs_stay_on_the_logits_device():
    # A CPU index into a device tensor fails off the CPU; "meta" shows it without a GPU.
    logits = torch.empty(2, 8, device="meta")
    seqs = [seq_with([1, 2], [3, 3], frequency_penalty=1.0), seq_with([4], [], presence_penalty=1.0)]
    assert penalized_logits(logits, seqs).device.type == "meta"
