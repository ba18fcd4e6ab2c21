"""Memory retrieval in a turn, on a real store and the real embedding model: the passage that
answers the question comes first, the token budget holds, the template is written into the
newest user message, and the memory_retrieval step carries documents and scores."""

from __future__ import annotations

import asyncio
import base64

import pytest

from llama_engine.agents.config import AgentConfig
from llama_engine.agents.retrieval import MEMORY_CONTEXT_HEADER, retrieve
from llama_engine.agents.steps import assemble_turn
from llama_engine.agents.tools import BuiltinTools, ToolsConfig
from llama_engine.agents.turn import AgentRuntime, AgentShields, Turn
from llama_engine.memory import Document, MemoryStore
from tests.agent_fakes import ScriptedInference, ScriptedOutput
from tests.memory_corpus import CORPUS


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with MemoryStore(tmp_path_factory.mktemp("memory")) as store:
        store.create_bank("facts", "Facts", [Document.from_text(uuid, text) for uuid, text, _ in CORPUS[:4]])
        store.create_bank("more", "More", [Document.from_text(uuid, text) for uuid, text, _ in CORPUS[4:8]])
        yield store


def test_best_passage_first_within_the_budget(store) -> None:
    uuid, text, question = CORPUS[5]  # in the second bank
    retrieval = retrieve(store, ["facts", "more", "dropped-bank"], question, token_budget=10_000)
    assert retrieval.documents[0]["uuid"] == uuid
    assert base64.b64decode(retrieval.documents[0]["content"]).decode() == text
    assert retrieval.documents[0]["metadata"] == {"bank_uuid": "more"}
    assert retrieval.scores == sorted(retrieval.scores, reverse=True)
    assert len(retrieval.documents) == 8  # each bank gives at most 5; all 8 chunks fit
    one_chunk = store.query("more", question, max_chunks=1).chunks[0].token_count
    tight = retrieve(store, ["facts", "more"], question, token_budget=one_chunk)
    assert [d["uuid"] for d in tight.documents] == [uuid]


def test_turn_writes_passages_into_the_newest_user_message(store) -> None:
    uuid, text, question = CORPUS[2]
    agent = AgentConfig(uuid="a", instructions="Answer from memory.", model="m",
                        memory_bank_uuids=["facts"], memory_token_budget=10_000)
    model = ScriptedInference([ScriptedOutput("Chalk.")])
    user = {"role": "user", "content": question, "tool_calls": [], "tool_responses": []}
    turn = Turn(agent, AgentShields(), AgentRuntime(model, BuiltinTools(ToolsConfig()), store), [user], [])

    async def collect():
        return [c async for c in turn.run()]

    chunks = asyncio.run(collect())
    result = assemble_turn([user], chunks)
    step = result["steps"][0]
    assert step["step_type"] == "memory_retrieval"
    assert step["documents"][0]["uuid"] == uuid and len(step["scores"]) == len(step["documents"]) == 4
    prompt_user = model.requests[0].messages[-1]["content"]
    assert prompt_user.startswith(f"{MEMORY_CONTEXT_HEADER}\n[1] {text}\n[2] ")
    assert prompt_user.endswith(f"\n\n{question}")
    assert result["user_messages"] == [user]  # the turn keeps what the user wrote


def test_passages_go_before_attachments(store) -> None:
    _, text, question = CORPUS[0]
    attachment = {"url": "data:text/plain,see%20above", "mime_type": "text/plain"}
    agent = AgentConfig(uuid="a", instructions="", model="m", memory_bank_uuids=["facts"])
    model = ScriptedInference([ScriptedOutput("ok")])
    user = {"role": "user", "content": attachment, "tool_calls": [], "tool_responses": []}
    history = [{"user_messages": [{**user, "content": question}], "steps": [],
                "response_message": {"role": "assistant", "content": "?", "tool_calls": [], "tool_responses": []}}]
    turn = Turn(agent, AgentShields(), AgentRuntime(model, BuiltinTools(ToolsConfig()), store), [user], history)

    async def drain():
        return [c async for c in turn.run()]

    asyncio.run(drain())
    passages, kept = model.requests[0].messages[-1]["content"]
    assert passages.startswith(f"{MEMORY_CONTEXT_HEADER}\n[1] {text}")  # queried with the history's question
    assert kept == attachment
