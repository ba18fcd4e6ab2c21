"""The adapters of a serving engine: all of them in host memory, up to ``max_loras`` of them
resident in device slots, stacked per projection for the batched LoRA kernels.

Our model fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``
(model/llama.py, ``concat_rows``), so an adapter's per-projection weights land on output
slices of the fused projection (layout: the batched LoRA section of kernels/reference.py). Slot weights
are zero wherever an adapter leaves a projection (or part of its rank) alone, so one
stacked product serves every slot. The stacks' rank is the largest rank of any adapter
added so far (at most max_lora_rank): adapters of rank 16 served with max_lora_rank 64
cost rank-16 work.

An adapter of the output head (PEFT's ``lm_head``) has its own stack, [slots, r, hidden] and
[slots, r, vocab] (B alone is vocab x r: 49152 x 16 for SmolLM2, 3 MiB a slot in float32),
laid out once any such adapter is added, in the same slots and at the same rank as the
rest; the logits of a step's sampled (and prompt-logprob) rows get it (``LoRAStep.head``).

Slots are handed out least recently used first: a step's adapters are made resident
(``prepare_step``), evicting idle ones when the slots are full; an evicted adapter is
copied back from host memory the next time a step asks for it. The scheduler keeps a
step's distinct adapters within max_loras, so a step always fits.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import torch

from llama_engine import kernels
from llama_engine.config import ModelConfig
from llama_engine.engine.sequence import NO_LORA
from llama_engine.loader import HEAD_FORMAT
from llama_engine.loader.adapters import (HEAD_KEY, PROJECTIONS, AdapterLoadError,
                                          LoRAAdapter, ServedHead, adapted_shape,
                                          load_lora_adapter, projection_shapes, resolve_dora)
from llama_engine.quant import TORCH_FORMATS
from llama_engine.lora_request import LoRARequest
from llama_engine.model.llama import Linear, Llama

# The model's fused projections (DecoderLayer attributes) and, in row order, the adapter
# projections inside each.
FUSED_PROJECTIONS = {"qkv_proj": ("wq", "wk", "wv"), "o_proj": ("wo",),
                     "gate_up_proj": ("w_gate", "w_up"), "down_proj": ("w_down",)}
FUSED_OF = {proj: name for name, parts in FUSED_PROJECTIONS.items() for proj in parts}
# A model Linear's part names (PEFT's, Linear.parts) -> the fused projection holding them.
FUSED_OF_PART = {module: FUSED_OF[proj] for module, (_, proj) in PROJECTIONS.items()}

# base_weight(layer, projection) -> that projection's dense weight [out, in] (its rows of the
# fused weight, dequantized when packed): what DoRA's per-row norm is taken of.
BaseWeightFn = Callable[[int, str], torch.Tensor]


class LoRAStep:
    """The adapters of one forward pass: the token -> slot mapping and, per decoder layer
    and fused projection, the stacked weights, where any of the step's adapters adapts it.
    The model's ``Adapters`` for that pass (``model.llama.Adapters``)."""

    def __init__(self, mapping: kernels.LoRAMapping,
                 stacks: list[dict[str, kernels.LoRAStack | None]],
                 native: Callable[[int, str, kernels.LoRAStack], object],
                 head_stack: kernels.LoRAStack | None = None,
                 head_slots: list[int] | None = None):
        """native(layer, projection, stack): the stack's kernels.lora_projection (cached by
        the manager, which knows when a stack changes). head_stack: the output head's
        stack when an adapter of this step adapts it, head_slots the slot of each scheduled
        sequence in it (-1: its adapter leaves the head alone, or the base)."""
        self.mapping = mapping
        self.stacks = stacks
        self.native = native
        self.head_stack, self.head_slots = head_stack, head_slots
        self._segments: object | None = None  # for the fused layers, built on first use
        self._fusable: bool | None = None

    def stack(self, layer: int, projection: str) -> kernels.LoRAStack | None:
        """The weights for `projection` ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        of a decoder layer, or None when no adapter of this step touches it."""
        return self.stacks[layer][projection]

    def apply(self, layer: int, projection: str, x: torch.Tensor, y: torch.Tensor
              ) -> torch.Tensor:
        """y = x @ W^T ([T, N]) of the base projection, updated in place with each token's
        adapter (x [T, K]). Returns y."""
        stack = self.stacks[layer][projection]
        return y if stack is None else kernels.add_lora(y, x, stack, self.mapping)

    def fused(self, layer: int) -> kernels.LayerLoRA | None:
        """The ``Adapters`` protocol: a layer's stacks for the fused decoder-layer kernel
        (None where it cannot run them: the layer then calls ``__call__`` per projection)."""
        if self._fusable is None:
            used = [st for layer_stacks in self.stacks for st in layer_stacks.values() if st]
            self._segments = kernels.lora_segments(self.mapping, used)
            self._fusable = self._segments is not None
        if not self._fusable:
            return None
        stacks = self.stacks[layer]
        return kernels.LayerLoRA(self._segments, tuple(
            None if stacks[name] is None else self.native(layer, name, stacks[name])
            for name in FUSED_PROJECTIONS))

    def __call__(self, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The ``Adapters`` protocol: ``apply`` for the projection `linear` is."""
        return self.apply(linear.layer, FUSED_OF_PART[next(iter(linear.parts))], x, y)

    def head(self, rows_per_seq: list[int]) -> HeadLoRA | None:
        """The output head's adapters for the rows whose logits the step computes,
        rows_per_seq[i] of them for scheduled sequence i in turn (its sampled position and
        any prompt-logprob positions); None when none of those rows has a head adapter."""
        if self.head_stack is None or not any(
                n and slot >= 0 for n, slot in zip(rows_per_seq, self.head_slots)):
            return None
        mapping = kernels.lora_mapping(rows_per_seq, self.head_slots,
                                       self.head_stack.a_stack.device)
        return HeadLoRA(self.head_stack, mapping)


class HeadLoRA:
    """The output head's adapters over one step's logit rows: the model's ``Adapters`` for
    ``Llama.compute_logits``. Each row with slot s gets s_s * (h A_s^T) B_s^T added across
    the vocabulary (DoRA: times the per-token ratio), through the same batched shrink and
    expand as the decoder projections (``kernels.add_lora``); rows with no slot keep the
    base logits."""

    def __init__(self, stack: kernels.LoRAStack, mapping: kernels.LoRAMapping):
        self.stack, self.mapping = stack, mapping

    def __call__(self, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [N, vocab] float32 logits of hidden x [N, C], updated in place; returns y."""
        return kernels.add_lora(y, x, self.stack, self.mapping)


class LoRAManager:
    """Adapters by lora_int_id: loaded once into host memory, resident in at most
    `max_loras` device slots at a time."""

    def __init__(self, config: ModelConfig, max_loras: int, max_lora_rank: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 base_weight: BaseWeightFn | None = None, has_lm_head: bool = True,
                 served_head: ServedHead | None = None):
        """dtype: of the stacked A and B (scales and DoRA ratios stay float32). On the CPU,
        bfloat16 halves the bytes the kernels stream per step, at bfloat16's rounding of
        the adapter weights (about 3 significant digits); float32 reproduces peft.
        has_lm_head: False for a reward model (a score head), which refuses head adapters.
        served_head: the output head a peft adapter's saved copy of it must equal
        (``served_head_of``); None checks that copy's shape only."""
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} and "
                             f"{max_lora_rank}")
        self.config = config
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.device, self.dtype = torch.device(device), dtype
        self.base_weight = base_weight
        self.has_lm_head = has_lm_head
        self.served_head = served_head
        self.shapes = projection_shapes(config)
        self.adapters: dict[int, LoRAAdapter] = {}  # host memory, by lora_int_id
        self.requests: dict[int, LoRARequest] = {}
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # resident, least recent first
        self.rank = 0  # the stacks' rank
        self.stacks: list[dict[str, kernels.LoRAStack]] = []
        # the output head's stack, once an adapter of the head has been added
        self.head_stack: kernels.LoRAStack | None = None
        # kernels.lora_projection of each (layer, projection, with DoRA ratio) stack, made
        # when a step first needs it; the slots are copied in place, so it lasts until the
        # stacks are laid out again.
        self._natives: dict[tuple[int, str, bool], object] = {}

    # ---------------------------------------------------------------- host memory

    def add_adapter(self, request: LoRARequest, adapter: LoRAAdapter | None = None
                    ) -> LoRAAdapter:
        """Load request.lora_path (or take `adapter`, already read) into host memory. Adding
        the same request again is a no-op. Raises AdapterLoadError for an unreadable or
        unfitting adapter, or a name or id already taken by another adapter."""
        known = self.requests.get(request.lora_int_id)
        if known is not None:
            if (known.lora_name, known.lora_path) == (request.lora_name, request.lora_path):
                return self.adapters[request.lora_int_id]
            raise AdapterLoadError(f"lora_int_id {request.lora_int_id} is already taken by "
                                   f"adapter '{known.lora_name}'")
        if any(r.lora_name == request.lora_name for r in self.requests.values()):
            raise AdapterLoadError(f"an adapter named '{request.lora_name}' is already loaded")
        if adapter is None:
            adapter = load_lora_adapter(request.lora_path, self.config, self.max_lora_rank,
                                        request.lora_name, self.served_head)
        if HEAD_KEY in adapter.weights and not self.has_lm_head:
            raise AdapterLoadError(f"adapter '{request.lora_name}' adapts lm_head, which this "
                                   "model lacks (a reward model: a score head instead)")
        if adapter.rank > self.max_lora_rank:
            raise AdapterLoadError(f"adapter '{request.lora_name}': rank {adapter.rank} exceeds "
                                   f"max_lora_rank {self.max_lora_rank}")
        if adapter.uses_dora:
            if self.base_weight is None:
                raise AdapterLoadError(f"adapter '{request.lora_name}' uses DoRA, which needs "
                                       "the base weights: none were given to the manager")
            resolve_dora(adapter, self.base_weight)
        self.adapters[request.lora_int_id] = adapter
        self.requests[request.lora_int_id] = request
        if adapter.rank > self.rank or (HEAD_KEY in adapter.weights and self.head_stack is None):
            self._allocate(max(adapter.rank, self.rank))
        return adapter

    def remove_adapter(self, lora_int_id: int) -> None:
        """Forget an adapter (host memory and slot). Raises KeyError naming an unknown id."""
        if lora_int_id not in self.adapters:
            raise KeyError(f"no adapter with lora_int_id {lora_int_id}")
        del self.adapters[lora_int_id], self.requests[lora_int_id]
        self.slot_of.pop(lora_int_id, None)

    def list_adapters(self) -> list[LoRARequest]:
        return list(self.requests.values())

    # ---------------------------------------------------------------- device slots

    def activate(self, lora_int_ids: Iterable[int]) -> dict[int, int]:
        """Make these adapters resident and most recently used; returns id -> slot.
        Raises KeyError for an unknown id, ValueError for more adapters than slots."""
        wanted = list(dict.fromkeys(i for i in lora_int_ids if i != NO_LORA))
        for lora_int_id in wanted:
            if lora_int_id not in self.adapters:
                raise KeyError(f"no adapter with lora_int_id {lora_int_id} is loaded")
        if len(wanted) > self.max_loras:
            raise ValueError(f"a step uses {len(wanted)} adapters; max_loras is {self.max_loras}")
        for lora_int_id in wanted:
            if lora_int_id not in self.slot_of:
                self._load_slot(lora_int_id, self._free_slot(set(wanted)))
            self.slot_of.move_to_end(lora_int_id)
        return {i: self.slot_of[i] for i in wanted}

    def prepare_step(self, seg_lens: list[int], lora_int_ids: list[int]) -> LoRAStep | None:
        """The LoRAStep of a forward pass whose tokens are segments of `seg_lens` (one per
        scheduled sequence, in batch order) run with `lora_int_ids` (NO_LORA: the base);
        None when every token runs on the base model."""
        if all(i == NO_LORA for i in lora_int_ids):
            return None
        slots = self.activate(lora_int_ids)
        mapping = kernels.lora_mapping(seg_lens, [slots.get(i, -1) for i in lora_int_ids],
                                       self.device)
        adapted, dora = set(), set()
        for lora_int_id in slots:
            for (layer, proj), w in self.adapters[lora_int_id].weights.items():
                key = HEAD_KEY if (layer, proj) == HEAD_KEY else (layer, FUSED_OF[proj])
                adapted.add(key)
                if w.magnitude_ratio is not None:
                    dora.add(key)
        step_stacks = [{name: _for_step(stack, (layer, name) in adapted, (layer, name) in dora)
                        for name, stack in layer_stacks.items()}
                       for layer, layer_stacks in enumerate(self.stacks)]
        head_slots = [slots[i] if i in slots and HEAD_KEY in self.adapters[i].weights else -1
                      for i in lora_int_ids]
        head_stack = (_for_step(self.head_stack, HEAD_KEY in adapted, HEAD_KEY in dora)
                      if self.head_stack is not None else None)
        return LoRAStep(mapping, step_stacks, self._native, head_stack, head_slots)

    def _native(self, layer: int, name: str, stack: kernels.LoRAStack) -> object:
        key = (layer, name, stack.magnitude_ratio is not None)
        native = self._natives.get(key)
        if native is None:
            native = self._natives[key] = kernels.lora_projection(stack)
        return native

    def _free_slot(self, keep: set[int]) -> int:
        used = set(self.slot_of.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        for lora_int_id in self.slot_of:  # least recently used first
            if lora_int_id not in keep:
                return self.slot_of.pop(lora_int_id)
        raise AssertionError("activate() checked that the step fits in the slots")

    def _allocate(self, rank: int) -> None:
        """(Re)lay the stacks out at `rank` (the head's too, when an adapter adapts the
        head) and copy the resident adapters back in."""
        self.rank = rank
        self.stacks = []
        self._natives.clear()
        for _ in range(self.config.num_layers):
            layer_stacks = {}
            for name, parts in FUSED_PROJECTIONS.items():
                offsets = [0]
                for proj in parts:
                    offsets.append(offsets[-1] + self.shapes[proj][0])
                layer_stacks[name] = self._zero_stack(len(parts), rank, self.shapes[parts[0]][1],
                                                      tuple(offsets))
            self.stacks.append(layer_stacks)
        self.head_stack = None
        if any(HEAD_KEY in adapter.weights for adapter in self.adapters.values()):
            vocab, hidden = adapted_shape(self.config, HEAD_KEY)
            self.head_stack = self._zero_stack(1, rank, hidden, (0, vocab))
        for lora_int_id, slot in self.slot_of.items():
            self._load_slot(lora_int_id, slot)

    def _zero_stack(self, num_slices: int, rank: int, in_features: int,
                    offsets: tuple[int, ...]) -> kernels.LoRAStack:
        """An empty stack of max_loras slots: num_slices sub-projections reading
        in_features inputs, their outputs side by side at `offsets`."""
        def zeros(*shape: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)
        return kernels.LoRAStack(zeros(self.max_loras, num_slices * rank, in_features),
                                 zeros(self.max_loras, rank, offsets[-1]),
                                 zeros(self.max_loras, num_slices, dtype=torch.float32),
                                 offsets, None)

    def _load_slot(self, lora_int_id: int, slot: int) -> None:
        """Copy an adapter from host memory into a slot of every stack."""
        adapter = self.adapters[lora_int_id]
        for layer, layer_stacks in enumerate(self.stacks):
            for name, parts in FUSED_PROJECTIONS.items():
                self._fill_slot(adapter, slot, (layer, name), [(layer, proj) for proj in parts])
        if self.head_stack is not None:
            self._fill_slot(adapter, slot, HEAD_KEY, [HEAD_KEY])
        self.slot_of[lora_int_id] = slot

    def _fill_slot(self, adapter: LoRAAdapter, slot: int, stack_key: tuple[int, str],
                   parts: list[tuple[int, str]]) -> None:
        """One stack's slot: zero, then the adapter's weights for each of its sub-projections
        (`parts`, keys of adapter.weights in the stack's slice order) that it adapts."""
        stack = self._stack(stack_key)
        rank = self.rank
        stack.a_stack[slot].zero_()
        stack.b_stack[slot].zero_()
        stack.scales[slot].zero_()
        if stack.magnitude_ratio is not None:
            stack.magnitude_ratio[slot].fill_(1.0)
        for p, key in enumerate(parts):
            w = adapter.weights.get(key)
            if w is None:
                continue
            lo, hi = stack.slice_offsets[p], stack.slice_offsets[p + 1]
            stack.a_stack[slot, p * rank:p * rank + w.rank] = w.a
            stack.b_stack[slot, :w.rank, lo:hi] = w.b.t()
            stack.scales[slot, p] = w.scale
            if w.magnitude_ratio is not None:
                stack = self._with_ratio(stack_key)
                stack.magnitude_ratio[slot, lo:hi] = w.magnitude_ratio

    def _stack(self, key: tuple[int, str]) -> kernels.LoRAStack:
        """The stack of (layer, fused projection name), or the head's for HEAD_KEY."""
        return self.head_stack if key == HEAD_KEY else self.stacks[key[0]][key[1]]

    def _with_ratio(self, key: tuple[int, str]) -> kernels.LoRAStack:
        """The stack of `key` (as ``_stack``), given a DoRA ratio of ones (every slot plain
        LoRA) if it had none."""
        stack = self._stack(key)
        if stack.magnitude_ratio is None:
            n = stack.b_stack.shape[2]
            stack = stack._replace(magnitude_ratio=torch.ones(
                self.max_loras, n, dtype=torch.float32, device=self.device))
            if key == HEAD_KEY:
                self.head_stack = stack
            else:
                self.stacks[key[0]][key[1]] = stack
                self._natives.pop((*key, True), None)
        return stack


def _for_step(stack: kernels.LoRAStack, adapted: bool, dora: bool
              ) -> kernels.LoRAStack | None:
    """What a step needs of a stack: nothing when none of its adapters touches the
    projection, no ratio (all ones for it) when none of them uses DoRA there."""
    if not adapted:
        return None
    return stack if dora else stack._replace(magnitude_ratio=None)


def base_weights_of(model: Llama) -> BaseWeightFn:
    """base_weight for a model: a projection's rows of its fused weight (HEAD_KEY: the
    output head, the embedding when tied), float32, dequantized on demand when packed
    (DoRA's norms are taken of it)."""
    def base_weight(layer: int, projection: str) -> torch.Tensor:
        if (layer, projection) == HEAD_KEY:
            linear, (lo, hi) = model.lm_head, (0, None)
        else:
            linear = getattr(model.layers[layer], FUSED_OF[projection])
            module = next(m for m, (_, proj) in PROJECTIONS.items() if proj == projection)
            lo, hi = linear.parts[module]
        w = linear.matrix
        return (kernels.dequantize(w) if linear.packed is not None else w)[lo:hi].float()
    return base_weight


def served_head_of(model: Llama, config: ModelConfig) -> ServedHead | None:
    """The model's output head as adapters.ServedHead: its values (dequantized when packed)
    and the formats they went through (the GGUF file's type, if any, then the packed
    format or the serving dtype). None for a model without one (a reward model)."""
    head = model.lm_head
    if head is None:
        return None
    served = head.qtype if head.packed is not None else TORCH_FORMATS[head.weight.dtype]
    source = config.extra.get(HEAD_FORMAT)
    return ServedHead(lambda: base_weights_of(model)(*HEAD_KEY),
                      tuple(dict.fromkeys(f for f in (source, served) if f)))
