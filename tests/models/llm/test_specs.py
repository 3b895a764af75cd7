import types

import numpy as np
import pytest
import torch

from models.llm import load_engine
from models.llm.answer_tokens import p_yes_from_logits
from models.llm.engine import EngineError, YesNoEngine
from models.llm.openai_engine import OpenAIEngine
from models.llm.trtllm import NOT_INSTALLED, p_yes_from_output

try:
    import tensorrt_llm  # noqa: F401

    HAVE_TRTLLM = True
except ImportError:
    HAVE_TRTLLM = False


@pytest.mark.parametrize("spec", ["", "hf", "hf:", "openai:", "openai:localhost:8000", "trtllm:", "vllm:x", "hf-small"])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(ValueError, match="bad LLM engine spec") as info:
        load_engine(spec)
    assert "\n" not in str(info.value) and "hf-tiny" in str(info.value)


def test_hf_tiny_spec(tiny_engine):
    engine = load_engine("hf-tiny", batch_size=4)
    assert engine.model_id == "hf-tiny" and engine.batch_size == 4
    assert isinstance(engine, YesNoEngine)
    prompts = ["customer: yes or no?", "agent: hello"]
    np.testing.assert_allclose(engine.score(prompts), tiny_engine.score(prompts), atol=1e-6)


def test_openai_spec_needs_no_server_until_used():
    engine = load_engine("openai:http://127.0.0.1:8000/v1", concurrency=3)
    assert isinstance(engine, OpenAIEngine) and engine.base_url == "http://127.0.0.1:8000/v1"
    engine.close()


def test_hf_path_spec_without_a_checkpoint(tmp_path):
    with pytest.raises(EngineError, match="no transformers checkpoint"):
        load_engine(f"hf:{tmp_path}")


@pytest.mark.skipif(HAVE_TRTLLM, reason="TensorRT-LLM is installed here")
def test_trtllm_without_tensorrt_llm_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError) as info:
        load_engine(f"trtllm:{tmp_path}")
    assert str(info.value).startswith(NOT_INSTALLED) and not info.value.retriable
    assert "Python 3.12" in str(info.value)


def _output(**completion):
    """The documented shape of tensorrt_llm's RequestOutput (outputs[0] is a CompletionOutput)."""
    return types.SimpleNamespace(outputs=[types.SimpleNamespace(**completion)])


def test_trtllm_outputs_are_parsed_with_the_shared_parser(tiny_engine):
    tokens = tiny_engine.answer_tokens
    logits = tiny_engine.next_token_logits(["customer: yes or no?"])
    expected = p_yes_from_logits(logits, tokens)[0]
    # return_generation_logits=True: a (1, vocab) tensor for the one generated token.
    got = p_yes_from_output(_output(generation_logits=torch.tensor(logits)), tokens, "logits")
    assert got == pytest.approx(expected)
    # logprobs=K: [{token_id: Logprob(logprob, rank)}], here with every token listed.
    logprobs = torch.log_softmax(torch.tensor(logits[0], dtype=torch.float64), -1).tolist()
    top = {i: types.SimpleNamespace(logprob=lp, rank=0) for i, lp in enumerate(logprobs)}
    assert p_yes_from_output(_output(logprobs=[top]), tokens, "logprobs") == pytest.approx(expected)
    # A release that returns only the sampled token's logprob (a float list) is a clear error.
    with pytest.raises(EngineError, match="answer_source='logits'"):
        p_yes_from_output(_output(logprobs=[-0.3]), tokens, "logprobs")
