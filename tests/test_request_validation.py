"""The engine's one validation path (typed errors naming the field), max_tokens=0, and prompt
logprobs from the prefill logits, against transformers on a tiny checkpoint."""
from __future__ import annotations

import pytest
import torch

from llama_engine import LLM, SamplingParams
from llama_engine.errors import RequestValidationError
from tests.conftest import make_tiny_llama

LOGPROB_TOL = 1e-3
MAX_MODEL_LEN = 64
PROMPT = "Your answer: Yes, the quick brown fox jumps over the lazy dog near the river bank"
TOP = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny):
    # A small step budget splits the prompt's prefill into chunks.
    return LLM(tiny, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=8)


def hf_prompt_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row p scores token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)[:-1]


def check_prompt_logprobs(entries, ids: list[int], reference: torch.Tensor, top: int) -> None:
    assert entries[0] is None and len(entries) == len(ids)
    for p, (token, entry) in enumerate(zip(ids[1:], entries[1:])):
        assert abs(entry[token] - reference[p, token].item()) < LOGPROB_TOL, p
        best = reference[p].topk(top).indices.tolist()
        assert set(entry) == set(best) | {token}, p


@pytest.mark.parametrize("max_tokens", [0, 2])
def test_prompt_logprobs_match_transformers_over_chunked_prefill(llm, hf_tiny, max_tokens):
    ids = llm.get_tokenizer().encode(PROMPT)
    assert len(ids) > 8  # more than one prefill chunk
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens,
                                           prompt_logprobs=TOP, ignore_eos=True))[0]
    check_prompt_logprobs(out.prompt_logprobs, ids, hf_prompt_logprobs(hf_tiny, ids), TOP)
    assert len(out.outputs[0].token_ids) == max_tokens
    assert out.outputs[0].finish_reason == "length"


def test_prompt_logprobs_ignore_a_cached_prefix(llm, hf_tiny):
    ids = llm.get_tokenizer().encode(PROMPT + " and back again")
    llm.generate(ids, SamplingParams(max_tokens=1))  # leaves the prompt's blocks cached
    out = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0, n=2))[0]
    check_prompt_logprobs(out.prompt_logprobs, ids, hf_prompt_logprobs(hf_tiny, ids), 0)
    assert len(out.outputs) == 2


def test_max_tokens_zero_generates_nothing(llm):
    outs = llm.generate(["1, 2, 3, 4,", "Hello"], SamplingParams(max_tokens=0, n=2))
    for out in outs:
        assert [(o.text, o.token_ids, o.finish_reason) for o in out.outputs] == [("", [], "length")] * 2
        assert out.prompt_logprobs is None


def test_prompt_that_fills_the_context_can_still_be_scored(llm):
    ids = [5] * MAX_MODEL_LEN
    out = llm.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert len(out.prompt_logprobs) == MAX_MODEL_LEN
    with pytest.raises(RequestValidationError) as refused:
        llm.generate(ids, SamplingParams(max_tokens=None))
    assert refused.value.field == "prompt"
    assert f"context length is {MAX_MODEL_LEN} tokens" in refused.value.reason


@pytest.mark.parametrize("prompt_len, max_tokens, field", [
    (MAX_MODEL_LEN - 4, 5, "max_tokens"), (MAX_MODEL_LEN + 1, 0, "prompt"),
    (MAX_MODEL_LEN, 1, "prompt"), (0, 1, "prompt"),
])
def test_what_does_not_fit_the_context_is_refused(llm, prompt_len, max_tokens, field):
    with pytest.raises(RequestValidationError) as refused:
        llm.generate([[7] * prompt_len], SamplingParams(max_tokens=max_tokens))
    assert refused.value.field == field
    if field == "max_tokens":  # as OpenAI and vLLM say it: context, prompt, asked
        assert refused.value.reason == (
            f"the model's context length is {MAX_MODEL_LEN} tokens; the prompt is "
            f"{prompt_len} tokens and max_tokens asks for {max_tokens} more "
            f"({prompt_len + max_tokens} in all)")


def test_max_tokens_that_just_fits_runs_to_the_context(llm):
    out = llm.generate([[7] * (MAX_MODEL_LEN - 4)],
                       SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": "0.5"}, "temperature"), ({"n": 2.0}, "n"), ({"max_tokens": True}, "max_tokens"),
    ({"top_k": 1.5}, "top_k"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"seed": "1"}, "seed"),
])
def test_sampling_params_refuse_with_a_typed_error(kwargs, field):
    with pytest.raises(RequestValidationError) as refused:
        SamplingParams(**kwargs)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")
    assert isinstance(refused.value, ValueError)  # callers catching ValueError still do


def test_top_p_below_float32_resolution_means_the_most_likely_token():
    assert SamplingParams(top_p=1e-100).top_p == pytest.approx(1e-6)
