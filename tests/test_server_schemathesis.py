"""schemathesis, driven by the server's own /openapi.json, finds no 5xx and no response that
breaks the documented schema, status codes or media types.

This module is also the schemathesis hooks module for that run (SCHEMATHESIS_HOOKS): it
registers a deserializer for the batch routes' application/jsonl answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import schemathesis
except ImportError:  # the test below skips; nothing to register
    schemathesis = None

from tests.server_process import running_server

MAX_MODEL_LEN = 64  # bounds every generation (max_tokens=0 runs to the context limit)
MAX_EXAMPLES = 4  # per operation and phase: keeps the run to a couple of minutes on a CPU
RUN_TIME_BUDGET_S = 150  # a bound on the whole run: the coverage phase alone could take longer
SEED = 20261123
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
HOOKS_MODULE = Path(__file__).stem


if schemathesis is not None:
    @schemathesis.deserializer("application/jsonl")
    def _jsonl(ctx: Any, response: Any) -> Any:
        """Each line must be a valid response; schemathesis then checks the first against
        the documented schema, and this function checks every line against the same model."""
        from server.schemas import llama_stack as ls
        from server.schemas import memory_banks as mb

        model = {"/inference/batch_chat_completion": ls.ChatCompletionResponse,
                 "/inference/batch_completion": ls.CompletionResponse,
                 "/memory_banks/get": mb.MemoryBank, "/memory_bank/get": mb.MemoryBankDocument,
                 "/memory_bank/delete": mb.DeletedDocument}[ctx.operation.path]
        lines = [line for line in response.content.decode("utf-8").splitlines() if line]
        for line in lines:
            model.model_validate_json(line)
        if not lines:  # an empty list (no memory banks yet): no line to check; schemathesis skips
            raise NotImplementedError("empty application/jsonl body")
        return json.loads(lines[0])


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_or_schema_violations(tmp_path: Path) -> None:
    if schemathesis is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    executable = Path(sys.executable).with_name("schemathesis")
    with running_server("--max-model-len", str(MAX_MODEL_LEN)) as server:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS_MODULE,
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run(
            [str(executable), "run", f"{server.base_url}/openapi.json", "--checks", CHECKS,
             "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
             "--max-time", str(RUN_TIME_BUDGET_S), "--request-timeout", "120", "--no-shrink",
             "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")],
            capture_output=True, text=True, env=env, timeout=RUN_TIME_BUDGET_S * 2)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "No issues found" in output or " passed" in output, output[-3000:]
        assert "Internal Server Error" not in server.log()
