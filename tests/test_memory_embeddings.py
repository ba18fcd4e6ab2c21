"""Our BERT encoder for all-MiniLM-L6-v2 against sentence-transformers (the reference):
normalized embeddings of 100 varied texts agree to cosine >= 0.9999, from the float32 batch
forward (documents) and from the bfloat16 single-sequence one (queries)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llama_engine.kernels import KernelOptions, configure
from llama_engine.memory.embedding import Embedder, default_model_folder

MIN_COSINE = 0.9999
TEXT_COUNT = 100
FRAGMENTS = [
    "The quick brown fox jumps over the lazy dog.", "Quelle heure est-il à Montréal ?",
    "Zürich liegt am Zürichsee; die Straßen sind schmal.", "東京は日本の首都です。", "🎉🚀 launch day!!!",
    "def f(x):\n    return x ** 2  # square", "SELECT id, name FROM users WHERE age > 30;",
    "3.14159 2.71828 1.41421", "E = mc^2", "   leading and trailing spaces   ",
    "UPPER CASE SHOUTING", "naïve café résumé", "Ünïcödé àccents everywhere",
    "A memory bank stores documents and retrieves them by meaning.", "https://example.com/a?b=c&d=e",
    "tab\tseparated\tvalues", "line one\nline two\n\nparagraph two", "supercalifragilisticexpialidocious",
    "Привет, как дела?", "مرحبا بالعالم", "¿Dónde está la biblioteca?", "x",
]


def varied_texts(seed: int, count: int) -> list[str]:
    """Fresh texts from one to ~300 words (past the model's 256 word pieces, so truncation
    is exercised), mixing scripts, code, numbers and whitespace."""
    rng = random.Random(seed)
    texts = list(FRAGMENTS)
    while len(texts) < count:
        pieces = rng.randint(1, 30)
        texts.append(" ".join(rng.choice(FRAGMENTS) for _ in range(pieces)))
    rng.shuffle(texts)
    return texts[:count]


@pytest.fixture(scope="module")
def reference():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(default_model_folder()), device="cpu")


def test_embeddings_equal_sentence_transformers(reference) -> None:
    texts = varied_texts(seed=random.randrange(1 << 30), count=TEXT_COUNT)
    ours = Embedder().embed(texts)
    theirs = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (TEXT_COUNT, 384)
    cosine = (ours * theirs).sum(axis=1) / np.linalg.norm(theirs, axis=1)
    worst = int(cosine.argmin())
    assert cosine[worst] >= MIN_COSINE, texts[worst][:200]
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_query_embeddings_equal_sentence_transformers(reference) -> None:
    """``embed_query``'s bfloat16 single-sequence forward, text by text."""
    texts = varied_texts(seed=random.randrange(1 << 30), count=TEXT_COUNT)
    embedder = Embedder()
    ours = np.stack([embedder.embed_query(text) for text in texts])
    theirs = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cosine = (ours * theirs).sum(axis=1) / np.linalg.norm(theirs, axis=1)
    worst = int(cosine.argmin())
    assert cosine[worst] >= MIN_COSINE, texts[worst][:200]
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_token_counts_match_the_reference_tokenizer(reference) -> None:
    texts = varied_texts(seed=7, count=20)
    expected = [len(ids) for ids in reference.tokenizer(texts, truncation=True,
                                                        max_length=reference.max_seq_length)["input_ids"]]
    assert Embedder().count_tokens(texts) == expected


def test_query_embeddings_stay_float32_without_native_bfloat16() -> None:
    """With the torch reference kernels (as on a CPU without AMX / AVX512-BF16) a query takes
    the float32 path: the same vector as a document of the same text."""
    previous = configure(KernelOptions(backend="torch"))
    try:
        embedder = Embedder()
    finally:
        configure(previous)
    assert not embedder.model.bf16_is_native
    text = "Which bird carries the mail at night?"
    np.testing.assert_array_equal(embedder.embed_query(text), embedder.embed([text])[0])
