"""64 concurrent streaming requests all complete, each with the greedy text it gets alone."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterator

import aiohttp
import pytest

from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

CONCURRENT_REQUESTS = 64
MAX_TOKENS = 12
TIMEOUT_S = 900
QUESTIONS = ["Name a color.", "What is 2 plus 2?", "Say hello.", "Name a fruit.",
             "What is the capital of Italy?", "Give me a word that rhymes with cat.",
             "How many days are in a week?", "Name an animal that can fly."]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--max-model-len", "512") as process:
        yield process


async def sse_payloads(response: aiohttp.ClientResponse) -> list[Any]:
    assert response.status == 200, await response.text()
    payloads = []
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            payloads.append(json.loads(line[len("data: "):]))
    return payloads


async def openai_stream(session: aiohttp.ClientSession, base_url: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "stream": True}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
        chunks = await sse_payloads(response)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


async def spec_stream(session: aiohttp.ClientSession, base_url: str, model: str, question: str) -> str:
    body = {"model": model, "dialog": {"message": {"role": "user", "content": question}},
            "max_tokens": MAX_TOKENS, "stream": True}
    async with session.post(f"{base_url}/inference/chat_completion", json=body) as response:
        chunks = await sse_payloads(response)
    assert chunks[-1]["stop_reason"] in ("finished_ok", "max_tokens")
    return "".join(c["text_delta"] for c in chunks)


async def run_all(base_url: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(f"{base_url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        alone = {q: await openai_stream(session, base_url, model, q) for q in QUESTIONS}
        plan = [(QUESTIONS[i % len(QUESTIONS)], openai_stream if i % 2 else spec_stream)
                for i in range(CONCURRENT_REQUESTS)]
        texts = await asyncio.gather(*(send(session, base_url, model, q) for q, send in plan))
    return alone, [(q, text) for (q, _), text in zip(plan, texts)]


def test_64_concurrent_streams_match_their_solo_greedy_text(server: ServerProcess) -> None:
    alone, together = asyncio.run(run_all(server.base_url))
    assert len(together) == CONCURRENT_REQUESTS
    assert all(alone[q] for q in QUESTIONS)
    mismatches = [(q, text, alone[q]) for q, text in together if text != alone[q]]
    assert not mismatches, mismatches[:3]
