"""Every GGUF tensor type the loader accepts, against transformers on the same weights.

A tiny random Llama (GQA, untied head, llama3 rope scaling) is written as GGUF the way
llama.cpp's converter writes it (Q/K rows permuted, llama3 scaling as rope_freqs); the
transformers reference gets the same weights rounded through the format."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from llama_engine import LLM
from llama_engine.config import ModelConfig, RopeScaling, rope_inv_freq
from llama_engine.quant import dequantize, quantize
from tests.test_model_vs_transformers import check_logits

LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
ROPE_THETA = 500000.0


def tiny_hf_model(seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=ROPE_THETA, tie_word_embeddings=False, rope_scaling=dict(SCALING))
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives Q and K (rotary halves interleaved)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def round_trip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    if qtype == "F16":
        return w.half().float()
    if qtype == "BF16":
        return w.bfloat16().float()
    if qtype == "F32":
        return w.clone()
    return dequantize(quantize(w, qtype))


def tensor_bytes(w: torch.Tensor, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.numpy().astype(np.float32), kind
    if qtype == "F16":
        return w.numpy().astype(np.float16), kind
    if qtype == "BF16":
        return w.bfloat16().view(torch.int16).numpy().view(np.uint16), kind
    return quantize(w, qtype).data.numpy(), kind


def copy_tokenizer(writer: gguf.GGUFWriter, source: str) -> None:
    reader = gguf.GGUFReader(source)

    def field(key):
        return reader.fields[key].contents()

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(field("tokenizer.ggml.tokens"))
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_token_merges(field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))


def write_gguf(model, qtype: str, path: str, tokenizer_source: str) -> None:
    """Round the model's matrices through ``qtype`` (in place) and write them as GGUF."""
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    copy_tokenizer(writer, tokenizer_source)
    ours = ModelConfig(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                       c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                       c.max_position_embeddings, rope_theta=ROPE_THETA)
    plain = torch.tensor(rope_inv_freq(ours))
    ours.rope_scaling = RopeScaling(SCALING["factor"], SCALING["low_freq_factor"],
                                    SCALING["high_freq_factor"],
                                    SCALING["original_max_position_embeddings"])
    writer.add_tensor("rope_freqs.weight", (plain / torch.tensor(rope_inv_freq(ours))).numpy()
                      .astype(np.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms stay float32, as llama.cpp keeps them
                gname = {"model.norm.weight": "output_norm.weight"}.get(name)
                if gname is None:
                    layer, rest = name.split(".")[2], name.split(".")[3]
                    gname = f"blk.{layer}." + {"input_layernorm": "attn_norm",
                                               "post_attention_layernorm": "ffn_norm"}[rest] + ".weight"
                writer.add_tensor(gname, p.numpy().astype(np.float32))
                continue
            p.copy_(round_trip(p, qtype))
            if name == "model.embed_tokens.weight":
                gname, w = "token_embd.weight", p
            elif name == "lm_head.weight":
                gname, w = "output.weight", p
            else:
                layer, module = name.split(".")[2], ".".join(name.split(".")[3:5])
                gname, w = f"blk.{layer}.{LAYER_NAMES[module]}.weight", p
                if module == "self_attn.q_proj":
                    w = llamacpp_permute(p, c.num_attention_heads)
                elif module == "self_attn.k_proj":
                    w = llamacpp_permute(p, c.num_key_value_heads)
            data, kind = tensor_bytes(w.contiguous(), qtype)
            writer.add_tensor(gname, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_type_matches_transformers(qtype, tmp_path, default_gguf):
    model = tiny_hf_model()
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(model, qtype, path, default_gguf)
    llm = LLM(path)
    ids = llm.get_tokenizer().encode("grouped query attention on a tiny random llama " * 6)
    check_logits(llm, model, ids[:64])
