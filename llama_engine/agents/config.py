"""An agent's configuration: the spec's AgenticSystemCreateRequest, plus the options Llama
Stack added later (sampling, tool_choice, max_infer_iters), checked once at create time.

Tools, shields and messages are kept as the spec's JSON objects (plain dicts), the form they
are stored in and the form shields read."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llama_engine.errors import RequestValidationError

BUILTIN_TOOLS = ("web_search", "math", "image_gen", "code_interpreter")
TOOL_CHOICES = ("auto", "required", "none")
DEFAULT_MAX_INFER_ITERS = 10
MAX_MAX_INFER_ITERS = 100
# Retrieved passages injected per turn, in the embedding model's word pieces (a chunk is at
# most 256 of them): four full chunks.
DEFAULT_MEMORY_TOKEN_BUDGET = 1024


@dataclass
class AgentConfig:
    """What an agent is. ``available_tools`` holds ToolDefinition objects ({tool_name,
    description?, parameters?, input_shields, output_shields}); shields are ShieldConfig
    objects ({shield_type, params}); ``sampling_params`` is the spec's SamplingParams object;
    ``max_tokens`` 0 generates up to a stop or the context limit."""

    uuid: str
    instructions: str
    model: str
    available_tools: list[dict[str, Any]] = field(default_factory=list)
    executable_tools: list[str] = field(default_factory=list)
    memory_bank_uuids: list[str] = field(default_factory=list)
    input_shields: list[dict[str, Any]] = field(default_factory=list)
    output_shields: list[dict[str, Any]] = field(default_factory=list)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    tool_choice: str = "auto"
    max_infer_iters: int = DEFAULT_MAX_INFER_ITERS
    max_tokens: int = 0
    memory_token_budget: int = DEFAULT_MEMORY_TOKEN_BUDGET

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AgentConfig":
        return cls(**data)

    @property
    def tool_names(self) -> list[str]:
        return [tool["tool_name"] for tool in self.available_tools]

    def tool(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self.available_tools if t["tool_name"] == name), None)

    def validate(self) -> None:
        """Raise RequestValidationError naming the first field that cannot work: a tool
        offered twice, an executable tool that is not offered or that the server cannot run
        (a custom tool), a tool_choice or max_infer_iters out of range."""
        names = self.tool_names
        for index, name in enumerate(names):
            if name in names[:index]:
                raise RequestValidationError(f"available_tools[{index}].tool_name",
                                             f"{name!r} is listed twice")
        for index, name in enumerate(self.executable_tools):
            if name not in names:
                raise RequestValidationError(
                    f"executable_tools[{index}]",
                    f"{name!r} is not in available_tools (offered: {', '.join(names) or 'none'})")
            if name not in BUILTIN_TOOLS:
                raise RequestValidationError(
                    f"executable_tools[{index}]",
                    f"{name!r} is a custom tool: the server runs only the built-in tools "
                    f"({', '.join(BUILTIN_TOOLS)}); the client runs custom tools itself")
        if self.tool_choice not in TOOL_CHOICES:
            raise RequestValidationError("tool_choice", f"must be one of {', '.join(TOOL_CHOICES)}, "
                                                        f"got {self.tool_choice!r}")
        if self.tool_choice == "required" and not names:
            raise RequestValidationError("tool_choice", "'required' needs at least one tool in "
                                                        "available_tools")
        if not 1 <= self.max_infer_iters <= MAX_MAX_INFER_ITERS:
            raise RequestValidationError("max_infer_iters", f"must be between 1 and "
                                                            f"{MAX_MAX_INFER_ITERS}, got {self.max_infer_iters}")
