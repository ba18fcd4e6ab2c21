"""Adapter formats against HF peft, the reference: PEFT folders (safetensors and .bin,
LoRA, rsLoRA with alpha/rank patterns, DoRA, the output head) and llama.cpp GGUF adapters,
loaded for a tiny random Llama. Each adapted projection, run through our batched kernels with the
loaded weights, must give peft's own module output; each bad adapter a named error."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from llama_engine import kernels
from llama_engine.loader.adapters import (HEAD_KEY, PROJECTIONS, AdapterLoadError,
                                          load_lora_adapter, resolve_dora)
from llama_engine.loader.hf import read_config
from tests.conftest import make_tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_PROJECTIONS = list(PROJECTIONS)
MAX_RANK = 64


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def config(tiny_folder):
    return read_config(tiny_folder)


def _peft_model(folder: str, seed: int = 0, **lora_options):
    """A peft model over the tiny Llama with random non-zero A and B (and magnitudes)."""
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    options = {"r": 16, "lora_alpha": 32, "target_modules": ALL_PROJECTIONS,
               "init_lora_weights": False} | lora_options
    model = peft.get_peft_model(base, peft.LoraConfig(**options))
    if options.get("use_dora"):
        with torch.no_grad():  # away from ||W + sBA|| so the ratio is not 1
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.0 + 0.5 * torch.rand_like(p))
    return model.eval()


def _save(model, folder: str, **kwargs) -> str:
    model.save_pretrained(folder, **kwargs)
    return folder


def _peft_modules(model):
    """(layer, our projection name), or HEAD_KEY for lm_head -> peft's LoRA Linear module."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTIONS and hasattr(module, "lora_A"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            found[(layer, PROJECTIONS[leaf][1])] = module
        elif leaf == "lm_head" and hasattr(module, "lora_A"):
            found[HEAD_KEY] = module
    return found


def _our_projection(x: torch.Tensor, base_weight: torch.Tensor, w) -> torch.Tensor:
    """The adapted projection through kernels.add_lora with a one-slot stack."""
    out = base_weight.shape[0]
    stack = kernels.LoRAStack(w.a[None].contiguous(), w.b.t()[None].contiguous(),
                              torch.tensor([[w.scale]]), (0, out),
                              None if w.magnitude_ratio is None else w.magnitude_ratio[None])
    mapping = kernels.lora_mapping([x.shape[0]], [0])
    return kernels.add_lora(x @ base_weight.t(), x, stack, mapping)


def _check_against_peft(model, adapter) -> None:
    modules = _peft_modules(model)
    assert set(modules) == set(adapter.weights)
    gen = torch.Generator().manual_seed(0)
    for key, module in modules.items():
        w = adapter.weights[key]
        torch.testing.assert_close(w.a, module.lora_A["default"].weight.detach())
        torch.testing.assert_close(w.b, module.lora_B["default"].weight.detach())
        assert w.scale == pytest.approx(module.scaling["default"])
        x = torch.randn(5, w.a.shape[1], generator=gen)
        with torch.no_grad():
            expected = module(x)
        actual = _our_projection(x, module.base_layer.weight.detach(), w)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _base_weights(model):
    modules = _peft_modules(model)
    return lambda layer, proj: modules[(layer, proj)].base_layer.weight.detach()


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_peft_lora_all_projections(tiny_folder, config, tmp_path, serialization) -> None:
    model = _peft_model(tiny_folder)
    path = _save(model, str(tmp_path / "lora"), safe_serialization=serialization == "safetensors")
    assert os.path.exists(os.path.join(path, f"adapter_model.{serialization}"))
    adapter = load_lora_adapter(path, config, MAX_RANK, name="mine")
    assert adapter.name == "mine" and adapter.rank == 16 and not adapter.uses_dora
    assert len(adapter.weights) == 7 * config.num_layers
    _check_against_peft(model, adapter)


def test_peft_rslora_with_rank_and_alpha_patterns(tiny_folder, config, tmp_path) -> None:
    model = _peft_model(tiny_folder, seed=1, use_rslora=True, rank_pattern={"q_proj": 8},
                        alpha_pattern={"down_proj": 7})
    adapter = load_lora_adapter(_save(model, str(tmp_path / "rs")), config, MAX_RANK)
    assert adapter.weights[(0, "wq")].rank == 8
    _check_against_peft(model, adapter)


