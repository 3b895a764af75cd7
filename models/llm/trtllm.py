"""TensorRT-LLM engine: the in-process LLM API on a GPU image (Python 3.12, see docs/gpu.md).

TensorRT-LLM cannot be installed on the CPU machines (no Python 3.11 build, no NVIDIA index), so
it is imported only when a ``TRTLLMEngine`` is made, with a clear error when it is absent. All
prompt building (``prompts``) and answer parsing (``answer_tokens``) is shared with the engines
that run here; only ``_run`` touches TensorRT-LLM.

Settings, as the LLM API documents them (tensorrt_llm.LLM / SamplingParams / KvCacheConfig):
- ``LLM(model, max_batch_size, max_num_tokens, kv_cache_config=KvCacheConfig(
  enable_block_reuse=True, free_gpu_memory_fraction))``: block reuse lets every prompt of a batch
  reuse the KV blocks of the shared instruction prefix;
- scoring: ``SamplingParams(max_tokens=1, temperature=0, logprobs=K)``; each output's
  ``outputs[0].logprobs[0]`` is a dict {token_id: Logprob(logprob, rank)} of the top K. Releases
  before top-K support in the PyTorch backend (autumn 2025) return only the sampled token: use
  ``answer_source="logits"``, which asks for ``return_generation_logits=True`` and parses the full
  next-token logits exactly like the hf engine (the TensorRT backend also needs
  ``gather_generation_logits=True``, passed through ``llm_kwargs``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.llm.answer_tokens import AnswerTokens, hf_answer_tokens, p_yes_from_logits, p_yes_from_top_logprobs
from models.llm.engine import EngineError, EngineStats, check_probabilities

log = logging.getLogger(__name__)

NOT_INSTALLED = (
    "TensorRT-LLM is not installed: use the GPU image (Python 3.12, pip install tensorrt-llm from NVIDIA's index; "
    "see docs/gpu.md), or another engine spec (openai:URL for trtllm-serve, hf:PATH on CPU)"
)


def import_tensorrt_llm() -> Any:
    """The ``tensorrt_llm`` module, or EngineError(NOT_INSTALLED)."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise EngineError(f"{NOT_INSTALLED} ({e})", retriable=False) from e
    return tensorrt_llm


def p_yes_from_output(output: Any, tokens: AnswerTokens, answer_source: str) -> float:
    """P(yes) from one ``RequestOutput`` of ``LLM.generate``."""
    completion = output.outputs[0]
    if answer_source == "logits":
        logits = completion.generation_logits
        if logits is None:
            raise EngineError("no generation_logits: set gather_generation_logits / return_generation_logits")
        row = logits.float().cpu().numpy().reshape(-1, logits.shape[-1])[:1]
        return float(p_yes_from_logits(row, tokens)[0])
    if not completion.logprobs:
        raise EngineError("no logprobs in the output: set SamplingParams(logprobs=K)")
    first = completion.logprobs[0]
    if not isinstance(first, dict):
        raise EngineError("this TensorRT-LLM returns no top-K logprobs: use answer_source='logits'")
    top = {int(token_id): float(getattr(lp, "logprob", lp)) for token_id, lp in first.items()}
    return p_yes_from_top_logprobs(top, side_of=tokens.side_of_id)


class TRTLLMEngine:
    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: str | Path | None = None,
        model_id: str | None = None,
        max_batch_size: int = 256,
        max_num_tokens: int = 16384,
        top_logprobs: int = 20,
        answer_source: str = "logprobs",
        kv_block_reuse: bool = True,
        free_gpu_memory_fraction: float = 0.85,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if answer_source not in ("logprobs", "logits"):
            raise ValueError("answer_source must be 'logprobs' or 'logits'")
        trtllm = import_tensorrt_llm()
        from tensorrt_llm.llmapi import KvCacheConfig
        from transformers import AutoTokenizer

        self._trtllm = trtllm
        self.model_id = model_id or f"trtllm:{Path(model).name}"
        self.top_logprobs = top_logprobs
        self.answer_source = answer_source
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.answer_tokens = hf_answer_tokens(self.tokenizer)
        self._llm = trtllm.LLM(
            model=str(model),
            tokenizer=str(tokenizer or model),
            max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            kv_cache_config=KvCacheConfig(
                enable_block_reuse=kv_block_reuse, free_gpu_memory_fraction=free_gpu_memory_fraction
            ),
            **(llm_kwargs or {}),
        )
        self.stats = EngineStats()

    def _run(self, prompts: list[str], **sampling: Any) -> list[Any]:
        params = self._trtllm.SamplingParams(temperature=0.0, **sampling)
        try:
            outputs = self._llm.generate(prompts, params)
        except Exception as e:
            raise EngineError(f"{self.model_id}: {e}", retriable=False) from e
        self.stats.add(
            prompts=len(prompts),
            prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
            generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        )
        return outputs

    def score(self, prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.empty(0, dtype=np.float64)
        if self.answer_source == "logits":
            outputs = self._run(prompts, max_tokens=1, return_generation_logits=True)
        else:
            outputs = self._run(prompts, max_tokens=1, logprobs=self.top_logprobs)
        p = [p_yes_from_output(o, self.answer_tokens, self.answer_source) for o in outputs]
        return check_probabilities(np.array(p), len(prompts))

    def generate(self, prompts: list[str], max_tokens: int = 64) -> list[str]:
        return [o.outputs[0].text for o in self._run(prompts, max_tokens=max_tokens)] if prompts else []

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
