"""`llama-engine serve`: load the models, build the app, serve until SIGTERM, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any, Optional

from aiohttp import web

from llama_engine.state import resolve_state_dir
from llama_engine.startup import gc_paused_while_loading
from server.api.registry import ModelRegistry, ServedModel
from server.http.app import DEFAULT_MAX_BODY_BYTES, build_app

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator says otherwise
DEFAULT_PORT = 8321
DEFAULT_MAX_WAITING = 256
DEFAULT_DRAIN_TIMEOUT_S = 60.0
API_KEY_ENV = "LLAMA_ENGINE_API_KEY"
REWARD_MODEL_ALIAS = "llama3_405b_reward"  # the spec's RewardModel name
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
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--state-dir", default=None,
                        help="where datasets, jobs, checkpoints, memory banks and agents persist "
                             "(SQLite; default: $LLAMA_ENGINE_STATE_DIR or ~/.local/share/llama-engine)")
    parser.add_argument("--log-level", default="INFO")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name in ("max_model_len", "max_num_seqs", "device", "dtype"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.kv_cache_gib is not None:
        kwargs["kv_cache_bytes"] = int(args.kv_cache_gib * GIB)
    return kwargs


def split_model_argument(value: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """`ID=PATH` -> (ID, PATH); a bare PATH (or None, the default model) keeps the engine's id."""
    if value is None:
        return None, None
    model_id, sep, path = value.partition("=")
    if sep and model_id and path and os.sep not in model_id:
        return model_id, path
    return None, value


def load_registry(args: argparse.Namespace) -> ModelRegistry:
    from llama_engine.engine.async_engine import AsyncLLMEngine
    from llama_engine.engine.llm_engine import EngineConfig
    from llama_engine.loader import default_model_path

    registry = ModelRegistry()
    max_running = args.max_running or args.max_num_seqs or EngineConfig.max_num_seqs
    for value in args.model or [None]:
        model_id, path = split_model_argument(value)
        engine = AsyncLLMEngine.from_model(path, **engine_kwargs(args))
        model_id = model_id or engine.model_id
        registry.add(ServedModel(model_id, engine, max_running=max_running, max_waiting=args.max_waiting,
                                 path=path or default_model_path()))
        LOG.info("loaded model %s from %s (context %d tokens)", model_id, path or "the default",
                 engine.max_model_len)
    if args.reward_head is not None and args.reward_model is None:
        raise SystemExit("--reward-head needs --reward-model (the model it goes on)")
    if args.reward_model is not None:
        model_id, path = split_model_argument(args.reward_model)
        engine = AsyncLLMEngine.from_model(path, score_head=args.reward_head,
                                           **engine_kwargs(args))
        if model_id is None:  # a head on a served model's file must not take that model's id
            head = os.path.basename(args.reward_head) if args.reward_head else None
            model_id = f"{engine.model_id}+{head}" if head else engine.model_id
        registry.add(ServedModel(model_id, engine, max_running=max_running,
                                 max_waiting=args.max_waiting, path=path))
        if REWARD_MODEL_ALIAS not in [alias.partition("=")[0] for alias in args.alias]:
            registry.add_alias(REWARD_MODEL_ALIAS, model_id)
        LOG.info("loaded reward model %s from %s", model_id, path)
    for mapping in args.alias:
        alias, sep, model_id = mapping.partition("=")
        if not sep or not alias or not model_id:
            raise SystemExit(f"--alias must look like NAME=MODEL_ID, got {mapping!r}")
        registry.add_alias(alias, model_id)
    return registry


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
    with gc_paused_while_loading():
        registry = load_registry(args)
        app = build_app(registry, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                        state_dir=resolve_state_dir(args.state_dir))
    try:
        await run_until_signalled(app, args.host, args.port, args.drain_timeout)
    finally:
        for model in registry.models():
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
