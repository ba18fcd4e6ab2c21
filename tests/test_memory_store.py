"""The memory store used offline (``llama_engine.memory``): extraction per mime type,
chunking against the model's own tokenizer, retrieval quality on an invented corpus, update
and delete, concurrency, reopening."""

from __future__ import annotations

import json
import random
import threading

import pytest

from llama_engine.memory import (AlreadyExistsError, ChunkingConfig, Document, Embedder,
                                 InvalidInputError, MemoryStore, NotFoundError,
                                 UnsupportedMimeTypeError, chunk_text, extract_text)
from llama_engine.memory.embedding import default_model_folder
from llama_engine.memory.store import keyword_query, reciprocal_rank_fusion
from tests.memory_corpus import CORPUS
from tests.pdf_writer import minimal_pdf

MIN_HYBRID_RECALL_AT_3 = 0.9


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def reference_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_model_folder()))


@pytest.fixture
def store(tmp_path, embedder):
    with MemoryStore(tmp_path, embedder=embedder) as store:
        yield store


# ---- documents ---------------------------------------------------------------------------------


def extracted(content: bytes, mime_type: str) -> str:
    return extract_text(Document("d", content, mime_type), "documents[0]")


def test_html_keeps_only_visible_text() -> None:
    page = (b"<html><head><title>T</title><style>p{color:red}</style></head><body>"
            b"<script>var hidden = 1;</script><h1>Tide mills</h1><p>They grind &amp; store barley.</p>"
            b"<noscript>enable js</noscript></body></html>")
    assert extracted(page, "text/html") == "Tide mills\n\nThey grind & store barley."


def test_csv_rows_become_named_fields() -> None:
    table = b"town,bell\nBrasswick,copper\nHest,iron\n"
    assert extracted(table, "text/csv") == "town: Brasswick; bell: copper.\ntown: Hest; bell: iron."


def test_json_values_keep_their_path() -> None:
    value = {"mill": {"name": "Fennick", "grain": ["barley", "rye"]}, "open": True}
    assert extracted(json.dumps(value).encode(), "application/json; charset=utf-8") == (
        "mill.name: Fennick.\nmill.grain: barley.\nmill.grain: rye.\nopen: True.")


def test_pdf_text_is_extracted() -> None:
    pdf = minimal_pdf(["The Fennick tide mill grinds barley.", "It runs on the incoming tide."])
    text = extracted(pdf, "application/pdf")
    assert "The Fennick tide mill grinds barley." in text and "incoming tide" in text


@pytest.mark.parametrize("content, mime_type, error, field", [
    (b"x", "image/png", UnsupportedMimeTypeError, "documents[0].mime_type"),
    (b"\xff\xfe\xfa", "text/plain", InvalidInputError, "documents[0].content"),
    (b"   \n ", "text/markdown", InvalidInputError, "documents[0].content"),
    (b"{not json", "application/json", InvalidInputError, "documents[0].content"),
    (b"%PDF-1.4 garbage", "application/pdf", InvalidInputError, "documents[0].content"),
    (b"abc", "text/plain; charset=klingon", InvalidInputError, "documents[0].mime_type"),
])
def test_unreadable_documents_are_refused_by_field(content, mime_type, error, field) -> None:
    with pytest.raises(error) as raised:
        extracted(content, mime_type)
    assert raised.value.field == field


# ---- chunking ----------------------------------------------------------------------------------


def long_text(seed: int) -> str:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(rng.randint(4, 8)):
        sentences = [" ".join(rng.choice(["mill", "tide", "barley", "Fennick", "grinds", "wheel",
                                          "stone", "water", "the", "a", "supercalibrated"])
                              for _ in range(rng.randint(3, 25))).capitalize() + "."
                     for _ in range(rng.randint(2, 12))]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


@pytest.mark.parametrize("config", [ChunkingConfig(), ChunkingConfig(64, 16), ChunkingConfig(32, 0)])
def test_chunks_fit_the_model_and_cover_the_text(embedder, reference_tokenizer, config) -> None:
    text = long_text(seed=random.randrange(1 << 30))
    chunks = chunk_text(text, embedder.token_offsets, config)
    assert len(chunks) > 1
    for chunk in chunks:
        model_input = reference_tokenizer(chunk.text)["input_ids"]  # [CLS] ... [SEP], untruncated
        assert len(model_input) <= config.chunk_size_in_tokens
        assert chunk.token_count == len(model_input) - 2
        assert chunk.text in text
    # every word of the text is in some chunk, in order. Without overlap a chunk starts at
    # or after the previous one's end: searching from there, a short last chunk ("tide.")
    # cannot match inside the previous chunk instead (seen for 2 seeds in 400)
    position = previous_start = 0
    for chunk in chunks:
        start = text.find(chunk.text, previous_start if config.overlap_size_in_tokens else position)
        assert start >= 0 and not text[position:start].strip(), "a gap between chunks"
        previous_start, position = start, max(position, start + len(chunk.text))
    assert position == len(text.rstrip())
    if config.overlap_size_in_tokens:
        assert all(text.find(b.text) < text.find(a.text) + len(a.text) for a, b in zip(chunks, chunks[1:]))


