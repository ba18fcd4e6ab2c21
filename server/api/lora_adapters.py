"""LoRA adapters loaded and unloaded at run time, on vLLM's routes: each becomes a `model`
that every inference route (OpenAI and Llama Stack) accepts, running on its base model."""

from __future__ import annotations

from llama_engine.datasets.source import file_url_path
from server.api.errors import APIError
from server.api.registry import ModelRegistry
from server.schemas import openai as oa


class LoRAAdaptersService:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    async def load(self, request: oa.LoadLoRAAdapterRequest) -> oa.LoRAAdapterResponse:
        """400 naming a taken name or what is wrong with the adapter (missing or damaged
        files, a rank above the server's limit, a target or shape the base lacks).
        ``lora_path``: a path on the server, or a file:// URL (a training job's
        ``Checkpoint.path``)."""
        path = request.lora_path
        if path.startswith("file://"):
            try:
                path = str(file_url_path(path))
            except ValueError as e:
                raise APIError(f"lora_path: {e}", param="lora_path") from None
        adapter = await self.registry.load_adapter(request.lora_name, path)
        return oa.LoRAAdapterResponse(id=adapter.lora_name, parent=adapter.base.model_id,
                                      status="loaded")

    async def unload(self, request: oa.UnloadLoRAAdapterRequest) -> oa.LoRAAdapterResponse:
        """404 naming an adapter that is not loaded; requests running with it finish."""
        adapter = await self.registry.unload_adapter(request.lora_name)
        return oa.LoRAAdapterResponse(id=adapter.lora_name, parent=adapter.base.model_id,
                                      status="unloaded")
