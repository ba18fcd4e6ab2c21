"""Adapters of the output head (PEFT's ``lm_head`` target) served by the engine, against
transformers + peft on a tiny random HF Llama, with untied and tied embeddings (tied: the
update goes to the logits only, the embedding lookup stays the base's, as in peft): our
logits within 1e-4 (float32) of peft's, greedy tokens and prompt logprobs identical; a
batch mixing the base, a head adapter and an adapter without the head gives each request
its solo tokens; an adapter our trainer wrote with apply_lora_to_output loads and gives the
trainer's own logits.

peft saves a copy of the frozen head beside a head adapter and, loading the adapter, writes
it over the model's head (tied: over the embedding too): an adapter reloaded by peft over
its own base gives our logits; one whose copy is another base's head gives peft other
logits, and the engine refuses it by name; a copy within the rounding of a bfloat16 save or
of a GGUF quantized head (packed or dequantized at load) is accepted, one a few
quantization steps off is not."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llama_engine import LLM, LoRARequest, SamplingParams
from llama_engine.loader.adapters import PEFT_HEAD_COPY_KEY, AdapterLoadError
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
# another base's head: the copy scaled by this much moves peft's logits far beyond LOGIT_TOL
OTHER_BASE_SCALE = 1.002
PROMPT_IDS = [791, 6372, 282, 4649, 314, 1345, 2017, 29, 2214, 30, 2389, 11, 17, 42]
GREEDY_TOKENS = 6


def _peft_model(folder: str, targets: list[str], seed: int):
    """peft over the tiny Llama with random non-zero A and B on `targets`."""
    base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager")
    return _peft_model_over(base, targets, seed)


@dataclass
class Served:
    llm: LLM
    with_head: object  # peft models
    without_head: object
    model_folder: str
    root: Path  # the adapters' folders: root / "head", root / "qv"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def served(request, tmp_path_factory) -> Served:
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
    return Served(llm, with_head, without_head, folder, root)


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
    llm, model = served.llm, served.with_head
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
    llm, with_head, without_head = served.llm, served.with_head, served.without_head
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


def _peft_reloaded(model_folder: str, adapter: Path):
    """peft's own load of a saved adapter over a fresh load of the base."""
    base = transformers.LlamaForCausalLM.from_pretrained(model_folder, dtype=torch.float32,
                                                         attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def _with_head_copy(source: Path, target: Path, change) -> Path:
    """A copy of the adapter folder `source` whose saved head copy is change(copy)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(source, target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    tensors[PEFT_HEAD_COPY_KEY] = change(tensors[PEFT_HEAD_COPY_KEY]).contiguous()
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def test_saved_head_copy_must_be_the_served_head(served, tmp_path) -> None:
    """peft's reload of the head adapter (its copy of the head loaded over the base's) gives
    our logits; an adapter whose copy is another base's head makes peft's logits differ
    from ours, and the engine refuses it, naming the tensor; a copy saved in bfloat16 (a
    bfloat16 training run) is within rounding and loads."""
    saved = served.root / "head"
    assert PEFT_HEAD_COPY_KEY in _saved_keys(saved)  # peft did save its copy of the head
    ours, first = engine_prefill_logits(served.llm, PROMPT_IDS, HEAD_ID)
    reloaded = hf_logits(_peft_reloaded(served.model_folder, saved), PROMPT_IDS)
    assert (ours - reloaded[first - 1:]).abs().max().item() < LOGIT_TOL

    other = _with_head_copy(saved, tmp_path / "other", lambda w: w * OTHER_BASE_SCALE)
    theirs = hf_logits(_peft_reloaded(served.model_folder, other), PROMPT_IDS)
    assert (theirs - reloaded).abs().max().item() > 10 * LOGIT_TOL  # the copy counts in peft
    with pytest.raises(AdapterLoadError) as refused:
        served.llm.engine.read_lora(LoRARequest("other", 7, str(other)))
    message = str(refused.value)
    assert f"'{PEFT_HEAD_COPY_KEY}'" in message and "different base model" in message
    assert "other" not in served.llm.engine.loras

    rounded = _with_head_copy(saved, tmp_path / "bf16", lambda w: w.bfloat16())
    served.llm.engine.read_lora(LoRARequest("bf16", 8, str(rounded)))


def _saved_keys(folder: Path) -> set[str]:
    from safetensors import safe_open
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


# A block's worth of the format's quantization steps that a copy may not be off by.
STEPS_OFF = 3


@pytest.mark.parametrize("qtype, step", [("Q8_0", 1 / 127), ("Q4_0", 1 / 8)])
def test_head_copy_is_checked_within_the_gguf_formats_rounding(qtype, step, tmp_path,
                                                                default_gguf) -> None:
    """A peft head adapter trained on the float32 HF model, served over the same model
    written as GGUF `qtype` (head packed, or dequantized at load): its copy of the head
    differs from the served head by the format's rounding and loads; one element moved
    by STEPS_OFF quantization steps of its block is refused."""
    from tests.test_gguf_formats import tiny_hf_model, write_gguf
    model = _peft_model_over(tiny_hf_model(seed=5), ["q_proj", "lm_head"], seed=6)
    model.save_pretrained(str(tmp_path / "head"))
    gguf_path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(tiny_hf_model(seed=5), qtype, gguf_path, default_gguf)

    def off_by_steps(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        block_max = w[0, :32].abs().max()
        w[0, 3] += STEPS_OFF * step * block_max
        return w
    off = _with_head_copy(tmp_path / "head", tmp_path / "off", off_by_steps)
    for dequantize in (False, True):
        llm = LLM(gguf_path, enable_lora=True, max_lora_rank=8, dequantize=dequantize)
        assert (llm.engine.model.lm_head.packed is None) == dequantize
        llm.engine.read_lora(LoRARequest("head", 1, str(tmp_path / "head")))
        with pytest.raises(AdapterLoadError, match="different base model") as refused:
            llm.engine.read_lora(LoRARequest("off", 2, str(off)))
        assert "at [0, 3]" in str(refused.value)


def _peft_model_over(base, targets: list[str], seed: int):
    """peft over `base` with random non-zero A and B on `targets`."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, B_STD)
    return model.eval()


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
    logprobs) as peft does; one whose lora_B is not [vocab, r], or whose saved copy of the
    head is another base's, is a 400 naming the tensor, and the server goes on serving."""
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
    other = _with_head_copy(tmp_path / "head", tmp_path / "other", lambda w: w * OTHER_BASE_SCALE)
    reference = torch.log_softmax(hf_logits(model, PROMPT_IDS), dim=-1)
    expected = [reference[p, t].item() for p, t in enumerate(PROMPT_IDS[1:])]

    with running_server("--model", folder, "--enable-lora", "--max-lora-rank", "8") as server:
        def post(path: str, body: dict) -> requests.Response:
            return requests.post(server.base_url + path, json=body, timeout=300)
        refused = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert "lm_head: lora_B has shape (1000, 8)" in message and "[49152, 8]" in message
        refused = post("/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(other)})
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert f"'{PEFT_HEAD_COPY_KEY}'" in message and "different base model" in message
        loaded = post("/v1/load_lora_adapter", {"lora_name": "head",
                                                "lora_path": str(tmp_path / "head")})
        assert loaded.status_code == 200, loaded.text
        scored = post("/v1/completions", {"model": "head", "prompt": PROMPT_IDS,
                                          "max_tokens": 0, "echo": True, "logprobs": 0})
        assert scored.status_code == 200, scored.text
        logprobs = scored.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs[0] is None
        assert logprobs[1:] == pytest.approx(expected, abs=LOGIT_TOL)
