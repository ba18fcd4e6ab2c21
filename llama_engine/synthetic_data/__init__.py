"""Synthetic data generation and reward scoring, the parts that need no engine: filters,
the token ids a reward model scores, statistics, and the rows a generated set saves as a
dataset. The server's RewardScoring and SyntheticDataGeneration APIs run them."""
from llama_engine.synthetic_data.filters import (FILTERS, FilteringParams, filter_generations,
                                                 most_kept)
from llama_engine.synthetic_data.records import (DPO, SFT, DATASET_TYPES, ScoredPrompt,
                                                 dataset_rows, reply_token_ids, score_statistics)

__all__ = ["FILTERS", "FilteringParams", "filter_generations", "most_kept", "DPO", "SFT",
           "DATASET_TYPES", "ScoredPrompt", "dataset_rows", "reply_token_ids", "score_statistics"]
