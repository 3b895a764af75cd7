"""Yes/no LLM scoring: engines behind one protocol, prompt templates, answer parsing, batching.

Engines (``load_engine(spec)``): transformers (``hf``), OpenAI-compatible HTTP (``openai``) and
TensorRT-LLM in process (``trtllm``). They share ``prompts`` and ``answer_tokens``, so a prompt
and its P(yes) mean the same on every engine. ``BatchScheduler`` gathers requests from many
callers into engine batches. This package knows only strings and arrays.
"""

from models.llm.engine import EngineError, EngineStats, StatsSnapshot, YesNoEngine
from models.llm.prompts import PromptLibrary, build_baseline_evidence, build_baseline_validate, build_yes_no
from models.llm.scheduler import BatchScheduler, SchedulerClosed
from models.llm.specs import SPECS, load_engine

__all__ = [
    "SPECS",
    "BatchScheduler",
    "EngineError",
    "EngineStats",
    "PromptLibrary",
    "SchedulerClosed",
    "StatsSnapshot",
    "YesNoEngine",
    "build_baseline_evidence",
    "build_baseline_validate",
    "build_yes_no",
    "load_engine",
]