def test_chunks_end_at_sentence_ends_when_one_is_near(embedder) -> None:
    text = " ".join(f"Sentence {i} is about the mill wheel turning slowly." for i in range(80))
    chunks = chunk_text(text, embedder.token_offsets, ChunkingConfig(64, 16))
    assert all(chunk.text.endswith(".") for chunk in chunks)
    assert all(chunk.text.startswith("Sentence") for chunk in chunks)


# ---- retrieval ---------------------------------------------------------------------------------


def test_reciprocal_rank_fusion_matches_hand_computed_scores() -> None:
    # a: 1/61 + 1/63 = 0.03227; b: 1/62 + 1/61 = 0.03252; c: 1/63 = 0.01587; d: 1/62
    assert reciprocal_rank_fusion([[1, 2, 3], [2, 4, 1]]) == [2, 1, 4, 3]


def test_keyword_query_quotes_distinctive_words() -> None:
    assert keyword_query('What is the "fare" OR NEAR(x)?') == '"fare" OR "near" OR "x"'
    assert keyword_query("the of") == '"the" OR "of"'
    assert keyword_query("?!") == ""


def recall_at_3(store: MemoryStore, bank: str, mode: str) -> float:
    hits = 0
    for uuid, _, question in CORPUS:
        result = store.query(bank, question, max_chunks=3, mode=mode)
        hits += uuid in [chunk.document_uuid for chunk in result.chunks]
    return hits / len(CORPUS)


def test_recall_at_3_on_paraphrased_questions(store: MemoryStore) -> None:
    documents = [Document.from_text(uuid, text) for uuid, text, _ in CORPUS]
    store.create_bank("corpus", "Invented topics", documents)
    recall = {mode: recall_at_3(store, "corpus", mode) for mode in ("vector", "keyword", "hybrid")}
    print(f"recall@3 over {len(CORPUS)} paraphrased questions: {recall}")
    assert recall["hybrid"] >= MIN_HYBRID_RECALL_AT_3, recall


def test_scores_are_cosine_similarities(store: MemoryStore, embedder: Embedder) -> None:
    store.create_bank("b", "b", [Document.from_text(uuid, text) for uuid, text, _ in CORPUS[:5]])
    question = CORPUS[2][2]
    result = store.query("b", question, max_chunks=5, mode="keyword")
    chunk_vectors = embedder.embed([c.content for c in result.chunks])
    # the query's own embedding (bfloat16 matmuls) against the documents' float32 ones
    assert result.scores == pytest.approx((chunk_vectors @ embedder.embed_query(question)).tolist(), abs=1e-5)
    # and within what cosine >= 0.9999 to the float32 query embedding allows: |q - q'| <= 0.0142
    assert result.scores == pytest.approx((chunk_vectors @ embedder.embed([question])[0]).tolist(), abs=0.015)


def test_update_and_delete_show_in_the_next_query(store: MemoryStore) -> None:
    store.create_bank("b", "b", [Document.from_text(uuid, text) for uuid, text, _ in CORPUS[:10]])
    question = "Which bird carries mail at night?"
    assert "owlpost" not in [c.document_uuid for c in store.query("b", question, 3).chunks]
    store.update("b", [Document.from_text(CORPUS[0][0], "Owls deliver the night mail in Brackenridge.")])
    assert store.query("b", question, 1).chunks[0].document_uuid == CORPUS[0][0]
    assert store.get_documents("b", [CORPUS[0][0]])[0].content == b"Owls deliver the night mail in Brackenridge."
    assert store.delete_documents("b", [CORPUS[0][0], "never-there"]) == [CORPUS[0][0]]
    for mode in ("vector", "keyword", "hybrid"):
        assert CORPUS[0][0] not in [c.document_uuid for c in store.query("b", question, 10, mode).chunks]
    with pytest.raises(NotFoundError):
        store.get_documents("b", [CORPUS[0][0]])


