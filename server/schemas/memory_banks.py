"""Request and response models of the spec's MemoryBanks API, the added query route, and
OpenAI-compatible embeddings."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import Field, RootModel

from llama_engine.memory import EMBEDDING_MODEL_ID, MAX_QUERY_CHUNKS
from llama_engine.memory.chunking import (DEFAULT_CHUNK_SIZE_IN_TOKENS, DEFAULT_OVERLAP_SIZE_IN_TOKENS,
                                          MIN_CHUNK_SIZE_IN_TOKENS)
from server.schemas.common import StrictModel
from server.schemas.llama_stack import Content

COSINE_DESCRIPTION = ("Cosine similarity of each chunk to the query (unit-norm all-MiniLM-L6-v2 "
                      "embeddings), in [-1, 1], one per chunk in the same order.")


class MemoryBank(StrictModel):
    uuid: str
    name: str


class MemoryBankDocument(StrictModel):
    uuid: str = Field(min_length=1)
    content: str = Field(description="The document's bytes, base64-encoded.",
                         json_schema_extra={"contentEncoding": "base64"})
    metadata: dict[str, Any] = Field(default_factory=dict)
    mime_type: str = Field(description="text/plain, text/markdown, text/html, text/csv, "
                                       "application/json or application/pdf")


class MemoryBankDocuments(RootModel[list[MemoryBankDocument]]):
    BODY_NAME: ClassVar[str] = "documents"


class DocumentUuids(RootModel[list[str]]):
    BODY_NAME: ClassVar[str] = "document_uuids"


class BankParams(StrictModel):
    bank_uuid: str


class CreateBankParams(StrictModel):
    bank_uuid: str
    bank_name: str
    chunk_size_in_tokens: int = Field(
        DEFAULT_CHUNK_SIZE_IN_TOKENS, ge=MIN_CHUNK_SIZE_IN_TOKENS, le=DEFAULT_CHUNK_SIZE_IN_TOKENS,
        description="Chunk length in the embedding model's word pieces, [CLS] and [SEP] included.")
    overlap_size_in_tokens: int = Field(
        DEFAULT_OVERLAP_SIZE_IN_TOKENS, ge=0,
        description="Word pieces each chunk repeats from the one before (at most half the chunk).")


class MemoryBankWriteResponse(StrictModel):
    """What a create, insert or update stored (the spec answers nothing; this says what)."""

    bank_uuid: str
    document_uuids: list[str]
    chunk_count: int


class DroppedBank(RootModel[str]):
    """The uuid of the bank that was dropped."""


class DeletedDocument(RootModel[str]):
    """The uuid of a document that was deleted."""


class MemoryBankQueryRequest(StrictModel):
    query: Content
    max_chunks: int = Field(3, ge=1, le=MAX_QUERY_CHUNKS)
    mode: Literal["vector", "keyword", "hybrid"] = Field(
        "hybrid", description="vector: cosine similarity; keyword: BM25 (SQLite FTS5); hybrid: "
                              "both rankings fused by reciprocal rank fusion.")


class MemoryBankChunk(StrictModel):
    content: str
    token_count: int
    document_uuid: str


class MemoryBankQueryResponse(StrictModel):
    """Chunks best first by the query mode's ranking."""

    chunks: list[MemoryBankChunk]
    scores: list[float] = Field(description=COSINE_DESCRIPTION)


class EmbeddingRequest(StrictModel):
    """OpenAI's POST /v1/embeddings."""

    model: str = Field(json_schema_extra={"enum": [EMBEDDING_MODEL_ID]})
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="Must equal the model's (384) if given.")
    user: Optional[str] = None


class Embedding(StrictModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str] = Field(
        description="Unit-norm vector; with encoding_format=base64, its little-endian float32 bytes.")


class EmbeddingUsage(StrictModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(StrictModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
