"""The engine core: requests in, one scheduled model step at a time, outputs out."""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llama_engine.engine.block_manager import BlockManager
from llama_engine.engine.lora_manager import LoRAManager, base_weights_of, served_head_of
from llama_engine.engine.model_runner import ModelRunner, kv_bytes_per_token
from llama_engine.engine.sampler import SampledToken, TokenBitmask, sample, token_logprobs
from llama_engine.engine.scheduler import Scheduler
from llama_engine.engine.sequence import NO_LORA, Sequence
from llama_engine.engine.structured_output import StructuredOutputManager
from llama_engine.errors import NotFoundError, RequestValidationError
from llama_engine.loader import load_model
from llama_engine.loader.adapters import AdapterLoadError, LoRAAdapter, load_lora_adapter
from llama_engine.lora_request import LoRARequest
from llama_engine.model.llama import Llama
from llama_engine.outputs import CompletionOutput, RequestOutput
from llama_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llama_engine.tokenizer import IncrementalDetokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1 << 30


def _return_freed_memory() -> None:
    """Loading copies weights more than once; hand the freed heap back to the OS so the
    process holds about the model's size (glibc keeps freed memory otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def gpu_kv_cache_budget(free: int, total: int, reserved: int, utilization: float) -> float:
    """Bytes of device memory the KV pool may take (vLLM's meaning of
    ``gpu_memory_utilization``): this engine holds at most ``utilization`` of the device in
    all, the weights it already reserved included; and since other processes (or another
    engine in this one) may hold part of the device, never more than ``utilization`` of
    what is still free, the rest staying for activations. All in bytes."""
    return min(total * utilization - reserved, free * utilization)


@dataclass
class EngineConfig:
    model: str | None = None  # GGUF file or HF folder; None = the default SmolLM2
    score_head: str | None = None  # reward head file (score.weight) for a GGUF / causal-LM model
    # auto: float32 on CPU, bfloat16 on GPU. bfloat16 on the CPU is mixed precision
    # (``Llama.round_matmuls_to_bf16``): the projections multiply in bfloat16, the rest and
    # the KV cache stay float32. It suits prefill-heavy work (a reward model only prefills);
    # decode, bound by reading the weights, is fastest on the packed GGUF weights.
    dtype: str = "auto"
    dequantize: bool = False  # unpack GGUF block formats instead of running them packed
    device: str = "auto"
    block_size: int = 16
    kv_cache_bytes: int = 1 * GIB  # CPU pool size
    gpu_memory_utilization: float = 0.9  # GPU: fraction of device memory for model + pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_lora: bool = False  # serve LoRA / DoRA adapters (LoRARequest per request)
    max_loras: int = 1  # adapters a step may use (resident at once; the rest wait in host memory)
    max_lora_rank: int = 16  # the largest adapter rank accepted
    # of the resident adapters' A and B on the CPU: bfloat16 halves what a step streams, at
    # about 3 significant digits of the adapter weights; float32 reproduces peft.
    lora_dtype: str = "float32"


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    detokenizers: dict[int, object] = field(default_factory=dict)  # seq id -> detokenizer
    arrival: float = field(default_factory=time.monotonic)
    # With params.prompt_logprobs: one entry per prompt token (None for the first, which
    # nothing predicts), filled in as the prefill computes them.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    score: float | None = None  # reward models: the score at the prompt's last token
    lora_int_id: int = NO_LORA  # the adapter it runs with (NO_LORA: the base model)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
    grammar: object | None = None  # structured outputs: the matcher each sample starts from
    matchers: dict[int, object] = field(default_factory=dict)  # seq id -> its grammar matcher

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if config.device == "auto" else config.device))
        dtype_name = config.dtype if config.dtype != "auto" else (
            "bfloat16" if self.device.type == "cuda" else "float32")
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype_name!r}")
        # On the CPU bfloat16 means bfloat16 matmuls over float32 activations and KV cache;
        # self.dtype is the activations' and the cache's.
        bf16_matmuls = self.device.type == "cpu" and dtype_name == "bfloat16"
        if bf16_matmuls and config.enable_lora:
            raise ValueError("enable_lora: adapters run over float32 or packed base weights "
                             "on the CPU; use dtype float32 (or auto) with LoRA")
        self.dtype = torch.float32 if bf16_matmuls else DTYPES[dtype_name]
        loaded = load_model(config.model, self.dtype, config.dequantize, config.score_head)
        self.model_id = loaded.name
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        # Packed weights are not nn.Parameters, so they move here rather than by Module.to.
        weights = {name: w.to(self.device) for name, w in loaded.weights.items()}
        self.model = Llama(loaded.config, weights).to(self.device)
        if bf16_matmuls:
            self.model.round_matmuls_to_bf16()
        # A reward model scores prompts (max_tokens=0 requests) and generates nothing.
        self.is_reward_model = self.model.score is not None
        del weights
        del loaded
        _return_freed_memory()
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.lora_manager = None
        if config.enable_lora:
            if config.lora_dtype not in DTYPES:
                raise ValueError(f"lora_dtype must be one of {', '.join(DTYPES)}, got "
                                 f"{config.lora_dtype!r}")
            self.lora_manager = LoRAManager(
                self.model_config, config.max_loras, config.max_lora_rank, self.device,
                DTYPES[config.lora_dtype], base_weight=base_weights_of(self.model),
                has_lm_head=not self.is_reward_model,
                served_head=served_head_of(self.model, self.model_config))
        self.loras: dict[str, LoRARequest] = {}  # adapters requests may name, by name
        self._last_lora_id = 0  # the largest lora_int_id ever added (ids are never reused)
        self._retiring: set[int] = set()  # unloaded while in use: dropped once idle
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   config.max_loras if config.enable_lora else 0)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.device,
                                  self.dtype, self.lora_manager)
        limits = [self.model_config.max_position_embeddings, num_blocks * config.block_size]
        if config.max_model_len:
            limits.append(config.max_model_len)
        self.max_model_len = min(limits)
        self.structured = StructuredOutputManager(
            self.tokenizer.to_json, self.model_config.vocab_size,
            sorted(self.tokenizer.stop_token_ids))
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_model(cls, model: str | None = None, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(model=model, **kwargs))

    def _num_kv_blocks(self) -> int:
        per_block = kv_bytes_per_token(self.model_config, self.dtype) * self.config.block_size
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = gpu_kv_cache_budget(free, total, torch.cuda.memory_reserved(self.device),
                                         self.config.gpu_memory_utilization)
        else:
            budget = self.config.kv_cache_bytes
        if budget < per_block:
            raise ValueError(f"KV cache budget ({int(budget)} bytes) holds no block of "
                             f"{per_block} bytes: raise kv_cache_bytes / gpu_memory_utilization")
        return int(budget // per_block)

    # ---- requests -------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: str | list[int],
                     params: SamplingParams, lora_request: LoRARequest | None = None
                     ) -> Request:
        """Tokenize and validate: the one place a request is checked against the model.
        Raises RequestValidationError naming ``prompt`` (empty, ids outside the vocabulary,
        longer than the context) or ``max_tokens`` (prompt plus max_tokens beyond the
        context, as OpenAI and vLLM refuse it), or ``lora_request`` when LoRA is off;
        NotFoundError naming an adapter that is not loaded (``add_lora``). No engine state
        changes, so a front end may call it from another thread."""
        lora_int_id = self._lora_id(lora_request)
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
            vocab = self.model_config.vocab_size
            if not all(type(t) is int and 0 <= t < vocab for t in ids):
                raise RequestValidationError("prompt",
                                             f"token ids must be integers in [0, {vocab})")
        if not ids:
            raise RequestValidationError("prompt", "must not be empty")
        if self.is_reward_model:
            self._check_scoring(params)
        self._check_context(len(ids), params.max_tokens)
        vocab = self.model_config.vocab_size
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise RequestValidationError(
                "logit_bias", f"token ids {outside} are outside the vocabulary [0, {vocab})")
        grammar = (self.structured.matcher(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        return Request(request_id, text, ids, params, grammar=grammar, lora_int_id=lora_int_id)

    def _check_scoring(self, params: SamplingParams) -> None:
        """A reward model's request scores its prompt: max_tokens=0, one sample, no logprobs
        (its head gives a score, not a distribution over the vocabulary)."""
        if params.max_tokens != 0 or params.n != 1 or params.prompt_logprobs is not None:
            raise RequestValidationError(
                "model", f"{self.model_id!r} is a reward model: it scores prompts "
                         "(max_tokens=0, n=1, no prompt_logprobs) and does not generate")

    def _check_context(self, prompt_tokens: int, max_tokens: int | None) -> None:
        limit = self.max_model_len
        room = limit - prompt_tokens
        if room < 0 or (room == 0 and max_tokens != 0):
            if max_tokens == 0:  # scored (a reward model), not continued
                raise RequestValidationError(
                    "prompt", f"the prompt is {prompt_tokens} tokens, more than the model's "
                              f"context length of {limit} tokens")
            raise RequestValidationError(
                "prompt", f"the prompt is {prompt_tokens} tokens and the model's context length "
                          f"is {limit} tokens, which leaves no room to generate")
        if max_tokens is not None and max_tokens > room:
            raise RequestValidationError(
                "max_tokens", f"the model's context length is {limit} tokens; the prompt is "
                              f"{prompt_tokens} tokens and max_tokens asks for {max_tokens} more "
                              f"({prompt_tokens + max_tokens} in all)")

    def add(self, request: Request) -> None:
        """Queue a request ``make_request`` built. Raises RequestValidationError for a
        request id already running, NotFoundError when its adapter was unloaded since."""
        if request.request_id in self.requests:
            raise RequestValidationError("request_id", f"{request.request_id!r} is already running")
        if request.lora_int_id != NO_LORA and (request.lora_int_id not in
                                               self.lora_manager.adapters):
            raise NotFoundError(f"model: LoRA adapter {request.lora_int_id} was unloaded")
        self.requests[request.request_id] = request
        seq = Sequence(request.request_id, 0, request.prompt_token_ids, request.params,
                       request.arrival, request.lora_int_id)
        self._attach(request, seq)
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(request.prompt_token_ids)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams, lora_request: LoRARequest | None = None) -> None:
        self.add(self.make_request(request_id, prompt, params, lora_request))

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            if not seq.is_finished:
                self.scheduler.finish(seq)
        self._drop_retired_loras()

    # ---- adapters -------------------------------------------------------------------

    def read_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read an adapter from lora_request.lora_path and check it fits the model, without
        touching engine state (a front end may call it from another thread; ``add_lora``
        then takes the result). Raises AdapterLoadError naming the problem."""
        self._require_lora("lora_request")
        return load_lora_adapter(lora_request.lora_path, self.model_config,
                                 self.config.max_lora_rank, lora_request.lora_name,
                                 self.lora_manager.served_head)

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> None:
        """Make an adapter available to requests under its name (``adapter``: already read by
        ``read_lora``). Adding the same request again is a no-op. Raises AdapterLoadError for
        an unreadable or unfitting adapter, or a name or id another adapter holds."""
        self._require_lora("lora_request")
        name = lora_request.lora_name
        known = self.loras.get(name)
        if known is not None and known.lora_int_id != lora_request.lora_int_id:
            raise AdapterLoadError(f"an adapter named '{name}' is already loaded")
        if any(self.lora_manager.requests[i].lora_name == name or i == lora_request.lora_int_id
               for i in self._retiring):
            raise AdapterLoadError(f"adapter '{name}' (or lora_int_id "
                                   f"{lora_request.lora_int_id}) is being unloaded: requests "
                                   "still run with it; retry once they finish")
        self.lora_manager.add_adapter(lora_request, adapter)
        self.loras[lora_request.lora_name] = lora_request
        self._last_lora_id = max(self._last_lora_id, lora_request.lora_int_id)

    def new_lora_request(self, lora_name: str, lora_path: str) -> LoRARequest:
        """A LoRARequest with a lora_int_id no adapter of this engine has had (the prefix
        cache keys blocks by it), for front ends that load adapters by name and path."""
        return LoRARequest(lora_name, self._last_lora_id + 1, lora_path)

    def remove_lora(self, lora_name: str) -> LoRARequest:
        """Unload an adapter: new requests for it are refused at once, while the requests
        already running with it finish first. Raises NotFoundError naming it."""
        lora_request = self.loras.pop(lora_name, None)
        if lora_request is None:
            raise NotFoundError(f"lora_name: no LoRA adapter named '{lora_name}' is loaded")
        self._retiring.add(lora_request.lora_int_id)
        self._drop_retired_loras()
        return lora_request

    def list_loras(self) -> list[LoRARequest]:
        return list(self.loras.values())

    def _require_lora(self, field: str) -> None:
        if self.lora_manager is None:
            raise RequestValidationError(field, "LoRA adapters are not enabled on this engine "
                                                "(enable_lora=True)")

    def _lora_id(self, lora_request: LoRARequest | None) -> int:
        if lora_request is None:
            return NO_LORA
        self._require_lora("lora_request")
        known = self.loras.get(lora_request.lora_name)
        if known is None or known.lora_int_id != lora_request.lora_int_id:
            raise NotFoundError(f"model: no LoRA adapter named '{lora_request.lora_name}' "
                                f"(lora_int_id {lora_request.lora_int_id}) is loaded")
        return known.lora_int_id

    def _drop_retired_loras(self) -> None:
        """Forget unloaded adapters that no request runs with any more."""
        if not self._retiring:
            return
        in_use = {r.lora_int_id for r in self.requests.values()}
        for lora_int_id in self._retiring - in_use:
            self.lora_manager.remove_adapter(lora_int_id)
            self._retiring.discard(lora_int_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _attach(self, request: Request, seq: Sequence) -> None:
        from llama_engine.tokenizer import IncrementalDetokenizer
        request.seqs.append(seq)
        request.detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)
        if request.grammar is not None:  # siblings fork before their first token: a fresh copy
            request.matchers[seq.seq_id] = request.grammar.deep_copy()

    # ---- stepping -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled model step; returns the outputs of the requests it advanced."""
        step = self.scheduler.schedule()
        if step.empty:
            return []
        logits = self.runner.execute(step)
        sampling_seqs: list[Sequence] = []
        rows: list[int] = []  # the logits row each sampling sequence reads (forked siblings share one)
        touched: dict[str, Request] = {}
        row = 0  # logits hold each scheduled sequence's logit_positions in turn
        for s in step.scheduled:
            do_sample, positions = s.do_sample, s.logit_positions
            prompt_positions = positions[:-1] if do_sample else positions
            if prompt_positions:
                request = self.requests[s.seq.request_id]
                self._record_prompt_logprobs(request, prompt_positions,
                                             logits[row:row + len(prompt_positions)])
                touched[request.request_id] = request
                row += len(prompt_positions)
            s.seq.num_computed_tokens += s.num_tokens
            self.block_manager.commit(s.seq)
            if do_sample:
                for seq in self._fork_if_first_token(s.seq):
                    if seq.params.max_tokens == 0:  # the prompt only: score it, generate nothing
                        if self.is_reward_model:  # the score head's output at the last token
                            self.requests[seq.request_id].score = logits[row, 0].item()
                        self._finish(seq, "length", None)
                        touched[seq.request_id] = self.requests[seq.request_id]
                    else:
                        sampling_seqs.append(seq)
                        rows.append(row)
                row += 1
        if sampling_seqs:
            matchers = [self.requests[s.request_id].matchers.get(s.seq_id) for s in sampling_seqs]
            constrained = [i for i, m in enumerate(matchers) if m is not None]
            bitmask = TokenBitmask(constrained, self.structured.fill_bitmask(
                [matchers[i] for i in constrained])) if constrained else None
            # every row, in order (decode steps): a view, not a gather of [B, V]
            every_row = rows == list(range(logits.shape[0]))
            picked = sample(logits if every_row else logits[torch.tensor(rows, device=logits.device)],
                            sampling_seqs, bitmask)
            if constrained:
                self.structured.advance([matchers[i] for i in constrained],
                                        [picked[i].token_id for i in constrained])
            for seq, token in zip(sampling_seqs, picked):
                request = self.requests[seq.request_id]
                self._append(request, seq, token)
                touched[request.request_id] = request
        outputs = [self._output(r) for r in touched.values()]
        self._drop_retired_loras()
        return outputs

    def _record_prompt_logprobs(self, request: Request, positions: list[int],
                                logits: torch.Tensor) -> None:
        """logits [len(positions), V] at prompt positions p predict prompt token p + 1. A
        recomputed prefill (after preemption) reaches positions already recorded: skipped."""
        targets = request.prompt_token_ids
        scored = token_logprobs(logits, torch.tensor([targets[p + 1] for p in positions],
                                                     device=logits.device),
                                [request.params.prompt_logprobs] * len(positions))
        for p, (_, top) in zip(positions, scored):
            if p + 1 == len(request.prompt_logprobs):
                request.prompt_logprobs.append(top)

    def _fork_if_first_token(self, seq: Sequence) -> list[Sequence]:
        """n > 1: the prompt was computed once; its samples fork here, sharing its blocks."""
        request = self.requests[seq.request_id]
        if seq.num_output_tokens > 0 or len(request.seqs) == request.params.n:
            return [seq]
        family = [seq]
        for index in range(1, request.params.n):
            child = seq.fork(index)
            self.block_manager.fork(seq, child)
            self.scheduler.add_running(child)
            self._attach(request, child)
            family.append(child)
        return family

    def _append(self, request: Request, seq: Sequence, token: SampledToken) -> None:
        p = seq.params
        seq.token_ids.append(token.token_id)
        seq.cumulative_logprob += token.logprob
        if token.top_logprobs is not None:
            seq.logprobs.append(token.top_logprobs)
        self.generation_tokens_total += 1
        detokenizer = request.detokenizers[seq.seq_id]
        # A stop token ends the text without showing in it, special or not.
        if token.token_id in p.stop_token_ids:
            self._finish_whole_text(seq, detokenizer, "stop", token.token_id)
            return
        if not p.ignore_eos and token.token_id in self.tokenizer.stop_token_ids:
            self._finish_whole_text(seq, detokenizer, "stop", None)
            return
        previous_len = len(seq.text)
        seq.text += detokenizer.step([token.token_id])
        if self._hit_stop_string(seq, previous_len):
            return
        matcher = request.matchers.get(seq.seq_id)
        # Complete (or broken, which advance() logged): nothing more can follow.
        if matcher is not None and (matcher.is_stopped() or matcher.is_error()):
            self._finish(seq, "stop", None)
            return
        out_of_tokens = p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens
        if out_of_tokens or seq.num_tokens >= self.max_model_len:
            self._finish_whole_text(seq, detokenizer, "length", None)

    def _hit_stop_string(self, seq: Sequence, previous_len: int) -> bool:
        for stop in seq.params.stop_strings:
            at = seq.text.find(stop, max(0, previous_len - len(stop) + 1))
            if at >= 0:
                keep = len(stop) if seq.params.include_stop_str_in_output else 0
                seq.text = seq.text[:at + keep]
                self._finish(seq, "stop", stop)
                return True
        return False

    def _finish_whole_text(self, seq: Sequence, detokenizer: IncrementalDetokenizer,
                           reason: str, stop_reason: str | int | None) -> None:
        """Finish a sequence whose text is not cut by a stop string: what the detokenizer still
        holds back (the first bytes of an unfinished character) belongs to the text, as in
        decoding the whole output at once."""
        seq.text += detokenizer.flush()
        self._finish(seq, reason, stop_reason)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        holdback = max((len(s) for s in request.params.stop_strings), default=1) - 1
        for seq in sorted(request.seqs, key=lambda s: s.index):
            # Hold back what could be the start of a stop string until it is decided.
            text = seq.text if seq.is_finished or not holdback else seq.text[:-holdback]
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason))
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             outputs, finished, request.seqs[0].num_cached_tokens,
                             None if request.prompt_logprobs is None
                             else list(request.prompt_logprobs), request.score)

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "kv_cache_usage": bm.usage(),
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
        }
