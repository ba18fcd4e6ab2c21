"""LoRA in the engine's bookkeeping (no model): LoRARequest, the prefix cache keyed by
adapter, and the scheduler's limit on distinct adapters per step."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_engine import LoRARequest
from llama_engine.engine.block_manager import BlockManager
from llama_engine.engine.scheduler import Scheduler
from llama_engine.engine.sequence import Sequence, SequenceStatus
from llama_engine.sampling_params import SamplingParams

BLOCK = 4


def _seq(tokens: list[int], lora: int = 0, request: str = "r") -> Sequence:
    return Sequence(request, 0, tokens, SamplingParams(), 0.0, lora_int_id=lora)


def _prefill(bm: BlockManager, seq: Sequence) -> None:
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_lora_request_as_in_vllm() -> None:
    r = LoRARequest("sql", 1, "/adapters/sql")
    assert (r.lora_name, r.lora_int_id, r.lora_path, r.adapter_id) == ("sql", 1, "/adapters/sql", 1)
    assert r == LoRARequest("sql", 1) and len({r, LoRARequest("sql", 1)}) == 1
    for bad_id in (0, -3):
        with pytest.raises(ValueError, match="lora_int_id"):
            LoRARequest("sql", bad_id)
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1)


def test_prefix_cached_under_one_adapter_is_not_served_to_another_or_the_base() -> None:
    bm = BlockManager(32, BLOCK)
    prompt = list(range(13))
    first = _seq(prompt, lora=1)
    _prefill(bm, first)
    assert first.num_cached_tokens == 0
    for lora in (2, 0):
        other = _seq(prompt, lora=lora)
        bm.match_prefix(other)
        assert other.num_cached_tokens == 0, f"adapter {lora} got adapter 1's blocks"
        bm.free(other)
    same = _seq(prompt, lora=1)
    bm.match_prefix(same)
    assert same.num_cached_tokens == 12 and same.block_table == first.block_table[:3]
    child = first.fork(1)  # forks keep their parent's adapter
    assert child.lora_int_id == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 1), min_size=1,
                                                       max_size=14)), max_size=25))
def test_matched_blocks_always_come_from_the_same_adapter(requests) -> None:
    """Random prompts over a two-token alphabet (prefixes collide often) under adapters
    0 (base), 1 and 2: every block a sequence is given from the cache was filled under
    its own adapter."""
    bm = BlockManager(64, BLOCK)
    filled_under: dict[int, int] = {}  # block id -> adapter of the sequence that filled it
    for lora, prompt in requests:
        seq = _seq(prompt, lora=lora)
        bm.match_prefix(seq)
        for block_id in seq.block_table:
            assert filled_under[block_id] == lora
        cached = len(seq.block_table)
        bm.allocate(seq, seq.num_uncomputed_tokens)
        for block_id in seq.block_table[cached:]:
            filled_under[block_id] = lora
        seq.num_computed_tokens = seq.num_tokens
        bm.commit(seq)
        bm.free(seq)


def test_scheduler_limits_distinct_adapters_per_step() -> None:
    bm = BlockManager(64, BLOCK)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_loras=2)
    seqs = [_seq([i] * 5, lora=lora, request=str(i)) for i, lora in enumerate([1, 2, 3, 0, 1])]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [seqs[0], seqs[1], seqs[3], seqs[4]]
    assert out.lora_int_ids == {1, 2}
    assert list(sched.waiting) == [seqs[2]]  # passed over, still first in line
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
    sched.finish(seqs[1])  # adapter 2 leaves the running set: adapter 3 may come in
    out = sched.schedule()
    assert seqs[2] in [s.seq for s in out.scheduled] and not sched.waiting
    assert {s.lora_int_id for s in sched.running} == {1, 3, 0}


def test_scheduler_without_lora_refuses_adapter_sequences() -> None:
    sched = Scheduler(BlockManager(8, BLOCK), max_num_seqs=4, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        sched.add(_seq([1, 2], lora=1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "finish"]), st.integers(0, 5),
                          st.integers(0, 50)), max_size=50), st.integers(1, 3))
def test_running_adapters_never_exceed_max_loras(actions, max_loras) -> None:
    bm = BlockManager(48, BLOCK)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=24, max_loras=max_loras)
    for kind, lora, pick in actions:
        if kind == "add":
            sched.add(_seq([pick % 3] * (pick % 9 + 1), lora=lora))
        elif kind == "finish" and sched.running:
            sched.finish(sched.running[pick % len(sched.running)])
        elif kind == "step":
            out = sched.schedule()
            assert len(out.lora_int_ids) <= max_loras
            for s in out.scheduled:
                s.seq.num_computed_tokens += s.num_tokens
                bm.commit(s.seq)
                if s.seq.num_computed_tokens == s.seq.num_tokens:
                    s.seq.token_ids.append(1)
        assert len({s.lora_int_id for s in sched.running} - {0}) <= max_loras
        assert all(s.status == SequenceStatus.RUNNING for s in sched.running)
