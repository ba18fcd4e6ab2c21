"""The aiohttp application: one table of routes drives both the handlers and /openapi.json."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web
from pydantic import BaseModel, RootModel, ValidationError

from llama_engine.agents.options import AgentOptions
from llama_engine.agents.store import AgentStore
from llama_engine.agents.tools import BuiltinTools
from llama_engine.agents.turn import AgentRuntime
from llama_engine.datasets import DatasetRegistry
from llama_engine.training.jobs import JobManager
from server.api.datasets import DatasetsService
from server.api.post_training import PostTrainingService
from llama_engine.memory import MemoryStore
from llama_engine.state import resolve_state_dir
from server.api.agentic_system import AgenticSystemService, ServerChatInference
from server.api.errors import APIError, validation_error
from server.api.generation import GenerationRunner
from server.api.inference import InferenceService
from server.api.lora_adapters import LoRAAdaptersService
from server.api.memory_banks import MemoryBanksService
from server.api.openai_compat import OpenAIService
from server.api.registry import ModelRegistry, ServedModel
from server.api.reward_scoring import RewardScoringService
from server.api.synthetic_data import SyntheticDataService
from server.http.metrics import PROMETHEUS_CONTENT_TYPE, ServerMetrics
from server.http.openapi import build_openapi
from server.http.routing import JSON_CONTENT_TYPE, JSONL_CONTENT_TYPE, Route
from server.http.middleware import access_log_middleware, auth_middleware, error_middleware
from server.http.sse import OPENAI_DONE, send_event_stream
from server.schemas import agentic_system as ag
from server.schemas import llama_stack as ls
from server.schemas import post_training as pt
from server.schemas.common import HealthResponse
from server.schemas import memory_banks as mb
from server.schemas import openai as oa
from server.schemas import synthetic_data as sd

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a prompt filling a 128k context is ~0.5 MB of text
MAX_JSON_DEPTH_MESSAGE = "body: JSON is nested too deeply"

REGISTRY_KEY = web.AppKey("registry", ModelRegistry)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _lone_surrogate_path(value: Any, path: str) -> Optional[str]:
    """Where a string holds an unpaired surrogate (JSON allows the escape; UTF-8 and the
    tokenizer do not), as a body path; None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate_path(key, path) is not None:
            return path or "body"
        child = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        found = _lone_surrogate_path(item, child)
        if found is not None:
            return found
    return None


