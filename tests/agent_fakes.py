"""Stand-ins for the agents' collaborators in tests: a scripted model, shields and a code
interpreter with the interfaces of agents.shields and agents.sandbox (built on another
branch), so the turn loop is tested on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from llama_engine.agents.inference import InferenceDelta, InferenceRequest


@dataclass
class ScriptedOutput:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "finished_ok"


class ScriptedInference:
    """Answers each chat with the next scripted output (its text in pieces of CHUNK chars,
    then its calls) and records every request it got."""

    CHUNK = 4

    def __init__(self, outputs: list[ScriptedOutput]):
        self.outputs = list(outputs)
        self.requests: list[InferenceRequest] = []
        self.sent = 0  # deltas yielded so far

    async def chat(self, request: InferenceRequest) -> AsyncIterator[InferenceDelta]:
        self.requests.append(request)
        output = self.outputs.pop(0)
        for start in range(0, len(output.text), self.CHUNK):
            self.sent += 1
            yield InferenceDelta(text=output.text[start:start + self.CHUNK])
        yield InferenceDelta(tool_calls=output.tool_calls, stop_reason=output.stop_reason)


@dataclass
class Violation:
    violation_type: str
    details: str
    suggested_user_response: str = ""
    metadata: dict = field(default_factory=dict)


class KeywordShield:
    """Flags any message whose text (content, tool-call arguments or tool responses) holds
    ``keyword``; records what it was shown."""

    def __init__(self, keyword: str, violation_type: str = "error"):
        self.keyword = keyword
        self.violation_type = violation_type
        self.seen: list[list[dict[str, Any]]] = []

    def run(self, messages: list[dict[str, Any]]) -> Optional[Violation]:
        self.seen.append(messages)
        if self.keyword in repr(messages):
            return Violation(self.violation_type, f"found {self.keyword!r}",
                             f"Blocked: {self.keyword}.")
        return None


@dataclass
class CodeResult:
    stdout: str
    stderr: str = ""
    error: Optional[str] = None
    attachments: list[tuple[str, bytes]] = field(default_factory=list)
    timed_out: bool = False


class EchoCodeInterpreter:
    """Runs nothing: answers with the code it was given, per session; records closes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.closed: list[str] = []

    def run(self, session_id: str, code: str) -> CodeResult:
        self.calls.append((session_id, code))
        return CodeResult(stdout=f"ran: {code}\n", attachments=[("figure.png", b"\x89PNG")])

    def close_session(self, session_id: str) -> None:
        self.closed.append(session_id)

    def close(self) -> None:
        pass


def example_tool_turn(question: str, tool_name: str, arguments: dict[str, Any], result: str,
                      answer: str) -> dict[str, Any]:
    """A finished turn in which the model called ``tool_name`` and answered from its result:
    put in ``turn_history``, it shows a small model how calls and answers look."""
    return {"user_messages": [{"role": "user", "content": question}],
            "steps": [{"step_type": "model_inference", "uuid": "example-inference", "text": ""},
                      {"step_type": "tool_execution", "uuid": "example-tool",
                       "tool_calls": [{"tool_name": tool_name, "arguments": arguments}],
                       "tool_responses": [{"tool_name": tool_name, "content": result}]}],
            "response_message": {"role": "assistant", "content": answer}}
