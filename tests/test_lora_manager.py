"""The adapter manager: host adapters in device slots (LRU), stacked for the fused
projections. Every step's output is checked against each token's own adapter merged into
dense per-projection weights, computed straight from the LoRAAdapter (float64)."""
from __future__ import annotations

import pytest
import torch

from llama_engine import LoRARequest
from llama_engine.config import ModelConfig
from llama_engine.engine.lora_manager import FUSED_PROJECTIONS, LoRAManager
from llama_engine.loader.adapters import (HEAD_KEY, AdapterLoadError, LoRAAdapter,
                                          LoRAWeights, projection_shapes)

CONFIG = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
SHAPES = projection_shapes(CONFIG)


def _base_weights(seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {(layer, proj): torch.randn(*shape, generator=gen)
            for layer in range(CONFIG.num_layers) for proj, shape in SHAPES.items()}


BASE = _base_weights()
BASE[HEAD_KEY] = torch.randn(CONFIG.vocab_size, CONFIG.hidden_size,
                             generator=torch.Generator().manual_seed(1))


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
    assert step.stack(0, "qkv_proj") is not None
    assert all(step.stack(layer, name) is None for layer in range(2)
               for name in ("o_proj", "gate_up_proj", "down_proj"))


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
    assert m.prepare_step([1, 1], [1, 2]).stack(0, "qkv_proj").magnitude_ratio is not None
    assert m.prepare_step([1], [1]).stack(0, "qkv_proj").magnitude_ratio is None
    _check_step(m, [1, 1], [1, 0], seed=4)


def test_base_weights_of_a_model_with_packed_and_dense_layers() -> None:
    """DoRA's norms are taken of each projection's own rows of the model's fused weights:
    layer 0 packed (Q8_0, but for w_down, whose 48 columns Q8_0 cannot hold), layer 1 dense."""
    from llama_engine.engine.lora_manager import base_weights_of
    from llama_engine.model.llama import Llama
    from llama_engine.quant import dequantize, quantize
    c = CONFIG
    weights = {"embed": torch.randn(c.vocab_size, c.hidden_size), "norm": torch.ones(c.hidden_size),
               "lm_head": torch.randn(c.vocab_size, c.hidden_size)}
    for layer in range(c.num_layers):
        weights[f"layers.{layer}.attn_norm"] = torch.ones(c.hidden_size)
        weights[f"layers.{layer}.ffn_norm"] = torch.ones(c.hidden_size)
        for proj in SHAPES:
            w = BASE[(layer, proj)]
            packed = layer == 0 and proj != "w_down"
            weights[f"layers.{layer}.{proj}"] = quantize(w, "Q8_0") if packed else w
    base_weight = base_weights_of(Llama(c, weights))
    for proj in SHAPES:
        expected = BASE[(0, proj)] if proj == "w_down" else dequantize(quantize(BASE[(0, proj)],
                                                                                 "Q8_0"))
        torch.testing.assert_close(base_weight(0, proj), expected.float())
        assert torch.equal(base_weight(1, proj), BASE[(1, proj)])


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_fused_decoder_layers_run_the_adapters_as_the_op_by_op_layers(lora_dtype) -> None:
    """A packed (Q4_1) model: a step mixing the base, LoRA and DoRA adapters through the
    fused CPU decoder layer (adapters inside the one call) equals the same step run op by op
    (each projection's kernels.add_lora, whose adapted outputs the other tests check)."""
    from llama_engine import kernels
    from llama_engine.model.llama import Llama
    from llama_engine.quant import quantize
    c = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    shapes = projection_shapes(c)
    gen = torch.Generator().manual_seed(5)
    weights = {"embed": torch.randn(c.vocab_size, c.hidden_size, generator=gen),
               "norm": torch.ones(c.hidden_size)}
    c.tie_word_embeddings = True
    for layer in range(c.num_layers):
        weights[f"layers.{layer}.attn_norm"] = torch.rand(c.hidden_size, generator=gen) + 0.5
        weights[f"layers.{layer}.ffn_norm"] = torch.rand(c.hidden_size, generator=gen) + 0.5
        for proj, (out, k) in shapes.items():
            weights[f"layers.{layer}.{proj}"] = quantize(
                torch.randn(out, k, generator=gen) / k ** 0.5, "Q4_1")
    model = Llama(c, weights)
    assert model.layers[0]._fused_kernel() is not None
    from llama_engine.engine.lora_manager import base_weights_of
    manager = LoRAManager(c, 3, 16, dtype=lora_dtype, base_weight=base_weights_of(model))

    def adapter(seed, rank, projections, dora=False):
        g = torch.Generator().manual_seed(seed)
        return LoRAAdapter(f"a{seed}", "", {
            (layer, proj): LoRAWeights(torch.randn(rank, shapes[proj][1], generator=g) * 0.1,
                                       torch.randn(shapes[proj][0], rank, generator=g) * 0.1,
                                       0.5, torch.rand(shapes[proj][0], generator=g) + 1.0
                                       if dora else None)
            for layer in range(c.num_layers) for proj in projections})
    manager.add_adapter(LoRARequest("all", 1), adapter(1, 8, list(shapes)))
    manager.add_adapter(LoRARequest("dora", 2), adapter(2, 16, ["wk", "wo", "w_up"], dora=True))
    seg_lens, ids = [3, 1, 2, 1, 1], [1, 0, 2, 1, 2]
    tokens = sum(seg_lens)

    class OpByOp:  # the same adapters, refused to the fused kernel
        def __init__(self, step):
            self.step = step

        def __call__(self, linear, x, y):
            return self.step(linear, x, y)

        def fused(self, layer):
            return None

    def run(adapters):
        block_size = 4
        caches = [torch.zeros(8, block_size, c.num_kv_heads, c.head_dim)
                  for _ in range(2 * c.num_layers)]
        cu = [0]
        for n in seg_lens:
            cu.append(cu[-1] + n)
        tables = torch.arange(len(seg_lens) * 1, dtype=torch.int32).reshape(-1, 1)
        metadata = kernels.AttentionMetadata(
            torch.tensor([i * block_size + p for i, n in enumerate(seg_lens) for p in range(n)]),
            tables, torch.tensor(seg_lens, dtype=torch.int32),
            torch.tensor(cu, dtype=torch.int32), c.head_dim ** -0.5)
        attend = kernels.PagedAttention(caches[:c.num_layers], caches[c.num_layers:], metadata)
        ids_in = torch.randint(c.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
        positions = torch.tensor([p for n in seg_lens for p in range(n)])
        with torch.inference_mode():
            return model(ids_in, positions, attend, adapters)

    step = manager.prepare_step(seg_lens, ids)
    assert step.fused(0) is not None
    fused, op_by_op, base = run(step), run(OpByOp(step)), run(None)
    torch.testing.assert_close(fused, op_by_op, rtol=1e-4, atol=1e-4)
    assert (fused - base).abs().max() > 1e-2  # the adapters did something
    torch.testing.assert_close(fused[3], base[3], rtol=1e-4, atol=1e-4)  # the base row


def _with_head(adapter: LoRAAdapter, seed: int, rank: int, dora: bool = False) -> LoRAAdapter:
    """The adapter, adapting the output head too (A [r, hidden], B [vocab, r])."""
    gen = torch.Generator().manual_seed(seed)
    adapter.weights[HEAD_KEY] = LoRAWeights(
        torch.randn(rank, CONFIG.hidden_size, generator=gen),
        torch.randn(CONFIG.vocab_size, rank, generator=gen), 0.75,
        torch.rand(CONFIG.vocab_size, generator=gen) + 5.0 if dora else None)
    return adapter


def _expected_logits(manager: LoRAManager, x: torch.Tensor, row_ids: list[int]) -> torch.Tensor:
    """Each row through its adapter's merged head (DoRA: m * W' / ||W'||_row), float64."""
    rows = []
    for t, lora_int_id in enumerate(row_ids):
        w = BASE[HEAD_KEY].double()
        lora = manager.adapters[lora_int_id].weights.get(HEAD_KEY) if lora_int_id else None
        if lora is not None:
            w = w + lora.scale * lora.b.double() @ lora.a.double()
            if lora.magnitude is not None:
                w = lora.magnitude.double()[:, None] * w / w.norm(dim=1, keepdim=True)
        rows.append(x[t].double() @ w.t())
    return torch.stack(rows)


def test_output_head_adapters_over_the_logit_rows() -> None:
    """The head's stack exists once a head adapter is added, in the same slots; the rows
    whose logits a step computes (several per sequence with prompt logprobs, none for a
    chunk that does not sample) each get their own adapter's head: a LoRA head, a DoRA
    head, an adapter without one, and the base, which keep the base logits exactly."""
    m = _manager(max_loras=3)
    m.add_adapter(LoRARequest("qv", 1), _adapter(1, 8, ["wq", "wv"]))
    assert m.head_stack is None
    m.add_adapter(LoRARequest("head", 2), _with_head(_adapter(2, 4, ["wq"]), 2, 4))
    m.add_adapter(LoRARequest("dora", 3), _with_head(_adapter(3, 16, ["wk"]), 3, 16, dora=True))
    assert tuple(m.head_stack.b_stack.shape) == (3, 16, CONFIG.vocab_size)
    seg_lens, ids, rows = [3, 1, 2, 1, 4], [2, 0, 1, 3, 2], [3, 1, 0, 1, 2]
    step = m.prepare_step(seg_lens, ids)
    head = step.head(rows)
    row_ids = [i for n, i in zip(rows, ids) for _ in range(n)]
    x = torch.randn(len(row_ids), CONFIG.hidden_size, generator=torch.Generator().manual_seed(7))
    base = x @ BASE[HEAD_KEY].t()
    logits = head(None, x, base.clone())
    torch.testing.assert_close(logits.double(), _expected_logits(m, x, row_ids),
                               atol=1e-4, rtol=1e-4)
    untouched = [t for t, i in enumerate(row_ids) if i in (0, 1)]
    assert torch.equal(logits[untouched], base[untouched])
    # a step whose rows all run without a head adapter has none
    assert m.prepare_step([1, 2], [1, 0]).head([1, 1]) is None
    assert m.prepare_step([2, 1], [2, 1]).head([0, 1]) is None


def test_output_head_survives_eviction_and_rank_growth() -> None:
    m = _manager(max_loras=1)
    m.add_adapter(LoRARequest("head", 1), _with_head(_adapter(1, 4, ["wq"]), 1, 4))
    m.add_adapter(LoRARequest("qv", 2), _adapter(2, 4, ["wv"]))
    m.prepare_step([1], [2])  # evicts "head"
    m.add_adapter(LoRARequest("wide", 3), _adapter(3, 32, ["wo"]))  # re-lays every stack
    step = m.prepare_step([2], [1])
    x = torch.randn(2, CONFIG.hidden_size, generator=torch.Generator().manual_seed(8))
    logits = step.head([2])(None, x, x @ BASE[HEAD_KEY].t())
    torch.testing.assert_close(logits.double(), _expected_logits(m, x, [1, 1]),
                               atol=1e-4, rtol=1e-4)


def test_reward_models_refuse_head_adapters() -> None:
    m = LoRAManager(CONFIG, 1, 8, has_lm_head=False)
    with pytest.raises(AdapterLoadError, match="lm_head"):
        m.add_adapter(LoRARequest("head", 1), _with_head(_adapter(1, 4, ["wq"]), 1, 4))
