"""Continuous batching: which sequences run this step, and how many tokens each.

Plain bookkeeping, no torch. Each step has a token budget and a sequence limit. Running
sequences go first, oldest first: a decode needs one token, an unfinished prefill gets
the next chunk. Waiting sequences then fill what is left of the budget, so prefill chunks
and decodes share a step. When blocks run out, the newest running sequence is preempted:
its blocks are freed and it waits at the head of the queue to be recomputed (FCFS, so
nothing starves and nothing is lost).

LoRA: the running sequences use at most ``max_loras`` distinct adapters (the device holds
that many at once), as in vLLM: a waiting sequence whose adapter would be one too many is
passed over, keeping its place in the queue, until a running adapter's sequences finish.
Likewise a waiting sequence whose next prompt block another sequence is computing in this
step waits one step, then finds that block in the prefix cache.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llama_engine.engine.block_manager import BlockManager
from llama_engine.engine.sequence import NO_LORA, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step

    @property
    def do_sample(self) -> bool:
        """True when this chunk reaches the sequence's last known token, so the logits at
        its last position give the next token (a chunk that ends mid-prompt samples nothing)."""
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
        if self.do_sample:
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

    @property
    def lora_int_ids(self) -> set[int]:
        """The adapters the scheduled sequences run with (the base model not counted)."""
        return {s.seq.lora_int_id for s in self.scheduled} - {NO_LORA}


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_loras: int = 0):
        """max_loras: distinct adapters the running sequences may use (0: LoRA off)."""
        if max_num_batched_tokens < 1 or max_num_seqs < 1 or max_loras < 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1, "
                             "max_loras >= 0")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.lora_int_id != NO_LORA and self.max_loras == 0:
            raise ValueError(f"sequence of request {seq.request_id!r} asks for LoRA adapter "
                             f"{seq.lora_int_id}, but LoRA is not enabled (max_loras = 0)")
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins its parent among the running."""
        self.running.append(seq)

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
        loras = {seq.lora_int_id for seq in self.running} - {NO_LORA}
        passed_over: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if (seq.lora_int_id != NO_LORA and seq.lora_int_id not in loras
                    and len(loras) >= self.max_loras):
                passed_over.append(self.waiting.popleft())
                continue
            # A request for prompt logprobs needs logits at every prompt position, which a
            # prefix found in the cache would skip.
            if not seq.block_table and seq.params.prompt_logprobs is None:
                self.blocks.match_prefix(seq)
                if self.blocks.prefix_in_flight(seq):
                    # A sequence of this step is computing its next prompt block: wait a
                    # step and take it from the prefix cache instead of computing it again.
                    self.blocks.free(seq)
                    passed_over.append(self.waiting.popleft())
                    continue
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
            if seq.lora_int_id != NO_LORA:
                loras.add(seq.lora_int_id)
        self.waiting.extendleft(reversed(passed_over))

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
