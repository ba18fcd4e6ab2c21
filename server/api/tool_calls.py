"""Tool use in the model family's own format: tools rendered into the prompt, and the model's
output parsed back into tool calls (incrementally, so streaming works too).

Two families are supported:
- Llama 3.x: built-in tools are announced in the system prompt (`Environment: ipython`,
  `Tools: brave_search, wolfram_alpha`) and called as `<|python_tag|>brave_search.call(...)`;
  custom tools are JSON definitions, called as `{"name": ..., "parameters": {...}}`;
  tool results come back in the `ipython` role.
- ChatML templates (SmolLM2, Qwen, Hermes): tools listed as JSON inside `<tools>`, called as
  JSON inside `<tool_call>...</tool_call>`, results in `<tool_response>` blocks.
"""

from __future__ import annotations

import abc
import ast
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from llama_engine.engine.structured_output import lark_json

LLAMA3_HEADER_TOKEN = "<|start_header_id|>"
CHATML_START_TOKEN = "<|im_start|>"
PYTHON_TAG = "<|python_tag|>"
LLAMA3_END_TOKENS = ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>")
LLAMA3_KNOWLEDGE_CUTOFF = "December 2023"
CODE_INTERPRETER = "code_interpreter"

# Spec built-in tool name -> the name Llama 3.x models were trained to call it by.
LLAMA3_BUILTIN_NAMES = {
    "web_search": "brave_search",
    "math": "wolfram_alpha",
    "image_gen": "photogen",
}
SPEC_NAME_FOR_LLAMA3_BUILTIN = {v: k for k, v in LLAMA3_BUILTIN_NAMES.items()}


def _single_string_schema(argument: str, description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {argument: {"type": "string", "description": description}},
        "required": [argument],
    }


# How built-in tools look to families that have no built-in tool syntax of their own.
BUILTIN_TOOL_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "web_search": ("Search the web.", _single_string_schema("query", "The search query.")),
    "math": ("Evaluate a mathematical expression.",
             _single_string_schema("expression", "The expression to evaluate.")),
    "image_gen": ("Generate an image from a description.",
                  _single_string_schema("prompt", "What the image shows.")),
    CODE_INTERPRETER: ("Run Python code and return its output.",
                       _single_string_schema("code", "The Python code to run.")),
}


@dataclass
class ToolSpec:
    """A tool offered to the model; `parameters` is a JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    builtin: bool = False

    @classmethod
    def builtin_tool(cls, name: str) -> "ToolSpec":
        description, schema = BUILTIN_TOOL_SPECS[name]
        return cls(name=name, description=description, parameters=schema, builtin=True)

    def function_json(self) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]


def call_schema(tool: ToolSpec, arguments_key: str) -> dict[str, Any]:
    """JSON schema of one call object, {"name": <tool name>, <arguments_key>: {...}}."""
    return {"type": "object",
            "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def any_call_schema(tools: list[ToolSpec], arguments_key: str) -> dict[str, Any]:
    schemas = [call_schema(t, arguments_key) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _json_call(obj: Any, argument_keys: tuple[str, ...]) -> Optional[ParsedToolCall]:
    """Read {"name": ..., <argument key>: {...}} (arguments may be a JSON-encoded string)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments: Any = {}
    for key in argument_keys:
        if key in obj:
            arguments = obj[key]
            break
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(name=obj["name"], arguments=arguments)


def _json_calls(text: str, argument_keys: tuple[str, ...]) -> Optional[list[ParsedToolCall]]:
    """One JSON call object, or a list of them; None unless every one of them parses."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_json_call(item, argument_keys) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


class ToolCallFormat(abc.ABC):
    """How one model family writes tools into prompts and tool calls into its output."""

    # Markers that open a tool call in the output, each with its closing marker (None: the
    # call runs to the end of the generation).
    call_markers: dict[str, Optional[str]] = {}
    # Whether an output that starts with `{` may be a bare JSON tool call.
    bare_json_calls: bool = False
    # Whether tool calls need special tokens kept in the decoded output.
    needs_special_tokens: bool = False
    # Special tokens that end a turn: kept in the output for parsing, never shown as text.
    ignored_tokens: tuple[str, ...] = ()

    @abc.abstractmethod
    def system_prompt(self, tools: list[ToolSpec], system_text: str) -> str:
        """Defined by each family."""

    @abc.abstractmethod
    def assistant_text(self, text: str, calls: list[ParsedToolCall]) -> str:
        """Defined by each family."""

    @abc.abstractmethod
    def tool_result_message(self, tool_name: str, text: str) -> dict[str, str]:
        """Defined by each family."""

    @abc.abstractmethod
    def parse_call(self, marker: str, body: str) -> Optional[list[ParsedToolCall]]:
        """Defined by each family."""

    @abc.abstractmethod
    def forced_call_grammar(self, tools: list[ToolSpec], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect, JSON embedded with `%json`) that matches
        exactly the outputs calling one of `tools` with arguments valid under its schema
        (several calls when `parallel` and the family can write them); decoding under it
        forces a tool call (tool_choice "required", or one named tool)."""

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """Split a finished output into its plain text and its tool calls."""
        parser = StreamingToolCallParser(self)
        head, head_calls = parser.feed(text)
        tail, tail_calls = parser.finish()
        return head + tail, head_calls + tail_calls


