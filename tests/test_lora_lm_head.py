"""Adapters of the output head (PEFT's ``lm_head`` target) served by the engine, against
transformers + peft on a tiny random HF Llama, with untied and tied embeddings (tied: the
update goes to the logits only, the embedding lookup stays the base's, as in peft): our
logits within 1e-4 (float32) of peft's, greedy tokens and prompt logprobs identical; a
batch mixing the base, a head adapter and an adapter without the head gives each request
its solo tokens; an adapter our trainer wrote with apply_lora_to_output loads and gives the
trainer's own logits."""
from __future__ import annotations

import pytest
import torch

from llama_engine import LLM, LoRARequest, SamplingParams
from tests.conftest import make_tiny_llama
from tests.test_model_vs_transformers import engine_prefill_logits, hf_greedy, hf_logits

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOGIT_TOL = 1e-4  # float32, absolute
# B's size: enough for the head's own update to move the logits by far more than the
# tolerance (a test that drops it fails), little enough that the greedy argmax is not tied.
B_STD = 0.05
HEAD_ID, NO_HEAD_ID = 1, 2
PROMPT_IDS = [791, 6372, 282, 4649, 314, 1345, 2017, 29, 2214, 30, 2389, 11, 17, 42]
GREEDY_TOKENS = 6


def _peft_model(folder: str, targets: list[str], seed: int):
    """peft over the tiny Llama with random non-zero A and B on `targets`."""
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager")
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, B_STD)
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def served(request, tmp_path_factory):
    """The tiny model (tied or not), the peft models of a head adapter (all projections and
    lm_head) and of one without the head, and our engine serving both."""
    root = tmp_path_factory.mktemp("tied" if request.param else "untied")
    folder = make_tiny_llama(str(root / "model"), tie=request.param)
    with_head = _peft_model(folder, ALL_LINEAR + ["lm_head"], seed=1)
    without_head = _peft_model(folder, ["q_proj", "v_proj"], seed=2)
    with_head.save_pretrained(str(root / "head"))
    without_head.save_pretrained(str(root / "qv"))
    llm = LLM(folder, enable_lora=True, max_loras=2, max_lora_rank=8)
    llm.engine.add_lora(LoRARequest("head", HEAD_ID, str(root / "head")))
    llm.engine.add_lora(LoRARequest("qv", NO_HEAD_ID, str(root / "qv")))
    return llm, with_head, without_head


def _head_update(model, ids: list[int]) -> torch.Tensor:
    """s (h A^T) B^T of peft's lm_head over the prompt: what the head adapter adds."""
    head = model.base_model.model.lm_head
    seen = {}
    handle = head.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
        handle.remove()
        return head(seen["x"]) - head.base_layer(seen["x"])


def test_logits_greedy_and_prompt_logprobs_match_peft(served) -> None:
    llm, model, _ = served
    assert hasattr(model.base_model.model.lm_head, "lora_A")  # peft did adapt the head
    assert _head_update(model, PROMPT_IDS).abs().max() > 100 * LOGIT_TOL
    ours, first = engine_prefill_logits(llm, PROMPT_IDS, HEAD_ID)
    expected = hf_logits(model, PROMPT_IDS)
    err = (ours - expected[first - 1:]).abs().max().item()
    assert err < LOGIT_TOL, f"max |logit error| {err:.2e}"

    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True,
                            prompt_logprobs=0)
    out = llm.generate([PROMPT_IDS], params, lora_request=LoRARequest("head", HEAD_ID))[0]
    assert out.outputs[0].token_ids == hf_greedy(model, PROMPT_IDS, GREEDY_TOKENS)
    reference = torch.log_softmax(expected, dim=-1)
    for p, logprobs in enumerate(out.prompt_logprobs[1:]):
        token = PROMPT_IDS[p + 1]
        assert abs(logprobs[token] - reference[p, token].item()) < LOGIT_TOL, p


