"""The spec's RewardScoring API: score (dialog, generation) pairs with a reward model.

Each pair is rendered with the reward model's chat template exactly as reward training
tokenizes a preference pair (``llama_engine.synthetic_data.reply_token_ids``) and sent to the
reward model's engine as a prefill-only request (max_tokens=0): the scheduler batches it
with everything else on that engine, the prefix cache shares a dialog's tokens among its k
generations, and the score head reads the final hidden state of the last token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from llama_engine.sampling_params import SamplingParams
from llama_engine.synthetic_data import reply_token_ids
from server.api.errors import APIError
from server.api.generation import GenerationRunner, engine_request, run_together
from server.api.prompts import content_text, spec_dialog_turns
from server.api.registry import ModelRegistry, ServedModel
from server.schemas import llama_stack as ls
from server.schemas import synthetic_data as sd

SCORE_ONLY = SamplingParams(max_tokens=0)  # prefill the prompt, sample nothing


@dataclass
class DialogReplies:
    """One dialog ({role, content} messages) and the replies to score, each with the request
    field that names it in errors."""

    messages: list[dict]
    replies: list[str]
    reply_fields: list[str]


@dataclass
class ScoredReplies:
    """Scores per dialog, in order, and what the scoring cost."""

    scores: list[list[float]]
    prompt_tokens: int  # tokens scored, in all
    cached_tokens: int  # of those, found in the prefix cache
    seconds: float

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def dialog_messages(dialog: ls.Dialog, model_id: str) -> list[dict]:
    """The spec Dialog as the {role, content} messages reward training reads."""
    return [{"role": turn.role, "content": turn.text}
            for turn in spec_dialog_turns(dialog, model_id)]


class RewardScoringService:
    def __init__(self, registry: ModelRegistry, runner: GenerationRunner):
        self.registry = registry
        self.runner = runner

    async def score(self, request: sd.RewardScoringRequest) -> sd.RewardScoringResponse:
        model = self.registry.resolve_reward_model(request.model, "model")
        items = []
        for i, pg in enumerate(request.prompt_generations):
            path = f"prompt_generations[{i}].k_generations"
            items.append(DialogReplies(
                dialog_messages(pg.dialog, model.model_id),
                [content_text(g.content, f"{path}[{j}].content", model.model_id)
                 for j, g in enumerate(pg.k_generations)],
                [f"{path}[{j}]" for j in range(len(pg.k_generations))]))
        scored = await self.score_replies(model, items, "prompt_generations")
        return sd.RewardScoringResponse(scored_generations=[
            sd.KScoredPromptGenerations(
                prompt=pg.dialog.message,
                k_scored_generations=[sd.ScoredMessage(message=message, score=score)
                                      for message, score in zip(pg.k_generations, scores)])
            for pg, scores in zip(request.prompt_generations, scored.scores)])

    async def score_replies(self, model: ServedModel, items: Sequence[DialogReplies],
                            size_field: str) -> ScoredReplies:
        """Score every reply of every item together on ``model`` (a reward model). Raises
        APIError naming the reply's field (a template that cannot render it, a dialog plus
        reply beyond the model's context) or ``size_field`` (more replies than the model
        admits at once)."""
        prepared = []
        for item in items:
            for reply, field in zip(item.replies, item.reply_fields):
                try:
                    ids = reply_token_ids(model.tokenizer, item.messages, reply)
                except ValueError as exc:  # the chat template cannot render it
                    raise APIError(f"{field}: {exc}", param=field) from None
                prepared.append(engine_request(model, ids, SCORE_ONLY, {"prompt": field}))
        with model.admit(len(prepared), size_field):
            started = time.perf_counter()
            outputs = await run_together([self.runner.run(p) for p in prepared])
            seconds = time.perf_counter() - started
        flat = iter(outputs)
        scores = [[next(flat).score for _ in item.replies] for item in items]
        return ScoredReplies(scores, sum(len(o.prompt_token_ids) for o in outputs),
                             sum(o.num_cached_tokens for o in outputs), seconds)
