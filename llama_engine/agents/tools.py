"""The built-in tools the server runs for an agent (``executable_tools``): math, web_search,
image_gen and code_interpreter. A tool that fails, or is not configured, answers with a
tool response saying so: the model reads it and the turn goes on."""
from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from llama_engine.agents.image_gen import ImageGenConfig, ImageGenError, generate_image
from llama_engine.agents.web_search import WebSearchConfig, WebSearchError, web_search

# The argument each tool reads, then the names Llama 3.x's built-in calls use for it
# (`wolfram_alpha.call(query=...)`, `photogen.call(query=...)`).
ARGUMENT_NAMES = {"math": ("expression", "query"), "web_search": ("query",),
                  "image_gen": ("prompt", "query"), "code_interpreter": ("code",)}
OCTET_STREAM = "application/octet-stream"

Content = Any  # spec Content: a string, an Attachment object, or a list of them


class CodeRunner(Protocol):
    """What the code_interpreter tool needs of the sandbox (agents.sandbox.CodeInterpreter)."""

    def run(self, session_id: str, code: str) -> Any: ...

    def close_session(self, session_id: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class ToolsConfig:
    """Server options the built-in tools read; None: that tool is not configured."""

    web_search: Optional[WebSearchConfig] = None
    image_gen: Optional[ImageGenConfig] = None


def _argument(name: str, arguments: dict[str, Any]) -> Optional[str]:
    for key in ARGUMENT_NAMES[name]:
        if isinstance(arguments.get(key), str) and arguments[key].strip():
            return arguments[key]
    return None


# A tool response goes back into the model's context: a fork bomb's stderr or a long page of
# search results must not push the next inference past it (about 1,500 tokens of text).
TOOL_TEXT_MAX_CHARS = 6000
CLIP_MARKER = "\n[... {} characters cut ...]\n"


def clip_text(text: str, limit: int = TOOL_TEXT_MAX_CHARS) -> str:
    """``text`` if it fits in ``limit`` characters, else its first and last parts around a
    marker saying how much was cut (the end of an output often holds the error)."""
    if len(text) <= limit:
        return text
    keep = limit - len(CLIP_MARKER.format(len(text)))
    head, tail = keep - keep // 3, keep // 3
    return text[:head] + CLIP_MARKER.format(len(text) - head - tail) + text[len(text) - tail:]


def code_result_content(result: Any) -> Content:
    """A CodeResult as a tool response: its output as text, files (matplotlib figures) as
    data-URL attachments after it."""
    parts = []
    if result.stdout:
        parts.append(f"[stdout]\n{result.stdout}")
    if result.stderr:
        parts.append(f"[stderr]\n{result.stderr}")
    if result.error:
        parts.append(f"[error]\n{result.error}")
    if result.timed_out:
        parts.append("[timed out: the session was restarted and its variables are lost]")
    text = "\n".join(parts) or "[no output]"
    if not result.attachments:
        return text
    attachments = []
    for name, data in result.attachments:
        mime_type = mimetypes.guess_type(name)[0] or OCTET_STREAM
        attachments.append({"url": f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}",
                            "mime_type": mime_type})
    return [text, *attachments]


class BuiltinTools:
    """Runs built-in tool calls. ``code_interpreter`` is made on first use by the factory
    (starting a sandbox costs time only agents that run code should pay)."""

    def __init__(self, config: ToolsConfig,
                 code_interpreter: Optional[Callable[[], CodeRunner]] = None):
        self.config = config
        self._code_factory = code_interpreter
        self._code: Optional[CodeRunner] = None

    def _interpreter(self) -> Optional[CodeRunner]:
        if self._code is None and self._code_factory is not None:
            self._code = self._code_factory()
        return self._code

    async def run(self, name: str, arguments: dict[str, Any], session_id: str) -> Content:
        """The tool response content for one call of the built-in tool ``name``, its text
        clipped to TOOL_TEXT_MAX_CHARS (``clip_text``)."""
        content = await self._run(name, arguments, session_id)
        if isinstance(content, str):
            return clip_text(content)
        return [clip_text(part) if isinstance(part, str) else part for part in content]

    async def _run(self, name: str, arguments: dict[str, Any], session_id: str) -> Content:
        value = _argument(name, arguments)
        if value is None:
            wanted = " or ".join(repr(k) for k in ARGUMENT_NAMES[name])
            return f"{name} error: the call needs a non-empty string argument {wanted}; got {json.dumps(arguments)}"
        try:
            if name == "math":
                from llama_engine.agents.math_tool import evaluate_math  # sympy: slow to import
                return await asyncio.to_thread(evaluate_math, value)
            if name == "web_search":
                if self.config.web_search is None:
                    return ("web_search is not configured on this server (no Brave, Bing or Tavily "
                            "API key): answer without searching.")
                return await web_search(self.config.web_search, value)
            if name == "image_gen":
                if self.config.image_gen is None:
                    return "image_gen is not configured on this server (no image endpoint)."
                return [f"Generated an image for: {value}",
                        await generate_image(self.config.image_gen, value)]
            interpreter = self._interpreter()
            if interpreter is None:  # no factory: a runtime built without the code interpreter
                return "code_interpreter is not available on this server."
            result = await asyncio.to_thread(interpreter.run, session_id, value)
            return code_result_content(result)
        except (WebSearchError, ImageGenError, RuntimeError) as exc:
            # RuntimeError: the sandbox refusing to run (SandboxUnavailableError)
            return f"{name} error: {exc}"
        except (ArithmeticError, TypeError, ValueError, NotImplementedError) as exc:
            # math_tool.MathError (a ValueError) and what sympy raises on odd input
            return f"{name} error: {exc}"

    def close_session(self, session_id: str) -> None:
        """Drop the session's code-interpreter worker and scratch files, if it has any."""
        if self._code is not None:
            self._code.close_session(session_id)

    def close(self) -> None:
        """Stop every code-interpreter worker (server shutdown)."""
        if self._code is not None:
            self._code.close()
            self._code = None