def _decode_json(raw: bytes, object_only: bool = True) -> Any:
    try:
        data = json.loads(raw or b"null", parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and non-UTF-8 bodies
        raise APIError(f"body: invalid JSON: {exc}", param="body") from None
    invalid_text_at = _lone_surrogate_path(data, "")
    if invalid_text_at is not None:
        field = invalid_text_at or "body"
        raise APIError(f"{field}: text contains an unpaired UTF-16 surrogate escape, which is not "
                       "valid Unicode", param=field)
    if object_only and not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "nothing"
        raise APIError(f"body: must be a JSON object, got {kind}", param="body")
    return data


async def parse_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.read()  # raises 413 past the body limit
    try:
        data = _decode_json(raw, object_only=not issubclass(model, RootModel))
        return model.model_validate(data)
    except ValidationError as exc:
        # a JSON-array body's errors are named after what it holds ("documents[0].uuid")
        raise validation_error(exc, data, root=getattr(model, "BODY_NAME", "")) from None
    except RecursionError:
        raise APIError(MAX_JSON_DEPTH_MESSAGE, param="body") from None


def parse_query(request: web.Request, model: type[BaseModel]) -> BaseModel:
    """The query string as ``model``. Its values are always text, so they convert to the
    field's type ("64" to 64) where a JSON body would be held to JSON's own types."""
    data = dict(request.query)
    try:
        return model.model_validate(data, strict=False)
    except ValidationError as exc:
        raise validation_error(exc, data) from None


def json_response(result: BaseModel) -> web.Response:
    return web.Response(text=result.model_dump_json(), content_type=JSON_CONTENT_TYPE)


def make_handler(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        args = [parse_query(request, route.query_model)] if route.query_model else []
        if route.request_model is not None:
            args.append(await parse_body(request, route.request_model))
        body = args[-1] if args else None
        if route.event_stream:
            return await send_event_stream(request, route.call(*args), route.done_marker)
        if route.stream_call is not None and getattr(body, "stream", False):
            return await send_event_stream(request, route.stream_call(body), route.done_marker)
        result = await route.call(*args)
        if route.empty_body:
            return web.Response()
        if result is None:
            return web.json_response(None)
        if route.jsonl:
            lines = "".join(item.model_dump_json() + "\n" for item in result)
            return web.Response(text=lines, content_type=JSONL_CONTENT_TYPE)
        return json_response(result)
    return handler


def inference_routes(spec: InferenceService, openai: OpenAIService) -> list[Route]:
    return [
        Route("/inference/completion", "Complete a prompt (spec Inference API).", "Inference",
              ls.CompletionRequest, ls.CompletionResponse, spec.completion,
              spec.completion_stream, ls.CompletionResponseStreamChunk),
        Route("/inference/chat_completion", "Answer a dialog, with tools (spec Inference API).",
              "Inference", ls.ChatCompletionRequest, ls.ChatCompletionResponse, spec.chat_completion,
              spec.chat_completion_stream, ls.ChatCompletionResponseStreamChunk),
        Route("/inference/batch_completion", "Complete a batch of prompts, scheduled together.",
              "Inference", ls.BatchCompletionRequest, ls.CompletionResponse, spec.batch_completion,
              jsonl=True),
        Route("/inference/batch_chat_completion", "Answer a batch of dialogs, scheduled together.",
              "Inference", ls.BatchChatCompletionRequest, ls.ChatCompletionResponse,
              spec.batch_chat_completion, jsonl=True),
        Route("/v1/completions", "OpenAI-compatible text completion.", "OpenAI",
              oa.OpenAICompletionRequest, oa.OpenAICompletionResponse, openai.completion,
              openai.completion_stream, oa.OpenAICompletionResponse, done_marker=OPENAI_DONE),
        Route("/v1/chat/completions", "OpenAI-compatible chat completion.", "OpenAI",
              oa.OpenAIChatCompletionRequest, oa.OpenAIChatCompletionResponse, openai.chat_completion,
              openai.chat_completion_stream, oa.ChatCompletionChunk, done_marker=OPENAI_DONE),
    ]


def lora_adapter_routes(adapters: LoRAAdaptersService) -> list[Route]:
    return [
        Route("/v1/load_lora_adapter", "Load a LoRA adapter (PEFT folder or GGUF file); requests "
              "then name it as their `model` (vLLM's route).", "OpenAI",
              oa.LoadLoRAAdapterRequest, oa.LoRAAdapterResponse, adapters.load),
        Route("/v1/unload_lora_adapter", "Unload a LoRA adapter; requests running with it "
              "finish first (vLLM's route).", "OpenAI", oa.UnloadLoRAAdapterRequest,
              oa.LoRAAdapterResponse, adapters.unload),
    ]


def memory_bank_routes(memory: MemoryBanksService) -> list[Route]:
    banks = "MemoryBanks"
    return [
        Route("/memory_banks/create", "Create a memory bank holding the documents (spec MemoryBanks API).",
              banks, mb.MemoryBankDocuments, mb.MemoryBankWriteResponse, memory.create,
              query_model=mb.CreateBankParams, errors=(409, 415)),
        Route("/memory_banks/get", "List the memory banks.", banks, None, mb.MemoryBank,
              memory.list_banks, jsonl=True, method="GET"),
        Route("/memory_banks/drop", "Drop a memory bank and its documents; answers its uuid.", banks,
              None, mb.DroppedBank, memory.drop, method="DELETE", query_model=mb.BankParams),
        Route("/memory_bank/insert", "Add documents to a bank (one transaction).", banks,
              mb.MemoryBankDocuments, mb.MemoryBankWriteResponse, memory.insert,
              query_model=mb.BankParams, errors=(409, 415)),
        Route("/memory_bank/update", "Replace documents of a bank (one transaction).", banks,
              mb.MemoryBankDocuments, mb.MemoryBankWriteResponse, memory.update,
              query_model=mb.BankParams, errors=(415,)),
        Route("/memory_bank/get", "The documents with these uuids.", banks, mb.DocumentUuids,
              mb.MemoryBankDocument, memory.get_documents, jsonl=True, query_model=mb.BankParams),
        Route("/memory_bank/delete", "Delete documents; answers the uuids that were deleted.", banks,
              mb.DocumentUuids, mb.DeletedDocument, memory.delete_documents, jsonl=True,
              query_model=mb.BankParams),
        Route("/memory_bank/query", "The chunks that best answer the query, best first; scores are "
              "cosine similarities.", banks, mb.MemoryBankQueryRequest, mb.MemoryBankQueryResponse,
              memory.query, query_model=mb.BankParams),
        Route("/v1/embeddings", "OpenAI-compatible embeddings (all-MiniLM-L6-v2).", "OpenAI",
              mb.EmbeddingRequest, mb.EmbeddingResponse, memory.embeddings),
    ]


def agentic_system_routes(agents: AgenticSystemService) -> list[Route]:
    tag = "AgenticSystem"
    return [
        Route("/agentic_system/create", "Create an agent (stored under the state directory).", tag,
              ag.AgenticSystemCreateRequest, ag.AgenticSystemCreateResponse, agents.create,
              errors=(409,)),
        Route("/agentic_system/execute", "Run one turn: shields, memory retrieval, inference and "
              "tools; stream: true sends its steps as server-sent events.", tag,
              ag.AgenticSystemExecuteRequest, ag.AgenticSystemExecuteResponse, agents.execute,
              agents.execute_stream, ag.AgenticSystemExecuteResponseStreamChunk),
        Route("/agentic_system/delete", "Delete an agent.", tag, None, None, agents.delete,
              method="DELETE", query_model=ag.AgentQuery),
    ]


async def health(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    return json_response(HealthResponse(status="ok", models=[m.model_id for m in registry.models()]))


async def metrics_page(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body.encode("utf-8"), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


def datasets_routes(datasets: DatasetsService) -> list[Route]:
    return [
        Route("/datasets/create", "Register a dataset: fetch its content once and check its "
              "columns against every row.", "Datasets", pt.CreateDatasetRequest, None,
              datasets.create, errors=(409,)),
        Route("/datasets/get", "A registered dataset.", "Datasets", None, pt.Dataset,
              datasets.get, method="GET", query_model=pt.DatasetQuery),
        Route("/datasets/delete", "Forget a dataset and its fetched copy.", "Datasets",
              None, None, datasets.delete, method="DELETE", query_model=pt.DatasetQuery),
    ]


def post_training_routes(service: PostTrainingService) -> list[Route]:
    return [
        Route("/post_training/supervised_fine_tune/", "Queue a supervised fine-tuning job.",
              "PostTraining", pt.PostTrainingSFTRequest, pt.PostTrainingJob,
              service.supervised_fine_tune, errors=(409,)),
        Route("/post_training/preference_optimize/", "Queue a DPO job.", "PostTraining",
              pt.PostTrainingRLHFRequest, pt.PostTrainingJob, service.preference_optimize,
              errors=(409,)),
        Route("/post_training/job/status", "A job's status, timestamps, resources and "
              "checkpoints.", "PostTraining", None, pt.PostTrainingJobStatusResponse,
              service.status, method="GET", query_model=pt.JobQuery),
        Route("/post_training/job/logs", "A job's log records as server-sent events, one per "
              "step, ending when the job ends.", "PostTraining", None, None, service.logs,
              stream_model=pt.PostTrainingJobLogStream, method="GET", event_stream=True,
              query_model=pt.JobQuery),
        Route("/post_training/job/artifacts", "A job's checkpoints.", "PostTraining", None,
              pt.PostTrainingJobArtifactsResponse, service.artifacts, method="GET",
              query_model=pt.JobQuery),
        Route("/post_training/job/cancel", "Stop a job: it ends failed, the reason in its logs.",
              "PostTraining", None, None, service.cancel, query_model=pt.JobQuery,
              empty_body=True),
    ]


def synthetic_data_routes(scoring: RewardScoringService,
                          generation: SyntheticDataService) -> list[Route]:
    return [
        Route("/reward_scoring/score", "Score each dialog's k generations with a reward model "
              "(prefill-only requests; the scores are the score head at each reply's last "
              "token), in request order.", "RewardScoring", sd.RewardScoringRequest,
              sd.RewardScoringResponse, scoring.score),
        Route("/synthetic_data_generation/generate", "Sample k generations per prompt, score "
              "them with a reward model, filter them; optionally save the kept data as a "
              "dataset.", "SyntheticDataGeneration", sd.SyntheticDataGenerationRequest,
              sd.SyntheticDataGenerationResponse, generation.generate, errors=(409,)),
    ]


def build_app(registry: ModelRegistry, api_key: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              state_dir: Optional[Path] = None,
              agent_options: Optional[AgentOptions] = None,
              guard_model: Optional[ServedModel] = None,
              fsdp_nproc_per_node: int = 1) -> web.Application:
    """The application. Its persistent APIs (memory banks, datasets, post-training jobs,
    agents) keep their state in ``state_dir`` (default: llama_engine.state's default
    directory); ``agent_options`` configures shields and built-in tools; ``guard_model`` is
    the llama_guard shield's model (None: each agent's own); ``fsdp_nproc_per_node`` the ranks
    of a post-training job with memory_efficient_fsdp_wrap."""
    metrics = ServerMetrics(registry)
    runner = GenerationRunner(listener=metrics)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[
        access_log_middleware(metrics), error_middleware, auth_middleware(api_key)])
    app[REGISTRY_KEY] = registry
    app[METRICS_KEY] = metrics
    openai = OpenAIService(registry, runner)
    state_dir = resolve_state_dir(state_dir)
    memory = MemoryBanksService(MemoryStore(state_dir))
    registry.reserve(memory.model_card().id)  # /v1/models lists it: no adapter may take it
    datasets = DatasetRegistry(state_dir)
    jobs = JobManager(state_dir)
    inference = InferenceService(registry, runner)
    scoring = RewardScoringService(registry, runner)
    agent_options = agent_options or AgentOptions()
    tools = BuiltinTools(agent_options.tools, agent_options.code_interpreter_factory(state_dir))
    chat = ServerChatInference(inference)
    agents = AgenticSystemService(AgentStore(state_dir), AgentRuntime(chat, tools, memory.store, metrics),
                                  chat, agent_options.shield_builder(), guard_model)
    routes = (inference_routes(inference, openai)
              + lora_adapter_routes(LoRAAdaptersService(registry))
              + memory_bank_routes(memory) + datasets_routes(DatasetsService(datasets))
              + post_training_routes(PostTrainingService(jobs, datasets, registry.training_base,
                                                         fsdp_nproc_per_node))
              + agentic_system_routes(agents)
              + synthetic_data_routes(scoring, SyntheticDataService(registry, runner, scoring,
                                                                    datasets)))

    async def start_jobs(app: web.Application) -> None:
        jobs.start()

    async def close_state(app: web.Application) -> None:
        await asyncio.to_thread(jobs.stop)
        datasets.close()
        await asyncio.to_thread(tools.close)
        agents.store.close()
        await asyncio.to_thread(memory.store.close)

    app.on_startup.append(start_jobs)
    app.on_cleanup.append(close_state)
    for route in routes:
        app.router.add_route(route.method, route.path, make_handler(route))
    model_names = sorted({name for m in [*registry.models(), *registry.adapters()]
                          for name in [m.model_id, *m.aliases]})
    document = build_openapi(routes, model_names, requires_auth=api_key is not None)

    async def list_models(request: web.Request) -> web.Response:
        models = openai.list_models()
        models.data.append(memory.model_card())
        return json_response(models)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/openapi.json", openapi_json)
    return app
