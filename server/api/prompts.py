"""Conversations of both API dialects, reduced to one form and rendered into prompt tokens."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from server.api.errors import APIError, UnsupportedContentError
from server.api.tool_calls import ParsedToolCall, ToolCallFormat, ToolSpec
from server.schemas import llama_stack as ls

DATA_URL_PREFIX = "data:"


@dataclass
class ChatTurn:
    """One message, in the form every tool format renders from."""

    role: str  # system / user / assistant / tool
    text: str
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    tool_name: Optional[str] = None  # which tool produced a `tool` turn


def _data_url_text(url: str, field_path: str) -> str:
    """Decode a `data:text/...` URL; its payload is the text the model reads."""
    header, sep, payload = url[len(DATA_URL_PREFIX):].partition(",")
    if not sep:
        raise UnsupportedContentError(f"{field_path}: malformed data URL (no ',')", field_path)
    if header.endswith(";base64"):
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise UnsupportedContentError(f"{field_path}: data URL is not valid base64", field_path)
    else:
        raw = urllib.parse.unquote_to_bytes(payload)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedContentError(f"{field_path}: data URL text is not UTF-8", field_path)


def attachment_text(attachment: ls.Attachment, field_path: str, model_id: str) -> str:
    """Text models read only inline text attachments; anything else is refused, by name."""
    if attachment.mime_type.startswith("text/") and attachment.url.startswith(DATA_URL_PREFIX):
        return _data_url_text(attachment.url, field_path)
    if attachment.mime_type.startswith("text/"):
        reason = "only inline data: URLs are read; the server does not fetch remote or local files"
    else:
        reason = f"model {model_id!r} reads text only and cannot read {attachment.mime_type!r}"
    raise UnsupportedContentError(f"{field_path}: unsupported attachment: {reason}", field_path)


def content_text(content: ls.Content, field_path: str, model_id: str) -> str:
    """The text of spec Content: a string, an Attachment, or a list of them, concatenated."""
    if isinstance(content, str):
        return content
    if isinstance(content, ls.Attachment):
        return attachment_text(content, field_path, model_id)
    return "".join(
        content_text(item, f"{field_path}[{i}]", model_id) for i, item in enumerate(content)
    )


def spec_tools(definitions: Sequence[ls.ToolDefinition], field: str = "available_tools"
               ) -> list[ToolSpec]:
    """The request's tool definitions as ToolSpecs; APIError naming
    ``available_tools[i].parameters...`` for parameters that are neither form _json_schema
    reads."""
    tools = []
    for index, definition in enumerate(definitions):
        if isinstance(definition.tool_name, ls.BuiltinTool):
            tools.append(ToolSpec.builtin_tool(definition.tool_name.value))
        else:
            schema = _json_schema(definition.parameters, f"{field}[{index}].parameters")
            tools.append(ToolSpec(name=definition.tool_name, description=definition.description or "",
                                  parameters=schema))
    return tools


# Llama Stack tool parameters often name Python types; JSON schema spells them differently.
PYTHON_TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                     "list": "array", "dict": "object"}


def _json_schema(parameters: Optional[dict[str, Any]], field: str) -> dict[str, Any]:
    """Accept a JSON schema of an object as is, or the llama-stack map of
    name -> {param_type, description, required}; APIError naming ``field.<name>`` for an entry
    that is neither (say {"type": "bogus"}: not an object schema, nor a parameter map)."""
    if not parameters:
        return {"type": "object", "properties": {}}
    if parameters.get("type") == "object" or "properties" in parameters:
        return parameters
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            raise APIError(f"{field}.{name}: expected a JSON schema of an object "
                           "({\"type\": \"object\", \"properties\": ...}) or a map of parameter "
                           f"name -> {{param_type, description, required}}; got {spec!r} for "
                           f"{name!r}", param=f"{field}.{name}")
        param_type = spec.get("param_type", spec.get("type", "string"))
        properties[name] = {"type": PYTHON_TYPE_NAMES.get(param_type, param_type),
                            "description": spec.get("description", "")}
        if spec.get("required", True):
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


def spec_dialog_turns(dialog: ls.Dialog, model_id: str) -> list[ChatTurn]:
    messages = [*dialog.message_history, dialog.message]
    turns: list[ChatTurn] = []
    for index, message in enumerate(messages):
        path = "dialog.message" if index == len(messages) - 1 else f"dialog.message_history[{index}]"
        turns.extend(_spec_message_turns(message, path, model_id))
    return turns


def _spec_message_turns(message: ls.Message, path: str, model_id: str) -> list[ChatTurn]:
    text = content_text(message.content, f"{path}.content", model_id)
    calls = [ParsedToolCall(name=c.tool_name, arguments=c.arguments) for c in message.tool_calls]
    if message.tool_responses:
        # Each tool response is a turn of its own, as the model saw them during training.
        return [ChatTurn(role="tool", tool_name=r.tool_name,
                         text=content_text(r.content, f"{path}.tool_responses[{i}].content", model_id))
                for i, r in enumerate(message.tool_responses)]
    return [ChatTurn(role=message.role, text=text, tool_calls=calls)]


def render_messages(turns: list[ChatTurn], tools: list[ToolSpec],
                    tool_format: ToolCallFormat) -> list[dict[str, str]]:
    """Plain {role, content} messages for the tokenizer's chat template, with tools, tool
    calls and tool results written in the model family's format."""
    messages: list[dict[str, str]] = []
    system_parts = [t.text for t in turns if t.role == "system"]
    if tools:
        messages.append({"role": "system",
                         "content": tool_format.system_prompt(tools, "\n\n".join(system_parts))})
    elif system_parts:
        messages.append({"role": "system", "content": "\n\n".join(system_parts)})
    for turn in turns:
        if turn.role == "system":
            continue
        if turn.role == "tool":
            messages.append(tool_format.tool_result_message(turn.tool_name or "", turn.text))
        elif turn.role == "assistant":
            messages.append({"role": "assistant",
                             "content": tool_format.assistant_text(turn.text, turn.tool_calls)})
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages
