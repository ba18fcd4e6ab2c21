"""What generation returns: one RequestOutput per request, one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: {token id: logprob} per prompt token, None for the first
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Reward models: the score head's output at the prompt's last token (HF
    # LlamaForSequenceClassification's logit); None for a generative model
    score: float | None = None
