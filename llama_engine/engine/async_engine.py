"""The engine for servers: a background thread runs the step loop while asyncio code
submits requests and reads per-request token updates.

Requests and aborts travel to the engine thread through a queue, so only that thread
touches the scheduler; outputs travel back through each request's asyncio.Queue.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable, TypeVar

from llama_engine.config import ModelConfig
from llama_engine.engine.llm_engine import EngineConfig, LLMEngine, Request
from llama_engine.errors import NotFoundError, RequestValidationError
from llama_engine.loader.adapters import AdapterLoadError
from llama_engine.lora_request import LoRARequest
from llama_engine.outputs import RequestOutput
from llama_engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5  # how long the idle engine thread blocks waiting for work
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread failed while running this request."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str | None = None, **engine_kwargs) -> "AsyncLLMEngine":
        return cls(LLMEngine(EngineConfig(model=model, **engine_kwargs)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def is_reward_model(self) -> bool:
        return self.engine.is_reward_model

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def make_request(self, request_id: str, prompt: str | list[int],
                     sampling_params: SamplingParams, lora_name: str | None = None) -> Request:
        """Tokenize and validate without starting anything (``LLMEngine.make_request``):
        raises RequestValidationError naming the field, so a server can refuse a request
        before it answers, and NotFoundError naming an adapter (lora_name) not loaded."""
        lora_request = None
        if lora_name is not None:
            lora_request = self.engine.loras.get(lora_name)
            if lora_request is None:
                raise NotFoundError(f"model: no LoRA adapter named '{lora_name}' is loaded")
        return self.engine.make_request(request_id, prompt, sampling_params, lora_request)

    # ---- adapters -------------------------------------------------------------------

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Load an adapter (read and checked off the engine thread, then added between two
        steps). Raises AdapterLoadError naming the problem (a name already loaded too)."""
        if lora_name in self.engine.loras:
            raise AdapterLoadError(f"an adapter named '{lora_name}' is already loaded")
        # the id is taken on the engine thread, where ids are handed out one at a time
        probe = LoRARequest(lora_name, 1, lora_path)
        adapter = await asyncio.to_thread(self.engine.read_lora, probe)

        def add() -> LoRARequest:
            lora_request = self.engine.new_lora_request(lora_name, lora_path)
            self.engine.add_lora(lora_request, adapter)
            return lora_request
        return await self._on_engine_thread(add)

    async def remove_lora(self, lora_name: str) -> LoRARequest:
        """Unload an adapter; requests running with it finish first (``LLMEngine.remove_lora``).
        Raises NotFoundError naming it."""
        return await self._on_engine_thread(lambda: self.engine.remove_lora(lora_name))

    async def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """fn() run by the engine thread between two steps; its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", (fn, loop, future)))
        return await future

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output as it grows; the last has finished=True.
        Leaving the loop early aborts the request and frees its KV blocks."""
        async for output in self.run(self.make_request(request_id, prompt, sampling_params)):
            yield output

    async def run(self, request: Request) -> AsyncIterator[RequestOutput]:
        """``generate`` for a request ``make_request`` built."""
        request_id = request.request_id
        if request_id in self._streams:
            raise RequestValidationError("request_id", f"{request_id!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(("stop", None))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- engine thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._apply_commands(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail what was running, not the server
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = command
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self.engine.abort_request(arg)
            elif kind == "call":
                self._call(*arg)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, request: Request) -> None:
        if request.request_id not in self._streams:
            return  # the client left before the engine saw the request
        try:
            self.engine.add(request)
        except (ValueError, NotFoundError) as e:  # NotFoundError: its adapter was unloaded
            self._deliver(request.request_id, e)

    @staticmethod
    def _call(fn: Callable[[], object], loop: asyncio.AbstractEventLoop,
              future: asyncio.Future) -> None:
        def settle(result: object, error: BaseException | None) -> None:
            if not future.done():  # the caller may have been cancelled
                future.set_exception(error) if error is not None else future.set_result(result)
        try:
            result, error = fn(), None
        except Exception as e:  # the caller's to handle, not the engine thread's
            result, error = None, e
        loop.call_soon_threadsafe(settle, result, error)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, EngineDeadError(f"engine step failed: {error}"))

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
