"""Batched LoRA kernels (shrink, expand, DoRA ratio) against the einsum reference, and the
reference against merged dense weights: mixed adapter slots including "no adapter",
ranks 8 to 64, decode and prefill-like segments, fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from llama_engine import kernels
from llama_engine.kernels import reference
from tests.lora_cases import make_case, merged_answer

cpu = pytest.importorskip("llama_engine.kernels.cpu")
cpu_lora = pytest.importorskip("llama_engine.kernels.cpu.lora")

RANKS = [8, 16, 32, 64]
# float32 sums over K (up to 200 terms) and R: a few ulp of the output scale.
ATOL, RTOL = 2e-5, 2e-5


def _reference(case) -> torch.Tensor:
    m = case.mapping
    h = reference.lora_shrink(case.x, case.stack.a_stack, m.seg_indptr, m.seg_slots)
    return reference.lora_expand(case.y.clone(), h, case.stack.b_stack, case.stack.slice_offsets,
                                 case.stack.scales, m.seg_indptr, m.seg_slots,
                                 case.stack.magnitude_ratio)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("decode", [True, False])
def test_reference_matches_merged_weights(rank: int, decode: bool) -> None:
    case = make_case(rank + decode, decode=decode, rank=rank, num_slices=3, dora=True)
    torch.testing.assert_close(_reference(case).double(), merged_answer(case), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("num_slices,dora", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_kernels_match_reference(rank, decode, num_slices, dora, seed) -> None:
    case = make_case(100 * seed + rank, decode=decode, rank=rank, num_slices=num_slices,
                     dora=dora)
    m = case.mapping
    h = cpu.lora_shrink(case.x, case.stack.a_stack, m.seg_indptr, m.seg_slots)
    expected_h = reference.lora_shrink(case.x, case.stack.a_stack, m.seg_indptr, m.seg_slots)
    torch.testing.assert_close(h, expected_h, atol=ATOL, rtol=RTOL)
    y = case.y.clone()
    out = cpu.lora_expand(y, h, case.stack.b_stack, case.stack.slice_offsets, case.stack.scales,
                          m.seg_indptr, m.seg_slots, case.stack.magnitude_ratio)
    assert out is y
    torch.testing.assert_close(y, _reference(case), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("num_slices,dora", [(1, True), (3, False)])
def test_cpu_add_lora_in_one_call_matches_reference(rank, decode, num_slices, dora) -> None:
    case = make_case(rank + 7 * decode + num_slices, decode=decode, rank=rank,
                     num_slices=num_slices, dora=dora)
    s, m = case.stack, case.mapping
    y = case.y.clone()
    assert cpu.add_lora(y, case.x, s.a_stack, s.b_stack, s.slice_offsets, s.scales,
                        m.seg_indptr, m.seg_slots, s.magnitude_ratio) is y
    torch.testing.assert_close(y, _reference(case), atol=ATOL, rtol=RTOL)


def test_cpu_add_lora_rejects_mixed_weight_dtypes() -> None:
    case = make_case(4, decode=True, rank=8, num_slices=1, dora=False)
    s, m = case.stack, case.mapping
    with pytest.raises(ValueError, match="a_stack"):
        cpu.add_lora(case.y.clone(), case.x, s.a_stack.bfloat16(), s.b_stack, s.slice_offsets,
                     s.scales, m.seg_indptr, m.seg_slots)


@pytest.mark.parametrize("decode", [True, False])
def test_cpu_kernels_read_bfloat16_weights(decode) -> None:
    """bfloat16 stacks: the same values as the reference reads them (upcast), float32 math."""
    case = make_case(11 + decode, decode=decode, rank=16, num_slices=3, dora=True)
    s = case.stack._replace(a_stack=case.stack.a_stack.bfloat16(),
                            b_stack=case.stack.b_stack.bfloat16())
    m = case.mapping
    y = kernels.add_lora(case.y.clone(), case.x, s, m)
    h = reference.lora_shrink(case.x, s.a_stack, m.seg_indptr, m.seg_slots)
    expected = reference.lora_expand(case.y.clone(), h, s.b_stack, s.slice_offsets, s.scales,
                                     m.seg_indptr, m.seg_slots, s.magnitude_ratio)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("isa", [i for i in cpu_lora.ISAS if cpu_lora.isa_supported(i)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_instruction_set_matches_reference(isa, dtype, decode, seed) -> None:
    """The AVX-512, AVX2 and baseline kernels this CPU runs, each on random shapes (sizes
    that are not whole vectors included), against the reference reading the same weights."""
    case = make_case(31 + seed + 2 * decode, decode=decode, rank=8 * (seed + 1), num_slices=3,
                     dora=bool(seed))
    s = case.stack._replace(a_stack=case.stack.a_stack.to(dtype),
                            b_stack=case.stack.b_stack.to(dtype))
    m = case.mapping
    h = cpu.lora_shrink(case.x, s.a_stack, m.seg_indptr, m.seg_slots, isa=isa)
    expected_h = reference.lora_shrink(case.x, s.a_stack, m.seg_indptr, m.seg_slots)
    torch.testing.assert_close(h, expected_h, atol=ATOL, rtol=RTOL)
    expected = reference.lora_expand(case.y.clone(), expected_h, s.b_stack, s.slice_offsets,
                                     s.scales, m.seg_indptr, m.seg_slots, s.magnitude_ratio)
    y = cpu.lora_expand(case.y.clone(), h, s.b_stack, s.slice_offsets, s.scales, m.seg_indptr,
                        m.seg_slots, s.magnitude_ratio, isa=isa)
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=RTOL)
    y = cpu.add_lora(case.y.clone(), case.x, s.a_stack, s.b_stack, s.slice_offsets, s.scales,
                     m.seg_indptr, m.seg_slots, s.magnitude_ratio, isa=isa)
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=RTOL)


def test_unknown_instruction_set_is_named() -> None:
    case = make_case(2, decode=True, rank=8, num_slices=1, dora=False)
    with pytest.raises(ValueError, match="isa: 'sse9'"):
        cpu.lora_shrink(case.x, case.stack.a_stack, case.mapping.seg_indptr,
                        case.mapping.seg_slots, isa="sse9")


def test_cpu_kernels_run_threaded_sizes() -> None:
    """Large enough that the work is split over threads (prefill: long segments)."""
    case = make_case(7, decode=False, rank=16, num_slices=3, dora=True, max_tokens=400,
                     max_k=600, max_slice=600)
    y = kernels.add_lora(case.y.clone(), case.x, case.stack, case.mapping)
    torch.testing.assert_close(y, _reference(case), atol=1e-4, rtol=1e-4)


def test_base_rows_untouched_and_zero_h() -> None:
    case = make_case(3, decode=True, rank=8, num_slices=1, dora=True)
    h = kernels.lora_shrink(case.x, case.stack.a_stack, case.mapping)
    y = kernels.add_lora(case.y.clone(), case.x, case.stack, case.mapping)
    for t, slot in enumerate(case.token_slots):
        if slot < 0:
            assert torch.equal(y[t], case.y[t]) and not h[t].any()


def test_mapping_merges_neighbouring_segments() -> None:
    m = kernels.lora_mapping([1, 1, 3, 0, 2, 1], [2, 2, -1, -1, 0, 2])
    assert m.seg_indptr.tolist() == [0, 2, 5, 7, 8]
    assert m.seg_slots.tolist() == [2, -1, 0, 2]
    assert m.max_seg_len == 3


def test_dispatch_keeps_gradients() -> None:
    """With autograd on, the dispatch takes the differentiable reference: gradients reach
    x and the adapter weights, and match the merged-weight formula's."""
    case = make_case(5, decode=False, rank=8, num_slices=2, dora=False)
    a = case.stack.a_stack.clone().requires_grad_()
    x = case.x.clone().requires_grad_()
    stack = case.stack._replace(a_stack=a)
    y = kernels.add_lora(case.y.clone(), x, stack, case.mapping)
    y.sum().backward()
    x_ref = case.x.clone().requires_grad_()
    a_ref = case.stack.a_stack.clone().requires_grad_()
    m = case.mapping
    h = reference.lora_shrink(x_ref, a_ref, m.seg_indptr, m.seg_slots)
    reference.lora_expand(case.y.clone(), h, stack.b_stack, stack.slice_offsets, stack.scales,
                          m.seg_indptr, m.seg_slots).sum().backward()
    assert a.grad is not None and x.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(a.grad, a_ref.grad)


@pytest.mark.parametrize("bad_slots,message", [([0, 9], "seg_slots"), ([0, -2], "seg_slots")])
def test_cpu_rejects_bad_segments(bad_slots, message) -> None:
    case = make_case(1, decode=True, rank=8, num_slices=1, dora=False)
    indptr = torch.tensor([0, 1, case.x.shape[0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        cpu.lora_shrink(case.x, case.stack.a_stack, indptr, torch.tensor(bad_slots))


def test_cpu_rejects_segments_not_covering_tokens() -> None:
    case = make_case(2, decode=True, rank=8, num_slices=1, dora=False)
    with pytest.raises(ValueError, match="seg_indptr"):
        cpu.lora_shrink(case.x, case.stack.a_stack, torch.tensor([0, 1]), torch.tensor([0]))
