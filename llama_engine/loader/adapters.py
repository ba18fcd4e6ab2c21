"""LoRA / DoRA adapters: PEFT folders and llama.cpp GGUF adapters, read into one typed form.

PEFT: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``), keys such as
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (A [r, in]), ``...lora_B
.weight`` (B [out, r]) and, for DoRA, ``...lora_magnitude_vector`` (m [out]). The scale of
a module is alpha / r (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r)), with r read from its
tensors and alpha from ``alpha_pattern`` or ``lora_alpha``, matched as PEFT matches module
names (a pattern key matches the name or a dotted suffix of it).

The output head (PEFT's ``lm_head``, keys ``base_model.model.lm_head.lora_A.weight`` ..., A
[r, hidden], B [vocab, r]) may be adapted too, tied embeddings or not: as in PEFT, the update
goes to the logits only and the embedding lookup stays the base's. It is kept under
``HEAD_KEY`` beside the decoder layers' (layer, projection) keys. Beside a head adapter peft
saves a copy of the frozen head itself (``base_model.model.lm_head.base_layer.weight``, its
``save_embedding_layers``, on by default when ``lm_head`` is targeted). peft, loading the
adapter, writes that copy over the model's head (and, tied, over the embedding), so the
adapter's output is its trainer's only over the base it was saved against: the copy is
checked against the served head (shape, then values within the rounding of the formats the
two went through, ``quant.rounding_bound``), a mismatch refused by name, and not kept.

llama.cpp (``convert_lora_to_gguf.py``): ``general.type = adapter``, ``adapter.lora.alpha``,
tensors ``blk.N.attn_q.weight.lora_a`` [r, in] and ``.lora_b`` [out, r] (``output.weight
.lora_a`` / ``.lora_b`` for the head); the converter
permutes Q/K rows as it does for the base, so B's rows are permuted back here. Scale as in
llama.cpp's ``llama_adapter_lora_weight::get_scale``: alpha / r, or 1 when alpha is 0.

Everything comes out float32 under the model's own projection names (``wq`` .. ``w_down``).
DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5; PEFT's
``DoraLinearLayer``) adapts W to m * (W + s B A) / ||W + s B A||_row; at serving time the
per-row ratio m / ||W + s B A||_row is computed once (``resolve_dora``), after which
y = ratio * (W x + s B A x) costs what a LoRA costs.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from llama_engine.config import ModelConfig
from llama_engine.loader import ModelLoadError
from llama_engine.quant import TORCH_FORMATS, rounding_bound

# HF module name -> (parent module, our projection name)
PROJECTIONS = {
    "q_proj": ("self_attn", "wq"), "k_proj": ("self_attn", "wk"), "v_proj": ("self_attn", "wv"),
    "o_proj": ("self_attn", "wo"), "gate_proj": ("mlp", "w_gate"), "up_proj": ("mlp", "w_up"),
    "down_proj": ("mlp", "w_down"),
}
# our projection name -> (parent module, HF module name): how messages name a projection
HF_NAMES = {ours: (parent, module) for module, (parent, ours) in PROJECTIONS.items()}
# llama.cpp tensor name (between "blk.N." and ".weight.lora_a/b") -> our projection name
GGUF_PROJECTIONS = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
                    "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
# The output head: PEFT's module name, and the key of its adapter in LoRAAdapter.weights (the
# head is in no decoder layer: layer -1, as the model's own head Linear says).
LM_HEAD = "lm_head"
HEAD_KEY = (-1, LM_HEAD)
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# "base_model.model." + the adapted model's own names: "model.layers..." for a model with
# a head (LlamaForCausalLM), "layers..." for a bare LlamaModel.
PEFT_KEY = re.compile(r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\."
                      r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
PEFT_HEAD_KEY = re.compile(r"base_model\.model\.lm_head\."
                           r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
PEFT_HEAD_COPY_KEY = "base_model.model.lm_head.base_layer.weight"
GGUF_KEY = re.compile(r"blk\.(\d+)\.(\w+)\.weight\.(lora_a|lora_b)")
GGUF_HEAD_KEY = re.compile(r"output\.weight\.(lora_a|lora_b)")
# A reward adapter (PEFT task_type SEQ_CLS) also saves the classification head it trained:
# PEFT's default modules_to_save for that task, and the head's key.
SCORE_MODULES = ("classifier", "score")
PEFT_SCORE_KEY = "base_model.model.score.weight"
# PEFT options that change what the adapter computes in ways this engine does not run:
# option -> the value that means "off".
UNSUPPORTED_PEFT_OPTIONS = {
    "modules_to_save": None, "lora_bias": False, "fan_in_fan_out": False,
    "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
    "alora_invocation_tokens": None, "use_qalora": False,
}


class AdapterLoadError(ModelLoadError):
    """An adapter that cannot be served: the message names the file, key or option, and why."""


@dataclass(frozen=True)
class ServedHead:
    """The output head adapters are served over, for checking peft's saved copy of it.

    weight() -> its values, float32 [vocab, hidden] (dequantized when packed); formats: every
    format its values were rounded through on their way here (GGUF type names: the file's
    type, the packed format or the serving dtype), which bound how far they may lie from the
    weights a trainer saw."""
    weight: Callable[[], torch.Tensor]
    formats: tuple[str, ...]


@dataclass
class LoRAWeights:
    """One adapted projection: y += scale * B (A x), or with DoRA
    y = magnitude_ratio * (W x + scale * B A x).

    a float32 [r, in], b float32 [out, r]; magnitude (DoRA's m) float32 [out] or None;
    magnitude_ratio float32 [out], m / ||W + scale B A||_row, set by ``resolve_dora``.
    """
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    magnitude_ratio: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    """An adapter in memory: its weights per (decoder layer, projection name), and the
    output head's under HEAD_KEY when it adapts the head."""
    name: str
    path: str
    weights: dict[tuple[int, str], LoRAWeights] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank of any adapted projection."""
        return max((w.rank for w in self.weights.values()), default=0)

    @property
    def uses_dora(self) -> bool:
        return any(w.magnitude is not None for w in self.weights.values())


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out features, in features) of each projection of a decoder layer."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    c, f = config.hidden_size, config.intermediate_size
    return {"wq": (q, c), "wk": (kv, c), "wv": (kv, c), "wo": (c, q),
            "w_gate": (f, c), "w_up": (f, c), "w_down": (c, f)}


def adapted_shape(config: ModelConfig, key: tuple[int, str]) -> tuple[int, int]:
    """(out features, in features) of an adapted weight: a decoder-layer projection, or for
    HEAD_KEY the output head [vocab, hidden]."""
    if key == HEAD_KEY:
        return config.vocab_size, config.hidden_size
    return projection_shapes(config)[key[1]]


def load_lora_adapter(path: str, config: ModelConfig, max_rank: int,
                      name: str | None = None, served_head: ServedHead | None = None
                      ) -> LoRAAdapter:
    """Read a PEFT adapter folder or a llama.cpp GGUF adapter file for a base with `config`
    (``served_head``: the head peft's saved copy of it must equal; None checks its shape only).

    Raises AdapterLoadError naming the problem: a missing or unreadable file, an option
    this engine cannot honour (modules_to_save, bias training, ...), a target the model
    lacks, a shape that does not fit the base (the head's: [vocab, hidden]), a rank above
    `max_rank`, a saved copy of the head other than the served one (another base).
    """
    name = name or os.path.basename(os.path.normpath(path))
    if not os.path.exists(path):
        raise AdapterLoadError(f"adapter '{name}': path does not exist: {path}")
    if os.path.isdir(path):
        weights = _read_peft(path, config, served_head=served_head)
    else:
        weights = _read_gguf(path, config)
    if not weights:
        raise AdapterLoadError(f"adapter '{name}' ({path}): no LoRA weights in it")
    for key, w in weights.items():
        _check_fits(name, key, w, adapted_shape(config, key), max_rank)
    return LoRAAdapter(name, path, weights)


def dora_magnitude_ratio(base_weight: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
    """m / ||W + scale B A||_row, float32 [out]: DoRA's per-output-row factor (the norm of
    each output row of the adapted weight, over its inputs, as PEFT's get_weight_norm)."""
    adapted = base_weight.float() + w.scale * (w.b @ w.a)
    return w.magnitude / torch.linalg.vector_norm(adapted, dim=1)


def resolve_dora(adapter: LoRAAdapter, base_weight: Callable[[int, str], torch.Tensor]) -> None:
    """Fill in magnitude_ratio for every DoRA projection; base_weight(layer, projection)
    returns that projection's dense weight [out, in] (dequantized when the base is packed;
    for HEAD_KEY the output head's [vocab, hidden])."""
    for (layer, proj), w in adapter.weights.items():
        if w.magnitude is not None and w.magnitude_ratio is None:
            w.magnitude_ratio = dora_magnitude_ratio(base_weight(layer, proj), w)


# ------------------------------------------------------------------------------ PEFT

def _read_peft(folder: str, config: ModelConfig,
               tensors: dict[str, torch.Tensor] | None = None,
               allow_score_head: bool = False, served_head: ServedHead | None = None
               ) -> dict[tuple[int, str], LoRAWeights]:
    """The LoRA weights of a PEFT folder (``tensors``: its tensors, already read, without
    any score head; ``served_head``: what a saved copy of the head must equal)."""
    options = _read_peft_config(folder, allow_score_head)
    tensors = _read_peft_tensors(folder) if tensors is None else tensors
    use_dora = bool(options.get("use_dora"))
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key == PEFT_HEAD_COPY_KEY:
            _check_head_copy(folder, key, tensor, config, served_head)
            continue
        head = PEFT_HEAD_KEY.fullmatch(key)
        if head is not None:
            layer, kind = HEAD_KEY[0], head[1]
            _check_dora_tensor(folder, key, kind, use_dora)
            parts.setdefault((layer, LM_HEAD), {})[kind] = tensor.float()
            continue
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise AdapterLoadError(f"{folder}: tensor '{key}' adapts something other than the "
                                   f"projections of a decoder layer ({', '.join(PROJECTIONS)}) "
                                   f"or the output head ({LM_HEAD}), which this engine cannot "
                                   "serve")
        layer, parent, module, kind = int(match[1]), match[2], match[3], match[4]
        if PROJECTIONS.get(module, ("",))[0] != parent:
            raise AdapterLoadError(f"{folder}: tensor '{key}' targets '{parent}.{module}', "
                                   "which a llama decoder layer lacks")
        if layer >= config.num_layers:
            raise AdapterLoadError(f"{folder}: tensor '{key}' targets layer {layer}; the base "
                                   f"model has {config.num_layers} layers")
        _check_dora_tensor(folder, key, kind, use_dora)
        parts.setdefault((layer, module), {})[kind] = tensor.float()
    weights = {}
    for (layer, module), p in sorted(parts.items()):
        where = f"{folder}: {module_name((layer, module))}"
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            raise AdapterLoadError(f"{where}: needs both lora_A and lora_B")
        if use_dora and "lora_magnitude_vector" not in p:
            raise AdapterLoadError(f"{where}: use_dora is set but lora_magnitude_vector is "
                                   "missing")
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if a.dim() != 2:
            raise AdapterLoadError(f"{where}: lora_A has shape {tuple(a.shape)}, not [r, in]")
        r = a.shape[0]
        full_name = module_name((layer, module))
        key = HEAD_KEY if module == LM_HEAD else (layer, PROJECTIONS[module][1])
        alpha = float(_pattern_value(options.get("alpha_pattern") or {}, full_name,
                                     options.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if options.get("use_rslora") else alpha / r
        weights[key] = LoRAWeights(a.contiguous(), b.contiguous(), scale,
                                   p.get("lora_magnitude_vector"))
    return weights


def _check_head_copy(folder: str, key: str, tensor: torch.Tensor, config: ModelConfig,
                     served_head: ServedHead | None) -> None:
    """peft's copy of the frozen output head must be the base's shape, [vocab, hidden], and
    (served_head given) its values those of the served head, within the rounding of the
    copy's dtype and of the served head's formats."""
    shape = adapted_shape(config, HEAD_KEY)
    if tuple(tensor.shape) != shape:
        raise AdapterLoadError(f"{folder}: tensor '{key}' has shape {tuple(tensor.shape)}; the "
                               f"base model's output head is {list(shape)}: the adapter was "
                               "saved over another vocabulary or model")
    if served_head is None:
        return
    formats = {*served_head.formats, TORCH_FORMATS.get(tensor.dtype, "F32")}
    saved, served = tensor.float(), served_head.weight()
    error = (saved - served).abs()
    excess = error - rounding_bound(torch.maximum(saved.abs(), served.abs()), formats)
    worst = int(excess.argmax())
    if excess.view(-1)[worst] > 0:
        row, col = divmod(worst, shape[1])
        raise AdapterLoadError(
            f"{folder}: tensor '{key}' (peft's copy of the frozen output head, which peft "
            f"loads over the model's lm_head) differs from the served model's lm_head: "
            f"{saved[row, col].item():.6g} against {served[row, col].item():.6g} at "
            f"[{row}, {col}], beyond the rounding of {'/'.join(sorted(formats))}: the adapter "
            "was saved against a different base model; serve it over that base")


def _check_dora_tensor(folder: str, key: str, kind: str, use_dora: bool) -> None:
    if kind == "lora_magnitude_vector" and not use_dora:
        raise AdapterLoadError(f"{folder}: tensor '{key}' is a DoRA magnitude but "
                               "adapter_config.json has no use_dora")


def module_name(key: tuple[int, str]) -> str:
    """The HF / PEFT module name of an adapted weight, as users know it from
    ``target_modules`` and the model's ``named_modules()``: (3, "wq") or (3, "q_proj") ->
    "model.layers.3.self_attn.q_proj"; HEAD_KEY -> "lm_head"."""
    if key == HEAD_KEY:
        return LM_HEAD
    layer, projection = key
    parent, module = HF_NAMES.get(projection) or (PROJECTIONS[projection][0], projection)
    return f"model.layers.{layer}.{parent}.{module}"


def read_peft_reward_adapter(folder: str, config: ModelConfig
                             ) -> tuple[dict[tuple[int, str], LoRAWeights], torch.Tensor]:
    """A PEFT reward adapter (LoRA plus the score head it trained, ``modules_to_save``
    within classifier / score): its LoRA weights and ``score.weight`` [num_labels, hidden].
    Raises AdapterLoadError as ``load_lora_adapter`` does, or when the head is missing."""
    tensors = dict(_read_peft_tensors(folder))
    score = tensors.pop(PEFT_SCORE_KEY, None)
    if score is None:
        raise AdapterLoadError(f"{folder}: no '{PEFT_SCORE_KEY}' (a reward adapter saves its "
                               "score head with modules_to_save)")
    weights = _read_peft(folder, config, tensors, allow_score_head=True)
    if HEAD_KEY in weights:
        raise AdapterLoadError(f"{folder}: adapts {LM_HEAD}, which a reward model (a score "
                               "head instead of an LM head) lacks")
    for key, w in weights.items():
        _check_fits(folder, key, w, adapted_shape(config, key), max_rank=w.rank)
    return weights, score.float()


def _read_peft_config(folder: str, allow_score_head: bool = False) -> dict:
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(path):
        raise AdapterLoadError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        with open(path) as f:
            options = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{path}: cannot read: {e}") from e
    if not isinstance(options, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    peft_type = options.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterLoadError(f"{path}: peft_type '{peft_type}' is not supported (LORA only)")
    for option, off in UNSUPPORTED_PEFT_OPTIONS.items():
        value = options.get(option, off)
        if allow_score_head and option == "modules_to_save" and set(value or ()) <= set(SCORE_MODULES):
            continue
        if value not in (off, [], {}, None, False):
            raise AdapterLoadError(f"{path}: '{option}' = {value!r} is not supported: the "
                                   "engine serves LoRA weights on the decoder projections and the "
                                   "output head only")
    if options.get("bias", "none") != "none":
        raise AdapterLoadError(f"{path}: 'bias' = {options['bias']!r} is not supported (trained "
                               "biases); only 'none'")
    _check_target_modules(path, options.get("target_modules"))
    return options


def _check_target_modules(path: str, targets: object) -> None:
    """Every named target must be a decoder-layer projection or the output head; a regex
    must compile."""
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterLoadError(f"{path}: target_modules regex {targets!r} is invalid: {e}")
        return
    for target in targets:
        if str(target).rsplit(".", 1)[-1] not in (*PROJECTIONS, LM_HEAD):
            raise AdapterLoadError(f"{path}: target_modules names '{target}', which the model "
                                   f"cannot adapt (supported: {', '.join(PROJECTIONS)}, "
                                   f"{LM_HEAD})")


def _pattern_value(patterns: dict, name: str, default: object) -> object:
    """PEFT's rank/alpha pattern lookup: the first key that matches the whole module name `name`
    or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft_tensors(folder: str) -> dict[str, torch.Tensor]:
    for file_name in PEFT_WEIGHT_FILES:
        path = os.path.join(folder, file_name)
        if os.path.exists(path):
            break
    else:
        raise AdapterLoadError(f"{folder}: no {' nor '.join(PEFT_WEIGHT_FILES)}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # both readers raise many types on damaged files
        raise AdapterLoadError(f"{path}: cannot read adapter weights ({os.path.getsize(path)} "
                               f"bytes; truncated or damaged?): {type(e).__name__}: {e}") from e
    if not isinstance(tensors, dict):
        raise AdapterLoadError(f"{path}: expected a state dict of tensors")
    return tensors


# ------------------------------------------------------------------------------ GGUF

def _read_gguf(path: str, config: ModelConfig) -> dict[tuple[int, str], LoRAWeights]:
    from llama_engine.loader.gguf import open_reader, read_field, read_tensor, unpermute_rows
    reader = open_reader(path)
    kind = read_field(reader, "general.type", "model")
    if kind != "adapter" or read_field(reader, "adapter.type", "lora") != "lora":
        raise AdapterLoadError(f"{path}: not a LoRA adapter (general.type = {kind!r})")
    arch = read_field(reader, "general.architecture")
    if arch != "llama":
        raise AdapterLoadError(f"{path}: adapter for architecture '{arch}', not 'llama'")
    alpha = float(read_field(reader, "adapter.lora.alpha", 0.0))
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        head = GGUF_HEAD_KEY.fullmatch(t.name)
        match = GGUF_KEY.fullmatch(t.name)
        if head is not None:
            key, kind = HEAD_KEY, head[1]
        elif match is not None and match[2] in GGUF_PROJECTIONS:
            key, kind = (int(match[1]), GGUF_PROJECTIONS[match[2]]), match[3]
        else:
            raise AdapterLoadError(f"{path}: tensor '{t.name}' adapts something other than the "
                                   "projections of a decoder layer or the output head")
        if key[0] >= config.num_layers:
            raise AdapterLoadError(f"{path}: tensor '{t.name}' targets layer {key[0]}; the base "
                                   f"model has {config.num_layers} layers")
        parts.setdefault(key, {})[kind] = read_tensor(t, torch.float32, dequantize=True)
    heads = {"wq": config.num_heads, "wk": config.num_kv_heads}
    weights = {}
    for (layer, proj), p in sorted(parts.items()):
        if "lora_a" not in p or "lora_b" not in p:
            raise AdapterLoadError(f"{path}: {module_name((layer, proj))} needs both lora_a and "
                                   "lora_b")
        a, b = p["lora_a"], p["lora_b"]
        if proj in heads and b.dim() == 2 and b.shape[0] % (2 * heads[proj]) == 0:
            b = unpermute_rows(b, heads[proj])
        scale = alpha / a.shape[0] if alpha else 1.0
        weights[(layer, proj)] = LoRAWeights(a.contiguous(), b.contiguous(), scale)
    return weights


def _check_fits(name: str, key: tuple[int, str], w: LoRAWeights, shape: tuple[int, int],
                max_rank: int) -> None:
    out_features, in_features = shape
    where = f"adapter '{name}' {module_name(key)}"
    r = w.a.shape[0]
    if w.a.dim() != 2 or w.a.shape[1] != in_features:
        raise AdapterLoadError(f"{where}: lora_A has shape {tuple(w.a.shape)}, the base needs "
                               f"[r, {in_features}]: the adapter does not fit the base model")
    if tuple(w.b.shape) != (out_features, r):
        raise AdapterLoadError(f"{where}: lora_B has shape {tuple(w.b.shape)}, the base needs "
                               f"[{out_features}, {r}]: the adapter does not fit the base model")
    if w.magnitude is not None and tuple(w.magnitude.shape) != (out_features,):
        raise AdapterLoadError(f"{where}: magnitude has shape {tuple(w.magnitude.shape)}, "
                               f"expected [{out_features}]")
    if r > max_rank:
        raise AdapterLoadError(f"{where}: rank {r} exceeds max_lora_rank {max_rank}")
