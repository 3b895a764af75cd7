"""`flexor bench --llm-throughput`: an LLM engine's prompts/s and tokens/s per batch size.

The prompts are the LLM stage's real shape (`models.llm.bench.sample_prompts`: the production
yes/no template with 3-5 evidence excerpts). On a GPU without downloads, `--engine
hf-random:llama-3.1-8b --device cuda --dtype bfloat16` measures an 8B model's cost with random
weights (`models.llm.random_model`).
"""

from __future__ import annotations

import argparse
from typing import Any

from stream.bench import engine_options, machine, write_json


def run_llm_throughput(args: argparse.Namespace) -> int:
    from models.llm.bench import bench_batching, sample_prompts
    from models.llm.specs import load_engine

    options = engine_options(args)
    engine = load_engine(args.engine, **options)
    sizes = tuple(sorted(set(args.batch_sizes)))
    raw = bench_batching(engine, sample_prompts(args.prompts), sizes)
    result: dict[str, Any] = {
        "engine": args.engine,
        "model_id": raw["model_id"],
        "device": options.get("device", "cpu"),
        "dtype": options.get("dtype"),
        "prompts": raw["prompts"],
        "mean_prompt_tokens": raw["mean_prompt_tokens"],
        "batches": [
            {"batch_size": b, "prompts_per_s": raw[f"batch_{b}_prompts_per_s"],
             "tokens_per_s": raw[f"batch_{b}_tokens_per_s"]}
            for b in sizes
        ],
        "machine": {**machine(), "accelerator": _accelerator(options.get("device", "cpu"))},
    }
    path = write_json(args.report, result)
    for b in result["batches"]:
        print(f"batch {b['batch_size']:>4}: {b['prompts_per_s']:>9.1f} prompts/s {b['tokens_per_s']:>11.0f} tokens/s")
    print(f"-> {path}")
    return 0


def _accelerator(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))
