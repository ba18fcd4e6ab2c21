"""Adapter training against HF peft on the same tiny random HF Llama (float32): LoRA, DoRA and
rsLoRA layers give peft's logits and gradients (1e-5); the PEFT folder we save loads in peft
(same logits) and in our adapter loader; QLoRA's NF4 base equals bitsandbytes' algorithm and
its forward and input gradient equal dequantize-then-linear."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llama_engine.training.batching import pack
from llama_engine.training.lora import AdapterFineTune, LoRASpec
from llama_engine.training.tokenization import Example

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 1e-5 of the tensor's largest magnitude: the tiny model's logits reach ~15, where the base
# models alone (our kernels vs HF eager, no adapter) differ by ~3e-5 in float32.
REL_TOL = 1e-5
SEQ_LENS = (7, 12)  # two sequences of different lengths, packed by us, one by one for HF


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.conftest import make_tiny_llama
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def _examples(vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in SEQ_LENS:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, ids[1:] + [-100]))
    return out


def _perturb(ours: AdapterFineTune) -> None:
    """Non-zero B and magnitudes away from ||W||: every gradient and the DoRA ratio matter."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, adapter in ours.adapters.named_adapters():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
            if adapter.magnitude is not None:
                adapter.magnitude.mul_(1 + 0.1 * torch.randn(adapter.magnitude.shape, generator=g))


def _peft_model(tiny_model: str, spec: LoRASpec):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                         attn_implementation="eager")
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                             target_modules=list(spec.target_modules), use_dora=spec.use_dora,
                             use_rslora=spec.use_rslora)
    return peft.get_peft_model(base, config)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= REL_TOL * scale, f"{name}: max error {error:.3g} > {REL_TOL} * {scale:.3g}"


def _ours_logits(ours: AdapterFineTune, examples: list[Example]) -> torch.Tensor:
    return ours.compute_logits(ours.hidden_states(pack(examples)))


def _peft_logits(model, examples: list[Example]) -> torch.Tensor:
    return torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples])


def _loss(logits: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    labels = torch.tensor([t for e in examples for t in e.labels])
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


@pytest.mark.parametrize("use_dora, use_rslora", [(False, False), (True, False), (False, True)],
                         ids=["lora", "dora", "rslora"])
def test_forward_and_gradients_equal_peft(tiny_model: str, use_dora: bool, use_rslora: bool) -> None:
    from peft import set_peft_model_state_dict

    spec = LoRASpec(ALL_LINEAR + ("lm_head",), rank=4, alpha=8, use_dora=use_dora,
                    use_rslora=use_rslora)
    ours = AdapterFineTune(tiny_model, spec)
    _perturb(ours)
    theirs = _peft_model(tiny_model, spec)
    state = {k: v.detach().clone() for k, v in ours.adapters.peft_state_dict().items()}
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys  # our names are PEFT's
    assert not [k for k in result.missing_keys if "lora_" in k]

    examples = _examples(ours.config.vocab_size)
    logits = _ours_logits(ours, examples)
    expected = _peft_logits(theirs, examples)
    assert_close(logits, expected, "logits")
    _loss(logits, examples).backward()
    _loss(expected, examples).backward()
    named = dict(theirs.named_parameters())
    checked = 0
    for path, adapter in ours.adapters.named_adapters():
        prefix = f"base_model.model.{path}"
        pairs = [(adapter.lora_A, f"{prefix}.lora_A.default.weight"),
                 (adapter.lora_B, f"{prefix}.lora_B.default.weight")]
        if use_dora:
            pairs.append((adapter.magnitude, f"{prefix}.lora_magnitude_vector.default.weight"))
        for param, name in pairs:
            assert param.grad is not None and param.grad.abs().max() > 0, name
            assert_close(param.grad, named[name].grad, name)
            checked += 1
    modules = 2 * len(ALL_LINEAR) + 1  # two decoder layers and the output head
    assert checked == modules * (3 if use_dora else 2)


def test_saved_adapter_loads_in_peft_and_in_our_loader(tiny_model: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llama_engine.loader.adapters import load_lora_adapter

    spec = LoRASpec(("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"), rank=8, alpha=16,
                    use_dora=True)
    ours = AdapterFineTune(tiny_model, spec)
    _perturb(ours)
    ours.save_checkpoint(tmp_path / "adapter")
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    examples = _examples(ours.config.vocab_size)
    with torch.no_grad():
        assert_close(_ours_logits(ours, examples), _peft_logits(loaded, examples), "logits")

    adapter = load_lora_adapter(str(tmp_path / "adapter"), ours.config, max_rank=16)
    q = adapter.weights[(1, "wq")]
    assert q.scale == pytest.approx(16 / 8)
    torch.testing.assert_close(q.b, ours.adapters.layers[1]["q_proj"].lora_B.detach())
    assert set(p for _, p in adapter.weights) == {"wq", "wv", "wo", "w_gate", "w_down"}

    resumed = AdapterFineTune(tiny_model, spec, seed=5)  # other initial weights
    resumed.load_checkpoint(tmp_path / "adapter")
    for (name, a), (_, b) in zip(ours.adapters.named_parameters(), resumed.adapters.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_rslora_scale_and_config_mapping() -> None:
    config = {"lora_attn_modules": ["q_proj", "output_proj"], "apply_lora_to_mlp": True,
              "apply_lora_to_output": True, "rank": 16, "alpha": 32}
    spec = LoRASpec.from_config("dora", config, use_rslora=True)
    assert spec.target_modules == ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    assert spec.use_dora and spec.scale == pytest.approx(32 / math.sqrt(16))
    assert LoRASpec.from_config("lora", config).scale == pytest.approx(2.0)
    for bad, field in (({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"),
                       ({"lora_attn_modules": ["attention"]}, "lora_attn_modules")):
        with pytest.raises(ValueError, match=field):
            LoRASpec.from_config("lora", {**config, **bad})
