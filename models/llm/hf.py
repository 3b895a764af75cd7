"""Transformers engine (CPU or GPU): batched, left-padded, shared prefix computed once.

``score`` sorts prompts by token length (less padding per batch), runs batches of
``batch_size`` with left padding and explicit position ids, asks the model for the logits of
the last position only (``logits_to_keep=1``) and reads P(yes) from them exactly
(``answer_tokens.p_yes_from_logits``). Prompts longer than the model's context are cut from the
left with a warning.

Prefix reuse (the CPU counterpart of TensorRT-LLM's KV block reuse): every prompt of a template
starts with the same instructions, so a batch's longest common token prefix is run once, its KV
cache is repeated over the batch, and only the suffixes (left-padded after the prefix) are run
on top of it. With ``yes_no.v1`` about half of each prompt's tokens are shared.

``device`` (``cpu``, ``cuda``, ``cuda:N``) and ``dtype`` (``float32``, ``float16``, ``bfloat16``)
place the model; on a GPU use ``bfloat16``.

``num_threads`` sets torch's intra-op threads (process-wide). On a 2-core machine that other
busy processes share, 2 OpenMP threads measured 4-35x slower than 1 thread at batch 1 (the
threads wait for each other), so set it to 1 on shared hosts. Leave it unset on a dedicated one.
"""

from __future__ import annotations

import inspect
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from models.llm.answer_tokens import AnswerTokens, hf_answer_tokens, p_yes_from_logits
from models.llm.cache import offline
from models.llm.engine import EngineError, EngineStats, check_probabilities

log = logging.getLogger(__name__)


class HFEngine:
    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        model_id: str | None = None,
        batch_size: int = 32,
        num_threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        prefix_reuse: bool = True,
        min_shared_prefix: int = 16,
    ) -> None:
        offline()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if num_threads:
            torch.set_num_threads(num_threads)
        if model is None:
            path = Path(model_dir or "")
            if not (path / "config.json").is_file():
                raise EngineError(f"no transformers checkpoint at {path} (config.json missing)")
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            model_id = model_id or f"hf:{path.name}"
        elif tokenizer is None or model_id is None:
            raise ValueError("an HFEngine built from a loaded model needs its tokenizer and a model_id")
        self._torch = torch
        self.model_id = str(model_id)
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.prefix_reuse = prefix_reuse
        self.min_shared_prefix = min_shared_prefix
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.max_length = max_length or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.answer_tokens: AnswerTokens = hf_answer_tokens(self.tokenizer)
        self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._lock = threading.Lock()  # one forward pass at a time; torch already uses every core
        self.stats = EngineStats()

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        out = []
        for ids in encoded:
            if len(ids) > self.max_length:
                log.warning("prompt of %d tokens cut to the last %d", len(ids), self.max_length)
                ids = ids[-self.max_length :]
            out.append(ids)
        return out

    def _pad(self, batch: list[list[int]]):
        torch = self._torch
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @staticmethod
    def _shared_prefix(batch: list[list[int]]) -> int:
        """Length of the longest common token prefix, leaving every row at least one token."""
        shortest = min(len(ids) for ids in batch) - 1
        first = batch[0]
        n = 0
        while n < shortest and all(ids[n] == first[n] for ids in batch):
            n += 1
        return n

    def _forward_last(self, batch: list[list[int]]):
        """Last-position logits for one batch, (len(batch), vocab)."""
        torch = self._torch
        keep = {"logits_to_keep": 1} if self._keep_last else {}
        shared = self._shared_prefix(batch) if self.prefix_reuse and len(batch) > 1 else 0
        if shared < self.min_shared_prefix:
            input_ids, mask, positions = self._pad(batch)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep)
            return out.logits[:, -1, :]
        prefix = torch.tensor([batch[0][:shared]], dtype=torch.long, device=self.device)
        cache = self.model(input_ids=prefix, use_cache=True, **keep).past_key_values
        cache.batch_repeat_interleave(len(batch))
        input_ids, suffix_mask, suffix_positions = self._pad([ids[shared:] for ids in batch])
        mask = torch.cat([torch.ones((len(batch), shared), dtype=torch.long, device=self.device), suffix_mask], 1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=suffix_positions + shared,
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        return out.logits[:, -1, :]

    def next_token_logits(self, prompts: list[str]) -> np.ndarray:
        """(len(prompts), vocab) float32 logits of the token after each prompt, in input order."""
        torch = self._torch
        encoded = self._encode(prompts)
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        out: np.ndarray | None = None
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                logits = self._forward_last([encoded[i] for i in rows])
                if out is None:
                    out = np.empty((len(prompts), logits.shape[-1]), dtype=np.float32)
                out[rows] = logits.float().cpu().numpy()
        self.stats.add(prompts=len(prompts), prompt_tokens=sum(map(len, encoded)), generated_tokens=len(prompts))
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def score(self, prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.empty(0, dtype=np.float64)
        try:
            logits = self.next_token_logits(prompts)
        except RuntimeError as e:  # out of memory and friends
            raise EngineError(f"{self.model_id}: {e}", retriable=False) from e
        return check_probabilities(p_yes_from_logits(logits, self.answer_tokens), len(prompts))

    def generate(self, prompts: list[str], max_tokens: int = 64) -> list[str]:
        """Greedy decoding, batched like ``score``; returns only the new text."""
        if not prompts:
            return []
        torch = self._torch
        encoded = self._encode(prompts)
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        texts: list[str] = [""] * len(prompts)
        generated = 0
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                input_ids, mask, _ = self._pad([encoded[i] for i in rows])
                new = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )[:, input_ids.shape[1] :]
                for row, ids in zip(rows, new.tolist(), strict=True):
                    ids = [t for t in ids if t != self.tokenizer.pad_token_id]
                    eos = self.tokenizer.eos_token_id
                    if eos in ids:
                        ids = ids[: ids.index(eos)]
                    generated += len(ids)
                    texts[row] = self.tokenizer.decode(ids, skip_special_tokens=True)
        self.stats.add(prompts=len(prompts), prompt_tokens=sum(map(len, encoded)), generated_tokens=generated)
        return texts

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self._encode(prompts)]
