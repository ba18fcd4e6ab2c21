"""An exact cosine-similarity index held in memory: one float32 row per chunk.

It is a cache of the vectors stored in SQLite, rebuilt from there when a bank is opened and
changed only after the transaction that changed SQLite has committed, so SQLite stays the
one source of truth. Every search scans every row (exact, no approximation): one
matrix-vector product, memory-bound at 1.5 KB per 384-dim chunk.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from llama_engine.memory.threads import single_threaded

INITIAL_CAPACITY = 1024
SINGLE_THREAD_MAX_ROWS = 16384  # 24 MiB of vectors: below this a second core does not pay


class VectorIndex:
    """Unit-norm vectors keyed by chunk id; inner product = cosine similarity. Thread-safe."""

    def __init__(self, dimension: int):
        self.dimension = dimension
        self._vectors = np.empty((INITIAL_CAPACITY, dimension), dtype=np.float32)
        self._ids = np.empty(INITIAL_CAPACITY, dtype=np.int64)
        self._position: dict[int, int] = {}  # chunk id -> row
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._position)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids [N] int64 (new), vectors [N, dimension] float32 of unit norm."""
        with self._lock:
            count, needed = len(self._position), len(self._position) + len(ids)
            if needed > len(self._ids):
                capacity = max(needed, 2 * len(self._ids))
                self._vectors = np.resize(self._vectors, (capacity, self.dimension))
                self._ids = np.resize(self._ids, capacity)
            self._vectors[count:needed] = vectors
            self._ids[count:needed] = ids
            for offset, chunk_id in enumerate(ids.tolist()):
                self._position[chunk_id] = count + offset

    def remove(self, ids: list[int]) -> None:
        """Drop these chunk ids (unknown ids are ignored): the last row fills each hole."""
        with self._lock:
            for chunk_id in ids:
                row = self._position.pop(chunk_id, None)
                if row is None:
                    continue
                last = len(self._position)
                if row != last:
                    moved = int(self._ids[last])
                    self._vectors[row] = self._vectors[last]
                    self._ids[row] = moved
                    self._position[moved] = row

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k ids most cosine-similar to ``query`` [dimension] (unit norm), best first,
        and their similarities: (ids [<=k] int64, scores [<=k] float32)."""
        with self._lock:
            count = len(self._position)
            if count == 0 or k <= 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            with single_threaded(count <= SINGLE_THREAD_MAX_ROWS):
                scores = torch.mv(torch.from_numpy(self._vectors[:count]), torch.from_numpy(query)).numpy()
            ids = self._ids[:count]
            if k < count:
                top = np.argpartition(-scores, k - 1)[:k]
            else:
                top = np.arange(count)
            top = top[np.argsort(-scores[top], kind="stable")]
            return ids[top].copy(), scores[top].copy()
