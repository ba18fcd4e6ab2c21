"""Adapter fine-tuning (LoRA, rsLoRA, DoRA, QLoRA) on our own model, through the model's
adapter seam (``model/llama.py``: every projection is a ``Linear`` that hands its input and
output to the step's ``Adapters``). The base stays frozen; only the adapters train.
Implements ``TrainableModel``; checkpoints are PEFT adapter folders.

Formulas, with s the scale (alpha / r, or rsLoRA's alpha / sqrt(r), Kalajdzievski 2023):
  LoRA (Hu et al. 2021):  y = W x + s B A x,  A [r, in] Kaiming-uniform, B [out, r] zero.
  DoRA (Liu et al. 2024, eq. 5, PEFT's DoraLinearLayer):
      y = m / ||W + s B A||_row * (W x + s B A x), the norm detached from the graph
      (the paper's section 4.3), m [out] starting at ||W||_row.
  QLoRA (Dettmers et al. 2023): LoRA over a base held in NF4 with double-quantized absmax
      (``quant.quantize_nf4``); ``kernels.linear`` runs the packed matmuls forward and
      backward (``kernels.PackedLinear``), so the base is never dense as a whole.

QLoRA's recipe is memory first, as in the paper and in peft's
``prepare_model_for_kbit_training``: activation checkpointing per decoder layer is on unless
asked off (about a third more compute for the layers' recomputed forward; at SmolLM2's
2048-token batch it leaves a layer's inputs instead of all its activations). LoRA and DoRA
default to it off: their reason to exist is a cheaper step, not a smaller one. For every
method the SFT loss runs fused with the head in chunks (``losses.linear_cross_entropy``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama_engine import kernels
from llama_engine.errors import RecipeError
from llama_engine.config import ModelConfig
from llama_engine.loader import load_model
from llama_engine.loader.adapters import HEAD_KEY, PROJECTIONS, adapted_shape
from llama_engine.model.llama import Linear, Llama
from llama_engine.quant import NF4_BLOCK, PackedWeight, quantize_nf4
from llama_engine.training.attention import PackedCausalAttention
from llama_engine.training.batching import PackedBatch
from llama_engine.training.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from llama_engine.training.distributed import DataParallel, FSDPOptions, ShardableModel, shard_llama
from llama_engine.training.full import checkpointed_layers

LORA, QLORA, DORA = "lora", "qlora", "dora"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
OUTPUT_MODULE = "lm_head"
# torchtune's name for the attention output projection (the spec's lora_attn_modules use it)
MODULE_ALIASES = {"output_proj": "o_proj"}
PEFT_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model."
# the base model's weights that QLoRA packs (the norms stay float32, as in bitsandbytes)
NF4_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how: PEFT module names (``q_proj`` .. ``down_proj``, ``lm_head``),
    rank r > 0, alpha > 0, DoRA or not, rsLoRA scaling or not."""
    target_modules: tuple[str, ...]
    rank: int
    alpha: float
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        known = ATTENTION_MODULES + MLP_MODULES + (OUTPUT_MODULE,)
        for name in self.target_modules:
            if name not in known:
                raise RecipeError("lora_attn_modules", f"unknown module {name!r}; known: "
                                  f"{', '.join(known)} (and output_proj for o_proj)")
        if not self.target_modules:
            raise RecipeError("lora_attn_modules", "no module to adapt")
        if self.rank <= 0:
            raise RecipeError("rank", f"must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise RecipeError("alpha", f"must be positive, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def check_fits(self, config: ModelConfig) -> None:
        """Refuse a rank above the smallest dimension of an adapted projection: there B A
        is already any matrix of its shape, so the rest only costs memory (a mistyped rank
        of 100000 would fill it). Raises RecipeError naming rank."""
        for module in self.target_modules:
            key = HEAD_KEY if module == OUTPUT_MODULE else (0, PROJECTIONS[module][1])
            out_features, in_features = adapted_shape(config, key)
            if self.rank > min(out_features, in_features):
                raise RecipeError("rank", f"{self.rank} exceeds {module}'s smaller dimension "
                                  f"({in_features} -> {out_features}), where a full-rank update "
                                  f"needs only {min(out_features, in_features)}")

    @classmethod
    def from_config(cls, algorithm: str, config: dict[str, Any], use_rslora: bool = False
                    ) -> "LoRASpec":
        """From the spec's LoraFinetuningConfig fields (``lora_attn_modules``,
        ``apply_lora_to_mlp``, ``apply_lora_to_output``, ``rank``, ``alpha``); DoRA when
        ``algorithm`` is dora."""
        modules = [MODULE_ALIASES.get(m, m) for m in config["lora_attn_modules"]]
        if config.get("apply_lora_to_mlp"):
            modules += MLP_MODULES
        if config.get("apply_lora_to_output"):
            modules.append(OUTPUT_MODULE)
        return cls(tuple(dict.fromkeys(modules)), int(config["rank"]), float(config["alpha"]),
                   use_dora=algorithm == DORA, use_rslora=use_rslora)


    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "LoRASpec":
        """From a PEFT adapter_config.json (one rank and alpha for every module, named
        target modules). Raises ValueError for what this trainer cannot continue."""
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError("per-module ranks or alphas (rank_pattern, alpha_pattern) are not "
                             "supported")
        targets = config.get("target_modules")
        if not isinstance(targets, list):
            raise ValueError(f"target_modules {targets!r}: a list of module names expected")
        return cls(tuple(t.rsplit(".", 1)[-1] for t in targets), int(config.get("r", 8)),
                   float(config.get("lora_alpha", 8)), bool(config.get("use_dora")),
                   bool(config.get("use_rslora")))


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """A PEFT folder's adapter_config.json. Raises ValueError when missing or unreadable."""
    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read {ADAPTER_CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder}/{ADAPTER_CONFIG_FILE}: a JSON object expected")
    return config


class LoRALayer(nn.Module):
    """The adapter of one module (e.g. layer 3's q_proj): ``lora_A`` [r, in], ``lora_B``
    [out, r] and, for DoRA, ``magnitude`` [out]."""

    def __init__(self, in_features: int, out_features: int, spec: LoRASpec,
                 base_weight: torch.Tensor | None, generator: torch.Generator):
        super().__init__()
        self.scale = spec.scale
        a = torch.empty(spec.rank, in_features)
        # PEFT's (and nn.Linear's) initialisation: Kaiming-uniform with a = sqrt(5), i.e.
        # U(-1/sqrt(in), 1/sqrt(in)); B starts at zero so training starts at the base model.
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = nn.Parameter(a.uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(out_features, spec.rank))
        self.magnitude = None
        if spec.use_dora:
            self.magnitude = nn.Parameter(torch.linalg.vector_norm(base_weight.float(), dim=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_weight: torch.Tensor
                ) -> torch.Tensor:
        """DoRA: y [T, out] (the base projection's output for these columns) and x [T, in]
        to the adapted output (LoRA layers go through ``add_lora`` instead)."""
        lora = (x @ self.lora_A.t()) @ self.lora_B.t()
        with torch.no_grad():  # DoRA detaches the norm (Liu et al. 2024, section 4.3)
            # B A computed as PEFT does (its rounding), (A^T B^T)^T
            adapted = base_weight + self.scale * (self.lora_A.t() @ self.lora_B.t()).t()
            norm = torch.linalg.vector_norm(adapted, dim=1)
        ratio = self.magnitude / norm
        # ratio * (y + s * lora), in PEFT's order of float operations
        return y + ((ratio - 1) * y + ratio * lora * self.scale)


class TrainingAdapters(nn.Module):
    """The ``Adapters`` of a model being adapter-tuned: one ``LoRALayer`` per targeted module,
    ``layers[i][module]`` for the decoder layers and ``lm_head`` for the output head."""

    def __init__(self, model: Llama, spec: LoRASpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        for layer in model.layers:
            table = nn.ModuleDict()
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                for name, (start, end) in linear.parts.items():
                    if name in spec.target_modules:
                        table[name] = _layer_for(linear, start, end, spec, generator)
            self.layers.append(table)
        self.lm_head = None
        if OUTPUT_MODULE in spec.target_modules:
            head = model.lm_head
            self.lm_head = _layer_for(head, 0, _rows(head), spec, generator)

    def __call__(self, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        table = self.layers[linear.layer] if linear.layer >= 0 else {OUTPUT_MODULE: self.lm_head}
        parts = linear.parts or {OUTPUT_MODULE: (0, y.shape[-1])}
        adapters = {name: table[name] for name in parts if name in table}
        if not any(a is not None for a in adapters.values()):
            return y
        if all(a is None or a.magnitude is None for a in adapters.values()):
            lora = [(start, end, adapters[name]) for name, (start, end) in parts.items()
                    if adapters.get(name) is not None]
            return add_lora(y, x, lora)
        pieces, x32 = [], x.float()  # DoRA's norms and ratios are float32 math
        for name, (start, end) in parts.items():
            adapter = adapters.get(name)
            piece = y[..., start:end]
            if adapter is not None:
                base = _dense_rows(linear, start, end) if adapter.magnitude is not None else None
                piece = adapter(x32, piece.float(), base).to(y.dtype)
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def named_adapters(self) -> Iterator[tuple[str, LoRALayer]]:
        """(PEFT module path, adapter), e.g. ("model.layers.0.self_attn.q_proj", ...)."""
        for i, table in enumerate(self.layers):
            for name, adapter in table.items():
                yield f"model.layers.{i}.{PEFT_PARENT[name]}.{name}", adapter
        if self.lm_head is not None:
            yield OUTPUT_MODULE, self.lm_head

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights under PEFT's saved names."""
        out = {}
        for path, adapter in self.named_adapters():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = adapter.lora_A
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = adapter.lora_B
            if adapter.magnitude is not None:
                out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = adapter.magnitude
        return out


class _AddLoRA(torch.autograd.Function):
    """y[:, start:end] += s B (A x) for each adapted part of a projection's output, in place,
    one autograd node for the projection (see ``add_lora``)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, scale: float,
                spans: tuple[tuple[int, int], ...], *weights: torch.Tensor) -> torch.Tensor:
        a_weights, b_weights = weights[0::2], [b.to(y.dtype) for b in weights[1::2]]
        a = (a_weights[0] if len(a_weights) == 1 else torch.cat(a_weights)).to(x.dtype)  # [P r, in]
        h = x @ a.t()                                                      # [T, P r]
        scaled = (h * scale).to(y.dtype)
        rank = a_weights[0].shape[0]
        for i, ((start, end), b) in enumerate(zip(spans, b_weights)):
            y[:, start:end].addmm_(scaled[:, i * rank:(i + 1) * rank], b.t())
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, a, *b_weights)
        ctx.scale, ctx.spans, ctx.rank = scale, spans, rank
        ctx.weight_dtype = weights[0].dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, h, a, *b_weights = ctx.saved_tensors
        scale, rank, weight_dtype = ctx.scale, ctx.rank, ctx.weight_dtype
        grad_h = torch.cat([grad_y[:, start:end] @ b for (start, end), b
                            in zip(ctx.spans, b_weights)], dim=1).mul_(scale).to(x.dtype)  # [T, P r]
        h = h.to(grad_y.dtype)
        # dB^T = (A x)^T dy: [r, T] @ [T, out] runs ~3x faster in the BLAS than dy^T (A x)
        grad_b = [(h[:, i * rank:(i + 1) * rank].t() @ grad_y[:, start:end]).t()
                  .to(weight_dtype).mul_(scale) for i, (start, end) in enumerate(ctx.spans)]
        grad_a = (grad_h.t() @ x).to(weight_dtype).split(rank)
        grad_x = grad_h @ a if ctx.needs_input_grad[1] else None
        grads = [g for pair in zip(grad_a, grad_b) for g in pair]
        return (grad_y, grad_x, None, None, *grads)


def add_lora(y: torch.Tensor, x: torch.Tensor,
             lora: list[tuple[int, int, "LoRALayer"]]) -> torch.Tensor:
    """LoRA (Hu et al. 2021) over a projection's base output y [T, N] of x [T, in]:
    y[:, start:end] += s B A x for each (start, end, adapter), one rank and scale for all.

    y is updated in place and returned (the base matmul's output is not saved by it), so a
    step makes no [T, N] temporaries for the update, its scaling, a concatenation or a sum:
    s is applied to A x [T, r] rather than to the [T, N] product as PEFT does, which
    changes only the rounding. The backward gives dA = s (dy B)^T x, dB = s dy^T (A x) and
    dx = s (dy B) A, and passes dy to the base matmul unchanged.

    Precision: A x runs in x's dtype (over a bfloat16 base, x and the float32 A rounded to
    bfloat16 as ``torch.autocast`` rounds a matmul's operands; float32 sums), the update
    and dB in y's (float32 in training: ``DecoderLayer.projection_dtype``), dA and dx in
    x's; the gradients are returned in the weights' float32. dB from a float32 dy matters:
    with B at zero, AdamW's first step moves every element of B by lr times the sign of its
    gradient, and a bfloat16 dy flips enough small ones to move the second step's loss by
    ~0.1 on the training benchmark (SmolLM2, QLoRA, 2026-11-30), where a float32 dy keeps
    it within 3e-3 of transformers + peft in float32."""
    if not lora:
        return y
    spans = tuple((start, end) for start, end, _ in lora)
    weights = [w for _, _, adapter in lora for w in (adapter.lora_A, adapter.lora_B)]
    return _AddLoRA.apply(y, x, lora[0][2].scale, spans, *weights)


def _rows(linear: Linear) -> int:
    return linear.weight.shape[0] if linear.weight is not None else linear.rows


def _cols(linear: Linear) -> int:
    return linear.weight.shape[1] if linear.weight is not None else linear.cols


def _dense_rows(linear: Linear, start: int, end: int) -> torch.Tensor:
    """Rows start:end of the projection's weight, float32 (dequantized when packed)."""
    if linear.weight is not None:
        return linear.weight[start:end].float()
    return kernels.dequantize(linear.packed.select_rows(torch.arange(start, end)))


def _layer_for(linear: Linear, start: int, end: int, spec: LoRASpec,
               generator: torch.Generator) -> LoRALayer:
    base = _dense_rows(linear, start, end) if spec.use_dora else None
    return LoRALayer(_cols(linear), end - start, spec, base, generator)


def _lower_base_precision(model: Llama, dtype: torch.dtype) -> None:
    """The frozen projections of ``model`` (decoder layers and head) held and multiplied in
    ``dtype``; a packed (NF4) one stays packed and dequantizes to ``dtype``. A head tied to
    the embedding gets its own copy: the embedding lookup stays float32. The decoder
    layers' projections take ``dtype`` (``DecoderLayer.matmul_dtype``: what they multiply
    is rounded to it anyway, and the adapters' A x runs in it) and give float32, in which
    the adapters add their update (``add_lora``)."""
    for layer in model.layers:
        layer.matmul_dtype, layer.projection_dtype = dtype, torch.float32
    projections = [linear for layer in model.layers
                   for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
    for linear in projections + ([model.lm_head] if model.lm_head is not None else []):
        if linear.weight is not None:
            linear.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        linear.compute_dtype = dtype


def nf4_base(weights: dict[str, Any]) -> None:
    """Replace the decoder projections in ``weights`` by NF4, one matrix at a time, so the
    dense model never exists whole. The embedding and the output head stay float32, as in
    the QLoRA paper (Dettmers et al. 2023 quantize the transformer's linear layers) and as
    bitsandbytes does under transformers (``llm_int8_skip_modules`` keeps ``lm_head``; an
    embedding is no ``nn.Linear``): the loss then matches a transformers + peft +
    bitsandbytes run, and the head's [tokens, vocab] matmul, the largest of a step, runs
    dense. A matrix whose rows are not whole NF4 blocks (columns not a multiple of 64; no
    released Llama has one) stays as it is."""
    for name in list(weights):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in NF4_WEIGHTS and weights[name].shape[1] % NF4_BLOCK == 0:
            w = weights[name]
            dense = kernels.dequantize(w) if isinstance(w, PackedWeight) else w.float()
            weights[name] = quantize_nf4(dense)
            del w, dense
    for name in ("embed", "lm_head"):
        w = weights.get(name)
        if w is not None:  # a GGUF's table may be quantized or float16
            weights[name] = kernels.dequantize(w) if isinstance(w, PackedWeight) else w.float()


class AdapterFineTune(ShardableModel):
    """LoRA / DoRA / QLoRA training of ``model_path`` (a GGUF file or an HF folder)."""

    def __init__(self, model_path: str, spec: LoRASpec, quantize_base: bool = False,
                 activation_checkpointing: bool | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", base_dtype: torch.dtype = torch.float32):
        """``activation_checkpointing`` None: on for QLoRA (``quantize_base``), off for
        LoRA and DoRA (see the module docstring). ``base_dtype`` torch.bfloat16: the frozen
        decoder projections and head are held in bfloat16 (NF4 ones dequantize to it) and
        their matmuls run in it (``kernels.linear``'s ``compute_dtype``), the decoder
        projections taking bfloat16 activations and giving float32, the adapters' A x in
        bfloat16 (``add_lora``), while the adapter weights and their updates and gradients,
        norms, attention, residual stream, loss and optimizer stay float32: the recipe of
        bitsandbytes' ``bnb_4bit_compute_dtype=torch.bfloat16`` under peft (float32 adapters
        over a float32 residual stream). Raises RecipeError for DoRA over NF4 or
        another base_dtype."""
        if quantize_base and spec.use_dora:
            raise RecipeError("algorithm", "DoRA over an NF4 base is not offered; use dora or qlora")
        if base_dtype not in (torch.float32, torch.bfloat16):
            raise RecipeError("dtype", f"the frozen base is float32 or bfloat16, not {base_dtype}")
        loaded = load_model(model_path, torch.float32, dequantize=not quantize_base)
        spec.check_fits(loaded.config)
        if quantize_base:
            nf4_base(loaded.weights)
        self.source, self.tokenizer, self.config = model_path, loaded.tokenizer, loaded.config
        self.spec, self.quantized = spec, quantize_base
        self.device = torch.device(device)
        self.model = Llama(loaded.config, loaded.weights).to(self.device)
        del loaded
        self.model.requires_grad_(False)
        self.adapters = TrainingAdapters(self.model, spec, seed).to(self.device)
        self.base_dtype = base_dtype
        if base_dtype != torch.float32:
            _lower_base_precision(self.model, base_dtype)
        if quantize_base if activation_checkpointing is None else activation_checkpointing:
            checkpointed_layers(self.model)
        self._enabled = True

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch.input_ids, batch.positions, PackedCausalAttention(batch),
                          self.adapters if self._enabled else None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        adapters = self.adapters if self._enabled and self.adapters.lm_head is not None else None
        return self.model.compute_logits(hidden, adapters)

    def output_weight(self) -> torch.Tensor | None:
        head = self.model.lm_head
        if head is None or (self._enabled and self.adapters.lm_head is not None):
            return None
        return head.weight  # None when the head is packed

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def shard(self, group: DataParallel, options: FSDPOptions) -> None:
        """FSDP over ``group``: each decoder layer's adapters join the layer's unit (the head's
        adapter the root's), so a unit's frozen base weights and its trainable adapters are
        sharded, gathered and freed together; only the adapters get gradients. An NF4 base
        (QLoRA) is buffers, which FSDP leaves whole on every rank."""
        for layer, table in zip(self.model.layers, self.adapters.layers):
            layer.lora = table
        if self.adapters.lm_head is not None:
            self.model.lm_head_lora = self.adapters.lm_head
        self.fsdp_units = shard_llama(self.model, group, options)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The base model: the adapters switched off (DPO's reference policy)."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def adapter_config(self) -> dict[str, Any]:
        """adapter_config.json as PEFT writes it for this adapter."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.spec.rank,
                "lora_alpha": self.spec.alpha, "target_modules": sorted(self.spec.target_modules),
                "use_dora": self.spec.use_dora, "use_rslora": self.spec.use_rslora,
                "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
                "base_model_name_or_path": os.path.abspath(self.source)}

    def save_checkpoint(self, folder: Path, score_head: torch.Tensor | None = None) -> None:
        """A PEFT adapter folder; a reward model's score head is saved beside the adapter
        weights as PEFT saves a module_to_save (``base_model.model.score.weight``), with
        task_type SEQ_CLS."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = self.adapters.peft_state_dict()
        config = self.adapter_config()
        if score_head is not None:
            tensors[f"{PEFT_PREFIX}score.weight"] = score_head
            config.update(task_type="SEQ_CLS", modules_to_save=["score"])
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))

    def load_checkpoint(self, folder: Path) -> None:
        saved = load_file(os.path.join(folder, ADAPTER_WEIGHTS_FILE))
        with torch.no_grad():
            for name, param in self.adapters.peft_state_dict().items():
                param.copy_(saved[name])
