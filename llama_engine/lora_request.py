"""LoRARequest: which adapter a request runs with, as in vLLM."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class LoRARequest:
    """An adapter for a request (``None`` in its place means the base model).

    lora_name: the adapter's name (what the API's ``model`` field gives); lora_int_id: a
    positive id unique to these weights for the engine's lifetime (the prefix cache and
    the adapter slots are keyed by it, so reusing it for other weights is a bug);
    lora_path: a PEFT folder or a GGUF adapter file. Equal and hashed by name, as vLLM's.
    """
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name: must not be empty")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id: must be a positive integer, got {self.lora_int_id!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
