"""Continuous batching, prefix caching, preemption and seeded sampling on the real model.

The reference for each batched run is the same request run alone."""
from __future__ import annotations

import random

import pytest

from llama_engine import LLM, SamplingParams

WORDS = ("the cat sat on a mat while seven quick brown foxes jumped over lazy dogs near "
         "river banks under a bright morning sky").split()


def mixed_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_batched_tokens=512, enable_prefix_caching=False)


def test_batch_of_48_equals_each_alone(llm):
    prompts = mixed_prompts(48)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        alone = llm.generate(prompt, params)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, prompt


def test_prefix_cache_hit_gives_same_tokens():
    cached = LLM(enable_prefix_caching=True)
    uncached = LLM(enable_prefix_caching=False)
    prefix = list(range(1000, 1200))  # 200 shared prompt tokens
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = cached.generate([prefix + [7, 8, 9]], params)[0]
    second = cached.generate([prefix + [11, 12]], params)[0]
    block = cached.engine.block_manager.block_size
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (200 // block) * block
    assert cached.engine.stats()["prefix_cache_hits"] == second.num_cached_tokens
    for out, ids in ((first, prefix + [7, 8, 9]), (second, prefix + [11, 12])):
        assert out.outputs[0].token_ids == uncached.generate([ids], params)[0].outputs[0].token_ids


def test_preemption_loses_nothing(llm):
    prompts = mixed_prompts(12, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    # 24 blocks of 16 tokens cannot hold 12 sequences of up to ~100 tokens at once.
    small = LLM(kv_cache_bytes=24 * 16 * llm_kv_bytes_per_token(llm), enable_prefix_caching=False)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
    assert small.engine.stats()["num_preemptions"] > 0
    assert got == expected


def llm_kv_bytes_per_token(llm: LLM) -> int:
    from llama_engine.engine.model_runner import kv_bytes_per_token
    return kv_bytes_per_token(llm.engine.model_config, llm.engine.dtype)


def test_seed_gives_same_text_alone_or_in_batch_of_32(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=24, seed=1234,
                            ignore_eos=True)
    prompt = "Write a short poem about the sea:"
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=24, seed=i) for i in range(31)]
    batch = llm.generate(mixed_prompts(31, seed=2) + [prompt], others + [params])
    assert batch[-1].outputs[0].token_ids == alone
    # and a different seed gives a different text (not a constant)
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=24, seed=99,
                                ignore_eos=True)
    assert llm.generate(prompt, other_seed)[0].outputs[0].token_ids != alone


def test_n_samples_share_the_prompt_and_differ(llm):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    out = llm.generate("Tell me a story about a dragon.", params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    texts = {tuple(o.token_ids) for o in out.outputs}
    assert len(texts) > 1 and all(len(o.token_ids) == 16 for o in out.outputs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_stop_strings_and_stop_tokens(llm):
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("Count: 1, 2, 3,", greedy)[0].outputs[0]
    # stop at the text of the 5th generated token onwards
    stop = tok.decode(full.token_ids[4:6])
    cut = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=30,
                                                          stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    token = full.token_ids[3]
    by_id = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=30,
                                                            stop_token_ids=[token]))[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    assert by_id.stop_reason == token


def test_stop_string_never_splits_a_multibyte_character(llm):
    """While a request runs (a stop string held back or not), its text never shows half a
    character; the 20th token ends inside an emoji, which only the final output may show."""
    for stop in (None, "never generated"):
        llm.engine.add_request("emoji", "Emoji party: 🎉🎉🎉", SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, stop=stop))
        outputs = []
        while llm.engine.has_unfinished_requests():
            outputs += [out.outputs[0] for out in llm.engine.step()]
        assert len(outputs) == 20 and outputs[-1].text.endswith("\ufffd")
        assert not any("\ufffd" in out.text for out in outputs[:-1])


EMOJI = "\U0001F389"  # four UTF-8 bytes, three SmolLM2 tokens


def test_request_ending_inside_a_character_sends_its_bytes(llm):
    """The detokenizer holds back the first bytes of an unfinished character; when the request
    ends there (length or stop token) they are sent, as decoding the whole output renders them:
    one U+FFFD for an incomplete UTF-8 sequence (Python's own decoder, errors="replace")."""
    emoji_ids = llm.get_tokenizer().encode(EMOJI * 2, add_special_tokens=False)
    prompt = "Party emojis: " + EMOJI * 6  # greedy SmolLM2 repeats the emoji
    by_length = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert by_length.token_ids == emoji_ids[:4] and by_length.finish_reason == "length"
    assert by_length.text == (EMOJI.encode() * 2)[:6].decode("utf-8", "replace") == EMOJI + "\ufffd"
    by_stop = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                                  stop_token_ids=[emoji_ids[2]]))[0].outputs[0]
    assert by_stop.token_ids == emoji_ids[:3] and by_stop.stop_reason == emoji_ids[2]
    assert by_stop.text == EMOJI.encode()[:3].decode("utf-8", "replace") == "\ufffd"


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("a", "Hello there, how are you today?", SamplingParams(max_tokens=50))
    eng.add_request("b", "Another request", SamplingParams(max_tokens=50))
    eng.step()
    eng.step()
    eng.abort_request("a")
    eng.abort_request("b")
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_logprobs_are_top_k_plus_chosen(llm):
    out = llm.generate("The weather today", SamplingParams(temperature=0.8, max_tokens=5,
                                                           logprobs=3, seed=1))[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and 3 <= len(lp) <= 4
        assert all(v <= 0 for v in lp.values())
    assert abs(out.cumulative_logprob - sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs))) < 1e-4


def test_stop_token_text_is_not_in_the_output(llm):
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            skip_special_tokens=False)
    full = llm.generate("Count: 1, 2, 3,", greedy)[0].outputs[0]
    token = full.token_ids[5]
    cut = llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[token],
        skip_special_tokens=False))[0].outputs[0]
    assert cut.token_ids[-1] == token
    assert cut.text == tok.decode(cut.token_ids[:-1], skip_special_tokens=False)


def test_gpu_kv_cache_budget_follows_utilization_of_total_and_free():
    from llama_engine.engine.llm_engine import GIB, gpu_kv_cache_budget
    # A device to ourselves: 0.9 of 140 GiB minus the 2 GiB of weights already loaded.
    assert gpu_kv_cache_budget(138 * GIB, 140 * GIB, 2 * GIB, 0.9) == 0.9 * 140 * GIB - 2 * GIB
    # 50 GiB held elsewhere: at most 0.3 of the 90 GiB still free, never a negative plan
    # (the old free - total * (1 - util) gave 90 - 98 = -8 GiB here).
    assert gpu_kv_cache_budget(90 * GIB, 140 * GIB, 0, 0.3) == 0.3 * 90 * GIB