class Llama3ToolFormat(ToolCallFormat):
    call_markers = {PYTHON_TAG: None, "<function=": "</function>"}
    bare_json_calls = True
    needs_special_tokens = True
    ignored_tokens = LLAMA3_END_TOKENS

    def system_prompt(self, tools: list[ToolSpec], system_text: str) -> str:
        builtins = [t for t in tools if t.builtin]
        custom = [t for t in tools if not t.builtin]
        sections: list[str] = []
        if builtins:
            lines = ["Environment: ipython"]
            named = [LLAMA3_BUILTIN_NAMES[t.name] for t in builtins if t.name in LLAMA3_BUILTIN_NAMES]
            if named:
                lines.append("Tools: " + ", ".join(named))
            sections.append("\n".join(lines))
        today = datetime.now(timezone.utc).strftime("%d %b %Y")
        sections.append(f"Cutting Knowledge Date: {LLAMA3_KNOWLEDGE_CUTOFF}\nToday Date: {today}")
        if custom:
            definitions = "\n\n".join(json.dumps(t.function_json()) for t in custom)
            sections.append(
                "These functions are available to you. To call one, reply with nothing but a "
                'JSON object {"name": <function name>, "parameters": {<argument>: <value>}}, '
                "using literal values. Answer in plain text when no function is needed.\n\n"
                + definitions
            )
        if system_text:
            sections.append(system_text)
        return "\n\n".join(sections)

    def _call_text(self, call: ParsedToolCall) -> str:
        if call.name == CODE_INTERPRETER and isinstance(call.arguments.get("code"), str):
            return call.arguments["code"]
        if call.name in LLAMA3_BUILTIN_NAMES:
            arguments = ", ".join(f"{k}={json.dumps(v)}" for k, v in call.arguments.items())
            return f"{LLAMA3_BUILTIN_NAMES[call.name]}.call({arguments})"
        return json.dumps({"name": call.name, "parameters": call.arguments})

    def assistant_text(self, text: str, calls: list[ParsedToolCall]) -> str:
        if not calls:
            return text
        return text + PYTHON_TAG + "; ".join(self._call_text(c) for c in calls)

    def tool_result_message(self, tool_name: str, text: str) -> dict[str, str]:
        return {"role": "ipython", "content": text}

    def forced_call_grammar(self, tools: list[ToolSpec], parallel: bool) -> str:
        # One bare JSON call, the way Llama 3.1 calls custom tools; `parallel` has no
        # JSON form in this family.
        return "start: " + lark_json(any_call_schema(tools, "parameters"))

    def parse_call(self, marker: str, body: str) -> Optional[list[ParsedToolCall]]:
        for end_token in LLAMA3_END_TOKENS:
            body = body.replace(end_token, "")
        body = body.strip()
        if marker == "<function=":
            name, sep, arguments = body.partition(">")
            call = _json_call({"name": name, "parameters": arguments}, ("parameters",)) if sep else None
            return [call] if call else None
        calls = self._call_sequence(body)
        if calls is not None:
            return calls
        if marker == PYTHON_TAG and body:
            return [ParsedToolCall(name=CODE_INTERPRETER, arguments={"code": body})]
        return None

    @staticmethod
    def _call_sequence(body: str) -> Optional[list[ParsedToolCall]]:
        """Llama 3.x separates several calls with `;`; each is a JSON object or a built-in
        `tool.call(...)`. None unless the whole body is calls."""
        calls: list[ParsedToolCall] = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(body):
            call: Optional[ParsedToolCall] = None
            if body[position] == "{":
                try:
                    value, position = decoder.raw_decode(body, position)
                except json.JSONDecodeError:
                    return None
                call = _json_call(value, ("parameters", "arguments"))
            else:
                call, position = _builtin_call_at(body, position)
            if call is None:
                return None
            calls.append(call)
            position = len(body) - len(body[position:].lstrip().lstrip(";").lstrip())
        return calls or None


def _builtin_call_at(body: str, start: int) -> tuple[Optional[ParsedToolCall], int]:
    """The shortest `tool.call(...)` starting at `start`, and where it ends."""
    close = body.find(")", start)
    while close >= 0:
        call = _builtin_call(body[start:close + 1])
        if call is not None:
            return call, close + 1
        close = body.find(")", close + 1)
    return None, start


def _builtin_call(body: str) -> Optional[ParsedToolCall]:
    """Parse `brave_search.call(query="...")` into the spec's built-in tool name."""
    try:
        expression = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(expression, ast.Call) and isinstance(expression.func, ast.Attribute)
            and expression.func.attr == "call" and isinstance(expression.func.value, ast.Name)
            and not expression.args):
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in expression.keywords if kw.arg}
    except ValueError:
        return None
    trained_name = expression.func.value.id
    return ParsedToolCall(name=SPEC_NAME_FOR_LLAMA3_BUILTIN.get(trained_name, trained_name),
                          arguments=arguments)


