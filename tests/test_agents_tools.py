"""The built-in tools: math against hand-computed values (and never evaluating code),
web_search against stub Brave, Bing and Tavily servers on the loopback, image_gen against a
stub OpenAI images endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web

from llama_engine.agents.image_gen import ImageGenConfig
from llama_engine.agents.math_tool import MathError, evaluate_math
from llama_engine.agents.tools import BuiltinTools, ToolsConfig
from llama_engine.agents.web_search import WebSearchConfig, web_search_config

LOOPBACK = "127.0.0.1"
PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


@pytest.mark.parametrize("expression, value", [
    ("2 + 3*4", "14"),
    ("2^10", "1024"),
    ("1/3 + 1/6", "1/2 ≈ 0.5"),
    ("factorial(10)", "3628800"),
    ("x^2 = 9", "[-3, 3]"),
    ("diff(x^3, x)", "3*x**2"),
    ("integrate(2*x, x)", "x**2"),
    ("sin(pi/6)", "1/2 ≈ 0.5"),
    ("gcd(84, 36)", "12"),
])
def test_math_is_exact(expression: str, value: str) -> None:
    assert evaluate_math(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "().__class__", "open('/etc/passwd')", "lambda: 1",
    "2**100000", "factorial(10**7)", "", "x[0]"])
def test_math_refuses_what_is_not_math(expression: str) -> None:
    with pytest.raises(MathError):
        evaluate_math(expression)


def run_with_stub(handler: Callable[[web.Request], Awaitable[web.Response]], method: str, path: str,
                  body: Callable[[str], Awaitable[Any]]) -> tuple[Any, list[web.Request]]:
    """Serve ``handler`` at ``path`` on a free loopback port while ``body(base_url)`` runs."""
    seen: list[dict[str, Any]] = []

    async def recording(request: web.Request) -> web.Response:
        seen.append({"query": dict(request.query), "headers": dict(request.headers),
                     "json": await request.json() if request.can_read_body else None})
        return await handler(request)

    async def main() -> Any:
        app = web.Application()
        app.router.add_route(method, path, recording)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await body(f"http://{LOOPBACK}:{port}")
        finally:
            await runner.cleanup()

    return asyncio.run(main()), seen


SEARCH_ANSWERS = {
    "brave": {"web": {"results": [{"title": "Kettle", "url": "https://k.example", "description": "Boils water"}]}},
    "bing": {"webPages": {"value": [{"name": "Kettle", "url": "https://k.example", "snippet": "Boils water"}]}},
    "tavily": {"results": [{"title": "Kettle", "url": "https://k.example", "content": "Boils water"}]},
}


@pytest.mark.parametrize("provider", ["brave", "bing", "tavily"])
def test_web_search_providers(provider: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(SEARCH_ANSWERS[provider])

    async def search(base_url: str) -> Any:
        tools = BuiltinTools(ToolsConfig(web_search=WebSearchConfig(provider, "KEY", base_url + "/search")))
        return await tools.run("web_search", {"query": "what boils water"}, "s1")

    method = "POST" if provider == "tavily" else "GET"
    content, seen = run_with_stub(answer, method, "/search", search)
    assert json.loads(content) == {"query": "what boils water", "results": [
        {"title": "Kettle", "url": "https://k.example", "content": "Boils water"}]}
    [request] = seen
    if provider == "tavily":
        assert request["json"]["query"] == "what boils water" and request["json"]["api_key"] == "KEY"
    else:
        assert request["query"]["q"] == "what boils water"
        header = "X-Subscription-Token" if provider == "brave" else "Ocp-Apim-Subscription-Key"
        assert request["headers"][header] == "KEY"


def test_web_search_failure_is_a_tool_response() -> None:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=429, text="rate limited")

    async def search(base_url: str) -> Any:
        tools = BuiltinTools(ToolsConfig(web_search=WebSearchConfig("brave", "KEY", base_url + "/search")))
        return await tools.run("web_search", {"query": "q"}, "s1")

    content, _ = run_with_stub(fail, "GET", "/search", search)
    assert content.startswith("web_search error: brave search answered HTTP 429")


def test_web_search_config_reads_the_environment() -> None:
    assert web_search_config(environ={}) is None
    assert web_search_config(environ={"TAVILY_SEARCH_API_KEY": "t"}) == WebSearchConfig("tavily", "t")
    assert web_search_config("bing", "b", environ={"TAVILY_SEARCH_API_KEY": "t"}) == WebSearchConfig("bing", "b")
    with pytest.raises(ValueError):
        web_search_config("altavista", "k", environ={})


def test_image_gen_returns_the_image_as_an_attachment() -> None:
    async def images(request: web.Request) -> web.Response:
        return web.json_response({"created": 1, "data": [{"b64_json": base64.b64encode(PNG).decode()}]})

    async def generate(base_url: str) -> Any:
        tools = BuiltinTools(ToolsConfig(image_gen=ImageGenConfig(base_url + "/v1", "KEY", "sd-turbo")))
        return await tools.run("image_gen", {"prompt": "a red kettle"}, "s1")

    content, seen = run_with_stub(images, "POST", "/v1/images/generations", generate)
    text, attachment = content
    assert text == "Generated an image for: a red kettle"
    assert attachment["mime_type"] == "image/png"
    assert base64.b64decode(attachment["url"].split(",", 1)[1]) == PNG
    assert seen[0]["json"]["prompt"] == "a red kettle" and seen[0]["json"]["model"] == "sd-turbo"
    assert seen[0]["headers"]["Authorization"] == "Bearer KEY"


def test_unconfigured_tools_and_bad_arguments_say_so() -> None:
    tools = BuiltinTools(ToolsConfig())
    assert "not configured" in asyncio.run(tools.run("image_gen", {"prompt": "x"}, "s"))
    assert "not available" in asyncio.run(tools.run("code_interpreter", {"code": "1"}, "s"))
    assert "needs a non-empty string argument 'expression'" in asyncio.run(tools.run("math", {"x": 1}, "s"))
    assert asyncio.run(tools.run("math", {"query": "1+1"}, "s")) == "2"  # Llama 3's wolfram_alpha argument


def test_serve_flags_build_the_agent_options(monkeypatch) -> None:
    import argparse

    from server.cli import add_serve_arguments, agent_options

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    monkeypatch.delenv("BRAVE_SEARCH_API_KEY", raising=False)
    monkeypatch.delenv("BING_SEARCH_API_KEY", raising=False)
    monkeypatch.setenv("TAVILY_SEARCH_API_KEY", "from-env")
    options = agent_options(parser.parse_args([
        "--shield-model", "llama_guard=/models/guard.gguf", "--allow-unsafe-code-interpreter",
        "--image-gen-url", "http://127.0.0.1:9/v1", "--image-gen-model", "sd"]))
    assert options.shield_models == {"llama_guard": "/models/guard.gguf"}
    assert options.allow_unsafe_code
    assert options.tools.web_search == WebSearchConfig("tavily", "from-env")
    assert options.tools.image_gen == ImageGenConfig("http://127.0.0.1:9/v1", None, "sd")
    explicit = agent_options(parser.parse_args(["--web-search-provider", "brave", "--web-search-api-key", "k",
                                                "--web-search-url", "http://127.0.0.1:9/s"]))
    assert explicit.tools.web_search == WebSearchConfig("brave", "k", "http://127.0.0.1:9/s")
    for bad in (["--shield-model", "llama_guard"], ["--web-search-api-key", "k"]):
        with pytest.raises(SystemExit):
            agent_options(parser.parse_args(bad))


def test_long_tool_output_is_clipped_keeping_its_start_and_end() -> None:
    from types import SimpleNamespace

    from llama_engine.agents.tools import TOOL_TEXT_MAX_CHARS

    class Flood:  # a fork bomb's worth of stderr
        def run(self, session_id: str, code: str):
            return SimpleNamespace(stdout="first line\n" + "x" * 30_000 + "\nlast line",
                                   stderr="", error=None, timed_out=False, attachments=[])

    tools = BuiltinTools(ToolsConfig(), code_interpreter=Flood)
    text = asyncio.run(tools.run("code_interpreter", {"code": "..."}, "s"))
    assert len(text) <= TOOL_TEXT_MAX_CHARS
    assert text.startswith("[stdout]\nfirst line") and text.endswith("last line")
    import re
    cut = int(re.search(r"\[\.\.\. (\d+) characters cut \.\.\.\]", text).group(1))
    original = len("[stdout]\nfirst line\n") + 30_000 + len("\nlast line")
    marker = f"\n[... {cut} characters cut ...]\n"
    assert len(text) - len(marker) + cut == original  # what is kept plus what is cut
