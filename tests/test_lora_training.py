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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "",
                 rel_tol: float = REL_TOL) -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel_tol * scale, f"{name}: max error {error:.3g} > {rel_tol} * {scale:.3g}"


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


# ---- QLoRA: the NF4 base -------------------------------------------------------------------

def _bnb_nf4_restated(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 with double quantization restated in plain torch (its CUDA kernel's
    and torch backend's semantics: nearest value, ties to the lower): returns 4-bit codes
    [n], 8-bit absmax codes [n / 64], the offset, and the group scales [ceil(n / 64 / 256)]."""
    from bitsandbytes.functional import create_dynamic_map, get_4bit_type
    nf4, dynamic = get_4bit_type("nf4", device="cpu"), create_dynamic_map(signed=True)

    def nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        distance = (x[:, None] - table[None, :]).abs()
        return distance.argmin(-1)  # the first (lower) index on a tie

    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(-1)
    codes = nearest((blocks * (1.0 / absmax)[:, None]).clamp(-1, 1).reshape(-1), nf4)
    offset = absmax.mean()
    centered = absmax - offset
    scales, qs = [], []
    for group in centered.split(256):
        scale = group.abs().amax()
        qs.append(nearest((group * (1.0 / scale) if len(group) == 256 else group / scale).clamp(-1, 1),
                          dynamic))
        scales.append(scale)
    return codes, torch.cat(qs), offset, torch.stack(scales)


def _our_nf4_fields(w: torch.Tensor):
    """(4-bit codes [n] row-major, 8-bit absmax codes [n / 64], offset, group scales) of our
    packed NF4 rows, read back from the row layout."""
    from llama_engine.quant import NF4_GROUP, quantize_nf4
    rows, cols = w.shape
    packed = quantize_nf4(w)
    blocks = cols // 64
    codes = packed.data[:, :cols // 2].reshape(rows, blocks, 32)
    codes = torch.cat([codes & 0x0F, codes >> 4], -1).reshape(-1).long()
    q = packed.data[:, cols // 2:cols // 2 + blocks].reshape(-1).long()
    floats = packed.data[:, cols // 2 + blocks:].contiguous().view(torch.float32)
    offset, phase = floats[:, 0], floats[:, 1].long()
    scales = {}
    for r in range(rows):
        for b in range(blocks):
            group = (r * blocks + b) // NF4_GROUP
            scales[group] = floats[r, 2 + (phase[r] + b) // NF4_GROUP]
    return codes, q, offset, torch.stack([scales[g] for g in sorted(scales)])


@pytest.mark.parametrize("shape", [(45, 576), (600, 576), (3, 64 * 300), (7, 64)])
def test_nf4_codes_and_scales_equal_bitsandbytes(shape: tuple[int, int]) -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    codes, q, offsets, scales = _our_nf4_fields(w)
    expected_codes, expected_q, expected_offset, expected_scales = _bnb_nf4_restated(w)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(q, expected_q)
    assert torch.equal(offsets, expected_offset.expand_as(offsets))
    assert torch.equal(scales, expected_scales)

    # bitsandbytes itself: the same 4-bit codes (high nibble first in its bytes), offset and
    # group scales; its native CPU search for the 8-bit absmax codes strays from the nearest
    # value close to a midpoint (a few per thousand), so those are checked to be such cases.
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed = packed.reshape(-1)
    assert torch.equal(codes, torch.stack([packed >> 4, packed & 0x0F], -1).reshape(-1).long())
    assert offsets[0].item() == state.offset.item()
    assert torch.equal(scales, state.state2.absmax)
    theirs = state.absmax.long()
    strays = (theirs != q).nonzero().flatten()
    assert len(strays) <= max(1, q.numel() // 100)
    dynamic = state.state2.code
    centered = (w.reshape(-1, 64).abs().amax(-1) - state.offset)
    for i in strays.tolist():
        x = (centered[i] / scales[i // 256]).item()
        midpoint = (dynamic[theirs[i]] + dynamic[q[i]]).item() / 2
        assert abs(x - midpoint) < 1e-3 * abs(dynamic[theirs[i]] - dynamic[q[i]]).item() + 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_nf4_linear_and_input_gradient_equal_dequantize_then_linear(seed: int, monkeypatch) -> None:
    """kernels.linear over NF4, forward and input gradient, on random shapes: few rows of x
    (the packed kernel) and many (W dequantized chunk by chunk for the dense GEMM), W walked
    in several chunks, equal autograd through dequantize-then-linear."""
    from llama_engine import kernels
    from llama_engine.quant import NF4_BLOCK, dequantize, quantize_nf4
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 300, (), generator=g))
    cols = NF4_BLOCK * int(torch.randint(1, 5, (), generator=g))
    chunk_rows = int(torch.randint(1, 120, (), generator=g))
    monkeypatch.setattr(kernels, "DEQUANTIZED_CHUNK_BYTES", 4 * cols * chunk_rows)
    packed = quantize_nf4(torch.randn(rows, cols, generator=g))
    for tokens in (int(torch.randint(1, 16, (), generator=g)), kernels.NF4_DENSE_MIN_ROWS + seed):
        x = torch.randn(tokens, cols, generator=g, requires_grad=True)
        upstream = torch.randn(tokens, rows, generator=g)
        y = kernels.linear(x, packed)
        (y * upstream).sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref = torch.nn.functional.linear(x_ref, dequantize(packed))
        (y_ref * upstream).sum().backward()
        assert_close(y, y_ref, f"{tokens} x {cols} @ {cols} x {rows}")
        assert_close(x.grad, x_ref.grad, "input gradient")


def test_qlora_equals_lora_over_the_dequantized_nf4_base(tiny_model: str) -> None:
    from llama_engine.loader import load_model
    from llama_engine.model.llama import Llama
    from llama_engine.quant import PackedWeight, dequantize
    from llama_engine.training.lora import TrainingAdapters, nf4_base

    spec = LoRASpec(ALL_LINEAR, rank=4, alpha=8)
    qlora = AdapterFineTune(tiny_model, spec, quantize_base=True)
    _perturb(qlora)
    linears = [m for m in qlora.model.modules() if m.__class__.__name__ == "Linear"]
    # never dense, but for the tiny model's down_proj: 160 columns are not whole NF4 blocks
    packed = [m for m in linears if m.weight is None]
    assert all(m.qtype == "NF4" for m in packed)
    # dense: the embedding and the (tied) head, as bitsandbytes leaves them
    dense = [m for m in linears if m.weight is not None and m.weight.shape[1] != 160]
    assert {m.weight.shape for m in dense} == {(qlora.config.vocab_size, qlora.config.hidden_size)}
    assert len(packed) == len(linears) - qlora.config.num_layers - len(dense)

    loaded = load_model(tiny_model)
    nf4_base(loaded.weights)
    dense = {k: dequantize(v) if isinstance(v, PackedWeight) else v for k, v in loaded.weights.items()}
    reference = Llama(loaded.config, dense).requires_grad_(False)
    adapters = TrainingAdapters(reference, spec)
    adapters.load_state_dict(qlora.adapters.state_dict())

    examples = _examples(qlora.config.vocab_size)
    batch = pack(examples)
    from llama_engine.training.attention import PackedCausalAttention
    expected = reference.compute_logits(reference(batch.input_ids, batch.positions,
                                                  PackedCausalAttention(batch), adapters))
    logits = _ours_logits(qlora, examples)
    assert_close(logits, expected, "logits")
    _loss(logits, examples).backward()
    _loss(expected, examples).backward()
    for (name, ours), (_, theirs) in zip(qlora.adapters.named_parameters(), adapters.named_parameters()):
        # the packed base's chunked GEMMs sum in another order than the dense ones: the
        # gradients measured up to 1.03e-5 of their largest apart
        assert_close(ours.grad, theirs.grad, name, rel_tol=2e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_bfloat16_base_trains_within_its_rounding_of_float32(tiny_model: str, method: str) -> None:
    """``base_dtype=torch.bfloat16``: the frozen projections and head are held in bfloat16
    (NF4 stays packed), the adapters stay float32, and logits and adapter gradients are
    within bfloat16's rounding of the float32 base's (peft's, checked above); the op itself
    is checked against torch's bfloat16 matmuls in test_model_autograd.py."""
    spec = LoRASpec(ALL_LINEAR + (() if method == "qlora" else ("lm_head",)), rank=4, alpha=8,
                    use_dora=method == "dora")
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AdapterFineTune(tiny_model, spec, quantize_base=method == "qlora",
                                base_dtype=dtype)
        _perturb(model)
        examples = _examples(model.config.vocab_size)
        logits = _ours_logits(model, examples)
        _loss(logits, examples).backward()
        runs[dtype] = (model, logits)
    (full, full_logits), (half, half_logits) = runs[torch.float32], runs[torch.bfloat16]
    base = [half.model.lm_head] + [m for layer in half.model.layers
                                    for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
    assert all(m.compute_dtype == torch.bfloat16 for m in base)
    assert all(m.weight.dtype == torch.bfloat16 for m in base if m.weight is not None)
    assert half.model.embed.table.weight.dtype == torch.float32  # the lookup stays float32
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())
    error = (half_logits - full_logits).abs().max() / full_logits.abs().max()
    # bfloat16 has 8 bits of mantissa: a few percent after two random layers and the head
    # (measured 2.7-5.5%; SmolLM2's loss moves by about 1e-4 of itself, benchmarks/training.py)
    assert 0 < error < 0.1, error
    for (name, a), (_, b) in zip(half.adapters.named_parameters(), full.adapters.named_parameters()):
        cosine = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert cosine > 0.98, (name, cosine)  # measured >= 0.992


def test_base_dtype_defaults_and_refusals(tmp_path: Path) -> None:
    from llama_engine.training.recipe import DataSource, Recipe, base_precision

    def recipe(**kw) -> Recipe:
        adapter = {"lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": False,
                   "apply_lora_to_output": False, "rank": 8, "alpha": 16}
        return Recipe(objective="sft", model_path="m", train=DataSource("d.jsonl", {}),
                      output_dir=str(tmp_path), algorithm_config=adapter, **kw)

    def base(**kw) -> tuple[str, str]:
        precision = base_precision(recipe(**kw), "cpu")
        return precision.name, precision.reason

    # the CPU's own word on native bfloat16 matmuls (oneDNN's AMX or AVX512-BF16 kernels)
    native = torch.backends.mkldnn.is_available() and (
        torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    name, reason = base(algorithm="lora")
    assert name == ("bf16" if native else "fp32")
    assert reason.startswith("the default for adapters") and ("does not" not in reason) == native
    assert base(algorithm="qlora", dtype="fp32") == ("fp32", "as requested")
    assert base(algorithm="lora", dtype="bf16") == ("bf16", "as requested")
    assert base(algorithm="full") == ("fp32", "full fine-tuning trains every weight in fp32")
    assert base(algorithm="lora", fsdp=True)[0] == "fp32"
    for kw in ({"algorithm": "full", "dtype": "bf16"}, {"algorithm": "lora", "dtype": "fp16"},
               {"algorithm": "lora", "dtype": "bf16", "fsdp": True}):
        with pytest.raises(ValueError, match="^dtype: "):
            recipe(**kw)


def test_add_lora_over_bfloat16_inputs_keeps_db_in_float32() -> None:
    """A bfloat16 x and a float32 y (training over a bfloat16 base): the update and every
    gradient within bfloat16's rounding of float32 math, and dB exactly float32 math on the
    float32 dy (only A x is rounded: a bfloat16 dy would flip the signs of small dB elements,
    which AdamW's first step turns into whole-lr moves)."""
    from llama_engine.training.lora import LoRALayer, add_lora
    g = torch.Generator().manual_seed(0)
    tokens, k, n, rank = 37, 64, 48, 4
    spec = LoRASpec(("q_proj",), rank=rank, alpha=8)
    adapter = LoRALayer(k, n, spec, None, g)
    with torch.no_grad():
        adapter.lora_B.normal_(generator=g)
    x = torch.randn(tokens, k, generator=g).bfloat16().requires_grad_(True)
    y0 = torch.randn(tokens, n, generator=g)
    dy = torch.randn(tokens, n, generator=g)
    y = add_lora(y0.clone().requires_grad_(True) * 1.0, x, [(0, n, adapter)])
    y.backward(dy)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert adapter.lora_A.grad.dtype == adapter.lora_B.grad.dtype == torch.float32
    a, b = adapter.lora_A.detach().clone().requires_grad_(True), adapter.lora_B.detach().clone().requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    want = y0 + spec.scale * (x32 @ a.t()) @ b.t()
    want.backward(dy)
    for ours, theirs in ((y, want), (x.grad, x32.grad), (adapter.lora_A.grad, a.grad),
                         (adapter.lora_B.grad, b.grad)):
        error = (ours.float() - theirs).abs().max() / theirs.abs().max()
        assert error < 2e-2, error  # a few bfloat16 roundings (2^-8 each)
    h = (x.detach() @ adapter.lora_A.detach().bfloat16().t()).float()  # A x, rounded as ours
    torch.testing.assert_close(adapter.lora_B.grad, spec.scale * dy.t() @ h, rtol=1e-5, atol=1e-5)
