"""Token-count chunking with the embedding model's own tokenizer.

A chunk holds at most ``chunk_size_in_tokens`` word pieces of the model's input ([CLS] and
[SEP] included, so nothing the model reads is cut) and repeats the last
``overlap_size_in_tokens`` of the one before. It ends at a paragraph break if one lies in its
last half, else at a sentence (or line) end in its last quarter, else at a word boundary;
the next chunk starts at a sentence start inside the overlap where there is one.
"""
from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Callable

DEFAULT_CHUNK_SIZE_IN_TOKENS = 256  # all-MiniLM-L6-v2's input length
DEFAULT_OVERLAP_SIZE_IN_TOKENS = 64
MIN_CHUNK_SIZE_IN_TOKENS = 16
SPECIAL_TOKENS = 2  # [CLS] and [SEP] take two of the model's positions
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\n\s*")
PARAGRAPH_WINDOW = 2  # a paragraph break counts in the chunk's last 1/2
SENTENCE_WINDOW = 4  # a sentence break counts in the chunk's last 1/4


@dataclass(frozen=True)
class ChunkingConfig:
    """A bank's chunk size and overlap, both in the embedding model's word pieces."""

    chunk_size_in_tokens: int = DEFAULT_CHUNK_SIZE_IN_TOKENS
    overlap_size_in_tokens: int = DEFAULT_OVERLAP_SIZE_IN_TOKENS

    def validate(self, max_input_tokens: int) -> None:
        """Raises ValueError naming the field when a size is out of range."""
        if not MIN_CHUNK_SIZE_IN_TOKENS <= self.chunk_size_in_tokens <= max_input_tokens:
            raise ValueError(f"chunk_size_in_tokens: must be between {MIN_CHUNK_SIZE_IN_TOKENS} "
                             f"and the embedding model's {max_input_tokens}, got {self.chunk_size_in_tokens}")
        if not 0 <= self.overlap_size_in_tokens <= self.chunk_size_in_tokens // 2:
            raise ValueError(f"overlap_size_in_tokens: must be between 0 and half the chunk size "
                             f"({self.chunk_size_in_tokens // 2}), got {self.overlap_size_in_tokens}")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document's text and the word pieces it holds ([CLS]/[SEP] aside)."""

    text: str
    token_count: int


def _break_tokens(text: str, starts: list[int], pattern: re.Pattern) -> list[int]:
    """Indices of the tokens that begin right after a match of ``pattern`` (sorted)."""
    found = []
    for match in pattern.finditer(text):
        index = bisect_left(starts, match.end())
        if 0 < index < len(starts) and (not found or found[-1] != index):
            found.append(index)
    return found


def _last_in(breaks: list[int], low: int, high: int) -> int | None:
    """The largest break in (low, high], or None."""
    i = bisect_right(breaks, high)
    return breaks[i - 1] if i and breaks[i - 1] > low else None


def _first_in(breaks: list[int], low: int, high: int) -> int | None:
    """The smallest break in [low, high), or None."""
    i = bisect_left(breaks, low)
    return breaks[i] if i < len(breaks) and breaks[i] < high else None


def chunk_text(text: str, token_offsets: Callable[[str], list[tuple[int, int]]],
               config: ChunkingConfig = ChunkingConfig()) -> list[Chunk]:
    """Split ``text`` into chunks per ``config``; ``token_offsets(text)`` gives each word
    piece's (start, end) character span (the embedding tokenizer, no special tokens)."""
    offsets = token_offsets(text)
    if not offsets:
        return []
    starts = [start for start, _ in offsets]
    # a word piece that starts where the previous one ends continues a word: never cut there
    word_starts = [0] + [i for i in range(1, len(offsets)) if offsets[i][0] != offsets[i - 1][1]]
    paragraphs = _break_tokens(text, starts, PARAGRAPH_BREAK)
    sentences = _break_tokens(text, starts, SENTENCE_BREAK)
    budget = config.chunk_size_in_tokens - SPECIAL_TOKENS
    overlap = config.overlap_size_in_tokens
    chunks = []
    begin = 0
    while True:
        end = begin + budget
        if end >= len(offsets):
            end = len(offsets)
        else:
            end = (_last_in(paragraphs, end - budget // PARAGRAPH_WINDOW, end)
                   or _last_in(sentences, end - budget // SENTENCE_WINDOW, end)
                   or _last_in(word_starts, begin, end) or end)
        chunk = text[offsets[begin][0]:offsets[end - 1][1]].strip()
        chunks.append(Chunk(chunk, end - begin))
        if end == len(offsets):
            return chunks
        if overlap == 0:
            begin = end
            continue
        low = max(end - overlap, begin + 1)
        begin = (_first_in(sentences, low, end) or _first_in(word_starts, low, end) or end)
