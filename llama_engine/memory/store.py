"""Memory banks on disk: banks, documents, chunks and their vectors in one SQLite database
(WAL, fsync on commit) under the state directory, searched by exact cosine similarity and
by BM25 keywords (SQLite FTS5), the two rankings fused by reciprocal rank fusion.

Every request is one transaction: a document's row, its chunks, their vectors (BLOBs in the
chunks table) and their FTS entries commit together or not at all, so a ``kill -9`` leaves
either the whole request or nothing. The in-memory ``VectorIndex`` of each bank is a cache of
those vectors, rebuilt on first use after a start and changed only after a commit.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from llama_engine.memory.chunking import Chunk, ChunkingConfig, chunk_text
from llama_engine.memory.documents import Document, extract_text
from llama_engine.memory.embedding import Embedder, default_embedder
from llama_engine.memory.errors import (AlreadyExistsError, DocumentTooLargeError,
                                        InvalidInputError, NotFoundError)
from llama_engine.memory.vector_index import VectorIndex
from llama_engine.state import open_database, resolve_state_dir

DATABASE_FILE = "memory.sqlite3"
DEFAULT_MAX_DOCUMENT_BYTES = 2 * 1024 * 1024  # below the server's 4 MiB body limit once base64'd
MAX_QUERY_CHUNKS = 100
RRF_K = 60  # reciprocal rank fusion constant (Cormack, Clarke & Buettcher, SIGIR 2009)
MIN_FUSION_CANDIDATES = 50  # each ranking contributes at least this many before fusing
KEYWORD_SEARCH_THREADS = 2  # BM25 searches that run at once, beside the queries' embeddings
KEYWORD_LIMIT_GROWTH = 4  # factor on the FTS limit when other banks' matches crowd a bank's out
QueryMode = Literal["vector", "keyword", "hybrid"]
QUERY_MODES = ("vector", "keyword", "hybrid")
# Words too common to tell chunks apart: left out of the keyword query (they would match
# most rows and slow BM25 while adding nothing to the ranking).
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because
been before being below between both but by can could did do does doing down during each few for
from further had has have having he her here hers herself him himself his how i if in into is it
its itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them themselves
then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves""".split())
WORD = re.compile(r"\w+", re.UNICODE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS banks (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    chunk_size_in_tokens INTEGER NOT NULL,
    overlap_size_in_tokens INTEGER NOT NULL,
    embedding_model TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bank_uuid TEXT NOT NULL REFERENCES banks(uuid),
    uuid TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content BLOB NOT NULL,
    UNIQUE (bank_uuid, uuid)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id INTEGER NOT NULL REFERENCES documents(id),
    bank_uuid TEXT NOT NULL,
    content TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    embedding BLOB NOT NULL  -- float32, little-endian, unit norm
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
CREATE INDEX IF NOT EXISTS chunks_by_bank ON chunks(bank_uuid);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    content, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
"""


@dataclass(frozen=True)
class MemoryBank:
    uuid: str
    name: str
    chunking: ChunkingConfig


@dataclass(frozen=True)
class RetrievedChunk:
    content: str
    token_count: int
    document_uuid: str


@dataclass(frozen=True)
class QueryResult:
    """Chunks best first (by the query mode's ranking) and each one's cosine similarity to
    the query, in [-1, 1]."""

    chunks: list[RetrievedChunk]
    scores: list[float]


@dataclass(frozen=True)
class WriteResult:
    document_uuids: list[str]
    chunk_count: int


@dataclass
class _Prepared:
    document: Document
    chunks: list[Chunk]
    vectors: np.ndarray  # [len(chunks), dimension] float32


def keyword_query(text: str) -> str:
    """An FTS5 query matching any of the text's distinctive words (each quoted, so no word
    is read as FTS5 syntax); '' when the text has no words."""
    words = list(dict.fromkeys(w.lower() for w in WORD.findall(text)))
    distinctive = [w for w in words if w not in STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in distinctive)


def reciprocal_rank_fusion(rankings: Iterable[Sequence[int]], k: int = RRF_K) -> list[int]:
    """Ids ordered by sum over rankings of 1 / (k + rank), rank from 1; ties keep the order
    of first appearance."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused, key=lambda item: -fused[item])


class MemoryStore:
    """Every memory bank under one state directory. Thread-safe: writes are serialised,
    queries run beside them (each thread reads through its own SQLite connection)."""

    def __init__(self, state_dir: str | os.PathLike | None = None, embedder: Embedder | None = None,
                 max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES):
        self.path = resolve_state_dir(state_dir) / DATABASE_FILE
        self._embedder = embedder
        self.max_document_bytes = max_document_bytes
        self._write_lock = threading.Lock()
        self._writer = open_database(self.path)
        self._writer.executescript(SCHEMA)
        self._connections = [self._writer]
        self._local = threading.local()
        self._indexes: dict[str, VectorIndex] = {}
        self._keyword_pool = ThreadPoolExecutor(KEYWORD_SEARCH_THREADS, thread_name_prefix="memory-keyword")

    # ---- plumbing ---------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The embedding model, loaded on first use so opening a store stays instant."""
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = open_database(self.path)
            with self._write_lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        self._keyword_pool.shutdown(wait=True)
        with self._write_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, work) -> Any:
        """Run ``work(conn)`` in one IMMEDIATE transaction on the writer; the caller holds
        the write lock. Rolls back on any error."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            result = work(self._writer)
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")
        return result

    def _index(self, bank_uuid: str) -> VectorIndex:
        """The bank's in-memory index, built from SQLite on first use; the caller holds the
        write lock, so no commit lands between the read and the build."""
        index = self._indexes.get(bank_uuid)
        if index is None:
            index = VectorIndex(self.embedder.dimension)
            rows = self._writer.execute("SELECT id, embedding FROM chunks WHERE bank_uuid = ?",
                                        (bank_uuid,)).fetchall()
            if rows:
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                index.add(ids, vectors.reshape(len(rows), -1))
            self._indexes[bank_uuid] = index
        return index

    def _loaded_index(self, bank_uuid: str) -> VectorIndex:
        index = self._indexes.get(bank_uuid)
        if index is not None:
            return index
        with self._write_lock:
            return self._index(bank_uuid)

    # ---- banks -------------------------------------------------------------------------------

    def _bank(self, conn: sqlite3.Connection, bank_uuid: str) -> MemoryBank:
        row = conn.execute("SELECT uuid, name, chunk_size_in_tokens, overlap_size_in_tokens "
                           "FROM banks WHERE uuid = ?", (bank_uuid,)).fetchone()
        if row is None:
            raise NotFoundError("bank_uuid", f"no memory bank {bank_uuid!r}")
        return MemoryBank(row[0], row[1], ChunkingConfig(row[2], row[3]))

    def get_bank(self, bank_uuid: str) -> MemoryBank:
        """Raises NotFoundError (field ``bank_uuid``)."""
        return self._bank(self._reader(), bank_uuid)

    def list_banks(self) -> list[MemoryBank]:
        rows = self._reader().execute("SELECT uuid, name, chunk_size_in_tokens, overlap_size_in_tokens "
                                      "FROM banks ORDER BY rowid").fetchall()
        return [MemoryBank(r[0], r[1], ChunkingConfig(r[2], r[3])) for r in rows]

    def create_bank(self, bank_uuid: str, name: str, documents: Sequence[Document] = (),
                    chunking: ChunkingConfig = ChunkingConfig()) -> WriteResult:
        """A new bank holding ``documents``, in one transaction.

        Raises AlreadyExistsError (``bank_uuid``) if taken, InvalidInputError for an empty
        uuid or name or a chunking config out of range, and what ``insert`` raises."""
        if not bank_uuid.strip():
            raise InvalidInputError("bank_uuid", "must not be empty")
        if not name.strip():
            raise InvalidInputError("bank_name", "must not be empty")
        try:
            chunking.validate(self.embedder.max_input_tokens)
        except ValueError as exc:
            field, _, reason = str(exc).partition(": ")
            raise InvalidInputError(field, reason) from None
        if self._reader().execute("SELECT 1 FROM banks WHERE uuid = ?", (bank_uuid,)).fetchone():
            raise AlreadyExistsError("bank_uuid", f"memory bank {bank_uuid!r} already exists")
        bank = MemoryBank(bank_uuid, name, chunking)
        prepared = self._prepare(bank, documents)

        def work(conn: sqlite3.Connection) -> list[tuple[list[int], np.ndarray]]:
            if conn.execute("SELECT 1 FROM banks WHERE uuid = ?", (bank_uuid,)).fetchone():
                raise AlreadyExistsError("bank_uuid", f"memory bank {bank_uuid!r} already exists")
            conn.execute("INSERT INTO banks VALUES (?, ?, ?, ?, ?)",
                         (bank_uuid, name, chunking.chunk_size_in_tokens,
                          chunking.overlap_size_in_tokens, self.embedder.model_id))
            return self._insert_rows(conn, bank_uuid, prepared)

        with self._write_lock:
            # The index first (empty: the bank is new), then the rows: an index built after
            # the commit would read the new chunks from SQLite and be given them again.
            index = self._index(bank_uuid)
            added = self._write(work)
            for ids, vectors in added:
                index.add(np.asarray(ids, dtype=np.int64), vectors)
        return WriteResult([p.document.uuid for p in prepared], sum(len(p.chunks) for p in prepared))

    def drop_bank(self, bank_uuid: str) -> str:
        """Delete the bank and everything in it; returns its uuid. Raises NotFoundError."""
        def work(conn: sqlite3.Connection) -> None:
            self._bank(conn, bank_uuid)
            conn.execute("DELETE FROM chunks WHERE bank_uuid = ?", (bank_uuid,))
            conn.execute("DELETE FROM documents WHERE bank_uuid = ?", (bank_uuid,))
            conn.execute("DELETE FROM banks WHERE uuid = ?", (bank_uuid,))

        with self._write_lock:
            self._write(work)
            self._indexes.pop(bank_uuid, None)
        return bank_uuid

    # ---- documents ---------------------------------------------------------------------------

    def _prepare(self, bank: MemoryBank, documents: Sequence[Document]) -> list[_Prepared]:
        """Validate, extract, chunk and embed every document (outside any transaction).
        Errors name ``documents[i]`` and the field."""
        seen: dict[str, int] = {}
        prepared, texts = [], []
        for i, document in enumerate(documents):
            where = f"documents[{i}]"
            if not isinstance(document.uuid, str) or not document.uuid.strip():
                raise InvalidInputError(f"{where}.uuid", "must be a non-empty string")
            if document.uuid in seen:
                raise InvalidInputError(f"{where}.uuid", f"{document.uuid!r} repeats documents[{seen[document.uuid]}]")
            seen[document.uuid] = i
            if len(document.content) > self.max_document_bytes:
                raise DocumentTooLargeError(
                    f"{where}.content", f"document {document.uuid!r} is {len(document.content)} bytes, "
                                        f"over the limit of {self.max_document_bytes}")
            text = extract_text(document, where)
            chunks = chunk_text(text, self.embedder.token_offsets, bank.chunking)
            prepared.append(_Prepared(document, chunks, np.empty(0)))
            texts += [c.text for c in chunks]
        vectors = self.embedder.embed(texts) if texts else np.empty((0, self.embedder.dimension), np.float32)
        first = 0
        for item in prepared:
            item.vectors = vectors[first:first + len(item.chunks)]
            first += len(item.chunks)
        return prepared

    def _insert_rows(self, conn: sqlite3.Connection, bank_uuid: str,
                     prepared: list[_Prepared]) -> list[tuple[list[int], np.ndarray]]:
        added = []
        for item in prepared:
            doc = item.document
            cursor = conn.execute(
                "INSERT INTO documents (bank_uuid, uuid, mime_type, metadata, content) VALUES (?, ?, ?, ?, ?)",
                (bank_uuid, doc.uuid, doc.mime_type, json.dumps(doc.metadata), doc.content))
            document_id = cursor.lastrowid
            ids = []
            for chunk, vector in zip(item.chunks, item.vectors):
                cursor = conn.execute(
                    "INSERT INTO chunks (document_id, bank_uuid, content, token_count, embedding) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (document_id, bank_uuid, chunk.text, chunk.token_count, vector.astype("<f4").tobytes()))
                ids.append(cursor.lastrowid)
            added.append((ids, item.vectors))
        return added

    def _delete_rows(self, conn: sqlite3.Connection, bank_uuid: str, uuids: Sequence[str]) -> tuple[list[str], list[int]]:
        """Delete these documents and their chunks; returns (uuids deleted, chunk ids removed)."""
        deleted, chunk_ids = [], []
        for uuid in uuids:
            row = conn.execute("SELECT id FROM documents WHERE bank_uuid = ? AND uuid = ?",
                               (bank_uuid, uuid)).fetchone()
            if row is None:
                continue
            chunk_ids += [r[0] for r in conn.execute("SELECT id FROM chunks WHERE document_id = ?", row)]
            conn.execute("DELETE FROM chunks WHERE document_id = ?", row)
            conn.execute("DELETE FROM documents WHERE id = ?", row)
            deleted.append(uuid)
        return deleted, chunk_ids

    def _write_documents(self, bank_uuid: str, documents: Sequence[Document], replace: bool) -> WriteResult:
        bank = self._bank(self._reader(), bank_uuid)
        self._check_presence(self._reader(), bank_uuid, documents, must_exist=replace)
        prepared = self._prepare(bank, documents)

        def work(conn: sqlite3.Connection) -> tuple[list[int], list[tuple[list[int], np.ndarray]]]:
            self._bank(conn, bank_uuid)  # dropped meanwhile?
            self._check_presence(conn, bank_uuid, documents, must_exist=replace)
            removed = self._delete_rows(conn, bank_uuid, [d.uuid for d in documents])[1] if replace else []
            return removed, self._insert_rows(conn, bank_uuid, prepared)

        with self._write_lock:
            index = self._index(bank_uuid)
            removed, added = self._write(work)
            index.remove(removed)
            for ids, vectors in added:
                index.add(np.asarray(ids, dtype=np.int64), vectors)
        return WriteResult([p.document.uuid for p in prepared], sum(len(p.chunks) for p in prepared))

    @staticmethod
    def _check_presence(conn: sqlite3.Connection, bank_uuid: str, documents: Sequence[Document],
                        must_exist: bool) -> None:
        for i, document in enumerate(documents):
            exists = conn.execute("SELECT 1 FROM documents WHERE bank_uuid = ? AND uuid = ?",
                                  (bank_uuid, document.uuid)).fetchone() is not None
            if exists and not must_exist:
                raise AlreadyExistsError(f"documents[{i}].uuid",
                                         f"document {document.uuid!r} is already in bank {bank_uuid!r} (use update)")
            if must_exist and not exists:
                raise NotFoundError(f"documents[{i}].uuid",
                                    f"document {document.uuid!r} is not in bank {bank_uuid!r} (use insert)")

    def insert(self, bank_uuid: str, documents: Sequence[Document]) -> WriteResult:
        """Add new documents, all in one transaction. Raises NotFoundError (bank),
        AlreadyExistsError (a document uuid already in the bank), InvalidInputError,
        DocumentTooLargeError, UnsupportedMimeTypeError, each naming ``documents[i]``."""
        return self._write_documents(bank_uuid, documents, replace=False)

    def update(self, bank_uuid: str, documents: Sequence[Document]) -> WriteResult:
        """Replace existing documents (content, chunks, vectors, metadata) atomically.
        Raises NotFoundError for a bank or document that does not exist, and what
        ``insert`` raises for the content."""
        return self._write_documents(bank_uuid, documents, replace=True)

    def get_documents(self, bank_uuid: str, document_uuids: Sequence[str]) -> list[Document]:
        """The documents as stored, in the order asked. Raises NotFoundError naming
        ``document_uuids[i]`` for one that is not in the bank."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            self._bank(conn, bank_uuid)
            found = []
            for i, uuid in enumerate(document_uuids):
                row = conn.execute("SELECT uuid, content, mime_type, metadata FROM documents "
                                   "WHERE bank_uuid = ? AND uuid = ?", (bank_uuid, uuid)).fetchone()
                if row is None:
                    raise NotFoundError(f"document_uuids[{i}]", f"document {uuid!r} is not in bank {bank_uuid!r}")
                found.append(Document(row[0], bytes(row[1]), row[2], json.loads(row[3])))
            return found
        finally:
            conn.execute("COMMIT")

    def delete_documents(self, bank_uuid: str, document_uuids: Sequence[str]) -> list[str]:
        """Delete these documents, their chunks and vectors in one transaction; returns the
        uuids that were there (absent ones are skipped). Raises NotFoundError (bank)."""
        def work(conn: sqlite3.Connection) -> tuple[list[str], list[int]]:
            self._bank(conn, bank_uuid)
            return self._delete_rows(conn, bank_uuid, list(dict.fromkeys(document_uuids)))

        with self._write_lock:
            index = self._index(bank_uuid)
            deleted, removed = self._write(work)
            index.remove(removed)
        return deleted

    # ---- retrieval ---------------------------------------------------------------------------

    def query(self, bank_uuid: str, query: str, max_chunks: int = 3,
              mode: QueryMode = "hybrid") -> QueryResult:
        """The chunks of the bank that best answer ``query``, at most ``max_chunks``.

        ``mode``: ``vector`` ranks by cosine similarity, ``keyword`` by BM25 (FTS5),
        ``hybrid`` fuses both rankings by reciprocal rank fusion. Scores are always the
        chunks' cosine similarities to the query. Raises NotFoundError (bank) and
        InvalidInputError (``query`` empty, ``max_chunks`` or ``mode`` out of range)."""
        if not query.strip():
            raise InvalidInputError("query", "must contain text")
        if not 1 <= max_chunks <= MAX_QUERY_CHUNKS:
            raise InvalidInputError("max_chunks", f"must be between 1 and {MAX_QUERY_CHUNKS}, got {max_chunks}")
        if mode not in QUERY_MODES:
            raise InvalidInputError("mode", f"must be one of {', '.join(QUERY_MODES)}, got {mode!r}")
        self.get_bank(bank_uuid)
        index = self._loaded_index(bank_uuid)
        depth = max_chunks if mode != "hybrid" else max(4 * max_chunks, MIN_FUSION_CANDIDATES)
        # BM25 runs in SQLite with the GIL released: on a second core, beside the embedding
        keyword = self._keyword_pool.submit(self._keyword_search, index, query, depth) if mode != "vector" else None
        vector = self.embedder.embed_query(query)
        rankings = []
        if mode != "keyword":
            rankings.append(index.search(vector, depth)[0].tolist())
        if keyword is not None:
            rankings.append(keyword.result())
        ranked = reciprocal_rank_fusion(rankings)
        return self._fetch(ranked, max_chunks, vector)

    def _keyword_search(self, index: VectorIndex, query: str, depth: int) -> list[int]:
        """Ids of the bank's ``depth`` best chunks by BM25, best first. The FTS table holds
        every bank; the bank's chunks are those in its index, tested here rather than joined
        in SQL (a join reads each match's chunk row, 1.5 KB of vector included: 3x the BM25
        search at 100k chunks). Other banks' matches can fill the first ``depth`` places, so
        the limit grows until the bank has ``depth`` or the matches run out."""
        match = keyword_query(query)
        if not match:
            return []
        limit = depth
        while True:
            rows = self._reader().execute(
                "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
                (match, limit)).fetchall()
            found = [r[0] for r in rows if r[0] in index]
            if len(found) >= depth or len(rows) < limit:
                return found[:depth]
            limit *= KEYWORD_LIMIT_GROWTH

    def _fetch(self, ranked: list[int], max_chunks: int, query_vector: np.ndarray) -> QueryResult:
        """The first ``max_chunks`` of ``ranked`` that are still stored (a chunk deleted since
        the ranking was made is skipped), with their cosine similarity to the query."""
        conn = self._reader()
        chunks, scores = [], []
        for first in range(0, len(ranked), max_chunks):
            ids = ranked[first:first + max_chunks]
            placeholders = ",".join("?" * len(ids))
            rows = {r[0]: r[1:] for r in conn.execute(
                "SELECT chunks.id, chunks.content, chunks.token_count, documents.uuid, chunks.embedding "
                f"FROM chunks JOIN documents ON documents.id = chunks.document_id WHERE chunks.id IN ({placeholders})",
                ids)}
            for chunk_id in ids:
                if chunk_id in rows and len(chunks) < max_chunks:
                    content, token_count, document_uuid, blob = rows[chunk_id]
                    chunks.append(RetrievedChunk(content, token_count, document_uuid))
                    scores.append(float(np.frombuffer(blob, dtype="<f4") @ query_vector))
            if len(chunks) == max_chunks:
                break
        return QueryResult(chunks, scores)
