"""Run the Triton kernel tests on a real GPU without rewriting them.

The tests build their inputs on the CPU with seeded CPU generators. Under
``TRITON_INTERPRET=1`` (CI) the kernels take those CPU tensors as they are. On a machine
with CUDA and ``TRITON_INTERPRET=0``, ``on_device(module)`` wraps a kernel module so each
call copies its tensor arguments to the GPU, runs the compiled kernel, copies in-place
results back into the caller's tensors and returns outputs on the CPU, where the test
compares them with the torch reference.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from llama_engine.quant import PackedWeight

ON_GPU = os.environ.get("TRITON_INTERPRET", "1") == "0" and torch.cuda.is_available()


def _to_gpu(value: Any, moved: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    if isinstance(value, torch.Tensor):
        gpu = value.cuda()
        moved.append((value, gpu))
        return gpu
    if isinstance(value, PackedWeight):
        return value.to("cuda")
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        items = [_to_gpu(v, moved) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _to_cpu(value: Any, moved: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    if isinstance(value, torch.Tensor):
        for cpu, gpu in moved:  # an argument returned as is: hand back the caller's tensor
            if value is gpu:
                return cpu
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v, moved) for v in value)
    return value


class _OnGPU:
    def __init__(self, module: ModuleType):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._module, name)
        if not callable(target) or isinstance(target, type):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            moved: list[tuple[torch.Tensor, torch.Tensor]] = []
            gpu_args = [_to_gpu(a, moved) for a in args]
            gpu_kwargs = {k: _to_gpu(v, moved) for k, v in kwargs.items()}
            result = target(*gpu_args, **gpu_kwargs)
            torch.cuda.synchronize()
            for cpu, gpu in moved:  # kernels that write in place (rope, store_kv, expand)
                cpu.copy_(gpu)
            return _to_cpu(result, moved)
        return call


def on_device(module: ModuleType) -> Any:
    """The module itself under the interpreter; a GPU-running proxy of it on a real GPU."""
    return _OnGPU(module) if ON_GPU else module
