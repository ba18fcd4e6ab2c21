"""The MemoryBanks API (the spec's routes and the added query route) and OpenAI-compatible
embeddings, over ``llama_engine.memory``. Store calls block (embedding, SQLite commits with
fsync), so each runs in a worker thread and the event loop keeps serving."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Callable, TypeVar

from llama_engine.memory import (AlreadyExistsError, ChunkingConfig, Document, DocumentTooLargeError,
                                 EMBEDDING_MAX_INPUT_TOKENS, EMBEDDING_MODEL_ID, InvalidInputError, MemoryBankError, MemoryStore,
                                 NotFoundError, UnsupportedMimeTypeError)
from server.api.errors import APIError, ModelNotFoundError
from server.api.prompts import content_text
from server.schemas import memory_banks as mb
from server.schemas import openai as oa

T = TypeVar("T")
# HTTP status of each store refusal
STATUS = {InvalidInputError: 400, NotFoundError: 404, AlreadyExistsError: 409,
          DocumentTooLargeError: 413, UnsupportedMimeTypeError: 415}
FLOAT32_LITTLE_ENDIAN = "<f4"


def _api_error(error: MemoryBankError) -> APIError:
    status = STATUS.get(type(error), 400)
    api_error = APIError(str(error), param=error.field, status=status)
    if status == 404:
        api_error.error_type = "not_found_error"
    return api_error


def _documents(body: mb.MemoryBankDocuments) -> list[Document]:
    """Decode each document's base64 content; a 400 names the one that is not base64."""
    documents = []
    for i, doc in enumerate(body.root):
        try:
            content = base64.b64decode(doc.content, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(f"documents[{i}].content: document {doc.uuid!r} is not valid base64",
                           param=f"documents[{i}].content") from None
        documents.append(Document(doc.uuid, content, doc.mime_type, doc.metadata))
    return documents


class MemoryBanksService:
    """The routes' logic; ``store`` opens instantly and loads the embedding model on first use."""

    def __init__(self, store: MemoryStore):
        self.store = store
        self.created = int(time.time())

    def model_card(self) -> oa.ModelCard:
        """The embedding model's entry in GET /v1/models."""
        return oa.ModelCard(id=EMBEDDING_MODEL_ID, created=self.created, max_model_len=EMBEDDING_MAX_INPUT_TOKENS)

    async def _run(self, call: Callable[..., T], *args) -> T:
        try:
            return await asyncio.to_thread(call, *args)
        except MemoryBankError as error:
            raise _api_error(error) from None

    def _written(self, bank_uuid: str, result) -> mb.MemoryBankWriteResponse:
        return mb.MemoryBankWriteResponse(bank_uuid=bank_uuid, document_uuids=result.document_uuids,
                                          chunk_count=result.chunk_count)

    async def create(self, params: mb.CreateBankParams, body: mb.MemoryBankDocuments) -> mb.MemoryBankWriteResponse:
        chunking = ChunkingConfig(params.chunk_size_in_tokens, params.overlap_size_in_tokens)
        result = await self._run(self.store.create_bank, params.bank_uuid, params.bank_name,
                                 _documents(body), chunking)
        return self._written(params.bank_uuid, result)

    async def list_banks(self) -> list[mb.MemoryBank]:
        banks = await self._run(self.store.list_banks)
        return [mb.MemoryBank(uuid=bank.uuid, name=bank.name) for bank in banks]

    async def drop(self, params: mb.BankParams) -> mb.DroppedBank:
        return mb.DroppedBank(await self._run(self.store.drop_bank, params.bank_uuid))

    async def insert(self, params: mb.BankParams, body: mb.MemoryBankDocuments) -> mb.MemoryBankWriteResponse:
        result = await self._run(self.store.insert, params.bank_uuid, _documents(body))
        return self._written(params.bank_uuid, result)

    async def update(self, params: mb.BankParams, body: mb.MemoryBankDocuments) -> mb.MemoryBankWriteResponse:
        result = await self._run(self.store.update, params.bank_uuid, _documents(body))
        return self._written(params.bank_uuid, result)

    async def get_documents(self, params: mb.BankParams, body: mb.DocumentUuids) -> list[mb.MemoryBankDocument]:
        documents = await self._run(self.store.get_documents, params.bank_uuid, body.root)
        return [mb.MemoryBankDocument(uuid=d.uuid, content=base64.b64encode(d.content).decode("ascii"),
                                      metadata=d.metadata, mime_type=d.mime_type) for d in documents]

    async def delete_documents(self, params: mb.BankParams, body: mb.DocumentUuids) -> list[mb.DeletedDocument]:
        deleted = await self._run(self.store.delete_documents, params.bank_uuid, body.root)
        return [mb.DeletedDocument(uuid) for uuid in deleted]

    async def query(self, params: mb.BankParams, body: mb.MemoryBankQueryRequest) -> mb.MemoryBankQueryResponse:
        text = content_text(body.query, "query", EMBEDDING_MODEL_ID)
        result = await self._run(self.store.query, params.bank_uuid, text, body.max_chunks, body.mode)
        return mb.MemoryBankQueryResponse(
            chunks=[mb.MemoryBankChunk(content=c.content, token_count=c.token_count,
                                       document_uuid=c.document_uuid) for c in result.chunks],
            scores=result.scores)

    async def embeddings(self, request: mb.EmbeddingRequest) -> mb.EmbeddingResponse:
        """OpenAI's embeddings. An input past the model's input length is refused, not cut."""
        if request.model != EMBEDDING_MODEL_ID:
            raise ModelNotFoundError(f"model: no embedding model {request.model!r} "
                                     f"(this server embeds with {EMBEDDING_MODEL_ID!r})", param="model")
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts:
            raise APIError("input: must hold at least one string", param="input")
        return await asyncio.to_thread(self._embed, request, texts)

    def _embed(self, request: mb.EmbeddingRequest, texts: list[str]) -> mb.EmbeddingResponse:
        embedder = self.store.embedder
        if request.dimensions is not None and request.dimensions != embedder.dimension:
            raise APIError(f"dimensions: {request.model} makes {embedder.dimension}-dimensional "
                           f"embeddings, got {request.dimensions}", param="dimensions")
        single = isinstance(request.input, str)
        for i, text in enumerate(texts):
            where = "input" if single else f"input[{i}]"
            if not text.strip():
                raise APIError(f"{where}: must contain text", param=where)
            tokens = len(embedder.token_offsets(text))
            if tokens > embedder.max_text_tokens:
                raise APIError(f"{where}: {tokens} tokens exceed the {embedder.max_text_tokens} "
                               f"that {request.model} reads", param=where)
        vectors = embedder.embed(texts)
        prompt_tokens = sum(embedder.count_tokens(texts))
        data = [mb.Embedding(index=i, embedding=(
                    base64.b64encode(vector.astype(FLOAT32_LITTLE_ENDIAN).tobytes()).decode("ascii")
                    if request.encoding_format == "base64" else vector.tolist()))
                for i, vector in enumerate(vectors)]
        return mb.EmbeddingResponse(data=data, model=EMBEDDING_MODEL_ID,
                                    usage=mb.EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
