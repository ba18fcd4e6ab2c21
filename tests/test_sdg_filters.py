"""The filtering functions of synthetic data generation, against their definitions
(llama_engine/synthetic_data/filters.py), on random scores; and the dataset rows kept data
becomes."""
from __future__ import annotations

import math
import random

import pytest

from llama_engine.synthetic_data import (FilteringParams, ScoredPrompt, dataset_rows,
                                         filter_generations, most_kept)
from llama_engine.synthetic_data.filters import FILTERS

CASES = 50


def random_scores(rng: random.Random) -> list[float]:
    return [rng.gauss(0, 2) for _ in range(rng.randint(1, 12))]


def test_none_is_the_identity() -> None:
    rng = random.Random(0)
    for _ in range(CASES):
        scores = random_scores(rng)
        assert filter_generations("none", scores, FilteringParams()) == list(range(len(scores)))


def test_top_k_keeps_at_most_k_and_the_best() -> None:
    rng = random.Random(1)
    for _ in range(CASES):
        scores, k = random_scores(rng), rng.randint(1, 8)
        kept = filter_generations("top_k", scores, FilteringParams(k=k))
        assert len(kept) == min(k, len(scores))
        dropped = set(range(len(scores))) - set(kept)
        assert all(scores[i] >= scores[j] for i in kept for j in dropped)


def nucleus_size(scores: list[float], p: float) -> int:
    """Hand-computed: how many of the best scores reach softmax mass p."""
    weights = sorted((math.exp(s) for s in scores), reverse=True)
    total, mass = sum(weights), 0.0
    for count, w in enumerate(weights, 1):
        mass += w / total
        if mass >= p:
            return count
    return len(weights)


def test_top_p_keeps_the_best_until_the_mass_reaches_p_and_more_as_p_grows() -> None:
    rng = random.Random(2)
    for _ in range(CASES):
        scores = random_scores(rng)
        previous: set[int] = set()
        for p in (0.05, 0.3, 0.6, 0.9, 0.99, 1.0):
            kept = filter_generations("top_p", scores, FilteringParams(p=p))
            assert len(kept) == nucleus_size(scores, p)
            dropped = set(range(len(scores))) - set(kept)
            assert all(scores[i] >= scores[j] for i in kept for j in dropped)
            assert previous <= set(kept)
            previous = set(kept)
        assert previous == set(range(len(scores)))  # p = 1 keeps all


def test_top_k_top_p_is_top_p_over_the_top_k() -> None:
    rng = random.Random(3)
    for _ in range(CASES):
        scores, k, p = random_scores(rng), rng.randint(1, 6), rng.uniform(0.1, 1.0)
        top = filter_generations("top_k", scores, FilteringParams(k=k))
        kept = filter_generations("top_k_top_p", scores, FilteringParams(k=k, p=p))
        assert set(kept) <= set(top)
        assert len(kept) == nucleus_size([scores[i] for i in top], p)


@pytest.mark.parametrize("function", ["random", "sigmoid"])
def test_the_same_seed_keeps_the_same_set(function: str) -> None:
    rng = random.Random(4)
    differs = 0
    for _ in range(CASES):
        scores = [rng.gauss(0, 0.5) for _ in range(10)]
        params = FilteringParams(k=3, seed=rng.randint(0, 1000))
        first = filter_generations(function, scores, params, prompt_index=2)
        assert filter_generations(function, scores, params, prompt_index=2) == first
        other = FilteringParams(k=3, seed=params.seed + 1)
        differs += filter_generations(function, scores, other, prompt_index=2) != first
        if function == "random":
            assert len(first) == 3 and len(set(first)) == 3
    assert differs > CASES // 2  # the seed matters


def test_sigmoid_keeps_all_with_a_very_low_threshold_and_none_with_a_very_high_one() -> None:
    rng = random.Random(5)
    for _ in range(CASES):
        scores = random_scores(rng)
        low = FilteringParams(threshold=-1e6, seed=rng.randint(0, 99))
        high = FilteringParams(threshold=1e6, seed=low.seed)
        assert filter_generations("sigmoid", scores, low) == list(range(len(scores)))
        assert filter_generations("sigmoid", scores, high) == []


def test_sigmoid_keeps_at_the_rate_sigmoid_of_score_minus_threshold() -> None:
    scores, threshold = [0.0] * 4000, -1.0  # sigmoid(1) = 0.731
    kept = filter_generations("sigmoid", scores, FilteringParams(threshold=threshold, seed=7))
    assert abs(len(kept) / len(scores) - 1 / (1 + math.exp(-1))) < 0.03


@pytest.mark.parametrize("function", sorted(FILTERS))
def test_most_kept_bounds_what_a_filter_keeps_and_is_reached(function: str) -> None:
    """No score set makes a filter keep more than most_kept; the ones that keep a fixed
    number (none: n, random and top_k: min(k, n)) keep exactly that, and the bound of the
    others is reached by some scores (equal scores: top_p keeps n at p = 1, sigmoid keeps
    all at a very low threshold)."""
    rng = random.Random(4)
    for _ in range(CASES):
        scores = random_scores(rng)
        params = FilteringParams(k=rng.randint(1, 6), p=rng.uniform(0.05, 1.0),
                                 threshold=rng.gauss(0, 2), seed=rng.randint(0, 99))
        kept = filter_generations(function, scores, params)
        bound = most_kept(function, len(scores), params)
        assert len(kept) <= bound == (min(params.k, len(scores))
                                      if function in ("random", "top_k", "top_k_top_p")
                                      else len(scores))
        if function in ("none", "random", "top_k"):
            assert len(kept) == bound
        flat = FilteringParams(k=params.k, p=1.0, threshold=-1e6, seed=0)
        assert len(filter_generations(function, [0.0] * len(scores), flat)) == bound
    with pytest.raises(ValueError, match="unknown filtering function"):
        most_kept("best", 3, FilteringParams())


def test_bad_params_and_unknown_functions_are_refused() -> None:
    for bad in (dict(p=0.0), dict(p=1.5), dict(k=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FilteringParams(**bad)
    with pytest.raises(ValueError, match="unknown filtering function"):
        filter_generations("best", [1.0], FilteringParams())
    assert set(FILTERS) == {"none", "random", "top_k", "top_p", "top_k_top_p", "sigmoid"}


def test_dataset_rows_for_sft_and_dpo() -> None:
    user = [{"role": "user", "content": "Name a prime."}]
    prompts = [ScoredPrompt(user, ["2", "4", "7"], [1.0, -2.0, 0.5], kept=[0, 2]),
               ScoredPrompt(user, ["9"], [0.3], kept=[0]),           # one kept: no DPO pair
               ScoredPrompt(user, ["a", "b"], [0.1, 0.1], kept=[0, 1])]  # a tie: no preference
    assert dataset_rows(prompts, "sft") == [
        {"dialog": user + [{"role": "assistant", "content": text}]} for text in ("2", "7", "9", "a", "b")]
    assert dataset_rows(prompts, "dpo") == [{"prompt": user, "chosen": "2", "rejected": "7"}]
    with pytest.raises(ValueError, match="unknown dataset type"):
        dataset_rows(prompts, "ppo")
