"""Model hyper-parameters, read from GGUF metadata or an HF config.json."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RopeScaling:
    """llama3-type rope scaling (Llama 3.1+): long wavelengths are slowed by ``factor``."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")


def rope_inv_freq(config: ModelConfig) -> list[float]:
    """Inverse frequencies of the rotary embedding, with llama3 scaling applied if set."""
    dim = config.head_dim
    inv_freq = [1.0 / config.rope_theta ** (i / dim) for i in range(0, dim, 2)]
    factors = config.extra.get("rope_freq_factors")
    if factors is not None:  # GGUF stores llama3 scaling precomputed, one divisor a frequency
        return [f / factor for f, factor in zip(inv_freq, factors)]
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            scaled.append(f)
        elif wavelen > low_wavelen:
            scaled.append(f / s.factor)
        else:  # smooth blend between the two regimes
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            scaled.append((1 - smooth) * f / s.factor + smooth * f)
    return scaled
