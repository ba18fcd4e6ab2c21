"""Triton kernels (GPU; tested on the CPU with TRITON_INTERPRET=1)."""
from llama_engine.kernels.triton.attention import paged_attention, store_kv  # noqa: F401
from llama_engine.kernels.triton.lora import lora_expand, lora_shrink  # noqa: F401
from llama_engine.kernels.triton.norm import rms_norm, rope, silu_and_mul  # noqa: F401
from llama_engine.kernels.triton.quant_matmul import quant_matmul  # noqa: F401
from llama_engine.kernels.triton.sampling import sample  # noqa: F401
