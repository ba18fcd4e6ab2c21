"""Owns the model and its paged KV cache, and turns a scheduled step into logits.

This is the one place that knows both the model and the cache layout: it flattens the
step's sequences into one batch of tokens, builds the ``attend`` function the model calls
for each layer (store new keys/values, then paged attention), and returns the logits of
each sequence that samples this step.
"""
from __future__ import annotations


import torch

from llama_engine import kernels
from llama_engine.config import ModelConfig
from llama_engine.engine.lora_manager import LoRAManager
from llama_engine.engine.scheduler import SchedulerOutput
from llama_engine.model.llama import Llama


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


class ModelRunner:
    def __init__(self, model: Llama, num_blocks: int, block_size: int,
                 device: torch.device, kv_dtype: torch.dtype,
                 lora_manager: LoRAManager | None = None):
        """lora_manager: the adapters a step's sequences may run with (None: LoRA off)."""
        c = model.config
        self.model = model
        self.lora_manager = lora_manager
        self.device = device
        self.block_size = block_size
        self.scale = c.head_dim ** -0.5
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        # On the CPU, untouched pages of the pool cost no memory until a block is used.
        # GPU kernels may load a whole block and mask it, so there it must hold no NaN.
        alloc = torch.empty if device.type == "cpu" else torch.zeros
        self.k_caches = [alloc(shape, dtype=kv_dtype, device=device) for _ in range(c.num_layers)]
        self.v_caches = [alloc(shape, dtype=kv_dtype, device=device) for _ in range(c.num_layers)]

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache[dst] = cache[src]

    def _inputs(self, step: SchedulerOutput) -> dict[str, torch.Tensor]:
        """The step's token inputs and paged-attention metadata as tensors."""
        ids, positions, slots, cu_q, ctx_lens = [], [], [], [0], []
        max_blocks = max(len(s.seq.block_table) for s in step.scheduled)
        tables = []
        for s in step.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end)]
            cu_q.append(cu_q[-1] + s.num_tokens)
            ctx_lens.append(end)
            tables.append(table + [0] * (max_blocks - len(table)))

        def tensor(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, device=self.device)

        return dict(input_ids=tensor(ids, torch.long), positions=tensor(positions, torch.long),
                    slot_mapping=tensor(slots, torch.long), cu_seqlens_q=tensor(cu_q),
                    context_lens=tensor(ctx_lens), block_tables=tensor(tables))

    def _adapters(self, step: SchedulerOutput):
        """The step's adapters, one token segment per scheduled sequence (None: all base)."""
        if self.lora_manager is None:
            return None
        return self.lora_manager.prepare_step([s.num_tokens for s in step.scheduled],
                                              [s.seq.lora_int_id for s in step.scheduled])

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns float32 logits [rows, vocab]: the ``logit_positions`` of each
        of ``step.scheduled`` in turn (the sampled position, and prompt positions for
        requests that ask for prompt logprobs)."""
        self._copy_blocks(step.block_copies)
        x = self._inputs(step)
        metadata = kernels.AttentionMetadata(x["slot_mapping"], x["block_tables"],
                                             x["context_lens"], x["cu_seqlens_q"], self.scale)
        attend = kernels.PagedAttention(self.k_caches, self.v_caches, metadata)
        adapters = self._adapters(step)
        hidden = self.model(x["input_ids"], x["positions"], attend, adapters)
        # Rows of hidden: each sequence's logit_positions in turn, from the host-side lists
        # (reading cu_seqlens_q back would sync with the device).
        rows, rows_per_seq, chunk_start = [], [], 0
        for s in step.scheduled:
            positions = s.logit_positions
            rows += [chunk_start + p - s.seq.num_computed_tokens for p in positions]
            rows_per_seq.append(len(positions))
            chunk_start += s.num_tokens
        if not rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        # the output head's adapters (PEFT's lm_head target), segmented over these rows
        head = None if adapters is None else adapters.head(rows_per_seq)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)], head)
