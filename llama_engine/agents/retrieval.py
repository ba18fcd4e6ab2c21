"""Memory retrieval for a turn: the agent's banks queried with the conversation's recent user
text, the best chunks kept within a token budget, written into the prompt with one fixed
template.

The template (the newest user message's text becomes):

    Use these passages retrieved from memory to answer:
    [1] <chunk text>
    [2] <chunk text>

    <the user's message>
"""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from typing import Any

from llama_engine.memory import MemoryStore, NotFoundError

CHUNKS_PER_BANK = 5
# Worded so that even SmolLM2-135M answers from the passages (tried against other wordings
# on invented facts, with a distractor passage beside the answer).
MEMORY_CONTEXT_HEADER = "Use these passages retrieved from memory to answer:"
PASSAGE_TEMPLATE = "[{index}] {text}"
QUERY_MODE = "hybrid"
LOG = logging.getLogger(__name__)


@dataclass
class Retrieval:
    """What was retrieved: spec MemoryBankDocument objects (one per chunk, ``content`` the
    chunk's text base64-encoded, ``metadata`` naming bank and document), best first, and
    each one's cosine similarity to the query."""

    documents: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    passages: list[str] = field(default_factory=list)

    def context(self, message_text: str) -> str:
        """``message_text`` with the passages written before it (the module's template)."""
        if not self.passages:
            return message_text
        lines = [PASSAGE_TEMPLATE.format(index=i + 1, text=p.strip()) for i, p in enumerate(self.passages)]
        return f"{MEMORY_CONTEXT_HEADER}\n" + "\n".join(lines) + f"\n\n{message_text}"


def retrieve(store: MemoryStore, bank_uuids: list[str], query: str, token_budget: int) -> Retrieval:
    """The best chunks of all ``bank_uuids`` for ``query`` (hybrid search, CHUNKS_PER_BANK
    from each), best cosine first, as many as fit in ``token_budget`` (counted in the
    embedding model's word pieces, each chunk's ``token_count``). A bank dropped since the
    agent was made is skipped with a warning. Blocking: embeds the query, reads SQLite."""
    found: list[tuple[float, str, Any]] = []
    if not query.strip():
        return Retrieval()
    for bank_uuid in bank_uuids:
        try:
            result = store.query(bank_uuid, query, max_chunks=CHUNKS_PER_BANK, mode=QUERY_MODE)
        except NotFoundError:
            LOG.warning("memory bank %r of an agent no longer exists; skipped", bank_uuid)
            continue
        found.extend((score, bank_uuid, chunk) for chunk, score in zip(result.chunks, result.scores))
    found.sort(key=lambda item: -item[0])
    retrieval, used = Retrieval(), 0
    for score, bank_uuid, chunk in found:
        if used + chunk.token_count > token_budget:
            continue
        used += chunk.token_count
        retrieval.passages.append(chunk.content)
        retrieval.scores.append(score)
        retrieval.documents.append({
            "uuid": chunk.document_uuid,
            "content": base64.b64encode(chunk.content.encode("utf-8")).decode("ascii"),
            "metadata": {"bank_uuid": bank_uuid}, "mime_type": "text/plain"})
    return retrieval
