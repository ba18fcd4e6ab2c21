"""C++ kernels (``llama_engine._C``) behind torch-facing wrappers: float32 CPU tensors."""
from llama_engine.kernels.cpu.ops import (  # noqa: F401
    attention_metadata, cross_entropy, paged_attention, rms_norm, rope, sample, silu_and_mul,
    silu_and_mul_backward, store_kv,
    store_kv_and_attend)
from llama_engine.kernels.cpu.quant import dequantize, packed_view, quant_matmul  # noqa: F401
from llama_engine.kernels.cpu.decoder_layer import (  # noqa: F401
    decoder_layer, decoder_layer_params, o_proj_and_mlp, qkv_projection)
from llama_engine.kernels.cpu.lora import (  # noqa: F401
    add_lora, lora_expand, lora_projection, lora_segments, lora_shrink)
