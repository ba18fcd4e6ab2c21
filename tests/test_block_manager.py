"""Property tests of the block manager and scheduler bookkeeping (no model involved)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_engine.engine.block_manager import BlockManager
from llama_engine.engine.scheduler import Scheduler
from llama_engine.engine.sequence import Sequence, SequenceStatus
from llama_engine.sampling_params import SamplingParams

BLOCK = 4


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    holders: dict[int, int] = {}
    for seq in live:
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    for block in bm.blocks:
        in_free = block.block_id in bm.free_ids
        assert not (in_free and holders.get(block.block_id)), "block both free and in use"
        assert block.ref_count == holders.get(block.block_id, 0), "ref count != holders"
        assert in_free == (block.ref_count == 0)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


prompt = st.lists(st.integers(0, 5), min_size=1, max_size=30)
actions = st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "fork"]),
                             prompt, st.integers(0, 100)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(actions=actions, num_blocks=st.integers(4, 24), prefix=st.booleans())
def test_no_leaks_no_double_use(actions, num_blocks, prefix):
    bm = BlockManager(num_blocks, BLOCK, enable_prefix_caching=prefix)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    live: list[Sequence] = []
    for kind, tokens, pick in actions:
        if kind == "add" and len(tokens) + 8 <= num_blocks * BLOCK:
            seq = Sequence("r", 0, tokens, SamplingParams(), 0.0)
            sched.add(seq)
            live.append(seq)
        elif kind == "abort" and live:
            seq = live.pop(pick % len(live))
            sched.finish(seq)
        elif kind == "fork" and sched.running:
            parent = sched.running[pick % len(sched.running)]
            if parent.num_computed_tokens == parent.num_tokens:
                child = parent.fork(1)
                bm.fork(parent, child)
                sched.add_running(child)
                live.append(child)
        elif kind == "step":
            out = sched.schedule()
            for s in out.scheduled:
                done = s.do_sample
                s.seq.num_computed_tokens += s.num_tokens
                bm.commit(s.seq)
                if done:  # generate one token; finish long sequences
                    s.seq.token_ids.append(pick % 6)
                    if s.seq.num_tokens >= 40:
                        sched.finish(s.seq)
                        live.remove(s.seq)
            assert bm.in_flight == {}, "a committed step leaves no block in flight"
        check_invariants(bm, [s for s in live if s.status != SequenceStatus.FINISHED])
    for seq in live:
        sched.finish(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_blocks_are_shared_and_evicted_lru():
    bm = BlockManager(4, BLOCK)
    a = Sequence("a", 0, list(range(9)), SamplingParams(), 0.0)
    bm.match_prefix(a)
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.commit(a)
    a_blocks = list(a.block_table)
    bm.free(a)
    b = Sequence("b", 0, list(range(8)) + [99], SamplingParams(), 0.0)
    bm.match_prefix(b)
    assert b.num_cached_tokens == 8 and b.block_table == a_blocks[:2]
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    # A different prompt needing every free block evicts the cached ones, oldest first.
    c = Sequence("c", 0, [50] * 8, SamplingParams(), 0.0)
    bm.match_prefix(c)
    assert c.num_cached_tokens == 0
    assert bm.can_allocate(c, 8)
    bm.allocate(c, 8)
    assert len(bm.cached) == 2  # b's two blocks are in use, so they stayed findable


def test_copy_on_write_for_shared_partial_block():
    bm = BlockManager(8, BLOCK)
    parent = Sequence("p", 0, list(range(6)), SamplingParams(), 0.0)
    bm.match_prefix(parent)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1)
    bm.fork(parent, child)
    assert bm.blocks[parent.block_table[1]].ref_count == 2
    copies = bm.allocate(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert bm.blocks[parent.block_table[1]].ref_count == 1
    assert bm.allocate(parent, 1) == []  # the parent now owns its block alone


def test_a_sequence_whose_next_block_is_being_computed_waits_a_step_and_shares_it():
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    shared = list(range(10))  # two full blocks and a partial one
    first, second = (Sequence("r", 0, shared + [20 + i], SamplingParams(), 0.0) for i in range(2))
    other = Sequence("r", 0, [7] * 9, SamplingParams(), 0.0)
    for seq in (first, second, other):
        sched.add(seq)
    step = sched.schedule()
    assert [s.seq for s in step.scheduled] == [first, other]  # second waits, keeping its place
    assert list(sched.waiting) == [second] and not second.block_table
    for s in step.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
        bm.commit(s.seq)
    first_blocks = list(first.block_table)
    for seq in (first, other):
        sched.finish(seq)  # done: its blocks stay findable in the prefix cache
    step = sched.schedule()
    assert [s.seq for s in step.scheduled] == [second]
    assert second.num_cached_tokens == 2 * BLOCK
    assert second.block_table[:2] == first_blocks[:2]
    assert step.scheduled[0].num_tokens == len(shared) + 1 - 2 * BLOCK


def _computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose prompt was looked up, allocated and computed."""
    seq = Sequence("r", 0, tokens, SamplingParams(), 0.0)
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    return seq


def test_reset_prefix_cache_forgets_every_prefix_once_no_block_is_in_use():
    bm = BlockManager(8, BLOCK)
    running = _computed(bm, list(range(9)))
    assert not bm.reset_prefix_cache()  # a running sequence's blocks stay findable
    assert len(bm.cached) == 2  # its two full blocks
    bm.free(running)
    assert bm.reset_prefix_cache()
    again = _computed(bm, list(range(9)))
    assert again.num_cached_tokens == 0  # computed in full, as on a fresh engine
    bm.free(again)
    assert _computed(bm, list(range(9))).num_cached_tokens == 2 * BLOCK  # cached anew
