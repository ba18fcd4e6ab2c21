"""Tool-call rendering and parsing for both model families, on model outputs (no model loaded).

ChatML outputs were recorded from SmolLM2-135M-Instruct through this server; Llama 3.x
outputs are the shapes Llama 3.1/3.2 emit as shown in Meta's prompt-format documentation
(built-in `<|python_tag|>tool.call(...)`, JSON custom calls, `<function=...>` calls)."""

from __future__ import annotations

import json

import pytest

from server.api.prompts import ChatTurn, render_messages
from server.api.tool_calls import (ChatMLToolFormat, Llama3ToolFormat, ParsedToolCall,
                                   StreamingToolCallParser, ToolSpec, tool_format_for)

WEATHER = ToolSpec(
    name="get_weather", description="Get the current weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})

CHATML_CASES = [
    # recorded: SmolLM2-135M-Instruct, greedy, with an in-context example call
    ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>',
     "", [ParsedToolCall("get_weather", {"city": "Paris"})]),
    # recorded: the model answering in prose
    ("The weather in Paris is described as a warm and sunny day.",
     "The weather in Paris is described as a warm and sunny day.", []),
    # recorded: a malformed call (arguments not an object) stays text
    ('<tool_call>[{"name": "get_weather", "arguments": 1}]</tool_call>\n\nThe weather in Paris is Paris.',
     '<tool_call>[{"name": "get_weather", "arguments": 1}]</tool_call>\n\nThe weather in Paris is Paris.', []),
    # Hermes/Qwen style: one object per tag, several tags, arguments as a JSON string
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
     "Let me check.\n\n", [ParsedToolCall("get_weather", {"city": "Oslo"}),
                           ParsedToolCall("get_weather", {"city": "Rome"})]),
    # generation cut off inside the call: not a call
    ('<tool_call>[{"name": "get_weather", "argu', '<tool_call>[{"name": "get_weather", "argu', []),
]

LLAMA3_CASES = [
    ('<|python_tag|>brave_search.call(query="current weather in Menlo Park, California")<|eom_id|>',
     "", [ParsedToolCall("web_search", {"query": "current weather in Menlo Park, California"})]),
    ('<|python_tag|>wolfram_alpha.call(query="solve x^3 - 4x^2 + 6x - 24 = 0")<|eom_id|>',
     "", [ParsedToolCall("math", {"query": "solve x^3 - 4x^2 + 6x - 24 = 0"})]),
    ("<|python_tag|>import math\nprint(math.sqrt(2))<|eom_id|>",
     "", [ParsedToolCall("code_interpreter", {"code": "import math\nprint(math.sqrt(2))"})]),
    ('{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}<|eot_id|>',
     "", [ParsedToolCall("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_weather", "parameters": {"city": "Lyon"}}<|eom_id|>',
     "", [ParsedToolCall("get_weather", {"city": "Paris"}), ParsedToolCall("get_weather", {"city": "Lyon"})]),
    ('<function=spotify_trending_songs>{"n": "5"}</function><|eom_id|>',
     "", [ParsedToolCall("spotify_trending_songs", {"n": "5"})]),
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
]


@pytest.mark.parametrize("output, text, calls", CHATML_CASES)
def test_chatml_outputs_parse(output: str, text: str, calls: list[ParsedToolCall]) -> None:
    assert ChatMLToolFormat().parse(output) == (text, calls)


@pytest.mark.parametrize("output, text, calls", LLAMA3_CASES)
def test_llama3_outputs_parse(output: str, text: str, calls: list[ParsedToolCall]) -> None:
    assert Llama3ToolFormat().parse(output) == (text, calls)


@pytest.mark.parametrize("tool_format, cases", [(ChatMLToolFormat(), CHATML_CASES),
                                                (Llama3ToolFormat(), LLAMA3_CASES)])
@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_streaming_parse_matches_whole_parse(tool_format, cases, chunk_size: int) -> None:
    """Fed in pieces, as tokens arrive, the parser yields the same text and calls."""
    for output, text, calls in cases:
        parser = StreamingToolCallParser(tool_format)
        got_text, got_calls = "", []
        for start in range(0, len(output), chunk_size):
            piece_text, piece_calls = parser.feed(output[start:start + chunk_size])
            got_text += piece_text
            got_calls += piece_calls
        tail_text, tail_calls = parser.finish()
        assert (got_text + tail_text, got_calls + tail_calls) == (text, calls)


def test_streaming_emits_call_as_soon_as_it_closes_and_holds_partial_markers() -> None:
    parser = StreamingToolCallParser(ChatMLToolFormat())
    assert parser.feed("Sure. <tool_") == ("Sure. ", [])  # "<tool_" may open a call: held
    assert parser.feed('call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]') == ("", [])
    assert parser.feed("</tool_call> Done") == (" Done", [ParsedToolCall("get_weather", {"city": "Paris"})])
    assert parser.finish() == ("", [])


def test_family_is_chosen_from_the_chat_template() -> None:
    assert isinstance(tool_format_for("{{ '<|start_header_id|>' + role }}"), Llama3ToolFormat)
    assert isinstance(tool_format_for("{{ '<|im_start|>' + role }}"), ChatMLToolFormat)


def test_chatml_rendering_of_tools_calls_and_results() -> None:
    turns = [ChatTurn("system", "Be brief."), ChatTurn("user", "Weather in Paris?"),
             ChatTurn("assistant", "", tool_calls=[ParsedToolCall("get_weather", {"city": "Paris"})]),
             ChatTurn("tool", "18 C, sunny", tool_name="get_weather")]
    messages = render_messages(turns, [WEATHER], ChatMLToolFormat())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n")
    listed = json.loads(system.split("<tools>")[-1].split("</tools>")[0])
    assert listed == [{"name": "get_weather", "description": "Get the current weather for a city",
                       "parameters": WEATHER.parameters}]
    assert messages[2]["content"] == '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'
    assert messages[3]["content"] == '<tool_response>{"name": "get_weather", "content": "18 C, sunny"}</tool_response>'


def test_llama3_rendering_of_builtin_and_custom_tools() -> None:
    tools = [ToolSpec.builtin_tool("web_search"), ToolSpec.builtin_tool("code_interpreter"), WEATHER]
    turns = [ChatTurn("user", "Weather in Paris?"),
             ChatTurn("assistant", "", tool_calls=[ParsedToolCall("web_search", {"query": "Paris weather"})]),
             ChatTurn("tool", "18 C", tool_name="web_search")]
    messages = render_messages(turns, tools, Llama3ToolFormat())
    system = messages[0]["content"]
    assert system.startswith("Environment: ipython\nTools: brave_search\n\nCutting Knowledge Date: December 2023\nToday Date: ")
    assert json.dumps(WEATHER.function_json()) in system
    assert messages[2] == {"role": "assistant", "content": '<|python_tag|>brave_search.call(query="Paris weather")'}
    assert messages[3] == {"role": "ipython", "content": "18 C"}


@pytest.mark.parametrize("tool_format", [ChatMLToolFormat(), Llama3ToolFormat()])
def test_rendered_calls_parse_back(tool_format) -> None:
    """What the server writes for an assistant's earlier calls is what it reads from a model."""
    calls = [ParsedToolCall("get_weather", {"city": "Paris"}), ParsedToolCall("web_search", {"query": "x"})]
    assert tool_format.parse(tool_format.assistant_text("", calls)) == ("", calls)


@pytest.fixture(scope="module")
def grammar_matcher():
    """A matcher for a grammar over the default model's vocabulary (llguidance itself)."""
    import llguidance

    from llama_engine.loader import default_model_path
    from llama_engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(default_model_path())
    vocabulary = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size)

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return (matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
                and matcher.is_accepting())
    return accepts


