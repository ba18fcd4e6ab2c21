"""Agents: the spec's AgenticSystem turn loop (shields, memory retrieval, inference, tool
calls) with built-in tools (a sandboxed code interpreter among them, `sandbox.py`) and
shields (`shields.py`), persistent under the state directory. The model is reached
through ``inference.ChatInference`` (the server implements it); see ``turn.py``."""
from llama_engine.agents.config import AgentConfig
from llama_engine.agents.inference import ChatInference, InferenceDelta, InferenceRequest
from llama_engine.agents.options import AgentOptions
from llama_engine.agents.steps import StepChunk, assemble_turn
from llama_engine.agents.store import AgentExistsError, AgentNotFoundError, AgentStore
from llama_engine.agents.tools import BuiltinTools, ToolsConfig
from llama_engine.agents.turn import AgentRuntime, AgentShields, Turn

__all__ = [
    "AgentConfig", "AgentExistsError", "AgentNotFoundError", "AgentOptions", "AgentRuntime",
    "AgentShields", "AgentStore", "BuiltinTools", "ChatInference", "InferenceDelta",
    "InferenceRequest", "StepChunk", "ToolsConfig", "Turn", "assemble_turn",
]
