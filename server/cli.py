"""`llama-engine serve`: load the models, build the app, serve until SIGTERM, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any, Optional, Sequence

from aiohttp import web

from llama_engine.agents.image_gen import ImageGenConfig
from llama_engine.agents.options import LLAMA_GUARD, AgentOptions
from llama_engine.agents.tools import ToolsConfig
from llama_engine.agents.web_search import KEY_ENV, PROVIDERS, web_search_config
from llama_engine.state import resolve_state_dir
from llama_engine.training.distributed import (DEFAULT_CPU_RANKS, default_nproc_per_node,
                                               nproc_per_node_arg)
from llama_engine.startup import gc_paused_while_loading
from server.api.registry import ModelRegistry, ServedAdapter, ServedModel
from server.http.app import DEFAULT_MAX_BODY_BYTES, build_app

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator says otherwise
DEFAULT_PORT = 8321
DEFAULT_MAX_WAITING = 256
DEFAULT_DRAIN_TIMEOUT_S = 60.0
API_KEY_ENV = "LLAMA_ENGINE_API_KEY"
REWARD_MODEL_ALIAS = "llama3_405b_reward"  # the spec's RewardModel name
REWARD_DTYPES = ("auto", "float32", "bfloat16")
GIB = 1 << 30
LOG = logging.getLogger("server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="[ID=]PATH", default=None,
                        help="GGUF file or HF folder to serve (repeatable), optionally with its id "
                             "(default id: the file or folder name); default model: SmolLM2-135M")
    parser.add_argument("--reward-model", metavar="[ID=]PATH", default=None,
                        help="a reward model to serve beside the models: an HF "
                             "LlamaForSequenceClassification folder, or a GGUF file or causal-LM "
                             "folder with --reward-head; it also answers to "
                             f"{REWARD_MODEL_ALIAS}")
    parser.add_argument("--reward-head", metavar="FILE", default=None,
                        help="safetensors file holding score.weight [1, hidden_size], the reward "
                             "head put on --reward-model")
    parser.add_argument("--reward-dtype", choices=REWARD_DTYPES, default="auto",
                        help="the reward model's dtype (auto: bfloat16 matmuls on a CPU with "
                             "AMX / AVX512-BF16, where its prefill-only scoring runs several "
                             "times faster than in float32; otherwise --dtype's)")
    parser.add_argument("--alias", action="append", metavar="NAME=ID", default=[],
                        help="extra name for a model id, e.g. llama3_8b_chat=SmolLM2-135M-Instruct.Q4_1")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                        help="sequences that may wait beyond the running batch before 503")
    parser.add_argument("--max-running", type=int, default=None,
                        help="sequences counted as running (default: the engine's max_num_seqs)")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="seconds SIGTERM waits for in-flight requests")
    parser.add_argument("--lora", action="append", metavar="NAME=PATH", default=[],
                        help="serve a LoRA adapter (PEFT folder or GGUF file) on the first model "
                             "under NAME (repeatable; turns on --enable-lora)")
    parser.add_argument("--enable-lora", action="store_true",
                        help="accept LoRA adapters (also loaded at run time: /v1/load_lora_adapter)")
    parser.add_argument("--max-loras", type=int, default=None,
                        help="adapters one engine step may run (resident at once; default 1)")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="the largest adapter rank accepted (default 16)")
    parser.add_argument("--lora-dtype", default=None, choices=["float32", "bfloat16"],
                        help="of resident adapter weights (bfloat16: half the memory traffic)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--state-dir", default=None,
                        help="where datasets, jobs, checkpoints, memory banks and agents persist "
                             "(SQLite; default: $LLAMA_ENGINE_STATE_DIR or ~/.local/share/llama-engine)")
    parser.add_argument("--fsdp-nproc-per-node", type=nproc_per_node_arg, default=None, metavar="N",
                        help="processes (ranks) torch's launcher starts for a post-training job "
                             "with memory_efficient_fsdp_wrap (default: the number of GPUs, or "
                             f"{DEFAULT_CPU_RANKS} on the CPU)")
    parser.add_argument("--log-level", default="INFO")
    agents = parser.add_argument_group("agents (the AgenticSystem API)")
    agents.add_argument("--shield-model", action="append", metavar="NAME=PATH", default=[],
                        help="checkpoint of a shield: llama_guard=PATH (a Llama GGUF or HF folder; "
                             "default: the agent's own model), prompt_guard=PATH (a Prompt-Guard-86M "
                             "style classifier)")
    agents.add_argument("--allow-unsafe-code-interpreter", action="store_true",
                        help="let code_interpreter run model-written code with no sandbox when "
                             "bubblewrap is missing (logged as a warning); never on a shared host")
    agents.add_argument("--web-search-provider", choices=PROVIDERS, default=None,
                        help="default: the first provider whose key is in the environment "
                             f"({', '.join(KEY_ENV.values())})")
    agents.add_argument("--web-search-api-key", default=None,
                        help="the provider's key (default: its environment variable)")
    agents.add_argument("--web-search-url", default=None,
                        help="the provider's endpoint, when not its public one")
    agents.add_argument("--image-gen-url", default=None,
                        help="base URL of an OpenAI-compatible images API (POST {URL}/images/generations)")
    agents.add_argument("--image-gen-api-key", default=None)
    agents.add_argument("--image-gen-model", default=None)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name in ("max_model_len", "max_num_seqs", "device", "dtype", "max_loras",
                 "max_lora_rank", "lora_dtype"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.kv_cache_gib is not None:
        kwargs["kv_cache_bytes"] = int(args.kv_cache_gib * GIB)
    if args.enable_lora or args.lora:
        kwargs["enable_lora"] = True
    return kwargs


def reward_dtype(args: argparse.Namespace) -> Optional[str]:
    """The reward model's engine dtype: ``--reward-dtype``; auto means bfloat16 when it runs
    on a CPU that multiplies bfloat16 natively (``kernels.bf16_matmul_is_fast``) and --dtype
    is unset or auto, else --dtype's choice (None: the engine's default). Why bfloat16 there:
    a reward model only prefills, where bfloat16 matmuls run ~5x float32's, and SDG reads a
    score to rank and filter a prompt's k samples, for which bfloat16's rounding (up to about
    0.2 on a trained head's scores near 5; ranks alike but for near ties:
    tests/test_reward_model.py) is small beside what separates samples. ``--reward-dtype float32`` gives transformers'
    float32 scores within 1e-4."""
    if args.reward_dtype != "auto":
        return args.reward_dtype
    import torch
    from llama_engine.kernels import bf16_matmul_is_fast
    device = args.device or "auto"
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and args.dtype in (None, "auto") and bf16_matmul_is_fast():
        return "bfloat16"
    return args.dtype


def split_lora_argument(value: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH); SystemExit otherwise."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--lora must look like NAME=PATH, got {value!r}")
    return name, path


def load_adapters(engine: Any, values: list[str]) -> list[tuple[str, str]]:
    """Load the --lora adapters into an LLMEngine; SystemExit naming a bad one."""
    from llama_engine.loader.adapters import AdapterLoadError
    loaded = []
    for value in values:
        name, path = split_lora_argument(value)
        try:
            engine.add_lora(engine.new_lora_request(name, path))
        except AdapterLoadError as exc:
            raise SystemExit(f"--lora {value}: {exc}") from None
        loaded.append((name, path))
    return loaded


def split_model_argument(value: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """`ID=PATH` -> (ID, PATH); a bare PATH (or None, the default model) keeps the engine's id."""
    if value is None:
        return None, None
    model_id, sep, path = value.partition("=")
    if sep and model_id and path and os.sep not in model_id:
        return model_id, path
    return None, value


