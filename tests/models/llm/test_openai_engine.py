"""The OpenAI-compatible engine against a real llama.cpp server process on loopback."""

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from models.llm.engine import EngineError
from models.llm.openai_engine import OpenAIEngine
from models.llm.prompts import build_yes_no
from models.llm.specs import load_engine

PROMPTS = [
    build_yes_no("Was the customer annoyed?", ["customer: this is the third time I call, I am really annoyed"]),
    build_yes_no("Did the agent offer a refund?", ["agent: I can refund the double charge today"]),
    build_yes_no("Did the customer ask to cancel?", []),
]


@pytest.fixture(scope="module")
def engine(llama_server):
    engine = load_engine(f"openai:{llama_server}", concurrency=2, top_logprobs=20)
    yield engine
    engine.close()


def test_scores_are_probabilities_close_to_the_same_weights_in_transformers(engine, smollm2_engine):
    p = engine.score(PROMPTS)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    # Same weights (the GGUF the hf engine was converted from), same prompt, same parser.
    reference = smollm2_engine.score(PROMPTS)
    np.testing.assert_allclose(p, reference, atol=0.08)
    assert engine.model.endswith(".gguf")


def test_token_counts_match_the_tokenizer(engine, smollm2_engine):
    assert engine.count_tokens(PROMPTS) == smollm2_engine.count_tokens(PROMPTS)
    before = engine.stats.snapshot()
    engine.score(PROMPTS[:2])
    delta = engine.stats.snapshot() - before
    assert delta.prompts == 2 and delta.prompt_tokens == sum(smollm2_engine.count_tokens(PROMPTS[:2]))
    assert delta.generated_tokens == 2


def test_generate_returns_new_text(engine):
    [text] = engine.generate([PROMPTS[0]], max_tokens=4)
    assert isinstance(text, str) and text.strip() and not text.startswith("You review")


def test_a_bad_request_is_not_retried(llama_server, caplog):
    engine = OpenAIEngine(llama_server + "/no-such-prefix", model="m", retries=3, backoff_s=1.0)
    with caplog.at_level(logging.WARNING, logger="models.llm.openai_engine"), pytest.raises(EngineError) as info:
        engine.score(PROMPTS[:1])
    assert not info.value.retriable and "HTTP 404" in str(info.value)
    assert "attempts" not in str(info.value)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # one request, no backoff
    engine.close()


def test_an_unreachable_server_is_retriable_after_bounded_retries():
    engine = OpenAIEngine("http://127.0.0.1:9", model="m", retries=2, backoff_s=0.01, connect_timeout_s=0.5)
    with pytest.raises(EngineError, match="after 3 attempts") as info:
        engine.score(PROMPTS[:1])
    assert info.value.retriable
    engine.close()


class _FlakyProxy(BaseHTTPRequestHandler):
    """Answers the first ``failures`` requests with 503, forwards the rest to the real server."""

    upstream = ""
    failures = 0
    seen = 0
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).seen += 1
            fail = type(self).seen <= self.failures
        if fail:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        upstream = httpx.post(self.upstream + self.path, content=body, headers={"content-type": "application/json"})
        self.send_response(upstream.status_code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    def log_message(self, *args):
        pass


def test_server_errors_are_retried_with_backoff(llama_server, engine):
    _FlakyProxy.upstream, _FlakyProxy.failures, _FlakyProxy.seen = llama_server, 2, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        flaky = OpenAIEngine(f"http://127.0.0.1:{proxy.server_port}", model=engine.model, retries=3, backoff_s=0.01)
        p = flaky.score(PROMPTS[:1])
        assert _FlakyProxy.seen == 3  # two 503s, then the real answer
        np.testing.assert_allclose(p, engine.score(PROMPTS[:1]), atol=1e-6)
        flaky.close()
    finally:
        proxy.shutdown()


def test_concurrent_batch_keeps_order_even_when_the_model_would_stop_first(engine, smollm2_engine):
    # On most of these prompts SmolLM2's greedy next token is end-of-sequence, after which the
    # llama.cpp server reports no log-probabilities unless the request sets min_tokens=1.
    prompts = [f"Question {i}: is {i} an even number? Answer (yes or no):" for i in range(5)]
    batch = engine.score(prompts)
    one_by_one = np.array([engine.score([p])[0] for p in prompts])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-3)
    np.testing.assert_allclose(batch, smollm2_engine.score(prompts), atol=0.08)
