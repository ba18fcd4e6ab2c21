"""Memory banks for offline use, no server needed: document stores with embeddings,
persistent under the state directory and searchable by meaning and by keyword.

    from llama_engine.memory import Document, MemoryStore
    with MemoryStore("./state") as store:
        store.create_bank("notes", "My notes", [Document.from_text("d1", "Kettles boil water.")])
        result = store.query("notes", "How do I heat water?", max_chunks=3)
"""
from llama_engine.memory.chunking import ChunkingConfig, chunk_text
from llama_engine.memory.documents import SUPPORTED_MIME_TYPES, Document, extract_text
from llama_engine.memory.embedding import EMBEDDING_MAX_INPUT_TOKENS, EMBEDDING_MODEL_ID, Embedder, default_embedder
from llama_engine.memory.errors import (AlreadyExistsError, DocumentTooLargeError, InvalidInputError,
                                        MemoryBankError, NotFoundError, UnsupportedMimeTypeError)
from llama_engine.memory.store import (MAX_QUERY_CHUNKS, QUERY_MODES, MemoryBank, MemoryStore,
                                       QueryResult, RetrievedChunk, WriteResult)

__all__ = [
    "AlreadyExistsError", "ChunkingConfig", "Document", "DocumentTooLargeError",
    "EMBEDDING_MAX_INPUT_TOKENS", "EMBEDDING_MODEL_ID",
    "Embedder", "InvalidInputError", "MAX_QUERY_CHUNKS", "MemoryBank", "MemoryBankError",
    "MemoryStore", "NotFoundError", "QUERY_MODES", "QueryResult", "RetrievedChunk",
    "SUPPORTED_MIME_TYPES", "UnsupportedMimeTypeError", "WriteResult", "chunk_text",
    "default_embedder", "extract_text",
]