def load_model(args: argparse.Namespace, model_id: Optional[str], path: Optional[str],
               score_head: Optional[str] = None, loras: Sequence[str] = (),
               dtype: Optional[str] = None) -> tuple[ServedModel, list[tuple[str, str]]]:
    """One engine on ``path`` (None: the default model) with the command line's engine
    settings (``dtype``, when given, instead of --dtype), and the (name, path) of the
    ``--lora NAME=PATH`` adapters loaded into it; ``score_head`` (a head file) makes it a
    reward model."""
    from llama_engine.engine.async_engine import AsyncLLMEngine
    from llama_engine.engine.llm_engine import EngineConfig, LLMEngine
    from llama_engine.loader import default_model_path

    max_running = args.max_running or args.max_num_seqs or EngineConfig.max_num_seqs
    kwargs = engine_kwargs(args)
    if dtype is not None:
        kwargs["dtype"] = dtype
        if dtype == "bfloat16":
            # --lora / --enable-lora are for the served models; adapters run over float32 or
            # packed weights, so a bfloat16 reward model (the default on such CPUs) has none
            kwargs.pop("enable_lora", None)
    core = LLMEngine(EngineConfig(model=path, score_head=score_head, **kwargs))
    adapters = load_adapters(core, loras)
    engine = AsyncLLMEngine(core)
    if model_id is None:  # a head on a served model's file must not take that model's id
        model_id = (f"{engine.model_id}+{os.path.basename(score_head)}" if score_head
                    else engine.model_id)
    LOG.info("loaded model %s from %s (context %d tokens)", model_id, path or "the default",
             engine.max_model_len)
    return ServedModel(model_id, engine, max_running=max_running, max_waiting=args.max_waiting,
                       path=path or default_model_path()), adapters


