"""The built-in ``image_gen`` tool: an OpenAI-compatible images endpoint
(``POST {url}/images/generations``) given by a server option; the image comes back as an
attachment (a ``data:`` URL, or the endpoint's own URL when it answers with one)."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp

REQUEST_TIMEOUT_S = 120.0  # diffusion models take tens of seconds per image
DEFAULT_SIZE = "512x512"
PNG_MIME_TYPE = "image/png"


class ImageGenError(RuntimeError):
    """The endpoint failed or answered something unreadable; the message says which."""


@dataclass(frozen=True)
class ImageGenConfig:
    url: str  # the API base, e.g. http://127.0.0.1:9000/v1
    api_key: Optional[str] = None
    model: Optional[str] = None
    size: str = DEFAULT_SIZE

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/images/generations"


async def generate_image(config: ImageGenConfig, prompt: str) -> dict[str, str]:
    """One image for ``prompt`` as a spec Attachment ({url, mime_type}). Raises ImageGenError."""
    body: dict[str, Any] = {"prompt": prompt, "n": 1, "size": config.size, "response_format": "b64_json"}
    if config.model:
        body["model"] = config.model
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            async with session.post(config.endpoint, json=body, headers=headers) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    raise ImageGenError(f"image endpoint answered HTTP {response.status}: {detail}")
                answer = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ImageGenError(f"image endpoint failed: {exc!r}") from None
    try:
        image = answer["data"][0]
    except (KeyError, IndexError, TypeError):
        raise ImageGenError("image endpoint answered without data[0]") from None
    if image.get("b64_json"):
        try:
            raw = base64.b64decode(image["b64_json"], validate=True)
        except (binascii.Error, ValueError):
            raise ImageGenError("image endpoint's b64_json is not base64") from None
        return {"url": f"data:{PNG_MIME_TYPE};base64,{base64.b64encode(raw).decode('ascii')}",
                "mime_type": PNG_MIME_TYPE}
    if isinstance(image.get("url"), str) and image["url"].startswith(("http://", "https://", "data:")):
        return {"url": image["url"], "mime_type": PNG_MIME_TYPE}
    raise ImageGenError("image endpoint answered neither b64_json nor a url")
