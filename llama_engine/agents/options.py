"""Operator options for agents (the server's command line) and the two pieces built from
them on demand: the shield builder and the code-interpreter sandbox. Both modules
(``agents.shields``, ``agents.sandbox``) load only when an agent first needs them."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llama_engine.agents.tools import CodeRunner, ToolsConfig
from llama_engine.errors import RequestValidationError

SCRATCH_FOLDER = "agent_scratch"  # under the state directory: one folder per agent session
LOG = logging.getLogger(__name__)

# (shield_type, params, generate) -> a Shield; generate runs a raw prompt greedily on the
# agent's model (guard prompts with no --shield-model of their own use it)
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
            try:
                from llama_engine.agents.shields import build_shield
            except ImportError as exc:  # an install without the shields' dependencies
                raise RequestValidationError("shield_type", f"shields cannot run on this server: {exc}") from None
            return build_shield(shield_type, params, generate=generate, shield_models=self.shield_models)
        return build

    def code_interpreter_factory(self, state_dir: str | os.PathLike) -> Callable[[], Optional[CodeRunner]]:
        def make() -> Optional[CodeRunner]:
            try:
                from llama_engine.agents.sandbox import CodeInterpreter
            except ImportError as exc:  # an install without the sandbox: the tool says so
                LOG.warning("code_interpreter is unavailable: %s", exc)
                return None
            if self.allow_unsafe_code and not CodeInterpreter.sandbox_available():
                LOG.warning("code_interpreter runs model-written code WITHOUT a sandbox "
                            "(--allow-unsafe-code-interpreter): it can read, write and reach "
                            "everything this server can")
            return CodeInterpreter(Path(state_dir) / SCRATCH_FOLDER, allow_unsafe=self.allow_unsafe_code)
        return make
