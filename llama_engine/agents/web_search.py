"""The built-in ``web_search`` tool: Brave, Bing or Tavily over HTTP. Keys come from the
server's options or the environment (the variable names Llama Stack uses)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp

DEFAULT_MAX_RESULTS = 5
REQUEST_TIMEOUT_S = 20.0
PROVIDERS = ("brave", "bing", "tavily")
ENDPOINTS = {
    "brave": "https://api.search.brave.com/res/v1/web/search",
    "bing": "https://api.bing.microsoft.com/v7.0/search",
    "tavily": "https://api.tavily.com/search",
}
KEY_ENV = {"brave": "BRAVE_SEARCH_API_KEY", "bing": "BING_SEARCH_API_KEY",
           "tavily": "TAVILY_SEARCH_API_KEY"}


class WebSearchError(RuntimeError):
    """The provider failed or answered something unreadable; the message says which."""


@dataclass(frozen=True)
class WebSearchConfig:
    provider: str  # brave / bing / tavily
    api_key: str
    url: Optional[str] = None  # the provider's endpoint, when not its public one (a proxy)
    max_results: int = DEFAULT_MAX_RESULTS

    @property
    def endpoint(self) -> str:
        return self.url or ENDPOINTS[self.provider]


def web_search_config(provider: Optional[str] = None, api_key: Optional[str] = None,
                      url: Optional[str] = None,
                      environ: Optional[dict[str, str]] = None) -> Optional[WebSearchConfig]:
    """The configured provider: ``provider`` with ``api_key`` (or its key from the
    environment); with no provider, the first of PROVIDERS whose key is set. None when no
    key is found. Raises ValueError for an unknown provider."""
    env = os.environ if environ is None else environ
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"web search provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    for name in [provider] if provider else PROVIDERS:
        key = api_key if provider and api_key else env.get(KEY_ENV[name])
        if key:
            return WebSearchConfig(name, key, url)
    return None


def _result(title: Any, url: Any, content: Any) -> dict[str, str]:
    return {"title": str(title or ""), "url": str(url or ""), "content": str(content or "")}


def _results(provider: str, body: dict[str, Any]) -> list[dict[str, str]]:
    """Each provider's answer as [{title, url, content}], best first."""
    if provider == "brave":
        items = (body.get("web") or {}).get("results") or []
        return [_result(i.get("title"), i.get("url"), i.get("description")) for i in items]
    if provider == "bing":
        items = (body.get("webPages") or {}).get("value") or []
        return [_result(i.get("name"), i.get("url"), i.get("snippet")) for i in items]
    items = body.get("results") or []
    return [_result(i.get("title"), i.get("url"), i.get("content")) for i in items]


async def web_search(config: WebSearchConfig, query: str) -> str:
    """Search ``query``; the results as JSON text ({"query", "results": [{title, url,
    content}]}), at most ``config.max_results``. Raises WebSearchError."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if config.provider == "tavily":
                request = session.post(config.endpoint, json={
                    "api_key": config.api_key, "query": query, "max_results": config.max_results},
                    headers={"Authorization": f"Bearer {config.api_key}"})
            else:
                header = "X-Subscription-Token" if config.provider == "brave" else "Ocp-Apim-Subscription-Key"
                request = session.get(config.endpoint, params={"q": query, "count": str(config.max_results)},
                                      headers={header: config.api_key, "Accept": "application/json"})
            async with request as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    raise WebSearchError(f"{config.provider} search answered HTTP {response.status}: {detail}")
                body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise WebSearchError(f"{config.provider} search failed: {exc!r}") from None
    except json.JSONDecodeError:
        raise WebSearchError(f"{config.provider} search answered something that is not JSON") from None
    if not isinstance(body, dict):
        raise WebSearchError(f"{config.provider} search answered JSON that is not an object")
    results = _results(config.provider, body)[:config.max_results]
    return json.dumps({"query": query, "results": results})
