"""The ``llama-engine`` command: generate, chat, serve, bench."""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

from llama_engine.startup import gc_paused_while_loading

DEFAULT_MAX_TOKENS = 256


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file or HF folder (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--dequantize", action="store_true",
                   help="unpack GGUF block formats instead of running them packed")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _sampling_params(args: argparse.Namespace):
    from llama_engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _engine(args: argparse.Namespace):
    with gc_paused_while_loading():
        from llama_engine.engine.llm_engine import LLMEngine
        return LLMEngine.from_model(args.model, dtype=args.dtype, dequantize=args.dequantize)


def stream_text(engine, prompt: str | list[int], params) -> Iterator[str]:
    """Run one request on an idle engine, yielding text as it is produced."""
    engine.add_request("cli", prompt, params)
    shown = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            yield text[shown:]
            shown = len(text)


def cmd_generate(args: argparse.Namespace) -> None:
    params = _sampling_params(args)  # check the arguments before loading the model
    engine = _engine(args)
    for piece in stream_text(engine, args.prompt, params):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    engine = _engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = ""
        for piece in stream_text(engine, prompt, params):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> None:
    from server.cli import serve
    serve(args)


def cmd_train(args: argparse.Namespace) -> None:
    from llama_engine.training.command import run_train
    from llama_engine.training.distributed import record_rank_error
    try:
        run_train(args)
    except Exception as e:  # one rank of several: the launcher's error names it and this
        record_rank_error(e)
        raise


def main(argv: list[str] | None = None) -> None:
    from llama_engine.openmp import configure_openmp
    configure_openmp()  # first: libgomp reads it once, when torch loads it
    parser = argparse.ArgumentParser(prog="llama-engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt")
    gen.add_argument("prompt")
    _add_model_arguments(gen)
    _add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat (one message a line)")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_model_arguments(chat)
    _add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    from llama_engine.training.command import add_train_arguments
    train = sub.add_parser("train", help="fine-tune: sft, dpo or reward (full, lora, qlora or dora)")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    with gc_paused_while_loading():  # the server's and the benchmarks' modules load here
        from server.cli import add_serve_arguments
        serve = sub.add_parser("serve", help="serve the Llama Stack and OpenAI APIs over HTTP")
        add_serve_arguments(serve)
        serve.set_defaults(func=cmd_serve)

        from benchmarks import add_bench_parsers
        add_bench_parsers(sub.add_parser("bench", help="benchmarks").add_subparsers(
            dest="bench", required=True))

    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # to run again per rank
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"llama-engine: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
