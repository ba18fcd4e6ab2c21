"""The filtering functions of synthetic data generation: which of one prompt's k scored
generations to keep.

No public implementation of the spec's ``FilteringFunction`` exists (Meta's reference never
built it), so each filter's meaning is defined here, in its docstring. Every filter sees the
scores of one prompt's generations and returns the indices it keeps, in generation order.
Ties between equal scores go to the earlier generation. The seeded filters draw from a
generator seeded with (``seed``, prompt index), so one prompt's kept set does not depend on
the other prompts of the request.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

NONE, RANDOM, TOP_K, TOP_P, TOP_K_TOP_P, SIGMOID = (
    "none", "random", "top_k", "top_p", "top_k_top_p", "sigmoid")


@dataclass(frozen=True)
class FilteringParams:
    """k: generations kept by ``random`` and ``top_k`` (>= 1); p: the softmax mass ``top_p``
    keeps, in (0, 1]; threshold: the score where ``sigmoid`` keeps half; seed: for
    ``random`` and ``sigmoid`` (None: fresh randomness each call)."""
    k: int = 1
    p: float = 0.9
    threshold: float = 0.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0 < self.p <= 1:
            raise ValueError(f"p must be in (0, 1], got {self.p}")


def _best_first(scores: Sequence[float], among: Sequence[int]) -> list[int]:
    return sorted(among, key=lambda i: (-scores[i], i))


def keep_all(scores: Sequence[float], params: FilteringParams, rng: random.Random) -> list[int]:
    """``none``: keeps every generation (the identity)."""
    return list(range(len(scores)))


def keep_random(scores: Sequence[float], params: FilteringParams, rng: random.Random) -> list[int]:
    """``random``: keeps min(k, n) generations drawn uniformly without replacement, whatever
    their scores (a baseline for the score-based filters)."""
    return sorted(rng.sample(range(len(scores)), min(params.k, len(scores))))


def keep_top_k(scores: Sequence[float], params: FilteringParams, rng: random.Random) -> list[int]:
    """``top_k``: keeps the min(k, n) generations with the highest scores (rejection
    sampling / best-of-n, as in Llama 2's rejection-sampling fine-tuning)."""
    return sorted(_best_first(scores, range(len(scores)))[:params.k])


def _nucleus(scores: Sequence[float], among: Sequence[int], p: float) -> list[int]:
    """The best of ``among`` until their softmax mass (over ``among``'s scores, temperature
    1) reaches p; at least one."""
    order = _best_first(scores, among)
    top = scores[order[0]]
    weights = [math.exp(scores[i] - top) for i in order]  # shifted: no overflow
    total = sum(weights)
    kept, mass = [], 0.0
    for i, w in zip(order, weights):
        kept.append(i)
        mass += w / total
        if mass >= p:
            break
    return sorted(kept)


def keep_top_p(scores: Sequence[float], params: FilteringParams, rng: random.Random) -> list[int]:
    """``top_p``: nucleus filtering over scores. The prompt's scores, through a softmax
    (temperature 1), give each generation a mass; the best generations are kept, best
    first, until the kept mass reaches p (at least one is kept). A larger p keeps a superset;
    p = 1 keeps all."""
    return _nucleus(scores, range(len(scores)), params.p) if scores else []


def keep_top_k_top_p(scores: Sequence[float], params: FilteringParams,
                     rng: random.Random) -> list[int]:
    """``top_k_top_p``: ``top_k``, then ``top_p`` over the survivors (their softmax
    renormalised over the k survivors only)."""
    survivors = keep_top_k(scores, params, rng)
    return _nucleus(scores, survivors, params.p) if survivors else []


def keep_sigmoid(scores: Sequence[float], params: FilteringParams, rng: random.Random) -> list[int]:
    """``sigmoid``: keeps each generation independently with probability
    sigmoid(score - threshold): a score at the threshold is kept half the time, one far
    above almost always, one far below almost never."""
    return [i for i, s in enumerate(scores) if rng.random() < _sigmoid(s - params.threshold)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


FilterFn = Callable[[Sequence[float], FilteringParams, random.Random], list[int]]
FILTERS: dict[str, FilterFn] = {NONE: keep_all, RANDOM: keep_random, TOP_K: keep_top_k,
                                TOP_P: keep_top_p, TOP_K_TOP_P: keep_top_k_top_p,
                                SIGMOID: keep_sigmoid}


BOUNDED_BY_K = frozenset({RANDOM, TOP_K, TOP_K_TOP_P})  # keep at most params.k


def most_kept(function: str, n: int, params: FilteringParams) -> int:
    """The most of a prompt's ``n`` generations ``function`` can keep, whatever their scores:
    min(k, n) for ``random``, ``top_k`` and ``top_k_top_p``, n for the others. Raises
    ValueError for an unknown function."""
    if function not in FILTERS:
        raise ValueError(f"unknown filtering function {function!r}; known: {', '.join(FILTERS)}")
    return min(params.k, n) if function in BOUNDED_BY_K else n


def filter_generations(function: str, scores: Sequence[float], params: FilteringParams,
                       prompt_index: int = 0) -> list[int]:
    """Indices of the generations ``function`` keeps among one prompt's ``scores``, in
    generation order. Raises ValueError for an unknown function."""
    if function not in FILTERS:
        raise ValueError(f"unknown filtering function {function!r}; known: {', '.join(FILTERS)}")
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    return FILTERS[function](scores, params, random.Random(f"{seed}:{prompt_index}"))
