"""The GPU code paths that run on a CPU too: random models of a real shape, device and dtype
settings, and `flexor bench --llm-throughput`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.embedder import TorchEmbedder, load_embedder
from models.llm.random_model import parameter_count
from models.llm.specs import load_engine
from stream.cli import main
from stream.config import ConfigError, load_settings


def test_the_8b_shape_has_llama_3_1_8b_parameter_count() -> None:
    # Llama-3.1-8B has 8.03 B parameters; counted on the meta device, nothing is allocated.
    assert 8.0e9 < parameter_count("llama-3.1-8b") < 8.1e9


def test_random_engine_runs_in_the_dtype_asked() -> None:
    engine = load_engine("hf-random:tiny", dtype="bfloat16", batch_size=3)
    assert engine.model_id == "hf-random:tiny"
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    p = engine.score(["Question: was the customer annoyed? Answer:"] * 4 + ["Question: refund? Answer:"])
    assert p.shape == (5,) and np.isfinite(p).all()
    with pytest.raises(ValueError, match="unknown random model"):
        load_engine("hf-random:70b")


def test_torch_embedder_dtype_names_its_vectors() -> None:
    fp32 = load_embedder("torch")
    bf16 = TorchEmbedder(dtype="bfloat16")
    assert (fp32.model_id, bf16.model_id) == ("all-MiniLM-L6-v2:torch", "all-MiniLM-L6-v2:torch-bfloat16")
    texts = ["customer: my card was charged twice", "agent: I have refunded the second charge"]
    a, b = fp32.embed(texts), bf16.embed(texts)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert ((a * b).sum(1) > 0.99).all()  # the same model in less precision


def test_device_setting_is_checked() -> None:
    assert load_settings(None, **{"models.device": "cuda:1", "models.dtype": "bfloat16"}).models.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"models\.device"):
        load_settings(None, **{"models.device": "gpu"})


def test_llm_throughput_bench_reports_every_batch_size(tmp_path: Path) -> None:
    code = main(["bench", "--llm-throughput", "--engine", "hf-tiny", "--dtype", "bfloat16",
                 "--batch-sizes", "4", "1", "--prompts", "8", "--report", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert (r["device"], r["dtype"], r["prompts"]) == ("cpu", "bfloat16", 8)
    assert [b["batch_size"] for b in r["batches"]] == [1, 4]
    for b in r["batches"]:
        # tokens/s counts each prompt's tokens plus its one answer token
        assert b["tokens_per_s"] == pytest.approx(b["prompts_per_s"] * (r["mean_prompt_tokens"] + 1), rel=0.01)
