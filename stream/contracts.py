"""The event contracts as JSON Schema files, generated from the pydantic models that decode and
describe the events. `python -m stream.contracts [DIR]` writes them (default docs/schemas);
tests/stream/test_contracts.py fails when the files and the models disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stream import schemas
from stream.backfill import WorkItem

# File stem -> model.
MODELS: dict[str, type[BaseModel]] = {
    "conversation.v1": schemas.ConversationV1,
    "classification.v1": schemas.ClassificationV1,
    "feedback.v1": schemas.FeedbackV1,
    "dead-letter.headers.v1": schemas.DeadLetterHeadersV1,
    "backfill.v1": WorkItem,
}

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def json_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        out[name] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{name}.json", **schema}
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.json"
        path.write_text(render(schema))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR):
        print(p)
