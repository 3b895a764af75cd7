# Two commands for a newcomer: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint faults bench clean

install: $(STAMP)

# Re-runs only when the project's dependency list changes. torch comes first and
# pinned, so pip takes the local CPU build instead of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
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
	rm -rf $(VENV) .flexor reports
