"""Structured outputs: per-request grammars that decide which tokens may come next.

A request's ``StructuredOutputsParams`` (JSON schema, any JSON object, regex, choice, Lark
grammar) becomes a grammar matcher. Before each sampling step the matchers of the
constrained rows fill one token bitmask for the batch (bit ``t`` of row ``r`` set = token
``t`` allowed); the sampler bans the cleared bits, so constrained and free requests share
the batch. Each matcher then consumes the sampled token; once its grammar is complete and
cannot be extended, the engine ends the sample (EOS is allowed only when the text is a
complete match).

The grammar library is llguidance (Microsoft's Rust engine behind guidance, also a backend
of vLLM, SGLang and llama.cpp), chosen over xgrammar and outlines-core because:
- it needs no per-grammar precompilation: its lazy lexer and Earley parser compute each mask
  on the fly in tens of microseconds, so a new schema per request costs about a millisecond
  to start, where xgrammar compiles each grammar up front and outlines-core builds a whole
  token-level automaton per schema (seconds for a large one);
- it depends on nothing (no torch pin: xgrammar requires torch, which could replace ours);
- one API covers JSON schema, regex and Lark grammars with embedded JSON schemas (what a
  tool call in a model's markup needs), plus a thread-pooled batch mask fill;
- it builds its view of the vocabulary straight from a ``tokenizers`` JSON, which is what
  our tokenizer already is (GGUF vocabularies included).
"""
from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache

import llguidance
import torch

from llama_engine.errors import RequestValidationError
from llama_engine.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)

BITS_PER_WORD = 32  # llguidance bitmasks are int32 words, token t in bit t % 32 of word t // 32
# JSON layout the grammar enforces: fixed separators and no free whitespace. A small model
# given free whitespace can spin on newlines until max_tokens; this way the output is
# compact and the same as json.dumps writes it.
JSON_LAYOUT: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}
MATCHER_CACHE_SIZE = 64  # compiled grammars kept per engine (deep-copied per request)


def json_schema_grammar(schema: dict) -> str:
    """llguidance grammar text for a JSON schema, in ``JSON_LAYOUT``. ValueError when
    ``schema`` is not a JSON object."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


def lark_json(schema: dict) -> str:
    """A Lark item (llguidance's ``%json`` extension) matching JSON valid under ``schema``
    in ``JSON_LAYOUT``, for grammars that embed JSON in other text, such as a tool call in
    a model's markup."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for a constraint (not yet validated). RequestValidationError
    naming ``structured_outputs.json`` when a schema string is not JSON."""
    if spec.json is not None:
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise RequestValidationError("structured_outputs.json", f"not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise RequestValidationError("structured_outputs.json", "a JSON schema must be an object")
        return json_schema_grammar(schema)
    if spec.json_object:
        return json_schema_grammar(ANY_JSON_OBJECT)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


def grammar_error(spec: StructuredOutputsParams) -> str | None:
    """Why the constraint does not compile (an invalid JSON schema, regex or grammar), or
    None when it does. Needs no model, so a front end can check before queueing."""
    try:
        return llguidance.LLMatcher.validate_grammar(grammar_text(spec)) or None
    except ValueError as exc:
        return str(exc)


class StructuredOutputManager:
    """One engine's grammar machinery: llguidance's view of the vocabulary (built on the
    first constrained request, about 0.3 s for a 49k vocabulary, so start-up pays nothing),
    compiled grammars, and the batched mask fill and token advance.

    ``tokenizer_json`` returns the model's ``tokenizers`` pipeline as tokenizer.json text;
    ``vocab_size`` is the width of the model's logits; ``stop_token_ids`` are the tokens
    that end a sample, allowed by a mask only where the grammar is complete.
    """

    def __init__(self, tokenizer_json, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.words = (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD
        self._stop_token_ids = sorted(stop_token_ids)
        self._lock = threading.Lock()  # requests are made on server threads
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._compiled = lru_cache(MATCHER_CACHE_SIZE)(self._compile)

    def _ensure_started(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self.vocab_size,
                    eos_token=self._stop_token_ids)
                self._executor = llguidance.LLExecutor()
            return self._ll_tokenizer

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._ensure_started(), grammar, log_level=0)
        if matcher.is_error():
            raise RequestValidationError("structured_outputs", matcher.get_error())
        return matcher

    def matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the constraint. RequestValidationError naming
        ``structured_outputs`` when it does not compile."""
        return self._compiled(grammar_text(spec)).deep_copy()

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """Allowed next tokens of each matcher: int32 [len(matchers), words], filled by
        llguidance's thread pool in one call."""
        bitmask = torch.empty(len(matchers), self.words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m, row) for row, m in enumerate(matchers)], bitmask.data_ptr(),
            self.words * bitmask.element_size(), len(matchers))
        return bitmask

    def advance(self, matchers: list[llguidance.LLMatcher], tokens: list[int]) -> None:
        """Each matcher consumes its sampled token (in parallel). A matcher that fails (a
        parser limit hit mid-way; the mask allowed the token) is left in its error state
        for the engine to end that sample, and logged; the rest of the batch goes on."""
        accepted = self._executor.consume_token_par(list(zip(matchers, tokens)))
        for matcher, ok in zip(matchers, accepted):
            if not ok:
                log.warning("structured output stopped early: %s", matcher.get_error())