def test_mixed_batch_gives_each_request_its_solo_tokens(served) -> None:
    """The base, the head adapter and the adapter without one, two requests each, in one
    batch; every request's tokens are those it gets alone, and those of peft."""
    llm, with_head, without_head = served
    prompts = [PROMPT_IDS, PROMPT_IDS[:9]]
    loras = [None, LoRARequest("head", HEAD_ID), LoRARequest("qv", NO_HEAD_ID)]
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    cases = [(prompt, lora) for prompt in prompts for lora in loras]
    solo = [llm.generate([prompt], params, lora_request=lora)[0].outputs[0].token_ids
            for prompt, lora in cases]
    mixed = llm.generate([prompt for prompt, _ in cases], params,
                         lora_request=[lora for _, lora in cases])
    assert [o.outputs[0].token_ids for o in mixed] == solo
    references = {None: None, "head": with_head, "qv": without_head}
    for (prompt, lora), tokens in zip(cases, solo):
        model = references[lora.lora_name if lora else None]
        if model is None:
            with with_head.disable_adapter():
                assert tokens == hf_greedy(with_head, prompt, GREEDY_TOKENS)
        else:
            assert tokens == hf_greedy(model, prompt, GREEDY_TOKENS), lora.lora_name
    assert len({tuple(t) for t in solo[:3]}) == 3  # the adapters do change the tokens


def test_adapter_trained_with_apply_lora_to_output_serves_the_trainers_logits(
        tmp_path) -> None:
    """An adapter of our trainer (the spec's apply_lora_to_output: lm_head targeted),
    through LoRARequest: the engine's logits are the trainer's model's on the prompt."""
    from llama_engine.training.batching import pack
    from llama_engine.training.lora import AdapterFineTune, LoRASpec
    from llama_engine.training.tokenization import Example
    folder = make_tiny_llama(str(tmp_path / "model"), tie=True)
    spec = LoRASpec.from_config("lora", {"lora_attn_modules": ["q_proj", "v_proj"],
                                         "apply_lora_to_mlp": False,
                                         "apply_lora_to_output": True, "rank": 4, "alpha": 8})
    trainer = AdapterFineTune(folder, spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as after some training: B away from its zero start
        for _, adapter in trainer.adapters.named_adapters():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * B_STD)
    trainer.save_checkpoint(tmp_path / "adapter")
    with torch.no_grad():
        expected = trainer.compute_logits(trainer.hidden_states(pack([Example(
            PROMPT_IDS, PROMPT_IDS[1:] + [-100])])))
        base_head = trainer.model.compute_logits(trainer.hidden_states(pack([Example(
            PROMPT_IDS, PROMPT_IDS[1:] + [-100])])))
    assert (expected - base_head).abs().max() > 100 * LOGIT_TOL  # the head adapter counts

    llm = LLM(folder, enable_lora=True, max_lora_rank=4)
    llm.engine.add_lora(LoRARequest("trained", 1, str(tmp_path / "adapter")))
    ours, first = engine_prefill_logits(llm, PROMPT_IDS, 1)
    err = (ours - expected[first - 1:]).abs().max().item()
    assert err < LOGIT_TOL, f"max |logit error| {err:.2e}"


@pytest.mark.slow
def test_server_loads_head_adapters_and_names_a_bad_head_tensor(tmp_path) -> None:
    """/v1/load_lora_adapter: a peft head adapter loads and scores a prompt (echo with
    logprobs) as peft does; one whose lora_B is not [vocab, r] is a 400 naming the tensor,
    and the server goes on serving."""
    import requests
    from safetensors.torch import load_file, save_file

    from tests.server_process import running_server
    folder = make_tiny_llama(str(tmp_path / "model"))
    model = _peft_model(folder, ["q_proj", "lm_head"], seed=4)
    model.save_pretrained(str(tmp_path / "head"))
    bad = tmp_path / "bad"
    model.save_pretrained(str(bad))
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.lm_head.lora_B.weight"
    tensors[key] = tensors[key][:1000].contiguous()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    reference = torch.log_softmax(hf_logits(model, PROMPT_IDS), dim=-1)
    expected = [reference[p, t].item() for p, t in enumerate(PROMPT_IDS[1:])]

    with running_server("--model", folder, "--enable-lora", "--max-lora-rank", "8") as server:
        def post(path: str, body: dict) -> requests.Response:
            return requests.post(server.base_url + path, json=body, timeout=300)
        refused = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert "lm_head: lora_B has shape (1000, 8)" in message and "[49152, 8]" in message
        loaded = post("/v1/load_lora_adapter", {"lora_name": "head",
                                                "lora_path": str(tmp_path / "head")})
        assert loaded.status_code == 200, loaded.text
        scored = post("/v1/completions", {"model": "head", "prompt": PROMPT_IDS,
                                          "max_tokens": 0, "echo": True, "logprobs": 0})
        assert scored.status_code == 200, scored.text
        logprobs = scored.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs[0] is None
        assert logprobs[1:] == pytest.approx(expected, abs=LOGIT_TOL)