def test_peft_dora(tiny_folder, config, tmp_path) -> None:
    model = _peft_model(tiny_folder, seed=2, use_dora=True, r=8,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = load_lora_adapter(_save(model, str(tmp_path / "dora")), config, MAX_RANK)
    assert adapter.uses_dora
    for key, module in _peft_modules(model).items():
        torch.testing.assert_close(adapter.weights[key].magnitude,
                                   module.lora_magnitude_vector["default"].weight.detach())
    resolve_dora(adapter, _base_weights(model))
    _check_against_peft(model, adapter)


def test_peft_regex_target_modules(tiny_folder, config, tmp_path) -> None:
    model = _peft_model(tiny_folder, seed=3, target_modules=r".*\.(k_proj|up_proj)")
    path = _save(model, str(tmp_path / "regex"))
    assert isinstance(json.load(open(os.path.join(path, "adapter_config.json")))["target_modules"],
                      str)
    adapter = load_lora_adapter(path, config, MAX_RANK)
    assert {proj for _, proj in adapter.weights} == {"wk", "w_up"}
    _check_against_peft(model, adapter)


# ------------------------------------------------------------------------------ GGUF

def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives Q/K (and so their lora_b)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_gguf_adapter(path: str, model, config, alpha: float, kind: str = "adapter") -> str:
    import gguf
    names = {v: k for k, v in {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
                               "attn_output": "wo", "ffn_gate": "w_gate", "ffn_up": "w_up",
                               "ffn_down": "w_down"}.items()}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(kind)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    heads = {"wq": config.num_heads, "wk": config.num_kv_heads}
    for (layer, proj), module in sorted(_peft_modules(model).items()):
        a = module.lora_A["default"].weight.detach()
        b = module.lora_B["default"].weight.detach()
        if proj in heads:
            b = _llama_cpp_permute(b, heads[proj])
        # llama.cpp names the output head's weight "output.weight"
        tensor = ("output.weight" if (layer, proj) == HEAD_KEY
                  else f"blk.{layer}.{names[proj]}.weight")
        writer.add_tensor(f"{tensor}.lora_a", a.numpy().astype(np.float32))
        writer.add_tensor(f"{tensor}.lora_b", b.numpy().astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("targets", [ALL_PROJECTIONS, ["q_proj", "lm_head"]],
                         ids=["projections", "with-output-head"])
def test_gguf_adapter(tiny_folder, config, tmp_path, targets) -> None:
    model = _peft_model(tiny_folder, seed=4, target_modules=targets)
    with torch.no_grad():  # B goes through float16 in the file: round it the same way here
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(p.half().float())
    path = _write_gguf_adapter(str(tmp_path / "lora.gguf"), model, config, alpha=32.0)
    adapter = load_lora_adapter(path, config, MAX_RANK)
    _check_against_peft(model, adapter)


def test_gguf_model_file_is_not_an_adapter(config, default_gguf) -> None:
    with pytest.raises(AdapterLoadError, match="not a LoRA adapter"):
        load_lora_adapter(default_gguf, config, MAX_RANK)


# ----------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def good_adapter(tiny_folder, tmp_path_factory) -> str:
    return _save(_peft_model(tiny_folder, seed=5), str(tmp_path_factory.mktemp("good") / "a"))


def _copy_with(src: str, dst, config_changes: dict | None = None, weights: bytes | None = None,
               drop: str | None = None) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        if name == drop:
            continue
        data = open(os.path.join(src, name), "rb").read()
        if name == "adapter_config.json" and config_changes:
            data = json.dumps(json.loads(data) | config_changes).encode()
        if name.startswith("adapter_model") and weights is not None:
            data = weights
        open(os.path.join(dst, name), "wb").write(data)
    return str(dst)


@pytest.mark.parametrize("change,message", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "'bias'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"target_modules": "(unclosed"}, "regex"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"use_dora": True}, "lora_magnitude_vector is missing"),
])
def test_unsupported_options_are_named(good_adapter, config, tmp_path, change, message) -> None:
    path = _copy_with(good_adapter, tmp_path / "bad", config_changes=change)
    with pytest.raises(AdapterLoadError, match=message):
        load_lora_adapter(path, config, MAX_RANK)


def test_missing_and_corrupt_files(good_adapter, config, tmp_path) -> None:
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_lora_adapter(str(tmp_path / "nowhere"), config, MAX_RANK)
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        load_lora_adapter(_copy_with(good_adapter, tmp_path / "a", drop="adapter_config.json"),
                          config, MAX_RANK)
    with pytest.raises(AdapterLoadError, match="no adapter_model.safetensors"):
        load_lora_adapter(_copy_with(good_adapter, tmp_path / "b",
                                     drop="adapter_model.safetensors"), config, MAX_RANK)
    with pytest.raises(AdapterLoadError, match="cannot read adapter weights"):
        load_lora_adapter(_copy_with(good_adapter, tmp_path / "c", weights=b"\x10garbage" * 9),
                          config, MAX_RANK)


def test_rank_above_the_limit(good_adapter, config) -> None:
    with pytest.raises(AdapterLoadError, match="rank 16 exceeds max_lora_rank 8"):
        load_lora_adapter(good_adapter, config, 8)


def test_shape_that_does_not_fit_the_base(good_adapter, config) -> None:
    """The error names the projection as peft and transformers do, not by our names."""
    from dataclasses import replace
    other = replace(config, intermediate_size=config.intermediate_size + 32)
    with pytest.raises(AdapterLoadError, match=r"'good' model\.layers\.0\.mlp\.down_proj: "
                                               r"lora_A has shape .* does not fit the base model"):
        load_lora_adapter(good_adapter, other, MAX_RANK, name="good")


def test_projection_missing_lora_b_is_named_as_peft_names_it(good_adapter, config,
                                                               tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    path = _copy_with(good_adapter, tmp_path / "no-b")
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    del tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    save_file(tensors, weights)
    with pytest.raises(AdapterLoadError,
                       match=r"model\.layers\.1\.self_attn\.k_proj: needs both lora_A and lora_B"):
        load_lora_adapter(path, config, MAX_RANK)


def test_layer_the_base_lacks(good_adapter, config) -> None:
    from dataclasses import replace
    with pytest.raises(AdapterLoadError, match="layer 1; the base model has 1 layers"):
        load_lora_adapter(good_adapter, replace(config, num_layers=1), MAX_RANK)


@pytest.mark.parametrize("options", [{}, {"use_dora": True}, {"use_rslora": True,
                                                                 "alpha_pattern": {"lm_head": 5}}],
                         ids=["lora", "dora", "rslora-alpha-pattern"])
def test_peft_output_head(tiny_folder, config, tmp_path, options) -> None:
    """lm_head in target_modules: peft saves lora_A [r, hidden], lora_B [vocab, r] (and a
    copy of the frozen head, which must fit the base); the head's update equals peft's."""
    from safetensors.torch import load_file
    model = _peft_model(tiny_folder, seed=6, r=8, target_modules=["q_proj", "lm_head"], **options)
    path = _save(model, str(tmp_path / "head"))
    assert "base_model.model.lm_head.base_layer.weight" in load_file(
        os.path.join(path, "adapter_model.safetensors"))
    adapter = load_lora_adapter(path, config, MAX_RANK)
    head = adapter.weights[HEAD_KEY]
    assert tuple(head.a.shape) == (8, config.hidden_size)
    assert tuple(head.b.shape) == (config.vocab_size, 8)
    resolve_dora(adapter, _base_weights(model))
    _check_against_peft(model, adapter)


def test_unknown_tensor_beside_the_head_is_refused(tiny_folder, config, tmp_path) -> None:
    """An adapter of the embedding (saved with the target list edited to hide it)."""
    model = _peft_model(tiny_folder, seed=6, target_modules=["q_proj", "embed_tokens"])
    path = _save(model, str(tmp_path / "embed"))
    cfg = os.path.join(path, "adapter_config.json")
    json.dump(json.load(open(cfg)) | {"target_modules": ["q_proj"]}, open(cfg, "w"))
    with pytest.raises(AdapterLoadError, match="embed_tokens"):
        load_lora_adapter(path, config, MAX_RANK)


@pytest.mark.parametrize("tensor", ["lm_head.lora_A.weight", "lm_head.lora_B.weight",
                                    "lm_head.base_layer.weight"])
def test_output_head_shape_that_does_not_fit(tiny_folder, config, tmp_path, tensor) -> None:
    """A head adapter made for another hidden size or vocabulary: the error names the
    tensor and the shape the base needs."""
    from safetensors.torch import load_file, save_file
    path = _save(_peft_model(tiny_folder, seed=7, r=8, target_modules=["q_proj", "lm_head"]),
                 str(tmp_path / "head"))
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = f"base_model.model.{tensor}"
    tensors[key] = tensors[key][:, :-1].contiguous() if "lora_A" in tensor else \
        tensors[key][:-5].contiguous()
    save_file(tensors, weights)
    named = f"lm_head: {tensor.split('.')[1]}" if "lora" in tensor else f"'{key}'"
    with pytest.raises(AdapterLoadError, match=re.escape(f"{named} has shape")):
        load_lora_adapter(path, config, MAX_RANK)


def test_peft_adapter_of_a_bare_llama_model(good_adapter, config, tmp_path) -> None:
    """Keys of an adapter trained on LlamaModel (no head) lack one "model." level."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(good_adapter, "adapter_model.safetensors"))
    bare = {k.replace("base_model.model.model.", "base_model.model."): v
            for k, v in tensors.items()}
    path = _copy_with(good_adapter, tmp_path / "bare", drop="adapter_model.safetensors")
    save_file(bare, os.path.join(path, "adapter_model.safetensors"))
    ours = load_lora_adapter(path, config, MAX_RANK).weights
    reference = load_lora_adapter(good_adapter, config, MAX_RANK).weights
    assert set(ours) == set(reference) and len(ours) == 14
    for key, w in ours.items():
        assert torch.equal(w.a, reference[key].a) and torch.equal(w.b, reference[key].b)
