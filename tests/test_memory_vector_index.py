"""The memory banks' vector index: its two-pass search (Q8_0 pre-scan, float32 rescoring of
the candidates it cannot rule out) returns exactly the top k of a brute-force float64 scan."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llama_engine import kernels
from llama_engine.kernels import KernelOptions, configure
from llama_engine.memory.vector_index import PRESCAN_BATCH, VectorIndex
from llama_engine.quant import dequantize, quantize


def unit_rows(rng: np.random.Generator, count: int, dimension: int) -> np.ndarray:
    rows = rng.standard_normal((count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


FLOAT32_TIE = 1e-6  # similarities this close may swap: float32 dot products of 384 terms differ by ~3e-7


def assert_same_top_k(index: VectorIndex, ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> None:
    """The index returns the top k of a brute-force float64 scan: rank by rank the same row,
    except where two rows' similarities tie to float32 rounding (either order is exact)."""
    found_ids, found_scores = index.search(query, k)
    similarity = vectors.astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-similarity, kind="stable")[:k]
    expected_scores = similarity[order]
    assert len(set(found_ids.tolist())) == len(found_ids) == len(order)
    row_of = {chunk_id: row for row, chunk_id in enumerate(ids.tolist())}
    np.testing.assert_allclose(similarity[[row_of[i] for i in found_ids.tolist()]], expected_scores,
                               atol=FLOAT32_TIE, rtol=0)
    np.testing.assert_allclose(found_scores, expected_scores, atol=FLOAT32_TIE, rtol=0)
    gaps = np.abs(np.diff(similarity[np.argsort(-similarity, kind="stable")[:k + 1]]))
    isolated = np.ones(len(order), dtype=bool)  # no other row within FLOAT32_TIE
    isolated[:-1] &= gaps[:len(order) - 1] > FLOAT32_TIE
    isolated[1:] &= gaps[:len(order) - 1] > FLOAT32_TIE
    if len(gaps) >= len(order):
        isolated[-1] &= gaps[len(order) - 1] > FLOAT32_TIE
    np.testing.assert_array_equal(found_ids[isolated], ids[order][isolated])


@pytest.mark.parametrize("dimension", [384, 100, 7])
def test_search_equals_brute_force_on_random_vectors(dimension: int) -> None:
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    count = PRESCAN_BATCH + int(rng.integers(1, 2000))  # more than one pre-scan build batch
    vectors = unit_rows(rng, count, dimension)
    ids = rng.permutation(10 * count)[:count].astype(np.int64)
    index = VectorIndex(dimension)
    for part in np.array_split(np.arange(count), 3):  # several adds, growing the arrays
        index.add(ids[part], vectors[part])
    for _ in range(10):
        assert_same_top_k(index, ids, vectors, unit_rows(rng, 1, dimension)[0], int(rng.integers(1, 60)))
    assert_same_top_k(index, ids, vectors, unit_rows(rng, 1, dimension)[0], count + 5)  # k past the count

    removed = rng.choice(count, count // 3, replace=False)
    index.remove(ids[removed].tolist() + [-1])  # an unknown id is ignored
    kept = np.setdiff1d(np.arange(count), removed)
    assert len(index) == len(kept), seed
    for _ in range(5):
        assert_same_top_k(index, ids[kept], vectors[kept], unit_rows(rng, 1, dimension)[0], 50)


def test_search_is_exact_where_the_pre_scan_cannot_tell_rows_apart() -> None:
    """A tight cluster around the query: the rows' similarities differ by ~1e-5, far less
    than the Q8_0 pre-scan's rounding (~1e-3), so only the float32 rescoring ranks them."""
    rng = np.random.default_rng(random.randrange(1 << 30))
    dimension = 384
    query = unit_rows(rng, 1, dimension)[0]
    cluster = query + 3e-3 * rng.standard_normal((2000, dimension)).astype(np.float32)
    cluster /= np.linalg.norm(cluster, axis=1, keepdims=True)
    vectors = np.concatenate([unit_rows(rng, 3000, dimension), cluster])
    ids = np.arange(len(vectors), dtype=np.int64)
    index = VectorIndex(dimension)
    index.add(ids, vectors)
    for k in (1, 10, 100):
        assert_same_top_k(index, ids, vectors, query, k)


def test_empty_index_and_zero_k_find_nothing() -> None:
    index = VectorIndex(8)
    assert [len(a) for a in index.search(np.ones(8, np.float32), 3)] == [0, 0]
    index.add(np.array([5]), unit_rows(np.random.default_rng(0), 1, 8))
    assert [len(a) for a in index.search(np.ones(8, np.float32), 0)] == [0, 0]
    assert 5 in index and 6 not in index


def test_weight_only_linear_keeps_float32_activations_whatever_the_options() -> None:
    """The pre-scan's error bound assumes the query is never rounded to int8."""
    torch.manual_seed(random.randrange(1 << 30))
    x = torch.randn(1, 256)
    weight = quantize(torch.randn(300, 256), "Q8_0")
    expected = x.double() @ dequantize(weight).double().t()
    previous = configure(KernelOptions(int8_activations=True))
    try:
        int8_path = kernels.linear(x, weight)
        ours = kernels.weight_only_linear(x, weight)
    finally:
        configure(previous)
    assert (int8_path.double() - expected).abs().max() > 1e-3  # the option does round x
    torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=0)
