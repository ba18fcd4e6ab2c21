"""C++ CPU kernels (llama_engine._C via kernels/cpu/ops.py) against kernels/reference.py.

Every case draws fresh random shapes and inputs from a seeded generator; results are
compared with the torch reference at float32 tolerances (bit-exact where the op only moves
or adds numbers, identical token ids for sampling).
"""
from __future__ import annotations

import math

import pytest
import torch

try:
    from llama_engine import _C  # noqa: F401
    from llama_engine.kernels.cpu import ops
except ImportError as exc:  # extension not built in this checkout
    pytest.skip(f"llama_engine._C cannot be imported ({exc}); build it with "
                "`python setup.py build_ext --inplace`", allow_module_level=True)

from llama_engine.kernels import reference

FLOAT_TOL = dict(rtol=1e-5, atol=1e-5)
SEEDS = range(4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(g: torch.Generator, options):
    return options[_randint(g, 0, len(options) - 1)]


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


# ---------------------------------------------------------------------------- rms_norm

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(seed: int, with_residual: bool) -> None:
    g = _gen(seed)
    tokens, hidden = _randint(g, 1, 70), _choice(g, [64, 100, 576, 1024])
    x = _randn(g, tokens, hidden, scale=3.0)
    weight = _randn(g, hidden)
    residual = _randn(g, tokens, hidden) if with_residual else None
    eps = 1e-5
    normed, new_residual = ops.rms_norm(x, weight, eps, residual)
    ref_normed, ref_residual = reference.rms_norm(x, weight, eps, residual)
    torch.testing.assert_close(normed, ref_normed, **FLOAT_TOL)
    assert torch.equal(new_residual, ref_residual)  # one float add each: exact


def test_rms_norm_keeps_leading_dims() -> None:
    g = _gen(11)
    x, residual, weight = _randn(g, 2, 5, 96), _randn(g, 2, 5, 96), _randn(g, 96)
    normed, new_residual = ops.rms_norm(x, weight, 1e-6, residual)
    ref_normed, ref_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert normed.shape == x.shape and new_residual.shape == x.shape
    torch.testing.assert_close(normed, ref_normed, **FLOAT_TOL)
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)


# -------------------------------------------------------------------------------- rope

