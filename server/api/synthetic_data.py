"""The spec's SyntheticDataGeneration API: for each prompt, sample k generations from a
policy model, score them with a reward model, keep what the filtering function keeps,
report statistics, and optionally register the kept data as a dataset for SFT or DPO.

The k generations of a prompt are one engine request with n = k (they fork from one prefill
of the prompt); every prompt's request runs together, then every generation is scored
together on the reward model (``RewardScoringService.score_replies``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from llama_engine.datasets import (DatasetExistsError, DatasetNotFoundError, DatasetRegistry)
from llama_engine.synthetic_data import (DATASET_TYPES, DPO, FilteringParams, ScoredPrompt,
                                         dataset_rows, filter_generations, most_kept,
                                         score_statistics)
from server.api.errors import APIError, ConflictError
from server.api.generation import (GenerationRunner, engine_request, make_sampling_params,
                                   run_together)
from server.api.prompts import content_text
from server.api.registry import ModelRegistry, ServedModel
from server.api.reward_scoring import DialogReplies, RewardScoringService
from server.schemas import llama_stack as ls
from server.schemas import synthetic_data as sd

# The engine's fields as this request spells them.
ENGINE_FIELDS = {"n": "k", "max_tokens": "max_tokens",
                 **{name: f"sampling_params.{name}" for name in ("temperature", "top_p", "top_k",
                                                                 "seed")}}
DATASET_SOURCE = "synthetic_data_generation"


def _reward_model_name(request: sd.SyntheticDataGenerationRequest) -> tuple[Optional[str], str]:
    """The reward model the request names (None: the served one) and the field naming it."""
    spec_name = request.reward_scoring.model if request.reward_scoring else None
    if spec_name and request.reward_model and spec_name != request.reward_model:
        raise APIError(f"reward_scoring.model: {spec_name!r} differs from reward_model "
                       f"{request.reward_model!r}; give one", param="reward_scoring.model")
    if request.reward_model:
        return request.reward_model, "reward_model"
    return spec_name, "reward_scoring.model" if spec_name else "reward_model"


def _filtering_params(request: sd.SyntheticDataGenerationRequest) -> FilteringParams:
    f = request.filtering_params
    return FilteringParams(k=f.k, p=f.p, threshold=f.threshold, seed=f.seed)


def _refuse_unpairable(request: sd.SyntheticDataGenerationRequest) -> None:
    """A dpo dataset pairs two kept generations of one prompt: a request whose k and filter
    keep at most one per prompt could never save a row, so it is refused before generating
    (400 naming the field to raise)."""
    if request.dataset_type != DPO:
        return
    function = request.filtering_function.value
    most = most_kept(function, request.k, _filtering_params(request))
    if most >= 2:
        return
    need = ("save_as_dataset with dataset_type dpo pairs two kept generations of a prompt "
            "(chosen and rejected)")
    if request.k < 2:
        raise APIError(f"k: {need}; k=1 samples one generation per prompt", param="k")
    raise APIError(f"filtering_params.k: {need}; the {function} filter keeps at most "
                   f"filtering_params.k={request.filtering_params.k}", param="filtering_params.k")


class SyntheticDataService:
    def __init__(self, registry: ModelRegistry, runner: GenerationRunner,
                 scoring: RewardScoringService, datasets: DatasetRegistry):
        self.registry, self.runner = registry, runner
        self.scoring, self.datasets = scoring, datasets

    async def generate(self, request: sd.SyntheticDataGenerationRequest
                       ) -> sd.SyntheticDataGenerationResponse:
        policy = self.registry.resolve_generator(request.model, "model")
        reward = self.registry.resolve_reward_model(*_reward_model_name(request))
        if request.save_as_dataset is not None:
            _refuse_unpairable(request)
            await asyncio.to_thread(self._refuse_taken_dataset, request.save_as_dataset)
        dialogs = [[{"role": m.role, "content": content_text(m.content, f"prompts[{i}].content",
                                                             policy.model_id)}]
                   for i, m in enumerate(request.prompts)]
        generations, tokens, generation_s = await self._sample(policy, request, dialogs)
        scored = await self.scoring.score_replies(reward, [
            DialogReplies(messages, texts, [f"prompts[{i}]"] * len(texts))
            for i, (messages, texts) in enumerate(zip(dialogs, generations))], "k")
        params = _filtering_params(request)
        prompts = [ScoredPrompt(messages, texts, scores, filter_generations(
                       request.filtering_function.value, scores, params, prompt_index=i))
                   for i, (messages, texts, scores) in enumerate(zip(dialogs, generations,
                                                                      scored.scores))]
        all_scores = [s for p in prompts for s in p.scores]
        statistics: dict[str, Any] = {
            "policy_model": policy.model_id, "reward_model": reward.model_id,
            "num_prompts": len(prompts), "num_generated": len(all_scores),
            "num_kept": sum(len(p.kept) for p in prompts), **score_statistics(all_scores),
            "tokens_generated": tokens, "generation_time_s": generation_s,
            "generation_tokens_per_s": tokens / generation_s if generation_s > 0 else 0.0,
            "scoring_time_s": scored.seconds,
            "prefix_cache_hit_rate": scored.prefix_cache_hit_rate}
        if request.save_as_dataset is not None:
            statistics.update(await asyncio.to_thread(self._save, request, prompts, policy, reward))
        return sd.SyntheticDataGenerationResponse(
            synthetic_data=[sd.KScoredPromptGenerations(
                prompt=message, k_scored_generations=[
                    sd.ScoredMessage(message=ls.Message(role="assistant", content=p.generations[j]),
                                     score=p.scores[j]) for j in p.kept])
                for message, p in zip(request.prompts, prompts)],
            statistics=statistics)

    async def _sample(self, policy: ServedModel, request: sd.SyntheticDataGenerationRequest,
                      dialogs: list[list[dict]]) -> tuple[list[list[str]], int, float]:
        """k generations per dialog (one request with n = k each, all run together): their
        texts, the tokens generated, and the seconds it took."""
        sp = request.sampling_params
        params = make_sampling_params(ENGINE_FIELDS, n=request.k, max_tokens=request.max_tokens,
                                      temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                      seed=sp.seed)
        prepared = []
        for i, messages in enumerate(dialogs):
            try:
                ids = policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError as exc:
                raise APIError(f"prompts[{i}]: {exc}", param=f"prompts[{i}]") from None
            prepared.append(engine_request(policy, ids, params,
                                           {**ENGINE_FIELDS, "prompt": f"prompts[{i}]"}))
        with policy.admit(len(prepared) * request.k, "k"):
            started = time.perf_counter()
            outputs = await run_together([self.runner.run(p) for p in prepared])
            seconds = time.perf_counter() - started
        texts = [[o.text for o in out.outputs] for out in outputs]
        tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
        return texts, tokens, seconds

    def _refuse_taken_dataset(self, dataset_id: str) -> None:
        try:
            self.datasets.get(dataset_id)
        except DatasetNotFoundError:
            return
        raise ConflictError(f"save_as_dataset: dataset {dataset_id!r} already exists",
                            param="save_as_dataset")

    def _save(self, request: sd.SyntheticDataGenerationRequest, prompts: list[ScoredPrompt],
              policy: ServedModel, reward: ServedModel) -> dict[str, Any]:
        """Register the kept data as the request's dataset; the statistics saying so, or why
        nothing was saved (no row to save: the generations are still returned)."""
        rows = dataset_rows(prompts, request.dataset_type)
        if not rows:
            need = ("a prompt with two kept generations of different scores"
                    if request.dataset_type == DPO else "a kept generation")
            return {"dataset_saved": False, "dataset_rows": 0,
                    "dataset_not_saved_reason": f"the {request.dataset_type} dataset needs "
                    f"{need}; the {request.filtering_function.value} filter left none"}
        metadata = {"source": DATASET_SOURCE, "dataset_type": request.dataset_type,
                    "policy_model": policy.model_id, "reward_model": reward.model_id,
                    "filtering_function": request.filtering_function.value}
        try:
            self.datasets.create_from_rows(request.save_as_dataset,
                                           DATASET_TYPES[request.dataset_type], rows, metadata)
        except DatasetExistsError as exc:
            raise ConflictError(f"save_as_dataset: {exc}", param="save_as_dataset") from None
        return {"dataset_saved": True, "dataset_id": request.save_as_dataset,
                "dataset_rows": len(rows)}