def load_registry(args: argparse.Namespace) -> ModelRegistry:
    registry = ModelRegistry()
    for index, value in enumerate(args.model or [None]):
        # --lora adapters go on the first model, the one requests name by default
        served, adapters = load_model(args, *split_model_argument(value),
                                      loras=args.lora if index == 0 else ())
        registry.add(served)
        for name, lora_path in adapters:
            try:
                registry.add_adapter(ServedAdapter(name, lora_path, served))
            except ValueError as exc:
                raise SystemExit(f"--lora {name}={lora_path}: {exc}") from None
            LOG.info("loaded LoRA adapter %s from %s on %s", name, lora_path, served.model_id)
    if args.reward_head is not None and args.reward_model is None:
        raise SystemExit("--reward-head needs --reward-model (the model it goes on)")
    if args.reward_model is not None:
        model_id, path = split_model_argument(args.reward_model)
        reward, _ = load_model(args, model_id, path, score_head=args.reward_head,
                               dtype=reward_dtype(args))
        registry.add(reward)
        if REWARD_MODEL_ALIAS not in [alias.partition("=")[0] for alias in args.alias]:
            registry.add_alias(REWARD_MODEL_ALIAS, reward.model_id)
    for mapping in args.alias:
        alias, sep, model_id = mapping.partition("=")
        if not sep or not alias or not model_id:
            raise SystemExit(f"--alias must look like NAME=MODEL_ID, got {mapping!r}")
        registry.add_alias(alias, model_id)
    return registry


def agent_options(args: argparse.Namespace) -> AgentOptions:
    """The agents' shields and built-in tools from the command line (and the environment)."""
    shield_models = {}
    for mapping in args.shield_model:
        name, sep, path = mapping.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--shield-model must look like NAME=PATH, got {mapping!r}")
        shield_models[name] = path
    if args.web_search_api_key and not args.web_search_provider:
        raise SystemExit("--web-search-api-key needs --web-search-provider")
    search = web_search_config(args.web_search_provider, args.web_search_api_key, args.web_search_url)
    image = (ImageGenConfig(args.image_gen_url, args.image_gen_api_key, args.image_gen_model)
             if args.image_gen_url else None)
    if args.allow_unsafe_code_interpreter:
        LOG.warning("--allow-unsafe-code-interpreter: where bubblewrap cannot run, model-written "
                    "code runs unsandboxed, with this server's access to files and network")
    return AgentOptions(shield_models, args.allow_unsafe_code_interpreter, ToolsConfig(search, image))


async def run_until_signalled(app: web.Application, host: str, port: int,
                              drain_timeout_s: float) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, let in-flight requests finish
    (up to the drain timeout), and only then return."""
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # engine request and frees its KV blocks.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=drain_timeout_s,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=drain_timeout_s)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    LOG.info("serving on http://%s:%d", host, port)
    print(f"llama-engine server listening on http://{host}:{port}", flush=True)
    await stop.wait()
    LOG.info("draining in-flight requests (up to %.0f s)", drain_timeout_s)
    await runner.cleanup()


async def _serve(args: argparse.Namespace) -> None:
    options = agent_options(args)  # before the models load: a bad flag fails at once
    with gc_paused_while_loading():
        registry = load_registry(args)
        # the llama_guard shield's own model: run by the engine, not served under /v1/models
        guard_path = options.shield_models.get(LLAMA_GUARD)
        guard = load_model(args, LLAMA_GUARD, guard_path)[0] if guard_path else None
        app = build_app(registry, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                        state_dir=resolve_state_dir(args.state_dir), agent_options=options,
                        guard_model=guard,
                        fsdp_nproc_per_node=args.fsdp_nproc_per_node or default_nproc_per_node())
    try:
        await run_until_signalled(app, args.host, args.port, args.drain_timeout)
    finally:
        for model in [*registry.models(), *([guard] if guard else [])]:
            await model.engine.shutdown()
    LOG.info("stopped")


def serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


def main(argv: list[str] | None = None) -> None:
    """`python -m server.cli`: the same as `llama-engine serve`."""
    from llama_engine.openmp import configure_openmp
    configure_openmp()  # first: libgomp reads it once, when torch loads it
    parser = argparse.ArgumentParser(prog="llama-engine serve", description=__doc__)
    add_serve_arguments(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
