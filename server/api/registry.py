"""The models this server has loaded, the names they answer to, and their admission limits."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional, Protocol, Union

from server.api.errors import APIError, ModelNotFoundError, NotFoundError, ServerBusyError
from server.api.tool_calls import ToolCallFormat, tool_format_for

if TYPE_CHECKING:  # types only: the server reaches the engine through EngineClient
    from llama_engine.config import ModelConfig
    from llama_engine.engine.llm_engine import Request
    from llama_engine.outputs import RequestOutput
    from llama_engine.sampling_params import SamplingParams
    from llama_engine.tokenizer import Tokenizer

# How long a client told "busy" should wait before retrying; a CPU batch turns over in seconds.
BUSY_RETRY_AFTER_S = 1


class EngineClient(Protocol):
    """What the server needs of an engine; llama_engine's AsyncLLMEngine is one."""

    @property
    def tokenizer(self) -> "Tokenizer": ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def model_config(self) -> "ModelConfig":
        """The architecture (layer sizes) of the model it serves."""

    @property
    def is_reward_model(self) -> bool:
        """A reward model scores prompts (max_tokens=0 requests) and generates nothing."""

    def make_request(self, request_id: str, prompt: list[int], sampling_params: "SamplingParams",
                     lora_name: Optional[str] = None) -> "Request":
        """Validate without starting; raises RequestValidationError naming the field, and
        llama_engine's NotFoundError naming an adapter (lora_name) that is not loaded."""

    async def add_lora(self, lora_name: str, lora_path: str) -> Any:
        """Load a LoRA adapter; raises AdapterLoadError (a ValueError) naming the problem."""

    async def remove_lora(self, lora_name: str) -> Any:
        """Unload an adapter once its running requests finish; NotFoundError if unknown."""

    def run(self, request: "Request") -> AsyncIterator["RequestOutput"]:
        """The request's cumulative outputs; leaving early aborts it."""

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    async def shutdown(self) -> None: ...


@dataclass
class ServedModel:
    """One loaded model: its async engine and the server-side bookkeeping around it."""

    model_id: str
    engine: EngineClient
    max_running: int
    max_waiting: int
    aliases: list[str] = field(default_factory=list)
    path: Optional[str] = None  # the GGUF file or HF folder it came from: post-training starts there
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # sequences admitted and not yet finished (running or waiting)

    lora_name = None  # requests run on the base model

    @property
    def tokenizer(self) -> "Tokenizer":
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_reward_model(self) -> bool:
        return self.engine.is_reward_model

    @property
    def tool_format(self) -> ToolCallFormat:
        return tool_format_for(self.tokenizer.chat_template or "")

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    @contextlib.contextmanager
    def admit(self, sequences: int, field: str = "n") -> Iterator[None]:
        """Hold `sequences` slots while a request runs. Past the running batch plus the
        waiting queue, refuse at once (503) rather than queue without bound; requests
        already admitted are unaffected. A request larger than the whole capacity is a 400
        naming `field` (what sets its number of sequences)."""
        if sequences > self.capacity:
            raise APIError(f"{field}: request asks for {sequences} sequences but this server admits "
                           f"at most {self.capacity} at once for model {self.model_id!r}",
                           param=field, status=400)
        if self.in_flight + sequences > self.capacity:
            raise ServerBusyError(
                f"model {self.model_id!r} is at capacity ({self.in_flight} sequences running "
                f"or waiting, limit {self.capacity}); retry later", BUSY_RETRY_AFTER_S)
        self.in_flight += sequences
        try:
            yield
        finally:
            self.in_flight -= sequences


@dataclass
class ServedAdapter:
    """A LoRA adapter loaded on a served model: a request naming it runs on the base model's
    engine with the adapter, and shares the base model's admission limits."""

    lora_name: str
    lora_path: str
    base: ServedModel
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        return self.lora_name

    @property
    def engine(self) -> EngineClient:
        return self.base.engine

    @property
    def aliases(self) -> list[str]:
        return []

    @property
    def path(self) -> Optional[str]:
        return self.base.path

    @property
    def tokenizer(self) -> "Tokenizer":
        return self.base.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.base.max_model_len

    @property
    def tool_format(self) -> ToolCallFormat:
        return self.base.tool_format

    def admit(self, sequences: int) -> contextlib.AbstractContextManager:
        return self.base.admit(sequences)


Served = Union[ServedModel, ServedAdapter]


