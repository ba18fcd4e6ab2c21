"""Continuous batching: which sequences run this step, and how many tokens each.

Plain bookkeeping, no torch. Each step has a token budget and a sequence limit. Running
sequences go first, oldest first: a decode needs one token, an unfinished prefill gets
the next chunk. Waiting sequences then fill what is left of the budget, so prefill chunks
and decodes share a step. When blocks run out, the newest running sequence is preempted:
its blocks are freed and it waits at the head of the queue to be recomputed (FCFS, so
nothing starves and nothing is lost).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llama_engine.engine.block_manager import BlockManager
from llama_engine.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last known token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens

    @property
    def logit_positions(self) -> list[int]:
        """The positions of this chunk whose logits the step needs, in order: each prompt
        position whose next token's logprob the request asked for (``prompt_logprobs``),
        then the last position when this chunk samples. Read before the chunk is counted
        in ``num_computed_tokens``."""
        start = self.seq.num_computed_tokens
        end = start + self.num_tokens
        positions = []
        if self.seq.params.prompt_logprobs is not None:
            positions += range(start, min(end, self.seq.prompt_len - 1))
        if self.samples:
            positions.append(end - 1)
        return positions


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins its parent among the running."""
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            num = min(seq.num_uncomputed_tokens, budget)
            while not self.blocks.can_allocate(seq, num):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            out.block_copies += self.blocks.allocate(seq, num)
            out.scheduled.append(ScheduledSeq(seq, num))
            budget -= num
        if out.num_preempted == 0:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A request for prompt logprobs needs logits at every prompt position, which a
            # prefix found in the cache would skip.
            if not seq.block_table and seq.params.prompt_logprobs is None:
                self.blocks.match_prefix(seq)
            num = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq, num):
                break
            self.waiting.popleft()
            self.blocks.count_lookup(seq)
            out.block_copies += self.blocks.allocate(seq, num)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num))
            budget -= num

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
