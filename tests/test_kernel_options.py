"""Kernel options are read where they are used, importing the library changes nothing in
the process, and a missing extension is loud (a warning, then an error) unless the torch
reference is asked for."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llama_engine import kernels
from llama_engine.kernels import KernelOptions, reference
from llama_engine.openmp import SPIN_COUNT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("GOMP_SPINCOUNT", "LLAMA_ENGINE_KERNELS")}
    environment.update(env, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=300)


# Makes llama_engine._C unimportable, as a failed or missing build does.
BLOCK_EXTENSION = """
    import sys
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "llama_engine._C":
                raise ImportError("undefined symbol: made up for the test")
    sys.meta_path.insert(0, Blocker())
"""


def test_a_broken_build_warns_on_import_and_fails_on_use() -> None:
    result = _run(BLOCK_EXTENSION + """
    import warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from llama_engine import kernels
    assert any("LLAMA_ENGINE_KERNELS=torch" in str(w.message) for w in caught), caught
    try:
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    except RuntimeError as error:
        print("raised:", error)
    """)
    assert result.returncode == 0, result.stderr
    assert "raised: llama_engine._C cannot be imported (undefined symbol" in result.stdout


def test_a_broken_build_runs_the_reference_when_asked() -> None:
    result = _run(BLOCK_EXTENSION + """
    import torch
    from llama_engine import kernels
    from llama_engine.kernels import reference
    x, w = torch.randn(2, 8), torch.rand(8)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5)[0], reference.rms_norm(x, w, 1e-5)[0])
    print("ok")
    """, LLAMA_ENGINE_KERNELS="torch")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_importing_the_library_sets_nothing_and_the_programs_set_the_spin_policy() -> None:
    result = _run("""
    import os, sys
    import llama_engine, llama_engine.cli
    from llama_engine import LLM
    print("torch loaded:", "torch" in sys.modules, "spin:", os.environ.get("GOMP_SPINCOUNT"))
    from llama_engine.openmp import configure_openmp
    print("in time:", configure_openmp(), "spin:", os.environ["GOMP_SPINCOUNT"])
    """)
    assert result.returncode == 0, result.stderr
    assert "torch loaded: False spin: None" in result.stdout
    assert f"in time: True spin: {SPIN_COUNT}" in result.stdout


def test_the_command_sets_the_spin_policy_before_torch_and_a_user_value_wins() -> None:
    code = """
    import os, sys
    from llama_engine import cli
    try:
        cli.main(["no-such-command"])
    except SystemExit:
        pass
    print("spin:", os.environ.get("GOMP_SPINCOUNT"))
    """
    assert f"spin: {SPIN_COUNT}" in _run(code).stdout
    assert "spin: 5" in _run(code, GOMP_SPINCOUNT="5").stdout


def test_options_come_from_the_environment_and_are_read_at_each_call() -> None:
    assert KernelOptions.from_env({}) == KernelOptions("auto", False)
    assert KernelOptions.from_env({"LLAMA_ENGINE_KERNELS": "torch",
                                   "LLAMA_ENGINE_INT8_ACTIVATIONS": "1"}) == \
        KernelOptions("torch", True)
    with pytest.raises(ValueError, match="backend"):
        KernelOptions.from_env({"LLAMA_ENGINE_KERNELS": "cuda"})
    # the C++ rope rotates in place, the reference returns new tensors: which ran shows
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    angles = torch.arange(4)[:, None] * torch.rand(4)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1)
    previous = kernels.configure(KernelOptions(backend="torch"))
    try:
        q_in = q.clone()
        rotated, _ = kernels.rope(q_in, k.clone(), torch.arange(3), cos_sin)
        assert torch.equal(q_in, q) and rotated is not q_in
    finally:
        kernels.configure(previous)
    if kernels._cpu is not None:
        q_in = q.clone()
        rotated, _ = kernels.rope(q_in, k.clone(), torch.arange(3), cos_sin)
        assert rotated is q_in
        torch.testing.assert_close(rotated, reference.rope(q, k, torch.arange(3), cos_sin)[0])
