import numpy as np
import pytest

from models.llm.bench import bench_batching, sample_prompts
from models.llm.hf import HFEngine
from models.llm.prompts import build_yes_no
from models.llm.tiny import build_tiny_model, ensure_tiny_model


def test_batched_left_padded_scores_equal_one_by_one(tiny_engine):
    prompts = sample_prompts(12, seed=3) + [build_yes_no("Short?", ["a"])]
    lengths = tiny_engine.count_tokens(prompts)
    assert max(lengths) - min(lengths) > 50  # real padding happens
    batched = tiny_engine.score(prompts)
    single = np.array([tiny_engine.score([p])[0] for p in prompts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert np.all((batched >= 0) & (batched <= 1))


def test_scores_follow_the_input_order_whatever_the_length_sort(tiny_engine):
    prompts = sample_prompts(9, seed=5)
    forward = tiny_engine.score(prompts)
    np.testing.assert_allclose(tiny_engine.score(prompts[::-1]), forward[::-1], atol=1e-5)


def test_token_accounting(tiny_engine):
    prompts = sample_prompts(4, seed=7)
    counts = tiny_engine.count_tokens(prompts)
    assert counts == [len(tiny_engine.tokenizer.encode(p)) for p in prompts]
    before = tiny_engine.stats.snapshot()
    tiny_engine.score(prompts)
    delta = tiny_engine.stats.snapshot() - before
    assert (delta.calls, delta.prompts, delta.prompt_tokens, delta.generated_tokens) == (1, 4, sum(counts), 4)


def test_generate_is_greedy_and_padding_free(tiny_engine):
    prompts = [build_yes_no("Short?", ["a"]), *sample_prompts(2, seed=11)]
    before = tiny_engine.stats.snapshot()
    batched = tiny_engine.generate(prompts, max_tokens=6)
    # Counted from the generated ids: decoded text does not re-encode to the same length when a
    # byte-level token splits a UTF-8 character.
    assert 0 < (tiny_engine.stats.snapshot() - before).generated_tokens <= 6 * len(prompts)
    single = [tiny_engine.generate([p], max_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(t for t in batched)
    assert tiny_engine.generate(prompts[:1], max_tokens=6) == batched[:1]  # deterministic


def test_tiny_model_builds_deterministically(tmp_path, tiny_engine):
    build_tiny_model(tmp_path)
    rebuilt = HFEngine(tmp_path, batch_size=8)
    assert rebuilt.tokenizer.get_vocab() == tiny_engine.tokenizer.get_vocab()
    prompts = sample_prompts(3, seed=1)
    np.testing.assert_allclose(rebuilt.score(prompts), tiny_engine.score(prompts), atol=1e-6)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from models.llm.engine import EngineError

    with pytest.raises(EngineError, match="no transformers checkpoint"):
        HFEngine(tmp_path)
    assert ensure_tiny_model().name == "tiny-llama-v1"


def test_bench_runs_both_batch_sizes_on_the_same_prompts(tiny_engine):
    forwards = []
    hook = tiny_engine.model.register_forward_hook(lambda m, i, o: forwards.append(1))
    try:
        result = bench_batching(tiny_engine, sample_prompts(32, seed=2), (1, 32))
    finally:
        hook.remove()
        tiny_engine.batch_size = 32
    print(result)  # prompts/s are machine-dependent: the report quotes them, the test does not gate on them
    assert result["batch_1_prompts_per_s"] > 0 and result["batch_32_prompts_per_s"] > 0
    ratio = result["batch_32_prompts_per_s"] / result["batch_1_prompts_per_s"]
    assert result["speedup"] == pytest.approx(ratio, rel=0.01)
    # warm-up (prefix + suffixes) + 32 single-prompt passes + one batch of 32 (prefix + suffixes)
    assert len(forwards) == 2 + 32 + 2


def test_smollm2_scores(smollm2_engine):
    prompts = [build_yes_no("Was the customer annoyed?", ["customer: third call, I am really annoyed"]),
               build_yes_no("Did the agent offer a refund?", [])]
    p = smollm2_engine.score(prompts)
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    assert smollm2_engine.answer_tokens.yes_ids and smollm2_engine.tokenizer.decode(
        [smollm2_engine.answer_tokens.yes_ids[0]]
    ).strip().lower() == "yes"
    np.testing.assert_allclose([smollm2_engine.score([q])[0] for q in prompts], p, atol=1e-4)


def _tokens_run(engine, prompts) -> int:
    """Token positions the model actually computed during ``engine.score(prompts)``."""
    seen = []
    hook = engine.model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        engine.score(prompts)
    finally:
        hook.remove()
    return sum(seen)


def test_the_shared_prefix_is_computed_once_per_batch_and_changes_nothing(tiny_engine):
    from models.llm.prompts import default_library

    prompts = sample_prompts(10, seed=8)
    shared = tiny_engine._shared_prefix(tiny_engine._encode(prompts))
    assert shared >= len(tiny_engine.tokenizer.encode(default_library().get("yes_no").prefix)) - 1
    with_reuse = tiny_engine.score(prompts)
    reused = _tokens_run(tiny_engine, prompts)
    tiny_engine.prefix_reuse = False
    try:
        without = tiny_engine.score(prompts)
        full = _tokens_run(tiny_engine, prompts)
    finally:
        tiny_engine.prefix_reuse = True
    np.testing.assert_allclose(with_reuse, without, atol=1e-5)
    assert reused < 0.7 * full


@pytest.mark.parametrize(
    "first",
    [
        "agent: hello, how can I help?",
        "You review customer-support conversations. You answer one yes/no question about a conversation.\nOk?",
    ],
)
def test_batches_with_little_or_another_shared_prefix(tiny_engine, first):
    prompts = [first, build_yes_no("Annoyed?", ["customer: hi"]), *sample_prompts(2, seed=6)]
    shared = tiny_engine._shared_prefix(tiny_engine._encode(prompts))
    assert (shared < tiny_engine.min_shared_prefix) == first.startswith("agent")
    np.testing.assert_allclose(tiny_engine.score(prompts), [tiny_engine.score([p])[0] for p in prompts], atol=1e-5)
