"""One generated sample: its tokens, where its KV cache lives, and how far it got.

Plain bookkeeping, no torch. A request with ``n`` samples owns ``n`` sequences; the
first prefills the prompt and the others are forked from it, sharing its KV blocks.
"""
from __future__ import annotations

import itertools
import random
from enum import Enum, auto

from llama_engine.sampling_params import SamplingParams

_seq_ids = itertools.count()
NO_LORA = 0  # the lora_int_id of a sequence that runs on the base model


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival: float, lora_int_id: int = NO_LORA):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.lora_int_id = lora_int_id  # the adapter it runs with (LoRARequest.lora_int_id)
        self.arrival = arrival
        self.prompt_len = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt, then generated tokens
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose keys/values are in the cache
        self.num_cached_tokens = 0  # of those, found in the prefix cache
        self.logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""
        # One uniform number per sampled token from the request's own stream: a seed
        # gives the same text whatever else shares the batch.
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.rng = random.Random(f"{seed}:{index}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A sibling sample that shares this sequence's computed prompt blocks."""
        child = Sequence(self.request_id, index, self.token_ids, self.params, self.arrival,
                         self.lora_int_id)
        child.prompt_len = self.prompt_len
        child.block_table = list(self.block_table)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.status = self.status
        return child
