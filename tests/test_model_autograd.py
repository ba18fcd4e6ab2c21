"""The model's seams: packed weights in the module tree, dispatch that honours autograd, and
the per-projection adapter hook.

References: transformers' own gradients for the same checkpoint, torch autograd on a
dequantized copy for the packed matmul, and hand-written torch formulas for the ops.
"""
from __future__ import annotations

import pytest
import torch

from llama_engine import kernels
from llama_engine.loader import load_model
from llama_engine.model.llama import Linear, Llama
from llama_engine.quant import dequantize, quantize
from tests.conftest import make_tiny_llama

FORMATS = ["Q4_0", "Q4_1", "Q8_0", "NF4"]
# float32 sums of a few hundred terms, computed in another order
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
# the packed kernels sum in another order than torch's matmul, gradients reach ~3
PACKED_GRAD_TOL = dict(rtol=1e-4, atol=1e-4)
PROMPT_TOKENS = 24
BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama-grad")))


def _prefill(model: Llama, ids: torch.Tensor, adapters=None) -> torch.Tensor:
    """Logits of one sequence's prefill through fresh paged caches."""
    c = model.config
    blocks = -(-len(ids) // BLOCK_SIZE)
    shape = (blocks, BLOCK_SIZE, c.num_kv_heads, c.head_dim)
    caches = [torch.zeros(shape) for _ in range(2 * c.num_layers)]
    metadata = kernels.AttentionMetadata(
        torch.arange(len(ids)), torch.arange(blocks)[None], torch.tensor([len(ids)]),
        torch.tensor([0, len(ids)]), c.head_dim ** -0.5)
    attend = kernels.PagedAttention(caches[:c.num_layers], caches[c.num_layers:], metadata)
    hidden = model(ids, torch.arange(len(ids)), attend, adapters)
    return model.compute_logits(hidden)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 49152, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(seed))


def test_tiny_model_gradients_equal_transformers(tiny_checkpoint) -> None:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    loaded = load_model(tiny_checkpoint)
    ours = Llama(loaded.config, loaded.weights)
    for p in ours.parameters():
        p.requires_grad_(True)
    ids = _ids(0)

    logits = _prefill(ours, ids)
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    loss.backward()
    hf_loss = hf(ids[None], labels=ids[None]).loss
    hf_loss.backward()

    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    grads = {name: p.grad for name, p in ours.named_parameters()}
    assert all(g is not None for g in grads.values())
    expected = {"embed.table.weight": hf_grads["model.embed_tokens.weight"],
                "norm.weight": hf_grads["model.norm.weight"],
                "lm_head.weight": hf_grads["lm_head.weight"]}
    for i in range(loaded.config.num_layers):
        hf_layer = f"model.layers.{i}."
        attn, mlp = hf_layer + "self_attn.", hf_layer + "mlp."
        expected.update({
            f"layers.{i}.input_layernorm.weight": hf_grads[hf_layer + "input_layernorm.weight"],
            f"layers.{i}.post_attention_layernorm.weight":
                hf_grads[hf_layer + "post_attention_layernorm.weight"],
            f"layers.{i}.qkv_proj.weight": torch.cat(
                [hf_grads[attn + f"{p}_proj.weight"] for p in "qkv"]),
            f"layers.{i}.o_proj.weight": hf_grads[attn + "o_proj.weight"],
            f"layers.{i}.gate_up_proj.weight": torch.cat(
                [hf_grads[mlp + "gate_proj.weight"], hf_grads[mlp + "up_proj.weight"]]),
            f"layers.{i}.down_proj.weight": hf_grads[mlp + "down_proj.weight"],
        })
    assert expected.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("qtype", FORMATS)