def test_refusals_name_the_field_and_lose_nothing(store: MemoryStore) -> None:
    store.create_bank("b", "b", [Document.from_text("one", "The first document.")])
    cases = [
        (lambda: store.create_bank("b", "again"), AlreadyExistsError, "bank_uuid"),
        (lambda: store.insert("nope", []), NotFoundError, "bank_uuid"),
        (lambda: store.insert("b", [Document.from_text("one", "dup")]), AlreadyExistsError, "documents[0].uuid"),
        (lambda: store.update("b", [Document.from_text("ghost", "x")]), NotFoundError, "documents[0].uuid"),
        (lambda: store.insert("b", [Document.from_text("two", "ok"), Document("three", b"\xff", "text/plain")]),
         InvalidInputError, "documents[1].content"),
        (lambda: store.query("b", "x", max_chunks=0), InvalidInputError, "max_chunks"),
        (lambda: store.query("b", "   "), InvalidInputError, "query"),
        (lambda: store.query("b", "x", mode="fuzzy"), InvalidInputError, "mode"),
        (lambda: store.create_bank("c", "c", chunking=ChunkingConfig(300, 10)), InvalidInputError,
         "chunk_size_in_tokens"),
    ]
    for call, error, field in cases:
        with pytest.raises(error) as raised:
            call()
        assert raised.value.field == field
    assert [d.uuid for d in store.get_documents("b", ["one"])] == ["one"]
    with pytest.raises(NotFoundError):
        store.get_documents("b", ["two"])  # the failed request left nothing behind
    assert [bank.uuid for bank in store.list_banks()] == ["b"]


def test_concurrent_inserts_and_queries(store: MemoryStore) -> None:
    store.create_bank("b", "b")
    errors: list[BaseException] = []

    def insert(worker: int) -> None:
        try:
            for uuid, text, _ in CORPUS[worker::3][:6]:
                store.insert("b", [Document.from_text(uuid, text)])
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    def query() -> None:
        try:
            for _, _, question in CORPUS[:8]:
                result = store.query("b", question, 3)
                assert len(result.chunks) == len(result.scores)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=query) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = [uuid for w in range(3) for uuid, _, _ in CORPUS[w::3][:6]]
    assert {d.uuid for d in store.get_documents("b", expected)} == set(expected)
    result = store.query("b", CORPUS[0][2], 3, mode="vector")
    assert CORPUS[0][0] in [c.document_uuid for c in result.chunks]


def test_reopening_finds_every_bank(tmp_path, embedder) -> None:
    with MemoryStore(tmp_path, embedder=embedder) as store:
        store.create_bank("a", "A", [Document.from_text(u, t) for u, t, _ in CORPUS[:4]],
                          ChunkingConfig(64, 8))
        store.create_bank("b", "B", [Document.from_text(u, t) for u, t, _ in CORPUS[4:8]])
    with MemoryStore(tmp_path, embedder=embedder) as store:
        assert [(b.uuid, b.chunking) for b in store.list_banks()] == [("a", ChunkingConfig(64, 8)),
                                                                      ("b", ChunkingConfig())]
        for bank, (uuid, _, question) in (("a", CORPUS[1]), ("b", CORPUS[5])):
            assert store.query(bank, question, 1, mode="vector").chunks[0].document_uuid == uuid


def test_documents_created_with_the_bank_survive_a_delete_in_vector_search(store: MemoryStore) -> None:
    """Every remaining chunk stays findable by vector search after the first delete or update
    in a new bank (the index must hold each chunk once)."""
    docs = [Document.from_text(uuid, text) for uuid, text, _ in CORPUS[:4]]
    store.create_bank("fresh", "fresh", docs)
    store.delete_documents("fresh", [docs[0].uuid])
    found = {c.document_uuid for c in store.query("fresh", "anything at all", 10, "vector").chunks}
    assert found == {d.uuid for d in docs[1:]}
    store.update("fresh", [Document.from_text(docs[1].uuid, "A rewritten document.")])
    found = {c.document_uuid for c in store.query("fresh", "anything at all", 10, "vector").chunks}
    assert found == {d.uuid for d in docs[1:]}


def test_keyword_search_finds_a_banks_chunk_behind_better_matches_in_other_banks(store: MemoryStore) -> None:
    """One FTS index holds every bank: a bank's only match must be found even when other
    banks hold many chunks that BM25 ranks above it."""
    store.create_bank("crowd", "crowd", [Document.from_text(f"c{i}", "Zebra zebra zebra, zebras everywhere.")
                                         for i in range(12)])
    store.create_bank("lone", "lone", [Document.from_text("lone", "A zebra once crossed the old bridge."),
                                       Document.from_text("other", "Kettles boil water.")])
    for mode in ("keyword", "hybrid"):
        result = store.query("lone", "zebra", max_chunks=1, mode=mode)
        assert [c.document_uuid for c in result.chunks] == ["lone"], mode
