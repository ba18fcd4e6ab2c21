"""Batches as packed token streams: the sequences of a step laid end to end with no padding
(the varlen layout the model already takes for serving), positions restarting at 0 for
each sequence, and attention kept inside each sequence by ``cu_seqlens``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch

from llama_engine.training.tokenization import Example

Item = TypeVar("Item")


@dataclass(frozen=True)
class PackedBatch:
    """B sequences, T tokens in all. input_ids, positions, labels, seq_index: [T] int64;
    cu_seqlens: [B + 1] int64 (sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1])."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def last_token_index(self) -> torch.Tensor:
        """[B]: each sequence's last token (where a reward head reads its score)."""
        return self.cu_seqlens[1:] - 1

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.positions, self.labels,
                                                      self.seq_index, self.cu_seqlens)))


def pack(examples: Sequence[Example]) -> PackedBatch:
    """Lay ``examples`` end to end."""
    lengths = [len(e.input_ids) for e in examples]
    cu = torch.zeros(len(examples) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return PackedBatch(
        input_ids=torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
        positions=torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]),
        labels=torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64),
        seq_index=torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(lengths)),
        cu_seqlens=cu)


def epoch_order(num_items: int, epoch: int, shuffle: bool, seed: int) -> list[int]:
    """The order of an epoch's items: a permutation drawn from (seed, epoch) when shuffling,
    so a resumed job replays the same order."""
    if not shuffle:
        return list(range(num_items))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def batches_per_epoch(num_items: int, batch_size: int) -> int:
    return math.ceil(num_items / batch_size)


def epoch_batches(items: Sequence[Item], epoch: int, batch_size: int, shuffle: bool,
                  seed: int) -> Iterator[list[Item]]:
    """The epoch's batches of ``batch_size`` items (the last may be smaller)."""
    order = epoch_order(len(items), epoch, shuffle, seed)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]
