"""The offline API: ``LLM(model=...)``, ``llm.generate(...)``, ``llm.chat(...)``."""
from __future__ import annotations

import itertools
from typing import Sequence as Seq

from llama_engine.lora_request import LoRARequest
from llama_engine.openmp import configure_openmp
from llama_engine.outputs import RequestOutput
from llama_engine.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]
LoRAChoice = LoRARequest | None | Seq[LoRARequest | None]


class LLM:
    """Load a model (``None``: the default SmolLM2-135M-Instruct GGUF) and generate.

    Keyword arguments go to ``EngineConfig`` (block_size, kv_cache_bytes, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_prefix_caching, dtype, dequantize, device,
    score_head, and for adapters enable_lora, max_loras, max_lora_rank, lora_dtype).
    """

    def __init__(self, model: str | None = None, **engine_kwargs):
        configure_openmp()  # before the engine loads torch (too late if the caller did)
        from llama_engine.engine.llm_engine import EngineConfig, LLMEngine
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora_request: LoRAChoice = None) -> list[RequestOutput]:
        """Generate for one prompt or many (strings or token-id lists), all scheduled
        together; returns one RequestOutput per prompt, in order.

        lora_request: one LoRARequest for every prompt, or a list with one per prompt
        (None: the base model), as in vLLM; an adapter not seen before is loaded from its
        lora_path first (AdapterLoadError if it cannot be)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must not be empty")
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        loras = (list(lora_request) if isinstance(lora_request, (list, tuple))
                 else [lora_request] * len(prompts))
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora_requests for {len(prompts)} prompts")
        for lora in dict.fromkeys(r for r in loras if r is not None):
            known = self.engine.loras.get(lora.lora_name)
            if known is None or known.lora_int_id != lora.lora_int_id:
                self.engine.add_lora(lora)  # a name taken by other weights: AdapterLoadError
        requests = [self.engine.make_request(f"offline-{next(self._ids)}", p, sp, lora)
                    for p, sp, lora in zip(prompts, params, loras)]
        for r in requests:
            self.engine.add(r)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(requests):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r.request_id] for r in requests]

    def reward(self, prompts: Prompt | Seq[Prompt]) -> list[RequestOutput]:
        """Score prompts with a reward model (``LLM(model=..., score_head=...)`` or an HF
        LlamaForSequenceClassification folder), as vLLM's ``LLM.reward``: each prompt is
        prefilled, nothing is sampled, and ``RequestOutput.score`` is the score head's
        output at its last token. Prompts sharing a prefix share its KV blocks."""
        return self.generate(prompts, SamplingParams(max_tokens=0))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as vLLM's ``LLM.reset_prefix_cache``: the next prompts
        are computed in full, as on a freshly loaded engine (to time a workload again, say).
        Returns False, changing nothing, while a request holds KV blocks."""
        return self.engine.block_manager.reset_prefix_cache()

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None,
             lora_request: LoRAChoice = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or many, then generate
        (lora_request as in ``generate``)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tools=tools)
                   for c in conversations]
        return self.generate(prompts, sampling_params, lora_request)
