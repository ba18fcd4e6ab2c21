"""The KV cache as fixed-size blocks: free list, reference counts, prefix caching, and
copy-on-write. Plain bookkeeping over block ids; the tensors live in the model runner.

Prefix caching: a full block is known by the hash of its tokens chained with the hash of
every block before it, so equal hashes mean equal prefixes. The chain starts from the
sequence's adapter, so keys and values computed under one LoRA adapter are never served
to another or to the base model. Blocks whose last user is gone stay findable until they
are reused; the free list hands out the least recently freed block first, so cached
prefixes are evicted LRU.

A full block being computed in this step (allocated, not yet committed) is "in flight":
``prefix_in_flight`` tells the scheduler that a waiting sequence would recompute it, so the
sequence can wait one step and find it cached (SGLang's in-batch prefix caching). This is
what lets k replies to one prompt, submitted together, share the prompt's KV blocks.
"""
from __future__ import annotations

from collections import OrderedDict

from llama_engine.engine.sequence import NO_LORA, Sequence

NO_HASH = None


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = NO_HASH
        self.token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


def chain_root(lora_int_id: int) -> int | None:
    """What a sequence's first block chains from: nothing for the base model, the adapter's
    own root otherwise."""
    return None if lora_int_id == NO_LORA else hash(("lora", lora_int_id))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got "
                             f"{num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.block_hashes: dict[int, list[int]] = {}  # seq id -> hashes of its full blocks
        self.in_flight: dict[int, int] = {}  # chain hash -> seq id filling that block this step
        self.in_flight_by_seq: dict[int, list[int]] = {}  # seq id -> its in-flight hashes
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, found cached

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks yet the cached blocks of its longest known prefix.
        At least one token is left to compute, so the step has logits to sample from."""
        assert not seq.block_table
        hashes: list[int] = []
        parent = chain_root(seq.lora_int_id)
        full_blocks = (seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
        for i in range(full_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            hashes.append(parent)
        self.block_hashes[seq.seq_id] = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(hashes) * self.block_size

    def prefix_in_flight(self, seq: Sequence) -> bool:
        """True when the first full block ``seq`` still has to compute (after its matched
        prefix) is being filled by another sequence in this step; call after match_prefix."""
        if not self.in_flight:
            return False
        hashes = self.block_hashes.get(seq.seq_id, [])
        i = len(hashes)
        if i >= (seq.num_tokens - 1) // self.block_size:
            return False
        tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
        h = chain_hash(hashes[-1] if hashes else chain_root(seq.lora_int_id), tokens)
        return self.in_flight.get(h, seq.seq_id) != seq.seq_id

    def count_lookup(self, seq: Sequence) -> None:
        """Account a sequence admitted to run: its tokens looked up, and those found."""
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for ``num_new_tokens`` more tokens of ``seq``; the caller checked
        can_allocate. Returns (src, dst) block copies owed for copy-on-write."""
        copies = []
        if self._writes_into_shared_block(seq):
            old = seq.block_table[-1]
            new = self._take_free()
            self._release(old)
            seq.block_table[-1] = new
            copies.append((old, new))
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        if self.enable_prefix_caching:
            self._mark_in_flight(seq, seq.num_computed_tokens + num_new_tokens)
        return copies

    def _mark_in_flight(self, seq: Sequence, end: int) -> None:
        """Record the hashes of the full blocks this step fills for ``seq`` (tokens up to
        ``end``) that no block holds yet; commit or free clears them."""
        hashes = self.block_hashes.setdefault(seq.seq_id, [])
        parent = hashes[-1] if hashes else chain_root(seq.lora_int_id)
        mine = self.in_flight_by_seq.setdefault(seq.seq_id, [])
        for i in range(len(hashes), end // self.block_size):
            parent = chain_hash(parent, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size]))
            if parent not in self.cached and parent not in self.in_flight:
                self.in_flight[parent] = seq.seq_id
                mine.append(parent)

    def _clear_in_flight(self, seq_id: int) -> None:
        for h in self.in_flight_by_seq.pop(seq_id, []):
            if self.in_flight.get(h) == seq_id:
                del self.in_flight[h]

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly filled blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self.block_hashes.setdefault(seq.seq_id, [])
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(len(hashes), full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(hashes[-1] if hashes else chain_root(seq.lora_int_id), tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is NO_HASH and h not in self.cached:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id
        self._clear_in_flight(seq.seq_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's ``reset_prefix_cache``), so that the next
        sequences compute all their tokens, as on a fresh engine. Only when no block is in
        use (a running sequence's blocks stay shared); returns whether it was done."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.hash, block.token_ids = NO_HASH, ()
        self.cached.clear()
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent."""
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1
        self.block_hashes[child.seq_id] = list(self.block_hashes.get(parent.seq_id, []))

    def free(self, seq: Sequence) -> None:
        # Tail first, so a prefix's head blocks are the last of it to be evicted.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self.block_hashes.pop(seq.seq_id, None)
        self._clear_in_flight(seq.seq_id)

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(needed, 0) + int(self._writes_into_shared_block(seq))

    def _writes_into_shared_block(self, seq: Sequence) -> bool:
        partial = seq.num_computed_tokens % self.block_size != 0
        return (partial and len(seq.block_table) > 0
                and self.blocks[seq.block_table[-1]].ref_count > 1)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not NO_HASH:  # evict the cached prefix it held
            del self.cached[block.hash]
            block.hash, block.token_ids = NO_HASH, ()
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None
