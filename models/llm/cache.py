"""Where converted and generated model files live (FLEXOR_CACHE_DIR, default ~/.cache/flexor)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXOR_CACHE_DIR", Path.home() / ".cache" / "flexor"))


def offline() -> None:
    """Nothing is ever fetched from a model hub: set before transformers is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
