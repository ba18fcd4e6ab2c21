"""Adapters served by the engine against transformers + peft on the dequantized SmolLM2:
LoRA, DoRA and rsLoRA (rank 16, all seven projections, non-zero B) give peft's logits and
greedy tokens; one batch mixing the base and four adapters gives every request its solo
tokens, with the prefix cache on."""
from __future__ import annotations

import pytest
import torch

from llama_engine import LLM, LoRARequest, SamplingParams
from llama_engine.errors import NotFoundError, RequestValidationError
from llama_engine.loader.adapters import AdapterLoadError
from tests.test_model_vs_transformers import LOGIT_TOL, check_logits, hf_greedy
from tests.test_model_vs_transformers import PROMPTS as MODEL_PROMPTS

peft = pytest.importorskip("peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = MODEL_PROMPTS[:8]  # the base model's comparison prompts
GREEDY_TOKENS = 6
# B's size: enough to move the logits by whole units (a test that a dropped adapter fails),
# little enough that the model still writes text.
B_STD = 0.02
KINDS = {"plain": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}
IDS = {"plain": 1, "dora": 2, "rslora": 3, "qv8": 4}


@pytest.fixture(scope="module")
def adapters(hf_default_model, tmp_path_factory):
    """A PeftModel over transformers' SmolLM2 holding the four adapters, and the folder each
    was saved to; the session's model gets its own modules back afterwards."""
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_default_model, peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=ALL_LINEAR, init_lora_weights=False),
        adapter_name="plain")
    for name, options in KINDS.items():
        if name != "plain":
            model.add_adapter(name, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR,
                                                    init_lora_weights=False, **options))
    model.add_adapter("qv8", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, B_STD)
            elif "lora_magnitude_vector" in name:  # away from ||W + sBA||: the ratio matters
                p.mul_(1.0 + 0.1 * torch.rand_like(p))
    model.eval()
    root = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(str(root), selected_adapters=list(IDS))
    folders = {name: str(root / name) for name in IDS}  # save_pretrained's layout
    yield model, folders
    model.unload()


@pytest.fixture(scope="module")
def llm(adapters):
    _, folders = adapters
    llm = LLM(enable_lora=True, max_loras=4, max_lora_rank=16)
    for name, lora_int_id in IDS.items():
        llm.engine.add_lora(LoRARequest(name, lora_int_id, folders[name]))
    return llm


def _reference(adapters, name: str):
    model, _ = adapters
    model.set_adapter(name)
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_and_greedy_tokens_match_peft(llm, adapters, kind):
    model = _reference(adapters, kind)
    tok = llm.get_tokenizer()
    ids = tok.encode("In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin "
                     "walked on the surface while Michael Collins orbited above.")[:24]
    check_logits(llm, model, ids, IDS[kind])
    with torch.no_grad():  # the adapter does change the logits
        adapted = model(torch.tensor([ids])).logits[0, -1]
        with model.disable_adapter():
            base = model(torch.tensor([ids])).logits[0, -1]
    assert (base - adapted).abs().max() > 100 * LOGIT_TOL
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, lora_request=LoRARequest(kind, IDS[kind]))
    for prompt, out in zip(PROMPTS, outs):
        expected = hf_greedy(model, tok.encode(prompt), GREEDY_TOKENS)
        assert out.outputs[0].token_ids == expected, (kind, prompt)


def test_mixed_batch_gives_each_request_its_solo_tokens(llm):
    """Base and four adapters in one batch, two adapters (and the base) sharing a prompt;
    solo runs first, so the mixed batch meets their cached prefixes, each under its own
    adapter only."""
    shared = "Once upon a time, in a small village by the sea, there lived"
    cases = [(shared, None), (shared, "plain"), (shared, "dora"), (PROMPTS[0], "rslora"),
             (PROMPTS[3], "qv8"), (PROMPTS[5], None), (PROMPTS[5], "qv8")]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    loras = [LoRARequest(name, IDS[name]) if name else None for _, name in cases]
    solo = [llm.generate(prompt, params, lora_request=lora)[0].outputs[0].token_ids
            for (prompt, _), lora in zip(cases, loras)]
    queries = llm.engine.block_manager.prefix_queries
    mixed = llm.generate([p for p, _ in cases], params, lora_request=loras)
    assert llm.engine.block_manager.prefix_queries > queries
    assert [o.outputs[0].token_ids for o in mixed] == solo
    # the adapters do differ from the base and from each other on the shared prompt
    assert len({tuple(t) for t in solo[:3]}) == 3


def test_unknown_and_unloaded_adapters_are_refused(llm, adapters):
    _, folders = adapters
    params = SamplingParams(max_tokens=1)
    engine = llm.engine
    with pytest.raises(NotFoundError, match="no LoRA adapter named 'nope'"):
        engine.make_request("r", "hi", params, LoRARequest("nope", 99))
    with pytest.raises(AdapterLoadError, match="already loaded"):
        engine.add_lora(LoRARequest("plain", 9, folders["qv8"]))
    with pytest.raises(AdapterLoadError, match="does not exist"):
        llm.generate("hi", params, lora_request=LoRARequest("gone", 10, "/no/such/adapter"))
    # unloading while a request runs with it: that request finishes, new ones are refused
    engine.add_lora(LoRARequest("temp", 11, folders["qv8"]))
    engine.add_request("running", "Count: 1, 2,", SamplingParams(max_tokens=4, ignore_eos=True),
                       LoRARequest("temp", 11))
    engine.step()
    engine.remove_lora("temp")
    with pytest.raises(NotFoundError, match="'temp'"):
        engine.make_request("r", "hi", params, LoRARequest("temp", 11))
    assert 11 in engine.lora_manager.adapters
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert len(done[0].outputs[0].token_ids) == 4
    assert 11 not in engine.lora_manager.adapters
    with pytest.raises(NotFoundError, match="'temp'"):
        engine.remove_lora("temp")


def test_lora_requests_need_enable_lora(default_llm):
    with pytest.raises(RequestValidationError, match="enable_lora"):
        default_llm.generate("hi", SamplingParams(max_tokens=1),
                             lora_request=LoRARequest("a", 1, "/x"))
