"""Where converted and generated model files live (FLEXOR_CACHE_DIR, default ~/.cache/flexor)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXOR_CACHE_DIR", Path.home() / ".cache" / "flexor"))


def offline() -> None:
    """Nothing is ever fetched from a model hub: set before transformers is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_model_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(tmp)` into a sibling temp dir and renamed into place, so readers
    never see a half-written model and concurrent builders do not clash. Reused when present."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
