"""An exact cosine-similarity index held in memory: one float32 row per chunk.

It is a cache of the vectors stored in SQLite, rebuilt from there when a bank is opened and
changed only after the transaction that changed SQLite has committed, so SQLite stays the
one source of truth.

A search is exact (the k rows a float32 scan of every row ranks first) in two passes. A
scan of every row is memory-bound (1.5 KB per 384-dim float32 row), so the first pass, the
pre-scan, reads a Q8_0 copy of the rows instead (int8 per block of 32 with a float16 scale,
0.27 of the bytes) through the engine's weight-only quantized matmul, whose activations stay
float32. For a row v with rounding residual r = v - dequantize(v), the pre-scan score is off
from q . v by at most ||q|| * ||r|| (Cauchy-Schwarz) plus float32 accumulation error, a bound
kept per row. No row whose upper bound falls below the k-th best lower bound can be in the
top k, so the second pass rescores the remaining candidates (a few dozen on real data) in
float32 and ranks them.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from llama_engine import kernels
from llama_engine.memory.threads import single_threaded
from llama_engine.quant import BLOCK, BLOCK_BYTES, PackedWeight, quantize

INITIAL_CAPACITY = 1024
PRESCAN_FORMAT = "Q8_0"
PRESCAN_BATCH = 4096  # rows quantized at a time when building the pre-scan copy
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def accumulation_error_factor(terms: int) -> float:
    """gamma_n = n u / (1 - n u): a float32 sum of n products is off by at most gamma_n times
    the sum of their magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms",
    2002, eq. 3.5), doubled to cover the rescaled float32 bounds compared against it."""
    nu = terms * FLOAT32_UNIT_ROUNDOFF
    return 2.0 * nu / (1.0 - nu)


class VectorIndex:
    """Vectors keyed by chunk id; inner product = cosine similarity for the unit-norm vectors
    the embedder makes. Thread-safe."""

    def __init__(self, dimension: int):
        self.dimension = dimension
        self._packed_columns = -(-dimension // BLOCK) * BLOCK
        row_bytes = self._packed_columns // BLOCK * BLOCK_BYTES[PRESCAN_FORMAT]
        self._vectors = np.empty((INITIAL_CAPACITY, dimension), dtype=np.float32)
        self._packed = np.empty((INITIAL_CAPACITY, row_bytes), dtype=np.uint8)
        self._error_bounds = np.empty(INITIAL_CAPACITY, dtype=np.float32)  # per unit ||q||
        self._ids = np.empty(INITIAL_CAPACITY, dtype=np.int64)
        self._position: dict[int, int] = {}  # chunk id -> row
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, chunk_id: int) -> bool:
        return chunk_id in self._position

    def _padded(self, vectors: np.ndarray) -> np.ndarray:
        """A float32 copy of ``vectors`` [N, dimension] with zero columns up to a whole
        number of Q8_0 blocks (zeros round exactly)."""
        padded = np.zeros((len(vectors), self._packed_columns), dtype=np.float32)
        padded[:, :self.dimension] = vectors
        return padded

    def _prescan_rows(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Q8_0 rows of ``vectors`` [N, dimension] and each row's bound on
        |pre-scan score - exact score| for a query of unit norm, PRESCAN_BATCH rows at a
        time so the temporaries stay in cache."""
        packed = np.empty((len(vectors), self._packed.shape[1]), dtype=np.uint8)
        bounds = np.empty(len(vectors), dtype=np.float32)
        rounding = accumulation_error_factor(self._packed_columns)
        with single_threaded():
            for first in range(0, len(vectors), PRESCAN_BATCH):
                rows = self._padded(vectors[first:first + PRESCAN_BATCH])
                quantized = quantize(torch.from_numpy(rows), PRESCAN_FORMAT)
                exact = rows.astype(np.float64)
                residual = exact - kernels.dequantize(quantized).numpy()
                residual_norms = np.sqrt(np.einsum("ij,ij->i", residual, residual))
                # the kernel sums products with the dequantized row: its norm is <= |v| + |r|
                bound = residual_norms + rounding * (np.sqrt(np.einsum("ij,ij->i", exact, exact)) + residual_norms)
                packed[first:first + len(rows)] = quantized.data.numpy()
                bounds[first:first + len(rows)] = np.nextafter(bound.astype(np.float32), np.float32(np.inf))
        return packed, bounds

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids [N] int64 (new), vectors [N, dimension] float32 (unit norm for cosine)."""
        packed, bounds = self._prescan_rows(vectors)
        with self._lock:
            count, needed = len(self._position), len(self._position) + len(ids)
            if needed > len(self._ids):
                capacity = max(needed, 2 * len(self._ids))
                self._vectors = np.resize(self._vectors, (capacity, self.dimension))
                self._packed = np.resize(self._packed, (capacity, self._packed.shape[1]))
                self._error_bounds = np.resize(self._error_bounds, capacity)
                self._ids = np.resize(self._ids, capacity)
            self._vectors[count:needed] = vectors
            self._packed[count:needed] = packed
            self._error_bounds[count:needed] = bounds
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
                    for array in (self._vectors, self._packed, self._error_bounds, self._ids):
                        array[row] = array[last]
                    self._position[moved] = row

    def _candidates(self, query: np.ndarray, count: int, k: int) -> np.ndarray:
        """Rows that may be among the k most similar to ``query`` [dimension] float32, in
        row order: all rows whose pre-scan upper bound reaches the k-th best lower bound."""
        packed = PackedWeight(torch.from_numpy(self._packed[:count]), PRESCAN_FORMAT, count,
                              self._packed_columns)
        x = torch.from_numpy(self._padded(query[None]))
        approximate = kernels.weight_only_linear(x, packed)[0].numpy()
        margin = self._error_bounds[:count] * np.float32(np.linalg.norm(query.astype(np.float64)))
        lower = approximate - margin
        kth_lower = np.partition(lower, count - k)[count - k]
        return np.flatnonzero(approximate + margin >= kth_lower)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k ids most cosine-similar to ``query`` [dimension] float32 (unit norm), best
        first, and their float32 similarities: (ids [<=k] int64, scores [<=k] float32).
        Ties keep row order."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        with self._lock, single_threaded():
            count = len(self._position)
            if count == 0 or k <= 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            k = min(k, count)
            rows = self._candidates(query, count, k)
            scores = self._vectors[rows] @ query
            best = np.argsort(-scores, kind="stable")[:k]
            return self._ids[rows[best]], scores[best]