def _cos_sin_table(max_pos: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


@pytest.mark.parametrize("seed", SEEDS)
def test_rope_matches_reference(seed: int) -> None:
    g = _gen(seed)
    tokens, kv_heads = _randint(g, 1, 50), _randint(g, 1, 4)
    heads, head_dim = kv_heads * _randint(g, 1, 4), _choice(g, [32, 64, 128])
    max_pos = 300
    cos_sin = _cos_sin_table(max_pos, head_dim)
    q, k = _randn(g, tokens, heads, head_dim), _randn(g, tokens, kv_heads, head_dim)
    positions = torch.randint(0, max_pos, (tokens,), generator=g)
    ref_q, ref_k = reference.rope(q, k, positions, cos_sin)
    out_q, out_k = ops.rope(q.clone(), k.clone(), positions.to(torch.int32), cos_sin)
    torch.testing.assert_close(out_q, ref_q, **FLOAT_TOL)
    torch.testing.assert_close(out_k, ref_k, **FLOAT_TOL)


def test_rope_rotates_strided_views_of_fused_qkv_in_place() -> None:
    g = _gen(5)
    tokens, heads, kv_heads, head_dim = 17, 9, 3, 64
    qkv = _randn(g, tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    cos_sin = _cos_sin_table(64, head_dim)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    ref_q, ref_k = reference.rope(q, k, positions, cos_sin)
    out_q, out_k = ops.rope(q, k, positions, cos_sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, ref_q, **FLOAT_TOL)
    torch.testing.assert_close(k, ref_k, **FLOAT_TOL)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


def test_rope_writes_back_into_head_major_tensors() -> None:
    """Inputs whose per-token dims are not dense go through a copy that is written back."""
    g = _gen(6)
    tokens, heads, head_dim = 7, 4, 32
    q = _randn(g, heads, tokens, head_dim).transpose(0, 1)  # [T, H, D], head-major memory
    k = _randn(g, tokens, 2, head_dim)
    cos_sin = _cos_sin_table(32, head_dim)
    positions = torch.randint(0, 32, (tokens,), generator=g)
    ref_q, ref_k = reference.rope(q, k, positions, cos_sin)
    out_q, _ = ops.rope(q, k, positions, cos_sin)
    assert out_q is q
    torch.testing.assert_close(q, ref_q, **FLOAT_TOL)
    torch.testing.assert_close(k, ref_k, **FLOAT_TOL)


def test_rope_rejects_positions_outside_the_table() -> None:
    q, k = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with pytest.raises(ValueError):
        ops.rope(q, k, torch.tensor([0, 8]), _cos_sin_table(8, 8))


# ------------------------------------------------------------------------ silu_and_mul

@pytest.mark.parametrize("seed", SEEDS)
def test_silu_and_mul_matches_reference(seed: int) -> None:
    g = _gen(seed)
    leading = [_randint(g, 1, 6) for _ in range(_randint(g, 1, 2))]
    width = _choice(g, [8, 96, 1536, 200])
    gate_up = _randn(g, *leading, 2 * width, scale=6.0)  # reaches both saturated tails
    out = ops.silu_and_mul(gate_up)
    torch.testing.assert_close(out, reference.silu_and_mul(gate_up), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_silu_and_mul_bfloat16_is_the_float32_result_rounded_once(seed: int) -> None:
    """bfloat16 in and out, float32 math inside: within one bfloat16 rounding of the float32
    reference on the same (exactly widened) inputs, forward and gradient."""
    g = _gen(seed)
    tokens, width = _randint(g, 1, 9), _choice(g, [8, 96, 1536, 200])
    gate_up = _randn(g, tokens, 2 * width, scale=6.0).bfloat16()
    grad_out = _randn(g, tokens, width).bfloat16()
    out = ops.silu_and_mul(gate_up)
    assert out.dtype == torch.bfloat16
    want = reference.silu_and_mul(gate_up.float())
    torch.testing.assert_close(out.float(), want, rtol=2 ** -8, atol=1e-6)
    leaf = gate_up.float().requires_grad_(True)
    reference.silu_and_mul(leaf).backward(grad_out.float())
    grad = ops.silu_and_mul_backward(gate_up, grad_out)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), leaf.grad, rtol=2 ** -8, atol=1e-6)


# ---------------------------------------------------------------------------- store_kv

def _random_cache(g: torch.Generator, num_blocks: int, block_size: int, kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return _randn(g, *shape), _randn(g, *shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kv_matches_reference(seed: int, slot_dtype: torch.dtype) -> None:
    g = _gen(seed)
    block_size, num_blocks = _choice(g, [1, 8, 16]), _randint(g, 4, 20)
    kv_heads, head_dim = _randint(g, 1, 4), _choice(g, [64, 128])
    tokens = _randint(g, 1, num_blocks * block_size)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(slot_dtype)
    k, v = _randn(g, tokens, kv_heads, head_dim), _randn(g, tokens, kv_heads, head_dim)
    k_cache, v_cache = _random_cache(g, num_blocks, block_size, kv_heads, head_dim)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, ref_k_cache, ref_v_cache, slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


def test_store_kv_takes_strided_rows_and_skips_padding_slots() -> None:
    g = _gen(9)
    tokens, kv_heads, head_dim, block_size = 6, 3, 64, 4
    kv = _randn(g, tokens, 2 * kv_heads * head_dim)
    k = kv[:, :kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = kv[:, kv_heads * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.tensor([3, -1, 7, 0, -1, 10])
    k_cache, v_cache = _random_cache(g, 3, block_size, kv_heads, head_dim)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    real = slots >= 0
    reference.store_kv(k[real], v[real], ref_k_cache, ref_v_cache, slots[real])
    ops.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


# --------------------------------------------------------------------- paged_attention

def _attention_problem(g: torch.Generator, block_size: int, group: int, head_dim: int,
                       q_lens: list[int], prefixes: list[int], kv_heads: int = 2):
    """Random caches, shuffled block tables and queries for sequences with the given query
    lengths and cached prefixes (context = prefix + q_len)."""
    context_lens = [p + q for p, q in zip(prefixes, q_lens)]
    blocks_needed = [math.ceil(c / block_size) for c in context_lens]
    spare_blocks = 3
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=g).to(torch.int32)
    max_blocks = max(blocks_needed) + 2
    # Unused table entries hold valid but foreign block ids: they must never be read.
    block_tables = torch.randint(0, num_blocks, (len(q_lens), max_blocks), generator=g,
                                 dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_needed):
        block_tables[i, :n] = order[start:start + n]
        start += n
    k_cache, v_cache = _random_cache(g, num_blocks, block_size, kv_heads, head_dim)
    q = _randn(g, sum(q_lens), kv_heads * group, head_dim)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return (q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32),
            cu_seqlens_q, head_dim ** -0.5)


def _random_batch(g: torch.Generator) -> tuple[list[int], list[int]]:
    """A mix of decode rows (q_len 1) and prefill chunks over cached prefixes."""
    num_seqs = _randint(g, 1, 5)
    q_lens = [1 if _randint(g, 0, 1) else _randint(g, 2, 45) for _ in range(num_seqs)]
    prefixes = [_randint(g, 0, 70) for _ in range(num_seqs)]
    return q_lens, prefixes


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_paged_attention_matches_reference(block_size: int, group: int, head_dim: int) -> None:
    g = _gen(block_size * 100 + group * 10 + head_dim)
    q_lens, prefixes = _random_batch(g)
    problem = _attention_problem(g, block_size, group, head_dim, q_lens, prefixes,
                                 kv_heads=_randint(g, 1, 3))
    torch.testing.assert_close(ops.paged_attention(*problem),
                               reference.paged_attention(*problem), **FLOAT_TOL)


@pytest.mark.parametrize("head_dim", [32, 80])
def test_paged_attention_other_head_dims(head_dim: int) -> None:
    """Head dims without a specialised register block take the run-time-size path."""
    g = _gen(head_dim)
    q_lens, prefixes = [1, 19, 1], [30, 14, 0]
    problem = _attention_problem(g, 8, 3, head_dim, q_lens, prefixes, kv_heads=2)
    torch.testing.assert_close(ops.paged_attention(*problem),
                               reference.paged_attention(*problem), **FLOAT_TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_paged_attention_long_prefill_and_decode_mix(seed: int) -> None:
    """Chunks longer than one tile of query tokens, next to decode rows and an empty row."""
    g = _gen(seed + 1000)
    group = _choice(g, [1, 3, 4])
    q_lens, prefixes = [70, 1, 0, 33, 1], [0, 130, 9, 57, 1]
    problem = _attention_problem(g, _choice(g, [8, 16]), group, 64, q_lens, prefixes,
                                 kv_heads=3)
    torch.testing.assert_close(ops.paged_attention(*problem),
                               reference.paged_attention(*problem), **FLOAT_TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_store_kv_and_attend_matches_reference_store_then_attention(seed: int) -> None:
    """The fused call stores the step's keys/values at their slots before attending, so the
    new rows are visible to their own queries (the last q_len positions of each context)."""
    g = _gen(seed + 2000)
    q_lens, prefixes = _random_batch(g)
    kv_heads, head_dim, block_size = _randint(g, 1, 3), 64, _choice(g, [8, 16])
    q, k_cache, v_cache, tables, ctx, cu, scale = _attention_problem(
        g, block_size, _choice(g, [1, 3]), head_dim, q_lens, prefixes, kv_heads=kv_heads)
    tokens = q.shape[0]
    k = _randn(g, tokens, kv_heads, head_dim)
    v = _randn(g, tokens, kv_heads, head_dim)
    slots = torch.cat([
        torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size
                      for p in range(prefix, prefix + q_len)], dtype=torch.long)
        for i, (q_len, prefix) in enumerate(zip(q_lens, prefixes))])
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, ref_k_cache, ref_v_cache, slots)
    expected = reference.paged_attention(q, ref_k_cache, ref_v_cache, tables, ctx, cu, scale)

    metadata = ops.attention_metadata(slots, tables, ctx, cu, scale)
    out = ops.store_kv_and_attend(q, k, v, k_cache, v_cache, metadata)

    torch.testing.assert_close(out, expected, **FLOAT_TOL)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


def test_paged_attention_takes_strided_q_and_int64_metadata() -> None:
    g = _gen(77)
    group, head_dim, kv_heads = 3, 64, 3
    q, k_cache, v_cache, tables, ctx, cu, scale = _attention_problem(
        g, 16, group, head_dim, [5, 1, 12], [20, 40, 0], kv_heads=kv_heads)
    heads = kv_heads * group
    fused = _randn(g, q.shape[0], (heads + 2 * kv_heads) * head_dim)
    fused[:, :heads * head_dim] = q.reshape(q.shape[0], -1)
    q_view = fused[:, :heads * head_dim].view(q.shape)
    out = ops.paged_attention(q_view, k_cache, v_cache, tables.long(), ctx.long(), cu.long(),
                              scale)
    expected = reference.paged_attention(q, k_cache, v_cache, tables, ctx, cu, scale)
    torch.testing.assert_close(out, expected, **FLOAT_TOL)


# ------------------------------------------------------------------------------ sample

def _sampling_params(g: torch.Generator, rows: int, vocab: int):
    """Per-row random settings covering greedy rows and each filter alone or combined."""
    greedy = torch.rand(rows, generator=g) < 0.2
    temperature = torch.where(greedy, torch.zeros(rows), 0.2 + 1.8 * torch.rand(rows, generator=g))
    top_k_options = torch.tensor([0, 1, 5, 50, vocab + 10])
    top_k = top_k_options[torch.randint(0, len(top_k_options), (rows,), generator=g)]
    top_p = torch.where(torch.rand(rows, generator=g) < 0.5, torch.ones(rows),
                        0.1 + 0.89 * torch.rand(rows, generator=g))
    min_p = torch.where(torch.rand(rows, generator=g) < 0.5, torch.zeros(rows),
                        0.3 * torch.rand(rows, generator=g))
    uniform = torch.rand(rows, generator=g)
    return temperature, top_k, top_p, min_p, uniform


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_picks_the_reference_token(seed: int) -> None:
    g = _gen(seed + 2000)
    rows, vocab = 48, _choice(g, [100, 3000, 49152])
    # Rows of different sharpness: flat ones need deep top-p walks, peaked ones short ones.
    sharpness = torch.tensor([0.5, 2.0, 6.0])[torch.randint(0, 3, (rows, 1), generator=g)]
    logits = _randn(g, rows, vocab) * sharpness
    params = _sampling_params(g, rows, vocab)
    params[-1][:2] = torch.tensor([0.0, 1.0])  # the walk's two ends
    expected = reference.sample(logits, *params)
    assert torch.equal(ops.sample(logits, *params), expected)


def test_sample_walks_into_the_low_probability_tail() -> None:
    """Uniforms just below 1 on peaked rows push the walk past the high-probability ids."""
    g = _gen(21)
    rows, vocab = 16, 4000
    logits = _randn(g, rows, vocab) * 8.0
    largest_uniform_below_one = 1.0 - 2.0 ** -24
    uniform = largest_uniform_below_one - 1e-6 * torch.rand(rows, generator=g)
    params = (torch.full((rows,), 1.3), torch.zeros(rows, dtype=torch.long), torch.ones(rows),
              torch.zeros(rows), uniform)
    assert torch.equal(ops.sample(logits, *params), reference.sample(logits, *params))


def test_sample_never_picks_masked_tokens() -> None:
    """-inf logits (constrained decoding masks) get probability 0, as in the reference."""
    g = _gen(31)
    rows, vocab = 24, 3000
    logits = _randn(g, rows, vocab, scale=2.0)
    masked = torch.rand(rows, vocab, generator=g) < 0.7
    logits[masked] = float("-inf")
    params = _sampling_params(g, rows, vocab)
    picked = ops.sample(logits, *params)
    assert torch.equal(picked, reference.sample(logits, *params))
    assert not masked.gather(1, picked[:, None]).any()


def test_sample_breaks_ties_toward_lower_ids() -> None:
    g = _gen(3)
    rows, vocab = 32, 500
    logits = (_randn(g, rows, vocab) * 2).round() / 2  # few distinct values: many ties
    params = _sampling_params(g, rows, vocab)
    assert torch.equal(ops.sample(logits, *params), reference.sample(logits, *params))
    greedy = torch.zeros(1)
    row = torch.tensor([[0.5, 3.0, -1.0, 3.0]])
    picked = ops.sample(row, greedy, torch.zeros(1, dtype=torch.long), torch.ones(1),
                        torch.zeros(1), torch.rand(1, generator=g))
    assert picked.tolist() == [1]


def test_sample_is_deterministic_for_fixed_uniforms() -> None:
    g = _gen(8)
    logits = _randn(g, 16, 2000)
    params = _sampling_params(g, 16, 2000)
    first = ops.sample(logits, *params)
    assert all(torch.equal(first, ops.sample(logits, *params)) for _ in range(3))


# Chi-square critical value for 19 degrees of freedom at significance 1e-3: a correct
# sampler exceeds it once in a thousand seeds, and the seed below is fixed.
CHI2_CRITICAL_DF19 = 43.82


def test_sample_frequencies_follow_softmax() -> None:
    g = _gen(12345)
    vocab, draws, temperature = 20, 200_000, 0.8
    logits = _randn(g, vocab)
    batch = logits.expand(draws, vocab).contiguous()
    ids = ops.sample(batch, torch.full((draws,), temperature), torch.zeros(draws, dtype=torch.long),
                     torch.ones(draws), torch.zeros(draws), torch.rand(draws, generator=g))
    observed = torch.bincount(ids, minlength=vocab).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRITICAL_DF19


def test_sample_rejects_out_of_range_parameters() -> None:
    logits = torch.randn(1, 10)
    ok = dict(temperature=torch.ones(1), top_k=torch.zeros(1, dtype=torch.long),
              top_p=torch.ones(1), min_p=torch.zeros(1), uniform=torch.rand(1))
    for name, bad in [("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.5), ("uniform", 2.0)]:
        with pytest.raises(ValueError):
            ops.sample(logits, **{**ok, name: torch.full((1,), bad)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy_and_its_gradient_equal_torch(dtype, seed) -> None:
    """Per-row loss and scaled gradient against torch's cross_entropy and its autograd
    gradient (float32 maths on the same logits; ignored rows give 0 and a zero row)."""
    g = _gen(seed)
    rows, vocab = int(torch.randint(1, 40, (), generator=g)), int(torch.randint(2, 3000, (), generator=g))
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    scale = torch.rand(rows, generator=g)
    loss, grad = ops.cross_entropy(logits, labels, scale, True)
    assert grad.dtype == dtype

    wide = logits.float().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(wide, labels, ignore_index=-100, reduction="none")
    (want * scale).sum().backward()
    torch.testing.assert_close(loss, want.detach(), **FLOAT_TOL)
    tol = FLOAT_TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)  # bf16 rounding
    torch.testing.assert_close(grad.float(), wide.grad.to(dtype).float(), **tol)
    assert torch.equal(ops.cross_entropy(logits, labels, scale, False)[0], loss)
    ref_loss, ref_grad = reference.cross_entropy(logits, labels, scale, True)
    torch.testing.assert_close(ref_loss, loss, **FLOAT_TOL)
    torch.testing.assert_close(ref_grad.float(), grad.float(), **tol)
