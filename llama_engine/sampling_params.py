"""Per-request generation settings, vLLM-style."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llama_engine.errors import RequestValidationError

# Below this a temperature only overflows the softmax: treat it as greedy, as vLLM does.
GREEDY_TEMPERATURE = 1e-5
# top_k beyond any vocabulary means no limit (the kernels take it as int32).
TOP_K_OFF_ABOVE = 1 << 24
# A smaller positive top_p is zero to the float32 kernels; both mean "only the most likely
# token", so it is raised to this.
MIN_TOP_P = 1e-6
MAX_LOGPROBS = 20
# OpenAI's range for logit_bias values: -100 bans a token in practice, +100 forces it.
MAX_LOGIT_BIAS = 100.0


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text, vLLM's ``StructuredOutputsParams``: set exactly one
    of ``json`` (a JSON schema, as a dict or a JSON string), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (a Lark grammar, as
    llguidance reads it). Decoding only picks tokens that keep the text a prefix of a match,
    and ends the sample (finish reason "stop") once the text is a complete match that
    cannot be extended. Whether the schema/regex/grammar itself is valid is checked when
    the engine takes the request (RequestValidationError naming ``structured_outputs``)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in ("json", "regex", "choice", "grammar")
                  if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(chosen) != 1:
            raise RequestValidationError(
                "structured_outputs", "must set exactly one of json, json_object, regex, "
                f"choice, grammar; got {chosen or 'none'}")
        if self.choice is not None and not (
                self.choice and all(isinstance(c, str) for c in self.choice)):
            raise RequestValidationError(
                "structured_outputs", f"choice must be a non-empty list of strings, got "
                f"{self.choice!r}")


@dataclass
class SamplingParams:
    """How to generate. ``temperature=0`` is greedy. ``max_tokens=None`` generates until a
    stop condition or the context limit; ``max_tokens=0`` generates nothing (with
    ``prompt_logprobs``, the way a prompt is scored). ``logprobs=k`` reports the k most likely
    tokens at each generated position plus the chosen one; ``prompt_logprobs=k`` does the
    same for every prompt token after the first (vLLM's field). Bad values raise
    ``RequestValidationError`` naming the field."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # token id -> value added to its logit before sampling, in [-100, 100] (OpenAI's logit_bias)
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_types()
        if self.top_k == -1 or self.top_k > TOP_K_OFF_ABOVE:
            self.top_k = 0
        if 0 < self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0
        if 0 < self.top_p < MIN_TOP_P:
            self.top_p = MIN_TOP_P
        checks = [
            ("n", self.n >= 1, "must be an integer >= 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0,
             "must be an integer >= 0 (or None for no limit)"),
            ("temperature", 0.0 <= self.temperature, "must be >= 0"),
            ("top_p", 0.0 < np.float32(self.top_p) <= 1.0,
             "must be in (0, 1] (and > 0 in float32)"),
            ("top_k", self.top_k >= 0, "must be an integer >= 0 (0 or -1 disables it)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be an integer in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be an integer in [0, {MAX_LOGPROBS}]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop_strings),
             "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            ("logit_bias", self.logit_bias is None or all(
                type(t) is int and t >= 0 and type(b) in (int, float)
                and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias.items()),
             f"must map token ids (integers >= 0) to biases in [-{MAX_LOGIT_BIAS:g}, "
             f"{MAX_LOGIT_BIAS:g}]"),
            ("structured_outputs", self.structured_outputs is None
             or isinstance(self.structured_outputs, StructuredOutputsParams),
             "must be a StructuredOutputsParams"),
        ]
        for name, ok, reason in checks:
            if not ok:
                raise RequestValidationError(name, f"{reason}, got {getattr(self, name)!r}")

    def _check_types(self) -> None:
        """Integers where counts belong, numbers where reals do (bool is neither)."""
        integers = ("n", "top_k", "max_tokens", "logprobs", "prompt_logprobs", "seed")
        reals = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
        for name in integers + reals:
            value = getattr(self, name)
            if value is None and name in ("max_tokens", "logprobs", "prompt_logprobs", "seed"):
                continue
            kinds = (int,) if name in integers else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                kind = "an integer" if name in integers else "a number"
                raise RequestValidationError(name, f"must be {kind}, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
