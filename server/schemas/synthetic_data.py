"""Request and response models of the spec's RewardScoring and SyntheticDataGeneration APIs
(llama_stack_draft_spec.py). The fields of SyntheticDataGenerationRequest beyond `prompts`,
`filtering_function` and `reward_scoring` are this server's, with the defaults shown."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional

from pydantic import Field

from server.schemas.common import StrictModel
from server.schemas.llama_stack import Dialog, Message

MAX_K = 64  # generations per prompt: more is a batch job, not one request
DEFAULT_K = 4
DEFAULT_MAX_TOKENS = 256
REWARD_MODEL_DESCRIPTION = (
    "A reward model served with `--reward-model` (its id, or the spec's name "
    "llama3_405b_reward); default: the one the server serves."
)


class KPromptGenerations(StrictModel):
    """A dialog and k candidate replies to score."""

    dialog: Dialog
    k_generations: list[Message] = Field(min_length=1)


class RewardScoringRequest(StrictModel):
    """Request to score a reward function. A list of prompts and a list of responses per
    prompt. Each (dialog, generation) is rendered with the reward model's chat template and
    scored at its last token."""

    prompt_generations: list[KPromptGenerations] = Field(min_length=1)
    model: str = Field(min_length=1, description=REWARD_MODEL_DESCRIPTION)


class ScoredMessage(StrictModel):
    message: Message
    score: float


class KScoredPromptGenerations(StrictModel):
    prompt: Message
    k_scored_generations: list[ScoredMessage]


class RewardScoringResponse(StrictModel):
    """The scored generations, in request order (each prompt's generations in their order)."""

    scored_generations: list[KScoredPromptGenerations]


class FilteringFunction(str, Enum):
    """The type of filtering function; each is defined in llama_engine/synthetic_data/filters.py."""

    none = "none"
    random = "random"
    top_k = "top_k"
    top_p = "top_p"
    top_k_top_p = "top_k_top_p"
    sigmoid = "sigmoid"


class FilteringParams(StrictModel):
    """k: kept by random and top_k (and top_k_top_p's first stage); p: the softmax mass of the
    prompt's scores top_p keeps, in (0, 1]; threshold: sigmoid keeps a generation with
    probability sigmoid(score - threshold); seed: for random and sigmoid (absent: fresh
    randomness)."""

    k: int = Field(default=1, ge=1, le=MAX_K)
    p: float = Field(default=0.9, gt=0.0, le=1.0)
    threshold: float = 0.0
    seed: Optional[int] = None


class GenerationSamplingParams(StrictModel):
    """How the policy samples the k generations of a prompt."""

    temperature: float = Field(default=0.7, ge=0.0, le=100.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: Optional[int] = Field(default=None, description="same seed, same generations")


class RewardScoringConfig(StrictModel):
    """The spec's `reward_scoring`: which reward model scores the generations."""

    model: str = Field(min_length=1, description=REWARD_MODEL_DESCRIPTION)


class SyntheticDataGenerationRequest(StrictModel):
    """Request to generate synthetic data. A small batch of prompts and a filtering function:
    for each prompt, k generations are sampled from the policy `model`, scored by the reward
    model, and filtered per prompt."""

    prompts: list[Message] = Field(min_length=1)
    filtering_function: FilteringFunction = Field(default=FilteringFunction.none, strict=False)
    reward_scoring: Optional[RewardScoringConfig] = None
    model: Optional[str] = Field(default=None, min_length=1,
                                 description="The policy model; default: the first served model.")
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K, description="generations per prompt")
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, description="per generation")
    sampling_params: GenerationSamplingParams = Field(default_factory=GenerationSamplingParams)
    filtering_params: FilteringParams = Field(default_factory=FilteringParams)
    reward_model: Optional[str] = Field(default=None, min_length=1,
                                        description=REWARD_MODEL_DESCRIPTION)
    save_as_dataset: Optional[str] = Field(
        default=None, min_length=1,
        description="Register the kept data as a dataset with this uuid (Datasets API).")
    dataset_type: Literal["sft", "dpo"] = Field(
        default="sft", description="sft: a `dialog` column, one row per kept generation; dpo: "
        "`prompt`, `chosen` (the best kept generation) and `rejected` (the worst), one row per "
        "prompt with two kept generations of different scores.")


class SyntheticDataGenerationResponse(StrictModel):
    """Response from the synthetic data generation: the kept (prompt, generation, score)
    tuples, and statistics: num_prompts, num_generated, num_kept; score_mean, score_std
    (population), score_min, score_max over every generation; tokens_generated,
    generation_time_s, generation_tokens_per_s; scoring_time_s; prefix_cache_hit_rate (the
    share of the scored tokens found in the reward model's prefix cache); with
    save_as_dataset, dataset_saved, and dataset_id and dataset_rows when saved, or
    dataset_not_saved_reason when the filter kept nothing a row needs."""

    synthetic_data: list[KScoredPromptGenerations]
    statistics: Optional[dict[str, Any]] = None