CLOCK = ToolSpec(name="get_time", parameters={
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]})
# What each family's forced call looks like (ChatML: the rendered <tool_call> list; Llama 3:
# one bare JSON call), as a function of the calls.
FORCED_CALL_TEXT = {
    ChatMLToolFormat: lambda calls: ChatMLToolFormat().assistant_text("", calls),
    Llama3ToolFormat: lambda calls: json.dumps({"name": calls[0].name, "parameters": calls[0].arguments}),
}


@pytest.mark.parametrize("tool_format", [ChatMLToolFormat(), Llama3ToolFormat()])
def test_forced_call_grammar_admits_exactly_valid_calls(tool_format, grammar_matcher) -> None:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_lark(
        tool_format.forced_call_grammar([WEATHER, CLOCK], parallel=False))
    text = FORCED_CALL_TEXT[type(tool_format)]
    good = [ParsedToolCall("get_weather", {"city": "Paris"})]
    assert grammar_matcher(grammar, text(good))
    assert tool_format.parse(text(good)) == ("", good)
    assert grammar_matcher(grammar, text([ParsedToolCall("get_time", {"zone": "CET"})]))
    assert not grammar_matcher(grammar, text([ParsedToolCall("get_stock", {"city": "Paris"})]))
    assert not grammar_matcher(grammar, text([ParsedToolCall("get_weather", {"town": "Paris"})]))
    assert not grammar_matcher(grammar, text([ParsedToolCall("get_time", {"zone": "PST"})]))
    assert not grammar_matcher(grammar, "The weather is fine.")


def test_parallel_calls_only_when_allowed(grammar_matcher) -> None:
    import llguidance

    two = ChatMLToolFormat().assistant_text("", [ParsedToolCall("get_weather", {"city": "Paris"}),
                                                 ParsedToolCall("get_time", {"zone": "UTC"})])
    for parallel in (True, False):
        grammar = llguidance.LLMatcher.grammar_from_lark(
            ChatMLToolFormat().forced_call_grammar([WEATHER, CLOCK], parallel))
        assert grammar_matcher(grammar, two) == parallel
