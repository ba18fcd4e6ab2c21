"""Operator options for agents (the server's command line) and the two pieces built from
them on demand: the shield builder and the code-interpreter sandbox."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llama_engine.agents.sandbox import CodeInterpreter
from llama_engine.agents.shields import build_shield
from llama_engine.agents.tools import CodeRunner, ToolsConfig

SCRATCH_FOLDER = "agent_scratch"  # under the state directory: one folder per agent session
LLAMA_GUARD = "llama_guard"  # the shield whose model the engine runs (--shield-model llama_guard=PATH)

# (shield_type, params, generate) -> a Shield; generate(text) runs ``text`` greedily as the one
# user message of the guard model's chat template (the --shield-model llama_guard=PATH model,
# else the agent's own model)
ShieldBuilder = Callable[[str, dict[str, Any], Optional[Callable[[str], str]]], Any]


@dataclass
class AgentOptions:
    """``shield_models`` maps a shield type to its checkpoint (--shield-model NAME=PATH);
    ``allow_unsafe_code`` lets the code interpreter run without a sandbox (logged)."""

    shield_models: dict[str, str] = field(default_factory=dict)
    allow_unsafe_code: bool = False
    tools: ToolsConfig = field(default_factory=ToolsConfig)

    def shield_builder(self) -> ShieldBuilder:
        def build(shield_type: str, params: dict[str, Any], generate: Optional[Callable[[str], str]]) -> Any:
            return build_shield(shield_type, params, generate=generate, shield_models=self.shield_models)
        return build

    def code_interpreter_factory(self, state_dir: str | os.PathLike) -> Callable[[], CodeRunner]:
        """Makes the sandbox on first use (its bwrap probe costs a process start): scratch folders under ``state_dir``, and the rest
        of ``state_dir`` (the server's databases) hidden from jailed code."""
        def make() -> CodeRunner:
            return CodeInterpreter(Path(state_dir) / SCRATCH_FOLDER, allow_unsafe=self.allow_unsafe_code,
                                   hidden_paths=[state_dir])
        return make