def test_packed_linear_input_gradient_equals_torch_on_the_dequantized_weight(qtype: str) -> None:
    g = torch.Generator().manual_seed(FORMATS.index(qtype))
    rows, cols = 48, 128
    packed = quantize(torch.randn(rows, cols, generator=g), qtype)
    x = torch.randn(5, cols, generator=g, requires_grad=True)
    upstream = torch.randn(5, rows, generator=g)
    (kernels.linear(x, packed) * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x_ref, dequantize(packed)) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_ops_return_gradients_when_a_gradient_is_needed() -> None:
    """Each op under grad gives torch autograd's gradient of its formula, never a tensor
    detached from the graph by a native kernel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g, requires_grad=True)
    weight = torch.rand(32, generator=g) + 0.5
    normed, _ = kernels.rms_norm(x, weight, 1e-5)
    gate_up = torch.randn(4, 64, generator=g, requires_grad=True)
    act = kernels.silu_and_mul(gate_up)
    q = torch.randn(4, 2, 16, generator=g, requires_grad=True)
    k = torch.randn(4, 1, 16, generator=g, requires_grad=True)
    angles = torch.arange(8)[:, None] * torch.rand(8, generator=g)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1)
    q_rot, k_rot = kernels.rope(q, k, torch.arange(4), cos_sin)
    (normed.sum() + act.square().sum() + q_rot.sum() + (k_rot * 2).sum()).backward()

    xs = x.detach().requires_grad_(True)
    (xs * torch.rsqrt(xs.square().mean(-1, keepdim=True) + 1e-5) * weight).sum().backward()
    gus = gate_up.detach().requires_grad_(True)
    gate, up = gus.chunk(2, -1)
    (gate * torch.sigmoid(gate) * up).square().sum().backward()
    qs, ks = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    cos, sin = cos_sin[:4, None, :8], cos_sin[:4, None, 8:]

    def rotate(t):
        return torch.cat([t[..., :8] * cos - t[..., 8:] * sin, t[..., 8:] * cos + t[..., :8] * sin], -1)

    (rotate(qs).sum() + (rotate(ks) * 2).sum()).backward()
    for got, want in [(x.grad, xs.grad), (gate_up.grad, gus.grad), (q.grad, qs.grad),
                      (k.grad, ks.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _packed_weights(loaded, qtype: str = "Q8_0") -> dict:
    """The checkpoint's projections quantized (norms stay dense)."""
    return {name: quantize(w, qtype) if w.dim() == 2 else w
            for name, w in loaded.weights.items()}


def test_packed_weights_are_part_of_the_module_tree(tiny_checkpoint) -> None:
    loaded = load_model(tiny_checkpoint)
    weights = _packed_weights(loaded)
    model = Llama(loaded.config, weights)
    state = model.state_dict()
    assert torch.equal(state["layers.1.down_proj.qweight"], weights["layers.1.w_down"].data)
    assert torch.equal(state["embed.table.qweight"], weights["embed"].data)
    buffers = {name for name, _ in model.named_buffers()}
    assert {"layers.0.qkv_proj.qweight", "lm_head.qweight"} <= buffers
    ids = _ids(1)
    with torch.inference_mode():
        expected = _prefill(model, ids)

    # a model built from other weights takes these through load_state_dict
    other = Llama(loaded.config, _packed_weights(load_model(tiny_checkpoint), "Q8_0"))
    for module in other.modules():
        if isinstance(module, Linear) and module.qweight is not None:
            module.qweight.zero_()
    other.load_state_dict(state)
    with torch.inference_mode():
        assert torch.equal(_prefill(other, ids), expected)

    model.to("meta")  # .to() moves packed weights with everything else
    assert model.layers[0].qkv_proj.packed.data.is_meta
    assert all(b.is_meta for b in model.buffers())


