"""The packaged MiniLM through each backend: the ONNX exports match the torch reference, and the
default int8 backend gives a text the same vector whatever it is embedded with."""

from __future__ import annotations

import numpy as np
import pytest

from models.embedder import DIM, load_embedder

TEXTS = [
    "user: Hello.",
    "user: I'd like to book a table for four at an Italian place tonight, somewhere near the river "
    "if possible, and not too expensive.\nassistant: Sure, what time?\nuser: Around 7 pm.",
    "assistant: I'm sorry, the transfer failed. Would you like to try again?",
    "user: Can you find me something else? I don't like that one.",
    "customer: The invoice charged us twice this month and it is costing us money.",
    "user: Do you have any other options?",
]


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    return {backend: load_embedder(backend).embed(TEXTS) for backend in ("onnx-int8", "onnx", "torch")}


def test_exports_match_the_torch_reference(vectors: dict[str, np.ndarray]) -> None:
    for backend, v in vectors.items():
        assert v.shape == (len(TEXTS), DIM) and v.dtype == np.float32, backend
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5), backend
    assert np.abs(vectors["onnx"] - vectors["torch"]).max() < 1e-4
    assert (vectors["onnx-int8"] * vectors["onnx"]).sum(1).min() > 0.97
    # and they carry meaning: a paraphrase is nearer than the other texts
    v = vectors["onnx-int8"]
    assert int(np.argmax(v[:5] @ v[5])) == 3


def test_int8_vector_does_not_depend_on_other_texts(vectors: dict[str, np.ndarray]) -> None:
    embedder = load_embedder("onnx-int8")
    alone = np.concatenate([embedder.embed([t]) for t in TEXTS])
    shuffled = embedder.embed(TEXTS[::-1] + ["user: " + "padding " * 200])[: len(TEXTS)][::-1]
    # Exact equality: per-batch activation scales would move these in the 2nd-3rd decimal.
    assert np.array_equal(alone, vectors["onnx-int8"])
    assert np.array_equal(shuffled, vectors["onnx-int8"])
    assert embedder.embed([]).shape == (0, DIM)
