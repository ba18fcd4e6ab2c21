"""The adapter manager: host adapters in device slots (LRU), stacked for the fused
projections. Every step's output is checked against each token's own adapter merged into
dense per-projection weights, computed straight from the LoRAAdapter (float64)."""
from __future__ import annotations

import pytest
import torch

from llama_engine import LoRARequest
from llama_engine.config import ModelConfig
from llama_engine.engine.lora_manager import FUSED_PROJECTIONS, LoRAManager
from llama_engine.loader.adapters import (AdapterLoadError, LoRAAdapter, LoRAWeights,
                                          projection_shapes)

CONFIG = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
SHAPES = projection_shapes(CONFIG)


def _base_weights(seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {(layer, proj): torch.randn(*shape, generator=gen)
            for layer in range(CONFIG.num_layers) for proj, shape in SHAPES.items()}


BASE = _base_weights()


def _adapter(seed: int, rank: int, projections: list[str], dora: bool = False) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(CONFIG.num_layers):
        for proj in projections:
            out, k = SHAPES[proj]
            weights[(layer, proj)] = LoRAWeights(
                torch.randn(rank, k, generator=gen), torch.randn(out, rank, generator=gen),
                float(torch.rand(1, generator=gen)) + 0.5,
                torch.rand(out, generator=gen) + 5.0 if dora else None)
    return LoRAAdapter(f"a{seed}", "", weights)


def _expected(manager: LoRAManager, layer: int, fused: str, x: torch.Tensor,
              token_ids: list[int]) -> torch.Tensor:
    """Each token through its adapter's merged weight (DoRA: m * W' / ||W'||_row)."""
    rows = []
    for t, lora_int_id in enumerate(token_ids):
        parts = []
        for proj in FUSED_PROJECTIONS[fused]:
            w = BASE[(layer, proj)].double()
            lora = manager.adapters[lora_int_id].weights.get((layer, proj)) if lora_int_id else None
            if lora is not None:
                w = w + lora.scale * lora.b.double() @ lora.a.double()
                if lora.magnitude is not None:
                    w = lora.magnitude.double()[:, None] * w / w.norm(dim=1, keepdim=True)
            parts.append(x[t].double() @ w.t())
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _check_step(manager: LoRAManager, seg_lens: list[int], lora_ids: list[int], seed: int) -> None:
    step = manager.prepare_step(seg_lens, lora_ids)
    token_ids = [i for n, i in zip(seg_lens, lora_ids) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    for layer in range(CONFIG.num_layers):
        for fused, parts in FUSED_PROJECTIONS.items():
            k = SHAPES[parts[0]][1]
            x = torch.randn(len(token_ids), k, generator=gen)
            base = torch.cat([BASE[(layer, p)] for p in parts])
            y = step.apply(layer, fused, x, x @ base.t())
            torch.testing.assert_close(y.double(), _expected(manager, layer, fused, x, token_ids),
                                       atol=1e-4, rtol=1e-4)


def _manager(max_loras: int = 2, max_lora_rank: int = 64) -> LoRAManager:
    return LoRAManager(CONFIG, max_loras, max_lora_rank,
                       base_weight=lambda layer, proj: BASE[(layer, proj)])


def test_mixed_step_matches_merged_weights() -> None:
    m = _manager(max_loras=3)
    m.add_adapter(LoRARequest("all", 1), _adapter(1, 16, list(SHAPES)))
    m.add_adapter(LoRARequest("qv", 2), _adapter(2, 8, ["wq", "wv"]))
    m.add_adapter(LoRARequest("dora", 3), _adapter(3, 4, ["wk", "w_up", "w_down"], dora=True))
    assert m.rank == 16
    # decode-like and prefill-like segments, base tokens in between
    _check_step(m, [1, 1, 3, 1, 2, 1], [1, 0, 2, 3, 1, 0], seed=0)


def test_base_only_step_needs_no_lora() -> None:
    m = _manager()
    m.add_adapter(LoRARequest("all", 1), _adapter(1, 8, list(SHAPES)))
    assert m.prepare_step([3, 1], [0, 0]) is None


def test_untouched_projections_are_skipped() -> None:
    m = _manager()
    m.add_adapter(LoRARequest("qv", 2), _adapter(2, 8, ["wq", "wv"]))
    step = m.prepare_step([2], [2])
    assert step.stack(0, "wqkv") is not None
    assert all(step.stack(layer, name) is None for layer in range(2)
               for name in ("wo", "w_gate_up", "w_down"))


def test_lru_eviction_and_reload_from_host() -> None:
    m = _manager(max_loras=2)
    for i in (1, 2, 3):
        m.add_adapter(LoRARequest(f"a{i}", i), _adapter(i, 8, list(SHAPES), dora=i == 2))
    assert m.activate([1, 2]) == {1: 0, 2: 1}
    m.activate([1])  # 2 is now the least recently used
    assert m.activate([3]) == {3: 1} and set(m.slot_of) == {1, 3}
    m.activate([3])
    assert m.activate([2]) == {2: 0}  # 1 evicted; 2 reloaded from host memory
    _check_step(m, [2, 1, 1], [2, 0, 3], seed=1)
    _check_step(m, [1, 2], [1, 3], seed=2)  # 1 comes back over 2 (the DoRA ratio row resets)


def test_too_many_adapters_in_one_step() -> None:
    m = _manager(max_loras=1)
    m.add_adapter(LoRARequest("a1", 1), _adapter(1, 8, ["wq"]))
    m.add_adapter(LoRARequest("a2", 2), _adapter(2, 8, ["wq"]))
    with pytest.raises(ValueError, match="max_loras is 1"):
        m.prepare_step([1, 1], [1, 2])


def test_rank_grows_with_a_larger_adapter() -> None:
    m = _manager(max_loras=2)
    m.add_adapter(LoRARequest("small", 1), _adapter(1, 8, list(SHAPES)))
    m.activate([1])
    m.add_adapter(LoRARequest("large", 2), _adapter(2, 32, ["wo", "w_gate"]))
    assert m.rank == 32
    _check_step(m, [2, 2], [1, 2], seed=3)


def test_add_and_remove_errors() -> None:
    m = _manager(max_loras=2, max_lora_rank=16)
    m.add_adapter(LoRARequest("a1", 1), _adapter(1, 8, ["wq"]))
    m.add_adapter(LoRARequest("a1", 1), _adapter(9, 8, ["wq"]))  # same request: no-op
    with pytest.raises(AdapterLoadError, match="already loaded"):
        m.add_adapter(LoRARequest("a1", 5), _adapter(1, 8, ["wq"]))
    with pytest.raises(AdapterLoadError, match="already taken"):
        m.add_adapter(LoRARequest("other", 1), _adapter(1, 8, ["wq"]))
    with pytest.raises(AdapterLoadError, match="rank 32 exceeds max_lora_rank 16"):
        m.add_adapter(LoRARequest("big", 2), _adapter(2, 32, ["wq"]))
    with pytest.raises(AdapterLoadError, match="DoRA"):
        LoRAManager(CONFIG, 2, 16).add_adapter(LoRARequest("d", 3), _adapter(3, 8, ["wq"], True))
    m.activate([1])
    m.remove_adapter(1)
    assert not m.slot_of and m.list_adapters() == []
    with pytest.raises(KeyError, match="lora_int_id 1"):
        m.prepare_step([1], [1])
    with pytest.raises(KeyError, match="lora_int_id 7"):
        m.remove_adapter(7)


def test_peft_folder_through_the_manager_matches_peft(tmp_path) -> None:
    """A DoRA adapter saved by peft, added by path: the fused projections of a step give
    the concatenated outputs of peft's own q/k/v, gate/up, o and down modules."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size,
        intermediate_size=CONFIG.intermediate_size, num_hidden_layers=CONFIG.num_layers,
        num_attention_heads=CONFIG.num_heads, num_key_value_heads=CONFIG.num_kv_heads))
    model = peft.get_peft_model(hf, peft.LoraConfig(
        r=8, lora_alpha=16, use_dora=True, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"])).eval()
    with torch.no_grad():  # magnitudes away from ||W + sBA||, so the ratio matters
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + torch.rand_like(p))
    model.save_pretrained(str(tmp_path))
    layers = model.base_model.model.model.layers
    hf_names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj"}

    def module(layer: int, proj: str):
        return layers[layer].get_submodule(hf_names[proj])

    m = LoRAManager(CONFIG, 2, 16,
                    base_weight=lambda layer, proj: module(layer, proj).base_layer.weight.detach())
    m.add_adapter(LoRARequest("dora", 4, str(tmp_path)))
    step = m.prepare_step([2, 1], [4, 0])
    gen = torch.Generator().manual_seed(1)
    for layer in range(CONFIG.num_layers):
        for fused, parts in FUSED_PROJECTIONS.items():
            x = torch.randn(3, SHAPES[parts[0]][1], generator=gen)
            with torch.no_grad():
                adapted = torch.cat([module(layer, p)(x) for p in parts], dim=1)
                base = torch.cat([module(layer, p).base_layer(x) for p in parts], dim=1)
            y = step.apply(layer, fused, x, base.clone())
            torch.testing.assert_close(y[:2], adapted[:2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(y[2], base[2])


def test_step_without_dora_adapters_skips_the_ratio() -> None:
    m = _manager(max_loras=2)
    m.add_adapter(LoRARequest("lora", 1), _adapter(1, 8, ["wq"]))
    m.add_adapter(LoRARequest("dora", 2), _adapter(2, 8, ["wq"], dora=True))
    assert m.prepare_step([1, 1], [1, 2]).stack(0, "wqkv").magnitude_ratio is not None
    assert m.prepare_step([1], [1]).stack(0, "wqkv").magnitude_ratio is None
    _check_step(m, [1, 1], [1, 0], seed=4)


def test_base_weights_of_a_packed_checkpoint() -> None:
    from llama_engine.engine.lora_manager import base_weights_of
    from llama_engine.quant import dequantize, quantize
    packed = quantize(BASE[(0, "wq")], "Q8_0")
    base_weight = base_weights_of({"layers.0.wq": packed, "layers.0.wk": BASE[(0, "wk")]})
    torch.testing.assert_close(base_weight(0, "wq"), dequantize(packed).float())
    assert torch.equal(base_weight(0, "wk"), BASE[(0, "wk")])