class OneLoRA:
    """One LoRA adapter on every token: y[:, cols] += scale * (x @ A^T) @ B^T on each
    targeted module's columns of a (fused) projection."""

    def __init__(self, model: Llama, targets: tuple[str, ...], rank: int, scale: float,
                 seed: int):
        g = torch.Generator().manual_seed(seed)
        self.scale, self.params = scale, {}
        for linear in model.modules():
            if not isinstance(linear, Linear) or linear.layer < 0:
                continue
            for name, (start, end) in linear.parts.items():
                if name in targets:
                    cols = linear.cols if linear.qweight is not None else linear.weight.shape[1]
                    a = (torch.randn(rank, cols, generator=g) / cols ** 0.5).requires_grad_(True)
                    b = (torch.randn(end - start, rank, generator=g) * 0.1).requires_grad_(True)
                    self.params[(linear.layer, name)] = (a, b)

    def __call__(self, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, (start, end) in linear.parts.items():
            if (linear.layer, name) in self.params:
                a, b = self.params[(linear.layer, name)]
                delta = torch.zeros_like(y)
                delta[:, start:end] = self.scale * (x @ a.t()) @ b.t()
                y = y + delta
        return y


def test_adapters_on_a_packed_base_train_like_on_its_dequantized_copy(tiny_checkpoint) -> None:
    """QLoRA's setting: a frozen packed base with trainable adapters on attention and MLP
    projections. Loss and adapter gradients equal those over the dequantized base, and with
    no adapters the output is the base model's."""
    loaded = load_model(tiny_checkpoint)
    packed_weights = _packed_weights(loaded, "Q4_1")
    packed = Llama(loaded.config, packed_weights)
    dense = Llama(loaded.config, {name: dequantize(w) if not isinstance(w, torch.Tensor) else w
                                  for name, w in packed_weights.items()})
    targets = ("q_proj", "v_proj", "down_proj")
    ids = _ids(2)
    losses, grads = [], []
    for model in (packed, dense):
        lora = OneLoRA(model, targets, rank=4, scale=2.0, seed=5)
        logits = _prefill(model, ids, lora)
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
        loss.backward()
        losses.append(loss)
        grads.append({key: (a.grad, b.grad) for key, (a, b) in lora.params.items()})
        assert len(lora.params) == 3 * loaded.config.num_layers
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for key, (a_grad, b_grad) in grads[0].items():
        torch.testing.assert_close(a_grad, grads[1][key][0], **PACKED_GRAD_TOL, msg=str(key))
        torch.testing.assert_close(b_grad, grads[1][key][1], **PACKED_GRAD_TOL, msg=str(key))
    with torch.inference_mode():  # no adapters: the base (fused kernel) path
        torch.testing.assert_close(_prefill(packed, ids), _prefill(dense, ids),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("seed", range(3))
def test_rms_norm_and_rope_gradients_equal_autograd_through_their_formulas(native, seed) -> None:
    """The closed-form backwards (``kernels.autograd``), with the native forward and with
    torch's, over random shapes: RMSNorm with a residual and a trained weight, rope of q and
    k taken as strided views of one fused projection."""
    from llama_engine.kernels import autograd
    from llama_engine.kernels import cpu
    g = torch.Generator().manual_seed(seed)
    tokens, width = int(torch.randint(1, 40, (), generator=g)), 16 * int(torch.randint(1, 6, (), generator=g))
    x = torch.randn(tokens, width, generator=g, requires_grad=True)
    residual = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = (torch.rand(width, generator=g) + 0.5).requires_grad_(True)
    normed, new_residual = autograd.rms_norm(x, weight, 1e-6, residual,
                                             cpu.rms_norm if native else None)
    up_n, up_r = torch.randn(tokens, width, generator=g), torch.randn(tokens, width, generator=g)
    ((normed * up_n).sum() + (new_residual * up_r).sum()).backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, residual, weight)]
    s = leaves[0] + leaves[1]
    ref = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-6) * leaves[2]
    ((ref * up_n).sum() + (s * up_r).sum()).backward()
    torch.testing.assert_close(normed, ref.detach(), rtol=1e-5, atol=1e-5)
    for got, leaf in zip((x, residual, weight), leaves):
        torch.testing.assert_close(got.grad, leaf.grad, rtol=1e-4, atol=1e-4)

    heads, kv_heads, dim = 3, 1, 16
    fused = torch.randn(tokens, (heads + kv_heads) * dim, generator=g, requires_grad=True)
    q = fused[:, :heads * dim].reshape(tokens, heads, dim)
    k = fused[:, heads * dim:].reshape(tokens, kv_heads, dim)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    angles = torch.arange(64)[:, None] * torch.rand(dim // 2, generator=g)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1)
    q_rot, k_rot = autograd.rope(q, k, positions, cos_sin, cpu.rope if native else None)
    up_q, up_k = torch.randn(q_rot.shape, generator=g), torch.randn(k_rot.shape, generator=g)
    ((q_rot * up_q).sum() + (k_rot * up_k).sum()).backward()
    leaf = fused.detach().clone().requires_grad_(True)
    cos, sin = cos_sin[positions, None, :dim // 2], cos_sin[positions, None, dim // 2:]

    def rotate(t):
        t1, t2 = t[..., :dim // 2], t[..., dim // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    q_ref = rotate(leaf[:, :heads * dim].reshape(tokens, heads, dim))
    k_ref = rotate(leaf[:, heads * dim:].reshape(tokens, kv_heads, dim))
    ((q_ref * up_q).sum() + (k_ref * up_k).sum()).backward()
    torch.testing.assert_close(q_rot, q_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot, k_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.grad, leaf.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(q, fused.detach()[:, :heads * dim].reshape(tokens, heads, dim))  # not in place


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("seed", range(3))
def test_silu_and_mul_gradient_equals_autograd_through_its_formula(native, seed) -> None:
    from llama_engine.kernels import autograd
    from llama_engine.kernels import cpu
    g = torch.Generator().manual_seed(seed)
    tokens, width = int(torch.randint(1, 40, (), generator=g)), int(torch.randint(1, 100, (), generator=g))
    gate_up = (3 * torch.randn(tokens, 2 * width, generator=g)).requires_grad_(True)
    up_out = torch.randn(tokens, width, generator=g)
    out = autograd.silu_and_mul(gate_up, *((cpu.silu_and_mul, cpu.silu_and_mul_backward)
                                          if native else (None, None)))
    (out * up_out).sum().backward()
    leaf = gate_up.detach().clone().requires_grad_(True)
    gate, up = leaf[:, :width], leaf[:, width:]
    ref = gate * torch.sigmoid(gate) * up
    (ref * up_out).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate_up.grad, leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [None, "NF4", "Q4_1"])
@pytest.mark.parametrize("seed", range(2))
def test_mixed_precision_linear_equals_bfloat16_torch_and_stays_near_float32(qtype, seed) -> None:
    """``linear(..., compute_dtype=bfloat16)``: the forward and the input gradient equal
    torch's bfloat16 matmuls of the rounded operands (the weight dequantized first when
    packed), in float32 out, and stay within bfloat16's rounding of the float32 ones."""
    g = torch.Generator().manual_seed(seed)
    rows, cols, tokens = 64 * int(torch.randint(1, 5, (), generator=g)), 128, int(torch.randint(1, 300, (), generator=g))
    dense = torch.randn(rows, cols, generator=g) / cols ** 0.5
    weight = quantize(dense, qtype) if qtype else dense.to(torch.bfloat16)
    reference_weight = dequantize(weight) if qtype else dense.to(torch.bfloat16).float()
    x = torch.randn(tokens, cols, generator=g, requires_grad=True)
    upstream = torch.randn(tokens, rows, generator=g)
    y = kernels.linear(x, weight, torch.bfloat16)
    (y * upstream).sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    bf = reference_weight.to(torch.bfloat16)
    want_y = torch.nn.functional.linear(x.detach().to(torch.bfloat16), bf).float()
    want_dx = (upstream.to(torch.bfloat16) @ bf).float()
    # the same bfloat16 products (a float32 matmul would be off by bfloat16's rounding)
    torch.testing.assert_close(y, want_y, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(x.grad, want_dx, rtol=1e-3, atol=1e-5)
    exact_y = x.detach() @ reference_weight.t()
    assert (y - exact_y).abs().max() < 0.05 * exact_y.abs().max()
    with torch.no_grad():  # the inference path gives the same numbers
        torch.testing.assert_close(kernels.linear(x, weight, torch.bfloat16), y, rtol=0, atol=0)