class ChatMLToolFormat(ToolCallFormat):
    call_markers = {"<tool_call>": "</tool_call>"}

    def system_prompt(self, tools: list[ToolSpec], system_text: str) -> str:
        listing = json.dumps([t.function_json()["function"] for t in tools])
        instructions = (
            "You can call functions to answer the user. They are listed as JSON inside "
            f"<tools></tools>:\n<tools>{listing}</tools>\n\n"
            "To call functions, reply with only a JSON list of calls inside "
            "<tool_call></tool_call> tags, like this:\n"
            '<tool_call>[{"name": "function_name", "arguments": {"argument": "value"}}]</tool_call>\n'
            "If none of the functions fits, answer directly."
        )
        return f"{system_text}\n\n{instructions}" if system_text else instructions

    def assistant_text(self, text: str, calls: list[ParsedToolCall]) -> str:
        if not calls:
            return text
        payload = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
        return f"{text}<tool_call>{payload}</tool_call>"

    def tool_result_message(self, tool_name: str, text: str) -> dict[str, str]:
        payload = json.dumps({"name": tool_name, "content": text})
        return {"role": "tool", "content": f"<tool_response>{payload}</tool_response>"}

    def forced_call_grammar(self, tools: list[ToolSpec], parallel: bool) -> str:
        calls: dict[str, Any] = {"type": "array", "items": any_call_schema(tools, "arguments"),
                                 "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        return f'start: "<tool_call>" {lark_json(calls)} "</tool_call>"'

    def parse_call(self, marker: str, body: str) -> Optional[list[ParsedToolCall]]:
        return _json_calls(body.strip(), ("arguments", "parameters"))


def tool_format_for(chat_template: str) -> ToolCallFormat:
    """Pick the tool format from the chat template's special tokens."""
    if LLAMA3_HEADER_TOKEN in (chat_template or ""):
        return Llama3ToolFormat()
    # ChatML, and the JSON-in-tags format as a default for templates with no tool syntax.
    return ChatMLToolFormat()


def _longest_marker_prefix_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest


class StreamingToolCallParser:
    """Feeds on output text as it arrives; hands back text that is certainly not part of a
    tool call at once, and each tool call as soon as its closing marker (or the end of the
    generation) arrives. A region that does not parse as a call is handed back as text."""

    BARE_JSON_MARKER = ""  # the opening "marker" of a bare JSON call is the `{` itself

    def __init__(self, tool_format: ToolCallFormat):
        self._format = tool_format
        self._markers = list(tool_format.call_markers)
        self._held_markers = self._markers + list(tool_format.ignored_tokens)
        self._pending = ""
        self._open_marker: Optional[str] = None
        self._at_start = tool_format.bare_json_calls

    def feed(self, delta: str) -> tuple[str, list[ParsedToolCall]]:
        self._pending += delta
        text_out: list[str] = []
        calls: list[ParsedToolCall] = []
        while self._step(text_out, calls):
            pass
        return "".join(text_out), calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        text, calls = self.feed("")
        if self._open_marker is not None:
            text += self._close_region(self._pending, "", calls)
        else:
            text += self._pending
        self._pending, self._open_marker = "", None
        return text, calls

    def _close_region(self, body: str, closing: str, calls: list[ParsedToolCall]) -> str:
        """Parse a finished region; returns the text to emit if it was not a tool call."""
        marker = self._open_marker or ""
        parsed = self._format.parse_call(marker, body)
        self._open_marker = None
        if parsed is None:
            return marker + body + closing
        calls.extend(parsed)
        return ""

    def _step(self, text_out: list[str], calls: list[ParsedToolCall]) -> bool:
        """Consume what can be decided now; True if another step may make progress."""
        if self._open_marker is not None:
            closing = self._format.call_markers.get(self._open_marker)
            index = self._pending.find(closing) if closing else -1
            if index < 0:
                return False  # wait for the closing marker or the end of the generation
            text_out.append(self._close_region(self._pending[:index], closing, calls))
            self._pending = self._pending[index + len(closing):]
            return True
        for token in self._format.ignored_tokens:
            self._pending = self._pending.replace(token, "")
        if self._at_start:
            stripped = self._pending.lstrip()
            if not stripped:
                return False
            self._at_start = False
            if stripped.startswith("{"):
                self._open_marker, self._pending = self.BARE_JSON_MARKER, stripped
                return False
        found = [(self._pending.find(m), m) for m in self._markers if m in self._pending]
        if found:
            index, marker = min(found)
            text_out.append(self._pending[:index])
            self._open_marker, self._pending = marker, self._pending[index + len(marker):]
            return True
        keep = _longest_marker_prefix_suffix(self._pending, self._held_markers)
        text_out.append(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return False
