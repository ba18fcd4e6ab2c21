"""Our logits, greedy text and logprobs against transformers on the same weights."""
from __future__ import annotations

import os

import pytest
import torch

from llama_engine import LLM, SamplingParams
from tests.conftest import make_tiny_llama

LOGIT_TOL = 1e-3
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Translate to French: I love reading books.",
    "1, 2, 3, 5, 8, 13,",
    "Explain why the sky is blue in one sentence.",
    "Les chats sont des animaux",
    "<html>\n  <body>\n",
    "Q: What is 12 times 12?\nA:",
]
GREEDY_TOKENS = 48


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    """Plain argmax decoding with transformers' KV cache; EOS is just another token (as
    with ignore_eos), which generate() would suppress or stop at."""
    out, past, step_ids = [], None, ids
    with torch.no_grad():
        for _ in range(num_tokens):
            res = model(torch.tensor([step_ids]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            step_ids = out[-1:]
    return out


def engine_prefill_logits(llm: LLM, ids: list[int], lora_int_id: int = 0) -> torch.Tensor:
    """Logits of our paged engine at every position: the prompt's first half in one
    prefill, then the rest one token at a time through the decode path (with the loaded
    adapter lora_int_id; 0: the base model)."""
    half = len(ids) // 2
    # Prefix caching turns each longer prompt into a short step over cached blocks.
    rows = [_last_logits(llm.engine, ids[:end], lora_int_id)
            for end in range(half, len(ids) + 1)]
    return torch.stack(rows), half


def _last_logits(engine, ids: list[int], lora_int_id: int = 0) -> torch.Tensor:
    from llama_engine.engine.scheduler import ScheduledSeq, SchedulerOutput
    from llama_engine.engine.sequence import Sequence
    seq = Sequence("probe", 0, ids, SamplingParams(), 0.0, lora_int_id)
    engine.block_manager.match_prefix(seq)
    num = seq.num_uncomputed_tokens
    engine.block_manager.allocate(seq, num)
    step = SchedulerOutput([ScheduledSeq(seq, num)])
    logits = engine.runner.execute(step)[0]
    seq.num_computed_tokens += num
    engine.block_manager.commit(seq)
    engine.block_manager.free(seq)
    return logits


def check_logits(llm: LLM, hf_model, ids: list[int], lora_int_id: int = 0) -> None:
    ours, first = engine_prefill_logits(llm, ids, lora_int_id)
    ref = hf_logits(hf_model, ids)[first - 1:]
    err = (ours - ref).abs().max().item()
    assert err < LOGIT_TOL, f"max |logit error| {err:.2e} over {len(ids)} positions"


def check_greedy_and_logprobs(llm: LLM, hf_model, prompts: list[str]) -> None:
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    tok = llm.get_tokenizer()
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt)
        got = out.outputs[0].token_ids
        assert got == hf_greedy(hf_model, ids, GREEDY_TOKENS), f"greedy differs for {prompt!r}"
        ref_lp = torch.log_softmax(hf_logits(hf_model, ids + got)[len(ids) - 1:-1], dim=-1)
        for step, (token, lp) in enumerate(zip(got, out.outputs[0].logprobs)):
            assert abs(lp[token] - ref_lp[step, token].item()) < LOGIT_TOL, (prompt, step)
    # without logprobs the sampled tokens' logprobs still sum to cumulative_logprob (the
    # sampler's other path: no log-softmax over the vocabulary)
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS,
                                                 ignore_eos=True))
    for out, ref in zip(plain, outs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        expected = sum(lp[t] for t, lp in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs))
        assert abs(out.outputs[0].cumulative_logprob - expected) < LOGIT_TOL * GREEDY_TOKENS


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_llm, hf_default_model):
    ids = default_llm.get_tokenizer().encode(
        "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the "
        "surface while Michael Collins orbited above. The mission returned safely to Earth, "
        "splashing down in the Pacific Ocean on July 24. It fulfilled a national goal set "
        "by President Kennedy in 1961, before the decade was out.")[:64]
    assert len(ids) == 64
    check_logits(default_llm, hf_default_model, ids)


@pytest.mark.slow
def test_default_model_greedy_and_logprobs_match_transformers(default_llm, hf_default_model):
    check_greedy_and_logprobs(default_llm, hf_default_model, PROMPTS)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    return make_tiny_llama(folder)


def test_tiny_hf_checkpoint_matches_transformers(tiny_checkpoint):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    assert not hf.config.tie_word_embeddings and hf.config.num_key_value_heads == 2
    assert os.path.exists(os.path.join(tiny_checkpoint, "model.safetensors.index.json"))
    llm = LLM(tiny_checkpoint)
    ids = llm.get_tokenizer().encode("a tiny random llama with grouped query attention " * 8)
    check_logits(llm, hf, ids[:96])
    check_greedy_and_logprobs(llm, hf, PROMPTS[:4])
