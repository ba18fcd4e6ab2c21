"""The Triton batched LoRA kernels against the einsum reference, run on the CPU by Triton's
interpreter (TRITON_INTERPRET must be set before triton is first imported)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from llama_engine.kernels import reference  # noqa: E402
from llama_engine.kernels.triton import lora  # noqa: E402
from tests.lora_cases import make_case  # noqa: E402
from tests.triton_device import on_device  # noqa: E402

triton_lora = on_device(lora)

# (atol, rtol) relative to outputs of order 1: float32 is exact up to summation order; the
# half types round x, the weights and (in the expand's tl.dot) h to the dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3),
             torch.bfloat16: (4e-2, 4e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("decode", [True, False])
def test_triton_lora_matches_reference(dtype, rank, decode) -> None:
    num_slices, dora = (3, True) if rank == 16 else (1 + decode, False)
    case = make_case(rank * 10 + decode, decode=decode, rank=rank, num_slices=num_slices,
                     dora=dora, dtype=dtype, max_tokens=24, max_k=80, max_slice=70)
    m, s = case.mapping, case.stack
    h = triton_lora.lora_shrink(case.x, s.a_stack, m.seg_indptr, m.seg_slots, m.max_seg_len)
    expected_h = reference.lora_shrink(case.x, s.a_stack, m.seg_indptr, m.seg_slots)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(h, expected_h, atol=atol, rtol=rtol)
    y = case.y.clone()
    out = triton_lora.lora_expand(y, h, s.b_stack, s.slice_offsets, s.scales, m.seg_indptr,
                                  m.seg_slots, m.max_seg_len, s.magnitude_ratio)
    expected = reference.lora_expand(case.y.clone(), expected_h, s.b_stack, s.slice_offsets,
                                     s.scales, m.seg_indptr, m.seg_slots, s.magnitude_ratio)
    assert out is y and y.dtype == dtype
    torch.testing.assert_close(y.float(), expected.float(), atol=atol, rtol=rtol)