class ModelRegistry:
    """Resolves a request's `model` (an id, an operator-defined alias or a LoRA adapter's
    name) to a loaded model or adapter."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}
        self._adapters: dict[str, ServedAdapter] = {}
        self._reserved: set[str] = set()

    def _taken(self, name: str) -> bool:
        return (name in self._models or name in self._aliases or name in self._adapters
                or name in self._reserved)

    def reserve(self, name: str) -> None:
        """Keep ``name`` from models, aliases and adapters: a model the server lists that is
        not an engine (the embedding model of ``/v1/embeddings``)."""
        self._reserved.add(name)

    def add(self, model: ServedModel) -> None:
        if self._taken(model.model_id):
            raise ValueError(f"model id {model.model_id!r} is already taken")
        self._models[model.model_id] = model

    def add_alias(self, alias: str, model_id: str) -> None:
        if model_id not in self._models:
            raise ValueError(f"alias {alias!r} points at unknown model id {model_id!r}; "
                             f"loaded: {sorted(self._models)}")
        if self._taken(alias):
            raise ValueError(f"alias {alias!r} is already taken")
        self._aliases[alias] = model_id
        self._models[model_id].aliases.append(alias)

    async def load_adapter(self, lora_name: str, lora_path: str,
                           base: Optional[ServedModel] = None) -> ServedAdapter:
        """Load a LoRA adapter onto `base` (default: the first model) under `lora_name`.
        Raises APIError naming a name already taken or what is wrong with the adapter."""
        base = base or self.default
        if self._taken(lora_name):
            raise APIError(f"lora_name: {lora_name!r} is already taken by a loaded model, alias "
                           "or adapter", param="lora_name")
        try:
            await base.engine.add_lora(lora_name, lora_path)
        except ValueError as exc:  # AdapterLoadError, or LoRA not enabled on the engine
            raise APIError(f"lora_path: {exc}", param="lora_path") from None
        adapter = ServedAdapter(lora_name, lora_path, base)
        try:
            self.add_adapter(adapter)
        except ValueError as exc:  # loaded twice at once: the engine refused the second
            raise APIError(f"lora_name: {exc}", param="lora_name") from None
        return adapter

    def add_adapter(self, adapter: ServedAdapter) -> None:
        """Register an adapter its base model's engine has loaded."""
        if self._taken(adapter.lora_name):
            raise ValueError(f"{adapter.lora_name!r} is already taken")
        self._adapters[adapter.lora_name] = adapter

    async def unload_adapter(self, lora_name: str) -> ServedAdapter:
        """Forget an adapter: new requests naming it get a 404 at once, requests running
        with it finish. Raises NotFoundError naming an unknown adapter."""
        adapter = self._adapters.pop(lora_name, None)
        if adapter is None:
            raise NotFoundError(f"lora_name: no LoRA adapter named {lora_name!r} is loaded; "
                                f"loaded: {', '.join(sorted(self._adapters)) or 'none'}",
                                param="lora_name")
        await adapter.engine.remove_lora(lora_name)
        return adapter

    def adapters(self) -> list[ServedAdapter]:
        return list(self._adapters.values())

    def resolve(self, name: str) -> Served:
        if name in self._adapters:
            return self._adapters[name]
        model_id = self._aliases.get(name, name)
        if model_id not in self._models:
            known = sorted([*self._models, *self._aliases, *self._adapters])
            raise ModelNotFoundError(f"model: unknown model {name!r}; available: {', '.join(known)}",
                                     param="model")
        return self._models[model_id]

    def training_base(self, name: str) -> tuple[str, "ModelConfig"]:
        """Where the generative model ``name`` (an id or alias) was loaded from, and its
        architecture: the base post-training fine-tunes. Raises ModelNotFoundError, or
        APIError naming ``model`` for a reward model or one not loaded from a path."""
        model = self.resolve_generator(name, "model")
        if model.path is None:
            raise APIError(f"model: {name!r} was not loaded from a file this server can train",
                           param="model")
        return model.path, model.engine.model_config

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def resolve_generator(self, name: Optional[str], field: str) -> ServedModel:
        """The generative model ``name`` (None: the first one served). Raises
        ModelNotFoundError, or APIError naming ``field`` for a reward model."""
        if name is None:
            found = [m for m in self._models.values() if not m.is_reward_model]
            if not found:
                raise APIError(f"{field}: this server serves no generative model", param=field)
            return found[0]
        model = self._resolve_as(name, field)
        if model.is_reward_model:
            raise APIError(f"{field}: {name!r} is a reward model; it scores, it does not "
                           "generate", param=field)
        return model

    def resolve_reward_model(self, name: Optional[str], field: str) -> ServedModel:
        """The reward model ``name`` (None: the one served, when there is exactly one).
        Raises ModelNotFoundError naming ``field``, or APIError for a generative model."""
        rewards = [m for m in self._models.values() if m.is_reward_model]
        if name is None:
            if len(rewards) != 1:
                raise APIError(f"{field}: name the reward model; this server serves "
                               f"{len(rewards)} (start it with --reward-model PATH)", param=field)
            return rewards[0]
        model = self._resolve_as(name, field)
        if not model.is_reward_model:
            served = ", ".join(m.model_id for m in rewards) or "none (start with --reward-model)"
            raise APIError(f"{field}: {name!r} is not a reward model; reward models: {served}",
                           param=field)
        return model

    def _resolve_as(self, name: str, field: str) -> ServedModel:
        try:
            served = self.resolve(name)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"{field}: {e.message.partition(': ')[2]}", param=field) from None
        if isinstance(served, ServedAdapter):
            raise APIError(f"{field}: {name!r} is a LoRA adapter on {served.base.model_id!r}; "
                           "this route takes a served model", param=field)
        return served

    @property
    def default(self) -> ServedModel:
        return next(iter(self._models.values()))
