"""Triton kernels against the torch reference, run on the CPU by Triton's interpreter
(or compiled on a GPU with TRITON_INTERPRET=0: see tests/triton_device.py).

TRITON_INTERPRET must be set before triton is first imported, hence the environment line
above the imports. Shapes stay small: the interpreter executes kernels in numpy.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from llama_engine.kernels import reference  # noqa: E402
from llama_engine.kernels import triton as triton_kernels  # noqa: E402
from llama_engine.kernels.triton import attention  # noqa: E402
from llama_engine.quant import dequantize, quantize  # noqa: E402
from tests.triton_device import on_device  # noqa: E402

# Under the interpreter the modules themselves; on a GPU (TRITON_INTERPRET=0) proxies that
# run each call on the device.
tk = on_device(triton_kernels)
triton_attention = on_device(attention)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) per dtype for values of order 1: a few units in the last place of the dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (1.6e-2, 1.6e-2)}
# Looser bound for reductions over many terms (attention, matmul), relative to the output
# scale: accumulation order differs from the reference.
REDUCTION_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3),
                       torch.bfloat16: (3e-2, 3e-2)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict) -> None:
    atol, rtol = tolerance[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=gen))


# ---------------------------------------------------------------------------- norm.py

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_rms_norm_matches_reference(dtype: torch.dtype, seed: int) -> None:
    gen = _generator(seed)
    rows, hidden = _randint(gen, 1, 9), _randint(gen, 20, 300)
    x = _randn(gen, 2, rows, hidden, dtype=dtype)
    weight = (1.0 + 0.1 * _randn(gen, hidden)).to(dtype)
    expected, _ = reference.rms_norm(x, weight, 1e-6)
    actual, passthrough = tk.rms_norm(x, weight, 1e-6)
    _assert_close(actual, expected, TOLERANCE)
    assert passthrough is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [2, 3])
def test_rms_norm_fused_residual_matches_reference(dtype: torch.dtype, seed: int) -> None:
    gen = _generator(seed)
    rows, hidden = _randint(gen, 1, 9), _randint(gen, 20, 300)
    x = _randn(gen, rows, hidden, dtype=dtype)
    residual = _randn(gen, rows, hidden, dtype=dtype)
    weight = (1.0 + 0.1 * _randn(gen, hidden)).to(dtype)
    expected, expected_residual = reference.rms_norm(x, weight, 1e-5, residual)
    actual, actual_residual = tk.rms_norm(x, weight, 1e-5, residual)
    _assert_close(actual, expected, TOLERANCE)
    _assert_close(actual_residual, expected_residual, TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 80])
def test_rope_matches_reference(dtype: torch.dtype, head_dim: int) -> None:
    gen = _generator(head_dim)
    tokens, kv_heads, group, max_pos = _randint(gen, 1, 7), _randint(gen, 1, 4), 3, 50
    q = _randn(gen, tokens, kv_heads * group, head_dim, dtype=dtype)
    k = _randn(gen, tokens, kv_heads, head_dim, dtype=dtype)
    angles = torch.rand(max_pos, head_dim // 2, generator=gen) * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen, dtype=torch.int32)
    expected_q, expected_k = reference.rope(q, k, positions, cos_sin)
    actual_q, actual_k = tk.rope(q, k, positions, cos_sin)
    _assert_close(actual_q, expected_q, TOLERANCE)
    _assert_close(actual_k, expected_k, TOLERANCE)


def test_rope_on_views_of_a_fused_qkv_projection() -> None:
    """q and k as strided views into one [T, (H + 2 Hkv) * D] projection output."""
    gen = _generator(6)
    tokens, heads, kv_heads, head_dim = 5, 6, 2, 32
    qkv = _randn(gen, tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.float16)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    angles = torch.rand(20, head_dim // 2, generator=gen) * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 20, (tokens,), generator=gen)
    expected_q, expected_k = reference.rope(q, k, positions, cos_sin)
    actual_q, actual_k = tk.rope(q, k, positions, cos_sin)
    _assert_close(actual_q, expected_q, TOLERANCE)
    _assert_close(actual_k, expected_k, TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [4, 5])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, seed: int) -> None:
    gen = _generator(seed)
    rows, features = _randint(gen, 1, 6), _randint(gen, 10, 1500)
    gate_up = (3.0 * _randn(gen, rows, 2 * features)).to(dtype)
    _assert_close(tk.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), TOLERANCE)


# ------------------------------------------------------------------------ attention.py

def _paged_cache(gen: torch.Generator, context_lens: list[int], block_size: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches (every slot filled, used or not) and shuffled block tables."""
    blocks_needed = [-(-ctx // block_size) for ctx in context_lens]
    spare_blocks = 3  # unused blocks full of noise: reading one would show
    n_blocks = sum(blocks_needed) + spare_blocks
    k_cache = _randn(gen, n_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(gen, n_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    shuffled = torch.randperm(n_blocks, generator=gen).to(torch.int32)
    block_tables = torch.full((len(context_lens), max(blocks_needed) + 1), n_blocks - 1,
                              dtype=torch.int32)
    taken = 0
    for i, count in enumerate(blocks_needed):
        block_tables[i, :count] = shuffled[taken:taken + count]
        taken += count
    return k_cache, v_cache, block_tables


def _check_attention(gen: torch.Generator, q_lens: list[int], context_lens: list[int],
                     block_size: int, kv_heads: int, group: int, head_dim: int,
                     dtype: torch.dtype, kv_splits: int | None = None) -> None:
    k_cache, v_cache, block_tables = _paged_cache(gen, context_lens, block_size, kv_heads,
                                                  head_dim, dtype)
    q = _randn(gen, sum(q_lens), kv_heads * group, head_dim, dtype=dtype)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    expected = reference.paged_attention(q, k_cache, v_cache, block_tables, lens,
                                         cu_seqlens_q, scale)
    if kv_splits is None:
        actual = tk.paged_attention(q, k_cache, v_cache, block_tables, lens, cu_seqlens_q,
                                    scale)
    else:
        actual = triton_attention.paged_attention_split_kv(
            q, k_cache, v_cache, block_tables, lens, cu_seqlens_q, scale, kv_splits)
    _assert_close(actual, expected, REDUCTION_TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,group,head_dim", [(8, 3, 64), (16, 1, 32), (16, 3, 64)])
def test_paged_attention_mixed_decode_and_prefill(dtype: torch.dtype, block_size: int,
                                                  group: int, head_dim: int) -> None:
    gen = _generator(block_size * 100 + group * 10 + head_dim)
    # A decode row, a prefill chunk over a cached prefix, a fresh prompt, another decode.
    q_lens = [1, _randint(gen, 2, 20), _randint(gen, 5, 24), 1]
    prefixes = [_randint(gen, 0, 40), _randint(gen, 1, 30), 0, _randint(gen, 10, 50)]
    context_lens = [prefix + q_len for prefix, q_len in zip(prefixes, q_lens)]
    _check_attention(gen, q_lens, context_lens, block_size, _randint(gen, 1, 3), group,
                     head_dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
def test_paged_attention_decode_only(dtype: torch.dtype, group: int) -> None:
    gen = _generator(7 + group)
    n_seqs = _randint(gen, 2, 5)
    context_lens = [_randint(gen, 1, 60) for _ in range(n_seqs)]
    _check_attention(gen, [1] * n_seqs, context_lens, 8, 2, group, 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_splits", [2, 5])
def test_paged_attention_split_kv_decode(dtype: torch.dtype, kv_splits: int) -> None:
    gen = _generator(20 + kv_splits)
    n_seqs = _randint(gen, 1, 4)
    context_lens = [_randint(gen, 1, 90) for _ in range(n_seqs)]
    _check_attention(gen, [1] * n_seqs, context_lens, 16, 2, 3, 64, dtype, kv_splits)


@pytest.mark.parametrize("kv_splits", [3, 4])
def test_paged_attention_split_kv_prefill(kv_splits: int) -> None:
    """Splits of a prefill tile hold rows that see no key of the split at all."""
    gen = _generator(30 + kv_splits)
    q_lens = [_randint(gen, 10, 30), 1, 0, _randint(gen, 2, 9)]
    context_lens = [q_lens[0], 40, 3, q_lens[3] + 50]
    _check_attention(gen, q_lens, context_lens, 8, 1, 3, 32, torch.float32, kv_splits)


def test_paged_attention_skips_empty_sequences() -> None:
    gen = _generator(11)
    _check_attention(gen, [3, 0, 17], [9, 5, 17], 16, 1, 3, 32, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16])
def test_store_kv_matches_reference(dtype: torch.dtype, block_size: int) -> None:
    gen = _generator(block_size)
    n_blocks, kv_heads, head_dim = 5, 3, 32
    tokens = _randint(gen, 1, n_blocks * block_size)
    k_cache = _randn(gen, n_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(gen, n_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    # New keys arrive in the cache dtype (the interpreter truncates float32 -> bfloat16
    # where a GPU rounds to nearest, so a converting store could not be compared exactly).
    k = _randn(gen, tokens, kv_heads, head_dim, dtype=dtype)
    v = _randn(gen, tokens, kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(n_blocks * block_size, generator=gen)[:tokens]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, expected_k, expected_v, slots)
    tk.store_kv(k, v, k_cache, v_cache, slots.to(torch.int32))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# ------------------------------------------------------------------------- sampling.py

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_matches_reference_for_fixed_uniforms(seed: int) -> None:
    gen = _generator(seed)
    rows, vocab = 8, _randint(gen, 300, 900)
    logits = 3.0 * torch.randn(rows, vocab, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.5, 1.0, 2.0, 0.9])
    top_k = torch.tensor([0, 0, 40, 0, 5, 0, 100, 1], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.95, 0.8, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.1, 0.0, 0.0])
    uniform = torch.rand(rows, generator=gen)
    expected = reference.sample(logits, temperature, top_k, top_p, min_p, uniform)
    actual = tk.sample(logits, temperature, top_k, top_p, min_p, uniform)
    assert actual.dtype == torch.long
    assert torch.equal(actual, expected)


def test_sample_large_vocab_and_extreme_filters_match_reference() -> None:
    gen = _generator(5)
    rows, vocab = 5, _randint(gen, 2500, 3500)
    logits = 2.0 * torch.randn(rows, vocab, generator=gen)
    temperature = torch.tensor([1.0, 0.8, 1.5, 1.0, 3.0])
    top_k = torch.tensor([vocab + 10, 0, 2000, 0, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.02, 0.99, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.9, 0.001])
    uniform = torch.rand(rows, generator=gen)
    expected = reference.sample(logits, temperature, top_k, top_p, min_p, uniform)
    assert torch.equal(tk.sample(logits, temperature, top_k, top_p, min_p, uniform), expected)


@pytest.mark.parametrize("edge_uniform", [0.0, 1.0])
def test_sample_uniform_at_the_interval_ends_matches_reference(edge_uniform: float) -> None:
    gen = _generator(8)
    rows, vocab = 4, 700
    logits = 2.0 * torch.randn(rows, vocab, generator=gen)
    temperature = torch.tensor([1.0, 0.6, 1.2, 1.0])
    top_k = torch.tensor([0, 30, 0, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.7, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2])
    uniform = torch.full((rows,), edge_uniform)
    expected = reference.sample(logits, temperature, top_k, top_p, min_p, uniform)
    assert torch.equal(tk.sample(logits, temperature, top_k, top_p, min_p, uniform), expected)


def test_sample_greedy_takes_lowest_id_among_tied_maxima() -> None:
    gen = _generator(3)
    logits = torch.randn(2, 50, generator=gen)
    logits[:, [7, 31]] = 10.0
    zeros = torch.zeros(2)
    chosen = tk.sample(logits, zeros, torch.zeros(2, dtype=torch.int32), torch.ones(2), zeros,
                       torch.rand(2, generator=gen))
    assert chosen.tolist() == [7, 7]


# --------------------------------------------------------------------- quant_matmul.py

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_of_x", [1, 3, 37])
def test_quant_matmul_matches_dequantized_matmul(qtype: str, dtype: torch.dtype,
                                                 rows_of_x: int) -> None:
    gen = _generator(rows_of_x)
    n, k = _randint(gen, 20, 70), 32 * _randint(gen, 2, 9)
    weight = quantize(torch.randn(n, k, generator=gen), qtype)
    x = _randn(gen, rows_of_x, k, dtype=dtype)
    expected = (x.float() @ dequantize(weight).t()).to(dtype)
    actual = tk.quant_matmul(x, weight)
    atol, rtol = REDUCTION_TOLERANCE[dtype]
    scale = float(expected.float().abs().max())
    assert actual.dtype == dtype and actual.shape == (rows_of_x, n)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows_of_x", [1, 8, 9])
def test_quant_matmul_long_k_around_the_decode_limit(qtype: str, rows_of_x: int) -> None:
    """A long K makes the decode path split K across programs (partial last split);
    8 rows is the last decode-shaped size, 9 the first prefill-shaped one."""
    gen = _generator(40 + rows_of_x)
    n, k = _randint(gen, 5, 40), 32 * _randint(gen, 37, 45)
    weight = quantize(torch.randn(n, k, generator=gen), qtype)
    x = _randn(gen, rows_of_x, k, dtype=torch.float16)
    expected = (x.float() @ dequantize(weight).t()).to(torch.float16)
    atol, rtol = REDUCTION_TOLERANCE[torch.float16]
    scale = float(expected.float().abs().max())
    torch.testing.assert_close(tk.quant_matmul(x, weight).float(), expected.float(),
                               atol=atol * scale, rtol=rtol)


def test_quant_matmul_keeps_leading_dims() -> None:
    gen = _generator(9)
    weight = quantize(torch.randn(24, 64, generator=gen), "Q4_0")
    x = torch.randn(2, 5, 64, generator=gen)
    expected = x @ dequantize(weight).t()
    actual = tk.quant_matmul(x, weight)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------- GPU compilation, no GPU

def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the GPU compiler rejects: compile every kernel (bf16
    variants, first autotune config) for an H100 in a clean process without a GPU."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "llama_engine.kernels.triton._compile_check", "--arch", "90",
         "--dtypes", "bf16"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
