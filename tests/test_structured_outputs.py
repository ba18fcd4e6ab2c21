"""Structured outputs and logit_bias in the engine, on the default model: every constrained
output is checked by an independent reference (json, jsonschema, re), and constrained rows
share a batch with free ones without changing either."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from llama_engine.engine.sampler import TokenBitmask, apply_token_bitmask
from llama_engine.engine.structured_output import grammar_error
from llama_engine.sampling_params import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

# Nested object, enum, array and required fields; bounded strings keep the test short.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16},
                   "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "skills", "active"],
    "additionalProperties": False,
}
SUBJECTS = ["a chef in Lyon", "a retired pilot", "a student of physics", "a jazz pianist",
            "a software engineer", "a nurse", "a beekeeper", "a marathon runner", "a librarian",
            "a ship captain", "a baker", "a painter", "a firefighter", "a chess player",
            "a farmer", "a teacher", "a photographer", "a diver", "a poet", "a mechanic"]
MAX_TOKENS = 96


def chat_prompt(llm, question: str) -> list[int]:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": question}])


def greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=extra.pop("max_tokens", MAX_TOKENS), **extra)


def json_schema_params(schema: dict) -> SamplingParams:
    return greedy(structured_outputs=StructuredOutputsParams(json=schema))


def test_twenty_prompts_under_a_json_schema_all_validate(default_llm):
    prompts = [chat_prompt(default_llm, f"Give a JSON profile of {s}.") for s in SUBJECTS]
    outputs = default_llm.generate(prompts, json_schema_params(PERSON_SCHEMA))
    for out in outputs:
        sample = out.outputs[0]
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), PERSON_SCHEMA)


def test_json_object_parses_and_sampling_keeps_it_valid(default_llm):
    prompt = chat_prompt(default_llm, "Describe a cat as JSON.")
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=48,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    for sample in default_llm.generate(prompt, params)[0].outputs:
        if sample.finish_reason == "stop":  # a long object may run out of tokens first
            assert isinstance(json.loads(sample.text), dict)
        else:
            assert sample.text.startswith("{")


def test_regex_and_choice(default_llm):
    prompt = chat_prompt(default_llm, "What is the date of the moon landing?")
    pattern = r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]"
    dated = default_llm.generate(prompt, greedy(
        structured_outputs=StructuredOutputsParams(regex=pattern)))[0].outputs[0]
    assert re.fullmatch(pattern, dated.text) and dated.finish_reason == "stop"
    choices = ["yes", "no", "maybe \u2713"]
    picked = default_llm.generate(prompt, greedy(
        structured_outputs=StructuredOutputsParams(choice=choices)))[0].outputs[0]
    assert picked.text in choices and picked.finish_reason == "stop"


def test_constrained_and_free_requests_share_a_batch(default_llm):
    """Greedy: each request gives in a mixed batch exactly what it gives alone."""
    prompts = [chat_prompt(default_llm, f"Give a JSON profile of {s}.") for s in SUBJECTS[:4]]
    budget = 24  # the constrained ones need not finish: the tokens must match either way
    params = [greedy(max_tokens=budget, structured_outputs=StructuredOutputsParams(json=PERSON_SCHEMA)),
              greedy(max_tokens=budget),
              greedy(max_tokens=budget, structured_outputs=StructuredOutputsParams(json_object=True)),
              greedy(max_tokens=budget, logit_bias={0: -100.0})]
    alone = [default_llm.generate(p, sp)[0].outputs[0] for p, sp in zip(prompts, params)]
    together = [o.outputs[0] for o in default_llm.generate(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_logit_bias_forces_and_bans_a_token(default_llm):
    tokenizer = default_llm.get_tokenizer()
    prompt = chat_prompt(default_llm, "Name a fruit.")
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = default_llm.generate(prompt, greedy(max_tokens=5, logit_bias={banana: 100}))
    assert forced[0].outputs[0].token_ids == [banana] * 5
    free = default_llm.generate(prompt, greedy(max_tokens=5))[0].outputs[0].token_ids
    banned = default_llm.generate(prompt, greedy(max_tokens=5, logit_bias={free[0]: -100}))
    assert banned[0].outputs[0].token_ids[0] != free[0]
    assert free[0] not in banned[0].outputs[0].token_ids


def test_bad_constraints_are_value_errors_naming_the_field(default_llm):
    with pytest.raises(ValueError, match="structured_outputs"):
        default_llm.generate("x", json_schema_params({"type": "no-such-type"}))
    assert "unclosed group" in grammar_error(StructuredOutputsParams(regex="a("))
    assert grammar_error(StructuredOutputsParams(json={"type": "integer"})) is None
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="logit_bias"):
        greedy(logit_bias={5: 101})
    with pytest.raises(ValueError, match="logit_bias"):
        default_llm.generate("x", greedy(logit_bias={10**9: 1}))


def test_token_bitmask_bans_exactly_the_cleared_bits():
    """Against a per-token loop over the bits; rows without a mask are untouched."""
    generator = torch.Generator().manual_seed(0)
    batch, vocab = 5, 1000
    words = (vocab + 31) // 32
    logits = torch.randn(batch, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    rows = [0, 2, 3]
    masked = logits.clone()
    apply_token_bitmask(masked, TokenBitmask(rows, bitmask))
    bits = bitmask.numpy().astype(np.int64) & 0xFFFFFFFF
    for row in range(batch):
        for token in range(vocab):
            if row in rows and not (bits[rows.index(row), token // 32] >> (token % 32)) & 1:
                assert masked[row, token] < -1e38
                assert torch.softmax(masked[row], 0)[token] == 0
            else:
                assert masked[row, token] == logits[row, token]
